//! Protocol errors and connection limits: a client that breaks the framing,
//! goes idle or stalls mid-frame loses its connection without any reply, and
//! nobody else notices; `max_connections` makes extra clients wait, not fail.

use std::thread;
use std::time::Duration;

use nbnet_tests::{frame, Server};

/// One worker, so the bad connection and the good ones share a worker and a
/// bad client cannot hide behind another worker. Frames are at most 1024 bytes.
const SMALL_FRAMES: &str = r#"
[server]
workers = 1
max_frame_bytes = 1024

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#;

/// Sends `bad` on a fresh connection and checks that the server closes that
/// connection without a reply, while a connection opened before it and one
/// opened after it are served normally.
fn assert_rejected(bad: &[u8]) {
    let server = Server::start(SMALL_FRAMES);
    let mut before = server.client();
    assert_eq!(before.request(b"before"), b"BEFORE");

    let mut offender = server.client();
    // The server may close (and reset) while we are still writing: fine.
    let _ = offender.send_raw(bad);
    offender.expect_closed();

    assert_eq!(before.request(b"still here"), b"STILL HERE");
    let mut after = server.client();
    assert_eq!(after.request(b"after"), b"AFTER");
}

#[test]
fn a_letter_in_the_header_closes_the_connection_without_reply() {
    assert_rejected(b"00000000x2hi");
}

#[test]
fn a_plus_sign_in_the_header_closes_the_connection_without_reply() {
    // "+000000002" parses as 2 with a lenient integer parser; it is not ten digits.
    assert_rejected(b"+000000002hi");
}

#[test]
fn a_space_in_the_header_closes_the_connection_without_reply() {
    assert_rejected(b"         2hi");
}

#[test]
fn a_minus_sign_in_the_header_closes_the_connection_without_reply() {
    assert_rejected(b"-000000002hi");
}

#[test]
fn a_zero_length_frame_closes_the_connection_without_reply() {
    assert_rejected(b"0000000000");
}

#[test]
fn a_zero_length_frame_after_a_good_one_closes_the_connection_after_the_good_answer() {
    let server = Server::start(SMALL_FRAMES);
    let mut client = server.client();
    let mut bytes = frame(b"good");
    bytes.extend_from_slice(b"0000000000");
    client.send_raw(&bytes).unwrap();
    assert_eq!(client.read_frame().unwrap(), b"GOOD");
    client.expect_closed();
}

#[test]
fn a_length_one_over_max_frame_bytes_closes_the_connection_without_reply() {
    // Only the header: the server must not wait for 1025 payload bytes.
    assert_rejected(b"0000001025");
}

#[test]
fn a_length_one_over_max_frame_bytes_with_its_payload_closes_the_connection_without_reply() {
    let mut bytes = b"0000001025".to_vec();
    bytes.extend_from_slice(&[b'a'; 1025]);
    assert_rejected(&bytes);
}

#[test]
fn the_largest_length_closes_the_connection_without_reply() {
    assert_rejected(b"9999999999");
}

#[test]
fn a_frame_of_exactly_max_frame_bytes_is_answered() {
    let server = Server::start(SMALL_FRAMES);
    let mut client = server.client();
    let payload = vec![b'q'; 1024];
    assert_eq!(client.request(&payload), vec![b'Q'; 1024]);
}

const SHORT_READ_TIMEOUT: &str = r#"
[server]
workers = 1
read_timeout = "1s"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#;

#[test]
fn an_idle_connection_is_closed_after_read_timeout() {
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    // Served once, then idle.
    assert_eq!(client.request(b"hi"), b"HI");
    let took = client.expect_closed_within(Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(500),
        "closed after {took:?}, well before read_timeout = 1s"
    );
    // The server itself is fine.
    assert_eq!(server.client().request(b"hi"), b"HI");
}

#[test]
fn a_connection_that_never_sends_anything_is_closed_after_read_timeout() {
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    let took = client.expect_closed_within(Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(500),
        "closed after {took:?}, well before read_timeout = 1s"
    );
}

#[test]
fn a_connection_that_stalls_in_the_middle_of_a_frame_is_closed() {
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    // Header announcing 10 bytes, then only 3 of them.
    client.send_raw(b"0000000010abc").unwrap();
    client.expect_closed_within(Duration::from_secs(10));
    assert_eq!(server.client().request(b"hi"), b"HI");
}

#[test]
fn a_connection_that_stalls_in_the_middle_of_a_header_is_closed() {
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    client.send_raw(b"00000").unwrap();
    client.expect_closed_within(Duration::from_secs(10));
}

#[test]
fn a_client_sending_whole_frames_slowly_stays_connected_longer_than_read_timeout() {
    // Each frame arrives at once, 400 ms apart: 2.4 s in all, with
    // read_timeout = 1s. The connection is never idle for a whole second.
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    for i in 0..6 {
        assert_eq!(
            client.request(format!("slow {i}").as_bytes()),
            format!("SLOW {i}").as_bytes()
        );
        thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(client.request(b"last"), b"LAST");
}

#[test]
fn a_client_trickling_one_frame_for_longer_than_read_timeout_is_closed() {
    // Slowloris: one byte every 150 ms of a 30-byte frame (4.5 s to send it
    // all, read_timeout = 1s). read_timeout bounds the time to receive one
    // frame, so the server must give up before the frame is complete.
    let server = Server::start(SHORT_READ_TIMEOUT);
    let mut client = server.client();
    client.stream.set_nodelay(true).unwrap();
    for &byte in frame(b"twenty bytes, slowly").iter() {
        if client.send_raw(&[byte]).is_err() {
            break; // The server closed the connection: as it should.
        }
        thread::sleep(Duration::from_millis(150));
    }
    client.expect_closed();
}

#[test]
fn at_max_connections_a_second_client_waits_until_the_first_leaves() {
    let server = Server::start(
        r#"
[server]
workers = 1
max_connections = 1

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
    let mut first = server.client();
    assert_eq!(first.request(b"first"), b"FIRST");

    // The kernel completes the handshake (backlog), but the worker is full.
    let mut second = server.client();
    second.send_frame(b"second").unwrap();
    second.expect_silence(Duration::from_millis(500));

    // The first connection is still served meanwhile.
    assert_eq!(first.request(b"first again"), b"FIRST AGAIN");

    drop(first);
    assert_eq!(
        second
            .read_frame()
            .expect("the waiting client is served once a slot frees"),
        b"SECOND"
    );
    assert_eq!(second.request(b"more"), b"MORE");
}

const DEFAULT_LIMITS: &str = r#"
[server]
workers = 1

[[plugins]]
name = "echo"
path = "{echo}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "echo"
"#;

#[test]
fn by_default_a_frame_of_16_mib_is_answered() {
    let server = Server::start(DEFAULT_LIMITS);
    let mut client = server.client();
    let payload: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let answer = client.request(&payload);
    assert!(
        answer == payload,
        "the 16 MiB echo differs ({} bytes back)",
        answer.len()
    );
}

#[test]
fn by_default_a_frame_of_16_mib_and_one_byte_is_refused() {
    let server = Server::start(DEFAULT_LIMITS);
    let mut client = server.client();
    let _ = client.send_raw(b"0016777217");
    client.expect_closed();
    assert_eq!(server.client().request(b"ok"), b"ok");
}
