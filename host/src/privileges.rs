//! Least privilege: the master may run as root — to bind low ports and
//! read certificates at startup and on every reload — but the code it
//! loads never does, unless the operator says so. Plugins are native code:
//! run as root, a bug or a malicious `.so` owns the machine.
//!
//! With `[server] user` (and optionally `group`), every process that loads
//! plugins — each worker, and the checker that validates them at startup
//! and on reload — drops to that user right after `fork`, before it loads
//! anything: supplementary groups first (`initgroups`), then the group, then
//! the user; and it checks that root cannot be regained. The master keeps
//! its privileges (it never loads a plugin; see `shared/notes`).
//!
//! Running as root without `user` is refused when there are plugins, unless
//! `allow_root = true` (or `NBNET_ALLOW_ROOT=1` in the environment, for
//! containers whose only user is root and test harnesses). Not running as
//! root, `user` can only name the user nbnet already runs as; another is
//! ignored with a warning (as nginx does), since only root can switch.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};

/// The environment variable that has the effect of `allow_root = true`.
pub const ALLOW_ROOT_ENV: &str = "NBNET_ALLOW_ROOT";

/// The user (and group) plugin-loading processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

impl std::fmt::Display for RunAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "user {} (uid {}), group {} (gid {})",
            self.user, self.uid, self.group, self.gid
        )
    }
}

/// Looks `user` and `group` up (the group defaults to the user's primary
/// group). Errors say what to do.
pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    let found = User::from_name(user)
        .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| {
            format!(
                "user {user:?} does not exist on this machine: create it (e.g. `useradd --system --no-create-home --shell /usr/sbin/nologin {user}`) or name another"
            )
        })?;
    if found.uid.is_root() {
        return Err(format!(
            "user {user:?} is root (uid 0): name an unprivileged user, or remove `user` and set allow_root = true to run plugins as root knowingly"
        ));
    }
    let (group, gid) = match group {
        Some(name) => {
            let found = Group::from_name(name)
                .map_err(|e| format!("cannot look up group {name:?}: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "group {name:?} does not exist on this machine: create it (groupadd --system {name}) or name another"
                    )
                })?;
            if found.gid.as_raw() == 0 {
                return Err(format!(
                    "group {name:?} is root's (gid 0): name an unprivileged group"
                ));
            }
            (name.to_string(), found.gid.as_raw())
        }
        None => {
            let name = Group::from_gid(found.gid)
                .ok()
                .flatten()
                .map_or_else(|| found.gid.to_string(), |g| g.name);
            (name, found.gid.as_raw())
        }
    };
    Ok(RunAs {
        user: user.to_string(),
        uid: found.uid.as_raw(),
        group,
        gid,
    })
}

/// Whether `config` may run here: `Err` refuses it — nbnet runs as root,
/// there are plugins, and neither `user` nor `allow_root` (or
/// [`ALLOW_ROOT_ENV`]) says what to do — naming the config file;
/// `Ok(Some(note))` is a line to log at info (`user` ignored: a config
/// written for root, run by a user). Who drops to `user`, and when, is
/// [`drop_for_plugins`]'s business.
pub fn check(config: &crate::config::Config) -> Result<Option<String>, String> {
    let euid = Uid::effective();
    let allowed = config.server.allow_root
        || std::env::var(ALLOW_ROOT_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    match config.server.run_as.as_ref() {
        Some(run_as) if euid.is_root() || euid.as_raw() == run_as.uid => Ok(None),
        Some(run_as) => Ok(Some(format!(
            "[server] user = {:?} is ignored: nbnet runs as uid {euid}, not as root, so it cannot switch users; plugins run as uid {euid}",
            run_as.user
        ))),
        None if euid.is_root() && !config.plugins.is_empty() && !allowed => Err(format!(
            "{}: refusing to run plugins as root: nbnet runs as root and [server] user is not set. Plugins are native code with every privilege of the process that loads them — a bug or a malicious .so would own the machine. Set [server] user = \"nbnet\" (create it: useradd --system --no-create-home --shell /usr/sbin/nologin nbnet): the master still binds every socket as root, the workers run as that user. Or set [server] allow_root = true (or NBNET_ALLOW_ROOT=1) to run plugins as root knowingly",
            crate::config::shown(&config.file)
        )),
        None => Ok(None),
    }
}

/// Gives `path` (a Unix socket file, a log file the workers reopen) to
/// `[server] user` when the master runs as root and drops privileges for
/// its workers.
pub fn chown_for_workers(run_as: Option<&RunAs>, path: &std::path::Path) -> std::io::Result<()> {
    match run_as {
        Some(run_as) if Uid::effective().is_root() => {
            std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid))
        }
        _ => Ok(()),
    }
}

/// In a freshly forked process that is about to load plugins: drops to
/// `[server] user` when running as root with one configured; nothing
/// otherwise. Must come before `PR_SET_PDEATHSIG`, which a change of user
/// clears.
pub fn drop_for_plugins(run_as: Option<&RunAs>) -> Result<(), String> {
    match run_as {
        Some(run_as) if Uid::effective().is_root() => drop_to(run_as),
        _ => Ok(()),
    }
}

/// Drops this process (a freshly forked worker or checker) to `run_as`:
/// supplementary groups, group, user; then makes sure root cannot be
/// regained. Call before anything of the user's is loaded.
pub fn drop_to(run_as: &RunAs) -> Result<(), String> {
    let user = CString::new(run_as.user.as_bytes())
        .map_err(|_| format!("user name {:?} contains a NUL byte", run_as.user))?;
    let gid = Gid::from_raw(run_as.gid);
    nix::unistd::initgroups(&user, gid)
        .map_err(|e| format!("cannot set the groups of {run_as}: {e}"))?;
    nix::unistd::setgid(gid).map_err(|e| format!("cannot switch to {run_as}: setgid: {e}"))?;
    nix::unistd::setuid(Uid::from_raw(run_as.uid))
        .map_err(|e| format!("cannot switch to {run_as}: setuid: {e}"))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!(
            "switched to {run_as}, but root could be regained: refusing to load plugins"
        ));
    }
    // A process that changed its user is made non-dumpable by the kernel,
    // which makes its /proc/self/fd unreadable to itself — and plugin
    // images are loaded through /proc/self/fd (see plugin/image.rs).
    // Dumpable again: only this user (and root) may inspect it.
    nix::sys::prctl::set_dumpable(true).map_err(|e| {
        format!("cannot make the process dumpable again after switching users: {e}")
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_user_or_group_says_how_to_create_it() {
        let e = resolve("nbnet-no-such-user-xyz", None).unwrap_err();
        assert!(e.contains("does not exist") && e.contains("useradd"), "{e}");
        let e = resolve("root", None).unwrap_err();
        assert!(e.contains("uid 0"), "{e}");
        if User::from_name("nobody").ok().flatten().is_some() {
            let e = resolve("nobody", Some("nbnet-no-such-group-xyz")).unwrap_err();
            assert!(e.contains("groupadd"), "{e}");
            let nobody = resolve("nobody", None).unwrap();
            assert_ne!(nobody.uid, 0);
        }
    }
}
