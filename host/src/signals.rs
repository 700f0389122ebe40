//! Signals as readable events: block them, read them from a `signalfd`
//! registered in the process's `mio::Poll`.
//!
//! Nothing runs in signal-handler context, so nothing needs to be
//! async-signal-safe: the master and each worker see signals as ordinary
//! events in their one loop, between other work (gunicorn's "handlers only
//! record; one loop dispatches", without even the handler). The mask is
//! inherited over fork; each worker makes its own `signalfd`.

use std::os::fd::AsRawFd;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// A set of blocked signals, delivered through a non-blocking `signalfd`.
pub struct Signals {
    fd: SignalFd,
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
        Ok(Signals { fd })
    }

    /// Registers the `signalfd` for READABLE under `token`.
    pub fn register(&self, registry: &Registry, token: Token) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.fd.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// The raw descriptor (a forked child closes its inherited copy).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Every signal received since the last call, in arrival order.
    pub fn pending(&mut self) -> Vec<Signal> {
        let mut received = Vec::new();
        while let Ok(Some(info)) = self.fd.read_signal() {
            if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                received.push(signal);
            }
        }
        received
    }
}

/// Makes a stack overflow in a worker say which worker it was.
///
/// Rust's own handler reports "thread 'main' (PID) has overflowed its
/// stack" with the PID it cached in the process it started in — in a forked
/// worker, the *master's*. This handler, installed in each worker after
/// fork, replaces it: for a fault just below the main thread's stack it
/// writes one line naming the worker and its real PID; for any fault it
/// then restores the default action and returns, so the faulting
/// instruction runs again and the worker dies by the signal itself (the
/// master then logs the signal and the plugin that was running).
pub fn report_stack_overflow(worker_index: usize) {
    use std::sync::atomic::Ordering;
    STACK_WORKER.store(worker_index, Ordering::Relaxed);
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
    for signal in [libc::SIGSEGV, libc::SIGBUS] {
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

static STACK_WORKER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static STACK_LOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The fault handler (see [`report_stack_overflow`]).
extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    use std::sync::atomic::Ordering;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let address = unsafe { (*info).si_addr() } as usize;
    let low = STACK_LOW.load(Ordering::Relaxed);
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
        put(b"nbnet: worker ");
        put(decimal(STACK_WORKER.load(Ordering::Relaxed) as u64).as_bytes_trimmed());
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
