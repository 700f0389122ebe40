//! Loads every configured plugin in a short-lived child process and reports
//! what happened, for `--check` and before the master forks its workers.
//!
//! Why a child: the master must never load plugins (a plugin's initializers
//! or threads could leave the dynamic loader locked when the master forks,
//! deadlocking workers — see `shared/notes/dependencies.md`), and a plugin
//! that crashes while loading must not take the master with it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult};

use super::decision::Exit;
use crate::config::Config;
use crate::plugin::{image, Plugin};

/// The outcome of loading every plugin once.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per plugin that loaded (kind, own name and version, file).
    pub loaded: Vec<String>,
    /// One line per problem, naming the plugin and its file.
    pub errors: Vec<String>,
}

/// Takes an image of each plugin file of `config` (see
/// [`crate::plugin::image`]: what the workers of this config will load),
/// then loads (and destroys) each plugin in a child process.
pub fn check_plugins(config: &mut Config) -> Report {
    let mut report = Report {
        errors: image::snapshot_all(config),
        ..Report::default()
    };
    let (mut reader, writer) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            report
                .errors
                .push(format!("cannot create a pipe to check plugins: {e}"));
            return report;
        }
    };
    // SAFETY: the master is single-threaded (it starts no threads and loads
    // no plugins), so the child may allocate and run arbitrary code.
    match unsafe { fork() } {
        Err(e) => {
            report
                .errors
                .push(format!("cannot fork to check plugins: {e}"));
            report
        }
        Ok(ForkResult::Child) => {
            drop(reader);
            let code = child(config, writer);
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(writer);
            let limit = config.server.init_timeout;
            let (text, outcome) = watch(child, &mut reader, limit);
            // Whatever the plugins started in the child's process group
            // goes with it (a daemon forked in init, say).
            super::sweep_group(child);
            let mut loading: Option<&str> = None;
            for line in text.lines() {
                match line.split_once('\t') {
                    Some(("LOADING", what)) => loading = Some(what),
                    Some(("OK", what)) => {
                        loading = None;
                        report.loaded.push(what.to_string());
                    }
                    Some(("ERROR", what)) => {
                        loading = None;
                        report.errors.push(what.to_string());
                    }
                    _ => {}
                }
            }
            match (outcome, loading) {
                (Outcome::TimedOut, Some(what)) => report.errors.push(format!(
                    "{what}: did not finish loading within init_timeout = {limit:?} (does its init block? raise [server] init_timeout if it legitimately takes longer)"
                )),
                (Outcome::Exited(Exit::Code(0)), None) => {}
                (Outcome::Exited(Exit::Code(DESCRIPTORS_CLOSED)), Some(what)) => {
                    report.errors.push(format!(
                        "{what}: its init closed file descriptors it did not open (the host's); a plugin must close only descriptors it opened itself"
                    ))
                }
                (Outcome::Exited(exit), Some(what)) => report.errors.push(format!(
                    "{what}: ended the process while loading: {}",
                    exit.inside_plugin()
                )),
                (outcome, None) => report
                    .errors
                    .push(format!("the plugin checker failed ({outcome})")),
                (Outcome::Lost, Some(what)) => report.errors.push(format!(
                    "{what}: the plugin checker failed ({})",
                    Outcome::Lost
                )),
            }
            report
        }
    }
}

/// How the checker child ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Exited(Exit),
    /// No report line for longer than the limit: killed.
    TimedOut,
    /// `waitpid` failed.
    Lost,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(exit) => write!(f, "{exit}"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Lost => f.write_str("its status could not be read"),
        }
    }
}

/// Collects the checker's report until the checker exits, killing it when
/// it says nothing for `limit` (each plugin gets `limit` to load).
///
/// Ends when the *child* ends, not at end-of-file: a plugin that forked a
/// long-lived process in init could keep a copy of the pipe open forever.
fn watch(
    child: nix::unistd::Pid,
    reader: &mut std::io::PipeReader,
    limit: std::time::Duration,
) -> (String, Outcome) {
    use std::os::fd::AsFd;
    let _ = nix::fcntl::fcntl(
        reader.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut deadline = crate::config::deadline(std::time::Instant::now(), limit);
    let mut killed = false;
    loop {
        // Everything written so far (the child may be gone already).
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    bytes.extend_from_slice(&chunk[..n]);
                    // Progress: the next plugin gets its own `limit`. (The
                    // report is a few lines per plugin; a flood is cut.)
                    deadline = crate::config::deadline(std::time::Instant::now(), limit);
                    bytes.truncate(MAX_REPORT_BYTES);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                if let Some(exit) = Exit::from_wait(status) {
                    // Whatever it wrote just before exiting.
                    while let Ok(n @ 1..) = reader.read(&mut chunk) {
                        bytes.extend_from_slice(&chunk[..n]);
                        bytes.truncate(MAX_REPORT_BYTES);
                    }
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    let outcome = if killed {
                        Outcome::TimedOut
                    } else {
                        Outcome::Exited(exit)
                    };
                    return (text, outcome);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return (String::from_utf8_lossy(&bytes).into_owned(), Outcome::Lost),
        }
        if !killed && std::time::Instant::now() >= deadline {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            killed = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The most report text kept from the checker.
const MAX_REPORT_BYTES: usize = 1 << 20;

/// The child: report `LOADING`, then `OK` or `ERROR`, per plugin, one line each.
fn child(config: &Config, mut out: std::io::PipeWriter) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Its own process group, swept by the master afterwards.
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    // Only the report pipe and the plugin images are this process's
    // business: the master's listeners, admin socket and signalfd must not
    // reach anything a plugin forks here.
    let mut keep: Vec<RawFd> = vec![0, 1, 2, out.as_raw_fd()];
    keep.extend(
        config
            .plugins
            .iter()
            .filter_map(|p| p.image.as_ref())
            .map(|i| i.as_raw_fd()),
    );
    close_all_but(&keep);
    crate::fork_guard::install();
    for &fd in &keep[3..] {
        crate::fork_guard::protect(fd);
    }
    let count = config.server.worker_count() as u32;
    for spec in &config.plugins {
        if spec.image.is_none() {
            // Its file could not be read: already reported.
            continue;
        }
        let what = format!("plugin {:?} ({})", spec.name, spec.path.display());
        let _ = writeln!(out, "LOADING\t{}", one_line(&what));
        let _ = out.flush();
        let line = match Plugin::load(spec, 0, count) {
            Ok(plugin) => format!("OK\t{}", one_line(&plugin.describe())),
            Err(e) => format!("ERROR\t{}", one_line(&e.to_string())),
        };
        if crate::fork_guard::first_closed().is_some() {
            // The report pipe may be gone with them: say it by exit status
            // (and do not close it again: std aborts on a double close).
            std::mem::forget(out);
            return DESCRIPTORS_CLOSED;
        }
        let _ = writeln!(out, "{line}");
    }
    0
}

/// The checker's exit status when a plugin's init closed the checker's
/// own descriptors (its report pipe among them).
const DESCRIPTORS_CLOSED: i32 = 75;

/// Closes every descriptor of this process but `keep`.
fn close_all_but(keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if !keep.contains(&fd) {
            // SAFETY: this fresh child owns no Rust object for these
            // descriptors except the listing's own, already dropped (a
            // failed close of it is harmless).
            unsafe { libc::close(fd) };
        }
    }
}

fn one_line(text: &str) -> String {
    crate::logging::untrusted(text).replace('\t', " ")
}

/// What `--check` finds out by trying each listener's address (without
/// keeping it): problems that would stop the server, and warnings.
#[derive(Debug, Default)]
pub struct AddressReport {
    /// Addresses the server could not listen on.
    pub errors: Vec<String>,
    /// Addresses in use (fine if that is this nbnet, already running).
    pub warnings: Vec<String>,
}

/// Tries to bind every TCP listener (and checks every Unix listener's path)
/// of `config`, releasing each at once. An address in use is only a warning:
/// `--check` is often run while the server is up.
pub fn probe_listeners(config: &Config) -> AddressReport {
    use crate::listener::{Endpoint, ListenSocket};
    let mut report = AddressReport::default();
    for spec in &config.listeners {
        let place = format!("{}:{}", config.file.display(), spec.line);
        match &spec.addr {
            Endpoint::Tcp(addr) => match ListenSocket::bind_tcp(*addr, spec.reuseport) {
                Ok(socket) => drop(socket),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.warnings.push(format!(
                    "listener {addr} ({place}): address in use (expected if this nbnet is already running)"
                )),
                Err(e) => report
                    .errors
                    .push(format!("listener {addr} ({place}): cannot listen: {e}")),
            },
            Endpoint::Unix(path) => {
                let folder = path.parent().unwrap_or(std::path::Path::new("/"));
                if !folder.is_dir() {
                    report.errors.push(format!(
                        "listener {} ({place}): folder {} does not exist",
                        spec.addr,
                        folder.display()
                    ));
                } else if path.exists() && !is_socket(path) {
                    report.errors.push(format!(
                        "listener {} ({place}): the path exists and is not a socket",
                        spec.addr
                    ));
                }
            }
        }
    }
    report
}

fn is_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
