//! Tools for plugin authors, run as an author would: `nbnet plugin info` on
//! plugins and non-plugins, `nbnet plugin run` on lines, frames and configs,
//! and `nbnet plugin new` whose output builds, passes its tests and runs,
//! outside nbnet's workspace (docs/plugins.md, "Tools").

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nbnet_tests::{
    build, frame, run_tool, show, target_dir, workspace_root, Outcome, Sandbox, STARTUP_TIMEOUT,
};

/// How long building and testing a generated crate may take. With the
/// workspace's dependencies already compiled it takes seconds; the bound is
/// for a cold machine.
const CARGO_TIMEOUT: Duration = Duration::from_secs(600);

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `nbnet plugin info FILE`.
fn info(file: &Path) -> Outcome {
    Sandbox::new().run(&["plugin", "info", path_str(file)])
}

/// `nbnet plugin run FILE ARGS...` with `input` on stdin.
fn plugin_run(file: &Path, args: &[&str], input: &[u8]) -> Outcome {
    let mut all = vec!["plugin", "run", path_str(file)];
    all.extend_from_slice(args);
    Sandbox::new().run_with_input(&all, input)
}

/// The value of `key:` in `plugin info`'s output; panics if it is missing.
fn field<'a>(outcome: &'a Outcome, key: &str) -> &'a str {
    let prefix = format!("{key}:");
    outcome
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{key}:` line in\n{}", outcome.stdout))
}

fn assert_exit(outcome: &Outcome, code: i32, what: &str) {
    assert_eq!(
        outcome.status.code(),
        Some(code),
        "{what}: expected exit code {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        outcome.stdout,
        outcome.stderr
    );
}

/// Runs a build tool, panicking with its output unless it succeeds.
fn run_ok(cmd: Command, what: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let out = run_tool(cmd, what, b"", timeout);
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

fn cargo(dir: &Path, args: &[&str]) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        // Reuse the workspace's build cache: the dependencies are compiled once.
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

// ---------------------------------------------------------------- plugin info

#[test]
fn info_describes_a_rust_plugin_and_says_it_loads() {
    let out = info(&build().upper_so);
    assert_exit(&out, 0, "plugin info on the Rust upper plugin");
    assert!(field(&out, "kind").starts_with("Rust"), "{}", out.stdout);
    assert_eq!(field(&out, "name"), "upper");
    assert!(field(&out, "abi").starts_with("1.3 "), "{}", out.stdout);
    assert_eq!(field(&out, "loadable"), "yes");
    assert!(
        field(&out, "file").ends_with("libupper.so"),
        "{}",
        out.stdout
    );
}

#[test]
fn info_describes_a_c_plugin_and_says_it_loads() {
    let out = info(&build().upper_c_so);
    assert_exit(&out, 0, "plugin info on the C upper plugin");
    assert!(field(&out, "kind").starts_with("C "), "{}", out.stdout);
    assert_eq!(field(&out, "name"), "upper-c");
    assert!(field(&out, "abi").starts_with("1.3 "), "{}", out.stdout);
    assert_eq!(field(&out, "loadable"), "yes");
}

#[test]
fn info_says_a_plugin_built_for_an_older_abi_minor_loads() {
    let out = info(&build().abi_1_0_so);
    assert_exit(&out, 0, "plugin info on a plugin built for ABI 1.0");
    assert!(field(&out, "abi").starts_with("1.0 "), "{}", out.stdout);
    assert_eq!(field(&out, "loadable"), "yes");
}

/// Issue 14: "loadable: yes" for a plugin whose init fails read as a
/// promise; info now says init was not tried, and how to try it.
#[test]
fn info_on_a_plugin_whose_init_fails_says_init_was_not_tried() {
    let out = info(&build().fail_init_so);
    assert_exit(&out, 0, "plugin info on fail_init");
    assert_eq!(field(&out, "loadable"), "yes");
    let init = field(&out, "init");
    assert!(
        init.starts_with("not tried") && init.contains("nbnet plugin run"),
        "{}",
        out.stdout
    );
}

#[test]
fn info_on_a_library_that_is_no_plugin_exits_4() {
    let out = info(&build().system_lib);
    assert_exit(&out, 4, "plugin info on a system library");
    let loadable = field(&out, "loadable");
    assert!(
        loadable.starts_with("no") && loadable.contains("not an nbnet plugin"),
        "{}",
        out.stdout
    );
}

#[test]
fn info_on_a_plugin_of_another_abi_major_exits_4_and_names_it() {
    let out = info(&build().bad_abi_so);
    assert_exit(&out, 4, "plugin info on bad_abi");
    assert!(field(&out, "kind").starts_with("C "), "{}", out.stdout);
    assert!(field(&out, "abi").starts_with("99."), "{}", out.stdout);
    let loadable = field(&out, "loadable");
    assert!(
        loadable.starts_with("no") && loadable.contains("99"),
        "{}",
        out.stdout
    );
}

#[test]
fn info_on_a_missing_file_fails() {
    let sandbox = Sandbox::new();
    let missing = sandbox.path().join("libnothing.so");
    let out = info(&missing);
    assert!(
        !out.status.success(),
        "plugin info on a missing file succeeded\n{}",
        out.stdout
    );
}

/// Issue 14: a missing file named on the command line was reported as if
/// it came from a config ("relative paths are resolved against the config
/// file's folder"); there is no config file here. A relative path is
/// resolved against the current folder, which the message names.
#[test]
fn a_missing_file_is_not_blamed_on_a_config_file() {
    let mut sandbox = Sandbox::new();
    let here = sandbox.path().to_path_buf();
    let outcomes = [
        sandbox.run(&["plugin", "info", "libnothing.so"]),
        sandbox.run_with_input(&["plugin", "run", "libnothing.so"], b"hi\n"),
    ];
    for out in outcomes {
        assert_exit(&out, 4, "a missing plugin file");
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(text.contains("no such file"), "{text}");
        assert!(!text.contains("config"), "{text}");
        assert!(
            text.contains(&format!("current folder, {}", here.display())),
            "{text}"
        );
    }
}

// ----------------------------------------------------------------- plugin run

#[test]
fn run_answers_each_line_of_stdin() {
    let out = plugin_run(
        &build().upper_so,
        &[],
        b"hi\nHello, World 42\r\n\nlast line without newline",
    );
    assert_exit(&out, 0, "plugin run upper");
    // The \r is dropped and the empty line skipped (no empty requests).
    assert_eq!(
        out.stdout,
        "HI\nHELLO, WORLD 42\nLAST LINE WITHOUT NEWLINE\n"
    );
    // Issue 14: not silently: a note names the line and says why.
    assert!(
        out.stderr.contains(
            "note: skipped 1 empty line(s) of stdin (line 3): the protocol has no empty requests"
        ),
        "{}",
        out.stderr
    );
}

#[test]
fn run_with_frames_reads_and_writes_frames() {
    // Payloads a line-based run could not carry: newlines, binary bytes.
    let payloads: [&[u8]; 3] = [b"line one\nline two", b"hi", b"\x00\xffbin\r\n"];
    let input: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
    let upper = path_str(&build().upper_so);
    let sandbox = Sandbox::new();
    let mut cmd = sandbox.command();
    cmd.args(["plugin", "run", upper, "--frames"]);
    let out = run_tool(cmd, "nbnet plugin run --frames", &input, STARTUP_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "plugin run --frames\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<u8> = payloads
        .iter()
        .flat_map(|p| frame(&p.to_ascii_uppercase()))
        .collect();
    assert_eq!(out.stdout, want, "{}", show(&out.stdout));
}

#[test]
fn run_passes_config_to_the_plugin_and_a_failing_init_exits_4() {
    let out = plugin_run(
        &build().fail_init_so,
        &["--config", r#"reason = "no database at db.example""#],
        b"hi\n",
    );
    assert_exit(&out, 4, "plugin run on a plugin whose init fails");
    assert!(
        out.stderr.contains("no database at db.example"),
        "the plugin's message is missing:\n{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

/// An init that raised SIGSEGV went on as if nothing happened (Rust's
/// handler returned); then (hostile pass 5) one that crashed, exited or
/// stopped its process ended `plugin run` without a word, or froze it.
/// Each is now reported naming the plugin, exit 4, as `--check` does.
#[test]
fn run_reports_an_init_that_crashes_exits_or_stops_the_process() {
    for (config, says) in [
        (r#"init_raise = "SIGSEGV""#, "SIGSEGV"),
        (
            r#"init_raise = "SIGSTOP""#,
            "stopped the process while loading (SIGSTOP)",
        ),
        ("init_exit = 7", "exited with status 7"),
    ] {
        let out = plugin_run(&build().hostile_so, &["--config", config], b"hi\n");
        assert_exit(&out, 4, config);
        assert!(
            out.stderr.contains("hostile") && out.stderr.contains(says),
            "{config}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

/// Hostile pass 6: a plugin that crashed `plugin run` in `process` (or in
/// a pool thread's init the check does not run) ended it without a word.
#[test]
fn run_says_so_when_the_plugin_crashes_it() {
    use std::os::unix::process::ExitStatusExt;
    for (request, signal, name) in [
        (&b"abort\n"[..], libc::SIGABRT, "SIGABRT"),
        (b"segfault\n", libc::SIGSEGV, "SIGSEGV"),
    ] {
        let out = plugin_run(&build().misbehave_so, &[], request);
        assert_eq!(
            out.status.signal(),
            Some(signal),
            "{name}: {:?}",
            out.status
        );
        assert!(
            out.stderr
                .contains(&format!("the plugin crashed the process ({name})")),
            "{name}: {}",
            out.stderr
        );
    }
}

#[test]
fn run_gives_a_c_plugin_its_config() {
    let out = plugin_run(
        &build().counter_c_so,
        &["--config", "start = 10"],
        b"a\nb\nc\n",
    );
    assert_exit(&out, 0, "plugin run counter-c");
    assert_eq!(out.stdout, "10\n11\n12\n");
}

#[test]
fn a_failed_request_is_reported_and_the_run_goes_on_then_exits_1() {
    let out = plugin_run(&build().misbehave_so, &[], b"hi\nfail now\nthere\n");
    assert_exit(&out, 1, "plugin run with a failing request");
    assert_eq!(out.stdout, "hi\nthere\n");
    assert!(
        out.stderr.contains("request 2") && out.stderr.contains("misbehave refuses: fail now"),
        "{}",
        out.stderr
    );
}

/// Issue 12: `plugin run` refused every deferred answer ("this host cannot
/// defer answers here"). Now requests are handed over as a client pipelines
/// them and the answers come out in request order, whatever order they
/// complete in.
#[test]
fn run_waits_for_deferred_answers_and_prints_them_in_request_order() {
    let defer = &build().defer_rs_so;
    // `rev 3`: held until three are held, then answered last one first.
    let out = plugin_run(
        defer,
        &[],
        b"later 50 slow\nrev 3 a\nrev 3 b\ninline now\nrev 3 c\nlater 0 quick\n",
    );
    assert_exit(&out, 0, "plugin run with deferred answers");
    assert_eq!(out.stdout, "slow\na\nb\nnow\nc\nquick\n");
    // A dropped handle and a failure are reported; the run goes on.
    let out = plugin_run(defer, &[], b"drop\nfail backend down\nlater 0 after\n");
    assert_exit(&out, 1, "plugin run with failed deferred requests");
    assert_eq!(out.stdout, "after\n");
    assert!(
        out.stderr
            .contains("request 1: error: the plugin dropped its Deferred without answering")
            && out.stderr.contains("request 2: error: backend down"),
        "{}",
        out.stderr
    );
    // One never completed fails after --deferred-timeout, naming it.
    let out = plugin_run(
        defer,
        &["--deferred-timeout", "200ms"],
        b"never\nlater 0 x\n",
    );
    assert_exit(&out, 1, "plugin run with a request never completed");
    assert_eq!(out.stdout, "x\n");
    assert!(
        out.stderr.contains(
            "request 1: error: deferred answer not completed within deferred_timeout = 200ms"
        ),
        "{}",
        out.stderr
    );
}

/// Issue 12: `plugin run --threads N` runs a blocking plugin on a pool of N
/// instances, each told its thread index and the pool's size, as the
/// server does; a call past --plugin-timeout fails its request.
#[test]
fn run_with_threads_uses_a_pool_of_instances() {
    let misbehave = &build().misbehave_so;
    let out = plugin_run(
        misbehave,
        &["--threads", "3"],
        b"sleep:100\nsleep:100\nsleep:100\nthread\necho me\n",
    );
    assert_exit(&out, 0, "plugin run --threads 3");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..3], ["slept 100"; 3], "{}", out.stdout);
    assert!(
        ["thread 0/3", "thread 1/3", "thread 2/3"].contains(&lines[3]),
        "{}",
        out.stdout
    );
    assert_eq!(lines[4..], ["echo me"], "{}", out.stdout);
    let out = plugin_run(
        misbehave,
        &["--threads", "2", "--plugin-timeout", "200ms"],
        b"hang\nafter\n",
    );
    assert_exit(&out, 1, "plugin run --threads with a hang");
    assert_eq!(out.stdout, "after\n");
    assert!(
        out.stderr.contains("request 1: error: call on pool thread")
            && out.stderr.contains("over plugin_timeout = 200ms"),
        "{}",
        out.stderr
    );
    let out = plugin_run(misbehave, &["--threads", "1025"], b"hi\n");
    assert_exit(&out, 2, "plugin run --threads past the limit");
    assert!(out.stderr.contains("1025"), "{}", out.stderr);
}

// ----------------------------------------------------------------- plugin new

#[test]
fn a_new_rust_plugin_builds_passes_its_tests_and_runs_outside_the_workspace() {
    let name = "authoring-check";
    let mut sandbox = Sandbox::new();
    let dir = sandbox.path().to_path_buf();
    let out = sandbox.run(&[
        "plugin",
        "new",
        name,
        "--lang",
        "rust",
        "--dir",
        path_str(&dir),
    ]);
    assert_exit(&out, 0, "plugin new --lang rust");
    let root = dir.join(name);
    assert!(root.join("Cargo.toml").is_file() && root.join("src/lib.rs").is_file());
    assert!(out.stdout.contains("cargo test"), "{}", out.stdout);
    // Issue 14: the SDK by version, with a path override the output explains.
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let api = workspace_root().join("plugin-api");
    let api = api.canonicalize().unwrap_or(api);
    assert!(
        manifest.contains(&format!(
            "nbnet-plugin-api = {{ version = \"0.1\", path = \"{}\" }}",
            api.display()
        )),
        "{manifest}"
    );
    assert!(out.stdout.contains("delete `path = ...`"), "{}", out.stdout);

    // Pin the versions the workspace was built with, so that this build
    // reuses its compiled dependencies (and needs no registry) instead of
    // resolving and compiling whatever is newest.
    fs::copy(workspace_root().join("Cargo.lock"), root.join("Cargo.lock"))
        .expect("copy Cargo.lock");
    let tested = run_ok(
        cargo(&root, &["test"]),
        "cargo test (new plugin)",
        CARGO_TIMEOUT,
    );
    let built = run_ok(
        cargo(&root, &["build"]),
        "cargo build (new plugin)",
        CARGO_TIMEOUT,
    );
    eprintln!("new Rust plugin: cargo test {tested:?}, cargo build {built:?}");
    // Issue 14: what `plugin new` writes passes the checks a crate's CI runs.
    run_ok(
        cargo(&root, &["fmt", "--check"]),
        "cargo fmt --check (new plugin)",
        CARGO_TIMEOUT,
    );
    run_ok(
        cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"]),
        "cargo clippy -D warnings (new plugin)",
        CARGO_TIMEOUT,
    );

    let so = target_dir().join("debug/libauthoring_check.so");
    let info = sandbox.run(&["plugin", "info", path_str(&so)]);
    assert_exit(&info, 0, "plugin info on the new plugin");
    assert_eq!(field(&info, "name"), name);
    assert_eq!(field(&info, "loadable"), "yes");

    let out = plugin_run(&so, &[], b"hello\nworld\n");
    assert_exit(&out, 0, "plugin run on the new plugin");
    assert_eq!(out.stdout, "HELLO\nWORLD\n");
    let out = plugin_run(&so, &["--config", r#"prefix = "> ""#], b"hi\n");
    assert_exit(&out, 0, "plugin run on the new plugin with a prefix");
    assert_eq!(out.stdout, "> HI\n");
}

#[test]
fn a_new_c_plugin_is_a_folder_with_a_makefile_that_builds_it() {
    let name = "authoring-check-c";
    let mut sandbox = Sandbox::new();
    let dir = sandbox.path().join("plugins");
    let out = sandbox.run(&[
        "plugin",
        "new",
        name,
        "--lang",
        "c",
        "--dir",
        path_str(&dir),
    ]);
    assert_exit(&out, 0, "plugin new --lang c");
    // Issue 14: a folder, as the Rust template writes a crate.
    let root = dir.join(name);
    assert!(root.join(format!("{name}.c")).is_file(), "{}", out.stdout);
    assert!(root.join("Makefile").is_file(), "{}", out.stdout);

    // "build it:" then `make -C FOLDER`, indented.
    let mut lines = out.stdout.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "build it:")
        .unwrap_or_else(|| panic!("no `build it:` in\n{}", out.stdout));
    let line = lines.next().expect("the build line").trim();
    assert_eq!(line, format!("make -C {}", root.display()));
    let Some(make) = nbnet_tests::require_program("make", "make") else {
        return;
    };
    let mut cmd = Command::new(make);
    cmd.arg("-C").arg(&root).current_dir(sandbox.path());
    run_ok(cmd, line, Duration::from_secs(120));

    let so = root.join("libauthoring_check_c.so");
    let info = sandbox.run(&["plugin", "info", path_str(&so)]);
    assert_exit(&info, 0, "plugin info on the new C plugin");
    assert_eq!(field(&info, "name"), name);
    let out = plugin_run(&so, &[], b"hello\nMixed Case 1\n");
    assert_exit(&out, 0, "plugin run on the new C plugin");
    assert_eq!(out.stdout, "HELLO\nMIXED CASE 1\n");
}

#[test]
fn new_refuses_invalid_names_and_writes_nothing() {
    let mut sandbox = Sandbox::new();
    let dir = sandbox.mkdir("out");
    for bad in [
        "",
        "Upper",
        "9lives",
        "has space",
        "../escape",
        "dots.in.name",
        "é",
    ] {
        for lang in ["rust", "c"] {
            let out = sandbox.run(&[
                "plugin",
                "new",
                bad,
                "--lang",
                lang,
                "--dir",
                path_str(&dir),
            ]);
            assert!(
                !out.status.success() && out.stderr.contains("not a valid name"),
                "plugin new {bad:?} --lang {lang} was not refused\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.stdout,
                out.stderr
            );
        }
    }
    let left: Vec<_> = fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "refused names left files: {left:?}");
    assert!(!sandbox.path().join("escape").exists());
}

#[test]
fn new_does_not_overwrite_an_existing_plugin() {
    let mut sandbox = Sandbox::new();
    let dir = sandbox.mkdir("out");
    let args = [
        "plugin",
        "new",
        "twice",
        "--lang",
        "c",
        "--dir",
        path_str(&dir),
    ];
    assert_exit(&sandbox.run(&args), 0, "first plugin new");
    let file = dir.join("twice/twice.c");
    fs::write(&file, "/* mine */\n").unwrap();
    let again = sandbox.run(&args);
    assert!(!again.status.success(), "a second plugin new succeeded");
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    assert_eq!(fs::read_to_string(&file).unwrap(), "/* mine */\n");
}
