//! Listening sockets and the streams they accept: TCP or Unix domain,
//! behind one type each so the reactor does not care which.
//!
//! The master binds every listener ([`ListenSocket::bind`]); workers inherit
//! the sockets across fork. A TCP listener with `reuseport` gets one socket
//! per worker slot, all bound to the same address with `SO_REUSEPORT`, so
//! the kernel spreads new connections over the workers' own accept queues
//! instead of waking every worker for each one.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket path (written `unix:/path` in the config).
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum ListenSocket {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain; the master removes the path when it closes the listener.
    Unix(UnixListener),
}

/// A TCP socket's listen backlog: generous, since a worker at
/// `max_connections` leaves new clients waiting there.
const BACKLOG: i32 = 1024;

impl ListenSocket {
    /// Binds a TCP listener (`reuseport`: with `SO_REUSEPORT`, so that
    /// several sockets can share the address).
    pub fn bind_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<ListenSocket> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if reuseport {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(ListenSocket::Tcp(TcpListener::from_std(socket.into())))
    }

    /// Binds a Unix domain listener at `path`. A stale socket file left by a
    /// server that died is removed first (nothing answers on it); a live one
    /// (another server answers) or a file that is not a socket is an error,
    /// never deleted. `mode` sets the socket file's permissions.
    pub fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<ListenSocket> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; not removing it",
                ));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                // Only "connection refused" proves nobody listens: a
                // permission error or a full backlog may hide a live server.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!("removing stale socket file {}", path.display());
                    std::fs::remove_file(path)?;
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    ))
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot tell whether the existing socket file is in use ({e}); remove it if it is stale"),
                    ))
                }
            }
        }
        // Bind under a umask that leaves the socket to its owner, so that no
        // client can connect before the configured mode is applied. (The
        // master is single-threaded here: changing the umask is safe.)
        let listener = match mode {
            Some(mode) => {
                use nix::sys::stat::{umask, Mode};
                let previous = umask(Mode::from_bits_truncate(0o177));
                let bound = UnixListener::bind(path);
                umask(previous);
                let listener = bound?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                listener
            }
            None => UnixListener::bind(path)?,
        };
        Ok(ListenSocket::Unix(listener))
    }

    /// Accepts one connection: the stream and the peer's address as text.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            ListenSocket::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                // Responses are complete frames written at once: Nagle's
                // delay would only add latency.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            ListenSocket::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                Ok((Stream::Unix(stream), "unix".to_string()))
            }
        }
    }
}

/// `mio::event::Source` for an enum of sources: every method forwards to
/// the variant's own socket.
macro_rules! forward_source {
    ($type:ident $(, $tls:path)?) => {
        impl Source for $type {
            fn register(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                match self {
                    $type::Tcp(s) => s.register(registry, token, interests),
                    $type::Unix(s) => s.register(registry, token, interests),
                    $($tls(s) => s.socket_mut().register(registry, token, interests),)?
                }
            }
            fn reregister(
                &mut self,
                registry: &Registry,
                token: Token,
                interests: Interest,
            ) -> io::Result<()> {
                match self {
                    $type::Tcp(s) => s.reregister(registry, token, interests),
                    $type::Unix(s) => s.reregister(registry, token, interests),
                    $($tls(s) => s.socket_mut().reregister(registry, token, interests),)?
                }
            }
            fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
                match self {
                    $type::Tcp(s) => s.deregister(registry),
                    $type::Unix(s) => s.deregister(registry),
                    $($tls(s) => s.socket_mut().deregister(registry),)?
                }
            }
        }
    };
}

forward_source!(ListenSocket);
forward_source!(Stream, Stream::Tls);

/// An accepted client connection.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
    /// TLS over either (boxed: the session state is large, the plain
    /// variants stay one word).
    Tls(Box<crate::worker::tls::TlsStream>),
}

impl Stream {
    /// Sends what a TLS session still holds for the socket: `Ok(true)`
    /// once nothing is pending (always, for a plain stream).
    #[inline]
    pub fn send_pending(&mut self) -> io::Result<bool> {
        match self {
            Stream::Tls(s) => s.send_pending(),
            _ => Ok(true),
        }
    }

    /// Whether a TLS session holds records the socket has not taken.
    #[inline]
    pub fn wants_write(&self) -> bool {
        match self {
            Stream::Tls(s) => s.wants_write(),
            _ => false,
        }
    }
}

impl std::os::fd::AsRawFd for ListenSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            ListenSocket::Tcp(l) => l.as_raw_fd(),
            ListenSocket::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.socket().as_raw_fd(),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::Tls(s) => s.socket().as_fd(),
        }
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    /// One `sendmsg` for many buffers: rustls hands a TLS session's queued
    /// records over this way (`write_tls`); without it every record (of a
    /// handshake flight, or each 16 KiB of a large answer) took a `send`
    /// of its own. `MSG_NOSIGNAL`, like std's `write` on a socket: a peer
    /// that has gone is an EPIPE, not a SIGPIPE (which `writev` raises).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        use nix::sys::socket::{sendmsg, MsgFlags};
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tls(s) => s.write_vectored(bufs),
            plain => sendmsg::<()>(plain.as_raw_fd(), bufs, &[], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls sends a TLS session's queued records through
    /// `write_vectored`: all of them must go in one call (std's default
    /// wrote the first buffer only: one syscall per record), and a peer
    /// that has gone is an error, not a signal.
    #[test]
    fn a_vectored_write_sends_every_buffer_at_once() {
        let bufs = [
            io::IoSlice::new(b"first record "),
            io::IoSlice::new(b"second "),
            io::IoSlice::new(b"third"),
        ];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (unix_a, unix_b) = std::os::unix::net::UnixStream::pair().unwrap();
        let streams: [(Stream, Box<dyn Read>); 2] = [
            (Stream::Tcp(TcpStream::from_std(server)), Box::new(client)),
            (Stream::Unix(UnixStream::from_std(unix_a)), Box::new(unix_b)),
        ];
        for (mut stream, mut peer) in streams {
            assert_eq!(stream.write_vectored(&bufs).unwrap(), 25);
            let mut got = [0u8; 25];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"first record second third");
            drop(peer);
            // The peer is gone: an error, and no SIGPIPE (the worker has a
            // handler for it: a signal per closed connection). Blocked in
            // this thread, a SIGPIPE would stay pending (even though the
            // test harness ignores it), so it can be seen.
            use nix::sys::signal::{SigSet, Signal};
            let pipe = SigSet::from(Signal::SIGPIPE);
            pipe.thread_block().unwrap();
            let mut failed = false;
            for _ in 0..100 {
                if stream.write_vectored(&bufs).is_err() {
                    failed = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            // SAFETY: sigpending only writes the set it is given.
            let raised = unsafe {
                let mut pending: libc::sigset_t = std::mem::zeroed();
                libc::sigpending(&mut pending);
                libc::sigismember(&pending, libc::SIGPIPE) == 1
            };
            if raised {
                pipe.wait().unwrap();
            }
            pipe.thread_unblock().unwrap();
            assert!(failed, "writes to a closed peer kept succeeding");
            assert!(!raised, "a write to a closed peer raised SIGPIPE");
        }
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_but_a_live_one_or_a_plain_file_is_not() {
        let dir = std::env::temp_dir().join(format!("nbnet-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        // Live: bound and listening here.
        let live = ListenSocket::bind_unix(&path, Some(0o600)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = ListenSocket::bind_unix(&path, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Stale: the listener is gone but its file remains.
        drop(live);
        assert!(path.exists());
        ListenSocket::bind_unix(&path, None).unwrap();
        // Not a socket: never removed.
        let file = dir.join("plain");
        std::fs::write(&file, "keep me").unwrap();
        assert!(ListenSocket::bind_unix(&file, None).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn endpoints_print_as_written_in_the_config() {
        assert_eq!(
            Endpoint::Tcp("127.0.0.1:9000".parse().unwrap()).to_string(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            Endpoint::Unix("/run/nbnet.sock".into()).to_string(),
            "unix:/run/nbnet.sock"
        );
    }
}
