//! nbnet behind a real load balancer: two nbnet masters on 127.0.0.1 behind
//! one HAProxy frontend in TCP mode with `send-proxy-v2`. Checks that load
//! spreads over both, that plugins see the original client's address (PROXY
//! protocol), and that stopping one nbnet gracefully loses no request that
//! HAProxy had routed to it.
//!
//! HAProxy comes from Debian's packages (`make test` and `.ci/run` install
//! it with tests/install-deps.sh). Without it this test fails and says how
//! to install it: a skipped test that reports `ok` would hide that it never
//! ran.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{build, free_port};

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{:010}", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// How a round trip ended.
enum Trip {
    Answer(String),
    /// The connection closed before any byte of the answer: the request was
    /// never read by a server, so it is safe to retry.
    ClosedBeforeAnswer,
    /// The connection closed after part of the answer: a cut frame.
    CutMidFrame(usize),
}

fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Trip {
    if stream.write_all(&frame(payload)).is_err() {
        return Trip::ClosedBeforeAnswer;
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if got.len() >= 10 {
            let len: usize = std::str::from_utf8(&got[..10]).unwrap().parse().unwrap();
            if got.len() >= 10 + len {
                return Trip::Answer(String::from_utf8_lossy(&got[10..10 + len]).into_owned());
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) if got.is_empty() => return Trip::ClosedBeforeAnswer,
            Ok(0) | Err(_) => return Trip::CutMidFrame(got.len()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One nbnet master serving the whoami plugin behind the PROXY protocol.
struct Nbnet {
    child: Child,
    port: u16,
    admin: u16,
    log: PathBuf,
}

impl Nbnet {
    /// Starts it on free ports; new ones if a port was taken meanwhile
    /// (another test's socket), twice at most.
    fn start(dir: &Path, name: &str, whoami: &Path) -> Nbnet {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut server = Nbnet::start_once(dir, name, whoami);
            match server.wait_healthy() {
                Ok(()) => return server,
                Err(why) if attempt < 3 && server.log().contains("in use") => {
                    let _ = server.child.kill();
                    let _ = server.child.wait();
                    eprintln!("{why}; trying other ports");
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn start_once(dir: &Path, name: &str, whoami: &Path) -> Nbnet {
        let (port, admin) = (free_port(), free_port());
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[server]
workers = 2
shutdown_timeout = "10s"

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "whoami"
path = "{}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "whoami"
proxy_protocol = true
"#,
                whoami.display()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(&build().nbnet)
            .env(nbnet_tests::ALLOW_ROOT.0, nbnet_tests::ALLOW_ROOT.1)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start nbnet");
        Nbnet {
            child,
            port,
            admin,
            log,
        }
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nbnet on {} exited ({status}):\n{}",
                    self.port,
                    self.log()
                ));
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.admin)) {
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let mut text = String::new();
                let _ = s.read_to_string(&mut text);
                if text.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "nbnet on {} never became healthy:\n{}",
            self.port,
            self.log()
        ))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn worker_pids(&self) -> Vec<String> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Nbnet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Haproxy {
    child: Child,
    port: u16,
}

impl Haproxy {
    /// Starts it on a free port; another if that one was taken meanwhile,
    /// twice at most.
    fn start(binary: &Path, dir: &Path, backends: &[&Nbnet]) -> Haproxy {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Haproxy::start_once(binary, dir, backends) {
                Ok(haproxy) => return haproxy,
                Err(why) if attempt < 3 => eprintln!("{why}; trying another port"),
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn start_once(binary: &Path, dir: &Path, backends: &[&Nbnet]) -> Result<Haproxy, String> {
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!(
                    "    server nb{i} 127.0.0.1:{} send-proxy-v2 check port {} inter 200ms fall 1 rise 1\n",
                    b.port, b.admin
                )
            })
            .collect();
        let config = dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    retries 3\n    option redispatch\nfrontend front\n    bind 127.0.0.1:{port}\n    default_backend nbnet\nbackend nbnet\n    balance roundrobin\n    option httpchk GET /healthz\n{servers}"
            ),
        )
        .unwrap();
        let log = dir.join("haproxy.log");
        let mut child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "haproxy did not listen on {port}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Haproxy { child, port })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_nbnets_behind_haproxy_share_load_see_clients_and_lose_nothing_on_a_graceful_stop() {
    let Some(binary) = nbnet_tests::require_program("haproxy", "haproxy") else {
        return;
    };
    let artifacts = build();
    let dir = tempfile::tempdir().unwrap();
    let whoami = dir.path().join("libwhoami.so");
    let cc = Command::new("cc")
        .args([
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-I",
        ])
        .arg(nbnet_tests::workspace_root().join("plugin-api/include"))
        .arg("-o")
        .arg(&whoami)
        .arg(nbnet_tests::workspace_root().join("plugins/testing/c/whoami.c"))
        .status()
        .expect("run cc");
    assert!(cc.success(), "building whoami.c failed");
    let _ = artifacts;

    let a = Nbnet::start(dir.path(), "a", &whoami);
    let b = Nbnet::start(dir.path(), "b", &whoami);
    let proxy = Haproxy::start(&binary, dir.path(), &[&a, &b]);

    // 1. Load spreads over both nbnets, and each sees the real client.
    let (pids_a, pids_b) = (a.worker_pids(), b.worker_pids());
    let (mut on_a, mut on_b) = (0, 0);
    for i in 0..40 {
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let client: SocketAddr = stream.local_addr().unwrap();
        let Trip::Answer(answer) = round_trip(&mut stream, format!("hello {i}").as_bytes()) else {
            panic!(
                "no answer through haproxy\n--- a ---\n{}\n--- b ---\n{}",
                a.log(),
                b.log()
            );
        };
        let mut words = answer.split(' ');
        let (pid, peer) = (words.next().unwrap(), words.next().unwrap());
        assert_eq!(
            peer,
            client.to_string(),
            "the plugin must see the client's own address (PROXY v2), not haproxy's"
        );
        if pids_a.iter().any(|p| p == pid) {
            on_a += 1;
        } else if pids_b.iter().any(|p| p == pid) {
            on_b += 1;
        } else {
            panic!("answer from unknown pid {pid}: {answer}");
        }
    }
    println!("connections served: nbnet a {on_a}, nbnet b {on_b}");
    assert!(
        on_a > 0 && on_b > 0,
        "load did not spread: a {on_a}, b {on_b}"
    );

    // 2. Stop nbnet a gracefully while clients keep sending through haproxy.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (stop, answered, retried, failures) = (
                stop.clone(),
                answered.clone(),
                retried.clone(),
                failures.clone(),
            );
            let port = proxy.port;
            thread::spawn(move || {
                let connect = || {
                    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to haproxy");
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s
                };
                let mut stream = connect();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let payload = format!("client {c} request {n}");
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        match round_trip(&mut stream, payload.as_bytes()) {
                            Trip::Answer(_) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            // Never read by a server: retry on a new connection.
                            Trip::ClosedBeforeAnswer if attempts < 5 => {
                                retried.fetch_add(1, Ordering::Relaxed);
                                stream = connect();
                            }
                            other => {
                                let why = match other {
                                    Trip::CutMidFrame(bytes) => {
                                        format!("cut after {bytes} byte(s) of the answer")
                                    }
                                    _ => "closed before any answer, 5 times".to_string(),
                                };
                                failures.lock().unwrap().push(format!("{payload}: {why}"));
                                stream = connect();
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let before_stop = answered.load(Ordering::Relaxed);
    nix_kill(a.child.id(), "-TERM");
    let mut a = a;
    let status = wait_exit(&mut a.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("nbnet a did not stop:\n{}", a.log()));
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let total = answered.load(Ordering::Relaxed);
    println!(
        "answered {total} requests ({before_stop} before the stop), {} retried after a clean close",
        retried.load(Ordering::Relaxed)
    );
    assert!(
        status.success(),
        "nbnet a must exit 0 on SIGTERM:\n{}",
        a.log()
    );
    assert!(
        a.log().contains("drained"),
        "nbnet a did not drain:\n{}",
        a.log()
    );
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "requests lost or cut during the graceful stop: {:?}\n--- a ---\n{}",
        &failures[..failures.len().min(10)],
        a.log()
    );
    assert!(
        total > before_stop,
        "no request was answered after the stop began"
    );
}

fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid} failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}
