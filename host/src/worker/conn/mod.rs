//! One client connection: its buffers and its state machine.
//!
//! ```text
//!              readable: read, decode every complete frame,
//!              call the plugin for each, write the answers
//!   ┌─────────┐ ── send buffer full, answers left ──► ┌─────────┐
//!   │ Reading │                                       │ Writing │
//!   └─────────┘ ◄── writable: the rest is sent ────── └─────────┘
//!        │          (then read what arrived meanwhile)     reads paused
//!        ▼
//!   closed: EOF (at a frame boundary, all answers sent), protocol error,
//!   plugin error, socket error, or read_timeout without progress
//!
//!   ┌─────────┐  max_deferred_per_connection answers     ┌─────────┐
//!   │ Reading │ ── pending (or their queue is full) ───► │ Waiting │
//!   └─────────┘ ◄── a deferred answer completes ──────── └─────────┘
//! ```
//!
//! Deferred answers (ABI 1.3): a request a plugin defers takes a slot in
//! the connection's in-order answer queue ([`Answer`]); answers to later
//! requests queue behind it, and the queue's ready front is sent as soon as
//! the deferred answer arrives (see [`super::deferred`]). A connection
//! with answers pending is not idle: `read_timeout` does not close it, a
//! drain waits for it, and it is handed over only once its queue is empty.
//!
//! A peer that half-closes after its last request still gets every answer:
//! the EOF is only acted on once nothing is left to send.
//!
//! Processing is not a resting state: it happens inside [`Connection::on_readable`]
//! between reading and writing, on the worker's only thread.
//!
//! The socket is registered once for READABLE | WRITABLE, edge-triggered, so
//! the state (not an epoll interest change) decides what an event means: no
//! `epoll_ctl` per request.

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::time::Instant;

use std::collections::VecDeque;

mod answering;
mod moving;
mod queue;

use super::deadlines::{Linked, Links};
use super::deferred::{Answer, Deferreds, Maker};
use crate::codec::{Decoded, FrameDecoder, FrameError, HEADER_LEN};
use crate::listener::Stream;
use crate::plugin::{Plugin, ProcessError, RawConnection, RawRequest, ResponseSink};
use crate::proxy::{self, Proxied, ProxyError};
use crate::scoreboard::{PluginStats, Slot, Stats};
use answering::Answering;

/// Size of the worker's shared read buffer: frames up to this size that
/// arrive whole are answered straight from it, with no per-connection copy.
pub const SCRATCH_INPUT: usize = 256 * 1024;
/// Smallest read into a connection's own buffer (when it holds a partial frame).
const MIN_OWN_READ: usize = 4 * 1024;
/// Largest read-ahead reserved in one step for a frame whose length is known.
const READ_AHEAD_LIMIT: usize = 256 * 1024;
/// A buffer larger than this that holds (much) less is given back to the
/// allocator: a connection keeps no megabytes after a large frame or
/// response. At or below it, a buffer is kept for reuse.
const SHRINK_ABOVE: usize = 4 * SCRATCH_INPUT;

/// Buffers shared by every connection of a worker, lent to one connection
/// at a time. They make the common case free: a read that holds only
/// complete frames is decoded in place, the responses are written at once,
/// and an idle connection owns no buffer at all. A connection allocates its
/// own buffer only for what is left over: a partial frame, or responses the
/// kernel could not take yet.
pub struct Scratch {
    /// Read buffer; always `SCRATCH_INPUT` long (initialized once).
    input: Vec<u8>,
    /// Responses being produced (its buffer is empty between events),
    /// with the callbacks plugins write through, set up once.
    responses: ResponseSink,
    /// The requests of a read, and their answers' lengths, for plugins
    /// that answer a batch at a time.
    batch: Batch,
    /// Makes the handles of deferred answers; the sink holds its address.
    _maker: Box<Maker>,
}

/// Reused arrays for `process_batch` calls (contents only valid during one).
#[derive(Default)]
pub(super) struct Batch {
    pub(super) requests: Vec<RawRequest>,
    pub(super) lens: Vec<usize>,
}

impl Scratch {
    /// Allocates the worker's shared buffers, for responses of at most
    /// `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize, mut maker: Box<Maker>) -> Self {
        let mut responses = ResponseSink::new(
            Vec::with_capacity(SCRATCH_INPUT),
            max_frame_bytes,
            std::ptr::null(),
        );
        // The box's contents do not move while the scratch lives.
        responses.set_deferrer(&mut *maker);
        Scratch {
            input: vec![0; SCRATCH_INPUT],
            responses,
            batch: Batch::default(),
            _maker: maker,
        }
    }
}

/// Where a connection is in its life; see the module doc for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// On a `proxy_protocol` listener, before anything else: waiting for the
    /// PROXY header that names the real client. Frames come only after it.
    ProxyHeader,
    /// Waiting for request bytes: idle keep-alive, or part of a frame.
    Reading,
    /// Responses are queued and the kernel's send buffer is full.
    Writing,
    /// Reads paused: `max_deferred_per_connection` deferred answers are
    /// pending, or answers queued behind them reached
    /// `max_pending_output_bytes` (or the peer shut its side and the
    /// pending answers are still owed). A completion resumes reading.
    Waiting,
}

/// Why a connection ends; the reactor logs each at its own level.
///
/// Kept to 16 bytes (large reasons are boxed: they are rare) so that the
/// `Result<bool, Close>` every event returns travels in registers.
#[derive(Debug)]
pub enum Close {
    /// The peer closed at a frame boundary with nothing left to send.
    PeerClosed,
    /// The peer closed in the middle of a frame.
    PeerClosedMidFrame {
        /// Bytes of the unfinished frame received.
        received: usize,
    },
    /// A socket error (reset, broken pipe…).
    Io(io::Error),
    /// The peer broke the framing protocol.
    Protocol(Box<FrameError>),
    /// The connection did not start with a valid PROXY protocol header.
    Proxy(Box<ProxyError>),
    /// The plugin failed this request.
    Plugin(Box<ProcessError>),
    /// A deferred request was not completed within `deferred_timeout`.
    DeferredTimeout(Box<DeferredTimeout>),
    /// The worker is stopping.
    Shutdown,
    /// It moved to another worker, open (see [`crate::handover`]).
    HandedOver,
    /// Nothing received or sent for `read_timeout`.
    TimedOut {
        /// Whether a frame was partly received (a stall, not just an idle connection).
        mid_frame: bool,
    },
    /// Answers waited to be sent for `read_timeout`, and the client read
    /// none of them meanwhile.
    NotReading,
    /// The client's address (from its PROXY header) is refused by the
    /// listener's `allow`/`deny` lists.
    Refused,
    /// The worker's connections held more than `max_buffered_bytes`, and
    /// this one held the most.
    OverBudget {
        /// Bytes its buffers held.
        held: usize,
    },
}

/// Details of [`Close::DeferredTimeout`].
#[derive(Debug)]
pub struct DeferredTimeout {
    /// The plugin that deferred the request.
    pub plugin: String,
    /// How long the request waited.
    pub waited: std::time::Duration,
}

/// Per-connection limits and tools the reactor lends to each event.
pub struct Context<'a> {
    /// The plugin serving this connection's listener.
    pub plugin: &'a mut Plugin,
    /// Frame limits.
    pub decoder: FrameDecoder,
    /// The listener's address as text, for the plugin.
    pub listener_addr: &'a CStr,
    /// This worker's scoreboard slot: marks plugin calls in flight.
    pub slot: &'a Slot,
    /// Index of `plugin` in the config (what the slot records).
    pub plugin_index: usize,
    /// That plugin's statistics in the slot, looked up once per listener.
    pub stats: Option<&'a PluginStats>,
    /// Requests this worker has answered (for `max_requests_per_worker`).
    pub served: &'a mut u64,
    /// `max_pending_output_bytes`: answer no more frames of a read once this
    /// many response bytes wait to be sent.
    pub output_budget: usize,
    /// Whether to time plugin calls (an admin listener shows the histogram).
    pub time_plugin_calls: bool,
    /// The listener's `allow`/`deny` lists, checked against the address a
    /// PROXY header gives (accept checks the others).
    pub access: Option<&'a crate::access::AccessList>,
    /// This connection's key in the worker's slab.
    pub key: usize,
    /// The worker's pending deferred requests.
    pub deferred: &'a mut Deferreds,
    /// `max_deferred_per_connection`.
    pub max_deferred: usize,
    /// The worker is being replaced: connections that can move do not
    /// read more (see [`moving`]).
    pub leaving: bool,
}

/// One accepted client connection.
pub struct Connection {
    stream: Stream,
    /// The client's address as text (the real client's once a PROXY header
    /// named it): made once, for logs and for the plugin's context.
    peer: CString,
    /// Index of the listener (and so of the plugin) that accepted it.
    pub listener: usize,
    /// Unique id within the server, shown to plugins.
    id: u64,
    state: State,
    /// A partial frame carried over between reads: `input[..input_len]`.
    /// Empty (no allocation) whenever the connection is at a frame boundary.
    /// Invariant: `input.len()` is the capacity in use, all initialized.
    input: Vec<u8>,
    input_len: usize,
    /// Responses the kernel has not taken yet: `output[written..]`.
    /// Non-empty only in [`State::Writing`]; freed once sent.
    output: Vec<u8>,
    written: usize,
    /// Its place in the worker's read-timeout list.
    links: Links,
    /// Nothing received yet: a client that has just connected and is about
    /// to send its first request (a graceful stop gives it a moment).
    fresh: bool,
    /// A hint, not a state: this client's last read held several
    /// requests (it pipelines), so its next read goes straight to one
    /// `process_batch` call instead of trying `process` first.
    pipelining: bool,
    /// An event said the peer shut its sending side (read-closed) while we
    /// were not reading: the EOF must be read out when reading resumes, as
    /// edge-triggered polling will not report it again.
    peer_shut: bool,
    /// What plugins see in `nbnet_conn.flags`: `NBNET_CONN_HANDED_OVER`
    /// once the connection moves between workers, else 0.
    flags: u32,
    /// Answers in request order once a request was deferred: ready bytes
    /// and deferred answers still awaited. Empty (no allocation) otherwise.
    queue: VecDeque<Answer>,
    /// `Awaiting` slots in `queue`.
    awaiting: usize,
    /// Bytes of the `Ready` slots in `queue`.
    queued: usize,
    /// Bytes of its requests a thread pool holds (copied, waiting for or
    /// running on a pool thread) until their answers come: this
    /// connection's memory too.
    pooled: usize,
}

impl Linked for Connection {
    fn links(&mut self) -> &mut Links {
        &mut self.links
    }
}

impl Connection {
    /// Wraps a freshly accepted stream.
    pub fn new(
        stream: Stream,
        peer: String,
        listener: usize,
        id: u64,
        deadline: Instant,
        proxy_protocol: bool,
    ) -> Self {
        Connection {
            stream,
            peer: CString::new(peer).unwrap_or_default(),
            listener,
            id,
            state: if proxy_protocol {
                State::ProxyHeader
            } else {
                State::Reading
            },
            input: Vec::new(),
            input_len: 0,
            output: Vec::new(),
            written: 0,
            links: Links::new(deadline),
            fresh: true,
            pipelining: false,
            peer_shut: false,
            flags: 0,
            queue: VecDeque::new(),
            awaiting: 0,
            queued: 0,
            pooled: 0,
        }
    }

    /// Whether its plugin has been told of it (`on_open`): on a
    /// `proxy_protocol` listener not before its PROXY header has named the
    /// real client.
    pub fn is_announced(&self) -> bool {
        self.state != State::ProxyHeader
    }

    /// After `on_open`: "handed over" described how it arrived; calls from
    /// now on see no flag until it leaves.
    pub fn opened(&mut self) {
        self.flags = 0;
    }

    /// The connection as a plugin sees it; borrows this connection's text.
    pub fn describe<'a>(&'a self, listener_addr: &'a CStr) -> RawConnection {
        self.describe_as::<true>(listener_addr)
    }

    /// [`describe`](Self::describe) for an event's path: `TLS` false
    /// leaves the TLS check out (see [`Connection::on_event`]).
    #[inline(always)]
    fn describe_as<'a, const TLS: bool>(&'a self, listener_addr: &'a CStr) -> RawConnection {
        let mut raw = RawConnection {
            id: self.id,
            peer: self.peer.as_ptr(),
            listener: listener_addr.as_ptr(),
            flags: self.flags,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        if TLS {
            if let Stream::Tls(tls) = &self.stream {
                super::tls::describe(tls, &mut raw);
            }
        }
        raw
    }

    /// Whether it speaks TLS (it cannot be handed over).
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Its id, unique within the server.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client's address, for logs.
    pub fn peer(&self) -> &str {
        self.peer.to_str().unwrap_or("?")
    }

    /// The socket's descriptor (to hand it over).
    pub fn stream_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.stream.as_fd()
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// When this connection times out unless it makes progress.
    #[inline]
    pub fn deadline(&self) -> Instant {
        self.links.deadline
    }

    /// At a frame boundary with every answer sent (none deferred or
    /// queued): nothing is owed either way.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Reading | State::ProxyHeader)
            && self.input_len == 0
            && self.queue.is_empty()
    }

    /// Deferred answers this connection waits for.
    pub fn awaiting(&self) -> usize {
        self.awaiting
    }

    /// The tokens of the deferred answers it waits for.
    pub fn awaiting_tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue.iter().filter_map(|slot| match slot {
            Answer::Awaiting(token) => Some(*token),
            Answer::Ready(_) | Answer::Failed(_) => None,
        })
    }

    /// Whether nothing has been received on it yet.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Bytes of answers not yet taken by the kernel: the ones being
    /// written, and the ready ones queued behind them.
    pub fn unsent_bytes(&self) -> usize {
        self.output.len() - self.written + self.queued
    }

    /// Whether responses (or a TLS handshake's records) wait for the
    /// client to read them.
    #[inline]
    pub fn has_unsent_output(&self) -> bool {
        self.has_unsent_output_as::<true>()
    }

    #[inline(always)]
    fn has_unsent_output_as<const TLS: bool>(&self) -> bool {
        self.state == State::Writing || (TLS && self.stream.wants_write())
    }

    /// Whether part of a frame has been received.
    pub fn mid_frame(&self) -> bool {
        self.input_len > 0
    }

    /// Bytes of memory this connection's buffers hold: its partial
    /// request(s) and its unsent responses, as allocated (capacity, which
    /// is what the process's resident memory sees), and its requests a
    /// thread pool holds, for the worker's `max_buffered_bytes` budget.
    #[inline]
    pub fn buffered_bytes(&self) -> usize {
        self.input.capacity() + self.output.capacity() + self.queued + self.pooled
    }

    /// Handles READABLE (or read-closed): reads what is there, answers every
    /// complete frame, and writes the answers. `Ok(progress)` says whether
    /// the read deadline moves: yes when a frame completed or began, or the
    /// connection is back at a frame boundary; no when bytes only trickled
    /// into a frame already under way. So `read_timeout` bounds both the
    /// idle time between frames and the time to receive one frame, and a
    /// client sending one byte a second (slowloris) is closed.
    pub fn on_readable(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        read_closed: bool,
    ) -> Result<bool, Close> {
        if self.is_tls() {
            self.on_readable_as::<true>(ctx, scratch, read_closed)
        } else {
            self.on_readable_as::<false>(ctx, scratch, read_closed)
        }
    }

    /// One event on the socket: READABLE (or read-closed, or an error)
    /// reads and answers, WRITABLE sends what waits. A plain stream runs
    /// a copy of the path with every TLS check compiled out; a TLS one
    /// runs its own copy, out of line.
    #[inline]
    pub fn on_event(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        readable: bool,
        read_closed: bool,
        writable: bool,
    ) -> Result<bool, Close> {
        if self.is_tls() {
            return self.on_tls_event(ctx, scratch, readable, read_closed, writable);
        }
        self.on_event_as::<false>(ctx, scratch, readable, read_closed, writable)
    }

    #[inline(never)]
    fn on_tls_event(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        readable: bool,
        read_closed: bool,
        writable: bool,
    ) -> Result<bool, Close> {
        self.on_event_as::<true>(ctx, scratch, readable, read_closed, writable)
    }

    /// `TLS`: false only when the stream is plain (TCP or Unix); the TLS
    /// checks are then left out of this copy of the event's path.
    #[inline(always)]
    fn on_event_as<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        readable: bool,
        read_closed: bool,
        writable: bool,
    ) -> Result<bool, Close> {
        debug_assert!(TLS || !self.is_tls(), "a TLS stream on the plain path");
        let mut outcome = Ok(false);
        if readable {
            outcome = self.on_readable_as::<TLS>(ctx, scratch, read_closed);
        }
        // WRITABLE matters only while answers (or TLS records) wait to
        // be sent.
        if writable && self.has_unsent_output_as::<TLS>() {
            outcome = match outcome {
                Ok(progress) => self
                    .on_writable_as::<TLS>(ctx, scratch)
                    .map(|p| p || progress),
                closed => closed,
            };
        }
        outcome
    }

    #[inline(always)]
    fn on_readable_as<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        read_closed: bool,
    ) -> Result<bool, Close> {
        debug_assert!(TLS || !self.is_tls(), "a TLS stream on the plain path");
        self.peer_shut |= read_closed;
        let read_closed = self.peer_shut;
        if self.state == State::ProxyHeader && !self.read_proxy_header::<TLS>(ctx, scratch)? {
            return Ok(false);
        }
        if self.state != State::Reading {
            // Reads are paused while responses are pending; `on_writable`
            // resumes reading once they are flushed. A peer that reset the
            // connection meanwhile will read none of them: it ends now
            // (its pending requests are dropped, not run for nobody).
            if read_closed && self.state == State::Waiting {
                self.reset_by_peer()?;
            }
            return Ok(false);
        }
        let mut progress = false;
        loop {
            // Frames already received but held back by the output budget
            // come first, before reading more.
            if self.holds_a_frame(ctx.decoder) {
                self.answer_and_flush::<TLS>(ctx, scratch, 0)?;
                progress = true;
                if self.state != State::Reading {
                    self.release_idle_input();
                    return Ok(true);
                }
                continue;
            }
            let (read, want) = if self.input_len == 0 {
                // At a frame boundary: read into the worker's shared buffer.
                let read = read_as::<TLS>(&mut self.stream, &mut scratch.input);
                (read, scratch.input.len())
            } else {
                // Continue the partial frame in the connection's own buffer.
                let want = self.read_size(ctx.decoder);
                self.reserve_input(want);
                let read = read_as::<TLS>(&mut self.stream, &mut self.input[self.input_len..]);
                (read, want)
            };
            match read {
                // 0 bytes: the peer closed its sending side. Every answer was
                // written (else we'd be Writing and not reading), so a
                // half-close after the last request is complete.
                // Deferred answers still owed: they are delivered first
                // (a completion reads the EOF again once they are) —
                // also when the peer stopped in the middle of its next
                // frame: that frame is lost, not the answers before it.
                Ok(0) if !self.queue.is_empty() => {
                    self.peer_shut = true;
                    self.transition(State::Waiting);
                    self.release_idle_input();
                    return Ok(progress);
                }
                Ok(0) if self.input_len == 0 => return Err(Close::PeerClosed),
                Ok(0) => {
                    return Err(Close::PeerClosedMidFrame {
                        received: self.input_len,
                    })
                }
                Ok(n) => {
                    self.fresh = false;
                    let frame_under_way = self.input_len > 0;
                    let completed = self.answer_and_flush::<TLS>(ctx, scratch, n)?;
                    if completed || !frame_under_way || self.input_len == 0 {
                        progress = true;
                    }
                    if self.state != State::Reading {
                        self.release_idle_input();
                        return Ok(true);
                    }
                    // A short read means the socket's receive queue is empty:
                    // don't pay another `read` just to see WouldBlock. With
                    // edge-triggered polling new data brings a new event; only
                    // a pending EOF (read_closed), or frames held back by the
                    // output budget, need another turn now.
                    if n < want && !read_closed && !self.holds_a_frame(ctx.decoder) {
                        self.release_idle_input();
                        return Ok(progress);
                    }
                }
                // Not ready: not an error, wait for the next event.
                Err(e) if would_block(&e) => {
                    self.release_idle_input();
                    return Ok(progress);
                }
                // Interrupted by a signal: try again.
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(Close::Io(e)),
            }
        }
    }

    /// The connection stops reading for now (the socket is drained, or
    /// answers wait). At a frame boundary it owns no input buffer
    /// meanwhile: `process_read` keeps the buffer until then, as a client
    /// pipelining large frames is likely to leave the next one straddling
    /// two reads.
    #[inline(always)]
    fn release_idle_input(&mut self) {
        if self.input_len == 0 && self.input.capacity() != 0 {
            self.input = Vec::new();
        }
    }

    /// Answers the frames among the `n` bytes just read (or held back), and
    /// writes the answers in one go. If the client is not reading them, the
    /// connection moves to Writing and stops reading (WRITABLE resumes it),
    /// so its memory stays bounded. `Ok(true)` when a frame was answered.
    #[inline]
    fn answer_and_flush<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        n: usize,
    ) -> Result<bool, Close> {
        match self.process_read::<TLS>(ctx, scratch, n) {
            Ok(completed) => {
                self.flush_scratch::<TLS>(ctx, scratch)?;
                Ok(completed)
            }
            Err(close) => Err(self.flush_before_closing(ctx, scratch, close)),
        }
    }

    /// Delivers the answers to the requests before a bad one (best effort:
    /// non-blocking), before the connection closes for `close`.
    #[cold]
    #[inline(never)]
    fn flush_before_closing(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        close: Close,
    ) -> Close {
        // Only what precedes the first answer still owed: the ready front
        // of the queue, then this read's answers up to its first deferred one.
        let _ = self.deliver(&ctx.slot.stats);
        let buffer = scratch.responses.buffer();
        let end = match scratch.responses.marks().first() {
            Some(mark) => mark.at.saturating_sub(HEADER_LEN).min(buffer.len()),
            None => buffer.len(),
        };
        if self.queue.is_empty() && self.output.is_empty() {
            let mut sent = 0;
            let _ = write_some(&mut self.stream, &buffer[..end], &mut sent, &ctx.slot.stats);
        }
        // This read's deferred requests were never registered.
        ctx.deferred.forget(scratch.responses.deferred());
        crate::plugin::pool::forget_copied();
        scratch.responses.clear_marks();
        scratch.responses.buffer_mut().clear();
        close
    }

    /// `Err` if the peer reset the connection (a half-close is not an
    /// error: the answers owed are still delivered).
    #[cold]
    #[inline(never)]
    fn reset_by_peer(&self) -> Result<(), Close> {
        use std::os::fd::AsFd;
        match nix::sys::socket::getsockopt(
            &self.stream.as_fd(),
            nix::sys::socket::sockopt::SocketError,
        ) {
            Ok(errno) if errno != 0 => Err(Close::Io(io::Error::from_raw_os_error(errno))),
            _ => Ok(()),
        }
    }

    /// Whether the buffered input starts with something to act on: a whole
    /// frame held back by the output budget (or a bad header to close on).
    #[inline]
    fn holds_a_frame(&self, decoder: FrameDecoder) -> bool {
        // The common case (nothing buffered) without a call.
        self.input_len > 0 && self.buffer_holds_a_frame(decoder)
    }

    #[inline(never)]
    fn buffer_holds_a_frame(&self, decoder: FrameDecoder) -> bool {
        !matches!(
            decoder.decode(&self.input[..self.input_len]),
            Ok(Decoded::Incomplete { .. })
        )
    }

    /// Reads until the PROXY header is complete; then takes the real
    /// client's address, answers any frames that came with the header, and
    /// moves to Reading. `Ok(false)` while the header is incomplete (its
    /// bytes do not extend the deadline: `read_timeout` bounds the header).
    fn read_proxy_header<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
    ) -> Result<bool, Close> {
        loop {
            self.reserve_input(MIN_OWN_READ);
            match self.stream.read(&mut self.input[self.input_len..]) {
                // Closed before sending anything (a plain TCP health
                // check does this): an ordinary close, not a cut frame.
                Ok(0) if self.input_len == 0 => return Err(Close::PeerClosed),
                Ok(0) => {
                    return Err(Close::PeerClosedMidFrame {
                        received: self.input_len,
                    })
                }
                Ok(n) => {
                    ctx.slot.stats.bytes_in.add(n as u64);
                    self.input_len += n;
                    self.fresh = false;
                }
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(Close::Io(e)),
            }
            let (proxied, consumed) = match proxy::parse(&self.input[..self.input_len]) {
                Ok(Some(header)) => header,
                Ok(None) => continue,
                Err(e) => return Err(Close::Proxy(Box::new(e))),
            };
            if let Proxied::Tcp { source, .. } = proxied {
                tracing::debug!(proxy = self.peer(), client = %source, "PROXY header");
                self.peer = CString::new(source.to_string()).unwrap_or_default();
                if ctx
                    .access
                    .is_some_and(|access| !access.permits(source.ip()))
                {
                    return Err(Close::Refused);
                }
            } else if ctx.access.is_some() {
                // LOCAL (a health check of the proxy's own) or UNKNOWN: no
                // client address to admit.
                return Err(Close::Refused);
            }
            if let Stream::Tls(tls) = &mut self.stream {
                // TLS starts right after the header: what followed it is
                // the client's first handshake bytes.
                tls.start_after_header(&self.input[consumed..self.input_len])
                    .map_err(Close::Io)?;
                self.input_len = consumed;
            }
            self.input.copy_within(consumed..self.input_len, 0);
            self.input_len -= consumed;
            // Only now is the plugin told: `on_open` sees the real client's
            // address, as `process` and `on_close` will.
            let described = self.describe(ctx.listener_addr);
            let plugin = &mut *ctx.plugin;
            ctx.slot
                .track(ctx.plugin_index, || plugin.connection_opened(&described));
            self.opened();
            self.transition(State::Reading);
            if self.input_len > 0 {
                // Frames sent right behind the header (answered, or their
                // error handled, exactly like frames from a read).
                self.answer_and_flush::<TLS>(ctx, scratch, 0)?;
            } else {
                self.input = Vec::new();
            }
            return Ok(true);
        }
    }

    /// Handles WRITABLE: sends queued responses; once all are sent, resumes
    /// reading (data may have arrived while reads were paused).
    #[inline(always)]
    fn on_writable_as<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
    ) -> Result<bool, Close> {
        if self.state != State::Writing {
            // TLS handshake records the socket could not take at once.
            if TLS {
                self.stream.send_pending().map_err(Close::Io)?;
            }
            return Ok(false);
        }
        let before = self.written;
        let done = write_some_as::<TLS>(
            &mut self.stream,
            &self.output,
            &mut self.written,
            &ctx.slot.stats,
        )?;
        let progress = self.written != before;
        if !done {
            return Ok(progress);
        }
        self.output = Vec::new();
        self.written = 0;
        if self.must_wait(ctx) {
            self.transition(State::Waiting);
            return Ok(progress);
        }
        self.transition(State::Reading);
        // Edge-triggered: an edge seen while paused is gone, so look now.
        let read_progress = self.on_readable_as::<TLS>(ctx, scratch, false)?;
        Ok(progress || read_progress)
    }

    /// Answers every complete frame among the `n` bytes just read (in the
    /// shared buffer, or appended to this connection's partial frame), and
    /// keeps any trailing partial frame in the connection's own buffer.
    /// `Ok(true)` when at least one frame was answered.
    #[inline]
    fn process_read<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
        n: usize,
    ) -> Result<bool, Close> {
        // The shared response buffer is empty between connections' turns;
        // anything left in it would be sent to the wrong client.
        debug_assert!(
            scratch.responses.buffer().is_empty(),
            "scratch output leaked"
        );
        scratch.responses.buffer_mut().clear();
        // How plugins see this connection: valid for this read's calls.
        let conn = self.describe_as::<TLS>(ctx.listener_addr);
        scratch.responses.set_connection(&conn);
        ctx.slot.stats.bytes_in.add(n as u64);
        let mut answering = Answering {
            // Reading only goes on while `awaiting < max_deferred` (see
            // `must_wait`), and a read defers at most the room: no wrap.
            deferred_room: ctx.max_deferred.wrapping_sub(self.awaiting),
            ctx,
            peer: &self.peer,
            pipelining: &mut self.pipelining,
            decoded_first: None,
        };
        if self.input_len == 0 {
            let data = &scratch.input[..n];
            let used = answering.frames(data, &mut scratch.responses, &mut scratch.batch)?;
            if used < n {
                let rest = &scratch.input[used..n];
                self.reserve_input(rest.len());
                self.input[..rest.len()].copy_from_slice(rest);
                self.input_len = rest.len();
                // The buffer may be one kept from a large frame.
                self.shrink_input(ctx.decoder);
            }
            Ok(used > 0)
        } else {
            self.input_len += n;
            let data = &self.input[..self.input_len];
            let used = answering.frames(data, &mut scratch.responses, &mut scratch.batch)?;
            if used == self.input_len {
                // Back at a frame boundary. The buffer stays until the
                // connection stops reading (`release_idle_input`).
                self.input_len = 0;
            } else if used > 0 {
                self.input.copy_within(used..self.input_len, 0);
                self.input_len -= used;
                self.shrink_input(ctx.decoder);
            }
            Ok(used > 0)
        }
    }

    /// How many bytes to ask the next `read` into the connection's own
    /// buffer for: the rest of the frame (so a large payload is copied once,
    /// kernel → buffer), but growing at most by doubling past
    /// `READ_AHEAD_LIMIT`: a client declaring 16 MiB and then trickling must
    /// not cost 16 MiB at once.
    fn read_size(&self, decoder: FrameDecoder) -> usize {
        match decoder.decode(&self.input[..self.input_len]) {
            Ok(Decoded::Incomplete { total: Some(total) }) => {
                let rest = total - self.input_len;
                if rest <= READ_AHEAD_LIMIT {
                    rest.max(MIN_OWN_READ)
                } else {
                    // Doubling, but never past the frame's end: a buffer
                    // twice the frame would be memory held for nothing.
                    self.input_len.max(MIN_OWN_READ).min(rest)
                }
            }
            _ => MIN_OWN_READ,
        }
    }

    /// Makes room for `want` more bytes after the partial frame; exactly
    /// (`read_size` already grows geometrically), so that the capacity is
    /// the memory accounted for, not up to twice as much.
    fn reserve_input(&mut self, want: usize) {
        let needed = self.input_len + want;
        if self.input.len() < needed {
            self.input.reserve_exact(needed - self.input.len());
            self.input.resize(needed, 0);
        }
    }

    /// After a large frame was answered with part of the next one behind
    /// it (in this buffer, or in the scratch and copied to this buffer kept
    /// since): gives the buffer's memory back, keeping what the next frame
    /// needs (when its header says) so that equal large frames in a row
    /// reuse the buffer.
    fn shrink_input(&mut self, decoder: FrameDecoder) {
        if self.input.len() <= SHRINK_ABOVE {
            return;
        }
        let next = match decoder.decode(&self.input[..self.input_len]) {
            Ok(Decoded::Incomplete { total: Some(total) }) => total,
            _ => 0,
        };
        let keep = self.input_len.max(MIN_OWN_READ).max(next);
        if self.input.len() > 2 * keep {
            self.input.truncate(keep);
            self.input.shrink_to_fit();
        }
    }

    /// Writes the responses just produced in the shared buffer, in as few
    /// `write` calls as the kernel allows. What the kernel cannot take yet
    /// moves to the connection's own buffer, and the connection waits for
    /// WRITABLE.
    #[inline]
    fn flush_scratch<const TLS: bool>(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
    ) -> Result<(), Close> {
        // (One test for both: this read deferred a request, or answers
        // already wait in order.)
        if (scratch.responses.deferred() | self.queue.len()) != 0 {
            return self.queue_answers(ctx, scratch);
        }
        let stats = &ctx.slot.stats;
        let mut written = 0;
        let output = scratch.responses.buffer();
        let result = write_some_as::<TLS>(&mut self.stream, output, &mut written, stats);
        if let Ok(false) = result {
            self.output = output[written..].to_vec();
            self.written = 0;
            self.transition(State::Writing);
        }
        scratch.responses.buffer_mut().clear();
        result.map(drop)
    }

    fn transition(&mut self, to: State) {
        tracing::debug!(peer = self.peer(), from = ?self.state, ?to, "connection state");
        self.state = to;
    }
}

/// Writes `buf[*written..]` until done (`Ok(true)`) or the kernel's send
/// buffer is full (`Ok(false)`), advancing `*written`.
fn write_some(
    stream: &mut Stream,
    buf: &[u8],
    written: &mut usize,
    stats: &Stats,
) -> Result<bool, Close> {
    write_some_as::<true>(stream, buf, written, stats)
}

/// [`write_some`]; `TLS` false only for a plain stream (no TLS check).
// Always inlined: out of line it costs ~50 instructions per response
// (callgrind, 64 B at depth 1).
#[inline(always)]
fn write_some_as<const TLS: bool>(
    stream: &mut Stream,
    buf: &[u8],
    written: &mut usize,
    stats: &Stats,
) -> Result<bool, Close> {
    while *written < buf.len() {
        match write_as::<TLS>(stream, &buf[*written..]) {
            Ok(0) => return Err(Close::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                *written += n;
                stats.bytes_out.add(n as u64);
            }
            // Send buffer full: wait for WRITABLE.
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) if interrupted(&e) => continue,
            Err(e) => return Err(Close::Io(e)),
        }
    }
    // TLS: the records of what was written may still wait for the socket.
    match stream {
        Stream::Tls(tls) if TLS => tls.send_pending().map_err(Close::Io),
        _ => Ok(true),
    }
}

/// Reads from `stream`; `TLS` false: the plain variants come first, with
/// no TLS arm in between (any stream is still read correctly).
#[inline(always)]
fn read_as<const TLS: bool>(stream: &mut Stream, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Stream::Tcp(s) if !TLS => s.read(buf),
        Stream::Unix(s) if !TLS => s.read(buf),
        other => other.read(buf),
    }
}

/// Writes to `stream`, like [`read_as`].
#[inline(always)]
fn write_as<const TLS: bool>(stream: &mut Stream, buf: &[u8]) -> io::Result<usize> {
    match stream {
        Stream::Tcp(s) if !TLS => s.write(buf),
        Stream::Unix(s) if !TLS => s.write(buf),
        other => other.write(buf),
    }
}

/// The operation would block: not ready yet, not an error.
fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// A signal interrupted the call: retry it.
fn interrupted(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Interrupted
}
