//! What the master does when a worker exits: a pure function of the exit
//! status and the restart count, tested with a table (the Rust version of
//! gunicorn's scripted `waitpid` tests).

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use crate::exit_code;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit(code)`.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

impl Exit {
    /// The exit of a `waitpid` status, if the status is a termination.
    pub fn from_wait(status: WaitStatus) -> Option<Exit> {
        match status {
            WaitStatus::Exited(_, code) => Some(Exit::Code(code)),
            WaitStatus::Signaled(_, signal, _) => Some(Exit::Signal(signal)),
            _ => None,
        }
    }
}

impl Exit {
    /// How a process ended while a plugin's code was running (loading, or
    /// in a call): an exit status there means the plugin called `exit`.
    pub fn inside_plugin(&self) -> String {
        match self {
            Exit::Code(code) => {
                format!("the process exited with status {code} (the plugin called exit({code})?)")
            }
            Exit::Signal(Signal::SIGKILL) => {
                "killed by SIGKILL (the OOM killer, or an operator?)".to_string()
            }
            Exit::Signal(signal) => format!("killed by {signal} (a crash in the plugin?)"),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit status {code}"),
            Exit::Signal(Signal::SIGKILL) => {
                write!(f, "killed by SIGKILL (the OOM killer, or an operator?)")
            }
            Exit::Signal(signal) => write!(f, "killed by {signal}"),
        }
    }
}

/// What to do about a worker that exited while the master was serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Fork a replacement in the same slot.
    Restart,
    /// Stop everything and exit with this code.
    Halt(i32),
}

/// How far a worker got before it exited, as its scoreboard entry says.
///
/// Deliberately not its exit status: a plugin can `exit(4)` from any call,
/// and that must never be mistaken for "the plugins cannot load".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// It had said it was serving: whatever ended it is a crash of that one
    /// worker.
    Served,
    /// It said a plugin refused to load (init returned an error, or the
    /// library could not be opened): a new worker would fail the same way.
    PluginRefused,
    /// It ended before saying either (killed, crashed or exited inside a
    /// plugin's init, hung past `init_timeout`, or failed to set up its
    /// event loop). Once may be bad luck (an operator's `kill`); several
    /// times in a row is a plugin that cannot start.
    DiedStarting,
}

/// Consecutive [`Boot::DiedStarting`] exits of one slot after which the
/// master gives up: the plugins evidently cannot start.
pub const MAX_BOOT_FAILURES: u32 = 3;

/// Decides about a worker that exited unasked. `boot_failures` counts this
/// slot's consecutive workers that died before serving (this one included);
/// `restarts_done` counts the restarts performed within the restart window;
/// like nbNet's `fork_processes`, the master gives up when one more would
/// exceed `max_restarts`. `up` says whether every slot of the serving
/// config has had a ready worker: once the server is up, a worker that
/// fails to start (an OOM kill during init, a database down for a moment)
/// is restarted with backoff like any crash, while the others serve; only
/// a server still starting gives up on a plugin that cannot start.
pub fn on_worker_exit(
    boot: Boot,
    boot_failures: u32,
    restarts_done: u32,
    max_restarts: u32,
    up: bool,
) -> Decision {
    match boot {
        // Restarting would only loop.
        Boot::PluginRefused if !up => Decision::Halt(exit_code::PLUGIN_LOAD_FAILED),
        Boot::DiedStarting if !up && boot_failures >= MAX_BOOT_FAILURES => {
            Decision::Halt(exit_code::PLUGIN_LOAD_FAILED)
        }
        _ if restarts_done >= max_restarts => Decision::Halt(exit_code::TOO_MANY_RESTARTS),
        _ => Decision::Restart,
    }
}

/// A worker that lived at least this long ends its slot's crash streak.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The longest wait before restarting a worker that keeps dying.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How long to wait before restarting a slot whose workers died `streak`
/// times in a row, each within [`STABLE_AFTER`] of starting: nothing the
/// first time (a crash is replaced at once), then 100 ms doubling up to
/// [`MAX_BACKOFF`], so a plugin that crashes every worker cannot turn the
/// master into a fork loop.
pub fn restart_delay(streak: u32) -> Duration {
    match streak {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100)
            .saturating_mul(1u32 << (n - 2).min(16))
            .min(MAX_BACKOFF),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_map_to_restart_or_halt() {
        use Boot::*;
        use Decision::*;
        let load = Halt(exit_code::PLUGIN_LOAD_FAILED);
        let too_many = Halt(exit_code::TOO_MANY_RESTARTS);
        let table = [
            (Served, 0, 0, 100, true, Restart),
            (Served, 0, 99, 100, true, Restart),
            (Served, 0, 100, 100, true, too_many),
            (Served, 0, 0, 0, true, too_many),
            // A worker that served is never a load failure, whatever it
            // exited with (the exit status is not even an input).
            (Served, 5, 0, 100, true, Restart),
            // Still starting: a plugin that cannot start stops the server.
            (PluginRefused, 1, 0, 100, false, load),
            (DiedStarting, 1, 0, 100, false, Restart),
            (DiedStarting, MAX_BOOT_FAILURES - 1, 0, 100, false, Restart),
            (DiedStarting, MAX_BOOT_FAILURES, 0, 100, false, load),
            (DiedStarting, 1, 100, 100, false, too_many),
            // Up: the others serve; restart with backoff, like a crash.
            (PluginRefused, 1, 0, 100, true, Restart),
            (DiedStarting, MAX_BOOT_FAILURES + 5, 0, 100, true, Restart),
            (PluginRefused, 1, 100, 100, true, too_many),
        ];
        for (boot, failures, done, max, up, expected) in table {
            assert_eq!(
                on_worker_exit(boot, failures, done, max, up),
                expected,
                "{boot:?} ({failures} boot failures) after {done}/{max}, up {up}"
            );
        }
    }

    #[test]
    fn restarts_back_off_exponentially_after_the_first_and_are_capped() {
        let delays: Vec<u64> = (0..10)
            .map(|n| restart_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [0, 0, 100, 200, 400, 800, 1600, 3200, 6400, 10000]);
        assert_eq!(restart_delay(1000), MAX_BACKOFF);
    }

    #[test]
    fn sigkill_is_described_with_a_hint() {
        assert!(Exit::Signal(Signal::SIGKILL).to_string().contains("OOM"));
        assert_eq!(Exit::Code(3).to_string(), "exit status 3");
    }
}
