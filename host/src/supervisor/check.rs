//! Loads every configured plugin in a short-lived child process and reports
//! what happened: for `--check` and before the master forks its workers
//! (blocking, [`check_plugins`]), and for a reload, where the master's loop
//! drives the same [`Check`] without waiting on it.
//!
//! Why a child: the master must never load plugins (a plugin's initializers
//! or threads could leave the dynamic loader locked when the master forks,
//! deadlocking workers — see `shared/notes/dependencies.md`), and a plugin
//! that crashes while loading must not take the master with it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::decision::Exit;
use crate::config::Config;
use crate::plugin::{image, Plugin};

/// The outcome of loading every plugin once.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per plugin that loaded (kind, own name and version, file).
    pub loaded: Vec<String>,
    /// One line per problem, naming the plugin and its file.
    pub errors: Vec<String>,
}

/// Takes an image of each plugin file of `config` (see
/// [`crate::plugin::image`]: what the workers of this config will load),
/// then loads (and destroys) each plugin in a child process, and waits for
/// the child's report.
///
/// The blocking driver of [`Check`], for startup and `--check`, where
/// nothing else needs the process meanwhile. A reload drives the same
/// [`Check`] from the master's event loop instead, so that reaping,
/// replacing and watching workers and answering `/healthz` go on while the
/// plugins load.
pub fn check_plugins(config: &mut Config) -> Report {
    let mut check = match Check::start(config) {
        Ok(check) => check,
        Err(report) => return report,
    };
    loop {
        check.read_available();
        check.collect_status();
        if check.is_done() {
            return check.finish();
        }
        check.enforce_deadline(Instant::now());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A plugin check under way: the checker child, what it has reported so
/// far, and its deadline. Driven either by [`check_plugins`] (blocking) or
/// by the master's loop (the report pipe is registered in its `Poll`, and
/// the master's reaper hands the child's exit over with [`Check::exited`]).
///
/// Each plugin gets `init_timeout` to load: the deadline moves on with
/// every `LOADING` line. A checker past it is killed, and reported as such
/// once it has been reaped.
#[derive(Debug)]
pub struct Check {
    child: Pid,
    reader: std::io::PipeReader,
    bytes: Vec<u8>,
    /// Complete `LOADING` lines seen (progress).
    loading_lines: usize,
    /// Where the last incomplete line starts in `bytes`.
    line_start: usize,
    limit: Duration,
    deadline: Instant,
    killed: bool,
    /// A plugin stopped the checker with this signal (it was then killed).
    stopped: Option<Signal>,
    /// How the child ended, once it has been reaped.
    outcome: Option<Outcome>,
    /// Problems found before the child started (unreadable plugin files).
    report: Report,
    /// Where the checker says a plugin tampered with its descriptors.
    verdict: Verdict,
}

/// A word of memory shared with the checker, where it writes which of its
/// descriptors a plugin closed or replaced — the report pipe may be the
/// one, and an exit status could be a plugin's own `exit(N)`.
#[derive(Debug)]
struct Verdict(std::ptr::NonNull<std::sync::atomic::AtomicU64>);

impl Verdict {
    fn new() -> Option<Verdict> {
        // SAFETY: a fresh shared anonymous mapping of one page, zero-filled
        // (a valid AtomicU64 of 0), unmapped only in Drop.
        let page = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(8)?,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
            )
        };
        page.ok().map(|p| Verdict(p.cast()))
    }

    fn word(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: mapped until Drop; atomics only.
        unsafe { self.0.as_ref() }
    }

    /// In the checker: plugin `index` tampered with a descriptor.
    fn set(&self, index: usize, tampered: crate::fork_guard::Tampered) {
        let (kind, fd) = match tampered {
            crate::fork_guard::Tampered::Closed(fd) => (1u64, fd),
            crate::fork_guard::Tampered::Replaced(fd) => (2u64, fd),
        };
        let value = kind << 56 | (index as u64 & 0xff_ffff) << 32 | (fd as u32 as u64);
        self.word()
            .store(value, std::sync::atomic::Ordering::SeqCst);
    }

    /// In the master, once the checker is gone.
    fn get(&self) -> Option<crate::fork_guard::Tampered> {
        let value = self.word().load(std::sync::atomic::Ordering::SeqCst);
        let fd = value as u32 as i32;
        match value >> 56 {
            1 => Some(crate::fork_guard::Tampered::Closed(fd)),
            2 => Some(crate::fork_guard::Tampered::Replaced(fd)),
            _ => None,
        }
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.0.cast(), 8) };
    }
}

impl Check {
    /// Takes the plugin images of `config` and forks the checker. `Err`
    /// when no checker could be started (the report says why).
    pub fn start(config: &mut Config) -> Result<Check, Report> {
        let mut report = Report {
            errors: image::snapshot_all(config),
            ..Report::default()
        };
        let (reader, writer) = match std::io::pipe() {
            Ok(pipe) => pipe,
            Err(e) => {
                report
                    .errors
                    .push(format!("cannot create a pipe to check plugins: {e}"));
                return Err(report);
            }
        };
        let _ = nix::fcntl::fcntl(
            reader.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let Some(verdict) = Verdict::new() else {
            report
                .errors
                .push("cannot map memory to check plugins".to_string());
            return Err(report);
        };
        // SAFETY: the master is single-threaded (it starts no threads and
        // loads no plugins), so the child may allocate and run arbitrary code.
        match unsafe { fork() } {
            Err(e) => {
                report
                    .errors
                    .push(format!("cannot fork to check plugins: {e}"));
                Err(report)
            }
            Ok(ForkResult::Child) => {
                drop(reader);
                let code = child(config, writer, &verdict);
                std::process::exit(code)
            }
            Ok(ForkResult::Parent { child }) => {
                drop(writer);
                let limit = config.server.init_timeout;
                Ok(Check {
                    child,
                    reader,
                    bytes: Vec::new(),
                    loading_lines: 0,
                    line_start: 0,
                    limit,
                    deadline: crate::config::deadline(Instant::now(), limit),
                    killed: false,
                    stopped: None,
                    outcome: None,
                    report,
                    verdict,
                })
            }
        }
    }

    /// The checker's process id (the master's reaper hands its exit over).
    pub fn pid(&self) -> Pid {
        self.child
    }

    /// The report pipe, to register in a `Poll` (edge-triggered: call
    /// [`Check::read_available`] on every readiness event).
    pub fn fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    /// Reads what the checker has written so far, without blocking. A
    /// `LOADING` line is progress: the next plugin gets its own
    /// `init_timeout`. At most [`MAX_REPORT_BYTES`] are kept (a flood is
    /// cut, and stops counting as progress), and one call reads at most
    /// that much, so a flood cannot hold the caller.
    pub fn read_available(&mut self) {
        let mut chunk = [0u8; 4096];
        let mut read = 0;
        while read < MAX_REPORT_BYTES {
            match self.reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    read += n;
                    let room = MAX_REPORT_BYTES.saturating_sub(self.bytes.len());
                    self.bytes.extend_from_slice(&chunk[..n.min(room)]);
                    self.count_progress();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn count_progress(&mut self) {
        while let Some(end) = self.bytes[self.line_start..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let line = &self.bytes[self.line_start..self.line_start + end];
            if line.starts_with(b"LOADING\t") || line.starts_with(b"DESTROYING\t") {
                self.loading_lines += 1;
                if !self.killed {
                    self.deadline = crate::config::deadline(Instant::now(), self.limit);
                }
            }
            self.line_start += end + 1;
        }
    }

    /// The checker exited (reaped by the caller).
    pub fn exited(&mut self, exit: Exit) {
        self.outcome = Some(match (self.stopped, self.killed) {
            (Some(signal), _) => Outcome::Stopped(signal),
            (None, true) => Outcome::TimedOut,
            (None, false) => Outcome::Exited(exit),
        });
    }

    /// Looks at the checker's status without blocking: its exit, or a
    /// stop. A plugin that stops the process (SIGSTOP, SIGTSTP…) would
    /// never let it go on by itself: it is killed, and the report names
    /// the signal, not `init_timeout`. (In the master, its reaper does
    /// this for a reload's check.)
    pub fn collect_status(&mut self) {
        if self.is_done() {
            return;
        }
        match waitpid(
            self.pid(),
            Some(WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED),
        ) {
            Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
            Ok(WaitStatus::Stopped(_, signal)) => self.stopped(signal),
            Ok(status) => {
                if let Some(exit) = Exit::from_wait(status) {
                    self.exited(exit);
                }
            }
            Err(_) => self.lost(),
        }
    }

    /// A plugin stopped the checker (`signal`): it is killed (the caller
    /// still reaps it), and the report says so.
    pub fn stopped(&mut self, signal: Signal) {
        if self.stopped.is_none() && self.outcome.is_none() {
            self.stopped = Some(signal);
            let _ = nix::sys::signal::kill(self.child, Signal::SIGKILL);
        }
    }

    /// The checker's status could not be read.
    pub fn lost(&mut self) {
        self.outcome = Some(Outcome::Lost);
    }

    /// Whether the checker has been reaped: [`Check::finish`] gives the report.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// When the checker will be killed if it makes no progress; `None`
    /// once it has been killed (it is then only waited for).
    pub fn deadline(&self) -> Option<Instant> {
        (!self.killed && self.outcome.is_none()).then_some(self.deadline)
    }

    /// Kills the checker if it is past its deadline (the caller still reaps it).
    pub fn enforce_deadline(&mut self, now: Instant) {
        if !self.killed && self.outcome.is_none() && now >= self.deadline {
            let _ = nix::sys::signal::kill(self.child, Signal::SIGKILL);
            self.killed = true;
        }
    }

    /// Stops a check that is no longer wanted (the server is stopping):
    /// kills the checker and what it started. The caller reaps it.
    pub fn abort(self) {
        let _ = nix::sys::signal::kill(self.child, Signal::SIGKILL);
        super::sweep_group(self.child);
    }

    /// The report of a reaped checker.
    pub fn finish(mut self) -> Report {
        // Whatever it wrote just before exiting.
        self.read_available();
        // Whatever the plugins started in the child's process group goes
        // with it (a daemon forked in init, say).
        super::sweep_group(self.child);
        let text = String::from_utf8_lossy(&self.bytes).into_owned();
        let limit = self.limit;
        let mut report = self.report;
        let mut loading: Option<&str> = None;
        // The plugin whose destroy runs (after a good load).
        let mut destroying: Option<&str> = None;
        let mut names: Vec<&str> = Vec::new();
        for line in text.lines() {
            match line.split_once('\t') {
                Some(("LOADING", what)) => {
                    loading = Some(what);
                    destroying = None;
                    names.push(what);
                }
                Some(("OK", what)) => {
                    loading = None;
                    report.loaded.push(what.to_string());
                }
                Some(("DESTROYING", what)) => destroying = Some(what),
                Some(("ERROR", what)) => {
                    loading = None;
                    report.errors.push(what.to_string());
                }
                _ => {}
            }
        }
        let outcome = self.outcome.unwrap_or(Outcome::Lost);
        if let Some(tampered) = self.verdict.get() {
            // Whatever it exited with: its descriptors were tampered with.
            let who = loading.or(destroying).unwrap_or("a plugin");
            report.errors.push(format!(
                "{who}: its init {tampered}, which belongs to the host; a plugin must close or replace only descriptors it opened itself"
            ));
            return report;
        }
        if let Some(what) = destroying.filter(|_| loading.is_none()) {
            match outcome {
                Outcome::Exited(Exit::Code(0)) => {}
                Outcome::TimedOut => report.errors.push(format!(
                    "{what}: its destroy did not return within init_timeout = {limit:?} (does it wait for something?)"
                )),
                Outcome::Stopped(signal) => report.errors.push(format!(
                    "{what}: stopped the process in its destroy ({signal}); a plugin must never stop its process (nothing would resume it)"
                )),
                Outcome::Exited(exit) => report.errors.push(format!(
                    "{what}: ended the process in its destroy: {}",
                    exit.inside_plugin()
                )),
                Outcome::Lost => report.errors.push(format!(
                    "{what}: the plugin checker failed ({})",
                    Outcome::Lost
                )),
            }
            return report;
        }
        match (outcome, loading) {
            (Outcome::TimedOut, Some(what)) => report.errors.push(format!(
                "{what}: did not finish loading within init_timeout = {limit:?} (does its init block? raise [server] init_timeout if it legitimately takes longer)"
            )),
            (Outcome::Stopped(signal), Some(what)) => report.errors.push(format!(
                "{what}: stopped the process while loading ({signal}); a plugin must never stop its process (nothing would resume it)"
            )),
            (Outcome::Exited(Exit::Code(0)), None) => {}
            (Outcome::Exited(exit), Some(what)) => report.errors.push(format!(
                "{what}: ended the process while loading: {}",
                exit.inside_plugin()
            )),
            (outcome, None) => report
                .errors
                .push(format!("the plugin checker failed ({outcome})")),
            (Outcome::Lost, Some(what)) => report.errors.push(format!(
                "{what}: the plugin checker failed ({})",
                Outcome::Lost
            )),
        }
        report
    }
}

/// How the checker child ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Exited(Exit),
    /// No progress for longer than the limit: killed.
    TimedOut,
    /// A plugin stopped it with this signal: killed.
    Stopped(Signal),
    /// `waitpid` failed.
    Lost,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(exit) => write!(f, "{exit}"),
            Outcome::TimedOut => f.write_str("timed out"),
            Outcome::Stopped(signal) => write!(f, "stopped by {signal}"),
            Outcome::Lost => f.write_str("its status could not be read"),
        }
    }
}

/// The most report text kept from the checker.
const MAX_REPORT_BYTES: usize = 1 << 20;

/// The child: report `LOADING`, then `OK` or `ERROR`, per plugin, one line each.
fn child(config: &Config, mut out: std::io::PipeWriter, verdict: &Verdict) -> i32 {
    // Plugins are checked as the user that will run them (before the
    // parent-death signal, which a change of user clears).
    if let Err(why) = crate::privileges::drop_for_plugins(config.server.run_as.as_ref()) {
        let _ = writeln!(out, "ERROR\t{}", one_line(&why));
        return 1;
    }
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The master's blocked signals are not the plugins' business: what an
    // init starts (a daemon, say) must not inherit them.
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    // Its own process group, swept by the master afterwards.
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    // Only the report pipe and the plugin images are this process's
    // business: the master's listeners, admin socket and signalfd must not
    // reach anything a plugin forks here.
    let mut keep: Vec<RawFd> = vec![0, 1, 2, out.as_raw_fd()];
    keep.extend(
        config
            .plugins
            .iter()
            .filter_map(|p| p.image.as_ref())
            .map(|i| i.as_raw_fd()),
    );
    close_all_but(&keep);
    // A crash in an init ends the check by its signal, as it would end a
    // worker: even a SIGSEGV the plugin sends itself (see there).
    crate::signals::catch_plugin_faults(crate::signals::Faulting::Check);
    crate::fork_guard::install();
    for &fd in &keep[3..] {
        crate::fork_guard::protect(fd);
    }
    let count = config.server.worker_count() as u32;
    let descriptors = crate::fork_guard::snapshot();
    for (index, spec) in config.plugins.iter().enumerate() {
        if spec.image.is_none() {
            // Its file could not be read: already reported.
            continue;
        }
        let what = one_line(&format!("plugin {:?} ({})", spec.name, spec.path.display()));
        let _ = writeln!(out, "LOADING\t{what}");
        let _ = out.flush();
        // One instance, even of a pool (see `Plugin::load_to_check`).
        let loaded = Plugin::load_to_check(spec, 0, count);
        if let Some(tampered) = descriptors.first_tampered() {
            // The report pipe may be the one: say it through the shared
            // word (and do not close anything again: std aborts on a
            // double close).
            verdict.set(index, tampered);
            std::mem::forget(out);
            std::mem::forget(loaded);
            return 1;
        }
        match loaded {
            Ok(plugin) => {
                let pool = match spec.threads {
                    0 => String::new(),
                    n => format!(" (threads = {n}: checked with one instance, thread 0 of {n})"),
                };
                let _ = writeln!(out, "OK\t{}{pool}", one_line(&plugin.describe()));
                // Its destroy runs now: a hang or crash there is its own.
                let _ = writeln!(out, "DESTROYING\t{what}");
                let _ = out.flush();
                drop(plugin);
            }
            Err(e) => {
                let _ = writeln!(out, "ERROR\t{}", one_line(&e.to_string()));
            }
        }
    }
    0
}

/// Closes every descriptor of this process but `keep`.
fn close_all_but(keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if !keep.contains(&fd) {
            // SAFETY: this fresh child owns no Rust object for these
            // descriptors except the listing's own, already dropped (a
            // failed close of it is harmless).
            unsafe { libc::close(fd) };
        }
    }
}

fn one_line(text: &str) -> String {
    crate::logging::untrusted(text).replace('\t', " ")
}

/// What `--check` finds out by trying each listener's address (without
/// keeping it): problems that would stop the server, and warnings.
#[derive(Debug, Default)]
pub struct AddressReport {
    /// Addresses the server could not listen on.
    pub errors: Vec<String>,
    /// Addresses in use (fine if that is this nbnet, already running).
    pub warnings: Vec<String>,
}

/// Tries to bind every TCP listener (and checks every Unix listener's path)
/// of `config`, releasing each at once. An address in use is only a warning:
/// `--check` is often run while the server is up.
pub fn probe_listeners(config: &Config) -> AddressReport {
    use crate::listener::{Endpoint, ListenSocket};
    let mut report = AddressReport::default();
    for spec in &config.listeners {
        let place = format!("{}:{}", config.file.display(), spec.line);
        match &spec.addr {
            Endpoint::Tcp(addr) => match ListenSocket::bind_tcp(*addr, spec.reuseport) {
                Ok(socket) => drop(socket),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.warnings.push(format!(
                    "listener {addr} ({place}): address in use (expected if this nbnet is already running)"
                )),
                Err(e) => report
                    .errors
                    .push(format!("listener {addr} ({place}): cannot listen: {e}")),
            },
            Endpoint::Unix(path) => {
                let folder = path.parent().unwrap_or(std::path::Path::new("/"));
                if !folder.is_dir() {
                    report.errors.push(format!(
                        "listener {} ({place}): folder {} does not exist",
                        spec.addr,
                        folder.display()
                    ));
                } else if path.exists() && !is_socket(path) {
                    report.errors.push(format!(
                        "listener {} ({place}): the path exists and is not a socket",
                        spec.addr
                    ));
                }
            }
        }
    }
    report
}

fn is_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
