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

use super::budget::account;
use super::conn::{Close, Connection, Scratch};
use super::deadlines::Deadlines;
use super::deferred::Deferreds;
use crate::codec::FrameDecoder;
use crate::config;
use crate::handover;
use crate::listener::{Endpoint, ListenSocket};
use crate::plugin::Plugin;
use crate::scoreboard::{PluginStats, Slot, PROTOCOL_ERROR_PROXY};
use crate::signals::Signals;

/// The worker's signals (self-pipe): SIGTERM/SIGQUIT drain, SIGINT stops at once, SIGUSR1 reopens the log.
const SIGNALS: Token = Token(0);
/// The control channel from the master: "hand your connections over", and
/// connections handed to this worker (see [`crate::handover`]).
const CONTROL: Token = Token(1);
/// Deferred answers completed (by any thread): see [`super::deferred`].
const WAKER: Token = Token(2);
/// Listener `i` has token `FIRST_LISTENER + i`; connections come after them.
const FIRST_LISTENER: usize = 3;
/// How soon a hand-over that found the channel full is tried again.
pub(super) const HANDOVER_RETRY: Duration = Duration::from_millis(5);
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
    /// Deferred answers one connection may have pending before its reads pause.
    pub max_deferred_per_connection: usize,
    /// Deferred answers the worker may have pending; a defer past it fails.
    pub max_deferred_per_worker: usize,
    /// A deferred request not completed within this fails.
    pub deferred_timeout: Duration,
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
    /// Its `allow`/`deny` lists, if any.
    pub access: Option<std::sync::Arc<crate::access::AccessList>>,
    /// TLS: the server configuration the master built (see [`crate::tls`]).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Its plugin's statistics in this worker's scoreboard slot (set by
    /// [`Reactor::new`]).
    pub stats: Option<&'static PluginStats>,
}

/// The [`Context`](super::conn::Context) an event on connection `conn` (key `key`) of reactor
/// `$reactor` runs with. A macro, not a method: it borrows only the fields
/// it names, so the event loop can go on using the others (the buffer
/// account, the deadlines) while the context lives.
macro_rules! context {
    ($reactor:ident, $conn:ident, $key:expr) => {{
        let listener = &$reactor.listeners[$conn.listener];
        $crate::worker::conn::Context {
            plugin: &mut $reactor.plugins[listener.plugin],
            decoder: $reactor.decoder,
            listener_addr: &listener.addr_text,
            slot: $reactor.slot,
            plugin_index: listener.plugin,
            stats: listener.stats,
            served: &mut $reactor.served,
            output_budget: $reactor.limits.max_pending_output_bytes,
            time_plugin_calls: $reactor.limits.time_plugin_calls,
            access: listener.access.as_deref(),
            key: $key,
            deferred: &mut $reactor.deferred,
            max_deferred: $reactor.limits.max_deferred_per_connection,
            leaving: $reactor.handing_over,
        }
    }};
}
pub(super) use context;

/// Whether the worker is taking new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accepting {
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
    pub(super) poll: Poll,
    pub(super) signals: Signals,
    pub(super) listeners: Vec<Listener>,
    pub(super) plugins: Vec<Plugin>,
    pub(super) connections: Slab<Connection>,
    pub(super) deadlines: Deadlines,
    pub(super) accepting: Accepting,
    pub(super) decoder: FrameDecoder,
    pub(super) scratch: Scratch,
    pub(super) limits: Limits,
    /// This worker's scoreboard slot.
    pub(super) slot: &'static Slot,
    /// Rate limit for "cannot accept" warnings.
    pub(super) overload_log: OverloadLog,
    /// Bytes the connections' buffers hold, all together (the sum of
    /// [`Connection::buffered_bytes`], kept up to date on every event).
    pub(super) buffered: usize,
    /// Connections whose buffers hold anything: shedding needs two (one
    /// alone is never closed for the budget), so this saves scanning every
    /// connection on each event while a lone large upload is over budget.
    pub(super) holders: usize,
    /// Rate limit for "over max_buffered_bytes" warnings.
    pub(super) shed_log: OverloadLog,
    /// While draining: when connections that never sent anything are
    /// closed too.
    pub(super) fresh_until: Option<Instant>,
    /// The control channel to the master (`None` once the master is gone).
    pub(super) control: Option<std::os::fd::OwnedFd>,
    /// Draining by handing connections over to another worker (a
    /// replacement), not by closing them (a stop).
    pub(super) handing_over: bool,
    /// A hand-over found the channel full: when to try again.
    pub(super) handover_retry: Option<Instant>,
    /// The master said "stop now" (a fast stop) over the control channel.
    pub(super) stop_now: bool,
    /// Requests answered so far.
    pub(super) served: u64,
    /// Ask to be replaced after this many requests (max_requests_per_worker
    /// plus this worker's jitter); `None` when unlimited or already asked.
    pub(super) retire_after: Option<u64>,
    /// Set by SIGTERM/SIGQUIT: draining until every connection is done, or
    /// this deadline.
    pub(super) draining: Option<Instant>,
    /// Connections closed on a failed request while draining (so that
    /// "drained" does not claim every request was answered).
    pub(super) failed_while_draining: usize,
    /// Next connection id: this worker's PID in the high half, a counter
    /// below, so ids are unique across the server's workers.
    pub(super) next_connection_id: u64,
    /// Deferred requests pending, and their completion queue.
    pub(super) deferred: Deferreds,
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
        let completions = crate::plugin::deferred::Completions::new(
            poll.registry(),
            WAKER,
            limits.max_frame_bytes,
        )?;
        let (deferred, maker) = Deferreds::new(
            completions,
            limits.max_deferred_per_worker,
            limits.deferred_timeout,
        );
        let mut listeners = listeners;
        for listener in &mut listeners {
            listener.stats = slot.stats.plugin(listener.plugin);
        }
        for (index, plugin) in plugins.iter().enumerate() {
            plugin.attach_scoreboard(slot, index);
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
            scratch: Scratch::new(limits.max_frame_bytes, maker),
            limits,
            slot,
            overload_log: OverloadLog::default(),
            buffered: 0,
            holders: 0,
            shed_log: OverloadLog::default(),
            draining: None,
            failed_while_draining: 0,
            fresh_until: None,
            control,
            handing_over: false,
            handover_retry: None,
            stop_now: false,
            served: 0,
            retire_after: limits.retire_after,
            next_connection_id: u64::from(std::process::id()) << 32,
            deferred,
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
                    // Connections first: nearly every event is one of theirs,
                    // and this arm then costs one comparison.
                    Token(t) if t >= first_connection => {
                        let key = t - first_connection;
                        // Events for a connection closed earlier in this batch
                        // are stale: ignore them.
                        let Some(conn) = self.connections.get_mut(key) else {
                            continue;
                        };
                        let held_before = conn.buffered_bytes();
                        let mut ctx = context!(self, conn, key);
                        let outcome = conn.on_event(
                            &mut ctx,
                            &mut self.scratch,
                            event.is_readable() || event.is_read_closed() || event.is_error(),
                            event.is_read_closed(),
                            event.is_writable(),
                        );
                        // (`close` subtracts what a closed connection held.)
                        // Most events leave no buffer behind (whole frames,
                        // answers sent at once): nothing to account then.
                        let held_after = conn.buffered_bytes();
                        let grew = held_after > held_before;
                        if held_after != held_before {
                            account(
                                &mut self.buffered,
                                &mut self.holders,
                                held_before,
                                held_after,
                            );
                        }
                        match outcome {
                            // Draining: a connection whose requests are all
                            // answered and sent leaves at this frame
                            // boundary (closed), or once nothing is owed to
                            // its client (handed over).
                            Ok(_)
                                if self.draining.is_some() && conn.may_leave(self.handing_over) =>
                            {
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
                        if grew && self.must_shed(held_after) {
                            self.shed(now);
                        }
                    }
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
                    WAKER => self.on_completions(now),
                    Token(t) => self.accept(t - FIRST_LISTENER, now),
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
            if crate::plugin::pool::take_replacement_request() && !self.slot.wants_retirement() {
                // A pool thread is stuck past plugin_timeout: be replaced
                // gracefully rather than killed with everything in flight.
                self.slot.request_retirement();
                if let Some(control) = &self.control {
                    let _ = handover::send_retire(control.as_fd());
                }
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
                    match self.failed_while_draining {
                        0 => tracing::info!("drained: every request answered"),
                        failed => tracing::warn!(
                            "drained: {failed} connection(s) ended meanwhile on a request that failed (a plugin error, deferred_timeout, plugin_timeout: see above); every other request answered"
                        ),
                    }
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
    pub(super) fn accept(&mut self, index: usize, now: Instant) {
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
                self.slot.stats.max_connections_reached.add(1);
                self.pause_accepting(Accepting::Full);
                return;
            }
            let listener = &self.listeners[index];
            let Some(socket) = &listener.socket else {
                return;
            };
            match socket.accept() {
                Ok((stream, peer)) => {
                    // Refused before a byte is read (a PROXY listener
                    // checks the address its header gives instead).
                    if let (Some(access), false) = (&listener.access, listener.proxy_protocol) {
                        let ip = peer.parse::<std::net::SocketAddr>().map(|a| a.ip());
                        if !ip.is_ok_and(|ip| access.permits(ip)) {
                            self.slot.stats.access_refused.add(1);
                            tracing::info!(
                                %peer,
                                listener = %listener.addr,
                                "client refused by the listener's allow/deny lists; connection closed"
                            );
                            continue;
                        }
                    }
                    let mut stream = crate::fork_guard::stream_off_stdio(stream);
                    if let Some(tls) = &listener.tls {
                        stream = match super::tls::TlsStream::new(
                            stream,
                            tls,
                            &self.slot.stats.tls,
                            listener.proxy_protocol,
                        ) {
                            Ok(tls) => crate::listener::Stream::Tls(Box::new(tls)),
                            Err(e) => {
                                tracing::warn!(%peer, "cannot start a TLS session: {e}");
                                continue;
                            }
                        };
                    }
                    let id = self.next_connection_id;
                    self.next_connection_id += 1;
                    tracing::debug!(%peer, listener = %listener.addr, "connection accepted");
                    let proxy_protocol = listener.proxy_protocol;
                    let _ = self.admit(stream, now, true, |stream, deadline| {
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
    /// tells its plugin. The one place a connection enters the slab. Its
    /// key, or `None` when it cannot be registered (it is dropped: closed).
    pub(super) fn admit(
        &mut self,
        mut stream: crate::listener::Stream,
        now: Instant,
        accepted: bool,
        make: impl FnOnce(crate::listener::Stream, Instant) -> Connection,
    ) -> Option<usize> {
        let first_connection = FIRST_LISTENER + self.listeners.len();
        let entry = self.connections.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(first_connection + key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!("cannot register a connection: {e}");
            return None;
        }
        crate::fork_guard::protect(stream.as_raw_fd());
        self.slot.stats.connections_open.add(1);
        if accepted {
            self.slot.stats.connections_total.add(1);
        }
        let deadline = config::deadline(now, self.limits.read_timeout);
        let conn = entry.insert(make(stream, deadline));
        // (A connection that owes its PROXY header is announced once the
        // header names the real client: see Connection::on_readable.)
        if conn.is_announced() {
            let listener = &self.listeners[conn.listener];
            let plugin = &mut self.plugins[listener.plugin];
            let described = conn.describe(&listener.addr_text);
            self.slot
                .track(listener.plugin, || plugin.connection_opened(&described));
            self.connections[key].opened();
        }
        self.deadlines.push(&mut self.connections, key, deadline);
        Some(key)
    }

    /// Deregisters and drops connection `key`, logging why it closed.
    pub(super) fn close(&mut self, key: usize, reason: Close) {
        self.deadlines.remove(&mut self.connections, key);
        let mut conn = self.connections.remove(key);
        let held = conn.buffered_bytes();
        self.buffered = self.buffered.saturating_sub(held);
        if held > 0 {
            self.holders = self.holders.saturating_sub(1);
        }
        self.slot.stats.connections_open.sub(1);
        if self.draining.is_some()
            && matches!(
                reason,
                Close::Plugin(_) | Close::DeferredTimeout(_) | Close::OverBudget { .. }
            )
        {
            self.failed_while_draining += 1;
        }
        match &reason {
            Close::Protocol(e) => self.slot.stats.protocol_errors[e.kind()].add(1),
            Close::Proxy(_) => self.slot.stats.protocol_errors[PROTOCOL_ERROR_PROXY].add(1),
            Close::TimedOut { mid_frame } => {
                self.slot.stats.read_timeouts[usize::from(*mid_frame)].add(1)
            }
            Close::NotReading => self.slot.stats.read_timeouts[2].add(1),
            _ => {}
        }
        for token in conn.awaiting_tokens() {
            self.deferred.cancel(token);
        }
        if conn.awaiting() > 0 {
            // Requests a thread pool has not started are nobody's now:
            // out of its queue, not run for a client that has gone.
            let id = conn.id();
            let plugin = &self.plugins[self.listeners[conn.listener].plugin];
            drop(plugin.withdraw_queued(&|conn_id| conn_id == id));
        }
        let _ = self.poll.registry().deregister(conn.stream_mut());
        let peer = conn.peer().to_string();
        let listener = &self.listeners[conn.listener];
        if let Close::HandedOver = reason {
            conn.mark_handed_over();
        }
        if conn.is_announced() {
            let plugin = &mut self.plugins[listener.plugin];
            let described = conn.describe(&listener.addr_text);
            self.slot
                .track(listener.plugin, || plugin.connection_closed(&described));
        }
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
            Close::Io(ref e) if super::tls::as_tls_error(e).is_some() => tracing::info!(
                %peer,
                listener = %listener.addr,
                "{e}; connection closed"
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
            Close::DeferredTimeout(t) => tracing::warn!(
                %peer,
                plugin = %t.plugin,
                "deferred request not completed after {:?} (deferred_timeout = {:?}); it fails and the connection is closed",
                t.waited,
                self.limits.deferred_timeout
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
            Close::NotReading => tracing::info!(
                %peer,
                "the client read none of its answers for read_timeout = {:?}; connection closed, {} byte(s) of answers not delivered",
                self.limits.read_timeout,
                conn.unsent_bytes()
            ),
            Close::Refused => {
                self.slot.stats.access_refused.add(1);
                tracing::info!(
                    %peer,
                    listener = %listener.addr,
                    "client refused by the listener's allow/deny lists (address from its PROXY header); connection closed"
                )
            }
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

    /// SIGTERM or SIGQUIT: graceful stop. Stop accepting, close every idle
    /// connection now, and let the others finish the frame they are in and
    /// receive every answer; each is closed at its next frame boundary.
    /// `shutdown_timeout` bounds the whole drain.
    pub(super) fn begin_drain(&mut self, signal: Signal, now: Instant) {
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
    pub(super) fn close_idle(&mut self, fresh: bool) -> usize {
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
    pub(super) fn cut_remaining(&mut self) {
        let (mut mid_frame, mut unsent, mut awaiting) = (0, 0, 0);
        for (_, conn) in self.connections.iter() {
            if conn.mid_frame() {
                mid_frame += 1;
            }
            awaiting += conn.awaiting();
            if conn.has_unsent_output() {
                unsent += 1;
            }
        }
        tracing::warn!(
            "shutdown_timeout = {:?} reached: cutting {} connection(s) ({mid_frame} in the middle of a request, {unsent} with responses not yet read by the client, {awaiting} deferred answer(s) not completed by their plugin)",
            self.limits.shutdown_timeout,
            self.connections.len()
        );
    }

    /// Stop: closes every connection (telling the plugins), then tells each
    /// plugin the worker is shutting down. Returns the plugins; dropping them
    /// runs their `destroy`.
    pub(super) fn shut_down(mut self) -> Vec<Plugin> {
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
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(key) = self.deadlines.oldest() {
            let conn = &self.connections[key];
            if conn.deadline() > now {
                break;
            }
            if conn.awaiting() > 0 {
                // Waiting on its plugin, not idle: deferred_timeout bounds it.
                let deadline = config::deadline(now, self.limits.read_timeout);
                self.deadlines.touch(&mut self.connections, key, deadline);
                continue;
            }
            if conn.unsent_bytes() > 0 {
                if !self.client_read_some(key, now) {
                    self.close(key, Close::NotReading);
                }
                continue;
            }
            let mid_frame = conn.mid_frame();
            self.close(key, Close::TimedOut { mid_frame });
        }
        self.expire_deferred(now);
    }

    /// A connection whose answers wait for the client reached its
    /// deadline: whether the client read any meanwhile. The kernel says
    /// WRITABLE only once a third of the send buffer is free, and with
    /// buffers of megabytes a client reading slowly but steadily may not
    /// free that much within `read_timeout`: so write now. If the kernel
    /// takes anything, the client is reading, and the write moves the
    /// deadline. `false`: the connection is still there and still due.
    #[cold]
    fn client_read_some(&mut self, key: usize, now: Instant) -> bool {
        let Some((conn, mut ctx, scratch)) = self.lend(key) else {
            return true;
        };
        let held_before = conn.buffered_bytes();
        let outcome = conn.on_event(&mut ctx, scratch, false, false, true);
        self.after_event(key, held_before, outcome, now);
        // Gone (an error closed it, or it moved on) or given a new deadline.
        self.connections
            .get(key)
            .is_none_or(|conn| conn.deadline() > now)
    }

    /// How long `poll` may sleep: until the oldest deadline or the end of an
    /// accept backoff; forever when there is neither.
    pub(super) fn next_timeout(&self, now: Instant) -> Option<Duration> {
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
            self.deferred.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        // Round up to the next millisecond: epoll's unit. Rounding down would
        // wake a hair early and spin until the deadline passes.
        wake.map(|at| at.saturating_duration_since(now) + Duration::from_millis(1))
    }

    pub(super) fn register_listeners(&mut self) -> io::Result<()> {
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

    pub(super) fn pause_accepting(&mut self, why: Accepting) {
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
    pub(super) fn resume_accepting(&mut self) {
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
pub(super) struct OverloadLog {
    last_warning: Option<Instant>,
    suppressed: u32,
}

/// Quiet time after an overload warning.
const OVERLOAD_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl OverloadLog {
    /// `Some(suppressed)` when a warning may be logged now (with the count
    /// of warnings folded since the last one), `None` to stay quiet.
    pub(super) fn admit(&mut self, now: Instant) -> Option<u32> {
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

    pub(super) fn since_last(suppressed: u32) -> String {
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
    pub(super) fn overload_warnings_are_one_per_burst_and_count_what_they_fold() {
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
