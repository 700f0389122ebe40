//! Test a plugin in `cargo test`, without a server.
//!
//! [`TestHost`] drives your [`Plugin`] through the very trampolines that
//! [`export_plugin!`](crate::export_plugin) exports — TOML config
//! deserialization, panic catching, the response sink — so a unit test
//! sees what the real host would see.
//!
//! ```
//! use nbnet_plugin_api::testing::TestHost;
//! # use nbnet_plugin_api::{Error, InitContext, NoConfig, Plugin, Response};
//! # struct Upper;
//! # impl Plugin for Upper {
//! #     type Config = NoConfig;
//! #     fn new(_: NoConfig, _: &InitContext) -> Result<Self, Error> { Ok(Upper) }
//! #     fn process(&mut self, req: &[u8], resp: &mut Response) -> Result<(), Error> {
//! #         resp.write(&req.to_ascii_uppercase())
//! #     }
//! # }
//! let mut host = TestHost::<Upper>::new("").unwrap();
//! assert_eq!(host.process(b"hi").unwrap(), b"HI");
//! ```

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::abi::{
    RawBatch, RawConnection, RawDeferred, RawInitContext, RawRequest, NBNET_ERR, NBNET_OK,
};
use crate::sdk::{
    close_trampoline, destroy_trampoline, init_trampoline, open_trampoline,
    process_batch_trampoline, process_trampoline, shutdown_trampoline,
};
use crate::sink::{Deferrer, ResponseSink, SinkError};
use crate::Plugin;

/// What [`TestHost::process_batch`] returns: every answer, or the answers
/// before the request that failed and its message.
pub type BatchAnswers = Result<Vec<Vec<u8>>, (Vec<Vec<u8>>, String)>;

/// The log lines of a host's instances (any thread may log).
type Logs = Mutex<Vec<String>>;

/// A plugin instance hosted in-process for tests.
///
/// # Plugins that wait
///
/// A request the plugin defers ([`Response::defer`](crate::Response::defer))
/// is waited for: [`process`](Self::process) returns its answer once some
/// thread completes the handle (at most [`deferred_timeout`](Self::deferred_timeout)
/// later), or the message it failed with — `"the plugin dropped its
/// Deferred without answering"` for a handle dropped. To have several
/// requests in flight at once (a plugin that answers in batches, or out of
/// order), hand them over with [`send`](Self::send) and wait for each
/// [`Pending`] in turn.
///
/// A plugin meant to run with `[[plugins]] threads = N` is tested with
/// [`with_threads`](Self::with_threads): N instances, each created and
/// called on its own thread and told its `thread_index` and
/// `thread_count`, as the server's pool does.
pub struct TestHost<P: Plugin> {
    mode: Mode,
    logs: Arc<Logs>,
    completions: Arc<Completions>,
    next_token: u64,
    peer: CString,
    listener: CString,
    /// Largest response `process` may write (like `max_frame_bytes`).
    pub max_response_bytes: usize,
    /// How long [`Pending::wait`] (and so `process`) waits for a deferred
    /// answer before giving up (like `deferred_timeout`; 10 s by default).
    pub deferred_timeout: Duration,
    _plugin: PhantomData<P>,
}

/// Where the instances live.
enum Mode {
    /// One instance, called on the test's thread.
    Inline(*mut c_void),
    /// One instance per pool thread.
    Pool(Pool),
}

impl<P: Plugin> TestHost<P> {
    /// Creates an instance from `config_toml` (the plugin's `config` table as
    /// TOML text, `""` for none), as worker 0 of 1. `Err` carries the message
    /// the host would log.
    pub fn new(config_toml: &str) -> Result<Self, String> {
        Self::with_worker(config_toml, 0, 1)
    }

    /// Like [`TestHost::new`], as worker `index` of `count`.
    pub fn with_worker(config_toml: &str, index: u32, count: u32) -> Result<Self, String> {
        // In-process: the panic hook stays the test harness's.
        crate::sdk::IN_TEST_HOST.store(true, Ordering::Relaxed);
        let logs: Arc<Logs> = Arc::default();
        let state = create::<P>(config_toml, &logs, (index, count), (0, 0))?;
        Ok(Self::hosting(Mode::Inline(state), logs))
    }

    /// Like [`TestHost::new`], as `[[plugins]] threads = threads` runs the
    /// plugin: `threads` instances (at least 1), each created, called and
    /// destroyed on a thread of its own and told its `thread_index` and
    /// `thread_count`. Requests go to whichever thread is free, one at a
    /// time per instance. As in the server, the connection hooks are not
    /// called for a pooled plugin ([`open_connection`](Self::open_connection)
    /// and [`close_connection`](Self::close_connection) do nothing), and
    /// batches are answered one request at a time.
    pub fn with_threads(config_toml: &str, threads: u32) -> Result<Self, String> {
        crate::sdk::IN_TEST_HOST.store(true, Ordering::Relaxed);
        let logs: Arc<Logs> = Arc::default();
        let completions = Arc::new(Completions::default());
        let pool = Pool::start::<P>(config_toml, threads.max(1), &logs, &completions)?;
        let mut host = Self::hosting(Mode::Pool(pool), logs);
        host.completions = completions;
        Ok(host)
    }

    fn hosting(mode: Mode, logs: Arc<Logs>) -> Self {
        TestHost {
            mode,
            logs,
            completions: Arc::new(Completions::default()),
            next_token: 0,
            peer: CString::new("127.0.0.1:40000").expect("no NUL"),
            listener: CString::new("127.0.0.1:9000").expect("no NUL"),
            max_response_bytes: 16 * 1024 * 1024,
            deferred_timeout: Duration::from_secs(10),
            _plugin: PhantomData,
        }
    }

    /// Answers one request; `Err` carries the plugin's error message (a
    /// caught panic included). A deferred answer is waited for (see
    /// [`Pending::wait`]).
    pub fn process(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.send(request).wait()
    }

    /// Hands one request to the plugin and returns at once: with its
    /// answer if the plugin answered inline, or a [`Pending`] to wait for
    /// if it deferred it (or it went to a pool thread). Requests sent one
    /// after the other are in flight together, as a client's pipelined
    /// requests are.
    pub fn send(&mut self, request: &[u8]) -> Pending {
        let state = match &self.mode {
            Mode::Inline(state) => *state,
            Mode::Pool(pool) => {
                self.next_token += 1;
                let token = self.next_token;
                pool.submit(Job {
                    token,
                    request: request.to_vec(),
                    max: self.max_response_bytes,
                });
                return self.pending(token);
            }
        };
        let conn = self.connection(1);
        let mut sink = ResponseSink::new(Vec::new(), self.max_response_bytes, &conn);
        let mut deferrer = self.deferrer();
        sink.set_deferrer(&mut deferrer);
        let response = sink.begin(&[], 0);
        // SAFETY: `state` is this plugin's instance; the rest (and the sink
        // behind `response`, which stays put, and the deferrer it uses) is
        // valid for the call.
        let rc =
            unsafe { process_trampoline::<P>(state, request.as_ptr(), request.len(), response) };
        self.next_token = deferrer.last;
        let result = sink.finish(rc, 0);
        match (result, sink.marks().first()) {
            (Ok(_), Some(mark)) => self.pending(mark.token),
            (Ok(_), None) => Pending::done(Ok(sink.into_buffer())),
            (Err(error), _) => Pending::done(Err(describe(error))),
        }
    }

    /// Answers `requests` as the server does when a client pipelines them:
    /// in one `process_batch` call. Returns the answers in order; `Err`
    /// carries the answers before a failed request and its message.
    /// Answers the plugin defers are waited for (as by `process`).
    pub fn process_batch(&mut self, requests: &[&[u8]]) -> BatchAnswers {
        let Mode::Inline(state) = self.mode else {
            // A pool answers one request at a time, as the server's does.
            let pending: Vec<Pending> = requests.iter().map(|r| self.send(r)).collect();
            let mut answers = Vec::with_capacity(pending.len());
            for p in pending {
                match p.wait() {
                    Ok(answer) => answers.push(answer),
                    Err(message) => return Err((answers, message)),
                }
            }
            return Ok(answers);
        };
        let conn = self.connection(1);
        let raw: Vec<RawRequest> = requests
            .iter()
            .map(|r| RawRequest {
                data: r.as_ptr(),
                len: r.len(),
            })
            .collect();
        let mut lens = vec![0usize; raw.len()];
        let mut progress = 0u64;
        // One byte of prefix before each answer: every answer then starts
        // at its own offset, which is how a deferred one is recognised
        // (its mark), even next to empty answers.
        const PREFIX: usize = 1;
        let mut batch = RawBatch {
            requests: raw.as_ptr(),
            count: raw.len(),
            lens: lens.as_mut_ptr(),
            prefix: PREFIX,
            budget: usize::MAX,
            answer_start: 0,
            progress: &mut progress,
        };
        let batch: *mut RawBatch = &mut batch;
        let mut sink = ResponseSink::new(Vec::new(), self.max_response_bytes, &conn);
        let mut deferrer = self.deferrer();
        sink.set_deferrer(&mut deferrer);
        // SAFETY: `batch`, its arrays and counter outlive the call and are
        // used only through these pointers meanwhile; `state` is this
        // plugin's instance; the deferrer outlives the sink's use.
        let answered = unsafe {
            let response = sink.begin_batch(batch, PREFIX, 0);
            process_batch_trampoline::<P>(state, batch, response)
        };
        self.next_token = deferrer.last;
        let result = sink.finish_batch::<PREFIX>(answered, raw.len(), &lens, |_| [b'.']);
        let marks: HashMap<usize, u64> = sink.marks().iter().map(|m| (m.at, m.token)).collect();
        let buffer = sink.into_buffer();
        let kept = match &result {
            Ok(k) | Err((k, _)) => *k,
        };
        let mut pending = Vec::with_capacity(kept);
        let mut at = 0;
        for &len in &lens[..kept] {
            at += PREFIX;
            pending.push(match marks.get(&at) {
                Some(&token) if len == 0 => self.pending(token),
                _ => Pending::done(Ok(buffer[at..at + len].to_vec())),
            });
            at += len;
        }
        let mut answers = Vec::with_capacity(kept);
        for p in pending {
            match p.wait() {
                Ok(answer) => answers.push(answer),
                Err(message) => return Err((answers, message)),
            }
        }
        match result {
            Ok(_) => Ok(answers),
            Err((_, error)) => Err((answers, describe(error))),
        }
    }

    /// Calls the connection-opened hook for connection `id`.
    pub fn open_connection(&mut self, id: u64) {
        let conn = self.connection(id);
        if let Mode::Inline(state) = self.mode {
            // SAFETY: as in `send`.
            unsafe { open_trampoline::<P>(state, &conn) }
        }
    }

    /// Calls the connection-closed hook for connection `id`.
    pub fn close_connection(&mut self, id: u64) {
        let conn = self.connection(id);
        if let Mode::Inline(state) = self.mode {
            // SAFETY: as in `send`.
            unsafe { close_trampoline::<P>(state, &conn) }
        }
    }

    /// Everything the plugin logged so far, as `LEVEL message` lines.
    pub fn logs(&self) -> Vec<String> {
        lock(&self.logs).clone()
    }

    /// Completions refused so far because the handle had been completed
    /// already (a C plugin's double `nbnet_answer`; a Rust plugin cannot).
    pub fn refused_completions(&self) -> u64 {
        self.completions.refused.load(Ordering::Relaxed)
    }

    fn connection(&self, id: u64) -> RawConnection {
        RawConnection {
            id,
            peer: self.peer.as_ptr(),
            listener: self.listener.as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        }
    }

    fn deferrer(&self) -> TestDeferrer {
        TestDeferrer {
            completions: Arc::clone(&self.completions),
            last: self.next_token,
            max: self.max_response_bytes,
        }
    }

    fn pending(&self, token: u64) -> Pending {
        Pending(Waiting::Deferred {
            token,
            completions: Arc::clone(&self.completions),
            timeout: self.deferred_timeout,
        })
    }
}

impl<P: Plugin> Drop for TestHost<P> {
    fn drop(&mut self) {
        match &mut self.mode {
            // SAFETY: `state` is this plugin's instance, destroyed once.
            Mode::Inline(state) => unsafe {
                shutdown_trampoline::<P>(*state);
                destroy_trampoline::<P>(*state);
            },
            Mode::Pool(pool) => pool.stop(),
        }
    }
}

/// A request handed over with [`TestHost::send`]: answered already, or
/// waiting for the plugin to complete it.
#[derive(Debug)]
#[must_use = "wait for the answer"]
pub struct Pending(Waiting);

#[derive(Debug)]
enum Waiting {
    Done(Result<Vec<u8>, String>),
    Deferred {
        token: u64,
        completions: Arc<Completions>,
        timeout: Duration,
    },
}

impl Pending {
    fn done(result: Result<Vec<u8>, String>) -> Pending {
        Pending(Waiting::Done(result))
    }

    /// Whether the request is still waiting for its answer (a deferred
    /// request that no thread has completed yet).
    pub fn is_waiting(&self) -> bool {
        match &self.0 {
            Waiting::Done(_) => false,
            Waiting::Deferred {
                token, completions, ..
            } => !lock(&completions.done).contains_key(token),
        }
    }

    /// The answer, or the message the request failed with; for a deferred
    /// request, once some thread completes it. `Err` if nothing completes
    /// it within the host's `deferred_timeout` (a completion after that is
    /// dropped, as the server drops it).
    pub fn wait(self) -> Result<Vec<u8>, String> {
        let (token, completions, timeout) = match self.0 {
            Waiting::Done(result) => return result,
            Waiting::Deferred {
                token,
                completions,
                timeout,
            } => (token, completions, timeout),
        };
        let deadline = Instant::now() + timeout;
        let mut done = lock(&completions.done);
        loop {
            if let Some(result) = done.remove(&token) {
                return result;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "deferred answer not completed within deferred_timeout = {timeout:?}"
                ));
            }
            done = completions
                .ready
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Completed deferred requests, by token, until waited for.
#[derive(Debug, Default)]
struct Completions {
    done: Mutex<HashMap<u64, Result<Vec<u8>, String>>>,
    ready: Condvar,
    refused: AtomicU64,
}

impl Completions {
    fn complete(&self, token: u64, result: Result<Vec<u8>, String>) {
        lock(&self.done).insert(token, result);
        self.ready.notify_all();
    }
}

/// The memory behind one handle. `#[repr(C)]` with the handle first (the
/// callbacks find the cell from the handle's address). Leaked: a handle may
/// be completed (or completed again, by mistake) at any time; a test makes
/// few.
#[repr(C)]
struct Cell {
    raw: RawDeferred,
    /// The request's token; 0 once completed.
    token: AtomicU64,
    max: usize,
    completions: Arc<Completions>,
}

/// Makes handles for a sink's `defer`.
struct TestDeferrer {
    completions: Arc<Completions>,
    last: u64,
    max: usize,
}

impl Deferrer for TestDeferrer {
    fn defer(&mut self) -> Result<(*mut RawDeferred, u64), String> {
        self.last += 1;
        let cell = Box::leak(Box::new(Cell {
            raw: RawDeferred {
                answer: deferred_answer,
                fail: deferred_fail,
                host: std::ptr::null_mut(),
            },
            token: AtomicU64::new(self.last),
            max: self.max,
            completions: Arc::clone(&self.completions),
        }));
        Ok((std::ptr::addr_of_mut!(cell.raw), self.last))
    }
}

/// Completes `d`'s request with `result`, once.
///
/// # Safety
/// `d` must come from [`TestDeferrer::defer`] (cells are never freed).
unsafe fn complete(
    d: *mut RawDeferred,
    result: impl FnOnce(&Cell) -> Result<Vec<u8>, String>,
) -> i32 {
    if d.is_null() {
        return NBNET_ERR;
    }
    // SAFETY: guaranteed by the caller.
    let cell = unsafe { &*d.cast::<Cell>() };
    let token = cell.token.swap(0, Ordering::AcqRel);
    if token == 0 {
        cell.completions.refused.fetch_add(1, Ordering::Relaxed);
        return NBNET_ERR;
    }
    cell.completions.complete(token, result(cell));
    NBNET_OK
}

unsafe extern "C" fn deferred_answer(d: *mut RawDeferred, data: *const u8, len: usize) -> i32 {
    // SAFETY: plugins pass handles made by `TestDeferrer::defer`, and `len`
    // readable bytes at `data`.
    unsafe {
        complete(d, |cell| {
            if len > cell.max {
                Err(format!(
                    "its deferred answer of {len} bytes exceeds max_frame_bytes = {}; the host refused it",
                    cell.max
                ))
            } else if data.is_null() && len > 0 {
                Err(format!("answered NULL with length {len}"))
            } else {
                Ok(text_bytes(data, len))
            }
        })
    }
}

unsafe extern "C" fn deferred_fail(d: *mut RawDeferred, msg: *const u8, len: usize) -> i32 {
    // SAFETY: as in `deferred_answer`.
    unsafe {
        complete(d, |_| {
            let message = text(msg, len);
            Err(if message.is_empty() {
                "failed its deferred request without a message".into()
            } else {
                message
            })
        })
    }
}

/// One request for a pool thread.
struct Job {
    token: u64,
    request: Vec<u8>,
    max: usize,
}

/// `TestHost::with_threads`' threads and their queue.
struct Pool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct PoolShared {
    queue: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Pool {
    fn start<P: Plugin>(
        config_toml: &str,
        threads: u32,
        logs: &Arc<Logs>,
        completions: &Arc<Completions>,
    ) -> Result<Pool, String> {
        let shared = Arc::new(PoolShared::default());
        let (made, results) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut pool = Pool {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        for index in 0..threads {
            let (config, logs, completions, shared, made) = (
                config_toml.to_string(),
                Arc::clone(logs),
                Arc::clone(completions),
                Arc::clone(&shared),
                made.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("test-pool-{index}"))
                .spawn(move || {
                    // Each instance is created on the thread that uses it.
                    match create::<P>(&config, &logs, (0, 1), (index, threads)) {
                        Ok(state) => {
                            let _ = made.send(Ok(()));
                            drop(made);
                            serve::<P>(state, &shared, &completions);
                        }
                        Err(e) => {
                            let _ = made.send(Err(e));
                        }
                    }
                })
                .map_err(|e| format!("cannot start pool thread {index}: {e}"));
            match thread {
                Ok(thread) => pool.threads.push(thread),
                Err(e) => {
                    pool.stop();
                    return Err(e);
                }
            }
        }
        drop(made);
        for _ in 0..threads {
            match results.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    pool.stop();
                    return Err(e);
                }
                Err(_) => {
                    pool.stop();
                    return Err("a pool thread ended before its instance was made".into());
                }
            }
        }
        Ok(pool)
    }

    fn submit(&self, job: Job) {
        lock(&self.shared.queue).0.push_back(job);
        self.shared.ready.notify_one();
    }

    /// Stops the threads once the queue is empty; each shuts down and
    /// destroys its instance.
    fn stop(&mut self) {
        lock(&self.shared.queue).1 = true;
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A pool thread: answers jobs with its instance until the pool stops.
fn serve<P: Plugin>(state: *mut c_void, shared: &PoolShared, completions: &Completions) {
    let (peer, listener) = (c"127.0.0.1:40000", c"127.0.0.1:9000");
    let conn = RawConnection {
        id: 1,
        peer: peer.as_ptr(),
        listener: listener.as_ptr(),
        flags: 0,
        tls_version: 0,
        tls_subject: std::ptr::null(),
        tls_sans: std::ptr::null(),
    };
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(job) = queue.0.pop_front() {
                    break Some(job);
                }
                if queue.1 {
                    break None;
                }
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let Some(job) = job else { break };
        // As in the server, a pooled instance cannot defer (the pool
        // already answers later): no deferrer on this sink.
        let mut sink = ResponseSink::new(Vec::new(), job.max, &conn);
        let response = sink.begin(&[], 0);
        // SAFETY: `state` is this thread's instance; the rest is valid for
        // the call.
        let rc = unsafe {
            process_trampoline::<P>(state, job.request.as_ptr(), job.request.len(), response)
        };
        let result = match sink.finish(rc, 0) {
            Ok(_) => Ok(sink.into_buffer()),
            Err(error) => Err(describe(error)),
        };
        completions.complete(job.token, result);
    }
    // SAFETY: this thread's instance, destroyed once, on its own thread.
    unsafe {
        shutdown_trampoline::<P>(state);
        destroy_trampoline::<P>(state);
    }
}

/// Creates an instance with `config_toml`, as worker `(index, count)` and
/// pool thread `(index, count)` (`(0, 0)`: not pooled).
fn create<P: Plugin>(
    config_toml: &str,
    logs: &Arc<Logs>,
    worker: (u32, u32),
    thread: (u32, u32),
) -> Result<*mut c_void, String> {
    let name = CString::new("test").expect("no NUL");
    let config = CString::new(config_toml).map_err(|_| "config contains a NUL byte")?;
    let mut error: Option<String> = None;
    let ctx = RawInitContext {
        struct_size: std::mem::size_of::<RawInitContext>() as u32,
        worker_index: worker.0,
        worker_count: worker.1,
        plugin_name: name.as_ptr(),
        config_toml: config.as_ptr(),
        config_toml_len: config_toml.len(),
        host: (&mut error as *mut Option<String>).cast(),
        set_error: init_set_error,
        log,
        log_handle: Arc::as_ptr(logs).cast(),
        config_get: no_config_get,
        thread_index: thread.0,
        thread_count: thread.1,
    };
    let mut state = std::ptr::null_mut();
    // SAFETY: `ctx` and `state` are valid for the call.
    let rc = unsafe { init_trampoline::<P>(&ctx, &mut state) };
    if rc != NBNET_OK {
        return Err(error.unwrap_or_else(|| "init failed without a message".into()));
    }
    Ok(state)
}

unsafe extern "C" fn init_set_error(ctx: *const RawInitContext, msg: *const u8, len: usize) {
    // SAFETY: `host` is the `Option<String>` of the running `with_worker`.
    let slot = unsafe { &mut *(*ctx).host.cast::<Option<String>>() };
    *slot = Some(text(msg, len));
}

unsafe extern "C" fn log(handle: *const c_void, level: i32, msg: *const u8, len: usize) {
    // SAFETY: `handle` is the log of a live `TestHost`.
    let logs = unsafe { &*handle.cast::<Logs>() };
    let level = match level {
        1 => "ERROR",
        2 => "WARN",
        3 => "INFO",
        _ => "DEBUG",
    };
    lock(logs).push(format!("{level} {}", text(msg, len)));
}

unsafe extern "C" fn no_config_get(_: *const RawInitContext, _: *const c_char) -> *const c_char {
    std::ptr::null()
}

fn text_bytes(msg: *const u8, len: usize) -> Vec<u8> {
    if msg.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: callers pass `len` readable bytes at `msg`.
    unsafe { std::slice::from_raw_parts(msg, len) }.to_vec()
}

fn text(msg: *const u8, len: usize) -> String {
    if msg.is_null() || len == 0 {
        return String::new();
    }
    // SAFETY: callers pass `len` readable bytes at `msg`.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len) }).into_owned()
}

/// The message the host would log for a failed request.
fn describe(error: SinkError) -> String {
    match error {
        SinkError::TooLarge(None) => {
            "the response would exceed max_frame_bytes; the host refused it".into()
        }
        SinkError::TooLarge(Some(message)) | SinkError::Plugin(Some(message)) => message,
        SinkError::Plugin(None) => "process failed without a message".into(),
        SinkError::Misuse(what) => what,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Sender};

    use super::TestHost;
    use crate::{Deferred, Error, InitContext, NoConfig, Plugin, Response};

    /// Answers from a thread of its own: `later X` is answered `X`, after
    /// every `later` request sent before it... in reverse order once `hold`
    /// of them are held; `drop` drops its handle; `now X` answers inline.
    struct Later {
        work: Sender<(Deferred, Vec<u8>)>,
    }

    impl Plugin for Later {
        type Config = NoConfig;

        fn new(_: NoConfig, _: &InitContext) -> Result<Self, Error> {
            let (work, jobs) = channel::<(Deferred, Vec<u8>)>();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for (deferred, request) in jobs {
                    held.push((deferred, request));
                    if held.len() == 3 {
                        // Last one first.
                        while let Some((deferred, request)) = held.pop() {
                            deferred.answer(&request);
                        }
                    }
                }
            });
            Ok(Later { work })
        }

        fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
            if let Some(now) = request.strip_prefix(b"now ") {
                return response.write(now);
            }
            let deferred = response.defer();
            if request == b"drop" {
                drop(deferred);
                return Ok(());
            }
            self.work
                .send((deferred, request.to_vec()))
                .map_err(|_| Error::new("thread gone"))
        }
    }

    /// Issue 12: TestHost refused every deferral ("this host cannot defer
    /// answers here").
    #[test]
    fn deferred_answers_are_waited_for_in_process_send_and_batches() {
        let mut host = TestHost::<Later>::new("").unwrap();
        // Three in flight, completed in reverse order; each gets its own.
        let a = host.send(b"a");
        let b = host.send(b"b");
        assert!(a.is_waiting() && b.is_waiting());
        let now = host.send(b"now inline");
        assert!(!now.is_waiting());
        assert_eq!(now.wait().unwrap(), b"inline");
        let c = host.send(b"c");
        assert_eq!(a.wait().unwrap(), b"a");
        assert_eq!(b.wait().unwrap(), b"b");
        assert_eq!(c.wait().unwrap(), b"c");
        // A dropped handle fails its request; a batch mixes deferred and
        // inline (and empty) answers in order.
        assert_eq!(
            host.process(b"drop").unwrap_err(),
            "the plugin dropped its Deferred without answering"
        );
        let batch: [&[u8]; 5] = [b"x", b"now ", b"y", b"now i", b"z"];
        assert_eq!(
            host.process_batch(&batch).unwrap(),
            [&b"x"[..], b"", b"y", b"i", b"z"]
        );
        // One never completed fails after the host's deferred_timeout.
        host.deferred_timeout = std::time::Duration::from_millis(50);
        let error = host.process(b"lonely").unwrap_err();
        assert!(
            error.contains("not completed within deferred_timeout"),
            "{error}"
        );
        host.deferred_timeout = std::time::Duration::from_secs(10);
        // Its late answer (when two more make three) is dropped.
        let (p, q) = (host.send(b"p"), host.send(b"q"));
        assert_eq!(
            (p.wait().unwrap(), q.wait().unwrap()),
            (b"p".to_vec(), b"q".to_vec())
        );
        // An answer over the limit fails its request.
        host.max_response_bytes = 1;
        let pending: Vec<_> = (0..3).map(|_| host.send(b"long")).collect();
        for p in pending {
            let error = p.wait().unwrap_err();
            assert!(error.contains("exceeds max_frame_bytes = 1"), "{error}");
        }
        assert_eq!(host.refused_completions(), 0);
    }

    /// Knows its pool thread; `block` waits until another request of the
    /// pool arrives (proving two instances run at once).
    struct Blocking {
        thread: (u32, u32),
        gate: std::sync::Arc<(std::sync::Mutex<u32>, std::sync::Condvar)>,
    }

    static GATE: std::sync::OnceLock<std::sync::Arc<(std::sync::Mutex<u32>, std::sync::Condvar)>> =
        std::sync::OnceLock::new();

    impl Plugin for Blocking {
        type Config = NoConfig;

        fn new(_: NoConfig, ctx: &InitContext) -> Result<Self, Error> {
            Ok(Blocking {
                thread: (ctx.thread_index(), ctx.thread_count()),
                gate: GATE.get_or_init(Default::default).clone(),
            })
        }

        fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
            if request == b"block" {
                let (count, arrived) = &*self.gate;
                let mut n = count.lock().unwrap();
                *n += 1;
                arrived.notify_all();
                while *n < 2 {
                    n = arrived.wait(n).unwrap();
                }
            }
            response.write(format!("thread {}/{}", self.thread.0, self.thread.1).as_bytes())
        }
    }

    /// Issue 12: TestHost could not host a plugin as `threads = N` does.
    #[test]
    fn with_threads_runs_one_instance_per_thread_concurrently() {
        let mut host = TestHost::<Blocking>::with_threads("", 2).unwrap();
        // Each blocks until the other has arrived: only two instances
        // running at once answer both.
        let first = host.send(b"block");
        let second = host.send(b"block");
        let mut threads = vec![first.wait().unwrap(), second.wait().unwrap()];
        threads.sort();
        assert_eq!(threads, [&b"thread 0/2"[..], b"thread 1/2"]);
        assert_eq!(
            host.process_batch(&[b"a", b"b"]).unwrap().len(),
            2,
            "a batch goes through the pool one request at a time"
        );
        // Inline, an instance is told it is not pooled.
        let mut inline = TestHost::<Blocking>::new("").unwrap();
        assert_eq!(inline.process(b"x").unwrap(), b"thread 0/0");
    }
}
