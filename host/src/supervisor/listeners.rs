//! The master's listening sockets: bound before any worker is forked (so
//! every worker inherits them), kept across reloads when their address is
//! unchanged (so no connection is refused), one per slot with `reuseport`.

use std::os::fd::OwnedFd;

use crate::config::{Config, ListenerSpec};
use crate::listener::{Endpoint, ListenSocket};

/// Listening sockets this process was given when it started — by systemd
/// (socket activation), or by the master of an older nbnet binary during
/// an upgrade — by the address each is bound to. A listener of the config
/// with that address uses the socket instead of binding a new one, so no
/// connection waiting in its backlog is lost.
#[derive(Default)]
pub(super) struct Inherited(Vec<(Endpoint, ListenSocket, bool)>);

/// `LISTEN_FDNAMES` name of a socket an old master passes during a binary
/// upgrade that the new master owns from then on (it removes a Unix
/// socket's file when it stops).
pub(super) const HANDED_ON: &str = "nbnet-owned";
/// … and of one the old master had itself inherited (from systemd, say):
/// its file is not nbnet's to remove.
pub(super) const NOT_OURS: &str = "nbnet-inherited";

impl Inherited {
    /// Takes what `$LISTEN_FDS` passed (see [`crate::systemd`]).
    pub(super) fn take() -> Inherited {
        let mut inherited = Vec::new();
        for (name, fd) in crate::systemd::take_listen_fds() {
            match listening_socket(fd) {
                Ok((addr, socket)) => {
                    tracing::info!("using the inherited listening socket {addr}");
                    inherited.push((addr, socket, name == HANDED_ON));
                }
                Err(why) => tracing::warn!(
                    "inherited descriptor {name:?} is not usable as a listener ({why}): closed"
                ),
            }
        }
        Inherited(inherited)
    }

    /// The inherited socket bound to `addr`, if any.
    fn claim(&mut self, addr: &Endpoint) -> Option<ListenSocket> {
        self.claim_owned(addr).map(|(socket, _)| socket)
    }

    /// … and whether its file is ours to remove (see [`HANDED_ON`]).
    fn claim_owned(&mut self, addr: &Endpoint) -> Option<(ListenSocket, bool)> {
        let at = self.0.iter().position(|(a, _, _)| a == addr)?;
        let (_, socket, owned) = self.0.remove(at);
        Some((socket, owned))
    }

    /// Every further inherited socket bound to `addr` (an old master's
    /// `reuseport` listener passes one per worker slot), in order.
    fn claim_rest(&mut self, addr: &Endpoint) -> Vec<ListenSocket> {
        let mut rest = Vec::new();
        while let Some(socket) = self.claim(addr) {
            rest.push(socket);
        }
        rest
    }

    /// The inherited TCP socket bound to `addr` (the `[admin]` one an old
    /// master passes).
    pub(super) fn claim_tcp(
        &mut self,
        addr: std::net::SocketAddr,
    ) -> Result<Option<mio::net::TcpListener>, ()> {
        match self.claim(&Endpoint::Tcp(addr)) {
            Some(ListenSocket::Tcp(listener)) => Ok(Some(listener)),
            Some(_) => Err(()),
            None => Ok(None),
        }
    }

    /// Closes the inherited sockets no listener of the config uses.
    pub(super) fn close_unused(&mut self) {
        for (addr, _, _) in self.0.drain(..) {
            tracing::warn!("inherited listening socket {addr} is not in the config: closed");
        }
    }
}

/// What a passed descriptor is: a listening TCP or Unix stream socket, and
/// the address it is bound to.
fn listening_socket(fd: OwnedFd) -> Result<(Endpoint, ListenSocket), String> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrLike, SockaddrStorage};
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(|e| e.to_string())?;
    if !listening {
        return Err("not a listening socket".into());
    }
    let addr: SockaddrStorage =
        getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(|e| e.to_string())?;
    if let Some(v4) = addr.as_sockaddr_in() {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = std::net::SocketAddr::V4((*v4).into());
        return Ok((
            Endpoint::Tcp(addr),
            ListenSocket::Tcp(mio::net::TcpListener::from_std(listener)),
        ));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = std::net::SocketAddr::V6((*v6).into());
        return Ok((
            Endpoint::Tcp(addr),
            ListenSocket::Tcp(mio::net::TcpListener::from_std(listener)),
        ));
    }
    if let Some(path) = addr.as_unix_addr().and_then(|u| u.path()) {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        return Ok((
            Endpoint::Unix(path.to_path_buf()),
            ListenSocket::Unix(mio::net::UnixListener::from_std(listener)),
        ));
    }
    Err(format!("an address of family {:?}", addr.family()))
}

/// Binds every listener of `config` (at startup; reloads bind only new
/// ones), taking inherited sockets where their address matches.
pub(super) fn bind_listeners(
    config: &Config,
    inherited: &mut Inherited,
) -> Result<Vec<Bound>, String> {
    let mut bound: Vec<Bound> = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        match Bound::bind(spec, config, inherited) {
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
    /// Who removes a Unix socket's file when the listener closes.
    pub(super) owner: Owner,
}

/// Who a listening socket's file (a Unix socket's) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// This master bound it: it removes the file when the listener closes.
    Ours,
    /// Someone else bound it (systemd): never removed by nbnet.
    NotOurs,
    /// Passed by the old master of a binary upgrade: the old master still
    /// serves with it, so this one removes it only once it has taken the
    /// service over ([`Bound::take_ownership`]) — a new master rolled back
    /// must not remove the file the old one serves on.
    OursOnceServing,
}

impl Bound {
    /// Binds the listener's (first) socket.
    pub(super) fn bind(
        spec: &ListenerSpec,
        config: &Config,
        inherited: &mut Inherited,
    ) -> Result<Bound, String> {
        if let Some((socket, handed_on)) = inherited.claim_owned(&spec.addr) {
            let place = || format!("{}:{}", config.file.display(), spec.line);
            // A passed socket keeps how it was bound: a reuseport change
            // needs a restart (as a reload says), a mode is applied.
            if let ListenSocket::Tcp(listener) = &socket {
                let bound_with =
                    nix::sys::socket::getsockopt(listener, nix::sys::socket::sockopt::ReusePort)
                        .unwrap_or(false);
                if bound_with != spec.reuseport {
                    return Err(format!(
                        "listener {} ({}): the listening socket passed to this process was bound with reuseport = {bound_with}, the config says {}; changing it needs a restart (nbnet stop, then start)",
                        spec.addr,
                        place(),
                        spec.reuseport
                    ));
                }
            }
            if let (Endpoint::Unix(path), Some(mode)) = (&spec.addr, spec.mode) {
                use std::os::unix::fs::PermissionsExt;
                if let Err(e) =
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                {
                    tracing::warn!("listener {} ({}): cannot apply mode {mode:o} to the passed socket's file: {e}", spec.addr, place());
                }
            }
            let mut sockets = vec![socket];
            if spec.reuseport {
                sockets.extend(inherited.claim_rest(&spec.addr));
            }
            return Ok(Bound {
                addr: spec.addr.clone(),
                reuseport: spec.reuseport,
                sockets,
                owner: if handed_on {
                    Owner::OursOnceServing
                } else {
                    Owner::NotOurs
                },
            });
        }
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
        // A Unix socket's file belongs to the user the workers run as, so
        // that `mode` grants what it says to that user and group.
        if let Endpoint::Unix(path) = &spec.addr {
            if let Err(e) =
                crate::privileges::chown_for_workers(config.server.run_as.as_ref(), path)
            {
                tracing::warn!(
                    "cannot give the socket file {} to [server] user: {e}",
                    path.display()
                );
            }
        }
        Ok(Bound {
            addr: spec.addr.clone(),
            reuseport: spec.reuseport,
            sockets: vec![socket],
            owner: Owner::Ours,
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

    /// Closes the listener for good: a Unix socket's file is removed (if
    /// it is this process's).
    pub(super) fn close(self) {
        if let (Endpoint::Unix(path), Owner::Ours) = (&self.addr, self.owner) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// This master took the service over from the old one (a binary
    /// upgrade): the files the old one passed on are this one's now.
    pub(super) fn take_ownership(&mut self) {
        if self.owner == Owner::OursOnceServing {
            self.owner = Owner::Ours;
        }
    }
}
