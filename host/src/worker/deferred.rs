//! The reactor's side of deferred answers (ABI 1.3): which requests are
//! pending, on which connection, until when.
//!
//! ```text
//!  plugin: resp->defer ──► handle (token) ──► any thread: nbnet_answer
//!                              │                        │ copy, queue,
//!   connection's queue:        ▼                        ▼ wake (mio Waker)
//!   [Ready bytes][Awaiting token][Ready bytes]…   reactor: look the token up,
//!                                                 fill its slot, send the
//!                                                 ready front of the queue
//! ```
//!
//! A connection's answers go out in request order: its queue holds slots
//! that are either filled bytes or a request awaiting its completion, and
//! only the filled front of the queue is sent. The handle a plugin holds
//! carries only a token (see [`crate::plugin::deferred`]): completing it
//! after the connection has gone finds nothing here and does nothing.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nbnet_plugin_api::abi::RawDeferred;
use nbnet_plugin_api::sink::Deferrer;

use crate::plugin::deferred::{Completions, Done, FreeCells};

/// One place in a connection's in-order answer queue.
#[derive(Debug)]
pub enum Answer {
    /// Complete response frames, ready to send once everything before
    /// them is.
    Ready(Vec<u8>),
    /// A deferred request's answer, not completed yet.
    Awaiting(u64),
    /// A deferred request that failed (the message to log): the connection
    /// closes once every answer before it is sent.
    Failed(String),
}

/// How many requests the worker has pending, shared by the handle maker
/// (which refuses past the limit) and the table.
#[derive(Debug, Default)]
struct Count {
    pending: Cell<usize>,
    next_token: Cell<u64>,
}

/// Makes handles for plugins' `defer` calls (lent to the response sink).
pub struct Maker {
    completions: &'static Completions,
    /// Cells to reuse without taking the completion queue's lock.
    stash: FreeCells,
    count: Rc<Count>,
    limit: usize,
}

impl Deferrer for Maker {
    fn defer(&mut self) -> Result<(*mut RawDeferred, u64), String> {
        let pending = self.count.pending.get();
        if pending >= self.limit {
            return Err(format!(
                "deferred a request past max_deferred_per_worker = {} (requests this worker has waiting for their answers); the request fails",
                self.limit
            ));
        }
        self.count.pending.set(pending + 1);
        let token = self.count.next_token.get() + 1;
        self.count.next_token.set(token);
        Ok((self.completions.handle_from(&mut self.stash, token), token))
    }
}

/// Hashes the table's tokens: numbers the worker counts up itself (no
/// client chooses them), so a multiplication spreads them well enough and
/// costs a fraction of the default SipHash (twice per deferred request).
#[derive(Debug, Default, Clone, Copy)]
pub struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A pending request: whose it is and since when.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The connection's slab key and id (the key alone may be reused).
    key: usize,
    conn_id: u64,
    /// Index of the plugin that deferred it.
    plugin: usize,
    since: Instant,
    /// Bytes of the request a thread pool holds for it (0 otherwise).
    held: usize,
}

/// The connection a deferred request belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Holder {
    /// Its slab key.
    pub key: usize,
    /// Its id (the key alone may be reused).
    pub conn_id: u64,
}

/// A pending request resolved: whose, and what a pool held for it.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    /// Its connection.
    pub at: Holder,
    /// Bytes of the request a thread pool held (0 otherwise).
    pub held: usize,
}

/// A pending request that ran out of time.
#[derive(Debug, Clone, Copy)]
pub struct Expired {
    /// Its connection's slab key.
    pub key: usize,
    /// The plugin that deferred it.
    pub plugin: usize,
    /// How long it waited.
    pub waited: Duration,
}

/// The worker's pending deferred requests.
pub struct Deferreds {
    completions: &'static Completions,
    count: Rc<Count>,
    pending: HashMap<u64, Entry, BuildHasherDefault<TokenHasher>>,
    /// Deadlines in the order requests were deferred (`deferred_timeout`
    /// is the same for all, so this is also deadline order). Entries of
    /// requests completed meanwhile are skipped when reached.
    deadlines: VecDeque<(Instant, u64)>,
    timeout: Duration,
    /// Refused completions already added to the worker's statistics.
    refused_seen: u64,
    /// An empty Vec to swap with the completion queue.
    spare: Vec<Done>,
}

impl Deferreds {
    /// The table for a worker whose completions come through `completions`.
    pub fn new(
        completions: &'static Completions,
        max_per_worker: usize,
        timeout: Duration,
    ) -> (Deferreds, Box<Maker>) {
        let count = Rc::new(Count::default());
        let maker = Box::new(Maker {
            completions,
            stash: FreeCells::default(),
            count: Rc::clone(&count),
            limit: max_per_worker,
        });
        let table = Deferreds {
            completions,
            count,
            pending: HashMap::default(),
            deadlines: VecDeque::new(),
            timeout,
            refused_seen: 0,
            spare: Vec::new(),
        };
        (table, maker)
    }

    /// Request `token` now waits on connection `key` (id `conn_id`); a
    /// thread pool holds `held` bytes of it meanwhile.
    pub fn register(&mut self, token: u64, at: Holder, plugin: usize, now: Instant, held: usize) {
        self.pending.insert(
            token,
            Entry {
                key: at.key,
                conn_id: at.conn_id,
                plugin,
                since: now,
                held,
            },
        );
        self.deadlines
            .push_back((crate::config::deadline(now, self.timeout), token));
        // Completed entries linger in `deadlines` until reached: keep them
        // from piling up behind one slow request.
        if self.deadlines.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.deadlines
                .retain(|(_, token)| pending.contains_key(token));
        }
    }

    /// A request deferred but never registered (its connection closed in
    /// the same read): no longer counted.
    pub fn forget(&mut self, n: usize) {
        self.count
            .pending
            .set(self.count.pending.get().saturating_sub(n));
    }

    /// Its connection closed: request `token` is pending no more (a later
    /// completion does nothing).
    pub fn cancel(&mut self, token: u64) {
        if self.pending.remove(&token).is_some() {
            self.forget(1);
        }
    }

    /// The completions queued since the last call (give the Vec back,
    /// emptied, with [`Deferreds::give_back`]).
    pub fn take(&mut self) -> Vec<Done> {
        let mut done = std::mem::take(&mut self.spare);
        self.completions.take_into(&mut done);
        done
    }

    /// Returns a Vec from [`Deferreds::take`] (its allocation is reused).
    pub fn give_back(&mut self, mut done: Vec<Done>) {
        done.clear();
        self.spare = done;
    }

    /// Completions refused (second completions) since the last call.
    pub fn newly_refused(&mut self) -> u64 {
        let total = self.completions.refused();
        let new = total.wrapping_sub(self.refused_seen);
        self.refused_seen = total;
        new
    }

    /// Takes request `token` out of the table: the connection it belongs
    /// to, or `None` if it is not pending (its connection closed).
    pub fn resolve(&mut self, token: u64) -> Option<Resolved> {
        let entry = self.pending.remove(&token)?;
        self.forget(1);
        Some(Resolved {
            at: Holder {
                key: entry.key,
                conn_id: entry.conn_id,
            },
            held: entry.held,
        })
    }

    /// The oldest pending request whose deadline has passed, taken out of
    /// the table.
    pub fn next_expired(&mut self, now: Instant) -> Option<Expired> {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if !self.pending.contains_key(&token) {
                self.deadlines.pop_front();
                continue;
            }
            if deadline > now {
                return None;
            }
            self.deadlines.pop_front();
            let entry = self.pending.remove(&token)?;
            self.forget(1);
            return Some(Expired {
                key: entry.key,
                plugin: entry.plugin,
                waited: now.saturating_duration_since(entry.since),
            });
        }
        None
    }

    /// When the oldest pending request times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        // The front may be a completed request's (skipped later): waking
        // early for it is harmless.
        self.deadlines.front().map(|&(at, _)| at)
    }
}

impl super::reactor::Reactor {
    /// The waker fired: delivers every deferred answer completed since
    /// the last time, each to its connection's queue (in request order).
    pub(super) fn on_completions(&mut self, now: Instant) {
        let refused = self.deferred.newly_refused();
        if refused > 0 {
            self.slot.stats.deferred_refused.add(refused);
            tracing::warn!(
                "{refused} completion(s) of deferred answers refused: their handle had been completed already (a plugin bug)"
            );
        }
        let mut done = self.deferred.take();
        for Done { token, result } in done.drain(..) {
            let Some(Resolved {
                at: Holder { key, conn_id },
                held,
            }) = self.deferred.resolve(token)
            else {
                // Its connection closed (the client left, a deadline, an
                // error): nothing to send.
                self.slot.stats.deferred_late.add(1);
                continue;
            };
            let Some((conn, mut ctx, scratch)) =
                self.lend(key).filter(|(conn, ..)| conn.id() == conn_id)
            else {
                self.slot.stats.deferred_late.add(1);
                continue;
            };
            let held_before = conn.buffered_bytes();
            if let Some(stats) = ctx.stats {
                match &result {
                    Ok(_) => stats.record_answered(1),
                    Err(_) => stats.record_failure(crate::scoreboard::Outcome::Error),
                }
            }
            let outcome = conn.on_completed(token, result, held, &mut ctx, scratch);
            self.after_event(key, held_before, outcome, now);
        }
        self.deferred.give_back(done);
    }

    /// Lends connection `key` what an event needs: the connection, its
    /// [`Context`](super::conn::Context) and the worker's scratch buffers.
    /// (The event loop uses the [`context!`](super::reactor::context)
    /// macro itself: it keeps other fields of the reactor in use.)
    pub(super) fn lend(
        &mut self,
        key: usize,
    ) -> Option<(
        &mut super::conn::Connection,
        super::conn::Context<'_>,
        &mut super::conn::Scratch,
    )> {
        let conn = self.connections.get_mut(key)?;
        let ctx = super::reactor::context!(self, conn, key);
        Some((conn, ctx, &mut self.scratch))
    }

    /// After an event outside the event loop (a completion, a hand-over)
    /// on connection `key`, which held `held_before` bytes: the worker's
    /// buffer account, the read deadline, a drain, or the close.
    pub(super) fn after_event(
        &mut self,
        key: usize,
        held_before: usize,
        outcome: Result<bool, super::conn::Close>,
        now: Instant,
    ) {
        let Some(conn) = self.connections.get(key) else {
            return;
        };
        let held_after = conn.buffered_bytes();
        if held_after != held_before {
            super::budget::account(
                &mut self.buffered,
                &mut self.holders,
                held_before,
                held_after,
            );
        }
        // Answers completed for a client that does not read them count
        // too: past the budget the largest holders are closed (see
        // `shed`), as after a read.
        let shed = held_after > held_before && self.must_shed(held_after);
        match outcome {
            Ok(_) if self.draining.is_some() && conn.may_leave(self.handing_over) => {
                self.retire(key, now)
            }
            Ok(true) => {
                // As for reads: re-link only when the deadline moves by
                // more than 1/64 of the timeout.
                let deadline = crate::config::deadline(now, self.limits.read_timeout);
                let moved = deadline
                    .checked_sub(self.limits.read_timeout / 64)
                    .is_none_or(|relink_before| relink_before > conn.deadline());
                if moved {
                    self.deadlines.touch(&mut self.connections, key, deadline);
                }
            }
            Ok(false) => {}
            Err(reason) => self.close(key, reason),
        }
        if shed {
            self.shed(now);
        }
    }

    /// Fails every deferred request older than `deferred_timeout`: its
    /// connection is closed (after the answers before it).
    pub(super) fn expire_deferred(&mut self, now: Instant) {
        while let Some(expired) = self.deferred.next_expired(now) {
            self.slot.stats.deferred_timeouts.add(1);
            if !self.connections.contains(expired.key) {
                continue;
            }
            let plugin = self.plugins[expired.plugin].name().to_string();
            self.close(
                expired.key,
                super::conn::Close::DeferredTimeout(Box::new(super::conn::DeferredTimeout {
                    plugin,
                    waited: expired.waited,
                })),
            );
        }
    }
}
