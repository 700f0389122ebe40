//! A worker process: loads its plugins after fork, then serves every
//! listener from its own reactor until told to stop.
//!
//! # Brief overview
//!
//! - [`run`] is the worker's `main`: it ties its life to the master's, takes
//!   its stop signals, loads the plugins, builds the [`reactor::Reactor`].
//! - [`reactor`] is the event loop; [`conn`] is one connection's state
//!   machine; [`deadlines`] orders connections for the read timeout.

mod budget;
pub mod conn;
mod control;
pub mod deadlines;
pub mod deferred;
pub mod reactor;
pub mod tls;

use std::os::fd::AsRawFd;

use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid, Pid};

use crate::config::Config;
use crate::exit_code;
use crate::plugin::Plugin;
use crate::scoreboard::Slot;
use crate::signals::Signals;
use reactor::{Limits, Listener, Reactor};

/// Who this worker is.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// Index `0 .. count`, stable across restarts of the same slot.
    pub index: usize,
    /// Number of workers.
    pub count: usize,
    /// The master's PID (this process's parent).
    pub master: Pid,
}

/// The worker's `main`, called in the child right after fork. Returns the
/// process exit code: [`exit_code::OK`] after a stop signal,
/// [`exit_code::PLUGIN_LOAD_FAILED`] if a plugin cannot load (the master then
/// halts instead of restarting), [`exit_code::FAILURE`] otherwise.
pub fn run(
    config: &Config,
    sockets: Vec<crate::listener::ListenSocket>,
    who: Identity,
    slot: &'static Slot,
    control: Option<std::os::fd::OwnedFd>,
) -> i32 {
    slot.reset();
    let span = tracing::info_span!("worker", index = who.index, pid = getpid().as_raw());
    let _entered = span.enter();

    // Plugins never run as root unless the operator says so: drop to
    // [server] user first (a change of user clears the parent-death signal).
    if let Err(why) = crate::privileges::drop_for_plugins(config.server.run_as.as_ref()) {
        tracing::error!("{why}");
        return exit_code::FAILURE;
    }
    // No worker outlives its master: the kernel kills us when it dies. The
    // master may already have died between fork and here; then stop at once.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        tracing::error!("cannot set the parent-death signal: {e}");
        return exit_code::FAILURE;
    }
    if getppid() != who.master {
        return exit_code::FAILURE;
    }
    // Its own process group: whatever its plugins start stays in it, and
    // the master kills the group when the worker is gone (see
    // `supervisor::sweep_group`), so nothing a plugin forked outlives it.
    if let Err(e) = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)) {
        tracing::warn!(
            "cannot start a process group: {e}; processes plugins fork may outlive this worker"
        );
    }
    // A crash in a plugin ends this worker by its signal; a stack overflow
    // names this worker, not the master (see there).
    crate::signals::catch_plugin_faults(crate::signals::Faulting::Worker(who.index));
    // The worker's descriptors are closed in any child a plugin forks.
    crate::fork_guard::install();
    for socket in &sockets {
        crate::fork_guard::protect(socket.as_raw_fd());
    }
    for spec in &config.plugins {
        if let Some(image) = &spec.image {
            crate::fork_guard::protect(image.as_raw_fd());
        }
    }

    let signals = match Signals::catch(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot set up signal handling: {e}");
            return exit_code::FAILURE;
        }
    };
    crate::fork_guard::protect(signals.raw_fd());

    let mut plugins = Vec::with_capacity(config.plugins.len());
    // The worker's descriptors as they are before any plugin code runs.
    let descriptors = crate::fork_guard::snapshot();
    for (index, spec) in config.plugins.iter().enumerate() {
        // Tracked like every plugin call: a crash or hang in init is
        // attributed to the plugin too.
        let loaded = slot.track(index, || {
            Plugin::load(spec, who.index as u32, who.count as u32)
        });
        // An init that closed the worker's own descriptors (a "close every
        // fd" loop, say) leaves a worker that cannot serve: name the plugin
        // now rather than fail obscurely later.
        let tampered = loaded
            .as_ref()
            .ok()
            .and_then(|_| descriptors.first_tampered());
        match loaded {
            Ok(plugin) if tampered.is_some() => {
                let what = tampered.map_or(String::new(), |t| t.to_string());
                tracing::error!(
                    "{}: its init {what}, which belongs to the worker (a standard descriptor, a listening socket, or the worker's signal, control or plugin descriptor); a plugin must close or replace only descriptors it opened",
                    plugin.describe()
                );
                slot.set_load_failed(index);
                // Its descriptors are gone already: closing them again
                // would abort (std checks), so they are not dropped.
                std::mem::forget(sockets);
                std::mem::forget(signals);
                std::mem::forget(plugin);
                return exit_code::PLUGIN_LOAD_FAILED;
            }
            Ok(plugin) => {
                tracing::debug!("{}", plugin.describe());
                plugins.push(plugin);
            }
            Err(e) => {
                tracing::error!(plugin = %spec.name, "{e}");
                // Through the scoreboard, not the exit status: see `Slot::boot`.
                slot.set_load_failed(index);
                return exit_code::PLUGIN_LOAD_FAILED;
            }
        }
    }

    // Every plugin image is loaded (through /proc/self/fd, which is why a
    // worker that changed its user made itself dumpable again): from now
    // on no other process of that user may inspect this one — its memory
    // holds TLS keys the user cannot read from disk.
    let dropped = config
        .server
        .run_as
        .as_ref()
        .is_some_and(|run_as| nix::unistd::getuid().as_raw() == run_as.uid);
    if dropped {
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!("cannot make the worker non-dumpable: {e}; other processes of its user may read its memory");
        }
    }

    let listeners = sockets
        .into_iter()
        .zip(&config.listeners)
        .map(|(socket, spec)| Listener {
            socket: Some(socket),
            addr: spec.addr.clone(),
            plugin: spec.plugin,
            proxy_protocol: spec.proxy_protocol,
            access: spec.access.clone(),
            tls: spec.tls.as_ref().map(|tls| tls.config.clone()),
            addr_text: std::ffi::CString::new(spec.addr.to_string()).unwrap_or_default(),
            stats: None,
        })
        .collect();
    let limits = Limits {
        read_timeout: config.server.read_timeout,
        max_frame_bytes: config.server.max_frame_bytes,
        max_connections: config.server.max_connections,
        shutdown_timeout: config.server.shutdown_timeout,
        retire_after: retire_after(config, getpid().as_raw() as u64),
        max_pending_output_bytes: config.server.max_pending_output_bytes,
        time_plugin_calls: config.admin.is_some(),
        max_buffered_bytes: config.server.max_buffered_bytes,
        max_deferred_per_connection: config.server.max_deferred_per_connection,
        max_deferred_per_worker: config.server.max_deferred_per_worker,
        deferred_timeout: config.server.deferred_timeout,
    };
    let reactor = match Reactor::new(signals, listeners, plugins, limits, slot, control) {
        Ok(reactor) => reactor,
        Err(e) => {
            tracing::error!("cannot start the event loop: {e}");
            return exit_code::FAILURE;
        }
    };
    // Tell the master this worker serves: during a reload or a replacement
    // it drains the worker this one replaces only now.
    slot.set_ready();
    tracing::debug!("serving");
    match reactor.run() {
        // Connections are closed (the reactor is gone); now the plugins'
        // destroy hooks run.
        Ok(plugins) => {
            // Each destroy is a plugin call too: the watchdog sees one
            // that hangs (and names it).
            for (index, plugin) in plugins.into_iter().enumerate() {
                slot.track(index, || drop(plugin));
            }
            exit_code::OK
        }
        Err(e) => {
            tracing::error!("event loop failed: {e}");
            exit_code::FAILURE
        }
    }
}

/// The request count after which this worker asks to be replaced (see
/// [`crate::config::ServerConfig::retire_after`]: it cannot overflow).
fn retire_after(config: &Config, seed: u64) -> Option<u64> {
    config.server.retire_after(seed)
}
