//! The admin listener: a minimal HTTP/1.x server in the master's own loop,
//! for `GET /metrics` (Prometheus text) and `GET /healthz` (load-balancer
//! checks).
//!
//! The master serves it itself, single-threaded, from the same `Poll` as its
//! signals: the numbers come from the scoreboard, so serving them costs the
//! workers nothing. Each request is answered once and the connection closed
//! (`Connection: close`); requests are small and bounded, slow clients time out.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// An admin client that has not sent its request (or read the answer) by
/// then is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the master answers for a path.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

struct Client {
    stream: TcpStream,
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
}

impl Admin {
    /// Binds `addr` and registers it under `Token(base)`; clients get the
    /// tokens above.
    pub fn bind(addr: SocketAddr, registry: &Registry, base: usize) -> io::Result<Admin> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, Token(base), Interest::READABLE)?;
        Ok(Admin {
            listener,
            addr,
            clients: Slab::new(),
            base,
        })
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
            Ok(true) | Err(_) => self.drop_client(key, registry),
        }
    }

    /// Drops clients that have been around longer than [`CLIENT_TIMEOUT`].
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
                Ok((mut stream, _)) => {
                    let entry = self.clients.vacant_entry();
                    let token = Token(self.base + 1 + entry.key());
                    if registry
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            request: Vec::new(),
                            response: Vec::new(),
                            written: 0,
                            deadline: Instant::now() + CLIENT_TIMEOUT,
                        });
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

    fn drop_client(&mut self, key: usize, registry: &Registry) {
        let mut client = self.clients.remove(key);
        let _ = registry.deregister(&mut client.stream);
    }
}

/// Reads the request head, answers it, writes the answer. `Ok(true)` when
/// the client is done (answered, or gone).
fn serve(client: &mut Client, answer: &mut dyn FnMut(&str, &str) -> Reply) -> io::Result<bool> {
    if client.response.is_empty() {
        let mut chunk = [0u8; 2048];
        loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => client.request.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if client.request.len() > MAX_REQUEST {
                break;
            }
        }
        let Some(head) = complete_head(&client.request) else {
            if client.request.len() > MAX_REQUEST {
                client.response = http(431, "text/plain", "request head too large\n");
            } else {
                return Ok(false);
            }
            return write_out(client);
        };
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let reply = answer(method, path);
        client.response = http(reply.status, reply.content_type, &reply.body);
    }
    write_out(client)
}

fn write_out(client: &mut Client) -> io::Result<bool> {
    while client.written < client.response.len() {
        match client.stream.write(&client.response[client.written..]) {
            Ok(0) => return Ok(true),
            Ok(n) => client.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The request line, once the whole head (ending in a blank line) is in.
fn complete_head(request: &[u8]) -> Option<&str> {
    let end = request.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&request[..end]).ok()?;
    head.lines().next()
}

fn http(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_is_read_once_the_head_is_complete() {
        assert_eq!(complete_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            complete_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("GET /metrics HTTP/1.1")
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
