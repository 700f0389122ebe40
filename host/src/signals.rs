//! Signals as readable events in the process's `mio::Poll`.
//!
//! The master ([`Signals::block`]) blocks them and reads them from a
//! `signalfd`: nothing runs in signal-handler context (gunicorn's "handlers
//! only record; one loop dispatches", without even the handler). The mask
//! is inherited over fork.
//!
//! A worker runs plugin code, and whatever plugins start inherits the
//! worker's signal mask — through `fork`, but also through `posix_spawn`,
//! `system` and `popen`, which skip `pthread_atfork` handlers and keep the
//! mask across `exec`. A blocked SIGTERM there means a helper process that
//! SIGTERM does not stop. So a worker ([`Signals::catch`]) blocks nothing:
//! it catches the signals it acts on with a handler that writes their
//! number to a pipe (the self-pipe trick; the loop reads the pipe), and the
//! others the master takes (SIGHUP, SIGTTIN, …) plus SIGPIPE with a handler
//! that does nothing, so that they cannot kill the worker. `exec` resets
//! caught signals to their default action (unlike ignored ones), so every
//! process a plugin starts begins with nothing blocked and nothing
//! ignored; a child forked without `exec` is reset by the `pthread_atfork`
//! handler (see [`crate::fork_guard`] and [`caught`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// A set of signals, delivered through a non-blocking `signalfd` (the
/// master) or a self-pipe (a worker).
pub struct Signals {
    source: Source,
}

enum Source {
    Fd(SignalFd),
    /// The read end; the write end is the handler's (kept open for the
    /// process's life).
    Pipe(OwnedFd, #[allow(dead_code)] OwnedFd),
}

/// Signals a worker does not act on but must survive (the master's other
/// signals, which an operator may send a worker by mistake, and SIGPIPE,
/// ignored by the Rust runtime): caught by a handler that does nothing.
const QUIET: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGPIPE,
];

/// Signals nbnet has no use for whose default action ends the process, and
/// which a server receives without anyone meaning it to stop: timers
/// (SIGALRM, SIGVTALRM, SIGPROF), resource limits (SIGXCPU, SIGXFSZ — the
/// kernel sends it when a log file reaches `ulimit -f`), UPS tools
/// (SIGPWR), SIGIO, SIGSTKFLT. The master logs and ignores them; a worker
/// ignores them (a plugin may install its own handler, e.g. for `alarm`).
pub const STRAY: [Signal; 8] = [
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
    Signal::SIGPWR,
    Signal::SIGIO,
    Signal::SIGSTKFLT,
];

/// The self-pipe's write end, and the process it belongs to (a child
/// forked by a plugin still has the handler until the atfork handler
/// resets it, and must not write into the worker's pipe).
static PIPE: AtomicI32 = AtomicI32::new(-1);
static OWNER: AtomicI32 = AtomicI32::new(0);
/// Bit `n - 1` set: signal `n` has one of our handlers.
static CAUGHT: AtomicU64 = AtomicU64::new(0);

/// The signals this process catches with a handler (bit `n - 1` for signal
/// `n`), for the `pthread_atfork` child handler to reset.
pub fn caught() -> u64 {
    CAUGHT.load(Ordering::Relaxed)
}

/// The handler of caught signals: their number into the pipe.
extern "C" fn on_signal(signal: libc::c_int) {
    // SAFETY: getpid, write and errno access are async-signal-safe; a
    // full pipe (signals coalesce anyway) or a closed one changes nothing.
    unsafe {
        let errno = *libc::__errno_location();
        if libc::getpid() == OWNER.load(Ordering::Relaxed) {
            let byte = signal as u8;
            libc::write(PIPE.load(Ordering::Relaxed), (&byte as *const u8).cast(), 1);
        }
        *libc::__errno_location() = errno;
    }
}

/// The handler of [`QUIET`] signals.
extern "C" fn on_quiet(_signal: libc::c_int) {}

/// Installs `handler` for `signal` (restarting interrupted system calls).
fn install(signal: Signal, handler: extern "C" fn(libc::c_int)) -> nix::Result<()> {
    // SAFETY: a zeroed sigaction with an async-signal-safe handler.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal as libc::c_int, &action, std::ptr::null_mut())
    };
    nix::errno::Errno::result(rc).map(drop)?;
    CAUGHT.fetch_or(1 << (signal as u32 - 1), Ordering::Relaxed);
    Ok(())
}

impl Signals {
    /// Blocks `signals` for this (single-threaded) process and opens a
    /// `signalfd` that reports them.
    pub fn block(signals: &[Signal]) -> nix::Result<Signals> {
        let mut mask = SigSet::empty();
        for &signal in signals {
            mask.add(signal);
        }
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals {
            source: Source::Fd(fd),
        })
    }

    /// For a worker (single-threaded when called, before plugins load):
    /// catches `signals` (reported by [`Signals::pending`]) and the
    /// [`QUIET`] ones (dropped), then unblocks every signal, so that plugin
    /// code and the processes it starts run with an empty mask. Signals
    /// blocked until now (inherited from the master) and pending are
    /// delivered at that moment, so none is lost. Both pipe ends are marked
    /// for [`crate::fork_guard`] (call its `install` first).
    pub fn catch(signals: &[Signal]) -> nix::Result<Signals> {
        use nix::fcntl::OFlag;
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        crate::fork_guard::protect(read.as_raw_fd());
        crate::fork_guard::protect(write.as_raw_fd());
        PIPE.store(write.as_raw_fd(), Ordering::Relaxed);
        OWNER.store(nix::unistd::getpid().as_raw(), Ordering::Relaxed);
        for &signal in signals {
            install(signal, on_signal)?;
        }
        for signal in QUIET.into_iter().chain(STRAY) {
            if !signals.contains(&signal) {
                install(signal, on_quiet)?;
            }
        }
        SigSet::empty().thread_set_mask()?;
        Ok(Signals {
            source: Source::Pipe(read, write),
        })
    }

    /// The descriptor to wait on.
    fn readable(&self) -> i32 {
        match &self.source {
            Source::Fd(fd) => fd.as_raw_fd(),
            Source::Pipe(read, _) => read.as_raw_fd(),
        }
    }

    /// Registers the `signalfd` (or pipe) for READABLE under `token`.
    pub fn register(&self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(&mut SourceFd(&self.readable()), token, Interest::READABLE)
    }

    /// The raw descriptor (a forked child closes its inherited copy).
    pub fn raw_fd(&self) -> i32 {
        self.readable()
    }

    /// Every signal received since the last call, with the PID of the
    /// process that sent it (0 when the kernel did, or unknown), in arrival
    /// order. Only the master's `signalfd` knows senders.
    pub fn pending_with_senders(&mut self) -> Vec<(Signal, i32)> {
        match &mut self.source {
            Source::Fd(fd) => {
                let mut received = Vec::new();
                while let Ok(Some(info)) = fd.read_signal() {
                    if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                        received.push((signal, info.ssi_pid as i32));
                    }
                }
                received
            }
            Source::Pipe(..) => self.pending().into_iter().map(|s| (s, 0)).collect(),
        }
    }

    /// Every signal received since the last call, in arrival order (a
    /// signal received several times since then, once).
    pub fn pending(&mut self) -> Vec<Signal> {
        let mut received = Vec::new();
        match &mut self.source {
            Source::Fd(fd) => {
                while let Ok(Some(info)) = fd.read_signal() {
                    if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                        received.push(signal);
                    }
                }
            }
            Source::Pipe(read, _) => {
                let mut bytes = [0u8; 64];
                while let Ok(n @ 1..) = nix::unistd::read(&*read, &mut bytes) {
                    for &byte in &bytes[..n] {
                        if let Ok(signal) = Signal::try_from(i32::from(byte)) {
                            if !received.contains(&signal) {
                                received.push(signal);
                            }
                        }
                    }
                }
            }
        }
        received
    }
}

/// The process that runs plugin code, as a fault report names it.
#[derive(Debug, Clone, Copy)]
pub enum Faulting {
    /// Worker N.
    Worker(usize),
    /// The `--check` child (and the check before a start or reload).
    Check,
    /// `nbnet plugin run`.
    PluginRun,
}

/// Makes a crash in plugin code end the process that runs it, by that
/// signal, and a stack overflow say which process it was.
///
/// Rust's own handler has two faults for a plugin host. It reports "thread
/// 'main' (PID) has overflowed its stack" with the PID it cached in the
/// process it started in — in a forked worker, the *master's*. And for a
/// SIGSEGV/SIGBUS that was *sent* (`raise`, `kill`: some runtimes crash
/// that way) it restores the default action and returns, so the process
/// goes on as if nothing happened: `--check` then passed a plugin whose
/// init crashes, and the start failed. This handler, installed after fork
/// in every process that runs plugin code (workers, the checker, `plugin
/// run`), replaces it: for a fault just below the main thread's stack it
/// writes one line naming the process and its real PID; for any fault it
/// then restores the default action and returns, so the faulting
/// instruction runs again and the process dies by the signal itself (the
/// master then logs the signal and the plugin that was running); a sent
/// signal is raised again, with the same end.
pub fn catch_plugin_faults(who: Faulting) {
    use std::sync::atomic::Ordering;
    let code = match who {
        Faulting::Worker(index) => index,
        Faulting::Check => CHECK,
        Faulting::PluginRun => PLUGIN_RUN,
    };
    STACK_WORKER.store(code, Ordering::Relaxed);
    // The main thread's stack: [low, low + size). Reading it may allocate
    // (glibc parses /proc/self/maps), so it is done now, not in the handler.
    // SAFETY: plain out-parameters for the calling (main) thread; the attr
    // is destroyed after use.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) == 0 {
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            if libc::pthread_attr_getstack(&attr, &mut low, &mut size) == 0 {
                STACK_LOW.store(low as usize, Ordering::Relaxed);
            }
            libc::pthread_attr_destroy(&mut attr);
        }
    }
    // `plugin run` also names an abort and the other crash signals: it has
    // no master to say what ended it.
    let signals: &[libc::c_int] = match who {
        Faulting::PluginRun => &[
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGABRT,
            libc::SIGILL,
            libc::SIGFPE,
        ],
        _ => &[libc::SIGSEGV, libc::SIGBUS],
    };
    for &signal in signals {
        // SAFETY: installs an async-signal-safe handler (atomics, `write`,
        // `getpid`, `signal`) on the alternate stack Rust's runtime set up
        // for the main thread (inherited over fork); SA_SIGINFO gives the
        // fault address.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// The worker's index, or one of these two (see [`Faulting`]).
static STACK_WORKER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const CHECK: usize = usize::MAX;
const PLUGIN_RUN: usize = usize::MAX - 1;
static STACK_LOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The fault handler (see [`catch_plugin_faults`]).
extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    use std::sync::atomic::Ordering;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let address = unsafe { (*info).si_addr() } as usize;
    let low = STACK_LOW.load(Ordering::Relaxed);
    if STACK_WORKER.load(Ordering::Relaxed) == PLUGIN_RUN {
        let name: &[u8] = match signal {
            libc::SIGSEGV => b"SIGSEGV",
            libc::SIGBUS => b"SIGBUS",
            libc::SIGABRT => b"SIGABRT",
            libc::SIGILL => b"SIGILL",
            libc::SIGFPE => b"SIGFPE",
            _ => b"a signal",
        };
        let mut line = [0u8; 120];
        let head = b"nbnet plugin run: the plugin crashed the process (";
        let tail = b"); nothing more is answered\n";
        let mut at = 0;
        for part in [&head[..], name, &tail[..]] {
            let n = part.len().min(line.len() - at);
            line[at..at + n].copy_from_slice(&part[..n]);
            at += n;
        }
        // SAFETY: write(2) on stderr is async-signal-safe.
        unsafe { libc::write(2, line.as_ptr().cast(), at) };
    }
    // The guard region just below the stack (and a little above: a large
    // frame may fault inside it).
    if low != 0 && address < low.saturating_add(64 << 10) && address >= low.saturating_sub(1 << 20)
    {
        let mut line = [0u8; 160];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            let n = bytes.len().min(line.len() - at);
            line[at..at + n].copy_from_slice(&bytes[..n]);
            at += n;
        };
        match STACK_WORKER.load(Ordering::Relaxed) {
            CHECK => put(b"nbnet: the plugin check"),
            PLUGIN_RUN => put(b"nbnet plugin run"),
            index => {
                put(b"nbnet: worker ");
                put(decimal(index as u64).as_bytes_trimmed());
            }
        }
        put(b" (pid ");
        // SAFETY: getpid is async-signal-safe.
        put(decimal(unsafe { libc::getpid() } as u64).as_bytes_trimmed());
        put(b") overflowed its stack (deep recursion in a plugin?); it dies by this signal\n");
        // SAFETY: write(2) on stderr is async-signal-safe; a failed write
        // changes nothing.
        unsafe { libc::write(2, line.as_ptr().cast(), at) };
    }
    // SAFETY: restores the default action (async-signal-safe). For a real
    // fault, returning re-runs the faulting instruction, which now kills
    // the process; a signal sent with kill() (si_code <= 0) is raised again.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        if (*info).si_code <= 0 {
            libc::raise(signal);
        }
    }
}

/// A number in decimal without allocating (for the fault handler).
struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    fn as_bytes_trimmed(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

fn decimal(mut n: u64) -> Decimal {
    let mut digits = [b'0'; 20];
    let mut start = 20;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { digits, start }
}
