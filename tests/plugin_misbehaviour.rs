//! Plugin misbehaviour at request time (with the C test plugin
//! `plugins/testing/c/misbehave.c`): a plugin error or an oversized response
//! closes only that client's connection and is logged; a plugin that crashes
//! its worker costs a worker restart, not the service.

use nbnet_tests::{frame, Server};

const MISBEHAVE: &str = r#"
[server]
workers = 1
max_frame_bytes = 1024

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "misbehave"
"#;

#[test]
fn a_plugin_error_closes_that_connection_without_reply_and_is_logged() {
    let server = Server::start(MISBEHAVE);
    let workers = server.wait_for_workers(1);
    let mut bystander = server.client();
    assert_eq!(bystander.request(b"hello"), b"hello");

    let mut client = server.client();
    let _ = client.send_frame(b"fail on purpose");
    client.expect_closed();

    server.wait_for("the plugin's error message in the log", || {
        server
            .log()
            .contains("misbehave refuses: fail on purpose")
            .then_some(())
    });
    assert_eq!(bystander.request(b"still fine"), b"still fine");
    assert_eq!(server.client().request(b"new"), b"new");
    assert_eq!(
        server.live_workers(),
        workers,
        "a plugin error must not cost a worker"
    );
}

#[test]
fn answers_before_a_plugin_error_are_delivered_in_order() {
    let server = Server::start(MISBEHAVE);
    let mut client = server.client();
    let mut bytes = frame(b"one");
    bytes.extend_from_slice(&frame(b"two"));
    bytes.extend_from_slice(&frame(b"fail here"));
    bytes.extend_from_slice(&frame(b"never answered"));
    client.send_raw(&bytes).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"one");
    assert_eq!(client.read_frame().unwrap(), b"two");
    client.expect_closed();
}

#[test]
fn a_response_of_exactly_max_frame_bytes_is_delivered() {
    let server = Server::start(MISBEHAVE);
    let mut client = server.client();
    assert_eq!(client.request(b"big:1024"), vec![b'x'; 1024]);
}

#[test]
fn a_response_over_max_frame_bytes_closes_the_connection_and_is_logged() {
    let server = Server::start(MISBEHAVE);
    let mut client = server.client();
    let _ = client.send_frame(b"big:1025");
    client.expect_closed();
    server.wait_for("the plugin's error message in the log", || {
        server
            .log()
            .contains("misbehave: response too big")
            .then_some(())
    });
    assert_eq!(server.client().request(b"small"), b"small");
}

#[test]
fn a_response_len_past_its_cap_closes_the_connection_and_sends_nothing() {
    let server = Server::start(MISBEHAVE);
    let mut client = server.client();
    let mut bytes = frame(b"first");
    bytes.extend_from_slice(&frame(b"overrun"));
    client.send_raw(&bytes).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"first");
    // Nothing of the broken response (its "secret", or memory past it).
    client.expect_closed();
    server.wait_for("the buffer-protocol error in the log", || {
        server.log().contains("past its cap").then_some(())
    });
    let log = server.log();
    assert!(log.contains("plugin failed a request"), "{log}");
    assert_eq!(server.client().request(b"small"), b"small");
}

/// A C plugin built against ABI 1.0 (no in-place response fields; callbacks
/// only) still loads and answers in this ABI 1.2 host.
#[test]
fn a_plugin_built_for_abi_1_0_still_works() {
    let server = Server::start(&MISBEHAVE.replace("{misbehave}", "{abi_1_0}"));
    let mut client = server.client();
    let mut bytes = frame(b"abc");
    bytes.extend_from_slice(&frame(b"hello"));
    client.send_raw(&bytes).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"v1.0:cba!");
    assert_eq!(client.read_frame().unwrap(), b"v1.0:olleh!");
    assert_eq!(client.request(&[b'y'; 1000]), {
        let mut expected = b"v1.0:".to_vec();
        expected.extend_from_slice(&[b'y'; 1000]);
        expected.push(b'!');
        expected
    });
    let _ = client.send_frame(b"fail");
    client.expect_closed();
    server.wait_for("the plugin's error in the log", || {
        server.log().contains("abi_1_0 refuses").then_some(())
    });
}

#[test]
fn a_plugin_crash_costs_a_worker_restart_not_the_service() {
    let server = Server::start(MISBEHAVE);
    let before = server.wait_for_workers(1)[0];
    let mut client = server.client();
    let _ = client.send_frame(b"crash");
    client.expect_closed();
    server.wait_for("a replacement worker", || {
        let live = server.live_workers();
        (live.len() == 1 && live[0] != before).then_some(())
    });
    assert_eq!(
        server.client().request(b"after the crash"),
        b"after the crash"
    );
}
