//! Deferred answers (issue 12, ABI 1.3): a plugin answers later, from any
//! thread, through `Response::defer` (Rust) or `nbnet_defer` (C). The host
//! keeps each connection's answers in request order, bounds what is
//! pending, and never sends an answer to the wrong client.

use std::io::Read;
use std::process::Command;
use std::time::Duration;

use nbnet_tests::{frame, Client, Server};

/// One plugin (`defer_rs` or `deferc`) on `{port}`, one worker, extra
/// `[server]` lines, and an admin listener for `/metrics`.
fn config(plugin: &str, server: &str) -> String {
    format!(
        r#"[server]
workers = 1
{server}

[admin]
addr = "127.0.0.1:{{admin}}"

[[plugins]]
name = "waiter"
path = "{{{plugin}}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "waiter"
"#
    )
}

/// The value of the `/metrics` sample `series` (0 if absent).
fn metric(server: &Server, series: &str) -> u64 {
    let output = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://127.0.0.1:{}/metrics", server.admin_port()))
        .output()
        .expect("run curl (bash tests/install-deps.sh installs it)");
    let body = String::from_utf8_lossy(&output.stdout);
    // The sum over the per-worker-slot series (they add up).
    body.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(series)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .map(|v| v as u64)
        .sum()
}

/// Sends every payload in one write (pipelined).
fn pipeline(client: &mut Client, payloads: &[String]) {
    let mut bytes = Vec::new();
    for p in payloads {
        bytes.extend_from_slice(&frame(p.as_bytes()));
    }
    client
        .send_raw(&bytes)
        .expect("send the pipelined requests");
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn pipelined_requests_completed_in_reverse_are_answered_in_request_order() {
    let server = Server::start(&config("defer_rs", ""));
    let mut client = server.client();
    let payloads: Vec<String> = (0..100).map(|i| format!("rev 100 answer-{i}")).collect();
    pipeline(&mut client, &payloads);
    for i in 0..100 {
        let got = text(client.read_frame().expect("an answer"));
        assert_eq!(got, format!("answer-{i}"), "answer {i} out of order");
    }
    // The connection still works, and every deferred request was counted.
    assert_eq!(client.request(b"inline ok"), b"ok");
    assert!(metric(&server, "nbnet_deferred_total") >= 100);
}

#[test]
fn c_plugin_answers_from_its_timer_thread_in_request_order() {
    let server = Server::start(&config("deferc", ""));
    let mut client = server.client();
    // Later requests complete first (shorter delays), and inline answers
    // are mixed in: all must come back in request order.
    let mut payloads = Vec::new();
    for i in 0..20 {
        payloads.push(format!("later {} c{i}", (20 - i) * 10));
        payloads.push(format!("inline i{i}"));
    }
    pipeline(&mut client, &payloads);
    for i in 0..20 {
        assert_eq!(text(client.read_frame().unwrap()), format!("c{i}"));
        assert_eq!(text(client.read_frame().unwrap()), format!("i{i}"));
    }
}

#[test]
fn two_hundred_connections_with_fifty_deferred_each_get_only_their_own_answers() {
    let server = Server::start(&config("defer_rs", ""));
    let mut clients: Vec<Client> = (0..200).map(|_| server.client()).collect();
    for (c, client) in clients.iter_mut().enumerate() {
        let payloads: Vec<String> = (0..50)
            .map(|r| format!("later {} conn{c}-req{r}", (c * 7 + r * 13) % 20))
            .collect();
        pipeline(client, &payloads);
    }
    for (c, client) in clients.iter_mut().enumerate() {
        for r in 0..50 {
            let got = text(client.read_frame().expect("an answer"));
            assert_eq!(got, format!("conn{c}-req{r}"));
        }
    }
}

#[test]
fn a_request_not_completed_within_deferred_timeout_closes_its_connection_after_earlier_answers() {
    let server = Server::start(&config("defer_rs", r#"deferred_timeout = "300ms""#));
    let mut client = server.client();
    pipeline(
        &mut client,
        &[
            "inline before".into(),
            "never".into(),
            "inline after".into(),
        ],
    );
    assert_eq!(client.read_frame().unwrap(), b"before");
    client.expect_closed();
    server.wait_for_log_line(&[
        "deferred request not completed",
        "waiter",
        "deferred_timeout",
    ]);
    assert_eq!(metric(&server, "nbnet_deferred_timeouts_total"), 1);
    // The worker goes on serving.
    assert_eq!(server.client().request(b"inline fine"), b"fine");
}

#[test]
fn a_connection_waiting_for_a_deferred_answer_is_not_cut_by_read_timeout() {
    let server = Server::start(&config(
        "defer_rs",
        r#"read_timeout = "200ms"
deferred_timeout = "10s""#,
    ));
    let mut client = server.client();
    assert_eq!(client.request(b"later 800 slow"), b"slow");
    assert_eq!(client.request(b"inline still open"), b"still open");
}

#[test]
fn a_dropped_handle_fails_its_request_and_the_answers_before_it_arrive() {
    let server = Server::start(&config("defer_rs", ""));
    let mut client = server.client();
    pipeline(
        &mut client,
        &[
            "later 50 first".into(),
            "drop".into(),
            "inline never sent".into(),
        ],
    );
    assert_eq!(client.read_frame().unwrap(), b"first");
    client.expect_closed();
    server.wait_for_log_line(&["waiter", "dropped its Deferred without answering"]);
}

#[test]
fn a_failed_deferred_request_is_logged_with_the_plugin_name_and_closes_the_connection() {
    let server = Server::start(&config("deferc", ""));
    let mut client = server.client();
    client.send_frame(b"fail database unavailable").unwrap();
    client.expect_closed();
    server.wait_for_log_line(&["waiter", "database unavailable"]);
}

/// Closes `client` with a reset (SO_LINGER 0): the server sees the client
/// gone at once, not a half-close it must still answer.
fn reset(client: Client) {
    nbnet_tests::linger_zero(&client.stream);
    drop(client);
}

#[test]
fn completing_after_the_client_left_or_after_the_deadline_does_nothing_and_is_counted() {
    let server = Server::start(&config("defer_rs", r#"deferred_timeout = "200ms""#));
    let mut gone = server.client();
    gone.send_frame(b"later 300 nobody reads this").unwrap();
    // The request is read (and deferred) before the client leaves.
    server.wait_for("the request to be deferred", || {
        (metric(&server, "nbnet_deferred_total") >= 1).then_some(())
    });
    reset(gone);
    // Another client sees only its own answers; its request outlives the
    // deadline, is failed, and its completion comes too late.
    let mut other = server.client();
    assert_eq!(other.request(b"later 10 mine"), b"mine");
    other.send_frame(b"later 500 too late").unwrap();
    other.expect_closed();
    server.wait_for("both late completions to be counted", || {
        (metric(&server, "nbnet_deferred_late_total") >= 2).then_some(())
    });
    assert_eq!(metric(&server, "nbnet_deferred_timeouts_total"), 1);
    assert_eq!(server.client().request(b"inline again"), b"again");
}

#[test]
fn a_second_completion_is_refused_with_nbnet_err_and_counted() {
    let server = Server::start(&config("deferc", ""));
    let mut client = server.client();
    assert_eq!(client.request(b"double once"), b"once");
    // The second completion comes 100 ms after the first was delivered,
    // with nothing else completing: it is counted all the same (it was
    // counted only at the next completion before).
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(client.request(b"doubled"), b"refused");
    server.wait_for("the refused completion to be counted", || {
        (metric(&server, "nbnet_deferred_refused_total") >= 1).then_some(())
    });
    // Nothing extra reached the client: the next answer is the next one.
    assert_eq!(client.request(b"inline next"), b"next");
}

#[test]
fn a_deferred_answer_over_max_frame_bytes_fails_that_request() {
    let server = Server::start(&config("defer_rs", "max_frame_bytes = 1000"));
    let mut client = server.client();
    assert_eq!(client.request(b"big 1000"), vec![b'x'; 1000]);
    client.send_frame(b"big 1001").unwrap();
    client.expect_closed();
    server.wait_for_log_line(&["waiter", "1001 bytes exceeds max_frame_bytes = 1000"]);
}

#[test]
fn a_worker_crash_while_answers_are_pending_sends_nothing_wrong_and_the_worker_is_replaced() {
    let server = Server::start(&config("defer_rs", ""));
    let mut waiting = server.client();
    waiting.send_frame(b"later 5000 pending").unwrap();
    let mut crasher = server.client();
    // Make sure the pending request was read before the crash.
    assert_eq!(crasher.request(b"inline ready"), b"ready");
    crasher.send_frame(b"crash").unwrap();
    waiting.expect_closed();
    let mut fresh = server.wait_for("a replacement worker", || {
        let mut client = Client::try_connect(server.port()).ok()?;
        client.set_read_timeout(Duration::from_secs(2));
        client.send_frame(b"inline up").ok()?;
        (client.read_frame().ok()? == b"up").then_some(client)
    });
    assert_eq!(fresh.request(b"later 10 ok"), b"ok");
}

#[test]
fn a_client_that_half_closes_still_gets_its_pending_answers() {
    let server = Server::start(&config("defer_rs", ""));
    let mut client = server.client();
    pipeline(
        &mut client,
        &["later 300 one".into(), "later 100 two".into()],
    );
    client.shutdown_write();
    assert_eq!(client.read_frame().unwrap(), b"one");
    assert_eq!(client.read_frame().unwrap(), b"two");
    let mut rest = Vec::new();
    client
        .stream
        .read_to_end(&mut rest)
        .expect("EOF after the answers");
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn a_graceful_stop_delivers_every_pending_deferred_answer() {
    let mut server = Server::start(&config("defer_rs", r#"shutdown_timeout = "10s""#));
    let mut client = server.client();
    pipeline(&mut client, &["later 600 a".into(), "later 300 b".into()]);
    // Both requests are read (and deferred) before the stop.
    let mut probe = server.client();
    assert_eq!(probe.request(b"inline probe"), b"probe");
    drop(probe);
    server.wait_for("both requests deferred", || {
        (metric(&server, "nbnet_deferred_total") >= 2).then_some(())
    });
    server.signal(libc::SIGTERM);
    assert_eq!(client.read_frame().unwrap(), b"a");
    assert_eq!(client.read_frame().unwrap(), b"b");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server stops");
    assert!(status.success(), "{status:?}\n{}", server.log());
}

#[test]
fn a_reload_delivers_pending_answers_then_hands_the_connection_to_the_new_generation() {
    let server = Server::start(&config("defer_rs", r#"shutdown_timeout = "10s""#));
    let mut client = server.client();
    let old_pid = text(client.request(b"pid"));
    pipeline(&mut client, &["later 800 a".into(), "later 400 b".into()]);
    server.wait_for("both requests deferred", || {
        (metric(&server, "nbnet_deferred_total") >= 2).then_some(())
    });
    server.signal(libc::SIGHUP);
    assert_eq!(client.read_frame().unwrap(), b"a");
    assert_eq!(client.read_frame().unwrap(), b"b");
    // The same connection, now served by the new generation.
    let new_pid = server.wait_for("the connection to move to a new worker", || {
        let pid = text(client.request(b"pid"));
        (pid != old_pid).then_some(pid)
    });
    assert_ne!(new_pid, old_pid);
    assert_eq!(client.request(b"later 10 still here"), b"still here");
}

#[test]
fn the_delay_c_example_answers_pipelined_requests_later_and_in_order() {
    let server = Server::start(
        r#"[server]
workers = 1

[[plugins]]
name = "delay"
path = "{delay_c}"
config = { ms = 30 }

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "delay"
"#,
    );
    let mut client = server.client();
    let payloads: Vec<String> = (0..20).map(|i| format!("delayed {i}")).collect();
    pipeline(&mut client, &payloads);
    for p in &payloads {
        assert_eq!(&text(client.read_frame().unwrap()), p);
    }
}

/// Hostile pass: a plugin that deferred a request and then also wrote an
/// answer for it had those bytes sent (and the requests behind it
/// answered) although the host failed the request. Only the answers
/// before it go out; then the connection closes.
#[test]
fn an_answer_written_for_a_deferred_request_is_never_sent() {
    let server = Server::start(&config("deferc", ""));
    let mut client = server.client();
    let payloads: Vec<String> = ["inline a", "both forged", "inline c"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    pipeline(&mut client, &payloads);
    assert_eq!(client.read_frame().unwrap(), b"a");
    client.expect_closed_within(Duration::from_secs(5));
    server.wait_for_log_line(&["wrote an answer to a request it deferred"]);
}

/// Hostile pass 5: a client that sent two complete requests, then part of
/// a third frame, then shut its sending side, got nothing from a deferring
/// plugin (an inline one answered both): the EOF in the middle of a frame
/// closed the connection with the deferred answers still owed. They are
/// delivered first now; only the unfinished frame is lost.
#[test]
fn a_half_close_in_the_middle_of_a_frame_still_gets_the_answers_owed() {
    for plugin in ["defer_rs", "deferc"] {
        let server = Server::start(&config(plugin, ""));
        let mut client = server.client();
        let mut bytes = frame(b"later 200 first");
        bytes.extend_from_slice(&frame(b"later 100 second"));
        bytes.extend_from_slice(b"00000000");
        client.send_raw(&bytes).unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(text(client.read_frame().unwrap()), "first", "{plugin}");
        assert_eq!(text(client.read_frame().unwrap()), "second", "{plugin}");
        let mut rest = Vec::new();
        let _ = client.stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{plugin}: {rest:?}");
        server.wait_for_log_line(&["in the middle of a frame"]);
    }
}

/// Hostile pass 6: a client that asked for many large deferred answers and
/// never read them made the worker hold every answer (127 x 4 MB: over
/// 500 MB with an 8 MiB budget): neither `max_pending_output_bytes` nor
/// `max_buffered_bytes` applied to answers that arrive later. Past the
/// budget, such a connection is closed now, even alone.
#[test]
fn a_client_that_never_reads_large_deferred_answers_is_cut_at_the_budget() {
    let server = Server::start(&config(
        "defer_rs",
        r#"max_frame_bytes = 4194304
max_buffered_bytes = 8388608"#,
    ));
    let mut client = server.client();
    let mut requests = Vec::new();
    for _ in 0..60 {
        requests.extend_from_slice(&frame(b"big 4000000"));
    }
    client.send_raw(&requests).unwrap();
    let line = server.wait_for_log_line(&["over max_buffered_bytes = 8388608"]);
    assert!(line.contains("closed the 1 holding the most"), "{line}");
    assert!(metric(&server, "nbnet_buffer_budget_closes_total") >= 1);
}
