//! `nbnet reload` and `nbnet stop`: find the running master through the
//! config's `pid_file` and signal it, as `nginx -s reload|quit` does; then
//! wait for the outcome (`reload`, through the reload status file) or the
//! exit (`stop`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config;
use crate::exit_code;
use crate::reload_status;
use crate::{errln, outln};
use nbnet_plugin_api::abi::{ABI_MAJOR, ABI_MINOR};

/// `nbnet --version`: the version and the plugin ABIs this build loads.
pub fn version_line() -> String {
    format!(
        "nbnet {} (plugin ABI {ABI_MAJOR}.{ABI_MINOR}: loads C and Rust plugins built for ABI {ABI_MAJOR}.0 through {ABI_MAJOR}.{ABI_MINOR}; Rust plugins built against nbnet-plugin-api {})",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION"),
    )
}

/// `nbnet reload`: SIGHUP to the master, after checking the config here
/// (the master would refuse an invalid one too, but this says why at once),
/// then wait for the outcome of the reload that covers this request (see
/// [`reload_status`]): exit 0 once the new config serves; otherwise print
/// the master's reason and exit non-zero (3 invalid config, 4 a plugin
/// failed, 1 anything else).
pub fn reload(config_file: &Path) -> i32 {
    let config = match config::load(config_file) {
        Ok(config) => config,
        Err(e) => {
            errln!("nbnet reload: not reloading, the config is invalid:\n{e}");
            return exit_code::CONFIG_INVALID;
        }
    };
    let (pid, pid_file) = match master_pid(config_file) {
        Ok(found) => found,
        Err(message) => {
            errln!("nbnet reload: {message}");
            return exit_code::FAILURE;
        }
    };
    let status_path = reload_status::path_for(&pid_file);
    let reports = matches!(
        reload_status::read(&status_path),
        Ok(Some(status)) if status.master == pid.as_raw()
    );
    let sent = reload_status::monotonic_ns();
    if let Err(message) = send(pid, Signal::SIGHUP, &pid_file) {
        errln!("nbnet reload: {message}");
        return exit_code::FAILURE;
    }
    if !reports {
        outln!(
            "reload requested (SIGHUP to master {pid}); it does not report outcomes ({} is missing: an older nbnet?), so its log says whether the new config was taken",
            status_path.display()
        );
        return exit_code::OK;
    }
    let limit = crate::supervisor::reload_outcome_within(&config);
    let deadline = config::deadline(Instant::now(), limit);
    let mut said_queued = false;
    loop {
        if let Ok(Some(status)) = reload_status::read(&status_path) {
            // (After a binary upgrade, the new master's file carries the
            // old one's records.)
            if let Some(record) = status
                .covering(sent)
                .filter(|_| status.master == pid.as_raw() || status.took_over_from == pid.as_raw())
            {
                if let (Some(why), false) = (&record.queued, said_queued) {
                    outln!("reload {} queued: {why}", record.id);
                    said_queued = true;
                }
                if record.state.is_final() {
                    return outcome(pid, record);
                }
            }
        }
        if kill(pid, None) == Err(Errno::ESRCH) || crate::orphans::is_zombie(pid) {
            errln!("nbnet reload: master {pid} exited before the reload finished");
            return exit_code::FAILURE;
        }
        if Instant::now() >= deadline {
            errln!(
                "nbnet reload: no outcome from master {pid} within {limit:?}; the reload may still finish: the master's log says how it went"
            );
            return exit_code::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prints how reload `record` ended; its exit status.
fn outcome(pid: Pid, record: &reload_status::Record) -> i32 {
    if record.state == reload_status::State::Done {
        outln!("reload {} (master {pid}): {}", record.id, record.message);
        return exit_code::OK;
    }
    errln!(
        "nbnet reload: {} (reload {}, master {pid}): {}",
        record.state.describe(),
        record.id,
        record.message
    );
    if record.code == exit_code::OK {
        exit_code::FAILURE
    } else {
        record.code
    }
}

/// `nbnet upgrade`: SIGUSR2 to the master, then follow the upgrade through
/// the upgrade status file (see [`crate::upgrade_status`]) until the new
/// master serves and the old one has exited (exit 0), or the old master
/// reports a rollback or a refusal (exit 1, its reason printed).
pub fn upgrade(config_file: &Path) -> i32 {
    use crate::upgrade_status::State;
    let (pid, pid_file) = match master_pid(config_file) {
        Ok(found) => found,
        Err(message) => {
            errln!("nbnet upgrade: {message}");
            return exit_code::FAILURE;
        }
    };
    // How long the old master may take: the new one gets twice a reload's
    // time to be ready, then the old one drains.
    let config = config::load(config_file).ok();
    let ready = config.as_ref().map_or(Duration::from_secs(120), |c| {
        crate::supervisor::reload_outcome_within(c).saturating_mul(2)
    });
    let drain = config.as_ref().map_or(Duration::from_secs(30), |c| {
        c.server
            .shutdown_timeout
            .saturating_add(Duration::from_secs(10))
    });
    let status_path = crate::upgrade_status::path_for(&pid_file);
    let reports = matches!(
        crate::upgrade_status::read(&status_path),
        Ok(Some(status)) if status.master == pid.as_raw()
    );
    if !reports {
        errln!(
            "nbnet upgrade: master {pid} does not report upgrades ({} is missing or not its own): an nbnet older than `nbnet upgrade`, which would ignore SIGUSR2; nothing sent. Restart it instead (under systemd with socket activation to refuse nothing)",
            status_path.display()
        );
        return exit_code::FAILURE;
    }
    let sent = reload_status::monotonic_ns();
    if let Err(message) = send(pid, Signal::SIGUSR2, &pid_file) {
        errln!("nbnet upgrade: {message}");
        return exit_code::FAILURE;
    }
    let deadline = config::deadline(Instant::now(), ready);
    let status = loop {
        if let Ok(Some(status)) = crate::upgrade_status::read(&status_path) {
            if status.master == pid.as_raw() && status.started_ns > sent && status.state.is_final()
            {
                break status;
            }
            // Refused while another upgrade was under way (which keeps its
            // own state for whoever follows it).
            if status.master == pid.as_raw()
                && status.refused_ns > sent
                && status.started_ns <= sent
            {
                break crate::upgrade_status::Status {
                    state: State::Refused,
                    message: status.refused.clone(),
                    ..status
                };
            }
            // The new master took the files over: it names this master.
            if status.took_over_from == pid.as_raw() {
                break crate::upgrade_status::Status {
                    state: State::Done,
                    message: format!(
                        "new master pid {} ({}) serves",
                        status.master, status.message
                    ),
                    ..status
                };
            }
        }
        if kill(pid, None) == Err(Errno::ESRCH) || crate::orphans::is_zombie(pid) {
            errln!("nbnet upgrade: master {pid} exited before the upgrade finished");
            return exit_code::FAILURE;
        }
        if Instant::now() >= deadline {
            errln!(
                "nbnet upgrade: no outcome from master {pid} within {ready:?} ({} did not say; an older nbnet that cannot upgrade?): its log says what happened",
                status_path.display()
            );
            return exit_code::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    match status.state {
        State::Done => {}
        State::Refused => {
            errln!("nbnet upgrade: refused by master {pid}: {}", status.message);
            return exit_code::FAILURE;
        }
        State::Cancelled => {
            errln!("nbnet upgrade: cancelled: {}", status.message);
            return exit_code::FAILURE;
        }
        _ => {
            errln!(
                "nbnet upgrade: rolled back: {}; master {pid} serves on",
                status.message
            );
            return exit_code::FAILURE;
        }
    }
    outln!(
        "upgrade: {} (from {}); the old master {pid} is handing its connections over",
        status.message,
        status.binary
    );
    // Done once the old master has handed everything over and exited.
    let deadline = config::deadline(Instant::now(), drain);
    while Instant::now() < deadline {
        if kill(pid, None) == Err(Errno::ESRCH) || crate::orphans::is_zombie(pid) {
            outln!("upgrade complete: the old master {pid} has exited");
            return exit_code::OK;
        }
        // The new master died during the hand-over: the old one serves again.
        if let Ok(Some(now)) = crate::upgrade_status::read(&status_path) {
            if now.master == pid.as_raw() && now.state == State::RolledBack {
                errln!("nbnet upgrade: rolled back: {}", now.message);
                return exit_code::FAILURE;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    errln!(
        "nbnet upgrade: the new master serves, but the old master {pid} is still running after {drain:?} (its workers are still draining?)"
    );
    exit_code::FAILURE
}

/// `nbnet stop [--fast]`: SIGTERM (or SIGINT) to the master, then wait
/// until it has exited.
pub fn stop(config_file: &Path, fast: bool, strict: bool) -> i32 {
    let signal = if fast {
        Signal::SIGINT
    } else {
        Signal::SIGTERM
    };
    // The running master's shutdown_timeout may differ from the file's (or
    // the file may no longer parse): wait for the default or the file's.
    let wait = config::load(config_file)
        .map_or(Duration::from_secs(30), |c| {
            c.server
                .shutdown_timeout
                .saturating_add(c.server.drain_delay)
        })
        .saturating_add(Duration::from_secs(10));
    // Not running is what `stop` wants (the init-script convention, LSB
    // "stop" on a stopped service): exit 0 and say so, unless --strict.
    let not_running = |file: &Path| {
        outln!(
            "nbnet is not running (no master holds {}): nothing to stop",
            file.display()
        );
        exit_code::OK
    };
    let (pid, file) = match master_pid(config_file) {
        Ok(found) => found,
        Err(message) => {
            match pid_file_path(config_file) {
                Ok(Some(file)) if !strict && crate::pid_file::nobody_holds(&file) => {
                    return not_running(&file)
                }
                _ => {}
            }
            errln!("nbnet stop: {message}");
            return exit_code::FAILURE;
        }
    };
    if let Err(message) = send(pid, signal, &file) {
        if !strict && kill(pid, None) == Err(Errno::ESRCH) {
            return not_running(&file);
        }
        errln!("nbnet stop: {message}");
        return exit_code::FAILURE;
    }
    let deadline = config::deadline(Instant::now(), wait);
    while Instant::now() < deadline {
        if kill(pid, None) == Err(Errno::ESRCH) || crate::orphans::is_zombie(pid) {
            outln!("stopped (master {pid})");
            return exit_code::OK;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    errln!("nbnet stop: master {pid} is still running after {wait:?}");
    exit_code::FAILURE
}

/// The master's PID from the config's `pid_file`, with errors that say
/// what to do.
///
/// Only `[server] pid_file` is read, so `nbnet stop` works even when the
/// config has been edited into an invalid state since the server started.
/// The PID is returned only if that process holds the file's lock (see
/// [`crate::pid_file`]).
fn master_pid(config_file: &Path) -> Result<(Pid, PathBuf), String> {
    let text = config::read_text(config_file)
        .map_err(|(_, message)| format!("{}: {message}", crate::config::shown(config_file)))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        format!(
            "{} is not valid TOML ({}); cannot find its pid_file",
            crate::config::shown(config_file),
            config::bounded(e.message().trim(), 2 * config::QUOTE_CHARS)
        )
    })?;
    let pid_file = table
        .get("server")
        .and_then(|server| server.get("pid_file"))
        .and_then(|value| value.as_str());
    let Some(pid_file) = pid_file else {
        return Err(format!(
            "{} has no [server] pid_file, so the running master cannot be found; add e.g. pid_file = \"nbnet.pid\" and restart nbnet",
            crate::config::shown(config_file)
        ));
    };
    let base = config_file.parent().unwrap_or(Path::new("."));
    let file = std::path::absolute(base.join(pid_file)).unwrap_or_else(|_| base.join(pid_file));
    // Only the process that holds the file's lock (the master that wrote
    // it) is ever signalled: a stale file may name an unrelated process.
    let pid = crate::pid_file::holder(&file, config_file)?;
    Ok((Pid::from_raw(pid), file))
}

/// The config's `[server] pid_file`, absolute; `Ok(None)` when it has none.
fn pid_file_path(config_file: &Path) -> Result<Option<PathBuf>, String> {
    let text = config::read_text(config_file)
        .map_err(|(_, message)| format!("{}: {message}", crate::config::shown(config_file)))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| e.message().to_string())?;
    let Some(pid_file) = table
        .get("server")
        .and_then(|server| server.get("pid_file"))
        .and_then(|value| value.as_str())
    else {
        return Ok(None);
    };
    let base = config_file.parent().unwrap_or(Path::new("."));
    Ok(Some(
        std::path::absolute(base.join(pid_file)).unwrap_or_else(|_| base.join(pid_file)),
    ))
}

fn send(pid: Pid, signal: Signal, file: &Path) -> Result<(), String> {
    kill(pid, signal).map_err(|e| match e {
        Errno::ESRCH => format!(
            "no process {pid} (from {}): nbnet is not running; the PID file is stale",
            file.display()
        ),
        e => format!("cannot signal process {pid} (from {}): {e}", file.display()),
    })
}
