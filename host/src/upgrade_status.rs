//! The upgrade status file: how `nbnet upgrade` learns what became of the
//! binary upgrade it asked for (see `supervisor/upgrade.rs`).
//!
//! Like the reload status file (see [`crate::reload_status`]), it sits next
//! to the `pid_file` (`<pid_file>.upgrade`) and is rewritten whole. The
//! master that received SIGUSR2 writes it; it holds that master's PID and
//! its last upgrade: when it began (`CLOCK_MONOTONIC`, comparable between
//! processes), where it is, the new master's PID, and the outcome.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where an upgrade is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The new master is starting; the old one serves.
    Starting,
    /// The new master serves; the old one hands its connections over to
    /// it and exits.
    Done,
    /// The new master failed or was not ready in time; the old one serves.
    RolledBack,
    /// Not attempted (an upgrade or a reload was under way, the binary
    /// cannot be run…).
    Refused,
    /// The server stopped before the new master was ready.
    Cancelled,
}

impl State {
    /// Whether the upgrade is over.
    pub fn is_final(self) -> bool {
        self != State::Starting
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The master that writes it (the old one).
    pub master: i32,
    /// `CLOCK_MONOTONIC` nanoseconds when it took the request.
    pub started_ns: u64,
    /// Where the upgrade is.
    pub state: State,
    /// The new master's PID (0 if none was started).
    #[serde(default)]
    pub successor: i32,
    /// The binary the new master runs.
    #[serde(default)]
    pub binary: String,
    /// The outcome; for a failure, why.
    #[serde(default)]
    pub message: String,
    /// For a new master: the master it took over from (the old master's
    /// `Done` record is replaced by the new master's own file the moment
    /// it takes the pid file over, so this is how `nbnet upgrade` learns
    /// that the upgrade it follows is done).
    #[serde(default)]
    pub took_over_from: i32,
    /// The last SIGUSR2 refused while an upgrade was under way
    /// (`CLOCK_MONOTONIC` ns, 0 if none) and why: kept apart, so that the
    /// upgrade under way keeps its own state for whoever follows it.
    #[serde(default)]
    pub refused_ns: u64,
    #[serde(default)]
    pub refused: String,
}

/// The status file that goes with `pid_file`.
pub fn path_for(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".upgrade");
    PathBuf::from(name)
}

/// Reads the file; `Ok(None)` if there is none.
pub fn read(path: &Path) -> io::Result<Option<Status>> {
    crate::reload_status::read_json(path)
}

/// Writes the file atomically.
pub fn write(path: &Path, status: &Status) -> io::Result<()> {
    crate::reload_status::write_json(path, status)
}
