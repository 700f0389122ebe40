//! Keeps the host's descriptors out of processes that plugins fork.
//!
//! A plugin may `fork()` (a helper daemon started in init, a `popen` in a
//! call). Close-on-exec only helps if the child then `exec`s: a child that
//! does not — or that lives on between fork and exec — would inherit the
//! worker's listening sockets, client connections, signalfd and the
//! plugin images, and could keep a port listening after `nbnet stop`, or
//! keep a client's connection open after the worker closed it.
//!
//! So the worker (and the `--check` child) registers a `pthread_atfork`
//! child handler that closes every descriptor marked here.
//!
//! The same handler gives the child the signal state of an ordinary
//! process: the worker catches SIGTERM and others with handlers that write
//! into its self-pipe (see [`crate::signals`]), the Rust runtime ignores
//! SIGPIPE, and the worker catches SIGSEGV/SIGBUS; a forked child keeps
//! all of that until it `exec`s (and an ignored signal even after). The
//! handler restores the default action of each of those signals and
//! unblocks every signal. glibc runs it in
//! the child of every `fork()` made through libc (including `popen` and
//! `system` where they fork); `posix_spawn` and `vfork` children skip it,
//! but they `exec` at once and close-on-exec (set on all of the host's
//! descriptors) covers them. A raw `clone` syscall bypasses both: that is
//! documented in docs/plugins.md.
//!
//! The marks are a bitmap indexed by descriptor number, in an anonymous
//! mapping sized to the process's descriptor limit (pages are only touched
//! for the numbers used). Only the worker's thread writes it; the handler
//! only reads it, with plain atomic loads, and calls `close`: both are
//! async-signal-safe, as a handler run after `fork` must be.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// The bitmap (null until [`install`]) and its length in words.
static BITS: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static WORDS: AtomicUsize = AtomicUsize::new(0);
/// The most descriptors the bitmap covers (64 KiB of address space).
const MAX_FDS: u64 = 1 << 19;

/// Sets up the bitmap and registers the fork handler (once per process).
/// Marks made before it are lost, so call it before marking.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(MAX_FDS, |(soft, _)| soft)
            .clamp(1024, MAX_FDS);
        let words = limit.div_ceil(64) as usize;
        let Some(bytes) = std::num::NonZeroUsize::new(words * 8) else {
            return;
        };
        // SAFETY: a fresh private anonymous mapping, zero-filled (every
        // word a valid `AtomicU64` of 0), never unmapped.
        let mapped = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                bytes,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
            )
        };
        let Ok(mapped) = mapped else {
            tracing::warn!("cannot map the descriptor table for forks by plugins: processes plugins fork may inherit the worker's sockets");
            return;
        };
        WORDS.store(words, Ordering::Relaxed);
        BITS.store(mapped.as_ptr().cast(), Ordering::Release);
        // SAFETY: `in_child` is async-signal-safe (atomic loads, `close`,
        // `signal`, `pthread_sigmask`), as a handler that runs in a forked
        // child must be.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!("pthread_atfork failed ({rc}): processes plugins fork may inherit the worker's sockets");
        }
    });
}

/// The word and bit of `fd`, if the bitmap covers it.
fn locate(fd: RawFd) -> Option<(&'static AtomicU64, u64)> {
    let bits = BITS.load(Ordering::Acquire);
    let index = usize::try_from(fd).ok()?;
    if bits.is_null() || index / 64 >= WORDS.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: in bounds of the mapping, which is never unmapped.
    Some((unsafe { &*bits.add(index / 64) }, 1 << (index % 64)))
}

/// Marks `fd` as the host's: closed in every child a plugin forks.
pub fn protect(fd: RawFd) {
    if let Some((word, bit)) = locate(fd) {
        // One writer (the worker's thread): a load and a store.
        word.store(word.load(Ordering::Relaxed) | bit, Ordering::Relaxed);
    }
}

/// Unmarks `fd` (call before closing it: the number may be reused for a
/// plugin's own descriptor).
pub fn release(fd: RawFd) {
    if let Some((word, bit)) = locate(fd) {
        word.store(word.load(Ordering::Relaxed) & !bit, Ordering::Relaxed);
    }
}

/// What a descriptor was before plugin code ran: its number and the
/// (device, inode) it refers to.
type Identity = (RawFd, u64, u64);

/// The host's descriptors (every marked one, and the standard 0, 1, 2) as
/// they were at one moment: a plugin's init that closes one of them, or
/// replaces it (`dup2` over it), is found by comparing.
#[derive(Debug)]
pub struct Snapshot(Vec<Identity>);

/// How a plugin changed one of the host's descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tampered {
    /// It closed it.
    Closed(RawFd),
    /// It put another file on its number (`dup2`).
    Replaced(RawFd),
}

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, fd) = match self {
            Tampered::Closed(fd) => ("closed", fd),
            Tampered::Replaced(fd) => ("replaced (dup2 over it)", fd),
        };
        let name = match fd {
            0 => " (stdin)",
            1 => " (stdout)",
            2 => " (stderr)",
            _ => "",
        };
        write!(f, "{what} file descriptor {fd}{name}")
    }
}

fn identity(fd: RawFd) -> Option<Identity> {
    // SAFETY: fstat on a descriptor number only reads its metadata; an
    // invalid number gives an error.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::sys::stat::fstat(borrowed)
        .ok()
        .map(|st| (fd, st.st_dev, st.st_ino))
}

/// Takes a [`Snapshot`] of the host's descriptors now.
pub fn snapshot() -> Snapshot {
    Snapshot(
        (0..3)
            .chain(marked().filter(|&fd| fd > 2))
            .filter_map(identity)
            .collect(),
    )
}

impl Snapshot {
    /// The first of the host's descriptors a plugin closed or replaced
    /// since the snapshot, if any.
    pub fn first_tampered(&self) -> Option<Tampered> {
        self.0
            .iter()
            .find_map(|&(fd, dev, ino)| match identity(fd) {
                None => Some(Tampered::Closed(fd)),
                Some((_, d, i)) if (d, i) != (dev, ino) => Some(Tampered::Replaced(fd)),
                Some(_) => None,
            })
    }
}

/// A connection accepted (or handed over) onto descriptor 0, 1 or 2 —
/// which happens only when a plugin closed one of them — is moved above 2,
/// and `/dev/null` is put back in its place: otherwise the worker's log
/// lines (descriptor 2) would be written into a client's connection.
/// Returns the descriptor to use instead, if it moved (the caller wraps
/// it and lets go of the old one without closing it).
pub fn keep_off_stdio(fd: RawFd) -> Option<RawFd> {
    if !(0..=2).contains(&fd) {
        return None;
    }
    // SAFETY: plain descriptor operations on numbers this process owns:
    // dup above 2 (close-on-exec), then /dev/null onto the low number
    // (dup2 closes the socket's low copy; the duplicate keeps the socket).
    unsafe {
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        if high < 0 {
            return None;
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, fd);
            if null != fd {
                libc::close(null);
            }
            // The standard descriptors are inherited on exec.
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
        Some(high)
    }
}

/// [`keep_off_stdio`] for a client connection: the same stream on a
/// descriptor above 2. Says so once per worker (a plugin closed the
/// worker's standard descriptors).
pub fn stream_off_stdio(stream: crate::listener::Stream) -> crate::listener::Stream {
    use crate::listener::Stream;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Some(high) = keep_off_stdio(stream.as_raw_fd()) else {
        return stream;
    };
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a plugin closed one of the worker's standard descriptors (0, 1, 2): a client connection landed on it; moved it, and put /dev/null back (output written there by then is lost)"
        );
    }
    // SAFETY: `high` is the fresh duplicate made above, owned by nobody
    // else; the old number now holds /dev/null and must not be closed as
    // the stream's, so the old stream is forgotten.
    let fd = unsafe { OwnedFd::from_raw_fd(high) };
    let moved = match &stream {
        Stream::Tcp(_) => Stream::Tcp(mio::net::TcpStream::from_std(fd.into())),
        Stream::Unix(_) => Stream::Unix(mio::net::UnixStream::from_std(fd.into())),
        // TLS wraps the socket after this step: never seen here.
        Stream::Tls(_) => return stream,
    };
    std::mem::forget(stream);
    moved
}

/// Every marked descriptor, in order.
fn marked() -> impl Iterator<Item = RawFd> {
    let bits = BITS.load(Ordering::Acquire);
    let words = if bits.is_null() {
        0
    } else {
        WORDS.load(Ordering::Relaxed)
    };
    (0..words).flat_map(move |w| {
        // SAFETY: `w < words`, within the mapping.
        let mut word = unsafe { (*bits.add(w)).load(Ordering::Relaxed) };
        std::iter::from_fn(move || {
            if word == 0 {
                return None;
            }
            let bit = word.trailing_zeros();
            word &= word - 1;
            Some((w * 64 + bit as usize) as RawFd)
        })
    })
}

/// The fork handler: in the new child, closes every marked descriptor and
/// restores a plain signal state.
extern "C" fn in_child() {
    close_marked();
    default_signal_state();
}

/// Signals whose action the host changes: SIGPIPE (ignored by the Rust
/// runtime), SIGSEGV and SIGBUS (caught: see `signals::catch_plugin_faults`).
const CHANGED_ACTIONS: [libc::c_int; 3] = [libc::SIGPIPE, libc::SIGSEGV, libc::SIGBUS];

/// Default actions for [`CHANGED_ACTIONS`] and every signal the worker
/// catches, then nothing blocked. Only async-signal-safe calls.
fn default_signal_state() {
    for signal in CHANGED_ACTIONS {
        // SAFETY: `signal` is async-signal-safe; SIG_DFL is always valid.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    let mut caught = crate::signals::caught();
    while caught != 0 {
        let signal = caught.trailing_zeros() as libc::c_int + 1;
        caught &= caught - 1;
        // SAFETY: as above.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    // SAFETY: an emptied local set; pthread_sigmask is async-signal-safe.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// Closes every marked descriptor (in a new child).
fn close_marked() {
    let bits = BITS.load(Ordering::Acquire);
    if bits.is_null() {
        return;
    }
    for w in 0..WORDS.load(Ordering::Relaxed) {
        // SAFETY: `w < WORDS`, within the mapping (copied into the child).
        let mut word = unsafe { (*bits.add(w)).load(Ordering::Relaxed) };
        while word != 0 {
            let bit = word.trailing_zeros() as usize;
            word &= word - 1;
            // SAFETY: closing a descriptor in this fresh child only; the
            // parent's stays open.
            unsafe { libc::close((w * 64 + bit) as RawFd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_set_cleared_and_listed_in_order() {
        install();
        // Numbers no test has open: other tests of this process may fork.
        protect(1010);
        protect(1000);
        protect(1020);
        release(1010);
        let listed: Vec<RawFd> = marked().collect();
        assert_eq!(listed, [1000, 1020]);
        release(1000);
        release(1020);
        protect(-1); // ignored, not a panic
        assert_eq!(marked().count(), 0);
    }
}
