//! `tokio-peer`: the comparison peer for `benches/compare.sh`.
//!
//! A strong, idiomatic tokio server for nbnet's protocol (10-digit ASCII
//! length header + payload), answering every request with its ASCII
//! upper-case, as nbnet's `upper` plugin does. Fair to tokio: release build,
//! `TCP_NODELAY`, one reused read buffer per connection, every complete frame
//! of a read processed, all responses of a read written with one `write_all`,
//! the upper-casing inline into the output buffer (no intermediate copy).
//!
//! ```text
//! tokio-peer [--addr 127.0.0.1:9001] [--threads N] [--echo] [--tls-cert PEM --tls-key PEM]
//! ```
//! With `--tls-cert`/`--tls-key` it speaks TLS through tokio-rustls (rustls
//! with the ring provider, as nbnet; session resumption on: rustls'
//! default ticketer and in-memory session cache, as nbnet configures).
//! `--threads 1` (the default) runs a current-thread runtime; more runs the
//! multi-thread runtime with N workers.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const HEADER_LEN: usize = 10;
const MAX_FRAME: usize = 16 * 1024 * 1024;

struct Args {
    addr: SocketAddr,
    threads: usize,
    echo: bool,
    tls: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:9001".parse().expect("valid default"),
        threads: 1,
        echo: false,
        tls: None,
    };
    let (mut cert, mut key) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--addr" => {
                let v = it.next().ok_or("--addr needs IP:PORT")?;
                args.addr = v.parse().map_err(|_| format!("bad --addr {v:?}"))?;
            }
            "--threads" => {
                let v = it.next().ok_or("--threads needs N")?;
                args.threads = v.parse().map_err(|_| format!("bad --threads {v:?}"))?;
            }
            "--echo" => args.echo = true,
            "--tls-cert" => cert = Some(it.next().ok_or("--tls-cert needs FILE")?),
            "--tls-key" => key = Some(it.next().ok_or("--tls-key needs FILE")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: tokio-peer [--addr IP:PORT] [--threads N] [--echo]"
                ))
            }
        }
    }
    args.tls = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    if args.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tokio-peer: {e}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_io()
            .build()
    }
    .expect("build the tokio runtime");
    let tls = match &args.tls {
        None => None,
        Some((cert, key)) => match tls_acceptor(cert, key) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("tokio-peer: {e}");
                std::process::exit(2);
            }
        },
    };
    runtime.block_on(serve(args.addr, args.echo, tls));
}

/// A TLS acceptor like nbnet's listener: ring provider, TLS 1.2 and 1.3,
/// no client authentication, resumption (tickets and session ids) on.
/// (ring's provider is deprecated in rustls 0.23.48 for lacking
/// post-quantum key exchange; nbnet uses the same one.)
#[allow(deprecated)]
fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn serve(addr: SocketAddr, echo: bool, tls: Option<tokio_rustls::TlsAcceptor>) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tokio-peer: cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("tokio-peer: listening on {addr}");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                match &tls {
                    None => {
                        tokio::spawn(connection(stream, echo));
                    }
                    Some(acceptor) => {
                        let accept = acceptor.accept(stream);
                        tokio::spawn(async move {
                            if let Ok(stream) = accept.await {
                                connection(stream, echo).await;
                            }
                        });
                    }
                }
            }
            Err(e) => eprintln!("tokio-peer: accept: {e}"),
        }
    }
}

/// Parses the 10-digit header at the front of `buf` (which holds at least 10 bytes).
fn header(buf: &[u8]) -> Option<usize> {
    let mut n = 0usize;
    for &b in &buf[..HEADER_LEN] {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + usize::from(b - b'0');
    }
    (n > 0 && n <= MAX_FRAME).then_some(n)
}

fn write_header(len: usize, out: &mut Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    let mut n = len;
    for d in h.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&h);
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, echo: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        if end == buf.len() {
            if start > 0 {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            } else {
                let grown = buf.len() * 2;
                buf.resize(grown, 0);
            }
        }
        let n = match stream.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        end += n;
        // Every complete frame of this read.
        while end - start >= HEADER_LEN {
            let Some(len) = header(&buf[start..]) else {
                return; // protocol error: close
            };
            let total = HEADER_LEN + len;
            if end - start < total {
                if total > buf.len() {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                    buf.resize(total, 0);
                }
                break;
            }
            let payload = &buf[start + HEADER_LEN..start + total];
            write_header(len, &mut out);
            if echo {
                out.extend_from_slice(payload);
            } else {
                out.extend(payload.iter().map(u8::to_ascii_uppercase));
            }
            start += total;
        }
        if start == end {
            start = 0;
            end = 0;
        }
        if !out.is_empty() {
            // (flush: a TLS stream sends its records only then.)
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
