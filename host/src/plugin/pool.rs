//! Thread-pool offload (`[[plugins]] threads = N`): nbnet owns the
//! concurrency, the plugin stays plain blocking code.
//!
//! Each worker makes N instances of the plugin, one per pool thread (each
//! created on its own thread, told its `thread_index` and `thread_count`),
//! so `process` is still never called concurrently on one instance. To the
//! reactor the pool is just another plugin: its `process` defers the
//! request (ABI 1.3, the same machinery as a plugin's own deferred
//! answers: in-order delivery, limits, `deferred_timeout`), copies it into
//! the pool's queue, and returns at once. A pool thread answers it with its
//! instance and completes the handle.
//!
//! A call running past `plugin_timeout` fails its request (a watchdog
//! thread completes the handle with the error) and the worker asks the
//! master to replace it gracefully, as `max_requests_per_worker` does: a
//! stuck thread cannot be reclaimed, but the worker's other connections go
//! on being served until the replacement takes over. A crash on a pool
//! thread ends the worker, as a crash on the reactor thread does.
//!
//! Connection hooks (`on_open` / `on_close`) are not called for a pooled
//! plugin (its instances live on other threads); `on_shutdown` and
//! `destroy` run on each instance's own thread when the pool stops.

use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbnet_plugin_api::abi::{RawConnection, RawDeferred, RawResponse, NBNET_ERR, NBNET_OK};

use super::{LoadError, Plugin, ResponseSink};
use crate::codec::HEADER_LEN;
use crate::config::PluginSpec;
use crate::scoreboard::Slot;

/// Set when a pool thread overran `plugin_timeout`: the worker asks to be
/// replaced (read by the reactor after each turn).
static REPLACEMENT_WANTED: AtomicBool = AtomicBool::new(false);

/// Whether a pool asked for this worker's replacement since the last call.
#[inline]
pub fn take_replacement_request() -> bool {
    // A plain load first: the reactor asks on every turn, and a swap (a
    // locked instruction) is only needed on the rare turn it is set.
    REPLACEMENT_WANTED.load(Ordering::Acquire) && REPLACEMENT_WANTED.swap(false, Ordering::AcqRel)
}

thread_local! {
    /// Requests the pools copied during the worker thread's current read:
    /// (token, bytes). The connection takes them when it registers the
    /// read's deferred requests (`take_copied`): those bytes are the
    /// connection's until the answer comes, and count against its
    /// `max_pending_output_bytes` and the worker's `max_buffered_bytes`
    /// (without this a client pipelining large requests to a busy pool
    /// made the worker hold them all, past every limit).
    static COPIED: std::cell::RefCell<Vec<(u64, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The bytes a pool copied for the request deferred with `token` in the
/// current read (0 for a plugin's own deferred request).
pub fn take_copied(token: u64) -> usize {
    COPIED.with(|copied| {
        let mut copied = copied.borrow_mut();
        match copied.iter().position(|&(t, _)| t == token) {
            Some(at) => copied.swap_remove(at).1,
            None => 0,
        }
    })
}

/// Forgets the current read's copies (its requests were never registered:
/// the connection closed, or the read is over).
pub fn forget_copied() {
    COPIED.with(|copied| copied.borrow_mut().clear());
}

/// A completion handle, moved to a pool thread.
struct Handle(*mut RawDeferred);
// SAFETY: handles are made to be completed from any thread (see
// `plugin::deferred`); each is owned by one job at a time.
unsafe impl Send for Handle {}

impl Handle {
    fn answer(self, bytes: &[u8]) {
        // SAFETY: a live handle from the response's `defer`, completed once
        // (consumed here).
        unsafe { ((*self.0).answer)(self.0, bytes.as_ptr(), bytes.len()) };
    }

    fn fail(self, message: &str) {
        // SAFETY: as in `answer`.
        unsafe { ((*self.0).fail)(self.0, message.as_ptr(), message.len()) };
    }
}

/// One request waiting for a pool thread.
struct Job {
    request: Vec<u8>,
    handle: Handle,
    conn_id: u64,
    peer: CString,
    listener: CString,
    flags: u32,
    /// ABI 1.3 TLS facts (copied: the connection's text is the worker's).
    tls_version: u32,
    tls_subject: Option<CString>,
    tls_sans: Option<CString>,
}

/// A request a pool had queued and not started, taken back.
#[derive(Debug)]
pub struct Unstarted {
    /// Its deferred answer's token (no longer pending: the handle is gone).
    pub token: u64,
    /// The request's payload.
    pub request: Vec<u8>,
}

/// Takes the requests the pool has queued and not started out of its
/// queue, those of connections `moves` says move (the worker hands its
/// connections over: the worker that takes them answers them): their
/// tokens and payloads, each connection's in order. The others stay
/// queued. (Also: the requests of a connection that closed, which nobody
/// would read.)
pub(super) fn withdraw_queued(state: *mut c_void, moves: &dyn Fn(u64) -> bool) -> Vec<Unstarted> {
    // SAFETY: `state` is the pool's `Arc<Shared>` (see `load`), alive while
    // its Plugin is.
    let shared = unsafe { &*state.cast::<Shared>() };
    let jobs = lock(&shared.queue).take(moves);
    let mut taken = Vec::with_capacity(jobs.len());
    for job in jobs {
        // SAFETY: a queued job owns its live handle; out of the queue
        // here, it is not used again.
        if let Some(token) = unsafe { crate::plugin::deferred::Completions::withdraw(job.handle.0) }
        {
            taken.push(Unstarted {
                token,
                request: job.request,
            });
        }
    }
    taken
}

/// Requests waiting for a pool thread, taken in turn by connection: one
/// client's backlog never keeps another client's request waiting behind
/// all of it (first come, first served let one client that pipelined a
/// hundred slow requests starve every other client of the worker).
/// Within a connection, requests go in order.
#[derive(Default)]
struct Queue {
    /// Per connection (by id), its requests in order; no empty entries.
    by_conn: std::collections::HashMap<u64, VecDeque<Job>>,
    /// Connections with requests waiting, in turn order.
    turns: VecDeque<u64>,
}

impl Queue {
    fn push(&mut self, job: Job) {
        let waiting = self.by_conn.entry(job.conn_id).or_default();
        if waiting.is_empty() {
            self.turns.push_back(job.conn_id);
        }
        waiting.push_back(job);
    }

    /// The next connection's oldest request.
    fn pop(&mut self) -> Option<Job> {
        while let Some(conn) = self.turns.pop_front() {
            let Some(waiting) = self.by_conn.get_mut(&conn) else {
                continue;
            };
            let job = waiting.pop_front();
            if waiting.is_empty() {
                self.by_conn.remove(&conn);
            } else {
                self.turns.push_back(conn);
            }
            if job.is_some() {
                return job;
            }
        }
        None
    }

    /// Takes out every request of the connections `which` names, each
    /// connection's in order.
    fn take(&mut self, which: &dyn Fn(u64) -> bool) -> Vec<Job> {
        let conns: Vec<u64> = self.by_conn.keys().copied().filter(|&c| which(c)).collect();
        let mut taken = Vec::new();
        for conn in conns {
            if let Some(jobs) = self.by_conn.remove(&conn) {
                taken.extend(jobs);
            }
        }
        let by_conn = &self.by_conn;
        self.turns.retain(|conn| by_conn.contains_key(conn));
        taken
    }
}

/// What a pool thread is running: since when, and the handle to fail if
/// it overruns.
struct Busy {
    since: Instant,
    handle: Option<Handle>,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Pool threads waiting on `ready` (changed only under `queue`'s lock).
    waiting: AtomicUsize,
    stop: AtomicBool,
    /// Per thread slot: the call it is in, if any. Slots `0..N` are the
    /// pool's threads; `N + i` is the spare started when thread `i` got
    /// stuck (see [`watch`]).
    busy: Vec<Mutex<Option<Busy>>>,
    /// Slots whose thread overran (never joined: it may never return).
    stuck: Vec<AtomicBool>,
    /// The plugin: its name, `plugin_timeout`, `max_frame_bytes` (an
    /// instance's answer, and its `grow`, are refused past it, as on the
    /// worker's thread), and what a spare needs to make its instance.
    spec: PluginSpec,
    worker: (u32, u32),
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the watchdog early when the pool stops.
    watchdog_wake: Condvar,
    /// The worker's scoreboard slot and this plugin's config index: each
    /// call is counted there, so that the master names the plugin if the
    /// worker dies during it (see [`attach`]).
    board: OnceLock<(&'static Slot, usize)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads `spec` as a pool of `spec.threads` instances.
pub(super) fn load(
    spec: &PluginSpec,
    worker_index: u32,
    worker_count: u32,
) -> Result<Plugin, LoadError> {
    let n = spec.threads;
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        ready: Condvar::new(),
        waiting: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        busy: (0..2 * n).map(|_| Mutex::new(None)).collect(),
        stuck: (0..2 * n).map(|_| AtomicBool::new(false)).collect(),
        spec: spec.clone(),
        worker: (worker_index, worker_count),
        threads: Mutex::new(Vec::new()),
        watchdog_wake: Condvar::new(),
        board: OnceLock::new(),
    });
    let (loaded, results) = std::sync::mpsc::channel();
    for index in 0..n {
        let loaded = loaded.clone();
        let spawned = start_thread(&shared, index, index, move |made| {
            let _ = loaded.send(made);
        });
        match spawned {
            Ok(thread) => lock(&shared.threads).push(thread),
            Err(e) => {
                stop(&shared);
                return Err(LoadError {
                    name: spec.name.clone(),
                    path: spec.path.clone(),
                    reason: format!("cannot start pool thread {index} of {n}: {e}"),
                });
            }
        }
    }
    drop(loaded);
    let mut described = None;
    for _ in 0..n {
        match results.recv() {
            Ok(Ok(line)) => described = Some(line),
            Ok(Err(e)) => {
                stop(&shared);
                return Err(e);
            }
            Err(_) => {
                stop(&shared);
                return Err(LoadError {
                    name: spec.name.clone(),
                    path: spec.path.clone(),
                    reason: "a pool thread ended before its instance was made".into(),
                });
            }
        }
    }
    {
        let watched = Arc::clone(&shared);
        let watchdog = std::thread::Builder::new()
            .name("pool-watchdog".into())
            .spawn(move || watch(&watched));
        if let Ok(thread) = watchdog {
            lock(&shared.threads).push(thread);
        }
    }
    tracing::debug!(
        "plugin {:?}: {n} pool thread(s), one instance each ({})",
        spec.name,
        described.unwrap_or_default()
    );
    Ok(Plugin {
        name: spec.name.clone(),
        path: spec.path.clone(),
        kind: super::Kind::Pool,
        own_name: spec.name.clone(),
        own_version: format!("{n} threads"),
        state: Arc::into_raw(shared).cast_mut().cast::<c_void>(),
        process: pool_process,
        destroy: Some(pool_destroy),
        process_batch: None,
        hooks: super::Hooks::default(),
        _log_tag: Box::new(super::LogTag {
            plugin: spec.name.clone(),
        }),
        _library: None,
    })
}

/// A pool thread: answers jobs with its instance until the pool stops.
fn serve(shared: &Shared, index: usize, mut instance: Plugin) {
    let mut sink = ResponseSink::new(Vec::new(), shared.spec.max_frame_bytes, std::ptr::null());
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    break None;
                }
                if let Some(job) = queue.pop() {
                    break Some(job);
                }
                shared.waiting.fetch_add(1, Ordering::Relaxed);
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                shared.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        };
        let Some(job) = job else { break };
        let conn = RawConnection {
            id: job.conn_id,
            peer: job.peer.as_ptr(),
            listener: job.listener.as_ptr(),
            flags: job.flags,
            tls_version: job.tls_version,
            tls_subject: job
                .tls_subject
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr()),
            tls_sans: job
                .tls_sans
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr()),
        };
        sink.set_connection(&conn);
        *lock(&shared.busy[index]) = Some(Busy {
            since: Instant::now(),
            handle: Some(job.handle),
        });
        let board = shared.board.get();
        if let Some((slot, plugin)) = board {
            slot.pool_enter(*plugin);
        }
        let result = instance.process(&job.request, &mut sink);
        if let Some((slot, plugin)) = board {
            slot.pool_leave(*plugin);
        }
        let handle = lock(&shared.busy[index])
            .take()
            .and_then(|busy| busy.handle);
        // `None`: the watchdog failed the request meanwhile.
        if let Some(handle) = handle {
            match result {
                Ok(_) => handle.answer(&sink.buffer()[HEADER_LEN..]),
                Err(e) => handle.fail(&e.to_string()),
            }
        }
        sink.buffer_mut().clear();
    }
    instance.shutdown();
    drop(instance);
}

/// Fails calls that overrun `plugin_timeout` and asks for the worker's
/// replacement.
fn watch(shared: &Arc<Shared>) {
    let period =
        (shared.spec.plugin_timeout / 4).clamp(Duration::from_millis(1), Duration::from_secs(1));
    let mut guard = lock(&shared.queue);
    while !shared.stop.load(Ordering::Acquire) {
        guard = shared
            .watchdog_wake
            .wait_timeout(guard, period)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        drop(guard);
        for (index, busy) in shared.busy.iter().enumerate() {
            let mut busy = lock(busy);
            let Some(call) = busy.as_mut() else { continue };
            let elapsed = call.since.elapsed();
            if elapsed <= shared.spec.plugin_timeout {
                continue;
            }
            let Some(handle) = call.handle.take() else {
                continue;
            };
            shared.stuck[index].store(true, Ordering::Release);
            let message = format!(
                "call on pool thread {index} still running after {elapsed:.1?}, over plugin_timeout = {:?}; the request fails and the worker asks to be replaced (a stuck thread cannot be reclaimed)",
                shared.spec.plugin_timeout
            );
            tracing::error!(plugin = %shared.spec.name, thread = index, "{message}");
            // Before the failure wakes the reactor, which looks at this
            // flag after that turn: set after, the request to be replaced
            // waited for the reactor's next event (seconds, on an idle
            // worker).
            REPLACEMENT_WANTED.store(true, Ordering::Release);
            handle.fail(&message);
            drop(busy);
            start_spare(shared, index);
        }
        guard = lock(&shared.queue);
    }
}

/// Starts the pool thread of slot `slot`, whose instance is told it is
/// thread `index` of N (a spare's slot is past N; its index is the stuck
/// thread's). The instance is made on that thread, which then serves;
/// `made` hears how making it went (its description, or why not).
fn start_thread(
    shared: &Arc<Shared>,
    slot: usize,
    index: usize,
    made: impl FnOnce(Result<String, LoadError>) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let own = Arc::clone(shared);
    std::thread::Builder::new()
        .name(format!(
            "{}-{slot}",
            shared.spec.name.chars().take(10).collect::<String>()
        ))
        .spawn(move || {
            let (worker_index, worker_count) = own.worker;
            match Plugin::load_instance(
                &own.spec,
                worker_index,
                worker_count,
                index as u32,
                own.spec.threads as u32,
            ) {
                Ok(instance) => {
                    made(Ok(instance.describe()));
                    serve(&own, slot, instance);
                }
                Err(e) => made(Err(e)),
            }
        })
}

/// Thread slot `slot` is stuck: starts a spare thread with a new
/// instance (told the stuck one's thread index) in slot `N + slot`, so
/// that the requests queued behind it are answered until the worker is
/// replaced — the TLS connections' among them, which cannot move to the
/// replacement. One spare per pool thread; a stuck spare has none.
fn start_spare(shared: &Arc<Shared>, slot: usize) {
    let n = shared.spec.threads;
    if slot >= n || shared.stop.load(Ordering::Acquire) {
        return;
    }
    let name = shared.spec.name.clone();
    let spawned = start_thread(shared, n + slot, slot, move |made| {
        if let Err(e) = made {
            tracing::error!(plugin = %name, "cannot start a spare for stuck pool thread {slot}: {e}");
        }
    });
    match spawned {
        Ok(thread) => {
            tracing::warn!(
                plugin = %shared.spec.name,
                "pool thread {slot} is stuck: a spare thread (a new instance, thread index {slot}) serves the pool until the worker is replaced"
            );
            lock(&shared.threads).push(thread);
        }
        Err(e) => tracing::error!(
            plugin = %shared.spec.name,
            "cannot start a spare for stuck pool thread {slot}: {e}"
        ),
    }
}

/// Stops the threads; joins those not stuck in a call.
fn stop(shared: &Shared) {
    shared.stop.store(true, Ordering::Release);
    {
        let _queue = lock(&shared.queue);
        shared.ready.notify_all();
        shared.watchdog_wake.notify_all();
    }
    // Again until none is left: the watchdog may have started a spare
    // while the first ones were joined (it is joined among them).
    loop {
        let threads = std::mem::take(&mut *lock(&shared.threads));
        if threads.is_empty() {
            break;
        }
        join_unless_stuck(shared, threads);
    }
    // Jobs nobody will run: fail them (their connections are closing).
    let left = lock(&shared.queue).take(&|_| true);
    for job in left {
        job.handle.fail("the worker is stopping");
    }
}

/// Joins `threads`, but not those stuck in a call (they may never return).
fn join_unless_stuck(shared: &Shared, threads: Vec<JoinHandle<()>>) {
    for thread in threads {
        let index = thread
            .thread()
            .name()
            .and_then(|n| n.rsplit('-').next())
            .and_then(|i| i.parse::<usize>().ok());
        if index.is_some_and(|i| {
            shared
                .stuck
                .get(i)
                .is_some_and(|s| s.load(Ordering::Acquire))
        }) {
            continue;
        }
        let _ = thread.join();
    }
}

/// Counts the calls of the pool whose state is `state` in `slot`, as
/// plugin `index` of the config: if the worker dies (a segfault on a pool
/// thread), the master sees the calls in flight and names the plugin.
pub(super) fn attach(state: *mut c_void, slot: &'static Slot, index: usize) {
    // SAFETY: `state` is a pool's `Shared` (the caller checked the kind),
    // alive while its `Plugin` is.
    let shared = unsafe { &*state.cast_const().cast::<Shared>() };
    let _ = shared.board.set((slot, index));
}

/// The pool's `process`: defer the request, queue it for a pool thread.
unsafe extern "C" fn pool_process(
    state: *mut c_void,
    request: *const u8,
    len: usize,
    response: *mut RawResponse,
) -> i32 {
    // SAFETY: `state` is the pool's `Shared` (from `Arc::into_raw` in
    // `load`, alive until `pool_destroy`); `response` is the host's sink
    // for this call; `request` holds `len` bytes.
    let (shared, handle, request, conn) = unsafe {
        let shared = &*state.cast::<Shared>();
        let handle = ((*response).defer)(response);
        let request = std::slice::from_raw_parts(request, len).to_vec();
        (shared, handle, request, &*(*response).conn)
    };
    if handle.is_null() {
        // The sink recorded why (the worker's limit): the request fails.
        return NBNET_ERR;
    }
    // SAFETY: a live handle, just made.
    let token = unsafe { crate::plugin::deferred::Completions::token_of(handle) };
    COPIED.with(|copied| copied.borrow_mut().push((token, request.len())));
    // SAFETY: the connection's strings are valid NUL-terminated text for the call.
    let (peer, listener) = unsafe {
        (
            std::ffi::CStr::from_ptr(conn.peer).to_owned(),
            std::ffi::CStr::from_ptr(conn.listener).to_owned(),
        )
    };
    // SAFETY: as above; null when absent.
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_owned())
    };
    let mut queue = lock(&shared.queue);
    queue.push(Job {
        request,
        handle: Handle(handle),
        conn_id: conn.id,
        peer,
        listener,
        flags: conn.flags,
        tls_version: conn.tls_version,
        tls_subject: text(conn.tls_subject),
        tls_sans: text(conn.tls_sans),
    });
    // A thread waits only after finding the queue empty, under this lock:
    // with none waiting, one will find this job without being woken (and
    // the worker's thread makes no `futex` call per request while the
    // pool is busy).
    let someone_waits = shared.waiting.load(Ordering::Relaxed) > 0;
    drop(queue);
    if someone_waits {
        shared.ready.notify_one();
    }
    NBNET_OK
}

/// The pool's `destroy`: stops and joins its threads (each destroys its
/// instance), then frees the pool.
unsafe extern "C" fn pool_destroy(state: *mut c_void) {
    // SAFETY: `state` came from `Arc::into_raw` in `load`; destroyed once.
    let shared = unsafe { Arc::from_raw(state.cast_const().cast::<Shared>()) };
    stop(&shared);
}
