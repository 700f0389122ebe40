//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz`,
//! read with a real HTTP client (curl; `.ci/run` installs it if missing).
//! The numbers must match the traffic the test sent.

use std::process::Command;
use std::time::Duration;

use nbnet_tests::{wait_until, Client, Sandbox, SIGTERM};

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
