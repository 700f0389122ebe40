//! The master's listening sockets: bound before any worker is forked (so
//! every worker inherits them), kept across reloads when their address is
//! unchanged (so no connection is refused), one per slot with `reuseport`.

use crate::config::{Config, ListenerSpec};
use crate::listener::{Endpoint, ListenSocket};

/// Binds every listener of `config` (at startup; reloads bind only new ones).
pub(super) fn bind_listeners(config: &Config) -> Result<Vec<Bound>, String> {
    let mut bound: Vec<Bound> = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        match Bound::bind(spec, config) {
            Ok(listener) => bound.push(listener),
            Err(message) => {
                // Do not leave the socket files of the ones already bound.
                for listener in bound {
                    listener.close();
                }
                return Err(message);
            }
        }
        let plugin = &config.plugins[spec.plugin].name;
        tracing::info!("listening on {} (plugin {plugin:?})", spec.addr);
    }
    Ok(bound)
}

/// One listener's sockets in the master: one shared by every worker, or
/// with `reuseport` one per worker slot (bound as slots appear).
pub(super) struct Bound {
    pub(super) addr: Endpoint,
    pub(super) reuseport: bool,
    pub(super) sockets: Vec<ListenSocket>,
}

impl Bound {
    /// Binds the listener's (first) socket.
    pub(super) fn bind(spec: &ListenerSpec, config: &Config) -> Result<Bound, String> {
        let socket = match &spec.addr {
            Endpoint::Tcp(addr) => ListenSocket::bind_tcp(*addr, spec.reuseport),
            Endpoint::Unix(path) => ListenSocket::bind_unix(path, spec.mode),
        }
        .map_err(|e| {
            format!(
                "cannot listen on {} ({}:{}): {e}",
                spec.addr,
                config.file.display(),
                spec.line
            )
        })?;
        Ok(Bound {
            addr: spec.addr.clone(),
            reuseport: spec.reuseport,
            sockets: vec![socket],
        })
    }

    /// Makes sure slot `index` has its socket (reuseport binds one more).
    pub(super) fn prepare(&mut self, index: usize) -> std::io::Result<()> {
        if let (true, Endpoint::Tcp(addr)) = (self.reuseport, &self.addr) {
            while self.sockets.len() <= index {
                self.sockets.push(ListenSocket::bind_tcp(*addr, true)?);
            }
        }
        Ok(())
    }

    /// In a new worker: the socket of slot `index` (the others are dropped
    /// with the master's memory image when the worker exits).
    pub(super) fn take_for(&mut self, index: usize) -> Option<ListenSocket> {
        let at = if self.reuseport { index } else { 0 };
        (at < self.sockets.len()).then(|| self.sockets.swap_remove(at))
    }

    /// Keeps the sockets of the first `slots` slots (reuseport); a removed
    /// slot's socket closes, so the kernel stops routing connections to it.
    pub(super) fn truncate(&mut self, slots: usize) {
        if self.reuseport {
            self.sockets.truncate(slots.max(1));
        }
    }

    /// Closes the listener for good: a Unix socket's file is removed.
    pub(super) fn close(self) {
        if let Endpoint::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}
