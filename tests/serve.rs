//! Serving: requests that are well-formed get the plugin's answer, whatever
//! the plugin (Rust or C), the listener, the way the bytes arrive (pipelined,
//! split, concurrent) or the client (`nbnet send`).

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use nbnet_tests::{frame, nbnet_send, one_plugin_config, show, Client, Sandbox, Server};

const UPPER: &str = r#"
[server]
workers = 2

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#;

const ECHO: &str = r#"
[server]
workers = 2

[[plugins]]
name = "echo"
path = "{echo}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "echo"
"#;

#[test]
fn rust_upper_answers_hi_with_upper_case_hi() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"HI");
    assert_eq!(client.request(b"Hello, World! 123"), b"HELLO, WORLD! 123");
}

#[test]
fn the_wire_bytes_are_a_ten_digit_header_and_the_payload() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    client.send_raw(b"0000000002hi").unwrap();
    let mut answer = [0u8; 12];
    client.stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"0000000002HI", "got {}", show(&answer));
    // Nothing more than that one frame follows.
    client.expect_silence(Duration::from_millis(200));
}

#[test]
fn rust_echo_answers_with_the_request_unchanged() {
    let server = Server::start(ECHO);
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"hi");
    let binary: Vec<u8> = (0..=255u8).collect();
    assert_eq!(client.request(&binary), binary);
}

#[test]
fn c_upper_answers_hi_with_upper_case_hi() {
    let server = Server::start(&one_plugin_config("upper-c", "{upper_c}", "workers = 2"));
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"HI");
    // A bigger request after a small one: the C plugin's buffer grows.
    let big = "abc".repeat(10_000);
    assert_eq!(
        client.request(big.as_bytes()),
        big.to_uppercase().as_bytes()
    );
    assert_eq!(client.request(b"x"), b"X");
}

#[test]
fn nbnet_send_prints_the_answer_and_a_newline() {
    let server = Server::start(UPPER);
    let out = nbnet_send(&format!("127.0.0.1:{}", server.port()), "hi");
    assert!(
        out.status.success(),
        "nbnet send failed: {:?}\nstderr: {}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout, "HI\n", "stderr: {}", out.stderr);
}

#[test]
fn nbnet_send_to_a_port_nobody_listens_on_fails_with_a_message() {
    let port = nbnet_tests::free_port();
    let out = nbnet_send(&format!("127.0.0.1:{port}"), "hi");
    assert!(
        !out.status.success(),
        "nbnet send succeeded against a closed port: {out:?}"
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "nbnet send failed silently: {out:?}"
    );
    assert_eq!(
        out.stdout, "",
        "nothing should be printed to stdout on failure"
    );
}

#[test]
fn switching_the_config_from_upper_to_echo_and_restarting_changes_the_logic() {
    let server = Sandbox::new().start(UPPER);
    let config = server.dir().join("nbnet.toml");
    {
        let mut client = server.client();
        assert_eq!(client.request(b"hi"), b"HI");
    }
    let port = server.port();
    let sandbox = server.stop();

    // Same directory, same file, same port: only the plugin changes.
    let server = sandbox.start(ECHO);
    assert_eq!(server.port(), port);
    assert_eq!(server.dir().join("nbnet.toml"), config);
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"hi");
}

#[test]
fn two_listeners_with_two_plugins_in_one_server_both_work() {
    let server = Server::start(
        r#"
[server]
workers = 2

[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "echo"
path = "{echo}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "echo"
"#,
    );
    let mut upper = Client::connect(server.port_n(0));
    let mut echo = Client::connect(server.port_n(1));
    for _ in 0..3 {
        assert_eq!(upper.request(b"mixed Case"), b"MIXED CASE");
        assert_eq!(echo.request(b"mixed Case"), b"mixed Case");
    }
}

#[test]
fn one_hundred_pipelined_requests_in_one_write_come_back_in_order() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend_from_slice(&frame(format!("request number {i}").as_bytes()));
    }
    client.stream.write_all(&batch).unwrap();
    for i in 0..100 {
        let answer = client
            .read_frame()
            .unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(
            answer,
            format!("REQUEST NUMBER {i}").as_bytes(),
            "answer {i} out of order"
        );
    }
    client.expect_silence(Duration::from_millis(100));
}

#[test]
fn one_thousand_sequential_requests_on_one_connection_are_answered() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    for i in 0..1000 {
        let answer = client.request(format!("seq-{i}").as_bytes());
        assert_eq!(answer, format!("SEQ-{i}").as_bytes());
    }
}

#[test]
fn two_hundred_concurrent_connections_each_get_their_own_answer() {
    const THREADS: usize = 20;
    const PER_THREAD: usize = 10;
    let server = Server::start(UPPER);
    let port = server.port();
    // All 200 connections are open at once before anyone sends.
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let mut clients: Vec<Client> =
                    (0..PER_THREAD).map(|_| Client::connect(port)).collect();
                barrier.wait();
                for (c, client) in clients.iter_mut().enumerate() {
                    client
                        .send_frame(format!("thread {t} conn {c}").as_bytes())
                        .unwrap();
                }
                for (c, client) in clients.iter_mut().enumerate() {
                    let answer = client
                        .read_frame()
                        .unwrap_or_else(|e| panic!("t{t} c{c}: {e}"));
                    assert_eq!(answer, format!("THREAD {t} CONN {c}").as_bytes());
                    // A second round on the same connection.
                    let answer = client.request(format!("again {t}.{c}").as_bytes());
                    assert_eq!(answer, format!("AGAIN {t}.{c}").as_bytes());
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("a client thread failed");
    }
}

#[test]
fn a_request_arriving_one_byte_at_a_time_is_answered() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    client.stream.set_nodelay(true).unwrap();
    for &byte in frame(b"slowly, byte by byte").iter() {
        client.stream.write_all(&[byte]).unwrap();
        client.stream.flush().unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(client.read_frame().unwrap(), b"SLOWLY, BYTE BY BYTE");
    // And the connection is still good for a normal request.
    assert_eq!(client.request(b"next"), b"NEXT");
}

#[test]
fn a_request_split_across_header_and_payload_writes_is_answered() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    client.stream.set_nodelay(true).unwrap();
    // Two frames, cut in awkward places: inside the first header, between
    // header and payload, and inside the second payload.
    let mut bytes = frame(b"first");
    bytes.extend_from_slice(&frame(b"second"));
    for chunk in [
        &bytes[..4],
        &bytes[4..10],
        &bytes[10..17],
        &bytes[17..25],
        &bytes[25..],
    ] {
        client.stream.write_all(chunk).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(client.read_frame().unwrap(), b"FIRST");
    assert_eq!(client.read_frame().unwrap(), b"SECOND");
}

#[test]
fn a_plugin_config_table_reaches_the_plugin() {
    let mut sandbox = Sandbox::new();
    let (status, stderr) = sandbox.expect_startup_failure(
        r#"
[server]
workers = 1

[[plugins]]
name = "picky"
path = "{fail_init}"

[plugins.config]
reason = "custom words"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "picky"
"#,
    );
    assert_eq!(status.code(), Some(4), "stderr:\n{stderr}");
    assert!(
        stderr.contains("custom words"),
        "the configured reason is missing from stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("fail_init always refuses to start"),
        "the default reason was used instead of the configured one:\n{stderr}"
    );
}

#[test]
fn a_c_plugin_receives_its_config_table_as_toml_text() {
    let server = Server::start(
        r#"
[server]
workers = 1

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[plugins.config]
greeting = "bonjour"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "misbehave"
"#,
    );
    let mut client = server.client();
    let config = client.request(b"config");
    let config = String::from_utf8_lossy(&config);
    assert!(
        config.contains("greeting"),
        "config text seen by the plugin: {config:?}"
    );
    assert!(
        config.contains("bonjour"),
        "config text seen by the plugin: {config:?}"
    );
}

#[test]
fn each_worker_gets_its_own_index_and_the_worker_count() {
    let server = Server::start(&one_plugin_config(
        "misbehave",
        "{misbehave}",
        "workers = 2",
    ));
    server.wait_for_workers(2);
    // Each worker's plugin logs its index at init; both must show up.
    server.wait_for("both workers' init log lines", || {
        let log = server.log();
        (log.contains("misbehave init worker 0/2") && log.contains("misbehave init worker 1/2"))
            .then_some(())
    });
    let mut client = server.client();
    let who = String::from_utf8(client.request(b"whoami")).unwrap();
    assert!(
        who == "worker 0/2" || who == "worker 1/2",
        "whoami answered {who:?}"
    );
}

#[test]
fn a_one_megabyte_request_is_answered_in_full() {
    let server = Server::start(UPPER);
    let mut client = server.client();
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| b"abcdefghij"[i % 10]).collect();
    let answer = client.request(&payload);
    assert_eq!(answer.len(), payload.len());
    assert!(
        answer == payload.to_ascii_uppercase(),
        "the 1 MiB answer differs from the upper-cased request"
    );
}

#[test]
fn many_large_pipelined_requests_are_answered_while_the_client_reads_slowly() {
    // 40 x 256 KiB each way: far more than the socket buffers hold, so the
    // server must keep unsent answers and wait for the client to read.
    let server = Server::start(UPPER);
    let mut client = server.client();
    let mut writer = client.stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for i in 0..40u8 {
            let payload = vec![b'a' + (i % 26); 256 * 1024];
            writer.write_all(&frame(&payload)).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(300));
    for i in 0..40u8 {
        let answer = client
            .read_frame()
            .unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(answer.len(), 256 * 1024, "answer {i}");
        assert!(
            answer.iter().all(|&b| b == b'A' + (i % 26)),
            "answer {i} has the wrong content"
        );
    }
    sender.join().unwrap();
}

#[test]
fn a_client_stuck_in_the_middle_of_a_frame_does_not_hold_up_others_on_the_same_worker() {
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let mut stuck = server.client();
    stuck.send_raw(b"0000000100only part of it").unwrap();
    let mut other = server.client();
    for i in 0..10 {
        assert_eq!(
            other.request(format!("other {i}").as_bytes()),
            format!("OTHER {i}").as_bytes()
        );
    }
    // The stuck one completes its frame later and is answered too.
    stuck
        .send_raw(&[b'z'; 100 - b"only part of it".len()])
        .unwrap();
    let answer = stuck.read_frame().unwrap();
    assert_eq!(answer.len(), 100);
    assert!(answer.starts_with(b"ONLY PART OF IT"));
}

#[test]
fn every_worker_serves_every_listener() {
    let mut server = Server::start(
        r#"
[server]
workers = 2

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "misbehave"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "misbehave"
"#,
    );
    let workers = server.wait_for_workers(2);
    // Freeze one worker at a time: the other must then take every new
    // connection, on both listeners.
    let mut seen = std::collections::BTreeSet::new();
    for (frozen, running) in [(workers[0], workers[1]), (workers[1], workers[0])] {
        nbnet_tests::send_signal(frozen.pid, libc::SIGSTOP);
        let mut answers = std::collections::BTreeSet::new();
        for port in [server.port_n(0), server.port_n(1)] {
            for _ in 0..3 {
                let who = Client::connect(port).request(b"whoami");
                answers.insert(String::from_utf8(who).unwrap());
            }
        }
        nbnet_tests::send_signal(frozen.pid, libc::SIGCONT);
        assert_eq!(
            answers.len(),
            1,
            "with worker {} frozen, answers came from {answers:?}",
            frozen.pid
        );
        assert!(running.alive());
        seen.extend(answers);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["worker 0/2", "worker 1/2"],
        "both workers should have answered"
    );
    assert!(server.wait_exit(Duration::from_millis(10)).is_none());
}
