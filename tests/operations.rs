//! Operations: graceful and fast stop, zero-downtime reload of config and
//! plugins (under load, with a `.so` replaced at the same path), broken
//! reloads that change nothing, listeners added and removed by a reload,
//! `nbnet reload|stop` through the pid_file, SIGTTIN/SIGTTOU, worker
//! recycling with `max_requests_per_worker`, and `nbnet --version`.
//!
//! Every test starts the real binary and talks to it over 127.0.0.1.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{
    build, describe, frame, show, wait_until, workspace_root, Client, Proc, Sandbox, Server,
    HEADER_LEN, SIGINT, SIGTERM,
};

/// The upper and echo plugins, plus `logic`: a copy of one of them at
/// `{dir}/logic.so`, swapped between reloads (see [`install_logic`]).
const PLUGINS: &str = r#"
[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "echo"
path = "{echo}"
"#;

const LOGIC_PLUGIN: &str = r#"
[[plugins]]
name = "logic"
path = "{dir}/logic.so"
"#;

/// How long old workers may take to drain after a reload (their
/// `shutdown_timeout` in these configs), plus scheduling slack.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const DRAIN_SLACK: Duration = Duration::from_secs(1);

/// A config: `[server]` lines, the upper and echo plugins, and listeners
/// given as (port placeholder, plugin name).
fn config(server: &str, listeners: &[(&str, &str)]) -> String {
    let mut text = format!("[server]\n{server}\n{PLUGINS}");
    for (port, plugin) in listeners {
        text.push_str(&format!(
            "\n[[listeners]]\naddr = \"127.0.0.1:{{{port}}}\"\nplugin = \"{plugin}\"\n"
        ));
    }
    text
}

/// [`config`] plus the `logic` plugin.
fn config_with_logic(server: &str, listeners: &[(&str, &str)]) -> String {
    let mut text = config(server, &[]);
    text.push_str(LOGIC_PLUGIN);
    for (port, plugin) in listeners {
        text.push_str(&format!(
            "\n[[listeners]]\naddr = \"127.0.0.1:{{{port}}}\"\nplugin = \"{plugin}\"\n"
        ));
    }
    text
}

/// Copies `so` to `<dir>/logic.so` atomically (temporary file, then rename),
/// so that running workers keep their mapping of the previous file intact.
fn install_logic(dir: &Path, so: &Path) {
    let tmp = dir.join(".logic.so.tmp");
    fs::copy(so, &tmp)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", so.display(), tmp.display()));
    fs::rename(&tmp, dir.join("logic.so")).expect("rename logic.so into place");
}

// ------------------------------------------------------------ small helpers

/// Polls `f` every 20 ms for up to `timeout`; panics with the server's log.
fn wait_for_within<T>(
    server: &Server,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what} (children now: {:?})\n--- nbnet log ---\n{}",
                server.worker_pids(),
                server.log()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the log has `n` lines containing `needle`; a `reload aborted`
/// or `reload rolled back` line (when not awaited) fails at once.
fn wait_for_log_count(server: &Server, needle: &str, n: usize, timeout: Duration) {
    wait_for_within(
        server,
        timeout,
        &format!("{n} log line(s) with {needle:?}"),
        || {
            let log = server.log();
            for bad in ["reload aborted", "reload rolled back"] {
                if !needle.contains(bad) && log.contains(bad) {
                    panic!("unexpected {bad:?} in the log\n--- nbnet log ---\n{log}");
                }
            }
            (log.lines().filter(|l| l.contains(needle)).count() >= n).then_some(())
        },
    )
}

/// Waits until none of `workers` is alive; returns how long that took.
fn wait_gone(server: &Server, workers: &[Proc], timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_for_within(
        server,
        timeout,
        &format!("workers {workers:?} to exit"),
        || workers.iter().all(|w| !w.alive()).then_some(()),
    );
    start.elapsed()
}

fn pids(workers: &[Proc]) -> Vec<i32> {
    let mut pids: Vec<i32> = workers.iter().map(|w| w.pid).collect();
    pids.sort_unstable();
    pids
}

/// Asserts the connection attempt is refused (not accepted, not timed out).
fn is_refused(port: u16) -> bool {
    match Client::try_connect(port) {
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// The master's exit status within `timeout`, or a panic with the log.
fn expect_exit(server: &mut Server, timeout: Duration, what: &str) -> i32 {
    let status = server.wait_exit(timeout);
    let status = status.unwrap_or_else(|| {
        panic!(
            "{what}: the master did not exit within {timeout:?}\n--- nbnet log ---\n{}",
            server.log()
        )
    });
    status.code().unwrap_or_else(|| {
        panic!(
            "{what}: the master ended with {}\n--- nbnet log ---\n{}",
            describe(&status),
            server.log()
        )
    })
}

// ------------------------------------------------- classified request/answer

/// Which plugin answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Upper,
    Echo,
}

fn classify(request: &[u8], answer: &[u8]) -> Option<Form> {
    if answer == request.to_ascii_uppercase().as_slice() {
        Some(Form::Upper)
    } else if answer == request {
        Some(Form::Echo)
    } else {
        None
    }
}

/// The outcome of sending one request and reading its answer.
#[derive(Debug)]
enum Exchange {
    Answer(Vec<u8>),
    /// EOF or reset before any byte of the answer: the server closed the
    /// connection without reading the request, so a retry is safe.
    ClosedIdle(String),
    /// EOF or reset after some but not all bytes of the answer.
    CutMidFrame {
        got: usize,
        why: String,
    },
    /// Anything else: a timeout, a bad header.
    Failed(String),
}

fn is_close(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn closed(got: usize, why: String) -> Exchange {
    if got == 0 {
        Exchange::ClosedIdle(why)
    } else {
        Exchange::CutMidFrame { got, why }
    }
}

/// Fills `buf`; `before` answer bytes were received before it.
fn read_exactly(stream: &mut TcpStream, buf: &mut [u8], before: usize) -> Result<(), Exchange> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(closed(before + filled, "EOF".into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_close(&e) => return Err(closed(before + filled, e.to_string())),
            Err(e) => {
                return Err(Exchange::Failed(format!(
                    "after {} answer bytes: {e}",
                    before + filled
                )))
            }
        }
    }
    Ok(())
}

fn exchange(stream: &mut TcpStream, request: &[u8]) -> Exchange {
    if let Err(e) = stream.write_all(&frame(request)) {
        return if is_close(&e) {
            Exchange::ClosedIdle(format!("write: {e}"))
        } else {
            Exchange::Failed(format!("write: {e}"))
        };
    }
    let mut header = [0u8; HEADER_LEN];
    if let Err(outcome) = read_exactly(stream, &mut header, 0) {
        return outcome;
    }
    let Some(len) = std::str::from_utf8(&header)
        .ok()
        .filter(|h| h.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|h| h.parse::<usize>().ok())
    else {
        return Exchange::Failed(format!("bad header {}", show(&header)));
    };
    let mut payload = vec![0u8; len];
    match read_exactly(stream, &mut payload, HEADER_LEN) {
        Ok(()) => Exchange::Answer(payload),
        Err(outcome) => outcome,
    }
}

fn connect(port: u16) -> io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What the load clients saw.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    upper: AtomicU64,
    echo: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
    closed_idle: AtomicU64,
    cut_mid_frame: AtomicU64,
    wrong: AtomicU64,
    failed: AtomicU64,
    /// Answers on connections opened after the final reload settled that
    /// were not of the final form.
    stale_after_settle: AtomicU64,
    /// The first problems, for the failure message.
    problems: Mutex<Vec<String>>,
    /// How idle connections were seen to close (EOF, reset...), distinct.
    idle_closes: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, what: String) {
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < 20 {
            problems.push(what);
        }
    }

    fn closed_idle(&self, why: String) {
        self.closed_idle.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.idle_closes.lock().unwrap();
        if !seen.contains(&why) && seen.len() < 5 {
            seen.push(why);
        }
    }

    fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} answered ({} upper, {} echo) over {} connections; {} refused, {} cut mid-frame, {} closed while idle (as {:?}), {} wrong answers, {} other failures, {} stale answers after the final reload; first problems: {:#?}",
            get(&self.answered),
            get(&self.upper),
            get(&self.echo),
            get(&self.connections),
            get(&self.refused),
            get(&self.cut_mid_frame),
            get(&self.closed_idle),
            self.idle_closes.lock().unwrap(),
            get(&self.wrong),
            get(&self.failed),
            get(&self.stale_after_settle),
            self.problems.lock().unwrap()
        )
    }
}

/// After this is set, connections opened from then on must only see `form`.
struct Settled {
    flag: AtomicBool,
    form: Form,
}

/// One load client: connects, sends a few unique requests (checking each
/// answer is the upper or echo form of its own request), closes, repeats,
/// until `stop`. Never retries: every outcome is counted.
fn load_client(id: usize, port: u16, stop: &AtomicBool, tally: &Tally, settled: &Settled) {
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1);
    let mut conn_no = 0u64;
    while !stop.load(Ordering::Relaxed) {
        conn_no += 1;
        let after_settle = settled.flag.load(Ordering::SeqCst);
        let mut stream = match connect(port) {
            Ok(stream) => stream,
            Err(e) => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                tally.problem(format!("client {id} connection {conn_no}: connect: {e}"));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        tally.connections.fetch_add(1, Ordering::Relaxed);
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let requests = 1 + (rng >> 33) % 25;
        for r in 0..requests {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // Mostly small requests; now and then one that spans many reads
            // and writes, so that drains meet frames in flight.
            let mut request = format!("load c{id} n{conn_no} r{r} payload-{}", rng % 1000);
            if (rng >> 20) % 8 == r % 8 {
                let filler = "abcdefghijklmnopqrstuvwxyz".repeat(4096);
                request.push_str(&filler[..(rng % 100_000) as usize]);
            }
            match exchange(&mut stream, request.as_bytes()) {
                Exchange::Answer(answer) => {
                    tally.answered.fetch_add(1, Ordering::Relaxed);
                    match classify(request.as_bytes(), &answer) {
                        Some(form) => {
                            let counter = match form {
                                Form::Upper => &tally.upper,
                                Form::Echo => &tally.echo,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if after_settle && form != settled.form {
                                tally.stale_after_settle.fetch_add(1, Ordering::Relaxed);
                                tally.problem(format!(
                                    "{request:?} answered in {form:?} form on a connection opened after the final reload settled"
                                ));
                            }
                        }
                        None => {
                            tally.wrong.fetch_add(1, Ordering::Relaxed);
                            tally.problem(format!("{request:?} answered {}", show(&answer)));
                        }
                    }
                }
                Exchange::ClosedIdle(why) => {
                    tally.closed_idle(why);
                    break;
                }
                Exchange::CutMidFrame { got, why } => {
                    tally.cut_mid_frame.fetch_add(1, Ordering::Relaxed);
                    tally.problem(format!(
                        "{request:?}: connection cut after {got} answer bytes ({why})"
                    ));
                    break;
                }
                Exchange::Failed(why) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    tally.problem(format!("{request:?}: {why}"));
                    break;
                }
            }
        }
    }
}

/// A fresh connection's answer to one probe request, classified.
fn probe(server: &Server, port: u16, what: &str) -> Form {
    let request = format!("probe {what}");
    let mut client = Client::connect(port);
    let answer = client.request(request.as_bytes());
    classify(request.as_bytes(), &answer).unwrap_or_else(|| {
        panic!(
            "{what}: probe {request:?} answered {}\n--- nbnet log ---\n{}",
            show(&answer),
            server.log()
        )
    })
}

// ------------------------------------------------------------------- 1. stop

#[test]
fn sigterm_finishes_frames_in_progress_closes_idle_connections_and_refuses_new_ones() {
    let mut server = Server::start(&config(
        "workers = 2\nshutdown_timeout = \"10s\"",
        &[("port", "upper")],
    ));
    let port = server.port();
    server.wait_for_workers(2);

    let mut idle = server.client();
    assert_eq!(idle.request(b"idle"), b"IDLE");
    let mut busy = server.client();
    assert_eq!(busy.request(b"first"), b"FIRST");
    // One whole frame (its answer is left unread) and half of the next.
    busy.send_raw(b"0000000003abc0000000011hello").unwrap();
    // Let the worker read both before the stop begins.
    thread::sleep(Duration::from_millis(300));

    server.signal(SIGTERM);

    // The idle keep-alive connection is closed at once, without a byte.
    let took = idle.expect_closed_within(Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(3),
        "the idle connection took {took:?} to be closed"
    );
    // New connections are refused once every worker drains, while the busy
    // connection still holds its worker (and so the master) up.
    wait_for_within(
        &server,
        Duration::from_secs(5),
        "new connections to be refused",
        || is_refused(port).then_some(()),
    );
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the master exited while a connection was in the middle of a frame\n--- nbnet log ---\n{}",
        server.log()
    );

    // The busy connection gets the answer already due, finishes its frame,
    // gets that answer too, and is then closed at the frame boundary.
    assert_eq!(busy.read_frame().unwrap(), b"ABC");
    busy.send_raw(b" world").unwrap();
    assert_eq!(busy.read_frame().unwrap(), b"HELLO WORLD");
    busy.expect_closed_within(Duration::from_secs(5));

    let code = expect_exit(&mut server, Duration::from_secs(5), "graceful stop");
    assert_eq!(code, 0, "exit code\n{}", server.log());
    for w in server.seen_workers() {
        assert!(!w.alive(), "worker {} outlived the master", w.pid);
    }
    let log = server.log();
    assert!(
        log.contains("1 finishing their frames"),
        "the draining worker should log the connection it lets finish\n{log}"
    );
    assert!(
        !log.contains("reached: cutting"),
        "nothing should have been cut\n{log}"
    );
}

#[test]
fn sigterm_cuts_what_remains_after_shutdown_timeout_and_says_how_much() {
    let mut server = Server::start(&config(
        "workers = 1\nshutdown_timeout = \"1s\"",
        &[("port", "upper")],
    ));
    let port = server.port();

    // Stalled in the middle of a request.
    let mut stalled = server.client();
    stalled.send_raw(b"0000000010abc").unwrap();

    // A client that sends big requests and never reads the answers: the
    // worker ends up with answers it cannot send, and stops reading.
    let written = AtomicU64::new(0);
    let (code, took) = thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut stream = connect(port).expect("connect the hog");
            // A small receive buffer (no autotuning): the server's answers
            // back up quickly, whatever the machine's tcp_rmem.
            let size: libc::c_int = 64 * 1024;
            // SAFETY: a valid socket and a pointer to a c_int of that size.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let request = frame(&vec![b'x'; 1 << 20]);
            for _ in 0..128 {
                if stream.write_all(&request).is_err() {
                    break;
                }
                written.fetch_add(request.len() as u64, Ordering::SeqCst);
            }
            // The last write blocks (nothing is read) until the server cuts
            // the connection, or the 10 s write timeout passes.
        });
        // Wait until the writer is blocked: the worker stopped reading.
        let mut last = (0, Instant::now());
        wait_for_within(
            &server,
            Duration::from_secs(15),
            "the non-reading client to fill the buffers",
            || {
                let now = written.load(Ordering::SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                    None
                } else {
                    (now >= 2 << 20 && last.1.elapsed() > Duration::from_millis(400)).then_some(())
                }
            },
        );

        let start = Instant::now();
        server.signal(SIGTERM);
        let code = expect_exit(
            &mut server,
            Duration::from_secs(8),
            "stop past shutdown_timeout",
        );
        let took = start.elapsed();
        let _ = writer.join();
        (code, took)
    });
    let log = server.log();
    assert_eq!(code, 0, "exit code\n{log}");
    assert!(
        took >= Duration::from_millis(900),
        "the master exited after {took:?}, before shutdown_timeout = 1s\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("shutdown_timeout = 1s reached: cutting"))
        .unwrap_or_else(|| panic!("no `cutting` line in the log\n{log}"));
    // "... cutting 2 connection(s) (M in the middle of a request, K with
    // responses not yet read by the client)"
    let numbers: Vec<u64> = line
        .split("cutting ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(numbers.len() >= 3, "cannot read the counts in {line:?}");
    let (cut, mid_request, unread) = (numbers[0], numbers[1], numbers[2]);
    assert_eq!(cut, 2, "connections cut, in {line:?}");
    assert!(
        (1..=2).contains(&mid_request),
        "the stalled client is in the middle of a request: {line:?}"
    );
    assert_eq!(unread, 1, "one client has unread responses: {line:?}");
    // The stalled client was cut without an answer.
    stalled.expect_closed_within(Duration::from_secs(2));
}

#[test]
fn sigint_stops_at_once_even_with_a_frame_half_received() {
    let mut server = Server::start(&config(
        "workers = 2\nshutdown_timeout = \"30s\"",
        &[("port", "upper")],
    ));
    server.wait_for_workers(2);
    let mut half = server.client();
    half.send_raw(b"0000000010abc").unwrap();
    thread::sleep(Duration::from_millis(200));

    let start = Instant::now();
    server.signal(SIGINT);
    let code = expect_exit(&mut server, Duration::from_secs(5), "fast stop");
    let took = start.elapsed();
    assert_eq!(code, 0, "exit code\n{}", server.log());
    assert!(
        took < Duration::from_secs(3),
        "a fast stop took {took:?}\n{}",
        server.log()
    );
    half.expect_closed_within(Duration::from_secs(2));
    for w in server.seen_workers() {
        assert!(!w.alive(), "worker {} outlived the master", w.pid);
    }
}

// ------------------------------------------------------ 2. reload under load

#[test]
fn ten_reloads_under_load_switch_the_logic_without_refusing_or_cutting_anything() {
    const WORKERS: usize = 2;
    const CLIENTS: usize = 3;
    let a = build();
    let server_section = "workers = 2\nshutdown_timeout = \"5s\"";
    let template = |plugin: &str| config_with_logic(server_section, &[("port", plugin)]);

    let sandbox = Sandbox::new();
    let dir = sandbox.path().to_path_buf();
    install_logic(&dir, &a.upper_so);
    let mut server = sandbox.start(&template("upper"));
    let port = server.port();
    server.wait_for_workers(WORKERS);
    assert_eq!(probe(&server, port, "before"), Form::Upper);

    // (listener's plugin, what logic.so becomes first, the form expected).
    let steps: [(&str, Option<&Path>, Form); 10] = [
        ("echo", None, Form::Echo),
        ("upper", None, Form::Upper),
        ("logic", Some(&a.echo_so), Form::Echo),
        // The config text does not change: only the .so at the same path.
        ("logic", Some(&a.upper_so), Form::Upper),
        ("logic", Some(&a.echo_so), Form::Echo),
        ("upper", None, Form::Upper),
        ("echo", None, Form::Echo),
        ("logic", Some(&a.upper_so), Form::Upper),
        ("echo", None, Form::Echo),
        ("upper", None, Form::Upper),
    ];
    let settled = Settled {
        flag: AtomicBool::new(false),
        form: steps[steps.len() - 1].2,
    };
    let stop = AtomicBool::new(false);
    let tally = Tally::default();

    let mut drains = Vec::new();
    thread::scope(|scope| {
        for id in 0..CLIENTS {
            let (stop, tally, settled) = (&stop, &tally, &settled);
            scope.spawn(move || load_client(id, port, stop, tally, settled));
        }
        // Stop the clients even if an assertion below panics.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop_guard = StopOnDrop(&stop);

        thread::sleep(Duration::from_millis(300));
        for (i, (plugin, so, form)) in steps.iter().enumerate() {
            let step = i + 1;
            let old = server.live_workers();
            if let Some(so) = so {
                install_logic(&dir, so);
            }
            server.sandbox_mut().write_config(&template(plugin));
            server.signal(libc::SIGHUP);
            wait_for_log_count(&server, "reload complete in", step, Duration::from_secs(20));
            let drained = wait_gone(&server, &old, DRAIN_TIMEOUT + DRAIN_SLACK);
            drains.push(drained);
            wait_for_within(&server, Duration::from_secs(5), "the worker count", || {
                (server.live_workers().len() == WORKERS).then_some(())
            });
            let seen = probe(&server, port, &format!("after reload {step}"));
            assert_eq!(
                seen,
                *form,
                "after reload {step} (listener -> {plugin}, logic.so <- {so:?}) the answers should be in {form:?} form\n--- nbnet log ---\n{}",
                server.log()
            );
            thread::sleep(Duration::from_millis(150));
        }
        settled.flag.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(500));
    });

    let summary = tally.summary();
    println!("reload under load: {summary}; old workers gone {drains:?} after each `reload complete` was seen");
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let log = server.log();
    assert_eq!(
        get(&tally.refused),
        0,
        "refused connections: {summary}\n{log}"
    );
    assert_eq!(get(&tally.cut_mid_frame), 0, "frames cut: {summary}\n{log}");
    assert_eq!(get(&tally.wrong), 0, "wrong answers: {summary}\n{log}");
    assert_eq!(get(&tally.failed), 0, "failures: {summary}\n{log}");
    assert_eq!(
        get(&tally.stale_after_settle),
        0,
        "old logic after the final reload: {summary}\n{log}"
    );
    assert!(
        get(&tally.upper) > 0 && get(&tally.echo) > 0,
        "both forms should have been seen under load: {summary}"
    );
    assert!(
        get(&tally.answered) >= 500,
        "too little load to mean anything: {summary}"
    );
    assert_eq!(server.log_count("reload complete in"), steps.len());
    assert_eq!(server.log_count("reload aborted"), 0, "{log}");
    assert_eq!(server.log_count("rolled back"), 0, "{log}");
    // Only the final generation is left, and it serves the final form.
    assert_eq!(server.live_workers().len(), WORKERS);
    assert_eq!(probe(&server, port, "final"), settled.form);
    server.stop();
}

// -------------------------------------------------------- 3. broken reloads

#[test]
fn a_reload_with_a_broken_config_changes_nothing_and_says_why() {
    let server_section = "workers = 2\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&config(server_section, &[("port", "upper")]));
    let port = server.port();
    let before = pids(&server.wait_for_workers(2));

    let assert_unchanged = |server: &Server, what: &str| {
        thread::sleep(Duration::from_millis(400));
        assert_eq!(
            pids(&server.live_workers()),
            before,
            "{what}: the workers should be the same processes\n--- nbnet log ---\n{}",
            server.log()
        );
        for i in 0..5 {
            assert_eq!(
                probe(server, port, &format!("{what} {i}")),
                Form::Upper,
                "{what}: the logic should not change"
            );
        }
    };

    // An unknown key.
    let bad_key = config(
        &format!("{server_section}\nbogus_knob = 1"),
        &[("port", "echo")],
    );
    server.sandbox_mut().write_config(&bad_key);
    server.signal(libc::SIGHUP);
    wait_for_log_count(&server, "reload aborted", 1, Duration::from_secs(10));
    let log = server.log();
    assert!(
        log.contains("bogus_knob"),
        "the log should name the unknown key\n{log}"
    );
    assert_unchanged(&server, "unknown key");

    // A plugin file that does not exist.
    let missing = format!(
        "{}\n[[plugins]]\nname = \"ghost\"\npath = \"{{dir}}/no-such-plugin.so\"\n",
        config(server_section, &[("port", "echo")])
    );
    server.sandbox_mut().write_config(&missing);
    server.signal(libc::SIGHUP);
    wait_for_log_count(&server, "reload aborted", 2, Duration::from_secs(10));
    let log = server.log();
    assert!(
        log.contains("no-such-plugin.so"),
        "the log should name the missing plugin file\n{log}"
    );
    assert_unchanged(&server, "missing plugin");

    // `nbnet reload` checks the config first and sends nothing.
    let text = server.sandbox_mut().write_config(&bad_key);
    let rendered = fs::read_to_string(&text).unwrap();
    let line = rendered
        .lines()
        .position(|l| l.contains("bogus_knob"))
        .unwrap()
        + 1;
    let hups = server.log_count("SIGHUP received");
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "nbnet reload with an invalid config: {}\n{}",
        describe(&out.status),
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("nbnet.toml:{line}")),
        "stderr should name the file and line {line}: {}",
        out.stderr
    );
    assert_unchanged(&server, "nbnet reload with an invalid config");
    assert_eq!(
        server.log_count("SIGHUP received"),
        hups,
        "no SIGHUP should have been sent\n{}",
        server.log()
    );
    assert_eq!(server.log_count("reload complete"), 0);
}

#[test]
fn a_reload_whose_new_worker_cannot_start_is_rolled_back() {
    let server_section = "workers = 2\nshutdown_timeout = \"5s\"";
    let mut server = Server::start(&config(server_section, &[("port", "upper")]));
    let port = server.port();
    let before = pids(&server.wait_for_workers(2));

    // The check child (worker index 0) loads this fine; new worker 1 cannot.
    let broken = format!(
        "{}\n[[plugins]]\nname = \"misbehave\"\npath = \"{{misbehave}}\"\n[plugins.config]\nfail_init_worker = 1\n",
        config(server_section, &[("port", "misbehave")])
    );
    server.sandbox_mut().write_config(&broken);
    server.signal(libc::SIGHUP);
    wait_for_log_count(&server, "reload rolled back", 1, Duration::from_secs(15));
    wait_for_within(
        &server,
        Duration::from_secs(5),
        "only the previous workers to be left",
        || (pids(&server.live_workers()) == before).then_some(()),
    );
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the master should keep serving after a rolled-back reload\n{}",
        server.log()
    );
    for i in 0..5 {
        assert_eq!(
            probe(&server, port, &format!("after the rollback {i}")),
            Form::Upper
        );
    }
    assert_eq!(server.log_count("reload complete"), 0, "{}", server.log());

    // The previous state is whole again: a good reload goes through.
    let old = server.live_workers();
    server
        .sandbox_mut()
        .write_config(&config(server_section, &[("port", "echo")]));
    server.signal(libc::SIGHUP);
    wait_for_within(
        &server,
        Duration::from_secs(15),
        "a reload after the rollback to complete",
        || (server.log_count("reload complete in") == 1).then_some(()),
    );
    wait_gone(&server, &old, DRAIN_TIMEOUT + DRAIN_SLACK);
    server.wait_for_workers(2);
    assert_eq!(probe(&server, port, "after the good reload"), Form::Echo);
    server.stop();
}

// ------------------------------------------------ 4. listeners added/removed

#[test]
fn a_reload_adds_and_removes_listeners() {
    let server_section = "workers = 2\nshutdown_timeout = \"5s\"";
    let mut server = Server::start(&config(
        server_section,
        &[("port", "upper"), ("port2", "echo")],
    ));
    let (kept, removed) = (server.port(), server.port_n(1));
    let old = server.wait_for_workers(2);
    assert_eq!(probe(&server, removed, "removed port before"), Form::Echo);

    server.sandbox_mut().write_config(&config(
        server_section,
        &[("port", "upper"), ("port3", "echo")],
    ));
    let added = server.port_n(2);
    server.signal(libc::SIGHUP);
    wait_for_log_count(&server, "reload complete in", 1, Duration::from_secs(15));

    assert_eq!(probe(&server, added, "added port"), Form::Echo);
    assert_eq!(probe(&server, kept, "kept port"), Form::Upper);
    wait_gone(&server, &old, DRAIN_TIMEOUT + DRAIN_SLACK);
    wait_for_within(
        &server,
        Duration::from_secs(3),
        "the removed port to refuse connections",
        || is_refused(removed).then_some(()),
    );
    assert_eq!(probe(&server, added, "added port after"), Form::Echo);
    assert_eq!(probe(&server, kept, "kept port after"), Form::Upper);
    let log = server.log();
    for expected in [
        format!("listener 127.0.0.1:{kept}: socket kept"),
        format!("listener 127.0.0.1:{added}: added"),
        format!("listener 127.0.0.1:{removed}: removed"),
    ] {
        assert!(log.contains(&expected), "log lacks {expected:?}\n{log}");
    }
    server.stop();
}

// ------------------------------------------- 5. nbnet reload / stop commands

/// A PID no process can have: `pid_max` itself (PIDs are below it).
fn impossible_pid() -> i64 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304)
}

#[test]
fn nbnet_reload_and_stop_find_the_master_through_the_pid_file() {
    let server_section = "workers = 2\nshutdown_timeout = \"5s\"\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&config(server_section, &[("port", "upper")]));
    let port = server.port();
    let pid_file = server.dir().join("nbnet.pid");
    let text = fs::read_to_string(&pid_file).expect("the master writes its pid_file");
    assert_eq!(text.trim(), server.pid().to_string());

    let old = server.wait_for_workers(2);
    server
        .sandbox_mut()
        .write_config(&config(server_section, &[("port", "echo")]));
    let out = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "nbnet reload: {}\n{}{}",
        describe(&out.status),
        out.stdout,
        out.stderr
    );
    wait_for_log_count(&server, "reload complete in", 1, Duration::from_secs(15));
    wait_gone(&server, &old, DRAIN_TIMEOUT + DRAIN_SLACK);
    let new = server.wait_for_workers(2);
    assert!(
        new.iter().all(|w| !old.contains(w)),
        "every worker should be new: {old:?} -> {new:?}"
    );
    assert_eq!(probe(&server, port, "after nbnet reload"), Form::Echo);

    // `nbnet stop` waits for the master to exit; the test is the master's
    // parent, so it reaps it meanwhile (or `stop` would wait on a zombie).
    let mut stop = server
        .sandbox_mut()
        .command()
        .args(["stop", "--config", "nbnet.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbnet stop");
    let code = expect_exit(&mut server, Duration::from_secs(10), "nbnet stop");
    assert_eq!(code, 0, "the master's exit code\n{}", server.log());
    wait_until(Duration::from_secs(10), "nbnet stop to exit", || {
        stop.try_wait().expect("try_wait").map(|_| ())
    });
    let out = stop.wait_with_output().expect("nbnet stop output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "nbnet stop: {}\n{stdout}{stderr}",
        describe(&out.status)
    );
    assert!(stdout.contains("stopped"), "nbnet stop printed {stdout:?}");
    assert!(
        !pid_file.exists(),
        "the pid_file should be removed when the master exits"
    );
    for w in server.seen_workers() {
        assert!(!w.alive(), "worker {} outlived the master", w.pid);
    }
}

#[test]
fn nbnet_stop_fast_closes_everything_at_once() {
    let server_section = "workers = 2\nshutdown_timeout = \"30s\"\npid_file = \"nbnet.pid\"";
    let mut server = Server::start(&config(server_section, &[("port", "upper")]));
    let mut half = server.client();
    half.send_raw(b"0000000010abc").unwrap();
    thread::sleep(Duration::from_millis(200));

    let start = Instant::now();
    let mut stop = server
        .sandbox_mut()
        .command()
        .args(["stop", "--fast", "--config", "nbnet.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbnet stop --fast");
    let code = expect_exit(&mut server, Duration::from_secs(5), "nbnet stop --fast");
    assert_eq!(code, 0, "the master's exit code\n{}", server.log());
    wait_until(Duration::from_secs(5), "nbnet stop --fast to exit", || {
        stop.try_wait().expect("try_wait").map(|_| ())
    });
    let took = start.elapsed();
    let out = stop.wait_with_output().expect("output");
    assert_eq!(
        out.status.code(),
        Some(0),
        "nbnet stop --fast: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert!(took < Duration::from_secs(3), "a fast stop took {took:?}");
    half.expect_closed_within(Duration::from_secs(2));
}

#[test]
fn nbnet_reload_and_stop_explain_a_missing_or_stale_pid_file() {
    let mut sandbox = Sandbox::new();
    let config_file = sandbox.config_path();
    let config_name = config_file.to_string_lossy().to_string();
    let expect_failure = |sandbox: &mut Sandbox, what: &str, needles: &[&str]| {
        for command in [&["reload"][..], &["stop", "--strict"]] {
            let command = command.join(" ");
            let mut args: Vec<&str> = command.split(' ').collect();
            args.extend(["--config", &config_name]);
            let out = sandbox.run(&args);
            assert_eq!(
                out.status.code(),
                Some(1),
                "nbnet {command} with {what}: {}\n{}",
                describe(&out.status),
                out.stderr
            );
            for needle in needles {
                assert!(
                    out.stderr.contains(needle),
                    "nbnet {command} with {what}: stderr should mention {needle:?}: {}",
                    out.stderr
                );
            }
        }
    };

    // No pid_file in the config.
    sandbox.write_config(&config("workers = 1", &[("port", "upper")]));
    expect_failure(&mut sandbox, "no pid_file", &[&config_name, "pid_file"]);

    // A pid_file that does not exist (nbnet is not running).
    sandbox.write_config(&config(
        "workers = 1\npid_file = \"nbnet.pid\"",
        &[("port", "upper")],
    ));
    let pid_path = sandbox.path().join("nbnet.pid");
    let pid_name = pid_path.to_string_lossy().to_string();
    expect_failure(&mut sandbox, "a missing pid file", &[&pid_name]);
    // Issue 14: `nbnet stop` on a server that is not running has nothing
    // to do: exit 0 with a message (init-script convention); --strict
    // (above) fails.
    let stopped_already = |sandbox: &mut Sandbox, what: &str| {
        let out = sandbox.run(&["stop", "--config", &config_name]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "nbnet stop with {what}: {out:?}"
        );
        assert!(
            out.stdout.contains("nbnet is not running") && out.stdout.contains(&pid_name),
            "nbnet stop with {what}: {out:?}"
        );
    };
    stopped_already(&mut sandbox, "a missing pid file");

    // A stale PID.
    sandbox.write("nbnet.pid", format!("{}\n", impossible_pid()).as_bytes());
    expect_failure(&mut sandbox, "a stale PID", &[&pid_name, "stale"]);
    stopped_already(&mut sandbox, "a stale PID");
    assert!(pid_path.exists());
}

// -------------------------------------------------------- 6. SIGTTIN/SIGTTOU

#[test]
fn sigttin_and_sigttou_add_and_remove_workers_but_never_the_last() {
    let server = Server::start(&config("workers = 2", &[("port", "upper")]));
    let port = server.port();
    let two = server.wait_for_workers(2);

    server.signal(libc::SIGTTIN);
    let three = server.wait_for_workers(3);
    for w in &two {
        assert!(three.contains(w), "SIGTTIN should not replace {}", w.pid);
    }
    for i in 0..10 {
        assert_eq!(probe(&server, port, &format!("three {i}")), Form::Upper);
    }

    let mut expected = 3;
    while expected > 1 {
        server.signal(libc::SIGTTOU);
        expected -= 1;
        server.wait_for_workers(expected);
        for i in 0..10 {
            assert_eq!(
                probe(&server, port, &format!("{expected} worker(s), {i}")),
                Form::Upper
            );
        }
    }
    let last = server.wait_for_workers(1);
    server.signal(libc::SIGTTOU);
    server.wait_for_log_line(&["SIGTTOU received: keeping at least one worker"]);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.live_workers(),
        last,
        "SIGTTOU must not remove the last worker\n{}",
        server.log()
    );
    for i in 0..10 {
        assert_eq!(probe(&server, port, &format!("last {i}")), Form::Upper);
    }
    server.stop();
}

// ---------------------------------------------------- 7. worker recycling

#[test]
fn max_requests_per_worker_replaces_the_worker_without_losing_a_request() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 500;
    let server = Server::start(&config(
        "workers = 1\nmax_requests_per_worker = 200\nmax_requests_jitter = 0\nshutdown_timeout = \"5s\"",
        &[("port", "upper")],
    ));
    let port = server.port();
    let first = server.wait_for_workers(1);

    let tally = Tally::default();
    let done = AtomicU64::new(0);
    thread::scope(|scope| {
        for id in 0..CLIENTS {
            let (tally, done) = (&tally, &done);
            scope.spawn(move || {
                let mut stream = None;
                let mut r = 0;
                let mut closes_in_a_row = 0;
                while r < PER_CLIENT {
                    let s = match stream.as_mut() {
                        Some(s) => s,
                        None => match connect(port) {
                            Ok(s) => {
                                tally.connections.fetch_add(1, Ordering::Relaxed);
                                stream.insert(s)
                            }
                            Err(e) => {
                                tally.refused.fetch_add(1, Ordering::Relaxed);
                                tally.problem(format!("client {id}: connect: {e}"));
                                return;
                            }
                        },
                    };
                    let request = format!("recycle c{id} r{r} abc");
                    match exchange(s, request.as_bytes()) {
                        Exchange::Answer(answer) => {
                            tally.answered.fetch_add(1, Ordering::Relaxed);
                            if classify(request.as_bytes(), &answer) == Some(Form::Upper) {
                                tally.upper.fetch_add(1, Ordering::Relaxed);
                            } else {
                                tally.wrong.fetch_add(1, Ordering::Relaxed);
                                tally.problem(format!("{request:?} answered {}", show(&answer)));
                            }
                            r += 1;
                            closes_in_a_row = 0;
                        }
                        // Closed at a frame boundary before the request was
                        // read: reconnect and send it again.
                        Exchange::ClosedIdle(why) => {
                            tally.closed_idle(why);
                            stream = None;
                            closes_in_a_row += 1;
                            if closes_in_a_row > 20 {
                                tally.failed.fetch_add(1, Ordering::Relaxed);
                                tally.problem(format!("client {id}: closed 20 times in a row"));
                                return;
                            }
                        }
                        Exchange::CutMidFrame { got, why } => {
                            tally.cut_mid_frame.fetch_add(1, Ordering::Relaxed);
                            tally.problem(format!("{request:?}: cut after {got} bytes ({why})"));
                            return;
                        }
                        Exchange::Failed(why) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            tally.problem(format!("{request:?}: {why}"));
                            return;
                        }
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        // Watch the worker PIDs meanwhile (Server remembers every one seen).
        let deadline = Instant::now() + Duration::from_secs(40);
        while done.load(Ordering::SeqCst) < CLIENTS as u64
            && tally.failed.load(Ordering::Relaxed)
                + tally.cut_mid_frame.load(Ordering::Relaxed)
                + tally.refused.load(Ordering::Relaxed)
                == 0
            && Instant::now() < deadline
        {
            server.worker_pids();
            thread::sleep(Duration::from_millis(5));
        }
    });

    let summary = tally.summary();
    let replaced = server.log_count("served max_requests_per_worker");
    println!("max_requests_per_worker: {summary}; {replaced} replacement(s)");
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let log = server.log();
    assert_eq!(get(&tally.refused), 0, "refused: {summary}\n{log}");
    assert_eq!(
        get(&tally.cut_mid_frame),
        0,
        "cut mid-frame: {summary}\n{log}"
    );
    assert_eq!(get(&tally.failed), 0, "failures: {summary}\n{log}");
    assert_eq!(get(&tally.wrong), 0, "wrong answers: {summary}\n{log}");
    assert_eq!(
        get(&tally.answered),
        (CLIENTS * PER_CLIENT) as u64,
        "every request answered: {summary}"
    );
    assert!(replaced >= 1, "no worker was replaced\n{log}");
    let now = server.wait_for_workers(1);
    assert_ne!(
        now,
        first,
        "the worker should have changed after {} requests\n{log}",
        CLIENTS * PER_CLIENT
    );
    assert!(
        server.seen_workers().len() >= 2,
        "expected several worker generations, saw {:?}",
        server.seen_workers()
    );
    server.stop();
}

// ------------------------------------------------------------ 8. --version

/// `#define NAME value` from the C header of the plugin ABI.
fn header_define(name: &str) -> u32 {
    let header = workspace_root().join("plugin-api/include/nbnet_plugin.h");
    let text = fs::read_to_string(&header).expect("read nbnet_plugin.h");
    text.lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some(name))
                .then(|| words.next()?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no #define {name} in {}", header.display()))
}

#[test]
fn version_prints_the_version_and_the_plugin_abi() {
    let out = Sandbox::new().run(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let (major, minor) = (
        header_define("NBNET_ABI_MAJOR"),
        header_define("NBNET_ABI_MINOR"),
    );
    for expected in [
        format!("nbnet {}", env!("CARGO_PKG_VERSION")),
        format!("plugin ABI {major}.{minor}"),
        format!("{major}.0 through {major}.{minor}"),
    ] {
        assert!(
            out.stdout.contains(&expected),
            "--version should print {expected:?}: {:?}",
            out.stdout
        );
    }
}
