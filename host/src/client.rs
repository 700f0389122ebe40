//! `nbnet send`: frame one request, print the response payload.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

fn round_trip(
    addr: &str,
    payload: &[u8],
    timeout: Duration,
    tls: Option<&crate::tls::ClientOptions>,
) -> Result<Vec<u8>, String> {
    let target: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not IP:PORT (for example 127.0.0.1:9000)"))?;
    if payload.is_empty() {
        return Err("the payload is empty; the protocol has no zero-length requests".into());
    }
    let tcp = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("cannot connect to {target}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{target}: {e}"))?;
    let mut stream: Box<dyn ReadWrite> = match tls {
        None => Box::new(tcp),
        Some(options) => {
            let config = crate::tls::client_config(options)?;
            let name = crate::tls::server_name(options, addr)?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| format!("TLS to {target}: {e}"))?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
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
