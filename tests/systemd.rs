//! nbnet under systemd (issue 11, part 2): readiness notifications
//! (`Type=notify`: READY, RELOADING, STOPPING, MAINPID) and socket
//! activation (`LISTEN_FDS`), each checked against the real binary with
//! what systemd itself would do: a notify socket, descriptors from 3 on.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbnet_tests::{build, Client, Master, Proc, Sandbox};

const CONFIG: &str = r#"[server]
workers = 1

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#;

/// Starts the master of `config` in `sandbox` with a notify socket of its
/// own, as systemd would run it; its log goes to nbnet.log.
fn start_notified(sandbox: &Sandbox, config: &std::path::Path) -> (Master, UnixDatagram) {
    let notify = sandbox.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let log = std::fs::File::create(sandbox.path().join("nbnet.log")).unwrap();
    let master = Master(
        sandbox
            .command()
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    (master, socket)
}

/// Receives datagrams until one contains `needle` (at most 15 s).
fn expect_notification(socket: &UnixDatagram, needle: &str) -> String {
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let mut buf = [0u8; 512];
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.contains(needle) {
                    return text;
                }
                seen.push(text);
            }
            Err(e) => panic!("no {needle:?} notification ({e}); got {seen:?}"),
        }
    }
}

#[test]
fn nbnet_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(CONFIG);
    let (mut master, socket) = start_notified(&sandbox, &config);
    let ready = expect_notification(&socket, "READY=1");
    assert!(
        ready.contains(&format!("MAINPID={}", master.id())),
        "{ready}"
    );
    // Ready means serving.
    assert_eq!(Client::connect(sandbox.port(0)).request(b"hi"), b"HI");
    nbnet_tests::send_signal(master.id() as i32, libc::SIGHUP);
    let reloading = expect_notification(&socket, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    expect_notification(&socket, "READY=1");
    nbnet_tests::send_signal(master.id() as i32, libc::SIGTERM);
    expect_notification(&socket, "STOPPING=1");
    let status = master.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A binary upgrade under systemd: the old master (the unit's main
/// process) announces the new one with `MAINPID=` before it exits, so
/// systemd follows the service to the new master instead of seeing it stop.
#[test]
fn an_upgrade_tells_systemd_the_new_main_pid() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let config = sandbox
        .write_config(&CONFIG.replace("workers = 1", "workers = 1\npid_file = \"nbnet.pid\""));
    let (mut master, socket) = start_notified(&sandbox, &config);
    expect_notification(&socket, "READY=1");
    let old = master.id() as i32;
    nbnet_tests::send_signal(old, libc::SIGUSR2);
    expect_notification(&socket, "RELOADING=1");
    let handed = expect_notification(&socket, "MAINPID=");
    let new: i32 = handed
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{handed}"));
    let _new_master = KillOnDrop(new);
    assert_ne!(new, old, "{handed}");
    assert!(handed.contains("READY=1"), "{handed}");
    let status = master.wait().unwrap();
    assert!(status.success(), "the old master exits 0: {status:?}");
    assert_eq!(Client::connect(sandbox.port(0)).request(b"hi"), b"HI");
    // The new master is the main process now: it stops like one.
    nbnet_tests::send_signal(new, libc::SIGTERM);
    expect_notification(&socket, "STOPPING=1");
}

/// Kills a process (a master this test did not start) when dropped.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(process) = Proc::of(self.0) {
            process.kill_if_alive();
        }
    }
}

/// A `NOTIFY_SOCKET` nbnet cannot reach (a missing socket, a path too
/// long for a Unix socket, a relative path, which sd_notify(3) does not
/// take) was ignored without a word, leaving a `Type=notify` start to time
/// out unexplained. One warning per process names the socket and the error.
#[test]
fn a_notify_socket_that_cannot_be_reached_is_warned_about_once() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(CONFIG);
    // A real socket, named relative to nbnet's directory: refused all the same.
    let _relative = UnixDatagram::bind(sandbox.path().join("notify.sock")).unwrap();
    let missing = sandbox.path().join("missing.sock");
    let long = format!("/tmp/{}.sock", "x".repeat(200));
    let cases = [
        (missing.to_str().unwrap(), "No such file or directory"),
        (
            "notify.sock",
            "neither an absolute path nor an @abstract name",
        ),
        (long.as_str(), "SUN_LEN"),
    ];
    for (n, (target, error)) in cases.into_iter().enumerate() {
        let log_path = sandbox.path().join(format!("nbnet-{n}.log"));
        let mut master = Master(
            sandbox
                .command()
                .arg("--config")
                .arg(&config)
                .env("NOTIFY_SOCKET", target)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap(),
        );
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let port = sandbox.port(0);
        nbnet_tests::wait_until(Duration::from_secs(10), "nbnet to serve", || {
            let mut client = Client::try_connect(port).ok()?;
            (client.request(b"up") == b"UP").then_some(())
        });
        // READY, RELOADING, READY and STOPPING: four tries, one warning.
        nbnet_tests::send_signal(master.id() as i32, libc::SIGHUP);
        nbnet_tests::wait_until(Duration::from_secs(10), "the reload", || {
            log().contains("reload complete").then_some(())
        });
        nbnet_tests::send_signal(master.id() as i32, libc::SIGTERM);
        let status = master.wait().unwrap();
        assert!(status.success(), "{status:?}\n{}", log());
        let log = log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("cannot notify the service manager"))
            .collect();
        assert_eq!(warnings.len(), 1, "NOTIFY_SOCKET={target}:\n{log}");
        assert!(
            warnings[0].contains(" WARN ")
                && warnings[0].contains(&format!("NOTIFY_SOCKET={target}: "))
                && warnings[0].contains(error),
            "{}",
            warnings[0]
        );
    }
}

/// systemd binds the port and passes the socket as descriptor 3: nbnet
/// serves on it, including a client that connected before nbnet started
/// (it waited in the socket's backlog).
#[test]
fn a_socket_passed_by_systemd_is_served_without_losing_waiting_clients() {
    let mut sandbox = Sandbox::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = sandbox.write_config(&CONFIG.replace("{port}", &port.to_string()));
    // A client connects and sends before nbnet runs.
    let mut early = Client::connect(port);
    early.send_frame(b"early").unwrap();
    let fd = listener.as_raw_fd();
    let log_path = sandbox.path().join("nbnet.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // `exec` keeps the shell's PID, so $$ is nbnet's PID: LISTEN_PID.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=upper exec \"$0\" --config \"$1\"")
        .arg(&build().nbnet)
        .arg(&config)
        .env(nbnet_tests::ALLOW_ROOT.0, nbnet_tests::ALLOW_ROOT.1)
        .current_dir(sandbox.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: dup2 and fcntl are async-signal-safe. The copy at 3 has no
    // CLOEXEC, so nbnet inherits it, as from systemd (dup2 onto itself
    // would keep the flag: then it is cleared instead).
    unsafe {
        command.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut master = Master(command.spawn().unwrap());
    drop(listener);
    let answer = early.read_frame();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        answer.as_deref().ok(),
        Some(&b"EARLY"[..]),
        "{answer:?}\n{}",
        log()
    );
    assert_eq!(Client::connect(port).request(b"later"), b"LATER");
    let log = log();
    assert!(
        log.contains(&format!(
            "using the inherited listening socket 127.0.0.1:{port}"
        )),
        "{log}"
    );
    let workers: Vec<Proc> = nbnet_tests::children_of(master.id() as i32)
        .into_iter()
        .filter_map(Proc::of)
        .collect();
    nbnet_tests::send_signal(master.id() as i32, libc::SIGTERM);
    let status = master.wait().unwrap();
    for worker in workers {
        worker.kill_if_alive();
    }
    assert!(status.success(), "{status:?}");
}

/// A wrapper that sets LISTEN_FDS without passing any descriptor made
/// nbnet take (and close) descriptors it had opened itself — its pid file's,
/// losing the lock, then aborting at exit (second hostile pass).
#[test]
fn listen_fds_naming_descriptors_never_passed_takes_nothing_of_nbnets_own() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(&CONFIG.replace(
        "[server]\nworkers = 1\n",
        "[server]\nworkers = 1\npid_file = \"nbnet.pid\"\n",
    ));
    let port = sandbox.port(0);
    let log_path = sandbox.path().join("nbnet.log");
    let mut master = Master(
        Command::new("sh")
            .arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=8 exec \"$0\" --config \"$1\"")
            .arg(&build().nbnet)
            .arg(&config)
            .env(nbnet_tests::ALLOW_ROOT.0, nbnet_tests::ALLOW_ROOT.1)
            .current_dir(sandbox.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut answered = false;
    for _ in 0..100 {
        if let Ok(mut client) = Client::try_connect(port) {
            if client.request(b"hi") == b"HI" {
                answered = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answered, "nbnet did not serve\n{}", log());
    // The pid file still locked by the master: `nbnet stop` finds it.
    let stop = sandbox.run(&["stop", "--config", config.to_str().unwrap()]);
    let status = master.wait().unwrap();
    assert!(
        stop.status.success(),
        "nbnet stop: {}{}\n{}",
        stop.stdout,
        stop.stderr,
        log()
    );
    assert!(status.success(), "{status:?}\n{}", log());
    assert!(!log().contains("IO Safety"), "{}", log());
}
