//! The reload machinery itself (issue 11, section 4), tried as a hostile
//! user would: a reload whose plugin check is slow must not hold up the
//! master; old workers that ignore SIGTERM are killed once their drain time
//! is up; reloads queue (and coalesce) instead of piling up generations of
//! workers or being ignored; `[admin] addr`, `[server] pid_file` and
//! `[log] level` take effect; and `nbnet reload` waits for the outcome of
//! its reload and exits non-zero with the master's reason.
//!
//! The hostile C plugin (`plugins/testing/c/hostile.c`) plays the slow or
//! stubborn plugin: `init_sleep_ms`, `catch_term`, `init_exit`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{wait_until, Server};

/// One listener serving the hostile plugin, whose `[plugins.config]` lines
/// are `init`, with `[server]` lines `server` and an admin listener.
fn hostile(server: &str, init: &str) -> String {
    format!(
        r#"[server]
{server}

[admin]
addr = "127.0.0.1:{{admin}}"

[[plugins]]
name = "hostile"
path = "{{hostile}}"

[plugins.config]
{init}

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "hostile"
"#
    )
}

/// `GET path` on 127.0.0.1:`port`: the status code and body; `None` if
/// nothing answers within `timeout`.
fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((code, body.to_string()))
}

/// The value of the sample `series` in a `/metrics` body.
fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Log lines containing `needle`.
fn count(server: &Server, needle: &str) -> usize {
    server.log_count(needle)
}

/// Waits (bounded) until the log has `n` lines containing `needle`.
fn wait_log(server: &Server, needle: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count(server, needle) < n {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {n} log line(s) with {needle:?}\n--- nbnet log ---\n{}",
            server.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------ 2. old workers that never finish draining

/// A plugin that catches SIGTERM keeps its worker from ever draining. The
/// master kills such an old worker once `shutdown_timeout` and the grace
/// period are over, logs it with how long it drained and how many
/// connections it had, and counts it — before, they lived on indefinitely.
#[test]
fn old_workers_that_ignore_sigterm_are_killed_when_their_drain_time_is_up() {
    let server_section = "workers = 2\nshutdown_timeout = \"1s\"";
    let mut server = Server::start(&hostile(server_section, "catch_term = true"));
    let admin = server.admin_port();
    let old = server.wait_for_workers(2);
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"ok:hi");

    server.sandbox_mut().write_config(&hostile(
        server_section,
        "catch_term = true\ninit_sleep_ms = 1",
    ));
    server.signal(libc::SIGHUP);
    wait_log(&server, "reload complete", 1, Duration::from_secs(15));
    // 1 s of shutdown_timeout + 5 s of grace, and slack for a busy machine.
    wait_until(
        Duration::from_secs(20),
        "the old workers to be killed",
        || old.iter().all(|w| !w.alive()).then_some(()),
    );
    let log = server.log();
    let killed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("after it was told to drain") && l.contains("killing it"))
        .collect();
    assert_eq!(killed.len(), 2, "one line per old worker killed\n{log}");
    assert!(
        killed.iter().any(|l| l.contains("1 connection(s) open")),
        "the worker holding the client's connection says so\n{log}"
    );
    let (code, body) = http_get(admin, "/metrics", Duration::from_secs(5)).expect("/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&body, "nbnet_drain_kills_total"), Some(2), "{body}");
    // The new workers serve.
    let mut client = server.client();
    assert_eq!(client.request(b"again"), b"ok:again");
}
