//! Binary upgrade: a new nbnet binary takes over a running server without
//! refusing a connection or failing a request (`nbnet upgrade`, SIGUSR2 —
//! nginx's signal for it).
//!
//! # How it goes
//!
//! 1. The master ("old") forks a child that executes the binary the master
//!    was started from (its path, now holding the new build) with the same
//!    `--config` file, passing every listening socket — and the `[admin]`
//!    one — as systemd's socket activation does (`LISTEN_FDS`, see
//!    [`crate::systemd`]), and one end of an *upgrade channel* (a
//!    `SOCK_SEQPACKET` pair, like the workers' control channels) in
//!    `$NBNET_UPGRADE_FD`. The old master serves on meanwhile.
//! 2. The new master checks its plugins, takes the inherited sockets
//!    (accepting from the same kernel queues: nothing is refused), starts
//!    its workers, and once every one is ready says so on the channel
//!    ([`Message::Ready`]). It does not take the pid file yet: the old master
//!    holds its lock.
//! 3. The old master hands the service over: it tells systemd
//!    `MAINPID=<new>`, unlocks the pid file (leaving it in place), says
//!    [`Message::Promoted`], stops answering `[admin]`, and asks each of its
//!    workers to hand its connections over (as on a reload). Each
//!    connection, at a frame boundary, goes worker → old master → upgrade
//!    channel → new master → a new worker. The new master locks the pid
//!    file and writes its PID.
//! 4. The old master exits once its workers are gone. It never removes the
//!    pid file, the status files or an inherited Unix socket's file: they
//!    are the new master's.
//!
//! # When it fails
//!
//! - The new binary cannot be run, exits, or is not ready within twice the
//!   time a reload gets ([`ready_within`]): the old master logs why,
//!   stops what is left of the new one (SIGTERM, then SIGKILL), and serves
//!   on — a rollback. Connections the new workers had accepted meanwhile
//!   are closed at frame boundaries by their graceful stop.
//! - The new master dies *after* it was promoted, while the old workers
//!   are handing their connections over: the old master serves again (pid
//!   file, `[admin]`, new workers of its own); connections not yet handed
//!   over are relayed to those. Connections the dead master's workers held
//!   are lost (its workers die with it: parent-death signal).
//! - The old master dies before promoting the new one: the new master
//!   notices (the channel closes), takes the pid file and serves alone.
//!
//! `nbnet upgrade` follows the outcome through `<pid_file>.upgrade` (see
//! [`crate::upgrade_status`]).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpid, ForkResult, Pid};

use super::*;
use crate::handover::{self, Message};
use crate::upgrade_status::{self, State};

/// The old master's end of the upgrade channel (to its successor).
pub(super) const SUCCESSOR: Token = Token(relay::CONTROL_BASE - 1);
/// The new master's end of the upgrade channel (to its predecessor).
pub(super) const PREDECESSOR: Token = Token(relay::CONTROL_BASE - 2);

/// Names the descriptor of the upgrade channel in a new master.
const CHANNEL_ENV: &str = "NBNET_UPGRADE_FD";
/// The PID of the master that started this one (for its log lines).
const FROM_ENV: &str = "NBNET_UPGRADE_FROM";

/// The channel [`stash_channel`] took, until [`Predecessor::take`].
static STASH: std::sync::Mutex<Option<(Pid, OwnedFd)>> = std::sync::Mutex::new(None);

/// Takes the upgrade channel passed by an old master, if any — call it at
/// the start of `main`, with [`crate::systemd::stash_listen_fds`]. A
/// variable that does not name an open `SOCK_SEQPACKET` socket is ignored
/// (said on stderr): nothing else is taken for it.
pub fn stash_channel() {
    let fd = std::env::var(CHANNEL_ENV).ok();
    let from = std::env::var(FROM_ENV).ok();
    // SAFETY: called first thing in `main`, single-threaded: nothing reads
    // the environment concurrently.
    unsafe {
        std::env::remove_var(CHANNEL_ENV);
        std::env::remove_var(FROM_ENV);
    }
    if fd.is_none() && from.is_none() {
        return;
    }
    let (Some(fd), Some(from)) = (
        fd.as_deref()
            .and_then(|f| f.parse::<RawFd>().ok())
            .filter(|&f| f > 2),
        from.as_deref()
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|&p| p > 0),
    ) else {
        let _ = writeln_stderr(&format!(
            "nbnet: {CHANNEL_ENV}={:?} and {FROM_ENV}={:?} do not describe an upgrade (set by hand?): ignored",
            fd.unwrap_or_default(),
            from.unwrap_or_default()
        ));
        return;
    };
    // SAFETY: getsockopt on a descriptor number only reads; a number that
    // is not an open socket gives an error, and then it is left alone.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let is_channel = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType)
        .is_ok_and(|t| t == nix::sys::socket::SockType::SeqPacket);
    if !is_channel {
        let _ = writeln_stderr(&format!(
            "nbnet: {CHANNEL_ENV}={fd} does not name an upgrade channel: ignored"
        ));
        return;
    }
    // SAFETY: the old master passed this descriptor to this process for
    // this purpose (checked above); nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    if let Ok(mut stash) = STASH.lock() {
        *stash = Some((Pid::from_raw(from), fd));
    }
}

fn writeln_stderr(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{line}")
}

/// The old master's side: the new master it started.
pub(super) enum Successor {
    /// Starting; this master serves until it says it is ready, or gives
    /// up on it at `deadline`.
    Starting {
        pid: Pid,
        channel: OwnedFd,
        deadline: Instant,
        /// Why it could not start, if its child side said so.
        failure: Option<String>,
    },
    /// Promoted: it serves; this master hands its connections over to it
    /// and exits once its workers are gone.
    Serving { pid: Pid, channel: OwnedFd },
    /// Given up on: asked to stop (SIGTERM), killed at `kill_at`.
    Stopping { pid: Pid, kill_at: Instant },
}

impl Successor {
    pub(super) fn pid(&self) -> Pid {
        match self {
            Successor::Starting { pid, .. }
            | Successor::Serving { pid, .. }
            | Successor::Stopping { pid, .. } => *pid,
        }
    }

    fn channel(&self) -> Option<&OwnedFd> {
        match self {
            Successor::Starting { channel, .. } | Successor::Serving { channel, .. } => {
                Some(channel)
            }
            Successor::Stopping { .. } => None,
        }
    }
}

/// The new master's side: the master that started it.
pub(super) struct Predecessor {
    pid: Pid,
    channel: OwnedFd,
    state: Told,
}

/// What a new master has told its predecessor, or heard from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    /// Nothing yet: its workers are starting.
    Nothing,
    /// "Ready": waiting to be promoted.
    Ready,
    /// Promoted: it serves; the old master's connections arrive.
    Promoted,
}

impl Predecessor {
    /// The channel passed by the old master, if this master was started
    /// by one.
    pub(super) fn take() -> Option<Predecessor> {
        let (pid, channel) = STASH.lock().ok()?.take()?;
        // The old master forks the new one: anything else setting the
        // variables is not an upgrade (the master then serves on its own,
        // taking the pid file as usual).
        if nix::unistd::getppid() != pid {
            tracing::warn!(
                "{FROM_ENV}={pid} is not this process's parent: not an upgrade; ignoring the upgrade channel"
            );
            return None;
        }
        Some(Predecessor {
            pid,
            channel,
            state: Told::Nothing,
        })
    }

    pub(super) fn pid(&self) -> Pid {
        self.pid
    }

    pub(super) fn register(&self, registry: &mio::Registry) -> std::io::Result<()> {
        registry.register(
            &mut SourceFd(&self.channel.as_raw_fd()),
            PREDECESSOR,
            Interest::READABLE,
        )
    }
}

/// The upgrade status file's writer (see [`crate::upgrade_status`]).
pub(super) struct UpgradeLog {
    path: Option<PathBuf>,
    status: upgrade_status::Status,
}

impl UpgradeLog {
    /// The status file for `pid_file` (none without one), written at once
    /// (no upgrade yet) so that `nbnet upgrade` knows this master reports.
    pub(super) fn new(pid_file: Option<&Path>) -> UpgradeLog {
        let mut log = UpgradeLog {
            path: None,
            status: upgrade_status::Status {
                master: getpid().as_raw(),
                started_ns: 0,
                state: State::Done,
                successor: 0,
                binary: String::new(),
                message: "no upgrade yet".to_string(),
                took_over_from: 0,
                refused_ns: 0,
                refused: String::new(),
            },
        };
        log.attach(pid_file);
        log
    }

    /// Writes `state` and `message` for the upgrade under way (or a new
    /// one, with `started`).
    fn set(&mut self, started: bool, state: State, message: &str) {
        if started {
            self.status.started_ns = crate::reload_status::monotonic_ns();
        }
        self.status.master = getpid().as_raw();
        self.status.state = state;
        self.status.message = message.to_string();
        if let Some(path) = &self.path {
            if let Err(e) = upgrade_status::write(path, &self.status) {
                tracing::warn!(
                    "cannot write the upgrade status file {}: {e}; `nbnet upgrade` cannot report the outcome (the log does)",
                    path.display()
                );
            }
        }
    }

    /// A SIGUSR2 refused: said in the refusal fields, and as the state too
    /// when no upgrade is under way (`alone`): an upgrade under way keeps
    /// its state for the `nbnet upgrade` that follows it.
    fn refuse(&mut self, why: &str, alone: bool) {
        self.status.refused_ns = crate::reload_status::monotonic_ns();
        self.status.refused = why.to_string();
        if alone {
            self.status.successor = 0;
            self.set(true, State::Refused, why);
        } else {
            let (state, message) = (self.status.state, self.status.message.clone());
            self.set(false, state, &message);
        }
    }

    /// Starts writing the file that goes with `pid_file` (and writes it).
    pub(super) fn attach(&mut self, pid_file: Option<&Path>) {
        self.path = pid_file.map(upgrade_status::path_for);
        let (state, message) = (self.status.state, self.status.message.clone());
        self.set(false, state, &message);
    }

    /// Removes the file (the master stops).
    pub(super) fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How long a new master gets to be ready: its plugins are checked first,
/// then its workers start, each as long as a reload's may take.
fn upgrade_within(config: &Config) -> Duration {
    ready_within(config).saturating_mul(2)
}

impl Master {
    /// SIGUSR2: start a new master from the binary on disk.
    pub(super) fn handle_usr2(&mut self) {
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
    pub(super) fn on_successor_channel(&mut self) {
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
        self.cancel_reloads();
        if let Some(pid_file) = self.pid_file.take() {
            pid_file.release();
        }
        self.reloads.detach();
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
            return;
        }
        crate::systemd::notify(&format!("MAINPID={pid}\nREADY=1"));
        self.upgrades.set(
            false,
            State::Done,
            &format!("new master pid {pid} ({version}) serves"),
        );
        self.upgrades.path = None;
        self.children_before.push(pid);
        self.successor = Some(Successor::Serving { pid, channel });
        // Stop serving: stop answering [admin] (the new master does, on
        // the same socket), and have every worker hand its connections over.
        if let Some(mut admin) = self.admin.take() {
            admin.deregister(self.poll.registry());
        }
        self.lame_duck = None;
        self.cancel_reloads();
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
    pub(super) fn relay_to_successor(
        &mut self,
        record: handover::Connection,
        fd: OwnedFd,
        from: Pid,
        since: Instant,
    ) -> Result<(), (handover::Connection, OwnedFd)> {
        let Some(Successor::Serving { channel, pid }) = &self.successor else {
            return Err((record, fd));
        };
        match handover::send_connection(channel.as_fd(), &record, fd.as_fd()) {
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
    pub(super) fn successor_exited(&mut self, exit: decision::Exit) {
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
    pub(super) fn watch_successor(&mut self) {
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
    pub(super) fn successor_wakeup(&self) -> Option<Instant> {
        match &self.successor {
            Some(Successor::Starting { deadline, .. }) => Some(*deadline),
            Some(Successor::Stopping { kill_at, .. }) => Some(*kill_at),
            _ => None,
        }
    }

    /// This master is a new one and every worker is ready: tell the old
    /// master. `false` when there is no old master to tell.
    pub(super) fn tell_predecessor_ready(&mut self) -> bool {
        let Some(predecessor) = &mut self.predecessor else {
            return false;
        };
        if predecessor.state != Told::Nothing {
            return true;
        }
        match handover::send_ready(predecessor.channel.as_fd(), &version_text()) {
            Ok(()) => {
                predecessor.state = Told::Ready;
                tracing::info!(
                    "every worker is ready: told the old master (pid {}), which now hands the service over",
                    predecessor.pid
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot tell the old master (pid {}) that this one is ready: {e}; serving alone",
                    predecessor.pid
                );
                self.predecessor_gone();
                false
            }
        }
    }

    /// Reads the upgrade channel to the old master.
    pub(super) fn on_predecessor_channel(&mut self) {
        loop {
            let Some(predecessor) = &self.predecessor else {
                return;
            };
            match handover::recv(predecessor.channel.as_fd()) {
                Ok(Some(Message::Promoted)) => {
                    let from = predecessor.pid;
                    if let Some(p) = &mut self.predecessor {
                        p.state = Told::Promoted;
                    }
                    tracing::info!(
                        "upgrade: the old master (pid {from}) handed the service over: this master serves; the old one's connections follow"
                    );
                    for bound in &mut self.listeners {
                        bound.take_ownership();
                    }
                    self.upgrades.status.took_over_from = from.as_raw();
                    self.upgrades.status.binary = self.binary.display().to_string();
                    self.upgrades.status.message = version_text();
                    self.take_pid_file();
                    crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
                }
                Ok(Some(Message::Connection(record, fd))) => {
                    self.relay(record, fd, Pid::from_raw(0))
                }
                Ok(Some(other)) => {
                    tracing::debug!("upgrade channel: unexpected record {other:?}: ignored")
                }
                Ok(None) => {
                    self.predecessor_gone();
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    self.predecessor_gone();
                    return;
                }
                Err(e) if handover::would_block(&e) => return,
                Err(e) => {
                    tracing::warn!("upgrade channel: {e}");
                    return;
                }
            }
        }
    }

    /// The old master has exited (or cannot be told anything).
    fn predecessor_gone(&mut self) {
        let Some(predecessor) = self.predecessor.take() else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&predecessor.channel.as_raw_fd()));
        if predecessor.state == Told::Promoted {
            tracing::info!(
                "upgrade complete: the old master (pid {}) has exited",
                predecessor.pid
            );
            return;
        }
        // Still our parent: it gave up on this upgrade (rolled it back)
        // and serves on — stop, touching none of its files.
        if nix::unistd::getppid() == predecessor.pid {
            tracing::warn!(
                "the old master (pid {}) gave up on this upgrade (it rolled it back and serves on): this master stops",
                predecessor.pid
            );
            self.begin_stop("upgrade rolled back", Stop::Graceful);
            return;
        }
        tracing::warn!(
            "the old master (pid {}) is gone before it handed the service over: this master serves alone",
            predecessor.pid
        );
        for bound in &mut self.listeners {
            bound.take_ownership();
        }
        self.take_pid_file();
        if self.up {
            crate::systemd::notify(&format!("READY=1\nMAINPID={}", getpid()));
        }
    }

    /// Locks the pid file (the old master released it) and starts writing
    /// the status files.
    fn take_pid_file(&mut self) {
        if self.pid_file.is_some() {
            return;
        }
        let path = self.config.server.pid_file.clone();
        if let Some(path) = &path {
            match crate::pid_file::PidFile::acquire(path) {
                Ok(pid_file) => self.pid_file = Some(pid_file),
                Err(message) => tracing::error!(
                    "{message} (after an upgrade: `nbnet stop`/`reload` cannot find this master until it holds the file)"
                ),
            }
        }
        match &self.predecessor {
            Some(predecessor) => self.reloads.attach_after(path.as_deref(), predecessor.pid),
            None => self.reloads.attach(path.as_deref()),
        }
        self.upgrades.attach(path.as_deref());
    }

    /// In a worker just forked: the upgrade channels are the master's.
    pub(super) fn forget_upgrade_channels(&mut self) {
        self.successor = None;
        self.predecessor = None;
    }
}

/// This build, for the old master's log and `nbnet upgrade`.
fn version_text() -> String {
    format!(
        "nbnet {}, plugin ABI {}.{}",
        env!("CARGO_PKG_VERSION"),
        nbnet_plugin_api::abi::ABI_MAJOR,
        nbnet_plugin_api::abi::ABI_MINOR
    )
}

/// An exit status of a new master, in words.
fn describe(exit: decision::Exit) -> String {
    match exit {
        decision::Exit::Code(code) if code == exit_code::CONFIG_INVALID => {
            format!("{exit}: the config is invalid")
        }
        decision::Exit::Code(code) if code == exit_code::PLUGIN_LOAD_FAILED => {
            format!("{exit}: a plugin failed to load or init")
        }
        decision::Exit::Code(code) if code == exit_code::FAILURE => {
            format!("{exit}: it could not start (cannot listen, pid file…)")
        }
        _ => exit.to_string(),
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
