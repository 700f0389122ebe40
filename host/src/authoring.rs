//! Tools for plugin authors: `nbnet plugin info | run | new`.
//!
//! They exist to make the edit–build–try loop short: see what a `.so` is and
//! whether this host loads it, run it on inputs without a server, and start a
//! new plugin from a template that builds as is.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::codec::FrameReader;
use crate::config::PluginSpec;
use crate::exit_code;
use crate::logging::untrusted;
use crate::orphans;
use crate::plugin::deferred::{Completions, Done};
use crate::plugin::{self, Plugin, RawConnection, ResponseSink};
use crate::{errln, outln};
use nbnet_plugin_api::abi::{RawDeferred, ABI_MAJOR, ABI_MINOR};
use nbnet_plugin_api::sink::Deferrer;

/// `nbnet plugin info FILE`: kind, own name and version, ABI, and whether
/// this host can load it (and why not). Exit 0 when it can.
///
/// What the library says about itself (its name and version, and a loader
/// error, which may quote it) is escaped and bounded with
/// [`untrusted`]: a plugin cannot send control sequences to the terminal,
/// forge output lines, or flood it.
pub fn info(file: &Path) -> i32 {
    let path = absolute(file);
    let report = match missing(file) {
        // The loader's own message speaks of a config file's folder.
        Some(why) => plugin::Inspection {
            kind: None,
            name_version: None,
            abi: None,
            verdict: Err(why),
        },
        None => {
            // Loading the library runs its constructors, which may start
            // processes.
            let leftovers = Leftovers::watch();
            let report = plugin::inspect(&path);
            leftovers.sweep_and_report("nbnet plugin info");
            report
        }
    };
    outln!("file:     {}", path.display());
    outln!(
        "kind:     {}",
        match report.kind {
            Some(plugin::Kind::Rust) => "Rust plugin (abi_stable root module, export_plugin!)",
            Some(plugin::Kind::C) => "C plugin (nbnet_plugin_entry, nbnet_plugin.h)",
            // Only a config's `threads` makes one; a file never is one.
            Some(plugin::Kind::Pool) | None => "not recognised as an nbnet plugin",
        }
    );
    if let Some((name, version)) = &report.name_version {
        outln!("name:     {}", untrusted(name));
        outln!("version:  {}", untrusted(version));
    }
    match report.abi {
        Some((major, minor)) => outln!(
            "abi:      {major}.{minor} (this host loads {ABI_MAJOR}.0 to {ABI_MAJOR}.{ABI_MINOR})"
        ),
        None => {
            outln!("abi:      unknown (this host loads {ABI_MAJOR}.0 to {ABI_MAJOR}.{ABI_MINOR})")
        }
    }
    match report.verdict {
        Ok(()) => {
            outln!("loadable: yes");
            // Loading checks the file and its ABI, not the plugin's own
            // init, which may still refuse its config or the machine.
            outln!(
                "init:     not tried (run it with `nbnet plugin run FILE --config TOML`, or `nbnet --check` for a server config)"
            );
            exit_code::OK
        }
        Err(reason) => {
            outln!("loadable: no: {}", untrusted(&reason));
            exit_code::PLUGIN_LOAD_FAILED
        }
    }
}

/// Why `file`, given on the command line, cannot be a plugin because it is
/// not there: the plugin loader says that relative paths are resolved
/// against the config file's folder, and here there is no config file.
fn missing(file: &Path) -> Option<String> {
    match std::fs::metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(if file.is_relative() {
            let here = std::env::current_dir().map_or_else(
                |_| "the current folder".into(),
                |d| untrusted(&d.to_string_lossy()),
            );
            format!("no such file; check the path (a relative path is resolved against the current folder, {here})")
        } else {
            "no such file; check the path".to_string()
        }),
        _ => None,
    }
}

/// Options of `nbnet plugin run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The plugin library.
    pub file: PathBuf,
    /// The plugin's config table as TOML text (`start = 10`).
    pub config: String,
    /// Input is a framed stream (10-digit headers), output framed too.
    pub frames: bool,
    /// Largest request and response.
    pub max_frame_bytes: usize,
    /// As `[[plugins]] threads`: 0 runs the plugin on this thread, N a pool
    /// of N instances.
    pub threads: usize,
    /// As `[server] deferred_timeout`: how long a deferred answer may take.
    pub deferred_timeout: Duration,
    /// As `[server] plugin_timeout`, for a pool thread's calls.
    pub plugin_timeout: Duration,
}

/// Most requests `plugin run` has waiting for deferred answers at once
/// (more wait to be handed to the plugin).
const MAX_IN_FLIGHT: usize = 1024;

/// `nbnet plugin run`: loads the plugin as worker 0 of 1 and answers each
/// input (one payload per line, or frames) on stdout. Plugin errors go to
/// stderr and the run continues; exit 1 if any request failed, or if stdout
/// could not be written (the run stops there: see [`crate::output`]).
/// Processes the plugin started and left running are killed at the end
/// (see [`Leftovers`]).
///
/// Requests are handed to the plugin one after the other, as a client
/// pipelining them would: a plugin that defers its answers (ABI 1.3), or
/// a pool (`--threads N`), has several in flight, and the answers are
/// printed in request order as they complete.
pub fn run(options: &RunOptions) -> i32 {
    let leftovers = Leftovers::watch();
    let code = run_plugin(options);
    leftovers.sweep_and_report("nbnet plugin run");
    code
}

/// Makes completion handles for `plugin run`'s sink.
struct RunDeferrer {
    completions: &'static Completions,
    last: u64,
}

impl Deferrer for RunDeferrer {
    fn defer(&mut self) -> Result<(*mut RawDeferred, u64), String> {
        self.last += 1;
        Ok((self.completions.handle(self.last), self.last))
    }
}

/// One request's answer in `plugin run`'s in-order output.
enum Slot {
    /// The response frame.
    Ready(Vec<u8>),
    /// Deferred: waiting for this token's completion, since then.
    Waiting(u64, Instant),
    /// The error to report.
    Failed(String),
}

/// The answers of `plugin run`, printed in request order.
struct Answers<'o> {
    slots: VecDeque<Slot>,
    /// Number (from 0) of the request at the front of `slots`.
    front: usize,
    /// Token → request number, for the requests waiting.
    waiting: HashMap<u64, usize>,
    frames: bool,
    failures: usize,
    out: std::io::StdoutLock<'o>,
}

impl Answers<'_> {
    fn push(&mut self, slot: Slot) {
        if let Slot::Waiting(token, _) = slot {
            self.waiting.insert(token, self.front + self.slots.len());
        }
        self.slots.push_back(slot);
    }

    /// Fills the slots of `done`'s completions.
    fn complete(&mut self, done: Vec<Done>) {
        for Done { token, result } in done {
            // Absent: it ran out of time already (a late completion).
            let Some(number) = self.waiting.remove(&token) else {
                continue;
            };
            self.slots[number - self.front] = match result {
                Ok(frame) => Slot::Ready(frame),
                Err(message) => Slot::Failed(message),
            };
        }
    }

    /// Fails the requests waiting for longer than `timeout`; returns how
    /// long until the next one would (`None`: none is waiting).
    fn expire(&mut self, timeout: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        for slot in &mut self.slots {
            if let Slot::Waiting(token, since) = *slot {
                let waited = now.duration_since(since);
                if waited >= timeout {
                    self.waiting.remove(&token);
                    *slot = Slot::Failed(format!(
                        "deferred answer not completed within deferred_timeout = {timeout:?} (waited {waited:.1?}); set --deferred-timeout"
                    ));
                } else {
                    let left = timeout - waited;
                    next = Some(next.map_or(left, |n| n.min(left)));
                }
            }
        }
        next
    }

    /// Prints the answers at the front that are complete.
    fn flush(&mut self) -> std::io::Result<()> {
        while let Some(slot) = self.slots.front() {
            match slot {
                Slot::Waiting(..) => break,
                Slot::Ready(frame) if self.frames => self.out.write_all(frame)?,
                Slot::Ready(frame) => {
                    self.out.write_all(&frame[crate::codec::HEADER_LEN..])?;
                    self.out.write_all(b"\n")?;
                }
                Slot::Failed(message) => {
                    self.failures += 1;
                    self.out.flush()?;
                    errln!("request {}: error: {message}", self.front + 1);
                }
            }
            self.slots.pop_front();
            self.front += 1;
        }
        Ok(())
    }
}

/// [`run`] until the plugin has been destroyed.
fn run_plugin(options: &RunOptions) -> i32 {
    let path = absolute(&options.file);
    if let Some(why) = missing(&options.file) {
        errln!(
            "nbnet plugin run: {}: {why}",
            untrusted(&path.to_string_lossy())
        );
        return exit_code::PLUGIN_LOAD_FAILED;
    }
    let spec = PluginSpec {
        name: path.file_stem().map_or("plugin".into(), |stem| {
            let stem = stem.to_string_lossy();
            stem.strip_prefix("lib").unwrap_or(&stem).to_string()
        }),
        path: path.clone(),
        config_toml: options.config.clone(),
        line: 0,
        image: None,
        threads: options.threads,
        plugin_timeout: options.plugin_timeout,
        max_frame_bytes: options.max_frame_bytes,
    };
    // Deferred answers are completed on other threads and wake this one.
    let made = mio::Poll::new().and_then(|poll| {
        let completions =
            Completions::new(poll.registry(), mio::Token(0), options.max_frame_bytes)?;
        Ok((poll, completions))
    });
    let (mut poll, completions) = match made {
        Ok(made) => made,
        Err(e) => {
            errln!("nbnet plugin run: cannot set up deferred answers: {e}");
            return exit_code::FAILURE;
        }
    };
    // Loaded in a child first, as the server checks plugins before its
    // workers load them: an init that crashes, exits or stops the process
    // is then reported, naming the plugin, instead of ending (or
    // freezing) this process without a word.
    let mut config = crate::config::Config {
        file: path.clone(),
        server: crate::config::ServerConfig {
            workers: 1,
            ..Default::default()
        },
        log: Default::default(),
        admin: None,
        admin_line: None,
        plugins: vec![spec],
        listeners: Vec::new(),
    };
    let report = crate::supervisor::check::check_plugins(&mut config);
    if !report.errors.is_empty() {
        for error in &report.errors {
            errln!("nbnet plugin run: {error}");
        }
        return exit_code::PLUGIN_LOAD_FAILED;
    }
    // The file as checked (its sealed copy, should it change meanwhile).
    let spec = config.plugins.remove(0);
    // A crash in the plugin ends this run by its signal (see there).
    crate::signals::catch_plugin_faults(crate::signals::Faulting::PluginRun);
    let mut plugin = match Plugin::load(&spec, 0, 1) {
        Ok(plugin) => plugin,
        Err(e) => {
            errln!("nbnet plugin run: {e}");
            return exit_code::PLUGIN_LOAD_FAILED;
        }
    };
    let conn = RawConnection {
        id: 1,
        peer: c"stdin".as_ptr(),
        listener: c"stdin".as_ptr(),
        flags: 0,
        tls_version: 0,
        tls_subject: std::ptr::null(),
        tls_sans: std::ptr::null(),
    };
    let requests = match read_requests(options) {
        Ok(requests) => requests,
        Err(message) => {
            errln!("nbnet plugin run: {message}");
            return exit_code::FAILURE;
        }
    };
    plugin.connection_opened(&conn);
    let mut deferrer = RunDeferrer {
        completions,
        last: 0,
    };
    let mut sink = ResponseSink::new(Vec::new(), options.max_frame_bytes, &conn);
    sink.set_deferrer(&mut deferrer);
    let mut answers = Answers {
        slots: VecDeque::new(),
        front: 0,
        waiting: HashMap::new(),
        frames: options.frames,
        failures: 0,
        out: std::io::stdout().lock(),
    };
    let mut events = mio::Events::with_capacity(8);
    let mut written = Ok(());
    let mut requests = requests.iter();
    loop {
        // Hand the plugin every request it can take, then print what is
        // answered and wait for the rest.
        let mut handed = false;
        while answers.waiting.len() < MAX_IN_FLIGHT {
            let Some(request) = requests.next() else {
                break;
            };
            handed = true;
            sink.buffer_mut().clear();
            sink.clear_marks();
            let result = plugin.process(request, &mut sink);
            // (No connection here to hold a pool's copies against.)
            crate::plugin::pool::forget_copied();
            let slot = match result {
                Ok(_) => match sink.marks().first() {
                    Some(mark) => Slot::Waiting(mark.token, Instant::now()),
                    None => Slot::Ready(sink.buffer().to_vec()),
                },
                Err(e) => Slot::Failed(e.to_string()),
            };
            answers.push(slot);
            answers.complete(completions.take());
            written = answers.flush();
            if written.is_err() {
                break;
            }
        }
        if written.is_err() {
            // Nobody gets the answers: stop feeding the plugin.
            break;
        }
        // Completions first: one taken here woke nobody (the queue was not
        // empty), so what still waits after it must be waited for.
        answers.complete(completions.take());
        let next = answers.expire(options.deferred_timeout);
        written = answers.flush();
        if written.is_err() {
            break;
        }
        match next {
            None if !handed => break,
            None => continue,
            Some(wait) => {
                // A completion wakes the poll; a spurious wake-up or an
                // interruption just goes round again.
                let _ = poll.poll(&mut events, Some(wait));
            }
        }
    }
    let written = written.and_then(|()| answers.out.flush());
    let failures = answers.failures;
    drop(answers);
    plugin.connection_closed(&conn);
    plugin.shutdown();
    drop(plugin);
    match written {
        Err(e) => crate::output::failed(&e),
        Ok(()) if failures == 0 => exit_code::OK,
        Ok(()) => exit_code::FAILURE,
    }
}

/// Processes that plugins start and leave running when nbnet loads them
/// outside the server (`--check`, `plugin info`, `plugin run`): a plugin
/// whose init daemonizes (`fork` + `setsid`) would otherwise leave one
/// process behind per run, adopted by init. The server sweeps such
/// processes when it stops (`supervisor::reap`); this is the same for the
/// one-shot commands.
///
/// [`Leftovers::watch`] makes this process a child subreaper (orphans of
/// its descendants, even ones in their own session, become its children)
/// and notes its children; [`Leftovers::sweep`] kills and reaps every
/// child that was not there before. Call it after the plugins have been
/// destroyed (so that a plugin can stop what it started itself) and before
/// printing a report (a failed print ends the process).
#[derive(Debug)]
pub struct Leftovers {
    before: Vec<Pid>,
}

impl Leftovers {
    /// Becomes a child subreaper and notes the children there are now.
    pub fn watch() -> Leftovers {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            errln!(
                "nbnet: warning: cannot become a child subreaper ({e}): processes plugins start may outlive this command"
            );
        }
        Leftovers {
            before: orphans::children(),
        }
    }

    /// Kills (SIGKILL) and reaps every child that was not there at
    /// [`Leftovers::watch`] (see [`orphans::sweep`]). Returns how many live
    /// processes it killed.
    pub fn sweep(&self) -> usize {
        orphans::sweep(&self.before)
    }

    /// [`Leftovers::sweep`], and a warning on stderr (prefixed `command`)
    /// if it killed anything.
    pub fn sweep_and_report(&self, command: &str) {
        let killed = self.sweep();
        if killed > 0 {
            errln!(
                "{command}: warning: killed {killed} process(es) that a plugin started while loaded and left running (a daemon forked in init?); a plugin must stop what it starts, in its destroy hook"
            );
        }
    }
}

fn read_requests(options: &RunOptions) -> Result<Vec<Vec<u8>>, String> {
    let stdin = std::io::stdin();
    let mut requests = Vec::new();
    if options.frames {
        let mut input = Vec::new();
        stdin
            .lock()
            .read_to_end(&mut input)
            .map_err(|e| format!("reading stdin: {e}"))?;
        let mut reader = FrameReader::new(options.max_frame_bytes);
        reader.push(&input);
        while let Some(frame) = reader
            .next_frame()
            .map_err(|e| format!("stdin, frame {}: {e}", requests.len() + 1))?
        {
            requests.push(frame);
        }
    } else {
        // The protocol has no empty requests (a zero length header is a
        // framing error the server answers by closing), so no plugin ever
        // gets one: an empty line is skipped, and a note says so.
        let mut empty = Vec::new();
        for (number, line) in stdin.lock().split(b'\n').enumerate() {
            let mut line = line.map_err(|e| format!("reading stdin: {e}"))?;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                empty.push(number + 1);
            } else {
                requests.push(line);
            }
        }
        if let Some(&first) = empty.first() {
            errln!(
                "nbnet plugin run: note: skipped {} empty line(s) of stdin (line {first}{}): the protocol has no empty requests, so a server never passes one to a plugin",
                empty.len(),
                if empty.len() > 1 { " and others" } else { "" }
            );
        }
    }
    Ok(requests)
}

/// Language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate using the nbnet-plugin-api SDK.
    Rust,
    /// A C file using nbnet_plugin.h.
    C,
}

/// Where this nbnet's `plugin-api` crate is, as built (for templates).
fn plugin_api_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    built.canonicalize().unwrap_or(built)
}

/// `nbnet plugin new NAME --lang rust|c --dir DIR`: writes a plugin that
/// builds as is (an upper-casing example with a test) and prints what to do next.
pub fn new(name: &str, lang: Lang, dir: &Path, api: Option<&Path>) -> i32 {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
    {
        errln!("nbnet plugin new: {name:?} is not a valid name: use lowercase letters, digits, '-' and '_', starting with a letter");
        return exit_code::FAILURE;
    }
    let api = api.map_or_else(plugin_api_dir, Path::to_path_buf);
    if !api.join("Cargo.toml").is_file() {
        errln!(
            "nbnet plugin new: cannot find nbnet's plugin-api at {}; pass --api-path DIR (the plugin-api folder of an nbnet checkout)",
            api.display()
        );
        return exit_code::FAILURE;
    }
    let result = match lang {
        Lang::Rust => new_rust(name, dir, &api),
        Lang::C => new_c(name, dir, &api),
    };
    match result {
        Ok(()) => exit_code::OK,
        Err(message) => {
            errln!("nbnet plugin new: {message}");
            exit_code::FAILURE
        }
    }
}

fn new_rust(name: &str, dir: &Path, api: &Path) -> Result<(), String> {
    let root = dir.join(name);
    if root.exists() {
        return Err(format!(
            "{} already exists; choose another name or --dir",
            root.display()
        ));
    }
    let lib = name.replace('-', "_");
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect();
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[lib]
# cdylib: the .so nbnet loads; rlib: lets `cargo test` call the plugin directly.
crate-type = ["cdylib", "rlib"]

[dependencies]
# The nbnet plugin SDK, by version. `path` builds it from an nbnet checkout
# instead of crates.io: point it at another checkout's plugin-api folder, or
# delete `path = ...` to use the published crate.
nbnet-plugin-api = {{ version = "{version}", path = "{api}" }}
serde = {{ version = "1", features = ["derive"] }}

# A standalone crate, not part of any enclosing workspace.
[workspace]
"#,
        api = api.display(),
        version = sdk_version(),
    );
    let lib_rs = RUST_TEMPLATE.replace("{Type}", &type_name);
    std::fs::create_dir_all(root.join("src"))
        .and_then(|()| std::fs::write(root.join("Cargo.toml"), cargo_toml))
        .and_then(|()| std::fs::write(root.join("src/lib.rs"), lib_rs))
        .map_err(|e| format!("writing {}: {e}", root.display()))?;
    outln!("created {}", root.display());
    outln!("next:");
    outln!(
        "  cd {} && cargo test && cargo build --release",
        root.display()
    );
    outln!("  nbnet plugin info target/release/lib{lib}.so");
    outln!("  echo hello | nbnet plugin run target/release/lib{lib}.so");
    outln!(
        "the SDK (nbnet-plugin-api {}) is built from {}: to use the published crate, delete `path = ...` in {}",
        sdk_version(),
        api.display(),
        root.join("Cargo.toml").display()
    );
    outln!("then add to your nbnet config:");
    outln!(
        "  [[plugins]]\n  name = \"{name}\"\n  path = \"{}/target/release/lib{lib}.so\"",
        root.display()
    );
    Ok(())
}

/// The SDK version a new plugin asks for: this nbnet's `major.minor`
/// (the plugin-api crate shares the workspace version), which cargo reads
/// as "compatible with" (`^`).
fn sdk_version() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}"),
        _ => version.to_string(),
    }
}

fn new_c(name: &str, dir: &Path, api: &Path) -> Result<(), String> {
    let root = dir.join(name);
    if root.exists() {
        return Err(format!(
            "{} already exists; choose another name or --dir",
            root.display()
        ));
    }
    let include = api.join("include");
    let lib = format!("lib{}.so", name.replace('-', "_"));
    let build = format!(
        "cc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden -I {} -o {lib} {name}.c",
        include.display()
    );
    let makefile = format!(
        "# Builds {lib}, the nbnet plugin {name:?}: `make`, then\n\
         #   echo hello | nbnet plugin run ./{lib}\n\
         # NBNET_INCLUDE is the folder holding nbnet_plugin.h (plugin-api/include in an\n\
         # nbnet checkout): `make NBNET_INCLUDE=/path/to/include` to use another.\n\
         NBNET_INCLUDE ?= {include}\n\
         CFLAGS ?= -O2 -Wall -Wextra\n\
         \n\
         {lib}: {name}.c $(NBNET_INCLUDE)/nbnet_plugin.h\n\
         \t$(CC) $(CFLAGS) -shared -fPIC -fvisibility=hidden -I $(NBNET_INCLUDE) -o $@ {name}.c\n\
         \n\
         clean:\n\
         \trm -f {lib}\n\
         \n\
         .PHONY: clean\n",
        include = include.display()
    );
    let source = c_template(name, &build);
    std::fs::create_dir_all(&root)
        .and_then(|()| std::fs::write(root.join(format!("{name}.c")), source))
        .and_then(|()| std::fs::write(root.join("Makefile"), makefile))
        .map_err(|e| format!("writing {}: {e}", root.display()))?;
    outln!("created {}", root.display());
    outln!("build it:\n  make -C {}", root.display());
    outln!("  (or, in {}: {build})", root.display());
    outln!(
        "try it:\n  echo hello | nbnet plugin run {}",
        root.join(&lib).display()
    );
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

const RUST_TEMPLATE: &str = r#"//! An nbnet plugin. `process` answers each request; this one upper-cases
//! it and adds an optional prefix from its config table:
//!
//! ```toml
//! [[plugins]]
//! name = "..."
//! path = ".../lib....so"
//! config = { prefix = "> " }
//! ```

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};

/// The plugin's `config` table. Unknown keys are refused at startup.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Written before every answer.
    prefix: String,
}

/// One instance per worker process; `process` is never called concurrently.
pub struct {Type} {
    prefix: Vec<u8>,
}

impl Plugin for {Type} {
    type Config = Config;

    fn new(config: Config, ctx: &InitContext) -> Result<Self, Error> {
        let (index, count) = (ctx.worker_index(), ctx.worker_count());
        let ready = format!("worker {index} of {count} ready");
        ctx.logger().info(&ready);
        let prefix = config.prefix.into_bytes();
        Ok({Type} { prefix })
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        response.write(&self.prefix)?;
        response.write(&request.to_ascii_uppercase())
    }
}

export_plugin!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use nbnet_plugin_api::testing::TestHost;

    #[test]
    fn answers_in_upper_case_after_the_prefix() {
        let mut host = TestHost::<{Type}>::new("prefix = \"> \"").unwrap();
        assert_eq!(host.process(b"hi").unwrap(), b"> HI");
    }

    #[test]
    fn refuses_unknown_config_keys() {
        assert!(TestHost::<{Type}>::new("prefx = 1").is_err());
    }
}
"#;

/// The C template: nbnet's own `upper-c` example (so the template is always
/// a plugin that builds and is tested), under a header for the new plugin.
const C_TEMPLATE_HEADER: &str = "/*
 * {name}.c -- an nbnet plugin in C, started from nbnet's upper-c example:
 * it answers each request upper-cased. Build: `make` (see the Makefile), or
 *   {build}
 */
";
const UPPER_C: &str = include_str!("../../plugins/upper-c/upper.c");

/// The source of a new C plugin called `name`, built with `build`.
fn c_template(name: &str, build: &str) -> String {
    let body = &UPPER_C[UPPER_C.find("#include").unwrap_or(0)..];
    C_TEMPLATE_HEADER
        .replace("{name}", name)
        .replace("{build}", build)
        + &body.replace("\"upper-c\"", &format!("{name:?}"))
}
