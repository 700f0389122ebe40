//! The one-shot commands (`--check`, `plugin info|run`, `send`) when their
//! surroundings are hostile: stdout or stderr that cannot be written, a
//! plugin whose init daemonizes, a plugin whose own name is an escape
//! sequence, a `[server] pid_file` the server could not create.

use std::fs;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbnet_tests::{describe, one_plugin_config, Proc, Sandbox, Server, STARTUP_TIMEOUT};

/// Runs `nbnet ARGS` in `sandbox` with the given stdout and stderr, and
/// waits for it (at most [`STARTUP_TIMEOUT`]).
fn run_to(sandbox: &Sandbox, args: &[&str], stdout: Stdio, stderr: Stdio) -> ExitStatus {
    let mut child = sandbox
        .command()
        .args(args)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn nbnet");
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`nbnet {}` did not exit within {STARTUP_TIMEOUT:?}",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn dev_full() -> Stdio {
    fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full")
        .into()
}

/// Runs `nbnet ARGS` with stdout going to /dev/full (every write fails
/// with ENOSPC); returns the status and what it wrote to stderr.
fn with_stdout_full(sandbox: &Sandbox, args: &[&str]) -> (ExitStatus, String) {
    let err = sandbox.path().join("stdout-full.stderr");
    let status = run_to(
        sandbox,
        args,
        dev_full(),
        fs::File::create(&err).expect("create stderr file").into(),
    );
    (status, fs::read_to_string(&err).unwrap_or_default())
}

fn assert_stdout_failure_reported(status: ExitStatus, stderr: &str, what: &str) {
    assert!(
        !stderr.contains("panicked"),
        "{what} panicked ({}):\n{stderr}",
        describe(&status)
    );
    assert_eq!(
        status.code(),
        Some(1),
        "{what}: expected exit code 1 (stdout failed), got {}:\n{stderr}",
        describe(&status)
    );
    assert!(
        stderr.contains("cannot write to stdout") && stderr.contains("No space left"),
        "{what}: the failed write is not reported:\n{stderr}"
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn check_with_stdout_full_exits_1_without_panicking() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(&one_plugin_config("u", "{upper_c}", ""));
    let (status, stderr) = with_stdout_full(&sandbox, &["--config", path_str(&config), "--check"]);
    assert_stdout_failure_reported(status, &stderr, "--check > /dev/full");
}

#[test]
fn plugin_info_with_stdout_full_exits_1_without_panicking() {
    let sandbox = Sandbox::new();
    let so = nbnet_tests::build().upper_c_so.clone();
    let (status, stderr) = with_stdout_full(&sandbox, &["plugin", "info", path_str(&so)]);
    assert_stdout_failure_reported(status, &stderr, "plugin info > /dev/full");
}

#[test]
fn send_with_stdout_full_exits_1() {
    let server = Server::start(&one_plugin_config("u", "{upper_c}", ""));
    let sandbox = Sandbox::new();
    let addr = server.addr().to_string();
    let (status, stderr) = with_stdout_full(&sandbox, &["send", &addr, "hi"]);
    assert_stdout_failure_reported(status, &stderr, "send > /dev/full");
}

/// A reader that has gone (`| head -1`): EPIPE ends the command quietly,
/// with status 1, as a Unix tool ended by SIGPIPE says nothing either.
#[test]
fn plugin_info_into_a_closed_pipe_exits_1_quietly() {
    let sandbox = Sandbox::new();
    let so = nbnet_tests::build().upper_c_so.clone();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let err = sandbox.path().join("pipe.stderr");
    let status = run_to(
        &sandbox,
        &["plugin", "info", path_str(&so)],
        writer.into(),
        fs::File::create(&err).expect("create stderr file").into(),
    );
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    assert_eq!(status.code(), Some(1), "{}:\n{stderr}", describe(&status));
    assert!(
        stderr.is_empty(),
        "a reader that left is not an error to report:\n{stderr}"
    );
}

/// Problems still decide the exit status when stderr cannot be written.
#[test]
fn check_with_stderr_full_keeps_its_exit_status() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(&one_plugin_config("u", "{dir}/no-such-plugin.so", ""));
    let out = sandbox.path().join("stderr-full.stdout");
    let status = run_to(
        &sandbox,
        &["--config", path_str(&config), "--check"],
        fs::File::create(&out).expect("create stdout file").into(),
        dev_full(),
    );
    assert_eq!(
        status.code(),
        Some(4),
        "--check 2>/dev/full of a config with a missing plugin: {}",
        describe(&status)
    );
}

/// Fails (after killing it) if the daemon whose pid the `daemonize` plugin
/// wrote to `pid_file` is still running. `marker` is a string its command
/// line (nbnet's, as it forked without exec) holds, so that a reused pid is
/// never taken for it.
fn assert_daemon_gone(pid_file: &Path, marker: &str, what: &str) {
    let text = fs::read_to_string(pid_file).unwrap_or_else(|e| {
        panic!(
            "{what}: the plugin's daemon did not write {}: {e}",
            pid_file.display()
        )
    });
    let pid: i32 = text.trim().parse().expect("a pid");
    let Some(daemon) = Proc::of(pid) else { return };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if daemon.alive() && String::from_utf8_lossy(&cmdline).contains(marker) {
        daemon.kill_if_alive();
        panic!("{what}: the daemon (pid {pid}) the plugin's init started is still running after nbnet exited");
    }
}

#[test]
fn check_leaves_no_daemon_of_a_plugin_behind() {
    let mut sandbox = Sandbox::new();
    let pid_file = sandbox.path().join("daemon.pid");
    let config = sandbox.write_config(&format!(
        r#"
[[plugins]]
name = "d"
path = "{{daemonize}}"
config = {{ pid_file = "{}" }}

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "d"
"#,
        pid_file.display()
    ));
    let outcome = sandbox.run(&["--config", path_str(&config), "--check"]);
    assert_eq!(
        outcome.status.code(),
        Some(0),
        "--check of a daemonizing plugin\n{}",
        outcome.stderr
    );
    assert_daemon_gone(&pid_file, path_str(&config), "nbnet --check");
    assert!(
        outcome.stderr.contains("killed 1 process(es)"),
        "the check does not say it killed the plugin's daemon:\n{}",
        outcome.stderr
    );
}

#[test]
fn plugin_run_leaves_no_daemon_of_a_plugin_behind() {
    let mut sandbox = Sandbox::new();
    let pid_file = sandbox.path().join("daemon.pid");
    let so = nbnet_tests::build().daemonize_so.clone();
    let plugin_config = format!("pid_file = \"{}\"", pid_file.display());
    let outcome = sandbox.run_with_input(
        &["plugin", "run", path_str(&so), "--config", &plugin_config],
        b"hello\n",
    );
    assert_eq!(
        outcome.status.code(),
        Some(0),
        "plugin run of a daemonizing plugin\n{}",
        outcome.stderr
    );
    assert_eq!(outcome.stdout, "hello\n");
    assert_daemon_gone(&pid_file, &plugin_config, "nbnet plugin run");
}

/// The library's own name and version reach the terminal escaped and
/// bounded: no escape sequence, no forged line, no 1 MiB flood.
#[test]
fn plugin_info_escapes_and_bounds_the_plugins_own_name_and_version() {
    let so = nbnet_tests::build().bad_name_so.clone();
    let outcome = Sandbox::new().run(&["plugin", "info", path_str(&so)]);
    assert_eq!(outcome.status.code(), Some(0), "{}", outcome.stderr);
    assert!(
        !outcome.stdout.contains('\u{1b}'),
        "an escape sequence reached stdout: {:?}",
        &outcome.stdout[..outcome.stdout.len().min(300)]
    );
    assert!(
        outcome.stdout.len() < 16 * 1024,
        "{} bytes of output for a 1 MiB version",
        outcome.stdout.len()
    );
    let lines: Vec<&str> = outcome.stdout.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("loadable:")).count(),
        1,
        "the plugin's name forged an output line:\n{}",
        &outcome.stdout[..outcome.stdout.len().min(600)]
    );
    assert!(
        lines.contains(&"name:     red\\u{1b}[31m\\nloadable: forged"),
        "the name is not shown escaped:\n{}",
        &outcome.stdout[..outcome.stdout.len().min(600)]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("version:  \\n\\n") && l.contains("more bytes)")),
        "the version is not shown escaped and cut:\n{}",
        &outcome.stdout[..outcome.stdout.len().min(600)]
    );
}

/// `--check` of a config whose `[server] pid_file` (or `[log] file`) the
/// server could not create fails with the start's status, 1, naming the
/// key, the path and the config file.
#[test]
fn check_reports_a_pid_file_the_server_could_not_create() {
    let cases = [
        (
            "pid_file = \"missing/nbnet.pid\"",
            "",
            "[server] pid_file",
            "missing/nbnet.pid",
            "folder",
        ),
        (
            "pid_file = \"a-folder\"",
            "",
            "[server] pid_file",
            "a-folder",
            "is a folder",
        ),
        (
            "",
            "[log]\nfile = \"missing/nbnet.log\"\n",
            "[log] file",
            "missing/nbnet.log",
            "folder",
        ),
        // A FIFO would make the server hang (or be refused at start).
        (
            "",
            "[log]\nfile = \"a-fifo\"\n",
            "[log] file",
            "a-fifo",
            "is a FIFO (named pipe), not a regular file",
        ),
        // A device takes log lines, not a PID (hostile pass 8: "config
        // OK", then the start failed with EINVAL).
        (
            "pid_file = \"/dev/null\"",
            "",
            "[server] pid_file",
            "/dev/null",
            "is a device, not a regular file",
        ),
    ];
    for (server, log, key, path, why) in cases {
        let mut sandbox = Sandbox::new();
        sandbox.mkdir("a-folder");
        nix::unistd::mkfifo(
            &sandbox.path().join("a-fifo"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        let config = sandbox.write_config(&format!(
            "{log}{}",
            one_plugin_config("u", "{upper_c}", server)
        ));
        let outcome = sandbox.run(&["--config", path_str(&config), "--check"]);
        let full_path = sandbox.path().join(path);
        assert_eq!(
            outcome.status.code(),
            Some(1),
            "--check with {key} = {path}: expected exit code 1\n{}",
            outcome.stderr
        );
        let line = outcome
            .stderr
            .lines()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("no error names {key}:\n{}", outcome.stderr));
        assert!(
            line.contains(path_str(&full_path))
                && line.contains(path_str(&config))
                && line.contains(why),
            "the error does not name the path, the config file and why ({why}): {line}"
        );
    }

    // A pid_file in an existing folder passes, and --check creates nothing.
    let mut sandbox = Sandbox::new();
    let config = sandbox.write_config(&one_plugin_config(
        "u",
        "{upper_c}",
        "pid_file = \"nbnet.pid\"",
    ));
    let outcome = sandbox.run(&["--config", path_str(&config), "--check"]);
    assert_eq!(outcome.status.code(), Some(0), "{}", outcome.stderr);
    assert!(!sandbox.path().join("nbnet.pid").exists());
}

/// Issue 14: `nbnet completions bash|zsh|fish` and `nbnet man`, as cargo,
/// rustup and ripgrep offer them. The bash script must parse (`bash -n`).
#[test]
fn completions_for_bash_zsh_fish_and_a_man_page_are_printed() {
    let mut sandbox = Sandbox::new();
    let bash = sandbox.run(&["completions", "bash"]);
    assert!(bash.status.success(), "{bash:?}");
    for needle in ["_nbnet()", "bench", "reload", "completions", "--check"] {
        assert!(
            bash.stdout.contains(needle),
            "{needle} missing:\n{}",
            bash.stdout
        );
    }
    let script = sandbox.write("nbnet.bash", bash.stdout.as_bytes());
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(syntax.status.success(), "{syntax:?}");
    for shell in ["zsh", "fish"] {
        let out = sandbox.run(&["completions", shell]);
        assert!(
            out.status.success() && out.stdout.contains("nbnet"),
            "{shell}: {out:?}"
        );
    }
    let wrong = sandbox.run(&["completions", "tcsh"]);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    let man = sandbox.run(&["man"]);
    assert!(man.status.success(), "{man:?}");
    assert!(man.stdout.contains(".TH nbnet 1"), "{}", man.stdout);
    assert!(
        man.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{}",
        man.stdout
    );
    assert!(man.stdout.contains("reload"), "{}", man.stdout);
}

/// Issue 14: `nbnet send` took IP:PORT only. A host name is resolved (and
/// each of its addresses tried: `localhost` may name `::1` first while the
/// server listens on 127.0.0.1), and `unix:/path` reaches a Unix listener.
#[test]
fn send_accepts_a_host_name_and_a_unix_socket_path() {
    let server = Server::start(&format!(
        "{}\n[[listeners]]\naddr = \"unix:{{dir}}/nbnet.sock\"\nplugin = \"u\"\n",
        one_plugin_config("u", "{upper_c}", "")
    ));
    let mut sandbox = Sandbox::new();
    let by_name = sandbox.run(&["send", &format!("localhost:{}", server.port()), "hi"]);
    assert_eq!(
        (by_name.status.code(), by_name.stdout.as_str()),
        (Some(0), "HI\n"),
        "{by_name:?}"
    );
    let socket = format!("unix:{}", server.dir().join("nbnet.sock").display());
    let by_path = sandbox.run(&["send", &socket, "ho"]);
    assert_eq!(
        (by_path.status.code(), by_path.stdout.as_str()),
        (Some(0), "HO\n"),
        "{by_path:?}"
    );
    // A wrong address says which forms there are; a missing socket names it.
    let bad = sandbox.run(&["send", "localhost", "hi"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains("HOST:PORT"), "{}", bad.stderr);
    let gone = format!("unix:{}", sandbox.path().join("no.sock").display());
    let missing = sandbox.run(&["send", &gone, "hi"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(missing.stderr.contains(&gone), "{}", missing.stderr);
}

/// Issue 14: `--check` tried the listeners' addresses but not `[admin]`'s,
/// so a config whose admin address the server cannot bind passed the check
/// and failed at start. (192.0.2.1 is TEST-NET-1, on no machine: the bind
/// fails at once, nothing is sent.) An admin address in use is a warning
/// only, as for listeners: the server may be running.
#[test]
fn check_tries_the_admin_address() {
    let mut sandbox = Sandbox::new();
    let template = |admin: &str| {
        format!(
            "[admin]\naddr = \"{admin}\"\n{}",
            one_plugin_config("u", "{upper_c}", "")
        )
    };
    let out = sandbox.check(&template("192.0.2.1:9191"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let config = sandbox.config_path();
    assert!(
        out.stderr.contains(&format!(
            "[admin] addr 192.0.2.1:9191 ({}:2): cannot listen",
            config.display()
        )),
        "{}",
        out.stderr
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = sandbox.check(&template(&addr));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "warning: [admin] addr {addr} ({}:2): address in use",
            config.display()
        )),
        "{}",
        out.stderr
    );
}
