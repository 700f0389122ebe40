//! Logging: `[log] level` decides what reaches stderr, for the host's own
//! lines and for the lines plugins log through the host.

use nbnet_tests::Server;

fn config(level: &str) -> String {
    format!(
        r#"
[server]
workers = 1

[log]
level = "{level}"

[[plugins]]
name = "misbehave"
path = "{{misbehave}}"

[[listeners]]
addr = "127.0.0.1:{{port}}"
plugin = "misbehave"
"#
    )
}

#[test]
fn a_plugins_info_line_is_logged_at_level_info() {
    let server = Server::start(&config("info"));
    server.wait_for_workers(1);
    server.wait_for("the plugin's init line in the log", || {
        server
            .log()
            .contains("misbehave init worker 0/1")
            .then_some(())
    });
}

#[test]
fn level_error_keeps_info_lines_out_of_stderr() {
    let server = Server::start(&config("error"));
    server.wait_for_workers(1);
    let mut client = server.client();
    assert_eq!(client.request(b"hello"), b"hello");
    // Give the worker's init line time to show up, were it logged.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = server.log();
    assert!(
        !log.contains("misbehave init worker"),
        "a plugin's info line was logged at level error:\n{log}"
    );
    assert!(
        !log.contains("INFO"),
        "info lines were logged at level error:\n{log}"
    );
}

#[test]
fn level_warn_still_logs_a_failed_request() {
    // A failed request is logged at warn level or above; at level error it
    // may be hidden, at level warn it must show.
    let server = Server::start(&config("warn"));
    let mut client = server.client();
    let _ = client.send_frame(b"fail loudly");
    client.expect_closed();
    server.wait_for("the plugin's error in the log", || {
        server
            .log()
            .contains("misbehave refuses: fail loudly")
            .then_some(())
    });
}

/// Issue 14: `[log] format = "json"` writes one JSON object per line, and
/// lifecycle events carry their values as fields.
#[test]
fn json_format_writes_one_object_per_line_with_lifecycle_fields() {
    let mut server =
        Server::start(&config("info").replace("[log]\n", "[log]\nformat = \"json\"\n"));
    let workers = server.wait_for_workers(1);
    let pid = workers[0].pid;
    nbnet_tests::send_signal(pid, libc::SIGKILL);
    server.wait_for("the exit logged", || {
        server.log().contains("died").then_some(())
    });
    server.signal(libc::SIGTERM);
    server.wait_exit(std::time::Duration::from_secs(10));
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}\n{log}"))
        })
        .collect();
    for line in &lines {
        assert!(
            line["timestamp"].is_string()
                && line["level"].is_string()
                && line["message"].is_string(),
            "{line}"
        );
    }
    let started = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("worker 0 started"))
        })
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert_eq!(started["worker"], 0, "{started}");
    assert_eq!(started["pid"], pid, "{started}");
    let died = lines
        .iter()
        .find(|l| l["pid"] == pid && l["message"].as_str().is_some_and(|m| m.contains("died")))
        .unwrap_or_else(|| panic!("no exit line with fields:\n{log}"));
    assert_eq!(died["worker"], 0, "{died}");
    assert_eq!(died["level"], "WARN", "{died}");
    assert!(
        died["status"]
            .as_str()
            .is_some_and(|s| s.contains("SIGKILL")),
        "{died}"
    );
    // The plugin's own line, through the host, names it.
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("misbehave init worker 0/1"))),
        "{log}"
    );
}

/// Issue 14: an invalid RUST_LOG silenced everything below error; now it
/// is reported once and [log] level applies.
#[test]
fn an_invalid_rust_log_falls_back_to_the_config_level_with_one_warning() {
    let mut sandbox = nbnet_tests::Sandbox::new();
    sandbox.set_env("RUST_LOG", "nbnet=loud");
    let server = Server::start_in(sandbox, &config("info"));
    server.wait_for_workers(1);
    server.wait_for("the plugin's info line", || {
        server.log().contains("misbehave init worker").then_some(())
    });
    let log = server.log();
    assert_eq!(
        log.matches("RUST_LOG is not a valid filter").count(),
        1,
        "{log}"
    );
    assert!(log.contains("nbnet=loud"), "{log}");
    assert!(log.contains(" INFO worker 0 started (pid "), "{log}");
}
