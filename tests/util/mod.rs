//! Helpers for the black-box tests (crate `nbnet_tests`).
//!
//! The tests start the real `nbnet` binary with real plugins on 127.0.0.1 and
//! talk to it over TCP, the way a user would. This module:
//!
//! - builds everything once per test binary ([`build`]): `cargo build
//!   --workspace` for the binary and the Rust plugins, then `cc` for the C
//!   plugins (the example `upper-c` and the test-only ones in
//!   `plugins/testing/c/`), into `target/test-plugins/`;
//! - gives each test its own temporary directory and free ports ([`Sandbox`]),
//!   where a config template is rendered (placeholders such as `{port}` and
//!   `{upper}`, see [`Sandbox::render`]) and written as `nbnet.toml`;
//! - runs the server ([`Server`]) with its stderr in a log file that is printed
//!   when a test fails, and watches its workers through `/proc`;
//! - speaks the framed protocol ([`Client`], [`frame`]).
//!
//! Every wait is bounded: a test that would hang fails instead, with the log.

pub mod load;

/// The tests run as whoever runs `cargo test` — root in CI containers —
/// with test plugins: every nbnet they start is allowed to run plugins as
/// root (`NBNET_ALLOW_ROOT=1`, as `[server] allow_root = true` would),
/// except the tests of that very refusal, which remove the variable.
pub const ALLOW_ROOT: (&str, &str) = ("NBNET_ALLOW_ROOT", "1");

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use libc::{SIGINT, SIGKILL, SIGTERM};

/// How long the server may take to start answering, and a failing start or a
/// `--check` may take to exit ("promptly").
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Read timeout of a [`Client`]: a reply that takes longer counts as missing.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Length of the ASCII decimal header in front of every payload.
pub const HEADER_LEN: usize = 10;

// ------------------------------------------------------------------ building

/// Everything the tests run: the binary and the plugin libraries.
#[derive(Debug)]
pub struct Artifacts {
    /// The `nbnet` binary.
    pub nbnet: PathBuf,
    /// Rust `upper` plugin (`hi` -> `HI`).
    pub upper_so: PathBuf,
    /// Rust `echo` plugin.
    pub echo_so: PathBuf,
    /// Rust test plugin whose init always fails (`reason` in its config).
    pub fail_init_so: PathBuf,
    /// C `upper` plugin from `plugins/upper-c/upper.c`.
    pub upper_c_so: PathBuf,
    /// C test plugin claiming ABI major 99 (`plugins/testing/c/bad_abi.c`).
    pub bad_abi_so: PathBuf,
    /// C test plugin built for a newer ABI minor than the host's.
    pub newer_minor_so: PathBuf,
    /// C test plugin with `process = NULL`.
    pub missing_process_so: PathBuf,
    /// C test plugin built as for ABI 1.0: callbacks only
    /// (`plugins/testing/c/abi_1_0.c`).
    pub abi_1_0_so: PathBuf,
    /// C test plugin with `process_batch` that tags each answer with the
    /// entry point used (`plugins/testing/c/batcher.c`).
    pub batcher_so: PathBuf,
    /// C test plugin that fails, crashes, hangs or over-answers on request
    /// (`plugins/testing/c/misbehave.c`).
    pub misbehave_so: PathBuf,
    /// Rust test plugin with the same requests, plus `panic`
    /// (`plugins/testing/misbehave-rs`).
    pub misbehave_rs_so: PathBuf,
    /// Rust test plugin that defers its answers (`plugins/testing/defer-rs`).
    pub defer_rs_so: PathBuf,
    /// C test plugin that defers its answers from a timer thread
    /// (`plugins/testing/c/deferc.c`).
    pub deferc_so: PathBuf,
    /// C example `delay-c` (`plugins/delay-c/delay.c`): echoes after `ms`.
    pub delay_c_so: PathBuf,
    /// A shared library that exists but is no plugin (libm).
    pub system_lib: PathBuf,
    /// Rust example `kv` (`plugins/kv`): `SET k v` / `GET k` / `DEL k`.
    pub kv_so: PathBuf,
    /// Rust example `redis-cache` (`plugins/redis-cache`): `kv` in a real Redis.
    pub redis_cache_so: PathBuf,
    /// Rust example `sha256` (`plugins/sha256`): hex SHA-256 of the request.
    pub sha256_so: PathBuf,
    /// C example `echo-c` (`plugins/echo-c/echo.c`).
    pub echo_c_so: PathBuf,
    /// C example `counter-c` (`plugins/counter-c/counter.c`): 10, 11, ... with `start = 10`.
    pub counter_c_so: PathBuf,
    /// C test plugin that exits, tampers, forks and closes descriptors on
    /// request (`plugins/testing/c/hostile.c`).
    pub hostile_so: PathBuf,
    /// C test plugin answering "<worker pid> <peer> <listener>"
    /// (`plugins/testing/c/whoami.c`).
    pub whoami_so: PathBuf,
    /// C test plugin answering with the signal mask of a child it starts
    /// (`plugins/testing/c/sigmask.c`).
    pub sigmask_so: PathBuf,
    /// C test plugin whose init daemonizes (fork, setsid, fork) and leaves
    /// the daemon running (`plugins/testing/c/daemonize.c`).
    pub daemonize_so: PathBuf,
    /// C test plugin whose own name holds an escape sequence and a newline,
    /// and whose version is 1 MiB (`plugins/testing/c/bad_name.c`).
    pub bad_name_so: PathBuf,
}

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace
/// root if relative), else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Builds the binary and all plugins, once per test binary, and returns where
/// they are. Panics with the compiler's output if anything fails to build.
pub fn build() -> &'static Artifacts {
    // A failed build is remembered too, so that the other tests of this
    // binary fail at once with the same message instead of rebuilding.
    static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    let built = ARTIFACTS.get_or_init(|| {
        std::panic::catch_unwind(build_now).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "building the test artifacts panicked".to_string())
        })
    });
    match built {
        Ok(artifacts) => artifacts,
        Err(message) => panic!("{message}"),
    }
}

fn build_now() -> Artifacts {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let out = Command::new(&cargo)
        .args(["build", "--workspace"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} build --workspace: {e}"));
    if !out.status.success() {
        panic!(
            "`{} build --workspace` failed ({}):\n{}",
            cargo.to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let debug = target_dir().join("debug");
    // NBNET_TEST_BIN runs the suite against another build of the binary.
    let nbnet = match std::env::var_os("NBNET_TEST_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => debug.join("nbnet"),
    };
    let rust_plugin = |name: &str| -> PathBuf {
        let path = debug.join(format!("lib{name}.so"));
        assert!(
            path.is_file(),
            "cargo build --workspace did not produce {}",
            path.display()
        );
        path
    };
    assert!(
        nbnet.is_file(),
        "cargo build --workspace did not produce {}",
        nbnet.display()
    );

    let plugin_dir = target_dir().join("test-plugins");
    fs::create_dir_all(&plugin_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", plugin_dir.display()));
    let c_plugin =
        |source: &str, name: &str| compile_c_plugin(&root.join(source), &plugin_dir, name);

    Artifacts {
        upper_so: rust_plugin("upper"),
        echo_so: rust_plugin("echo"),
        fail_init_so: rust_plugin("fail_init"),
        misbehave_rs_so: rust_plugin("misbehave_rs"),
        defer_rs_so: rust_plugin("defer_rs"),
        deferc_so: c_plugin("plugins/testing/c/deferc.c", "libdeferc.so"),
        delay_c_so: c_plugin("plugins/delay-c/delay.c", "libdelay_c.so"),
        upper_c_so: c_plugin("plugins/upper-c/upper.c", "libupper_c.so"),
        bad_abi_so: c_plugin("plugins/testing/c/bad_abi.c", "libbad_abi.so"),
        newer_minor_so: c_plugin("plugins/testing/c/newer_minor.c", "libnewer_minor.so"),
        missing_process_so: c_plugin(
            "plugins/testing/c/missing_process.c",
            "libmissing_process.so",
        ),
        misbehave_so: c_plugin("plugins/testing/c/misbehave.c", "libmisbehave.so"),
        abi_1_0_so: c_plugin("plugins/testing/c/abi_1_0.c", "libabi_1_0.so"),
        batcher_so: c_plugin("plugins/testing/c/batcher.c", "libbatcher.so"),
        system_lib: find_system_lib(),
        kv_so: rust_plugin("kv"),
        redis_cache_so: rust_plugin("redis_cache"),
        sha256_so: rust_plugin("sha256"),
        echo_c_so: c_plugin("plugins/echo-c/echo.c", "libecho_c.so"),
        counter_c_so: c_plugin("plugins/counter-c/counter.c", "libcounter_c.so"),
        hostile_so: c_plugin("plugins/testing/c/hostile.c", "libhostile.so"),
        whoami_so: c_plugin("plugins/testing/c/whoami.c", "libwhoami.so"),
        sigmask_so: c_plugin("plugins/testing/c/sigmask.c", "libsigmask.so"),
        daemonize_so: c_plugin("plugins/testing/c/daemonize.c", "libdaemonize.so"),
        bad_name_so: c_plugin("plugins/testing/c/bad_name.c", "libbad_name.so"),
        nbnet,
    }
}

/// Compiles one C plugin with the flags `nbnet_plugin.h` documents (plus
/// `-Werror`), atomically (compile to a temporary name, then rename).
fn compile_c_plugin(source: &Path, out_dir: &Path, name: &str) -> PathBuf {
    let cc = std::env::var_os("CC").unwrap_or_else(|| OsString::from("cc"));
    let out = out_dir.join(name);
    let tmp = out_dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let include = workspace_root().join("plugin-api/include");
    let result = Command::new(&cc)
        .args([
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
        ])
        .arg("-I")
        .arg(&include)
        .arg("-o")
        .arg(&tmp)
        .arg(source)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    if !result.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "compiling {} with {} failed ({}):\n{}{}",
            source.display(),
            cc.to_string_lossy(),
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("cannot rename {}: {e}", tmp.display()));
    out
}

/// A shared library that certainly is not an nbnet plugin.
fn find_system_lib() -> PathBuf {
    for candidate in [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/usr/lib/aarch64-linux-gnu/libm.so.6",
    ] {
        if Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    // `ldconfig -p` lines look like: "\tlibm.so.6 (libc6,x86-64) => /lib/.../libm.so.6".
    for ldconfig in ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"] {
        let Ok(out) = Command::new(ldconfig)
            .arg("-p")
            .stdin(Stdio::null())
            .output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fallback = None;
        for line in text.lines() {
            let Some((_, path)) = line.split_once("=> ") else {
                continue;
            };
            let path = PathBuf::from(path.trim());
            if !path.is_file() {
                continue;
            }
            if line.trim_start().starts_with("libm.so") {
                return path;
            }
            fallback.get_or_insert(path);
        }
        if let Some(path) = fallback {
            return path;
        }
    }
    panic!("no system shared library found (tried libm paths and `ldconfig -p`)");
}

// ----------------------------------------------------------------- utilities

/// A port on 127.0.0.1 that was free a moment ago, and not handed out
/// before by this test process. (The tests of one file run in parallel:
/// the kernel, asked twice for a free port, may give the same one to two
/// tests before either binds it. The one that binds second then fails to
/// start, and its clients talk to the other test's server.)
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// A config serving one plugin, `name` loaded from `path` (a placeholder
/// such as `{upper}`, or a real path), on one listener
/// `127.0.0.1:{port}`, with `server` as the keys of its `[server]` table.
/// Most tests need no more; the ones that do write their config out.
pub fn one_plugin_config(name: &str, path: &str, server: &str) -> String {
    format!(
        r#"
[server]
{server}

[[plugins]]
name = "{name}"
path = "{path}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "{name}"
"#
    )
}

/// Encodes one frame: 10-digit zero-padded length, then the payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = format!("{:010}", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`
/// saying what was awaited.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lossy text of bytes, for messages.
pub fn show(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    if bytes.len() > MAX {
        format!(
            "{:?}... ({} bytes)",
            String::from_utf8_lossy(&bytes[..MAX]),
            bytes.len()
        )
    } else {
        format!("{:?}", String::from_utf8_lossy(bytes))
    }
}

// ------------------------------------------------------------------ processes

/// A process identified by PID and start time, so that a reused PID is never
/// mistaken for it (nor signalled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub start_time: u64,
}

impl Proc {
    /// Reads `/proc/<pid>/stat`; `None` if there is no such process.
    pub fn of(pid: i32) -> Option<Proc> {
        let (_, start_time) = proc_stat(pid)?;
        Some(Proc { pid, start_time })
    }

    /// True while this very process exists and is not a zombie.
    pub fn alive(&self) -> bool {
        match proc_stat(self.pid) {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// SIGKILLs it if it is still this very process.
    pub fn kill_if_alive(&self) {
        if self.alive() {
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}

/// (state, start time) from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// PIDs of the children of `pid` (from its main thread), zombies included.
pub fn children_of(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Sends `sig` to `pid`, panicking if that fails.
pub fn send_signal(pid: i32, sig: i32) {
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        io::Error::last_os_error()
    );
}

/// Resident memory of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time `pid` has used (user + system), in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The share of one core `pid` uses over `over` (1.0 = a whole core),
/// sampled from `/proc/<pid>/stat`; panics if the process disappears.
pub fn cpu_share(pid: i32, over: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before = cpu_ticks(pid).unwrap_or_else(|| panic!("no process {pid}"));
    let start = Instant::now();
    thread::sleep(over);
    let after = cpu_ticks(pid).unwrap_or_else(|| panic!("process {pid} disappeared"));
    let elapsed = start.elapsed().as_secs_f64();
    (after - before) as f64 / hz / elapsed
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (for tests
/// that open many connections); returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    let soft = limit.rlim_cur as u64;
    soft
}

/// How a process ended, for messages: "exit code 3" or "signal 9".
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{status}"),
    }
}

// -------------------------------------------------------------------- sandbox

/// What a finished `nbnet` run printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// One test's temporary directory, its ports and its `nbnet.toml`.
///
/// Config templates are TOML with placeholders, replaced by [`Sandbox::render`]:
/// `{port}`, `{port2}`, `{port3}` (free ports on 127.0.0.1, chosen on first use
/// and kept for the sandbox's life), `{admin}` (the same, for an `[admin]`
/// listener: not a frame listener, so not waited on as one), `{aux}` and
/// `{aux2}` (the same, for listeners not to be probed at start), `{dir}` (the temporary directory), and the
/// plugin paths `{upper}`, `{echo}`, `{fail_init}`, `{upper_c}`, `{bad_abi}`,
/// `{newer_minor}`, `{missing_process}`, `{misbehave}`, `{abi_1_0}`, `{batcher}`, `{misbehave_rs}`,
/// `{system_lib}`, `{hostile}`, `{sigmask}`, `{daemonize}`, `{bad_name}`, and the examples `{kv}`,
/// `{redis_cache}`, `{sha256}`, `{echo_c}`, `{counter_c}`.
pub struct Sandbox {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    admin: Option<u16>,
    aux: Vec<u16>,
    runs: u32,
    cwd: Option<PathBuf>,
    fd_limit: Option<u64>,
    binary: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// A fresh directory (builds the artifacts first if needed).
    pub fn new() -> Sandbox {
        build();
        let dir = tempfile::Builder::new()
            .prefix("nbnet-test-")
            .tempdir()
            .expect("create tempdir");
        Sandbox {
            dir,
            ports: Vec::new(),
            admin: None,
            aux: Vec::new(),
            runs: 0,
            cwd: None,
            fd_limit: None,
            binary: None,
            env: Vec::new(),
        }
    }

    /// Runs a copy of `nbnet` placed in the sandbox (`nbnet` there) instead
    /// of the built one, so that a test can replace it — a binary upgrade
    /// runs whatever is at the master's path. Returns its path.
    pub fn use_own_binary(&mut self) -> PathBuf {
        let path = self.path().join("nbnet");
        fs::copy(&build().nbnet, &path).expect("copy the nbnet binary");
        self.binary = Some(path.clone());
        path
    }

    /// Runs the `nbnet` at `path` (set up by the test) instead of the built
    /// one.
    pub fn set_binary(&mut self, path: PathBuf) {
        self.binary = Some(path);
    }

    /// Sets an environment variable for the `nbnet` commands run from here
    /// on (after the clean log environment of [`Sandbox::command`]).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the config is written.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("nbnet.toml")
    }

    /// Port `i` (0-based; `{port}` is 0, `{port2}` is 1, ...), chosen on first use.
    pub fn port(&mut self, i: usize) -> u16 {
        while self.ports.len() <= i {
            let port = free_port();
            if !self.taken(port) {
                self.ports.push(port);
            }
        }
        self.ports[i]
    }

    /// Whether `port` is already one of this sandbox's placeholders (the
    /// kernel may hand the same free port out twice in a row; `{admin}`
    /// rendered before `{port}` once got the same number).
    fn taken(&self, port: u16) -> bool {
        self.ports.contains(&port) || self.admin == Some(port) || self.aux.contains(&port)
    }

    /// The ports chosen so far.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The `{admin}` port, chosen on first use (apart from the others).
    pub fn admin_port(&mut self) -> u16 {
        while self.admin.is_none() {
            let port = free_port();
            if !self.taken(port) {
                self.admin = Some(port);
            }
        }
        self.admin.expect("chosen above")
    }

    /// Forgets the ports so that the next render picks new ones (a port
    /// taken meanwhile, e.g. as another socket's local port, is not retried).
    fn new_ports(&mut self) {
        self.ports.clear();
        self.admin = None;
        self.aux.clear();
    }

    /// The `{aux}` (0), `{aux2}` (1) port, chosen on first use apart from
    /// the others: for a listener that does not answer a plain frame (a
    /// PROXY listener) or that the test wants untouched, so not waited on
    /// at start; renewed, like the others, when a start finds one in use.
    pub fn aux_port(&mut self, i: usize) -> u16 {
        while self.aux.len() <= i {
            let port = free_port();
            if !self.taken(port) {
                self.aux.push(port);
            }
        }
        self.aux[i]
    }

    /// Replaces the placeholders in `template`; panics on an unknown one.
    pub fn render(&mut self, template: &str) -> String {
        let a = build();
        let mut out = String::with_capacity(template.len() + 256);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(after.len());
            if name_len == 0 || !after[name_len..].starts_with('}') {
                // Not a placeholder (e.g. a TOML inline table).
                out.push('{');
                rest = after;
                continue;
            }
            let name = &after[..name_len];
            let path = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
            let value = match name {
                "port" => self.port(0).to_string(),
                "port2" => self.port(1).to_string(),
                "port3" => self.port(2).to_string(),
                "admin" => self.admin_port().to_string(),
                "aux" => self.aux_port(0).to_string(),
                "aux2" => self.aux_port(1).to_string(),
                "dir" => path(self.path()),
                "upper" => path(&a.upper_so),
                "echo" => path(&a.echo_so),
                "fail_init" => path(&a.fail_init_so),
                "upper_c" => path(&a.upper_c_so),
                "bad_abi" => path(&a.bad_abi_so),
                "newer_minor" => path(&a.newer_minor_so),
                "missing_process" => path(&a.missing_process_so),
                "misbehave" => path(&a.misbehave_so),
                "abi_1_0" => path(&a.abi_1_0_so),
                "batcher" => path(&a.batcher_so),
                "misbehave_rs" => path(&a.misbehave_rs_so),
                "defer_rs" => path(&a.defer_rs_so),
                "deferc" => path(&a.deferc_so),
                "delay_c" => path(&a.delay_c_so),
                "system_lib" => path(&a.system_lib),
                "kv" => path(&a.kv_so),
                "redis_cache" => path(&a.redis_cache_so),
                "sha256" => path(&a.sha256_so),
                "echo_c" => path(&a.echo_c_so),
                "counter_c" => path(&a.counter_c_so),
                "hostile" => path(&a.hostile_so),
                "whoami" => path(&a.whoami_so),
                "sigmask" => path(&a.sigmask_so),
                "daemonize" => path(&a.daemonize_so),
                "bad_name" => path(&a.bad_name_so),
                other => panic!("unknown placeholder {{{other}}} in config template:\n{template}"),
            };
            out.push_str(&value);
            rest = &after[name_len + 1..];
        }
        out.push_str(rest);
        out
    }

    /// Renders `template` and writes it as `nbnet.toml`; returns its path.
    pub fn write_config(&mut self, template: &str) -> PathBuf {
        let text = self.render(template);
        let path = self.config_path();
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Writes a file in the sandbox; returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path().join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Creates a directory in the sandbox; returns its path.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// Runs later `nbnet` commands in `dir` instead of the sandbox directory.
    pub fn set_cwd(&mut self, dir: &Path) {
        self.cwd = Some(dir.to_path_buf());
    }

    /// Runs later `nbnet` commands with `RLIMIT_NOFILE` (soft and hard) set
    /// to `limit` open files, to make a server run out of descriptors.
    pub fn set_fd_limit(&mut self, limit: u64) {
        self.fd_limit = Some(limit);
    }

    /// A `nbnet` command run in the sandbox (or the directory given to
    /// [`Sandbox::set_cwd`]), with a clean log environment (and the fd limit
    /// of [`Sandbox::set_fd_limit`], if any).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.binary.as_ref().unwrap_or(&build().nbnet));
        cmd.current_dir(self.cwd.as_deref().unwrap_or(self.path()))
            .env(ALLOW_ROOT.0, ALLOW_ROOT.1)
            .env_remove("RUST_LOG")
            .env_remove("NBNET_CONFIG")
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(limit) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe; `limit` is a plain copy.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    fn next_run(&mut self, what: &str) -> (PathBuf, PathBuf) {
        self.runs += 1;
        let n = self.runs;
        (
            self.path().join(format!("{what}-{n}.stdout")),
            self.path().join(format!("{what}-{n}.stderr")),
        )
    }

    /// Runs `nbnet` with `args` and waits (at most [`STARTUP_TIMEOUT`]) for it
    /// to exit; panics, after killing it, if it does not.
    pub fn run(&mut self, args: &[&str]) -> Outcome {
        let (stdout_path, stderr_path) = self.next_run("run");
        let mut child = self
            .command()
            .args(args)
            .stdout(fs::File::create(&stdout_path).expect("create stdout file"))
            .stderr(fs::File::create(&stderr_path).expect("create stderr file"))
            .spawn()
            .expect("spawn nbnet");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let kids: Vec<Proc> = children_of(child.id() as i32)
                    .into_iter()
                    .filter_map(Proc::of)
                    .collect();
                let _ = child.kill();
                let _ = child.wait();
                for kid in kids {
                    kid.kill_if_alive();
                }
                panic!(
                    "`nbnet {}` did not exit within {STARTUP_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    args.join(" "),
                    fs::read_to_string(&stdout_path).unwrap_or_default(),
                    fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Outcome {
            status,
            stdout: fs::read_to_string(&stdout_path).unwrap_or_default(),
            stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
        }
    }

    /// Writes the config and runs `nbnet --config FILE --check`.
    pub fn check(&mut self, template: &str) -> Outcome {
        let config = self.write_config(template);
        self.run(&["--config", config.to_str().unwrap(), "--check"])
    }

    /// Writes the config and starts `nbnet --config FILE`, expecting it to
    /// exit unsuccessfully within [`STARTUP_TIMEOUT`]; returns status and stderr.
    pub fn expect_startup_failure(&mut self, template: &str) -> (ExitStatus, String) {
        let config = self.write_config(template);
        let outcome = self.run(&["--config", config.to_str().unwrap()]);
        assert!(
            !outcome.status.success(),
            "nbnet was expected to fail to start but exited successfully\n--- stderr ---\n{}",
            outcome.stderr
        );
        (outcome.status, outcome.stderr)
    }

    /// Starts a server with this config and waits until it answers.
    pub fn start(self, template: &str) -> Server {
        Server::start_in(self, template)
    }
}

/// `nbnet --check` on a config in a fresh sandbox.
pub fn check(template: &str) -> Outcome {
    Sandbox::new().check(template)
}

/// Starts nbnet with a config in a fresh sandbox and expects it to fail
/// promptly; returns its exit status and stderr.
pub fn expect_startup_failure(template: &str) -> (ExitStatus, String) {
    Sandbox::new().expect_startup_failure(template)
}

/// Runs `nbnet send ADDR PAYLOAD` (bounded by [`STARTUP_TIMEOUT`]).
pub fn nbnet_send(addr: &str, payload: &str) -> Outcome {
    Sandbox::new().run(&["send", addr, payload])
}

// --------------------------------------------------------------------- server

/// A running `nbnet --config nbnet.toml`. Dropping it SIGKILLs the master and
/// any worker it has seen; if the test is failing, its log is printed.
pub struct Server {
    sandbox: Option<Sandbox>,
    child: Child,
    log_path: PathBuf,
    seen: Mutex<Vec<Proc>>,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts a server from a config template in a fresh sandbox.
    pub fn start(template: &str) -> Server {
        Sandbox::new().start(template)
    }

    /// Starts a server in `sandbox` and waits (at most [`STARTUP_TIMEOUT`])
    /// until every listener answers a request. If the server exits first it
    /// panics with the log, except that a port taken in the meantime by
    /// someone else makes it retry with new ports (twice).
    pub fn start_in(mut sandbox: Sandbox, template: &str) -> Server {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let config = sandbox.write_config(template);
            let (stdout_path, log_path) = sandbox.next_run("server");
            let child = sandbox
                .command()
                .arg("--config")
                .arg(&config)
                .stdout(fs::File::create(&stdout_path).expect("create stdout file"))
                .stderr(fs::File::create(&log_path).expect("create log file"))
                .spawn()
                .expect("spawn nbnet");
            let mut server = Server {
                sandbox: Some(sandbox),
                child,
                log_path,
                seen: Mutex::new(Vec::new()),
                exited: None,
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) => {
                    let log = server.log();
                    if attempt < 3 && log.contains("in use") {
                        server.kill_all();
                        sandbox = server.sandbox.take().unwrap();
                        sandbox.new_ports();
                        continue;
                    }
                    // Drop prints nothing unless panicking; include the log here.
                    panic!("nbnet did not start: {why}\n--- nbnet log ---\n{log}");
                }
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let ports = self.sandbox().ports().to_vec();
        if ports.is_empty() {
            return Err("the config template has no {port} placeholder".into());
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for port in ports {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    self.exited = Some(status);
                    return Err(format!("nbnet exited with {}", describe(&status)));
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "port {port} did not answer within {STARTUP_TIMEOUT:?}"
                    ));
                }
                if let Ok(mut client) = Client::try_connect(port) {
                    let _ = client.stream.set_read_timeout(Some(Duration::from_secs(2)));
                    if client.send_frame(b"ping").is_ok() && client.read_frame().is_ok() {
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn sandbox(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("server has its sandbox")
    }

    /// The master's PID.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The `{admin}` port of the config it runs.
    pub fn admin_port(&self) -> u16 {
        self.sandbox()
            .admin
            .expect("the config template has no {admin} placeholder")
    }

    /// The `{aux}` (0) or `{aux2}` (1) port of the config it runs.
    pub fn aux_port(&self, i: usize) -> u16 {
        *self
            .sandbox()
            .aux
            .get(i)
            .expect("the config template has no such {aux} placeholder")
    }

    /// The first listener's port (`{port}`).
    pub fn port(&self) -> u16 {
        self.sandbox().ports()[0]
    }

    /// Port `i` (`{port}` is 0, `{port2}` is 1, ...).
    pub fn port_n(&self, i: usize) -> u16 {
        self.sandbox().ports()[i]
    }

    /// `127.0.0.1:<port>` of the first listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        self.sandbox().path()
    }

    /// A client connected to the first listener.
    pub fn client(&self) -> Client {
        Client::connect(self.port())
    }

    /// The master's current children (zombies included), remembered so that
    /// Drop can kill them.
    pub fn worker_pids(&self) -> Vec<i32> {
        let pids = children_of(self.pid());
        let mut seen = self.seen.lock().unwrap();
        for &pid in &pids {
            if let Some(p) = Proc::of(pid) {
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
        pids
    }

    /// The master's children that are alive (not zombies).
    pub fn live_workers(&self) -> Vec<Proc> {
        self.worker_pids()
            .into_iter()
            .filter_map(Proc::of)
            .filter(Proc::alive)
            .collect()
    }

    /// Every worker process seen so far.
    pub fn seen_workers(&self) -> Vec<Proc> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until exactly `n` live workers exist; returns them.
    pub fn wait_for_workers(&self, n: usize) -> Vec<Proc> {
        self.wait_for(&format!("{n} live workers"), || {
            let live = self.live_workers();
            (live.len() == n).then_some(live)
        })
    }

    /// Like [`wait_until`] with a 10 s bound, but the panic carries the log.
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(value) = f() {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what} (workers now: {:?})\n--- nbnet log ---\n{}",
                    self.worker_pids(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: i32) {
        assert!(self.exited.is_none(), "the master has already exited");
        send_signal(self.pid(), sig);
    }

    /// Waits up to `timeout` for the master to exit (and reaps it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited {
            return Some(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERMs the master, expects a clean exit (code 0) within 10 s, and
    /// gives back the sandbox (same directory and ports) for another start.
    pub fn stop(mut self) -> Sandbox {
        self.worker_pids();
        self.signal(SIGTERM);
        let status = self.wait_exit(Duration::from_secs(10));
        match status {
            Some(s) if s.code() == Some(0) => {}
            other => panic!(
                "after SIGTERM nbnet should exit with code 0 within 10 s, got {:?}\n--- nbnet log ---\n{}",
                other.as_ref().map(describe),
                self.log()
            ),
        }
        self.kill_all();
        self.sandbox.take().unwrap()
    }

    fn kill_all(&mut self) {
        if self.exited.is_none() {
            self.worker_pids();
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
        for p in self.seen.lock().unwrap().iter() {
            p.kill_if_alive();
        }
        // A master this one started (a binary upgrade) that a failing test
        // never got to track: the sandbox's pid file names it.
        if let Some(sandbox) = &self.sandbox {
            kill_pid_file_holder(sandbox.path());
        }
    }
}

/// Kills every process whose command line names the sandbox `dir` (a
/// unique temporary folder): masters, workers, and what test plugins fork
/// without exec (a daemon made in init keeps its worker's command line and
/// outlives a master killed with SIGKILL, whose sweep of its workers'
/// process groups never runs). No process of another test or user names
/// this folder.
fn sweep_sandbox_processes(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let names_it = fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle));
        if names_it {
            // SAFETY: kill(2) on a pid; a process gone meanwhile is ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        sweep_sandbox_processes(self.dir.path());
    }
}

/// Kills the nbnet named by `dir`/nbnet.pid (and its workers), if that
/// process is an nbnet running from this sandbox.
fn kill_pid_file_holder(dir: &Path) {
    let Some(pid) = fs::read_to_string(dir.join("nbnet.pid"))
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours = fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let text = String::from_utf8_lossy(&cmdline);
        text.contains("nbnet") && text.contains(&*dir.to_string_lossy())
    });
    if !ours {
        return;
    }
    let workers: Vec<Proc> = children_of(pid).into_iter().filter_map(Proc::of).collect();
    if let Some(master) = Proc::of(pid) {
        master.kill_if_alive();
    }
    for worker in workers {
        worker.kill_if_alive();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_all();
        if thread::panicking() {
            eprintln!(
                "--- nbnet log ({}) ---\n{}--- end of nbnet log ---",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A master started by hand: killed, with its workers, if the test ends
/// (or fails) while it runs, so no server outlives its test.
pub struct Master(pub std::process::Child);

impl std::ops::Deref for Master {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Master {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let workers: Vec<Proc> = children_of(self.0.id() as i32)
                .into_iter()
                .filter_map(Proc::of)
                .collect();
            let _ = self.0.kill();
            let _ = self.0.wait();
            for worker in workers {
                worker.kill_if_alive();
            }
        }
    }
}

// --------------------------------------------------------------------- client

/// A blocking client of the framed protocol on 127.0.0.1, with a read timeout
/// of [`IO_TIMEOUT`].
pub struct Client {
    pub stream: TcpStream,
}

impl Client {
    /// Connects to 127.0.0.1:`port`, panicking on failure.
    pub fn connect(port: u16) -> Client {
        Client::try_connect(port).unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    /// Connects to 127.0.0.1:`port`.
    pub fn try_connect(port: u16) -> io::Result<Client> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client { stream })
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Writes one frame.
    pub fn send_frame(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send_raw(&frame(payload))
    }

    /// Reads one frame and returns its payload. EOF before the end of a frame
    /// is `UnexpectedEof`; a malformed header from the server is `InvalidData`.
    pub fn read_frame(&mut self) -> io::Result<Vec<u8>> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        if !header.iter().all(u8::is_ascii_digit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header from server: {}", show(&header)),
            ));
        }
        let len: usize = std::str::from_utf8(&header).unwrap().parse().unwrap();
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        Ok(payload)
    }

    /// Makes the server owe this connection an answer it cannot send yet:
    /// sends a request of [`OWED_ANSWER_BYTES`] and does not read the
    /// answer (the receive buffer is made small, so the kernel cannot take
    /// it all). A connection owed answers stays with its worker through a
    /// hand-over until they are sent: tests use this to hold a worker (and
    /// its master) in the middle of a hand-over for as long as they like.
    /// [`Client::take_owed_answer`] reads it.
    pub fn owe_an_answer(&mut self) {
        let small: libc::c_int = 16 * 1024;
        // SAFETY: a plain setsockopt on our own socket with a valid int.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_RCVBUF: {}", io::Error::last_os_error());
        self.send_frame(&vec![b'o'; OWED_ANSWER_BYTES])
            .expect("sending the request whose answer is owed");
    }

    /// Reads the answer [`Client::owe_an_answer`] made the server owe;
    /// returns its first byte (`b'O'` from `upper`, `b'o'` from `echo`).
    pub fn take_owed_answer(&mut self) -> u8 {
        let answer = self.read_frame().expect("reading the owed answer");
        assert_eq!(answer.len(), OWED_ANSWER_BYTES);
        assert!(answer.iter().all(|&b| b == answer[0]), "a mixed answer");
        answer[0]
    }

    /// Sends one frame and reads the answer, panicking on any error.
    pub fn request(&mut self, payload: &[u8]) -> Vec<u8> {
        self.send_frame(payload)
            .unwrap_or_else(|e| panic!("sending request {}: {e}", show(payload)));
        self.read_frame()
            .unwrap_or_else(|e| panic!("reading the answer to {}: {e}", show(payload)))
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
    }

    /// Asserts that the server closes the connection within [`IO_TIMEOUT`]
    /// without sending anything (EOF or a reset).
    pub fn expect_closed(&mut self) {
        self.expect_closed_within(IO_TIMEOUT);
    }

    /// Asserts that the server closes the connection within `timeout` without
    /// sending anything; returns how long that took.
    pub fn expect_closed_within(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.set_read_timeout(timeout);
        let mut buf = [0u8; 4096];
        let result = self.stream.read(&mut buf);
        let elapsed = start.elapsed();
        match result {
            Ok(0) => elapsed,
            Ok(n) => panic!(
                "expected the server to close the connection without a reply, got {}",
                show(&buf[..n])
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                elapsed
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("expected the server to close the connection, still open after {timeout:?}")
            }
            Err(e) => panic!("expected EOF or a reset, got {e}"),
        }
    }

    /// Asserts that nothing arrives for `wait` and the connection stays open.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.set_read_timeout(wait);
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => panic!("expected no reply yet, but the server closed the connection"),
            Ok(_) => panic!(
                "expected no reply yet, but got data ({:?})",
                byte[0] as char
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("expected no reply yet, got error {e}"),
        }
        self.set_read_timeout(IO_TIMEOUT);
    }

    /// Half-closes the sending side.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

// ------------------------------------------------ the misbehave test plugins

/// Sets SO_LINGER to {on, 0 s} on `stream`: its `close` then sends a
/// reset, not a FIN (a client that vanishes, not one that half-closes).
pub fn linger_zero(stream: &std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
}

/// The size of the request (and answer) [`Client::owe_an_answer`] sends:
/// more than the kernel buffers on both sides of a loopback connection.
pub const OWED_ANSWER_BYTES: usize = 8 << 20;

/// Requests the misbehave test plugins (`{misbehave}` in C, `{misbehave_rs}`
/// in Rust) understand, beyond echo: see `plugins/testing/c/misbehave.c`.
impl Client {
    /// Which worker serves this connection: the plugins' `pid` request.
    pub fn worker_pid(&mut self) -> i32 {
        let answer = self.request(b"pid");
        std::str::from_utf8(&answer)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("`pid` answered {}", show(&answer)))
    }

    /// The plugins' `ok` request: (the worker's pid, the instance's call count).
    pub fn ok(&mut self) -> (i32, u64) {
        let answer = self.request(b"ok");
        let text = String::from_utf8_lossy(&answer);
        let mut words = text.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("ok"), Some(pid), Some(calls), None) => match (pid.parse(), calls.parse()) {
                (Ok(pid), Ok(calls)) => (pid, calls),
                _ => panic!("`ok` answered {}", show(&answer)),
            },
            _ => panic!("`ok` answered {}", show(&answer)),
        }
    }
}

impl Server {
    /// Opens connections until each of `n` distinct workers serves one (asked
    /// with `pid`, so the listener must serve a misbehave plugin); returns one
    /// (worker pid, client) per worker. Panics after 10 s.
    pub fn clients_on_distinct_workers(&self, n: usize) -> Vec<(i32, Client)> {
        let mut found: Vec<(i32, Client)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while found.len() < n {
            assert!(
                Instant::now() < deadline,
                "could not get a connection on each of {n} workers within 10 s (got {:?})\n--- nbnet log ---\n{}",
                found.iter().map(|(pid, _)| pid).collect::<Vec<_>>(),
                self.log()
            );
            let mut client = self.client();
            let pid = client.worker_pid();
            if found.iter().all(|(p, _)| *p != pid) {
                found.push((pid, client));
            } else {
                thread::sleep(Duration::from_millis(5));
            }
        }
        found
    }

    /// Waits (at most 10 s) until a log line contains every one of `parts`;
    /// returns that line.
    pub fn wait_for_log_line(&self, parts: &[&str]) -> String {
        self.wait_for(&format!("a log line with {parts:?}"), || {
            self.log()
                .lines()
                .find(|line| parts.iter().all(|p| line.contains(p)))
                .map(str::to_string)
        })
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }
}

// ------------------------------------------------ operations (reload, stop)

impl Server {
    /// The server's sandbox: to render and write a new config with the same
    /// ports and directory (for a reload), or to run `nbnet reload|stop`
    /// next to the running server.
    pub fn sandbox_mut(&mut self) -> &mut Sandbox {
        self.sandbox.as_mut().expect("server has its sandbox")
    }
}

// ------------------------------------------- plugin authoring and examples

impl Sandbox {
    /// Runs `nbnet` with `args` and `input` as its stdin, and waits (at most
    /// [`STARTUP_TIMEOUT`]) for it to exit; panics, after killing it, if it
    /// does not. For `nbnet plugin run`.
    pub fn run_with_input(&mut self, args: &[&str], input: &[u8]) -> Outcome {
        let mut cmd = self.command();
        cmd.args(args);
        let what = format!("nbnet {}", args.join(" "));
        let output = run_tool(cmd, &what, input, STARTUP_TIMEOUT);
        Outcome {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` with its stdout and stderr captured, feeding it `input` on
/// stdin, and waits at most `timeout`; on
/// timeout it kills it and panics with what it printed. Returns its output,
/// whatever its exit status.
pub fn run_tool(
    mut cmd: Command,
    what: &str,
    input: &[u8],
    timeout: Duration,
) -> std::process::Output {
    // Files rather than pipes: nothing to drain while waiting.
    let out_dir = tempfile::tempdir().expect("create tempdir");
    let (out_path, err_path) = (out_dir.path().join("out"), out_dir.path().join("err"));
    cmd.stdin(Stdio::piped())
        .stdout(fs::File::create(&out_path).expect("create stdout file"))
        .stderr(fs::File::create(&err_path).expect("create stderr file"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    // A child that exits without reading its input must not block us.
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    std::process::Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    }
}

// ------------------------------------------------- programs the tests run

/// The path of `program`, a system program a test runs as a real peer,
/// from Debian package `package`. Missing, the test FAILS with the command
/// that installs it: a test that cannot run must not look passed. Only
/// with `NBNET_SKIP_MISSING=1` does it return `None` (the caller skips)
/// after one line that shows in normal `cargo test` output.
pub fn require_program(program: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|path| {
            std::fs::metadata(path).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        });
    if found.is_some() {
        return found;
    }
    let install = format!(
        "`{program}` is not installed: run `bash tests/install-deps.sh` (as root: apt-get install {package}), or `make test`, which does"
    );
    if std::env::var_os("NBNET_SKIP_MISSING").is_some_and(|v| v == "1") {
        skip_line(&format!("SKIPPED (NBNET_SKIP_MISSING=1): {install}"));
        return None;
    }
    panic!("{install}; or set NBNET_SKIP_MISSING=1 to skip the tests that need it");
}

/// Prints `line` where a normal `cargo test` run shows it: the harness
/// captures `eprintln!` of a passing test, but not a direct write to fd 2.
fn skip_line(line: &str) {
    use std::io::Write as _;
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&io::stderr()).try_clone_to_owned() {
        let _ = writeln!(fs::File::from(fd), "{line}");
    }
}

// --------------------------------------------------------------- /metrics

/// Checks a `/metrics` body with Prometheus' own parser and linter
/// (`promtool check metrics`, Debian package `prometheus`); panics with its
/// complaints. `None` when promtool is missing and NBNET_SKIP_MISSING=1.
pub fn promtool_check(body: &str) -> Option<()> {
    let promtool = require_program("promtool", "prometheus")?;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics refused /metrics:\n{}{}\n--- body ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// The samples of metric `name` in a `/metrics` body: (labels, value),
/// labels as written between the braces ("" for none).
pub fn samples<'a>(body: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of metric `name` (what PromQL's `sum(name)`
/// gives); panics if there is none.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    let samples = samples(body, name);
    assert!(!samples.is_empty(), "no sample of {name} in\n{body}");
    samples.iter().map(|(_, v)| v).sum()
}
