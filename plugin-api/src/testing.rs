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

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;

use crate::abi::{RawBatch, RawConnection, RawInitContext, RawRequest, NBNET_OK};
use crate::sdk::{
    close_trampoline, destroy_trampoline, init_trampoline, open_trampoline,
    process_batch_trampoline, process_trampoline, shutdown_trampoline,
};
use crate::sink::{ResponseSink, SinkError};
use crate::Plugin;

/// What [`TestHost::process_batch`] returns: every answer, or the answers
/// before the request that failed and its message.
pub type BatchAnswers = Result<Vec<Vec<u8>>, (Vec<Vec<u8>>, String)>;

/// A plugin instance hosted in-process for tests.
pub struct TestHost<P: Plugin> {
    state: *mut c_void,
    logs: Box<RefCell<Vec<String>>>,
    peer: CString,
    listener: CString,
    /// Largest response `process` may write (like `max_frame_bytes`).
    pub max_response_bytes: usize,
    _plugin: PhantomData<P>,
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
        crate::sdk::IN_TEST_HOST.store(true, std::sync::atomic::Ordering::Relaxed);
        let logs: Box<RefCell<Vec<String>>> = Box::default();
        let name = CString::new("test").expect("no NUL");
        let config = CString::new(config_toml).map_err(|_| "config contains a NUL byte")?;
        let mut error: Option<String> = None;
        let ctx = RawInitContext {
            struct_size: std::mem::size_of::<RawInitContext>() as u32,
            worker_index: index,
            worker_count: count,
            plugin_name: name.as_ptr(),
            config_toml: config.as_ptr(),
            config_toml_len: config_toml.len(),
            host: (&mut error as *mut Option<String>).cast(),
            set_error: init_set_error,
            log,
            log_handle: (&*logs as *const RefCell<Vec<String>>).cast(),
            config_get: no_config_get,
            thread_index: 0,
            thread_count: 0,
        };
        let mut state = std::ptr::null_mut();
        // SAFETY: `ctx` and `state` are valid for the call.
        let rc = unsafe { init_trampoline::<P>(&ctx, &mut state) };
        if rc != NBNET_OK {
            return Err(error.unwrap_or_else(|| "init failed without a message".into()));
        }
        Ok(TestHost {
            state,
            logs,
            peer: CString::new("127.0.0.1:40000").expect("no NUL"),
            listener: CString::new("127.0.0.1:9000").expect("no NUL"),
            max_response_bytes: 16 * 1024 * 1024,
            _plugin: PhantomData,
        })
    }

    /// Answers one request; `Err` carries the plugin's error message (a
    /// caught panic included).
    pub fn process(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        let conn = self.connection(1);
        let mut sink = ResponseSink::new(Vec::new(), self.max_response_bytes, &conn);
        let response = sink.begin(&[], 0);
        // SAFETY: `state` is this plugin's instance; the rest (and the sink
        // behind `response`, which stays put) is valid for the call.
        let rc = unsafe {
            process_trampoline::<P>(self.state, request.as_ptr(), request.len(), response)
        };
        match sink.finish(rc, 0) {
            Ok(_) => Ok(sink.into_buffer()),
            Err(error) => Err(describe(error)),
        }
    }

    /// Answers `requests` as the server does when a client pipelines them:
    /// in one `process_batch` call. Returns the answers in order; `Err`
    /// carries the answers before a failed request and its message.
    pub fn process_batch(&mut self, requests: &[&[u8]]) -> BatchAnswers {
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
        let mut batch = RawBatch {
            requests: raw.as_ptr(),
            count: raw.len(),
            lens: lens.as_mut_ptr(),
            prefix: 0,
            budget: usize::MAX,
            answer_start: 0,
            progress: &mut progress,
        };
        let batch: *mut RawBatch = &mut batch;
        let mut sink = ResponseSink::new(Vec::new(), self.max_response_bytes, &conn);
        // SAFETY: `batch`, its arrays and counter outlive the call and are
        // used only through these pointers meanwhile; `state` is this
        // plugin's instance.
        let answered = unsafe {
            let response = sink.begin_batch(batch, 0, 0);
            process_batch_trampoline::<P>(self.state, batch, response)
        };
        let result = sink.finish_batch::<0>(answered, raw.len(), &lens, |_| []);
        let buffer = sink.into_buffer();
        let kept = match &result {
            Ok(k) | Err((k, _)) => *k,
        };
        let mut answers = Vec::with_capacity(kept);
        let mut at = 0;
        for &len in &lens[..kept] {
            answers.push(buffer[at..at + len].to_vec());
            at += len;
        }
        match result {
            Ok(_) => Ok(answers),
            Err((_, error)) => Err((answers, describe(error))),
        }
    }

    /// Calls the connection-opened hook for connection `id`.
    pub fn open_connection(&mut self, id: u64) {
        let conn = self.connection(id);
        // SAFETY: as in `process`.
        unsafe { open_trampoline::<P>(self.state, &conn) }
    }

    /// Calls the connection-closed hook for connection `id`.
    pub fn close_connection(&mut self, id: u64) {
        let conn = self.connection(id);
        // SAFETY: as in `process`.
        unsafe { close_trampoline::<P>(self.state, &conn) }
    }

    /// Everything the plugin logged so far, as `LEVEL message` lines.
    pub fn logs(&self) -> Vec<String> {
        self.logs.borrow().clone()
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
}

impl<P: Plugin> Drop for TestHost<P> {
    fn drop(&mut self) {
        // SAFETY: `state` is this plugin's instance, destroyed once.
        unsafe {
            shutdown_trampoline::<P>(self.state);
            destroy_trampoline::<P>(self.state);
        }
    }
}

unsafe extern "C" fn init_set_error(ctx: *const RawInitContext, msg: *const u8, len: usize) {
    // SAFETY: `host` is the `Option<String>` of the running `with_worker`.
    let slot = unsafe { &mut *(*ctx).host.cast::<Option<String>>() };
    *slot = Some(text(msg, len));
}

unsafe extern "C" fn log(handle: *const c_void, level: i32, msg: *const u8, len: usize) {
    // SAFETY: `handle` is the boxed log of a live `TestHost`.
    let logs = unsafe { &*handle.cast::<RefCell<Vec<String>>>() };
    let level = match level {
        1 => "ERROR",
        2 => "WARN",
        3 => "INFO",
        _ => "DEBUG",
    };
    logs.borrow_mut()
        .push(format!("{level} {}", text(msg, len)));
}

unsafe extern "C" fn no_config_get(_: *const RawInitContext, _: *const c_char) -> *const c_char {
    std::ptr::null()
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
