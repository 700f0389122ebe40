//! Binary upgrade (issue 11, part 2): `nbnet upgrade` / SIGUSR2 starts a
//! new master from the binary at the old one's path, which takes the
//! listening sockets and, once ready, the old workers' live connections;
//! the old master exits. Persistent clients must notice nothing; a new
//! binary that fails is rolled back; a new master killed mid-way costs only
//! what it held.
//!
//! Each test runs a copy of `nbnet` placed in its sandbox, so that it can
//! replace the file as an operator installs a new build.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbnet_tests::load::{assert_nothing_lost, wait_for_progress, Load};
use nbnet_tests::{children_of, Client, Outcome, Proc, Sandbox, Server};

/// Two plugins, a TCP and a Unix listener served by `plugin`, an admin
/// endpoint and a pid file; `extra` goes into `[server]`.
fn config(plugin: &str, extra: &str) -> String {
    format!(
        r#"[server]
workers = 2
pid_file = "nbnet.pid"
shutdown_timeout = "10s"
{extra}

[admin]
addr = "127.0.0.1:{{admin}}"

[[plugins]]
name = "upper"
path = "{{upper}}"

[[plugins]]
name = "echo"
path = "{{echo}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "{plugin}"

[[listeners]]
addr = "unix:{{dir}}/nbnet.sock"
plugin = "{plugin}"
"#
    )
}

/// Kills, when the test ends, every master an upgrade started (the test's
/// `Server` only knows the first) and its workers.
#[derive(Default)]
struct Masters(Vec<i32>);

impl Masters {
    fn track(&mut self, pid: i32) {
        self.0.push(pid);
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let workers: Vec<Proc> = children_of(pid).into_iter().filter_map(Proc::of).collect();
            if let Some(master) = Proc::of(pid) {
                master.kill_if_alive();
            }
            for worker in workers {
                worker.kill_if_alive();
            }
        }
    }
}

/// A server running its own copy of `nbnet` (so that a test can replace
/// it), and the guard for the masters its upgrades start.
fn start(template: &str) -> (Server, Masters) {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    (Server::start_in(sandbox, template), Masters::default())
}

/// The PID in the sandbox's pid file.
fn pid_file(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("nbnet.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs `nbnet upgrade` against the server — the built `nbnet`, not the
/// file at the server's path (which a test may have broken on purpose).
fn upgrade(server: &mut Server) -> Outcome {
    upgrade_in(server.dir(), "upgrade")
}

/// Runs the built `nbnet COMMAND --config nbnet.toml` in `dir`.
fn upgrade_in(dir: &Path, command: &str) -> Outcome {
    let output = std::process::Command::new(&nbnet_tests::build().nbnet)
        .current_dir(dir)
        .args([command, "--config", "nbnet.toml"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run nbnet upgrade");
    Outcome {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Installs a new build at `path` the way `install` or a package manager
/// does: a new file renamed over the old one.
fn install(path: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    let mut file = std::fs::File::create(&tmp).unwrap();
    file.write_all(contents).unwrap();
    drop(file);
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Whether `pid` runs the file now at `path` (not a replaced one).
fn runs_current_file(pid: i32, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe"));
    let file = std::fs::metadata(path);
    matches!((exe, file), (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev())
}

fn built_binary(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).expect("read the nbnet binary")
}

/// The issue's scenario, one load through every lifecycle event:
/// persistent clients (20 at depth 1, 5 pipelining at depth 16) through 10
/// reloads (five switching the plugin in the config, five swapping the
/// `.so` at the same path), two binary upgrades (each a new build installed
/// at the path), worker recycling (`max_requests_per_worker`) all along,
/// and SIGTTIN/SIGTTOU on the last master: no connection closed, no request
/// unanswered or wrongly answered, the answers switch with the logic; the
/// pid file, the Unix socket and `[admin]` follow the new master, which
/// runs the new file.
#[test]
fn persistent_clients_lose_nothing_through_reloads_recycles_and_two_binary_upgrades() {
    let mut sandbox = Sandbox::new();
    let binary = sandbox.use_own_binary();
    let build = built_binary(&binary);
    let a = nbnet_tests::build();
    let (upper_so, echo_so) = (
        std::fs::read(&a.upper_so).unwrap(),
        std::fs::read(&a.echo_so).unwrap(),
    );
    let logic = sandbox.path().join("logic.so");
    install(&logic, &upper_so, 0o644);
    let template = |plugin: &str| {
        config(plugin, "max_requests_per_worker = 3000").replacen(
            "[[listeners]]",
            "[[plugins]]\nname = \"logic\"\npath = \"{dir}/logic.so\"\n\n[[listeners]]",
            1,
        )
    };
    let mut server = Server::start_in(sandbox, &template("upper"));
    let mut masters = Masters::default();
    let dir = server.dir().to_path_buf();
    let socket = dir.join("nbnet.sock");
    let load = Load::start(server.port(), 20, 5, 16);
    wait_for_progress(&server, &load, 200);

    let mut master = server.pid();
    for round in 1..=10 {
        if round <= 5 {
            let plugin = if round % 2 == 1 { "echo" } else { "upper" };
            server.sandbox_mut().write_config(&template(plugin));
        } else {
            // The same path, a new build of the logic.
            server.sandbox_mut().write_config(&template("logic"));
            install(
                &logic,
                if round % 2 == 0 { &echo_so } else { &upper_so },
                0o644,
            );
        }
        let reload = server
            .sandbox_mut()
            .run(&["reload", "--config", "nbnet.toml"]);
        assert!(
            reload.status.success(),
            "reload {round}: {reload:?}\n{}",
            server.log()
        );
        wait_for_progress(&server, &load, 200);
        if round != 3 && round != 7 {
            continue;
        }
        install(&binary, &build, 0o755);
        let outcome = upgrade(&mut server);
        assert!(
            outcome.status.success(),
            "upgrade after reload {round}: {outcome:?}\n{}",
            server.log()
        );
        assert!(outcome.stdout.contains("upgrade complete"), "{outcome:?}");
        let new = pid_file(&dir).expect("the pid file names the new master");
        masters.track(new);
        assert_ne!(new, master, "the pid file must name the new master");
        assert!(
            Proc::of(master).is_none_or(|p| !p.alive()),
            "the old master must have exited"
        );
        assert!(
            runs_current_file(new, &binary),
            "the new master must run the file installed at the path"
        );
        master = new;
        wait_for_progress(&server, &load, 300);
        // The Unix socket and the admin endpoint are the new master's.
        let mut unix = std::os::unix::net::UnixStream::connect(&socket)
            .expect("the Unix socket must survive the old master");
        unix.write_all(&nbnet_tests::frame(b"via unix")).unwrap();
        let health = ureq_healthz(server.admin_port());
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }
    nbnet_tests::send_signal(master, libc::SIGTTIN);
    wait_for_progress(&server, &load, 300);
    nbnet_tests::send_signal(master, libc::SIGTTOU);
    server.wait_for_log_line(&["SIGTTOU received: 2 worker(s) now"]);
    wait_for_progress(&server, &load, 300);
    server.wait_for("workers to be recycled 5 times", || {
        (server.log_count("asked to be replaced") >= 5).then_some(())
    });

    let seen = load.finish();
    assert_nothing_lost(&seen, &server);
    assert_eq!(
        seen.forms,
        std::collections::BTreeSet::from(["echo", "upper"]),
        "the answers must switch with the reloads"
    );
    assert_eq!(server.log_count("closed instead of handed over"), 0);
    assert_eq!(server.log_count("upgrade complete: the old master"), 2);

    // The last master stops like any other, removing what it owns.
    let stop = server
        .sandbox_mut()
        .run(&["stop", "--config", "nbnet.toml"]);
    assert!(stop.status.success(), "stop: {stop:?}");
    assert!(!dir.join("nbnet.pid").exists(), "pid file left behind");
    assert!(!socket.exists(), "Unix socket file left behind");
}

fn ureq_healthz(port: u16) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// A new build that cannot start is rolled back: `nbnet upgrade` fails with
/// the new master's exit status and says the old master serves on; it does
/// (same pid file, same clients); a build that can then be installed and
/// upgraded to. A file that cannot be executed is refused up front.
#[test]
fn a_new_binary_that_fails_is_rolled_back_and_the_old_master_serves_on() {
    let mut sandbox = Sandbox::new();
    let binary = sandbox.use_own_binary();
    let build = built_binary(&binary);
    let mut server = Server::start_in(sandbox, &config("upper", ""));
    let mut masters = Masters::default();
    let dir = server.dir().to_path_buf();
    let old = server.pid();
    let mut client = server.client();
    assert_eq!(client.request(b"before"), b"BEFORE");

    install(
        &binary,
        b"#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n",
        0o755,
    );
    let outcome = upgrade(&mut server);
    assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains("rolled back") && outcome.stderr.contains("exit status 3"),
        "{outcome:?}"
    );
    assert!(outcome.stderr.contains("serves on"), "{outcome:?}");
    assert_eq!(
        pid_file(&dir),
        Some(old),
        "the pid file must stay the old master's"
    );
    assert_eq!(client.request(b"still here"), b"STILL HERE");
    assert_eq!(Client::connect(server.port()).request(b"new"), b"NEW");

    install(&binary, &build, 0o644);
    let outcome = upgrade(&mut server);
    assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains("refused") && outcome.stderr.contains("Permission denied"),
        "{outcome:?}"
    );
    assert_eq!(client.request(b"and here"), b"AND HERE");

    install(&binary, &build, 0o755);
    let outcome = upgrade(&mut server);
    assert!(outcome.status.success(), "{outcome:?}\n{}", server.log());
    let new = pid_file(&dir).unwrap();
    masters.track(new);
    assert_ne!(new, old);
    assert_eq!(client.request(b"upgraded"), b"UPGRADED");
}

/// `kill -9` of the new master before it is ready (its plugin's init is
/// slow): the old master says why, `nbnet upgrade` reports the rollback,
/// and the persistent clients — never handed to the new master — lose
/// nothing.
#[test]
fn killing_the_new_master_before_it_is_ready_is_a_rollback_that_costs_nothing() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let template = slow(1500);
    let server = Server::start_in(sandbox, &template);
    let mut masters = Masters::default();
    let dir = server.dir().to_path_buf();
    let old = server.pid();
    let load = Load::start(server.port(), 10, 2, 8);
    wait_for_progress(&server, &load, 100);

    server.signal(libc::SIGUSR2);
    let new = started_new_master(&server);
    masters.track(new);
    std::thread::sleep(Duration::from_millis(300));
    nbnet_tests::send_signal(new, libc::SIGKILL);
    server.wait_for_log_line(&["upgrade failed: the new master (pid", "serves on"]);
    wait_for_progress(&server, &load, 200);
    let status = std::fs::read_to_string(dir.join("nbnet.pid.upgrade")).unwrap();
    assert!(status.contains("rolled-back"), "{status}");
    assert!(status.contains("SIGKILL"), "{status}");
    assert_eq!(pid_file(&dir), Some(old));
    let seen = load.finish();
    assert_nothing_lost(&seen, &server);
    assert_eq!(Client::connect(server.port()).request(b"after"), b"AFTER");
    server.stop();
}

/// `kill -9` of the new master after it took over, while an old worker
/// still owes a client an answer: the old master serves again (pid file,
/// admin, new workers of its own), the answer owed is delivered, and that
/// connection goes on to the old master's new workers. Connections the
/// dead master's workers held are lost — no more — and nothing is
/// misdelivered.
#[test]
fn killing_the_new_master_during_the_hand_over_brings_the_old_one_back() {
    let (server, mut masters) = start(&config("upper", ""));
    let dir = server.dir().to_path_buf();
    let old = server.pid();
    let load = Load::start(server.port(), 6, 0, 1);
    wait_for_progress(&server, &load, 50);
    // Owed an answer it does not read yet: its worker cannot hand it over
    // until the answer is sent.
    let mut midway = server.client();
    assert_eq!(midway.request(b"first"), b"FIRST");
    midway.owe_an_answer();

    server.signal(libc::SIGUSR2);
    server.wait_for_log_line(&["is ready: it serves now"]);
    let new = pid_file(&dir);
    let new = server.wait_for("the new master to take the pid file", || {
        pid_file(&dir)
            .filter(|&p| p != old)
            .or(new.filter(|&p| p != old))
    });
    masters.track(new);
    nbnet_tests::send_signal(new, libc::SIGKILL);
    server.wait_for_log_line(&[
        "while this master was handing its connections over",
        "serves again",
    ]);
    server.wait_for("the old master to take the pid file back", || {
        (pid_file(&dir) == Some(old)).then_some(())
    });
    // The answer owed is delivered, and its connection lives on.
    assert_eq!(midway.take_owed_answer(), b'O');
    assert_eq!(midway.request(b"next"), b"NEXT");
    assert_eq!(Client::connect(server.port()).request(b"fresh"), b"FRESH");
    let health = ureq_healthz(server.admin_port());
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let seen = load.finish();
    assert!(seen.mismatched.is_empty(), "{:?}", seen.mismatched);
    assert!(
        seen.closed.len() <= 6,
        "only connections the dead master held may fail: {:?}",
        seen.closed
    );
    assert_eq!(Proc::of(old).map(|p| p.alive()), Some(true));
    server.stop();
}

/// An upgrade asked for while one is under way, or while a reload is, is
/// refused with the reason; a reload asked for during an upgrade waits for
/// it.
#[test]
fn a_second_upgrade_during_an_upgrade_is_refused_with_the_reason() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let template = slow(1000);
    let mut server = Server::start_in(sandbox, &template);
    let mut masters = Masters::default();
    let dir = server.dir().to_path_buf();
    server.signal(libc::SIGUSR2);
    server.wait_for_log_line(&["upgrading: started a new master"]);
    let second = upgrade(&mut server);
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    assert!(
        second.stderr.contains("an upgrade is already under way"),
        "{second:?}"
    );
    server.wait_for_log_line(&["upgrade complete: the old master"]);
    let new = pid_file(&dir).unwrap();
    masters.track(new);
    assert_ne!(new, server.pid());
    assert_eq!(Client::connect(server.port()).request(b"ok"), b"OK");
}

/// A stop during an upgrade stops the new master too (it was not serving
/// yet): the old master exits 0, and no nbnet process is left.
#[test]
fn stopping_during_an_upgrade_stops_the_new_master_too() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let template = slow(1500);
    let mut server = Server::start_in(sandbox, &template);
    let mut masters = Masters::default();
    server.signal(libc::SIGUSR2);
    let new = started_new_master(&server);
    masters.track(new);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", server.log());
    assert!(
        Proc::of(new).is_none_or(|p| !p.alive()),
        "the new master must not outlive the stop\n{}",
        server.log()
    );
    assert!(server
        .log()
        .contains("stopping the new master of the upgrade under way"));
}

/// `nbnet upgrade` against a master that does not report upgrades (an
/// older nbnet, which would log and ignore SIGUSR2 — simulated by removing
/// the status file) says so and sends nothing, instead of waiting minutes
/// for an outcome that never comes.
#[test]
fn upgrade_refuses_to_signal_a_master_that_cannot_report() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let mut server = Server::start_in(sandbox, &config("upper", ""));
    let dir = server.dir().to_path_buf();
    std::fs::remove_file(dir.join("nbnet.pid.upgrade"))
        .expect("the master writes the status file at start");
    let outcome = upgrade(&mut server);
    assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains("does not report upgrades"),
        "{outcome:?}"
    );
    assert!(outcome.stderr.contains("nothing sent"), "{outcome:?}");
    assert_eq!(server.log_count("SIGUSR2"), 0, "{}", server.log());
    assert_eq!(pid_file(&dir), Some(server.pid()));
}

// ------------------------------------------------- found by the hostile pass

/// `config` with the slow-init hostile plugin loaded beside the others,
/// so that a new master takes a while to be ready.
fn slow(ms: u32) -> String {
    config("upper", "").replacen(
        "[[listeners]]",
        &format!(
            "[[plugins]]\nname = \"slow\"\npath = \"{{hostile}}\"\nconfig = {{ init_sleep_ms = {ms} }}\n\n[[listeners]]"
        ),
        1,
    )
}

/// The new master's PID, from the old one's log line.
fn started_new_master(server: &Server) -> i32 {
    let line = server.wait_for_log_line(&["upgrading: started a new master (pid"]);
    line.split("new master (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .expect("the log names the new master")
}

/// Hostile pass: after SIGTTIN on a `reuseport` listener, the new master
/// got every slot's socket but had fewer workers; connections the kernel
/// put in the extra sockets' queues were never accepted. Every new
/// connection must now be answered.
#[test]
fn after_an_upgrade_every_reuseport_queue_has_a_worker() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let template = config("upper", "").replacen(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nreuseport = true\n",
        1,
    );
    let mut server = Server::start_in(sandbox, &template);
    let mut masters = Masters::default();
    // (One at a time: signals sent together merge into one.)
    server.signal(libc::SIGTTIN);
    server.wait_for_workers(3);
    server.signal(libc::SIGTTIN);
    server.wait_for_workers(4);
    let outcome = upgrade(&mut server);
    assert!(outcome.status.success(), "{outcome:?}\n{}", server.log());
    masters.track(pid_file(server.dir()).unwrap());
    for i in 0..40 {
        let mut client = Client::connect(server.port());
        client.set_read_timeout(Duration::from_secs(3));
        let payload = format!("conn {i}");
        assert_eq!(
            client.request(payload.as_bytes()),
            payload.to_uppercase().as_bytes(),
            "connection {i} after the upgrade"
        );
    }
}

/// Hostile pass: `nbnet stop` during the hand-over stopped the new master
/// (the pid file names it), and the old master took that for a crash and
/// served again. A clean exit of the new master stops the server: the old
/// master delivers the answer it owes and exits too.
#[test]
fn stopping_the_new_master_during_the_hand_over_stops_the_old_one_too() {
    let (mut server, mut masters) = start(&config("upper", ""));
    let old = server.pid();
    let mut midway = server.client();
    assert_eq!(midway.request(b"first"), b"FIRST");
    midway.owe_an_answer();
    server.signal(libc::SIGUSR2);
    server.wait_for_log_line(&["is ready: it serves now"]);
    let new = server.wait_for("the new master's pid file", || {
        pid_file(server.dir()).filter(|&p| p != old)
    });
    masters.track(new);
    let stop = upgrade_in(server.dir(), "stop");
    assert!(stop.status.success(), "{stop:?}");
    server.wait_for_log_line(&["has stopped (exit status 0): the server is stopping"]);
    assert_eq!(midway.take_owed_answer(), b'O');
    midway.expect_closed();
    let status = server.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", server.log());
    assert!(!server.log().contains("serves again"), "{}", server.log());
    assert!(!server.dir().join("nbnet.pid").exists());
}

/// Hostile pass: a config changed to `reuseport = true` before an upgrade
/// left the new master's workers failing (EADDRINUSE) for the whole 140 s
/// before the rollback, and the rolled-back new master then removed the
/// Unix socket file and the status file the old one serves with. Now the
/// new master refuses at once, naming the change, and removes nothing.
#[test]
fn a_rolled_back_upgrade_leaves_the_old_masters_files_and_says_why_at_once() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let mut server = Server::start_in(sandbox, &config("upper", ""));
    let dir = server.dir().to_path_buf();
    let old = server.pid();
    let changed = config("upper", "").replacen(
        "plugin = \"upper\"\n",
        "plugin = \"upper\"\nreuseport = true\n",
        1,
    );
    server.sandbox_mut().write_config(&changed);
    let outcome = upgrade(&mut server);
    assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains("rolled back") && outcome.stderr.contains("exit status 1"),
        "{outcome:?}"
    );
    assert!(
        server
            .log()
            .contains("reuseport = false, the config says true"),
        "{}",
        server.log()
    );
    assert_eq!(pid_file(&dir), Some(old));
    assert!(dir.join("nbnet.pid.upgrade").exists());
    let mut unix = std::os::unix::net::UnixStream::connect(dir.join("nbnet.sock"))
        .expect("the old master's Unix socket file must survive the rollback");
    unix.write_all(&nbnet_tests::frame(b"still")).unwrap();
    assert_eq!(Client::connect(server.port()).request(b"tcp"), b"TCP");
}

/// Hostile pass: a second `nbnet upgrade` during the first was refused —
/// and its refusal overwrote the status file, so the first reported
/// "refused" too although its upgrade completed.
#[test]
fn a_refused_second_upgrade_does_not_change_the_first_ones_outcome() {
    let (server, mut masters) = start(&slow(1000));
    let dir = server.dir().to_path_buf();
    let first = {
        let dir = dir.clone();
        std::thread::spawn(move || upgrade_in(&dir, "upgrade"))
    };
    masters.track(started_new_master(&server));
    let second = upgrade_in(&dir, "upgrade");
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    assert!(
        second.stderr.contains("an upgrade is already under way"),
        "{second:?}"
    );
    let first = first.join().unwrap();
    assert!(first.status.success(), "{first:?}\n{}", server.log());
}

/// Hostile pass: `kill -9` of the new master mid-hand-over brings the old
/// master back (tested above) but `nbnet upgrade` said the old master was
/// "still draining". It now reports the rollback.
#[test]
fn upgrade_reports_a_new_master_that_died_during_the_hand_over() {
    let (server, mut masters) = start(&config("upper", ""));
    let dir = server.dir().to_path_buf();
    let old = server.pid();
    let mut midway = server.client();
    midway.owe_an_answer();
    let cli = {
        let dir = dir.clone();
        std::thread::spawn(move || upgrade_in(&dir, "upgrade"))
    };
    server.wait_for_log_line(&["is ready: it serves now"]);
    let new = server.wait_for("the new master's pid file", || {
        pid_file(&dir).filter(|&p| p != old)
    });
    masters.track(new);
    nbnet_tests::send_signal(new, libc::SIGKILL);
    let outcome = cli.join().unwrap();
    assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains("rolled back") && outcome.stderr.contains("serves again"),
        "{outcome:?}"
    );
    assert_eq!(midway.take_owed_answer(), b'O');
}

/// Hostile pass: a hook that hangs in an old worker while it hands its
/// connections over was killed only at shutdown_timeout + 5 s (the
/// watchdog slept while the old master was leaving); `plugin_timeout`
/// holds there too.
#[test]
fn the_watchdog_runs_while_the_old_master_hands_over() {
    let mut sandbox = Sandbox::new();
    sandbox.use_own_binary();
    let template = r#"[server]
workers = 1
pid_file = "nbnet.pid"
plugin_timeout = "1s"
shutdown_timeout = "30s"

[[plugins]]
name = "hostile"
path = "{hostile}"
config = { close_hang = true }

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "hostile"
"#;
    let mut server = Server::start_in(sandbox, template);
    let mut masters = Masters::default();
    let mut client = server.client();
    assert_eq!(client.request(b"x"), b"ok:x");
    let cli = {
        let dir = server.dir().to_path_buf();
        std::thread::spawn(move || upgrade_in(&dir, "upgrade"))
    };
    server.wait_for_log_line(&["plugin \"hostile\" has not returned for"]);
    let outcome = cli.join().unwrap();
    assert!(outcome.status.success(), "{outcome:?}\n{}", server.log());
    masters.track(pid_file(server.dir()).unwrap());
    // The connection had moved before the hook hung: still served.
    assert_eq!(client.request(b"y"), b"ok:y");
    let _ = server.wait_exit(Duration::from_secs(5));
}

/// Hostile pass: one SIGINT to the old master during the hand-over was
/// logged as "received again" and killed its workers as if at the stop
/// deadline. It now closes what is left at once, truthfully logged, and
/// the new master serves on.
#[test]
fn sigint_to_the_old_master_during_the_hand_over_closes_the_rest_and_says_so() {
    let (mut server, mut masters) = start(&config("upper", ""));
    let old = server.pid();
    let mut midway = server.client();
    midway.owe_an_answer();
    server.signal(libc::SIGUSR2);
    server.wait_for_log_line(&["is ready: it serves now"]);
    let new = server.wait_for("the new master's pid file", || {
        pid_file(server.dir()).filter(|&p| p != old)
    });
    masters.track(new);
    server.signal(libc::SIGINT);
    server.wait_for_log_line(&["SIGINT received while handing connections over"]);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", server.log());
    let log = server.log();
    assert!(!log.contains("received again"), "{log}");
    assert!(!log.contains("still running at the stop deadline"), "{log}");
    assert_eq!(Client::connect(server.port()).request(b"new"), b"NEW");
}

/// Hostile pass: started through a `current` symlink to a release folder,
/// an upgrade re-ran the release the master was started from (the path
/// was resolved at start); it runs what the path names now.
#[test]
fn an_upgrade_through_a_symlinked_release_runs_the_new_release() {
    let mut sandbox = Sandbox::new();
    let dir = sandbox.path().to_path_buf();
    for release in ["v1", "v2"] {
        std::fs::create_dir(dir.join(release)).unwrap();
        std::fs::copy(&nbnet_tests::build().nbnet, dir.join(release).join("nbnet")).unwrap();
    }
    std::os::unix::fs::symlink("v1", dir.join("current")).unwrap();
    sandbox.set_binary(dir.join("current").join("nbnet"));
    let mut server = Server::start_in(sandbox, &config("upper", ""));
    let mut masters = Masters::default();
    std::fs::remove_file(dir.join("current")).unwrap();
    std::os::unix::fs::symlink("v2", dir.join("current")).unwrap();
    let outcome = upgrade(&mut server);
    assert!(outcome.status.success(), "{outcome:?}\n{}", server.log());
    let new = pid_file(&dir).unwrap();
    masters.track(new);
    assert!(
        runs_current_file(new, &dir.join("v2").join("nbnet")),
        "the new master must run v2"
    );
}

/// Hostile pass: an empty executable file as the new build gave "exit
/// status 127" with no reason after the first try. Every try says why.
#[test]
fn a_new_binary_that_cannot_be_executed_says_why_every_time() {
    let mut sandbox = Sandbox::new();
    let binary = sandbox.use_own_binary();
    let mut server = Server::start_in(sandbox, &config("upper", ""));
    install(&binary, b"", 0o755);
    for attempt in 1..=3 {
        let outcome = upgrade(&mut server);
        assert_eq!(outcome.status.code(), Some(1), "{outcome:?}");
        assert!(
            outcome.stderr.contains("Exec format error"),
            "attempt {attempt}: {outcome:?}\n{}",
            server.log()
        );
    }
    assert_eq!(Client::connect(server.port()).request(b"on"), b"ON");
}

/// Hostile pass: a `nbnet reload` queued behind an upgrade that completes
/// printed "master exited before the reload finished"; as the README says,
/// it reports the reload cancelled (the new master read the config), and
/// reloads after it work.
#[test]
fn a_reload_queued_behind_a_successful_upgrade_reports_it_cancelled() {
    let (mut server, mut masters) = start(&slow(1000));
    server.signal(libc::SIGUSR2);
    masters.track(started_new_master(&server));
    let reload = upgrade_in(server.dir(), "reload");
    assert!(!reload.status.success(), "{reload:?}");
    assert!(
        reload.stderr.contains("cancelled"),
        "{reload:?}\n{}",
        server.log()
    );
    assert!(
        reload.stderr.contains("a new master took over"),
        "{reload:?}\n{}",
        server.log()
    );
    let _ = server.wait_exit(Duration::from_secs(15));
    masters.track(pid_file(server.dir()).unwrap());
    // Hostile pass 5: every later `nbnet reload` followed that cancelled
    // reload (queued, so "not read the config yet") and failed with it.
    for round in 1..=2 {
        let again = upgrade_in(server.dir(), "reload");
        assert!(
            again.status.success() && again.stdout.contains("reload complete"),
            "reload {round} after the upgrade: {again:?}\n{}",
            server.log()
        );
    }
    let _ = server.sandbox_mut();
}

/// Hostile pass: NBNET_UPGRADE_FD / NBNET_UPGRADE_FROM set by hand (FROM
/// naming a live process that is not its parent) left a master serving
/// with no pid file. They are ignored with a warning; the master takes its
/// pid file as usual.
#[test]
fn upgrade_variables_set_by_hand_are_ignored_with_a_warning() {
    use std::os::unix::process::CommandExt;
    let mut sandbox = Sandbox::new();
    let config_path = sandbox.write_config(&config("upper", ""));
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::empty(),
    )
    .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut command = sandbox.command();
    command
        .arg("--config")
        .arg(&config_path)
        .env("NBNET_UPGRADE_FD", "9")
        .env("NBNET_UPGRADE_FROM", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(sandbox.path().join("log")).unwrap());
    // SAFETY: dup2 is async-signal-safe; `fd` stays open in the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let master = nbnet_tests::Master(command.spawn().unwrap());
    let pid = master.id() as i32;
    nbnet_tests::wait_until(Duration::from_secs(10), "the pid file", || {
        (pid_file(sandbox.path()) == Some(pid)).then_some(())
    });
    let log = std::fs::read_to_string(sandbox.path().join("log")).unwrap();
    assert!(log.contains("is not this process's parent"), "{log}");
    drop((ours, theirs));
    drop(master);
}
