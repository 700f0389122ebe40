//! Reaping: what the master does when a worker (or anything else it is
//! the parent of) exits — log why, name the plugin, sweep what the worker's
//! plugins left behind, restart, give up, or roll a reload back.

use std::time::Instant;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::*;

/// Kills what is left of the process group of `leader` (a worker or the
/// plugin checker, each of which leads its own group), once the leader is
/// gone: processes its plugins started and left running. Groups outlive
/// their leader, and the kernel does not reuse a PID while its group has
/// members, so the number still means this group.
pub(crate) fn sweep_group(leader: Pid) {
    if kill(Pid::from_raw(-leader.as_raw()), Signal::SIGKILL).is_ok() {
        tracing::warn!(
            "killed processes left behind by plugins of process {leader} (its process group); a plugin must stop what it starts in its destroy hook"
        );
    }
}

/// At the end of a stop: kills every child the master still has except
/// `keep` (children it had before it started serving, e.g. a log shipper
/// started by the shell that `exec`ed nbnet) — orphans that a plugin's
/// process left behind and that escaped their worker's process group
/// (`setsid`), adopted by the master as subreaper — and reaps them, so
/// that `nbnet stop` leaves no process of the server behind.
pub(super) fn sweep_orphans(keep: &[Pid]) {
    let killed = crate::orphans::sweep(keep);
    if killed > 0 {
        tracing::warn!("killed {killed} process(es) that plugins started and left running");
    }
}

/// Why the master itself killed `worker`, when it did and SIGKILL is what
/// ended it: a bare SIGKILL reads as the OOM killer's or an operator's,
/// while the master's own line about the kill said otherwise.
fn killed_by_master(worker: &Worker, exit: Exit) -> Option<String> {
    if exit != Exit::Signal(Signal::SIGKILL) {
        return None;
    }
    if let Some((plugin, elapsed)) = worker.hung {
        return Some(format!(
            "killed by the watchdog: plugin {:?} did not return for {elapsed:.1?}",
            worker.plugins.get(plugin).map_or("?", String::as_str)
        ));
    }
    if worker.drain_killed {
        return Some(format!(
            "killed by the master: still draining past shutdown_timeout = {:?} + {STOP_GRACE:?} grace (see the line above)",
            worker.shutdown_timeout
        ));
    }
    if worker.rollback_killed {
        return Some(
            "killed by the master: the reload that started it was rolled back before it was ready"
                .to_string(),
        );
    }
    if worker.killed_at_stop {
        return Some(format!(
            "killed by the master: still running at the stop deadline (shutdown_timeout + {STOP_GRACE:?})"
        ));
    }
    None
}

impl Master {
    /// Collects every exited worker (`waitpid` until nothing is left to reap).
    pub(super) fn reap_workers(&mut self) {
        loop {
            let flags = WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED | WaitPidFlag::WCONTINUED;
            let status = match waitpid(None, Some(flags)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    return;
                }
                Ok(WaitStatus::Stopped(pid, signal)) => {
                    self.child_stopped(pid, signal);
                    continue;
                }
                Ok(WaitStatus::Continued(pid)) => {
                    if let Some(worker) = self.workers.get(&pid) {
                        tracing::info!("worker {} (pid {pid}) continues", worker.index);
                    }
                    continue;
                }
                Ok(status) => status,
            };
            let (Some(pid), Some(exit)) = (status.pid(), Exit::from_wait(status)) else {
                continue;
            };
            // A reload's plugin checker: its report is complete.
            if let Some(checking) = self.checking.as_mut().filter(|c| c.pid() == pid) {
                checking.exited(exit);
                continue;
            }
            // The new master of a binary upgrade.
            if self.successor.as_ref().is_some_and(|s| s.pid() == pid) {
                self.successor_exited(exit);
                continue;
            }
            // Not one of ours (an orphan a plugin left behind, adopted by
            // the master as subreaper): reaped, nothing else to do.
            // Connections it handed over just before exiting may still wait
            // in its channel: pass them on before the channel goes.
            if let Some(board) = self.workers.get(&pid).map(|w| w.board) {
                self.on_control(board);
            }
            let Some(mut worker) = self.workers.remove(&pid) else {
                continue;
            };
            if let Some(control) = worker.control.take() {
                self.drop_control(control);
            }
            // What its plugins started goes with it.
            sweep_group(pid);
            // Keep its numbers before the entry is reused.
            let stats = &self.scoreboard.slot(worker.board).stats;
            self.retired.add(stats, &worker.plugins, false);
            self.retired_slots
                .entry(worker.index)
                .or_default()
                .add(stats, &worker.plugins, false);
            self.free_boards.push(worker.board);
            if let Some(slot) = self.slots.get_mut(worker.index) {
                if slot.pid == Some(pid) {
                    slot.pid = None;
                }
            }
            self.on_worker_exit(pid, worker, exit);
        }
    }

    /// A child stopped (SIGSTOP, SIGTSTP…; not traced): nothing resumes it
    /// but a SIGCONT. A reload's plugin checker is refused for it (a plugin
    /// stopped it); a worker is named, as it now serves nothing.
    fn child_stopped(&mut self, pid: Pid, signal: Signal) {
        if let Some(checking) = self.checking.as_mut().filter(|c| c.pid() == pid) {
            checking.stopped(signal);
        } else if let Some(worker) = self.workers.get(&pid) {
            tracing::warn!(
                "worker {} (pid {pid}) was stopped ({signal}): it accepts and answers nothing, and its connections wait, until it gets SIGCONT",
                worker.index
            );
        }
    }

    /// Logs a worker's death with the plugin it was running, and schedules
    /// its replacement (or gives up, or rolls a reload back).
    pub(super) fn on_worker_exit(&mut self, pid: Pid, worker: Worker, exit: Exit) {
        let now = Instant::now();
        let index = worker.index;
        // The `status` field of the log lines: short, no explanation.
        let status = match exit {
            Exit::Code(code) => format!("exit {code}"),
            Exit::Signal(signal) => signal.as_str().to_string(),
        };
        let running = running(self.scoreboard.slot(worker.board), &worker.plugins);
        if let Phase::Stopping { .. } = self.phase {
            if worker.killed_at_stop {
                tracing::warn!(
                    worker = index, pid = pid.as_raw(), status = %status,
                    "worker {index} (pid {pid}) killed by the master: still running at the stop deadline (shutdown_timeout + {STOP_GRACE:?}){}",
                    if running.is_empty() {
                        " (no plugin call in flight: a plugin catching SIGTERM, or connections that never finished?)".to_string()
                    } else {
                        running.clone()
                    }
                );
            } else if let Some(why) = killed_by_master(&worker, exit) {
                tracing::warn!(worker = index, pid = pid.as_raw(), status = %status, "worker {index} (pid {pid}) {why}{running}");
            } else {
                tracing::info!(worker = index, pid = pid.as_raw(), status = %status, "worker {index} (pid {pid}) exited: {exit}{running}");
            }
            return;
        }
        if worker.role != Role::Serving {
            let who = if worker.rollback_killed {
                "new worker"
            } else {
                "replaced worker"
            };
            if exit == Exit::Code(exit_code::OK) {
                tracing::info!(worker = index, pid = pid.as_raw(), status = %status, "{who} {index} (pid {pid}) finished draining and exited");
            } else if let Some(why) = killed_by_master(&worker, exit) {
                tracing::warn!(worker = index, pid = pid.as_raw(), status = %status, "{who} {index} (pid {pid}) {why}{running}");
            } else {
                tracing::warn!(worker = index, pid = pid.as_raw(), status = %status, "{who} {index} (pid {pid}) exited: {exit}{running}");
            }
            return;
        }
        // How far it got, from the scoreboard (never from its exit status,
        // which a plugin controls).
        let board = self.scoreboard.slot(worker.board);
        let boot = if board.is_ready() {
            Boot::Served
        } else if board.load_failed().is_some() {
            Boot::PluginRefused
        } else {
            Boot::DiedStarting
        };
        let cause = match (worker.hung, board.load_failed()) {
            (Some((plugin, elapsed)), _) => format!(
                "killed by the watchdog: plugin {:?} did not return for {elapsed:.1?}{}",
                worker.plugins.get(plugin).map_or("?", String::as_str),
                if boot == Boot::Served {
                    ""
                } else {
                    " while loading (over init_timeout)"
                }
            ),
            (None, Some(plugin)) => format!(
                "plugin {:?} could not be loaded (its error is logged above)",
                worker.plugins.get(plugin).map_or("?", String::as_str)
            ),
            (None, None) if boot == Boot::DiedStarting => {
                match self.scoreboard.slot(worker.board).in_flight() {
                    Some(plugin) => format!(
                        "it ended while loading plugin {:?}: {}",
                        worker.plugins.get(plugin).map_or("?", String::as_str),
                        exit.inside_plugin()
                    ),
                    None => format!(
                        "it ended before it was ready, after loading its plugins ({exit}; its error, if any, is logged above)"
                    ),
                }
            }
            (None, None) => format!("{exit}{running}"),
        };
        let of_pending_reload = self
            .reload
            .as_ref()
            .is_some_and(|r| r.generation == worker.generation);
        if of_pending_reload && boot != Boot::Served {
            let why = format!("new worker {index} (pid {pid}) failed to start: {cause}");
            tracing::error!("{why}");
            self.roll_back_reload(exit_code::PLUGIN_LOAD_FAILED, why);
            return;
        }
        let reason = match (worker.hung, board.load_failed(), boot, exit) {
            (Some(_), ..) => "watchdog",
            (None, Some(_), ..) => "plugin_load_failed",
            (None, None, Boot::DiedStarting, _) => "boot_failed",
            (None, None, _, Exit::Signal(_)) => "signal",
            (None, None, _, Exit::Code(_)) => "exit_code",
        };
        self.last_exits.insert(index, reason);
        if let Some(n) = metrics::EXIT_REASONS
            .iter()
            .position(|&r| r == reason)
            .and_then(|i| self.exits.get_mut(i))
        {
            *n += 1;
        }
        let Some(slot) = self.slots.get_mut(index) else {
            // Its slot was removed (SIGTTOU) meanwhile: nothing to restart.
            tracing::info!(worker = index, pid = pid.as_raw(), status = %status, "worker {index} (pid {pid}) exited: {cause}");
            return;
        };
        slot.crash_streak = if now.duration_since(worker.started) < decision::STABLE_AFTER {
            slot.crash_streak + 1
        } else {
            1
        };
        slot.boot_failures = match boot {
            Boot::Served => 0,
            _ => slot.boot_failures + 1,
        };
        let streak = slot.crash_streak;
        let boot_failures = slot.boot_failures;

        let window = self.config.server.restart_window;
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.restarts.pop_front();
        }
        let max = self.config.server.max_restarts;
        match decision::on_worker_exit(
            boot,
            boot_failures,
            self.restarts.len() as u32,
            max,
            self.up,
        ) {
            Decision::Restart => {
                self.restarts.push_back(now);
                self.restarts_total += 1;
                let delay = decision::restart_delay(streak);
                self.slots[index].restart_at = now + delay;
                let restarts = self.restarts.len();
                if streak < 3 {
                    tracing::warn!(
                        worker = index, pid = pid.as_raw(), status = %status,
                        "worker {index} (pid {pid}) died: {cause}; restarting it{} ({restarts} restart(s) in the last {window:?}, max_restarts = {max})",
                        if delay.is_zero() { String::new() } else { format!(" in {delay:?}") }
                    );
                } else if streak == 3 {
                    tracing::error!(
                        worker = index, pid = pid.as_raw(), status = %status,
                        "crash loop: worker {index} died {streak} times in a row, each within {:?} of starting (last: {cause}); restarting with exponential backoff, now {delay:?}, at most {:?}; further deaths in this loop are logged at debug level until a worker stays up",
                        decision::STABLE_AFTER,
                        decision::MAX_BACKOFF
                    );
                } else {
                    tracing::debug!(
                        worker = index, pid = pid.as_raw(), status = %status,
                        "worker {index} (pid {pid}) died again: {cause}; crash streak {streak}, restarting in {delay:?}"
                    );
                }
            }
            Decision::Halt(code @ exit_code::PLUGIN_LOAD_FAILED) => {
                if boot == Boot::PluginRefused {
                    tracing::error!(
                        worker = index, pid = pid.as_raw(), status = %status,
                        "worker {index} (pid {pid}) failed to start: {cause}; stopping, since a new worker would fail the same way"
                    );
                } else {
                    tracing::error!(
                        worker = index, pid = pid.as_raw(), status = %status,
                        "worker {index} (pid {pid}) failed to start: {cause}; that is {boot_failures} workers in a row that never became ready: stopping"
                    );
                }
                self.halt(code, Stop::Graceful);
            }
            Decision::Halt(code) => {
                tracing::error!(
                    worker = index, pid = pid.as_raw(), status = %status,
                    "worker {index} (pid {pid}) died: {cause}; {} restarts in the last {window:?} already (max_restarts = {max}): giving up and stopping",
                    self.restarts.len()
                );
                self.halt(code, Stop::Graceful);
            }
        }
    }
}

/// What a worker was running when it ended, from its scoreboard slot: the
/// reactor thread's plugin call, and the plugins with calls in flight on
/// pool threads (`threads = N`), e.g. ` while running plugin "a"` or
/// ` while plugin "slow" had calls running on its pool threads`. Empty
/// when nothing was running.
fn running(slot: &crate::scoreboard::Slot, plugins: &[String]) -> String {
    let name = |plugin: usize| format!("{:?}", plugins.get(plugin).map_or("?", String::as_str));
    let mut text = match slot.in_flight() {
        Some(plugin) => format!(" while running plugin {}", name(plugin)),
        None => String::new(),
    };
    let pooled: Vec<String> = slot.pool_in_flight().into_iter().map(name).collect();
    if !pooled.is_empty() {
        text.push_str(if text.is_empty() { " while" } else { " and" });
        text.push_str(&format!(
            " plugin {} had calls running on its pool threads",
            pooled.join(", plugin ")
        ));
    }
    text
}
