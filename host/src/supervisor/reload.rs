//! Reload (SIGHUP): validate the new config and its plugins without
//! holding up the master's loop, start a new generation of workers beside
//! the old one, drain the old one once every new worker is ready — or put
//! everything back if the new one fails.
//!
//! A reload goes: *queued* (while another reload is under way, or while
//! [`MAX_OLD_GENERATIONS`] older generations of workers still drain; the
//! SIGHUPs that arrive meanwhile join it) → *checking* (the config is
//! parsed; a child loads every plugin and reports through a pipe that the
//! master's `Poll` watches, while the loop goes on reaping, replacing and
//! watching workers and answering `/healthz`) → *starting* (new workers;
//! the old ones serve until all are ready) → *done*, *refused*, *rolled
//! back* or *cancelled*. Each step is written to the status file that
//! `nbnet reload` waits on ([`crate::reload_status`]).
//!
//! Every config key takes effect: listeners, workers and every `[server]`
//! limit through the new workers; `[log] level` and a kept Unix socket's
//! `mode` at once (workers started from then on inherit the level); `[admin] addr` and `[server] pid_file` move
//! when the reload completes (the new address is bound, and the new file
//! written, before the reload goes ahead, so either failing refuses it).
//! What cannot change without a restart (a listener's `reuseport`, more
//! workers than the scoreboard was sized for, `[log] file`) refuses the
//! reload, naming the key.

use std::time::Instant;

use mio::unix::SourceFd;
use mio::Interest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;
use crate::logging;
use crate::reload_status::State;

/// Older worker generations that may still be draining when a reload
/// starts a new one; a SIGHUP beyond that waits (queued) until one is gone.
pub(crate) const MAX_OLD_GENERATIONS: usize = 2;

/// How long `nbnet reload` waits for the outcome of a reload of `config`
/// by default: long enough for a reload queued behind draining
/// generations, a plugin check that uses every `init_timeout`, and new
/// workers that take [`ready_within`] to be ready.
pub(crate) fn outcome_within(config: &Config) -> std::time::Duration {
    let plugins = u32::try_from(config.plugins.len() + 1).unwrap_or(u32::MAX);
    let drains = config
        .server
        .shutdown_timeout
        .saturating_add(STOP_GRACE)
        .saturating_mul(MAX_OLD_GENERATIONS as u32);
    config
        .server
        .init_timeout
        .saturating_mul(plugins)
        .saturating_add(drains)
        .saturating_add(ready_within(config))
        .saturating_add(std::time::Duration::from_secs(10))
}

/// A reload whose new workers are not all ready yet: what to go back to.
pub(super) struct PendingReload {
    /// Its id in the status file.
    pub(super) id: u64,
    /// The generation the reload started; its workers are the new ones.
    pub(super) generation: u64,
    /// The generation serving before it.
    pub(super) previous_generation: u64,
    pub(super) previous: Config,
    pub(super) previous_listeners: Vec<Bound>,
    pub(super) previous_slots: usize,
    pub(super) started: Instant,
    /// What happens to the admin listener when the reload completes.
    pub(super) admin: AdminChange,
    /// When the reload moves `pid_file`: the new one, written and locked
    /// already (`None`: the new config has none). It replaces the old one
    /// when the reload completes; dropped (removed) if it does not.
    pub(super) moved_pid_file: Option<Option<crate::pid_file::PidFile>>,
}

/// A change of `[admin] addr`, applied when the reload completes.
pub(super) enum AdminChange {
    /// Unchanged.
    Keep,
    /// Removed from the config: stop serving it.
    Close,
    /// A new address, bound already (so a reload that could not bind it was
    /// refused before anything changed).
    Move(std::net::TcpListener),
}

/// A reload whose config's plugins are being loaded in a checker child.
pub(super) struct Checking {
    id: u64,
    config: Config,
    check: check::Check,
}

impl Checking {
    /// The checker's process id.
    pub(super) fn pid(&self) -> Pid {
        self.check.pid()
    }

    /// The master's reaper collected the checker.
    pub(super) fn exited(&mut self, exit: decision::Exit) {
        self.check.exited(exit);
    }

    /// The master's reaper saw the checker stopped (by its plugin).
    pub(super) fn stopped(&mut self, signal: nix::sys::signal::Signal) {
        self.check.stopped(signal);
    }

    /// When the checker is killed unless it makes progress.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.check.deadline()
    }
}

impl Master {
    /// SIGHUP: reload — now, or queued behind the reload under way (or
    /// until an old generation has finished draining). SIGHUPs that arrive
    /// while one is queued join it: it reads the config when it runs, so
    /// it takes every edit made before.
    pub(super) fn handle_hup(&mut self) {
        if self.phase != Phase::Serving {
            tracing::info!("SIGHUP received while stopping: ignored");
            return;
        }
        if let Some(id) = self.queued {
            tracing::info!(
                "SIGHUP received: reload {id} is queued already and will read the config when it runs; this request joins it"
            );
            return;
        }
        if let Some(why) = self.reload_blocked() {
            let id = self.reloads.add(State::Queued, Some(why.clone()));
            self.queued = Some(id);
            tracing::info!(
                "SIGHUP received: {why}: reload {id} queued; it runs once that is done (SIGHUPs until then join it)"
            );
            return;
        }
        let id = self.reloads.add(State::Checking, None);
        tracing::info!("SIGHUP received: reload {id}");
        self.start_reload(id);
    }

    /// Why a reload cannot start now, if it cannot.
    fn reload_blocked(&self) -> Option<String> {
        if let Some(successor) = &self.successor {
            return Some(format!(
                "a binary upgrade is under way (new master pid {})",
                successor.pid()
            ));
        }
        if let Some(checking) = &self.checking {
            return Some(format!(
                "reload {} is under way (checking its plugins)",
                checking.id
            ));
        }
        if let Some(reload) = &self.reload {
            return Some(format!(
                "reload {} is under way (its new workers are starting)",
                reload.id
            ));
        }
        let old = self.old_generations();
        if old >= MAX_OLD_GENERATIONS {
            return Some(format!(
                "{old} older generations of workers are still draining (at most {MAX_OLD_GENERATIONS} at once, beside the serving one)"
            ));
        }
        None
    }

    /// Generations of workers alive besides the one serving now.
    fn old_generations(&self) -> usize {
        let mut generations: Vec<u64> = self
            .workers
            .values()
            .map(|w| w.generation)
            .filter(|&g| g != self.generation)
            .collect();
        generations.sort_unstable();
        generations.dedup();
        generations.len()
    }

    /// Scoreboard entries spoken for: one per empty slot, and the new
    /// workers of a reload being checked.
    pub(super) fn reserved_boards(&self) -> usize {
        let empty = self.slots.iter().filter(|s| s.pid.is_none()).count();
        let checking = self
            .checking
            .as_ref()
            .map_or(0, |c| c.config.server.worker_count());
        empty + checking
    }

    /// Reads the config file and starts checking its plugins in a child.
    ///
    /// Parsing stays in the master: a config file is at most 16 MiB and the
    /// parser and validation are linear (about 0.7 s at the cap in a
    /// release build), so this is bounded; loading plugins is not (an init
    /// may block, loop or fork), which is why that runs in a child the loop
    /// only watches.
    fn start_reload(&mut self, id: u64) {
        // systemd (Type=notify): READY=1 follows when this reload is over,
        // whatever its outcome (see `watch_workers`).
        crate::systemd::notify_reloading();
        self.reloading = true;
        let file = self.config.file.clone();
        tracing::info!("reload {id}: reading {}", config::shown(&file));
        self.reloads.reading(id);
        let mut config = match config::load(&file) {
            Ok(config) => config,
            Err(e) => {
                for line in e.to_string().lines() {
                    tracing::error!("{line}");
                }
                self.refuse(
                    id,
                    exit_code::CONFIG_INVALID,
                    format!("the config is invalid:\n{e}"),
                );
                return;
            }
        };
        crate::tls::log_warnings(&config);
        if !config.log.same_file(&self.config.log) {
            // The master's descriptor 2, and every worker's, is the file it
            // started with; moving it would mean reopening in every process
            // (and there is no way back to a closed stderr). Say so rather
            // than report a reload that changed nothing.
            let place = match config.log.file_line {
                Some(line) => format!("{}:{line}", config::shown(&file)),
                None => config::shown(&file),
            };
            let target = |log: &config::LogConfig| {
                log.file
                    .as_deref()
                    .map_or("stderr".to_string(), config::shown)
            };
            self.refuse(
                id,
                exit_code::FAILURE,
                format!(
                    "[log] file cannot change without a restart ({place}): the server logs to {}, the new config says {}; restart nbnet to apply it, or put [log] file back (to rotate the log file, rename it and send SIGUSR1)",
                    target(&self.config.log),
                    target(&config.log)
                ),
            );
            return;
        }
        if config.log.format != self.config.log.format {
            self.refuse(
                id,
                exit_code::FAILURE,
                format!(
                    "[log] format cannot change without a restart ({}): the server logs {}, the new config says {}; restart nbnet to apply it, or put [log] format back",
                    config::shown(&file),
                    self.config.log.format.as_str(),
                    config.log.format.as_str()
                ),
            );
            return;
        }
        match crate::privileges::check(&config) {
            Ok(Some(note)) => tracing::info!("reload {id}: {note}"),
            Ok(None) => {}
            Err(why) => {
                self.refuse(id, exit_code::CONFIG_INVALID, why);
                return;
            }
        }
        let workers = config.server.worker_count();
        if workers > self.worker_room {
            self.refuse(
                id,
                exit_code::FAILURE,
                format!(
                    "[server] workers = {workers} in {} is more than the {} workers per generation this master's scoreboard was sized for at startup (twice the workers it started with, at least 8); restart nbnet to apply it",
                    config::shown(&file),
                    self.worker_room
                ),
            );
            return;
        }
        match check::Check::start(&mut config) {
            Err(report) => {
                for error in &report.errors {
                    tracing::error!("{error}");
                }
                self.refuse(id, exit_code::PLUGIN_LOAD_FAILED, plugin_problems(&report));
            }
            Ok(check) => {
                let registered = self.poll.registry().register(
                    &mut SourceFd(&check.fd()),
                    CHECK,
                    Interest::READABLE,
                );
                if let Err(e) = registered {
                    // Still watched: the loop reads the pipe on every
                    // wake-up and at least every tick.
                    tracing::warn!("cannot watch the plugin checker's report pipe: {e}");
                }
                tracing::info!(
                    "reload {id}: loading {} plugin(s) in a checker (pid {}); the old workers serve meanwhile",
                    config.plugins.len(),
                    check.pid()
                );
                self.checking = Some(Checking { id, config, check });
            }
        }
    }

    /// Each loop: follows the plugin check of a reload (its report, its
    /// deadline, its end) and starts a queued reload once nothing holds it
    /// back.
    pub(super) fn advance_reloads(&mut self) {
        if let Some(checking) = self.checking.as_mut() {
            checking.check.read_available();
            checking.check.enforce_deadline(Instant::now());
        }
        if self.checking.as_ref().is_some_and(|c| c.check.is_done()) {
            if let Some(Checking { id, config, check }) = self.checking.take() {
                let _ = self.poll.registry().deregister(&mut SourceFd(&check.fd()));
                let report = check.finish();
                for error in &report.errors {
                    tracing::error!("{error}");
                }
                if report.errors.is_empty() {
                    for line in &report.loaded {
                        tracing::info!("{line}");
                    }
                    self.apply_reload(id, config);
                } else {
                    self.refuse(id, exit_code::PLUGIN_LOAD_FAILED, plugin_problems(&report));
                }
            }
        }
        if self.phase == Phase::Serving {
            if let Some(id) = self.queued {
                if self.reload_blocked().is_none() {
                    self.queued = None;
                    self.start_reload(id);
                }
            }
        }
    }

    /// Refuses reload `id`: nothing has changed.
    fn refuse(&mut self, id: u64, code: i32, why: String) {
        let first = why.lines().next().unwrap_or_default();
        tracing::error!("reload aborted: {first}; still serving the previous config");
        self.reloads.finish(id, State::Refused, code, &why);
    }

    /// The plugins of the new config loaded: bind new listeners (keeping
    /// the sockets of unchanged ones), the new admin address and pid file,
    /// then start a new worker per slot with the new config and `.so`
    /// files; the old workers drain once every new one is ready.
    fn apply_reload(&mut self, id: u64, config: Config) {
        let wanted = config.server.worker_count();
        if self.free_boards.len() < wanted {
            self.refuse(
                id,
                exit_code::FAILURE,
                format!(
                    "only {} scoreboard entries are free for {wanted} new workers (old workers still draining hold the rest); try again once they have finished",
                    self.free_boards.len()
                ),
            );
            return;
        }
        // Bind the new addresses first: if one fails, nothing has changed.
        let mut fresh = Vec::new();
        let give_back = |fresh: Vec<Bound>| {
            for bound in fresh {
                bound.close();
            }
        };
        for spec in &config.listeners {
            let existing = self.listeners.iter().find(|b| b.addr == spec.addr);
            if let Some(existing) = existing {
                if existing.reuseport != spec.reuseport {
                    give_back(fresh);
                    self.refuse(
                        id,
                        exit_code::FAILURE,
                        format!(
                            "listener {} changes reuseport ({}:{}); that needs a restart",
                            spec.addr,
                            config::shown(&config.file),
                            spec.line
                        ),
                    );
                    return;
                }
                continue;
            }
            match Bound::bind(spec, &config, &mut super::listeners::Inherited::default()) {
                Ok(bound) => fresh.push(bound),
                Err(message) => {
                    give_back(fresh);
                    self.refuse(id, exit_code::FAILURE, message);
                    return;
                }
            }
        }
        let admin = match (self.config.admin, config.admin) {
            (old, new) if old == new => AdminChange::Keep,
            (_, None) => AdminChange::Close,
            (_, Some(addr)) => match admin::bind_std(addr) {
                Ok(listener) => AdminChange::Move(listener),
                Err(e) => {
                    give_back(fresh);
                    self.refuse(
                        id,
                        exit_code::FAILURE,
                        format!(
                            "cannot listen on [admin] addr {addr} ({}): {e}",
                            config::shown(&config.file)
                        ),
                    );
                    return;
                }
            },
        };
        let current = self.pid_file.as_ref().map(|p| p.path().to_path_buf());
        let moved_pid_file = if config.server.pid_file == current {
            None
        } else {
            match config
                .server
                .pid_file
                .as_deref()
                .map(crate::pid_file::PidFile::acquire)
            {
                None => Some(None),
                Some(Ok(locked)) => Some(Some(locked)),
                Some(Err(e)) => {
                    give_back(fresh);
                    self.refuse(
                        id,
                        exit_code::FAILURE,
                        format!("[server] pid_file ({}): {e}", config::shown(&config.file)),
                    );
                    return;
                }
            }
        };
        if config.log.level != self.config.log.level {
            match logging::set_level(config.log.level) {
                Ok(()) => tracing::info!(
                    "[log] level is now {} (workers started from now on use it)",
                    config.log.level.as_str()
                ),
                Err(why) => tracing::warn!(
                    "[log] level {} not applied: {why}",
                    config.log.level.as_str()
                ),
            }
        }
        // A kept Unix socket whose `mode` changed gets it now (and back on
        // a rollback).
        set_unix_modes(&self.config, &config);
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
            if let Endpoint::Unix(path) = &bound.addr {
                use std::os::unix::fs::FileTypeExt;
                let there =
                    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
                if !there {
                    tracing::warn!(
                        "listener {}: its socket file is gone (removed by hand?): no client can connect to it, although nbnet still listens; restart nbnet to bind it again (a reload keeps the socket it has)",
                        bound.addr
                    );
                }
            }
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
        let previous_generation = self.generation;
        self.generations += 1;
        self.generation = self.generations;
        // The new generation is up once all its workers are ready (which
        // is also when the reload completes).
        self.up = false;
        self.reload = Some(PendingReload {
            id,
            generation: self.generation,
            previous_generation,
            previous,
            previous_listeners: removed,
            previous_slots: self.slots.len(),
            started: Instant::now(),
            admin,
            moved_pid_file,
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
        self.reloads.set(id, State::Starting);
        tracing::info!(
            "reload: starting {} new worker(s); the old ones serve until all are ready",
            self.slots.len()
        );
    }

    /// Every new worker is ready: the new config serves. Closes removed
    /// listeners, moves the admin listener and the pid file.
    pub(super) fn commit_reload(&mut self, reload: PendingReload, outgoing: usize) {
        for bound in reload.previous_listeners {
            bound.close();
        }
        match reload.admin {
            AdminChange::Keep => {}
            AdminChange::Close => {
                if let Some(admin) = self.admin.take() {
                    tracing::info!("admin: no longer listening on {}", admin.addr());
                }
            }
            AdminChange::Move(listener) => {
                let registry = self.poll.registry();
                let moved = match self.admin.as_mut() {
                    Some(admin) => admin.replace_listener(listener, registry),
                    None => admin::Admin::from_std(listener, registry, ADMIN)
                        .map(|admin| self.admin = Some(admin)),
                };
                match (moved, &self.admin) {
                    (Ok(()), Some(admin)) => {
                        tracing::info!("admin: now http://{}/metrics and /healthz", admin.addr())
                    }
                    (Err(e), _) => tracing::error!("admin: cannot serve the new address: {e}"),
                    _ => {}
                }
            }
        }
        if let Some(new) = reload.moved_pid_file {
            // The old file (and its lock) goes as it drops.
            self.pid_file = new;
            self.reloads
                .move_to(self.pid_file.as_ref().map(|p| p.path()));
            tracing::info!(
                "pid_file: now {}",
                self.pid_file
                    .as_ref()
                    .map_or("none".into(), |p| p.path().display().to_string())
            );
        }
        let summary = format!(
            "reload complete in {:.1?}: {} new worker(s) serving; draining {outgoing} old worker(s)",
            reload.started.elapsed(),
            self.slots.len(),
        );
        tracing::info!("{summary}");
        self.reloads
            .finish(reload.id, State::Done, exit_code::OK, &summary);
    }

    /// A reload failed after the new workers started: kill them and put the
    /// previous config, listeners and workers back.
    pub(super) fn roll_back_reload(&mut self, code: i32, why: String) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        tracing::error!("reload rolled back: still serving the previous config");
        self.reloads
            .finish(reload.id, State::RolledBack, code, &why);
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
                worker.rollback_killed = true;
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
        // The new admin socket (if any) closes with `reload.admin`; a new
        // pid file goes (removed as it drops); the previous level comes back.
        drop(reload.moved_pid_file);
        if reload.previous.log.level != self.config.log.level {
            let _ = logging::set_level(reload.previous.log.level);
        }
        set_unix_modes(&self.config, &reload.previous);
        self.config = reload.previous;
        self.plugin_names = plugin_names(&self.config);
        self.generation = reload.previous_generation;
        // The previous config was serving: its workers that fail to start
        // from now on are restarted, not a reason to stop.
        self.up = true;
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

    /// The server is stopping (or a new master takes over, after a binary
    /// upgrade): a reload being checked, queued or starting ends here
    /// (cancelled, in the status file, saying `why`).
    pub(super) fn cancel_reloads(&mut self, why: &str) {
        if let Some(Checking { id, check, .. }) = self.checking.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&check.fd()));
            check.abort();
            self.reloads
                .finish(id, State::Cancelled, exit_code::FAILURE, why);
        }
        if let Some(id) = self.queued.take() {
            self.reloads
                .finish(id, State::Cancelled, exit_code::FAILURE, why);
        }
        if let Some(reload) = self.reload.take() {
            for bound in reload.previous_listeners {
                bound.close();
            }
            // A new pid file is removed as it drops.
            drop(reload.moved_pid_file);
            self.reloads
                .finish(reload.id, State::Cancelled, exit_code::FAILURE, why);
        }
    }

    /// With `reuseport`, a socket per slot: a slot that no longer exists
    /// must not keep a listening socket nobody accepts from.
    pub(super) fn truncate_reuseport_sockets(&mut self) {
        let slots = self.slots.len();
        for bound in &mut self.listeners {
            bound.truncate(slots);
        }
    }
}

/// Applies `to`'s `mode` to each Unix listener that `from` had too (its
/// socket is kept) with another mode. A mode removed from the config leaves
/// the socket's permissions as they are (said in the log).
fn set_unix_modes(from: &Config, to: &Config) {
    use std::os::unix::fs::PermissionsExt;
    for spec in &to.listeners {
        let Endpoint::Unix(path) = &spec.addr else {
            continue;
        };
        let Some(before) = from.listeners.iter().find(|l| l.addr == spec.addr) else {
            continue;
        };
        match (before.mode, spec.mode) {
            (old, new) if old == new => {}
            (_, Some(mode)) => {
                match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                    Ok(()) => tracing::info!("listener {}: mode is now {mode:04o}", spec.addr),
                    Err(e) => tracing::error!(
                        "listener {}: cannot set mode {mode:04o} ({}:{}): {e}",
                        spec.addr,
                        config::shown(&to.file),
                        spec.line
                    ),
                }
            }
            (_, None) => tracing::info!(
                "listener {}: mode no longer set; the socket keeps its permissions until a restart",
                spec.addr
            ),
        }
    }
}

/// The status file's reason for a plugin check that found problems.
fn plugin_problems(report: &check::Report) -> String {
    format!(
        "{} plugin problem(s):\n{}",
        report.errors.len(),
        report.errors.join("\n")
    )
}
