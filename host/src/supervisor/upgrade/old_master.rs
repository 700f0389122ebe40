//! The old master's side of a binary upgrade (see the module doc): SIGUSR2,
//! forking the new master, promoting it, rolling it back, serving again.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::Interest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use super::*;
use crate::handover::{self, Message};
use crate::upgrade_status::State;

/// Why a reload queued or under way in the old master ends when the new
/// one takes over.
const TAKEN_OVER: &str = "a new master took over (binary upgrade) with the config as it was when it started; run nbnet reload again for later edits";

impl Master {
    /// SIGUSR2: start a new master from the binary on disk.
    pub(in crate::supervisor) fn handle_usr2(&mut self) {
        let refused = if self.phase != Phase::Serving || self.lame_duck.is_some() {
            Some("the server is stopping".to_string())
        } else if let Some(successor) = &self.successor {
            Some(format!(
                "an upgrade is already under way (new master pid {})",
                successor.pid()
            ))
        } else if let Some(predecessor) = &self.predecessor {
            Some(format!(
                "this master is still taking over from master {} (it exits once its connections are handed over): try again then",
                predecessor.pid
            ))
        } else if self.reload.is_some() || self.checking.is_some() || self.queued.is_some() {
            Some("a reload is under way: try again once it is over".to_string())
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::warn!("SIGUSR2 received: not upgrading: {why}");
            self.upgrades.refuse(&why, self.successor.is_none());
            return;
        }
        match self.start_successor() {
            Ok((pid, _)) => {
                tracing::info!(
                    "SIGUSR2 received: upgrading: started a new master (pid {pid}) from {} with {}; this master serves until it is ready (at most {})",
                    self.binary.display(),
                    self.config.file.display(),
                    humantime::format_duration(Duration::from_secs(
                        upgrade_within(&self.config).as_secs()
                    ))
                );
                crate::systemd::notify_reloading();
                self.upgrades.status.binary = self.binary.display().to_string();
                self.upgrades.status.successor = pid.as_raw();
                self.upgrades.set(
                    true,
                    State::Starting,
                    &format!("new master pid {pid} is starting"),
                );
            }
            Err(why) => {
                tracing::error!("SIGUSR2 received: cannot upgrade: {why}; this master serves on");
                self.upgrades.refuse(&why, true);
            }
        }
    }

    /// Forks the new master: the child executes [`Master::binary`] with the
    /// listening sockets and one end of the upgrade channel.
    fn start_successor(&mut self) -> Result<(Pid, Instant), String> {
        let binary = self.binary.clone();
        match std::fs::metadata(&binary) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err(format!("{} is not a file", binary.display())),
            Err(e) => {
                return Err(format!(
                    "cannot run {}: {e} (the new binary must be at the path this master was started from)",
                    binary.display()
                ))
            }
        }
        if let Err(e) = nix::unistd::access(&binary, nix::unistd::AccessFlags::X_OK) {
            return Err(format!("cannot run {}: {e}", binary.display()));
        }
        let c = |text: &std::ffi::OsStr| {
            CString::new(text.as_encoded_bytes())
                .map_err(|_| format!("{} contains a NUL byte", text.to_string_lossy()))
        };
        let path = c(binary.as_os_str())?;
        let argv = [
            path.clone(),
            c("--config".as_ref())?,
            c(self.config.file.as_os_str())?,
        ];
        // Every listening socket (with reuseport, every slot's), then the
        // admin socket: the new master finds each by its address.
        // Each named for who removes a Unix socket's file in the end: the
        // new master, unless it was someone else's to begin with (systemd's).
        let mut passed: Vec<RawFd> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for bound in &self.listeners {
            for socket in &bound.sockets {
                passed.push(socket.as_raw_fd());
                names.push(if bound.owner == listeners::Owner::NotOurs {
                    listeners::NOT_OURS
                } else {
                    listeners::HANDED_ON
                });
            }
        }
        if let Some(admin) = &self.admin {
            passed.push(admin.raw_fd());
            names.push(listeners::HANDED_ON);
        }
        let names = names.join(":");
        let (ours, theirs) =
            handover::channel().map_err(|e| format!("cannot make the upgrade channel: {e}"))?;
        // SAFETY: the master is single-threaded, so the child may allocate
        // before it executes the new binary.
        match unsafe { fork() } {
            Err(e) => Err(format!("cannot fork the new master: {e}")),
            Ok(ForkResult::Child) => {
                drop(ours);
                exec_successor(&path, &argv, &passed, theirs.as_raw_fd(), &names)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(theirs);
                if let Err(e) = self.poll.registry().register(
                    &mut SourceFd(&ours.as_raw_fd()),
                    SUCCESSOR,
                    Interest::READABLE,
                ) {
                    let _ = kill(child, Signal::SIGKILL);
                    return Err(format!("cannot watch the upgrade channel: {e}"));
                }
                let deadline = config::deadline(Instant::now(), upgrade_within(&self.config));
                self.successor = Some(Successor::Starting {
                    pid: child,
                    channel: ours,
                    deadline,
                    failure: None,
                });
                Ok((child, deadline))
            }
        }
    }

    /// Reads the upgrade channel to the new master.
    pub(in crate::supervisor) fn on_successor_channel(&mut self) {
        loop {
            let Some(channel) = self.successor.as_ref().and_then(Successor::channel) else {
                return;
            };
            match handover::recv(channel.as_fd()) {
                Ok(Some(Message::Ready(version))) => self.promote_successor(&version),
                Ok(Some(Message::Failed(why))) => {
                    if let Some(Successor::Starting { failure, .. }) = &mut self.successor {
                        *failure = Some(why);
                    }
                }
                Ok(Some(other)) => {
                    tracing::debug!("upgrade channel: unexpected record {other:?}: ignored")
                }
                // The new master closed it (it is exiting): reaping says
                // how it ended.
                Ok(None) => {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&channel.as_raw_fd()));
                    return;
                }
                Err(e) if handover::would_block(&e) => return,
                // Killed: reaping says so.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&channel.as_raw_fd()));
                    return;
                }
                Err(e) => {
                    tracing::warn!("upgrade channel: {e}");
                    return;
                }
            }
        }
    }

    /// The new master is ready: hand the service over to it.
    fn promote_successor(&mut self, version: &str) {
        let Some(Successor::Starting { pid, channel, .. }) = self.successor.take() else {
            return;
        };
        tracing::info!(
            "upgrade: the new master (pid {pid}, {version}) is ready: it serves now; this master hands its connections over to it and exits"
        );
        // The pid file and the status files are the new master's now: the
        // lock is released before it is told, so that it finds it free.
        // A reload queued behind the upgrade is cancelled (the new master
        // read the config when it started), said in the file it follows.
        self.cancel_reloads(TAKEN_OVER);
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.release();
        }
        self.reloads.detach();
        // "Done" goes into the status file before the new master is told:
        // it replaces the file with its own as it takes the pid file over,
        // and a "Done" written after that left this master's record in
        // its place, so the next `nbnet upgrade` was refused (the file was
        // not the serving master's own).
        self.upgrades.set(
            false,
            State::Done,
            &format!("new master pid {pid} ({version}) serves"),
        );
        let status_file = self.upgrades.path.take();
        if let Err(e) = handover::send_promoted(channel.as_fd()) {
            // It is gone (reaping will say how): serve on.
            tracing::error!(
                "upgrade: cannot tell the new master (pid {pid}) to take over: {e}; this master serves on"
            );
            self.successor = Some(Successor::Stopping {
                pid,
                kill_at: Instant::now(),
            });
            self.take_pid_file_back();
            self.upgrades.path = status_file;
            self.upgrades.set(
                false,
                State::RolledBack,
                &format!("new master pid {pid} could not be told to take over ({e}); this master serves on"),
            );
            return;
        }
        crate::systemd::notify(&format!("MAINPID={pid}\nREADY=1"));
        self.children_before.push(pid);
        self.successor = Some(Successor::Serving { pid, channel });
        // Stop serving: stop answering [admin] (the new master does, on
        // the same socket), and have every worker hand its connections over.
        if let Some(mut admin) = self.admin.take() {
            admin.deregister(self.poll.registry());
        }
        self.lame_duck = None;
        self.cancel_reloads(TAKEN_OVER);
        let timeout = self
            .config
            .server
            .shutdown_timeout
            .saturating_add(STOP_GRACE);
        self.phase = Phase::Stopping {
            code: exit_code::OK,
            deadline: config::deadline(Instant::now(), timeout),
        };
        let workers: Vec<Pid> = self.workers.keys().copied().collect();
        for worker in workers {
            self.drain(worker);
        }
    }

    /// Where a connection handed over by one of this master's workers goes
    /// once the new master serves: `Ok` when it went there (or waits to),
    /// `Err` with it back when there is no new master to take it.
    pub(in crate::supervisor) fn relay_to_successor(
        &mut self,
        record: handover::Connection,
        fd: handover::Descriptors,
        from: Pid,
        since: Instant,
    ) -> Result<(), (handover::Connection, handover::Descriptors)> {
        let Some(Successor::Serving { channel, pid }) = &self.successor else {
            return Err((record, fd));
        };
        match handover::send_connection(
            channel.as_fd(),
            &record,
            fd.stream.as_fd(),
            fd.unread.as_ref(),
        ) {
            Ok(()) => {}
            Err(e) => {
                if !handover::would_block(&e) {
                    tracing::debug!("cannot pass a connection to the new master (pid {pid}): {e}");
                }
                // Its channel is full, or it is gone (then reaping brings
                // this master back to serving, and these go to its own).
                self.relay_waiting
                    .push_back(relay::Waiting::new(record, fd, from, since));
            }
        }
        Ok(())
    }

    /// The new master exited: before it was ready (a rollback), or while
    /// this master was handing over to it (this master serves again).
    pub(in crate::supervisor) fn successor_exited(&mut self, exit: decision::Exit) {
        // What its child side said before it exited may not have been read
        // yet (the exit and the record can come in either order).
        if matches!(self.successor, Some(Successor::Starting { .. })) {
            self.on_successor_channel();
        }
        match self.successor.take() {
            Some(Successor::Starting { pid, .. }) if self.phase != Phase::Serving => {
                tracing::info!("upgrade cancelled: the server stops; the new master (pid {pid}) has exited ({exit})");
                self.upgrades.set(
                    false,
                    State::Cancelled,
                    &format!("the server is stopping; new master pid {pid} was stopped before it was ready"),
                );
            }
            Some(Successor::Starting { pid, failure, .. }) => {
                let (why, more) = match failure {
                    Some(why) => (why, ""),
                    None => (
                        format!("it exited before it was ready ({})", describe(exit)),
                        " (its log lines above say more)",
                    ),
                };
                tracing::error!(
                    "upgrade failed: the new master (pid {pid}): {why}; this master serves on{more}"
                );
                self.upgrades.set(
                    false,
                    State::RolledBack,
                    &format!("new master pid {pid}: {why}"),
                );
                self.upgrade_over();
            }
            Some(Successor::Stopping { pid, .. }) => {
                tracing::info!("upgrade: the new master (pid {pid}) has stopped ({exit})");
                self.upgrade_over();
            }
            // Stopped cleanly (`nbnet stop` found it through the pid file):
            // the server stops; this master finishes its own stop, closing
            // what it has not handed over at frame boundaries.
            Some(Successor::Serving { pid, channel }) if exit == decision::Exit::Code(0) => {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&channel.as_raw_fd()));
                tracing::info!(
                    "the new master (pid {pid}) has stopped (exit status 0): the server is stopping; this master closes the connections it has not handed over at frame boundaries"
                );
                self.signal_workers(Signal::SIGTERM);
            }
            Some(Successor::Serving { pid, channel }) => {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&channel.as_raw_fd()));
                tracing::error!(
                    "upgrade: the new master (pid {pid}) exited ({exit}) while this master was handing its connections over to it: this master serves again"
                );
                self.children_before.retain(|&p| p != pid);
                self.serve_again();
            }
            None => {}
        }
    }

    /// The upgrade is over and this master serves on.
    fn upgrade_over(&mut self) {
        crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
    }

    /// After a promoted new master died: take the pid file, `[admin]` and
    /// the pool back. Old workers still handing over keep doing so; their
    /// connections wait for this master's new workers.
    fn serve_again(&mut self) {
        let now = Instant::now();
        self.phase = Phase::Serving;
        self.take_pid_file_back();
        let pid_file = self.config.server.pid_file.clone();
        let dead = self.upgrades.status.successor;
        self.upgrades.status.state = State::RolledBack;
        self.upgrades.status.message = format!(
            "new master pid {dead} died while this master was handing its connections over; this master serves again"
        );
        self.upgrades.attach(pid_file.as_deref());
        if let Some(addr) = self.config.admin {
            match admin::Admin::bind(addr, self.poll.registry(), ADMIN) {
                Ok(admin) => self.admin = Some(admin),
                Err(e) => tracing::error!("cannot listen on [admin] addr {addr} again: {e}"),
            }
        }
        let count = self.config.server.worker_count();
        self.slots = (0..count).map(|_| Slot::empty(now)).collect();
        self.up = false;
        crate::systemd::notify(&format!("MAINPID={}\nREADY=1", getpid()));
    }

    /// The pid file and the reload status file again (a promotion that
    /// could not be told).
    fn take_pid_file_back(&mut self) {
        if let Some(path) = self.config.server.pid_file.clone() {
            match crate::pid_file::PidFile::acquire(&path) {
                Ok(pid_file) => self.pid_file = Some(pid_file),
                Err(message) => tracing::error!("{message}"),
            }
        }
        let pid_file = self.config.server.pid_file.clone();
        self.reloads.attach(pid_file.as_deref());
    }

    /// Gives up on a new master that is not ready in time; kills one that
    /// does not stop.
    pub(in crate::supervisor) fn watch_successor(&mut self) {
        let now = Instant::now();
        match &self.successor {
            Some(Successor::Starting { pid, deadline, .. }) if now >= *deadline => {
                let pid = *pid;
                let within = upgrade_within(&self.config);
                tracing::error!(
                    "upgrade failed: the new master (pid {pid}) was not ready within {within:?}: stopping it; this master serves on"
                );
                self.upgrades.set(
                    false,
                    State::RolledBack,
                    &format!("new master pid {pid} was not ready within {within:?}"),
                );
                let _ = kill(pid, Signal::SIGTERM);
                let allowed = self
                    .config
                    .server
                    .drain_delay
                    .saturating_add(self.config.server.shutdown_timeout)
                    .saturating_add(STOP_GRACE);
                self.successor = Some(Successor::Stopping {
                    pid,
                    kill_at: config::deadline(now, allowed),
                });
                self.upgrade_over();
            }
            Some(Successor::Stopping { pid, kill_at }) if now >= *kill_at => {
                let pid = *pid;
                tracing::warn!("upgrade: the new master (pid {pid}) is still running: SIGKILL");
                let _ = kill(pid, Signal::SIGKILL);
                self.successor = Some(Successor::Stopping {
                    pid,
                    kill_at: now + Duration::from_secs(3600),
                });
            }
            _ => {}
        }
    }

    /// When [`Master::watch_successor`] must look again.
    pub(in crate::supervisor) fn successor_wakeup(&self) -> Option<Instant> {
        match &self.successor {
            Some(Successor::Starting { deadline, .. }) => Some(*deadline),
            Some(Successor::Stopping { kill_at, .. }) => Some(*kill_at),
            _ => None,
        }
    }
}

/// The child side of [`Master::start_successor`]: puts the passed
/// descriptors at 3, 4, … and the channel after them, sets the socket
/// activation variables, and executes the new binary. Never returns.
fn exec_successor(
    path: &CString,
    argv: &[CString],
    passed: &[RawFd],
    channel: RawFd,
    names: &str,
) -> ! {
    use nix::fcntl::{fcntl, FcntlArg};
    let count = passed.len() as RawFd;
    // First above the target range, so that moving them down never
    // overwrites one not yet moved.
    let floor = 3 + count + 1;
    let mut high = Vec::with_capacity(passed.len() + 1);
    for &fd in passed.iter().chain(std::iter::once(&channel)) {
        // SAFETY: a descriptor of this (single-threaded) process, open.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        match fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(floor)) {
            Ok(moved) => high.push(moved),
            Err(e) => fail_exec(channel, &format!("cannot pass descriptor {fd}: {e}")),
        }
    }
    for (i, &fd) in high.iter().enumerate() {
        // SAFETY: dup2 onto a number this child owns from now on (it only
        // executes the new binary); the copy is not close-on-exec.
        if unsafe { libc::dup2(fd, 3 + i as RawFd) } < 0 {
            let e = std::io::Error::last_os_error();
            fail_exec(channel, &format!("cannot pass descriptor {fd}: {e}"));
        }
    }
    let channel = 3 + count;
    // SAFETY: single-threaded child; nothing reads the environment
    // concurrently.
    unsafe {
        std::env::set_var("LISTEN_FDS", count.to_string());
        std::env::set_var("LISTEN_PID", std::process::id().to_string());
        std::env::set_var("LISTEN_FDNAMES", names);
        std::env::set_var(CHANNEL_ENV, channel.to_string());
        std::env::set_var(FROM_ENV, nix::unistd::getppid().as_raw().to_string());
    }
    // The master's signal mask (signals are read from a signalfd) would be
    // inherited: the new binary starts as any process does.
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let e = match nix::unistd::execv(path, argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    fail_exec(
        channel,
        &format!("cannot run {}: {e}", path.to_string_lossy()),
    )
}

/// Says why on the channel and exits the child.
fn fail_exec(channel: RawFd, why: &str) -> ! {
    // SAFETY: the channel's descriptor is open in this child.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(channel) };
    let _ = handover::send_failed(borrowed, why);
    // SAFETY: _exit ends the forked child without running the master's
    // destructors (its pid file, its sockets' files).
    unsafe { libc::_exit(127) }
}
