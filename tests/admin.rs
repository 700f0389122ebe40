//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz`,
//! read with a real HTTP client (curl; `.ci/run` installs it if missing).
//! The numbers must match the traffic the test sent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use nbnet_tests::{wait_until, Client, Sandbox, Server, IO_TIMEOUT, SIGTERM};

fn curl(port: u16, path: &str) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("run curl: install it with `bash tests/install-deps.sh` (or apt-get install curl), or use `make test`, which does");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The value of the first sample line starting with `series`.
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_count_connections_requests_bytes_errors_panics_and_hangs() {
    let server = Sandbox::new().start(
        r#"[server]
workers = 2
plugin_timeout = "1s"

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "faulty"
path = "{misbehave_rs}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "faulty"
"#,
    );
    let admin = server.admin_port();
    let (code, body) = curl(admin, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (_, before) = curl(admin, "/metrics");
    let requests_before = metric(&before, "nbnet_plugin_requests_total{plugin=\"upper\"}");
    let connections_before = metric(&before, "nbnet_connections_total{worker=\"all\"}");

    // 10 requests of 5 bytes on one connection to `upper`.
    let mut client = Client::connect(server.port());
    for _ in 0..10 {
        assert_eq!(client.request(b"hello"), b"HELLO");
    }
    // A caught panic, a plugin error, and a protocol error.
    let faulty = server.port_n(1);
    Client::connect(faulty).send_frame(b"panic").unwrap();
    Client::connect(faulty).send_frame(b"error").unwrap();
    let mut bad = Client::connect(server.port());
    bad.send_raw(b"00000000x1").unwrap();
    bad.expect_closed();

    let body = wait_until(Duration::from_secs(5), "panic and error counted", || {
        let (_, body) = curl(admin, "/metrics");
        (metric(&body, "nbnet_plugin_errors_total{plugin=\"faulty\"}") >= 2.0).then_some(body)
    });
    assert_eq!(
        metric(&body, "nbnet_plugin_requests_total{plugin=\"upper\"}") - requests_before,
        10.0
    );
    assert_eq!(
        metric(&body, "nbnet_plugin_panics_total{plugin=\"faulty\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "nbnet_plugin_errors_total{plugin=\"faulty\"}"),
        2.0
    );
    assert!(metric(&body, "nbnet_protocol_errors_total{worker=\"all\"}") >= 1.0);
    assert!(
        metric(&body, "nbnet_connections_total{worker=\"all\"}") - connections_before >= 4.0,
        "4 connections were opened\n{body}"
    );
    // 10 requests of 15 bytes each (10-byte header + 5) reached `upper`.
    assert!(metric(&body, "nbnet_bytes_received_total{worker=\"all\"}") >= 150.0);
    assert!(metric(&body, "nbnet_bytes_sent_total{worker=\"all\"}") >= 150.0);
    assert_eq!(
        metric(
            &body,
            "nbnet_plugin_latency_seconds_count{plugin=\"upper\"}"
        ),
        metric(&body, "nbnet_plugin_requests_total{plugin=\"upper\"}")
    );
    assert!(body.contains("nbnet_plugin_latency_seconds_bucket{plugin=\"upper\",le=\"+Inf\"}"));
    assert!(body.contains("# TYPE nbnet_plugin_latency_seconds histogram"));
    assert_eq!(metric(&body, "nbnet_workers{role=\"serving\"}"), 2.0);

    // A hung call: the watchdog kills the worker; the counters say so.
    Client::connect(faulty).send_frame(b"hang").unwrap();
    let body = wait_until(Duration::from_secs(10), "hang counted", || {
        let (_, body) = curl(admin, "/metrics");
        (body.contains("nbnet_plugin_timeouts_total{plugin=\"faulty\"} 1")
            && metric(&body, "nbnet_worker_restarts_total") >= 1.0)
            .then_some(body)
    });
    assert!(
        body.lines()
            .any(|l| l.starts_with("nbnet_worker_last_exit_info{") && l.contains("watchdog")),
        "{body}"
    );
    // Totals never go backwards: the dead worker's requests are still counted.
    assert!(
        metric(&body, "nbnet_plugin_requests_total{plugin=\"upper\"}") - requests_before >= 10.0
    );

    assert_eq!(curl(admin, "/nope").0, 404);
    let post = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{admin}/metrics"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");
}

#[test]
fn healthz_turns_503_while_the_server_drains() {
    let mut server = Sandbox::new().start(
        r#"[server]
workers = 1
shutdown_timeout = "10s"

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
    let admin = server.admin_port();
    assert_eq!(curl(admin, "/healthz").0, 200);
    // Hold the drain open with half a frame, so the master is still up.
    let mut client = Client::connect(server.port());
    client.send_raw(b"0000000005ab").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    server.signal(SIGTERM);
    let (code, body) = wait_until(Duration::from_secs(5), "healthz 503", || {
        let reply = curl(admin, "/healthz");
        (reply.0 == 503).then_some(reply)
    });
    assert_eq!((code, body.as_str()), (503, "stopping\n"));
    // Finishing the frame lets the drain complete.
    client.send_raw(b"cde").unwrap();
    assert_eq!(client.read_frame().unwrap(), b"ABCDE");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("master exits after the drain");
    assert!(status.success());
}

// ------------------------------------------------ malformed and hostile HTTP

/// One worker, one listener, an admin listener.
const WITH_ADMIN: &str = r#"[server]
workers = 1

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#;

/// Sends `request` as raw bytes and reads the whole answer, until the
/// server closes (a reset is an error).
fn raw_request(port: u16, request: &[u8]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The status line of an answer, or what came instead.
fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("(no answer)")
}

/// Issue 9: a malformed request got no answer and a close after 5 s.
#[test]
fn malformed_requests_get_400_and_lf_only_line_ends_are_accepted() {
    let server = Server::start(WITH_ADMIN);
    let admin = server.admin_port();
    for (what, request) in [
        ("a bare blank line", b"\r\n\r\n".as_slice()),
        (
            "a non-UTF-8 request line",
            b"\xff\xfe\xfd /metrics HTTP/1.1\r\n\r\n",
        ),
        ("a request line without a version", b"GET /metrics\r\n\r\n"),
        (
            "a header line without a colon",
            b"GET /metrics HTTP/1.1\r\nHost\r\n\r\n",
        ),
    ] {
        let answer = raw_request(admin, request).unwrap();
        assert_eq!(
            status_line(&answer),
            "HTTP/1.1 400 Bad Request",
            "{what}: {answer:?}"
        );
        assert!(
            answer.contains("\r\n\r\nbad request: "),
            "{what}: {answer:?}"
        );
    }
    // RFC 9112 §2.2: a recipient may take a lone LF as a line end.
    let answer = raw_request(admin, b"GET /metrics HTTP/1.1\n\n").unwrap();
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK", "{answer:?}");
    assert!(answer.contains("nbnet_workers"), "{answer:?}");
    let answer = raw_request(admin, b"GET /healthz HTTP/1.0\nHost: x\n\n").unwrap();
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK", "{answer:?}");
}

/// Issue 9: a 100 KB header could get a reset instead of its 431: the
/// answer must arrive whole, and the client's write must not fail.
#[test]
fn an_oversized_header_gets_431_read_fully_without_a_reset() {
    let server = Server::start(WITH_ADMIN);
    let mut request = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    request.resize(100 * 1000, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let answer = raw_request(server.admin_port(), &request)
        .unwrap_or_else(|e| panic!("a 100 KB header: {e} (reset instead of an answer?)"));
    assert_eq!(
        status_line(&answer),
        "HTTP/1.1 431 Request Header Fields Too Large",
        "{answer:?}"
    );
    assert!(
        answer.ends_with("request head over 8192 bytes\n"),
        "{answer:?}"
    );
    // The admin endpoint is fine afterwards.
    assert_eq!(curl(server.admin_port(), "/healthz").0, 200);
}

/// Open descriptors of a process.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Issue 8 (admin): every admin connection was kept, so clients could make
/// the master hold any number of sockets and buffers. At most 64 are kept;
/// the oldest gives way, so idle connections cannot lock out health checks.
#[test]
fn idle_admin_connections_are_bounded_and_do_not_lock_out_healthz() {
    let server = Server::start(WITH_ADMIN);
    let admin = server.admin_port();
    assert_eq!(curl(admin, "/healthz").0, 200);
    let before = open_fds(server.pid());
    let idle: Vec<TcpStream> = (0..200)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", admin))
                .unwrap_or_else(|e| panic!("idle admin connection {i}: {e}"))
        })
        .collect();
    // Answered after the master accepted every idle connection before it.
    let answer = raw_request(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(status_line(&answer), "HTTP/1.1 200 OK", "{answer:?}");
    assert!(answer.ends_with("ok\n"), "{answer:?}");
    let held = open_fds(server.pid()).saturating_sub(before);
    println!("master holds {held} more descriptors with 200 idle admin connections");
    assert!(held <= 64, "the master holds {held} admin connections");
    // The oldest were told why, then closed.
    let mut first = &idle[0];
    first.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert_eq!(
        status_line(&answer),
        "HTTP/1.1 503 Service Unavailable",
        "{answer:?}"
    );
    server.wait_for_log_line(&["more than 64 clients at once; closing the oldest"]);
}
