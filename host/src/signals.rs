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
