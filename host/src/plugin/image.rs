//! Plugin images: the exact bytes of each `.so` that a config was validated
//! with, kept by the master in sealed memory files.
//!
//! Without them, a worker started later (a restart after a crash, a
//! replacement, SIGTTIN) would `dlopen` whatever the path holds *then*: a
//! newer build nobody checked, a half-written file, or a broken one — and a
//! `cp` over a library that workers have mapped changes their code under
//! them. So when the master reads a config (startup, reload, `--check`) it
//! copies each plugin file once into a `memfd`, seals it against any
//! change, and notes the file's identity (device, inode, size, mtime).
//! Everything afterwards — the check child and every worker of that config
//! generation — loads the file by its path while it is still that very
//! file (so that an `$ORIGIN` rpath and `dladdr` see the real place), and
//! the sealed copy, through `/proc/self/fd/N`, once it is not. The
//! descriptor is inherited over `fork`. A new build takes effect only
//! through a reload or restart, which validates it first.
//!
//! Reading a file is not loading it: the master still never `dlopen`s
//! anything (see `shared/notes/dependencies.md`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::config::Config;

/// The largest plugin file accepted (far above any real plugin, even with
/// debug info; the copy lives in memory).
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// A sealed, read-only in-memory copy of a plugin file. Cheap to clone
/// (configs are cloned); the memory is freed when the last clone of the
/// last process holding it is gone.
#[derive(Debug, Clone)]
pub struct Image {
    copy: Arc<OwnedFd>,
    /// The copied file's (device, inode, size, mtime in ns).
    identity: Identity,
}

type Identity = (u64, u64, u64, i128);

fn identity_of(meta: &std::fs::Metadata) -> Identity {
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    )
}

/// What a loader should `dlopen` for a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The file itself: it is still the file that was checked.
    File(PathBuf),
    /// The sealed copy: the file at the path changed (or is gone) since.
    Copy(PathBuf),
    /// The sealed copy: this process may not read the file (a worker that
    /// runs as `[server] user`; the master, as root, made the copy).
    Unreadable(PathBuf),
}

impl Image {
    /// The sealed copy, as a path `dlopen` can open.
    pub fn copy_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.copy.as_raw_fd()))
    }

    /// What to load for the plugin at `path`: the file while it is the one
    /// this image was taken from, else the copy. (A file rewritten in
    /// place in the instant between this look and the load is not caught:
    /// install new builds by renaming them into place.)
    pub fn source(&self, path: &Path) -> Source {
        match std::fs::metadata(path) {
            Ok(meta)
                if meta.is_file()
                    && identity_of(&meta) == self.identity
                    && nix::unistd::access(path, nix::unistd::AccessFlags::R_OK).is_ok() =>
            {
                Source::File(path.to_path_buf())
            }
            Ok(meta) if meta.is_file() && identity_of(&meta) == self.identity => {
                Source::Unreadable(self.copy_path())
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Source::Unreadable(self.copy_path())
            }
            _ => Source::Copy(self.copy_path()),
        }
    }
}

impl AsRawFd for Image {
    fn as_raw_fd(&self) -> RawFd {
        self.copy.as_raw_fd()
    }
}

/// Copies `path` into a new sealed image. The error says what is wrong
/// with the file, in a form that follows "plugin NAME (PATH): ".
pub fn snapshot(path: &Path) -> Result<Image, String> {
    // Non-blocking: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => "no such file; check the path (relative paths are resolved against the config file's folder)".to_string(),
            _ => format!("cannot open the file: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if let Some(what) = crate::config::not_a_file(&meta.file_type()) {
        return Err(format!("is {what}, not a shared library (.so) file"));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "is {} bytes, more than the {MAX_IMAGE_BYTES} bytes a plugin file may have",
            meta.len()
        ));
    }
    let identity = identity_of(&meta);
    copy(file, path, identity).map_err(|e| format!("cannot copy the file into memory: {e}"))
}

fn copy(mut file: File, path: &Path, identity: Identity) -> io::Result<Image> {
    let name = format!(
        "nbnet-plugin:{}",
        path.file_name().map_or("?".into(), |n| n.to_string_lossy())
    );
    let fd = memfd_create(
        name.as_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut memory = File::from(fd);
    // At most the size checked above plus one byte: a file that grows
    // while being copied is refused, not copied without end.
    let copied = io::copy(
        &mut io::Read::take(&mut file, MAX_IMAGE_BYTES + 1),
        &mut memory,
    )?;
    if copied > MAX_IMAGE_BYTES {
        return Err(io::Error::other(
            "the file grew past the size limit while being read",
        ));
    }
    fcntl(
        memory.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(Image {
        copy: Arc::new(OwnedFd::from(memory)),
        identity,
    })
}

/// Takes an image of every plugin of `config` (one per file: entries naming
/// the same file share it, as they share one loaded library). Returns one
/// line per file that cannot be taken, naming the plugin and its path.
pub fn snapshot_all(config: &mut Config) -> Vec<String> {
    let mut errors = Vec::new();
    let mut taken: Vec<((u64, u64), Image)> = Vec::new();
    for spec in &mut config.plugins {
        let identity = std::fs::metadata(&spec.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if let Some(image) = identity
            .and_then(|id| taken.iter().find(|(known, _)| *known == id))
            .map(|(_, image)| image.clone())
        {
            spec.image = Some(image);
            continue;
        }
        match snapshot(&spec.path) {
            Ok(image) => {
                if let Some(id) = identity {
                    taken.push((id, image.clone()));
                }
                spec.image = Some(image);
            }
            Err(why) => errors.push(format!(
                "plugin {:?} ({}): {why}",
                spec.name,
                spec.path.display()
            )),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_keeps_the_bytes_it_was_taken_with_and_cannot_be_changed() {
        let dir = std::env::temp_dir().join(format!("nbnet-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lib.so");
        std::fs::write(&path, b"first build").unwrap();
        let image = snapshot(&path).unwrap();
        assert_eq!(image.source(&path), Source::File(path.clone()));
        std::fs::write(&path, b"second build, longer").unwrap();
        assert_eq!(image.source(&path), Source::Copy(image.copy_path()));
        assert_eq!(std::fs::read(image.copy_path()).unwrap(), b"first build");
        let write = std::fs::OpenOptions::new()
            .write(true)
            .open(image.copy_path());
        assert!(
            write.is_err() || io::Write::write(&mut write.unwrap(), b"x").is_err(),
            "a sealed image must refuse writes"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_at_once_by_kind() {
        let dir = std::env::temp_dir().join(format!("nbnet-image-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("plugin.so");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(snapshot(&fifo).unwrap_err().contains("FIFO"));
        assert!(snapshot(&dir).unwrap_err().contains("directory"));
        assert!(snapshot(&dir.join("missing.so"))
            .unwrap_err()
            .contains("no such file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
