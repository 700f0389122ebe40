//! Operator traps (issue 11, section 3), each reproduced as an operator
//! would hit it and shown harmless: `--config` before or after the
//! subcommand and `NBNET_CONFIG`; `drain_delay` (a lame-duck period before a
//! graceful stop); the locked PID file (a second master is refused, a stale
//! file never gets an unrelated process signalled); `[log] file` reopened
//! on SIGUSR1 by the master and its workers; a lost log stream counted, not
//! fatal; plugins' children start with an empty signal mask.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nbnet_tests::{describe, wait_until, Outcome, Sandbox, Server, IO_TIMEOUT, SIGTERM};

/// One upper plugin on `{port}`, with `server` as the `[server]` keys and
/// `extra` appended (e.g. an `[admin]` or `[log]` table).
fn config(server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
{server}

[[plugins]]
name = "upper"
path = "{{upper}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "upper"

{extra}
"#
    )
}

/// Runs an `nbnet` command built by the caller (in the sandbox, with its
/// environment) and waits at most 15 s for it; files, not pipes, hold its
/// output, so nothing blocks.
fn run(sandbox: &Sandbox, what: &str, configure: impl FnOnce(&mut Command)) -> Outcome {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut cmd = sandbox.command();
    cmd.stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    configure(&mut cmd);
    let mut child = cmd.spawn().expect("spawn nbnet");
    let status = wait_until(Duration::from_secs(15), what, || {
        child.try_wait().expect("try_wait")
    });
    Outcome {
        status,
        stdout: fs::read_to_string(&out).unwrap_or_default(),
        stderr: fs::read_to_string(&err).unwrap_or_default(),
    }
}

fn assert_code(outcome: &Outcome, code: i32, what: &str) {
    assert_eq!(
        outcome.status.code(),
        Some(code),
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(&outcome.status),
        outcome.stdout,
        outcome.stderr
    );
}

/// `GET path` on the admin port: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to admin");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// The value of the sample `series` (a name with its labels, if any).
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Waits until the master has exited and returns how.
fn expect_exit(server: &mut Server, within: Duration, what: &str) -> ExitStatus {
    server.wait_exit(within).unwrap_or_else(|| {
        panic!(
            "the master did not exit within {within:?} after {what}\n--- log ---\n{}",
            server.log()
        )
    })
}

// ------------------------------------------------ --config and NBNET_CONFIG

/// `nbnet -c FILE reload` used the default config/nbnet.toml: the flag is
/// now taken before and after the subcommand, and `NBNET_CONFIG` names the
/// file when no flag does (a flag wins).
#[test]
fn config_is_taken_before_or_after_the_subcommand_and_from_nbnet_config() {
    let mut server = Server::start(&config("workers = 1\npid_file = \"nbnet.pid\"", ""));
    let file = server.dir().join("nbnet.toml");
    let file = file.to_str().unwrap().to_string();
    // Run from a folder without config/nbnet.toml: the default finds nothing.
    let elsewhere = server.sandbox_mut().mkdir("elsewhere");
    server.sandbox_mut().set_cwd(&elsewhere);

    // Each form reloads this master (one reload at a time: a SIGHUP during
    // a reload is not queued).
    let forms: [(&str, Option<&str>, Vec<&str>); 3] = [
        ("nbnet -c FILE reload", None, vec!["-c", &file, "reload"]),
        (
            "nbnet reload --config FILE",
            None,
            vec!["reload", "--config", &file],
        ),
        (
            "NBNET_CONFIG=FILE nbnet reload",
            Some(&file),
            vec!["reload"],
        ),
    ];
    for (n, (what, env, args)) in forms.into_iter().enumerate() {
        let outcome = run(server.sandbox_mut(), what, |cmd| {
            if let Some(file) = env {
                cmd.env("NBNET_CONFIG", file);
            }
            cmd.args(args);
        });
        assert_code(&outcome, 0, what);
        server.wait_for(&format!("reload {} ({what})", n + 1), || {
            (server.log_count("reload complete in") == n + 1).then_some(())
        });
    }
    let sandbox = server.sandbox_mut();
    let check = run(sandbox, "NBNET_CONFIG=FILE nbnet --check", |cmd| {
        cmd.env("NBNET_CONFIG", &file).arg("--check");
    });
    assert_code(&check, 0, "NBNET_CONFIG=FILE nbnet --check");
    assert!(check.stdout.contains(&file), "{}", check.stdout);
    // A flag wins over the environment.
    let flag_wins = run(
        sandbox,
        "NBNET_CONFIG=missing nbnet -c FILE --check",
        |cmd| {
            cmd.env("NBNET_CONFIG", "missing.toml")
                .args(["-c", &file, "--check"]);
        },
    );
    assert_code(
        &flag_wins,
        0,
        "NBNET_CONFIG=missing.toml nbnet -c FILE --check",
    );
    // The environment wins over the default (which does not exist here).
    let missing = run(sandbox, "NBNET_CONFIG=missing nbnet --check", |cmd| {
        cmd.env("NBNET_CONFIG", "missing.toml").arg("--check");
    });
    assert_code(&missing, 3, "NBNET_CONFIG=missing.toml nbnet --check");
    assert!(
        missing.stderr.contains("missing.toml"),
        "{}",
        missing.stderr
    );

    // `nbnet -c FILE stop` stops this master (reaped here meanwhile).
    let sandbox = server.sandbox_mut();
    let mut stop = sandbox
        .command()
        .args(["-c", &file, "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbnet stop");
    let status = expect_exit(&mut server, Duration::from_secs(15), "nbnet -c FILE stop");
    assert!(status.success(), "{}", describe(&status));
    let stopped = wait_until(Duration::from_secs(10), "nbnet stop to exit", || {
        stop.try_wait().expect("try_wait")
    });
    assert!(
        stopped.success(),
        "nbnet -c FILE stop: {}",
        describe(&stopped)
    );
}

// --------------------------------------------------------------- drain_delay

/// A load balancer needs time to see `/healthz` fail before the listeners
/// close: for `drain_delay` after SIGTERM the server answers `503 draining`
/// there while it serves new connections as usual; then it stops.
#[test]
fn drain_delay_serves_on_while_healthz_says_draining_then_stops() {
    let mut server = Server::start(&config(
        "workers = 1\ndrain_delay = \"2s\"\nshutdown_timeout = \"5s\"",
        "[admin]\naddr = \"127.0.0.1:{admin}\"",
    ));
    let admin = server.admin_port();
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".to_string()));
    let mut before = server.client();
    assert_eq!(before.request(b"before"), b"BEFORE");

    server.signal(SIGTERM);
    let (status, body) = wait_until(Duration::from_secs(5), "/healthz to turn 503", || {
        let reply = http_get(admin, "/healthz");
        (reply.0 != 200).then_some(reply)
    });
    assert_eq!(
        (status, body.as_str()),
        (503, "draining\n"),
        "{}",
        server.log()
    );
    // Still serving: a new connection and an old one get answers.
    let mut fresh = server.client();
    assert_eq!(fresh.request(b"fresh"), b"FRESH");
    assert_eq!(before.request(b"again"), b"AGAIN");
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the master must wait out drain_delay\n{}",
        server.log()
    );

    // Then the graceful stop proceeds as without a delay.
    let status = expect_exit(&mut server, Duration::from_secs(15), "drain_delay");
    assert!(status.success(), "{}\n{}", describe(&status), server.log());
    server.wait_for_log_line(&["drain_delay is over", "graceful stop"]);
}

/// A second SIGTERM (or a SIGINT) during `drain_delay` stops at once.
#[test]
fn a_second_sigterm_skips_drain_delay() {
    let mut server = Server::start(&config(
        "workers = 1\ndrain_delay = \"1day\"",
        "[admin]\naddr = \"127.0.0.1:{admin}\"",
    ));
    let admin = server.admin_port();
    server.signal(SIGTERM);
    wait_until(Duration::from_secs(5), "/healthz to say draining", || {
        (http_get(admin, "/healthz") == (503, "draining\n".to_string())).then_some(())
    });
    server.signal(SIGTERM);
    let status = expect_exit(&mut server, Duration::from_secs(10), "a second SIGTERM");
    assert!(status.success(), "{}\n{}", describe(&status), server.log());
}

// ------------------------------------------------------------------ pid_file

/// With `reuseport` a second master could bind the same port; it overwrote
/// the PID file, and `nbnet stop` then stopped only the second. Now the
/// first master's lock refuses the second, which names the file and the
/// running master, and the file keeps leading to the first.
#[test]
fn a_second_master_with_the_same_pid_file_is_refused() {
    let mut server = Server::start(
        r#"
[server]
workers = 1
pid_file = "nbnet.pid"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
reuseport = true
"#,
    );
    let pid_file = server.dir().join("nbnet.pid");
    let file = server.dir().join("nbnet.toml");
    let second = server
        .sandbox_mut()
        .run(&["--config", file.to_str().unwrap()]);
    assert_code(&second, 1, "a second master on the same pid_file");
    for needle in [
        pid_file.to_str().unwrap(),
        &format!("pid {}", server.pid()),
        "another nbnet master",
    ] {
        assert!(
            second.stderr.contains(needle),
            "the refusal should mention {needle:?}: {}",
            second.stderr
        );
    }
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap().trim(),
        server.pid().to_string(),
        "the PID file must still name the first master"
    );
    assert_eq!(server.client().request(b"still"), b"STILL");

    // `nbnet stop` reaches the first master through the file.
    let mut stop = server
        .sandbox_mut()
        .command()
        .args(["stop", "--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbnet stop");
    let status = expect_exit(&mut server, Duration::from_secs(15), "nbnet stop");
    assert!(status.success(), "{}", describe(&status));
    let stopped = wait_until(Duration::from_secs(10), "nbnet stop to exit", || {
        stop.try_wait().expect("try_wait")
    });
    assert!(stopped.success(), "nbnet stop: {}", describe(&stopped));
    assert!(!pid_file.exists(), "the master removes its PID file");
}

/// A PID file left behind (a master killed with SIGKILL) may name a process
/// that is not nbnet: `nbnet stop` and `nbnet reload` killed it. Now they
/// see that nobody holds the file's lock and signal nothing.
#[test]
fn a_stale_pid_file_naming_another_process_signals_nothing() {
    let mut sandbox = Sandbox::new();
    let file = sandbox.write_config(&config("workers = 1\npid_file = \"nbnet.pid\"", ""));
    let mut bystander = Bystander(
        Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("spawn sleep"),
    );
    let bystander = &mut bystander.0;
    let pid_file = sandbox.write("nbnet.pid", format!("{}\n", bystander.id()).as_bytes());
    // `stop --strict`: plain `stop` on a server that is not running
    // succeeds (checked below).
    for command in ["stop --strict", "reload"] {
        let mut args: Vec<&str> = command.split(' ').collect();
        args.extend(["--config", file.to_str().unwrap()]);
        let outcome = sandbox.run(&args);
        let alive = bystander.try_wait().expect("try_wait").is_none();
        if !alive {
            panic!(
                "nbnet {command} killed the unrelated process named in a stale PID file\n{}{}",
                outcome.stdout, outcome.stderr
            );
        }
        assert_code(
            &outcome,
            1,
            &format!("nbnet {command} with a stale PID file"),
        );
        for needle in [pid_file.to_str().unwrap(), "stale", "nothing was signalled"] {
            assert!(
                outcome.stderr.contains(needle),
                "nbnet {command} should mention {needle:?}: {}",
                outcome.stderr
            );
        }
    }
    let stop = sandbox.run(&["stop", "--config", file.to_str().unwrap()]);
    assert_code(&stop, 0, "nbnet stop with a stale PID file");
    assert!(stop.stdout.contains("nbnet is not running"), "{stop:?}");
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "nbnet stop killed the unrelated process named in a stale PID file"
    );
    // A master started now takes the stale file over.
    let server = sandbox.start(&config("workers = 1\npid_file = \"nbnet.pid\"", ""));
    assert_eq!(
        fs::read_to_string(&pid_file).unwrap().trim(),
        server.pid().to_string()
    );
}

/// A process killed when the test ends, however it ends.
struct Bystander(std::process::Child);

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ------------------------------------------------------------------ logging

/// Waits (at most 10 s) until the file at `path` has a line containing all
/// of `parts`; returns the file's text.
fn wait_for_line(path: &Path, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in {} within 10 s:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// logrotate renames the file and sends SIGUSR1 (`postrotate kill -USR1`):
/// it killed the master and every worker without a word. Now the master
/// reopens `[log] file` and passes the signal on; the master's and the
/// workers' later lines land in the new file.
#[test]
fn sigusr1_reopens_the_log_file_in_the_master_and_its_workers() {
    let sandbox = Sandbox::new();
    sandbox.mkdir("logs");
    let server = sandbox.start(&config("workers = 2", "[log]\nfile = \"logs/nbnet.log\""));
    let log = server.dir().join("logs/nbnet.log");
    let rotated = server.dir().join("logs/nbnet.log.1");
    let workers = server.wait_for_workers(2);
    wait_for_line(&log, &["worker 1 started"]);

    fs::rename(&log, &rotated).expect("rotate the log file");
    server.signal(libc::SIGUSR1);
    wait_for_line(&log, &["SIGUSR1 received: reopened the log file"]);
    for worker in &workers {
        wait_for_line(
            &log,
            &[&format!("pid={}", worker.pid), "SIGUSR1 received: reopened"],
        );
    }
    // A worker's own line after the rotation: a protocol error.
    let mut client = server.client();
    client.send_raw(b"00000000x1").unwrap();
    client.expect_closed();
    let text = wait_for_line(&log, &["protocol error"]);
    assert!(text.contains("worker{"), "{text}");
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains("protocol error") && !old.contains("reopened"),
        "lines after the rotation went to the old file:\n{old}"
    );
    assert_eq!(server.live_workers(), workers, "nobody died of SIGUSR1");
    assert_eq!(server.client().request(b"rotated"), b"ROTATED");
    server.stop();
}

/// Without `[log] file`, SIGUSR1 (to the master or a worker) changes
/// nothing; nor do the master's other signals sent to a worker by mistake
/// (a worker blocks no signal: it catches them).
#[test]
fn sigusr1_without_a_log_file_and_stray_signals_to_a_worker_are_harmless() {
    let server = Server::start(&config("workers = 1", ""));
    let workers = server.wait_for_workers(1);
    server.signal(libc::SIGUSR1);
    for signal in [
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGHUP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGWINCH,
        libc::SIGPIPE,
    ] {
        nbnet_tests::send_signal(workers[0].pid, signal);
    }
    server.wait_for_log_line(&["SIGUSR1 received", "no log file to reopen"]);
    assert_eq!(server.client().request(b"fine"), b"FINE");
    assert_eq!(server.live_workers(), workers);
    server.stop();
}

/// A log file on a full disk (here: a link to /dev/full): lines are
/// dropped and counted in /metrics, the server serves on; once the file
/// can be written again (reopened on SIGUSR1) one line says how many were
/// lost.
#[test]
fn a_log_file_on_a_full_disk_drops_and_counts_lines_and_says_so_once_it_works() {
    let sandbox = Sandbox::new();
    sandbox.mkdir("logs");
    let log = sandbox.path().join("logs/nbnet.log");
    std::os::unix::fs::symlink("/dev/full", &log).expect("symlink to /dev/full");
    let server = sandbox.start(&config(
        "workers = 1",
        "[admin]\naddr = \"127.0.0.1:{admin}\"\n[log]\nfile = \"logs/nbnet.log\"",
    ));
    let admin = server.admin_port();
    server.signal(libc::SIGTTIN);
    server.wait_for_workers(2);
    let dropped = wait_until(Duration::from_secs(5), "dropped lines in /metrics", || {
        let (_, body) = http_get(admin, "/metrics");
        metric(&body, "nbnet_log_lines_dropped_total").filter(|&n| n >= 2.0)
    });
    assert_eq!(server.client().request(b"full"), b"FULL");

    fs::remove_file(&log).unwrap();
    server.signal(libc::SIGUSR1);
    let text = wait_for_line(&log, &["log line(s) of process", "could not be written"]);
    assert!(
        text.contains("No space left on device"),
        "the note should say why:\n{text}"
    );
    let (_, body) = http_get(admin, "/metrics");
    assert!(metric(&body, "nbnet_log_lines_dropped_total").unwrap() >= dropped);
    server.stop();
}

/// When stderr's reader goes away (a closed pipe) the master once panicked
/// at the next log line. It serves on, and counts what it could not log.
#[test]
fn a_closed_stderr_pipe_never_stops_the_server_and_dropped_lines_are_counted() {
    let mut sandbox = Sandbox::new();
    let file = sandbox.write_config(&config(
        "workers = 1",
        "[admin]\naddr = \"127.0.0.1:{admin}\"",
    ));
    let (port, admin) = (sandbox.port(0), sandbox.admin_port());
    let mut master = sandbox
        .command()
        .arg("--config")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbnet");
    drop(master.stderr.take()); // the reader goes away
    let guard = Bystander(master);
    let pid = guard.0.id() as i32;
    wait_until(Duration::from_secs(10), "the server to answer", || {
        let mut client = nbnet_tests::Client::try_connect(port).ok()?;
        (client.request(b"up") == b"UP").then_some(())
    });
    nbnet_tests::send_signal(pid, libc::SIGTTIN);
    let dropped = wait_until(Duration::from_secs(5), "dropped lines in /metrics", || {
        let (_, body) = http_get(admin, "/metrics");
        metric(&body, "nbnet_log_lines_dropped_total").filter(|&n| n >= 1.0)
    });
    assert!(dropped >= 1.0);
    assert_eq!(nbnet_tests::Client::connect(port).request(b"on"), b"ON");
    let mut guard = guard;
    nbnet_tests::send_signal(pid, SIGTERM);
    let status = wait_until(Duration::from_secs(10), "the master to stop", || {
        guard.0.try_wait().expect("try_wait")
    });
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
}

/// A `[log] file` that cannot be opened stops the start, saying which and
/// why, on the terminal that started it.
#[test]
fn a_log_file_that_cannot_be_opened_is_a_clear_startup_failure() {
    let (status, stderr) = nbnet_tests::expect_startup_failure(&config(
        "workers = 1",
        "[log]\nfile = \"no-such-folder/nbnet.log\"",
    ));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open the [log] file")
            && stderr.contains("no-such-folder/nbnet.log")
            && stderr.contains("does not exist: create it"),
        "{stderr}"
    );
}

/// Makes a FIFO (named pipe) at `path`.
fn mkfifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A `[log] file` that is a FIFO nobody reads hung the start in `open`,
/// silently and for good. It is refused at once now, like any log file
/// that cannot be opened, and so is any other file that is not a regular
/// file (or a device such as /dev/null).
#[test]
fn a_log_file_that_is_a_fifo_or_a_folder_is_refused_at_start_without_hanging() {
    let mut sandbox = Sandbox::new();
    sandbox.mkdir("logs");
    mkfifo(&sandbox.path().join("logs/nbnet.fifo"));
    sandbox.mkdir("logs/folder.log");
    for (file, what) in [
        ("logs/nbnet.fifo", "it is a FIFO (named pipe)"),
        ("logs/folder.log", "it is a folder"),
    ] {
        // `run` gives up (failing the test) if nbnet does not exit.
        let (status, stderr) = sandbox
            .expect_startup_failure(&config("workers = 1", &format!("[log]\nfile = \"{file}\"")));
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot open the [log] file")
                && stderr.contains(file)
                && stderr.contains(what)
                && stderr.contains("must name a regular file"),
            "{stderr}"
        );
    }
    // A device is fine.
    let server = sandbox.start(&config("workers = 1", "[log]\nfile = \"/dev/null\""));
    assert_eq!(server.client().request(b"null"), b"NULL");
    server.stop();
}

/// A FIFO put in place of the log file before SIGUSR1 hung the master in
/// `open` (no more reaping, reloads or stops). The master now keeps
/// logging to the file it has, says why, and does not pass the signal on.
#[test]
fn sigusr1_with_a_fifo_in_place_of_the_log_file_keeps_the_old_file_and_says_why() {
    let sandbox = Sandbox::new();
    sandbox.mkdir("logs");
    let mut server = sandbox.start(&config("workers = 1", "[log]\nfile = \"logs/nbnet.log\""));
    let log = server.dir().join("logs/nbnet.log");
    let rotated = server.dir().join("logs/nbnet.log.1");
    wait_for_line(&log, &["worker 0 started"]);
    fs::rename(&log, &rotated).expect("rotate the log file");
    mkfifo(&log);
    server.signal(libc::SIGUSR1);
    wait_for_line(
        &rotated,
        &[
            "SIGUSR1 received: cannot open the [log] file",
            "it is a FIFO (named pipe)",
            "logging on to the file open before",
        ],
    );
    // The master still works: it answers, and stops when told.
    assert_eq!(server.client().request(b"still"), b"STILL");
    server.signal(SIGTERM);
    let status = expect_exit(&mut server, Duration::from_secs(10), "SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
    let text = fs::read_to_string(&rotated).unwrap();
    assert!(text.contains("stopped"), "{text}");
}

// ------------------------------------------------- plugins' children's mask

/// A worker blocked the signals it read from its signalfd (and inherited
/// the master's blocked set); a child a plugin started inherited that mask,
/// so SIGTERM did not stop it. A plugin's child, whether forked or started
/// with `system()` or `popen()` (`posix_spawn`, which skips atfork
/// handlers), now starts with nothing blocked and nothing ignored (SIGPIPE
/// too, which the Rust runtime ignores in nbnet).
#[test]
fn a_child_a_plugin_starts_has_no_signal_blocked_or_ignored() {
    let server = Server::start(
        r#"
[server]
workers = 1

[[plugins]]
name = "sigmask"
path = "{sigmask}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "sigmask"
"#,
    );
    let mut client = server.client();
    let worker = signal_state(&client.request(b"self"));
    let expected = expected_child_state(server.pid());
    for how in ["fork", "system", "popen"] {
        let child = signal_state(&client.request(how.as_bytes()));
        assert_eq!(
            child, expected,
            "the signal state (blocked, ignored) of a child a plugin started with {how}(); the worker's: {worker:x?}"
        );
    }
    // The worker itself blocks nothing either (plugins' threads and
    // posix_spawn inherit its mask), and still stops on SIGTERM.
    assert_eq!(worker.0, 0, "the worker's blocked signals");
}

/// (blocked, ignored) from the `SigBlk:` and `SigIgn:` lines of a status.
fn signal_state(status: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(status);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
    };
    (field("SigBlk:"), field("SigIgn:"))
}

/// What a plugin's child should start with: nothing blocked, and ignored
/// only what the master inherited from whoever started it (the master's
/// ignored set without SIGPIPE, which the Rust runtime ignores in nbnet).
fn expected_child_state(master: i32) -> (u64, u64) {
    let status = fs::read(format!("/proc/{master}/status")).unwrap();
    let (_, ignored) = signal_state(&status);
    (0, ignored & !(1 << (libc::SIGPIPE - 1)))
}
