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

mod trampolines;
#[doc(hidden)]
pub use trampolines::root_module;
pub(crate) use trampolines::*;

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
