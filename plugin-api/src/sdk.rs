//! The Rust plugin SDK: implement [`Plugin`], call [`export_plugin!`](crate::export_plugin).
//!
//! Everything `unsafe` about the boundary lives here, in the trampolines the
//! macro instantiates for your type, so a plugin author writes none.

use std::any::Any;
use std::ffi::{c_void, CStr};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::RStr;
use serde::de::DeserializeOwned;

use crate::abi::{
    RawBatch, RawConnection, RawDeferred, RawInitContext, RawRequest, RawResponse, RustPlugin,
    RustPluginRef, ABI_MAJOR, ABI_MINOR, NBNET_ERR, NBNET_LOG_DEBUG, NBNET_LOG_ERROR,
    NBNET_LOG_INFO, NBNET_LOG_WARN, NBNET_OK,
};

/// A plugin: one instance per worker process, created from the plugin's own
/// config table, asked to answer one request at a time.
///
/// `process` is never called concurrently on one instance, but a slow
/// `process` stalls every other connection of that worker: keep it short.
pub trait Plugin: Sized + 'static {
    /// The plugin's `config` table from the nbnet config, deserialized for you.
    /// Use [`NoConfig`] when the plugin takes none.
    type Config: DeserializeOwned;

    /// Creates this worker's instance. An error stops the server from starting
    /// (or `nbnet --check` from passing) with your message.
    fn new(config: Self::Config, ctx: &InitContext) -> Result<Self, Error>;

    /// Answers one request by writing the response payload into `response`.
    /// An error is logged by the host with the plugin's name and the client's
    /// connection is closed.
    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error>;

    /// A client connected to a listener this plugin serves. Does nothing
    /// unless overridden.
    fn connection_opened(&mut self, _conn: &Connection<'_>) {}

    /// A connection closed, for whatever reason. Does nothing unless overridden.
    fn connection_closed(&mut self, _conn: &Connection<'_>) {}

    /// The worker is stopping; the instance is dropped right after. Does
    /// nothing unless overridden (`Drop` works too).
    fn shutdown(&mut self) {}
}

/// A client connection, as the host describes it to a plugin.
#[derive(Clone, Copy)]
pub struct Connection<'a> {
    raw: &'a RawConnection,
}

impl<'a> Connection<'a> {
    /// Wraps the host's description. `raw`'s strings must be valid
    /// NUL-terminated UTF-8 for `'a` (the host and [`crate::testing`] ensure it).
    pub(crate) fn new(raw: &'a RawConnection) -> Self {
        Connection { raw }
    }

    /// Unique within this server (across workers), never reused while it runs.
    pub fn id(&self) -> u64 {
        self.raw.id
    }

    /// The client's address, `IP:PORT`.
    pub fn peer(&self) -> &'a str {
        c_text(self.raw.peer)
    }

    /// The address of the listener the client connected to, `IP:PORT`.
    pub fn listener(&self) -> &'a str {
        c_text(self.raw.listener)
    }

    /// The connection moves between workers without closing (ABI 1.2): in
    /// `on_close`, it is handed over to another worker (the client stays
    /// connected); in `on_open`, another worker accepted it earlier.
    pub fn handed_over(&self) -> bool {
        self.raw.flags & crate::abi::NBNET_CONN_HANDED_OVER != 0
    }

    /// The client speaks TLS on this connection (ABI 1.3).
    pub fn tls(&self) -> bool {
        self.raw.flags & crate::abi::NBNET_CONN_TLS != 0
    }

    /// The TLS version once the handshake is done: 0x0303 (1.2) or 0x0304
    /// (1.3); 0 without TLS or before the handshake (`on_open`).
    pub fn tls_version(&self) -> u32 {
        self.raw.tls_version
    }

    /// Mutual TLS: the client certificate's subject (RFC 4514 text, e.g.
    /// `CN=client,O=Example`); `None` without a client certificate.
    pub fn tls_client_subject(&self) -> Option<&'a str> {
        (!self.raw.tls_subject.is_null()).then(|| c_text(self.raw.tls_subject))
    }

    /// Mutual TLS: the client certificate's subject alternative names,
    /// comma separated (`DNS:a.example,IP:10.0.0.1,URI:…,email:…`);
    /// `None` without a client certificate.
    pub fn tls_client_sans(&self) -> Option<&'a str> {
        (!self.raw.tls_sans.is_null()).then(|| c_text(self.raw.tls_sans))
    }
}

fn c_text<'a>(text: *const std::ffi::c_char) -> &'a str {
    if text.is_null() {
        return "";
    }
    // SAFETY: the host passes NUL-terminated strings valid for the call.
    unsafe { CStr::from_ptr(text) }.to_str().unwrap_or("?")
}

/// Config type for plugins that take no configuration: any key in their
/// `config` table is reported as unknown.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// An error a plugin reports to the host: a message for the operator's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        Error {
            message: message.to_string(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error { message }
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

/// Where a plugin writes its answer: a host-owned buffer behind callbacks.
#[repr(transparent)]
pub struct Response {
    raw: RawResponse,
}

impl Response {
    /// Room left before the host must be asked for more.
    #[inline]
    fn room(&self) -> usize {
        self.raw.cap - self.raw.len
    }

    /// Makes room for `additional` more bytes: free when the host already
    /// gave enough (the usual case), one call into the host otherwise.
    #[inline]
    fn ensure_room(&mut self, additional: usize) -> Result<(), Error> {
        if additional <= self.room() {
            return Ok(());
        }
        self.grow(additional)
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, additional: usize) -> Result<(), Error> {
        // SAFETY: `raw` was built by the host for this call.
        match unsafe { (self.raw.grow)(&mut self.raw, additional) } {
            NBNET_OK => Ok(()),
            _ => Err(too_large()),
        }
    }

    /// The room after what is written: `n` bytes the caller must initialize
    /// before [`advance`](Self::advance)-ing over them.
    ///
    /// # Safety
    /// `ensure_room(n)` must have succeeded, with no call on the response since.
    #[inline]
    unsafe fn spare(&mut self, n: usize) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: `data[len..cap]` is host memory lent for this call and
        // `n <= cap - len` (the caller's guarantee).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.raw
                    .data
                    .add(self.raw.len)
                    .cast::<std::mem::MaybeUninit<u8>>(),
                n,
            )
        }
    }

    /// Appends `bytes` to the response payload. Fails when the response would
    /// exceed the host's `max_frame_bytes`; return that error from `process`.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.ensure_room(bytes.len())?;
        // SAFETY: room for `bytes.len()` was just ensured; the bytes are
        // written before `len` covers them.
        unsafe {
            self.raw
                .data
                .add(self.raw.len)
                .copy_from_nonoverlapping(bytes.as_ptr(), bytes.len());
        }
        self.raw.len += bytes.len();
        Ok(())
    }

    /// Appends `input` transformed byte by byte with `map`, computed straight
    /// into the host's buffer: no intermediate copy (e.g. upper-casing:
    /// `response.write_mapped(request, |b| b.to_ascii_uppercase())`).
    #[inline]
    pub fn write_mapped(
        &mut self,
        input: &[u8],
        mut map: impl FnMut(u8) -> u8,
    ) -> Result<(), Error> {
        self.ensure_room(input.len())?;
        // SAFETY: room for `input.len()` was just ensured.
        let out = unsafe { self.spare(input.len()) };
        // A zip over two slices: the compiler can vectorize it.
        for (slot, &byte) in out.iter_mut().zip(input) {
            slot.write(map(byte));
        }
        // Every byte of the room was written just above.
        self.raw.len += input.len();
        Ok(())
    }

    /// Appends up to `len` bytes that `fill` writes into a zeroed buffer in
    /// the host's memory; `fill` returns how many it wrote (at most `len`).
    pub fn write_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<(), Error> {
        self.ensure_room(len)?;
        // SAFETY: room for `len` was just ensured; zeroed before it is
        // viewed as initialized bytes.
        let room = unsafe {
            let room = self.spare(len);
            room.fill(std::mem::MaybeUninit::new(0));
            &mut *(std::ptr::from_mut(room) as *mut [u8])
        };
        let written = fill(room).min(len);
        self.raw.len += written;
        Ok(())
    }

    /// The connection this request arrived on.
    pub fn connection(&self) -> Connection<'_> {
        // SAFETY: the host sets `conn` to a description valid for this call.
        Connection::new(unsafe { &*self.raw.conn })
    }

    fn set_error(&mut self, message: &str) {
        // SAFETY: as in `write`; the host copies the message.
        unsafe { (self.raw.set_error)(&mut self.raw, message.as_ptr(), message.len()) }
    }

    /// Answers this request later (ABI 1.3): returns a handle to complete,
    /// from any thread, with [`Deferred::answer`] or [`Deferred::fail`].
    /// Return `Ok(())` from `process` right away, with nothing written.
    ///
    /// The host keeps the connection's answers in request order: later
    /// requests on the same connection wait for this one. A handle dropped
    /// without being completed fails the request. If the host refuses
    /// (its `max_deferred_per_worker` is reached) the request fails and the
    /// handle's completion does nothing.
    pub fn defer(&mut self) -> Deferred {
        // SAFETY: as in `write`: `raw` was built by the host for this call.
        let raw = unsafe { (self.raw.defer)(&mut self.raw) };
        Deferred { raw }
    }
}

/// A request answered later: complete it exactly once, from any thread,
/// with [`answer`](Self::answer) or [`fail`](Self::fail). Dropping it
/// without completing fails the request (the client's connection is
/// closed after the answers before it), so a lost handle never hangs a
/// client. Completing after the client has gone, or after the host's
/// `deferred_timeout`, is harmless (the host counts it).
#[must_use = "a Deferred dropped without an answer fails its request"]
pub struct Deferred {
    raw: *mut RawDeferred,
}

// SAFETY: the handle is host memory made to be completed from any thread
// (the host's completion is thread-safe); `Deferred` owns it exclusively.
unsafe impl Send for Deferred {}

impl Deferred {
    /// Completes the request with `bytes` as its answer (copied by the host
    /// before this returns). An answer over the host's `max_frame_bytes`
    /// fails the request instead.
    pub fn answer(mut self, bytes: &[u8]) {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        if !raw.is_null() {
            // SAFETY: a live handle from `defer`, completed once (taken out
            // of `self`, so `Drop` will not complete it again).
            unsafe { ((*raw).answer)(raw, bytes.as_ptr(), bytes.len()) };
        }
    }

    /// Fails the request: the host logs `message` with the plugin's name
    /// and closes the connection after the answers before it.
    pub fn fail(mut self, message: impl fmt::Display) {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        Self::fail_raw(raw, &message.to_string());
    }

    fn fail_raw(raw: *mut RawDeferred, message: &str) {
        if !raw.is_null() {
            // SAFETY: as in `answer`.
            unsafe { ((*raw).fail)(raw, message.as_ptr(), message.len()) };
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        Self::fail_raw(raw, "the plugin dropped its Deferred without answering");
    }
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("live", &!self.raw.is_null())
            .finish()
    }
}

fn too_large() -> Error {
    Error::new("response refused by the host: it would exceed max_frame_bytes")
}

/// What the host tells a plugin when creating its instance.
pub struct InitContext<'a> {
    raw: &'a RawInitContext,
}

impl InitContext<'_> {
    /// Index of this worker, `0 .. worker_count()`.
    pub fn worker_index(&self) -> u32 {
        self.raw.worker_index
    }

    /// Number of workers the master runs.
    pub fn worker_count(&self) -> u32 {
        self.raw.worker_count
    }

    /// With `[[plugins]] threads = N > 0` (ABI 1.3): this instance's pool
    /// thread, `0 .. thread_count()`; 0 on the reactor thread.
    pub fn thread_index(&self) -> u32 {
        if self.knows(std::mem::offset_of!(RawInitContext, thread_index)) {
            self.raw.thread_index
        } else {
            0
        }
    }

    /// The size of this plugin's thread pool in each worker (`threads`),
    /// or 0 when its instance runs on the worker's reactor thread.
    pub fn thread_count(&self) -> u32 {
        if self.knows(std::mem::offset_of!(RawInitContext, thread_count)) {
            self.raw.thread_count
        } else {
            0
        }
    }

    /// Whether the host's context has the field at `offset` (it is at
    /// least as new as the minor that added it).
    fn knows(&self, offset: usize) -> bool {
        (self.raw.struct_size as usize) >= offset + 4
    }

    /// The plugin's name in the nbnet config.
    pub fn plugin_name(&self) -> &str {
        // SAFETY: the host passes a NUL-terminated string valid during init.
        unsafe { CStr::from_ptr(self.raw.plugin_name) }
            .to_str()
            .unwrap_or("<non-UTF-8 name>")
    }

    /// A logger that goes through the host's log (a plugin's own `tracing`
    /// has no subscriber: it is a separate copy). Valid for the instance's life.
    pub fn logger(&self) -> Logger {
        Logger {
            log: self.raw.log,
            handle: self.raw.log_handle,
        }
    }

    fn config_toml(&self) -> &str {
        // SAFETY: the host passes `config_toml_len` valid bytes during init.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.raw.config_toml.cast::<u8>(), self.raw.config_toml_len)
        };
        std::str::from_utf8(bytes).unwrap_or("")
    }

    fn set_error(&self, message: &str) {
        // SAFETY: `raw` is the host's context for this init; it copies the message.
        unsafe { (self.raw.set_error)(self.raw, message.as_ptr(), message.len()) }
    }
}

/// Logs through the host, tagged with the plugin's name.
#[derive(Clone, Copy)]
pub struct Logger {
    log: unsafe extern "C" fn(*const c_void, i32, *const u8, usize),
    handle: *const c_void,
}

impl Logger {
    fn log(&self, level: i32, message: &str) {
        // SAFETY: the host keeps `handle` valid until the instance is destroyed.
        unsafe { (self.log)(self.handle, level, message.as_ptr(), message.len()) }
    }
    /// Logs an error.
    pub fn error(&self, message: &str) {
        self.log(NBNET_LOG_ERROR, message)
    }
    /// Logs a warning.
    pub fn warn(&self, message: &str) {
        self.log(NBNET_LOG_WARN, message)
    }
    /// Logs information.
    pub fn info(&self, message: &str) {
        self.log(NBNET_LOG_INFO, message)
    }
    /// Logs debugging detail (shown when the host's level is `debug`).
    pub fn debug(&self, message: &str) {
        self.log(NBNET_LOG_DEBUG, message)
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`]) as this library's nbnet
/// plugin. Use it once per `cdylib` crate.
///
/// This is what `abi_stable`'s `#[export_root_module]` expands to, written with
/// `$crate` paths so that a plugin crate needs no direct `abi_stable` dependency.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The nbnet root module of this plugin library.
        pub fn nbnet_root_module() -> $crate::abi::RustPluginRef {
            $crate::sdk::root_module::<$plugin>(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
        }

        /// The header `abi_stable` looks up when the host loads this library.
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(nbnet_root_module)
            }
            // SAFETY: `erased_root_module` returns the `RustPluginRef` named as
            // the module type, and its layout is checked (`CheckTypeLayout::Yes`).
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::abi::RustPluginRef>(
                    erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// Builds the root module for `P`; called by [`export_plugin!`](crate::export_plugin).
#[doc(hidden)]
pub fn root_module<P: Plugin>(name: &'static str, version: &'static str) -> RustPluginRef {
    RustPlugin {
        abi_major: ABI_MAJOR,
        abi_minor: ABI_MINOR,
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        init: init_trampoline::<P>,
        process: process_trampoline::<P>,
        process_batch: process_batch_trampoline::<P>,
        destroy: destroy_trampoline::<P>,
        on_open: open_trampoline::<P>,
        on_close: close_trampoline::<P>,
        on_shutdown: shutdown_trampoline::<P>,
    }
    .leak_into_prefix()
}

/// Set by [`crate::testing::TestHost`]: the plugin runs inside a test
/// binary, whose panic hook must stay (see [`panics`]).
pub(crate) static IN_TEST_HOST: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Where a Rust plugin's panics go.
///
/// A cdylib plugin links its own copy of std, with its own panic hook: the
/// default one printed `thread '…' panicked at …` (and a backtrace with
/// build paths under `RUST_BACKTRACE=1`) straight to stderr, outside the
/// host's log format, on top of the host's own line about the failed
/// request. The SDK installs, once per plugin image, a hook that prints
/// nothing and keeps the panic's location in a thread-local, so that:
/// - a panic the SDK catches (in `new`, `process`, a hook) is reported once,
///   by the host's line for the failed call, as `panicked at FILE:LINE:COL: MESSAGE`;
/// - a panic that ends a thread of the plugin's own (nothing catches it) is
///   logged through the host's log with the plugin's name when the thread
///   exits (the thread-local's destructor), at error level.
mod panics {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    use super::Logger;

    /// The host's logger of the first instance of this image: used for
    /// panics no SDK guard caught.
    struct Shared(Logger);
    // SAFETY: the host's log callback may be called from any thread (it
    // writes one line); the handle stays valid while the plugin is loaded.
    unsafe impl Send for Shared {}
    // SAFETY: as above.
    unsafe impl Sync for Shared {}
    static LOGGER: OnceLock<Shared> = OnceLock::new();

    /// The last panic of this thread that nobody reported yet.
    struct Pending(Option<String>);
    impl Drop for Pending {
        fn drop(&mut self) {
            if let (Some(panic), Some(logger)) = (self.0.take(), LOGGER.get()) {
                logger
                    .0
                    .error(&format!("a thread of the plugin ended: {panic}"));
            }
        }
    }
    thread_local! {
        static PENDING: RefCell<Pending> = const { RefCell::new(Pending(None)) };
    }

    /// Installs the hook (once per plugin image) and keeps `logger`; not
    /// under [`crate::testing::TestHost`], in the test's own process.
    pub(super) fn install(logger: Logger) {
        if super::IN_TEST_HOST.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if LOGGER.set(Shared(logger)).is_ok() {
            std::panic::set_hook(Box::new(|info| {
                let message = super::panic_message(info.payload());
                let text = match info.location() {
                    Some(at) => format!("panicked at {at}: {message}"),
                    None => format!("panicked: {message}"),
                };
                let _ = PENDING.try_with(|p| p.borrow_mut().0 = Some(text));
            }));
        }
    }

    /// A panic the SDK caught where nothing reports it (a hook, `Drop`):
    /// logged through the host, naming `what`.
    pub(super) fn log_caught(what: &str, payload: &(dyn std::any::Any + Send)) {
        let text = take(payload);
        if let Some(logger) = LOGGER.get() {
            logger.0.error(&format!("{what} {text}"));
        }
    }

    /// The panic the SDK just caught, as `panicked at …: message` (taken:
    /// it is reported by the caller).
    pub(super) fn take(payload: &(dyn std::any::Any + Send)) -> String {
        PENDING
            .try_with(|p| p.borrow_mut().0.take())
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("panicked: {}", super::panic_message(payload)))
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(non-string panic payload)"
    }
}

pub(crate) unsafe extern "C" fn init_trampoline<P: Plugin>(
    ctx: *const RawInitContext,
    state: *mut *mut c_void,
) -> i32 {
    // SAFETY: the host passes a valid context for the duration of this call.
    let ctx = InitContext {
        raw: unsafe { &*ctx },
    };
    panics::install(ctx.logger());
    let created = catch_unwind(AssertUnwindSafe(|| {
        let text = ctx.config_toml();
        let config: P::Config = toml::from_str(text)
            .map_err(|e| Error::new(format!("invalid config: {}", config_error(text, &e))))?;
        P::new(config, &ctx)
    }));
    match created {
        Ok(Ok(plugin)) => {
            // SAFETY: `state` is a valid out-pointer from the host.
            unsafe { *state = Box::into_raw(Box::new(plugin)).cast() };
            NBNET_OK
        }
        Ok(Err(e)) => {
            ctx.set_error(e.message());
            NBNET_ERR
        }
        Err(panic) => {
            ctx.set_error(&format!("in new(): {}", panics::take(&*panic)));
            NBNET_ERR
        }
    }
}

pub(crate) unsafe extern "C" fn process_trampoline<P: Plugin>(
    state: *mut c_void,
    request: *const u8,
    len: usize,
    response: *mut RawResponse,
) -> i32 {
    // SAFETY: `state` is the `Box<P>` made by `init_trampoline::<P>`, used by
    // one thread at a time; `request` holds `len` bytes for this call;
    // `response` is the host's sink for this call (`Response` is transparent).
    let (plugin, request, response) = unsafe {
        (
            &mut *state.cast::<P>(),
            if len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(request, len)
            },
            &mut *response.cast::<Response>(),
        )
    };
    match catch_unwind(AssertUnwindSafe(|| plugin.process(request, response))) {
        Ok(Ok(())) => NBNET_OK,
        failed => report_failure(response, failed),
    }
}

/// Passes an error or a caught panic to the host (`set_error`): kept out of
/// line, so the answering path stays small.
#[cold]
#[inline(never)]
fn report_failure(response: &mut Response, failed: std::thread::Result<Result<(), Error>>) -> i32 {
    match failed {
        Ok(Ok(())) => return NBNET_OK,
        Ok(Err(e)) => response.set_error(e.message()),
        Err(panic) => response.set_error(&panics::take(&*panic)),
    }
    NBNET_ERR
}

/// Answers a batch (see [`RawBatch`]) by calling `P::process` for each
/// request, with one panic guard and one boundary crossing for the lot.
pub(crate) unsafe extern "C" fn process_batch_trampoline<P: Plugin>(
    state: *mut c_void,
    batch: *mut RawBatch,
    response: *mut RawResponse,
) -> usize {
    // SAFETY: as in `process_trampoline`; `batch` is the host's description
    // of this call, its `requests` and `lens` arrays `count` long and its
    // `progress` counter valid for the call. `batch` stays a raw pointer:
    // the host reads `answer_start` through its own copy of it while the
    // plugin runs, so no `&mut` to it may claim exclusive access.
    let (plugin, response) =
        unsafe { (&mut *state.cast::<P>(), &mut *response.cast::<Response>()) };
    let mut answered = 0;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see above.
        unsafe { answer_batch(plugin, batch, response, &mut answered) }
    }));
    if !matches!(outcome, Ok(Ok(()))) {
        report_failure(response, outcome);
    }
    answered
}

/// The loop of [`process_batch_trampoline`], on its own so that its state
/// lives in registers rather than in the panic guard's closure.
///
/// # Safety
/// `batch` must be the host's batch for this call (see
/// [`process_batch_trampoline`]).
#[inline(never)]
unsafe fn answer_batch<P: Plugin>(
    plugin: &mut P,
    batch: *mut RawBatch,
    response: &mut Response,
    answered: &mut usize,
) -> Result<(), Error> {
    // The loop, compiled once for the host's 10-byte frame header (the
    // prefix fill is then two stores) and once for any other prefix.
    // SAFETY: passed on from the caller.
    unsafe {
        if (*batch).prefix == 10 {
            answer_batch_with::<P, true>(plugin, batch, response, answered)
        } else {
            answer_batch_with::<P, false>(plugin, batch, response, answered)
        }
    }
}

/// [`answer_batch`]'s loop; `HEADER`: the prefix is the 10-byte frame header.
///
/// # Safety
/// As for [`answer_batch`].
#[inline(always)]
unsafe fn answer_batch_with<P: Plugin, const HEADER: bool>(
    plugin: &mut P,
    batch: *mut RawBatch,
    response: &mut Response,
    answered: &mut usize,
) -> Result<(), Error> {
    // The batch's fields, read once (the loop writes through raw pointers,
    // after which the compiler would otherwise reload them).
    // SAFETY: the caller passes the host's valid batch.
    let (requests, count, prefix, budget, progress, lens) = unsafe {
        let b = &*batch;
        (b.requests, b.count, b.prefix, b.budget, b.progress, b.lens)
    };
    let requests: &[RawRequest] = if count == 0 {
        &[]
    } else {
        // SAFETY: `requests` holds `count` entries for the call.
        unsafe { std::slice::from_raw_parts(requests, count) }
    };
    // SAFETY: `progress` is the host's 8-byte-aligned call counter, valid
    // for the call; this thread is its only writer meanwhile (the master
    // only reads it).
    let progress = unsafe { std::sync::atomic::AtomicU64::from_ptr(progress) };
    // SAFETY: a field's address within the host's valid batch; no
    // reference to the batch is made.
    let answer_start = unsafe { std::ptr::addr_of_mut!((*batch).answer_start) };
    let mut done = 0;
    for request in requests {
        progress.store(
            progress.load(std::sync::atomic::Ordering::Relaxed) + 1,
            std::sync::atomic::Ordering::Relaxed,
        );
        // The limit applies from the new answer's start (set first, so
        // that room for it is measured against it, not the last one).
        let start = response.raw.len + prefix;
        // SAFETY: a field of the host's batch; written through the raw
        // pointer the host reads it by.
        unsafe { answer_start.write(start) };
        response.ensure_room(prefix + request.len)?;
        // The prefix room: filled (the host writes the frame header over
        // it), so no byte of the response is left unwritten.
        // SAFETY: `ensure_room` made room for `prefix` bytes at `len`.
        unsafe {
            let at = response.raw.data.add(response.raw.len);
            if HEADER {
                at.cast::<[u8; 10]>().write_unaligned([b'0'; 10]);
            } else {
                at.write_bytes(b'0', prefix);
            }
        }
        response.raw.len = start;
        // SAFETY: the host passes `len` readable bytes at a non-null
        // `data` (requests are never empty) for the call.
        let payload = unsafe { std::slice::from_raw_parts(request.data, request.len) };
        plugin.process(payload, response)?;
        let end = response.raw.len;
        // SAFETY: `lens` has `count` entries and `done < count`.
        unsafe { *lens.add(done) = end - start };
        done += 1;
        // Stored each time: a panic in the next request unwinds past this
        // function, and the answers so far must still count.
        *answered = done;
        if end >= budget {
            break;
        }
    }
    Ok(())
}

pub(crate) unsafe extern "C" fn destroy_trampoline<P: Plugin>(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    // SAFETY: `state` is the `Box<P>` made by `init_trampoline::<P>`; the host
    // destroys each instance once.
    let plugin = unsafe { Box::from_raw(state.cast::<P>()) };
    // A panicking Drop must not cross the boundary either.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || drop(plugin))) {
        panics::log_caught("dropping the instance", &*panic);
    }
}

/// Runs `hook` on the instance, swallowing a panic (hooks report nothing).
///
/// # Safety
/// `state` must be the `Box<P>` made by `init_trampoline::<P>`, used by one
/// thread at a time.
unsafe fn with_instance<P: Plugin>(state: *mut c_void, hook: impl FnOnce(&mut P)) {
    if state.is_null() {
        return;
    }
    // SAFETY: guaranteed by the caller.
    let plugin = unsafe { &mut *state.cast::<P>() };
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| hook(plugin))) {
        panics::log_caught("a connection or shutdown hook", &*panic);
    }
}

pub(crate) unsafe extern "C" fn open_trampoline<P: Plugin>(
    state: *mut c_void,
    conn: *const RawConnection,
) {
    // SAFETY: the host passes its instance and a description valid for the call.
    unsafe { with_instance::<P>(state, |p| p.connection_opened(&Connection::new(&*conn))) }
}

pub(crate) unsafe extern "C" fn close_trampoline<P: Plugin>(
    state: *mut c_void,
    conn: *const RawConnection,
) {
    // SAFETY: as in `open_trampoline`.
    unsafe { with_instance::<P>(state, |p| p.connection_closed(&Connection::new(&*conn))) }
}

pub(crate) unsafe extern "C" fn shutdown_trampoline<P: Plugin>(state: *mut c_void) {
    // SAFETY: the host passes its instance.
    unsafe { with_instance::<P>(state, |p| p.shutdown()) }
}

/// A config error for the plugin's log: serde's message (`invalid type:
/// string "1", expected i64`) does not name the key, so the key path the
/// error's span falls in is put first (`shift: invalid type: …`,
/// `limits.max: …`, `rules[2].name: …`).
fn config_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let path = error.span().and_then(|at| {
        let table = toml::de::DeTable::parse(text).ok()?;
        let mut path = String::new();
        key_path(table.get_ref(), &at, &mut path).then_some(path)
    });
    match path {
        Some(path) if !path.is_empty() => format!("{path}: {message}"),
        _ => message.to_string(),
    }
}

/// Appends to `path` the innermost key (or array index) of `table` whose
/// key or value holds the byte range `at`; false if none does.
fn key_path(table: &toml::de::DeTable, at: &core::ops::Range<usize>, path: &mut String) -> bool {
    let holds = |span: core::ops::Range<usize>| span.start <= at.start && at.end <= span.end;
    for (key, value) in table.iter() {
        if !(holds(key.span()) || holds(value.span()) || is_container(value.get_ref())) {
            continue;
        }
        let before = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if value_path(value, at, path) || holds(key.span()) || holds(value.span()) {
            return true;
        }
        path.truncate(before);
    }
    false
}

fn is_container(value: &toml::de::DeValue) -> bool {
    matches!(
        value,
        toml::de::DeValue::Table(_) | toml::de::DeValue::Array(_)
    )
}

/// [`key_path`] inside `value`, if it is a table or an array.
fn value_path(
    value: &toml::Spanned<toml::de::DeValue>,
    at: &core::ops::Range<usize>,
    path: &mut String,
) -> bool {
    match value.get_ref() {
        toml::de::DeValue::Table(inner) => key_path(inner, at, path),
        toml::de::DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let span = item.span();
            let inside = span.start <= at.start && at.end <= span.end;
            if !inside && !is_container(item.get_ref()) {
                return false;
            }
            let before = path.len();
            path.push_str(&format!("[{i}]"));
            if value_path(item, at, path) || inside {
                return true;
            }
            path.truncate(before);
            false
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::TestHost;
    use crate::{Error, InitContext, Plugin, Response};

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[allow(dead_code)]
        shift: i64,
        #[serde(default)]
        #[allow(dead_code)]
        limits: Option<Limits>,
        #[serde(default)]
        #[allow(dead_code)]
        rules: Vec<Limits>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        #[allow(dead_code)]
        max: u32,
    }

    struct Shifter;

    impl Plugin for Shifter {
        type Config = Config;
        fn new(_: Config, _: &InitContext) -> Result<Self, Error> {
            Ok(Shifter)
        }
        fn process(&mut self, _: &[u8], _: &mut Response) -> Result<(), Error> {
            Ok(())
        }
    }

    fn refused(config: &str) -> String {
        match TestHost::<Shifter>::new(config) {
            Ok(_) => panic!("{config:?} was accepted"),
            Err(e) => e,
        }
    }

    /// Issue 14 (docs/plugins.md): a config type error named the value but
    /// not the key; it names the key path now.
    #[test]
    fn a_config_error_names_the_key_path() {
        assert!(
            refused("shift = \"1\"")
                .contains("invalid config: shift: invalid type: string \"1\", expected i64"),
            "{}",
            refused("shift = \"1\"")
        );
        let nested = refused("shift = 1\n[limits]\nmax = -1\n");
        assert!(
            nested.contains("invalid config: limits.max: invalid value"),
            "{nested}"
        );
        let listed = refused("shift = 1\n[[rules]]\nmax = 1\n[[rules]]\nmax = \"x\"\n");
        assert!(
            listed.contains("invalid config: rules[1].max: invalid type"),
            "{listed}"
        );
        let unknown = refused("shift = 1\nshfit = 2\n");
        assert!(
            unknown.contains("invalid config: shfit: unknown field `shfit`"),
            "{unknown}"
        );
    }
}
