//! The admin listener: a minimal HTTP/1.x server in the master's own loop,
//! for `GET /metrics` (Prometheus text) and `GET /healthz` (load-balancer
//! checks).
//!
//! The master serves it itself, single-threaded, from the same `Poll` as its
//! signals: the numbers come from the scoreboard, so serving them costs the
//! workers nothing. Each request is answered once and the connection closed
//! (`Connection: close`); requests are small and bounded, slow clients time out.
//!
//! Nothing a client sends can make the master hold much or wait: at most
//! [`MAX_CLIENTS`] clients of at most [`MAX_HEAD`] bytes of request each; a
//! malformed request is answered `400` at once, an oversized one `431`
//! (`414` for the request line) before anything more is read; and after an
//! answer the master shuts its side and drops what the client still sends,
//! so that the answer is not lost to a reset. Requests are parsed with
//! `httparse`; the query string is ignored (Prometheus may send `params:`),
//! `HEAD` is answered like `GET` without the body, and other methods get
//! `405` with `Allow: GET, HEAD`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Largest request head (request line and header fields) read: past it
/// the answer is 431 (or 414 for a request line alone that long).
const MAX_HEAD: usize = 8 * 1024;
/// Admin clients served at once. One more replaces the oldest (an answered
/// one first), so idle connections cannot lock health checks out.
const MAX_CLIENTS: usize = 64;
/// An admin client that has not sent its request (or read the answer) by
/// then is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the answer: how long, and how many bytes, what the client still
/// sends (a body, the rest of an oversized head) is read and dropped
/// before closing. Closing with unread data would make the kernel reset
/// the connection, and a reset can destroy the answer before the client
/// reads it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;
/// Quiet time after a "too many admin clients" warning.
const CROWD_LOG_INTERVAL: Duration = Duration::from_secs(10);
const TEXT: &str = "text/plain; charset=utf-8";

/// Binds the admin address (non-blocking, `SO_REUSEADDR`), without serving it yet.
pub fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the master answers for a path.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

/// Where an admin client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the request head (at most [`MAX_HEAD`] bytes).
    Reading,
    /// Writing the answer.
    Writing,
    /// Answered and our side shut: dropping what the client still sends
    /// until it closes (see [`LINGER`]).
    Lingering {
        /// Bytes dropped so far.
        drained: usize,
    },
}

struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    /// Accept order: the oldest client gives way to a new one.
    seq: u64,
    phase: Phase,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
    deadline: Instant,
}

/// The admin listener and its clients.
pub struct Admin {
    listener: TcpListener,
    addr: SocketAddr,
    clients: Slab<Client>,
    /// Token of the listener; clients use the tokens after it.
    base: usize,
    next_seq: u64,
    /// When the last "too many admin clients" warning was logged.
    crowd_warned: Option<Instant>,
}

impl Admin {
    /// Binds `addr` and registers it under `Token(base)`; clients get the
    /// tokens above.
    pub fn bind(addr: SocketAddr, registry: &Registry, base: usize) -> io::Result<Admin> {
        Admin::from_std(bind_std(addr)?, registry, base)
    }

    /// Serves a socket bound by [`bind_std`] (a reload binds the new
    /// address first, and serves it once the reload is complete).
    pub fn from_std(
        listener: std::net::TcpListener,
        registry: &Registry,
        base: usize,
    ) -> io::Result<Admin> {
        Admin::from_listener(TcpListener::from_std(listener), registry, base)
    }

    /// Serves a listening socket bound elsewhere (passed by an older
    /// master during a binary upgrade).
    pub fn from_listener(
        mut listener: TcpListener,
        registry: &Registry,
        base: usize,
    ) -> io::Result<Admin> {
        let addr = listener.local_addr()?;
        registry.register(&mut listener, Token(base), Interest::READABLE)?;
        Ok(Admin {
            listener,
            addr,
            clients: Slab::with_capacity(MAX_CLIENTS),
            base,
            next_seq: 0,
            crowd_warned: None,
        })
    }

    /// Listens on `listener` (bound by [`bind_std`]) instead: a reload
    /// moved `[admin] addr`. Clients of the old socket are still answered;
    /// the old socket closes.
    pub fn replace_listener(
        &mut self,
        listener: std::net::TcpListener,
        registry: &Registry,
    ) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let mut listener = TcpListener::from_std(listener);
        registry.register(&mut listener, Token(self.base), Interest::READABLE)?;
        let mut old = std::mem::replace(&mut self.listener, listener);
        let _ = registry.deregister(&mut old);
        self.addr = addr;
        Ok(())
    }

    /// The listening socket's descriptor (passed on in a binary upgrade).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Stops watching the listener (its clients are dropped with it).
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether `token` belongs to the admin listener or its clients.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.base
    }

    /// Handles an event for one of the admin tokens; `answer` maps a
    /// method and path to the reply.
    pub fn on_event(
        &mut self,
        token: Token,
        registry: &Registry,
        answer: &mut dyn FnMut(&str, &str) -> Reply,
    ) {
        if token.0 == self.base {
            self.accept(registry);
            return;
        }
        let key = token.0 - self.base - 1;
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        match serve(client, answer) {
            Ok(false) => {}
            Ok(true) => self.drop_client(key, registry),
            Err(e) => {
                tracing::debug!("admin client {}: {e}", client.peer);
                self.drop_client(key, registry);
            }
        }
    }

    /// Drops clients whose deadline has passed ([`CLIENT_TIMEOUT`] to send
    /// a request and read the answer, [`LINGER`] after it).
    pub fn expire(&mut self, now: Instant, registry: &Registry) {
        let stale: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in stale {
            self.drop_client(key, registry);
        }
    }

    /// The earliest client deadline, for the master's poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.iter().map(|(_, c)| c.deadline).min()
    }

    fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        self.make_room(registry, peer);
                    }
                    let entry = self.clients.vacant_entry();
                    let token = Token(self.base + 1 + entry.key());
                    if registry
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            peer,
                            seq: self.next_seq,
                            phase: Phase::Reading,
                            request: Vec::new(),
                            response: Vec::new(),
                            written: 0,
                            deadline: Instant::now() + CLIENT_TIMEOUT,
                        });
                        self.next_seq += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("admin accept on {}: {e}", self.addr);
                    return;
                }
            }
        }
    }

    /// [`MAX_CLIENTS`] are connected and `newcomer` arrives: drops an
    /// answered client if there is one, else the one connected longest
    /// (telling it 503 if it has not been answered).
    fn make_room(&mut self, registry: &Registry, newcomer: SocketAddr) {
        let oldest = self
            .clients
            .iter()
            .min_by_key(|(_, c)| (!matches!(c.phase, Phase::Lingering { .. }), c.seq))
            .map(|(key, _)| key);
        let Some(key) = oldest else {
            return;
        };
        let client = &mut self.clients[key];
        let peer = client.peer;
        if client.phase == Phase::Reading {
            // Best effort: a 503 fits any socket buffer; no waiting for it.
            let _ = client.stream.write(&http(
                503,
                TEXT,
                "too many admin clients at once; try again\n",
            ));
        }
        self.drop_client(key, registry);
        let now = Instant::now();
        if self
            .crowd_warned
            .is_none_or(|last| now.duration_since(last) >= CROWD_LOG_INTERVAL)
        {
            self.crowd_warned = Some(now);
            tracing::warn!(
                "admin {}: more than {MAX_CLIENTS} clients at once; closing the oldest ({peer}) for {newcomer} (said once per {CROWD_LOG_INTERVAL:?})",
                self.addr
            );
        } else {
            tracing::debug!("admin {}: closed {peer} for {newcomer}", self.addr);
        }
    }

    fn drop_client(&mut self, key: usize, registry: &Registry) {
        let mut client = self.clients.remove(key);
        let _ = registry.deregister(&mut client.stream);
    }
}

/// Moves a client along: reads its request head, answers it, writes the
/// answer, then drops what it still sends. `Ok(true)` when the client is
/// done (answered and closed its side, or gone).
fn serve(client: &mut Client, answer: &mut dyn FnMut(&str, &str) -> Reply) -> io::Result<bool> {
    if client.phase == Phase::Reading {
        match read_request(client, answer)? {
            None => return Ok(false),
            Some(None) => return Ok(true),
            Some(Some(response)) => {
                client.response = response;
                client.request = Vec::new();
                client.phase = Phase::Writing;
            }
        }
    }
    if client.phase == Phase::Writing {
        if !write_out(client)? {
            return Ok(false);
        }
        // The whole answer is with the kernel: end our side (a FIN after
        // the answer), and read what the client still sends until it
        // closes, so that closing does not reset the connection.
        let _ = client.stream.shutdown(Shutdown::Write);
        client.response = Vec::new();
        client.phase = Phase::Lingering { drained: 0 };
        client.deadline = Instant::now() + LINGER;
    }
    linger(client)
}

/// Reads the request head, at most [`MAX_HEAD`] bytes of it. `None` while
/// it is incomplete; `Some(None)` when the client left without sending
/// anything; `Some(Some(response))` once there is something to answer.
fn read_request(
    client: &mut Client,
    answer: &mut dyn FnMut(&str, &str) -> Reply,
) -> io::Result<Option<Option<Vec<u8>>>> {
    let mut chunk = [0u8; 2048];
    loop {
        let room = (MAX_HEAD - client.request.len()).min(chunk.len());
        let eof = match client.stream.read(&mut chunk[..room]) {
            // (Also when `room` is 0: then the head is complete or too
            // large, and the answer comes below.)
            Ok(0) => room > 0,
            Ok(n) => {
                client.request.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if eof && client.request.is_empty() {
            return Ok(Some(None));
        }
        if let Some(response) = response_for(&client.request, eof, answer) {
            return Ok(Some(Some(response)));
        }
    }
}

/// The response to a request head so far, or `None` to wait for more:
/// 400 for a malformed one (or one cut short by the client's EOF), 414 or
/// 431 for one that does not fit in [`MAX_HEAD`].
fn response_for(
    request: &[u8],
    eof: bool,
    answer: &mut dyn FnMut(&str, &str) -> Reply,
) -> Option<Vec<u8>> {
    match parse_head(request) {
        Head::Complete { method, target } => Some(respond(method, target, answer)),
        Head::Bad(why) => Some(http(400, TEXT, &format!("bad request: {why}\n"))),
        Head::Incomplete { request_line } if request.len() >= MAX_HEAD => {
            Some(match request_line {
                false => http(414, TEXT, &format!("request line over {MAX_HEAD} bytes\n")),
                true => http(431, TEXT, &format!("request head over {MAX_HEAD} bytes\n")),
            })
        }
        Head::Incomplete { .. } if eof => Some(http(
            400,
            TEXT,
            "bad request: the connection ended inside the request head\n",
        )),
        Head::Incomplete { .. } => None,
    }
}

/// Drops what a client sends after its answer; `Ok(true)` once it has
/// closed (or sent more than [`LINGER_BYTES`]).
fn linger(client: &mut Client) -> io::Result<bool> {
    let Phase::Lingering { drained } = &mut client.phase else {
        return Ok(false);
    };
    let mut chunk = [0u8; 4096];
    loop {
        match client.stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                *drained += n;
                if *drained > LINGER_BYTES {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_out(client: &mut Client) -> io::Result<bool> {
    while client.written < client.response.len() {
        match client.stream.write(&client.response[client.written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => client.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// What the bytes of a request head received so far say.
#[derive(Debug, PartialEq, Eq)]
enum Head<'a> {
    /// Not complete yet; `request_line`: whether the request line is.
    Incomplete { request_line: bool },
    /// A complete, well-formed head.
    Complete { method: &'a str, target: &'a str },
    /// Malformed (answered 400): why.
    Bad(&'static str),
}

/// Header fields a request may have; more is answered 431.
const MAX_FIELDS: usize = 64;

/// Parses an HTTP/1.x request head with `httparse` (RFC 9112; lines may
/// end in a lone LF, and an empty line before the request line is skipped,
/// as §2.2 allows for one). A malformed head is refused as soon as its first bad
/// byte is in.
fn parse_head(buf: &[u8]) -> Head<'_> {
    // One empty line before the request line is tolerated; httparse would
    // wait through any number of them.
    let rest = buf
        .strip_prefix(b"\r\n")
        .or_else(|| buf.strip_prefix(b"\n"))
        .unwrap_or(buf);
    if rest.starts_with(b"\n") || rest.starts_with(b"\r\n") {
        return Head::Bad("an empty request line");
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => match (request.method, request.path) {
            (Some(method), Some(target)) => Head::Complete { method, target },
            _ => Head::Bad("an incomplete request line"),
        },
        Ok(httparse::Status::Partial) => Head::Incomplete {
            request_line: request.version.is_some(),
        },
        Err(e) => Head::Bad(match e {
            httparse::Error::HeaderName => "a header field name that is not a token",
            httparse::Error::HeaderValue => "a control character in a header field value",
            httparse::Error::NewLine => "a CR not followed by LF",
            httparse::Error::Token => "the method or target is not valid in a request line",
            httparse::Error::TooManyHeaders => "more than 64 header fields",
            httparse::Error::Version => "the version is not HTTP/1.x",
            httparse::Error::Status => "a status line instead of a request line",
        }),
    }
}

/// The path of a request target: without its query string (Prometheus'
/// `params:` adds one) or fragment.
fn path_of(target: &str) -> &str {
    target
        .split_once(['?', '#'])
        .map_or(target, |(path, _)| path)
}

/// The answer to `method target`: `GET` and `HEAD` (the same without its
/// body) go to `answer` with the path alone; any other method is `405`.
fn respond(method: &str, target: &str, answer: &mut dyn FnMut(&str, &str) -> Reply) -> Vec<u8> {
    let path = path_of(target);
    match method {
        "GET" | "HEAD" => {
            let reply = answer("GET", path);
            let mut response = http(reply.status, reply.content_type, &reply.body);
            if method == "HEAD" {
                response.truncate(response.len() - reply.body.len());
            }
            response
        }
        _ => http_with(
            405,
            TEXT,
            &format!("{method} is not served here: only GET and HEAD\n"),
            "Allow: GET, HEAD\r\n",
        ),
    }
}

fn http(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    http_with(status, content_type, body, "")
}

/// A response with `extra` header lines (each ending in CRLF).
fn http_with(status: u16, content_type: &str, body: &str, extra: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete<'a>(method: &'a str, target: &'a str) -> Head<'a> {
        Head::Complete { method, target }
    }

    #[test]
    fn a_head_is_complete_at_its_blank_line_with_crlf_or_lf_line_ends() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Head::Incomplete { request_line: true }
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            complete("GET", "/metrics")
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\n\n"),
            complete("GET", "/metrics")
        );
        assert_eq!(
            parse_head(b"GET /healthz HTTP/1.0\nHost: x\r\nAccept:*/*\n\r\n"),
            complete("GET", "/healthz")
        );
        // One empty line before the request line is ignored (RFC 9112 §2.2).
        assert_eq!(
            parse_head(b"\r\nGET / HTTP/1.1\r\n\r\n"),
            complete("GET", "/")
        );
        assert_eq!(
            parse_head(b"GET / HT"),
            Head::Incomplete {
                request_line: false
            }
        );
        assert_eq!(
            parse_head(b"\r\n"),
            Head::Incomplete {
                request_line: false
            }
        );
        // Header values may carry obs-text.
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nX: caf\xc3\xa9 \xff\r\n\r\n"),
            complete("GET", "/")
        );
    }

    #[test]
    fn malformed_heads_are_refused_as_soon_as_they_are_seen() {
        for head in [
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n".as_slice(),
            // Before the line is even complete.
            b"GET /\x00",
            b"GET\r/ HTTP/1.1\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x01\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head), Head::Bad(_)),
                "{:?} parsed as {:?}",
                head.escape_ascii().to_string(),
                parse_head(head)
            );
        }
        assert_eq!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n"),
            Head::Bad("the version is not HTTP/1.x")
        );
    }

    #[test]
    fn the_query_string_is_ignored_head_has_no_body_and_other_methods_get_405_with_allow() {
        let mut seen = Vec::new();
        let mut answer = |method: &str, path: &str| {
            seen.push(format!("{method} {path}"));
            Reply {
                status: 200,
                content_type: TEXT,
                body: "ok\n".to_string(),
            }
        };
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
        let get = text(respond("GET", "/metrics?x=1&y=%20", &mut answer));
        assert!(
            get.starts_with("HTTP/1.1 200 OK\r\n") && get.ends_with("\r\n\r\nok\n"),
            "{get}"
        );
        let head = text(respond("HEAD", "/healthz#top", &mut answer));
        assert!(
            head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let post = text(respond("POST", "/metrics", &mut answer));
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
        assert_eq!(seen, ["GET /metrics", "GET /healthz"]);
    }

    #[test]
    fn oversized_heads_get_414_or_431_and_a_cut_head_400() {
        let mut answer = |_: &str, _: &str| -> Reply { unreachable!("nothing to answer") };
        let status = |response: Option<Vec<u8>>| {
            String::from_utf8(response.expect("a response")).unwrap()[9..12].to_string()
        };
        let long_line = [b"GET /".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert_eq!(
            status(response_for(&long_line[..MAX_HEAD], false, &mut answer)),
            "414"
        );
        let long_head = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert_eq!(
            status(response_for(&long_head[..MAX_HEAD], false, &mut answer)),
            "431"
        );
        assert_eq!(
            response_for(b"GET / HTTP/1.1\r\n", false, &mut answer),
            None
        );
        assert_eq!(
            status(response_for(b"GET / HTTP/1.1\r\n", true, &mut answer)),
            "400"
        );
    }

    #[test]
    fn responses_carry_length_and_close() {
        let text = String::from_utf8(http(503, "text/plain", "stopping\n")).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 9\r\n"), "{text}");
        assert!(
            text.ends_with("Connection: close\r\n\r\nstopping\n"),
            "{text}"
        );
    }
}
