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
//! tokio-peer [--addr 127.0.0.1:9001] [--threads N] [--echo]
//! ```
//! `--threads 1` (the default) runs a current-thread runtime; more runs the
//! multi-thread runtime with N workers.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HEADER_LEN: usize = 10;
const MAX_FRAME: usize = 16 * 1024 * 1024;

struct Args {
    addr: SocketAddr,
    threads: usize,
    echo: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:9001".parse().expect("valid default"),
        threads: 1,
        echo: false,
    };
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
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: tokio-peer [--addr IP:PORT] [--threads N] [--echo]"
                ))
            }
        }
    }
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
    runtime.block_on(serve(args.addr, args.echo));
}

async fn serve(addr: SocketAddr, echo: bool) {
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
                tokio::spawn(connection(stream, echo));
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

async fn connection(mut stream: TcpStream, echo: bool) {
    let _ = stream.set_nodelay(true);
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
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}
