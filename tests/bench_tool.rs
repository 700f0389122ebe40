//! `nbnet bench`, the load generator (issue 5), against a real server: it
//! checks every response against its own request, reports what it measured
//! (as JSON for scripts), and fails loudly when the server is wrong or gone.

use nbnet_tests::{one_plugin_config, Sandbox, Server};

/// Runs `nbnet bench` with `args` against `server`.
fn bench(server: &Server, args: &[&str]) -> nbnet_tests::Outcome {
    let addr = server.addr().to_string();
    let mut all = vec!["bench", "--addr", &addr];
    all.extend_from_slice(args);
    Sandbox::new().run(&all)
}

#[test]
fn a_pipelined_run_checks_every_response_and_reports_json() {
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let out = bench(
        &server,
        &[
            "--conns",
            "4",
            "--pipeline",
            "4",
            "--requests",
            "2000",
            "--expect",
            "upper",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let field = |name: &str| -> String {
        let key = format!("\"{name}\":");
        let at = out
            .stdout
            .find(&key)
            .unwrap_or_else(|| panic!("no {name}: {}", out.stdout));
        out.stdout[at + key.len()..]
            .split([',', '}'])
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("requests"), "2000");
    assert_eq!(field("errors"), "0");
    assert_eq!(field("mismatches"), "0");
    assert_eq!(field("depth"), "4");
    assert!(out.stdout.contains("\"p99\":"), "{}", out.stdout);
}

#[test]
fn a_wrong_answer_is_reported_and_fails_the_run() {
    // The server upper-cases; the run expects echoes.
    let server = Server::start(&one_plugin_config("upper", "{upper}", "workers = 1"));
    let out = bench(
        &server,
        &["--conns", "2", "--requests", "100", "--expect", "echo"],
    );
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("response mismatch"), "{}", out.stderr);
}

#[test]
fn an_unreachable_server_is_named_and_fails_the_run() {
    let out = Sandbox::new().run(&["bench", "--addr", "127.0.0.1:1", "--requests", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("cannot connect to 127.0.0.1:1"),
        "{}",
        out.stderr
    );
}
