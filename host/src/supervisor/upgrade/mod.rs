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
//!
//! Files: this one holds the channel, the two sides' states and the status
//! file; `old_master.rs` is the side that starts and promotes (or rolls
//! back) a new master, `new_master.rs` the side that takes over.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::unistd::{getpid, Pid};

mod new_master;
mod old_master;

use super::*;
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
    /// In a worker just forked: the upgrade channels are the master's.
    pub(in crate::supervisor) fn forget_upgrade_channels(&mut self) {
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
