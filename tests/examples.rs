//! The example plugins and the docs' walk-throughs, used for real: each
//! example served by the real binary and spoken to over 127.0.0.1, every C
//! example compiled as C++ too, and the walk-through plugins of
//! docs/plugins.md built as its readers would (outside the workspace, with
//! the docs' own command lines and config) and served.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nbnet_tests::{
    build, nbnet_send, run_tool, target_dir, workspace_root, Client, Outcome, Sandbox, Server,
};

/// Bound for the outside-the-workspace cargo runs (seconds when the
/// workspace's dependencies are compiled; this is for a cold machine).
const CARGO_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound for one C or C++ compilation.
const CC_TIMEOUT: Duration = Duration::from_secs(120);

/// Every C example, and the C walk-through plugin of the docs.
const C_EXAMPLES: [&str; 5] = [
    "plugins/upper-c/upper.c",
    "plugins/echo-c/echo.c",
    "plugins/counter-c/counter.c",
    "plugins/delay-c/delay.c",
    "docs/examples/hello.c",
];

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
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

/// Runs a build tool, panicking with its output unless it succeeds; returns
/// how long it took and its stdout.
fn run_ok(cmd: Command, what: &str, timeout: Duration) -> (Duration, String) {
    let start = Instant::now();
    let out = run_tool(cmd, what, b"", timeout);
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        start.elapsed(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `nbnet plugin info FILE`, expected to say the plugin loads; returns its
/// `name:`.
fn assert_loadable(file: &Path) -> String {
    let out = Sandbox::new().run(&["plugin", "info", path_str(file)]);
    assert_exit(&out, 0, &format!("plugin info {}", file.display()));
    assert!(
        out.stdout.lines().any(|l| l == "loadable: yes"),
        "{}",
        out.stdout
    );
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("name:"))
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|| panic!("no name in\n{}", out.stdout))
}

// ------------------------------------------------------ the examples, served

/// kv, sha256 and echo-c on the probed `{port}`s; counter-c on a port of its
/// own that the readiness probe does not touch, so that the first request it
/// sees is ours. One worker: one kv store, one counter.
const EXAMPLES: &str = r#"
[server]
workers = 1

[[plugins]]
name = "kv"
path = "{kv}"

[[plugins]]
name = "sha256"
path = "{sha256}"

[[plugins]]
name = "echo-c"
path = "{echo_c}"

[[plugins]]
name = "counter"
path = "{counter_c}"
config = { start = 10 }

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "kv"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "sha256"

[[listeners]]
addr = "127.0.0.1:{port3}"
plugin = "echo-c"

[[listeners]]
addr = "127.0.0.1:{aux}"
plugin = "counter"
"#;

#[test]
fn every_example_plugin_serves_its_protocol() {
    let server = Server::start(EXAMPLES);
    let counter_port = server.aux_port(0);

    // kv: the README's session; a bad request is answered, not fatal.
    let mut kv = Client::connect(server.port_n(0));
    let mut ask =
        |request: &str| String::from_utf8_lossy(&kv.request(request.as_bytes())).into_owned();
    assert_eq!(ask("SET a 1"), "OK");
    assert_eq!(ask("GET a"), "1");
    assert_eq!(ask("SET greeting hello, world"), "OK");
    assert_eq!(ask("GET greeting"), "hello, world");
    assert_eq!(ask("DEL a"), "OK");
    assert_eq!(ask("GET a"), "NOT_FOUND");
    let bogus = ask("BOGUS");
    assert!(bogus.starts_with("ERR"), "BOGUS was answered {bogus:?}");
    assert!(ask("GET").starts_with("ERR"));
    // The connection is still usable after the errors.
    assert_eq!(ask("GET greeting"), "hello, world");
    assert_eq!(ask("DEL a"), "NOT_FOUND");

    // sha256: the FIPS 180-2 test vector.
    let mut sha = Client::connect(server.port_n(1));
    assert_eq!(
        String::from_utf8_lossy(&sha.request(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    // echo-c: the request, unchanged.
    let mut echo = Client::connect(server.port_n(2));
    assert_eq!(echo.request(b"hi"), b"hi");
    let binary: Vec<u8> = (0..=255u8).collect();
    assert_eq!(echo.request(&binary), binary);

    // counter-c: start = 10 from its config, one sequence per worker.
    let mut counter = Client::connect(counter_port);
    for want in ["10", "11", "12"] {
        assert_eq!(String::from_utf8_lossy(&counter.request(b"next")), want);
    }
    server.stop();
}

// ------------------------------------------------------ C examples as C++

#[test]
fn every_c_example_compiles_as_cpp_and_exports_an_unmangled_entry() {
    let root = workspace_root();
    let sandbox = Sandbox::new();
    let cxx = std::env::var_os("CXX").unwrap_or_else(|| OsString::from("c++"));
    for source in C_EXAMPLES {
        let stem = Path::new(source).file_stem().unwrap().to_str().unwrap();
        let so = sandbox.path().join(format!("lib{stem}_cxx.so"));
        let mut cmd = Command::new(&cxx);
        cmd.args(["-std=c++20", "-x", "c++", "-Wall", "-Wextra", "-Werror"])
            .args(["-shared", "-fPIC", "-fvisibility=hidden"])
            .arg("-I")
            .arg(root.join("plugin-api/include"))
            .arg("-o")
            .arg(&so)
            .arg(root.join(source))
            .current_dir(&root);
        run_ok(cmd, &format!("compiling {source} as C++20"), CC_TIMEOUT);

        // With -fvisibility=hidden the entry point is the only export, and
        // the header's extern "C" keeps its name unmangled.
        let mut nm = Command::new("nm");
        nm.args(["-D", "--defined-only"]).arg(&so);
        match nm.output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let symbols: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.split_whitespace().last())
                    .collect();
                assert_eq!(
                    symbols,
                    ["nbnet_plugin_entry"],
                    "{source} built as C++ exports {symbols:?}"
                );
            }
            _ => eprintln!("nm is not available: checking {source} through dlopen only"),
        }
        // dlopen + dlsym("nbnet_plugin_entry"): what the host does.
        assert_loadable(&so);
    }
}

// ------------------------------------------------- the docs' walk-throughs

fn docs() -> String {
    let path = workspace_root().join("docs/plugins.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The fenced blocks of `lang` in the docs.
fn blocks(docs: &str, lang: &str) -> Vec<String> {
    let open = format!("```{lang}\n");
    let mut found = Vec::new();
    let mut rest = docs;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let end = body.find("```\n").expect("an unterminated block");
        found.push(body[..end].to_string());
        rest = &body[end..];
    }
    found
}

/// The walk-through's serving config ("6. Serve it"), made to point at
/// `so` and listen on `{port}`.
fn docs_config(docs: &str, so: &Path) -> String {
    let block = blocks(docs, "toml")
        .into_iter()
        .find(|b| b.contains("name = \"hello\"") && b.contains("[[listeners]]"))
        .expect("docs/plugins.md shows a config serving hello");
    assert!(
        block.contains("127.0.0.1:9001"),
        "the docs' config no longer listens on 127.0.0.1:9001:\n{block}"
    );
    let mut config = String::from("[server]\nworkers = 2\n\n");
    for line in block.lines() {
        if line.starts_with("path = ") {
            config.push_str(&format!("path = {:?}\n", path_str(so)));
        } else {
            config.push_str(&line.replace("127.0.0.1:9001", "127.0.0.1:{port}"));
            config.push('\n');
        }
    }
    config
}

/// What the docs say `nbnet send 127.0.0.1:9001 world` prints.
fn docs_send_output(docs: &str) -> String {
    docs.lines()
        .find(|l| l.starts_with("nbnet send 127.0.0.1:9001 world"))
        .and_then(|l| l.split_once("# prints: "))
        .map(|(_, printed)| printed.trim().to_string())
        .expect("docs/plugins.md shows `nbnet send 127.0.0.1:9001 world  # prints: ...`")
}

/// Serves `so` with the docs' config, then `nbnet send ... world`, and
/// `nbnet plugin run` with the docs' `--config`: both must print what the
/// docs say.
fn serve_like_the_docs(so: &Path) {
    let docs = docs();
    let want = docs_send_output(&docs);
    assert_eq!(want, "hi, world!", "the docs' expected output changed");

    let out = Sandbox::new().run_with_input(
        &[
            "plugin",
            "run",
            path_str(so),
            "--config",
            r#"greeting = "hi""#,
        ],
        b"world\n",
    );
    assert_exit(&out, 0, "plugin run with the docs' --config");
    assert_eq!(out.stdout, format!("{want}\n"));

    // "Check it, then (re)start nbnet".
    let config = docs_config(&docs, so);
    let checked = Sandbox::new().check(&config);
    assert_exit(&checked, 0, "nbnet --check on the docs' config");
    let server = Server::start(&config);
    let sent = nbnet_send(&server.addr().to_string(), "world");
    assert_exit(&sent, 0, "nbnet send ... world");
    assert_eq!(sent.stdout, format!("{want}\n"));
    server.stop();
}

#[test]
fn the_rust_walk_through_crate_builds_and_tests_outside_the_workspace_and_serves() {
    let manifest = workspace_root().join("docs/examples/hello-plugin/Cargo.toml");
    let cargo_cmd = |args: &[&str]| {
        let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg("--manifest-path")
            .arg(&manifest)
            // Reuse the workspace's build cache: the dependencies are compiled once.
            .env("CARGO_TARGET_DIR", target_dir())
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        cmd
    };
    // Its tests include docs_match.rs: the docs show its files verbatim.
    let (tested, out) = run_ok(
        cargo_cmd(&["test"]),
        "cargo test (hello-plugin)",
        CARGO_TIMEOUT,
    );
    let (built, _) = run_ok(
        cargo_cmd(&["build"]),
        "cargo build (hello-plugin)",
        CARGO_TIMEOUT,
    );
    eprintln!("hello-plugin: cargo test {tested:?}, cargo build {built:?}\n{out}");

    let so: PathBuf = target_dir().join("debug/libhello.so");
    assert_eq!(assert_loadable(&so), "hello");
    serve_like_the_docs(&so);
}

#[test]
fn the_c_walk_through_builds_with_the_docs_line_and_serves() {
    let docs = docs();
    // The ```sh block that builds hello.c: its `cc` command, continuation
    // lines joined, writing into our sandbox instead of target/.
    let block = blocks(&docs, "sh")
        .into_iter()
        .find(|b| b.starts_with("cc ") && b.contains("docs/examples/hello.c"))
        .expect("docs/plugins.md shows how to build hello.c");
    let line = block
        .replace("\\\n", " ")
        .lines()
        .next()
        .unwrap()
        .to_string();
    let words: Vec<&str> = line.split_whitespace().collect();
    let out_at = words
        .iter()
        .position(|w| *w == "-o")
        .unwrap_or_else(|| panic!("no -o in {line}"));
    let sandbox = Sandbox::new();
    let so = sandbox.path().join("libhello_c.so");
    let cc = std::env::var_os("CC").unwrap_or_else(|| OsString::from("cc"));
    let mut cmd = Command::new(cc);
    cmd.args(&words[1..out_at])
        .arg("-o")
        .arg(&so)
        .args(&words[out_at + 2..])
        // The docs' paths are relative to the checkout's root.
        .current_dir(workspace_root());
    run_ok(cmd, &line, CC_TIMEOUT);

    assert_eq!(assert_loadable(&so), "hello-c");
    serve_like_the_docs(&so);
}

/// `plugin info` on each C example names it as its table does.
#[test]
fn the_c_examples_load_and_name_themselves() {
    let a = build();
    for (so, name) in [
        (&a.echo_c_so, "echo-c"),
        (&a.counter_c_so, "counter-c"),
        (&a.upper_c_so, "upper-c"),
    ] {
        assert_eq!(assert_loadable(so), name, "{}", so.display());
    }
}
