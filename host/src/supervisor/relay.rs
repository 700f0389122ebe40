//! The master's side of connection hand-over (see [`crate::handover`]):
//! each worker's control channel, and the relay that passes a replaced
//! worker's connections on to the workers that serve now.
//!
//! The master relays rather than letting workers talk to each other
//! because it alone knows which workers serve: a connection is only ever
//! passed to a ready worker with the `Serving` role, never to one that is
//! itself outgoing or draining, so nothing reaches a generation that is
//! being retired (or, after a rollback, the generation rolled back).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::unistd::Pid;

use super::*;
use crate::handover::{self, Message};

/// Control channels have tokens `CONTROL_BASE + scoreboard entry`, far above
/// the admin endpoint's.
pub(super) const CONTROL_BASE: usize = 1 << 40;
/// How soon connections that found every taker's channel full are tried again.
pub(super) const RELAY_RETRY: Duration = Duration::from_millis(5);

/// A connection waiting for a taker: every serving worker's channel was
/// full, or no worker was ready to take it (they were all starting).
pub(super) struct Waiting {
    record: handover::Connection,
    fd: handover::Descriptors,
    from: Pid,
    /// When it first had to wait: it is closed if no taker comes within
    /// [`ready_within`] (the time new workers get to become ready).
    since: Instant,
}

impl Waiting {
    pub(super) fn new(
        record: handover::Connection,
        fd: handover::Descriptors,
        from: Pid,
        since: Instant,
    ) -> Waiting {
        Waiting {
            record,
            fd,
            from,
            since,
        }
    }
}

impl Master {
    /// Registers a new worker's end of its control channel.
    pub(super) fn register_control(&self, board: usize, control: &OwnedFd) {
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&control.as_raw_fd()),
            Token(CONTROL_BASE + board),
            Interest::READABLE,
        ) {
            tracing::warn!("cannot watch a worker's control channel ({e}): its connections will be closed, not handed over, when it is replaced");
        }
    }

    /// Forgets a worker's control channel (it exited).
    pub(super) fn drop_control(&self, control: OwnedFd) {
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&control.as_raw_fd()));
    }

    /// Reads the control channel of the worker with scoreboard entry
    /// `board`: connections it hands over are passed on.
    pub(super) fn on_control(&mut self, board: usize) {
        let Some((&from, _)) = self.workers.iter().find(|(_, w)| w.board == board) else {
            return;
        };
        loop {
            let Some(control) = self.workers.get(&from).and_then(|w| w.control.as_ref()) else {
                return;
            };
            match handover::recv(control.as_fd()) {
                Ok(Some(Message::Connection(record, fd))) => self.relay(record, fd, from),
                // "Replace me": the scoreboard says so too; this event woke
                // the loop, which now looks (watch_workers).
                Ok(Some(
                    Message::HandOver
                    | Message::Retire
                    | Message::Stop { .. }
                    | Message::Ready(_)
                    | Message::Promoted
                    | Message::Failed(_),
                )) => {}
                Ok(Some(Message::Lost(about))) => {
                    self.retired.handover_failures += 1;
                    tracing::warn!(
                        "a connection handed over by worker pid {from} was lost: the master has no file descriptor free (raise its limit: ulimit -n / LimitNOFILE); record {about:?}"
                    );
                }
                Ok(None) => {
                    // The worker closed its end (it is exiting).
                    if let Some(control) =
                        self.workers.get_mut(&from).and_then(|w| w.control.take())
                    {
                        self.drop_control(control);
                    }
                    return;
                }
                Err(e) if handover::would_block(&e) => return,
                Err(e) => {
                    tracing::warn!("control channel of worker pid {from}: {e}");
                    return;
                }
            }
        }
    }

    /// Passes a connection on to a serving worker (round robin), or keeps
    /// it for a moment if every one's channel is full, or closes it if no
    /// worker serves (the client sees a close at a frame boundary).
    pub(super) fn relay(
        &mut self,
        record: handover::Connection,
        fd: handover::Descriptors,
        from: Pid,
    ) {
        self.relay_since(record, fd, from, Instant::now());
    }

    fn relay_since(
        &mut self,
        record: handover::Connection,
        fd: handover::Descriptors,
        from: Pid,
        since: Instant,
    ) {
        // After a binary upgrade: to the new master.
        let Err((record, fd)) = self.relay_to_successor(record, fd, from, since) else {
            return;
        };
        if self.phase != Phase::Serving {
            self.handover_failed(&record, "the server is stopping");
            return;
        }
        // Ready workers of the serving generation; failing those, ready
        // workers that still serve while their replacement starts (a
        // recycled one, say) — never one that drains.
        let ready = |role: Role| -> Vec<(usize, Pid)> {
            self.workers
                .iter()
                .filter(|(pid, w)| {
                    **pid != from
                        && w.role == role
                        && w.control.is_some()
                        && self.scoreboard.slot(w.board).is_ready()
                })
                .map(|(pid, w)| (w.board, *pid))
                .collect()
        };
        let mut takers = ready(Role::Serving);
        if takers.is_empty() {
            takers = ready(Role::Outgoing);
        }
        if takers.is_empty() {
            // Every worker is starting: wait for one to be ready.
            if since.elapsed() > ready_within(&self.config) {
                self.handover_failed(&record, "no worker became ready to take it");
            } else {
                self.relay_waiting.push_back(Waiting {
                    record,
                    fd,
                    from,
                    since,
                });
            }
            return;
        }
        takers.sort_unstable();
        let start = self.relay_next % takers.len();
        self.relay_next = self.relay_next.wrapping_add(1);
        for i in 0..takers.len() {
            let (_, pid) = takers[(start + i) % takers.len()];
            let Some(control) = self.workers.get(&pid).and_then(|w| w.control.as_ref()) else {
                continue;
            };
            match handover::send_connection(
                control.as_fd(),
                &record,
                fd.stream.as_fd(),
                fd.unread.as_ref(),
            ) {
                Ok(()) => return,
                Err(e) if handover::would_block(&e) => continue,
                Err(e) => tracing::debug!("cannot pass a connection to worker pid {pid}: {e}"),
            }
        }
        // Every channel full: wait for the takers to read theirs.
        self.relay_waiting.push_back(Waiting {
            record,
            fd,
            from,
            since,
        });
    }

    /// Tries the connections that had to wait again.
    pub(super) fn relay_retry(&mut self) {
        for waiting in std::mem::take(&mut self.relay_waiting) {
            self.relay_since(waiting.record, waiting.fd, waiting.from, waiting.since);
        }
    }

    /// A connection still waiting when this master exits: closed.
    pub(super) fn relay_abandoned(&mut self, waiting: Waiting) {
        self.handover_failed(
            &waiting.record,
            "this master exits and no worker took it in time",
        );
    }

    /// A connection no worker can take: closed (its descriptor dropped).
    fn handover_failed(&mut self, record: &handover::Connection, why: &str) {
        self.retired.handover_failures += 1;
        tracing::warn!(
            peer = %record.peer,
            "connection from listener {} closed instead of handed over: {why}",
            record.listener
        );
    }

    /// Asks worker `pid` to hand its connections over and leave; a worker
    /// without a channel (or whose channel is full) is sent SIGTERM and
    /// closes them at frame boundaries instead.
    pub(super) fn ask_to_hand_over(&self, pid: Pid) {
        let asked = self
            .workers
            .get(&pid)
            .and_then(|w| w.control.as_ref())
            .is_some_and(|control| handover::send_hand_over(control.as_fd()).is_ok());
        if !asked {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// When queued connections should be tried again.
    pub(super) fn relay_wakeup(&self) -> Option<Instant> {
        (!self.relay_waiting.is_empty()).then(|| Instant::now() + RELAY_RETRY)
    }
}
