//! The master's PID file, locked for the master's whole life.
//!
//! Without a lock, a second master (with `reuseport = true` it can bind the
//! same port) overwrote the file, and `nbnet stop` then stopped only the
//! second one; a file left by a killed master could name an unrelated
//! process that `nbnet stop` then killed. So:
//!
//! - the master holds a write lock on the whole file while it runs; a
//!   second master finds it locked and refuses to start, naming the file
//!   and the running master's PID;
//! - `nbnet stop` / `nbnet reload` ([`holder`]) signal the PID in the file
//!   only if the file is locked by that very process: a file nobody locks
//!   is stale, and nothing is signalled.
//!
//! The lock is a POSIX record lock (`fcntl(F_SETLK)`), not `flock` or an
//! OFD lock, on purpose: a record lock belongs to the *process*, so it is
//! not inherited by `fork` — workers (and whatever plugins start) never
//! hold it, and it goes away exactly when the master dies, even if a worker
//! outlived it (workers cannot anyway: `PR_SET_PDEATHSIG` kills them); and
//! `F_GETLK` names the holder's PID, which the message and [`holder`] use.
//! Its one trap: the master loses the lock if it closes *any* descriptor of
//! this file, so the master must never open the file a second time (write
//! through [`PidFile`] only). The descriptor is close-on-exec.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The locked PID file of a running master. Dropping it removes the file
/// (if it is still this one) and releases the lock.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
    /// Removed when dropped (not after [`PidFile::release`]).
    remove: bool,
}

impl PidFile {
    /// Creates (or takes over a stale) `path`, locks it, and writes this
    /// process's PID into it. Fails, with a message that says what to do,
    /// if another process holds the lock.
    pub fn acquire(path: &Path) -> Result<PidFile, String> {
        // A few rounds: the previous master may remove the file (or a
        // holder release it) between our open and our lock.
        for _ in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| format!("cannot open pid_file {}: {e}", path.display()))?;
            match lock(&file, libc::F_SETLK, libc::F_WRLCK) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    match lock_holder(&file) {
                        Ok(Some(pid)) => {
                            return Err(format!(
                                "another nbnet master (pid {pid}) is running with the pid_file {}: not starting a second one; stop it first (nbnet stop), or give this server another pid_file",
                                path.display()
                            ))
                        }
                        // Released meanwhile: try again.
                        Ok(None) => continue,
                        Err(e) => return Err(lock_error(path, &e)),
                    }
                }
                Err(e) => return Err(lock_error(path, &e)),
            }
            // The lock is on the file we opened; make sure that is still the
            // one at `path` (not one an exiting master just removed).
            let ours = file
                .metadata()
                .map_err(|e| format!("cannot stat pid_file {}: {e}", path.display()))?;
            let same = std::fs::metadata(path)
                .is_ok_and(|there| there.dev() == ours.dev() && there.ino() == ours.ino());
            if !same {
                continue;
            }
            let text = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all_at(text.as_bytes(), 0))
                .map_err(|e| format!("cannot write pid_file {}: {e}", path.display()))?;
            return Ok(PidFile {
                path: path.to_path_buf(),
                file,
                remove: true,
            });
        }
        Err(format!(
            "cannot lock pid_file {}: it keeps being replaced; is another nbnet starting or stopping with it?",
            path.display()
        ))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlocks the file and leaves it in place, for the master that takes
    /// over (a binary upgrade): it locks it and writes its own PID.
    pub fn release(mut self) {
        self.remove = false;
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if !self.remove {
            return;
        }
        // Remove it only if it is still ours (not a file someone put there
        // since); the lock goes with the descriptor.
        let ours = self.file.metadata();
        let there = std::fs::metadata(&self.path);
        if let (Ok(ours), Ok(there)) = (ours, there) {
            if ours.dev() == there.dev() && ours.ino() == there.ino() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn lock_error(path: &Path, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOLCK) {
        format!(
            "cannot lock pid_file {}: {e} (its file system does not support locks); put it on a local file system, e.g. under /run",
            path.display()
        )
    } else {
        format!("cannot lock pid_file {}: {e}", path.display())
    }
}

/// `fcntl(cmd)` with a whole-file lock of `kind`; returns the lock as the
/// kernel left it (for `F_GETLK`: the conflicting lock, or `F_UNLCK`).
fn lock(file: &File, cmd: libc::c_int, kind: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: a zeroed flock is valid (all integers); then the fields that
    // matter are set.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = kind as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    // From 0 to the end of the file, however long it gets.
    request.l_start = 0;
    request.l_len = 0;
    // SAFETY: `file` is open and `request` a valid flock for this command.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut request) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(request)
    }
}

/// The PID of the process holding a lock on `file`, if any.
fn lock_holder(file: &File) -> io::Result<Option<i32>> {
    let found = lock(file, libc::F_GETLK, libc::F_WRLCK)?;
    Ok((found.l_type != libc::F_UNLCK as libc::c_short).then_some(found.l_pid))
}

/// Whether no process holds the PID file at `path`: it does not exist, or
/// nothing holds its lock (a stale file). `false` when that cannot be told.
pub fn nobody_holds(path: &Path) -> bool {
    match File::open(path) {
        Err(e) => e.kind() == io::ErrorKind::NotFound,
        Ok(file) => matches!(lock_holder(&file), Ok(None)),
    }
}

/// What `nbnet stop` / `nbnet reload` may signal: the PID written in the
/// PID file at `path`, if (and only if) that process holds the file's
/// lock, i.e. it is the nbnet master that wrote it. Errors say why not, and
/// what to do.
pub fn holder(path: &Path, config_file: &Path) -> Result<i32, String> {
    let file = File::open(path).map_err(|e| {
        format!(
            "cannot read the PID file {}: {e}; is nbnet running with {}?",
            path.display(),
            config_file.display()
        )
    })?;
    // A PID file is a few bytes; whatever else is there is not read whole.
    let mut text = String::new();
    io::Read::read_to_string(&mut io::Read::take(&file, 64), &mut text)
        .map_err(|e| format!("cannot read the PID file {}: {e}", path.display()))?;
    let written: Option<i32> = text.trim().parse().ok();
    let locked_by = lock_holder(&file).map_err(|e| {
        format!(
            "cannot check the lock of the PID file {}: {e}; not signalling anything",
            path.display()
        )
    })?;
    match (written, locked_by) {
        (_, None) => Err(format!(
            "the PID file {} is stale: no nbnet master holds it (it names {}, which is not a running nbnet master of this file), so nothing was signalled; is nbnet running with {}? If not, remove the file",
            path.display(),
            crate::config::quote(text.trim()),
            config_file.display()
        )),
        (Some(pid), Some(holder)) if pid == holder && pid > 1 => Ok(pid),
        (_, Some(holder)) => Err(format!(
            "the PID file {} names {} but is held by process {holder}; not signalling anything (was the file edited?); restore it or signal the master yourself",
            path.display(),
            crate::config::quote(text.trim())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder for one test (removed at the end of the test).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("nbnet-pid-file-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_second_lock_in_another_process_is_refused_and_names_the_holder() {
        let dir = Scratch::new("second");
        let path = dir.0.join("nbnet.pid");
        let held = PidFile::acquire(&path).unwrap();
        let me = std::process::id() as i32;
        // (Reading the file here would release the lock: closing any
        // descriptor of a file drops the process's record locks on it.)
        // Record locks are per process: a child sees ours as a conflict.
        // SAFETY: the child only calls async-signal-safe-enough code and
        // exits with `_exit`.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let ok = match PidFile::acquire(&path) {
                    Err(message) => message.contains(&format!("pid {me}")),
                    Ok(_) => false,
                };
                // `holder` also checks that the file names the holder.
                let ok = ok && holder(&path, Path::new("x.toml")) == Ok(me);
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        drop(held);
        assert!(!path.exists(), "dropping it removes the file");
    }

    #[test]
    fn an_unlocked_file_is_stale_and_is_taken_over() {
        let dir = Scratch::new("stale");
        let path = dir.0.join("nbnet.pid");
        std::fs::write(&path, "1234\n").unwrap();
        let err = holder(&path, Path::new("x.toml")).unwrap_err();
        assert!(err.contains("stale") && err.contains("1234"), "{err}");
        let held = PidFile::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(held.path()).unwrap().trim(),
            std::process::id().to_string()
        );
    }
}
