//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz`,
//! read with a real HTTP client (curl; `.ci/run` installs it if missing).
//! The numbers must match the traffic the test sent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use nbnet_tests::{
    metric_sum, promtool_check, require_program, samples, wait_until, Client, Sandbox, Server,
    IO_TIMEOUT, SIGTERM,
};

fn curl(port: u16, path: &str) -> (u16, String) {
    let Some(curl) = require_program("curl", "curl") else {
        return (0, String::new());
    };
    let output = Command::new(curl)
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
    if require_program("curl", "curl").is_none() {
        return;
    }
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
    let connections_before = metric_sum(&before, "nbnet_connections_total");

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
    assert!(metric_sum(&body, "nbnet_protocol_errors_total") >= 1.0);
    assert!(
        metric_sum(&body, "nbnet_connections_total") - connections_before >= 4.0,
        "4 connections were opened\n{body}"
    );
    // 10 requests of 15 bytes each (10-byte header + 5) reached `upper`.
    assert!(metric_sum(&body, "nbnet_received_bytes_total") >= 150.0);
    assert!(metric_sum(&body, "nbnet_sent_bytes_total") >= 150.0);
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
        body.lines().any(|l| l
            == "nbnet_worker_last_exit_info{worker=\"0\",reason=\"watchdog\"} 1"
            || l == "nbnet_worker_last_exit_info{worker=\"1\",reason=\"watchdog\"} 1"),
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
    if require_program("curl", "curl").is_none() {
        return;
    }
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
    if require_program("curl", "curl").is_none() {
        return;
    }
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
    if require_program("curl", "curl").is_none() {
        return;
    }
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

// ------------------------------------------------------ what /metrics says

/// One sample's value, by its exact series (`name{labels}`).
fn exact(body: &str, series: &str) -> f64 {
    metric(body, series)
}

/// Issue 14: `/metrics` had a `worker="all"` series beside the per-worker
/// ones (so `sum()` counted everything twice), a `pid` label (a new series
/// at every restart), a sentence as the `reason` label, counters without a
/// series until first used, and a 404 for `/metrics?x=1`. Prometheus' own
/// parser (promtool) must accept the body, and the sums must add up.
#[test]
fn metrics_parse_with_promtool_add_up_start_at_zero_and_survive_a_worker_crash() {
    let server = Server::start(
        r#"[server]
workers = 2

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
    let get = |path: &str| {
        let answer = raw_request(
            admin,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .expect("GET /metrics");
        assert_eq!(status_line(&answer), "HTTP/1.1 200 OK", "{answer}");
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    };
    let workers = server.wait_for_workers(2);

    // Before any traffic: every known series is there, at 0.
    let body = get("/metrics");
    let Some(()) = promtool_check(&body) else {
        return;
    };
    for series in [
        "nbnet_plugin_timeouts_total{plugin=\"upper\"}",
        "nbnet_plugin_errors_total{plugin=\"upper\"}",
        "nbnet_reloads_total{outcome=\"done\"}",
        "nbnet_reloads_total{outcome=\"rolled_back\"}",
        "nbnet_worker_exits_total{reason=\"signal\"}",
        "nbnet_protocol_errors_total{worker=\"0\",kind=\"bad_header\"}",
        "nbnet_read_timeouts_total{worker=\"1\",state=\"mid_frame\"}",
        "nbnet_max_connections_reached_total{worker=\"1\"}",
    ] {
        assert_eq!(exact(&body, series), 0.0, "{series}\n{body}");
    }
    assert!(
        body.lines()
            .any(|l| l.starts_with("nbnet_build_info{version=\"")
                && l.contains(",abi=\"")
                && l.ends_with("} 1")),
        "{body}"
    );
    assert!(exact(&body, "process_open_fds") >= 3.0, "{body}");
    assert!(
        exact(&body, "process_resident_memory_bytes") > 0.0,
        "{body}"
    );
    assert!(exact(&body, "process_start_time_seconds") > 1.0e9, "{body}");
    let mut pids: Vec<f64> = samples(&body, "nbnet_worker_pid")
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    pids.sort_by(f64::total_cmp);
    let mut real: Vec<f64> = workers.iter().map(|w| f64::from(w.pid)).collect();
    real.sort_by(f64::total_cmp);
    assert_eq!(pids, real, "{body}");
    assert_eq!(samples(&body, "nbnet_worker_open_fds").len(), 2, "{body}");
    assert!(metric_sum(&body, "nbnet_worker_resident_memory_bytes") > 0.0);

    // Traffic on several connections (the kernel spreads them over both
    // workers), a protocol error, then one worker killed.
    let connections = 6;
    for _ in 0..connections {
        let mut client = Client::connect(server.port());
        for _ in 0..5 {
            assert_eq!(client.request(b"hi"), b"HI");
        }
    }
    let mut bad = Client::connect(server.port());
    bad.send_raw(b"00000000x1").unwrap();
    bad.expect_closed();
    let requests = f64::from(connections * 5);
    // Server::start's probe request is in there too: counted from here.
    let before = body.clone();
    let since = |body: &str, name: &str| metric_sum(body, name) - metric_sum(&before, name);
    let adds_up = |body: &str| {
        // No aggregate beside the per-worker series, no pid label, no
        // sentence in a label.
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            assert!(!line.contains("worker=\"all\""), "{line}");
            assert!(!line.contains("pid=\""), "{line}");
            assert!(
                !line.contains("reason=\"")
                    || !line.contains(' ')
                    || line.matches(' ').count() == 1,
                "{line}"
            );
        }
        assert_eq!(since(body, "nbnet_requests_total"), requests, "{body}");
        assert_eq!(
            since(body, "nbnet_plugin_requests_total"),
            requests,
            "{body}"
        );
        assert_eq!(
            since(body, "nbnet_plugin_latency_seconds_count"),
            requests,
            "{body}"
        );
        // Each connection sent 5 frames of 12 bytes; the bad one 10 bytes.
        assert_eq!(
            since(body, "nbnet_received_bytes_total"),
            requests * 12.0 + 10.0,
            "{body}"
        );
        assert_eq!(since(body, "nbnet_sent_bytes_total"), requests * 12.0);
        assert_eq!(
            since(body, "nbnet_connections_total"),
            f64::from(connections + 1),
            "{body}"
        );
        assert_eq!(metric_sum(body, "nbnet_protocol_errors_total"), 1.0);
        assert_eq!(
            samples(body, "nbnet_protocol_errors_total")
                .iter()
                .filter(|(labels, v)| labels.ends_with("kind=\"bad_header\"") && *v == 1.0)
                .count(),
            1,
            "{body}"
        );
    };
    let body = server.wait_for("the bad connection counted", || {
        let body = get("/metrics");
        (metric_sum(&body, "nbnet_protocol_errors_total") == 1.0).then_some(body)
    });
    promtool_check(&body);
    adds_up(&body);

    nbnet_tests::send_signal(workers[0].pid, libc::SIGKILL);
    let body = server.wait_for("the killed worker restarted", || {
        let body = get("/metrics?from=prometheus&x=1");
        (exact(&body, "nbnet_worker_restarts_total") == 1.0
            && exact(&body, "nbnet_workers{role=\"serving\"}") == 2.0)
            .then_some(body)
    });
    promtool_check(&body);
    // The dead worker's numbers are still in its slot's series.
    adds_up(&body);
    assert_eq!(
        exact(&body, "nbnet_worker_exits_total{reason=\"signal\"}"),
        1.0
    );
    assert_eq!(
        samples(&body, "nbnet_worker_last_exit_info"),
        [("worker=\"0\",reason=\"signal\"", 1.0)],
        "{body}"
    );
    assert!(!samples(&body, "nbnet_worker_pid")
        .iter()
        .any(|(_, pid)| *pid == f64::from(workers[0].pid)));

    // HEAD: the headers of GET without the body; other methods: 405 + Allow.
    let head = raw_request(admin, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after HEAD: {head}");
    assert!(head.contains("Content-Length: "), "{head}");
    let post = raw_request(
        admin,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(
        status_line(&post),
        "HTTP/1.1 405 Method Not Allowed",
        "{post}"
    );
    assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
}

/// Issue 14: reloads counted by outcome.
#[test]
fn reloads_are_counted_by_outcome() {
    let mut server = Server::start(WITH_ADMIN);
    let admin = server.admin_port();
    let get = || {
        let answer = raw_request(admin, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        answer.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    assert_eq!(exact(&get(), "nbnet_reloads_total{outcome=\"done\"}"), 0.0);
    server.signal(libc::SIGHUP);
    server.wait_for("a reload counted done", || {
        (exact(&get(), "nbnet_reloads_total{outcome=\"done\"}") == 1.0).then_some(())
    });
    // A config that cannot be read: refused.
    server
        .sandbox_mut()
        .write_config(&WITH_ADMIN.replace("workers = 1", "workers = 1\nbogus_knob = 1"));
    server.signal(libc::SIGHUP);
    let body = server.wait_for("a reload counted refused", || {
        let body = get();
        (exact(&body, "nbnet_reloads_total{outcome=\"refused\"}") == 1.0).then_some(body)
    });
    assert_eq!(
        exact(&body, "nbnet_reloads_total{outcome=\"done\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(
        exact(&body, "nbnet_reloads_total{outcome=\"rolled_back\"}"),
        0.0
    );
}
