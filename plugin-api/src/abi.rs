//! The binary interface: `#[repr(C)]` types shared by the host, Rust plugins
//! and C plugins. `include/nbnet_plugin.h` declares the same types for C; keep
//! the two in step (the host's tests load a C plugin built from that header).
//!
//! # Versioning
//!
//! The ABI has a major and a minor number ([`ABI_MAJOR`], [`ABI_MINOR`]).
//!
//! - A **minor** bump only *appends* fields to the end of a struct. The
//!   plugin's own table (`nbnet_plugin`) carries its size, and the host reads
//!   an appended field only when that size covers it. The structs the host
//!   hands out (`nbnet_response`, `nbnet_init_ctx`, `nbnet_conn`) only grow,
//!   so a plugin built for an older minor never reads past what it knows. A
//!   plugin built for an older minor loads in a newer host; a plugin built for
//!   a newer minor than the host is refused (it may rely on host features the
//!   host lacks).
//! - A **major** bump changes meaning or layout; the host refuses every plugin
//!   built for another major.
//!
//! Rust plugins are additionally layout-checked by `abi_stable`, which also
//! refuses a plugin built against another 0.x version of this crate.

use std::ffi::{c_char, c_void};
use std::fmt;

use abi_stable::{
    declare_root_module_statics, library::RootModule, package_version_strings,
    sabi_types::VersionStrings, std_types::RStr, StableAbi,
};

/// Major ABI version: plugins built for another major are refused.
pub const ABI_MAJOR: u32 = 1;
/// Minor ABI version: plugins built for this minor or an older one load.
///
/// - 1.0: the first ABI.
/// - 1.1: [`RawResponse`] gains `data`, `len`, `cap` and `grow`: a plugin
///   writes its answer straight into the host's buffer with no call back
///   into the host (unless it needs more room than it was given). Plugins
///   may also export `process_batch` ([`ProcessBatchFn`]): every complete
///   request of one read answered in one call.
/// - 1.2: [`RawConnection`] gains `flags` ([`NBNET_CONN_HANDED_OVER`]):
///   connections move between workers on a reload instead of closing.
/// - 1.3: plugins that wait. [`RawResponse`] gains `defer` (answer later,
///   from any thread, through a [`RawDeferred`] handle); [`RawInitContext`]
///   gains `thread_index` and `thread_count` (the instance's place in its
///   thread pool, `[[plugins]] threads`). [`RawConnection`] gains
///   `tls_version`, `tls_subject` and `tls_sans`, and `flags` gains
///   [`NBNET_CONN_TLS`]: what a TLS listener learned about the client.
pub const ABI_MINOR: u32 = 3;

/// Success return code of `init`, `process` and `write`.
pub const NBNET_OK: i32 = 0;
/// Failure return code of `init`, `process` and `write`.
pub const NBNET_ERR: i32 = -1;

/// Log level for [`RawInitContext::log`]: an error.
pub const NBNET_LOG_ERROR: i32 = 1;
/// Log level: a warning.
pub const NBNET_LOG_WARN: i32 = 2;
/// Log level: information.
pub const NBNET_LOG_INFO: i32 = 3;
/// Log level: debugging detail.
pub const NBNET_LOG_DEBUG: i32 = 4;

/// Name of the one symbol a C plugin exports (see `nbnet_plugin.h`).
pub const C_ENTRY_SYMBOL: &str = "nbnet_plugin_entry";

/// The sink a plugin writes its response into (`nbnet_response` in C).
///
/// The host builds one for each call of `process`; it is valid only during
/// that call. The plugin never frees or reallocates the host's memory, and
/// the host enforces `max_frame_bytes`, so nothing crosses allocators.
///
/// # Two ways to write (both keep the other consistent)
///
/// - **In place (ABI 1.1)**: `data[..len]` is the answer so far and
///   `data[len..cap]` is room the plugin may write into directly, then
///   advance `len`. This is the fast path: no call into the host per write.
///   When more room is needed, `grow(resp, n)` makes `cap - len >= n` (and
///   may move `data`), or refuses past `max_frame_bytes` (the request then
///   fails). The host never offers room beyond `max_frame_bytes` (in a
///   batch: past `answer_start + max_frame_bytes`). Only `len` is the
///   plugin's to change: a changed `data` or `cap` fails the request.
/// - **Through callbacks (ABI 1.0)**: `write`, or `reserve` + `commit`. They
///   update `data`, `len` and `cap` as they go.
///
/// After `process` returns, the host takes `data[..len]` as the response;
/// `len > cap` fails the request (a plugin bug) and nothing is sent. Every
/// byte counted in `len` must have been written by the plugin.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawResponse {
    /// Host-private state; plugins pass the response back untouched.
    pub host: *mut c_void,
    /// Appends `len` bytes at `data` to the response. Returns [`NBNET_OK`], or
    /// [`NBNET_ERR`] when the response would exceed the host's `max_frame_bytes`
    /// (nothing is appended then; the plugin should give up and return an error).
    pub write: unsafe extern "C" fn(resp: *mut RawResponse, data: *const u8, len: usize) -> i32,
    /// Records why `process` is about to return [`NBNET_ERR`]; the host logs it
    /// with the plugin's name. The host copies the message; UTF-8 expected.
    pub set_error: unsafe extern "C" fn(resp: *mut RawResponse, msg: *const u8, len: usize),
    /// The connection this request came on; valid during the call.
    pub conn: *const RawConnection,
    /// Makes room for up to `len` more bytes and returns where to write
    /// them (`data + len` after growing): host memory, not initialized. The
    /// pointer is valid only until the next call on this response (`write`,
    /// `reserve`, `grow` or `commit`): write into it, then `commit`. NULL
    /// (nothing reserved) when the response would exceed `max_frame_bytes`.
    pub reserve: unsafe extern "C" fn(resp: *mut RawResponse, len: usize) -> *mut u8,
    /// Appends the first `len` bytes written at the last `reserve`d pointer
    /// (`len` at most what was reserved, with no other call or change of
    /// `len` in between). [`NBNET_OK`]; otherwise [`NBNET_ERR`] and the
    /// request fails.
    pub commit: unsafe extern "C" fn(resp: *mut RawResponse, len: usize) -> i32,
    /// ABI 1.1. The response's bytes: `data[..len]` written, `data[len..cap]`
    /// room to write into. Moves only in a call on this response.
    pub data: *mut u8,
    /// ABI 1.1. Bytes of the response written so far; the plugin advances it
    /// after writing in place (never past `cap`).
    pub len: usize,
    /// ABI 1.1. End of the room at `data` (never more than `max_frame_bytes`
    /// past the start of the answer). The host's: do not change it.
    pub cap: usize,
    /// ABI 1.1. Makes `cap - len >= additional` (possibly moving `data`;
    /// bytes already written move with it). [`NBNET_OK`], or [`NBNET_ERR`]
    /// when `len + additional` would exceed `max_frame_bytes` (nothing
    /// changes then; the request fails).
    pub grow: unsafe extern "C" fn(resp: *mut RawResponse, additional: usize) -> i32,
    /// ABI 1.3. Takes a completion handle for the request being answered:
    /// the plugin returns [`NBNET_OK`] from `process` with nothing written,
    /// and completes the handle later, from any thread, exactly once (see
    /// [`RawDeferred`]). NULL when the host refuses (its
    /// `max_deferred_per_worker` is reached, or the request was deferred
    /// already): the request then fails whatever `process` returns.
    pub defer: unsafe extern "C" fn(resp: *mut RawResponse) -> *mut RawDeferred,
}

/// A completion handle for one deferred request (`nbnet_deferred` in C),
/// made by [`RawResponse::defer`] (ABI 1.3).
///
/// Host memory; the plugin may keep the pointer past `process` and pass it
/// to another thread. Complete it exactly once, from any thread, with
/// `answer` (the answer's bytes, copied by the host before it returns: the
/// plugin keeps ownership of `data`) or `fail` (the request fails, the
/// connection is closed after the answers before it, and the message is
/// logged). Completing is always safe: after the client has gone or the
/// request's `deferred_timeout` has passed it does nothing (and is
/// counted). A second completion returns [`NBNET_ERR`] and does nothing;
/// the handle must not be used after that (the host recycles its memory
/// once many later handles were completed).
#[repr(C)]
#[derive(StableAbi)]
pub struct RawDeferred {
    /// Completes the request with `len` bytes at `data` (copied).
    /// [`NBNET_OK`], or [`NBNET_ERR`] when the handle was completed
    /// already. An answer over `max_frame_bytes` fails the request.
    pub answer: unsafe extern "C" fn(d: *mut RawDeferred, data: *const u8, len: usize) -> i32,
    /// Fails the request with a message (copied; UTF-8 expected).
    /// [`NBNET_OK`], or [`NBNET_ERR`] when completed already.
    pub fail: unsafe extern "C" fn(d: *mut RawDeferred, msg: *const u8, len: usize) -> i32,
    /// Host-private.
    pub host: *mut c_void,
}

impl fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawResponse")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

/// A client connection as a plugin sees it (`nbnet_conn` in C). Passed to
/// `process` (through the response) and to the connection hooks; valid
/// only during the call that receives it.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawConnection {
    /// Identifies the connection within this server: unique across workers
    /// and never reused while the master runs.
    pub id: u64,
    /// The client's address, `IP:PORT`, NUL-terminated.
    pub peer: *const c_char,
    /// The listener's address it arrived on, `IP:PORT`, NUL-terminated.
    pub listener: *const c_char,
    /// ABI 1.2. [`NBNET_CONN_HANDED_OVER`], [`NBNET_CONN_TLS`] (1.3), or 0.
    pub flags: u32,
    /// ABI 1.3. The TLS version once the handshake is done: 0x0303 (TLS
    /// 1.2) or 0x0304 (TLS 1.3); 0 without TLS, or before the handshake
    /// (in `on_open`, which runs at accept).
    pub tls_version: u32,
    /// ABI 1.3. Mutual TLS: the client certificate's subject, RFC 4514
    /// text (`CN=client,O=Example`), NUL-terminated; null without one.
    pub tls_subject: *const c_char,
    /// ABI 1.3. Mutual TLS: the client certificate's subject alternative
    /// names, comma separated, each `DNS:name`, `IP:addr`, `URI:uri` or
    /// `email:addr` (empty when it has none); null without a certificate.
    pub tls_sans: *const c_char,
}

/// [`RawConnection::flags`] (ABI 1.3): the connection speaks TLS (set from
/// `on_open` on, even before the handshake completes).
pub const NBNET_CONN_TLS: u32 = 2;

/// [`RawConnection::flags`]: the connection moves between workers without
/// closing. In `on_close`: it is handed over to another worker (the client
/// stays connected; this instance will not see it again). In `on_open`: it
/// was accepted earlier by another worker and handed to this one (during a
/// reload or a worker's replacement).
pub const NBNET_CONN_HANDED_OVER: u32 = 1;

/// What the host tells a plugin when it creates its per-worker instance
/// (`nbnet_init_ctx` in C). Valid only during `init`, except `log` and
/// `log_handle`, which stay valid until `destroy` returns.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawInitContext {
    /// `sizeof` this struct as the host knows it; fields past a plugin's
    /// known size may be added in later minor versions.
    pub struct_size: u32,
    /// Index of this worker, `0 .. worker_count`.
    pub worker_index: u32,
    /// Number of workers the master runs.
    pub worker_count: u32,
    /// The plugin's name in the config, NUL-terminated.
    pub plugin_name: *const c_char,
    /// The plugin's `config` table re-serialized as TOML text, NUL-terminated
    /// (empty when the config has none).
    pub config_toml: *const c_char,
    /// Length of `config_toml` in bytes, without the NUL.
    pub config_toml_len: usize,
    /// Host-private state for `set_error`.
    pub host: *mut c_void,
    /// Records why `init` is about to return [`NBNET_ERR`]; the host reports it
    /// with the plugin's name and file.
    pub set_error: unsafe extern "C" fn(ctx: *const RawInitContext, msg: *const u8, len: usize),
    /// Logs `msg` through the host's logger, tagged with the plugin's name.
    /// `level` is one of the `NBNET_LOG_*` constants.
    pub log:
        unsafe extern "C" fn(log_handle: *const c_void, level: i32, msg: *const u8, len: usize),
    /// First argument of `log`; valid until the instance is destroyed.
    pub log_handle: *const c_void,
    /// Looks up a top-level key of the plugin's `config` table and returns
    /// its value as NUL-terminated text (strings without quotes; numbers and
    /// booleans as written by TOML), or NULL when the key is absent or not a
    /// scalar. For C plugins that would rather not parse TOML. The text is
    /// valid until `init` returns.
    pub config_get:
        unsafe extern "C" fn(ctx: *const RawInitContext, key: *const c_char) -> *const c_char,
    /// ABI 1.3. With `[[plugins]] threads = N > 0`, each worker creates N
    /// instances, one per pool thread: this one's index, `0 .. N`. 0 for an
    /// instance on the reactor thread.
    pub thread_index: u32,
    /// ABI 1.3. The pool's size N, or 0 when the instance runs on the
    /// worker's reactor thread (`threads = 0`, the default).
    pub thread_count: u32,
}

/// Signature of a plugin's `init`: create the per-worker instance and store
/// it in `*state`. Returns [`NBNET_OK`] or [`NBNET_ERR`] (after `set_error`).
pub type InitFn = unsafe extern "C" fn(ctx: *const RawInitContext, state: *mut *mut c_void) -> i32;
/// Signature of a plugin's `process`: answer one request (`len > 0` bytes at
/// `request`, valid during the call) by writing into `response`. Returns
/// [`NBNET_OK`], or [`NBNET_ERR`] (after `set_error`) to have the host log the
/// error and close the connection.
pub type ProcessFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const u8,
    len: usize,
    response: *mut RawResponse,
) -> i32;
/// One request of a batch (`nbnet_request` in C): `len > 0` bytes at `data`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct RawRequest {
    /// The request's payload; valid during the call.
    pub data: *const u8,
    /// Its length.
    pub len: usize,
}

/// The requests of one batch and where their answers go (`nbnet_batch` in
/// C); valid only during the `process_batch` call that receives it.
///
/// The plugin answers `requests` in order into the one response, each
/// answer preceded by `prefix` bytes it leaves alone (the host writes each
/// frame's header there afterwards). For request `i` it:
/// 1. adds one to `*progress` (the host's hang watchdog watches it),
/// 2. sets `answer_start` to the response's `len` plus `prefix` (the host
///    applies `max_frame_bytes` to the bytes written after it), makes room,
///    fills the `prefix` bytes (with anything: the host overwrites them
///    with the frame header) and advances `len` past them,
/// 3. writes the answer exactly as `process` would,
/// 4. stores its length (`len - answer_start`) in `lens[i]`.
///
/// It returns how many requests it answered, `k <= count`. `k < count`
/// with `set_error` called means request `k` failed (its partial answer is
/// dropped, the connection is closed after answers `0..k`); `k < count`
/// without an error means it stopped early, as it should once the
/// response's `len` reaches `budget` (after answering at least one): the
/// host answers the rest in a later call, after the client has read these.
///
/// The host checks the account: the lengths (with their prefixes) must add
/// up to exactly what was written (up to the failed answer's start when a
/// request failed), `k` must be at most `count`, and a batch answering none
/// must say why. Otherwise nothing of the batch is sent and the connection
/// is closed. The host does not enforce `budget`: a plugin that ignores it
/// lets a client that never reads make the worker buffer a whole batch.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawBatch {
    /// The requests, in the order they arrived.
    pub requests: *const RawRequest,
    /// How many (at least 1).
    pub count: usize,
    /// Out: `lens[i]` is the length of answer `i`.
    pub lens: *mut usize,
    /// Bytes to skip before each answer (the host's frame header).
    pub prefix: usize,
    /// Stop after the answer that takes the response's `len` to this.
    pub budget: usize,
    /// In/out: where the answer being written starts (see above).
    pub answer_start: usize,
    /// Add one before starting each request (a counter in host memory).
    pub progress: *mut u64,
}

/// Signature of a plugin's optional `process_batch`; see [`RawBatch`].
pub type ProcessBatchFn = unsafe extern "C" fn(
    state: *mut c_void,
    batch: *mut RawBatch,
    response: *mut RawResponse,
) -> usize;

/// Signature of a plugin's `destroy`: free the instance `init` created.
pub type DestroyFn = unsafe extern "C" fn(state: *mut c_void);
/// Signature of the connection hooks `on_open` / `on_close`.
pub type ConnectionFn = unsafe extern "C" fn(state: *mut c_void, conn: *const RawConnection);
/// Signature of `on_shutdown`: the worker is stopping; `destroy` follows.
pub type ShutdownFn = unsafe extern "C" fn(state: *mut c_void);

/// The table a C plugin's `nbnet_plugin_entry()` returns (`nbnet_plugin` in C).
///
/// It must point to static storage that lives as long as the library.
/// `abi_major`, `abi_minor` and `struct_size` come first so that the host can
/// check them before reading anything else.
#[repr(C)]
pub struct CPlugin {
    /// Must equal [`ABI_MAJOR`].
    pub abi_major: u32,
    /// Must be at most [`ABI_MINOR`].
    pub abi_minor: u32,
    /// `sizeof(nbnet_plugin)` as the plugin was compiled.
    pub struct_size: u32,
    /// The plugin's own name (NUL-terminated, static).
    pub name: *const c_char,
    /// The plugin's own version string (NUL-terminated, static).
    pub version: *const c_char,
    /// See [`InitFn`].
    pub init: Option<InitFn>,
    /// See [`ProcessFn`].
    pub process: Option<ProcessFn>,
    /// See [`DestroyFn`]; may be NULL when the plugin keeps no state.
    pub destroy: Option<DestroyFn>,
    /// A client connected to a listener this plugin serves; may be NULL.
    pub on_open: Option<ConnectionFn>,
    /// That connection closed (for any reason); may be NULL.
    pub on_close: Option<ConnectionFn>,
    /// The worker is shutting down; `destroy` follows. May be NULL.
    pub on_shutdown: Option<ShutdownFn>,
    /// ABI 1.1: answers a batch of requests in one call (see [`RawBatch`]).
    /// May be NULL: `process` is then called once per request.
    pub process_batch: Option<ProcessBatchFn>,
}

/// The root module a Rust plugin exports (with [`export_plugin!`](crate::export_plugin)).
///
/// `abi_stable` checks its layout, and that of every type it mentions, against
/// the host's when the library is loaded, and refuses mismatches.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = RustPluginRef)))]
#[sabi(missing_field(panic))]
pub struct RustPlugin {
    /// [`ABI_MAJOR`] as the plugin was built.
    pub abi_major: u32,
    /// [`ABI_MINOR`] as the plugin was built.
    pub abi_minor: u32,
    /// The plugin's own name (its crate name).
    pub name: RStr<'static>,
    /// The plugin's own version (its crate version).
    pub version: RStr<'static>,
    /// See [`InitFn`] (written out: `abi_stable` checks inline fn types only).
    pub init: unsafe extern "C" fn(ctx: *const RawInitContext, state: *mut *mut c_void) -> i32,
    /// See [`ProcessFn`].
    pub process: unsafe extern "C" fn(
        state: *mut c_void,
        request: *const u8,
        len: usize,
        response: *mut RawResponse,
    ) -> i32,
    /// See [`DestroyFn`].
    pub destroy: unsafe extern "C" fn(state: *mut c_void),
    /// See [`ConnectionFn`]: a client connected.
    pub on_open: unsafe extern "C" fn(state: *mut c_void, conn: *const RawConnection),
    /// See [`ConnectionFn`]: a connection closed.
    pub on_close: unsafe extern "C" fn(state: *mut c_void, conn: *const RawConnection),
    /// See [`ShutdownFn`].
    ///
    /// This is the last field of the prefix: fields added in later minor
    /// versions go below it and are optional to the host. It moves only at a
    /// major bump.
    #[sabi(last_prefix_field)]
    pub on_shutdown: unsafe extern "C" fn(state: *mut c_void),
    /// ABI 1.1: see [`ProcessBatchFn`]. The SDK always provides it (looping
    /// over `Plugin::process`); a host reads it only if the plugin's module
    /// has it.
    #[sabi(missing_field(option))]
    pub process_batch: unsafe extern "C" fn(
        state: *mut c_void,
        batch: *mut RawBatch,
        response: *mut RawResponse,
    ) -> usize,
}

impl RootModule for RustPluginRef {
    declare_root_module_statics! {RustPluginRef}
    const BASE_NAME: &'static str = "nbnet_plugin";
    const NAME: &'static str = "nbnet plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
