//! `nbnet bench`, the load generator (issue 5), against a real server: it
//! checks every response against its own request, reports what it measured
//! (as JSON for scripts), and fails loudly when the server is wrong or gone.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;

use nbnet_tests::{one_plugin_config, Sandbox, Server, STARTUP_TIMEOUT};

/// Runs `nbnet bench` with `args` against `server`.
fn bench(server: &Server, args: &[&str]) -> nbnet_tests::Outcome {
    let addr = server.addr().to_string();
    let mut all = vec!["bench", "--addr", &addr];
    all.extend_from_slice(args);
    Sandbox::new().run(&all)
}

#[test]
fn a_pipelined_run_checks_every_response_and_reports_json() {
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let out = bench(
        &server,
        &[
            "--conns",
            "4",
            "--pipeline",
            "4",
            "--requests",
            "2000",
            "--expect",
            "upper",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let field = |name: &str| -> String {
        let key = format!("\"{name}\":");
        let at = out
            .stdout
            .find(&key)
            .unwrap_or_else(|| panic!("no {name}: {}", out.stdout));
        out.stdout[at + key.len()..]
            .split([',', '}'])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("requests"), "2000");
    assert_eq!(field("errors"), "0");
    assert_eq!(field("mismatches"), "0");
    assert_eq!(field("depth"), "4");
    assert!(out.stdout.contains("\"p99\":"), "{}", out.stdout);
}

#[test]
fn a_wrong_answer_is_reported_and_fails_the_run() {
    // The server upper-cases; the run expects echoes.
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let out = bench(
        &server,
        &["--conns", "2", "--requests", "100", "--expect", "echo"],
    );
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("response mismatch"), "{}", out.stderr);
}

#[test]
fn an_unreachable_server_is_named_and_fails_the_run() {
    let out = Sandbox::new().run(&["bench", "--addr", "127.0.0.1:1", "--requests", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("cannot connect to 127.0.0.1:1"),
        "{}",
        out.stderr
    );
}

/// A pseudo-terminal: (master, slave). What a program writes to the slave
/// is read from the master, and the program sees a terminal.
fn pty() -> (std::fs::File, std::fs::File) {
    // SAFETY: plain libc calls; each descriptor is checked, then owned.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(master);
        use std::os::fd::AsRawFd;
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let name = libc::ptsname(master.as_raw_fd());
        assert!(!name.is_null(), "ptsname");
        let name = std::ffi::CStr::from_ptr(name).to_str().unwrap().to_string();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&name)
            .unwrap_or_else(|e| panic!("open {name}: {e}"));
        (master.into(), slave)
    }
}

/// The first line from `reader` that `wanted` accepts, read on a thread;
/// panics after [`STARTUP_TIMEOUT`] (with what was read).
fn line_matching(
    reader: impl std::io::Read + Send + 'static,
    wanted: fn(&str) -> bool,
) -> mpsc::Receiver<Result<String, String>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if wanted(&line) {
                let _ = tx.send(Ok(line));
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = tx.send(Err(seen));
    });
    rx
}

/// Issue 14: `nbnet bench` said nothing until the run ended. It prints its
/// header (stdout) at once and, on a terminal, a progress line (stderr)
/// every second; the summary follows at the end.
#[test]
fn a_long_run_shows_its_header_at_once_and_progress_on_a_terminal() {
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let addr = server.addr().to_string();
    let (master, slave) = pty();
    let mut child = Sandbox::new()
        .command()
        .args(["bench", "--addr", &addr, "--conns", "2", "--warmup", "0"])
        .args(["--duration", "60"])
        .stdout(Stdio::piped())
        .stderr(slave)
        .spawn()
        .expect("spawn nbnet bench");
    let stdout = child.stdout.take().unwrap();
    let header = line_matching(stdout, |_| true).recv_timeout(STARTUP_TIMEOUT);
    let progress = line_matching(master, |l| l.contains("req/s in the last second"))
        .recv_timeout(STARTUP_TIMEOUT);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let header = header
        .expect("no header on stdout while the run goes on")
        .unwrap_or_else(|seen| panic!("stdout closed without a header:\n{seen}"));
    assert!(
        header.starts_with(&format!("nbnet bench {addr}: 2 conns")) && header.contains("1m"),
        "{header:?}"
    );
    let progress = progress
        .expect("no progress line on the terminal")
        .unwrap_or_else(|seen| panic!("the terminal closed without a progress line:\n{seen}"));
    assert!(progress.contains(" of 1m: "), "{progress}");
    assert!(running, "the header and progress came only at the end");
}

/// Without a terminal (a script, a log), a run longer than a second prints
/// no progress lines: the header and the summary only.
#[test]
fn without_a_terminal_there_are_no_progress_lines() {
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let out = bench(
        &server,
        &["--conns", "2", "--warmup", "0", "--duration", "1500ms"],
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("last second"), "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("nbnet bench "), "{}", out.stdout);
    assert!(
        lines[1].trim_start().starts_with("requests"),
        "{}",
        out.stdout
    );
}
