//! A connection moving to another worker (see [`crate::handover`]): when
//! it may leave, what goes with it, and how it starts in its new worker.
//!
//! ```text
//!   the worker is told to hand over (a reload, a replacement):
//!     - requests a thread pool queued and did not start are taken back
//!       (their frames return to the connection's unread bytes);
//!     - a connection stops reading (Reading → Waiting), unless it is TLS;
//!     - it leaves as soon as nothing is owed to the client: no deferred
//!       answer pending, no answer unsent. What it read and did not answer
//!       (part of a frame, frames held back, the requests taken back) goes
//!       with it; the new worker answers them before reading the socket.
//! ```
//!
//! So a connection waits only for answers already being computed (a pool
//! thread running its request, a plugin's own deferred answer: bounded by
//! `deferred_timeout` and `shutdown_timeout`), never for a request that no
//! one started, nor for a client to finish sending a frame. TLS
//! connections cannot move (their session lives in this process): they are
//! served to their next frame boundary and closed there, as before.

use std::time::Instant;

use super::{Close, Connection, Context, State};
use crate::codec::header;
use crate::handover;
use crate::listener::Stream;
use crate::plugin::pool::Unstarted;
use crate::worker::deferred::Answer;
use nbnet_plugin_api::abi::NBNET_CONN_HANDED_OVER;

impl Connection {
    /// A connection another worker accepted and handed over, with the
    /// bytes that worker read from it and did not answer (`unread`; they
    /// come before anything still in the socket).
    pub fn adopted(
        stream: Stream,
        record: &handover::Connection,
        listener: usize,
        deadline: Instant,
        unread: Vec<u8>,
    ) -> Self {
        let mut conn = Connection::new(
            stream,
            record.peer.clone(),
            listener,
            record.id,
            deadline,
            record.awaiting_proxy_header,
        );
        conn.fresh = false;
        conn.pipelining = record.pipelining;
        conn.flags = NBNET_CONN_HANDED_OVER;
        conn.input_len = unread.len();
        conn.input = unread;
        conn
    }

    /// Whether it can leave its worker now. When the worker is stopping
    /// (`handing_over` false) that is at a frame boundary with every answer
    /// sent; when it hands connections over, as soon as nothing is owed to
    /// the client (what it sent and is unanswered moves with it) — but a
    /// TLS connection, which cannot move, still ends at a frame boundary.
    pub fn may_leave(&self, handing_over: bool) -> bool {
        if !handing_over || self.is_tls() {
            return self.is_idle();
        }
        self.queue.is_empty()
            && self.output.is_empty()
            && matches!(
                self.state,
                State::Reading | State::Waiting | State::ProxyHeader
            )
    }

    /// Bytes read from the client and not answered: they go with it.
    pub fn unread(&self) -> &[u8] {
        &self.input[..self.input_len]
    }

    /// What another worker needs to take this connection over, if it can
    /// move now (see [`Connection::may_leave`]); not a TLS connection, nor
    /// one whose client shut its side with nothing left to answer (it ends
    /// here: the new worker would only read the EOF). One that shut its
    /// side after requests not answered yet moves with them: the new
    /// worker answers them, then reads the EOF from the socket itself.
    /// `listener` is its listener's address as the config writes it.
    pub fn hand_over_record(&self, listener: &str) -> Option<handover::Connection> {
        let kind = match self.stream {
            Stream::Tcp(_) => handover::StreamKind::Tcp,
            Stream::Unix(_) => handover::StreamKind::Unix,
            // A TLS session's keys and sequence numbers live in this
            // process: it closes here, at the frame boundary, with
            // close_notify (see README "Operations").
            Stream::Tls(_) => return None,
        };
        let owed_nothing_and_done = self.peer_shut && self.input_len == 0;
        (self.may_leave(true) && !owed_nothing_and_done).then(|| handover::Connection {
            kind,
            id: self.id,
            pipelining: self.pipelining,
            awaiting_proxy_header: self.state == State::ProxyHeader,
            listener: listener.to_string(),
            peer: self.peer().to_string(),
        })
    }

    /// From now on plugins see this connection as handed over (its
    /// `on_close` in this worker).
    pub fn mark_handed_over(&mut self) {
        self.flags = NBNET_CONN_HANDED_OVER;
    }

    /// The worker hands its connections over: read no more here (a
    /// request read now would be answered here, and keep the connection
    /// longer). Reading stays paused: `must_wait` says so while leaving.
    pub fn pause_for_hand_over(&mut self) {
        if self.state == State::Reading && !self.is_tls() {
            self.transition(State::Waiting);
        }
    }

    /// Requests of this connection that a thread pool had queued and not
    /// started, taken back from it (`requests`: their tokens and payloads,
    /// in request order): their slots leave the answer queue and their
    /// frames return to the unread bytes, ahead of what is there, to be
    /// answered by the worker that takes the connection over.
    ///
    /// They are the last slots of its queue (a pool takes requests in
    /// order, and every request of a pooled listener is deferred). Should a
    /// slot come after them all the same (a request that failed), the
    /// connection ends at that failure anyway: the first of them then
    /// fails too, with a message that says why.
    pub fn take_back(
        &mut self,
        requests: Vec<Unstarted>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Close> {
        let Some(Unstarted { token: first, .. }) = requests.first() else {
            return Ok(());
        };
        let Some(at) = self
            .queue
            .iter()
            .position(|slot| matches!(slot, Answer::Awaiting(t) if t == first))
        else {
            return Ok(());
        };
        // The pool holds their copies no more.
        let taken: usize = requests.iter().map(|r| r.request.len()).sum();
        self.pooled = self.pooled.saturating_sub(taken);
        let tail_is_theirs = self.queue.len() - at == requests.len()
            && self
                .queue
                .iter()
                .skip(at)
                .zip(&requests)
                .all(|(slot, r)| matches!(slot, Answer::Awaiting(t) if *t == r.token));
        if !tail_is_theirs {
            self.fail_at(
                at,
                "a request taken back from the thread pool (the worker is being replaced) is followed by one that failed: the connection ends here".into(),
                ctx.deferred,
            );
            // It may be at the front: then the connection ends now.
            return self.deliver(&ctx.slot.stats);
        }
        self.queue.truncate(at);
        self.awaiting -= requests.len();
        let held = self.input_len;
        let mut input = Vec::with_capacity(
            requests
                .iter()
                .map(|r| crate::codec::HEADER_LEN + r.request.len())
                .sum::<usize>()
                + held,
        );
        for Unstarted { request, .. } in &requests {
            input.extend_from_slice(&header(request.len()));
            input.extend_from_slice(request);
        }
        input.extend_from_slice(&self.input[..held]);
        self.input_len = input.len();
        self.input = input;
        Ok(())
    }
}
