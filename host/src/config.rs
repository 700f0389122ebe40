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

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;

use crate::codec::MAX_DECLARED;
pub use crate::listener::Endpoint;

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
const MAX_PATH_BYTES: usize = libc::PATH_MAX as usize - 1;

/// Longest Unix socket path: `sockaddr_un.sun_path` holds 108 bytes,
/// including the terminating NUL.
pub const MAX_UNIX_PATH_BYTES: usize = 107;

/// Characters of a config value or line that a message quotes at most.
pub const QUOTE_CHARS: usize = 200;

/// Problems a [`ConfigError`] shows at most; the rest are counted.
const SHOWN_PROBLEMS: usize = 100;

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

/// `[log]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: LogLevel,
    file: Option<Spanned<String>>,
    format: LogFormat,
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

/// Everything wrong with a config file.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Each problem: a line (when known) and a message.
    pub problems: Vec<(Option<usize>, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (line, message)) in self.problems.iter().take(SHOWN_PROBLEMS).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let file = shown(&self.file);
            match line {
                Some(line) => write!(f, "{file}:{line}: {message}")?,
                None => write!(f, "{file}: {message}")?,
            }
        }
        if let Some(more) = self.problems.len().checked_sub(SHOWN_PROBLEMS) {
            if more > 0 {
                write!(
                    f,
                    "\n{}: … and {more} more problem(s) not shown; fix these first",
                    shown(&self.file)
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A path (the config file's, or one resolved against its folder) for a
/// message: as `display()` shows it, with control characters escaped
/// ([`crate::logging::untrusted`]), so that a file name holding a newline
/// (given with `--config` or `NBNET_CONFIG`) cannot break a message or
/// forge a log line.
pub fn shown(path: &Path) -> String {
    crate::logging::untrusted(&path.to_string_lossy())
}

/// `text` for a message: in double quotes, with control characters, quotes
/// and backslashes escaped, and cut after [`QUOTE_CHARS`] characters (then
/// ending in `…"` and followed by the full length), so that no value a
/// config holds can make a message long or garble a terminal or log.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(QUOTE_CHARS) + 2);
    out.push('"');
    let mut chars = text.chars();
    for c in chars.by_ref().take(QUOTE_CHARS) {
        out.extend(c.escape_debug());
    }
    if chars.next().is_some() {
        out.push_str(&format!("…\" ({} bytes in all)", text.len()));
    } else {
        out.push('"');
    }
    out
}

/// Someone else's message (the TOML parser's, which may quote values) made
/// safe to show: control characters escaped, cut after `limit` characters.
pub fn bounded(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit) + 3);
    let mut chars = text.chars();
    for c in chars.by_ref().take(limit) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

// The file as written, before validation. Spans let errors name lines.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    plugins: Vec<Spanned<RawPlugin>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
}

/// `[server]` as written: every key with its span (so that its problems
/// name its own line), numbers as written (so that a range check, not a
/// type error, reports a negative or huge one).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    workers: Option<Spanned<Int>>,
    max_restarts: Option<Spanned<Int>>,
    restart_window: Option<Spanned<Dur>>,
    plugin_timeout: Option<Spanned<Dur>>,
    init_timeout: Option<Spanned<Dur>>,
    read_timeout: Option<Spanned<Dur>>,
    max_frame_bytes: Option<Spanned<Int>>,
    max_connections: Option<Spanned<Int>>,
    max_pending_output_bytes: Option<Spanned<Int>>,
    max_buffered_bytes: Option<Spanned<Int>>,
    max_deferred_per_connection: Option<Spanned<Int>>,
    max_deferred_per_worker: Option<Spanned<Int>>,
    deferred_timeout: Option<Spanned<Dur>>,
    shutdown_timeout: Option<Spanned<Dur>>,
    drain_delay: Option<Spanned<Dur>>,
    max_requests_per_worker: Option<Spanned<Int>>,
    max_requests_jitter: Option<Spanned<Int>>,
    pid_file: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    allow_root: Option<Spanned<bool>>,
}

/// A TOML integer of any size the parser accepts (beyond `i64`, toml hands
/// over `u64` and `u128` values too), saturated into an `i128`.
#[derive(Debug, Clone, Copy)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Int, E> {
                Ok(Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A duration as written: whole seconds (`30`) or a humantime string
/// (`"30s"`, `"500ms"`, `"2m"`); interpreted and range-checked by
/// [`Checker::duration`].
#[derive(Debug, Clone)]
enum Dur {
    Seconds(i128),
    Text(String),
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a duration: a string like \"30s\" or \"500ms\", or a number of seconds",
                )
            }
            fn visit_i64<E>(self, v: i64) -> Result<Dur, E> {
                Ok(Dur::Seconds(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur::Seconds(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Dur, E> {
                Ok(Dur::Seconds(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Dur, E> {
                Ok(Dur::Seconds(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Dur, E> {
                Ok(Dur::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    config: Option<toml::Table>,
    threads: Option<Spanned<Int>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Spanned<String>,
    plugin: Spanned<String>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    reuseport: Option<Spanned<bool>>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    allow: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    deny: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    tls: Option<Spanned<crate::tls::RawTls>>,
}

/// Reads and validates the config file at `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = read_text(file).map_err(|(line, message)| ConfigError {
        file: file.to_path_buf(),
        problems: vec![(line, message)],
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

/// Byte offsets of line starts, computed once: a line number is then a
/// binary search, not a recount from the top (which made validation
/// quadratic in the number of entries).
struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Lines { text, starts }
    }

    /// The 1-based line of byte `offset`.
    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset).max(1)
    }

    /// The text of 1-based line `line`, without its line break.
    fn line(&self, line: usize) -> Option<&'a str> {
        let start = *self.starts.get(line.checked_sub(1)?)?;
        let end = self.starts.get(line).map_or(self.text.len(), |&next| next);
        let text = self.text.get(start..end)?;
        Some(text.trim_end_matches(['\n', '\r']))
    }
}

/// Validates config `text`, read from `file` (used for messages and to
/// resolve relative plugin paths).
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let lines = Lines::new(text);
    let fail = |problems| ConfigError {
        file: file.to_path_buf(),
        problems,
    };

    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| lines.line_of(span.start));
        let mut message = bounded(e.message().trim_end(), 3 * QUOTE_CHARS);
        // Quote the offending line: a type error's message names the value
        // but not the key.
        if let Some(source) = line.and_then(|l| lines.line(l)) {
            if !source.trim().is_empty() {
                message = format!("{message} (in `{}`)", bounded(source.trim(), QUOTE_CHARS));
            }
        }
        fail(vec![(line, message)])
    })?;

    let mut check = Checker {
        lines: &lines,
        problems: Vec::new(),
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
        check
            .problems
            .sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
        return Err(fail(check.problems));
    }
    for plugin in &mut plugins {
        plugin.plugin_timeout = server.plugin_timeout;
    }
    Ok(Config {
        file: file.to_path_buf(),
        server,
        log,
        admin,
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

/// A file nbnet writes (`[server] pid_file`, `[log] file`), which nothing
/// else in the config may name: not the config file, a plugin, a Unix
/// listener's socket, nor the other written file.
struct Written<'p> {
    key: &'static str,
    line: Option<usize>,
    path: &'p Path,
    /// `path` normalised lexically, to compare.
    normal: PathBuf,
    /// What nbnet would do to the file.
    does: &'static str,
}

impl<'p> Written<'p> {
    fn new(key: &'static str, line: Option<usize>, path: &'p Path, does: &'static str) -> Self {
        Written {
            key,
            line,
            path,
            normal: normalize_lexically(path),
            does,
        }
    }

    /// `file:line` of its key, for a message about another key.
    fn place(&self, file: &Path) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", shown(file)),
            None => shown(file),
        }
    }
}

/// Whether `a` (normalised lexically) and the absolute path `b` name the
/// same file: equal once both are normalised, or the same name in the same
/// folder once the folders are resolved through symlinks (only paths with
/// the same file name touch the disk).
fn same_file(a: &Path, b: &Path) -> bool {
    let b = normalize_lexically(b);
    if a.file_name() != b.file_name() {
        return false;
    }
    a == b || socket_file(a) == socket_file(&b)
}

/// Collects problems, each with the line it is on.
struct Checker<'a, 'text> {
    lines: &'a Lines<'text>,
    problems: Vec<(Option<usize>, String)>,
}

impl Checker<'_, '_> {
    fn problem(&mut self, line: Option<usize>, message: String) {
        self.problems.push((line, message));
    }

    /// Refuses each file of `written` that is `path` (the use `what`
    /// describes), on the written key's line.
    fn shared(&mut self, written: &[Written], path: &Path, what: impl Fn() -> String) {
        for file in written {
            if same_file(&file.normal, path) {
                self.problem(
                    file.line,
                    format!(
                        "{} = {} is the same file as {}: {}; give each its own path",
                        file.key,
                        shown(file.path),
                        what(),
                        file.does
                    ),
                );
            }
        }
    }

    fn out_of_range(&mut self, key: &str, span_start: usize, value: &str, range: &str) {
        self.problem(
            Some(self.lines.line_of(span_start)),
            format!("[server] {key} = {value} is out of range: must be between {range}"),
        );
    }

    /// `[server] key`: a whole number within `range`, or `default`.
    fn count(
        &mut self,
        key: &str,
        value: &Option<Spanned<Int>>,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> u64 {
        let Some(value) = value else {
            return default;
        };
        let Int(n) = *value.get_ref();
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                let bounds = format!("{} and {}", range.start(), range.end());
                self.out_of_range(key, value.span().start, &n.to_string(), &bounds);
                default
            }
        }
    }

    /// [`Checker::count`] for a `usize` key (its range also capped at
    /// `usize::MAX`).
    fn count_usize(
        &mut self,
        key: &str,
        value: &Option<Spanned<Int>>,
        range: RangeInclusive<u64>,
        default: usize,
    ) -> usize {
        let top = (*range.end()).min(usize::MAX as u64);
        let n = self.count(key, value, *range.start()..=top, default as u64);
        usize::try_from(n).unwrap_or(default)
    }

    /// `[server] key`: a duration from [`MIN_DURATION`] to [`MAX_DURATION`],
    /// or `default`.
    fn duration(&mut self, key: &str, value: &Option<Spanned<Dur>>, default: Duration) -> Duration {
        self.duration_from(key, value, default, MIN_DURATION)
    }

    /// [`Checker::duration`] with another lower bound (`drain_delay` may
    /// be 0).
    fn duration_from(
        &mut self,
        key: &str,
        value: &Option<Spanned<Dur>>,
        default: Duration,
        min: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        let bounds = format!(
            "{} and {}",
            humantime::format_duration(min),
            humantime::format_duration(MAX_DURATION)
        );
        let start = value.span().start;
        let (parsed, shown) = match value.get_ref() {
            Dur::Seconds(n) => (
                u64::try_from(*n).ok().map(Duration::from_secs),
                n.to_string(),
            ),
            Dur::Text(text) => match humantime::parse_duration(text) {
                Ok(d) => (Some(d), quote(text)),
                Err(humantime::DurationError::NumberOverflow) => (None, quote(text)),
                Err(e) => {
                    self.problem(
                        Some(self.lines.line_of(start)),
                        format!(
                            "[server] {key}: invalid duration {} ({e}); write e.g. \"30s\", \"500ms\" or a number of seconds",
                            quote(text)
                        ),
                    );
                    return default;
                }
            },
        };
        match parsed {
            Some(d) if (min..=MAX_DURATION).contains(&d) => d,
            _ => {
                self.out_of_range(key, start, &shown, &bounds);
                default
            }
        }
    }

    /// A file path `key` (e.g. `[server] pid_file`), resolved against
    /// `base` and checked; `without` says what leaving the key out means.
    fn path(
        &mut self,
        key: &str,
        value: &Option<Spanned<String>>,
        base: &Path,
        without: &str,
    ) -> Option<PathBuf> {
        let text = value.as_ref()?;
        let line = Some(self.lines.line_of(text.span().start));
        let written = text.get_ref();
        let path = std::path::absolute(base.join(written)).unwrap_or_else(|_| base.join(written));
        let why = if written.is_empty() {
            Some(format!("is empty; remove the key for {without}"))
        } else if written.contains(char::is_control) {
            Some("contains a control character".to_string())
        } else if path.as_os_str().len() > MAX_PATH_BYTES {
            Some(format!(
                "is {} bytes long once resolved, over the system's limit of {MAX_PATH_BYTES}",
                path.as_os_str().len()
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                self.problem(line, format!("{key} = {} {why}", quote(written)));
                None
            }
            None => Some(path),
        }
    }

    /// `[server]`, each key checked against its range.
    fn server(&mut self, raw: &RawServer, base: &Path) -> ServerConfig {
        let d = ServerConfig::default();
        let max_bytes = MAX_DECLARED;
        let pid_file = self.path("[server] pid_file", &raw.pid_file, base, "no PID file");
        ServerConfig {
            workers: self.count_usize("workers", &raw.workers, 0..=MAX_WORKERS as u64, d.workers),
            max_restarts: self.count(
                "max_restarts",
                &raw.max_restarts,
                0..=u64::from(MAX_RESTARTS),
                d.max_restarts.into(),
            ) as u32,
            restart_window: self.duration("restart_window", &raw.restart_window, d.restart_window),
            plugin_timeout: self.duration("plugin_timeout", &raw.plugin_timeout, d.plugin_timeout),
            init_timeout: self.duration("init_timeout", &raw.init_timeout, d.init_timeout),
            read_timeout: self.duration("read_timeout", &raw.read_timeout, d.read_timeout),
            max_frame_bytes: self.count_usize(
                "max_frame_bytes",
                &raw.max_frame_bytes,
                1..=max_bytes,
                d.max_frame_bytes,
            ),
            max_connections: self.count_usize(
                "max_connections",
                &raw.max_connections,
                1..=MAX_CONNECTIONS as u64,
                d.max_connections,
            ),
            max_pending_output_bytes: self.count_usize(
                "max_pending_output_bytes",
                &raw.max_pending_output_bytes,
                1..=max_bytes,
                d.max_pending_output_bytes,
            ),
            max_buffered_bytes: self.count_usize(
                "max_buffered_bytes",
                &raw.max_buffered_bytes,
                1..=MAX_BUFFERED_BYTES,
                d.max_buffered_bytes,
            ),
            max_deferred_per_connection: self.count_usize(
                "max_deferred_per_connection",
                &raw.max_deferred_per_connection,
                1..=MAX_DEFERRED as u64,
                d.max_deferred_per_connection,
            ),
            max_deferred_per_worker: self.count_usize(
                "max_deferred_per_worker",
                &raw.max_deferred_per_worker,
                1..=MAX_DEFERRED as u64,
                d.max_deferred_per_worker,
            ),
            deferred_timeout: self.duration(
                "deferred_timeout",
                &raw.deferred_timeout,
                d.deferred_timeout,
            ),
            shutdown_timeout: self.duration(
                "shutdown_timeout",
                &raw.shutdown_timeout,
                d.shutdown_timeout,
            ),
            drain_delay: self.duration_from(
                "drain_delay",
                &raw.drain_delay,
                d.drain_delay,
                Duration::ZERO,
            ),
            max_requests_per_worker: self.count(
                "max_requests_per_worker",
                &raw.max_requests_per_worker,
                0..=MAX_REQUESTS,
                d.max_requests_per_worker,
            ),
            max_requests_jitter: self.count(
                "max_requests_jitter",
                &raw.max_requests_jitter,
                0..=MAX_REQUESTS,
                d.max_requests_jitter,
            ),
            pid_file,
            run_as: self.run_as(raw),
            allow_root: raw.allow_root.as_ref().is_some_and(|a| *a.get_ref()),
        }
    }

    /// `[server] user` and `group`, looked up on this machine.
    fn run_as(&mut self, raw: &RawServer) -> Option<crate::privileges::RunAs> {
        let Some(user) = &raw.user else {
            if let Some(group) = &raw.group {
                self.problem(
                    Some(self.lines.line_of(group.span().start)),
                    "[server] group needs [server] user: name the user the workers run as".into(),
                );
            }
            return None;
        };
        let line = Some(self.lines.line_of(user.span().start));
        if let Some(allow) = raw.allow_root.as_ref().filter(|a| *a.get_ref()) {
            self.problem(
                Some(self.lines.line_of(allow.span().start)),
                "[server] allow_root = true and user are contradictory: with user, plugins never run as root; remove one".into(),
            );
        }
        let group = raw.group.as_ref().map(|g| g.get_ref().as_str());
        match crate::privileges::resolve(user.get_ref(), group) {
            Ok(run_as) => Some(run_as),
            Err(why) => {
                let line = match (&raw.group, why.contains("group")) {
                    (Some(group), true) => Some(self.lines.line_of(group.span().start)),
                    _ => line,
                };
                self.problem(line, format!("[server] {why}"));
                None
            }
        }
    }
}

/// Parses a listener address: `IP:PORT`, or `unix:PATH` (a relative path
/// resolves against the config file's folder).
fn parse_endpoint(text: &str, base: &Path) -> Result<Endpoint, String> {
    if let Some(written) = text.strip_prefix("unix:") {
        if written.is_empty() {
            return Err(
                "listener addr \"unix:\" needs a path, e.g. \"unix:/run/nbnet.sock\"".into(),
            );
        }
        if written.contains(char::is_control) {
            return Err(format!(
                "listener addr {} contains a control character",
                quote(text)
            ));
        }
        let joined = base.join(written);
        let path = std::path::absolute(&joined).unwrap_or(joined);
        let names_a_file = !written.ends_with('/')
            && matches!(path.components().next_back(), Some(Component::Normal(_)));
        if !names_a_file {
            return Err(format!(
                "listener addr {} names a folder, not a socket file; add a file name, e.g. \"unix:/run/nbnet.sock\"",
                quote(text)
            ));
        }
        let len = path.as_os_str().len();
        if len > MAX_UNIX_PATH_BYTES {
            return Err(format!(
                "listener addr {}: the socket path is {len} bytes long once resolved ({}), over the kernel's limit of {MAX_UNIX_PATH_BYTES} bytes for a Unix socket; use a shorter path",
                quote(text),
                quote(&path.to_string_lossy())
            ));
        }
        return Ok(Endpoint::Unix(path));
    }
    text.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| {
        format!(
            "listener addr {} is not IP:PORT or unix:PATH (for example \"127.0.0.1:9000\", \"[::1]:9000\" or \"unix:/run/nbnet.sock\")",
            quote(text)
        )
    })
}

/// Whether a socket bound to `[::]` also takes IPv4 (it does unless
/// `net.ipv6.bindv6only` is 1: `ListenSocket::bind_tcp` leaves
/// `IPV6_V6ONLY` at the system default).
fn v6_wildcard_takes_ipv4() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() != "1")
}

/// `path` with `.` and `name/..` removed, without looking at the disk.
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !matches!(out.components().next_back(), Some(Component::Normal(_))) || !out.pop()
                {
                    // `/..` is `/`; a relative path cannot go above its start.
                    if !out.has_root() {
                        out.push("..");
                    }
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The socket file a Unix listener path names, for comparing listeners:
/// its folder resolved through symlinks when it exists, otherwise the path
/// normalised lexically.
fn socket_file(path: &Path) -> PathBuf {
    if let (Some(folder), Some(name)) = (path.parent(), path.file_name()) {
        if let Ok(real) = std::fs::canonicalize(folder) {
            return real.join(name);
        }
    }
    normalize_lexically(path)
}

/// Which addresses a TCP socket takes, for the kernel's bind conflicts.
/// An IPv4-mapped IPv6 address is its IPv4 address; the IPv6 scope only
/// matters for link-local addresses (it binds the socket to a device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TcpKey {
    ip: IpAddr,
    scope: u32,
    port: u16,
}

impl TcpKey {
    fn of(addr: &SocketAddr) -> TcpKey {
        let (ip, scope) = match addr {
            SocketAddr::V4(v4) => (IpAddr::V4(*v4.ip()), 0),
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), 0),
                None => {
                    let link_local = v6.ip().segments()[0] & 0xffc0 == 0xfe80;
                    (
                        IpAddr::V6(*v6.ip()),
                        if link_local { v6.scope_id() } else { 0 },
                    )
                }
            },
        };
        TcpKey {
            ip,
            scope,
            port: addr.port(),
        }
    }
}

/// Every listener address seen so far, to refuse one the kernel would not
/// let the master bind next to an earlier one: the same address (also when
/// written differently: an IPv4-mapped IPv6 address, or a Unix path through
/// `..` or a symlink), or an overlapping one on the same port (a wildcard
/// `0.0.0.0` or `[::]` with anything else of its family — `[::]` takes IPv4
/// too unless `bindv6only` is set) unless both have `reuseport = true`
/// (with `SO_REUSEPORT` on both sockets Linux allows that overlap).
/// Every step is a hash lookup: linear in the number of listeners.
struct Addresses {
    v6_takes_v4: bool,
    /// Each listener added: its line and address, for messages.
    seen: Vec<(usize, Endpoint)>,
    tcp: HashMap<TcpKey, usize>,
    unix: HashMap<PathBuf, usize>,
    ports: HashMap<u16, PortUsers>,
}

/// One port's listeners, as indexes into [`Addresses::seen`], indexed by
/// address family and then by `reuseport`.
#[derive(Default)]
struct PortUsers {
    /// The first listener of each family.
    any: [[Option<usize>; 2]; 2],
    /// The first wildcard listener taking each family.
    wildcard: [[Option<usize>; 2]; 2],
}

impl Addresses {
    fn new(v6_takes_v4: bool) -> Self {
        Addresses {
            v6_takes_v4,
            seen: Vec::new(),
            tcp: HashMap::new(),
            unix: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    /// The families a socket bound to `key` takes, and whether it is a wildcard.
    fn families(&self, key: &TcpKey) -> (&'static [usize], bool) {
        match key.ip {
            IpAddr::V4(ip) if ip.is_unspecified() => (&[0], true),
            IpAddr::V6(ip) if ip.is_unspecified() && self.v6_takes_v4 => (&[0, 1], true),
            IpAddr::V6(ip) if ip.is_unspecified() => (&[1], true),
            IpAddr::V4(_) => (&[0], false),
            IpAddr::V6(_) => (&[1], false),
        }
    }

    /// The first earlier listener whose socket would keep one for `key`
    /// (with `reuseport`) from binding, other than an identical address: a
    /// wildcard clashes with every earlier listener of the families it
    /// takes, a specific address with every earlier wildcard taking its
    /// family; but two sockets with `SO_REUSEPORT` never clash.
    fn overlap(&self, key: &TcpKey, reuseport: bool) -> Option<usize> {
        if key.port == 0 {
            // The kernel picks a free port for each.
            return None;
        }
        let users = self.ports.get(&key.port)?;
        let (families, wildcard) = self.families(key);
        let table = if wildcard {
            &users.any
        } else {
            &users.wildcard
        };
        let flags: &[usize] = if reuseport { &[0] } else { &[0, 1] };
        families
            .iter()
            .flat_map(|&family| flags.iter().filter_map(move |&flag| table[family][flag]))
            .min()
    }

    /// Adds a listener at `addr` on line `line`; an error says which
    /// earlier listener it cannot be bound next to.
    fn add(&mut self, addr: &Endpoint, reuseport: bool, line: usize) -> Result<(), String> {
        let index = self.seen.len();
        let result = match addr {
            Endpoint::Tcp(socket) => self.add_tcp(socket, reuseport, index),
            Endpoint::Unix(path) => match self.unix.entry(socket_file(path)) {
                std::collections::hash_map::Entry::Occupied(first) => Err(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                    Ok(())
                }
            },
        };
        self.seen.push((line, addr.clone()));
        result.map_err(|first| {
            let (first_line, first_addr) = &self.seen[first];
            if first_addr == addr {
                format!("duplicate listener {addr} (first defined on line {first_line})")
            } else if let (Endpoint::Tcp(a), Endpoint::Tcp(b)) = (addr, first_addr) {
                if TcpKey::of(a) == TcpKey::of(b) {
                    format!(
                        "listener {addr} is the same address as listener {first_addr} on line {first_line} (an IPv4-mapped IPv6 address is its IPv4 address); remove one of them"
                    )
                } else {
                    format!(
                        "listener {addr} overlaps listener {first_addr} on line {first_line}: a wildcard address takes the port on every address of its family, so the second bind would fail with \"address in use\"; use another port, remove one, or set reuseport = true on both"
                    )
                }
            } else {
                format!(
                    "listener {addr} is the same socket file as listener {first_addr} on line {first_line}; give each its own path"
                )
            }
        })
    }

    fn add_tcp(&mut self, socket: &SocketAddr, reuseport: bool, index: usize) -> Result<(), usize> {
        let key = TcpKey::of(socket);
        if let Some(&first) = self.tcp.get(&key) {
            return Err(first);
        }
        let overlap = self.overlap(&key, reuseport);
        self.tcp.insert(key, index);
        let (families, wildcard) = self.families(&key);
        let users = self.ports.entry(key.port).or_default();
        let flag = usize::from(reuseport);
        for &family in families {
            users.any[family][flag].get_or_insert(index);
            if wildcard {
                users.wildcard[family][flag].get_or_insert(index);
            }
        }
        overlap.map_or(Ok(()), Err)
    }

    /// Checks the `[admin]` address (bound without `SO_REUSEPORT`) against
    /// the listeners.
    fn admin(&self, addr: SocketAddr) -> Result<(), String> {
        let key = TcpKey::of(&addr);
        if let Some(&first) = self.tcp.get(&key) {
            let (line, listener) = &self.seen[first];
            return Err(format!(
                "[admin] addr {addr} is also a [[listeners]] address ({listener}, line {line}); use another port"
            ));
        }
        if let Some(first) = self.overlap(&key, false) {
            let (line, listener) = &self.seen[first];
            return Err(format!(
                "[admin] addr {addr} overlaps listener {listener} on line {line} (the same port, and one is a wildcard address): binding both would fail with \"address in use\"; use another port"
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/nbnet/test.toml"), text)
    }

    const MINIMAL: &str = r#"
[[plugins]]
name = "upper"
path = "libupper.so"

[[listeners]]
addr = "127.0.0.1:9000"
plugin = "upper"
"#;

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths_against_the_config_folder() {
        let config = parse_str(MINIMAL).unwrap();
        assert_eq!(config.server.max_frame_bytes, 16 * 1024 * 1024);
        assert_eq!(config.server.read_timeout, Duration::from_secs(30));
        assert_eq!(config.server.max_restarts, 100);
        assert_eq!(config.log.level, LogLevel::Info);
        assert_eq!(config.plugins[0].path, Path::new("/etc/nbnet/libupper.so"));
        assert_eq!(config.listeners[0].plugin, 0);
        assert!(config.server.worker_count() >= 1);
    }

    #[test]
    fn durations_accept_seconds_and_humantime_strings() {
        let text = format!("[server]\nread_timeout = \"250ms\"\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).unwrap().server.read_timeout,
            Duration::from_millis(250)
        );
        let text = format!("[server]\nread_timeout = 7\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).unwrap().server.read_timeout,
            Duration::from_secs(7)
        );
        let err = parse_str(&format!("[server]\nread_timeout = \"soon\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse_str(&format!("[server]\nworkerz = 2\n{MINIMAL}")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/nbnet/test.toml:2: "), "{text}");
        assert!(text.contains("workerz"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_line_and_quotes_it() {
        let err = parse_str(&format!("[server]\nworkers = \"two\"\n{MINIMAL}")).unwrap_err();
        assert!(
            err.to_string().starts_with("/etc/nbnet/test.toml:2: "),
            "{err}"
        );
        assert!(
            err.to_string().contains("(in `workers = \"two\"`)"),
            "{err}"
        );
    }

    #[test]
    fn plugin_config_table_is_passed_as_toml_text() {
        let text = MINIMAL.replace(
            "path = \"libupper.so\"",
            "path = \"libupper.so\"\nconfig = { start = 10, greeting = \"hi\" }",
        );
        let config = parse_str(&text).unwrap();
        let table: toml::Table = toml::from_str(&config.plugins[0].config_toml).unwrap();
        assert_eq!(table["start"].as_integer(), Some(10));
        assert_eq!(table["greeting"].as_str(), Some("hi"));
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_line() {
        let text = r#"[server]
max_frame_bytes = 0

[[plugins]]
name = "a"
path = "a.so"

[[plugins]]
name = "a"
path = "b.so"

[[listeners]]
addr = "localhost:9000"
plugin = "a"

[[listeners]]
addr = "127.0.0.1:9001"
plugin = "nope"
"#;
        let err = parse_str(text).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 4, "{text}");
        assert!(text.contains(":2: [server] max_frame_bytes = 0"), "{text}");
        assert!(
            text.contains(":9: duplicate plugin name \"a\" (first defined on line 4)"),
            "{text}"
        );
        assert!(
            text.contains(":13: listener addr \"localhost:9000\" is not IP:PORT or unix:PATH"),
            "{text}"
        );
        assert!(
            text.contains(":18: listener 127.0.0.1:9001 names plugin \"nope\""),
            "{text}"
        );
    }

    #[test]
    fn duplicate_listeners_are_refused() {
        let text =
            format!("{MINIMAL}\n[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"upper\"\n");
        let err = parse_str(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("duplicate listener 127.0.0.1:9000"),
            "{err}"
        );
    }

    #[test]
    fn the_admin_address_is_optional_and_checked() {
        assert_eq!(parse_str(MINIMAL).unwrap().admin, None);
        let text = format!("[admin]\naddr = \"127.0.0.1:9191\"\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).unwrap().admin,
            Some("127.0.0.1:9191".parse().unwrap())
        );
        let text = format!("[admin]\naddr = \"127.0.0.1:9000\"\n{MINIMAL}");
        let err = parse_str(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains(":2: [admin] addr 127.0.0.1:9000 is also a [[listeners]] address"),
            "{err}"
        );
    }

    #[test]
    fn unix_listeners_resolve_paths_and_check_their_options() {
        let text = MINIMAL.replace(
            "addr = \"127.0.0.1:9000\"",
            "addr = \"unix:run/nbnet.sock\"\nmode = \"0660\"\nproxy_protocol = true",
        );
        let config = parse_str(&text).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(
            listener.addr,
            Endpoint::Unix("/etc/nbnet/run/nbnet.sock".into())
        );
        assert_eq!(listener.mode, Some(0o660));
        assert!(listener.proxy_protocol);
        let text = MINIMAL.replace(
            "addr = \"127.0.0.1:9000\"",
            "addr = \"unix:/x.sock\"\nreuseport = true\nmode = \"999\"",
        );
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains("reuseport applies to TCP listeners only"),
            "{err}"
        );
        assert!(err.contains("listener mode \"999\" is not octal"), "{err}");
    }

    #[test]
    fn a_config_without_listeners_is_refused() {
        let err = parse_str("[[plugins]]\nname = \"a\"\npath = \"a.so\"\n").unwrap_err();
        assert!(err.to_string().contains("no [[listeners]]"), "{err}");
    }

    #[test]
    fn a_server_key_error_names_the_line_of_that_key_not_an_earlier_one_of_the_same_name() {
        // The plugin's own table has a key of the same name on line 5; the
        // [server] key is on line 8.
        let text = r#"[[plugins]]
name = "upper"
path = "libupper.so"
[plugins.config]
max_frame_bytes = 0

[server]
max_frame_bytes = 0

[[listeners]]
addr = "127.0.0.1:9000"
plugin = "upper"
"#;
        let err = parse_str(text).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/nbnet/test.toml:8: [server] max_frame_bytes = 0"),
            "{err}"
        );
    }

    /// Every `[server]` key that holds a number, and its documented range.
    const COUNTS: &[(&str, u64, u64)] = &[
        ("workers", 0, MAX_WORKERS as u64),
        ("max_restarts", 0, MAX_RESTARTS as u64),
        ("max_frame_bytes", 1, MAX_DECLARED),
        ("max_connections", 1, MAX_CONNECTIONS as u64),
        ("max_pending_output_bytes", 1, MAX_DECLARED),
        ("max_deferred_per_connection", 1, MAX_DEFERRED as u64),
        ("max_deferred_per_worker", 1, MAX_DEFERRED as u64),
        ("max_requests_per_worker", 0, MAX_REQUESTS),
        ("max_requests_jitter", 0, MAX_REQUESTS),
    ];

    /// Every `[server]` duration key (each 1 ms ..= 1 day).
    const DURATIONS: &[&str] = &[
        "restart_window",
        "plugin_timeout",
        "init_timeout",
        "read_timeout",
        "deferred_timeout",
        "shutdown_timeout",
    ];

    /// `[server] key = value` (on line 2) must either be refused with a
    /// message on line 2 naming the key, or give a config within every
    /// documented range whose run-time arithmetic cannot panic.
    fn refused_on_its_line_or_safe(key: &str, value: &str) -> Result<(), String> {
        // The largest budget, so that any frame size fits it (the budget's
        // own rule has a test of its own).
        let text = format!(
            "[server]\n{key} = {value}\nmax_buffered_bytes = {MAX_BUFFERED_BYTES}\n{MINIMAL}"
        );
        match parse_str(&text) {
            Err(err) => {
                for (line, message) in &err.problems {
                    assert_eq!(*line, Some(2), "{key} = {value}: {message}");
                    assert!(message.contains(key), "{key} = {value}: {message}");
                    assert!(message.len() < 1000, "{key} = {value}: {message}");
                }
                Err(err.to_string())
            }
            Ok(config) => {
                let s = &config.server;
                for (name, min, max) in COUNTS {
                    let value = match *name {
                        "workers" => s.workers as u64,
                        "max_restarts" => s.max_restarts.into(),
                        "max_frame_bytes" => s.max_frame_bytes as u64,
                        "max_connections" => s.max_connections as u64,
                        "max_pending_output_bytes" => s.max_pending_output_bytes as u64,
                        "max_deferred_per_connection" => s.max_deferred_per_connection as u64,
                        "max_deferred_per_worker" => s.max_deferred_per_worker as u64,
                        "max_requests_per_worker" => s.max_requests_per_worker,
                        "max_requests_jitter" => s.max_requests_jitter,
                        other => unreachable!("{other}"),
                    };
                    assert!((min..=max).contains(&&value), "{key} = {value}: {name}");
                }
                let now = Instant::now();
                for d in [
                    s.restart_window,
                    s.plugin_timeout,
                    s.init_timeout,
                    s.read_timeout,
                    s.deferred_timeout,
                    s.shutdown_timeout,
                ] {
                    assert!(
                        (MIN_DURATION..=MAX_DURATION).contains(&d),
                        "{key} = {value}"
                    );
                    // What the master, the workers and `--check` compute.
                    let _ = deadline(now, d) - d / 64;
                    let _ = now + d + Duration::from_secs(10);
                    let _ = d / 4;
                }
                for seed in [0, 1, 12345, u64::MAX] {
                    if let Some(limit) = s.retire_after(seed) {
                        assert!(limit >= s.max_requests_per_worker);
                    }
                }
                assert!(s.worker_count() <= MAX_WORKERS);
                Ok(())
            }
        }
    }

    #[test]
    fn max_buffered_bytes_holds_at_least_one_frame_and_at_most_its_cap() {
        for (text, ok) in [
            ("max_buffered_bytes = 16777216", true),
            ("max_buffered_bytes = 16777215", false),
            ("max_frame_bytes = 1024\nmax_buffered_bytes = 1024", true),
            ("max_buffered_bytes = 1099511627776", true),
            ("max_buffered_bytes = 1099511627777", false),
            ("max_buffered_bytes = 0", false),
            ("max_frame_bytes = 9999999999", false),
        ] {
            let result = parse_str(&format!("[server]\n{text}\n{MINIMAL}"));
            assert_eq!(result.is_ok(), ok, "{text}: {result:?}");
            if let Err(e) = result {
                let message = e.to_string();
                assert!(
                    message.contains(":2: [server] max_") || message.contains(":3: [server] max_"),
                    "{message}"
                );
                assert!(message.contains("max_buffered_bytes"), "{message}");
            }
        }
    }

    #[test]
    fn every_server_number_at_its_extremes_is_refused_on_its_line_or_safe_to_run() {
        for &(key, min, max) in COUNTS {
            let mut values: Vec<String> =
                [0, 1, min, max - 1, max, max + 1, i64::MAX as u64, u64::MAX]
                    .iter()
                    .map(u64::to_string)
                    .collect();
            values.extend(["-1", "-9223372036854775808", "1.5", "\"7\"", "true"].map(String::from));
            for value in &values {
                let result = refused_on_its_line_or_safe(key, value);
                let n: Option<u64> = value.parse().ok();
                match n {
                    Some(n) if (min..=max).contains(&n) => {
                        assert!(result.is_ok(), "{key} = {value}: {result:?}")
                    }
                    Some(n) => {
                        let err = result.unwrap_err();
                        assert!(
                            err.contains(&format!(
                                ":2: [server] {key} = {n} is out of range: must be between {min} and {max}"
                            )),
                            "{err}"
                        );
                    }
                    None => assert!(result.is_err(), "{key} = {value} accepted"),
                }
            }
        }
    }

    #[test]
    fn every_server_duration_at_its_extremes_is_refused_on_its_line_or_safe_to_run() {
        let accepted = [
            "1",
            "86400",
            "\"1ms\"",
            "\"1day\"",
            "\"23h 59m 59s 999ms\"",
            "\"24h\"",
        ];
        let refused = [
            "0",
            "86401",
            "-1",
            "9223372036854775807",
            "18446744073709551615",
            "\"0s\"",
            "\"999us\"",
            "\"24h 1ns\"",
            "\"9999999999999d\"",
            "\"99999999999999999999999999d\"",
            "1.5",
            "\"soon\"",
            "\"\"",
        ];
        for key in DURATIONS {
            for value in accepted {
                let result = refused_on_its_line_or_safe(key, value);
                assert!(result.is_ok(), "{key} = {value}: {result:?}");
            }
            for value in refused {
                let err = refused_on_its_line_or_safe(key, value).unwrap_err();
                assert!(err.starts_with("/etc/nbnet/test.toml:2: "), "{err}");
                if value.parse::<i128>().is_ok() || value.ends_with("d\"") || value.contains("s\"")
                {
                    assert!(
                        err.contains(&format!(
                            "[server] {key} = {value} is out of range: must be between 1ms and 1day"
                        )),
                        "{err}"
                    );
                }
            }
        }
    }

    #[test]
    fn log_file_is_resolved_against_the_config_folder_and_checked() {
        let log = |text: &str| {
            parse_str(&format!("{text}\n{MINIMAL}"))
                .map(|c| c.log)
                .map_err(|e| e.to_string())
        };
        assert_eq!(log("").unwrap().file, None);
        assert_eq!(
            log("[log]\nfile = \"logs/nbnet.log\"").unwrap().file,
            Some(PathBuf::from("/etc/nbnet/logs/nbnet.log"))
        );
        assert_eq!(
            log("[log]\nfile = \"/var/log/nbnet.log\"\nlevel = \"warn\"")
                .unwrap()
                .file,
            Some(PathBuf::from("/var/log/nbnet.log"))
        );
        let err = log("[log]\nfile = \"\"").unwrap_err();
        assert!(
            err.contains(":2: [log] file = \"\" is empty; remove the key for log to stderr"),
            "{err}"
        );
        let err = log("[log]\nfile = \"a\\nb\"").unwrap_err();
        assert!(
            err.contains(":2: [log] file = ") && err.contains("control character"),
            "{err}"
        );
        let err = log("[server]\npid_file = \"x\"\n[log]\nfile = \"/etc/nbnet/x\"").unwrap_err();
        assert!(
            err.contains(":4: [log] file = /etc/nbnet/x is the same file as [server] pid_file (/etc/nbnet/test.toml:2)"),
            "{err}"
        );
    }

    #[test]
    fn a_written_file_naming_the_config_a_plugin_or_a_socket_is_refused_naming_both() {
        let refused = |server: &str, log: &str| {
            let text = format!(
                "[server]\n{server}\n[log]\n{log}\n[[plugins]]\nname = \"upper\"\npath = \"lib/libupper.so\"\n[[listeners]]\naddr = \"unix:run/s.sock\"\nplugin = \"upper\"\n"
            );
            parse_str(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        // Compared once absolute and normalised lexically.
        let err = refused("pid_file = \"./x/../test.toml\"", "").unwrap_err();
        assert!(
            err.contains("test.toml:2: [server] pid_file = /etc/nbnet/x/../test.toml is the same file as the config file itself: nbnet would write its PID there"),
            "{err}"
        );
        let err = refused("pid_file = \"/etc/nbnet/lib/./libupper.so\"", "").unwrap_err();
        assert!(
            err.contains("test.toml:2: [server] pid_file = /etc/nbnet/lib/libupper.so is the same file as the path of plugin \"upper\" (/etc/nbnet/test.toml:7)"),
            "{err}"
        );
        let err = refused("pid_file = \"lib/../run/s.sock\"", "").unwrap_err();
        assert!(
            err.contains("test.toml:2: [server] pid_file = /etc/nbnet/lib/../run/s.sock is the same file as the socket of listener unix:/etc/nbnet/run/s.sock (/etc/nbnet/test.toml:9)"),
            "{err}"
        );
        let err = refused("", "file = \"lib/libupper.so\"").unwrap_err();
        assert!(
            err.contains("test.toml:4: [log] file = /etc/nbnet/lib/libupper.so is the same file as the path of plugin \"upper\" (/etc/nbnet/test.toml:7): nbnet would append its log lines there"),
            "{err}"
        );
        // Same names in other folders are fine.
        refused("pid_file = \"run/test.toml\"", "file = \"libupper.so\"").unwrap();
    }

    #[test]
    fn drain_delay_defaults_to_zero_and_ranges_from_zero_to_a_day() {
        let delay = |value: &str| {
            parse_str(&format!("[server]\ndrain_delay = {value}\n{MINIMAL}"))
                .map(|c| c.server.drain_delay)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            parse_str(MINIMAL).unwrap().server.drain_delay,
            Duration::ZERO
        );
        for (value, expected) in [
            ("0", Duration::ZERO),
            ("\"0s\"", Duration::ZERO),
            ("\"2s\"", Duration::from_secs(2)),
            ("\"500ms\"", Duration::from_millis(500)),
            ("86400", MAX_DURATION),
        ] {
            assert_eq!(delay(value), Ok(expected), "drain_delay = {value}");
        }
        for value in ["86401", "-1", "\"25h\"", "18446744073709551615"] {
            let err = delay(value).unwrap_err();
            assert!(
                err.contains(&format!(
                    ":2: [server] drain_delay = {value} is out of range: must be between 0s and 1day"
                )),
                "{err}"
            );
        }
        let err = delay("\"soon\"").unwrap_err();
        assert!(
            err.contains(":2: [server] drain_delay: invalid duration"),
            "{err}"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_server_number_is_refused_on_its_line_or_safe_to_run(
            key in 0..COUNTS.len() + DURATIONS.len(),
            n in proptest::prelude::any::<i64>(),
            u in proptest::prelude::any::<u64>(),
            small in 0u64..100_000,
            unit in proptest::sample::select(vec!["ns", "us", "ms", "s", "m", "h", "d", "w", "y"]),
            pick in 0..4,
        ) {
            let key = match COUNTS.get(key) {
                Some((name, _, _)) => name,
                None => DURATIONS[key - COUNTS.len()],
            };
            let value = match pick {
                0 => n.to_string(),
                1 => u.to_string(),
                2 => small.to_string(),
                _ => format!("\"{small}{unit}\""),
            };
            let _ = refused_on_its_line_or_safe(key, &value);
        }
    }

    #[test]
    fn init_timeout_defaults_to_a_minute_and_is_read() {
        assert_eq!(
            parse_str(MINIMAL).unwrap().server.init_timeout,
            Duration::from_secs(60)
        );
        let text = format!("[server]\ninit_timeout = \"2m\"\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).unwrap().server.init_timeout,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn the_run_time_helpers_never_panic() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(deadline(now, Duration::MAX) > now);
        let server = ServerConfig {
            max_requests_per_worker: u64::MAX,
            max_requests_jitter: u64::MAX,
            ..ServerConfig::default()
        };
        assert_eq!(server.retire_after(7), Some(u64::MAX));
        let server = ServerConfig {
            max_requests_per_worker: 1,
            max_requests_jitter: u64::MAX,
            ..ServerConfig::default()
        };
        assert!(server.retire_after(u64::MAX).is_some_and(|n| n >= 1));
        let server = ServerConfig {
            max_requests_per_worker: 100,
            max_requests_jitter: 0,
            ..ServerConfig::default()
        };
        assert_eq!(server.retire_after(99), Some(100));
    }

    fn listeners(addrs: &[(&str, bool)]) -> String {
        let mut text = MINIMAL.replace(
            "[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"upper\"\n",
            "",
        );
        for (addr, reuseport) in addrs {
            text.push_str(&format!(
                "\n[[listeners]]\naddr = \"{addr}\"\nplugin = \"upper\"\nreuseport = {reuseport}\n"
            ));
        }
        text
    }

    #[test]
    fn overlapping_tcp_listeners_are_refused_naming_both_lines() {
        // Lines: the first listener's entry starts on line 7, the second's
        // addr is on line 13.
        for (a, b) in [
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("[::ffff:127.0.0.1]:9000", "127.0.0.1:9000"),
            ("[::ffff:0.0.0.0]:9000", "10.0.0.1:9000"),
            ("[::]:9000", "[::1]:9000"),
            ("[::1]:9000", "[::1%3]:9000"),
        ] {
            let err = parse_str(&listeners(&[(a, false), (b, false)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("/etc/nbnet/test.toml:13: listener "),
                "{a} {b}: {err}"
            );
            assert!(err.contains("on line 7"), "{a} {b}: {err}");
            // One of them reuseport is not enough.
            for flags in [(true, false), (false, true)] {
                let result = parse_str(&listeners(&[(a, flags.0), (b, flags.1)]));
                assert!(result.is_err(), "{a} {b} {flags:?}");
            }
        }
    }

    #[test]
    fn tcp_listeners_the_kernel_binds_side_by_side_are_accepted() {
        for (a, b, reuseport) in [
            ("127.0.0.1:9000", "0.0.0.0:9000", true),
            ("[::]:9000", "[::1]:9000", true),
            ("127.0.0.1:9000", "127.0.0.2:9000", false),
            ("127.0.0.1:9000", "[::1]:9000", false),
            ("0.0.0.0:9000", "[::1]:9000", false),
            ("0.0.0.0:9000", "0.0.0.0:9001", false),
            ("[fe80::1%2]:9000", "[fe80::1%3]:9000", false),
            ("127.0.0.1:0", "0.0.0.0:0", false),
        ] {
            let result = parse_str(&listeners(&[(a, reuseport), (b, reuseport)]));
            assert!(
                result.is_ok(),
                "{a} {b}: {:?}",
                result.err().map(|e| e.to_string())
            );
        }
        // Identical addresses are refused even with reuseport.
        let err = parse_str(&listeners(&[
            ("[::ffff:127.0.0.1]:9000", true),
            ("127.0.0.1:9000", true),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("127.0.0.1:9000 is the same address as listener [::ffff:127.0.0.1]:9000"),
            "{err}"
        );
    }

    #[test]
    fn a_dual_stack_wildcard_takes_ipv4_unless_bindv6only_is_set() {
        let key = |s: &str| Endpoint::Tcp(s.parse().unwrap());
        let mut dual = Addresses::new(true);
        dual.add(&key("0.0.0.0:9000"), false, 1).unwrap();
        let err = dual.add(&key("[::]:9000"), false, 2).unwrap_err();
        assert!(
            err.contains("overlaps listener 0.0.0.0:9000 on line 1"),
            "{err}"
        );
        let mut v6only = Addresses::new(false);
        v6only.add(&key("0.0.0.0:9000"), false, 1).unwrap();
        v6only.add(&key("[::]:9000"), false, 2).unwrap();
        v6only
            .add(&key("[::ffff:127.0.0.1]:9001"), false, 3)
            .unwrap();
        assert!(v6only.add(&key("[::]:9001"), false, 4).is_ok());
    }

    #[test]
    fn unix_listeners_naming_the_same_file_are_refused_naming_both_lines() {
        let dir = std::env::temp_dir().join(format!("nbnet-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("link")).unwrap();
        let file = dir.join("nbnet.toml");
        for other in [
            "unix:sub/../a.sock",
            "unix:./a.sock",
            "unix:link/a.sock",
            "unix:nowhere/../a.sock",
        ] {
            let text = listeners(&[("unix:a.sock", false), (other, false)])
                .replace("reuseport = false\n", "");
            let err = parse(&file, &text).unwrap_err().to_string();
            assert!(err.contains(":12: "), "{other}: {err}");
            assert!(
                err.contains("is the same socket file as listener unix:")
                    || err.contains("duplicate listener unix:"),
                "{other}: {err}"
            );
            assert!(err.contains("line 7"), "{other}: {err}");
        }
        let text = listeners(&[("unix:a.sock", false), ("unix:sub/a.sock", false)])
            .replace("reuseport = false\n", "");
        assert!(parse(&file, &text).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unix_paths_the_kernel_cannot_bind_are_refused() {
        let long = format!("unix:/{}.sock", "x".repeat(MAX_UNIX_PATH_BYTES));
        for (addr, says) in [
            (long.as_str(), "over the kernel's limit of 107 bytes"),
            ("unix:run/", "names a folder"),
            ("unix:run/..", "names a folder"),
        ] {
            let text = MINIMAL.replace("127.0.0.1:9000", addr);
            let err = parse_str(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{addr}: {err}");
            assert!(err.contains(":7: "), "{addr}: {err}");
        }
        let text = MINIMAL.replace("127.0.0.1:9000", "unix:a\\u001b[2J.sock");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                ":7: listener addr \"unix:a\\u{1b}[2J.sock\" contains a control character"
            ),
            "{err}"
        );
        let text = MINIMAL.replace("libupper.so", "lib\\nupper.so");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                ":4: plugin \"upper\": path \"lib\\nupper.so\" contains a control character"
            ),
            "{err}"
        );
        let longest = format!("unix:/{}", "x".repeat(MAX_UNIX_PATH_BYTES - 1));
        assert!(parse_str(&MINIMAL.replace("127.0.0.1:9000", &longest)).is_ok());
    }

    #[test]
    fn the_admin_address_may_not_overlap_a_listener() {
        let text = format!("[admin]\naddr = \"0.0.0.0:9000\"\n{MINIMAL}");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains(
                ":2: [admin] addr 0.0.0.0:9000 overlaps listener 127.0.0.1:9000 on line 8"
            ),
            "{err}"
        );
        let text = format!("[admin]\naddr = \"[::ffff:127.0.0.1]:9000\"\n{MINIMAL}");
        assert!(parse_str(&text).is_err());
        let text = format!("[admin]\naddr = \"127.0.0.2:9000\"\n{MINIMAL}");
        assert!(parse_str(&text).is_ok());
    }

    #[test]
    fn values_quoted_in_messages_are_escaped_and_cut_short() {
        let huge = "A".repeat(1_000_000);
        for text in [
            format!("[server]\nworkers = \"{huge}\"\n{MINIMAL}"),
            format!("[server]\nread_timeout = \"{huge}\"\n{MINIMAL}"),
            format!("[server]\n{huge} = 1\n{MINIMAL}"),
            MINIMAL.replace("127.0.0.1:9000", &huge),
            MINIMAL.replace("name = \"upper\"", &format!("name = \"{huge}\"")),
            MINIMAL.replace("plugin = \"upper\"", &format!("plugin = \"{huge}\"")),
            format!("[admin]\naddr = \"{huge}\"\n{MINIMAL}"),
        ] {
            let err = parse_str(&text).unwrap_err().to_string();
            assert!(err.len() < 2000, "{} bytes: {}", err.len(), &err[..2000]);
            assert!(err.contains('…'), "{err}");
        }
        let text = MINIMAL.replace("name = \"upper\"", "name = \"up\\u001b[2Jper\"");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(!err.contains('\u{1b}'), "{err:?}");
        assert!(err.contains("up\\u{1b}[2Jper"), "{err}");
        assert!(err.contains("control character"), "{err}");
        let long_name = "n".repeat(MAX_NAME_BYTES + 1);
        let text = MINIMAL.replace("\"upper\"", &format!("\"{long_name}\""));
        assert!(parse_str(&text)
            .unwrap_err()
            .to_string()
            .contains("use at most 128"));
        assert_eq!(quote("a\"b\n"), "\"a\\\"b\\n\"");
        assert_eq!(bounded("ab\u{7}c", 3), "ab\\u{7}…");
    }

    #[test]
    fn a_listener_naming_an_unknown_plugin_lists_only_a_few_names() {
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("[[plugins]]\nname = \"p{i}\"\npath = \"p.so\"\n"));
        }
        text.push_str("[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"nope\"\n");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.contains("\"p9\", and 990 more)"), "{err}");
    }

    /// 50 000 plugins and as many listeners (each check a hash lookup, each
    /// line number a binary search): this used to take minutes. No timing
    /// asserted: the measured figures are in BENCHMARKS.md.
    #[test]
    fn a_config_with_fifty_thousand_entries_is_validated() {
        let text = many_entries(50_000);
        let config = parse_str(&text).unwrap();
        assert_eq!(config.plugins.len(), 50_000);
        assert_eq!(config.listeners.len(), 50_000);
        assert_eq!(config.listeners[49_999].line, text.lines().count() - 2);
    }

    /// `n` (at most 65 535) plugins, each served on its own port of
    /// 127.0.0.1 (or, every hundredth, on its own Unix socket), as a config.
    fn many_entries(n: usize) -> String {
        assert!(n < 65_536);
        let mut text = String::with_capacity(n * 90);
        for i in 0..n {
            text.push_str(&format!("[[plugins]]\nname = \"p{i}\"\npath = \"p.so\"\n"));
        }
        for i in 0..n {
            let addr = if i % 100 == 0 {
                format!("unix:s{i}.sock")
            } else {
                format!("127.0.0.1:{}", i + 1)
            };
            text.push_str(&format!(
                "[[listeners]]\naddr = \"{addr}\"\nplugin = \"p{i}\"\n"
            ));
        }
        text
    }

    #[test]
    fn a_config_file_over_the_cap_or_not_a_regular_file_is_refused_without_reading_it() {
        let dir = std::env::temp_dir().join(format!("nbnet-config-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.toml");
        let file = std::fs::File::create(&big).unwrap();
        // Sparse: no 16 MiB written.
        file.set_len(MAX_CONFIG_BYTES + 1).unwrap();
        let err = load(&big).unwrap_err().to_string();
        assert!(
            err.contains("big.toml: the config file is 16777217 bytes, over the limit of 16777216 bytes (16 MiB)"),
            "{err}"
        );
        let fifo = dir.join("fifo.toml");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let err = load(&fifo).unwrap_err().to_string();
        assert!(
            err.contains("fifo.toml: cannot read the config file: it is a FIFO"),
            "{err}"
        );
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("it is a directory"), "{err}");
        let latin1 = dir.join("latin1.toml");
        std::fs::write(&latin1, b"# ok\n# caf\xe9\n").unwrap();
        let err = load(&latin1).unwrap_err().to_string();
        assert!(
            err.contains("latin1.toml:2: the config file is not UTF-8"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_number_of_problems_shown_is_bounded() {
        let mut text = MINIMAL.to_string();
        for _ in 0..500 {
            text.push_str("[[plugins]]\nname = \"upper\"\npath = \"p.so\"\n");
        }
        let err = parse_str(&text).unwrap_err();
        assert_eq!(err.problems.len(), 500);
        let shown = err.to_string();
        assert_eq!(shown.lines().count(), SHOWN_PROBLEMS + 1, "{shown}");
        assert!(shown.ends_with("… and 400 more problem(s) not shown; fix these first"));
    }

    /// The figure in BENCHMARKS.md: `cargo test -p nbnet --release --lib
    /// config::tests::measure_ -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test: run it by name"]
    fn measure_validating_a_million_plugins() {
        let file = std::env::temp_dir().join(format!("nbnet-measure-{}.toml", std::process::id()));
        for n in [10_000, 100_000, 1_000_000] {
            let mut text = String::new();
            for i in 0..n {
                text.push_str(&format!("[[plugins]]\nname = \"p{i}\"\npath = \"p.so\"\n"));
            }
            text.push_str("[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"p0\"\n");
            let started = Instant::now();
            let config = parse(&file, &text).unwrap();
            println!(
                "parse: {n} [[plugins]] ({} bytes): {:?}",
                text.len(),
                started.elapsed()
            );
            assert_eq!(config.plugins.len(), n);
        }
        // The most that fits under the cap, read from a file.
        let mut text = String::new();
        let mut n = 0;
        let tail = "[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"p0\"\n";
        loop {
            let entry = format!("[[plugins]]\nname = \"p{n}\"\npath = \"p.so\"\n");
            if (text.len() + entry.len() + tail.len()) as u64 > MAX_CONFIG_BYTES {
                break;
            }
            text.push_str(&entry);
            n += 1;
        }
        text.push_str(tail);
        std::fs::write(&file, &text).unwrap();
        let started = Instant::now();
        let config = load(&file).unwrap();
        println!(
            "load: {n} [[plugins]] ({} bytes, the 16 MiB cap): {:?}",
            text.len(),
            started.elapsed()
        );
        assert_eq!(config.plugins.len(), n);
        let _ = std::fs::remove_file(&file);
    }
}
