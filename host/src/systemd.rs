//! The two systemd protocols a service speaks, in the few lines they take:
//!
//! - **Readiness** (`sd_notify(3)`): with `Type=notify`, systemd waits for
//!   `READY=1` before it calls the service started, and the service says
//!   `RELOADING=1` / `STOPPING=1` / `MAINPID=` as its state changes. The
//!   messages are datagrams to the Unix socket named by `$NOTIFY_SOCKET`
//!   (a path, or `@name` in the abstract namespace). Without the variable
//!   every call does nothing.
//! - **Socket activation** (`sd_listen_fds(3)`): systemd (or an old nbnet
//!   master handing over to a new binary) passes bound listening sockets as
//!   descriptors 3, 4, … with `$LISTEN_FDS` (how many), `$LISTEN_PID` (for
//!   whom: other processes must ignore them) and `$LISTEN_FDNAMES` (a name
//!   each, colon-separated; nbnet names them by listener address).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// Sends `state` (lines like `READY=1`) to the service manager, if there is
/// one. Readiness is best effort: a socket that cannot be reached (missing,
/// a path too long for a Unix socket, not absolute) is logged once per
/// process as a warning naming it and the error, later failures at debug
/// level.
pub fn notify(state: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(target) = std::env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()) else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = target.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            // sd_notify(3) takes an absolute path or an @name, nothing else.
            None if !bytes.starts_with(b"/") => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an @abstract name",
            )),
            None => socket.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        let socket = crate::logging::untrusted(&target.to_string_lossy());
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!("sd_notify {state:?} to NOTIFY_SOCKET={socket}: {e}");
        } else {
            tracing::warn!(
                "cannot notify the service manager at NOTIFY_SOCKET={socket}: {e}; it will not hear that nbnet is ready, reloading or stopping (under systemd with Type=notify the start times out): check the variable and the unit's NotifyAccess= (said once; later failures at debug level)"
            );
        }
    }
}

/// Writes `line` to stderr, ignoring failures (this runs before logging is
/// set up).
fn eprintln_safe(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `RELOADING=1` with the monotonic timestamp systemd asks for.
pub fn notify_reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
}

/// The first descriptor of `$LISTEN_FDS`.
const LISTEN_FDS_START: RawFd = 3;

/// The sockets [`stash_listen_fds`] took, until [`take_listen_fds`].
static STASH: std::sync::Mutex<Vec<(String, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// Takes the listening sockets passed to this process now — call it first
/// thing in `main`, before anything opens a file: the numbers `LISTEN_FDS`
/// names are only ours to take while nothing else has opened them.
pub fn stash_listen_fds() {
    let taken = take_now();
    if let Ok(mut stash) = STASH.lock() {
        stash.extend(taken);
    }
}

/// The sockets [`stash_listen_fds`] took (each once).
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    STASH
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default()
}

/// Takes the listening sockets passed to this process (see the module
/// doc), each with its name (empty when unnamed), and removes the
/// variables so that no child sees them. Empty when none were passed, or
/// when they were meant for another process. A number `LISTEN_FDS` names
/// that is not a socket (a wrapper that set the variables but passed
/// nothing) is left alone: it may be a descriptor this process opened.
fn take_now() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    // SAFETY: the master is single-threaded when it starts: nothing reads
    // the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let ours = pid
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let Some(count) = count.and_then(|c| c.parse::<RawFd>().ok()).filter(|_| ours) else {
        return Vec::new();
    };
    let mut names = names.split(':');
    (0..count.clamp(0, 1024))
        .filter_map(|i| {
            let fd = LISTEN_FDS_START + i;
            let name = names.next().unwrap_or("").to_string();
            // SAFETY: fstat on a descriptor number only reads metadata; a
            // number that is not open gives an error.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            match nix::sys::stat::fstat(borrowed) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFSOCK => {}
                Ok(_) => {
                    eprintln_safe(&format!(
                        "nbnet: LISTEN_FDS names descriptor {fd}, which is not a socket: left alone"
                    ));
                    return None;
                }
                Err(_) => {
                    eprintln_safe(&format!(
                        "nbnet: LISTEN_FDS names descriptor {fd}, which is not open: ignored"
                    ));
                    return None;
                }
            }
            // SAFETY: LISTEN_FDS hands these descriptors to this process
            // (LISTEN_PID checked above); nothing else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Ours now: not to be inherited by what we exec later.
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            Some((name, fd))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_sends_the_state_to_the_socket_named_by_notify_socket() {
        let dir = std::env::temp_dir().join(format!("nbnet-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one touching NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1\nMAINPID=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nMAINPID=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
