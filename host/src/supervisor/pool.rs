//! The worker pool: forking workers into their slots, the hung-call
//! watchdog, retirement, and the hand-over from outgoing workers to their
//! ready replacements.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use super::*;

impl Master {
    /// Each loop: the hung-call watchdog, retirement requests, and the
    /// hand-over from outgoing workers to ready replacements.
    pub(super) fn watch_workers(&mut self) {
        // The watchdog runs while stopping too (a hook that hangs while a
        // worker drains or hands its connections over is as hung as any).
        let serving = self.phase == Phase::Serving;
        let now = Instant::now();
        if serving && !self.up && self.reload.is_none() {
            self.up = self.slots.iter().all(|slot| {
                slot.pid
                    .and_then(|pid| self.workers.get(&pid))
                    .is_some_and(|w| self.scoreboard.slot(w.board).is_ready())
            });
            // The first time: the service is up (systemd Type=notify) — or,
            // for the new master of an upgrade, the old master is told.
            if self.up && !self.reloading && !self.tell_predecessor_ready() {
                crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
            }
        }
        if serving && self.reloading && self.up && self.reload.is_none() && self.checking.is_none()
        {
            // A reload is over (done, aborted or rolled back).
            self.reloading = false;
            crate::systemd::notify("READY=1");
        }
        let mut retiring = Vec::new();
        for (&pid, worker) in self.workers.iter_mut() {
            let board = self.scoreboard.slot(worker.board);
            // A worker still loading its plugins is held to init_timeout
            // (its config's: a reload may have changed it meanwhile, but
            // both are in force for their own workers).
            let (timeout, key) = if board.is_ready() {
                (worker.plugin_timeout, "plugin_timeout")
            } else {
                (worker.init_timeout, "init_timeout")
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
            if serving && worker.role == Role::Serving && board.wants_retirement() {
                retiring.push(pid);
            }
        }
        if !serving {
            return;
        }
        for pid in retiring {
            // A worker is replaced only while the scoreboard has room
            // beyond what empty slots and a reload being checked need, and
            // only once its slot's previous worker (of this config) is
            // gone: a slot never has more than one predecessor draining.
            // Until then it keeps serving and asks again.
            let Some(worker) = self.workers.get(&pid) else {
                continue;
            };
            let (index, generation) = (worker.index, worker.generation);
            let predecessor = self.workers.iter().any(|(&other, w)| {
                other != pid
                    && w.index == index
                    && w.generation == generation
                    && w.role != Role::Serving
            });
            if predecessor || self.free_boards.len() <= self.reserved_boards() {
                continue;
            }
            if let Some(worker) = self.workers.get_mut(&pid) {
                tracing::info!(
                    "worker {} (pid {pid}) asked to be replaced (it served max_requests_per_worker, or a call is stuck on one of its pool threads: its own log line says which): replacing it",
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
                self.commit_reload(reload, outgoing.len());
            }
            for pid in outgoing {
                self.drain(pid);
            }
            self.truncate_reuseport_sockets();
        } else if self
            .reload
            .as_ref()
            .is_some_and(|r| r.started.elapsed() > ready_within(&self.config))
        {
            let why = format!(
                "the new workers were not all ready within {:?}",
                ready_within(&self.config)
            );
            tracing::error!("reload: {why}");
            self.roll_back_reload(exit_code::FAILURE, why);
        }
    }

    /// Kills every worker still draining past its `shutdown_timeout` plus
    /// [`STOP_GRACE`] (its plugins catch or block SIGTERM, say, or its
    /// drain hangs), serving or stopping: an old worker must not live on
    /// beside its replacements.
    pub(super) fn kill_overdue_drains(&mut self) {
        let now = Instant::now();
        for (&pid, worker) in self.workers.iter_mut() {
            let Some(since) = worker.draining_since else {
                continue;
            };
            let drained = now.duration_since(since);
            let allowed = worker.shutdown_timeout.saturating_add(STOP_GRACE);
            if worker.drain_killed || drained < allowed {
                continue;
            }
            let open = self
                .scoreboard
                .slot(worker.board)
                .stats
                .connections_open
                .get();
            tracing::error!(
                "replaced worker {} (pid {pid}) still running {drained:.1?} after it was told to drain, past shutdown_timeout = {:?} + {STOP_GRACE:?} grace, with {open} connection(s) open: killing it (a plugin call or a connection that never ends?)",
                worker.index,
                worker.shutdown_timeout
            );
            worker.drain_killed = true;
            self.drain_kills += 1;
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// When the next draining worker runs out of time.
    pub(super) fn next_drain_deadline(&self) -> Option<Instant> {
        self.workers
            .values()
            .filter(|w| !w.drain_killed)
            .filter_map(|w| {
                let since = w.draining_since?;
                Some(config::deadline(
                    since,
                    w.shutdown_timeout.saturating_add(STOP_GRACE),
                ))
            })
            .min()
    }

    /// Tells one worker to drain (SIGTERM) and stop counting it as serving.
    pub(super) fn drain(&mut self, pid: Pid) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.role = Role::Draining;
            worker.draining_since.get_or_insert_with(Instant::now);
            // Its connections move to the serving workers rather than
            // close (SIGTERM, the fallback, closes them at frame boundaries).
            self.ask_to_hand_over(pid);
        }
    }

    /// Serving: fork workers into empty slots whose restart time has come.
    /// Stopping: kill stragglers at the deadline; return the exit code once
    /// every worker is gone.
    pub(super) fn manage_workers(&mut self) -> Option<i32> {
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
                // Connections on their way to a new master (a binary
                // upgrade) are passed on before this master exits.
                let relayed = self.relay_waiting.is_empty() || Instant::now() >= deadline;
                if self.workers.is_empty() && relayed {
                    for waiting in std::mem::take(&mut self.relay_waiting) {
                        self.relay_abandoned(waiting);
                    }
                    sweep_orphans(&self.children_before);
                    match &self.successor {
                        Some(upgrade::Successor::Serving { pid, .. }) => tracing::info!(
                            "this master's workers are gone, their connections handed over to the new master (pid {pid}) but for any logged above: this master exits"
                        ),
                        _ => tracing::info!("stopped"),
                    }
                    return Some(code);
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        "{} worker(s) still running past the stop deadline: sending SIGKILL",
                        self.workers.len()
                    );
                    self.drain_kills +=
                        self.workers.values().filter(|w| !w.drain_killed).count() as u64;
                    for worker in self.workers.values_mut() {
                        worker.killed_at_stop = true;
                    }
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
    pub(super) fn spawn_worker(&mut self, index: usize) -> nix::Result<()> {
        let master = getpid();
        let Some(board) = self.free_boards.pop() else {
            tracing::error!(
                "no free scoreboard entry for worker {index} ({} workers alive?)",
                self.scoreboard.len()
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
        // Its control channel: how it hands its connections over when it
        // is replaced, and how it receives others'. Without one it closes
        // them at frame boundaries instead.
        let (ours, theirs) = match crate::handover::channel() {
            Ok((ours, theirs)) => (Some(ours), Some(theirs)),
            Err(e) => {
                tracing::warn!("cannot make a control channel for worker {index} ({e}): its connections will be closed, not handed over, when it is replaced");
                (None, None)
            }
        };
        // SAFETY: the master is single-threaded and never loads plugins, so
        // the child may allocate and run arbitrary code after fork.
        match unsafe { fork() } {
            Err(e) => {
                self.free_boards.push(board);
                Err(e)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                if let Some(ours) = &ours {
                    self.register_control(board, ours);
                }
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
                        control: ours,
                        draining_since: None,
                        shutdown_timeout: self.config.server.shutdown_timeout,
                        drain_killed: false,
                        killed_at_stop: false,
                        rollback_killed: false,
                        plugin_timeout: self.config.server.plugin_timeout,
                        init_timeout: self.config.server.init_timeout,
                    },
                );
                tracing::info!(
                    worker = index,
                    pid = child.as_raw(),
                    "worker {index} started (pid {child})"
                );
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
                // The admin listener and its clients are the master's, and
                // so are the control channels of the other workers.
                drop(self.admin.take());
                drop(ours);
                self.workers.clear();
                self.relay_waiting.clear();
                self.forget_upgrade_channels();
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
                // The pending reload's sockets and images are the master's;
                // but a PidFile removes its file when dropped: this copy
                // must never run that (the worker exits without dropping
                // `self`, so only what is dropped here matters).
                // `release` closes the descriptor without removing the file
                // (a worker must not hold the root-owned pid file open for
                // writing: a plugin could write another PID into it).
                if let Some(mut reload) = self.reload.take() {
                    if let Some(moved) = reload.moved_pid_file.take().flatten() {
                        moved.release();
                    }
                }
                if let Some(pid_file) = self.pid_file.take() {
                    pid_file.release();
                }
                self.checking = None;
                let who = worker::Identity {
                    index,
                    count: self.slots.len(),
                    master,
                };
                let code = worker::run(
                    &self.config,
                    sockets,
                    who,
                    self.scoreboard.slot(board),
                    theirs,
                );
                std::process::exit(code)
            }
        }
    }

    pub(super) fn signal_workers(&self, signal: Signal) {
        for (&pid, worker) in &self.workers {
            let _ = kill(pid, signal);
            // A plugin can catch or block the signal; the control channel
            // it cannot touch.
            let stop = match signal {
                Signal::SIGTERM => Some(false),
                Signal::SIGINT => Some(true),
                _ => None,
            };
            if let (Some(fast), Some(control)) = (stop, &worker.control) {
                let _ = crate::handover::send_stop(std::os::fd::AsFd::as_fd(control), fast);
            }
        }
    }
}
