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
//! always safe; plugins are validated in a short-lived child ([`check`]),
//! which during a reload is one more event source of the loop: the master
//! never waits on it (see `reload.rs`).
//!
//! Files: this one holds the state and the loop; `signals.rs` what each
//! signal does (stop, TTIN/TTOU, USR1); `status.rs` `/metrics` and
//! `/healthz`; `pool.rs` forks and watches workers; `reap.rs` handles their exits;
//! `reload.rs` is SIGHUP (`reload_log.rs` its status file); `upgrade/` is
//! SIGUSR2, the binary upgrade; `listeners.rs` the bound sockets; [`admin`] and
//! [`metrics`] the HTTP endpoint; [`check`] the plugin checker;
//! [`decision`] the restart policy.

pub mod admin;
pub mod check;
pub mod decision;
mod listeners;
pub mod metrics;
mod pool;
mod reap;
mod relay;
mod reload;
mod reload_log;
mod signals;
mod status;
mod upgrade;

use listeners::{bind_listeners, Bound};
pub(crate) use reap::sweep_group;
use reap::sweep_orphans;
pub(crate) use reload::outcome_within as reload_outcome_within;
use reload::{Checking, PendingReload, MAX_OLD_GENERATIONS};
use reload_log::ReloadLog;
pub use upgrade::stash_channel as stash_upgrade_channel;
use upgrade::{Predecessor, Successor, UpgradeLog};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use nix::sys::signal::Signal;
use nix::unistd::{getpid, Pid};

use crate::config::{self, Config};
use crate::exit_code;
use crate::listener::Endpoint;
use crate::scoreboard::{Scoreboard, Totals};
use crate::signals::Signals;
use crate::worker;
use decision::{Boot, Decision, Exit};

/// The master's `signalfd`.
const SIGNALS: Token = Token(0);
/// The report pipe of a reload's plugin checker.
const CHECK: Token = Token(1);
/// The admin listener; its clients take the tokens above it.
const ADMIN: usize = 2;
/// How long workers get beyond their own deadline (`shutdown_timeout` for a
/// graceful stop, none for a fast one) before the master kills them.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Workers one generation may have, for sizing the scoreboard at startup:
/// twice the workers the master starts with, at least 8, so that a reload
/// or SIGTTIN may add some. More needs a restart.
fn worker_room(workers: usize) -> usize {
    workers.saturating_mul(2).max(8)
}

/// Scoreboard entries for `room` workers per generation: every generation
/// that may be alive at once (the serving one and [`MAX_OLD_GENERATIONS`]
/// draining), each slot with its worker and, at most, the one it replaced
/// (`max_requests_per_worker`) still draining, and a few spare. Reloads
/// wait, and recycling and SIGTTIN hold back, rather than go past it, so
/// a worker never lacks an entry.
fn scoreboard_entries(room: usize) -> usize {
    room * (MAX_OLD_GENERATIONS + 1) * 2 + 8
}
/// A reload whose new workers are not all ready by then is rolled back
/// (at least; see [`ready_within`]).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the new workers of `config` may take to be ready before a
/// reload is rolled back: [`RELOAD_TIMEOUT`], or more when every plugin's
/// init may legitimately take up to `init_timeout` (each worker loads them
/// one after the other).
fn ready_within(config: &Config) -> Duration {
    let plugins = u32::try_from(config.plugins.len()).unwrap_or(u32::MAX);
    config
        .server
        .init_timeout
        .saturating_mul(plugins)
        .saturating_add(Duration::from_secs(10))
        .max(RELOAD_TIMEOUT)
}
/// How often the master looks at the scoreboard while replacing workers.
const REPLACEMENT_TICK: Duration = Duration::from_millis(10);

/// The signals the master handles. SIGUSR1 reopens the log file (what
/// logrotate scripts send nginx and gunicorn); SIGUSR2 (nginx's binary
/// upgrade) and SIGWINCH (nginx's "retire workers") are taken so that they
/// cannot kill the master — their default action would end it silently —
/// and so are the other signals nobody means to stop a server with.
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
    /// The master's end of its control channel (see [`relay`]); `None`
    /// if it could not be made, or once the worker closed it.
    control: Option<std::os::fd::OwnedFd>,
    /// When it was told to drain.
    draining_since: Option<Instant>,
    /// Its config's `shutdown_timeout`: how long it may drain (plus
    /// [`STOP_GRACE`]) before the master kills it.
    shutdown_timeout: Duration,
    /// Killed for draining too long.
    drain_killed: bool,
    /// Killed by the master at the stop deadline (not by the OOM killer or
    /// an operator, as a bare SIGKILL would suggest).
    killed_at_stop: bool,
    /// Killed by the master because the reload that started it rolled back
    /// before it was ready.
    rollback_killed: bool,
    /// Its config's `plugin_timeout` and `init_timeout`: the watchdog
    /// holds each worker to its own config's, not to a later reload's.
    plugin_timeout: Duration,
    init_timeout: Duration,
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
    /// A reload whose config's plugins are being checked in a child.
    checking: Option<Checking>,
    /// A reload waiting for the one under way, or for old generations to
    /// finish draining (SIGHUPs meanwhile join it): its id.
    queued: Option<u64>,
    /// The reload status file `nbnet reload` waits on.
    reloads: ReloadLog,
    /// The config generation new workers are started with.
    generation: u64,
    /// The last generation number handed out.
    generations: u64,
    /// Workers one generation may have (see [`worker_room`]).
    worker_room: usize,
    /// Workers killed for draining too long.
    drain_kills: u64,
    /// Locked while the master runs; removed when it is dropped (a reload
    /// that moves it swaps in the new one when it completes).
    pid_file: Option<crate::pid_file::PidFile>,
    phase: Phase,
    /// The `/metrics` and `/healthz` listener, if configured.
    admin: Option<admin::Admin>,
    /// Numbers of workers that have exited, so totals never go backwards
    /// (plus the master's own hand-over failures).
    retired: Totals,
    /// The same per pool slot (the `worker` label of `/metrics`).
    retired_slots: BTreeMap<usize, Totals>,
    /// Serving workers' deaths by reason (`metrics::EXIT_REASONS` index).
    exits: [u64; metrics::EXIT_REASONS.len()],
    /// Restarts since the master started.
    restarts_total: u64,
    /// Why each slot's last worker exited (one of `metrics::EXIT_REASONS`).
    last_exits: BTreeMap<usize, &'static str>,
    /// Watchdog kills per plugin.
    timeouts: BTreeMap<String, u64>,
    /// Hand-over relay: where the next connection goes (round robin), and
    /// connections waiting for a taker's channel to have room.
    relay_next: usize,
    relay_waiting: VecDeque<relay::Waiting>,
    /// Every slot of the serving config has had a ready worker: from then
    /// on a worker that fails to start is restarted like any crash (see
    /// [`decision::on_worker_exit`]).
    up: bool,
    /// `RELOADING=1` was sent to systemd: `READY=1` follows once the reload
    /// is over (done, aborted or rolled back) and the server is up.
    reloading: bool,
    /// Children the process had before it started serving (not ours to
    /// sweep at the end of a stop).
    children_before: Vec<Pid>,
    /// A graceful stop waiting out `drain_delay` (serving, `/healthz` 503)
    /// until this instant.
    lame_duck: Option<Instant>,
    /// The binary this master runs, as its path was when it started: a
    /// binary upgrade executes whatever is at that path now.
    binary: std::path::PathBuf,
    /// The new master of a binary upgrade this master started.
    successor: Option<Successor>,
    /// The old master this one is taking over from (a binary upgrade).
    predecessor: Option<Predecessor>,
    /// The upgrade status file `nbnet upgrade` waits on.
    upgrades: UpgradeLog,
}

/// Serves `config` until stopped; returns the process exit code.
pub fn serve(mut config: Config) -> i32 {
    // Plugins never run as root unless the operator says so.
    match crate::privileges::check(&config) {
        Ok(Some(note)) => tracing::info!("{note}"),
        Ok(None) => {}
        Err(why) => {
            tracing::error!("{why}");
            return exit_code::CONFIG_INVALID;
        }
    }
    if let Some(run_as) = &config.server.run_as {
        if nix::unistd::Uid::effective().is_root() {
            tracing::info!("workers and the plugin checker run as {run_as}; the master stays root to bind sockets on reload");
            if let Some(file) = &config.log.file {
                // Workers reopen it on SIGUSR1.
                if let Err(e) = crate::privileges::chown_for_workers(Some(run_as), file) {
                    tracing::warn!("cannot give the log file {} to {run_as}: {e}; workers cannot reopen it on SIGUSR1", file.display());
                }
            }
        }
    }
    // Started by an older master to take over from it (a binary upgrade)?
    let predecessor = Predecessor::take();
    if let Some(predecessor) = &predecessor {
        tracing::info!(
            "upgrade: taking over from master {} (it serves until this one is ready)",
            predecessor.pid()
        );
    }
    // First the PID file's lock: a second master with the same file is
    // refused before it binds anything (with `reuseport` it could). A new
    // master of an upgrade takes it once the old one hands it over.
    let pid_file_path = config
        .server
        .pid_file
        .as_deref()
        .filter(|_| predecessor.is_none());
    let pid_file = match pid_file_path.map(crate::pid_file::PidFile::acquire) {
        None => None,
        Some(Ok(locked)) => Some(locked),
        Some(Err(message)) => {
            tracing::error!("{message}");
            return exit_code::FAILURE;
        }
    };

    // 0. Processes that plugins start and that outlive their worker become
    //    the master's children (not init's), so that the master can reap
    //    them and sweep them away when it stops.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(
            "cannot become a child subreaper ({e}): processes plugins start may outlive nbnet"
        );
    }

    let children_before = crate::orphans::children();
    // Listening sockets passed by systemd (or by an older master handing
    // over to this binary), taken before anything else can touch them.
    let mut inherited = listeners::Inherited::take();

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
    let bound = bind_listeners(&config, &mut inherited);
    // An old master passes its [admin] socket too.
    let inherited_admin = config
        .admin
        .and_then(|addr| inherited.claim_tcp(addr).ok().flatten());
    inherited.close_unused();
    let listeners = match bound {
        Ok(listeners) => listeners,
        Err(message) => {
            tracing::error!("{message}");
            return exit_code::FAILURE;
        }
    };

    // 3. Signals become events of the master's loop (the mask is inherited
    //    by workers, which read their own signalfd), and the scoreboard is
    //    mapped before any worker exists so that all of them share it.
    let room = worker_room(config.server.worker_count());
    let entries = scoreboard_entries(room);
    // And the ones nobody means to stop a server with (logged, ignored).
    let setup = Signals::block(&[&MASTER_SIGNALS[..], &crate::signals::STRAY[..]].concat())
        .and_then(|signals| Ok((signals, Scoreboard::new(entries)?)))
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
        Some(addr) => match inherited_admin.map_or_else(
            || admin::Admin::bind(addr, poll.registry(), ADMIN),
            |socket| admin::Admin::from_listener(socket, poll.registry(), ADMIN),
        ) {
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

    let reloads = ReloadLog::new(pid_file.as_ref().map(|p| p.path()));
    let upgrades = UpgradeLog::new(pid_file.as_ref().map(|p| p.path()));
    if let Some(predecessor) = &predecessor {
        if let Err(e) = predecessor.register(poll.registry()) {
            tracing::error!("cannot watch the upgrade channel to the old master: {e}");
            return exit_code::FAILURE;
        }
    }
    let binary = binary_path();

    let now = Instant::now();
    let worker_count = config.server.worker_count();
    let mut master = Master {
        plugin_names: plugin_names(&config),
        config,
        listeners,
        poll,
        signals,
        scoreboard,
        free_boards: (0..entries).rev().collect(),
        slots: (0..worker_count).map(|_| Slot::empty(now)).collect(),
        workers: HashMap::new(),
        restarts: VecDeque::new(),
        reload: None,
        checking: None,
        queued: None,
        reloads,
        generation: 0,
        generations: 0,
        worker_room: room,
        drain_kills: 0,
        pid_file,
        phase: Phase::Serving,
        admin,
        retired: Totals::default(),
        retired_slots: BTreeMap::new(),
        exits: Default::default(),
        restarts_total: 0,
        last_exits: BTreeMap::new(),
        timeouts: BTreeMap::new(),
        relay_next: 0,
        relay_waiting: VecDeque::new(),
        up: false,
        reloading: false,
        children_before,
        lame_duck: None,
        binary,
        successor: None,
        predecessor,
        upgrades,
    };
    tracing::info!(
        "master {} starting {worker_count} worker(s) from {}",
        getpid(),
        master.config.file.display()
    );
    // A new master of an upgrade got every reuseport socket the old one
    // had: those of slots it does not have would queue connections nobody
    // accepts.
    master.truncate_reuseport_sockets();
    // From here on the log file alone gets the lines (with `[log] file`).
    crate::logging::started();
    let code = master.run();
    master.reloads.remove();
    master.upgrades.remove();
    // Removes the PID file (and releases its lock).
    drop(master);
    code
}

/// The binary an upgrade runs: the path this process was started as
/// (`argv[0]` made absolute, not resolved: through a `current` symlink,
/// the release it points to *then*), or `/proc/self/exe` when `argv[0]` is
/// a bare name found through `$PATH`.
fn binary_path() -> std::path::PathBuf {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let path = std::path::Path::new(&argv0);
    if path.components().count() > 1 {
        if let Ok(absolute) = std::path::absolute(path) {
            return absolute;
        }
    }
    std::env::current_exe().unwrap_or_else(|_| path.to_path_buf())
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
                    .filter(|&t| admin.owns(t) && t.0 < upgrade::PREDECESSOR.0)
                    .collect();
                for token in tokens {
                    admin.on_event(token, self.poll.registry(), &mut |method, path| {
                        self.answer_admin(method, path)
                    });
                }
                admin.expire(Instant::now(), self.poll.registry());
                self.admin = Some(admin);
            }
            // Connections handed over by workers being replaced.
            let controls: Vec<usize> = events
                .iter()
                .map(|e| e.token().0)
                .filter(|&t| t >= relay::CONTROL_BASE)
                .map(|t| t - relay::CONTROL_BASE)
                .collect();
            for board in controls {
                self.on_control(board);
            }
            for event in events.iter() {
                if event.token() == upgrade::SUCCESSOR {
                    self.on_successor_channel();
                } else if event.token() == upgrade::PREDECESSOR {
                    self.on_predecessor_channel();
                }
            }
            self.relay_retry();
            for (signal, sender) in self.signals.pending_with_senders() {
                match signal {
                    Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                        if let Some(who) = self.sender_is_ours(sender) {
                            // An operator's signal is routine; one from our
                            // own worker means a plugin sent it.
                            tracing::warn!(
                                "{signal} comes from {who}: a plugin stopped the server"
                            );
                        }
                        self.handle_stop(signal)
                    }
                    Signal::SIGHUP => self.handle_hup(),
                    Signal::SIGTTIN => self.handle_ttin(),
                    Signal::SIGTTOU => self.handle_ttou(),
                    // Reaping is done below, whatever woke us.
                    Signal::SIGCHLD => {}
                    Signal::SIGUSR2 => self.handle_usr2(),
                    Signal::SIGUSR1 => self.handle_usr1(),
                    Signal::SIGWINCH => tracing::info!("SIGWINCH received: ignored"),
                    other => tracing::warn!(
                        "{other} received{}: ignored (nbnet has no use for it; its default action would have ended the master)",
                        if sender > 0 { format!(" from pid {sender}") } else { String::new() }
                    ),
                }
            }
            if self.lame_duck.is_some_and(|until| Instant::now() >= until) {
                self.begin_stop("drain_delay is over", Stop::Graceful);
            }
            self.reap_workers();
            self.watch_successor();
            self.advance_reloads();
            self.kill_overdue_drains();
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
        let check = self.checking.as_ref().and_then(Checking::deadline);
        [
            self.next_wakeup_for_workers(),
            admin,
            check,
            self.next_drain_deadline(),
            self.relay_wakeup(),
            self.lame_duck,
            self.successor_wakeup(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn next_wakeup_for_workers(&self) -> Option<Instant> {
        let now = Instant::now();
        // Look often enough to catch a hang within a quarter of the timeout.
        let watchdog = (self
            .config
            .server
            .plugin_timeout
            .min(self.config.server.init_timeout)
            / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
        match self.phase {
            Phase::Stopping { deadline, .. } => Some(deadline.min(now + watchdog)),
            Phase::Serving => {
                let restart = self
                    .slots
                    .iter()
                    .filter(|slot| slot.pid.is_none())
                    .map(|slot| slot.restart_at)
                    .min();
                // (A new master's first workers count: the old master waits.)
                let replacing = self.workers.values().any(|w| w.role == Role::Outgoing)
                    || (self.predecessor.is_some() && !self.up);
                // And quickly while a replacement is starting.
                let tick = if replacing {
                    REPLACEMENT_TICK
                } else {
                    watchdog
                };
                Some(restart.map_or(now + tick, |at| at.min(now + tick)))
            }
        }
    }
}
