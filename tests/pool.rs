//! Thread-pool offload (issue 12): `[[plugins]] threads = N` runs N
//! instances of a blocking plugin on a pool in each worker; the reactor and
//! the other listeners keep being served while the pool is busy.

use std::io::Read;

use nbnet_tests::{Client, Server};

/// `misbehave` (C, blocking `sleep:MS`, `hang`, `thread`, `pid`) on a pool
/// of `threads` on `{port}`, `upper` inline on `{port2}`, one worker.
fn config(threads: usize, server: &str) -> String {
    format!(
        r#"[server]
workers = 1
{server}

[[plugins]]
name = "slow"
path = "{{misbehave}}"
threads = {threads}

[[plugins]]
name = "fast"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "slow"

[[listeners]]
addr = "127.0.0.1:{{port2}}"
plugin = "fast"
"#
    )
}

/// Whether `client` has anything to read (or EOF) right now.
fn has_data(client: &mut Client) -> bool {
    client.stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let ready = !matches!(client.stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    client.stream.set_nonblocking(false).unwrap();
    ready
}

#[test]
fn a_saturated_pool_does_not_stall_the_inline_listener_and_each_instance_knows_its_thread() {
    let server = Server::start(&config(4, ""));
    let slow_port = server.port_n(0);
    let fast_port = server.port_n(1);
    // Every instance is told the pool's size.
    let answer = Client::connect(slow_port).request(b"thread");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (index, size) = text
        .strip_prefix("thread ")
        .and_then(|t| t.split_once('/'))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(size, "4", "{text}");
    assert!(index.parse::<u32>().unwrap() < 4, "{text}");
    // Saturate the pool: more blocking requests than threads, pipelined too.
    let mut slow: Vec<Client> = (0..6).map(|_| Client::connect(slow_port)).collect();
    for client in &mut slow {
        client.send_frame(b"sleep:1500").unwrap();
        client.send_frame(b"pid").unwrap();
    }
    // Meanwhile the inline listener of the same worker answers at once.
    let mut fast = Client::connect(fast_port);
    for i in 0..200 {
        let payload = format!("fast request {i}");
        assert_eq!(
            fast.request(payload.as_bytes()),
            payload.to_uppercase().as_bytes()
        );
    }
    // ... while no blocking request has been answered yet.
    for client in &mut slow {
        assert!(
            !has_data(client),
            "a 1.5 s sleep answered before 200 inline requests"
        );
    }
    let worker = fast_pid(&server);
    for client in &mut slow {
        assert_eq!(client.read_frame().unwrap(), b"slept 1500");
        // The answers keep request order on each connection.
        let pid = String::from_utf8(client.read_frame().unwrap()).unwrap();
        assert_eq!(pid.parse::<i32>().unwrap(), worker);
    }
}

/// The single worker's pid.
fn fast_pid(server: &Server) -> i32 {
    let workers = server.wait_for_workers(1);
    workers[0].pid
}

#[test]
fn a_hang_on_a_pool_thread_fails_that_request_and_the_worker_is_replaced_gracefully() {
    let server = Server::start(&config(
        2,
        r#"plugin_timeout = "500ms"
shutdown_timeout = "5s""#,
    ));
    let slow_port = server.port_n(0);
    let mut bystander = Client::connect(slow_port);
    let old_pid = bystander.worker_pid();
    let mut victim = Client::connect(slow_port);
    victim.send_frame(b"hang").unwrap();
    victim.expect_closed();
    server.wait_for_log_line(&["slow", "pool thread", "over plugin_timeout = 500ms"]);
    // The worker's other connections go on being served (by the free thread
    // now, by the replacement once it takes over)...
    assert_eq!(bystander.request(b"echo me"), b"echo me");
    // ... and the worker is replaced gracefully, not killed.
    let new_pid = server.wait_for("a replacement worker to serve", || {
        let mut client = Client::try_connect(slow_port).ok()?;
        let pid = client.worker_pid();
        (pid != old_pid).then_some(pid)
    });
    assert_ne!(new_pid, old_pid);
    assert_eq!(bystander.request(b"still here"), b"still here");
    let log = server.log();
    assert!(!log.contains("killing the worker"), "{log}");
    let mut rest = Vec::new();
    let _ = victim.stream.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

/// Hostile pass 4: requests queued behind a stuck pool thread (the only
/// one) waited for it until `deferred_timeout` failed them and closed
/// their connections, although the worker was being replaced. Now a spare
/// thread serves the pool until the replacement takes over, and the
/// hand-over takes what no thread started back from the pool: every
/// request is answered in order, and the connections move to the
/// replacement.
#[test]
fn requests_queued_behind_a_stuck_pool_thread_are_answered_and_move() {
    let server = Server::start(&config(
        1,
        r#"plugin_timeout = "500ms"
deferred_timeout = "15s"
shutdown_timeout = "20s""#,
    ));
    let old_pid = fast_pid(&server);
    let mut victim = Client::connect(server.port_n(0));
    victim.send_frame(b"hang").unwrap();
    // The hang takes the thread before the others arrive.
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Queued behind the hang, pipelined: each waits for the one thread.
    let mut queued: Vec<Client> = (0..3)
        .map(|i| {
            let mut client = Client::connect(server.port_n(0));
            for n in 0..2 {
                client
                    .send_frame(format!("sleep:{}", 10 * (i + n)).as_bytes())
                    .unwrap();
            }
            client
        })
        .collect();
    victim.expect_closed();
    for (i, client) in queued.iter_mut().enumerate() {
        // Well before deferred_timeout (the old code closed them then).
        client.set_read_timeout(std::time::Duration::from_secs(10));
        for n in 0..2 {
            let answer = client
                .read_frame()
                .unwrap_or_else(|e| panic!("client {i}, request {n}: {e}\n{}", server.log()));
            assert_eq!(answer, format!("slept {}", 10 * (i + n)).into_bytes());
        }
    }
    // Then they move: the replacement serves them, on the same connections.
    for (i, client) in queued.iter_mut().enumerate() {
        let pid = server.wait_for("the connection to move to the replacement", || {
            let pid = client.worker_pid();
            (pid != old_pid).then_some(pid)
        });
        assert_ne!(pid, old_pid, "client {i}");
    }
    let log = server.log();
    assert!(!log.contains("deferred_timeout"), "{log}");
}

/// A reload while a pool has a backlog, from a client that pipelined its
/// requests and shut its sending side: the requests no thread started
/// move with the connection to the new worker, every one is answered in
/// order, then the client sees the EOF (not a close with requests lost).
#[test]
fn a_reload_moves_a_pool_backlog_even_from_a_half_closed_client() {
    let server = Server::start(&config(1, r#"shutdown_timeout = "20s""#));
    let old_pid = fast_pid(&server);
    let mut client = Client::connect(server.port_n(0));
    for n in 0..6 {
        client
            .send_frame(format!("sleep:{}", 200 + n).as_bytes())
            .unwrap();
    }
    client.send_frame(b"pid").unwrap();
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    server.signal(libc::SIGHUP);
    for n in 0..6 {
        let answer = client
            .read_frame()
            .unwrap_or_else(|e| panic!("request {n}: {e}\n{}", server.log()));
        assert_eq!(answer, format!("slept {}", 200 + n).into_bytes());
    }
    let pid: i32 = String::from_utf8(client.read_frame().unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        pid, old_pid,
        "the last request is answered by the new worker"
    );
    let mut rest = Vec::new();
    client.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.wait_for_log_line(&[
        "request(s) the thread pool had not started go with their 1 connection(s)",
    ]);
}

/// The worker's resident memory, in bytes.
fn resident_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Hostile pass 5: requests a client pipelined to a busy pool were copied
/// into the pool's queue without limit (3 connections x 100 requests of
/// 1 MiB: 430 MB resident), counted neither against the connection's
/// `max_pending_output_bytes` nor the worker's `max_buffered_bytes`. Now
/// the copies are the connection's until answered: past the limit the
/// worker stops reading it.
#[test]
fn requests_queued_for_a_pool_count_against_the_connections_limits() {
    let server = Server::start(&config(
        1,
        r#"max_frame_bytes = 1048576
deferred_timeout = "60s""#,
    ));
    let pid = fast_pid(&server);
    let before = resident_bytes(pid);
    let port = server.port_n(0);
    let frame = {
        let mut payload = b"sleep:3000|".to_vec();
        payload.resize(1 << 20, b'x');
        nbnet_tests::frame(&payload)
    };
    // Up to 48 MiB of requests, for 3 s, as fast as the worker takes them.
    let writer = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_write_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let start = std::time::Instant::now();
        let mut sent = 0usize;
        let all: Vec<u8> = frame.repeat(48);
        while sent < all.len() && start.elapsed() < std::time::Duration::from_secs(3) {
            let end = (sent + (64 << 10)).min(all.len());
            match std::io::Write::write(&mut stream, &all[sent..end]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {} // timed out: the worker is not reading; look again
            }
        }
        (stream, sent)
    });
    let (_stream, sent) = writer.join().unwrap();
    let grown = resident_bytes(pid).saturating_sub(before);
    assert!(
        grown < 24 << 20,
        "the worker grew by {} MiB for a client that sent {} MiB to a busy pool",
        grown >> 20,
        sent >> 20
    );
}

/// Hostile pass 5: the worker taking a connection over refused it when
/// the requests it brought (taken back from the old worker's pool) were
/// more than `max_buffered_bytes`, although one connection alone may hold
/// more than that: every pipelining client of a pool listener was reset at
/// a reload, its requests lost.
#[test]
fn a_reload_moves_a_backlog_larger_than_max_buffered_bytes() {
    let server = Server::start(&config(
        1,
        r#"max_frame_bytes = 65536
max_buffered_bytes = 65536
shutdown_timeout = "20s""#,
    ));
    let mut client = Client::connect(server.port_n(0));
    let payload = |n: usize| {
        let mut p = format!("sleep:{}|", 5 + n % 2).into_bytes();
        p.resize(3000, b'x');
        p
    };
    let mut bytes = Vec::new();
    for n in 0..100 {
        bytes.extend_from_slice(&nbnet_tests::frame(&payload(n)));
    }
    client.send_raw(&bytes).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"slept 5");
    server.signal(libc::SIGHUP);
    for n in 1..100 {
        let answer = client
            .read_frame()
            .unwrap_or_else(|e| panic!("answer {n}: {e}\n{}", server.log()));
        assert_eq!(answer, format!("slept {}", 5 + n % 2).into_bytes());
    }
    assert_eq!(server.log_count("cannot take the requests"), 0);
}

/// Hostile pass 6: on a pool thread, an instance's writes (and `grow`)
/// were limited by the protocol's largest frame (9 999 999 999 bytes), not
/// by `max_frame_bytes`: a plugin sizing its answer from client input let
/// one request make the worker allocate hundreds of MB before the answer
/// was refused at completion. The write is refused at the limit now, as on
/// the worker's thread.
#[test]
fn a_pool_instance_cannot_write_past_max_frame_bytes() {
    let server = Server::start(&config(1, "max_frame_bytes = 65536"));
    let mut client = Client::connect(server.port_n(0));
    client.send_frame(b"big:1000000").unwrap();
    client.expect_closed();
    let line = server.wait_for_log_line(&["misbehave: response too big"]);
    assert!(!line.contains("9999999999"), "{line}");
    // (Not refused only once complete: "its deferred answer of N bytes".)
    assert_eq!(
        server.log_count("deferred answer of"),
        0,
        "{}",
        server.log()
    );
}

/// Hostile pass 6: the pool took requests first come, first served, so one
/// client that pipelined a backlog of slow requests kept every other
/// client of the worker waiting behind all of it (closed at
/// `deferred_timeout`). Connections now take turns.
#[test]
fn one_clients_backlog_does_not_starve_another_client_of_the_pool() {
    let server = Server::start(&config(1, r#"deferred_timeout = "30s""#));
    let mut hog = Client::connect(server.port_n(0));
    let mut backlog = Vec::new();
    for _ in 0..50 {
        backlog.extend_from_slice(&nbnet_tests::frame(b"sleep:100"));
    }
    hog.send_raw(&backlog).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    let mut other = Client::connect(server.port_n(0));
    // Behind 5 s of the hog's requests first come, first served; its
    // turn comes after one of them now.
    other.set_read_timeout(std::time::Duration::from_secs(2));
    assert_eq!(other.request(b"sleep:1"), b"slept 1");
    assert_eq!(hog.read_frame().unwrap(), b"slept 100");
}

/// Hostile pass 6: a client that pipelined slow requests to a pool and
/// reset the connection had them all run for nobody (the worker, not
/// reading it, did not notice the reset). They are dropped now.
#[test]
fn a_reset_client_s_queued_pool_requests_are_dropped() {
    let server = Server::start(&config(1, r#"deferred_timeout = "30s""#));
    let hog = Client::connect(server.port_n(0));
    let mut backlog = Vec::new();
    for _ in 0..50 {
        backlog.extend_from_slice(&nbnet_tests::frame(b"sleep:100"));
    }
    let mut stream = hog.stream;
    std::io::Write::write_all(&mut stream, &backlog).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    // Reset (SO_LINGER 0, then close).
    nbnet_tests::linger_zero(&stream);
    drop(stream);
    // A second's worth of the hog's requests would have run by now.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (_, calls) = Client::connect(server.port_n(0)).ok();
    assert!(
        calls <= 4,
        "the instance ran {calls} requests: the reset client's kept running\n{}",
        server.log()
    );
}

#[test]
fn threads_out_of_range_is_refused_naming_the_plugin() {
    let out = nbnet_tests::check(&config(100_000, ""));
    assert_ne!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("plugin \"slow\": threads = 100000 is out of range"),
        "{}",
        out.stderr
    );
}

/// Issue 12: a crash on a pool thread ended the worker with no plugin
/// named (the scoreboard only tracked the reactor thread's calls).
#[test]
fn a_crash_on_a_pool_thread_is_logged_naming_the_plugin() {
    let server = Server::start(&config(1, ""));
    // The crash comes 300 ms after the reactor handed it over (behind a
    // sleep on the one pool thread, from another connection, whose answer
    // may or may not get out first): the reactor thread is idle then.
    let mut sleeper = Client::connect(server.port_n(0));
    sleeper.send_frame(b"sleep:300").unwrap();
    let mut victim = Client::connect(server.port_n(0));
    victim.send_frame(b"crash").unwrap();
    victim.expect_closed();
    let line = server.wait_for_log_line(&["SIGABRT", "worker 0"]);
    assert!(
        line.contains(r#"while plugin "slow" had calls running on its pool threads"#)
            && !line.contains("while running plugin"),
        "{line}"
    );
    // The replacement serves.
    let answer = server.wait_for("a replacement worker", || {
        Client::try_connect(server.port_n(1))
            .ok()
            .map(|mut c| c.request(b"after"))
    });
    assert_eq!(answer, b"AFTER");
}

/// Issue 12: the eventfd that wakes the worker for deferred answers (and
/// pool answers) was inherited by the processes plugins fork, unlike the
/// worker's other descriptors (fork_guard).
#[test]
fn a_child_a_plugin_forks_does_not_inherit_the_workers_waker() {
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
    let worker = server.wait_for_workers(1)[0].pid;
    let eventfds = |pid: i32| -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| l.to_string_lossy() == "anon_inode:[eventfd]")
            })
            .count()
    };
    assert!(eventfds(worker) >= 1, "the worker has its waker");
    let daemon: i32 = String::from_utf8(server.client().request(b"daemon"))
        .unwrap()
        .parse()
        .unwrap();
    // (The child closes the host's descriptors right after fork, maybe
    // after its parent answered: wait for that.)
    server.wait_for("the plugin's child to close the worker's waker", || {
        (eventfds(daemon) == 0).then_some(())
    });
}

/// Issue 12: `--check` made a pool's N instances (N inits, N threads: N
/// database connections for a plugin like redis-cache) to check one config.
#[test]
fn check_validates_a_pool_with_one_instance() {
    let out = nbnet_tests::check(&config(4, ""));
    assert!(out.status.success(), "{}", out.stderr);
    let inits = out.stderr.matches("misbehave init").count();
    assert_eq!(inits, 1, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("(threads = 4: checked with one instance, thread 0 of 4)"),
        "{}",
        out.stdout
    );
}
