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
//! ```
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

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use super::deadlines::{Linked, Links};
use crate::codec::{Decoded, FrameDecoder, FrameError, HEADER_LEN};
use crate::plugin::{Plugin, ProcessError};

/// Bytes read per `read` call when no larger frame is known to be coming.
const READ_CHUNK: usize = 16 * 1024;
/// Largest read-ahead reserved in one step for a frame whose length is known.
const READ_AHEAD_LIMIT: usize = 256 * 1024;
/// Idle buffers larger than this are freed rather than kept for the next request.
const KEEP_IDLE_CAPACITY: usize = 64 * 1024;

/// Where a connection is in its life; see the module doc for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for request bytes: idle keep-alive, or part of a frame.
    Reading,
    /// Responses are queued and the kernel's send buffer is full.
    Writing,
}

/// Why a connection ends; the reactor logs each at its own level.
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
    Protocol(FrameError),
    /// The plugin failed this request.
    Plugin(ProcessError),
    /// Nothing received or sent for `read_timeout`.
    TimedOut {
        /// Whether a frame was partly received (a stall, not just an idle connection).
        mid_frame: bool,
    },
}

/// Per-connection limits and tools the reactor lends to each event.
pub struct Context<'a> {
    /// The plugin serving this connection's listener.
    pub plugin: &'a mut Plugin,
    /// Frame limits.
    pub decoder: FrameDecoder,
}

/// One accepted client connection.
pub struct Connection {
    stream: TcpStream,
    /// The client's address, for logs.
    pub peer: SocketAddr,
    /// Index of the listener (and so of the plugin) that accepted it.
    pub listener: usize,
    state: State,
    /// Received bytes. `input[..input_len]` is data; frames are consumed from the front.
    /// Invariant: `input.len()` is the buffer's capacity in use, all initialized.
    input: Vec<u8>,
    input_len: usize,
    /// Encoded responses; `output[written..]` is not yet sent.
    output: Vec<u8>,
    written: usize,
    /// Its place in the worker's read-timeout list.
    links: Links,
}

impl Linked for Connection {
    fn links(&mut self) -> &mut Links {
        &mut self.links
    }
}

impl Connection {
    /// Wraps a freshly accepted stream.
    pub fn new(stream: TcpStream, peer: SocketAddr, listener: usize, deadline: Instant) -> Self {
        Connection {
            stream,
            peer,
            listener,
            state: State::Reading,
            input: Vec::new(),
            input_len: 0,
            output: Vec::new(),
            written: 0,
            links: Links::new(deadline),
        }
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// When this connection times out unless it makes progress.
    pub fn deadline(&self) -> Instant {
        self.links.deadline
    }

    /// Whether part of a frame has been received.
    pub fn mid_frame(&self) -> bool {
        self.input_len > 0
    }

    /// Handles READABLE (or read-closed): reads what is there, answers every
    /// complete frame, and writes the answers. `Ok(progress)` says whether
    /// any bytes moved (for the deadline).
    pub fn on_readable(&mut self, ctx: &mut Context<'_>, read_closed: bool) -> Result<bool, Close> {
        if self.state != State::Reading {
            // Reads are paused while responses are pending; `on_writable`
            // resumes reading once they are flushed.
            return Ok(false);
        }
        let mut progress = false;
        let mut eof = false;
        loop {
            let want = self.read_size(ctx.decoder);
            self.reserve_input(want);
            match self.stream.read(&mut self.input[self.input_len..]) {
                // 0 bytes: the peer closed its sending side.
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    progress = true;
                    self.input_len += n;
                    self.process_frames(ctx)?;
                    // Answer this chunk's requests in one write before reading
                    // more; if the client is not reading them, stop reading
                    // from it too (WRITABLE resumes), so memory stays bounded.
                    self.flush()?;
                    if self.state != State::Reading {
                        return Ok(true);
                    }
                    // A short read means the socket's receive queue is empty:
                    // don't pay another `read` just to see WouldBlock. With
                    // edge-triggered polling new data brings a new event; only
                    // a pending EOF (read_closed) must be read out now.
                    if n < want && !read_closed {
                        break;
                    }
                }
                // Not ready: not an error, wait for the next event.
                Err(e) if would_block(&e) => break,
                // Interrupted by a signal: try again.
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(Close::Io(e)),
            }
        }
        if eof {
            if self.input_len > 0 {
                return Err(Close::PeerClosedMidFrame {
                    received: self.input_len,
                });
            }
            // Every answer was written (otherwise we'd be Writing and not
            // reading), so the half-close is complete.
            return Err(Close::PeerClosed);
        }
        Ok(progress)
    }

    /// Handles WRITABLE: sends queued responses; once all are sent, resumes
    /// reading (data may have arrived while reads were paused).
    pub fn on_writable(&mut self, ctx: &mut Context<'_>) -> Result<bool, Close> {
        if self.state == State::Reading {
            return Ok(false);
        }
        let before = self.written;
        self.flush()?;
        let progress = self.written != before;
        match self.state {
            State::Reading => {
                // Edge-triggered: an edge seen while paused is gone, so look now.
                let read_progress = self.on_readable(ctx, false)?;
                Ok(progress || read_progress)
            }
            State::Writing => Ok(progress),
        }
    }

    /// Decodes and answers every complete frame in the input buffer.
    fn process_frames(&mut self, ctx: &mut Context<'_>) -> Result<(), Close> {
        let mut start = 0;
        let max = ctx.decoder.max_frame_bytes();
        while start < self.input_len {
            match ctx.decoder.decode(&self.input[start..self.input_len]) {
                Ok(Decoded::Frame { len }) => {
                    let payload = &self.input[start + HEADER_LEN..start + HEADER_LEN + len];
                    ctx.plugin
                        .process(payload, &mut self.output, max)
                        .map_err(Close::Plugin)?;
                    start += HEADER_LEN + len;
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => return Err(Close::Protocol(e)),
            }
        }
        // Keep the unfinished frame at the front of the buffer.
        if start > 0 {
            self.input.copy_within(start..self.input_len, 0);
            self.input_len -= start;
        }
        if self.input_len == 0 && self.input.len() > KEEP_IDLE_CAPACITY {
            self.input = Vec::new();
        }
        Ok(())
    }

    /// How many bytes to ask the next `read` for. For a frame whose header
    /// is known, the rest of it (so a large payload is copied once, kernel →
    /// buffer), but growing at most by doubling past `READ_AHEAD_LIMIT`: a
    /// client declaring 16 MiB and then trickling must not cost 16 MiB at once.
    fn read_size(&self, decoder: FrameDecoder) -> usize {
        match decoder.decode(&self.input[..self.input_len]) {
            Ok(Decoded::Incomplete { total: Some(total) }) => {
                let rest = total - self.input_len;
                if rest <= READ_AHEAD_LIMIT {
                    rest.max(READ_CHUNK)
                } else {
                    self.input_len.max(READ_CHUNK)
                }
            }
            _ => READ_CHUNK,
        }
    }

    /// Makes room for `want` more bytes after the data. Grows only by what is
    /// actually being read: a declared length is never allocated up front
    /// beyond the validated frame size.
    fn reserve_input(&mut self, want: usize) {
        let needed = self.input_len + want;
        if self.input.len() < needed {
            self.input.resize(needed, 0);
        }
    }

    /// Writes queued responses, all of them in as few `write` calls as the
    /// kernel allows; moves to Writing if the send buffer fills.
    fn flush(&mut self) -> Result<(), Close> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(Close::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                // Send buffer full: wait for WRITABLE.
                Err(e) if would_block(&e) => {
                    if self.state == State::Reading {
                        self.transition(State::Writing);
                    }
                    return Ok(());
                }
                Err(e) if interrupted(&e) => continue,
                Err(e) => return Err(Close::Io(e)),
            }
        }
        // Everything sent: reuse the buffer from the start.
        self.output.clear();
        self.written = 0;
        if self.output.capacity() > KEEP_IDLE_CAPACITY {
            self.output = Vec::new();
        }
        if self.state == State::Writing {
            self.transition(State::Reading);
        }
        Ok(())
    }

    fn transition(&mut self, to: State) {
        tracing::debug!(peer = %self.peer, from = ?self.state, ?to, "connection state");
        self.state = to;
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
