//! `plugins/redis-cache` against a real `redis-server` (issue 12): state
//! shared by every worker through Redis, one Redis client per pool
//! instance, and clear errors when Redis is not there.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nbnet_tests::{free_port, wait_until, Client, Sandbox, Server};

/// A `redis-server` on a loopback port, its files in a temporary
/// directory; killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Option<Redis> {
        let binary = nbnet_tests::require_program("redis-server", "redis-server")?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis {
            child,
            port,
            _dir: dir,
        };
        wait_until(
            Duration::from_secs(10),
            "redis-server to answer PING",
            || (redis.command("PING") == "+PONG\r\n").then_some(()),
        );
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one inline command; returns the raw reply ("" if unreachable).
    fn command(&self, line: &str) -> String {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if stream.write_all(format!("{line}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut reply = vec![0u8; 4096];
        let n = stream.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: &str, workers: u32, threads: u32) -> String {
    format!(
        r#"[server]
workers = {workers}

[[plugins]]
name = "cache"
path = "{{redis_cache}}"
threads = {threads}
config = {{ url = "{url}", timeout_ms = 2000, prefix = "t:" }}

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "cache"
"#
    )
}

/// The pid of the worker that holds the server side of `client`'s
/// connection: found through /proc (the plugin has no `pid` request).
fn serving_worker(server: &Server, client: &Client) -> i32 {
    let local = client.stream.local_addr().unwrap();
    let remote = client.stream.peer_addr().unwrap();
    // In /proc/net/tcp the server side's local address is the client's
    // peer address and vice versa (hex, little-endian IPv4, port in hex).
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => unreachable!("loopback IPv4 only"),
    };
    let (server_side, client_side) = (hex(remote), hex(local));
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inode = tcp
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&server_side.as_str())
                && fields.get(2) == Some(&client_side.as_str()))
            .then(|| fields[9].to_string())
        })
        .unwrap_or_else(|| panic!("no server socket for {local} in /proc/net/tcp"));
    let target = format!("socket:[{inode}]");
    for pid in server.worker_pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l == Path::new(&target)) {
                return pid;
            }
        }
    }
    panic!("no worker holds {target} (connection {local})");
}

#[test]
fn a_value_set_through_one_worker_is_read_back_through_another() {
    let Some(redis) = Redis::start() else { return };
    let server = Server::start(&config(&redis.url(), 2, 2));
    server.wait_for_workers(2);
    // One connection on each worker.
    let mut on: Vec<(i32, Client)> = Vec::new();
    wait_until(
        Duration::from_secs(10),
        "a connection on each of 2 workers",
        || {
            let mut client = server.client();
            // Answered: a worker has accepted it (until then the
            // connection is only in the listen queue, and no worker holds
            // its socket: the lookup below failed now and then).
            assert_eq!(client.request(b"GET probe"), b"NOT_FOUND");
            let pid = serving_worker(&server, &client);
            if on.iter().all(|(p, _)| *p != pid) {
                on.push((pid, client));
            }
            (on.len() == 2).then_some(())
        },
    );
    let (mut second, mut first) = (on.pop().unwrap().1, on.pop().unwrap().1);
    assert_eq!(first.request(b"GET greeting"), b"NOT_FOUND");
    assert_eq!(first.request(b"SET greeting hello, world"), b"OK");
    assert_eq!(second.request(b"GET greeting"), b"hello, world");
    // Binary-safe, and the prefix is applied in Redis.
    assert_eq!(second.request(b"SET bin \x00\xff"), b"OK");
    assert_eq!(first.request(b"GET bin"), b"\x00\xff");
    assert_eq!(redis.command("EXISTS t:greeting"), ":1\r\n");
    assert_eq!(second.request(b"DEL greeting"), b"OK");
    assert_eq!(first.request(b"DEL greeting"), b"NOT_FOUND");
    assert_eq!(first.request(b"GET greeting"), b"NOT_FOUND");
    // Malformed requests are answered; the connection goes on.
    assert_eq!(first.request(b"GET"), b"ERR usage: GET key");
    assert_eq!(first.request(b"GET bin"), b"\x00\xff");
    // One Redis client per pool instance: 2 workers x 2 threads.
    let clients = redis.command("CLIENT LIST");
    let from_nbnet = clients.lines().filter(|l| l.contains("cmd=")).count() - 1;
    assert_eq!(from_nbnet, 4, "{clients}");
}

#[test]
fn redis_down_fails_the_request_naming_the_url_and_a_bad_url_fails_startup() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let server = Server::start(&config(&url, 1, 1));
    let mut client = server.client();
    assert_eq!(client.request(b"SET k v"), b"OK");
    drop(redis);
    // The request fails: the connection closes and the log names the URL.
    client.send_frame(b"GET k").unwrap();
    client.expect_closed();
    server.wait_for_log_line(&["cache", &format!("redis at {url}")]);
    // The worker goes on serving (requests that need no Redis).
    assert_eq!(
        server.client().request(b"PUT"),
        b"ERR unknown command: use SET key value, GET key or DEL key"
    );

    let (_, stderr) =
        Sandbox::new().expect_startup_failure(&config("http://:secret@example/", 1, 1));
    assert!(
        stderr.contains(r#"url = "http://:***@example/" is not a Redis URL"#),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret"),
        "the password is hidden: {stderr}"
    );
}
