//! The plugin loader: turns a `[[plugins]]` entry into a ready [`Plugin`]
//! instance, whatever language the `.so` was written in.
//!
//! # Brief overview
//!
//! - [`Plugin::load`] opens the library, recognises its kind by the symbol it
//!   exports ([`c`]: `nbnet_plugin_entry`; [`rust`]: the `abi_stable` root
//!   module), checks its ABI version, and calls its `init` with the plugin's
//!   config table.
//! - Both kinds reduce to the same `process` function pointer and opaque
//!   state, so [`Plugin::process`] — the per-request call — is one indirect
//!   call with no branching on the kind.
//! - Only workers (and the short-lived `--check` child) load plugins. The
//!   master never does: forking while the dynamic loader may be busy can
//!   deadlock the child (see `shared/notes/dependencies.md`).

mod c;
pub mod deferred;
pub mod image;
pub mod pool;
mod rust;

use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};

pub use nbnet_plugin_api::abi::RawConnection;
pub use nbnet_plugin_api::abi::RawRequest;
use nbnet_plugin_api::abi::{
    ConnectionFn, DestroyFn, InitFn, ProcessBatchFn, ProcessFn, RawBatch, RawInitContext,
    ShutdownFn, ABI_MAJOR, ABI_MINOR, NBNET_ERR, NBNET_LOG_DEBUG, NBNET_LOG_ERROR, NBNET_LOG_INFO,
    NBNET_LOG_WARN, NBNET_OK,
};
pub use nbnet_plugin_api::sink::ResponseSink;
use nbnet_plugin_api::sink::SinkError;

use crate::codec::{header, HEADER_LEN};
use crate::config::PluginSpec;

/// Which side of the ABI a library was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `abi_stable` root module (`export_plugin!`).
    Rust,
    /// `nbnet_plugin_entry` from `nbnet_plugin.h`.
    C,
    /// A thread pool of instances of either kind (`threads = N`).
    Pool,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Rust => "Rust",
            Kind::C => "C",
            Kind::Pool => "thread-pool",
        })
    }
}

/// Why a plugin could not be loaded: names the plugin, its file and the reason.
#[derive(Debug)]
pub struct LoadError {
    /// The plugin's name in the config.
    pub name: String,
    /// The `.so` path.
    pub path: PathBuf,
    /// What went wrong, in one line.
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The reason may quote the plugin (its init error) or the dynamic
        // loader (which quotes the file): one bounded line, whatever they say.
        write!(
            f,
            "plugin {:?} ({}): {}",
            self.name,
            crate::logging::untrusted(&self.path.display().to_string()),
            crate::logging::untrusted(&self.reason)
        )
    }
}

impl std::error::Error for LoadError {}

/// The entry points both loaders find, before `init` runs.
struct Entry {
    kind: Kind,
    own_name: String,
    own_version: String,
    /// ABI (major, minor) the plugin was built for.
    abi: (u32, u32),
    init: InitFn,
    process: ProcessFn,
    destroy: Option<DestroyFn>,
    process_batch: Option<ProcessBatchFn>,
    hooks: Hooks,
    /// Keeps a C plugin's library mapped; Rust libraries are leaked by
    /// `abi_stable` (they stay mapped until the worker exits).
    library: Option<libloading::Library>,
}

/// The optional lifecycle hooks of a plugin.
#[derive(Clone, Copy, Default)]
struct Hooks {
    on_open: Option<ConnectionFn>,
    on_close: Option<ConnectionFn>,
    on_shutdown: Option<ShutdownFn>,
}

/// Host state lent to a plugin's `init` through `RawInitContext::host`.
struct InitState {
    error: Option<String>,
    config: toml::Table,
    /// Values handed out by `config_get`, alive until `init` returns.
    lookups: Vec<CString>,
}

/// Identifies a plugin in the host's log; lives as long as the instance,
/// because the plugin may keep the `log` callback and call it at any time.
struct LogTag {
    plugin: String,
}

/// One loaded plugin instance, owned by one worker.
pub struct Plugin {
    name: String,
    path: PathBuf,
    kind: Kind,
    own_name: String,
    own_version: String,
    state: *mut c_void,
    process: ProcessFn,
    destroy: Option<DestroyFn>,
    process_batch: Option<ProcessBatchFn>,
    hooks: Hooks,
    _log_tag: Box<LogTag>,
    // Dropped after `destroy` ran (fields drop after `Drop::drop`).
    _library: Option<libloading::Library>,
}

/// Why one request failed inside the plugin.
#[derive(Debug)]
pub enum ProcessError {
    /// The plugin returned an error (a Rust panic included, caught by the SDK).
    Plugin(String),
    /// The plugin tried to write more than `max_frame_bytes`.
    ResponseTooLarge {
        /// The configured limit.
        max: usize,
        /// What the plugin said about it, if anything.
        plugin_message: Option<String>,
    },
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Plugin(message) => f.write_str(message),
            ProcessError::ResponseTooLarge {
                max,
                plugin_message,
            } => {
                write!(
                    f,
                    "the response would exceed max_frame_bytes = {max}; the host refused it"
                )?;
                match plugin_message {
                    Some(message) => write!(f, " (plugin: {message})"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Plugin {
    /// Loads `spec`'s library and creates this worker's instance (with
    /// `threads = N`: a pool of N instances, see [`pool`]).
    pub fn load(
        spec: &PluginSpec,
        worker_index: u32,
        worker_count: u32,
    ) -> Result<Plugin, LoadError> {
        if spec.threads > 0 {
            return pool::load(spec, worker_index, worker_count);
        }
        Self::load_instance(spec, worker_index, worker_count, 0, 0)
    }

    /// Loads `spec` to check it (`nbnet --check`): one instance, even for
    /// a pool (`threads = N`), told it is pool thread 0 of N. Checking
    /// that the library loads and that its init accepts the config needs
    /// no more, and N inits could open N connections to a database just
    /// to close them. (An init that accepts thread 0 and refuses another
    /// index is caught when the workers start, as any init failure is.)
    pub fn load_to_check(
        spec: &PluginSpec,
        worker_index: u32,
        worker_count: u32,
    ) -> Result<Plugin, LoadError> {
        Self::load_instance(spec, worker_index, worker_count, 0, spec.threads as u32)
    }

    /// Loads one instance, told it is pool thread `thread_index` of
    /// `thread_count` (0 of 0: on the reactor thread).
    fn load_instance(
        spec: &PluginSpec,
        worker_index: u32,
        worker_count: u32,
        thread_index: u32,
        thread_count: u32,
    ) -> Result<Plugin, LoadError> {
        let fail = |reason: String| LoadError {
            name: spec.name.clone(),
            path: spec.path.clone(),
            reason,
        };
        // The file the master validated, or its sealed copy once the file
        // changed (see [`image`]).
        let entry = match spec.image.as_ref().map(|image| image.source(&spec.path)) {
            Some(source @ (image::Source::Copy(_) | image::Source::Unreadable(_))) => {
                let copy = match source {
                    image::Source::Copy(copy) => {
                        tracing::warn!(
                            "plugin {:?}: {} changed since it was checked; loading the copy taken then (run nbnet reload to load the new file)",
                            spec.name,
                            spec.path.display()
                        );
                        copy
                    }
                    image::Source::Unreadable(copy) | image::Source::File(copy) => {
                        tracing::debug!(
                            "plugin {:?}: {} is not readable by this user; loading the copy the master took",
                            spec.name,
                            spec.path.display()
                        );
                        copy
                    }
                };
                // The loader's messages quote the file it was given: name
                // the user's file instead.
                open(&copy).map_err(|why| {
                    why.replace(
                        &format!("{}:", copy.display()),
                        &format!("{}:", spec.path.display()),
                    )
                })
            }
            Some(image::Source::File(path)) => open(&path),
            None => open(&spec.path),
        }
        .map_err(fail)?;
        let log_tag = Box::new(LogTag {
            plugin: spec.name.clone(),
        });
        let name = CString::new(spec.name.as_str())
            .map_err(|_| fail("the name contains a NUL byte".into()))?;
        let config = CString::new(spec.config_toml.as_str())
            .map_err(|_| fail("its config table contains a NUL byte".into()))?;
        let mut init = InitState {
            error: None,
            config: toml::from_str(&spec.config_toml).unwrap_or_default(),
            lookups: Vec::new(),
        };
        let ctx = RawInitContext {
            struct_size: std::mem::size_of::<RawInitContext>() as u32,
            worker_index,
            worker_count,
            plugin_name: name.as_ptr(),
            config_toml: config.as_ptr(),
            config_toml_len: spec.config_toml.len(),
            host: (&mut init as *mut InitState).cast(),
            set_error: init_set_error,
            log: plugin_log,
            log_handle: (&*log_tag as *const LogTag).cast(),
            config_get,
            thread_index,
            thread_count,
        };
        let mut state: *mut c_void = std::ptr::null_mut();
        // SAFETY: `init` comes from a library whose ABI version (and, for Rust,
        // layout) was checked; `ctx` and `state` are valid for the call.
        let rc = unsafe { (entry.init)(&ctx, &mut state) };
        if rc != NBNET_OK {
            let why = init.error.map_or_else(
                || format!("init returned {rc} without a message"),
                |m| crate::logging::untrusted(&m),
            );
            return Err(fail(format!("init failed: {why}")));
        }
        Ok(Plugin {
            name: spec.name.clone(),
            path: spec.path.clone(),
            kind: entry.kind,
            own_name: entry.own_name,
            own_version: entry.own_version,
            state,
            process: entry.process,
            destroy: entry.destroy,
            process_batch: entry.process_batch,
            hooks: entry.hooks,
            _log_tag: log_tag,
            _library: entry.library,
        })
    }

    /// The plugin's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One line for the startup log: name, kind, own name/version, file.
    pub fn describe(&self) -> String {
        format!(
            "plugin {:?}: {} plugin {} {} from {}",
            self.name,
            self.kind,
            self.own_name,
            self.own_version,
            self.path.display()
        )
    }

    /// Tells the plugin a client connected.
    pub fn connection_opened(&mut self, conn: &RawConnection) {
        if let Some(hook) = self.hooks.on_open {
            // SAFETY: `state` came from this library's `init`; `conn` is valid for the call.
            unsafe { hook(self.state, conn) }
        }
    }

    /// Tells the plugin a connection closed.
    pub fn connection_closed(&mut self, conn: &RawConnection) {
        if let Some(hook) = self.hooks.on_close {
            // SAFETY: as in `connection_opened`.
            unsafe { hook(self.state, conn) }
        }
    }

    /// Tells the plugin the worker is stopping (destroy follows on drop).
    pub fn shutdown(&mut self) {
        if let Some(hook) = self.hooks.on_shutdown {
            // SAFETY: `state` came from this library's `init`.
            unsafe { hook(self.state) }
        }
    }

    /// Answers one request: appends a complete response frame (header and
    /// payload) to `sink`'s buffer and returns the payload length, or leaves
    /// the buffer as it was and returns the error.
    ///
    /// The plugin writes straight into the buffer after a placeholder
    /// header, which is filled in once the payload length is known: no
    /// intermediate buffer, and no call back into the host unless the
    /// plugin needs more room than the request's size.
    #[inline(always)]
    pub fn process(
        &mut self,
        request: &[u8],
        sink: &mut ResponseSink,
    ) -> Result<usize, ProcessError> {
        let response = sink.begin(&HEADER_PLACEHOLDER, request.len());
        // SAFETY: `state` came from this library's `init`; `request` and
        // `response` (and the sink behind it, which stays put) are valid for
        // the call; instances are used by one thread.
        let rc = unsafe { (self.process)(self.state, request.as_ptr(), request.len(), response) };
        let finished = sink.finish_with_prefix(rc, header);
        finished.map_err(|error| self.process_error(error, rc, sink.max()))
    }

    /// For a pool (`threads = N`): counts its pool threads' calls in the
    /// worker's scoreboard `slot` as plugin `index`, so that a crash during
    /// one is named. Does nothing for other plugins (the reactor thread's
    /// calls are tracked by the worker).
    /// A thread pool's queued, unstarted requests of the connections
    /// `moves` names (by id), taken out of its queue (tokens and payloads,
    /// in order); nothing for other plugins. See `worker::conn::moving`.
    pub fn withdraw_queued(&self, moves: &dyn Fn(u64) -> bool) -> Vec<pool::Unstarted> {
        if self.kind == Kind::Pool {
            pool::withdraw_queued(self.state, moves)
        } else {
            Vec::new()
        }
    }

    pub fn attach_scoreboard(&self, slot: &'static crate::scoreboard::Slot, index: usize) {
        if self.kind == Kind::Pool {
            pool::attach(self.state, slot, index);
        }
    }

    /// Whether the plugin answers batches (`process_batch`, ABI 1.1).
    #[inline]
    pub fn batches(&self) -> bool {
        self.process_batch.is_some()
    }

    /// Answers `requests` (all complete, in arrival order) in one call of
    /// the plugin's `process_batch`, appending a complete frame per answer
    /// to `sink`'s buffer. `Ok(k)`: the first `k` are answered (`k` falls
    /// short when the plugin stopped at `budget` response bytes; the rest
    /// wait for another call). `Err((k, why))`: request `k` failed; the
    /// `k` answers before it are in the buffer.
    ///
    /// `progress` is the worker's scoreboard call counter: the plugin adds
    /// one per request, so the hang watchdog sees each request start.
    ///
    /// `size_hint` is the room to offer up front (the requests' size is a
    /// good guess); `lens` only ever grows, so it is not cleared per call.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn process_batch(
        &mut self,
        requests: &[RawRequest],
        lens: &mut Vec<usize>,
        sink: &mut ResponseSink,
        size_hint: usize,
        budget: usize,
        progress: *mut u64,
    ) -> Result<usize, (usize, ProcessError)> {
        let Some(process_batch) = self.process_batch else {
            unreachable!("process_batch called on a plugin without it (check `batches` first)");
        };
        if lens.len() < requests.len() {
            lens.resize(requests.len(), 0);
        }
        let mut batch = RawBatch {
            requests: requests.as_ptr(),
            count: requests.len(),
            lens: lens.as_mut_ptr(),
            prefix: HEADER_LEN,
            budget,
            answer_start: 0,
            progress,
        };
        // One raw pointer for both the sink and the plugin: the sink reads
        // `answer_start` while the plugin writes it.
        let batch: *mut RawBatch = &mut batch;
        // SAFETY: `batch` lives on this frame until after `finish_batch`
        // and is only used through this pointer meanwhile.
        let response = unsafe { sink.begin_batch(batch, HEADER_LEN, size_hint) };
        // SAFETY: `state` came from this library's `init`; `batch` (its
        // arrays, `requests.len()` long, and the progress counter) and
        // `response` (and the sink behind it) are valid for the call;
        // instances are used by one thread.
        let answered = unsafe { process_batch(self.state, batch, response) };
        sink.finish_batch(answered, requests.len(), lens, header)
            .map_err(|(k, error)| (k, self.process_error(error, NBNET_ERR, sink.max())))
    }

    #[cold]
    fn process_error(&self, error: SinkError, rc: i32, max: usize) -> ProcessError {
        match error {
            SinkError::Plugin(message) => ProcessError::Plugin(message.map_or_else(
                || format!("process returned {rc} without a message"),
                |m| crate::logging::untrusted(&m),
            )),
            SinkError::TooLarge(plugin_message) => ProcessError::ResponseTooLarge {
                max,
                plugin_message: plugin_message.map(|m| crate::logging::untrusted(&m)),
            },
            SinkError::Misuse(what) => ProcessError::Plugin(what),
        }
    }
}

/// What a response's header holds until its length is known.
const HEADER_PLACEHOLDER: [u8; HEADER_LEN] = [b'0'; HEADER_LEN];

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(destroy) = self.destroy {
            // SAFETY: `state` came from this library's `init` and is destroyed once.
            unsafe { destroy(self.state) }
        }
    }
}

/// What `nbnet plugin info` reports about a library, loadable or not.
#[derive(Debug)]
pub struct Inspection {
    /// Which kind of plugin it is, when that much could be recognised.
    pub kind: Option<Kind>,
    /// The plugin's own name and version (known when it loads).
    pub name_version: Option<(String, String)>,
    /// The ABI (major, minor) it was built for, when readable.
    pub abi: Option<(u32, u32)>,
    /// `Ok` when this host can load it, else why not.
    pub verdict: Result<(), String>,
}

/// Inspects the library at `path` without creating an instance (no `init`).
pub fn inspect(path: &Path) -> Inspection {
    match open(path) {
        Ok(entry) => Inspection {
            kind: Some(entry.kind),
            name_version: Some((entry.own_name, entry.own_version)),
            abi: Some(entry.abi),
            verdict: Ok(()),
        },
        Err(reason) => {
            let (kind, abi) = identify(path);
            Inspection {
                kind,
                name_version: None,
                abi,
                verdict: Err(reason),
            }
        }
    }
}

/// Best-effort kind and ABI of a library that failed to load.
fn identify(path: &Path) -> (Option<Kind>, Option<(u32, u32)>) {
    // SAFETY: as in `open`; the user asked to inspect this library.
    let Ok(library) = (unsafe { libloading::Library::new(path) }) else {
        return (None, None);
    };
    if let Some(abi) = c::abi_of(&library) {
        return (Some(Kind::C), Some(abi));
    }
    if rust::is_rust_plugin(&library) {
        return (Some(Kind::Rust), None);
    }
    (None, None)
}

/// Opens the library at `path` and finds its entry points.
fn open(path: &Path) -> Result<Entry, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("no such file; check the path (relative paths are resolved against the config file's folder)".into())
        }
        Err(e) => return Err(format!("cannot read the file: {e}")),
        Ok(meta) if meta.is_dir() => return Err("is a directory, not a shared library (.so) file".into()),
        // dlopen would block on a FIFO, or read a device forever.
        Ok(meta) if !meta.is_file() => return Err("is not a regular file (a FIFO, socket or device?), not a shared library (.so) file".into()),
        Ok(_) => {}
    }
    // SAFETY: dlopen runs the library's initializers. Loading the configured
    // plugin is the purpose of this function; the path is absolute, so the
    // dynamic loader does not search for it elsewhere.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load it as a shared library: {}", error_chain(&e)))?;
    if let Some(entry) = c::find(&library)? {
        return Ok(entry.with_library(library));
    }
    if rust::is_rust_plugin(&library) {
        drop(library);
        return rust::load(path);
    }
    Err(format!(
        "not an nbnet plugin: it exports neither `{}` (a C plugin, see nbnet_plugin.h) nor an abi_stable root module (a Rust plugin, see export_plugin!)",
        nbnet_plugin_api::abi::C_ENTRY_SYMBOL
    ))
}

impl Entry {
    fn with_library(mut self, library: libloading::Library) -> Entry {
        self.library = Some(library);
        self
    }
}

/// Checks a plugin's ABI numbers against this host's.
fn check_abi(major: u32, minor: u32) -> Result<(), String> {
    if major != ABI_MAJOR {
        return Err(format!(
            "incompatible ABI: the plugin was built for nbnet plugin ABI {major}.{minor}, this host speaks {ABI_MAJOR}.x (up to {ABI_MAJOR}.{ABI_MINOR}); rebuild the plugin against this nbnet's plugin-api"
        ));
    }
    if minor > ABI_MINOR {
        return Err(format!(
            "incompatible ABI: the plugin needs ABI {major}.{minor}, newer than this host's {ABI_MAJOR}.{ABI_MINOR}; upgrade nbnet"
        ));
    }
    Ok(())
}

/// libloading's `Display` says only "dlopen failed"; the reason is in `source()`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

unsafe extern "C" fn init_set_error(ctx: *const RawInitContext, msg: *const u8, len: usize) {
    // SAFETY: `ctx.host` points to the `InitState` of the running `load`.
    let init = unsafe { &mut *(*ctx).host.cast::<InitState>() };
    init.error = Some(lossy(msg, len));
}

unsafe extern "C" fn config_get(ctx: *const RawInitContext, key: *const c_char) -> *const c_char {
    if key.is_null() {
        return std::ptr::null();
    }
    // SAFETY: `ctx.host` points to the `InitState` of the running `load`;
    // `key` is a NUL-terminated string from the plugin.
    let (init, key) = unsafe { (&mut *(*ctx).host.cast::<InitState>(), CStr::from_ptr(key)) };
    let Some(value) = key.to_str().ok().and_then(|k| init.config.get(k)) else {
        return std::ptr::null();
    };
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => return std::ptr::null(),
    };
    let Ok(text) = CString::new(text) else {
        return std::ptr::null();
    };
    let ptr = text.as_ptr();
    // The CString's heap buffer does not move when the Vec grows.
    init.lookups.push(text);
    ptr
}

unsafe extern "C" fn plugin_log(handle: *const c_void, level: i32, msg: *const u8, len: usize) {
    let message = crate::logging::untrusted(&lossy(msg, len));
    if handle.is_null() || !handle.cast::<LogTag>().is_aligned() {
        tracing::warn!("a plugin logged with an invalid log_handle (not the one its init context gave it): {message}");
        return;
    }
    // SAFETY: `handle` is the plugin's boxed `LogTag` (checked non-null and
    // aligned: a plugin passing anything else is its own bug), alive until
    // the instance drops.
    let tag = unsafe { &*handle.cast::<LogTag>() };
    let plugin = tag.plugin.as_str();
    match level {
        NBNET_LOG_ERROR => tracing::error!(plugin, "{message}"),
        NBNET_LOG_WARN => tracing::warn!(plugin, "{message}"),
        NBNET_LOG_INFO => tracing::info!(plugin, "{message}"),
        NBNET_LOG_DEBUG => tracing::debug!(plugin, "{message}"),
        // Not one of NBNET_LOG_*: said loudly rather than dropped.
        other => tracing::warn!(
            plugin,
            "(log level {other} is not one of NBNET_LOG_ERROR..NBNET_LOG_DEBUG) {message}"
        ),
    }
}

/// Copies a plugin-provided message, replacing invalid UTF-8.
fn lossy(msg: *const u8, len: usize) -> String {
    if msg.is_null() || len == 0 {
        return String::new();
    }
    // SAFETY: callers pass `len` readable bytes at `msg` (checked non-null);
    // at most 1 MiB is read (longer messages are cut when logged anyway).
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len.min(1 << 20)) })
        .into_owned()
}
