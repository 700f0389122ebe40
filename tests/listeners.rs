//! Listener kinds and options: Unix domain socket listeners (permissions,
//! stale-socket cleanup, relative paths, removal on stop and by a reload),
//! config errors for options that do not fit the address, the PROXY protocol
//! v1/v2 (`proxy_protocol = true`, on TCP and Unix listeners) and
//! `reuseport` (one SO_REUSEPORT socket per worker slot, kept across
//! reloads).
//!
//! The plugin is `plugins/testing/c/whoami.c`, built here with `cc`: it
//! answers `<worker pid> <peer> <listener>`, so a test sees which worker
//! served it and what client address the host handed to the plugin.
//!
//! `Server::start` probes every `{port}` listener with a plain frame, which a
//! PROXY or Unix listener cannot answer; so each config here also has a plain
//! TCP listener on `{port}` for that probe, and the listeners under test use
//! an `{aux}` port (renewable, not probed) or a path in the sandbox.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{
    describe, frame, show, target_dir, workspace_root, Client, Proc, Sandbox, Server, IO_TIMEOUT,
    SIGINT,
};

// ------------------------------------------------------------------ helpers

/// `libwhoami.so`, compiled once per test binary (to a temporary name, then
/// renamed, so that concurrent builds never see half a file).
fn whoami_so() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let dir = target_dir().join("test-plugins");
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("libwhoami_listeners.so");
        let tmp = dir.join(format!(".libwhoami_listeners.{}.tmp", std::process::id()));
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let result = Command::new(&cc)
            .args([
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-shared",
                "-fPIC",
                "-fvisibility=hidden",
                "-I",
            ])
            .arg(workspace_root().join("plugin-api/include"))
            .arg("-o")
            .arg(&tmp)
            .arg(workspace_root().join("plugins/testing/c/whoami.c"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(
            result.status.success(),
            "building whoami.c failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
        fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// Replaces `{whoami}` (the plugin's path) and `{name}` for each of `vars`,
/// leaving the sandbox's own placeholders (`{port}`, `{echo}`, ...) alone.
fn template(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = text.replace("{whoami}", whoami_so().to_str().unwrap());
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// `[server]` lines, the whoami plugin, the plain probe listener on `{port}`,
/// then `listeners` (raw TOML).
fn config(server: &str, listeners: &str) -> String {
    format!(
        r#"[server]
{server}

[[plugins]]
name = "whoami"
path = "{{whoami}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "whoami"
{listeners}"#
    )
}

/// What whoami answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Whoami {
    pid: i32,
    peer: String,
    listener: String,
}

fn parse_whoami(answer: &[u8]) -> Whoami {
    let text = String::from_utf8_lossy(answer);
    let mut words = text.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some(pid), Some(peer), Some(listener)) => Whoami {
            pid: pid
                .parse()
                .unwrap_or_else(|_| panic!("whoami answered {}", show(answer))),
            peer: peer.to_string(),
            listener: listener.to_string(),
        },
        _ => panic!("whoami answered {}", show(answer)),
    }
}

/// Reads one frame from any stream.
fn read_frame(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 10];
    stream.read_exact(&mut header)?;
    let len: usize = std::str::from_utf8(&header)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header {}", show(&header)),
            )
        })?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

/// Sends `bytes` (a PROXY header and/or frames) in one write and reads one
/// whoami answer.
fn ask(stream: &mut (impl Read + Write), bytes: &[u8], server: &Server) -> Whoami {
    stream.write_all(bytes).unwrap_or_else(|e| {
        panic!(
            "sending {}: {e}\n--- log ---\n{}",
            show(bytes),
            server.log()
        )
    });
    let answer = read_frame(stream).unwrap_or_else(|e| {
        panic!(
            "no answer to {}: {e}\n--- log ---\n{}",
            show(bytes),
            server.log()
        )
    });
    parse_whoami(&answer)
}

/// How a read on a connection the server should close ended.
fn closed_without_reply(stream: &mut impl Read, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(start.elapsed()),
            Ok(n) => return Err(format!("got a reply: {}", show(&buf[..n]))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return Ok(start.elapsed())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("still open after {timeout:?}"))
            }
            Err(e) => return Err(format!("unexpected error {e}")),
        }
    }
}

fn tcp(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn unix(path: &Path) -> UnixStream {
    let stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// `bytes` followed by one frame.
fn then_frame(bytes: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(&frame(payload));
    out
}

const V1: &[u8] = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header (command PROXY, TCP over IPv4 or IPv6) with `tlvs`
/// appended to the address block.
fn v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            0x21
        }
        _ => panic!("mixed address families"),
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    block.extend_from_slice(tlvs);
    v2_raw(0x21, family, &block)
}

/// A v2 header with the given version/command and family/protocol bytes.
fn v2_raw(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(version_command);
    out.push(family);
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(block);
    out
}

/// A v2 LOCAL header (a load balancer's health check).
fn v2_local() -> Vec<u8> {
    v2_raw(0x20, 0x00, &[])
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A server with a `proxy_protocol = true` TCP listener (`{aux}`) next to
/// the probe listener; returns it and the PROXY listener's port.
fn start_proxy_server(server_lines: &str) -> (Server, u16) {
    let text = config(
        server_lines,
        r#"
[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "whoami"
proxy_protocol = true
"#,
    );
    // {aux}: a renewable port the start-up probe leaves alone (it sends
    // no PROXY header).
    let server = Server::start(&template(&text, &[]));
    let pport = server.aux_port(0);
    (server, pport)
}

/// Waits until the log has at least `n` lines containing `needle`.
fn wait_for_log_count(server: &Server, needle: &str, n: usize) {
    server.wait_for(&format!("{n} log line(s) with {needle:?}"), || {
        (server.log_count(needle) >= n).then_some(())
    });
}

// ------------------------------------------------------------ PROXY protocol

#[test]
fn a_proxy_v1_header_gives_the_plugin_the_real_client_address_and_frames_may_follow_in_the_same_write(
) {
    let (server, port) = start_proxy_server("workers = 1");

    // Header and first frame in one write; later frames on the same
    // connection keep the header's client.
    let mut stream = tcp(port);
    let first = ask(&mut stream, &then_frame(V1, b"a"), &server);
    assert_eq!(first.peer, "1.2.3.4:1111", "{first:?}");
    assert_eq!(first.listener, format!("127.0.0.1:{port}"));
    for _ in 0..3 {
        let again = ask(&mut stream, &frame(b"b"), &server);
        assert_eq!(again.peer, "1.2.3.4:1111", "on the same connection later");
    }

    // Header alone, then the frame in a second write; two pipelined frames.
    let mut stream = tcp(port);
    stream
        .write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 9000\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(50));
    let mut two = frame(b"x");
    two.extend_from_slice(&frame(b"y"));
    stream.write_all(&two).unwrap();
    for _ in 0..2 {
        let answer = parse_whoami(&read_frame(&mut stream).unwrap());
        assert_eq!(answer.peer, "10.0.0.1:40000");
    }

    // IPv6.
    let mut stream = tcp(port);
    let six = ask(
        &mut stream,
        &then_frame(b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n", b"c"),
        &server,
    );
    assert_eq!(six.peer, "[2001:db8::1]:5555");
    assert_eq!(
        server.log_count("PROXY protocol error"),
        0,
        "{}",
        server.log()
    );
}

#[test]
fn a_proxy_v2_header_gives_the_plugin_the_real_client_address_and_its_tlvs_are_skipped() {
    let (server, port) = start_proxy_server("workers = 1");

    let header = v2(addr("192.0.2.7:31337"), addr("127.0.0.1:9000"), &[]);
    let mut stream = tcp(port);
    let four = ask(&mut stream, &then_frame(&header, b"a"), &server);
    assert_eq!(four.peer, "192.0.2.7:31337");
    assert_eq!(
        ask(&mut stream, &frame(b"b"), &server).peer,
        "192.0.2.7:31337"
    );

    let header = v2(addr("[2001:db8::7]:1234"), addr("[::1]:9000"), &[]);
    let mut stream = tcp(port);
    assert_eq!(
        ask(&mut stream, &then_frame(&header, b"c"), &server).peer,
        "[2001:db8::7]:1234"
    );

    // TLVs after the addresses (a NOOP and an authority, as HAProxy sends).
    let mut tlvs = vec![0x04, 0x00, 0x03, 0, 0, 0];
    tlvs.extend_from_slice(&[0x02, 0x00, 0x0b]);
    tlvs.extend_from_slice(b"example.org");
    let header = v2(addr("198.51.100.9:4242"), addr("127.0.0.1:9000"), &tlvs);
    let mut stream = tcp(port);
    assert_eq!(
        ask(&mut stream, &then_frame(&header, b"d"), &server).peer,
        "198.51.100.9:4242"
    );
    assert_eq!(
        server.log_count("PROXY protocol error"),
        0,
        "{}",
        server.log()
    );
}

#[test]
fn proxy_v1_unknown_and_v2_local_are_accepted_and_keep_the_socket_address_as_the_peer() {
    let (server, port) = start_proxy_server("workers = 1");

    let mut stream = tcp(port);
    let own = stream.local_addr().unwrap().to_string();
    let unknown = ask(
        &mut stream,
        &then_frame(b"PROXY UNKNOWN\r\n", b"a"),
        &server,
    );
    assert_eq!(unknown.peer, own, "PROXY UNKNOWN");

    let mut stream = tcp(port);
    let own = stream.local_addr().unwrap().to_string();
    let unknown = ask(
        &mut stream,
        &then_frame(b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n", b"a"),
        &server,
    );
    assert_eq!(unknown.peer, own, "PROXY UNKNOWN with ignored fields");

    let mut stream = tcp(port);
    let own = stream.local_addr().unwrap().to_string();
    let local = ask(&mut stream, &then_frame(&v2_local(), b"b"), &server);
    assert_eq!(local.peer, own, "v2 LOCAL");
    assert!(own.starts_with("127.0.0.1:"));
    assert_eq!(
        server.log_count("PROXY protocol error"),
        0,
        "{}",
        server.log()
    );
}

#[test]
fn a_connection_without_a_proxy_header_is_closed_without_a_reply_and_others_are_unaffected() {
    let (server, port) = start_proxy_server("workers = 1");

    let mut good = tcp(port);
    assert_eq!(
        ask(&mut good, &then_frame(V1, b"a"), &server).peer,
        "1.2.3.4:1111"
    );

    let mut plain = tcp(port);
    let plain_peer = plain.local_addr().unwrap().to_string();
    plain.write_all(&frame(b"hello")).unwrap();
    if let Err(why) = closed_without_reply(&mut plain, IO_TIMEOUT) {
        panic!(
            "a plain frame on a PROXY listener: {why}\n--- log ---\n{}",
            server.log()
        );
    }
    let line = server.wait_for_log_line(&["PROXY protocol error", &plain_peer]);
    assert!(
        line.contains(&format!("127.0.0.1:{port}")),
        "the log line should name the listener: {line}"
    );

    // The open connection and new ones are served as before.
    assert_eq!(ask(&mut good, &frame(b"b"), &server).peer, "1.2.3.4:1111");
    let mut fresh = tcp(port);
    assert_eq!(
        ask(&mut fresh, &then_frame(V1, b"c"), &server).peer,
        "1.2.3.4:1111"
    );
    assert_eq!(
        server.log_count("PROXY protocol error"),
        1,
        "{}",
        server.log()
    );
}

#[test]
fn malformed_proxy_headers_are_closed_without_a_reply_and_logged() {
    let (server, port) = start_proxy_server("workers = 1");
    let mut too_long_v2 = V2_SIGNATURE.to_vec();
    too_long_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let mut v1_too_long = b"PROXY UNKNOWN ".to_vec();
    v1_too_long.extend_from_slice(&[b'x'; 200]);
    v1_too_long.extend_from_slice(b"\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1 port out of range",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 99999\r\n".to_vec(),
        ),
        ("v1 missing fields", b"PROXY TCP4 1.2.3.4\r\n".to_vec()),
        (
            "v1 lowercase",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n".to_vec(),
        ),
        (
            "v1 unknown protocol",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1111 2222\r\n".to_vec(),
        ),
        (
            "v1 IPv6 address under TCP4",
            b"PROXY TCP4 ::1 ::2 1111 2222\r\n".to_vec(),
        ),
        (
            "v1 bare LF",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\n".to_vec(),
        ),
        ("v1 line longer than 107 bytes", v1_too_long),
        ("v2 version 3", v2_raw(0x31, 0x11, &[0; 12])),
        ("v2 unknown command", v2_raw(0x2f, 0x11, &[0; 12])),
        ("v2 DGRAM", v2_raw(0x21, 0x12, &[0; 12])),
        ("v2 INET block too short", v2_raw(0x21, 0x11, &[0; 4])),
        ("v2 length 65535", too_long_v2),
    ];
    let mut good = tcp(port);
    assert_eq!(
        ask(&mut good, &then_frame(V1, b"a"), &server).peer,
        "1.2.3.4:1111"
    );
    let mut failures = Vec::new();
    for (what, header) in &cases {
        let mut stream = tcp(port);
        // The header, then a frame; a server that wrongly accepted the header
        // would answer the frame.
        let _ = stream.write_all(&then_frame(header, b"hello"));
        if let Err(why) = closed_without_reply(&mut stream, Duration::from_secs(5)) {
            failures.push(format!("{what} ({}): {why}", show(header)));
        }
    }
    assert!(
        failures.is_empty(),
        "malformed PROXY headers not refused:\n{}\n--- log ---\n{}",
        failures.join("\n"),
        server.log()
    );
    wait_for_log_count(&server, "PROXY protocol error", cases.len());
    assert_eq!(ask(&mut good, &frame(b"b"), &server).peer, "1.2.3.4:1111");
}

#[test]
fn a_proxy_header_sent_byte_by_byte_is_reassembled() {
    let (server, port) = start_proxy_server("workers = 1");
    let v2_header = v2(addr("203.0.113.5:6000"), addr("127.0.0.1:9000"), &[]);
    for (what, header, peer) in [
        ("v1", V1.to_vec(), "1.2.3.4:1111"),
        ("v2", v2_header, "203.0.113.5:6000"),
    ] {
        let mut stream = tcp(port);
        // The frame too, byte by byte, straight behind the header.
        for byte in then_frame(&header, b"slow") {
            stream.write_all(&[byte]).unwrap();
            thread::sleep(Duration::from_millis(3));
        }
        let answer = read_frame(&mut stream).unwrap_or_else(|e| {
            panic!(
                "{what} header sent byte by byte: no answer: {e}\n--- log ---\n{}",
                server.log()
            )
        });
        assert_eq!(parse_whoami(&answer).peer, peer, "{what}");
    }
    assert_eq!(
        server.log_count("PROXY protocol error"),
        0,
        "{}",
        server.log()
    );
}

#[test]
fn a_client_that_never_completes_its_proxy_header_is_closed_after_read_timeout() {
    let (server, port) = start_proxy_server("workers = 1\nread_timeout = \"1s\"");

    // Part of a header, then nothing.
    let mut partial = tcp(port);
    partial.write_all(b"PROXY TCP4 1.2.").unwrap();
    // Nothing at all.
    let mut silent = tcp(port);
    // A header trickling in, one byte every 250 ms (it would take ~10 s):
    // bytes inside a header do not extend its deadline.
    let mut trickle = tcp(port);
    trickle
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let start = Instant::now();
    let mut trickle_closed = None;
    for &byte in V1 {
        if trickle.write_all(&[byte]).is_err() {
            trickle_closed = Some(start.elapsed());
            break;
        }
        match closed_without_reply(&mut trickle, Duration::from_millis(250)) {
            Ok(_) => {
                trickle_closed = Some(start.elapsed());
                break;
            }
            Err(why) if why.starts_with("still open") => {}
            Err(why) => panic!("trickled header: {why}"),
        }
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let trickle_closed = trickle_closed.unwrap_or_else(|| {
        panic!(
            "a header trickling in one byte per 250 ms was not closed within 5 s (read_timeout = 1s)\n--- log ---\n{}",
            server.log()
        )
    });
    assert!(
        trickle_closed >= Duration::from_millis(900) && trickle_closed < Duration::from_secs(4),
        "trickled header closed after {trickle_closed:?}, read_timeout = 1s"
    );

    for (what, stream) in [("partial header", &mut partial), ("no header", &mut silent)] {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match closed_without_reply(stream, Duration::from_secs(5)) {
            Ok(_) => {}
            Err(why) => panic!("{what}: {why}\n--- log ---\n{}", server.log()),
        }
    }
    let total = start.elapsed();
    assert!(
        total < Duration::from_secs(6),
        "closing took {total:?} with read_timeout = 1s"
    );
    // The listener still serves.
    let mut fresh = tcp(port);
    assert_eq!(
        ask(&mut fresh, &then_frame(V1, b"a"), &server).peer,
        "1.2.3.4:1111"
    );
}

#[test]
fn after_a_proxy_header_the_log_names_the_real_client() {
    let (server, port) = start_proxy_server("workers = 1");
    let mut stream = tcp(port);
    assert_eq!(
        ask(&mut stream, &then_frame(V1, b"a"), &server).peer,
        "1.2.3.4:1111"
    );
    // A framing error after the header: logged with the header's client.
    stream.write_all(b"00000000zz").unwrap();
    if let Err(why) = closed_without_reply(&mut stream, IO_TIMEOUT) {
        panic!("bad frame after a PROXY header: {why}");
    }
    let line = server.wait_for_log_line(&["protocol error", "not an ASCII digit"]);
    assert!(
        line.contains("1.2.3.4:1111"),
        "the protocol error should be logged with the real client's address: {line}"
    );
}

#[test]
fn a_client_that_closes_before_sending_a_proxy_header_is_not_logged_as_a_cut_frame() {
    // What a plain TCP health check does: connect, then close. On a listener
    // without the PROXY protocol that is a close at a frame boundary (debug);
    // nothing was cut, so it must not read as a cut frame at info either.
    let (server, port) = start_proxy_server("workers = 1");
    drop(tcp(port));
    let mut local = tcp(port);
    local.write_all(&v2_local()).unwrap();
    drop(local);
    thread::sleep(Duration::from_millis(200));
    let mut stream = tcp(port);
    assert_eq!(
        ask(&mut stream, &then_frame(V1, b"a"), &server).peer,
        "1.2.3.4:1111"
    );
    let log = server.log();
    assert!(
        !log.contains("in the middle of a frame"),
        "a connection closed before any byte was logged as closed mid-frame:\n{log}"
    );
}

#[test]
fn the_proxy_protocol_works_on_a_unix_listener_too() {
    let text = config(
        "workers = 1",
        r#"
[[listeners]]
addr = "unix:{dir}/proxied.sock"
plugin = "whoami"
proxy_protocol = true
"#,
    );
    let server = Server::start(&template(&text, &[]));
    let path = server.dir().join("proxied.sock");

    let mut stream = unix(&path);
    let header = v2(addr("192.0.2.1:5000"), addr("192.0.2.2:9000"), &[]);
    let answer = ask(&mut stream, &then_frame(&header, b"a"), &server);
    assert_eq!(answer.peer, "192.0.2.1:5000");
    assert_eq!(answer.listener, format!("unix:{}", path.display()));

    let mut stream = unix(&path);
    assert_eq!(
        ask(&mut stream, &then_frame(V1, b"b"), &server).peer,
        "1.2.3.4:1111"
    );

    let mut stream = unix(&path);
    let local = ask(&mut stream, &then_frame(&v2_local(), b"c"), &server);
    assert!(!local.peer.is_empty());

    // No header: closed without a reply.
    let mut stream = unix(&path);
    stream.write_all(&frame(b"hello")).unwrap();
    if let Err(why) = closed_without_reply(&mut stream, IO_TIMEOUT) {
        panic!("a plain frame on a unix PROXY listener: {why}");
    }
    server.wait_for_log_line(&["PROXY protocol error"]);
}

// -------------------------------------------------------- Unix domain sockets

fn assert_is_socket(path: &Path) {
    let meta = fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} should exist: {e}", path.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
}

#[test]
fn a_unix_listener_serves_with_the_configured_mode_and_its_file_is_removed_on_stop() {
    let text = config(
        "workers = 2",
        r#"
[[listeners]]
addr = "unix:{dir}/nbnet.sock"
plugin = "whoami"
mode = "0660"
"#,
    );
    let server = Server::start(&template(&text, &[]));
    let path = server.dir().join("nbnet.sock");
    assert_is_socket(&path);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket file mode {mode:o}, configured 0660");

    let mut stream = unix(&path);
    let first = ask(&mut stream, &frame(b"a"), &server);
    assert_eq!(first.listener, format!("unix:{}", path.display()));
    assert_eq!(ask(&mut stream, &frame(b"b"), &server).pid, first.pid);
    for _ in 0..5 {
        let mut stream = unix(&path);
        ask(&mut stream, &frame(b"c"), &server);
    }

    let sandbox = server.stop();
    assert!(
        fs::symlink_metadata(&path).is_err(),
        "the socket file should be removed when the master stops"
    );
    drop(sandbox);
}

#[test]
fn a_relative_unix_path_resolves_against_the_config_folder_and_is_removed_on_a_fast_stop() {
    let mut sandbox = Sandbox::new();
    let elsewhere = sandbox.mkdir("elsewhere");
    sandbox.set_cwd(&elsewhere);
    let text = config(
        "workers = 1",
        r#"
[[listeners]]
addr = "unix:relative.sock"
plugin = "whoami"
"#,
    );
    let mut server = sandbox.start(&template(&text, &[]));
    let path = server.dir().join("relative.sock");
    assert_is_socket(&path);
    assert!(
        !elsewhere.join("relative.sock").exists(),
        "the path must resolve against the config's folder, not the working directory"
    );
    let mut stream = unix(&path);
    let answer = ask(&mut stream, &frame(b"a"), &server);
    assert_eq!(answer.listener, format!("unix:{}", path.display()));
    drop(stream);

    server.signal(SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("nbnet should exit after SIGINT");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
    assert!(
        fs::symlink_metadata(&path).is_err(),
        "the socket file should be removed after a fast stop too"
    );
}

#[test]
fn a_stale_unix_socket_file_is_replaced_at_startup() {
    let sandbox = Sandbox::new();
    let path = sandbox.path().join("stale.sock");
    // A server that died: its socket file remains, nothing answers on it.
    drop(UnixListener::bind(&path).unwrap());
    assert_is_socket(&path);
    assert!(UnixStream::connect(&path).is_err());

    let text = config(
        "workers = 1",
        r#"
[[listeners]]
addr = "unix:{dir}/stale.sock"
plugin = "whoami"
"#,
    );
    let server = sandbox.start(&template(&text, &[]));
    let mut stream = unix(&path);
    let answer = ask(&mut stream, &frame(b"a"), &server);
    assert_eq!(answer.listener, format!("unix:{}", path.display()));
    server.wait_for_log_line(&["stale socket", "stale.sock"]);
}

#[test]
fn a_unix_path_where_another_server_answers_fails_startup_and_is_left_alone() {
    let mut sandbox = Sandbox::new();
    let path = sandbox.path().join("taken.sock");
    let other = UnixListener::bind(&path).unwrap();
    let text = config(
        "workers = 1",
        r#"
[[listeners]]
addr = "unix:{dir}/taken.sock"
plugin = "whoami"
"#,
    );
    let (status, stderr) = sandbox.expect_startup_failure(&template(&text, &[]));
    assert_eq!(status.code(), Some(1), "{}\n{stderr}", describe(&status));
    assert!(
        stderr.contains(&format!("unix:{}", path.display())),
        "the error should name the listener:\n{stderr}"
    );
    // The other server's socket is untouched and still answers.
    assert_is_socket(&path);
    let _client = UnixStream::connect(&path).expect("the other server still answers");
    other.set_nonblocking(true).unwrap();
    other
        .accept()
        .expect("the connection reached the other server");
}

#[test]
fn a_unix_path_that_is_not_a_socket_fails_startup_and_is_never_deleted() {
    let mut sandbox = Sandbox::new();
    let path = sandbox.write("precious.txt", b"keep me");
    let text = config(
        "workers = 1",
        r#"
[[listeners]]
addr = "unix:{dir}/precious.txt"
plugin = "whoami"
"#,
    );
    let (status, stderr) = sandbox.expect_startup_failure(&template(&text, &[]));
    assert_eq!(status.code(), Some(1), "{}\n{stderr}", describe(&status));
    assert!(
        stderr.contains(&format!("unix:{}", path.display())),
        "the error should name the listener:\n{stderr}"
    );
    assert_eq!(fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn listener_options_that_do_not_fit_the_address_are_config_errors_in_check_and_at_startup() {
    let cases = [
        (
            "reuseport on a unix listener",
            "addr = \"unix:{dir}/a.sock\"\nreuseport = true",
            "reuseport applies to TCP listeners only",
        ),
        (
            "mode on a TCP listener",
            "addr = \"127.0.0.1:{port}\"\nmode = \"0660\"",
            "mode applies to unix: listeners only",
        ),
        (
            "mode 999",
            "addr = \"unix:{dir}/b.sock\"\nmode = \"999\"",
            "is not octal",
        ),
    ];
    for (what, listener, message) in cases {
        let text = format!(
            "[[plugins]]\nname = \"echo\"\npath = \"{{echo}}\"\n\n[[listeners]]\n{listener}\nplugin = \"echo\"\n"
        );
        let mut sandbox = Sandbox::new();
        let check = sandbox.check(&text);
        assert_eq!(
            check.status.code(),
            Some(3),
            "{what}: --check should exit 3, got {}\n{}",
            describe(&check.status),
            check.stderr
        );
        assert!(
            check.stderr.contains(message) && check.stderr.contains("nbnet.toml:"),
            "{what}: --check should say {message:?} with file:line:\n{}",
            check.stderr
        );
        let (status, stderr) = sandbox.expect_startup_failure(&text);
        assert_eq!(
            status.code(),
            Some(3),
            "{what}: startup should exit 3, got {}\n{stderr}",
            describe(&status)
        );
        assert!(stderr.contains(message), "{what}:\n{stderr}");
        for leftover in ["a.sock", "b.sock"] {
            assert!(
                !sandbox.path().join(leftover).exists(),
                "{what}: an invalid config must bind nothing"
            );
        }
    }
}

// ------------------------------------------------------------------ reuseport

const REUSEPORT: &str = r#"
[server]
workers = 2
shutdown_timeout = "5s"

[[plugins]]
name = "whoami"
path = "{whoami}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "whoami"
reuseport = true
"#;

/// Opens `n` new connections and returns the pid that served each.
fn pids_over_new_connections(server: &Server, n: usize) -> Vec<i32> {
    (0..n)
        .map(|_| {
            let mut client = Client::connect(server.port());
            parse_whoami(&client.request(b"who")).pid
        })
        .collect()
}

/// Sorted pids of `workers`.
fn pids_of(workers: &[Proc]) -> Vec<i32> {
    let mut pids: Vec<i32> = workers.iter().map(|p| p.pid).collect();
    pids.sort_unstable();
    pids
}

fn distinct(pids: &[i32]) -> Vec<i32> {
    let mut out = pids.to_vec();
    out.sort_unstable();
    out.dedup();
    out
}

#[test]
fn with_reuseport_both_workers_accept_new_connections() {
    let server = Server::start(&template(REUSEPORT, &[]));
    let workers: Vec<i32> = server.wait_for_workers(2).iter().map(|p| p.pid).collect();
    let pids = pids_over_new_connections(&server, 100);
    let seen = distinct(&pids);
    let mut expected = workers.clone();
    expected.sort_unstable();
    assert_eq!(
        seen,
        expected,
        "100 new connections should reach both workers {workers:?}; served by {} and {}",
        pids.iter().filter(|&&p| p == expected[0]).count(),
        pids.iter().filter(|&&p| p == expected[1]).count()
    );
}

/// How one connection of the background loop ended.
enum Trip {
    Answered,
    Refused(String),
    /// Closed before any byte of the answer: the documented reload race
    /// (README "Operations"), safe to retry.
    ClosedBeforeAnswer,
    Other(String),
}

impl Trip {
    /// Why a trip failed, for the assertion message.
    fn problem(&self) -> Option<String> {
        match self {
            Trip::Refused(e) => Some(format!("refused: {e}")),
            Trip::Other(e) => Some(e.clone()),
            Trip::Answered | Trip::ClosedBeforeAnswer => None,
        }
    }
}

fn one_trip(port: u16) -> Trip {
    let mut stream = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return Trip::Refused(e.to_string()),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    if stream.write_all(&frame(b"who")).is_err() {
        return Trip::ClosedBeforeAnswer;
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if got.len() >= 10 {
            let len: usize = match std::str::from_utf8(&got[..10])
                .ok()
                .and_then(|s| s.parse().ok())
            {
                Some(len) => len,
                None => return Trip::Other(format!("bad header {}", show(&got))),
            };
            if got.len() >= 10 + len {
                parse_whoami(&got[10..10 + len]);
                return Trip::Answered;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) if got.is_empty() => return Trip::ClosedBeforeAnswer,
            Ok(0) => return Trip::Other(format!("cut after {} bytes", got.len())),
            Err(e) => return Trip::Other(format!("{e} after {} bytes", got.len())),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn a_reload_keeps_the_reuseport_listener_serving_and_refuses_no_connection() {
    let server = Server::start(&template(REUSEPORT, &[]));
    let old = server.wait_for_workers(2);
    let port = server.port();

    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(Mutex::new(Vec::<Trip>::new()));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (stop, trips) = (stop.clone(), trips.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let trip = one_trip(port);
                    trips.lock().unwrap().push(trip);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGHUP);
    server.wait_for_log_line(&["reload complete in"]);
    server.wait_for("the old workers to finish draining", || {
        old.iter().all(|p| !p.alive()).then_some(())
    });
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let trips = std::mem::take(&mut *trips.lock().unwrap());
    let answered = trips.iter().filter(|t| matches!(t, Trip::Answered)).count();
    let early = trips
        .iter()
        .filter(|t| matches!(t, Trip::ClosedBeforeAnswer))
        .count();
    let bad: Vec<String> = trips.iter().filter_map(Trip::problem).collect();
    println!(
        "during the reload: {} connections, {answered} answered, {early} closed before an answer (the documented race)",
        trips.len()
    );
    assert!(
        bad.is_empty(),
        "connections refused or cut during a reload of a reuseport listener: {} of {}, first {:?}\n--- log ---\n{}",
        bad.len(),
        trips.len(),
        &bad[..bad.len().min(5)],
        server.log()
    );
    assert!(answered > 0, "nothing answered during the reload");
    assert_eq!(server.log_count("reload aborted"), 0, "{}", server.log());

    // Both new workers took over their slot's socket: every new connection
    // reaches one of them, and both are reached.
    let new: Vec<i32> = server.wait_for_workers(2).iter().map(|p| p.pid).collect();
    assert!(old.iter().all(|p| !new.contains(&p.pid)));
    let pids = pids_over_new_connections(&server, 100);
    let mut expected = new.clone();
    expected.sort_unstable();
    assert_eq!(
        distinct(&pids),
        expected,
        "after the reload, new connections should reach both new workers {new:?}"
    );
}

#[test]
fn a_reload_that_changes_reuseport_is_aborted_and_service_continues() {
    let mut server = Server::start(&template(REUSEPORT, &[]));
    let before = pids_of(&server.wait_for_workers(2));
    let changed = template(REUSEPORT, &[]).replace("reuseport = true\n", "");
    assert!(!changed.contains("reuseport"));
    server.sandbox_mut().write_config(&changed);
    server.signal(libc::SIGHUP);
    let line = server.wait_for_log_line(&["reload aborted", "reuseport"]);
    assert!(
        line.contains(&format!("127.0.0.1:{}", server.port())),
        "{line}"
    );

    // Nothing changed: the same workers serve, the listener answers.
    thread::sleep(Duration::from_millis(300));
    let now = pids_of(&server.wait_for_workers(2));
    assert_eq!(now, before, "an aborted reload must not replace workers");
    let pids = pids_over_new_connections(&server, 20);
    assert!(
        pids.iter().all(|pid| before.contains(pid)),
        "served by {pids:?}, workers {before:?}"
    );
    assert_eq!(server.log_count("reload complete"), 0, "{}", server.log());

    // Back to the original config: a reload goes through.
    server.sandbox_mut().write_config(&template(REUSEPORT, &[]));
    server.signal(libc::SIGHUP);
    server.wait_for_log_line(&["reload complete in"]);
    let mut client = Client::connect(server.port());
    parse_whoami(&client.request(b"who"));
}

#[test]
fn a_reload_binds_an_added_unix_listener_and_removes_the_file_of_a_removed_one() {
    let listener = |name: &str| {
        format!("\n[[listeners]]\naddr = \"unix:{{dir}}/{name}.sock\"\nplugin = \"whoami\"\n")
    };
    let mut server = Server::start(&template(&config("workers = 1", &listener("old")), &[]));
    let (old, new) = (server.dir().join("old.sock"), server.dir().join("new.sock"));
    ask(&mut unix(&old), &frame(b"a"), &server);

    let text = template(&config("workers = 1", &listener("new")), &[]);
    server.sandbox_mut().write_config(&text);
    server.signal(libc::SIGHUP);
    server.wait_for_log_line(&["reload complete in"]);
    let answer = ask(&mut unix(&new), &frame(b"b"), &server);
    assert_eq!(answer.listener, format!("unix:{}", new.display()));
    server.wait_for("the removed listener's socket file to disappear", || {
        fs::symlink_metadata(&old).is_err().then_some(())
    });
    assert!(UnixStream::connect(&old).is_err());
}
