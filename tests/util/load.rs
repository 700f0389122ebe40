//! Persistent clients under load, shared by the lifecycle tests (hand-over,
//! binary upgrade): clients that stay connected and keep sending, every
//! payload unique, every answer checked, every closed connection recorded.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::{frame, Server};

/// What the clients of a [`Load`] saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub answered: u64,
    /// Connections that ended (EOF, reset, timeout) while the load ran.
    pub closed: Vec<String>,
    /// Answers that were neither the request upper-cased nor echoed.
    pub mismatched: Vec<String>,
    /// Which logic answered: "upper", "echo".
    pub forms: BTreeSet<&'static str>,
}

/// Clients that stay connected and keep sending until stopped: `depth1`
/// of them one request at a time, `pipelined` of them `depth` at a time.
/// Every payload is unique and every answer is checked.
pub struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, depth1: usize, pipelined: usize, depth: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut threads = Vec::new();
        for i in 0..depth1 + pipelined {
            let depth = if i < depth1 { 1 } else { depth };
            let (stop, seen) = (stop.clone(), seen.clone());
            let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            threads.push(thread::spawn(move || {
                client_loop(i, depth, stream, &stop, &seen)
            }));
        }
        Load {
            stop,
            seen,
            threads,
        }
    }

    pub fn answered(&self) -> u64 {
        self.seen.lock().unwrap().answered
    }

    pub fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

fn client_loop(
    i: usize,
    depth: usize,
    mut stream: TcpStream,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let payloads: Vec<String> = (0..depth)
            .map(|k| format!("client{i}-request{}", seq + k as u64))
            .collect();
        seq += depth as u64;
        let mut out = Vec::new();
        for p in &payloads {
            out.extend_from_slice(&frame(p.as_bytes()));
        }
        if let Err(e) = stream.write_all(&out) {
            seen.lock()
                .unwrap()
                .closed
                .push(format!("client {i}: write: {e}"));
            return;
        }
        for p in &payloads {
            match read_frame(&mut stream) {
                Ok(answer) => {
                    let mut seen = seen.lock().unwrap();
                    seen.answered += 1;
                    if answer == p.as_bytes() {
                        seen.forms.insert("echo");
                    } else if answer == p.to_ascii_uppercase().as_bytes() {
                        seen.forms.insert("upper");
                    } else {
                        seen.mismatched.push(format!(
                            "client {i}: {p} answered {}",
                            String::from_utf8_lossy(&answer)
                        ));
                    }
                }
                Err(e) => {
                    seen.lock()
                        .unwrap()
                        .closed
                        .push(format!("client {i} after {p}: {e}"));
                    return;
                }
            }
        }
    }
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 10];
    stream.read_exact(&mut header)?;
    let len: usize = std::str::from_utf8(&header)
        .ok()
        .and_then(|h| h.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad header"))?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Waits until `needle` has appeared `n` times in the log.
pub fn wait_for_count(server: &Server, needle: &str, n: usize) {
    server.wait_for(&format!("{n} log lines with {needle:?}"), || {
        (server.log_count(needle) >= n).then_some(())
    });
}

/// Waits until the clients have had `more` answers beyond what they had.
pub fn wait_for_progress(server: &Server, load: &Load, more: u64) {
    let target = load.answered() + more;
    server.wait_for("the clients to make progress", || {
        (load.answered() >= target).then_some(())
    });
}

pub fn assert_nothing_lost(seen: &Seen, server: &Server) {
    assert!(
        seen.closed.is_empty(),
        "connections were closed: {:?}\n{}",
        seen.closed,
        server.log()
    );
    assert!(
        seen.mismatched.is_empty(),
        "wrong answers: {:?}",
        &seen.mismatched[..seen.mismatched.len().min(5)]
    );
}
