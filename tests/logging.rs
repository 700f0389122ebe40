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
