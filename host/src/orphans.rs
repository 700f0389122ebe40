//! Processes that plugins start and leave running: finding this process's
//! children (orphans adopted as a child subreaper among them) and killing
//! them. Used by the master at the end of a stop, and by the one-shot
//! commands that load plugins (`--check`, `plugin run`, `plugin info`).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// How long [`sweep`] keeps at it.
pub const SWEEP_LIMIT: Duration = Duration::from_secs(2);

/// This process's children now (zombies included), whichever of its
/// threads forked them: `/proc` lists children per thread, and orphans
/// adopted by a subreaper may go to any of its threads.
pub fn children() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut all: Vec<Pid> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .map(Pid::from_raw)
                .collect::<Vec<_>>()
        })
        .collect();
    all.sort_unstable_by_key(|pid| pid.as_raw());
    all.dedup();
    all
}

/// Whether `pid` has exited and waits to be reaped (`Z` in
/// `/proc/PID/stat`): it still answers `kill(pid, 0)`.
pub fn is_zombie(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// Kills (SIGKILL) and reaps every child of this process except `keep`,
/// repeating while that reveals more (their own orphans, adopted as they
/// die), for at most [`SWEEP_LIMIT`]. Never blocks on one stuck in the
/// kernel. Returns how many live processes it killed (zombies are only
/// reaped).
pub fn sweep(keep: &[Pid]) -> usize {
    let deadline = Instant::now() + SWEEP_LIMIT;
    let mut killed = std::collections::HashSet::new();
    loop {
        let left: Vec<Pid> = children()
            .into_iter()
            .filter(|pid| !keep.contains(pid))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        for &pid in &left {
            if !is_zombie(pid) && kill(pid, Signal::SIGKILL).is_ok() {
                killed.insert(pid);
            }
        }
        for &pid in &left {
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len()
}
