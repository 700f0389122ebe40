//! The new master's side of a binary upgrade (see the module doc): saying
//! "ready", being promoted, taking the pid file, or stopping when the old
//! master gives up on it.

use std::os::fd::{AsFd, AsRawFd};

use mio::unix::SourceFd;
use nix::unistd::{getpid, Pid};

use super::*;
use crate::handover::{self, Message};

impl Master {
    /// This master is a new one and every worker is ready: tell the old
    /// master. `false` when there is no old master to tell.
    pub(in crate::supervisor) fn tell_predecessor_ready(&mut self) -> bool {
        let Some(predecessor) = &mut self.predecessor else {
            return false;
        };
        if predecessor.state != Told::Nothing {
            return true;
        }
        match handover::send_ready(predecessor.channel.as_fd(), &version_text()) {
            Ok(()) => {
                predecessor.state = Told::Ready;
                tracing::info!(
                    "every worker is ready: told the old master (pid {}), which now hands the service over",
                    predecessor.pid
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot tell the old master (pid {}) that this one is ready: {e}; serving alone",
                    predecessor.pid
                );
                self.predecessor_gone();
                false
            }
        }
    }

    /// Reads the upgrade channel to the old master.
    pub(in crate::supervisor) fn on_predecessor_channel(&mut self) {
        loop {
            let Some(predecessor) = &self.predecessor else {
                return;
            };
            match handover::recv(predecessor.channel.as_fd()) {
                Ok(Some(Message::Promoted)) => {
                    let from = predecessor.pid;
                    if let Some(p) = &mut self.predecessor {
                        p.state = Told::Promoted;
                    }
                    tracing::info!(
                        "upgrade: the old master (pid {from}) handed the service over: this master serves; the old one's connections follow"
                    );
                    for bound in &mut self.listeners {
                        bound.take_ownership();
                    }
                    self.upgrades.status.took_over_from = from.as_raw();
                    self.upgrades.status.binary = self.binary.display().to_string();
                    self.upgrades.status.message = version_text();
                    self.take_pid_file();
                    crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
                }
                Ok(Some(Message::Connection(record, fd))) => {
                    self.relay(record, fd, Pid::from_raw(0))
                }
                Ok(Some(other)) => {
                    tracing::debug!("upgrade channel: unexpected record {other:?}: ignored")
                }
                Ok(None) => {
                    self.predecessor_gone();
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    self.predecessor_gone();
                    return;
                }
                Err(e) if handover::would_block(&e) => return,
                Err(e) => {
                    tracing::warn!("upgrade channel: {e}");
                    return;
                }
            }
        }
    }

    /// The old master has exited (or cannot be told anything).
    fn predecessor_gone(&mut self) {
        let Some(predecessor) = self.predecessor.take() else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&predecessor.channel.as_raw_fd()));
        if predecessor.state == Told::Promoted {
            tracing::info!(
                "upgrade complete: the old master (pid {}) has exited",
                predecessor.pid
            );
            return;
        }
        // Still our parent: it gave up on this upgrade (rolled it back)
        // and serves on — stop, touching none of its files.
        if nix::unistd::getppid() == predecessor.pid {
            tracing::warn!(
                "the old master (pid {}) gave up on this upgrade (it rolled it back and serves on): this master stops",
                predecessor.pid
            );
            self.begin_stop("upgrade rolled back", Stop::Graceful);
            return;
        }
        tracing::warn!(
            "the old master (pid {}) is gone before it handed the service over: this master serves alone",
            predecessor.pid
        );
        for bound in &mut self.listeners {
            bound.take_ownership();
        }
        self.take_pid_file();
        if self.up {
            crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
        }
    }

    /// Locks the pid file (the old master released it) and starts writing
    /// the status files.
    fn take_pid_file(&mut self) {
        if self.pid_file.is_some() {
            return;
        }
        let path = self.config.server.pid_file.clone();
        if let Some(path) = &path {
            match crate::pid_file::PidFile::acquire(path) {
                Ok(pid_file) => self.pid_file = Some(pid_file),
                Err(message) => tracing::error!(
                    "{message} (after an upgrade: `nbnet stop`/`reload` cannot find this master until it holds the file)"
                ),
            }
        }
        match &self.predecessor {
            Some(predecessor) => self.reloads.attach_after(path.as_deref(), predecessor.pid),
            None => self.reloads.attach(path.as_deref()),
        }
        self.upgrades.attach(path.as_deref());
    }
}
