//! The nbnet config file: TOML, read with serde, validated into a [`Config`].
//!
//! Loading is layered so that tests can feed strings: [`load`] reads a file,
//! [`parse`] turns text into a validated [`Config`]. Every problem is reported
//! as `file:line: message`, and validation collects all problems instead of
//! stopping at the first, so one `nbnet --check` run shows everything to fix.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::codec::MAX_DECLARED;
pub use crate::listener::Endpoint;

/// Most workers a config may ask for: the master's scoreboard holds twice
/// as many, so that a reload can run both generations side by side.
pub const MAX_WORKERS: usize = 512;

/// Default config file, relative to the current directory.
pub const DEFAULT_PATH: &str = "config/nbnet.toml";

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

/// `[server]`: process model and per-connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker processes to fork; 0 means one per CPU.
    pub workers: usize,
    /// Worker restarts within `restart_window` after which the master gives
    /// up and stops (nbNet's `max_restarts`, counted over a sliding window
    /// so that rare crashes over months never add up to a shutdown).
    pub max_restarts: u32,
    /// The sliding window `max_restarts` is counted over.
    #[serde(deserialize_with = "duration")]
    pub restart_window: Duration,
    /// A plugin call running longer than this is considered hung: the
    /// master kills that worker and starts a new one.
    #[serde(deserialize_with = "duration")]
    pub plugin_timeout: Duration,
    /// How long one plugin may take to load and initialise (in `--check`,
    /// at startup, on reload and in every worker): longer, and it is
    /// treated as hung. Separate from `plugin_timeout` because an init may
    /// legitimately connect to databases or warm caches.
    #[serde(deserialize_with = "duration")]
    pub init_timeout: Duration,
    /// Close a connection that sends nothing (or is not read) for this long.
    #[serde(deserialize_with = "duration")]
    pub read_timeout: Duration,
    /// Largest request or response payload, in bytes.
    pub max_frame_bytes: usize,
    /// Open client connections per worker; past it the worker stops accepting.
    pub max_connections: usize,
    /// Response bytes one connection may have waiting (its client not
    /// reading them) before the worker stops answering and reading its
    /// further requests. Bounds memory per connection to about twice this
    /// plus one `max_frame_bytes` response.
    pub max_pending_output_bytes: usize,
    /// Bytes one worker's connections may hold in their buffers together
    /// (unfinished requests and unsent responses, as allocated); past it
    /// the connections holding the most are closed, largest first (Redis'
    /// `maxmemory-clients`). At least `max_frame_bytes`.
    pub max_buffered_bytes: usize,
    /// How long a graceful stop (SIGTERM) may take: connections still busy
    /// after it are cut.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
    /// Replace a worker after it has answered this many requests (0 = never),
    /// to bound the effect of slow leaks in plugins (gunicorn's max_requests).
    pub max_requests_per_worker: u64,
    /// Up to this many more requests, chosen per worker, so that workers
    /// started together are not all replaced at once.
    pub max_requests_jitter: u64,
    /// Where the master writes its PID (for `nbnet reload` / `nbnet stop`);
    /// relative to the config file's folder. None: no PID file.
    pub pid_file: Option<PathBuf>,
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
            // 16 frames of the default maximum at once per worker (one
            // thread), far more than one core needs in flight; bounds the
            // whole server to workers x 256 MiB (on top of the fixed
            // per-worker cost), where 10 000 connections could hold 160 GiB.
            max_buffered_bytes: 256 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            max_requests_per_worker: 0,
            max_requests_jitter: 0,
            pid_file: None,
        }
    }
}

impl ServerConfig {
    /// The number of workers to run: `workers`, or the CPU count when it is 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log level; `RUST_LOG` overrides it.
    pub level: LogLevel,
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
    /// The name listeners refer to it by.
    pub name: String,
    /// Absolute path of the `.so` (relative paths resolve against the config's folder).
    pub path: PathBuf,
    /// The plugin's own `config` table, re-serialized as TOML for the plugin.
    pub config_toml: String,
    /// A sealed in-memory copy of the `.so`, taken by the master when it
    /// validates the config ([`crate::plugin::image`]): what the check and
    /// every worker of this config load, whatever happens to the file.
    /// `None` until taken (then the file at `path` is loaded).
    pub image: Option<crate::plugin::image::Image>,
    /// Line of the entry in the config file, for messages.
    pub line: usize,
}

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
        for (i, (line, message)) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match line {
                Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, message)?,
                None => write!(f, "{}: {}", self.file.display(), message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// The file as written, before validation. Spans let errors name lines.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    plugins: Vec<Spanned<RawPlugin>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(default)]
    config: Option<toml::Table>,
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
}

/// Reads and validates the config file at `file`.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        problems: vec![(None, format!("cannot read the config file: {e}"))],
    })?;
    parse(file, &text)
}

/// Validates config `text`, read from `file` (used for messages and to
/// resolve relative plugin paths).
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let fail = |problems| ConfigError {
        file: file.to_path_buf(),
        problems,
    };

    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| line_of(span.start));
        let mut message = e.message().trim_end().to_string();
        // Quote the offending line: a type error's message names the value
        // but not the key.
        if let Some(source) = line.and_then(|l| text.lines().nth(l - 1)) {
            if !source.trim().is_empty() {
                message = format!("{message} (in `{}`)", source.trim());
            }
        }
        fail(vec![(line, message)])
    })?;

    let mut problems = Vec::new();
    let server = &raw.server;
    // The line of a `[server]` key, so that its problems name it too.
    let key_line = |key: &str| {
        text.lines()
            .position(|line| {
                line.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
            .map(|index| index + 1)
    };
    if server.max_frame_bytes == 0 || server.max_frame_bytes as u64 > MAX_DECLARED {
        problems.push((
            key_line("max_frame_bytes"),
            format!(
                "[server] max_frame_bytes = {} is out of range: use 1 ..= {MAX_DECLARED}",
                server.max_frame_bytes
            ),
        ));
    }
    for (key, value) in [
        ("read_timeout", server.read_timeout),
        ("plugin_timeout", server.plugin_timeout),
        ("init_timeout", server.init_timeout),
        ("restart_window", server.restart_window),
        ("shutdown_timeout", server.shutdown_timeout),
    ] {
        if value.is_zero() {
            problems.push((key_line(key), format!("[server] {key} must be above zero")));
        }
    }
    if server.workers > MAX_WORKERS {
        problems.push((
            key_line("workers"),
            format!(
                "[server] workers = {} is more than nbnet supports ({MAX_WORKERS})",
                server.workers
            ),
        ));
    }
    if server.max_pending_output_bytes == 0 {
        problems.push((
            key_line("max_pending_output_bytes"),
            "[server] max_pending_output_bytes must be at least 1".to_string(),
        ));
    }
    if server.max_buffered_bytes < server.max_frame_bytes {
        problems.push((
            key_line("max_buffered_bytes"),
            format!(
                "[server] max_buffered_bytes = {} is below max_frame_bytes = {}: a budget for all connections' buffers must hold at least one frame; raise max_buffered_bytes (or lower max_frame_bytes)",
                server.max_buffered_bytes, server.max_frame_bytes
            ),
        ));
    }
    if server.max_connections == 0 {
        problems.push((
            key_line("max_connections"),
            "[server] max_connections must be at least 1".to_string(),
        ));
    }

    let base = file.parent().unwrap_or(Path::new("."));
    let mut server = raw.server;
    if let Some(pid_file) = &server.pid_file {
        server.pid_file =
            Some(std::path::absolute(base.join(pid_file)).unwrap_or_else(|_| base.join(pid_file)));
    }
    let mut plugins: Vec<PluginSpec> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for entry in &raw.plugins {
        let line = line_of(entry.span().start);
        let plugin = entry.get_ref();
        let name = plugin.name.get_ref().trim();
        if name.is_empty() {
            problems.push((Some(line), "a [[plugins]] entry has an empty name".into()));
        } else if let Some(&first) = by_name.get(name) {
            problems.push((
                Some(line_of(plugin.name.span().start)),
                format!(
                    "duplicate plugin name {name:?} (first defined on line {}); give each [[plugins]] entry its own name",
                    plugins[first].line
                ),
            ));
        }
        let path_text = plugin.path.get_ref();
        if path_text.is_empty() {
            problems.push((
                Some(line_of(plugin.path.span().start)),
                format!("plugin {name:?} has an empty path"),
            ));
        }
        let path =
            std::path::absolute(base.join(path_text)).unwrap_or_else(|_| base.join(path_text));
        let config_toml = match &plugin.config {
            Some(table) => toml::to_string(table).unwrap_or_default(),
            None => String::new(),
        };
        by_name.entry(name.to_string()).or_insert(plugins.len());
        plugins.push(PluginSpec {
            name: name.to_string(),
            path,
            config_toml,
            line,
            image: None,
        });
    }

    let mut listeners: Vec<ListenerSpec> = Vec::new();
    for entry in &raw.listeners {
        let line = line_of(entry.span().start);
        let listener = entry.get_ref();
        let addr_text = listener.addr.get_ref();
        let addr_line = Some(line_of(listener.addr.span().start));
        let addr = match parse_endpoint(addr_text, base) {
            Ok(addr) => Some(addr),
            Err(why) => {
                problems.push((addr_line, why));
                None
            }
        };
        if let Some(addr) = &addr {
            if let Some(first) = listeners.iter().find(|l| l.addr == *addr) {
                problems.push((
                    addr_line,
                    format!(
                        "duplicate listener {addr} (first defined on line {})",
                        first.line
                    ),
                ));
            }
            let unix = matches!(addr, Endpoint::Unix(_));
            if let Some(reuseport) = listener.reuseport.as_ref().filter(|r| *r.get_ref() && unix) {
                problems.push((
                    Some(line_of(reuseport.span().start)),
                    format!("listener {addr}: reuseport applies to TCP listeners only"),
                ));
            }
            if !unix && listener.mode.is_some() {
                problems.push((
                    addr_line,
                    format!("listener {addr}: mode applies to unix: listeners only"),
                ));
            }
        }
        let mode = match &listener.mode {
            None => None,
            Some(text) => match u32::from_str_radix(text.get_ref().trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => Some(mode),
                _ => {
                    problems.push((
                        Some(line_of(text.span().start)),
                        format!(
                            "listener mode {:?} is not octal permissions (for example \"0660\")",
                            text.get_ref()
                        ),
                    ));
                    None
                }
            },
        };
        let plugin_name = listener.plugin.get_ref().trim();
        let plugin = match by_name.get(plugin_name) {
            Some(&index) => Some(index),
            None => {
                let known: Vec<&str> = plugins.iter().map(|p| p.name.as_str()).collect();
                problems.push((
                    Some(line_of(listener.plugin.span().start)),
                    format!(
                        "listener {addr_text} names plugin {plugin_name:?}, which no [[plugins]] entry defines (defined: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
                None
            }
        };
        if let (Some(addr), Some(plugin)) = (addr, plugin) {
            listeners.push(ListenerSpec {
                addr,
                plugin,
                line,
                proxy_protocol: listener.proxy_protocol,
                reuseport: listener.reuseport.as_ref().is_some_and(|r| *r.get_ref()),
                mode,
            });
        }
    }
    let admin = raw.admin.as_ref().and_then(|admin| {
        let text = admin.addr.get_ref();
        match text.parse::<SocketAddr>() {
            Ok(addr) if listeners.iter().any(|l| l.addr == Endpoint::Tcp(addr)) => {
                problems.push((
                    Some(line_of(admin.addr.span().start)),
                    format!(
                        "[admin] addr {addr} is also a [[listeners]] address; use another port"
                    ),
                ));
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push((
                    Some(line_of(admin.addr.span().start)),
                    format!(
                        "[admin] addr {text:?} is not IP:PORT (for example \"127.0.0.1:9100\")"
                    ),
                ));
                None
            }
        }
    });
    if raw.listeners.is_empty() {
        problems.push((
            None,
            "no [[listeners]]: add one, e.g. [[listeners]] addr = \"127.0.0.1:9000\" plugin = \"upper\"".into(),
        ));
    }

    if !problems.is_empty() {
        return Err(fail(problems));
    }
    Ok(Config {
        file: file.to_path_buf(),
        server,
        log: raw.log,
        admin,
        plugins,
        listeners,
    })
}

/// Parses a listener address: `IP:PORT`, or `unix:PATH` (a relative path
/// resolves against the config file's folder).
fn parse_endpoint(text: &str, base: &Path) -> Result<Endpoint, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(
                "listener addr \"unix:\" needs a path, e.g. \"unix:/run/nbnet.sock\"".into(),
            );
        }
        let path = base.join(path);
        return Ok(Endpoint::Unix(std::path::absolute(&path).unwrap_or(path)));
    }
    text.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| {
        format!(
            "listener addr {text:?} is not IP:PORT or unix:PATH (for example \"127.0.0.1:9000\", \"[::1]:9000\" or \"unix:/run/nbnet.sock\")"
        )
    })
}

/// Deserializes a duration written as whole seconds (`30`) or as a humantime
/// string (`"30s"`, `"500ms"`, `"2m"`).
fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(u64),
        Text(String),
    }
    match Written::deserialize(deserializer)? {
        Written::Seconds(s) => Ok(Duration::from_secs(s)),
        Written::Text(text) => humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"30s\", \"500ms\" or a number of seconds"
            ))
        }),
    }
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
        let text = format!("[admin]\naddr = \"127.0.0.1:9100\"\n{MINIMAL}");
        assert_eq!(
            parse_str(&text).unwrap().admin,
            Some("127.0.0.1:9100".parse().unwrap())
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
}
