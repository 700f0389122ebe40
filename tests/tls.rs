//! TLS and mutual TLS on listeners (issue 13), against the real binary:
//! certificates are made here with rcgen, clients are rustls (and
//! `openssl s_client`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbnet_tests::{frame, samples, Sandbox, Server};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate: (cert PEM, key PEM, cert DER).
    fn leaf(
        &self,
        cn: &str,
        sans: &[&str],
        expired: bool,
    ) -> (String, String, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "nbnet tests");
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
}

/// Files for a TLS listener in the sandbox: ca.pem, server.pem, server.key.
struct Pki {
    ca: Ca,
    server_der: CertificateDer<'static>,
}

fn pki(sandbox: &Sandbox) -> Pki {
    let ca = Ca::new("nbnet test CA");
    let (cert, key, server_der) = ca.leaf("nbnet server", &["127.0.0.1", "localhost"], false);
    sandbox.write("ca.pem", ca.pem().as_bytes());
    sandbox.write("server.pem", cert.as_bytes());
    sandbox.write("server.key", key.as_bytes());
    Pki { ca, server_der }
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    })
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(port: u16, config: &Arc<ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    start_tls(tcp, config)
}

fn start_tls(tcp: TcpStream, config: &Arc<ClientConfig>) -> Tls {
    let name = ServerName::try_from("127.0.0.1").unwrap();
    StreamOwned::new(ClientConnection::new(config.clone(), name).unwrap(), tcp)
}

fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 10];
    stream.read_exact(&mut header)?;
    let len: usize = std::str::from_utf8(&header).unwrap().parse().unwrap();
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn request(stream: &mut Tls, payload: &[u8]) -> Vec<u8> {
    stream.write_all(&frame(payload)).unwrap();
    stream.flush().unwrap();
    read_frame(stream).unwrap()
}

/// Whether the server refuses this connection: the request gets no answer.
fn refused(stream: &mut Tls) -> bool {
    let _ = stream.write_all(&frame(b"tls"));
    let _ = stream.flush();
    read_frame(stream).is_err()
}

/// The sum over workers of metric `name`'s samples whose labels contain `labels`.
fn metric(server: &Server, name: &str, labels: &str) -> f64 {
    sum_of(&admin_metrics(server), name, labels)
}

fn sum_of(text: &str, name: &str, labels: &str) -> f64 {
    samples(text, name)
        .iter()
        .filter(|(l, _)| l.contains(labels))
        .map(|(_, v)| v)
        .sum()
}

fn admin_metrics(server: &Server) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", server.admin_port())).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

const UPPER_TLS: &str = r#"[server]
workers = 1
read_timeout = "2s"

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "whoami"
path = "{whoami}"

# Plaintext: the harness's start-up probe.
[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "upper"
tls = { cert = "server.pem", key = "server.key" }

[[listeners]]
addr = "127.0.0.1:{aux2}"
plugin = "whoami"
tls = { cert = "server.pem", key = "server.key", client_ca = "ca.pem" }
"#;

/// The TLS port of [`UPPER_TLS`] (upper).
fn tls_port(server: &Server) -> u16 {
    server.aux_port(0)
}

fn start() -> (Server, Pki) {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    (Server::start_in(sandbox, UPPER_TLS), pki)
}

#[test]
fn round_trips_single_pipelined_large_and_byte_by_byte() {
    let (server, pki) = start();
    let config = client_config(&pki.ca.pem(), None);
    let mut tls = connect(tls_port(&server), &config);
    assert_eq!(request(&mut tls, b"hello"), b"HELLO");
    // The server's certificate is the configured one.
    assert_eq!(
        tls.conn.peer_certificates().unwrap()[0],
        pki.server_der,
        "served another certificate"
    );
    // Pipelined: 100 requests in one write.
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(frame(format!("req {i}").as_bytes()));
    }
    tls.write_all(&batch).unwrap();
    tls.flush().unwrap();
    for i in 0..100 {
        assert_eq!(read_frame(&mut tls).unwrap(), format!("REQ {i}").as_bytes());
    }
    // 64 KiB frames: each spans several TLS records both ways.
    let big: Vec<u8> = (0..65536).map(|i| b'a' + (i % 26) as u8).collect();
    let mut three = Vec::new();
    for _ in 0..3 {
        three.extend(frame(&big));
    }
    tls.write_all(&three).unwrap();
    tls.flush().unwrap();
    for _ in 0..3 {
        assert_eq!(read_frame(&mut tls).unwrap(), big.to_ascii_uppercase());
    }
    // Byte by byte: one TLS record per byte.
    for byte in frame(b"slowly") {
        tls.write_all(&[byte]).unwrap();
        tls.flush().unwrap();
    }
    assert_eq!(read_frame(&mut tls).unwrap(), b"SLOWLY");
    // A clean close (close_notify), then a plaintext plugin view check.
    tls.conn.send_close_notify();
    let _ = tls.flush();
    assert!(metric(&server, "nbnet_tls_handshakes_total", "") >= 1.0);
}

#[test]
fn mutual_tls_refuses_no_certificate_another_ca_and_expired_and_shows_the_subject() {
    let (server, pki) = start();
    let port = server.aux_port(1);
    let ca = pki.ca.pem();
    // No client certificate.
    let mut none = connect(port, &client_config(&ca, None));
    assert!(
        refused(&mut none),
        "a client without a certificate was served"
    );
    // A certificate from another CA.
    let other = Ca::new("another CA");
    let (cert, key, _) = other.leaf("mallory", &["mallory.example"], false);
    let mut foreign = connect(port, &client_config(&ca, Some((&cert, &key))));
    assert!(
        refused(&mut foreign),
        "a foreign client certificate was accepted"
    );
    // An expired certificate from the right CA.
    let (cert, key, _) = pki.ca.leaf("old", &["old.example"], true);
    let mut expired = connect(port, &client_config(&ca, Some((&cert, &key))));
    assert!(
        refused(&mut expired),
        "an expired client certificate was accepted"
    );
    // A valid one: served, and the plugin sees who it is.
    let (cert, key, _) = pki.ca.leaf("alice", &["alice.example", "10.1.2.3"], false);
    let mut alice = connect(port, &client_config(&ca, Some((&cert, &key))));
    let answer = String::from_utf8(request(&mut alice, b"tls")).unwrap();
    assert!(
        answer.starts_with("tls=1 version=030"),
        "TLS facts: {answer}"
    );
    assert!(
        answer.contains("subject=O=nbnet tests,CN=alice")
            && answer.contains("sans=DNS:alice.example,IP:10.1.2.3"),
        "the plugin did not see the client's identity: {answer}"
    );
    assert_eq!(
        metric(
            &server,
            "nbnet_tls_handshake_failures_total",
            "reason=\"client_certificate\""
        ),
        3.0,
        "{}",
        admin_metrics(&server)
    );
    server.wait_for_log_line(&["TLS handshake failed", "127.0.0.1"]);
    // Without mutual TLS, the plugin sees TLS but no client identity.
    drop(server);
}

#[test]
fn plaintext_and_garbage_on_a_tls_port_are_closed_and_the_worker_keeps_serving() {
    let (server, pki) = start();
    let config = client_config(&pki.ca.pem(), None);
    let pid_before = server.worker_pids();
    // A plaintext client speaking the framing protocol.
    let mut plain = TcpStream::connect(("127.0.0.1", tls_port(&server))).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain.write_all(&frame(b"hello")).unwrap();
    let mut buf = [0u8; 64];
    let n = plain.read(&mut buf).unwrap_or(0);
    // Nothing but (at most) a TLS alert record, then the close.
    assert!(
        n == 0 || buf[0] == 0x15,
        "plaintext got an answer: {:?}",
        &buf[..n]
    );
    // Garbage that looks like a handshake record, then random bytes.
    for garbage in [
        &b"\x16\x03\x01\x00\x05hello"[..],
        &b"\x16\x03\x03\xff\xff"[..],
        &[0u8; 300][..],
        &b"GET / HTTP/1.1\r\n\r\n"[..],
    ] {
        let mut raw = TcpStream::connect(("127.0.0.1", tls_port(&server))).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(garbage).unwrap();
        let _ = raw.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest);
        assert!(
            rest.is_empty() || rest[0] == 0x15,
            "garbage {garbage:?} got {rest:?}"
        );
    }
    // The same worker serves a real client.
    let mut tls = connect(tls_port(&server), &config);
    assert_eq!(request(&mut tls, b"still here"), b"STILL HERE");
    assert_eq!(server.worker_pids(), pid_before, "the worker was replaced");
    let text = admin_metrics(&server);
    assert!(
        sum_of(
            &text,
            "nbnet_tls_handshake_failures_total",
            "reason=\"not_tls\""
        ) >= 2.0,
        "plaintext not counted: {text}"
    );
    server.wait_for_log_line(&["TLS handshake failed", "127.0.0.1"]);
}

#[test]
fn a_thousand_stalled_handshakes_are_closed_at_read_timeout_while_others_are_served() {
    let limit = nbnet_tests::raise_fd_limit();
    let count = 1000.min(limit.saturating_sub(100) as usize);
    let (server, pki) = start();
    let config = client_config(&pki.ca.pem(), None);
    // Each sends the start of a ClientHello and stalls.
    let mut stalled = Vec::with_capacity(count);
    for _ in 0..count {
        let mut tcp = TcpStream::connect(("127.0.0.1", tls_port(&server))).unwrap();
        tcp.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01").unwrap();
        stalled.push(tcp);
    }
    let began = Instant::now();
    // A fresh client is served meanwhile.
    let mut fresh = connect(tls_port(&server), &config);
    assert_eq!(request(&mut fresh, b"fresh"), b"FRESH");
    // All stalled ones are closed after read_timeout (2 s).
    for tcp in &mut stalled {
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("a stalled handshake got {:?}", &buf[..n]),
        }
    }
    assert!(
        began.elapsed() >= Duration::from_millis(1500),
        "closed before read_timeout"
    );
    let text = admin_metrics(&server);
    assert_eq!(
        sum_of(
            &text,
            "nbnet_tls_handshake_failures_total",
            "reason=\"incomplete\""
        ),
        count as f64,
        "{text}"
    );
}

const PROXY_TLS: &str = r#"[server]
workers = 1

[[plugins]]
name = "whoami"
path = "{whoami}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "whoami"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "whoami"
proxy_protocol = true
tls = { cert = "server.pem", key = "server.key" }

[[listeners]]
addr = "unix:tls.sock"
plugin = "whoami"
tls = { cert = "server.pem", key = "server.key", min_version = "1.3" }
"#;

#[test]
fn proxy_v2_in_front_of_tls_and_tls_on_a_unix_socket() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let server = Server::start_in(sandbox, PROXY_TLS);
    let config = client_config(&pki.ca.pem(), None);
    // PROXY v2 from 203.0.113.7:4242, then the handshake on the same socket.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.aux_port(0))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend([0x21, 0x11, 0, 12]);
    header.extend([203, 0, 113, 7, 127, 0, 0, 1]);
    header.extend(4242u16.to_be_bytes());
    header.extend(server.aux_port(0).to_be_bytes());
    tcp.write_all(&header).unwrap();
    let mut tls = start_tls(tcp, &config);
    let answer = String::from_utf8(request(&mut tls, b"who")).unwrap();
    assert!(
        answer.contains(" 203.0.113.7:4242 "),
        "the PROXY header's client is not the peer: {answer}"
    );
    let facts = String::from_utf8(request(&mut tls, b"tls")).unwrap();
    assert!(facts.starts_with("tls=1 version=030"), "{facts}");
    assert!(facts.ends_with("subject=- sans=-"), "{facts}");
    // TLS on a unix: listener, TLS 1.3 only.
    let unix = std::os::unix::net::UnixStream::connect(server.dir().join("tls.sock")).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = StreamOwned::new(ClientConnection::new(config, name).unwrap(), unix);
    tls.write_all(&frame(b"tls")).unwrap();
    let facts = String::from_utf8(read_frame(&mut tls).unwrap()).unwrap();
    assert!(facts.starts_with("tls=1 version=0304"), "{facts}");
}

#[test]
fn a_reload_serves_a_renewed_certificate_without_refusing_anyone() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let with_pid_file = UPPER_TLS.replace("workers = 1", "workers = 1\npid_file = \"nbnet.pid\"");
    let mut server = Server::start_in(sandbox, &with_pid_file);
    let config = client_config(&pki.ca.pem(), None);
    let mut old = connect(tls_port(&server), &config);
    assert_eq!(request(&mut old, b"a"), b"A");
    assert_eq!(old.conn.peer_certificates().unwrap()[0], pki.server_der);
    // Renew: a new certificate and key at the same paths.
    let (cert, key, renewed) = pki.ca.leaf("nbnet server", &["127.0.0.1"], false);
    std::fs::write(server.dir().join("server.pem"), cert).unwrap();
    std::fs::write(server.dir().join("server.key"), key).unwrap();
    let port = tls_port(&server);
    let clients = std::thread::spawn({
        let config = config.clone();
        move || {
            // Clients keep connecting during the reload: every one served.
            let mut served = 0;
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                let mut tls = connect(port, &config);
                assert_eq!(request(&mut tls, b"x"), b"X");
                served += 1;
            }
            served
        }
    });
    let outcome = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert!(outcome.status.success(), "reload failed: {outcome:?}");
    assert!(clients.join().unwrap() > 0);
    // A client without a session (one with a session resumes it, the
    // ticket keys survive a reload, and is shown no certificate).
    let mut new = connect(tls_port(&server), &client_config(&pki.ca.pem(), None));
    assert_eq!(request(&mut new, b"b"), b"B");
    assert_eq!(new.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
    assert_eq!(
        new.conn.peer_certificates().unwrap()[0],
        renewed,
        "a new connection got the old certificate after the reload"
    );
    // The TLS connection open across the reload could not move to the new
    // worker: closed at its frame boundary with close_notify, and counted.
    let mut buf = [0u8; 16];
    match old.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the old TLS connection was not closed cleanly: {other:?}"),
    }
    assert!(metric(&server, "nbnet_tls_handover_closes_total", "") >= 1.0);
}

#[test]
fn openssl_s_client_round_trip() {
    let Some(openssl) = nbnet_tests::require_program("openssl", "openssl") else {
        return;
    };
    let (server, _pki) = start();
    let mut child = std::process::Command::new(openssl)
        .args(["s_client", "-quiet", "-ign_eof", "-verify_return_error"])
        .arg("-connect")
        .arg(format!("127.0.0.1:{}", tls_port(&server)))
        .arg("-CAfile")
        .arg(server.dir().join("ca.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = frame(b"from openssl");
    input.extend(frame(b"twice"));
    child.stdin.take().unwrap().write_all(&input).unwrap();
    // The server closes the idle connection at read_timeout (2 s).
    let out = child.wait_with_output().unwrap();
    let mut expected = frame(b"FROM OPENSSL");
    expected.extend(frame(b"TWICE"));
    assert_eq!(
        out.stdout,
        expected,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `tls = …` value, what to put in the folder first, and what the
/// messages must name.
type BadCase<'a> = (&'a str, &'a dyn Fn(&Path), &'a [&'a str]);

fn tls_config(tls: &str) -> String {
    format!(
        r#"[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{aux}}"
plugin = "upper"
tls = {tls}
"#
    )
}

#[test]
fn bad_certificate_and_key_files_are_refused_by_check_and_at_startup_naming_file_and_reason() {
    let other = Ca::new("other");
    let (other_cert, _, _) = other.leaf("x", &["x"], false);
    let cases: [BadCase; 5] = [
        (
            r#"{ cert = "missing.pem", key = "server.key" }"#,
            &|_| {},
            &["missing.pem", "cannot read it", "No such file"],
        ),
        (
            r#"{ cert = "notpem.pem", key = "server.key" }"#,
            &|dir| std::fs::write(dir.join("notpem.pem"), "hello\n").unwrap(),
            &["notpem.pem", "holds no PEM certificate"],
        ),
        (
            r#"{ cert = "other.pem", key = "server.key" }"#,
            &|dir| std::fs::write(dir.join("other.pem"), &other_cert).unwrap(),
            &["server.key", "does not match the certificate", "other.pem"],
        ),
        (
            r#"{ cert = "server.pem", key = "server.pem" }"#,
            &|_| {},
            &["server.pem", "holds no PEM private key"],
        ),
        (
            r#"{ cert = "server.pem", key = "server.key", min_version = "1.1" }"#,
            &|_| {},
            &["min_version", "\"1.2\""],
        ),
    ];
    for (tls, prepare, expected) in cases {
        let mut sandbox = Sandbox::new();
        pki(&sandbox);
        prepare(sandbox.path());
        let template = tls_config(tls);
        let check = sandbox.check(&template);
        assert!(!check.status.success(), "--check accepted {tls}");
        for needle in expected {
            assert!(
                check.stderr.contains(needle),
                "--check of {tls}: no {needle:?} in:\n{}",
                check.stderr
            );
        }
        let (status, log) = sandbox.expect_startup_failure(&template);
        assert!(!status.success());
        for needle in expected {
            assert!(
                log.contains(needle),
                "start with {tls}: no {needle:?} in:\n{log}"
            );
        }
    }
    // An expired server certificate: a warning, not a refusal.
    let mut sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let (cert, key, _) = pki.ca.leaf("old server", &["127.0.0.1"], true);
    sandbox.write("server.pem", cert.as_bytes());
    sandbox.write("server.key", key.as_bytes());
    let check = sandbox.check(&tls_config(
        r#"{ cert = "server.pem", key = "server.key" }"#,
    ));
    assert!(check.status.success(), "{check:?}");
    assert!(
        check.stderr.contains("warning") && check.stderr.contains("expired"),
        "{}",
        check.stderr
    );
}

#[test]
fn nbnet_send_speaks_tls_and_mutual_tls() {
    let (mut server, pki) = start();
    let (cert, key, _) = pki.ca.leaf("bob", &["bob.example"], false);
    let dir = server.dir().to_path_buf();
    std::fs::write(dir.join("bob.pem"), cert).unwrap();
    std::fs::write(dir.join("bob.key"), key).unwrap();
    let tls_addr = format!("127.0.0.1:{}", tls_port(&server));
    let mtls_addr = format!("127.0.0.1:{}", server.aux_port(1));
    let sandbox = server.sandbox_mut();
    let ok = sandbox.run(&["send", "--tls", "--ca", "ca.pem", &tls_addr, "hi"]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(ok.stdout, "HI\n");
    let who = sandbox.run(&[
        "send", "--tls", "--ca", "ca.pem", "--cert", "bob.pem", "--key", "bob.key", &mtls_addr,
        "tls",
    ]);
    assert!(who.status.success(), "{who:?}");
    assert!(
        who.stdout.contains("subject=O=nbnet tests,CN=bob"),
        "{who:?}"
    );
    // Mutual TLS without a certificate: refused, and said so.
    let refused = sandbox.run(&["send", "--tls", "--ca", "ca.pem", &mtls_addr, "tls"]);
    assert!(!refused.status.success(), "{refused:?}");
    // --tls without a CA: a usage error that says what to add.
    let usage = sandbox.run(&["send", "--tls", &tls_addr, "hi"]);
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
    assert!(usage.stderr.contains("--ca"), "{usage:?}");
    let insecure = sandbox.run(&["send", "--tls", "--insecure", &tls_addr, "hi"]);
    assert_eq!(insecure.stdout, "HI\n", "{insecure:?}");
}

/// Hostile pass: the subject and SANs were joined with commas without
/// escaping, so a certificate whose CN is `admin,CN=x` or whose DNS name is
/// `evil,IP:1.2.3.4` showed plugins attributes and names it does not have.
/// Values are now escaped as RFC 4514 says (and the RDNs in its order).
#[test]
fn a_comma_in_a_client_certificate_name_cannot_forge_another_attribute() {
    let (server, pki) = start();
    let port = server.aux_port(1);
    let ca = pki.ca.pem();
    let (cert, key, _) = pki
        .ca
        .leaf("admin,CN=x", &["evil,IP:1.2.3.4", "ok.example"], false);
    let mut client = connect(port, &client_config(&ca, Some((&cert, &key))));
    let answer = String::from_utf8(request(&mut client, b"tls")).unwrap();
    assert!(
        answer.contains("subject=O=nbnet tests,CN=admin\\,CN=x "),
        "{answer}"
    );
    assert!(
        answer.contains("sans=DNS:evil\\,IP:1.2.3.4,DNS:ok.example"),
        "{answer}"
    );
}

/// Hostile pass: a certificate path naming a FIFO blocked the master in
/// open() on reload (and `--check`, `nbnet reload` and `nbnet stop`, which
/// read the config, hung too); /dev/zero grew it to gigabytes. TLS files
/// are opened non-blocking, must be regular files and at most 1 MiB.
#[test]
fn a_tls_file_that_is_a_fifo_a_device_or_huge_is_refused_at_once() {
    let mut sandbox = Sandbox::new();
    let fifo = sandbox.path().join("fifo.pem");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    sandbox.write("huge.pem", &vec![b'A'; 2 << 20]);
    for (cert, says) in [
        ("fifo.pem", "a FIFO"),
        ("/dev/zero", "not a regular file"),
        ("huge.pem", "over the 1048576-byte limit"),
    ] {
        let outcome = sandbox.check(&format!(
            r#"[server]
workers = 1

[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "upper"
tls = {{ cert = "{cert}", key = "{cert}" }}
"#
        ));
        assert_eq!(outcome.status.code(), Some(3), "{cert}: {outcome:?}");
        assert!(outcome.stderr.contains(says), "{cert}: {outcome:?}");
    }
}

#[test]
fn nbnet_bench_speaks_tls_and_checks_every_response() {
    let (mut server, pki) = start();
    let (cert, key, _) = pki.ca.leaf("bench", &["bench.example"], false);
    let dir = server.dir().to_path_buf();
    std::fs::write(dir.join("bench.pem"), cert).unwrap();
    std::fs::write(dir.join("bench.key"), key).unwrap();
    let tls_addr = format!("127.0.0.1:{}", tls_port(&server));
    let mtls_addr = format!("127.0.0.1:{}", server.aux_port(1));
    let sandbox = server.sandbox_mut();
    // Pipelined small frames, and 64 KiB frames (several records each way),
    // a fixed count: every response is checked against its request
    // (--expect upper), and any mismatch or error fails the run.
    for (size, depth, count) in [("64", "16", "400"), ("65536", "2", "40")] {
        let run = sandbox.run(&[
            "bench",
            "--tls",
            "--ca",
            "ca.pem",
            "--addr",
            &tls_addr,
            "--conns",
            "4",
            "--pipeline",
            depth,
            "--size",
            size,
            "--requests",
            count,
            "--duration",
            "60s",
            "--json",
        ]);
        assert!(run.status.success(), "{run:?}");
        let json: String = run.stdout.split_whitespace().collect();
        assert!(json.contains(&format!("\"requests\":{count}")), "{run:?}");
        assert!(json.contains("\"mismatches\":0"), "{run:?}");
    }
    // Mutual TLS with a client certificate.
    let mtls = sandbox.run(&[
        "bench",
        "--tls",
        "--ca",
        "ca.pem",
        "--cert",
        "bench.pem",
        "--key",
        "bench.key",
        "--addr",
        &mtls_addr,
        "--conns",
        "2",
        "--requests",
        "50",
        "--duration",
        "60s",
        "--expect",
        "none",
        "--json",
    ]);
    assert!(mtls.status.success(), "{mtls:?}");
    // Plain bench against the TLS port fails (and says so) rather than hangs.
    let plain = sandbox.run(&[
        "bench",
        "--addr",
        &tls_addr,
        "--conns",
        "1",
        "--requests",
        "1",
        "--duration",
        "5s",
    ]);
    assert!(!plain.status.success(), "{plain:?}");
    // --tls without a CA: says what to add.
    let usage = sandbox.run(&["bench", "--tls", "--addr", &tls_addr, "--requests", "1"]);
    assert!(
        !usage.status.success() && usage.stderr.contains("--ca"),
        "{usage:?}"
    );
}

/// A client config of one TLS version, with its own session cache (so
/// its first handshake is a full one).
fn client_config_of(
    ca_pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::store(Arc::new(
        rustls::client::ClientSessionMemoryCache::new(64),
    ));
    Arc::new(config)
}

/// One connection, one request (so the session tickets sent after the
/// handshake are read), and how its handshake went.
fn handshake(port: u16, config: &Arc<ClientConfig>) -> rustls::HandshakeKind {
    let mut tls = connect(port, config);
    assert_eq!(request(&mut tls, b"r"), b"R");
    tls.conn.handshake_kind().unwrap()
}

/// A session made on one connection resumes on every later one.
fn assert_resumes(port: u16, ca_pem: &str, later: usize, when: &str) {
    use rustls::HandshakeKind::{Full, Resumed};
    for (version, name) in [
        (&rustls::version::TLS13, "TLS 1.3"),
        (&rustls::version::TLS12, "TLS 1.2"),
    ] {
        let config = client_config_of(ca_pem, version);
        assert_eq!(
            handshake(port, &config),
            Full,
            "{name}{when}: the first handshake"
        );
        for i in 0..later {
            assert_eq!(
                handshake(port, &config),
                Resumed,
                "{name}{when}: later connection {i} did not resume the session (a full handshake: the worker that took it could not open the ticket)"
            );
        }
    }
}

/// libfaketime (Debian `faketime`), to move the server's clock.
fn libfaketime() -> Option<std::path::PathBuf> {
    nbnet_tests::require_program("faketime", "faketime")?;
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )])
        .find(|lib| lib.is_file());
    Some(found.expect(
        "the faketime program is installed but not libfaketime.so.1: apt-get install libfaketime",
    ))
}

/// Both workers took resumed handshakes (else a test proved nothing).
fn assert_both_workers_resumed(server: &Server) {
    let text = admin_metrics(server);
    for worker in ["worker=\"0\"", "worker=\"1\""] {
        assert!(
            sum_of(&text, "nbnet_tls_resumed_total", worker) > 0.0,
            "no resumed handshake on {worker}:\n{text}"
        );
    }
}

#[test]
fn a_session_resumes_on_every_worker() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let server = Server::start_in(sandbox, &UPPER_TLS.replace("workers = 1", "workers = 2"));
    assert_resumes(tls_port(&server), &pki.ca.pem(), 24, "");
    assert_both_workers_resumed(&server);
}

#[test]
fn a_session_resumes_on_every_worker_also_after_the_ticket_keys_rotate() {
    let Some(faketime) = libfaketime() else {
        return;
    };
    let mut sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    // The server's wall clock (only: timeouts run on the monotonic one)
    // is moved by writing this file: rustls' own ticketer rotated its key
    // every 6 h from a random source in each worker; ours changes keys
    // at each 6 h period, the same in every worker.
    let clock = sandbox.write("clock", b"+0");
    sandbox.set_env("LD_PRELOAD", faketime.to_str().unwrap());
    sandbox.set_env("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap());
    sandbox.set_env("FAKETIME_NO_CACHE", "1");
    sandbox.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let server = Server::start_in(sandbox, &UPPER_TLS.replace("workers = 1", "workers = 2"));
    let port = tls_port(&server);
    for hours in [7, 14, 21] {
        std::fs::write(&clock, format!("+{hours}h")).unwrap();
        assert_resumes(port, &pki.ca.pem(), 12, &format!(" at +{hours}h"));
    }
    assert_both_workers_resumed(&server);
}

#[test]
fn a_session_made_before_a_reload_resumes_on_the_new_workers() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    // One worker: the session resumes before the reload on any code; only
    // the reload is tested here (every worker: the tests above).
    let config_text = UPPER_TLS.replace("workers = 1", "workers = 1\npid_file = \"nbnet.pid\"");
    let mut server = Server::start_in(sandbox, &config_text);
    let port = tls_port(&server);
    use rustls::HandshakeKind::{Full, Resumed};
    let versions = [
        (&rustls::version::TLS13, "TLS 1.3"),
        (&rustls::version::TLS12, "TLS 1.2"),
    ];
    let configs: Vec<_> = versions
        .iter()
        .map(|(version, _)| client_config_of(&pki.ca.pem(), version))
        .collect();
    for config in &configs {
        assert_eq!(handshake(port, config), Full);
        assert_eq!(handshake(port, config), Resumed);
    }
    let before = server.worker_pids();
    let outcome = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert!(outcome.status.success(), "reload failed: {outcome:?}");
    let after = server.worker_pids();
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "{before:?} -> {after:?}"
    );
    for (config, (_, name)) in configs.iter().zip(versions) {
        for i in 0..6 {
            assert_eq!(
                handshake(port, config),
                Resumed,
                "{name}: connection {i} after a no-op reload did not resume the session made before it"
            );
        }
    }
}

#[test]
fn a_session_from_a_listener_without_client_certificates_does_not_open_a_mutual_tls_one() {
    let (server, pki) = start();
    let config = client_config(&pki.ca.pem(), None);
    let mut open = connect(tls_port(&server), &config);
    assert_eq!(request(&mut open, b"a"), b"A");
    drop(open);
    // The same client (same server name, so it offers that session) on
    // the mutual-TLS listener: a resumption would skip the client
    // certificate, so the session must not open there.
    let mut mutual = connect(server.aux_port(1), &config);
    assert!(
        refused(&mut mutual),
        "a ticket from the listener without mutual TLS let a client without a certificate in"
    );
    assert_ne!(
        mutual.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
}

/// `misbehave` (C) on a pool of one thread, plaintext on `{port}` and TLS
/// on `{aux}`, one worker, with extra `[server]` lines.
fn pool_tls(server: &str) -> String {
    format!(
        r#"[server]
workers = 1
shutdown_timeout = "30s"
{server}

[[plugins]]
name = "slow"
path = "{{misbehave}}"
threads = 1

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "slow"

[[listeners]]
addr = "127.0.0.1:{{aux}}"
plugin = "slow"
tls = {{ cert = "server.pem", key = "server.key" }}
"#
    )
}

/// Hostile pass 5: at a reload, the old worker took the requests its
/// thread pool had queued back from the pool for the connections that
/// move — TLS ones too, which do not move: their frames sat unanswered in
/// the connection until `shutdown_timeout` cut it, thousands of requests
/// lost. A TLS connection's queued requests now stay with the pool, and
/// the old worker answers them all, then closes at the frame boundary.
#[test]
fn a_reload_answers_everything_a_tls_client_pipelined_to_a_pool() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let server = Server::start_in(sandbox, &pool_tls(""));
    let config = client_config(&pki.ca.pem(), None);
    let mut tls = connect(server.aux_port(0), &config);
    // 40 requests of 20 ms each on the one pool thread: most of them
    // still queued when the reload comes.
    let mut batch = Vec::new();
    for n in 0..40 {
        batch.extend_from_slice(&frame(format!("sleep:{}", 20 + n % 2).as_bytes()));
    }
    tls.write_all(&batch).unwrap();
    tls.flush().unwrap();
    assert_eq!(read_frame(&mut tls).unwrap(), b"slept 20");
    server.signal(libc::SIGHUP);
    // (The client's read timeout, 10 s, is well below shutdown_timeout.)
    for n in 1..40 {
        let answer = read_frame(&mut tls)
            .unwrap_or_else(|e| panic!("answer {n} after the reload: {e}\n{}", server.log()));
        assert_eq!(answer, format!("slept {}", 20 + n % 2).into_bytes());
    }
    assert_eq!(
        server.log_count("request(s) the thread pool had not started"),
        0
    );
}

/// Hostile pass 6: requests a TLS client queued behind a pool thread that
/// got stuck were never answered: TLS connections stay with the old worker,
/// whose only pool thread would never return; the client was cut at
/// `shutdown_timeout`. A spare thread (a new instance) now serves the pool
/// until the worker is replaced.
#[test]
fn tls_requests_queued_behind_a_stuck_pool_thread_are_answered() {
    let sandbox = Sandbox::new();
    let pki = pki(&sandbox);
    let server = Server::start_in(sandbox, &pool_tls("plugin_timeout = \"500ms\""));
    let mut stuck = nbnet_tests::Client::connect(server.port());
    stuck.send_frame(b"hang").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let config = client_config(&pki.ca.pem(), None);
    let mut tls = connect(server.aux_port(0), &config);
    let mut batch = frame(b"sleep:1");
    batch.extend_from_slice(&frame(b"sleep:2"));
    tls.write_all(&batch).unwrap();
    tls.flush().unwrap();
    // (The client's read timeout, 10 s, is well below shutdown_timeout.)
    for ms in [1, 2] {
        let answer = read_frame(&mut tls)
            .unwrap_or_else(|e| panic!("answer to sleep:{ms}: {e}\n{}", server.log()));
        assert_eq!(answer, format!("slept {ms}").into_bytes());
    }
    server.wait_for_log_line(&["pool thread 0 is stuck: a spare thread"]);
}
