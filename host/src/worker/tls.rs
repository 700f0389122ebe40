//! A TLS connection inside the worker's reactor: the socket plus a
//! `rustls::ServerConnection`, behind the same `Read`/`Write` as a plain
//! stream (see [`crate::listener::Stream::Tls`]).
//!
//! rustls does no I/O of its own: `read` pulls ciphertext from the socket,
//! lets rustls decrypt it (or advance the handshake, writing its replies),
//! and returns plaintext; `write` encrypts into rustls' buffer and pushes
//! the records to the socket. Both keep the plain stream's non-blocking
//! contract, so the connection's state machine treats TLS like TCP:
//!
//! - `read` fills the buffer until the socket has nothing more
//!   (`WouldBlock` only when no plaintext came): a short read still means
//!   "the socket is drained", which edge-triggered polling relies on.
//!   The handshake is just reads that return no plaintext yet, so
//!   `read_timeout` bounds it like any stalled read.
//! - `write` refuses more plaintext (`WouldBlock`) while earlier records
//!   wait for the socket, so memory stays bounded; [`TlsStream::send_pending`]
//!   says whether records are still pending, and the connection waits
//!   for WRITABLE until they are sent.
//!
//! A client EOF without close_notify counts as a close (the framing tells
//! a cut frame anyway). Closing sends close_notify, best effort.

use std::ffi::CString;
use std::io::{self, Read, Write};

use rustls::ServerConnection;

use crate::listener::Stream;
use crate::scoreboard::Counter;
use crate::tls::counters::{FAILURES, HANDSHAKES, RESUMED};

/// Largest ciphertext rustls keeps for the socket: about four full
/// records; `write` takes no more plaintext until it is sent.
const BUFFER_LIMIT: usize = 64 * 1024;

/// Why a handshake failed: an index into [`crate::tls::counters::FAILURE_REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not TLS at all.
    NotTls = 0,
    /// The client certificate is missing or refused.
    ClientCertificate = 1,
    /// Any other protocol failure.
    Protocol = 2,
    /// The client closed mid-handshake.
    Truncated = 3,
    /// Closed while still handshaking (read_timeout, worker stop).
    Incomplete = 4,
}

/// A TLS failure carried inside the `io::Error` a read returns, so the
/// reactor can log it as such.
#[derive(Debug)]
pub struct TlsError {
    /// Its class, for the counters.
    pub failure: Failure,
    /// What rustls said.
    pub message: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS handshake failed: {}", self.message)
    }
}

impl std::error::Error for TlsError {}

/// Whether `e` is a TLS failure (the reactor logs those at info).
pub fn as_tls_error(e: &io::Error) -> Option<&TlsError> {
    e.get_ref()?.downcast_ref::<TlsError>()
}

/// What a plugin sees of the session, made once the handshake is done.
#[derive(Debug)]
pub struct Facts {
    /// 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3).
    pub version: u32,
    /// The client certificate's subject, if it presented one.
    pub subject: Option<CString>,
    /// Its subject alternative names.
    pub sans: Option<CString>,
}

/// One TLS connection.
#[derive(Debug)]
pub struct TlsStream {
    /// The socket (TCP or Unix; never `Stream::Tls`).
    sock: Stream,
    conn: ServerConnection,
    /// The worker's TLS counters (its scoreboard slot).
    counters: &'static [Counter],
    /// Before the PROXY header is read: bytes pass through untouched.
    raw: bool,
    /// Bytes of handshake received (a connect-and-close is no failure).
    received: bool,
    /// Set once the handshake is done.
    facts: Option<Facts>,
    /// A failure already counted.
    failed: bool,
}

impl TlsStream {
    /// Wraps an accepted socket. `proxy_header`: a PROXY header comes
    /// first, in plaintext; [`TlsStream::start_after_header`] ends it.
    pub fn new(
        sock: Stream,
        config: &std::sync::Arc<rustls::ServerConfig>,
        counters: &'static [Counter],
        proxy_header: bool,
    ) -> Result<TlsStream, rustls::Error> {
        let mut conn = ServerConnection::new(config.clone())?;
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(TlsStream {
            sock,
            conn,
            counters,
            raw: proxy_header,
            received: false,
            facts: None,
            failed: false,
        })
    }

    /// The socket underneath.
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    /// The socket underneath, for (de)registration.
    pub fn socket_mut(&mut self) -> &mut Stream {
        &mut self.sock
    }

    /// The session's facts once the handshake is done.
    pub fn facts(&self) -> Option<&Facts> {
        self.facts.as_ref()
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.facts.is_none()
    }

    /// The PROXY header ended; `rest` (bytes read after it) is the start of
    /// the TLS handshake.
    pub fn start_after_header(&mut self, rest: &[u8]) -> io::Result<()> {
        self.raw = false;
        if rest.is_empty() {
            return Ok(());
        }
        self.received = true;
        let mut rest = rest;
        while !rest.is_empty() {
            self.conn.read_tls(&mut rest)?;
            self.process()?;
        }
        Ok(())
    }

    /// Sends pending records; `Ok(true)` once none is left. (Out of line,
    /// like `read` and `write`: the plain stream's paths that branch here
    /// stay small enough to inline.)
    #[inline(never)]
    pub fn send_pending(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Whether records wait for the socket.
    #[inline(never)]
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Lets rustls process what it received: the handshake's next step
    /// (replies are sent at once, best effort), or records to decrypt.
    fn process(&mut self) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            // The alert rustls queued tells the client why.
            let _ = self.send_pending();
            return Err(self.fail(classify(&e), e.to_string()));
        }
        if self.facts.is_none() && !self.conn.is_handshaking() {
            self.handshake_done();
        }
        if self.conn.wants_write() {
            self.send_pending()?;
        }
        Ok(())
    }

    #[cold]
    fn handshake_done(&mut self) {
        self.counters[HANDSHAKES].add(1);
        if self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.counters[RESUMED].add(1);
        }
        let version = self
            .conn
            .protocol_version()
            .map_or(0, |v| u32::from(u16::from(v)));
        let (subject, sans) = match self.conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => {
                let (subject, sans) = crate::tls::describe_client(cert);
                (CString::new(subject).ok(), CString::new(sans).ok())
            }
            None => (None, None),
        };
        self.facts = Some(Facts {
            version,
            subject,
            sans,
        });
    }

    #[cold]
    fn fail(&mut self, failure: Failure, message: String) -> io::Error {
        if !self.failed {
            self.failed = true;
            self.counters[FAILURES + failure as usize].add(1);
        }
        io::Error::new(io::ErrorKind::InvalidData, TlsError { failure, message })
    }
}

/// Sorts a rustls error into the counters' small fixed set.
fn classify(e: &rustls::Error) -> Failure {
    use rustls::Error as E;
    match e {
        E::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
        | E::InvalidMessage(rustls::InvalidMessage::UnknownProtocolVersion) => Failure::NotTls,
        E::NoCertificatesPresented | E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => {
            Failure::ClientCertificate
        }
        _ => Failure::Protocol,
    }
}

impl Read for TlsStream {
    #[inline(never)]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.raw {
            return self.sock.read(buf);
        }
        let mut filled = 0;
        let mut drained = false;
        loop {
            // Plaintext already decrypted first.
            match self.conn.reader().read(&mut buf[filled..]) {
                Ok(n) => {
                    filled += n;
                    // Full, or close_notify received (then 0 once drained),
                    // or all there is: the socket's last read was short, so
                    // it has nothing more (edge-triggered polling reports
                    // what arrives later), and rustls has handed over all it
                    // decrypted (the buffer is not full).
                    if n == 0 || filled == buf.len() || drained {
                        return Ok(filled);
                    }
                }
                // Nothing decrypted, and the socket has nothing more: not
                // ready (without a read that would only say so).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained => {
                    return match filled {
                        0 => Err(e),
                        _ => Ok(filled),
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP EOF without close_notify: an ordinary close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(filled),
                Err(e) => return Err(e),
            }
            let mut sock = Drained {
                sock: &mut self.sock,
                drained: false,
            };
            let read = self.conn.read_tls(&mut sock);
            drained = sock.drained;
            match read {
                Ok(0) => {
                    if self.conn.is_handshaking() && self.received {
                        return Err(self.fail(
                            Failure::Truncated,
                            "the client closed the connection in the middle of the handshake"
                                .to_string(),
                        ));
                    }
                    // EOF: process what came with it; the reader then
                    // reports the end.
                    self.process()?;
                }
                Ok(_) => {
                    self.received = true;
                    self.process()?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && filled > 0 => return Ok(filled),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The socket, noting whether a read came back short of the buffer
/// rustls offered: the kernel had no more bytes then.
struct Drained<'a> {
    sock: &'a mut Stream,
    drained: bool,
}

impl Read for Drained<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.drained = n < buf.len();
        Ok(n)
    }
}

impl Write for TlsStream {
    #[inline(never)]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.raw {
            return self.sock.write(buf);
        }
        // Earlier records first: no more plaintext while they wait.
        if !self.send_pending()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(buf)?;
        self.send_pending()?;
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for TlsStream {
    fn drop(&mut self) {
        if self.raw {
            return;
        }
        if self.facts.is_none() && self.received && !self.failed {
            self.counters[FAILURES + Failure::Incomplete as usize].add(1);
        }
        if self.facts.is_some() {
            // Best effort: the socket is non-blocking and about to close.
            self.conn.send_close_notify();
            let _ = self.send_pending();
        }
    }
}

/// Fills the TLS facts of a plugin's view of the connection.
#[inline]
pub fn describe(tls: &TlsStream, raw: &mut nbnet_plugin_api::abi::RawConnection) {
    raw.flags |= nbnet_plugin_api::abi::NBNET_CONN_TLS;
    if let Some(facts) = tls.facts() {
        raw.tls_version = facts.version;
        if let Some(subject) = &facts.subject {
            raw.tls_subject = subject.as_ptr();
        }
        if let Some(sans) = &facts.sans {
            raw.tls_sans = sans.as_ptr();
        }
    }
}
