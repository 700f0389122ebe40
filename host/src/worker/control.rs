//! The worker's side of its control channel to the master (see
//! [`crate::handover`]): "hand your connections over", "stop", and the
//! connections other workers hand to this one.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use nix::sys::signal::Signal;

use super::conn::{Close, Connection};
use super::reactor::{Accepting, Reactor, HANDOVER_RETRY};
use crate::config;
use crate::handover;
use crate::plugin::pool::Unstarted;

impl Reactor {
    /// Reads the control channel: the master's "hand over" request, and
    /// connections handed to this worker.
    pub(super) fn on_control(&mut self, now: Instant) {
        loop {
            let Some(control) = &self.control else {
                return;
            };
            match handover::recv(control.as_fd()) {
                Ok(Some(handover::Message::HandOver)) => self.begin_hand_over(now),
                // Not for a worker (records between masters).
                Ok(Some(
                    handover::Message::Retire
                    | handover::Message::Ready(_)
                    | handover::Message::Promoted
                    | handover::Message::Failed(_),
                )) => {}
                Ok(Some(handover::Message::Lost(about))) => {
                    self.slot.stats.handover_failures.add(1);
                    tracing::warn!(
                        "a connection handed over to this worker was lost: no file descriptor free to receive it (raise the limit: ulimit -n / LimitNOFILE); record {about:?}"
                    );
                }
                // The server stops: as SIGTERM/SIGINT would say, but no
                // plugin's signal handler can hide this.
                Ok(Some(handover::Message::Stop { fast: false })) => {
                    self.begin_drain(Signal::SIGTERM, now)
                }
                Ok(Some(handover::Message::Stop { fast: true })) => self.stop_now = true,
                Ok(Some(handover::Message::Connection(record, fds))) => {
                    self.adopt(record, fds, now)
                }
                Ok(None) => {
                    // The master is gone (this worker follows: its parent-
                    // death signal); nothing more comes this way.
                    if let Some(control) = self.control.take() {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut mio::unix::SourceFd(&control.as_raw_fd()));
                        crate::fork_guard::release(control.as_raw_fd());
                    }
                    return;
                }
                Err(e) if handover::would_block(&e) => return,
                Err(e) => {
                    tracing::warn!("control channel: {e}");
                    return;
                }
            }
        }
    }

    /// Takes over a connection another worker handed over. Refused (and
    /// closed: the client sees a close at a frame boundary, and may retry:
    /// nothing it sent was read) when this worker no longer has its
    /// listener, is full, or is draining itself.
    pub(super) fn adopt(
        &mut self,
        record: handover::Connection,
        fds: handover::Descriptors,
        now: Instant,
    ) {
        let handover::Descriptors { stream: fd, unread } = fds;
        let listener = self
            .listeners
            .iter()
            .position(|l| l.addr.to_string() == record.listener);
        let index = match listener {
            None => Err("its listener is not in this worker's config"),
            Some(_) if self.draining.is_some() => Err("this worker is stopping"),
            Some(_) if self.connections.len() >= self.limits.max_connections => {
                Err("this worker is at max_connections")
            }
            Some(index) => Ok(index),
        };
        let index = match index {
            Ok(index) => index,
            Err(why) => {
                self.slot.stats.handover_failures.add(1);
                tracing::warn!(
                    peer = %record.peer,
                    "connection handed over from {} closed: {why}",
                    record.listener
                );
                return;
            }
        };
        // The listener's lists as this worker's config has them (a reload
        // may have changed them): a client they refuse does not move.
        let listener = &self.listeners[index];
        if let (Some(access), false) = (&listener.access, record.awaiting_proxy_header) {
            let ip = record.peer.parse::<std::net::SocketAddr>().map(|a| a.ip());
            if !ip.is_ok_and(|ip| access.permits(ip)) {
                self.slot.stats.access_refused.add(1);
                tracing::info!(
                    peer = %record.peer,
                    listener = %record.listener,
                    "connection handed over closed: the listener's allow/deny lists refuse this client"
                );
                return;
            }
        }
        let stream = match record.kind {
            handover::StreamKind::Tcp => {
                let stream = std::net::TcpStream::from(fd);
                let _ = stream.set_nonblocking(true);
                let _ = stream.set_nodelay(true);
                crate::listener::Stream::Tcp(mio::net::TcpStream::from_std(stream))
            }
            handover::StreamKind::Unix => {
                let stream = std::os::unix::net::UnixStream::from(fd);
                let _ = stream.set_nonblocking(true);
                crate::listener::Stream::Unix(mio::net::UnixStream::from_std(stream))
            }
        };
        // What the old worker read and did not answer: answered here
        // first (see `conn::moving`).
        // At most what one connection may hold here (a read more than
        // alone: the frames of one read held back, or a read's requests
        // past max_pending_output_bytes a pool had queued). The budget
        // then counts them like any bytes a connection holds (see
        // `budget::shed`).
        let most = self.limits.max_buffered_bytes.max(
            super::budget::lone_allowance(&self.limits).saturating_add(super::conn::SCRATCH_INPUT),
        );
        let unread = match unread.map(|u| u.read(most)) {
            None => Vec::new(),
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                self.slot.stats.handover_failures.add(1);
                tracing::warn!(
                    peer = %record.peer,
                    "connection handed over from {} closed: cannot take the requests it had sent ({e})",
                    record.listener
                );
                return;
            }
        };
        let carried = !unread.is_empty();
        let stream = crate::fork_guard::stream_off_stdio(stream);
        self.slot.stats.connections_adopted.add(1);
        tracing::debug!(
            peer = %record.peer,
            listener = %record.listener,
            unread = unread.len(),
            "connection handed over to this worker"
        );
        let Some(key) = self.admit(stream, now, false, |stream, deadline| {
            Connection::adopted(stream, &record, index, deadline, unread)
        }) else {
            return;
        };
        if carried {
            // No event will say these bytes are there: answer them now.
            // What the connection holds after that is new to this
            // worker's budget (from 0): counted, and shed past it, like
            // bytes it had read itself.
            if let Some((conn, mut ctx, scratch)) = self.lend(key) {
                let outcome = conn.on_readable(&mut ctx, scratch, false);
                self.after_event(key, 0, outcome, now);
            }
        }
    }

    /// The master asks this worker to leave without closing its clients'
    /// connections: stop accepting, hand every connection at a frame
    /// boundary over now, and each of the others once its frame is
    /// answered. `shutdown_timeout` bounds it, as for a graceful stop.
    pub(super) fn begin_hand_over(&mut self, now: Instant) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(config::deadline(now, self.limits.shutdown_timeout));
        self.handing_over = true;
        self.pause_accepting(Accepting::Closed);
        let before = self.connections.len();
        self.take_back_pooled_requests();
        for (_, conn) in self.connections.iter_mut() {
            conn.pause_for_hand_over();
        }
        self.hand_over_idle(now);
        tracing::info!(
            "being replaced: handing {before} connection(s) over to the serving workers ({} follow once the answers owed to them are sent, or close at a frame boundary if TLS)",
            self.connections.len()
        );
    }

    /// Requests thread pools queued and did not start go back to their
    /// connections, to move with them (see `conn::moving`): the worker
    /// that takes them answers them, instead of this one answering them
    /// behind a stuck pool thread or failing them at `deferred_timeout`.
    fn take_back_pooled_requests(&mut self) {
        // Per connection (its key), in request order.
        let mut taken: Vec<(usize, Vec<Unstarted>)> = Vec::new();
        let mut count = 0;
        // TLS connections do not move (their session stays here): their
        // requests stay queued, and this worker answers them.
        let staying: std::collections::HashSet<u64> = self
            .connections
            .iter()
            .filter(|(_, conn)| conn.is_tls())
            .map(|(_, conn)| conn.id())
            .collect();
        let moves = |conn_id: u64| !staying.contains(&conn_id);
        for plugin in &self.plugins {
            for request in plugin.withdraw_queued(&moves) {
                let Some(super::deferred::Resolved {
                    at: super::deferred::Holder { key, conn_id },
                    ..
                }) = self.deferred.resolve(request.token)
                else {
                    // Its connection closed meanwhile: nothing to answer.
                    continue;
                };
                if self.connections.get(key).is_none_or(|c| c.id() != conn_id) {
                    continue;
                }
                count += 1;
                // A pool gives each connection's requests together.
                match taken.last_mut() {
                    Some((k, requests)) if *k == key => requests.push(request),
                    _ => taken.push((key, vec![request])),
                }
            }
        }
        if count > 0 {
            tracing::info!(
                "{count} request(s) the thread pool had not started go with their {} connection(s) to the worker that takes them",
                taken.len()
            );
        }
        let now = Instant::now();
        for (key, requests) in taken {
            if let Some((conn, mut ctx, _)) = self.lend(key) {
                let held_before = conn.buffered_bytes();
                let outcome = conn.take_back(requests, &mut ctx).map(|()| false);
                self.after_event(key, held_before, outcome, now);
            }
        }
    }

    /// Hands over every connection that can move now (or, when stopping,
    /// closes every one at a frame boundary).
    pub(super) fn hand_over_idle(&mut self, now: Instant) {
        let handing_over = self.handing_over;
        let idle: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, conn)| conn.may_leave(handing_over))
            .map(|(key, _)| key)
            .collect();
        for key in idle {
            self.retire(key, now);
        }
    }

    /// A draining worker's connection `key`, at a frame boundary, leaves:
    /// handed over when this worker is being replaced, else closed. If the
    /// channel is full it stays (and is tried again shortly); if the
    /// hand-over fails it is closed (the client sees a close at a frame
    /// boundary, as before hand-overs existed).
    pub(super) fn retire(&mut self, key: usize, now: Instant) {
        if !self.handing_over {
            self.close(key, Close::Shutdown);
            return;
        }
        let conn = &self.connections[key];
        if conn.is_tls() {
            // A TLS session cannot move to another process. One that has
            // not sent its first request yet (handshake under way) is
            // served first; it ends at its next frame boundary, with
            // close_notify (read_timeout and shutdown_timeout bound it).
            if !conn.is_fresh() {
                self.slot.stats.tls[crate::tls::counters::HANDOVER_CLOSES].add(1);
                self.close(key, Close::Shutdown);
            }
            return;
        }
        let listener = &self.listeners[conn.listener];
        let Some(record) = conn.hand_over_record(&listener.addr.to_string()) else {
            // Not movable (a half-closed client): it ends here.
            self.close(key, Close::Shutdown);
            return;
        };
        let Some(control) = &self.control else {
            self.slot.stats.handover_failures.add(1);
            self.close(key, Close::Shutdown);
            return;
        };
        let unread = match conn.unread() {
            [] => None,
            bytes => match handover::Unread::new(bytes) {
                Ok(unread) => Some(unread),
                Err(e) => {
                    tracing::warn!(
                        peer = %record.peer,
                        "cannot hand the connection over: cannot keep the {} byte(s) it sent and is owed answers for ({e}); closing it",
                        bytes.len()
                    );
                    self.slot.stats.handover_failures.add(1);
                    self.close(key, Close::Shutdown);
                    return;
                }
            },
        };
        match handover::send_connection(control.as_fd(), &record, conn.stream_fd(), unread.as_ref())
        {
            Ok(()) => {
                self.slot.stats.connections_handed_over.add(1);
                self.close(key, Close::HandedOver);
            }
            Err(e) if handover::would_block(&e) => {
                self.handover_retry.get_or_insert(now + HANDOVER_RETRY);
            }
            Err(e) => {
                tracing::warn!(
                    peer = %record.peer,
                    "cannot hand the connection over ({e}): closing it"
                );
                self.slot.stats.handover_failures.add(1);
                self.close(key, Close::Shutdown);
            }
        }
    }
}
