//! Batches (ABI 1.1 `process_batch`): every complete request of one read
//! answered in one plugin call. Every Rust plugin batches (the SDK provides
//! it); C plugins may. These tests pin down what must not change when
//! requests are batched: order, what a failure mid-batch costs, the size
//! limit per answer, the hang watchdog (which must still see each request
//! start), and a plugin that stops early.

use std::time::{Duration, Instant};

use nbnet_tests::{frame, one_plugin_config, Server};

/// `plugin` (a placeholder) served by one worker with extra `[server]` keys.
fn config(plugin: &str, server: &str) -> String {
    one_plugin_config("under-test", plugin, &format!("workers = 1\n{server}"))
}

/// The frames of `payloads` back to back, as a pipelining client sends them.
fn pipelined(payloads: &[&[u8]]) -> Vec<u8> {
    payloads.iter().flat_map(|p| frame(p)).collect()
}

/// Which entry point answers is a cost decision, visible here through the
/// C test plugin's tags: a lone request goes through `process`; pipelined
/// ones through one `process_batch`; right after pipelining, the next read
/// goes straight to a batch (a batch of one, if the client has stopped),
/// and the one after that through `process` again.
#[test]
fn a_c_plugin_gets_pipelined_requests_in_one_batch_and_a_lone_request_through_process() {
    let server = Server::start(&config("{batcher}", ""));
    let mut client = server.client();
    assert_eq!(client.request(b"solo"), b"P:SOLO");
    assert_eq!(client.request(b"solo"), b"P:SOLO");
    client
        .send_raw(&pipelined(&[b"one", b"two", b"three"]))
        .unwrap();
    assert_eq!(client.read_frame().unwrap(), b"B0/3:ONE");
    assert_eq!(client.read_frame().unwrap(), b"B1/3:TWO");
    assert_eq!(client.read_frame().unwrap(), b"B2/3:THREE");
    assert_eq!(client.request(b"again"), b"B0/1:AGAIN");
    assert_eq!(client.request(b"again"), b"P:AGAIN");
}

#[test]
fn a_c_batch_that_stops_early_has_the_rest_answered_in_a_later_call() {
    let server = Server::start(&config("{batcher}", ""));
    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"a", b"stop", b"b", b"c"]))
        .unwrap();
    assert_eq!(client.read_frame().unwrap(), b"B0/4:A");
    assert_eq!(client.read_frame().unwrap(), b"B1/4:STOP");
    // The two left are answered by a second batch, in order.
    assert_eq!(client.read_frame().unwrap(), b"B0/2:B");
    assert_eq!(client.read_frame().unwrap(), b"B1/2:C");
    assert_eq!(client.request(b"x"), b"B0/1:X", "the connection is fine");
    assert_eq!(client.request(b"y"), b"P:Y");
}

#[test]
fn a_failure_mid_batch_delivers_the_answers_before_it_then_closes() {
    let server = Server::start(&config("{batcher}", ""));
    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"a", b"b", b"fail", b"never"]))
        .unwrap();
    assert_eq!(client.read_frame().unwrap(), b"B0/4:A");
    assert_eq!(client.read_frame().unwrap(), b"B1/4:B");
    client.expect_closed();
    server.wait_for("the plugin's message in the log", || {
        server.log().contains("batcher refuses").then_some(())
    });
    assert_eq!(server.client().request(b"new"), b"P:NEW");
}

/// Plugin bugs the host must catch in a batch: answering nothing without
/// saying why (retrying would spin the worker forever), and lengths that
/// do not add up to what was written (sending them would pass unwritten
/// bytes of the shared buffer off as an answer).
#[test]
fn a_broken_batch_sends_nothing_and_closes_only_that_connection() {
    let server = Server::start(&config("{batcher}", ""));
    let mut bystander = server.client();
    assert_eq!(bystander.request(b"hi"), b"P:HI");

    let mut client = server.client();
    client.send_raw(&pipelined(&[b"zero", b"x"])).unwrap();
    client.expect_closed();
    server.wait_for("the empty batch in the log", || {
        server.log().contains("answered none").then_some(())
    });

    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"fine", b"lie", b"after"]))
        .unwrap();
    client.expect_closed();
    server.wait_for("the bad account in the log", || {
        server.log().contains("add up to").then_some(())
    });

    assert_eq!(bystander.request(b"still"), b"P:STILL");
    assert_eq!(server.client().request(b"new"), b"P:NEW");
}

#[test]
fn a_rust_panic_mid_batch_delivers_the_answers_before_it_and_the_worker_lives_on() {
    let server = Server::start(&config("{misbehave_rs}", ""));
    let pid = server.wait_for_workers(1)[0].pid;
    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"first", b"second", b"panic", b"never"]))
        .unwrap();
    assert_eq!(client.read_frame().unwrap(), b"first");
    assert_eq!(client.read_frame().unwrap(), b"second");
    client.expect_closed();
    server.wait_for("the panic in the log", || {
        let log = server.log();
        (log.contains("panicked at plugins/testing/misbehave-rs/src/lib.rs")
            && log.contains(": misbehave_rs panics on purpose"))
        .then_some(())
    });
    assert_eq!(server.client().request(b"after"), b"after");
    assert_eq!(server.live_workers()[0].pid, pid, "no worker was lost");
}

#[test]
fn the_size_limit_applies_to_each_answer_of_a_batch() {
    let server = Server::start(&config("{misbehave_rs}", "max_frame_bytes = 1024"));
    let mut client = server.client();
    // Three answers of 1000 bytes in one batch: 3000 bytes in all, each
    // under the limit.
    client
        .send_raw(&pipelined(&[b"big:1000", b"big:1000", b"big:1000"]))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(client.read_frame().unwrap(), vec![b'x'; 1000]);
    }
    // One over it, after one that fits: the first is delivered, then close.
    client
        .send_raw(&pipelined(&[b"big:1024", b"big:1025", b"ok"]))
        .unwrap();
    assert_eq!(client.read_frame().unwrap(), vec![b'x'; 1024]);
    client.expect_closed();
    server.wait_for("the refusal in the log", || {
        server.log().contains("max_frame_bytes").then_some(())
    });
}

/// The room a batch asks for includes the frame header before each answer;
/// that must not count against max_frame_bytes (an echo of a request of
/// exactly the limit fits).
#[test]
fn an_answer_of_exactly_max_frame_bytes_fits_in_a_batch() {
    let server = Server::start(&config("{echo}", "max_frame_bytes = 1024"));
    let mut client = server.client();
    let full = vec![b'e'; 1024];
    client.send_raw(&pipelined(&[&full, b"x", &full])).unwrap();
    assert_eq!(client.read_frame().unwrap(), full);
    assert_eq!(client.read_frame().unwrap(), b"x");
    assert_eq!(client.read_frame().unwrap(), full);
}

/// Four requests of 400 ms in one batch take 1.6 s in one call, over a
/// plugin_timeout of 1 s, but each starts well within it: the watchdog,
/// which watches requests start, must not kill the worker.
#[test]
fn a_slow_batch_is_not_a_hang_when_each_request_starts_in_time() {
    let server = Server::start(&config("{misbehave_rs}", "plugin_timeout = \"1s\""));
    let pid = server.wait_for_workers(1)[0].pid;
    let mut client = server.client();
    client.set_read_timeout(Duration::from_secs(10));
    let began = Instant::now();
    client
        .send_raw(&pipelined(&[&b"sleep:400"[..]; 4]))
        .unwrap();
    for _ in 0..4 {
        assert_eq!(client.read_frame().unwrap(), b"slept 400");
    }
    assert!(
        began.elapsed() >= Duration::from_millis(1600),
        "the four requests ran one after the other"
    );
    assert_eq!(
        server.live_workers()[0].pid,
        pid,
        "the worker was not killed"
    );
    assert!(
        !server.log().contains("killing the worker"),
        "{}",
        server.log()
    );
}

#[test]
fn a_hang_inside_a_batch_is_still_killed_by_the_watchdog() {
    let server = Server::start(&config("{misbehave_rs}", "plugin_timeout = \"1s\""));
    let pid = server.wait_for_workers(1)[0].pid;
    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"first", b"sleep:10", b"hang"]))
        .unwrap();
    server.wait_for("the watchdog's kill in the log", || {
        server.log().contains("killing the worker").then_some(())
    });
    server.wait_for("a replacement worker", || {
        let live = server.live_workers();
        (live.len() == 1 && live[0].pid != pid).then_some(())
    });
    assert_eq!(server.client().request(b"after"), b"after");
}

/// With an admin listener the plugin-call latency histogram is kept; a
/// batch records each of its requests (an equal share of the call).
#[test]
fn metrics_count_every_request_of_a_batch() {
    if nbnet_tests::require_program("curl", "curl").is_none() {
        return;
    }
    let server = Server::start(
        r#"
[server]
workers = 1

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
    // The test harness's own readiness request may be counted already.
    let before = metrics(admin);
    let (requests, timed) = (
        value(&before, "nbnet_plugin_requests_total{plugin=\"upper\"}"),
        value(
            &before,
            "nbnet_plugin_latency_seconds_bucket{plugin=\"upper\",le=\"+Inf\"}",
        ),
    );
    let mut client = server.client();
    client
        .send_raw(&pipelined(&[b"a", b"b", b"c", b"d", b"e"]))
        .unwrap();
    for expected in [b"A", b"B", b"C", b"D", b"E"] {
        assert_eq!(client.read_frame().unwrap(), expected);
    }
    server.wait_for("the five requests in /metrics", || {
        let text = metrics(admin);
        (value(&text, "nbnet_plugin_requests_total{plugin=\"upper\"}") == requests + 5
            && value(
                &text,
                "nbnet_plugin_latency_seconds_bucket{plugin=\"upper\",le=\"+Inf\"}",
            ) == timed + 5)
            .then_some(())
    });
}

/// The value of the metric line starting with `name` (0 when absent).
fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0)
}

/// GET /metrics with curl (as an operator would).
fn metrics(port: u16) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .expect("curl runs (tests/install-deps.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
