//! The master process: binds the listeners, forks the workers, and keeps the
//! pool full until told to stop.
//!
//! # Brief overview
//!
//! Shaped like gunicorn's arbiter: [`Master::run`] is one loop that waits for
//! a signal (read from a `signalfd`, so nothing runs in handler context),
//! dispatches it to a `handle_*` method, reaps exited workers, and tops the
//! pool back up (with exponential backoff for workers that keep dying). What
//! to do about a dead worker is decided by the pure
//! [`decision::on_worker_exit`]. Through the [`Scoreboard`] the master names
//! the plugin that was running when a worker died, and kills a worker whose
//! plugin call has not returned within `plugin_timeout`.
//!
//! The master stays single-threaded and never loads a plugin, so forking is
//! always safe; plugins are validated in a short-lived child ([`check`]).

pub mod check;
pub mod decision;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use crate::config::Config;
use crate::exit_code;
use crate::scoreboard::Scoreboard;
use crate::signals::Signals;
use crate::worker;
use decision::{Decision, Exit};

/// The master's `signalfd`.
const SIGNALS: Token = Token(0);
/// How long workers get beyond their own deadline (`shutdown_timeout` for a
/// graceful stop, none for a fast one) before the master kills them.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Whether the master is serving or winding down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Keep every slot's worker running; restart the ones that die.
    Serving,
    /// Workers were sent SIGTERM; exit with `code` once all are reaped, and
    /// SIGKILL any still alive at `deadline`.
    Stopping { code: i32, deadline: Instant },
}

/// How workers are asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain, then exit.
    Graceful,
    /// SIGINT: close everything now.
    Fast,
}

/// What the master knows about one worker slot.
#[derive(Debug)]
struct Slot {
    /// The running worker, if any.
    pid: Option<Pid>,
    /// When the current (or last) worker was started.
    started: Instant,
    /// When to start the next worker, while the slot is empty.
    restart_at: Instant,
    /// Consecutive deaths within `STABLE_AFTER` of starting.
    crash_streak: u32,
    /// The watchdog's last look at the scoreboard: the call counter, and
    /// since when it has not moved with a call in flight.
    watched_calls: u64,
    watched_since: Instant,
    /// Set when the watchdog killed this worker: (plugin, elapsed).
    hung: Option<(usize, Duration)>,
}

/// The master's state.
pub struct Master {
    config: Config,
    listeners: Vec<mio::net::TcpListener>,
    poll: Poll,
    signals: Signals,
    scoreboard: Scoreboard,
    slots: Vec<Slot>,
    /// Live workers: PID → slot index.
    pids: HashMap<Pid, usize>,
    /// When recent restarts happened (pruned to `restart_window`).
    restarts: VecDeque<Instant>,
    phase: Phase,
}

/// Serves `config` until stopped; returns the process exit code.
pub fn serve(config: Config) -> i32 {
    // 1. Every plugin must load before anything is forked: a broken plugin
    //    is one clear error now, not a restart loop later.
    let report = check::check_plugins(&config);
    if !report.errors.is_empty() {
        for error in &report.errors {
            tracing::error!("{error}");
        }
        tracing::error!(
            "not starting: {} plugin problem(s) in {}",
            report.errors.len(),
            config.file.display()
        );
        return exit_code::PLUGIN_LOAD_FAILED;
    }
    for line in &report.loaded {
        tracing::info!("{line}");
    }

    // 2. Bind every listener before forking: workers inherit the sockets.
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        match mio::net::TcpListener::bind(spec.addr) {
            Ok(socket) => {
                let plugin = &config.plugins[spec.plugin].name;
                tracing::info!("listening on {} (plugin {plugin:?})", spec.addr);
                listeners.push(socket);
            }
            Err(e) => {
                tracing::error!(
                    "cannot listen on {} ({}:{}): {e}",
                    spec.addr,
                    config.file.display(),
                    spec.line
                );
                return exit_code::FAILURE;
            }
        }
    }

    // 3. Signals become events of the master's loop (the mask is inherited
    //    by workers, which read their own signalfd), and the scoreboard is
    //    mapped before any worker exists so that all of them share it.
    let worker_count = config.server.worker_count();
    let setup = Signals::block(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ])
    .and_then(|signals| Ok((signals, Scoreboard::new(worker_count)?)))
    .map_err(std::io::Error::from)
    .and_then(|(signals, scoreboard)| {
        let poll = Poll::new()?;
        signals.register(poll.registry(), SIGNALS)?;
        Ok((signals, scoreboard, poll))
    });
    let (signals, scoreboard, poll) = match setup {
        Ok(parts) => parts,
        Err(e) => {
            tracing::error!("cannot set up the master: {e}");
            return exit_code::FAILURE;
        }
    };

    let now = Instant::now();
    let mut master = Master {
        config,
        listeners,
        poll,
        signals,
        scoreboard,
        slots: (0..worker_count)
            .map(|_| Slot {
                pid: None,
                started: now,
                restart_at: now,
                crash_streak: 0,
                watched_calls: 0,
                watched_since: now,
                hung: None,
            })
            .collect(),
        pids: HashMap::new(),
        restarts: VecDeque::new(),
        phase: Phase::Serving,
    };
    tracing::info!(
        "master {} starting {worker_count} worker(s) from {}",
        getpid(),
        master.config.file.display()
    );
    master.run()
}

impl Master {
    /// The loop: wait, dispatch signals, reap, watch plugin calls, top up
    /// (or finish stopping).
    fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(8);
        self.manage_workers();
        loop {
            let timeout = self
                .next_wakeup()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("master poll failed: {e}");
                    self.halt(exit_code::FAILURE, Stop::Fast);
                }
            }
            for signal in self.signals.pending() {
                match signal {
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.handle_stop(signal),
                    Signal::SIGHUP => self.handle_hup(),
                    // Reaping happens below, whatever woke us.
                    Signal::SIGCHLD => {}
                    other => tracing::debug!("ignoring {other}"),
                }
            }
            self.reap_workers();
            if let Some(code) = self.manage_workers() {
                return code;
            }
            self.watch_plugin_calls();
        }
    }

    /// When the loop must wake up without a signal: a pending restart, the
    /// watchdog's next look, or the stop deadline.
    fn next_wakeup(&self) -> Option<Instant> {
        let now = Instant::now();
        match self.phase {
            Phase::Stopping { deadline, .. } => Some(deadline),
            Phase::Serving => {
                let restart = self
                    .slots
                    .iter()
                    .filter(|slot| slot.pid.is_none())
                    .map(|slot| slot.restart_at)
                    .min();
                // Look often enough to catch a hang within a quarter of the timeout.
                let tick = (self.config.server.plugin_timeout / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1));
                Some(restart.map_or(now + tick, |at| at.min(now + tick)))
            }
        }
    }

    /// SIGTERM or SIGQUIT: graceful stop — workers stop accepting, finish
    /// the frames they are in, deliver every answer, then exit; the master
    /// exits 0 when all are gone. SIGINT: fast stop — workers close every
    /// connection at once. A second stop signal while stopping kills the
    /// workers.
    fn handle_stop(&mut self, signal: Signal) {
        match self.phase {
            Phase::Serving => {
                let how = if signal == Signal::SIGINT {
                    Stop::Fast
                } else {
                    Stop::Graceful
                };
                tracing::info!(
                    "{signal} received: {} stop of {} worker(s)",
                    if how == Stop::Fast {
                        "fast"
                    } else {
                        "graceful"
                    },
                    self.pids.len()
                );
                self.halt(exit_code::OK, how);
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

    /// SIGHUP: reload is not implemented yet; say so rather than die.
    fn handle_hup(&mut self) {
        tracing::warn!("SIGHUP received: reload is not supported yet; restart nbnet to apply config or plugin changes");
    }

    /// Begins stopping every worker; exit with `code` when all are gone.
    /// Workers still running after their own deadline plus [`STOP_GRACE`]
    /// are killed.
    fn halt(&mut self, code: i32, how: Stop) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        let (signal, allowed) = match how {
            Stop::Graceful => (
                Signal::SIGTERM,
                self.config.server.shutdown_timeout + STOP_GRACE,
            ),
            Stop::Fast => (Signal::SIGINT, STOP_GRACE),
        };
        self.phase = Phase::Stopping {
            code,
            deadline: Instant::now() + allowed,
        };
        // Close the master's copies of the listening sockets; the workers
        // close theirs as they start draining, so the ports stop listening.
        self.listeners.clear();
        self.signal_workers(signal);
    }

    /// Collects every exited worker (`waitpid` until nothing is left to reap).
    fn reap_workers(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("waitpid failed: {e}");
                    return;
                }
                Ok(status) => status,
            };
            let (Some(pid), Some(exit)) = (status.pid(), Exit::from_wait(status)) else {
                continue;
            };
            // Not one of ours (a plugin checker already reaped, say): ignore.
            let Some(index) = self.pids.remove(&pid) else {
                continue;
            };
            self.slots[index].pid = None;
            self.on_worker_exit(index, pid, exit);
        }
    }

    /// Logs a worker's death with the plugin it was running, and schedules
    /// its replacement (or gives up).
    fn on_worker_exit(&mut self, index: usize, pid: Pid, exit: Exit) {
        let now = Instant::now();
        let in_flight = self.scoreboard.slot(index).in_flight();
        let running = match in_flight {
            Some(plugin) => format!(" while running plugin {:?}", self.plugin_name(plugin)),
            None => String::new(),
        };
        if let Phase::Stopping { .. } = self.phase {
            tracing::info!("worker {index} (pid {pid}) exited: {exit}{running}");
            return;
        }
        let slot = &mut self.slots[index];
        let hung = slot.hung.take();
        let cause = match hung {
            Some((plugin, elapsed)) => format!(
                "killed by the watchdog: plugin {:?} did not return for {elapsed:.1?}",
                self.config.plugins[plugin].name
            ),
            None => format!("{exit}{running}"),
        };
        slot.crash_streak = if now.duration_since(slot.started) < decision::STABLE_AFTER {
            slot.crash_streak + 1
        } else {
            1
        };
        let streak = slot.crash_streak;

        let window = self.config.server.restart_window;
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.restarts.pop_front();
        }
        let max = self.config.server.max_restarts;
        match decision::on_worker_exit(exit, self.restarts.len() as u32, max) {
            Decision::Restart => {
                self.restarts.push_back(now);
                let delay = decision::restart_delay(streak);
                self.slots[index].restart_at = now + delay;
                let restarts = self.restarts.len();
                if streak < 3 {
                    tracing::warn!(
                        "worker {index} (pid {pid}) died: {cause}; restarting it{} ({restarts} restart(s) in the last {window:?}, max_restarts = {max})",
                        if delay.is_zero() { String::new() } else { format!(" in {delay:?}") }
                    );
                } else if streak == 3 {
                    tracing::error!(
                        "crash loop: worker {index} died {streak} times in a row, each within {:?} of starting (last: {cause}); restarting with exponential backoff, now {delay:?}, at most {:?}; further deaths in this loop are logged at debug level until a worker stays up",
                        decision::STABLE_AFTER,
                        decision::MAX_BACKOFF
                    );
                } else {
                    tracing::debug!(
                        "worker {index} (pid {pid}) died again: {cause}; crash streak {streak}, restarting in {delay:?}"
                    );
                }
            }
            Decision::Halt(code @ exit_code::PLUGIN_LOAD_FAILED) => {
                tracing::error!(
                    "worker {index} (pid {pid}) could not load its plugins (see above): stopping, since a new worker would fail the same way"
                );
                self.halt(code, Stop::Graceful);
            }
            Decision::Halt(code) => {
                tracing::error!(
                    "worker {index} (pid {pid}) died: {cause}; {} restarts in the last {window:?} already (max_restarts = {max}): giving up and stopping",
                    self.restarts.len()
                );
                self.halt(code, Stop::Graceful);
            }
        }
    }

    /// The watchdog: a slot whose plugin call has been in flight, with its
    /// call counter unchanged, for `plugin_timeout` is hung; kill its worker
    /// (SIGKILL: a hung plugin would not act on SIGTERM).
    fn watch_plugin_calls(&mut self) {
        let now = Instant::now();
        let timeout = self.config.server.plugin_timeout;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(pid) = slot.pid else { continue };
            let board = self.scoreboard.slot(index);
            let calls = board.calls();
            let in_flight = board.in_flight();
            if in_flight.is_none() || calls != slot.watched_calls {
                slot.watched_calls = calls;
                slot.watched_since = now;
                continue;
            }
            let elapsed = now.duration_since(slot.watched_since);
            if elapsed >= timeout && slot.hung.is_none() {
                let plugin = in_flight.expect("checked above");
                tracing::error!(
                    "plugin {:?} has not returned for {elapsed:.1?} in worker {index} (pid {pid}), over plugin_timeout = {timeout:?}: killing the worker",
                    self.config.plugins[plugin].name
                );
                slot.hung = Some((plugin, elapsed));
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }

    /// Serving: fork workers into empty slots whose restart time has come.
    /// Stopping: kill stragglers at the deadline; return the exit code once
    /// every worker is gone.
    fn manage_workers(&mut self) -> Option<i32> {
        match self.phase {
            Phase::Serving => {
                let now = Instant::now();
                for index in 0..self.slots.len() {
                    let slot = &self.slots[index];
                    if slot.pid.is_some() || slot.restart_at > now {
                        continue;
                    }
                    if let Err(e) = self.spawn_worker(index) {
                        tracing::error!("cannot fork worker {index}: {e}");
                        self.halt(exit_code::FAILURE, Stop::Fast);
                        break;
                    }
                }
                None
            }
            Phase::Stopping { code, deadline } => {
                if self.pids.is_empty() {
                    tracing::info!("stopped");
                    return Some(code);
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        "{} worker(s) still running past the stop deadline: sending SIGKILL",
                        self.pids.len()
                    );
                    self.signal_workers(Signal::SIGKILL);
                    // Wait for the kills to be reaped.
                    self.phase = Phase::Stopping {
                        code,
                        deadline: Instant::now() + Duration::from_secs(1),
                    };
                }
                None
            }
        }
    }

    /// Forks the worker for slot `index`. The child never returns.
    fn spawn_worker(&mut self, index: usize) -> nix::Result<()> {
        let master = getpid();
        // The new worker starts with a clean slot (it resets it too; doing it
        // here as well means the watchdog never sees the old worker's state).
        self.scoreboard.slot(index).reset();
        // SAFETY: the master is single-threaded and never loads plugins, so
        // the child may allocate and run arbitrary code after fork.
        match unsafe { fork() }? {
            ForkResult::Parent { child } => {
                let now = Instant::now();
                let slot = &mut self.slots[index];
                slot.pid = Some(child);
                slot.started = now;
                slot.watched_calls = 0;
                slot.watched_since = now;
                self.pids.insert(child, index);
                tracing::info!("worker {index} started (pid {child})");
                Ok(())
            }
            ForkResult::Child => {
                // SAFETY: these descriptors are the master's epoll instance and
                // signalfd, inherited by the fork; this process never returns
                // to the code that owns them (it exits below).
                unsafe {
                    libc::close(self.poll.as_raw_fd());
                    libc::close(self.signals.raw_fd());
                }
                let sockets = std::mem::take(&mut self.listeners);
                let who = worker::Identity {
                    index,
                    count: self.slots.len(),
                    master,
                };
                let code = worker::run(&self.config, sockets, who, self.scoreboard.slot(index));
                std::process::exit(code)
            }
        }
    }

    fn plugin_name(&self, index: usize) -> &str {
        self.config
            .plugins
            .get(index)
            .map_or("?", |plugin| plugin.name.as_str())
    }

    fn signal_workers(&self, signal: Signal) {
        for &pid in self.pids.keys() {
            let _ = kill(pid, signal);
        }
    }
}
