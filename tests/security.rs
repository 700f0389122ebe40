//! Security (issue 13): per-listener `allow`/`deny` lists checked against
//! the real client address (the PROXY header's on a `proxy_protocol`
//! listener), and least privilege — plugins never run as root unless the
//! operator says so; with `[server] user` the workers and the checker drop
//! to that user while the master keeps binding as root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use nbnet_tests::{frame, Client, Sandbox, Server};

/// A TCP connection to `port` on `to` from the loopback address `from`
/// (Linux routes all of 127.0.0.0/8 to `lo`).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let from: IpAddr = from.parse().unwrap();
    let family = if from.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    let local = SockaddrStorage::from(SocketAddr::new(from, 0));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &local).unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(to),
    )
    .unwrap();
    let stream = TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends one frame and reads the answer; `None` when the server closed
/// the connection instead.
fn ask(stream: &mut TcpStream, payload: &[u8]) -> Option<Vec<u8>> {
    let _ = stream.write_all(&frame(payload));
    let mut header = [0u8; 10];
    stream.read_exact(&mut header).ok()?;
    let len: usize = std::str::from_utf8(&header).ok()?.parse().ok()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

/// The value of metric `name` for the server's one worker (the largest of
/// its series: one per worker, and an aggregate where there is one).
fn metric(server: &Server, name: &str) -> u64 {
    let mut stream = TcpStream::connect(("127.0.0.1", server.admin_port())).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .max()
        .unwrap_or(0)
}

/// `{port}` answers the start-up probe (from 127.0.0.1); the listeners
/// with lists get ports that are not probed: `{aux}` and `{aux2}`.
const ACL: &str = r#"[server]
workers = 1

[admin]
addr = "127.0.0.1:{admin}"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "upper"
allow = ["127.0.0.0/8"]
deny = ["127.0.0.1", "127.0.0.66/31"]

[[listeners]]
addr = "127.0.0.1:{aux2}"
plugin = "upper"
allow = ["127.0.0.5"]
"#;

/// Deny wins over allow; an address in no allow entry is refused; refused
/// clients are closed before any byte is read, counted, and logged.
#[test]
fn allow_and_deny_lists_refuse_clients_before_reading_a_byte() {
    let server = Server::start(ACL);
    let first = SocketAddr::from(([127, 0, 0, 1], server.aux_port(0)));
    let second = SocketAddr::from(([127, 0, 0, 1], server.aux_port(1)));

    let before = metric(&server, "nbnet_access_refused_total");
    // Denied by address, by network, and not in allow.
    for (from, to) in [
        ("127.0.0.1", first),
        ("127.0.0.66", first),
        ("127.0.0.67", first),
        ("127.0.0.4", second),
    ] {
        let mut stream = connect_from(from, to);
        assert_eq!(
            ask(&mut stream, b"hi"),
            None,
            "{from} -> {to} must be refused"
        );
    }
    // Admitted.
    for (from, to) in [
        ("127.0.0.2", first),
        ("127.0.0.68", first),
        ("127.0.0.5", second),
    ] {
        let mut stream = connect_from(from, to);
        assert_eq!(
            ask(&mut stream, b"hi").as_deref(),
            Some(&b"HI"[..]),
            "{from} -> {to} must be served"
        );
    }
    let refused = metric(&server, "nbnet_access_refused_total") - before;
    assert_eq!(refused, 4, "refusals must be counted");
    assert!(
        server
            .log()
            .contains("refused by the listener's allow/deny lists"),
        "{}",
        server.log()
    );
}

/// One worker serving `upper` on `{port}` (which the start-up probe
/// answers from 127.0.0.1), then `listeners`.
fn upper_and(listeners: &str) -> String {
    format!(
        r#"[server]
workers = 1

[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "upper"

{listeners}"#
    )
}

/// IPv6: lists of IPv6 networks on an IPv6 listener.
#[test]
fn allow_and_deny_lists_work_for_ipv6() {
    let server = Server::start(&upper_and(
        r#"[[listeners]]
addr = "[::1]:{aux}"
plugin = "upper"
deny = ["::1/128"]

[[listeners]]
addr = "[::1]:{aux2}"
plugin = "upper"
allow = ["::1"]
deny = ["2001:db8::/32"]
"#,
    ));
    let denied = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.aux_port(0)));
    let allowed = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.aux_port(1)));
    assert_eq!(ask(&mut connect_from("::1", denied), b"v6"), None);
    assert_eq!(
        ask(&mut connect_from("::1", allowed), b"v6").as_deref(),
        Some(&b"V6"[..])
    );
}

/// On a `proxy_protocol` listener the address checked is the one the PROXY
/// header gives (the proxy itself connects from an address the lists would
/// refuse); a LOCAL header (no client address) is refused.
#[test]
fn a_proxy_protocol_listener_checks_the_address_in_the_header() {
    let server = Server::start(&upper_and(
        r#"[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "upper"
proxy_protocol = true
allow = ["192.0.2.0/24", "2001:db8::/32"]
deny = ["192.0.2.66"]
"#,
    ));
    let to = SocketAddr::from(([127, 0, 0, 1], server.aux_port(0)));
    let proxied = |header: &[u8]| {
        let mut stream = TcpStream::connect(to).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(header).unwrap();
        ask(&mut stream, b"proxied")
    };
    assert_eq!(
        proxied(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 9000\r\n").as_deref(),
        Some(&b"PROXIED"[..])
    );
    assert_eq!(
        proxied(b"PROXY TCP6 2001:db8::7 ::1 40000 9000\r\n").as_deref(),
        Some(&b"PROXIED"[..])
    );
    assert_eq!(
        proxied(b"PROXY TCP4 192.0.2.66 127.0.0.1 40000 9000\r\n"),
        None
    );
    assert_eq!(
        proxied(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 9000\r\n"),
        None
    );
    // v2 LOCAL: signature, version 2 + LOCAL, family UNSPEC, length 0.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(proxied(&local), None);
    assert!(server.log().contains("address from its PROXY header"));
}

/// A reload that denies a connected client closes its connection at the
/// hand-over instead of moving it; other clients move as usual.
#[test]
fn a_reload_that_denies_a_connected_client_closes_it_at_the_hand_over() {
    let template = r#"[server]
workers = 1
pid_file = "nbnet.pid"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
DENY
"#;
    let mut server = Server::start(&template.replace("DENY", ""));
    let mut denied = connect_from("127.0.0.9", server.addr());
    let mut kept = connect_from("127.0.0.10", server.addr());
    assert_eq!(ask(&mut denied, b"a").as_deref(), Some(&b"A"[..]));
    assert_eq!(ask(&mut kept, b"b").as_deref(), Some(&b"B"[..]));
    server
        .sandbox_mut()
        .write_config(&template.replace("DENY", "deny = [\"127.0.0.9\"]"));
    let reload = server
        .sandbox_mut()
        .run(&["reload", "--config", "nbnet.toml"]);
    assert!(reload.status.success(), "{reload:?}");
    server.wait_for_log_line(&["connection handed over closed: the listener's allow/deny lists"]);
    assert_eq!(ask(&mut denied, b"again"), None);
    assert_eq!(ask(&mut kept, b"again").as_deref(), Some(&b"AGAIN"[..]));
}

/// Bad lists are refused by `--check` and at startup, naming the entry,
/// the line and what to write instead.
#[test]
fn bad_access_lists_are_refused_naming_the_entry() {
    let outcome = nbnet_tests::check(
        r#"[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
allow = ["10.0.0.1/8"]

[[listeners]]
addr = "unix:{dir}/x.sock"
plugin = "upper"
deny = ["192.0.2.0/24"]
"#,
    );
    assert_eq!(outcome.status.code(), Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains(":8:")
            && outcome.stderr.contains("write the network as 10.0.0.0/8"),
        "{outcome:?}"
    );
    assert!(
        outcome.stderr.contains(":13:") && outcome.stderr.contains("proxy_protocol = true"),
        "{outcome:?}"
    );
    // Hostile pass: `allow = []` reads as "nobody" but admitted everyone.
    let outcome = nbnet_tests::check(
        r#"[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
allow = []
"#,
    );
    assert_eq!(outcome.status.code(), Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains(":8:") && outcome.stderr.contains("allow = []"),
        "{outcome:?}"
    );
}

// ------------------------------------------------------------- privileges

fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

const PLAIN: &str = r#"[server]
workers = 1
SERVER

[[plugins]]
name = "whoami"
path = "{whoami}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "whoami"

[[listeners]]
addr = "unix:{dir}/nbnet.sock"
plugin = "whoami"
mode = "0660"
"#;

/// As root with `user = "nobody"`: plugin code runs as nobody (uid, gid
/// and supplementary groups), the Unix socket file belongs to nobody, and
/// the master stays root (a reload can still bind a privileged port).
/// Not as root: `user` naming another user is ignored with a warning.
#[test]
fn plugins_run_as_the_configured_user() {
    let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
        panic!("this test needs the user `nobody` (present on Debian and most systems)");
    };
    let sandbox = Sandbox::new();
    let dir = sandbox.path().to_path_buf();
    // Plugin-loading processes must find the sandbox (a tempdir is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut server = Server::start_in(
        sandbox,
        &PLAIN.replace("SERVER", "user = \"nobody\"\npid_file = \"nbnet.pid\""),
    );
    let ids = Client::connect(server.port()).request(b"ids");
    let ids = String::from_utf8_lossy(&ids).into_owned();
    if running_as_root() {
        let uid = nobody.uid.as_raw();
        let gid = nobody.gid.as_raw();
        assert_eq!(
            ids,
            format!("uid={uid} euid={uid} gid={gid} egid={gid} groups=1"),
            "plugin code must run as nobody"
        );
        use std::os::unix::fs::MetadataExt;
        let socket = std::fs::metadata(dir.join("nbnet.sock")).unwrap();
        assert_eq!(
            (socket.uid(), socket.gid()),
            (uid, gid),
            "socket file owner"
        );
        assert!(server
            .log()
            .contains("workers and the plugin checker run as user nobody"));
        // Hostile pass: a worker made dumpable again (to load plugin
        // images) stayed so — any process of its user could read its
        // memory, TLS keys included; and it held the root-owned pid file
        // open for writing.
        let worker = server.worker_pids()[0];
        let environ = std::fs::metadata(format!("/proc/{worker}/environ")).unwrap();
        assert_eq!(
            environ.uid(),
            0,
            "a worker running as nobody must not be dumpable (its /proc files stay root's)"
        );
        let pid_file = std::fs::canonicalize(dir.join("nbnet.pid")).unwrap();
        for fd in std::fs::read_dir(format!("/proc/{worker}/fd")).unwrap() {
            let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
            assert_ne!(target, pid_file, "the worker holds the pid file open");
        }
        // The master is still root (it binds new listeners on reload).
        assert!(
            std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
                .unwrap()
                .lines()
                .any(|l| l.starts_with("Uid:\t0\t")),
            "the master keeps root"
        );
    } else {
        let me = nix::unistd::Uid::effective().as_raw();
        assert!(ids.starts_with(&format!("uid={me} ")), "{ids}");
        assert!(
            server.log().contains("is ignored: nbnet runs as uid"),
            "{}",
            server.log()
        );
    }
    let _ = server.sandbox_mut();
}

/// As root, plugins and no `user`: refused at startup and by `--check`,
/// saying why and what to do; `allow_root = true` runs them as root
/// knowingly. (Not as root there is nothing to refuse: the test then checks
/// that the same config starts.)
#[test]
fn running_plugins_as_root_needs_user_or_allow_root() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(&PLAIN.replace("SERVER", ""));
    let run = |args: &[&str]| {
        let mut cmd = sandbox.command();
        cmd.env_remove(nbnet_tests::ALLOW_ROOT.0)
            .args(args)
            .arg("--config")
            .arg(&config);
        cmd.output().unwrap()
    };
    if running_as_root() {
        for args in [&["--check"][..], &[][..]] {
            let out = run(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "nbnet {args:?}: {stderr}");
            assert!(
                stderr.contains("refusing to run plugins as root")
                    && stderr.contains("[server] user")
                    && stderr.contains("allow_root = true")
                    && stderr.contains("nbnet.toml"),
                "{stderr}"
            );
        }
        let allowed = sandbox.write_config(&PLAIN.replace("SERVER", "allow_root = true"));
        let out = sandbox
            .command()
            .env_remove(nbnet_tests::ALLOW_ROOT.0)
            .args(["--check", "--config"])
            .arg(&allowed)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        let out = run(&["--check"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A user or group that does not exist, or root itself, is a config error
/// naming the line and how to create it.
#[test]
fn a_user_that_does_not_exist_is_a_config_error() {
    let outcome = nbnet_tests::check(&PLAIN.replace("SERVER", "user = \"nbnet-no-such-user\""));
    assert_eq!(outcome.status.code(), Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains(":3:") && outcome.stderr.contains("useradd"),
        "{outcome:?}"
    );
    let outcome = nbnet_tests::check(&PLAIN.replace("SERVER", "user = \"root\""));
    assert_eq!(outcome.status.code(), Some(3), "{outcome:?}");
    assert!(outcome.stderr.contains("uid 0"), "{outcome:?}");
    let outcome = nbnet_tests::check(&PLAIN.replace(
        "SERVER",
        "user = \"nobody\"\ngroup = \"nbnet-no-such-group\"",
    ));
    assert_eq!(outcome.status.code(), Some(3), "{outcome:?}");
    assert!(
        outcome.stderr.contains(":4:") && outcome.stderr.contains("groupadd"),
        "{outcome:?}"
    );
}
