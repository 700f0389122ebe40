//! Log setup: `tracing` to stderr (or to `[log] file`), level from
//! `[log] level` (changed by a reload), `RUST_LOG` wins.
//!
//! The writer is a plain blocking `write(2)` on descriptor 2: a
//! `tracing_appender::non_blocking` writer thread would not exist in a
//! forked worker (its logs would be lost), and a master that forks must not
//! have one (see `shared/notes/dependencies.md`). Log lines are short and
//! rare (never per request at `info`), so blocking writes cost nothing that
//! matters.
//!
//! **`[log] file`**: [`to_file`] opens it (append) and puts it *on*
//! descriptor 2 (`dup2`), so the host's lines, what plugins write to
//! stderr and what processes they start write there all land in the file.
//! [`reopen`] (SIGUSR1, after logrotate renamed the file) opens the path
//! again and swaps it onto descriptor 2 the same way; each process has its
//! own descriptor 2, so the master passes SIGUSR1 on to its workers, which
//! reopen too. While the master starts ([`started`] not yet called) every
//! line also goes to the original stderr, so the operator who started it
//! sees why a start failed.
//!
//! **A lost log stream never stops the server.** A line that cannot be
//! written (closed pipe, hung-up terminal, full disk) is dropped and
//! counted in a counter shared by the master and all its workers
//! ([`dropped_lines`], `nbnet_log_lines_dropped_total`); the first line
//! that gets through again is followed by one that says how many were lost.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogLevel};

/// Changes the level of the installed subscriber (see [`set_level`]);
/// unset when `RUST_LOG` chose the filter.
type SetLevel = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;
static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Installs the global subscriber, text lines. Call once, in the master,
/// before forking (and after [`to_file`], if logging to a file).
pub fn init(level: LogLevel) {
    init_with(level, LogFormat::Text);
}

/// Installs the global subscriber in `format` (see [`init`]). `RUST_LOG`,
/// when set and valid, chooses the filter; an invalid one is reported in
/// one warning and `level` is used instead (tracing-subscriber would drop
/// the bad directives and log errors only). Colours only on a terminal,
/// and never when `NO_COLOR` is set (no-color.org) or in JSON.
pub fn init_with(level: LogLevel, format: LogFormat) {
    shared_counter();
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|directives| !directives.trim().is_empty());
    let (filter, refused) = match env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (EnvFilter::new(level.as_str()), Some(e)),
        None => (EnvFilter::new(level.as_str()), None),
    };
    let from_env = env.is_some() && refused.is_none();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_target(false)
        // A write that fails is counted by `LogWriter`, which reports
        // success; tracing-subscriber would otherwise report it with
        // eprintln!, which panics on the same broken stderr (that took the
        // master down).
        .log_internal_errors(false);
    // A reload may change `[log] level` (workers forked afterwards
    // inherit the new filter). The two formats are different types, hence
    // the macro.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() && !from_env {
                let _ = SET_LEVEL.set(Box::new(move |level: LogLevel| {
                    handle
                        .reload(EnvFilter::new(level.as_str()))
                        .map_err(|e| e.to_string())
                }));
            }
        }};
    }
    match format {
        LogFormat::Text => install!(builder.with_ansi(ansi)),
        LogFormat::Json => install!(builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)),
    }
    if let (Some(env), Some(e)) = (env, refused) {
        tracing::warn!(
            rust_log = %env,
            "RUST_LOG is not a valid filter ({e}): it is ignored, and [log] level = {} is used (write it like `info` or `nbnet=debug`)",
            level.as_str()
        );
    }
}

/// Sets the level `[log] level` names (a reload changed it). `Err` says why
/// it cannot be changed: `RUST_LOG` overrides `[log] level`.
pub fn set_level(level: LogLevel) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(set) => set(level),
        None => Err("RUST_LOG is set, and it overrides [log] level".to_string()),
    }
}

/// The `[log] file`, once [`to_file`] opened it.
static FILE: OnceLock<PathBuf> = OnceLock::new();
/// The original stderr while the master starts (-1 otherwise).
static STARTUP_STDERR: AtomicI32 = AtomicI32::new(-1);

/// Sends every later write to descriptor 2 (the host's log lines, and what
/// plugins write to stderr) to `path`, appended, created if missing (mode
/// 0640). Until [`started`], lines also go to the original stderr.
pub fn to_file(path: &Path) -> Result<(), String> {
    // SAFETY: dup of descriptor 2 (valid or not: then -1 and no tee).
    let original = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    put_on_stderr(path)?;
    STARTUP_STDERR.store(original, Ordering::Relaxed);
    let _ = FILE.set(path.to_path_buf());
    Ok(())
}

/// The master is up: lines no longer go to the original stderr as well
/// (and workers, forked after this, never hold it).
pub fn started() {
    let fd = STARTUP_STDERR.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: our own duplicate, closed once.
        unsafe { libc::close(fd) };
    }
}

/// Opens the `[log] file` again (after it was renamed or removed) and puts
/// it on descriptor 2. `Ok(None)` when not logging to a file.
pub fn reopen() -> Result<Option<&'static Path>, String> {
    match FILE.get() {
        None => Ok(None),
        Some(path) => put_on_stderr(path).map(|()| Some(path.as_path())),
    }
}

/// A worker's SIGUSR1 (passed on by the master): [`reopen`], and say so.
pub fn reopen_in_worker() {
    match reopen() {
        Ok(None) => tracing::debug!("SIGUSR1 received: no log file to reopen"),
        Ok(Some(path)) => tracing::info!("SIGUSR1 received: reopened {}", shown(path)),
        Err(message) => {
            tracing::error!("SIGUSR1 received: {message}; logging on to the file open before")
        }
    }
}

fn put_on_stderr(path: &Path) -> Result<(), String> {
    let file = open_log_file(path)?;
    // SAFETY: both descriptors are open; dup2 atomically replaces 2 (a
    // concurrent writer sees the old file or the new one). The copy on 2 is
    // not close-on-exec, like any stderr.
    if unsafe { libc::dup2(file.as_raw_fd(), 2) } == -1 {
        return Err(format!(
            "cannot put the [log] file {} on stderr: {}",
            shown(path),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Opens the `[log] file` for appending (created if missing, mode 0640),
/// refusing anything but a regular file or a character device such as
/// `/dev/null`. The open never blocks: it is non-blocking (a FIFO with no
/// reader fails at once instead of hanging the master, at start or on
/// SIGUSR1), and the descriptor is made blocking again only once it is
/// known to be a file or a device.
fn open_log_file(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |why: String| format!("cannot open the [log] file {}: {why}", shown(path));
    // What is there already, for a clear message (a FIFO without a reader
    // or a socket only gives ENXIO below).
    if let Ok(meta) = std::fs::metadata(path) {
        if let Some(what) = not_a_log_file(&meta.file_type()) {
            return Err(cannot(format!(
                "it is {what}; [log] file must name a regular file (or a device such as /dev/null)"
            )));
        }
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            let folder = path.parent().filter(|folder| !folder.is_dir());
            match folder {
                Some(folder) => cannot(format!(
                    "{e} (the folder {} does not exist: create it)",
                    shown(folder)
                )),
                None => cannot(e.to_string()),
            }
        })?;
    // Checked again on what was opened: the path may have changed since.
    let kind = file
        .metadata()
        .map_err(|e| cannot(e.to_string()))?
        .file_type();
    if let Some(what) = not_a_log_file(&kind) {
        return Err(cannot(format!(
            "it is {what}; [log] file must name a regular file (or a device such as /dev/null)"
        )));
    }
    // Blocking again (it makes no difference to a regular file; a terminal
    // would otherwise refuse writes with EAGAIN).
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags != -1 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// What a `[log] file` of this type is, when it cannot be one: anything
/// but a regular file or a character device.
fn not_a_log_file(kind: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() || kind.is_char_device() {
        None
    } else if kind.is_dir() {
        Some("a folder")
    } else if kind.is_fifo() {
        Some("a FIFO (named pipe), which would block the server while nobody reads it")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    }
}

/// A path for a log line, control characters escaped.
fn shown(path: &Path) -> String {
    untrusted(&path.to_string_lossy())
}

/// Log lines that could not be written, by the master and all its workers.
pub fn dropped_lines() -> u64 {
    shared_counter().load(Ordering::Relaxed)
}

/// The dropped-lines counter: in a shared anonymous mapping made before the
/// master forks, so every worker adds to the same one (a process-local one
/// if the mapping fails).
fn shared_counter() -> &'static AtomicU64 {
    static LOCAL: AtomicU64 = AtomicU64::new(0);
    static SHARED: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a fresh shared anonymous mapping of one page, zero-filled
        // (a valid AtomicU64 of 0), never unmapped.
        let mapped = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(4096).expect("not zero"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
            )
        };
        if let Ok(mapped) = mapped {
            SHARED.store(mapped.as_ptr().cast(), Ordering::Release);
        }
    });
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() {
        &LOCAL
    } else {
        // SAFETY: the mapping lives as long as the process.
        unsafe { &*shared }
    }
}

/// Lines this process dropped since it last got one through, and the
/// process they were counted in (a worker inherits the master's count at
/// fork, which is not its to report), and the last error.
static UNREPORTED: AtomicU64 = AtomicU64::new(0);
static UNREPORTED_PID: AtomicI32 = AtomicI32::new(0);
static LAST_ERROR: AtomicI32 = AtomicI32::new(0);

/// The writer of every log line: one `write_all` per line.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, line: &[u8]) -> std::io::Result<()> {
        let original = STARTUP_STDERR.load(Ordering::Relaxed);
        if original >= 0 {
            let _ = write_fd(original, line);
        }
        match write_fd(2, line) {
            Ok(()) => {
                if UNREPORTED.load(Ordering::Relaxed) > 0 {
                    report_dropped();
                }
            }
            Err(e) => {
                shared_counter().fetch_add(1, Ordering::Relaxed);
                let me = std::process::id() as i32;
                if UNREPORTED_PID.swap(me, Ordering::Relaxed) != me {
                    UNREPORTED.store(0, Ordering::Relaxed);
                }
                UNREPORTED.fetch_add(1, Ordering::Relaxed);
                LAST_ERROR.store(e.raw_os_error().unwrap_or(0), Ordering::Relaxed);
            }
        }
        // Never an error: tracing must not react to a lost log stream.
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// After lines were dropped, the first line that got through is followed by
/// one saying how many were lost and why.
fn report_dropped() {
    let count = UNREPORTED.swap(0, Ordering::Relaxed);
    if count == 0 || UNREPORTED_PID.load(Ordering::Relaxed) != std::process::id() as i32 {
        return;
    }
    let error = std::io::Error::from_raw_os_error(LAST_ERROR.load(Ordering::Relaxed));
    let note = format!(
        "{}  WARN {count} log line(s) of process {} could not be written ({error}) and were dropped; the server kept running (nbnet_log_lines_dropped_total counts them)\n",
        humantime::format_rfc3339_micros(std::time::SystemTime::now()),
        std::process::id()
    );
    if write_fd(2, note.as_bytes()).is_err() {
        UNREPORTED.fetch_add(count, Ordering::Relaxed);
    }
}

/// Most bytes written after one look at the descriptor: a pipe said
/// writable has room for at least this much, so the write cannot block.
const WRITE_CHUNK: usize = 4096;

/// Writes all of `bytes` to `fd`, retrying on EINTR and short writes, and
/// never waiting: a stderr that is a pipe or a terminal whose reader has
/// stopped reading (a log shipper that hangs, a terminal after Ctrl-S, a
/// `| less` nobody scrolls) would otherwise block the process in `write`
/// as soon as the pipe is full: with clients able to make every worker log
/// (a bad header is a warning), that froze every worker. The descriptor's
/// own flags are left alone (it is shared with the shell and other
/// programs): it is polled before each chunk of at most [`WRITE_CHUNK`]
/// bytes, and what it cannot take now is an error (dropped and counted).
fn write_fd(fd: RawFd, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let mut look = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for 0 ms; a bad descriptor shows
        // in `revents` (POLLNVAL) and the write below reports it.
        let ready = unsafe { libc::poll(&mut look, 1, 0) };
        if ready == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let chunk = bytes.len().min(WRITE_CHUNK);
        // SAFETY: writes from a valid slice; a bad descriptor is an error.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), chunk) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Longest text from a plugin or a client that goes into one log line; the
/// rest is counted, not logged.
pub const MAX_UNTRUSTED_CHARS: usize = 1024;

/// Makes text that a plugin or a client supplied safe to put in a log line:
/// control characters (newlines included, so nobody can forge a log line)
/// are escaped as `\n`, `\u{1b}`…, and anything past
/// [`MAX_UNTRUSTED_CHARS`] is cut with a note of how much was left out.
pub fn untrusted(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_UNTRUSTED_CHARS + 32));
    for (count, (at, c)) in text.char_indices().enumerate() {
        if count == MAX_UNTRUSTED_CHARS {
            out.push_str(&format!("… ({} more bytes)", text.len() - at));
            break;
        }
        // Control characters, and the separators and direction overrides
        // some viewers render as line breaks or use to reorder text.
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_stays_on_one_line_and_is_bounded() {
        assert_eq!(untrusted("plain words"), "plain words");
        assert_eq!(
            untrusted("a\nERROR master: forged\r\u{1b}[31m"),
            "a\\nERROR master: forged\\r\\u{1b}[31m"
        );
        assert_eq!(untrusted("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
        let long = "x".repeat(1 << 20);
        let shown = untrusted(&long);
        assert!(shown.len() < MAX_UNTRUSTED_CHARS + 40, "{}", shown.len());
        assert!(shown.ends_with(&format!("({} more bytes)", (1 << 20) - MAX_UNTRUSTED_CHARS)));
    }
}
