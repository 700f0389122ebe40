//! Startup errors: a config or plugin that cannot work stops nbnet promptly,
//! before it serves anything, with a non-zero exit code (3 for the config, 4
//! for a plugin) and a message naming the file at fault; `--check` finds the
//! same errors, and accepts a good config.

use std::path::PathBuf;

use nbnet_tests::{check, describe, Outcome, Sandbox};

// -------------------------------------------------------------- plugin errors

fn plugin_config(path: &str) -> String {
    format!(
        r#"
[server]
workers = 2

[[plugins]]
name = "broken"
path = "{path}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "broken"
"#
    )
}

/// Checks that both `--check` and a normal start refuse the plugin at `path`
/// (a path or a placeholder such as `{bad_abi}`), naming the file; the start
/// exits with code 4 and does not loop restarting workers. `prepare` creates
/// files in the sandbox first. Returns the start's stderr.
fn assert_plugin_refused(path: &str, prepare: impl Fn(&Sandbox)) -> String {
    let config = plugin_config(path);

    let mut sandbox = Sandbox::new();
    prepare(&sandbox);
    let file = PathBuf::from(sandbox.render(path));
    let file = file.to_str().unwrap();

    let checked = sandbox.check(&config);
    assert!(
        !checked.status.success(),
        "--check accepted the plugin {file}\n{}",
        checked.stderr
    );
    assert!(
        checked.stderr.contains(file),
        "--check's stderr does not name the plugin file {file}:\n{}",
        checked.stderr
    );

    let (status, stderr) = sandbox.expect_startup_failure(&config);
    assert_eq!(
        status.code(),
        Some(4),
        "start: expected exit code 4, got {}\n{stderr}",
        describe(&status)
    );
    assert!(
        stderr.contains(file),
        "start's stderr does not name the plugin file {file}:\n{stderr}"
    );
    let restarts = stderr
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("restart"))
        .count();
    assert!(
        restarts <= 1,
        "looks like a restart loop ({restarts} lines mention restarts):\n{stderr}"
    );
    stderr
}

#[test]
fn a_missing_plugin_file_is_refused() {
    assert_plugin_refused("{dir}/no-such-plugin.so", |_| {});
}

#[test]
fn a_shared_library_that_is_not_a_plugin_is_refused() {
    assert_plugin_refused("{system_lib}", |_| {});
}

#[test]
fn a_c_plugin_with_the_wrong_abi_major_is_refused() {
    assert_plugin_refused("{bad_abi}", |_| {});
}

#[test]
fn a_c_plugin_built_for_a_newer_abi_minor_is_refused() {
    assert_plugin_refused("{newer_minor}", |_| {});
}

#[test]
fn a_c_plugin_without_a_process_function_is_refused() {
    assert_plugin_refused("{missing_process}", |_| {});
}

#[test]
fn a_rust_plugin_whose_init_fails_is_refused_with_its_message() {
    let stderr = assert_plugin_refused("{fail_init}", |_| {});
    assert!(
        stderr.contains("fail_init always refuses to start"),
        "the plugin's message is missing:\n{stderr}"
    );
}

#[test]
fn a_directory_instead_of_a_plugin_file_is_refused() {
    assert_plugin_refused("{dir}/plugin-dir.so", |s| {
        s.mkdir("plugin-dir.so");
    });
}

#[test]
fn a_text_file_named_like_a_shared_library_is_refused() {
    assert_plugin_refused("{dir}/notes.so", |s| {
        s.write("notes.so", b"this is not an ELF file\n");
    });
}

#[test]
fn a_plugin_path_relative_to_the_config_directory_is_found() {
    // The config names "copy.so", next to it; nbnet runs in another working
    // directory, so the path must be resolved against the config's directory.
    let mut sandbox = Sandbox::new();
    sandbox.set_cwd(std::path::Path::new("/"));
    let upper = std::fs::read(&nbnet_tests::build().upper_so).unwrap();
    sandbox.write("copy.so", &upper);
    let out = sandbox.check(&plugin_config("copy.so"));
    assert!(
        out.status.success(),
        "--check refused a relative plugin path: {}\n{}",
        describe(&out.status),
        out.stderr
    );
}

#[test]
fn one_broken_plugin_among_good_ones_stops_the_start() {
    let mut sandbox = Sandbox::new();
    let (status, stderr) = sandbox.expect_startup_failure(
        r#"
[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "bad"
path = "{bad_abi}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
    assert_eq!(status.code(), Some(4), "{stderr}");
    let bad = nbnet_tests::build().bad_abi_so.to_str().unwrap();
    assert!(
        stderr.contains(bad),
        "stderr does not name {bad}:\n{stderr}"
    );
}

#[test]
fn check_reports_every_broken_plugin_not_just_the_first() {
    let out = check(
        r#"
[[plugins]]
name = "bad"
path = "{bad_abi}"

[[plugins]]
name = "missing"
path = "{dir}/missing.so"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "bad"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "missing"
"#,
    );
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("libbad_abi.so"),
        "bad_abi not reported:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("missing.so"),
        "missing.so not reported:\n{}",
        out.stderr
    );
}

// -------------------------------------------------------------- config errors

/// Both `--check` and a start exit with code 3; returns (check, start stderr).
fn assert_config_refused(template: &str) -> (Outcome, String) {
    let mut sandbox = Sandbox::new();
    let checked = sandbox.check(template);
    assert_eq!(
        checked.status.code(),
        Some(3),
        "--check: expected exit code 3, got {}\n{}",
        describe(&checked.status),
        checked.stderr
    );
    let (status, stderr) = sandbox.expect_startup_failure(template);
    assert_eq!(
        status.code(),
        Some(3),
        "start: expected exit code 3, got {}\n{stderr}",
        describe(&status)
    );
    (checked, stderr)
}

fn has_line_number(text: &str, line: u32) -> bool {
    text.contains(&format!(":{line}:"))
        || text.to_ascii_lowercase().contains(&format!("line {line}"))
}

#[test]
fn an_unknown_key_is_refused_naming_the_file_the_key_and_the_line() {
    let template = "[server]\nworkers = 1\nbogus_key = 5\n\n[[plugins]]\nname = \"upper\"\npath = \"{upper}\"\n\n[[listeners]]\naddr = \"127.0.0.1:{port}\"\nplugin = \"upper\"\n";
    let (checked, stderr) = assert_config_refused(template);
    for err in [&checked.stderr, &stderr] {
        assert!(
            err.contains("nbnet.toml"),
            "the config file is not named:\n{err}"
        );
        assert!(
            err.contains("bogus_key"),
            "the unknown key is not named:\n{err}"
        );
        assert!(has_line_number(err, 3), "line 3 is not named:\n{err}");
    }
}

#[test]
fn an_unknown_key_in_a_listener_is_refused() {
    let (checked, _) = assert_config_refused(
        r#"
[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
colour = "blue"
"#,
    );
    assert!(checked.stderr.contains("colour"), "{}", checked.stderr);
}

#[test]
fn a_listener_naming_an_undefined_plugin_is_refused() {
    let (checked, stderr) = assert_config_refused(
        r#"
[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "nonexistent"
"#,
    );
    for err in [&checked.stderr, &stderr] {
        assert!(
            err.contains("nonexistent"),
            "the undefined plugin is not named:\n{err}"
        );
    }
}

#[test]
fn duplicate_plugin_names_are_refused() {
    let (checked, stderr) = assert_config_refused(
        r#"
[[plugins]]
name = "twin"
path = "{upper}"

[[plugins]]
name = "twin"
path = "{echo}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "twin"
"#,
    );
    for err in [&checked.stderr, &stderr] {
        assert!(
            err.contains("twin"),
            "the duplicate name is not named:\n{err}"
        );
    }
}

#[test]
fn a_value_of_the_wrong_type_is_refused() {
    let (checked, stderr) = assert_config_refused(
        "[server]\nworkers = \"two\"\n\n[[plugins]]\nname = \"upper\"\npath = \"{upper}\"\n\n[[listeners]]\naddr = \"127.0.0.1:{port}\"\nplugin = \"upper\"\n",
    );
    for err in [&checked.stderr, &stderr] {
        assert!(
            err.contains("nbnet.toml"),
            "the config file is not named:\n{err}"
        );
        assert!(has_line_number(err, 2), "line 2 is not named:\n{err}");
    }
}

#[test]
fn a_bad_read_timeout_is_refused() {
    assert_config_refused(
        r#"
[server]
read_timeout = "soon"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
}

#[test]
fn a_bad_log_level_is_refused() {
    assert_config_refused(
        r#"
[log]
level = "loud"

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
}

#[test]
fn a_config_that_is_not_toml_is_refused() {
    assert_config_refused("this is [not toml\n{port}");
}

#[test]
fn a_missing_config_file_is_refused_naming_it() {
    let mut sandbox = Sandbox::new();
    let missing = sandbox.path().join("absent.toml");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["--config", missing, "--check"],
        vec!["--config", missing],
    ] {
        let out = sandbox.run(&args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}\n{}",
            describe(&out.status),
            out.stderr
        );
        assert!(
            out.stderr.contains("absent.toml"),
            "{args:?}: file not named:\n{}",
            out.stderr
        );
    }
}

// ------------------------------------------------------------------- success

#[test]
fn check_accepts_a_valid_config_and_exits_0() {
    let out = check(
        r#"
[server]
workers = 2
max_restarts = 10
read_timeout = "500ms"
max_frame_bytes = 4096
max_connections = 100

[log]
level = "debug"

[[plugins]]
name = "upper"
path = "{upper}"

[[plugins]]
name = "echo"
path = "{echo}"

[[plugins]]
name = "upper-c"
path = "{upper_c}"

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[plugins.config]
anything = "goes"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"

[[listeners]]
addr = "127.0.0.1:{port2}"
plugin = "upper-c"
"#,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "--check refused a valid config: {}\n{}",
        describe(&out.status),
        out.stderr
    );
}

#[test]
fn check_accepts_integer_seconds_for_read_timeout() {
    let out = check(
        r#"
[server]
read_timeout = 2

[[plugins]]
name = "upper"
path = "{upper}"

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "upper"
"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
}

#[test]
fn check_does_not_start_serving() {
    let mut sandbox = Sandbox::new();
    let out = sandbox.check(&plugin_config("{upper}"));
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let port = sandbox.port(0);
    assert!(
        nbnet_tests::Client::try_connect(port).is_err(),
        "--check left something listening on {port}"
    );
}

#[test]
fn a_plugin_whose_init_fails_in_one_worker_only_stops_the_start_without_a_restart_loop() {
    // Worker 0 starts fine; worker 1's init fails. Restarting worker 1 cannot
    // help, so nbnet must give up promptly with code 4, not after max_restarts.
    let mut sandbox = Sandbox::new();
    let (status, stderr) = sandbox.expect_startup_failure(
        r#"
[server]
workers = 2
max_restarts = 100

[[plugins]]
name = "misbehave"
path = "{misbehave}"

[plugins.config]
fail_init_worker = 1

[[listeners]]
addr = "127.0.0.1:{port}"
plugin = "misbehave"
"#,
    );
    assert_eq!(
        status.code(),
        Some(4),
        "expected exit code 4, got {}\n{stderr}",
        describe(&status)
    );
    assert!(
        stderr.contains("misbehave refuses to init worker 1"),
        "the plugin's message is missing:\n{stderr}"
    );
    let restarts = stderr
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("restart"))
        .count();
    assert!(
        restarts <= 1,
        "looks like a restart loop ({restarts} lines mention restarts):\n{stderr}"
    );
}
