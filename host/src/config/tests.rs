//! Unit tests of parsing and validation, fed strings.

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
    // Line and column: where the key starts.
    assert!(text.starts_with("/etc/nbnet/test.toml:2:1: "), "{text}");
    assert!(text.contains("server.workerz: unknown field"), "{text}");
}

#[test]
fn wrong_type_names_the_line_column_and_key() {
    let err = parse_str(&format!("[server]\nworkers = \"two\"\n{MINIMAL}")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/nbnet/test.toml:2:11: server.workers: invalid type: string \"two\", expected a whole number"
    );
}

/// Issue 14: a file with three mistakes took three runs (serde stops at
/// the first). Every unknown key and wrong type is reported in one run,
/// in file order, each at its line and column and with its key path, and
/// the range checks of the rest run too.
#[test]
fn every_unknown_key_and_wrong_type_is_reported_in_one_run() {
    let text = r#"[server]
wrkers = 2
read_timeout = true
max_restarts = -1

[log]
levl = "info"

[[plugins]]
name = "u"
path = "/x/libupper.so"

[[listeners]]
addr = "127.0.0.1:9000"
plugin = "u"
reuseport = "yes"
"#;
    let err = parse_str(text).unwrap_err();
    let shown: Vec<String> = err.to_string().lines().map(String::from).collect();
    let want = [
        "test.toml:2:1: server.wrkers: unknown field `wrkers`, expected one of `workers`,",
        "test.toml:3:16: server.read_timeout: invalid type: boolean `true`, expected a duration",
        "test.toml:4: [server] max_restarts = -1 is out of range",
        "test.toml:7:1: log.levl: unknown field `levl`, expected one of `level`, `file`, `format`",
        "test.toml:16:13: listeners[0].reuseport: invalid type: string \"yes\", expected a boolean",
    ];
    assert_eq!(shown.len(), want.len(), "{err}");
    for (line, want) in shown.iter().zip(want) {
        assert!(line.contains(want), "wanted {want:?}, got:\n{err}");
    }
}

/// A required key of the wrong type is reported once (not again as
/// missing); an entry that lacks one is named by its index in the file
/// even after an earlier entry was left out; nothing after is checked
/// against entries left out (no "names plugin u, which no entry defines").
#[test]
fn entries_left_out_are_named_once_and_not_checked_further() {
    let text = r#"[[plugins]]
name = 7
path = "/x/libupper.so"

[[listeners]]
addr = 9000
plugin = "u"

[[listeners]]
plugin = "u"
"#;
    let err = parse_str(text).unwrap_err();
    let want =
        "/etc/nbnet/test.toml:2:8: plugins[0].name: invalid type: integer `7`, expected a string
/etc/nbnet/test.toml:6:8: listeners[0].addr: invalid type: integer `9000`, expected a string
/etc/nbnet/test.toml:9:1: listeners[1]: missing field `addr`";
    assert_eq!(err.to_string(), want);
}

/// Issue 14: a `[server]` key's error was reported at the line of an
/// earlier plugin config key of the same name. A plugin's own config table
/// is the plugin's business (its keys are not checked here); the `[server]`
/// key's problem is on its own line and column.
#[test]
fn a_server_key_error_is_at_its_own_line_not_a_plugin_keys_of_that_name() {
    let text = r#"[[plugins]]
name = "u"
path = "/x/libupper.so"
config = { workers = "two", read_timeout = "x" }

[[listeners]]
addr = "127.0.0.1:9000"
plugin = "u"

[server]
workers = "two"
"#;
    let err = parse_str(text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/nbnet/test.toml:11:11: server.workers: invalid type: string \"two\", expected a whole number"
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
    let text = format!("{MINIMAL}\n[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"upper\"\n");
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
    let text =
        format!("[server]\n{key} = {value}\nmax_buffered_bytes = {MAX_BUFFERED_BYTES}\n{MINIMAL}");
    match parse_str(&text) {
        Err(err) => {
            for Problem { line, message, .. } in &err.problems {
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
        let mut values: Vec<String> = [0, 1, min, max - 1, max, max + 1, i64::MAX as u64, u64::MAX]
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
            // (A type error also names the column: `2:COLUMN: `.)
            assert!(err.starts_with("/etc/nbnet/test.toml:2:"), "{err}");
            if value.parse::<i128>().is_ok() || value.ends_with("d\"") || value.contains("s\"") {
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
        let text =
            listeners(&[("unix:a.sock", false), (other, false)]).replace("reuseport = false\n", "");
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
        err.contains(":7: listener addr \"unix:a\\u{1b}[2J.sock\" contains a control character"),
        "{err}"
    );
    let text = MINIMAL.replace("libupper.so", "lib\\nupper.so");
    let err = parse_str(&text).unwrap_err().to_string();
    assert!(
        err.contains(":4: plugin \"upper\": path \"lib\\nupper.so\" contains a control character"),
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
        err.contains(":2: [admin] addr 0.0.0.0:9000 overlaps listener 127.0.0.1:9000 on line 8"),
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

/// Hostile pass 6: `pid_file` or `[log] file` naming a TLS listener's key
/// passed `--check`; at start the PID overwrote the key (and `nbnet stop`
/// deleted it), or the log file chowned it to the workers' user.
#[test]
fn a_written_file_naming_a_tls_file_is_refused_naming_both() {
    let text = "[server]\npid_file = \"tls/k.pem\"\n[log]\nfile = \"./tls/c.pem\"\n[[plugins]]\nname = \"upper\"\npath = \"lib/libupper.so\"\n[[listeners]]\naddr = \"127.0.0.1:9000\"\nplugin = \"upper\"\ntls = { cert = \"tls/c.pem\", key = \"tls/k.pem\", client_ca = \"tls/ca.pem\" }\n";
    let err = parse_str(text).map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains("test.toml:2: [server] pid_file = /etc/nbnet/tls/k.pem is the same file as the tls key file of listener 127.0.0.1:9000 (/etc/nbnet/test.toml:11)"),
        "{err}"
    );
    assert!(
        err.contains("test.toml:4: [log] file = /etc/nbnet/tls/c.pem is the same file as the tls cert file of listener 127.0.0.1:9000"),
        "{err}"
    );
}
