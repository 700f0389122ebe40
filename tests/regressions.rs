//! Regression tests: one per bug found after it shipped, each named for the
//! behaviour that broke and commented with what went wrong.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nbnet_tests::{frame, Client, Server};

/// Reads one frame from a raw stream.
fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 10];
    stream.read_exact(&mut header)?;
    let len: usize = std::str::from_utf8(&header).unwrap().parse().unwrap();
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Review finding: frames sent in the same write as a PROXY header went
/// through a path that, on error, left the answers already produced in the
/// worker's shared response buffer — and the *next* connection received
/// them in front of its own answer (`0000000002HI0000000002AB`).
#[test]
fn answers_left_behind_by_a_failed_frame_after_a_proxy_header_never_reach_another_client() {
    let server = Server::start(
        r#"[server]
workers = 1

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "upper"
proxy_protocol = true
"#,
    );
    // Not {port2}: the start-up probe sends no PROXY header.
    let proxied = server.aux_port(0);
    let mut a = TcpStream::connect(("127.0.0.1", proxied)).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n".to_vec();
    bytes.extend_from_slice(&frame(b"hi"));
    bytes.extend_from_slice(b"XXXXXXXXXX");
    a.write_all(&bytes).unwrap();
    // A gets the answer to its good frame, then the close.
    assert_eq!(read_frame(&mut a).unwrap(), b"HI");
    let mut rest = Vec::new();
    let _ = a.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to the bad frame: {rest:?}");

    // B, on the same (only) worker, gets exactly its own answer.
    let mut b = Client::connect(server.port());
    assert_eq!(b.request(b"ab"), b"AB");
    b.set_read_timeout(Duration::from_millis(300));
    let mut extra = [0u8; 64];
    match b.stream.read(&mut extra) {
        Ok(n) => assert_eq!(n, 0, "extra bytes after B's answer: {:?}", &extra[..n]),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
}

/// Review finding: a half-close that arrived while the worker was still
/// writing earlier answers (the client not reading yet) was forgotten, and
/// the connection stayed open until `read_timeout`.
#[test]
fn a_half_close_seen_while_answers_are_pending_closes_once_they_are_sent() {
    let server = Server::start(
        r#"[server]
workers = 1
read_timeout = "20s"

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "misbehave"
"#,
    );
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&frame(b"big:4000000")).unwrap();
    // The worker fills the socket and waits to write the rest; only then
    // does the last request arrive, with the half-close.
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(&frame(b"big:100")).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(read_frame(&mut stream).unwrap().len(), 4_000_000);
    assert_eq!(read_frame(&mut stream).unwrap().len(), 100);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the close came only after {:?} (read_timeout is 20 s)",
        started.elapsed()
    );
}

/// Review finding: a reload that lowered `workers` on a `reuseport`
/// listener left the master holding the removed slot's socket, still
/// listening: the kernel kept routing new connections into a queue nobody
/// accepted from.
#[test]
fn a_reload_to_fewer_workers_leaves_no_reuseport_socket_without_a_worker() {
    let text = |workers: usize| {
        format!(
            r#"[server]
workers = {workers}
shutdown_timeout = "2s"

[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{{port2}}"
plugin = "upper"
reuseport = true
"#
        )
    };
    let mut server = Server::start(&text(2));
    server.wait_for_workers(2);
    let shared = server.port_n(1);
    server.sandbox_mut().write_config(&text(1));
    server.signal(libc::SIGHUP);
    server.wait_for_log_line(&["reload complete"]);
    server.wait_for("one worker left", || {
        (server.worker_pids().len() == 1).then_some(())
    });
    for i in 0..40 {
        let mut client = Client::connect(shared);
        client.set_read_timeout(Duration::from_secs(2));
        let payload = format!("hello {i}");
        let answer = client
            .stream
            .write_all(&frame(payload.as_bytes()))
            .and_then(|()| read_frame(&mut client.stream));
        assert_eq!(
            answer.unwrap_or_else(|e| panic!("connection {i} not served: {e}")),
            payload.to_uppercase().as_bytes()
        );
    }
}
