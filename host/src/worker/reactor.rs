//! A worker's event loop: one `mio::Poll`, its listeners, its connections.
//!
//! Read it top to bottom like mio's `tcp_server` example: named tokens, a
//! `match` on the token with an accept arm and a connection arm, and one
//! place ([`Reactor::close`]) where a connection is deregistered and dropped.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use slab::Slab;

use super::conn::{Close, Connection, Context, Scratch};
use super::deadlines::Deadlines;
use crate::codec::FrameDecoder;
use crate::config;
use crate::handover;
use crate::listener::{Endpoint, ListenSocket};
use crate::plugin::Plugin;
use crate::scoreboard::{PluginStats, Slot};
use crate::signals::Signals;

/// The worker's signals (self-pipe): SIGTERM/SIGQUIT drain, SIGINT stops at once, SIGUSR1 reopens the log.
const SIGNALS: Token = Token(0);
/// The control channel from the master: "hand your connections over", and
/// connections handed to this worker (see [`crate::handover`]).
const CONTROL: Token = Token(1);
/// Listener `i` has token `FIRST_LISTENER + i`; connections come after them.
const FIRST_LISTENER: usize = 2;
/// How soon a hand-over that found the channel full is tried again.
const HANDOVER_RETRY: Duration = Duration::from_millis(5);
/// How long a graceful stop waits for a just-accepted connection's first
/// request before closing it as idle.
const FRESH_GRACE: Duration = Duration::from_millis(200);
/// How long accepting pauses when the process runs out of file descriptors.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Limits that apply to every connection of this worker.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Close a connection after this long without progress.
    pub read_timeout: Duration,
    /// Frame size limit for requests and responses.
    pub max_frame_bytes: usize,
    /// Open connections; past it the worker stops accepting.
    pub max_connections: usize,
    /// How long a graceful stop may take before connections are cut.
    pub shutdown_timeout: Duration,
    /// Requests after which the worker asks the master to replace it.
    pub retire_after: Option<u64>,
    /// Response bytes a connection may have waiting before the worker stops
    /// answering (and reading) its further requests.
    pub max_pending_output_bytes: usize,
    /// Time every plugin call (only worth it when `/metrics` can show it).
    pub time_plugin_calls: bool,
    /// Bytes all connections together may hold in their buffers (partial
    /// requests, unsent responses); past it the ones holding the most are
    /// closed.
    pub max_buffered_bytes: usize,
}

/// One inherited listening socket and the plugin that serves it.
pub struct Listener {
    /// The socket, bound by the master; `None` once this worker drains
    /// (its copy is closed so that a stopping server stops listening).
    pub socket: Option<ListenSocket>,
    /// Its address, for logs.
    pub addr: Endpoint,
    /// Index of its plugin in the worker's plugin list.
    pub plugin: usize,
    /// `addr` as text, for plugins.
    pub addr_text: CString,
    /// Connections must start with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Its plugin's statistics in this worker's scoreboard slot (set by
    /// [`Reactor::new`]).
    pub stats: Option<&'static PluginStats>,
}

/// Whether the worker is taking new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepting {
    /// Listeners registered; accept until WouldBlock.
    Open,
    /// `max_connections` reached: listeners deregistered until one closes.
    /// New clients wait in the kernel's listen backlog (or go to another worker).
    Full,
    /// Out of file descriptors: listeners deregistered until this instant,
    /// instead of spinning on an accept that keeps failing.
    Backoff(Instant),
    /// Draining for a graceful stop: never accepting again. Other workers
    /// (or the next generation, after a reload) take new connections.
    Closed,
}

/// The worker's reactor.
pub struct Reactor {
    poll: Poll,
    signals: Signals,
    listeners: Vec<Listener>,
    plugins: Vec<Plugin>,
    connections: Slab<Connection>,
    deadlines: Deadlines,
    accepting: Accepting,
    decoder: FrameDecoder,
    scratch: Scratch,
    limits: Limits,
    /// This worker's scoreboard slot.
    slot: &'static Slot,
    /// Rate limit for "cannot accept" warnings.
    overload_log: OverloadLog,
    /// Bytes the connections' buffers hold, all together (the sum of
    /// [`Connection::buffered_bytes`], kept up to date on every event).
    buffered: usize,
    /// Connections whose buffers hold anything: shedding needs two (one
    /// alone is never closed for the budget), so this saves scanning every
    /// connection on each event while a lone large upload is over budget.
    holders: usize,
    /// Rate limit for "over max_buffered_bytes" warnings.
    shed_log: OverloadLog,
    /// While draining: when connections that never sent anything are
    /// closed too.
    fresh_until: Option<Instant>,
    /// The control channel to the master (`None` once the master is gone).
    control: Option<std::os::fd::OwnedFd>,
    /// Draining by handing connections over to another worker (a
    /// replacement), not by closing them (a stop).
    handing_over: bool,
    /// A hand-over found the channel full: when to try again.
    handover_retry: Option<Instant>,
    /// The master said "stop now" (a fast stop) over the control channel.
    stop_now: bool,
    /// Requests answered so far.
    served: u64,
    /// Ask to be replaced after this many requests (max_requests_per_worker
    /// plus this worker's jitter); `None` when unlimited or already asked.
    retire_after: Option<u64>,
    /// Set by SIGTERM/SIGQUIT: draining until every connection is done, or
    /// this deadline.
    draining: Option<Instant>,
    /// Next connection id: this worker's PID in the high half, a counter
    /// below, so ids are unique across the server's workers.
    next_connection_id: u64,
}

impl Reactor {
    /// Registers the signals and listeners in a new `Poll` (created here,
    /// after fork: each worker has its own epoll instance).
    pub fn new(
        signals: Signals,
        listeners: Vec<Listener>,
        plugins: Vec<Plugin>,
        limits: Limits,
        slot: &'static Slot,
        control: Option<std::os::fd::OwnedFd>,
    ) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        // A plugin's forked child must not share this epoll instance.
        crate::fork_guard::protect(poll.as_raw_fd());
        signals.register(poll.registry(), SIGNALS)?;
        if let Some(control) = &control {
            crate::fork_guard::protect(control.as_raw_fd());
            poll.registry().register(
                &mut mio::unix::SourceFd(&control.as_raw_fd()),
                CONTROL,
                Interest::READABLE,
            )?;
        }
        let mut listeners = listeners;
        for listener in &mut listeners {
            listener.stats = slot.stats.plugin(listener.plugin);
        }
        let mut reactor = Reactor {
            poll,
            signals,
            listeners,
            plugins,
            connections: Slab::new(),
            deadlines: Deadlines::default(),
            accepting: Accepting::Open,
            decoder: FrameDecoder::new(limits.max_frame_bytes),
            scratch: Scratch::new(limits.max_frame_bytes),
            limits,
            slot,
            overload_log: OverloadLog::default(),
            buffered: 0,
            holders: 0,
            shed_log: OverloadLog::default(),
            draining: None,
            fresh_until: None,
            control,
            handing_over: false,
            handover_retry: None,
            stop_now: false,
            served: 0,
            retire_after: limits.retire_after,
            next_connection_id: u64::from(std::process::id()) << 32,
        };
        reactor.register_listeners()?;
        Ok(reactor)
    }

    /// Runs until a stop signal arrives. Returns the plugins so that the
    /// caller destroys them after every connection is gone.
    pub fn run(mut self) -> io::Result<Vec<Plugin>> {
        let mut events = Events::with_capacity(1024);
        let first_connection = FIRST_LISTENER + self.listeners.len();
        loop {
            let timeout = self.next_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            // Deadline arithmetic once per turn, not once per event.
            let fresh_deadline = config::deadline(now, self.limits.read_timeout);
            let relink_before = fresh_deadline
                .checked_sub(self.limits.read_timeout / 64)
                .unwrap_or(now);
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        for signal in self.signals.pending() {
                            if signal == Signal::SIGUSR1 {
                                crate::logging::reopen_in_worker();
                                continue;
                            }
                            if signal == Signal::SIGINT {
                                tracing::info!(
                                    "SIGINT received: stopping now ({} connection(s) closed)",
                                    self.connections.len()
                                );
                                return Ok(self.shut_down());
                            }
                            self.begin_drain(signal, now);
                        }
                    }
                    CONTROL => self.on_control(now),
                    Token(t) if t < first_connection => self.accept(t - FIRST_LISTENER, now),
                    Token(t) => {
                        let key = t - first_connection;
                        // Events for a connection closed earlier in this batch
                        // are stale: ignore them.
                        let Some(conn) = self.connections.get_mut(key) else {
                            continue;
                        };
                        let held_before = conn.buffered_bytes();
                        let listener = &self.listeners[conn.listener];
                        let mut ctx = Context {
                            plugin: &mut self.plugins[listener.plugin],
                            decoder: self.decoder,
                            listener_addr: &listener.addr_text,
                            slot: self.slot,
                            plugin_index: listener.plugin,
                            stats: listener.stats,
                            served: &mut self.served,
                            output_budget: self.limits.max_pending_output_bytes,
                            time_plugin_calls: self.limits.time_plugin_calls,
                        };
                        let mut outcome = Ok(false);
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            outcome = conn.on_readable(
                                &mut ctx,
                                &mut self.scratch,
                                event.is_read_closed(),
                            );
                        }
                        // WRITABLE matters only while answers wait to be sent.
                        if event.is_writable() && conn.has_unsent_output() {
                            outcome = match outcome {
                                Ok(progress) => conn
                                    .on_writable(&mut ctx, &mut self.scratch)
                                    .map(|p| p || progress),
                                closed => closed,
                            };
                        }
                        // (`close` subtracts what a closed connection held.)
                        let held_after = conn.buffered_bytes();
                        self.buffered = self.buffered.saturating_sub(held_before) + held_after;
                        match (held_before, held_after) {
                            (0, 1..) => self.holders += 1,
                            (1.., 0) => self.holders = self.holders.saturating_sub(1),
                            _ => {}
                        }
                        match outcome {
                            // Draining: a connection whose requests are all
                            // answered and sent leaves at this frame
                            // boundary: handed over, or closed.
                            Ok(_) if self.draining.is_some() && conn.is_idle() => {
                                self.retire(key, now)
                            }
                            Ok(true) => {
                                // Re-link only when the deadline moves by more
                                // than 1/64 of the timeout: exact enough, and
                                // most events then cost one comparison.
                                if relink_before > conn.deadline() {
                                    self.deadlines.touch(
                                        &mut self.connections,
                                        key,
                                        fresh_deadline,
                                    );
                                }
                            }
                            Ok(false) => {}
                            Err(reason) => self.close(key, reason),
                        }
                        if self.buffered > self.limits.max_buffered_bytes && self.holders > 1 {
                            self.shed(now);
                        }
                    }
                }
            }
            if self.stop_now {
                tracing::info!(
                    "fast stop: closing {} connection(s) now",
                    self.connections.len()
                );
                return Ok(self.shut_down());
            }
            self.expire(now);
            if self.retire_after.is_some_and(|limit| self.served >= limit) {
                // The master starts a replacement and drains this worker once
                // the replacement is ready; until then keep serving.
                tracing::info!("answered {} requests: asking to be replaced", self.served);
                self.slot.request_retirement();
                // Wake the master now rather than at its next periodic look.
                if let Some(control) = &self.control {
                    let _ = handover::send_retire(control.as_fd());
                }
                self.retire_after = None;
            }
            if self.fresh_until.is_some_and(|until| now >= until) {
                self.fresh_until = None;
                self.close_idle(true);
            }
            if self.handover_retry.is_some_and(|at| now >= at) {
                self.handover_retry = None;
                self.hand_over_idle(now);
            }
            if let Some(deadline) = self.draining {
                if self.connections.is_empty() {
                    tracing::info!("drained: every request answered");
                    return Ok(self.shut_down());
                }
                if now >= deadline {
                    self.cut_remaining();
                    return Ok(self.shut_down());
                }
            }
            if let Accepting::Backoff(until) = self.accepting {
                if now >= until {
                    self.resume_accepting();
                }
            }
        }
    }

    /// Accepts every pending connection on listener `index` (until WouldBlock:
    /// edge-triggered readiness is reported once per burst).
    fn accept(&mut self, index: usize, now: Instant) {
        while self.accepting == Accepting::Open {
            if self.connections.len() >= self.limits.max_connections {
                match self.overload_log.admit(now) {
                    Some(suppressed) => tracing::warn!(
                        "max_connections = {} reached: not accepting until a connection closes (new clients wait in the listen backlog){}",
                        self.limits.max_connections,
                        OverloadLog::since_last(suppressed)
                    ),
                    None => tracing::debug!("max_connections reached again"),
                }
                self.pause_accepting(Accepting::Full);
                return;
            }
            let listener = &self.listeners[index];
            let Some(socket) = &listener.socket else {
                return;
            };
            match socket.accept() {
                Ok((stream, peer)) => {
                    let stream = crate::fork_guard::stream_off_stdio(stream);
                    let id = self.next_connection_id;
                    self.next_connection_id += 1;
                    tracing::debug!(%peer, listener = %listener.addr, "connection accepted");
                    let proxy_protocol = listener.proxy_protocol;
                    self.admit(stream, now, true, |stream, deadline| {
                        Connection::new(stream, peer, index, id, deadline, proxy_protocol)
                    });
                }
                // The backlog is empty: wait for the next readiness event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out_of_descriptors(&e) => {
                    match self.overload_log.admit(now) {
                        Some(suppressed) => tracing::warn!(
                            "accept on {} failed: {e}; pausing accept for {FD_EXHAUSTED_PAUSE:?} ({} connections open; raise the fd limit with ulimit -n){}",
                            listener.addr,
                            self.connections.len(),
                            OverloadLog::since_last(suppressed)
                        ),
                        None => tracing::debug!("accept on {} failed again: {e}", listener.addr),
                    }
                    self.pause_accepting(Accepting::Backoff(now + FD_EXHAUSTED_PAUSE));
                    return;
                }
                // The client gave up between SYN and accept (ECONNABORTED…):
                // that one connection is gone, the listener is fine.
                Err(e) => tracing::debug!("accept on {}: {e}", listener.addr),
            }
        }
    }

    /// Registers a new connection (accepted here, or handed over by another
    /// worker), made by `make` from the stream and its read deadline, and
    /// tells its plugin. The one place a connection enters the slab.
    fn admit(
        &mut self,
        mut stream: crate::listener::Stream,
        now: Instant,
        accepted: bool,
        make: impl FnOnce(crate::listener::Stream, Instant) -> Connection,
    ) {
        let first_connection = FIRST_LISTENER + self.listeners.len();
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(first_connection + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!("cannot register a connection: {e}");
            return;
        }
        crate::fork_guard::protect(stream.as_raw_fd());
        self.slot.stats.connections_open.add(1);
        if accepted {
            self.slot.stats.connections_total.add(1);
        }
        let deadline = config::deadline(now, self.limits.read_timeout);
        let conn = entry.insert(make(stream, deadline));
        let listener = &self.listeners[conn.listener];
        let plugin = &mut self.plugins[listener.plugin];
        let described = conn.describe(&listener.addr_text);
        self.slot
            .track(listener.plugin, || plugin.connection_opened(&described));
        self.connections[key].opened();
        self.deadlines.push(&mut self.connections, key, deadline);
    }

    /// Reads the control channel: the master's "hand over" request, and
    /// connections handed to this worker.
    fn on_control(&mut self, now: Instant) {
        loop {
            let Some(control) = &self.control else {
                return;
            };
            match handover::recv(control.as_fd()) {
                Ok(Some(handover::Message::HandOver)) => self.begin_hand_over(now),
                Ok(Some(handover::Message::Retire)) => {}
                // The server stops: as SIGTERM/SIGINT would say, but no
                // plugin's signal handler can hide this.
                Ok(Some(handover::Message::Stop { fast: false })) => {
                    self.begin_drain(Signal::SIGTERM, now)
                }
                Ok(Some(handover::Message::Stop { fast: true })) => self.stop_now = true,
                Ok(Some(handover::Message::Connection(record, fd))) => self.adopt(record, fd, now),
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
    fn adopt(&mut self, record: handover::Connection, fd: std::os::fd::OwnedFd, now: Instant) {
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
        let stream = crate::fork_guard::stream_off_stdio(stream);
        self.slot.stats.connections_adopted.add(1);
        tracing::debug!(
            peer = %record.peer,
            listener = %record.listener,
            "connection handed over to this worker"
        );
        self.admit(stream, now, false, |stream, deadline| {
            Connection::adopted(stream, &record, index, deadline)
        });
    }

    /// The master asks this worker to leave without closing its clients'
    /// connections: stop accepting, hand every connection at a frame
    /// boundary over now, and each of the others once its frame is
    /// answered. `shutdown_timeout` bounds it, as for a graceful stop.
    fn begin_hand_over(&mut self, now: Instant) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(config::deadline(now, self.limits.shutdown_timeout));
        self.handing_over = true;
        self.pause_accepting(Accepting::Closed);
        let before = self.connections.len();
        self.hand_over_idle(now);
        tracing::info!(
            "being replaced: handing {before} connection(s) over to the serving workers ({} finishing a frame first)",
            self.connections.len()
        );
    }

    /// Hands over (or, when stopping, closes) every connection at a frame
    /// boundary.
    fn hand_over_idle(&mut self, now: Instant) {
        let idle: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, conn)| conn.is_idle())
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
    fn retire(&mut self, key: usize, now: Instant) {
        if !self.handing_over {
            self.close(key, Close::Shutdown);
            return;
        }
        let conn = &self.connections[key];
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
        match handover::send_connection(control.as_fd(), &record, conn.stream_fd()) {
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

    /// Deregisters and drops connection `key`, logging why it closed.
    fn close(&mut self, key: usize, reason: Close) {
        self.deadlines.remove(&mut self.connections, key);
        let mut conn = self.connections.remove(key);
        let held = conn.buffered_bytes();
        self.buffered = self.buffered.saturating_sub(held);
        if held > 0 {
            self.holders = self.holders.saturating_sub(1);
        }
        self.slot.stats.connections_open.sub(1);
        if let Close::Protocol(_) | Close::Proxy(_) = reason {
            self.slot.stats.protocol_errors.add(1);
        }
        let _ = self.poll.registry().deregister(conn.stream_mut());
        let peer = conn.peer().to_string();
        let listener = &self.listeners[conn.listener];
        if let Close::HandedOver = reason {
            conn.mark_handed_over();
        }
        let plugin = &mut self.plugins[listener.plugin];
        let described = conn.describe(&listener.addr_text);
        self.slot
            .track(listener.plugin, || plugin.connection_closed(&described));
        // Unmarked only now: a child the plugin forks in its close hook
        // must not get the client's socket either. (The socket closes when
        // `conn` drops, after the log line below: a client that sees the
        // close can rely on the line being written.)
        crate::fork_guard::release(conn.stream_mut().as_raw_fd());
        match reason {
            Close::PeerClosed => tracing::debug!(%peer, "connection closed by the client"),
            Close::Shutdown => tracing::debug!(%peer, "connection closed: worker stopping"),
            Close::HandedOver => {
                tracing::debug!(%peer, "connection handed over to another worker")
            }
            Close::PeerClosedMidFrame { received } => tracing::info!(
                %peer,
                "client closed the connection in the middle of a frame ({received} bytes of it received)"
            ),
            Close::Io(e) => tracing::debug!(%peer, "connection error: {e}"),
            Close::Protocol(e) => tracing::warn!(
                %peer,
                listener = %listener.addr,
                "protocol error: {e}; connection closed"
            ),
            Close::Proxy(e) => tracing::warn!(
                %peer,
                listener = %listener.addr,
                "PROXY protocol error: {e}; connection closed (this listener requires a PROXY header)"
            ),
            Close::Plugin(e) => tracing::warn!(
                %peer,
                plugin = self.plugins[listener.plugin].name(),
                "plugin failed a request: {e}; connection closed"
            ),
            Close::TimedOut { mid_frame: false } => tracing::debug!(
                %peer,
                "idle connection closed after read_timeout = {:?}",
                self.limits.read_timeout
            ),
            Close::TimedOut { mid_frame: true } => tracing::info!(
                %peer,
                "connection stalled mid-frame; closed after read_timeout = {:?}",
                self.limits.read_timeout
            ),
            Close::OverBudget { held } => tracing::info!(
                %peer,
                "connection closed: it held {held} bytes of unfinished requests and unsent responses, the most of this worker's connections, which together held more than max_buffered_bytes = {}",
                self.limits.max_buffered_bytes
            ),
        }
        drop(conn);
        if self.accepting == Accepting::Full {
            self.resume_accepting();
        }
    }

    /// The connections' buffers hold more than `max_buffered_bytes`
    /// together: closes the connections holding the most, largest first,
    /// until they hold no more than that. One connection alone is never
    /// closed for it (`max_frame_bytes` and `max_pending_output_bytes`
    /// bound its memory), so a lone large frame always gets through; next
    /// to others, the largest holder goes first.
    #[cold]
    #[inline(never)]
    fn shed(&mut self, now: Instant) {
        let budget = self.limits.max_buffered_bytes;
        let before = self.buffered;
        let mut holders: Vec<(usize, usize)> = self
            .connections
            .iter()
            .map(|(key, conn)| (conn.buffered_bytes(), key))
            .filter(|&(held, _)| held > 0)
            .collect();
        debug_assert_eq!(
            holders.iter().map(|&(held, _)| held).sum::<usize>(),
            before,
            "buffered bytes accounting"
        );
        holders.sort_unstable_by(|a, b| b.cmp(a));
        let mut closed: Vec<(String, usize)> = Vec::new();
        for (left, &(held, key)) in (1..=holders.len()).rev().zip(&holders) {
            if self.buffered <= budget || left == 1 {
                break;
            }
            closed.push((self.connections[key].peer().to_string(), held));
            self.close(key, Close::OverBudget { held });
        }
        if closed.is_empty() {
            return;
        }
        self.slot
            .stats
            .buffer_budget_closes
            .add(closed.len() as u64);
        match self.shed_log.admit(now) {
            Some(suppressed) => {
                const NAMED: usize = 5;
                let mut named: Vec<String> = closed
                    .iter()
                    .take(NAMED)
                    .map(|(peer, held)| format!("{peer} ({held} bytes)"))
                    .collect();
                if closed.len() > NAMED {
                    named.push(format!("and {} more", closed.len() - NAMED));
                }
                tracing::warn!(
                    "this worker's connections held {before} bytes of unfinished requests and unsent responses, over max_buffered_bytes = {budget}: closed the {} holding the most: {}; raise max_buffered_bytes if legitimate clients send or receive that much at once{}",
                    closed.len(),
                    named.join(", "),
                    OverloadLog::since_last(suppressed)
                );
            }
            None => tracing::debug!(
                "over max_buffered_bytes again: closed {} connection(s)",
                closed.len()
            ),
        }
    }

    /// SIGTERM or SIGQUIT: graceful stop. Stop accepting, close every idle
    /// connection now, and let the others finish the frame they are in and
    /// receive every answer; each is closed at its next frame boundary.
    /// `shutdown_timeout` bounds the whole drain.
    fn begin_drain(&mut self, signal: Signal, now: Instant) {
        if self.draining.is_some() {
            if self.handing_over {
                // The server stops while this worker was being replaced:
                // nobody takes connections any more; close them instead.
                self.handing_over = false;
                self.close_idle(true);
            }
            return;
        }
        self.draining = Some(config::deadline(now, self.limits.shutdown_timeout));
        self.pause_accepting(Accepting::Closed);
        // Connections accepted a moment ago have not sent their first
        // request yet: they get FRESH_GRACE to send it (and are answered)
        // before being closed as idle.
        self.fresh_until = Some(now + FRESH_GRACE);
        let closed = self.close_idle(false);
        tracing::info!(
            "{signal} received: draining (not accepting; {closed} idle connection(s) closed, {} finishing their frames, shutdown_timeout = {:?})",
            self.connections.len(),
            self.limits.shutdown_timeout
        );
    }

    /// Closes idle connections (with `fresh`: also those that never sent
    /// anything); returns how many.
    fn close_idle(&mut self, fresh: bool) -> usize {
        let idle: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, conn)| conn.is_idle() && (fresh || !conn.is_fresh()))
            .map(|(key, _)| key)
            .collect();
        for &key in &idle {
            self.close(key, Close::Shutdown);
        }
        idle.len()
    }

    /// `shutdown_timeout` ran out while draining: cut what is left, saying how much.
    fn cut_remaining(&mut self) {
        let (mut mid_frame, mut unsent) = (0, 0);
        for (_, conn) in self.connections.iter() {
            if conn.mid_frame() {
                mid_frame += 1;
            }
            if conn.has_unsent_output() {
                unsent += 1;
            }
        }
        tracing::warn!(
            "shutdown_timeout = {:?} reached: cutting {} connection(s) ({mid_frame} in the middle of a request, {unsent} with responses not yet read by the client)",
            self.limits.shutdown_timeout,
            self.connections.len()
        );
    }

    /// Stop: closes every connection (telling the plugins), then tells each
    /// plugin the worker is shutting down. Returns the plugins; dropping them
    /// runs their `destroy`.
    fn shut_down(mut self) -> Vec<Plugin> {
        let keys: Vec<usize> = self.connections.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, Close::Shutdown);
        }
        for (index, plugin) in self.plugins.iter_mut().enumerate() {
            self.slot.track(index, || plugin.shutdown());
        }
        // The event loop's own descriptors close with it: unmarked first,
        // as the plugins' destroy hooks may open (and fork with) their own.
        crate::fork_guard::release(self.poll.as_raw_fd());
        crate::fork_guard::release(self.signals.raw_fd());
        if let Some(control) = &self.control {
            crate::fork_guard::release(control.as_raw_fd());
        }
        self.plugins
    }

    /// Closes every connection whose deadline has passed.
    fn expire(&mut self, now: Instant) {
        while let Some(key) = self.deadlines.oldest() {
            let conn = &self.connections[key];
            if conn.deadline() > now {
                break;
            }
            let mid_frame = conn.mid_frame();
            self.close(key, Close::TimedOut { mid_frame });
        }
    }

    /// How long `poll` may sleep: until the oldest deadline or the end of an
    /// accept backoff; forever when there is neither.
    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let deadline = self
            .deadlines
            .oldest()
            .map(|key| self.connections[key].deadline());
        let backoff = match self.accepting {
            Accepting::Backoff(until) => Some(until),
            _ => None,
        };
        let wake = [
            deadline,
            backoff,
            self.draining,
            self.fresh_until,
            self.handover_retry,
        ]
        .into_iter()
        .flatten()
        .min();
        // Round up to the next millisecond: epoll's unit. Rounding down would
        // wake a hair early and spin until the deadline passes.
        wake.map(|at| at.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn register_listeners(&mut self) -> io::Result<()> {
        for (i, listener) in self.listeners.iter_mut().enumerate() {
            if let Some(socket) = &mut listener.socket {
                self.poll.registry().register(
                    socket,
                    Token(FIRST_LISTENER + i),
                    Interest::READABLE,
                )?;
            }
        }
        Ok(())
    }

    fn pause_accepting(&mut self, why: Accepting) {
        for listener in &mut self.listeners {
            if let Some(socket) = &mut listener.socket {
                if self.accepting == Accepting::Open {
                    let _ = self.poll.registry().deregister(socket);
                }
                if why == Accepting::Closed {
                    // Unmarked before it closes: the number may be reused
                    // by a plugin's own descriptor.
                    crate::fork_guard::release(socket.as_raw_fd());
                    listener.socket = None;
                }
            }
        }
        self.accepting = why;
    }

    /// Registers the listeners again; pending connections are reported at
    /// once (registering a ready socket raises an event).
    fn resume_accepting(&mut self) {
        if self.accepting == Accepting::Closed {
            return;
        }
        if self.connections.len() >= self.limits.max_connections {
            // Still full (e.g. after an fd backoff): wait for a close instead.
            self.accepting = Accepting::Full;
            return;
        }
        match self.register_listeners() {
            Ok(()) => {
                tracing::debug!("accepting connections again");
                self.accepting = Accepting::Open;
            }
            Err(e) => tracing::error!("cannot resume accepting: {e}"),
        }
    }
}

/// Warnings about refusing to accept (full, out of fds) come in bursts:
/// one line per burst, not one per attempt. A burst ends after
/// `OVERLOAD_LOG_INTERVAL` without a warning; later warnings say how many
/// were folded in.
#[derive(Debug, Default)]
struct OverloadLog {
    last_warning: Option<Instant>,
    suppressed: u32,
}

/// Quiet time after an overload warning.
const OVERLOAD_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl OverloadLog {
    /// `Some(suppressed)` when a warning may be logged now (with the count
    /// of warnings folded since the last one), `None` to stay quiet.
    fn admit(&mut self, now: Instant) -> Option<u32> {
        match self.last_warning {
            Some(last) if now.duration_since(last) < OVERLOAD_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_warning = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    fn since_last(suppressed: u32) -> String {
        if suppressed == 0 {
            String::new()
        } else {
            format!("; {suppressed} similar event(s) since the last warning")
        }
    }
}

/// EMFILE/ENFILE and kin: accepting again right away would fail the same way.
fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_warnings_are_one_per_burst_and_count_what_they_fold() {
        let t0 = Instant::now();
        let mut log = OverloadLog::default();
        assert_eq!(log.admit(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.admit(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(log.admit(t0 + OVERLOAD_LOG_INTERVAL), Some(5));
        assert_eq!(
            OverloadLog::since_last(5),
            "; 5 similar event(s) since the last warning"
        );
        assert_eq!(OverloadLog::since_last(0), "");
    }
}
