//! Reload (SIGHUP): validate the new config and plugins, start a new
//! generation of workers beside the old one, drain the old one once every
//! new worker is ready — or put everything back if the new one fails.

use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::*;

/// A reload whose new workers are not all ready yet: what to go back to.
pub(super) struct PendingReload {
    /// The generation the reload started; its workers are the new ones.
    pub(super) generation: u64,
    pub(super) previous: Config,
    pub(super) previous_listeners: Vec<Bound>,
    pub(super) previous_slots: usize,
    pub(super) started: Instant,
}

impl Master {
    /// SIGHUP: reload. Re-read and validate the config and load every plugin
    /// in a child (as `--check` does); on any problem log it and change
    /// nothing. Otherwise bind new listeners (keeping the sockets of
    /// unchanged ones), start a new worker per slot with the new config and
    /// `.so` files, and drain the old workers once every new one is ready.
    pub(super) fn handle_hup(&mut self) {
        if self.phase != Phase::Serving {
            return;
        }
        if self.reload.is_some() {
            tracing::warn!("SIGHUP received while a reload is in progress: ignored");
            return;
        }
        crate::systemd::notify_reloading();
        self.reloading = true;
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
            match Bound::bind(spec, &config, &mut super::listeners::Inherited::default()) {
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
        // The new generation is up once all its workers are ready (which
        // is also when the reload completes).
        self.up = false;
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

    /// A reload failed after the new workers started: kill them and put the
    /// previous config, listeners and workers back.
    pub(super) fn roll_back_reload(&mut self) {
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

    /// With `reuseport`, a socket per slot: a slot that no longer exists
    /// must not keep a listening socket nobody accepts from.
    pub(super) fn truncate_reuseport_sockets(&mut self) {
        let slots = self.slots.len();
        for bound in &mut self.listeners {
            bound.truncate(slots);
        }
    }
}
