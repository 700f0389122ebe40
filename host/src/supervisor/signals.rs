//! What the master does for each signal it handles (see
//! [`MASTER_SIGNALS`]): stop (graceful, fast, after `drain_delay`), one
//! worker more or fewer, reopen the log file. SIGHUP is in `reload.rs`,
//! SIGUSR2 in `upgrade.rs`.

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::*;

impl Master {
    /// SIGTERM or SIGQUIT: graceful stop — after `drain_delay` (serving on
    /// while `/healthz` answers 503, so load balancers stop sending), workers
    /// stop accepting, finish the frames they are in, deliver every answer,
    /// then exit; the master exits 0 when all are gone. SIGINT: fast stop —
    /// workers close every connection at once. A stop signal during
    /// `drain_delay` ends it; a second one while stopping kills the workers.
    pub(super) fn handle_stop(&mut self, signal: Signal) {
        match self.phase {
            Phase::Serving => {
                let how = if signal == Signal::SIGINT {
                    Stop::Fast
                } else {
                    Stop::Graceful
                };
                let delay = self.config.server.drain_delay;
                if how == Stop::Graceful && !delay.is_zero() && self.lame_duck.is_none() {
                    self.lame_duck = Some(config::deadline(Instant::now(), delay));
                    tracing::info!(
                        "{signal} received: /healthz answers 503 draining; serving on for drain_delay = {delay:?}, then a graceful stop (SIGTERM again: stop now; SIGINT: fast stop)"
                    );
                    return;
                }
                self.begin_stop(&format!("{signal} received"), how);
            }
            // Leaving already, after a binary upgrade: a stop signal is not
            // "again" (and the new master serves on).
            Phase::Stopping { .. } if matches!(self.successor, Some(Successor::Serving { .. })) => {
                let new = self.successor.as_ref().map_or(0, |s| s.pid().as_raw());
                if signal == Signal::SIGINT {
                    tracing::info!(
                        "SIGINT received while handing connections over to the new master (pid {new}): closing the rest now"
                    );
                    self.signal_workers(Signal::SIGINT);
                } else {
                    tracing::info!(
                        "{signal} received: this master is leaving already, handing its connections over to the new master (pid {new}), which serves on; SIGINT closes the rest now, `nbnet stop` stops the server"
                    );
                }
            }
            Phase::Stopping { code, .. } => {
                tracing::warn!("{signal} received again: killing the remaining workers");
                self.phase = Phase::Stopping {
                    code,
                    deadline: Instant::now(),
                };
            }
        }
    }

    /// `pid`, when it is one of this master's workers (or something one of
    /// them started: its process group), described for a log line.
    pub(super) fn sender_is_ours(&self, pid: i32) -> Option<String> {
        if pid <= 0 {
            return None;
        }
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok();
        self.workers.iter().find_map(|(worker_pid, w)| {
            if worker_pid.as_raw() == pid {
                Some(format!("worker {} (pid {pid}) itself", w.index))
            } else if pgid == Some(*worker_pid) {
                Some(format!("pid {pid}, a process worker {} started", w.index))
            } else {
                None
            }
        })
    }

    /// Logs why, then [`Master::halt`]s with exit code 0.
    pub(super) fn begin_stop(&mut self, why: &str, how: Stop) {
        tracing::info!(
            "{why}: {} stop of {} worker(s)",
            if how == Stop::Fast {
                "fast"
            } else {
                "graceful"
            },
            self.workers.len()
        );
        self.halt(exit_code::OK, how);
    }

    /// SIGUSR1 (logrotate's `postrotate`): reopen the `[log] file` and have
    /// every worker reopen it too; harmless when logging to stderr.
    pub(super) fn handle_usr1(&self) {
        match crate::logging::reopen() {
            Ok(None) => tracing::info!(
                "SIGUSR1 received: logs go to stderr, there is no log file to reopen; ignored"
            ),
            Ok(Some(path)) => {
                tracing::info!(
                    "SIGUSR1 received: reopened the log file {}; the workers reopen it too",
                    path.display()
                );
                self.signal_workers(Signal::SIGUSR1);
            }
            Err(message) => {
                tracing::error!("SIGUSR1 received: {message}; logging on to the file open before")
            }
        }
    }

    /// SIGTTIN: one worker more.
    pub(super) fn handle_ttin(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        if self.slots.len() >= self.worker_room {
            tracing::warn!(
                "SIGTTIN received: keeping {} worker(s), the most this master's scoreboard was sized for at startup (twice the workers it started with, at least 8); restart nbnet with more [server] workers for more",
                self.slots.len()
            );
            return;
        }
        if self.free_boards.len() <= self.reserved_boards() {
            tracing::warn!(
                "SIGTTIN received: keeping {} worker(s): old workers still draining hold the scoreboard's spare entries; try again once they have finished",
                self.slots.len()
            );
            return;
        }
        self.slots.push(Slot::empty(Instant::now()));
        tracing::info!("SIGTTIN received: {} worker(s) now", self.slots.len());
    }

    /// SIGTTOU: one worker fewer (never below one); the removed worker drains.
    pub(super) fn handle_ttou(&mut self) {
        if self.phase != Phase::Serving || self.slots.len() <= 1 {
            tracing::info!("SIGTTOU received: keeping at least one worker");
            return;
        }
        if let Some(slot) = self.slots.pop() {
            if let Some(pid) = slot.pid {
                self.drain(pid);
            }
        }
        self.truncate_reuseport_sockets();
        tracing::info!("SIGTTOU received: {} worker(s) now", self.slots.len());
    }

    /// Begins stopping every worker; exit with `code` when all are gone.
    /// Workers still running after their own deadline plus [`STOP_GRACE`]
    /// are killed.
    pub(super) fn halt(&mut self, code: i32, how: Stop) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        crate::systemd::notify("STOPPING=1");
        self.lame_duck = None;
        let (signal, allowed) = match how {
            Stop::Graceful => (
                Signal::SIGTERM,
                self.config
                    .server
                    .shutdown_timeout
                    .saturating_add(STOP_GRACE),
            ),
            Stop::Fast => (Signal::SIGINT, STOP_GRACE),
        };
        self.phase = Phase::Stopping {
            code,
            deadline: config::deadline(Instant::now(), allowed),
        };
        // Close the master's copies of the listening sockets; the workers
        // close theirs as they start draining, so the ports stop listening.
        for bound in std::mem::take(&mut self.listeners) {
            bound.close();
        }
        self.cancel_reloads("the server is stopping");
        // A new master still starting goes too (one that took over is on
        // its own: this master only hands its connections over).
        if let Some(Successor::Starting { pid, .. }) = &self.successor {
            tracing::info!("stopping the new master of the upgrade under way (pid {pid}) too");
            let _ = nix::sys::signal::kill(*pid, signal);
        }
        self.signal_workers(signal);
    }
}
