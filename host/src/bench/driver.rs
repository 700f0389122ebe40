//! One load-generator thread: a mio reactor over its share of the connections.
//!
//! Closed loop: each connection keeps `depth` requests in flight; every
//! response is checked against its own request and immediately replaced by a
//! new one. All responses of one read are answered with one `write`. Reads
//! stop at a short read (edge-triggered epoll reports new data again), so the
//! client does not pay an extra `read` per wake-up to see `WouldBlock`.
//! Over TLS (`--tls`) a short read says nothing about the socket (rustls
//! hands out one record at a time), so reads go on until `WouldBlock`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::payload::{Expect, Payloads};
use super::report::Failures;
use crate::codec::{Decoded, FrameDecoder, FrameError, HEADER_LEN, MAX_DECLARED};

/// When a thread measures and when it stops.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Responses before this are warm-up: checked, not counted.
    pub measure_from: Instant,
    /// Timed runs stop here; fixed-count runs give up here.
    pub end: Instant,
}

/// What one thread does.
#[derive(Debug, Clone)]
pub struct Job {
    /// Requests in flight per connection.
    pub depth: usize,
    /// Response check.
    pub expect: Expect,
    /// Payload builder/checker.
    pub payloads: Payloads,
    /// Requests this thread sends in all (fixed-count runs), or `None` (timed).
    pub quota: Option<u64>,
    /// Timing.
    pub phases: Phases,
    /// Shared with the main thread, which prints progress from it.
    pub progress: std::sync::Arc<Progress>,
}

/// Running totals of all threads, for the progress line (published after
/// each poll, not per response: one atomic add per batch).
#[derive(Debug, Default)]
pub struct Progress {
    /// Responses in the measured window.
    pub completed: std::sync::atomic::AtomicU64,
    /// Mismatches and errors.
    pub failures: std::sync::atomic::AtomicU64,
}

/// What one thread measured.
#[derive(Debug)]
pub struct Tally {
    /// Responses in the measured window.
    pub completed: u64,
    /// Response payload bytes in the measured window.
    pub bytes: u64,
    /// Latency in ns of each response in the measured window.
    pub latency: Histogram<u64>,
    /// Responses per connection in the measured window, indexed like the input.
    pub per_conn: Vec<u64>,
    /// Longest gap between two responses (or window edges) of one connection.
    pub longest_stall: Duration,
    /// Failures.
    pub failures: Failures,
    /// Fixed-count run not finished by `phases.end`.
    pub timed_out: bool,
}

/// A new latency histogram in nanoseconds (1 ns .. 60 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// A load-generator connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum BenchStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// rustls over a non-blocking socket (the handshake happens in the
    /// first reads and writes).
    Tls(Box<TlsClient>),
}

/// A rustls client session on a non-blocking socket.
#[derive(Debug)]
pub struct TlsClient {
    sock: TcpStream,
    conn: rustls::ClientConnection,
}

impl TlsClient {
    /// Starts a session on `sock` (connected, non-blocking).
    pub fn new(sock: TcpStream, conn: rustls::ClientConnection) -> TlsClient {
        TlsClient { sock, conn }
    }

    /// Sends pending records until none is left or the socket is full
    /// (`WouldBlock`).
    fn push(&mut self) -> std::io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Pending records only: a full socket is no error here (WRITABLE
    /// brings the rest).
    fn push_some(&mut self) -> std::io::Result<()> {
        match self.push() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

impl Read for TlsClient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                // Plaintext, or 0 at close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.conn.read_tls(&mut self.sock)? == 0 {
                // EOF without close_notify: the reader reports it.
                self.conn
                    .process_new_packets()
                    .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
                return match self.conn.reader().read(buf) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                    other => other,
                };
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert rustls queued tells the server why.
                let _ = self.push();
                return Err(std::io::Error::new(ErrorKind::InvalidData, e));
            }
            // Handshake replies, and the plaintext queued before it ended.
            self.push_some()?;
        }
    }
}

impl Write for TlsClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // No more plaintext while earlier records wait: memory stays bounded.
        self.push()?;
        let n = self.conn.writer().write(buf)?;
        self.push_some()?;
        if n == 0 && !buf.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push_some()
    }
}

impl BenchStream {
    fn socket(&mut self) -> &mut TcpStream {
        match self {
            BenchStream::Plain(s) => s,
            BenchStream::Tls(t) => &mut t.sock,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, BenchStream::Tls(_))
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BenchStream::Plain(s) => s.read(buf),
            BenchStream::Tls(t) => t.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BenchStream::Plain(s) => s.write(buf),
            BenchStream::Tls(t) => t.write(buf),
        }
    }

    /// TLS: sends the records still pending.
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BenchStream::Plain(_) => Ok(()),
            BenchStream::Tls(t) => t.flush(),
        }
    }
}

struct Conn {
    stream: BenchStream,
    id: u32,
    next_seq: u64,
    inflight: VecDeque<(u64, Instant)>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    completed: u64,
    last_done: Instant,
    longest_stall: Duration,
    alive: bool,
}

struct Thread<'a> {
    job: &'a Job,
    decoder: FrameDecoder,
    issued: u64,
    outstanding: u64,
    tally: Tally,
}

/// Runs `job` over `streams` (already connected, non-blocking), whose ids are `ids`.
pub fn drive(job: &Job, streams: Vec<BenchStream>, ids: Vec<u32>) -> Tally {
    let n = streams.len();
    let mut t = Thread {
        job,
        decoder: FrameDecoder::new(MAX_DECLARED as usize),
        issued: 0,
        outstanding: 0,
        tally: Tally {
            completed: 0,
            bytes: 0,
            latency: new_histogram(),
            per_conn: vec![0; n],
            longest_stall: Duration::ZERO,
            failures: Failures::default(),
            timed_out: false,
        },
    };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            t.tally.failures.io += 1;
            t.tally.failures.note(format!("epoll: {e}"));
            return t.tally;
        }
    };
    let frame = HEADER_LEN + job.payloads.size();
    let rcap = (2 * frame * job.depth).clamp(16 * 1024, 4 * 1024 * 1024);
    let start = Instant::now();
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    for (i, (mut stream, id)) in streams.into_iter().zip(ids).enumerate() {
        if let Err(e) = poll.registry().register(
            stream.socket(),
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            t.tally.failures.io += 1;
            t.tally.failures.note(format!("conn {id}: register: {e}"));
        }
        conns.push(Conn {
            stream,
            id,
            next_seq: 0,
            inflight: VecDeque::with_capacity(job.depth),
            rbuf: vec![0; rcap],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(frame * job.depth),
            wpos: 0,
            completed: 0,
            last_done: job.phases.measure_from.max(start),
            longest_stall: Duration::ZERO,
            alive: true,
        });
    }
    for conn in &mut conns {
        for _ in 0..job.depth {
            t.issue(conn, start);
        }
        t.flush(conn);
    }
    let mut events = Events::with_capacity(1024);
    let mut published = (0, 0);
    loop {
        t.publish(&mut published);
        let now = Instant::now();
        if job.quota.is_some() && t.outstanding == 0 {
            break;
        }
        if now >= job.phases.end {
            t.tally.timed_out = job.quota.is_some();
            break;
        }
        if conns.iter().all(|c| !c.alive) {
            break;
        }
        let wait = (job.phases.end - now).min(Duration::from_millis(100));
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            t.tally.failures.io += 1;
            t.tally.failures.note(format!("epoll_wait: {e}"));
            break;
        }
        for event in events.iter() {
            let conn = &mut conns[event.token().0];
            if !conn.alive {
                continue;
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                t.read(conn);
            }
            if conn.alive && (event.is_writable() || conn.wpos < conn.wbuf.len()) {
                t.flush(conn);
            }
        }
    }
    t.publish(&mut published);
    let end = Instant::now().min(job.phases.end);
    let mut longest = Duration::ZERO;
    for (i, conn) in conns.iter().enumerate() {
        t.tally.per_conn[i] = conn.completed;
        let tail = end.saturating_duration_since(conn.last_done);
        longest = longest.max(conn.longest_stall).max(tail);
    }
    t.tally.longest_stall = longest;
    t.tally
}

impl Thread<'_> {
    /// Adds what changed since `published` to the shared [`Progress`].
    fn publish(&self, published: &mut (u64, u64)) {
        use std::sync::atomic::Ordering::Relaxed;
        let f = &self.tally.failures;
        let now = (self.tally.completed, f.mismatches + f.errors());
        let progress = &self.job.progress;
        progress.completed.fetch_add(now.0 - published.0, Relaxed);
        progress.failures.fetch_add(now.1 - published.1, Relaxed);
        *published = now;
    }

    /// Queues the next request of `conn`, if the run still wants one.
    fn issue(&mut self, conn: &mut Conn, now: Instant) {
        if let Some(quota) = self.job.quota {
            if self.issued >= quota {
                return;
            }
        } else if now >= self.job.phases.end {
            return;
        }
        let seq = conn.next_seq;
        conn.next_seq += 1;
        self.job
            .payloads
            .encode_request(conn.id, seq, &mut conn.wbuf);
        conn.inflight.push_back((seq, now));
        self.issued += 1;
        self.outstanding += 1;
    }

    /// Writes what `conn` has queued, until done or the socket is full.
    fn flush(&mut self, conn: &mut Conn) {
        while conn.wpos < conn.wbuf.len() {
            match conn.stream.write(&conn.wbuf[conn.wpos..]) {
                Ok(n) => conn.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail_io(conn, "write", &e),
            }
        }
        conn.wbuf.clear();
        conn.wpos = 0;
        if let Err(e) = conn.stream.flush() {
            self.fail_io(conn, "write", &e);
        }
    }

    /// Reads what `conn` has received, checks every complete response, queues replacements.
    fn read(&mut self, conn: &mut Conn) {
        loop {
            if conn.rend == conn.rbuf.len() {
                if conn.rstart > 0 {
                    conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                    conn.rend -= conn.rstart;
                    conn.rstart = 0;
                } else {
                    let grown = conn.rbuf.len() * 2;
                    conn.rbuf.resize(grown, 0);
                }
            }
            let room = conn.rbuf.len() - conn.rend;
            match conn.stream.read(&mut conn.rbuf[conn.rend..]) {
                Ok(0) => {
                    self.fail_closed(conn);
                    return;
                }
                Ok(n) => {
                    conn.rend += n;
                    let now = Instant::now();
                    if !self.consume(conn, now) {
                        return;
                    }
                    if n < room && !conn.stream.is_tls() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.fail_io(conn, "read", &e),
            }
        }
    }

    /// Handles every complete response in `conn`'s buffer; false if the connection failed.
    fn consume(&mut self, conn: &mut Conn, now: Instant) -> bool {
        loop {
            let pending = &conn.rbuf[conn.rstart..conn.rend];
            let len = match self.decoder.decode(pending) {
                Ok(Decoded::Frame { len }) => len,
                // An empty answer (`0000000000`) is legal in this direction.
                Err(FrameError::ZeroLength) => 0,
                Ok(Decoded::Incomplete { total }) => {
                    if let Some(total) = total {
                        if total > conn.rbuf.len() {
                            conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                            conn.rend -= conn.rstart;
                            conn.rstart = 0;
                            conn.rbuf.resize(total, 0);
                        }
                    }
                    break;
                }
                Err(e) => {
                    self.tally.failures.protocol += 1;
                    self.tally
                        .failures
                        .note(format!("conn {}: bad response framing: {e}", conn.id));
                    self.close(conn);
                    return false;
                }
            };
            let payload = &pending[HEADER_LEN..HEADER_LEN + len];
            let Some((seq, sent)) = conn.inflight.pop_front() else {
                self.tally.failures.unexpected += 1;
                self.tally.failures.note(format!(
                    "conn {}: a response arrived with no request outstanding",
                    conn.id
                ));
                self.close(conn);
                return false;
            };
            self.outstanding -= 1;
            let job = self.job;
            if !job.payloads.check(job.expect, conn.id, seq, payload) {
                self.tally.failures.mismatches += 1;
                if self.tally.failures.messages.len() < 5 {
                    let mut want = job.payloads.request(conn.id, seq);
                    if job.expect == Expect::Upper {
                        want.make_ascii_uppercase();
                    }
                    let head =
                        |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned();
                    self.tally.failures.note(format!(
                        "conn {} request {seq}: response mismatch (--expect {}): wanted {} bytes {:?}, got {} bytes {:?}",
                        conn.id,
                        job.expect.name(),
                        want.len(),
                        head(&want),
                        payload.len(),
                        head(payload)
                    ));
                }
            }
            if now >= job.phases.measure_from && now < job.phases.end {
                let ns = now.saturating_duration_since(sent).as_nanos() as u64;
                self.tally.latency.saturating_record(ns.max(1));
                self.tally.completed += 1;
                self.tally.bytes += len as u64;
                conn.completed += 1;
                let gap = now.saturating_duration_since(conn.last_done);
                conn.longest_stall = conn.longest_stall.max(gap);
                conn.last_done = now;
            }
            conn.rstart += HEADER_LEN + len;
            self.issue(conn, now);
        }
        if conn.rstart == conn.rend {
            conn.rstart = 0;
            conn.rend = 0;
        }
        self.flush(conn);
        conn.alive
    }

    fn fail_closed(&mut self, conn: &mut Conn) {
        if !conn.inflight.is_empty() {
            self.tally.failures.closed += 1;
            self.tally.failures.note(format!(
                "conn {}: the server closed the connection with {} request(s) outstanding",
                conn.id,
                conn.inflight.len()
            ));
        }
        self.close(conn);
    }

    fn fail_io(&mut self, conn: &mut Conn, what: &str, e: &std::io::Error) {
        self.tally.failures.io += 1;
        self.tally
            .failures
            .note(format!("conn {}: {what}: {e}", conn.id));
        self.close(conn);
    }

    fn close(&mut self, conn: &mut Conn) {
        if conn.alive {
            conn.alive = false;
            self.outstanding -= conn.inflight.len() as u64;
            conn.inflight.clear();
            let _ = conn.stream.socket().shutdown(std::net::Shutdown::Both);
        }
    }
}
