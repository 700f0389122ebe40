//! The nbnet config file: TOML, read with serde, validated into a [`Config`].
//!
//! Loading is layered so that tests can feed strings: [`load`] reads a file,
//! [`parse`] turns text into a validated [`Config`]. Every problem is reported
//! as `file:line: message`, and validation collects all problems instead of
//! stopping at the first, so one `nbnet --check` run shows everything to fix.
//!
//! The rule validation keeps: whatever it accepts, startup and run time
//! accept and never panic on. So every number has a documented range (the
//! arithmetic done with it cannot overflow), listeners the kernel would
//! refuse to bind side by side are refused here, and every value a message
//! quotes is escaped and cut short ([`quote`]). Validation is linear in the
//! size of the file, which is capped at [`MAX_CONFIG_BYTES`].
//!
//! Where things are:
//! - this file: the validated types ([`Config`] and its tables), reading
//!   the file ([`load`], [`read_text`]) and [`parse`], which checks the
//!   `[[plugins]]` and `[[listeners]]` entries and the rules across tables;
//! - `raw`: the TOML shapes as written (every value with its span);
//! - `checker`: the problem collector and the `[server]` table's ranges;
//! - `addresses`: listener addresses and the bind conflicts between them;
//! - `error`: [`ConfigError`] and the helpers that make values safe to show.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use crate::codec::MAX_DECLARED;
pub use crate::listener::Endpoint;

mod addresses;
mod checker;
mod error;
mod raw;
#[cfg(test)]
mod tests;

use addresses::*;
use checker::*;
use error::Lines;
pub use error::{bounded, quote, shown, ConfigError, Problem};
use raw::*;

/// Most workers a config may ask for: the master's scoreboard holds twice
/// as many, so that a reload can run both generations side by side.
pub const MAX_WORKERS: usize = 512;

/// Default config file, relative to the current directory.
pub const DEFAULT_PATH: &str = "config/nbnet.toml";

/// Largest config file nbnet reads: 16 MiB. A real config is a few KiB (a
/// thousand plugins take about 60 KiB); the cap bounds the time and memory
/// reading and validating a file can take (see BENCHMARKS.md).
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Shortest `[server]` duration: the event loops wait in whole
/// milliseconds, so a shorter timeout could not be honoured.
pub const MIN_DURATION: Duration = Duration::from_millis(1);

/// Longest `[server]` duration: one day. Deadlines are computed as "now +
/// duration"; a day is longer than any sensible wait for a connection, a
/// plugin or a stop, and keeps that arithmetic far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Most restarts `max_restarts` may allow: the master remembers the time of
/// each restart within `restart_window`, so this bounds that list.
pub const MAX_RESTARTS: u32 = 1_000_000;

/// Most connections per worker: each needs a file descriptor, and Linux
/// allows a process at most `fs.nr_open` (1 048 576 by default) of them.
pub const MAX_CONNECTIONS: usize = 16 * 1024 * 1024;
/// Largest `max_deferred_per_connection` / `max_deferred_per_worker`.
pub const MAX_DEFERRED: usize = 16 * 1024 * 1024;

/// The largest `max_buffered_bytes`: 1 TiB per worker, far past any
/// machine's memory, and small enough that sums of buffer sizes cannot
/// overflow.
pub const MAX_BUFFERED_BYTES: u64 = 1 << 40;

/// Most requests `max_requests_per_worker` and `max_requests_jitter` may
/// each be (10^15: over three years at ten million requests a second), so
/// that their sum cannot overflow.
pub const MAX_REQUESTS: u64 = 1_000_000_000_000_000;

/// Longest plugin name, in bytes: names appear in every log line and
/// metric about the plugin.
pub const MAX_NAME_BYTES: usize = 128;

/// Longest path nbnet passes to the system (`PATH_MAX` includes the NUL).
pub(super) const MAX_PATH_BYTES: usize = libc::PATH_MAX as usize - 1;

/// Longest Unix socket path: `sockaddr_un.sun_path` holds 108 bytes,
/// including the terminating NUL.
pub const MAX_UNIX_PATH_BYTES: usize = 107;

/// Characters of a config value or line that a message quotes at most.
pub const QUOTE_CHARS: usize = 200;

/// Problems a [`ConfigError`] shows at most; the rest are counted.
pub(super) const SHOWN_PROBLEMS: usize = 100;

/// A validated config, ready to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (as given), for messages.
    pub file: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[admin]`: where the master serves `/metrics` and `/healthz`, if anywhere.
    pub admin: Option<SocketAddr>,
    /// The line of `[admin] addr`, for messages.
    pub admin_line: Option<usize>,
    /// `[[plugins]]`, paths resolved.
    pub plugins: Vec<PluginSpec>,
    /// `[[listeners]]`, each pointing at an entry of `plugins`.
    pub listeners: Vec<ListenerSpec>,
}

/// `[server]`: process model and per-connection limits. Every value is
/// within the range its doc states (checked by [`parse`]).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Worker processes to fork; 0 means one per CPU. `0 ..= MAX_WORKERS`.
    pub workers: usize,
    /// Worker restarts within `restart_window` after which the master gives
    /// up and stops (nbNet's `max_restarts`, counted over a sliding window
    /// so that rare crashes over months never add up to a shutdown).
    /// `0 ..= MAX_RESTARTS`.
    pub max_restarts: u32,
    /// The sliding window `max_restarts` is counted over. 1 ms ..= 1 day.
    pub restart_window: Duration,
    /// A plugin call running longer than this is considered hung: the
    /// master kills that worker and starts a new one. 1 ms ..= 1 day.
    pub plugin_timeout: Duration,
    /// How long a plugin's init may take (in `--check`, at startup and in
    /// each worker) before the plugin is considered hung. 1 ms ..= 1 day:
    /// an init that loads large data may take minutes, not days.
    pub init_timeout: Duration,
    /// Close a connection that sends nothing (or is not read) for this long.
    /// 1 ms ..= 1 day.
    pub read_timeout: Duration,
    /// Largest request or response payload, in bytes. `1 ..= MAX_DECLARED`
    /// (the largest length a 10-digit header can declare).
    pub max_frame_bytes: usize,
    /// Open client connections per worker; past it the worker stops
    /// accepting. `1 ..= MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// Response bytes one connection may have waiting (its client not
    /// reading them) before the worker stops answering and reading its
    /// further requests. Bounds memory per connection to about twice this
    /// plus one `max_frame_bytes` response. `1 ..= MAX_DECLARED`.
    pub max_pending_output_bytes: usize,
    /// Bytes one worker's connections may hold in their buffers together
    /// (unfinished requests and unsent responses, as allocated); past it
    /// the connections holding the most are closed, largest first (Redis'
    /// `maxmemory-clients`). `max_frame_bytes ..= MAX_BUFFERED_BYTES`.
    pub max_buffered_bytes: usize,
    /// Deferred answers (ABI 1.3) one connection may have pending; at it
    /// the worker stops answering and reading that connection's further
    /// requests until one completes (a `process_batch` call may go past it
    /// by the rest of its batch). `1 ..= MAX_DEFERRED`.
    pub max_deferred_per_connection: usize,
    /// Deferred answers one worker may have pending; a request deferred
    /// past it fails (its connection is closed). `1 ..= MAX_DEFERRED`.
    pub max_deferred_per_worker: usize,
    /// A deferred request not completed within this fails: its connection
    /// is closed, the plugin named in the log. 1 ms ..= 1 day.
    pub deferred_timeout: Duration,
    /// How long a graceful stop (SIGTERM) may take: connections still busy
    /// after it are cut. 1 ms ..= 1 day.
    pub shutdown_timeout: Duration,
    /// On a graceful stop, how long the master keeps serving normally while
    /// `/healthz` answers `503 draining` (a lame-duck period for load
    /// balancers) before the stop begins. 0 ..= 1 day.
    pub drain_delay: Duration,
    /// Replace a worker after it has answered this many requests (0 = never),
    /// to bound the effect of slow leaks in plugins (gunicorn's max_requests).
    /// `0 ..= MAX_REQUESTS`.
    pub max_requests_per_worker: u64,
    /// Up to this many more requests, chosen per worker, so that workers
    /// started together are not all replaced at once. `0 ..= MAX_REQUESTS`.
    pub max_requests_jitter: u64,
    /// Where the master writes its PID (for `nbnet reload` / `nbnet stop`);
    /// relative to the config file's folder. None: no PID file.
    pub pid_file: Option<PathBuf>,
    /// `user` / `group`, looked up: what the processes that load plugins
    /// (workers, the checker) run as when the master runs as root (see
    /// [`crate::privileges`]).
    pub run_as: Option<crate::privileges::RunAs>,
    /// Run plugins as root anyway (when nbnet runs as root without `user`).
    pub allow_root: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            max_restarts: 100,
            restart_window: Duration::from_secs(60),
            plugin_timeout: Duration::from_secs(5),
            init_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(30),
            max_frame_bytes: 16 * 1024 * 1024,
            max_connections: 10_000,
            max_pending_output_bytes: 1024 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
            max_deferred_per_connection: 128,
            max_deferred_per_worker: 65_536,
            deferred_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            max_requests_per_worker: 0,
            max_requests_jitter: 0,
            pid_file: None,
            run_as: None,
            allow_root: false,
        }
    }
}

impl ServerConfig {
    /// The number of workers to run: `workers`, or the CPU count when it is
    /// 0 (at most [`MAX_WORKERS`], which the scoreboard is sized for).
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_WORKERS),
            n => n.min(MAX_WORKERS),
        }
    }

    /// The request count after which a worker asks to be replaced:
    /// `max_requests_per_worker` plus a share of `max_requests_jitter`
    /// derived from `seed` (the worker's PID, so that workers started
    /// together retire at different times); `None` when unlimited.
    /// Saturating: no value can make it overflow or divide by zero.
    pub fn retire_after(&self, seed: u64) -> Option<u64> {
        let limit = self.max_requests_per_worker;
        if limit == 0 {
            return None;
        }
        let jitter = self.max_requests_jitter;
        let spread = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let extra = match jitter.checked_add(1) {
            Some(modulus) => spread % modulus,
            None => spread,
        };
        Some(limit.saturating_add(extra))
    }
}

/// `from + after`, or the latest instant this platform can represent on
/// the way there: a deadline computed from a config value never panics.
pub fn deadline(from: Instant, after: Duration) -> Instant {
    let mut step = after;
    loop {
        if let Some(at) = from.checked_add(step) {
            return at;
        }
        step /= 2;
        if step.is_zero() {
            return from;
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    /// Log level; `RUST_LOG` overrides it.
    pub level: LogLevel,
    /// Log to this file (appended; reopened on SIGUSR1) instead of stderr;
    /// relative to the config file's folder.
    pub file: Option<PathBuf>,
    /// The line of `file` in the config file, for messages.
    pub file_line: Option<usize>,
    /// Plain text lines, or one JSON object per line.
    pub format: LogFormat,
}

/// `[log] format`: how each log line is written.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO message field=value`, for people.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields` with
    /// `message` and the event's values such as `worker`, `pid`, `peer`),
    /// for log collectors.
    Json,
}

impl LogFormat {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl LogConfig {
    /// Whether `other` logs to the same place (the same file, compared
    /// once normalised lexically, or both to stderr).
    pub fn same_file(&self, other: &LogConfig) -> bool {
        match (&self.file, &other.file) {
            (None, None) => true,
            (Some(a), Some(b)) => normalize_lexically(a) == normalize_lexically(b),
            _ => false,
        }
    }
}

/// A log level name as written in the config.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default: lifecycle events and problems.
    #[default]
    Info,
    /// Every connection state transition, like nbNet's debug switch.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// One `[[plugins]]` entry after validation.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The name listeners refer to it by: at most [`MAX_NAME_BYTES`], no
    /// control characters.
    pub name: String,
    /// Absolute path of the `.so` (relative paths resolve against the config's folder).
    pub path: PathBuf,
    /// The plugin's own `config` table, re-serialized as TOML for the plugin.
    pub config_toml: String,
    /// Line of the entry in the config file, for messages.
    pub line: usize,
    /// A sealed in-memory copy of the `.so`, taken by the master when it
    /// validates the config ([`crate::plugin::image`]): what the check and
    /// every worker of this config load, whatever happens to the file.
    /// `None` until taken (then the file at `path` is loaded).
    pub image: Option<crate::plugin::image::Image>,
    /// `threads`: 0 runs the plugin on the worker's reactor thread; N > 0
    /// gives each worker a pool of N threads, one instance each.
    /// `0 ..= MAX_PLUGIN_THREADS`.
    pub threads: usize,
    /// `[server] plugin_timeout`, for a pool thread's calls.
    pub plugin_timeout: Duration,
    /// `[server] max_frame_bytes`: the largest answer a pool thread's
    /// instance may write (the reactor's sink has the same limit).
    pub max_frame_bytes: usize,
}

/// Largest `[[plugins]] threads`.
pub const MAX_PLUGIN_THREADS: usize = 1024;

/// One `[[listeners]]` entry after validation.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Where to listen: `IP:PORT`, or `unix:/path`.
    pub addr: Endpoint,
    /// Index into [`Config::plugins`] of the plugin serving it.
    pub plugin: usize,
    /// Line of the entry in the config file, for messages.
    pub line: usize,
    /// Every connection must start with a PROXY protocol (v1 or v2) header,
    /// which gives the real client's address.
    pub proxy_protocol: bool,
    /// TCP only: one `SO_REUSEPORT` socket per worker instead of one shared
    /// socket (the kernel spreads connections; see the README).
    pub reuseport: bool,
    /// Unix sockets only: the socket file's permissions (e.g. 0o660).
    pub mode: Option<u32>,
    /// `allow` / `deny`: which client addresses may connect (see
    /// [`crate::access`]); `None` admits everyone.
    pub access: Option<std::sync::Arc<crate::access::AccessList>>,
    /// `tls = { … }`: its certificate, key and rustls configuration, read
    /// and built when the config is loaded (see [`crate::tls`]).
    pub tls: Option<crate::tls::TlsListener>,
}

/// Reads and validates the config file at `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = read_text(file).map_err(|(line, message)| ConfigError {
        file: file.to_path_buf(),
        problems: vec![Problem::at(line, message)],
    })?;
    parse(file, &text)
}

/// Reads a config file's text, refusing what nbnet cannot read safely: a
/// file that is not a regular file (a FIFO or a device would block or
/// never end; it is opened non-blocking and checked before anything is
/// read), one over [`MAX_CONFIG_BYTES`], or one that is not UTF-8. The
/// error is `(line, message)`, for a [`ConfigError`] about `file`.
pub fn read_text(file: &Path) -> Result<String, (Option<usize>, String)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| (None, format!("cannot read the config file: {e}"));
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(file)
        .map_err(cannot)?;
    let meta = opened.metadata().map_err(cannot)?;
    if let Some(what) = not_a_file(&meta.file_type()) {
        return Err((
            None,
            format!("cannot read the config file: it is {what}; give --config a regular file"),
        ));
    }
    let too_big = |size: u64| {
        (
            None,
            format!(
                "the config file is {size} bytes, over the limit of {MAX_CONFIG_BYTES} bytes (16 MiB) nbnet reads; is it the right file?"
            ),
        )
    };
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        // It grew while being read.
        return Err(too_big(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        (
            Some(line),
            format!(
                "the config file is not UTF-8 text (byte {} of the file is 0x{:02x}); save it as UTF-8",
                at + 1,
                bytes[at]
            ),
        )
    })
}

/// Validates config `text`, read from `file` (used for messages and to
/// resolve relative plugin paths).
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let lines = Lines::new(text);
    let fail = |problems| ConfigError {
        file: file.to_path_buf(),
        problems,
    };

    // Every unknown key and value of the wrong type, not the first only.
    let read = raw::read(text, &lines).map_err(fail)?;
    let raw = match read.raw {
        Some(raw) if read.complete => raw,
        // An entry had to be left out: checking the rest would report
        // what its absence breaks (a listener naming a plugin left out).
        _ => {
            let mut problems = read.problems;
            raw::in_file_order(&mut problems);
            return Err(fail(problems));
        }
    };

    let mut check = Checker {
        lines: &lines,
        problems: read.problems,
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let server = check.server(&raw.server, base);
    let log = LogConfig {
        level: raw.log.level,
        file: check.path("[log] file", &raw.log.file, base, "log to stderr"),
        file_line: raw.log.file.as_ref().map(|f| lines.line_of(f.span().start)),
        format: raw.log.format,
    };
    // The files nbnet writes must not be one it reads or serves: a
    // pid_file naming the config, a plugin or a socket overwrote it (and
    // removed it at stop).
    let line_of =
        |value: &Option<Spanned<String>>| value.as_ref().map(|v| lines.line_of(v.span().start));
    let mut written = Vec::with_capacity(2);
    if let Some(path) = &server.pid_file {
        written.push(Written::new(
            "[server] pid_file",
            line_of(&raw.server.pid_file),
            path,
            "nbnet would write its PID there and remove the file when it stops",
        ));
    }
    if let Some(path) = &log.file {
        written.push(Written::new(
            "[log] file",
            line_of(&raw.log.file),
            path,
            "nbnet would append its log lines there",
        ));
    }
    let config_file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    check.shared(&written, &config_file, || {
        "the config file itself".to_string()
    });
    if let [pid_file, log_file] = written.as_slice() {
        check.shared(std::slice::from_ref(log_file), pid_file.path, || {
            format!("[server] pid_file ({})", pid_file.place(file))
        });
    }
    if server.max_buffered_bytes < server.max_frame_bytes {
        let key = raw
            .server
            .max_buffered_bytes
            .as_ref()
            .map(|v| v.span().start)
            .or_else(|| raw.server.max_frame_bytes.as_ref().map(|v| v.span().start));
        check.problem(
            key.map(|at| lines.line_of(at)),
            format!(
                "[server] max_buffered_bytes = {} is below max_frame_bytes = {}: a budget for all connections' buffers must hold at least one frame; raise max_buffered_bytes (or lower max_frame_bytes)",
                server.max_buffered_bytes, server.max_frame_bytes
            ),
        );
    }

    let mut plugins: Vec<PluginSpec> = Vec::with_capacity(raw.plugins.len());
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(raw.plugins.len());
    for entry in &raw.plugins {
        let line = lines.line_of(entry.span().start);
        let plugin = entry.get_ref();
        let name = plugin.name.get_ref().trim();
        let name_line = Some(lines.line_of(plugin.name.span().start));
        if name.is_empty() {
            check.problem(Some(line), "a [[plugins]] entry has an empty name".into());
        } else if name.len() > MAX_NAME_BYTES {
            check.problem(
                name_line,
                format!(
                    "plugin name {} is {} bytes long; use at most {MAX_NAME_BYTES}",
                    quote(name),
                    name.len()
                ),
            );
        } else if name.chars().any(char::is_control) {
            check.problem(
                name_line,
                format!(
                    "plugin name {} contains a control character; names appear in logs and metrics, use printable characters",
                    quote(name)
                ),
            );
        } else if let Some(&first) = by_name.get(name) {
            check.problem(
                name_line,
                format!(
                    "duplicate plugin name {} (first defined on line {}); give each [[plugins]] entry its own name",
                    quote(name),
                    plugins[first].line
                ),
            );
        }
        let path_text = plugin.path.get_ref();
        let path_line = Some(lines.line_of(plugin.path.span().start));
        let path =
            std::path::absolute(base.join(path_text)).unwrap_or_else(|_| base.join(path_text));
        if path_text.is_empty() {
            check.problem(
                path_line,
                format!("plugin {} has an empty path", quote(name)),
            );
        } else if path_text.contains(char::is_control) {
            check.problem(
                path_line,
                format!(
                    "plugin {}: path {} contains a control character; rename the file",
                    quote(name),
                    quote(path_text)
                ),
            );
        } else if path.as_os_str().len() > MAX_PATH_BYTES {
            check.problem(
                path_line,
                format!(
                    "plugin {}: path {} is {} bytes long once resolved, over the system's limit of {MAX_PATH_BYTES}",
                    quote(name),
                    quote(path_text),
                    path.as_os_str().len()
                ),
            );
        }
        check.shared(&written, &path, || {
            format!(
                "the path of plugin {} ({}:{})",
                quote(name),
                shown(file),
                lines.line_of(plugin.path.span().start)
            )
        });
        let config_toml = match &plugin.config {
            Some(table) => toml::to_string(table).unwrap_or_default(),
            None => String::new(),
        };
        let threads = match &plugin.threads {
            None => 0,
            Some(value) => match usize::try_from(value.get_ref().0) {
                Ok(n) if n <= MAX_PLUGIN_THREADS => n,
                _ => {
                    check.problem(
                        Some(lines.line_of(value.span().start)),
                        format!(
                            "plugin {}: threads = {} is out of range: must be between 0 (run on the worker's event loop) and {MAX_PLUGIN_THREADS}",
                            quote(name),
                            value.get_ref().0
                        ),
                    );
                    0
                }
            },
        };
        by_name.entry(name).or_insert(plugins.len());
        plugins.push(PluginSpec {
            name: name.to_string(),
            path,
            config_toml,
            line,
            image: None,
            threads,
            plugin_timeout: Duration::ZERO,
            max_frame_bytes: 0,
        });
    }

    let mut addresses = Addresses::new(v6_wildcard_takes_ipv4());
    let mut listeners: Vec<ListenerSpec> = Vec::with_capacity(raw.listeners.len());
    for entry in &raw.listeners {
        let line = lines.line_of(entry.span().start);
        let listener = entry.get_ref();
        let addr_text = listener.addr.get_ref();
        let addr_line = Some(lines.line_of(listener.addr.span().start));
        let addr = match parse_endpoint(addr_text, base) {
            Ok(addr) => Some(addr),
            Err(why) => {
                check.problem(addr_line, why);
                None
            }
        };
        let reuseport = listener.reuseport.as_ref().is_some_and(|r| *r.get_ref());
        if let Some(addr) = &addr {
            if let Err(why) = addresses.add(addr, reuseport, line) {
                check.problem(addr_line, why);
            }
            if let Endpoint::Unix(socket) = addr {
                check.shared(&written, socket, || {
                    format!(
                        "the socket of listener {addr} ({}:{})",
                        shown(file),
                        lines.line_of(listener.addr.span().start)
                    )
                });
            }
            let unix = matches!(addr, Endpoint::Unix(_));
            if let Some(reuseport) = listener.reuseport.as_ref().filter(|r| *r.get_ref() && unix) {
                check.problem(
                    Some(lines.line_of(reuseport.span().start)),
                    format!("listener {addr}: reuseport applies to TCP listeners only"),
                );
            }
            if !unix && listener.mode.is_some() {
                check.problem(
                    addr_line,
                    format!("listener {addr}: mode applies to unix: listeners only"),
                );
            }
        }
        let mode = match &listener.mode {
            None => None,
            Some(text) => match u32::from_str_radix(text.get_ref().trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => Some(mode),
                _ => {
                    check.problem(
                        Some(lines.line_of(text.span().start)),
                        format!(
                            "listener mode {} is not octal permissions (for example \"0660\")",
                            quote(text.get_ref())
                        ),
                    );
                    None
                }
            },
        };
        let access = {
            let list = |l: &Option<Spanned<Vec<String>>>| {
                l.as_ref().map(|l| l.get_ref().clone()).unwrap_or_default()
            };
            let first = listener
                .allow
                .as_ref()
                .or(listener.deny.as_ref())
                .map(|l| lines.line_of(l.span().start));
            if let Some(allow) = listener.allow.as_ref().filter(|a| a.get_ref().is_empty()) {
                check.problem(
                    Some(lines.line_of(allow.span().start)),
                    format!(
                        "listener {addr_text}: allow = [] would read as \"nobody\" but lists nothing to check against; remove it to admit every client, or list the networks to admit"
                    ),
                );
            }
            match crate::access::AccessList::parse(&list(&listener.allow), &list(&listener.deny)) {
                Ok(access) if access.is_empty() => None,
                Ok(access) => {
                    if matches!(addr, Some(Endpoint::Unix(_))) && !listener.proxy_protocol {
                        check.problem(
                            first,
                            format!(
                                "listener {addr_text}: allow/deny need client IP addresses, which a unix: listener has only with proxy_protocol = true; remove them (use the socket file's mode to decide who connects)"
                            ),
                        );
                    }
                    Some(std::sync::Arc::new(access))
                }
                Err(why) => {
                    let line = match (&listener.allow, &listener.deny) {
                        (Some(_), Some(deny)) if why.starts_with("deny") => {
                            Some(lines.line_of(deny.span().start))
                        }
                        _ => first,
                    };
                    check.problem(line, format!("listener {addr_text}: {why}"));
                    None
                }
            }
        };
        if let Some(tls) = &listener.tls {
            // A certificate or key nbnet would overwrite with its PID or
            // log lines (and, for the log, hand to the workers' user).
            let raw_tls = tls.get_ref();
            let tls_line = lines.line_of(tls.span().start);
            for (what, written_path) in [
                ("cert", Some(&raw_tls.cert)),
                ("key", Some(&raw_tls.key)),
                ("client_ca", raw_tls.client_ca.as_ref()),
            ] {
                let Some(written_path) = written_path else {
                    continue;
                };
                let path = std::path::absolute(base.join(written_path))
                    .unwrap_or_else(|_| base.join(written_path));
                check.shared(&written, &path, || {
                    format!(
                        "the tls {what} file of listener {addr_text} ({}:{tls_line})",
                        shown(file)
                    )
                });
            }
        }
        let tls =
            listener
                .tls
                .as_ref()
                .and_then(|tls| match crate::tls::load(tls.get_ref(), base) {
                    Ok(tls) => Some(tls),
                    Err(problems) => {
                        let line = Some(lines.line_of(tls.span().start));
                        for problem in problems {
                            check.problem(line, format!("listener {addr_text}: {problem}"));
                        }
                        None
                    }
                });
        let plugin_name = listener.plugin.get_ref().trim();
        let plugin = match by_name.get(plugin_name) {
            Some(&index) => Some(index),
            None => {
                check.problem(
                    Some(lines.line_of(listener.plugin.span().start)),
                    format!(
                        "listener {} names plugin {}, which no [[plugins]] entry defines (defined: {})",
                        addr.as_ref().map_or_else(|| quote(addr_text), |a| a.to_string()),
                        quote(plugin_name),
                        some_names(&plugins)
                    ),
                );
                None
            }
        };
        if let (Some(addr), Some(plugin)) = (addr, plugin) {
            listeners.push(ListenerSpec {
                addr,
                plugin,
                line,
                proxy_protocol: listener.proxy_protocol,
                reuseport,
                mode,
                access,
                tls,
            });
        }
    }
    let admin = raw.admin.as_ref().and_then(|admin| {
        let text = admin.addr.get_ref();
        let line = Some(lines.line_of(admin.addr.span().start));
        match text.parse::<SocketAddr>() {
            Ok(addr) => match addresses.admin(addr) {
                Ok(()) => Some(addr),
                Err(why) => {
                    check.problem(line, why);
                    None
                }
            },
            Err(_) => {
                check.problem(
                    line,
                    format!(
                        "[admin] addr {} is not IP:PORT (for example \"127.0.0.1:9191\")",
                        quote(text)
                    ),
                );
                None
            }
        }
    });
    if raw.listeners.is_empty() {
        check.problem(
            None,
            "no [[listeners]]: add one, e.g. [[listeners]] addr = \"127.0.0.1:9000\" plugin = \"upper\"".into(),
        );
    }

    if !check.problems.is_empty() {
        // In file order (stable: problems on one line keep theirs).
        raw::in_file_order(&mut check.problems);
        return Err(fail(check.problems));
    }
    for plugin in &mut plugins {
        plugin.plugin_timeout = server.plugin_timeout;
        plugin.max_frame_bytes = server.max_frame_bytes;
    }
    Ok(Config {
        file: file.to_path_buf(),
        server,
        log,
        admin,
        admin_line: raw
            .admin
            .as_ref()
            .map(|admin| lines.line_of(admin.addr.span().start)),
        plugins,
        listeners,
    })
}

/// The names of the first few plugins, for a message.
fn some_names(plugins: &[PluginSpec]) -> String {
    const SHOWN: usize = 10;
    if plugins.is_empty() {
        return "none".into();
    }
    let mut names: Vec<String> = plugins.iter().take(SHOWN).map(|p| quote(&p.name)).collect();
    if plugins.len() > SHOWN {
        names.push(format!("and {} more", plugins.len() - SHOWN));
    }
    names.join(", ")
}

/// What a file that should be a regular file is instead ("a directory",
/// "a FIFO (named pipe)", …), for messages; `None` for a regular file.
pub fn not_a_file(kind: &std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    Some(if kind.is_file() {
        return None;
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    })
}
