//! Connections handed over between workers (issue 11, part 1): a reload, a
//! worker's recycling, SIGTTOU — none of them may cost a persistent client
//! its connection or a request. Every test keeps clients connected through
//! the change and checks every answer.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::load::{assert_nothing_lost, wait_for_count, wait_for_progress, Load};
use nbnet_tests::{frame, Client, Sandbox, Server};

/// Two plugins (`upper`, `echo`) and one listener on `{port}` served by
/// `plugin`, with extra `[server]` lines.
fn config(server: &str, plugin: &str) -> String {
    format!(
        r#"[server]
{server}
shutdown_timeout = "10s"

[[plugins]]
name = "upper"
path = "{{upper}}"

[[plugins]]
name = "echo"
path = "{{echo}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "{plugin}"
"#
    )
}

// ------------------------------------------------------------------- reloads

/// The issue's scenario: 20 clients at depth 1 and 5 pipelining at depth 16
/// through 10 reloads alternating the plugin, then SIGTTIN and SIGTTOU:
/// no connection closed, no request unanswered or wrongly answered, and
/// the answers switch to the new logic.
#[test]
fn persistent_clients_lose_nothing_across_reloads_and_ttin_ttou() {
    let mut server = Server::start(&config("workers = 2", "upper"));
    let load = Load::start(server.port(), 20, 5, 16);
    wait_for_progress(&server, &load, 200);
    for round in 1..=10 {
        let plugin = if round % 2 == 1 { "echo" } else { "upper" };
        server
            .sandbox_mut()
            .write_config(&config("workers = 2", plugin));
        server.signal(libc::SIGHUP);
        wait_for_count(&server, "reload complete in", round);
        wait_for_progress(&server, &load, 100);
    }
    server.signal(libc::SIGTTIN);
    wait_for_progress(&server, &load, 200);
    server.signal(libc::SIGTTOU);
    wait_for_count(&server, "being replaced: handing", 11);
    wait_for_progress(&server, &load, 200);
    let seen = load.finish();
    assert_nothing_lost(&seen, &server);
    assert_eq!(
        seen.forms,
        BTreeSet::from(["echo", "upper"]),
        "the answers must switch with the reloads"
    );
    assert!(seen.answered > 2_000, "{seen:?}");
    assert_eq!(server.log_count("closed instead of handed over"), 0);
    server.stop();
}

/// Workers recycled by `max_requests_per_worker` hand their connections over
/// too.
#[test]
fn recycled_workers_hand_their_connections_over() {
    let server = Server::start(&config(
        "workers = 2\nmax_requests_per_worker = 400",
        "upper",
    ));
    let load = Load::start(server.port(), 10, 0, 1);
    wait_for_count(&server, "served max_requests_per_worker", 3);
    wait_for_count(&server, "being replaced: handing", 3);
    wait_for_progress(&server, &load, 200);
    let seen = load.finish();
    assert_nothing_lost(&seen, &server);
    server.stop();
}

// ------------------------------------------------------- frames in progress

/// A connection in the middle of a frame when its worker is replaced moves
/// at once, with the part of the frame the old worker read: the new worker
/// (and its logic) answers the frame once the client finishes it. (It used
/// to stay with the old worker until the client finished the frame — a
/// slow client held the old worker, and its plugins, for up to
/// `shutdown_timeout`.)
#[test]
fn a_connection_mid_frame_moves_at_once_with_the_part_received() {
    let mut server = Server::start(&config("workers = 1", "upper"));
    let mut client = server.client();
    assert_eq!(client.request(b"before"), b"BEFORE");
    let old_pid = server.wait_for_workers(1)[0].pid;
    let whole = frame(b"split request");
    client.send_raw(&whole[..14]).unwrap();
    server
        .sandbox_mut()
        .write_config(&config("workers = 1", "echo"));
    server.signal(libc::SIGHUP);
    wait_for_count(&server, "reload complete in", 1);
    // The old worker is gone before the frame is finished.
    server.wait_for_log_line(&[&format!(
        "replaced worker 0 (pid {old_pid}) finished draining"
    )]);
    client.send_raw(&whole[14..]).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"split request", "new logic");
    assert_eq!(client.request(b"after"), b"after");
    assert_eq!(server.log_count("closed instead of handed over"), 0);
    server.stop();
}

// -------------------------------------------------- PROXY, Unix, plugin hooks

/// A PROXY-protocol connection keeps its real client address across the
/// hand-over (one that has not sent its PROXY header yet sends it to the
/// new worker), and a Unix-socket connection moves too.
#[test]
fn proxy_protocol_and_unix_socket_connections_are_handed_over() {
    let sandbox = Sandbox::new();
    let socket = sandbox.path().join("nbnet.sock");
    let template = format!(
        r#"[server]
workers = 1

[[plugins]]
name = "whoami"
path = "{{whoami}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "whoami"

[[listeners]]
addr = "127.0.0.1:{{aux}}"
plugin = "whoami"
proxy_protocol = true

[[listeners]]
addr = "unix:{}"
plugin = "whoami"
"#,
        socket.display()
    );
    // {aux}, not {port2}: the start-up probe sends no PROXY header.
    let server = sandbox.start(&template);
    let proxied_port = server.aux_port(0);
    let ask = |stream: &mut dyn ReadWrite| -> Vec<String> {
        stream.write_all(&frame(b"who")).unwrap();
        let mut header = [0u8; 10];
        stream.read_exact(&mut header).unwrap();
        let len: usize = std::str::from_utf8(&header).unwrap().parse().unwrap();
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).unwrap();
        String::from_utf8(body)
            .unwrap()
            .split(' ')
            .map(str::to_string)
            .collect()
    };
    let proxy_header = b"PROXY TCP4 192.0.2.7 192.0.2.8 4242 80\r\n";
    let mut proxied = TcpStream::connect(("127.0.0.1", proxied_port)).unwrap();
    proxied
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    proxied.write_all(proxy_header).unwrap();
    let before = ask(&mut proxied);
    assert_eq!(before[1], "192.0.2.7:4242");
    // Connected, PROXY header not sent yet.
    let mut late = TcpStream::connect(("127.0.0.1", proxied_port)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let unix_before = ask(&mut unix);

    let old_pid = before[0].clone();
    server.signal(libc::SIGHUP);
    wait_for_count(&server, "reload complete in", 1);
    wait_for_count(&server, "being replaced: handing 3 connection(s)", 1);
    let after = server.wait_for("the proxied connection to reach the new worker", || {
        let after = ask(&mut proxied);
        (after[0] != old_pid).then_some(after)
    });
    assert_eq!(after[1], "192.0.2.7:4242", "the PROXY address must survive");
    late.write_all(proxy_header).unwrap();
    let late_answer = ask(&mut late);
    assert_eq!(late_answer[1], "192.0.2.7:4242");
    assert_ne!(late_answer[0], old_pid);
    let unix_after = ask(&mut unix);
    assert_ne!(unix_after[0], unix_before[0], "the Unix connection moved");
    assert_eq!(server.log_count("closed instead of handed over"), 0);
    server.stop();
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The old instance sees `on_close` and the new one `on_open`, both with
/// `NBNET_CONN_HANDED_OVER` in `flags`, for the same connection id.
#[test]
fn plugins_see_a_handed_over_connection_close_and_open_with_the_flag() {
    let server = Server::start(
        r#"[server]
workers = 1

[[plugins]]
name = "hostile"
path = "{hostile}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "hostile"
"#,
    );
    let mut client = server.client();
    let old_pid = client.request(b"pid");
    server.signal(libc::SIGHUP);
    wait_for_count(&server, "reload complete in", 1);
    server.wait_for("the connection to move", || {
        (client.request(b"pid") != old_pid).then_some(())
    });
    let log = server.log();
    let handed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hook") && l.contains("flags=1"))
        .collect();
    let id = |line: &str| {
        line.split(" id=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .map(str::to_string)
    };
    let closes: Vec<_> = handed.iter().filter(|l| l.contains("hook close")).collect();
    let opens: Vec<_> = handed.iter().filter(|l| l.contains("hook open")).collect();
    assert_eq!((closes.len(), opens.len()), (1, 1), "{log}");
    assert_eq!(id(closes[0]), id(opens[0]), "the same connection id");
    server.stop();
}

// ------------------------------------------------------------------ failures

/// Connections of a listener the reload removes cannot move (no new worker
/// listens there): they are closed at a frame boundary and counted, and
/// the others move.
#[test]
fn connections_whose_listener_is_removed_close_at_a_frame_boundary_and_are_counted() {
    let two = r#"[server]
workers = 1

[[plugins]]
name = "upper"
path = "{upper}"

[admin]
addr = "127.0.0.1:{admin}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "upper"
"#;
    let mut server = Server::start(two);
    let mut kept = server.client();
    let mut removed = Client::connect(server.port_n(1));
    assert_eq!(removed.request(b"a"), b"A");
    assert_eq!(kept.request(b"b"), b"B");
    let one = two.replace(
        "\n[[listeners]]\naddr = \"127.0.0.1:{port2}\"\nplugin = \"upper\"\n",
        "",
    );
    server.sandbox_mut().write_config(&one);
    server.signal(libc::SIGHUP);
    wait_for_count(&server, "reload complete in", 1);
    removed.expect_closed();
    assert_eq!(kept.request(b"c"), b"C");
    wait_for_count(
        &server,
        "closed: its listener is not in this worker's config",
        1,
    );
    let metrics = ureq_metrics(server.admin_port());
    assert!(
        metrics
            .lines()
            .any(|l| l == "nbnet_handover_failures_total 1"),
        "{metrics}"
    );
    server.stop();
}

/// `GET /metrics` with a plain socket.
fn ureq_metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// `kill -9` of a worker that is taking connections over: only the
/// connections in its hands fail; nothing is misdelivered and the server
/// keeps serving.
#[test]
fn killing_the_new_worker_during_a_hand_over_costs_only_its_connections() {
    let server = Server::start(&config("workers = 2", "upper"));
    let load = Load::start(server.port(), 20, 0, 1);
    wait_for_progress(&server, &load, 200);
    let old: Vec<i32> = server.live_workers().iter().map(|p| p.pid).collect();
    server.signal(libc::SIGHUP);
    let started = Instant::now();
    // The first new worker, as soon as it exists.
    let victim = server.wait_for("a new worker", || {
        server
            .live_workers()
            .into_iter()
            .find(|p| !old.contains(&p.pid))
    });
    wait_for_count(&server, "reload complete in", 1);
    unsafe { libc::kill(victim.pid, libc::SIGKILL) };
    server.wait_for_workers(2);
    thread::sleep(Duration::from_millis(300));
    let seen = load.finish();
    assert!(
        seen.mismatched.is_empty(),
        "misdelivered: {:?}",
        seen.mismatched
    );
    assert!(
        seen.closed.len() < 20,
        "every connection failed: {:?} ({:?} after the reload)",
        seen.closed,
        started.elapsed()
    );
    let mut fresh = server.client();
    assert_eq!(fresh.request(b"still"), b"STILL");
    server.stop();
}

/// A hand-over while the only other worker is itself being replaced (it
/// serves until its slow successor is ready) closed every connection with
/// "no worker is serving" (second hostile pass). They go to the worker that
/// still serves, or wait for one to be ready.
#[test]
fn connections_handed_over_while_every_other_worker_is_being_replaced_are_kept() {
    let server = Server::start(
        r#"[server]
workers = 1
max_requests_per_worker = 40
shutdown_timeout = "10s"

[[plugins]]
name = "hostile"
path = "{hostile}"

[plugins.config]
init_sleep_ms = 1500

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "hostile"
"#,
    );
    let first = server.wait_for_workers(1)[0].pid;
    server.signal(libc::SIGTTIN);
    let second = server.wait_for("the second worker", || {
        server
            .live_workers()
            .into_iter()
            .map(|p| p.pid)
            .find(|&pid| pid != first)
    });
    server.wait_for_log_line(&["worker 1 started"]);
    // Clients on each worker.
    let mut on_first = None;
    let mut on_second = Vec::new();
    while on_first.is_none() || on_second.len() < 3 {
        let mut client = server.client();
        let pid: i32 = String::from_utf8(client.request(b"pid"))
            .unwrap()
            .parse()
            .unwrap();
        if pid == first && on_first.is_none() {
            on_first = Some(client);
        } else if pid == second {
            on_second.push(client);
        }
    }
    // The first worker serves its quota: it asks to be replaced, and its
    // successor takes 1.5 s to start.
    let mut on_first = on_first.unwrap();
    for i in 0..40 {
        let _ = on_first.request(format!("n{i}").as_bytes());
    }
    server.wait_for_log_line(&["served max_requests_per_worker"]);
    // Now the second worker's slot goes: its connections must move.
    server.signal(libc::SIGTTOU);
    wait_for_count(&server, "being replaced: handing", 1);
    for (i, client) in on_second.iter_mut().enumerate() {
        let request = format!("still{i}");
        assert_eq!(
            client.request(request.as_bytes()),
            format!("ok:{request}").as_bytes(),
            "connection {i} of the removed worker\n{}",
            server.log()
        );
    }
    assert_eq!(
        server.log_count("closed instead of handed over"),
        0,
        "{}",
        server.log()
    );
    server.stop();
}

/// A hand-over to a worker with no descriptor left lost connections with
/// only "malformed hand-over record" in the log (second hostile pass): the
/// log now says what happened and what to raise.
#[test]
fn a_connection_lost_for_want_of_a_descriptor_says_so() {
    let mut sandbox = Sandbox::new();
    sandbox.set_fd_limit(48);
    let server = sandbox.start(&config("workers = 2", "upper"));
    server.wait_for_workers(2);
    // More connections than one worker can hold within 48 descriptors.
    let mut clients = Vec::new();
    for _ in 0..60 {
        match Client::try_connect(server.port()) {
            Ok(mut client) => {
                client.set_read_timeout(Duration::from_secs(2));
                if client.request(b"x") == b"X" {
                    clients.push(client);
                }
            }
            Err(_) => break,
        }
    }
    server.signal(libc::SIGTTOU);
    server.wait_for_log_line(&["no file descriptor free", "ulimit -n"]);
    assert_eq!(
        server.log_count("malformed hand-over record"),
        0,
        "{}",
        server.log()
    );
    drop(clients);
}

/// Hostile pass: on a `proxy_protocol` listener `on_open` was called at
/// accept, with the load balancer's address, while `process` and
/// `on_close` saw the real client's from the PROXY header. A plugin now
/// hears of the connection once the header has named the client — and not
/// at all for one that never sends a valid header.
#[test]
fn on_open_sees_the_address_from_the_proxy_header() {
    let server = Server::start(
        r#"[server]
workers = 1

[[plugins]]
name = "hostile"
path = "{hostile}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "hostile"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "hostile"
proxy_protocol = true
"#,
    );
    let port = server.aux_port(0);
    // The start-up probe's connections (on {port}) have their own hook
    // lines: once each is closed, count them.
    let before = server.wait_for("the probe's connections to close", || {
        let (open, close) = (
            server.log_count("hook open"),
            server.log_count("hook close"),
        );
        (open > 0 && open == close).then_some(open + close)
    });
    let mut proxied = Client::connect(port);
    proxied
        .send_raw(b"PROXY TCP4 10.1.2.3 127.0.0.1 1111 80\r\n")
        .unwrap();
    assert_eq!(proxied.request(b"x"), b"ok:x");
    drop(proxied);
    // A connection that never sends its header: never announced.
    let mut silent = Client::connect(port);
    silent.send_raw(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    silent.expect_closed();
    server.wait_for_log_line(&["hook close", "peer=10.1.2.3:1111"]);
    let log = server.log();
    let hooks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hook "))
        .skip(before)
        .collect();
    assert!(
        hooks
            .iter()
            .any(|l| l.contains("hook open") && l.contains("peer=10.1.2.3:1111")),
        "{hooks:#?}"
    );
    assert!(
        hooks.iter().all(|l| l.contains("peer=10.1.2.3:1111")),
        "every hook must see the real client, and the header-less connection none: {hooks:#?}"
    );
}

// ------------------------------------------------------------ memory budget

/// Hostile pass 7: the bytes a connection brought with it when a worker
/// took it over were not counted against that worker's
/// `max_buffered_bytes`, so each reload let clients fill one more budget.
/// Four clients hold 0.9 MB of a 1 MiB frame each (within 5 MiB), a
/// reload moves them, and four more do the same: the new worker must close
/// the largest holders down to its budget (old code: all eight stayed).
#[test]
fn connections_taken_over_count_against_the_new_workers_buffer_budget() {
    const FRAME: usize = 1024 * 1024;
    const PART: usize = 900_000;
    let keys = format!(
        "workers = 1\nmax_frame_bytes = {FRAME}\nmax_buffered_bytes = {}",
        5 * FRAME
    );
    let mut server = Server::start(&config(&keys, "echo"));
    let partial_frame = |server: &Server| {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        let mut bytes = format!("{FRAME:010}").into_bytes();
        bytes.resize(10 + PART, b'x');
        // Fails once the worker has closed this connection: counted below.
        let _ = stream.write_all(&bytes);
        stream
    };
    let open = |clients: &[TcpStream]| clients.iter().filter(|c| !closed(c)).count();
    let mut clients: Vec<TcpStream> = (0..4).map(|_| partial_frame(&server)).collect();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(open(&clients), 4, "{}", server.log());
    let old_pid = server.wait_for_workers(1)[0].pid;
    server.sandbox_mut().write_config(&config(&keys, "echo"));
    server.signal(libc::SIGHUP);
    wait_for_count(&server, "reload complete in", 1);
    server.wait_for_log_line(&[&format!(
        "replaced worker 0 (pid {old_pid}) finished draining"
    )]);
    assert_eq!(open(&clients), 4, "moved, not closed\n{}", server.log());
    clients.extend((0..4).map(|_| partial_frame(&server)));
    let still_open = server.wait_for("the new worker to apply its budget", || {
        let n = open(&clients);
        (n <= 5).then_some(n)
    });
    assert!(still_open >= 4, "{still_open} open\n{}", server.log());
    assert!(
        server.log_count("over max_buffered_bytes") >= 1,
        "{}",
        server.log()
    );
}

/// Whether the server has closed `stream` (EOF or reset waiting), without
/// consuming or blocking.
fn closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let seen = stream.peek(&mut byte);
    stream.set_nonblocking(false).unwrap();
    !matches!(seen, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
