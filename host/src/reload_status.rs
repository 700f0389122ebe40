//! The reload status file: how `nbnet reload` learns what became of *its*
//! reload.
//!
//! A SIGHUP carries no answer, and signals that arrive together merge into
//! one, so the master keeps a small JSON file next to its `pid_file`
//! (`<pid_file>.reload`), rewritten atomically (a temporary file renamed
//! over it) whenever a reload changes state. It holds the master's PID and
//! the last [`KEPT`] reloads, each with:
//!
//! - `id`, counting up;
//! - `read_ns`: when the master began reading the config file for it
//!   (`CLOCK_MONOTONIC`, the same clock in every process), 0 while queued
//!   (one cancelled while queued gets the time it was cancelled: it covers
//!   the requests made until then);
//! - `state`: `queued`, `checking`, `starting`, then `done`, `refused`,
//!   `rolled-back` or `cancelled`;
//! - `queued`: why it had to wait, if it did; `message`: the outcome, and
//!   for a failure the master's reason; `code`: the exit status for
//!   `nbnet reload`.
//!
//! `nbnet reload` notes the clock, sends SIGHUP, and follows the first
//! reload that reads the config after that moment (or is still queued, so
//! will): that reload has seen every edit made before `nbnet reload` ran.
//! Several SIGHUPs coalesced into one reload all get its outcome.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Reloads kept in the file (older ones are dropped).
pub const KEPT: usize = 32;

/// Where a reload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Waiting for the reload under way, or for old workers to finish draining.
    Queued,
    /// The new config's plugins are being loaded in a checker child.
    Checking,
    /// New workers are starting; the old ones serve until all are ready.
    Starting,
    /// The new config serves.
    Done,
    /// Nothing changed: the config, a plugin or a resource was refused.
    Refused,
    /// New workers failed; the previous config serves again.
    RolledBack,
    /// The server stopped first.
    Cancelled,
}

impl State {
    /// Whether the reload is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Done | State::Refused | State::RolledBack | State::Cancelled
        )
    }

    /// How `nbnet reload` names it.
    pub fn describe(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Checking => "checking the new config's plugins",
            State::Starting => "starting the new workers",
            State::Done => "reload complete",
            State::Refused => "reload refused",
            State::RolledBack => "reload rolled back",
            State::Cancelled => "reload cancelled",
        }
    }
}

/// One reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Counts up from 1 in each master.
    pub id: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the master began reading the
    /// config for it; 0 while queued.
    pub read_ns: u64,
    /// Where it is.
    pub state: State,
    /// Why it was queued, if it was.
    #[serde(default)]
    pub queued: Option<String>,
    /// The outcome (for a failure: the master's reason).
    #[serde(default)]
    pub message: String,
    /// The exit status `nbnet reload` reports for it (0 once done).
    #[serde(default)]
    pub code: i32,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The master that writes it.
    pub master: i32,
    /// The last [`KEPT`] reloads, oldest first.
    pub reloads: Vec<Record>,
    /// After a binary upgrade: the old master whose records this new one
    /// took over (a `nbnet reload` that signalled the old master follows
    /// its reload here).
    #[serde(default)]
    pub took_over_from: i32,
}

impl Status {
    /// The reload that covers a request made at `sent_ns` (`CLOCK_MONOTONIC`,
    /// taken just before the SIGHUP was sent): the first that began reading
    /// the config after it, or that has not read it (queued; or cancelled
    /// while queued).
    pub fn covering(&self, sent_ns: u64) -> Option<&Record> {
        self.reloads
            .iter()
            .find(|r| r.read_ns > sent_ns || r.read_ns == 0)
    }
}

/// The status file that goes with `pid_file`.
pub fn path_for(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".reload");
    PathBuf::from(name)
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// Reads the file; `Ok(None)` if there is none.
pub fn read(path: &Path) -> io::Result<Option<Status>> {
    read_json(path)
}

/// Reads a JSON status file; `Ok(None)` if there is none.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes the file atomically: readers see the old or the new one whole.
pub fn write(path: &Path, status: &Status) -> io::Result<()> {
    write_json(path, status)
}

/// Writes a JSON status file atomically (a temporary file renamed over it).
pub fn write_json<T: Serialize>(path: &Path, status: &T) -> io::Result<()> {
    let text = serde_json::to_string_pretty(status).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, read_ns: u64, state: State) -> Record {
        Record {
            id,
            read_ns,
            state,
            queued: None,
            message: String::new(),
            code: 0,
        }
    }

    #[test]
    fn the_covering_reload_is_the_first_that_reads_the_config_after_the_request() {
        let status = Status {
            took_over_from: 0,
            master: 7,
            reloads: vec![
                record(1, 100, State::Done),
                record(2, 200, State::Refused),
                record(3, 0, State::Queued),
            ],
        };
        assert_eq!(status.covering(50).map(|r| r.id), Some(1));
        assert_eq!(status.covering(100).map(|r| r.id), Some(2));
        assert_eq!(status.covering(150).map(|r| r.id), Some(2));
        assert_eq!(
            status.covering(250).map(|r| r.id),
            Some(3),
            "a queued reload reads the config later"
        );
        let status = Status {
            took_over_from: 0,
            master: 7,
            reloads: vec![record(1, 100, State::Done)],
        };
        assert_eq!(status.covering(150), None, "not there yet");
    }

    #[test]
    fn the_file_round_trips_and_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("nbnet-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("nbnet.pid"));
        assert!(path.ends_with("nbnet.pid.reload"));
        assert_eq!(read(&path).unwrap(), None);
        let mut status = Status {
            took_over_from: 0,
            master: 42,
            reloads: vec![record(1, monotonic_ns(), State::Checking)],
        };
        write(&path, &status).unwrap();
        assert_eq!(read(&path).unwrap().as_ref(), Some(&status));
        status.reloads[0].state = State::RolledBack;
        status.reloads[0].message = "line one\nline \"two\"".into();
        write(&path, &status).unwrap();
        assert_eq!(read(&path).unwrap(), Some(status));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
