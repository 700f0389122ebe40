//! `nbnet send`: frame one request, print the response payload.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::codec::{encode, FrameReader, MAX_DECLARED};
use crate::errln;
use crate::exit_code;

/// Sends `payload` to `addr`, prints the answer; returns the exit code.
/// With `tls`, over TLS.
pub fn send(
    addr: &str,
    payload: &[u8],
    timeout: Duration,
    tls: Option<&crate::tls::ClientOptions>,
) -> i32 {
    match round_trip(addr, payload, timeout, tls) {
        Ok(response) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(&response)
                .and_then(|()| stdout.write_all(b"\n"))
                .and_then(|()| stdout.flush())
            {
                Ok(()) => exit_code::OK,
                Err(e) => crate::output::failed(&e),
            }
        }
        Err(message) => {
            errln!("nbnet send: {message}");
            exit_code::FAILURE
        }
    }
}

/// The addresses `addr` (`HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`) names:
/// an IP address as is, a host name through the system resolver (as
/// `getaddrinfo` orders them). Never empty.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = addr.parse::<SocketAddr>() {
        return Ok(vec![ip]);
    }
    let form = "HOST:PORT, IP:PORT or unix:/path (for example 127.0.0.1:9000 or localhost:9000)";
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(format!("{addr:?} is not {form}")),
    }
    let found: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .collect();
    if found.is_empty() {
        return Err(format!("{addr:?} resolves to no address"));
    }
    Ok(found)
}

/// A connected stream to the server: TCP, or a Unix domain socket.
enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection {
    /// Connects to `addr`: `unix:/path`, or each address a host name
    /// resolves to in turn until one accepts (`localhost` may name `::1`
    /// first while the server listens on 127.0.0.1 only).
    fn open(addr: &str, timeout: Duration) -> Result<Connection, String> {
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("\"unix:\" needs a path, e.g. unix:/run/nbnet/nbnet.sock".into());
            }
            // std has no connect timeout for Unix sockets; a local connect
            // waits only while the server's accept queue is full.
            let stream = UnixStream::connect(Path::new(path))
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)))
                .map_err(|e| format!("{addr}: {e}"))?;
            return Ok(Connection::Unix(stream));
        }
        let mut failures = Vec::new();
        for target in resolve(addr)? {
            match TcpStream::connect_timeout(&target, timeout) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(timeout))
                        .and_then(|()| stream.set_write_timeout(Some(timeout)))
                        .map_err(|e| format!("{target}: {e}"))?;
                    return Ok(Connection::Tcp(stream));
                }
                Err(e) => failures.push(format!("{target}: {e}")),
            }
        }
        Err(format!(
            "cannot connect to {addr} ({})",
            failures.join("; ")
        ))
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn round_trip(
    addr: &str,
    payload: &[u8],
    timeout: Duration,
    tls: Option<&crate::tls::ClientOptions>,
) -> Result<Vec<u8>, String> {
    if payload.is_empty() {
        return Err("the payload is empty; the protocol has no zero-length requests".into());
    }
    let connection = Connection::open(addr, timeout)?;
    let target = addr;
    let mut stream: Box<dyn ReadWrite> = match tls {
        None => Box::new(connection),
        Some(options) => {
            let config = crate::tls::client_config(options)?;
            let name = crate::tls::server_name(options, addr)?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| format!("TLS to {target}: {e}"))?;
            Box::new(rustls::StreamOwned::new(conn, connection))
        }
    };
    let mut request = Vec::with_capacity(payload.len() + 10);
    encode(payload, &mut request);
    stream
        .write_all(&request)
        .map_err(|e| format!("sending to {target}: {e}"))?;
    let mut reader = FrameReader::new(MAX_DECLARED as usize);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(frame) = reader
            .next_frame()
            .map_err(|e| format!("bad response from {target}: {e}"))?
        {
            return Ok(frame);
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "{target} closed the connection without answering (see the server's log)"
                ))
            }
            Ok(n) => reader.push(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(format!("no answer from {target} within {timeout:?}"))
            }
            Err(e) => return Err(format!("reading from {target}: {e}")),
        }
    }
}

/// A plain or TLS stream.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14: `nbnet send localhost:9000 hi` was refused as "not IP:PORT".
    #[test]
    fn addresses_are_ips_or_host_names_with_a_port() {
        assert_eq!(
            resolve("127.0.0.1:9000"),
            Ok(vec!["127.0.0.1:9000".parse().unwrap()])
        );
        assert_eq!(
            resolve("[::1]:9000"),
            Ok(vec!["[::1]:9000".parse().unwrap()])
        );
        let local = resolve("localhost:9000").unwrap();
        assert!(local
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 9000));
        for bad in ["localhost", "localhost:", ":9000", "localhost:99999", ""] {
            let e = resolve(bad).unwrap_err();
            assert!(e.contains("is not HOST:PORT"), "{bad}: {e}");
        }
    }
}
