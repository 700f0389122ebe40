//! The `nbnet` command line: parses arguments and dispatches to the library
//! (see `lib.rs` for the architecture).

use nbnet::{
    authoring, bench, client, config, control, errln, exit_code, logging, outln, supervisor,
};

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

/// A pre-forking plugin host for TCP services speaking nbNet's framing:
/// every message is a 10-digit ASCII length header followed by that many
/// bytes (`0000000002hi` is answered `0000000002HI` by the upper plugin).
///
/// With no subcommand, nbnet serves the config file: the master binds the
/// listeners, forks the workers, and each worker loads the plugins.
#[derive(Parser, Debug)]
#[command(
    name = "nbnet",
    about,
    long_about,
    disable_version_flag = true,
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// The config file to serve, check, reload or stop (also accepted after
    /// `reload` and `stop`). Default: $NBNET_CONFIG if set, else
    /// config/nbnet.toml.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print the version and the plugin ABI versions this nbnet loads.
    #[arg(short = 'V', long)]
    version: bool,

    /// Validate the config and load every plugin (in a child process), print
    /// every problem, and exit: 0 when all is well.
    #[arg(long)]
    check: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

/// The end of `nbnet --help`: what the master does with signals, and what
/// the exit status means.
const AFTER_HELP: &str = "\
Signals to the master:
  SIGTERM, SIGQUIT   graceful stop: serve on for [server] drain_delay while
                     /healthz answers 503 draining, then finish the frames in
                     progress, answer them, exit 0 (a second one skips the delay)
  SIGINT             fast stop: close every connection now, exit 0
  SIGHUP             reload config and plugins without refusing a connection
  SIGUSR2            binary upgrade: start a new master from the nbnet binary
                     at this master's path (a new build) with the same
                     config; once it is ready it serves, this master hands
                     its connections over and exits (see `nbnet upgrade`)
  SIGTTIN / SIGTTOU  one worker more / fewer
  SIGUSR1            reopen the [log] file (logrotate's postrotate); ignored
                     when logging to stderr
  SIGWINCH           logged and ignored

The config file is --config FILE (before or after `reload`/`stop`), else
$NBNET_CONFIG, else config/nbnet.toml. The master locks its [server]
pid_file: a second master with the same file refuses to start, and
`nbnet stop`/`reload` signal only the master holding that lock.

Exit status: 0 stopped cleanly or check passed, 1 other failure (e.g. cannot
listen, another master holds the pid_file, stdout could not be written), 2
bad command line, 3 invalid config, 4 a plugin failed to load or init, 5 too
many worker restarts.

Logs go to stderr, or to [log] file (appended); [log] level in the config
sets the level, RUST_LOG overrides it. A lost log stream never stops the
server: lines that cannot be written are counted
(nbnet_log_lines_dropped_total). The README and docs/plugins.md explain the
rest.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one request and print the response payload.
    ///
    /// Frames PAYLOAD (10-digit length header + bytes), sends it to ADDR,
    /// reads one response frame and prints its payload followed by a
    /// newline.
    Send {
        /// Server address: IP:PORT, HOST:PORT (each address the name
        /// resolves to is tried in turn) or unix:/path (a Unix socket
        /// listener), e.g. 127.0.0.1:9000, localhost:9000, [::1]:9000.
        addr: String,
        /// The request payload.
        payload: String,
        /// Give up if connecting or the answer takes longer than this.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        tls: nbnet::tls::TlsArgs,
    },
    /// Load-test a server: many connections, pipelined requests, every
    /// response checked, latency percentiles.
    Bench(bench::BenchArgs),
    /// Reload the running server: signal its master (found through the
    /// config's pid_file) with SIGHUP. It re-reads the config and plugins,
    /// starts new workers, and drains the old ones; an invalid config
    /// changes nothing. Waits for the outcome: exit 0 once the new config
    /// serves, else the master's reason (3 invalid config, 4 a plugin
    /// failed, 1 otherwise); says so if the reload was queued.
    Reload {
        /// The config file the server was started with (default:
        /// $NBNET_CONFIG, else config/nbnet.toml).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Upgrade the running server to the nbnet binary now at its path (a
    /// new build installed over the old one), refusing no connection:
    /// SIGUSR2 to the master (found through the config's pid_file). The
    /// master starts a new master from that binary with the same config
    /// and listening sockets; once every new worker is ready, the new
    /// master serves, the old one hands its connections over and exits.
    /// If the new binary fails to start or is not ready in time, the old
    /// master serves on (a rollback). Waits for the outcome: exit 0 once
    /// the new master serves and the old one has exited, else the
    /// master's reason (1).
    Upgrade {
        /// The config file the server was started with (default:
        /// $NBNET_CONFIG, else config/nbnet.toml).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Stop the running server gracefully (SIGTERM to the master found
    /// through the config's pid_file) and wait until it has exited. A
    /// server that is not running (no PID file, or a stale one) is stopped
    /// already: exit 0 with a message, unless --strict.
    Stop {
        /// The config file the server was started with (default:
        /// $NBNET_CONFIG, else config/nbnet.toml).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Stop at once (SIGINT): close connections without draining.
        #[arg(long)]
        fast: bool,
        /// Fail (exit 1) when the server is not running; by default that
        /// is success, with a message (the init-script convention).
        #[arg(long)]
        strict: bool,
    },
    /// Tools for plugin authors: inspect, run and create plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print a shell completion script, e.g.
    /// `nbnet completions bash > /etc/bash_completion.d/nbnet`, or
    /// `nbnet completions zsh > "${fpath[1]}/_nbnet"`, or
    /// `nbnet completions fish > ~/.config/fish/completions/nbnet.fish`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g.
    /// `nbnet man > /usr/local/share/man/man1/nbnet.1`, or `nbnet man | man -l -`.
    Man,
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Show a plugin's kind, name, version and ABI, and whether this nbnet
    /// can load it (and why not). Exits 0 when it can.
    Info {
        /// The plugin library (.so).
        file: PathBuf,
    },
    /// Run a plugin on inputs, without a server: one request per line of
    /// stdin (or framed with --frames), one response per line of stdout.
    ///
    /// Empty lines are skipped, with a note on stderr: the protocol has no
    /// empty requests (a zero length header is a framing error), so a
    /// server never passes one to a plugin.
    ///
    /// The plugin is first loaded in a child process, as the server checks
    /// its plugins: an init that fails, crashes, exits or stops the process
    /// is reported naming the plugin (exit 4). Its init then runs again,
    /// here.
    Run {
        /// The plugin library (.so).
        file: PathBuf,
        /// The plugin's config table as TOML text, e.g. 'start = 10'.
        #[arg(long, default_value = "")]
        config: String,
        /// Stdin is a stream of frames (10-digit length + payload); print
        /// framed responses.
        #[arg(long)]
        frames: bool,
        /// Largest request or response payload.
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        max_frame_bytes: usize,
        /// As `[[plugins]] threads`: run N instances on a thread pool
        /// (0: on the main thread).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=nbnet::config::MAX_PLUGIN_THREADS as u64))]
        threads: u64,
        /// As `[server] deferred_timeout` (seconds, or `500ms`): how long a
        /// deferred answer may take before its request fails.
        #[arg(long, default_value = "30", value_parser = nbnet::bench::parse_duration)]
        deferred_timeout: std::time::Duration,
        /// As `[server] plugin_timeout` (seconds, or `500ms`): how long one
        /// call on a pool thread may run before its request fails.
        #[arg(long, default_value = "5", value_parser = nbnet::bench::parse_duration)]
        plugin_timeout: std::time::Duration,
    },
    /// Start a new plugin from a template that builds as is.
    New {
        /// The plugin's name (lowercase letters, digits, '-', '_').
        name: String,
        /// Language of the plugin.
        #[arg(long, value_enum, default_value = "rust")]
        lang: authoring::Lang,
        /// Folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The plugin-api folder of an nbnet checkout (default: the one
        /// this nbnet was built from).
        #[arg(long)]
        api_path: Option<PathBuf>,
    },
}

fn main() {
    // Before anything opens a file: the descriptors LISTEN_FDS names are
    // only ours to take while nothing else can have opened them.
    nbnet::systemd::stash_listen_fds();
    nbnet::supervisor::stash_upgrade_channel();
    let cli = Cli::parse();
    if cli.version {
        outln!("{}", control::version_line());
        std::process::exit(exit_code::OK);
    }
    let code = match cli.command {
        Some(Command::Send {
            addr,
            payload,
            timeout,
            tls,
        }) => match tls.options() {
            Ok(tls) => client::send(&addr, payload.as_bytes(), timeout, tls.as_ref()),
            Err(message) => {
                errln!("nbnet send: {message}");
                exit_code::USAGE
            }
        },
        Some(Command::Bench(args)) => bench::run(&args),
        Some(Command::Plugin(command)) => plugin_command(command),
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "nbnet", &mut script);
            print_bytes(&script)
        }
        Some(Command::Man) => {
            let mut page = Vec::new();
            let command = Cli::command().version(env!("CARGO_PKG_VERSION"));
            match clap_mangen::Man::new(command).render(&mut page) {
                Ok(()) => print_bytes(&page),
                Err(e) => {
                    errln!("nbnet man: {e}");
                    exit_code::FAILURE
                }
            }
        }
        Some(Command::Reload { config }) => control::reload(&config_file(config, cli.config)),
        Some(Command::Upgrade { config }) => control::upgrade(&config_file(config, cli.config)),
        Some(Command::Stop {
            config,
            fast,
            strict,
        }) => control::stop(&config_file(config, cli.config), fast, strict),
        None => serve_or_check(&config_file(None, cli.config), cli.check),
    };
    std::process::exit(code);
}

/// Writes `bytes` to stdout; 1 (with a message) if stdout cannot take them.
fn print_bytes(bytes: &[u8]) -> i32 {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => exit_code::OK,
        Err(e) => {
            errln!("nbnet: cannot write to stdout: {e}");
            exit_code::FAILURE
        }
    }
}

/// The config file a command works on: `--config` after the subcommand,
/// else `--config` before it, else `$NBNET_CONFIG` (when set and not
/// empty), else [`config::DEFAULT_PATH`]. A flag wins over the environment,
/// the environment over the default.
fn config_file(after: Option<PathBuf>, before: Option<PathBuf>) -> PathBuf {
    after
        .or(before)
        .or_else(|| {
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

/// The environment variable naming the config file when `--config` is not
/// given.
const CONFIG_ENV: &str = "NBNET_CONFIG";

fn plugin_command(command: PluginCommand) -> i32 {
    match command {
        PluginCommand::Info { file } => authoring::info(&file),
        PluginCommand::Run {
            file,
            config,
            frames,
            max_frame_bytes,
            threads,
            deferred_timeout,
            plugin_timeout,
        } => {
            // Plugin log lines go to stderr, like the server's.
            logging::init(config::LogLevel::Info);
            authoring::run(&authoring::RunOptions {
                file,
                config,
                frames,
                max_frame_bytes,
                threads: threads as usize,
                deferred_timeout,
                plugin_timeout,
            })
        }
        PluginCommand::New {
            name,
            lang,
            dir,
            api_path,
        } => authoring::new(&name, lang, &dir, api_path.as_deref()),
    }
}

fn serve_or_check(file: &std::path::Path, check_only: bool) -> i32 {
    let mut config = match config::load(file) {
        Ok(config) => config,
        Err(e) => {
            errln!("nbnet: invalid config:\n{e}");
            return exit_code::CONFIG_INVALID;
        }
    };
    if !check_only {
        // Before the subscriber exists: it asks whether stderr is a
        // terminal (colours), and from now on stderr is the file.
        if let Some(file) = &config.log.file {
            if let Err(message) = logging::to_file(file) {
                errln!("nbnet: {message} ({})", config::shown(&config.file));
                return exit_code::FAILURE;
            }
        }
        logging::init_with(config.log.level, config.log.format);
        nbnet::tls::log_warnings(&config);
        return supervisor::serve(config);
    }
    logging::init_with(config.log.level, config.log.format);
    // A plugin whose init daemonizes must not leave a process behind per
    // check: sweep them before printing (a failed print ends the process).
    let leftovers = authoring::Leftovers::watch();
    let report = supervisor::check::check_plugins(&mut config);
    leftovers.sweep_and_report("nbnet");
    for line in &report.loaded {
        outln!("ok: {line}");
    }
    let mut addresses = supervisor::check::probe_listeners(&config);
    probe_admin(&config, &mut addresses);
    let root = nbnet::privileges::check(&config);
    if let Ok(Some(note)) = &root {
        errln!("nbnet: note: {note}");
    }
    let files = probe_files(&config);
    let tls_warnings = config.listeners.iter().filter_map(|l| l.tls.as_ref());
    for warning in addresses
        .warnings
        .iter()
        .chain(&files.warnings)
        .chain(tls_warnings.flat_map(|tls| &tls.warnings))
    {
        errln!("nbnet: warning: {warning}");
    }
    let errors: Vec<&String> = report
        .errors
        .iter()
        .chain(&addresses.errors)
        .chain(&files.errors)
        .chain(root.as_ref().err())
        .collect();
    if errors.is_empty() {
        outln!(
            "{}: config OK ({} plugin(s), {} listener(s))",
            config::shown(&config.file),
            config.plugins.len(),
            config.listeners.len()
        );
        exit_code::OK
    } else {
        for error in &errors {
            errln!("nbnet: {error}");
        }
        errln!(
            "nbnet: {}: {} problem(s) found",
            config::shown(&config.file),
            errors.len()
        );
        if !report.errors.is_empty() {
            exit_code::PLUGIN_LOAD_FAILED
        } else if root.is_err() {
            // The start would be refused the same way.
            exit_code::CONFIG_INVALID
        } else {
            // Only addresses or files are wrong: the same status as a start
            // that cannot listen or cannot create its pid_file.
            exit_code::FAILURE
        }
    }
}

/// Tries to bind the `[admin]` address as `probe_listeners` tries the
/// listeners (and releases it at once): the start would fail on an address
/// this machine does not have or this user may not bind. An address in use
/// is only a warning, as `--check` is often run while the server is up.
fn probe_admin(config: &config::Config, report: &mut supervisor::check::AddressReport) {
    let Some(addr) = config.admin else { return };
    let place = match config.admin_line {
        Some(line) => format!("{}:{line}", config::shown(&config.file)),
        None => config::shown(&config.file),
    };
    match supervisor::admin::bind_std(addr) {
        Ok(listener) => drop(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.warnings.push(format!(
            "[admin] addr {addr} ({place}): address in use (expected if this nbnet is already running)"
        )),
        Err(e) => report.errors.push(format!(
            "[admin] addr {addr} ({place}): cannot listen: {e}; choose an address of this machine (e.g. 127.0.0.1:9191)"
        )),
    }
}

/// What `--check` finds out about the files the server would create
/// (`[server] pid_file`, `[log] file`) without creating them.
#[derive(Debug, Default)]
struct FileReport {
    /// Files the server could not create: it would not start.
    errors: Vec<String>,
    /// Files this user cannot write (fine if the server runs as another).
    warnings: Vec<String>,
}

/// Checks that the server could create its `[server] pid_file` and
/// `[log] file`: the folder exists, the path is not a folder, and this user
/// may write there. Creates nothing.
fn probe_files(config: &config::Config) -> FileReport {
    let mut report = FileReport::default();
    // (A character device such as /dev/null is a log, but holds no PID.)
    let files = [
        (
            "[server] pid_file",
            config.server.pid_file.as_deref(),
            false,
        ),
        ("[log] file", config.log.file.as_deref(), true),
    ];
    for (key, path, device_ok) in files {
        let Some(path) = path else { continue };
        let what = format!(
            "{key} {} ({})",
            config::shown(path),
            config::shown(&config.file)
        );
        match probe_file(path, device_ok) {
            Ok(()) => {}
            Err(Probe::Error(why)) => report.errors.push(format!("{what}: {why}")),
            Err(Probe::Warning(why)) => report.warnings.push(format!("{what}: {why}")),
        }
    }
    report
}

/// Why a file the server creates could not be created.
enum Probe {
    Error(String),
    Warning(String),
}

fn probe_file(path: &std::path::Path, device_ok: bool) -> Result<(), Probe> {
    use std::io::ErrorKind;
    let writable = |at: &std::path::Path, what: &str| {
        match nix::unistd::access(
        at,
        nix::unistd::AccessFlags::W_OK,
    ) {
        Ok(()) => Ok(()),
        Err(e @ (nix::errno::Errno::EACCES | nix::errno::Errno::EPERM)) => Err(Probe::Warning(
            format!("{what} is not writable by this user ({e}): the server cannot start unless it runs as a user who may write it"),
        )),
        Err(e) => Err(Probe::Error(format!("{what} cannot be written: {e}"))),
    }
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Probe::Error(
            "is a folder; name a file (e.g. nbnet.pid inside it)".into(),
        )),
        // A FIFO, a socket…: the server would refuse it (or hang on it).
        // (A character device such as /dev/null is accepted as a log.)
        Ok(meta)
            if config::not_a_file(&meta.file_type()).is_some()
                && !(device_ok
                    && std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type())) =>
        {
            Err(Probe::Error(format!(
                "is {}, not a regular file",
                config::not_a_file(&meta.file_type()).unwrap_or("not a regular file")
            )))
        }
        Ok(_) => writable(path, "the file"),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let folder = path.parent().unwrap_or(std::path::Path::new("/"));
            match std::fs::metadata(folder) {
                Ok(meta) if meta.is_dir() => {
                    writable(folder, &format!("its folder {}", config::shown(folder)))
                }
                Ok(_) => Err(Probe::Error(format!(
                    "{} is not a folder; choose a path in an existing folder",
                    config::shown(folder)
                ))),
                Err(e) if e.kind() == ErrorKind::NotFound => Err(Probe::Error(format!(
                    "folder {} does not exist; create it, or choose a path in an existing folder",
                    config::shown(folder)
                ))),
                Err(e) if e.kind() == ErrorKind::NotADirectory => Err(Probe::Error(format!(
                    "part of {} is not a folder; choose a path in an existing folder",
                    config::shown(folder)
                ))),
                Err(e) => Err(Probe::Warning(format!(
                    "cannot check its folder {}: {e}",
                    config::shown(folder)
                ))),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotADirectory => Err(Probe::Error(
            "part of the path is not a folder; choose a path in an existing folder".into(),
        )),
        Err(e) => Err(Probe::Warning(format!("cannot check it: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap checks the whole command tree (e.g. two `--config` flags that
    /// clash once one is global) only in debug builds, when the bad argument
    /// is used; this checks every subcommand at once.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
