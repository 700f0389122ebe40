//! Loads every configured plugin in a short-lived child process and reports
//! what happened, for `--check` and before the master forks its workers.
//!
//! Why a child: the master must never load plugins (a plugin's initializers
//! or threads could leave the dynamic loader locked when the master forks,
//! deadlocking workers — see `shared/notes/dependencies.md`), and a plugin
//! that crashes while loading must not take the master with it.

use std::io::{Read, Write};

use nix::sys::signal::Signal;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

use super::decision::Exit;
use crate::config::Config;
use crate::plugin::Plugin;

/// The outcome of loading every plugin once.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per plugin that loaded (kind, own name and version, file).
    pub loaded: Vec<String>,
    /// One line per problem, naming the plugin and its file.
    pub errors: Vec<String>,
}

/// Loads (and destroys) each plugin of `config` in a child process.
pub fn check_plugins(config: &Config) -> Report {
    let mut report = Report::default();
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
            // Bounded: a plugin whose init blocks must not freeze the master
            // (during a reload it would stop reaping, the watchdog, admin
            // and signals).
            let limit = config.server.plugin_timeout.max(CHECK_TIMEOUT);
            let (text, timed_out) = read_until_eof(&mut reader, limit);
            if timed_out {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            }
            let status = waitpid(child, None).ok().and_then(Exit::from_wait);
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
            match (status, loading) {
                (_, Some(what)) if timed_out => report.errors.push(format!(
                    "{what}: did not finish loading within {limit:?} (does its init block?)"
                )),
                (Some(Exit::Code(0)), None) => {}
                (status, Some(what)) => report.errors.push(format!(
                    "{what}: the plugin crashed the process while loading ({})",
                    status.map_or("unknown status".to_string(), |s| s.to_string())
                )),
                (status, None) => report.errors.push(format!(
                    "the plugin checker failed ({})",
                    status.map_or("unknown status".to_string(), |s| s.to_string())
                )),
            }
            report
        }
    }
}

/// The least time the plugin check may take before it is given up on.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the checker's report until it closes the pipe or `limit` passes;
/// `(text, timed_out)`.
fn read_until_eof(reader: &mut std::io::PipeReader, limit: std::time::Duration) -> (String, bool) {
    use std::os::fd::AsFd;
    let deadline = crate::config::deadline(std::time::Instant::now(), limit);
    let nonblocking = nix::fcntl::fcntl(
        reader.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&bytes).into_owned(), false),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && nonblocking.is_ok() => {
                if std::time::Instant::now() >= deadline {
                    return (String::from_utf8_lossy(&bytes).into_owned(), true);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (String::from_utf8_lossy(&bytes).into_owned(), false),
        }
    }
}

/// The child: report `LOADING`, then `OK` or `ERROR`, per plugin, one line each.
fn child(config: &Config, mut out: std::io::PipeWriter) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let count = config.server.worker_count() as u32;
    for spec in &config.plugins {
        let what = format!("plugin {:?} ({})", spec.name, spec.path.display());
        let _ = writeln!(out, "LOADING\t{}", one_line(&what));
        let _ = out.flush();
        let line = match Plugin::load(spec, 0, count) {
            Ok(plugin) => format!("OK\t{}", one_line(&plugin.describe())),
            Err(e) => format!("ERROR\t{}", one_line(&e.to_string())),
        };
        let _ = writeln!(out, "{line}");
    }
    0
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\t'], " ")
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
