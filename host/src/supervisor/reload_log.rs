//! The master's side of the reload status file (`<pid_file>.reload`, see
//! [`crate::reload_status`]): each reload's state and outcome, rewritten
//! whole at every step, for `nbnet reload` to follow.

use std::path::{Path, PathBuf};

use nix::unistd::{getpid, Pid};

use crate::reload_status::{self, Record, State, Status};

/// The longest reason written to the status file.
const MAX_MESSAGE_CHARS: usize = 4000;

/// The master's side of the reload status file.
pub(super) struct ReloadLog {
    path: Option<PathBuf>,
    status: Status,
    next_id: u64,
    /// A write failed (warned once).
    failing: bool,
    /// Reloads ended, by outcome (`metrics::RELOAD_OUTCOMES` order).
    outcomes: [u64; super::metrics::RELOAD_OUTCOMES.len()],
}

impl ReloadLog {
    /// The status file for `pid_file` (none without one), written at once
    /// so that `nbnet reload` knows this master reports outcomes.
    pub(super) fn new(pid_file: Option<&Path>) -> ReloadLog {
        let mut log = ReloadLog {
            path: pid_file.map(reload_status::path_for),
            status: Status {
                master: getpid().as_raw(),
                reloads: Vec::new(),
                took_over_from: 0,
            },
            next_id: 1,
            failing: false,
            outcomes: Default::default(),
        };
        log.save();
        log
    }

    fn save(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        match reload_status::write(path, &self.status) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(
                    "cannot write the reload status file {}: {e}; `nbnet reload` cannot report outcomes until it can",
                    path.display()
                );
            }
            Err(_) => {}
        }
    }

    /// A new reload, in `state`; its id.
    pub(super) fn add(&mut self, state: State, queued: Option<String>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.status.reloads.push(Record {
            id,
            read_ns: 0,
            state,
            queued,
            message: String::new(),
            code: 0,
        });
        let excess = self
            .status
            .reloads
            .len()
            .saturating_sub(reload_status::KEPT);
        self.status.reloads.drain(..excess);
        self.save();
        id
    }

    pub(super) fn update(&mut self, id: u64, change: impl FnOnce(&mut Record)) {
        // The newest with that id: after an upgrade the old master's records
        // come first, and may share ids.
        if let Some(record) = self.status.reloads.iter_mut().rev().find(|r| r.id == id) {
            change(record);
            self.save();
        }
    }

    /// The reload is about to read the config file.
    pub(super) fn reading(&mut self, id: u64) {
        let now = reload_status::monotonic_ns();
        self.update(id, |r| {
            r.read_ns = now;
            r.state = State::Checking;
        });
    }

    pub(super) fn set(&mut self, id: u64, state: State) {
        self.update(id, |r| r.state = state);
    }

    /// Reloads ended so far, by outcome (`metrics::RELOAD_OUTCOMES` order).
    pub(super) fn outcomes(&self) -> [u64; super::metrics::RELOAD_OUTCOMES.len()] {
        self.outcomes
    }

    /// The reload is over.
    pub(super) fn finish(&mut self, id: u64, state: State, code: i32, message: &str) {
        let outcome = match state {
            State::Done => Some(0),
            State::Refused => Some(1),
            State::RolledBack => Some(2),
            State::Cancelled => Some(3),
            State::Queued | State::Checking | State::Starting => None,
        };
        if let Some(n) = outcome.and_then(|i| self.outcomes.get_mut(i)) {
            *n += 1;
        }
        let message = bounded(message);
        self.update(id, |r| {
            r.state = state;
            r.code = code;
            r.message = message;
            if r.read_ns == 0 {
                // Ended while queued: it covers the requests made until
                // now, not later ones (they follow the next reload).
                r.read_ns = reload_status::monotonic_ns();
            }
        });
    }

    /// `pid_file` moved: so does the status file.
    pub(super) fn move_to(&mut self, pid_file: Option<&Path>) {
        self.remove();
        self.path = pid_file.map(reload_status::path_for);
        self.save();
    }

    /// Removes the file (the master exits).
    pub(super) fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Stops writing the file, and leaves it (a binary upgrade: the new
    /// master takes it over with the pid file).
    pub(super) fn detach(&mut self) {
        self.path = None;
    }

    /// Starts writing the file that goes with `pid_file` (a new master
    /// that took the pid file over, or an old one serving again).
    pub(super) fn attach(&mut self, pid_file: Option<&Path>) {
        self.path = pid_file.map(reload_status::path_for);
        self.status.master = getpid().as_raw();
        self.save();
    }

    /// [`ReloadLog::attach`] for a new master taking over from `from`: the
    /// old master's records are kept (oldest first), so that a `nbnet
    /// reload` that signalled it learns its reload's fate.
    pub(super) fn attach_after(&mut self, pid_file: Option<&Path>, from: Pid) {
        if let Some(path) = pid_file.map(reload_status::path_for) {
            if let Ok(Some(old)) = reload_status::read(&path) {
                if old.master == from.as_raw() {
                    // Numbered on after the old master's, so that the
                    // log's "reload N" stays unambiguous from now on.
                    let last = old.reloads.iter().map(|r| r.id).max().unwrap_or(0);
                    self.next_id = self.next_id.max(last + 1);
                    let mine = std::mem::take(&mut self.status.reloads);
                    self.status.reloads = old.reloads;
                    self.status.reloads.extend(mine);
                    self.status.took_over_from = from.as_raw();
                }
            }
        }
        self.attach(pid_file);
    }
}

fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}… ({} more bytes)", &text[..at], text.len() - at),
        None => text.to_string(),
    }
}
