//! The master process: binds the listeners, forks the workers, and keeps the
//! pool full until told to stop.
//!
//! # Brief overview
//!
//! Shaped like gunicorn's arbiter: [`Master::run`] is one loop that waits for
//! a signal (read from a `signalfd`, so nothing runs in handler context),
//! dispatches it to a `handle_*` method, reaps exited workers, and tops the
//! pool back up. What to do about a dead worker is decided by the pure
//! [`decision::on_worker_exit`].
//!
//! The master stays single-threaded and never loads a plugin, so forking is
//! always safe; plugins are validated in a short-lived child ([`check`]).

pub mod check;
pub mod decision;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use crate::config::Config;
use crate::exit_code;
use crate::signals::Signals;
use crate::worker;
use decision::{Decision, Exit};

/// The master's `signalfd`.
const SIGNALS: Token = Token(0);
/// How long workers get to exit after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the master is serving or winding down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Keep `worker_count` workers running; restart the ones that die.
    Serving,
    /// Workers were sent SIGTERM; exit with `code` once all are reaped, and
    /// SIGKILL any still alive at `deadline`.
    Stopping { code: i32, deadline: Instant },
}

/// The master's state.
pub struct Master {
    config: Config,
    listeners: Vec<mio::net::TcpListener>,
    poll: Poll,
    signals: Signals,
    /// Live workers: PID → slot index.
    workers: HashMap<Pid, usize>,
    worker_count: usize,
    restarts: u32,
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
    //    by workers, which read their own signalfd).
    let setup = Signals::block(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ])
    .map_err(std::io::Error::from)
    .and_then(|signals| {
        let poll = Poll::new()?;
        signals.register(poll.registry(), SIGNALS)?;
        Ok((signals, poll))
    });
    let (signals, poll) = match setup {
        Ok(pair) => pair,
        Err(e) => {
            tracing::error!("cannot set up signal handling: {e}");
            return exit_code::FAILURE;
        }
    };

    let worker_count = config.server.worker_count();
    let mut master = Master {
        config,
        listeners,
        poll,
        signals,
        workers: HashMap::new(),
        worker_count,
        restarts: 0,
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
    /// The loop: wait, dispatch signals, reap, top up (or finish stopping).
    fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(8);
        self.manage_workers();
        loop {
            let timeout = match self.phase {
                Phase::Serving => None,
                Phase::Stopping { deadline, .. } => {
                    Some(deadline.saturating_duration_since(Instant::now()))
                }
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("master poll failed: {e}");
                    self.halt(exit_code::FAILURE);
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
        }
    }

    /// SIGTERM, SIGINT, SIGQUIT: stop every worker, then exit 0. A second
    /// stop signal while stopping kills the workers at once.
    fn handle_stop(&mut self, signal: Signal) {
        match self.phase {
            Phase::Serving => {
                tracing::info!(
                    "{signal} received: stopping {} worker(s)",
                    self.workers.len()
                );
                self.halt(exit_code::OK);
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

    /// Begins stopping: SIGTERM to every worker; exit with `code` when all are gone.
    fn halt(&mut self, code: i32) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        self.phase = Phase::Stopping {
            code,
            deadline: Instant::now() + STOP_TIMEOUT,
        };
        self.signal_workers(Signal::SIGTERM);
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
            let Some(index) = self.workers.remove(&pid) else {
                continue;
            };
            self.on_worker_exit(index, pid, exit);
        }
    }

    fn on_worker_exit(&mut self, index: usize, pid: Pid, exit: Exit) {
        if let Phase::Stopping { .. } = self.phase {
            tracing::info!("worker {index} (pid {pid}) exited: {exit}");
            return;
        }
        match decision::on_worker_exit(exit, self.restarts, self.config.server.max_restarts) {
            Decision::Restart => {
                self.restarts += 1;
                tracing::warn!(
                    "worker {index} (pid {pid}) died: {exit}; restarting it (restart {} of max_restarts = {})",
                    self.restarts,
                    self.config.server.max_restarts
                );
            }
            Decision::Halt(code @ exit_code::PLUGIN_LOAD_FAILED) => {
                tracing::error!(
                    "worker {index} (pid {pid}) could not load its plugins (see above): stopping, since a new worker would fail the same way"
                );
                self.halt(code);
            }
            Decision::Halt(code) => {
                tracing::error!(
                    "worker {index} (pid {pid}) died: {exit}; {} restarts already done (max_restarts = {}): giving up and stopping",
                    self.restarts,
                    self.config.server.max_restarts
                );
                self.halt(code);
            }
        }
    }

    /// Serving: fork workers into empty slots. Stopping: kill stragglers at
    /// the deadline; return the exit code once every worker is gone.
    fn manage_workers(&mut self) -> Option<i32> {
        match self.phase {
            Phase::Serving => {
                for index in 0..self.worker_count {
                    if !self.workers.values().any(|&i| i == index) {
                        if let Err(e) = self.spawn_worker(index) {
                            tracing::error!("cannot fork worker {index}: {e}");
                            self.halt(exit_code::FAILURE);
                            break;
                        }
                    }
                }
                None
            }
            Phase::Stopping { code, deadline } => {
                if self.workers.is_empty() {
                    tracing::info!("stopped");
                    return Some(code);
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        "{} worker(s) still running after {STOP_TIMEOUT:?}: sending SIGKILL",
                        self.workers.len()
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
        // SAFETY: the master is single-threaded and never loads plugins, so
        // the child may allocate and run arbitrary code after fork.
        match unsafe { fork() }? {
            ForkResult::Parent { child } => {
                self.workers.insert(child, index);
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
                    count: self.worker_count,
                    master,
                };
                let code = worker::run(&self.config, sockets, who);
                std::process::exit(code)
            }
        }
    }

    fn signal_workers(&self, signal: Signal) {
        for &pid in self.workers.keys() {
            let _ = kill(pid, signal);
        }
    }
}
