//! The master process: binds the listeners, forks the workers, keeps the
//! pool full, replaces workers without refusing a connection, and stops.
//!
//! # Brief overview
//!
//! Shaped like gunicorn's arbiter: [`Master::run`] is one loop that waits for
//! a signal (read from a `signalfd`, so nothing runs in handler context),
//! dispatches it to a `handle_*` method, reaps exited workers, watches plugin
//! calls, and tops the pool back up (with exponential backoff for workers
//! that keep dying). What to do about a dead worker is decided by the pure
//! [`decision::on_worker_exit`]. Through the [`Scoreboard`] the master names
//! the plugin that was running when a worker died, kills a worker whose
//! plugin call has not returned within `plugin_timeout`, and learns when a
//! new worker is ready.
//!
//! **Replacing a worker** (reload, `max_requests_per_worker`) never refuses a
//! connection: the old worker keeps serving ("outgoing") until its
//! replacement says it is ready, and only then drains. Listening sockets
//! whose address is unchanged are shared by both.
//!
//! The master stays single-threaded and never loads a plugin, so forking is
//! always safe; plugins are validated in a short-lived child ([`check`]).

pub mod admin;
pub mod check;
pub mod decision;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use crate::config::{self, Config, ListenerSpec};
use crate::exit_code;
use crate::listener::{Endpoint, ListenSocket};
use crate::scoreboard::{Scoreboard, Totals};
use crate::signals::Signals;
use crate::worker;
use decision::{Boot, Decision, Exit};

/// The master's `signalfd`.
const SIGNALS: Token = Token(0);
/// The admin listener; its clients take the tokens above it.
const ADMIN: usize = 1;
/// How long workers get beyond their own deadline (`shutdown_timeout` for a
/// graceful stop, none for a fast one) before the master kills them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Scoreboard entries: enough for every worker alive at once, including
/// outgoing and draining ones during reloads and SIGTTIN growth.
const SCOREBOARD_ENTRIES: usize = 1024;
/// A reload whose new workers are not all ready by then is rolled back.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the master looks at the scoreboard while replacing workers.
const REPLACEMENT_TICK: Duration = Duration::from_millis(10);

/// The signals the master handles. SIGUSR2 is internal: a worker that
/// wants to be replaced (`max_requests_per_worker`) sends it to wake the
/// master at once. SIGUSR1 (what logrotate scripts send nginx and gunicorn)
/// and SIGWINCH (nginx's "retire workers") are taken so that they cannot
/// kill the master: their default action would end it silently.
const MASTER_SIGNALS: [Signal; 10] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGCHLD,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR2,
    Signal::SIGUSR1,
    Signal::SIGWINCH,
];

/// Whether the master is serving or winding down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Keep every slot's worker running; restart the ones that die.
    Serving,
    /// Workers were asked to stop; exit with `code` once all are reaped, and
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

/// What a live worker is doing, as far as the master is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The worker of its pool slot.
    Serving,
    /// Being replaced: still serving until its replacement (or, during a
    /// reload, every new worker) is ready; then it drains.
    Outgoing,
    /// Told to drain (SIGTERM); it exits when its connections are done.
    Draining,
}

/// A live worker process.
#[derive(Debug)]
struct Worker {
    /// Its pool slot (plugins see it as the worker index).
    index: usize,
    /// The config generation it was started with (a reload starts the next).
    generation: u64,
    /// Its scoreboard entry.
    board: usize,
    role: Role,
    started: Instant,
    /// The plugin names of the config it was started with (for messages
    /// about it after a reload changed the config).
    plugins: std::rc::Rc<Vec<String>>,
    /// The watchdog's last look: the call counter, and since when it has not
    /// moved with a call in flight.
    watched_calls: u64,
    watched_since: Instant,
    /// Set when the watchdog killed it: (plugin, elapsed).
    hung: Option<(usize, Duration)>,
}

/// One slot of the worker pool.
#[derive(Debug)]
struct Slot {
    /// Its serving worker, if any.
    pid: Option<Pid>,
    /// When to start a worker, while the slot has none.
    restart_at: Instant,
    /// Consecutive deaths within `STABLE_AFTER` of starting.
    crash_streak: u32,
    /// Consecutive workers that died before they were ready.
    boot_failures: u32,
}

impl Slot {
    fn empty(now: Instant) -> Slot {
        Slot {
            pid: None,
            restart_at: now,
            crash_streak: 0,
            boot_failures: 0,
        }
    }
}

/// A reload whose new workers are not all ready yet: what to go back to.
struct PendingReload {
    /// The generation the reload started; its workers are the new ones.
    generation: u64,
    previous: Config,
    previous_listeners: Vec<Bound>,
    previous_slots: usize,
    started: Instant,
}

/// The master's state.
pub struct Master {
    config: Config,
    /// Plugin names of `config`, shared with the workers started from it.
    plugin_names: std::rc::Rc<Vec<String>>,
    /// The bound listening sockets of `config`.
    listeners: Vec<Bound>,
    poll: Poll,
    signals: Signals,
    scoreboard: Scoreboard,
    free_boards: Vec<usize>,
    slots: Vec<Slot>,
    workers: HashMap<Pid, Worker>,
    /// When recent restarts happened (pruned to `restart_window`).
    restarts: VecDeque<Instant>,
    reload: Option<PendingReload>,
    /// The config generation new workers are started with.
    generation: u64,
    pid_file: Option<PathBuf>,
    phase: Phase,
    /// The `/metrics` and `/healthz` listener, if configured.
    admin: Option<admin::Admin>,
    /// Numbers of workers that have exited, so totals never go backwards.
    retired: Totals,
    /// Restarts since the master started.
    restarts_total: u64,
    /// Why each slot's last worker exited.
    last_exits: BTreeMap<usize, String>,
    /// Watchdog kills per plugin.
    timeouts: BTreeMap<String, u64>,
}

/// Serves `config` until stopped; returns the process exit code.
pub fn serve(mut config: Config) -> i32 {
    // 0. Processes that plugins start and that outlive their worker become
    //    the master's children (not init's), so that the master can reap
    //    them and sweep them away when it stops.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(
            "cannot become a child subreaper ({e}): processes plugins start may outlive nbnet"
        );
    }

    // 1. Every plugin must load before anything is forked: a broken plugin
    //    is one clear error now, not a restart loop later.
    if let Err(count) = check_and_report(&mut config) {
        tracing::error!(
            "not starting: {count} plugin problem(s) in {}",
            config.file.display()
        );
        return exit_code::PLUGIN_LOAD_FAILED;
    }

    // 2. Bind every listener before forking: workers inherit the sockets.
    let listeners = match bind_listeners(&config) {
        Ok(listeners) => listeners,
        Err(message) => {
            tracing::error!("{message}");
            return exit_code::FAILURE;
        }
    };

    // 3. Signals become events of the master's loop (the mask is inherited
    //    by workers, which read their own signalfd), and the scoreboard is
    //    mapped before any worker exists so that all of them share it.
    let setup = Signals::block(&MASTER_SIGNALS)
        .and_then(|signals| Ok((signals, Scoreboard::new(SCOREBOARD_ENTRIES)?)))
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

    let admin = match config.admin {
        Some(addr) => match admin::Admin::bind(addr, poll.registry(), ADMIN) {
            Ok(admin) => {
                tracing::info!("admin: http://{addr}/metrics and /healthz");
                Some(admin)
            }
            Err(e) => {
                tracing::error!(
                    "cannot listen on [admin] addr {addr} ({}): {e}",
                    config.file.display()
                );
                return exit_code::FAILURE;
            }
        },
        None => None,
    };

    let pid_file = config.server.pid_file.clone();
    if let Some(path) = &pid_file {
        if let Err(e) = std::fs::write(path, format!("{}\n", getpid())) {
            tracing::error!("cannot write pid_file {}: {e}", path.display());
            return exit_code::FAILURE;
        }
    }

    let now = Instant::now();
    let worker_count = config.server.worker_count();
    let mut master = Master {
        plugin_names: plugin_names(&config),
        config,
        listeners,
        poll,
        signals,
        scoreboard,
        free_boards: (0..SCOREBOARD_ENTRIES).rev().collect(),
        slots: (0..worker_count).map(|_| Slot::empty(now)).collect(),
        workers: HashMap::new(),
        restarts: VecDeque::new(),
        reload: None,
        generation: 0,
        pid_file,
        phase: Phase::Serving,
        admin,
        retired: Totals::default(),
        restarts_total: 0,
        last_exits: BTreeMap::new(),
        timeouts: BTreeMap::new(),
    };
    tracing::info!(
        "master {} starting {worker_count} worker(s) from {}",
        getpid(),
        master.config.file.display()
    );
    let code = master.run();
    if let Some(path) = &master.pid_file {
        let _ = std::fs::remove_file(path);
    }
    code
}

/// Loads every plugin of `config` in a child; logs what loaded and every
/// problem. `Err(count)` when something is wrong.
fn check_and_report(config: &mut Config) -> Result<(), usize> {
    let report = check::check_plugins(config);
    for error in &report.errors {
        tracing::error!("{error}");
    }
    if !report.errors.is_empty() {
        return Err(report.errors.len());
    }
    for line in &report.loaded {
        tracing::info!("{line}");
    }
    Ok(())
}

/// Binds every listener of `config` (at startup; reloads bind only new ones).
fn bind_listeners(config: &Config) -> Result<Vec<Bound>, String> {
    let mut bound: Vec<Bound> = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        match Bound::bind(spec, config) {
            Ok(listener) => bound.push(listener),
            Err(message) => {
                // Do not leave the socket files of the ones already bound.
                for listener in bound {
                    listener.close();
                }
                return Err(message);
            }
        }
        let plugin = &config.plugins[spec.plugin].name;
        tracing::info!("listening on {} (plugin {plugin:?})", spec.addr);
    }
    Ok(bound)
}

/// One listener's sockets in the master: one shared by every worker, or
/// with `reuseport` one per worker slot (bound as slots appear).
struct Bound {
    addr: Endpoint,
    reuseport: bool,
    sockets: Vec<ListenSocket>,
}

impl Bound {
    /// Binds the listener's (first) socket.
    fn bind(spec: &ListenerSpec, config: &Config) -> Result<Bound, String> {
        let socket = match &spec.addr {
            Endpoint::Tcp(addr) => ListenSocket::bind_tcp(*addr, spec.reuseport),
            Endpoint::Unix(path) => ListenSocket::bind_unix(path, spec.mode),
        }
        .map_err(|e| {
            format!(
                "cannot listen on {} ({}:{}): {e}",
                spec.addr,
                config.file.display(),
                spec.line
            )
        })?;
        Ok(Bound {
            addr: spec.addr.clone(),
            reuseport: spec.reuseport,
            sockets: vec![socket],
        })
    }

    /// Makes sure slot `index` has its socket (reuseport binds one more).
    fn prepare(&mut self, index: usize) -> std::io::Result<()> {
        if let (true, Endpoint::Tcp(addr)) = (self.reuseport, &self.addr) {
            while self.sockets.len() <= index {
                self.sockets.push(ListenSocket::bind_tcp(*addr, true)?);
            }
        }
        Ok(())
    }

    /// In a new worker: the socket of slot `index` (the others are dropped
    /// with the master's memory image when the worker exits).
    fn take_for(&mut self, index: usize) -> Option<ListenSocket> {
        let at = if self.reuseport { index } else { 0 };
        (at < self.sockets.len()).then(|| self.sockets.swap_remove(at))
    }

    /// Keeps the sockets of the first `slots` slots (reuseport); a removed
    /// slot's socket closes, so the kernel stops routing connections to it.
    fn truncate(&mut self, slots: usize) {
        if self.reuseport {
            self.sockets.truncate(slots.max(1));
        }
    }

    /// Closes the listener for good: a Unix socket's file is removed.
    fn close(self) {
        if let Endpoint::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

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

/// At the end of a stop: kills every child the master still has — orphans
/// that a plugin's process left behind and that escaped their worker's
/// process group (`setsid`), adopted by the master as subreaper — and reaps
/// them, so that `nbnet stop` leaves no process of the server behind.
fn sweep_orphans() {
    let me = getpid();
    let path = format!("/proc/{me}/task/{me}/children");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let orphans: Vec<Pid> = text
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .map(Pid::from_raw)
        .collect();
    if orphans.is_empty() {
        return;
    }
    tracing::warn!(
        "killing {} process(es) that plugins started and left running: {orphans:?}",
        orphans.len()
    );
    for &pid in &orphans {
        let _ = kill(pid, Signal::SIGKILL);
    }
    for pid in orphans {
        let _ = waitpid(pid, None);
    }
}

fn plugin_names(config: &Config) -> std::rc::Rc<Vec<String>> {
    std::rc::Rc::new(config.plugins.iter().map(|p| p.name.clone()).collect())
}

impl Master {
    /// The loop: wait, dispatch signals, reap, watch the workers, top up
    /// (or finish stopping).
    fn run(&mut self) -> i32 {
        let mut events = Events::with_capacity(64);
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
            // Admin requests (signals are read below whatever woke us).
            if let Some(mut admin) = self.admin.take() {
                let tokens: Vec<Token> = events
                    .iter()
                    .map(|e| e.token())
                    .filter(|&t| admin.owns(t))
                    .collect();
                for token in tokens {
                    admin.on_event(token, self.poll.registry(), &mut |method, path| {
                        self.answer_admin(method, path)
                    });
                }
                admin.expire(Instant::now(), self.poll.registry());
                self.admin = Some(admin);
            }
            for signal in self.signals.pending() {
                match signal {
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.handle_stop(signal),
                    Signal::SIGHUP => self.handle_hup(),
                    Signal::SIGTTIN => self.handle_ttin(),
                    Signal::SIGTTOU => self.handle_ttou(),
                    // Reaping and retirement requests are handled below,
                    // whatever woke us.
                    Signal::SIGCHLD | Signal::SIGUSR2 => {}
                    Signal::SIGUSR1 => tracing::info!(
                        "SIGUSR1 received: logs go to stderr, there is no log file to reopen; ignored"
                    ),
                    Signal::SIGWINCH => tracing::info!("SIGWINCH received: ignored"),
                    other => tracing::debug!("ignoring {other}"),
                }
            }
            self.reap_workers();
            if let Some(code) = self.manage_workers() {
                return code;
            }
            self.watch_workers();
        }
    }

    /// When the loop must wake up without a signal: a pending restart, the
    /// watchdog's next look, a replacement to watch, an admin client's
    /// deadline, or the stop deadline.
    fn next_wakeup(&self) -> Option<Instant> {
        let admin = self.admin.as_ref().and_then(admin::Admin::next_deadline);
        [self.next_wakeup_for_workers(), admin]
            .into_iter()
            .flatten()
            .min()
    }

    fn next_wakeup_for_workers(&self) -> Option<Instant> {
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
                let replacing = self.workers.values().any(|w| w.role == Role::Outgoing);
                // Look often enough to catch a hang within a quarter of the
                // timeout, and quickly while a replacement is starting.
                let tick = if replacing {
                    REPLACEMENT_TICK
                } else {
                    (self
                        .config
                        .server
                        .plugin_timeout
                        .min(self.config.server.init_timeout)
                        / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1))
                };
                Some(restart.map_or(now + tick, |at| at.min(now + tick)))
            }
        }
    }

    /// Answers an admin request: `GET /metrics` or `GET /healthz`.
    fn answer_admin(&self, method: &str, path: &str) -> admin::Reply {
        let text = |status, body: &str| admin::Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        };
        if method != "GET" {
            return text(405, "only GET is served here\n");
        }
        match path {
            "/metrics" => admin::Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics::render(&self.snapshot()),
            },
            "/healthz" => {
                let ready = self
                    .workers
                    .values()
                    .any(|w| w.role != Role::Draining && self.scoreboard.slot(w.board).is_ready());
                match (self.phase, ready) {
                    (Phase::Serving, true) => text(200, "ok\n"),
                    (Phase::Serving, false) => text(503, "no worker ready\n"),
                    (Phase::Stopping { .. }, _) => text(503, "stopping\n"),
                }
            }
            _ => text(404, "not found: try /metrics or /healthz\n"),
        }
    }

    /// The numbers `/metrics` shows, read from the scoreboard now.
    fn snapshot(&self) -> metrics::Snapshot {
        let mut all = self.retired.clone();
        let mut workers: Vec<metrics::WorkerView> = self
            .workers
            .iter()
            .map(|(pid, worker)| {
                let mut totals = Totals::default();
                totals.add(
                    &self.scoreboard.slot(worker.board).stats,
                    &worker.plugins,
                    true,
                );
                all.merge(&totals);
                metrics::WorkerView {
                    index: worker.index,
                    pid: pid.as_raw(),
                    role: match worker.role {
                        Role::Serving => "serving",
                        Role::Outgoing => "outgoing",
                        Role::Draining => "draining",
                    },
                    totals,
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.index, w.pid));
        metrics::Snapshot {
            workers,
            all,
            restarts: self.restarts_total,
            last_exits: self.last_exits.clone(),
            timeouts: self.timeouts.clone(),
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
                    self.workers.len()
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

    /// SIGHUP: reload. Re-read and validate the config and load every plugin
    /// in a child (as `--check` does); on any problem log it and change
    /// nothing. Otherwise bind new listeners (keeping the sockets of
    /// unchanged ones), start a new worker per slot with the new config and
    /// `.so` files, and drain the old workers once every new one is ready.
    fn handle_hup(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        if self.reload.is_some() {
            tracing::warn!("SIGHUP received while a reload is in progress: ignored");
            return;
        }
        let file = self.config.file.clone();
        tracing::info!("SIGHUP received: reloading {}", file.display());
        let mut config = match config::load(&file) {
            Ok(config) => config,
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!("{line}");
                }
                tracing::error!(
                    "reload aborted: the config is invalid; still serving the previous one"
                );
                return;
            }
        };
        if let Err(count) = check_and_report(&mut config) {
            tracing::error!(
                "reload aborted: {count} plugin problem(s); still serving the previous config"
            );
            return;
        }
        // Bind the new addresses first: if one fails, nothing has changed.
        let mut fresh = Vec::new();
        for spec in &config.listeners {
            let existing = self.listeners.iter().find(|b| b.addr == spec.addr);
            if let Some(existing) = existing {
                if existing.reuseport != spec.reuseport {
                    tracing::error!(
                        "reload aborted: listener {} changes reuseport ({}:{}); that needs a restart",
                        spec.addr,
                        config.file.display(),
                        spec.line
                    );
                    return;
                }
                continue;
            }
            match Bound::bind(spec, &config) {
                Ok(bound) => fresh.push(bound),
                Err(message) => {
                    tracing::error!("{message}");
                    tracing::error!("reload aborted: still serving the previous config");
                    for bound in fresh {
                        bound.close();
                    }
                    return;
                }
            }
        }
        // Unchanged addresses keep their sockets (shared by old and new
        // workers, so no connection is refused); removed ones are kept aside
        // until the old workers are gone, in case the reload rolls back.
        let (mut listeners, removed): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|b| config.listeners.iter().any(|l| l.addr == b.addr));
        let plugin_of = |addr: &Endpoint| {
            config
                .listeners
                .iter()
                .find(|l| l.addr == *addr)
                .map_or("?", |l| config.plugins[l.plugin].name.as_str())
        };
        for bound in &listeners {
            tracing::info!(
                "listener {}: socket kept (plugin {:?})",
                bound.addr,
                plugin_of(&bound.addr)
            );
        }
        for bound in &fresh {
            tracing::info!(
                "listener {}: added by the new config (plugin {:?})",
                bound.addr,
                plugin_of(&bound.addr)
            );
        }
        for bound in &removed {
            tracing::info!(
                "listener {}: removed by the new config, closing once the old workers are gone",
                bound.addr
            );
        }
        listeners.extend(fresh);
        let previous = std::mem::replace(&mut self.config, config);
        self.plugin_names = plugin_names(&self.config);
        self.generation += 1;
        self.reload = Some(PendingReload {
            generation: self.generation,
            previous,
            previous_listeners: removed,
            previous_slots: self.slots.len(),
            started: Instant::now(),
        });
        self.listeners = listeners;
        // Every current worker becomes outgoing; every slot gets a new one.
        for worker in self.workers.values_mut() {
            if worker.role == Role::Serving {
                worker.role = Role::Outgoing;
            }
        }
        let now = Instant::now();
        self.slots = (0..self.config.server.worker_count())
            .map(|_| Slot::empty(now))
            .collect();
        tracing::info!(
            "reload: starting {} new worker(s); the old ones serve until all are ready",
            self.slots.len()
        );
    }

    /// SIGTTIN: one worker more.
    fn handle_ttin(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        self.slots.push(Slot::empty(Instant::now()));
        tracing::info!("SIGTTIN received: {} worker(s) now", self.slots.len());
    }

    /// SIGTTOU: one worker fewer (never below one); the removed worker drains.
    fn handle_ttou(&mut self) {
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
    fn halt(&mut self, code: i32, how: Stop) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
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
        if let Some(reload) = self.reload.take() {
            for bound in reload.previous_listeners {
                bound.close();
            }
        }
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
            // Not one of ours (an orphan a plugin left behind, adopted by
            // the master as subreaper): reaped, nothing else to do.
            let Some(worker) = self.workers.remove(&pid) else {
                continue;
            };
            // What its plugins started goes with it.
            sweep_group(pid);
            // Keep its numbers before the entry is reused.
            self.retired.add(
                &self.scoreboard.slot(worker.board).stats,
                &worker.plugins,
                false,
            );
            self.free_boards.push(worker.board);
            if let Some(slot) = self.slots.get_mut(worker.index) {
                if slot.pid == Some(pid) {
                    slot.pid = None;
                }
            }
            self.on_worker_exit(pid, worker, exit);
        }
    }

    /// Logs a worker's death with the plugin it was running, and schedules
    /// its replacement (or gives up, or rolls a reload back).
    fn on_worker_exit(&mut self, pid: Pid, worker: Worker, exit: Exit) {
        let now = Instant::now();
        let index = worker.index;
        let running = match self.scoreboard.slot(worker.board).in_flight() {
            Some(plugin) => format!(
                " while running plugin {:?}",
                worker.plugins.get(plugin).map_or("?", String::as_str)
            ),
            None => String::new(),
        };
        if let Phase::Stopping { .. } = self.phase {
            tracing::info!("worker {index} (pid {pid}) exited: {exit}{running}");
            return;
        }
        if worker.role != Role::Serving {
            let level_ok = exit == Exit::Code(exit_code::OK);
            if level_ok {
                tracing::info!("old worker {index} (pid {pid}) finished draining and exited");
            } else {
                tracing::warn!("old worker {index} (pid {pid}) exited: {exit}{running}");
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
            tracing::error!("new worker {index} (pid {pid}) failed to start: {cause}");
            self.roll_back_reload();
            return;
        }
        self.last_exits.insert(index, cause.clone());
        let Some(slot) = self.slots.get_mut(index) else {
            // Its slot was removed (SIGTTOU) meanwhile: nothing to restart.
            tracing::info!("worker {index} (pid {pid}) exited: {cause}");
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
        match decision::on_worker_exit(boot, boot_failures, self.restarts.len() as u32, max) {
            Decision::Restart => {
                self.restarts.push_back(now);
                self.restarts_total += 1;
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
                if boot == Boot::PluginRefused {
                    tracing::error!(
                        "worker {index} (pid {pid}) failed to start: {cause}; stopping, since a new worker would fail the same way"
                    );
                } else {
                    tracing::error!(
                        "worker {index} (pid {pid}) failed to start: {cause}; that is {boot_failures} workers in a row that never became ready: stopping"
                    );
                }
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

    /// A reload failed after the new workers started: kill them and put the
    /// previous config, listeners and workers back.
    fn roll_back_reload(&mut self) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        tracing::error!("reload rolled back: still serving the previous config");
        // The new generation goes: ready workers may be serving clients, so
        // they drain (no answer is cut); the others never served and are killed.
        let new_workers: Vec<(Pid, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == reload.generation)
            .map(|(pid, w)| (*pid, w.board))
            .collect();
        for (pid, board) in new_workers {
            if self.scoreboard.slot(board).is_ready() {
                self.drain(pid);
            } else if let Some(worker) = self.workers.get_mut(&pid) {
                worker.role = Role::Draining;
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        // Sockets bound only for the new config are dropped; unchanged ones
        // are shared and stay.
        let (mut listeners, added): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|b| reload.previous.listeners.iter().any(|l| l.addr == b.addr));
        for bound in added {
            bound.close();
        }
        listeners.extend(reload.previous_listeners);
        self.listeners = listeners;
        self.config = reload.previous;
        self.plugin_names = plugin_names(&self.config);
        self.generation += 1;
        let now = Instant::now();
        self.slots = (0..reload.previous_slots)
            .map(|_| Slot::empty(now))
            .collect();
        // Outgoing workers serve again, one per slot; any extra drains.
        let outgoing: Vec<(Pid, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.role == Role::Outgoing)
            .map(|(pid, w)| (*pid, w.index))
            .collect();
        for (pid, index) in outgoing {
            match self.slots.get_mut(index) {
                Some(slot) if slot.pid.is_none() => {
                    slot.pid = Some(pid);
                    if let Some(worker) = self.workers.get_mut(&pid) {
                        worker.role = Role::Serving;
                    }
                }
                _ => self.drain(pid),
            }
        }
        self.truncate_reuseport_sockets();
    }

    /// With `reuseport`, a socket per slot: a slot that no longer exists
    /// must not keep a listening socket nobody accepts from.
    fn truncate_reuseport_sockets(&mut self) {
        let slots = self.slots.len();
        for bound in &mut self.listeners {
            bound.truncate(slots);
        }
    }

    /// Each loop: the hung-call watchdog, retirement requests, and the
    /// hand-over from outgoing workers to ready replacements.
    fn watch_workers(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        let now = Instant::now();
        let mut retiring = Vec::new();
        for (&pid, worker) in self.workers.iter_mut() {
            let board = self.scoreboard.slot(worker.board);
            // A worker still loading its plugins is held to init_timeout
            // (its config's: a reload may have changed it meanwhile, but
            // both are in force for their own workers).
            let (timeout, key) = if board.is_ready() {
                (self.config.server.plugin_timeout, "plugin_timeout")
            } else {
                (self.config.server.init_timeout, "init_timeout")
            };
            // The watchdog: a call in flight whose counter has not moved for
            // plugin_timeout is hung; SIGKILL, since a hung plugin would not
            // act on SIGTERM.
            let calls = board.calls();
            let in_flight = board.in_flight();
            match in_flight {
                Some(plugin) if calls == worker.watched_calls => {
                    let elapsed = now.duration_since(worker.watched_since);
                    if elapsed < timeout || worker.hung.is_some() {
                        continue;
                    }
                    tracing::error!(
                        "plugin {:?} has not returned for {elapsed:.1?} in worker {} (pid {pid}), over {key} = {timeout:?}: killing the worker",
                        worker.plugins.get(plugin).map_or("?", String::as_str),
                        worker.index
                    );
                    worker.hung = Some((plugin, elapsed));
                    let name = worker.plugins.get(plugin).cloned().unwrap_or_default();
                    *self.timeouts.entry(name).or_default() += 1;
                    let _ = kill(pid, Signal::SIGKILL);
                }
                _ => {
                    worker.watched_calls = calls;
                    worker.watched_since = now;
                }
            }
            if worker.role == Role::Serving && board.wants_retirement() {
                retiring.push(pid);
            }
        }
        for pid in retiring {
            if let Some(worker) = self.workers.get_mut(&pid) {
                tracing::info!(
                    "worker {} (pid {pid}) served max_requests_per_worker: replacing it",
                    worker.index
                );
                worker.role = Role::Outgoing;
                if let Some(slot) = self.slots.get_mut(worker.index) {
                    slot.pid = None;
                    slot.restart_at = now;
                }
            }
        }

        // Hand-over: once every slot has a ready worker, outgoing ones drain
        // and a pending reload is complete (whether or not old workers are
        // still around: they may have died meanwhile).
        let outgoing: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.role == Role::Outgoing)
            .map(|(pid, _)| *pid)
            .collect();
        if outgoing.is_empty() && self.reload.is_none() {
            return;
        }
        let all_ready = self.slots.iter().all(|slot| {
            slot.pid
                .and_then(|pid| self.workers.get(&pid))
                .is_some_and(|w| self.scoreboard.slot(w.board).is_ready())
        });
        if all_ready {
            if let Some(reload) = self.reload.take() {
                for bound in reload.previous_listeners {
                    bound.close();
                }
                tracing::info!(
                    "reload complete in {:.1?}: {} new worker(s) serving; draining {} old worker(s)",
                    reload.started.elapsed(),
                    self.slots.len(),
                    outgoing.len()
                );
            }
            for pid in outgoing {
                self.drain(pid);
            }
            self.truncate_reuseport_sockets();
        } else if self
            .reload
            .as_ref()
            .is_some_and(|r| r.started.elapsed() > RELOAD_TIMEOUT)
        {
            tracing::error!("reload: the new workers were not all ready within {RELOAD_TIMEOUT:?}");
            self.roll_back_reload();
        }
    }

    /// Tells one worker to drain (SIGTERM) and stop counting it as serving.
    fn drain(&mut self, pid: Pid) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.role = Role::Draining;
            let _ = kill(pid, Signal::SIGTERM);
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
                        // The other workers keep serving; try again later
                        // (fork fails with EAGAIN/ENOMEM right after an OOM
                        // kill, say), backing off like a crash loop.
                        let slot = &mut self.slots[index];
                        slot.crash_streak += 1;
                        let delay = decision::restart_delay(slot.crash_streak.max(2));
                        slot.restart_at = now + delay;
                        tracing::error!(
                            "cannot start worker {index}: {e}; trying again in {delay:?}"
                        );
                    }
                }
                None
            }
            Phase::Stopping { code, deadline } => {
                if self.workers.is_empty() {
                    sweep_orphans();
                    tracing::info!("stopped");
                    return Some(code);
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        "{} worker(s) still running past the stop deadline: sending SIGKILL",
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
        let Some(board) = self.free_boards.pop() else {
            tracing::error!(
                "no free scoreboard entry for worker {index} ({SCOREBOARD_ENTRIES} workers alive?)"
            );
            return Err(Errno::EAGAIN);
        };
        for bound in &mut self.listeners {
            if let Err(e) = bound.prepare(index) {
                tracing::error!(
                    "cannot bind another reuseport socket on {}: {e}",
                    bound.addr
                );
                self.free_boards.push(board);
                return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
            }
        }
        // The new worker starts with a clean entry (it resets it too; doing
        // it here as well means the watchdog never sees stale state).
        self.scoreboard.slot(board).reset();
        // SAFETY: the master is single-threaded and never loads plugins, so
        // the child may allocate and run arbitrary code after fork.
        match unsafe { fork() } {
            Err(e) => {
                self.free_boards.push(board);
                Err(e)
            }
            Ok(ForkResult::Parent { child }) => {
                let now = Instant::now();
                self.slots[index].pid = Some(child);
                self.workers.insert(
                    child,
                    Worker {
                        index,
                        generation: self.generation,
                        board,
                        role: Role::Serving,
                        started: now,
                        plugins: self.plugin_names.clone(),
                        watched_calls: 0,
                        watched_since: now,
                        hung: None,
                    },
                );
                tracing::info!("worker {index} started (pid {child})");
                Ok(())
            }
            Ok(ForkResult::Child) => {
                // SAFETY: these descriptors are the master's epoll instance and
                // signalfd, inherited by the fork; this process never returns
                // to the code that owns them (it exits below).
                unsafe {
                    libc::close(self.poll.as_raw_fd());
                    libc::close(self.signals.raw_fd());
                }
                // The admin listener and its clients are the master's.
                drop(self.admin.take());
                // This worker's sockets, in the order of its config's listeners.
                let mut available = std::mem::take(&mut self.listeners);
                let sockets = self
                    .config
                    .listeners
                    .iter()
                    .filter_map(|spec| {
                        let bound = available.iter_mut().find(|b| b.addr == spec.addr)?;
                        bound.take_for(index)
                    })
                    .collect();
                // The rest are copies of the master's sockets: closing them
                // here does not close them in the master (and `close` is
                // never called, so no socket file is removed).
                drop(available);
                self.reload = None;
                let who = worker::Identity {
                    index,
                    count: self.slots.len(),
                    master,
                };
                let code = worker::run(&self.config, sockets, who, self.scoreboard.slot(board));
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
