//! The host-facing half of the SDK: the root module [`export_plugin!`]
//! builds, the `extern "C"` trampolines that call a [`Plugin`] and catch
//! its panics, the panic hook, and config errors that name the key.

use super::*;

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
