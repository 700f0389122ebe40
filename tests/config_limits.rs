//! Config values and files that `--check` used to accept (or choke on) and
//! that then failed at startup or crashed at run time: numbers whose
//! run-time arithmetic overflows, listeners the kernel will not bind side by
//! side, files that are huge or not files, and values echoed unbounded.
//!
//! The rule they check: whatever `--check` accepts, startup and run time
//! accept; what it refuses, it refuses with exit status 3 and a message
//! naming the file and line, short and free of control characters.

use std::fs;

use nbnet_tests::{describe, one_plugin_config, Outcome, Sandbox};

/// `--check` and a start both refuse `template` with exit status 3; returns
/// both stderrs.
fn refused(sandbox: &mut Sandbox, template: &str) -> [String; 2] {
    let checked = sandbox.check(template);
    assert_eq!(
        checked.status.code(),
        Some(3),
        "--check: expected exit status 3, got {}\n{}",
        describe(&checked.status),
        checked.stderr
    );
    let (status, started) = sandbox.expect_startup_failure(template);
    assert_eq!(
        status.code(),
        Some(3),
        "start: expected exit status 3, got {}\n{started}",
        describe(&status)
    );
    [checked.stderr, started]
}

fn assert_says(stderrs: &[String], needles: &[&str]) {
    for stderr in stderrs {
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{needle:?} missing from:\n{stderr}"
            );
        }
    }
}

#[test]
fn a_read_timeout_that_overflows_a_deadline_is_refused_on_its_line() {
    // It used to pass `--check`, then panic every worker on its first
    // connection (`Instant + Duration` overflow): a crash loop.
    let template = one_plugin_config("upper", "{upper}", "read_timeout = 18446744073709551615");
    let stderrs = refused(&mut Sandbox::new(), &template);
    assert_says(
        &stderrs,
        &["nbnet.toml:3: [server] read_timeout = 18446744073709551615 is out of range: must be between 1ms and 1day"],
    );
}

#[test]
fn a_plugin_timeout_that_overflows_a_deadline_is_refused_on_its_line() {
    // It used to make `--check` itself panic.
    let template = one_plugin_config("upper", "{upper}", "plugin_timeout = 18446744073709551615");
    let stderrs = refused(&mut Sandbox::new(), &template);
    assert_says(
        &stderrs,
        &["nbnet.toml:3: [server] plugin_timeout = 18446744073709551615 is out of range"],
    );
    for stderr in &stderrs {
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn every_server_number_at_u64_max_is_refused_on_its_line() {
    // shutdown_timeout panicked the master on SIGTERM, max_requests_jitter
    // divided by zero, max_requests_per_worker plus a jitter wrapped to 1.
    let mut sandbox = Sandbox::new();
    for key in [
        "workers",
        "max_restarts",
        "restart_window",
        "plugin_timeout",
        "read_timeout",
        "shutdown_timeout",
        "max_frame_bytes",
        "max_connections",
        "max_pending_output_bytes",
        "max_requests_per_worker",
        "max_requests_jitter",
    ] {
        let checked = sandbox.check(&one_plugin_config(
            "upper",
            "{upper}",
            &format!("{key} = 18446744073709551615"),
        ));
        assert_eq!(checked.status.code(), Some(3), "{key}: {}", checked.stderr);
        assert!(
            checked.stderr.contains(&format!(
                "nbnet.toml:3: [server] {key} = 18446744073709551615 is out of range: must be between "
            )),
            "{key}: {}",
            checked.stderr
        );
    }
}

#[test]
fn the_largest_accepted_values_start_and_serve() {
    // The top of every range: accepted by `--check`, so the server must
    // start and answer with them.
    let server = nbnet_tests::Server::start(&one_plugin_config(
        "upper",
        "{upper}",
        "workers = 1\nread_timeout = \"1day\"\nplugin_timeout = \"1day\"\nshutdown_timeout = \"1day\"\nrestart_window = \"1day\"\ninit_timeout = \"1day\"\nmax_requests_per_worker = 1000000000000000\nmax_requests_jitter = 1000000000000000\nmax_restarts = 1000000\nmax_frame_bytes = 9999999999\nmax_pending_output_bytes = 9999999999\nmax_buffered_bytes = 1099511627776\nmax_connections = 16777216",
    ));
    let mut client = server.client();
    assert_eq!(client.request(b"hi"), b"HI");
    drop(client);
    server.stop();
}

/// A config with two listeners for the `upper` plugin, `a` and `b`: the
/// first's entry starts on line 6, the second's `addr` is on line 11.
fn two_listeners(a: &str, b: &str) -> String {
    format!(
        "\n[[plugins]]\nname = \"upper\"\npath = \"{{upper}}\"\n\n[[listeners]]\naddr = \"{a}\"\nplugin = \"upper\"\n\n[[listeners]]\naddr = \"{b}\"\nplugin = \"upper\"\n"
    )
}

fn assert_overlap_refused(sandbox: &mut Sandbox, a: &str, b: &str) {
    let template = two_listeners(a, b);
    let stderrs = refused(sandbox, &template);
    assert_says(&stderrs, &["nbnet.toml:11: listener ", "line 6"]);
}

#[test]
fn a_wildcard_and_a_specific_listener_on_one_port_are_refused_naming_both_lines() {
    // Nothing is bound: validation refuses the pair first.
    let mut sandbox = Sandbox::new();
    assert_overlap_refused(&mut sandbox, "127.0.0.1:{port}", "0.0.0.0:{port}");
}

#[test]
fn an_ipv4_mapped_listener_and_its_ipv4_twin_are_refused_naming_both_lines() {
    let mut sandbox = Sandbox::new();
    assert_overlap_refused(
        &mut sandbox,
        "[::ffff:127.0.0.1]:{port}",
        "127.0.0.1:{port}",
    );
}

#[test]
fn two_unix_paths_to_one_socket_file_are_refused_naming_both_lines() {
    let mut sandbox = Sandbox::new();
    sandbox.mkdir("sub");
    let template = two_listeners("unix:a.sock", "unix:sub/../a.sock");
    let stderrs = refused(&mut sandbox, &template);
    assert_says(
        &stderrs,
        &[
            "nbnet.toml:11: listener unix:",
            "is the same socket file as listener unix:",
            "line 6",
        ],
    );
}

#[test]
fn a_config_file_over_the_cap_is_refused_naming_its_size_and_the_cap() {
    let mut sandbox = Sandbox::new();
    let config = sandbox.config_path();
    // Sparse: 17 MiB that take no disk space.
    fs::File::create(&config)
        .and_then(|file| file.set_len(17 * 1024 * 1024))
        .expect("create the config file");
    let out = sandbox.run(&["--config", config.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "nbnet.toml: the config file is 17825792 bytes, over the limit of 16777216 bytes (16 MiB)"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.len() < 1000,
        "{} bytes of stderr",
        out.stderr.len()
    );
}

#[test]
fn a_fifo_as_config_file_is_refused_without_blocking() {
    let mut sandbox = Sandbox::new();
    let fifo = sandbox.path().join("fifo.toml");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // Nobody writes to it: reading it would block for good (`run` gives up
    // after a few seconds and fails the test).
    let out: Outcome = sandbox.run(&["--config", fifo.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("fifo.toml: cannot read the config file: it is a FIFO (named pipe)"),
        "{}",
        out.stderr
    );
}

#[test]
fn values_echoed_in_errors_are_cut_short_and_escaped() {
    let mut sandbox = Sandbox::new();
    let huge = "A".repeat(1_000_000);
    for server in [
        format!("workers = \"{huge}\""),
        format!("read_timeout = \"{huge}\""),
        format!("{huge} = 1"),
    ] {
        let template = one_plugin_config("upper", "{upper}", &server);
        let stderrs = refused(&mut sandbox, &template);
        for stderr in &stderrs {
            assert!(stderr.contains("nbnet.toml:3:"), "{}", &stderr[..500]);
            assert!(stderr.len() < 2000, "{} bytes of stderr", stderr.len());
        }
    }
    // A plugin name holding a terminal escape sequence.
    let template = one_plugin_config("up\\u001b[2Jper", "{upper}", "");
    let stderrs = refused(&mut sandbox, &template);
    assert_says(&stderrs, &["control character", "up\\u{1b}[2Jper"]);
    for stderr in &stderrs {
        assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    }
}

/// A `[server] pid_file` naming the config file, a plugin's `.so` or a Unix
/// listener's socket used to pass `--check`; the server then wrote its PID
/// over that file and removed it at stop (the plugin was gone for good).
/// Refused now, naming both lines, and the files are left as they were.
#[test]
fn a_pid_file_naming_the_config_a_plugin_or_a_socket_is_refused_naming_both_lines() {
    let mut sandbox = Sandbox::new();
    // A copy: the old binary would destroy the plugin it is given.
    let plugin = sandbox.path().join("libupper.so");
    fs::copy(&nbnet_tests::build().upper_so, &plugin).expect("copy the upper plugin");
    let plugin_bytes = fs::read(&plugin).unwrap();
    sandbox.mkdir("sub");
    let config = |pid_file: &str| {
        format!(
            "[server]\nworkers = 1\npid_file = \"{pid_file}\"\n\n[[plugins]]\nname = \"upper\"\npath = \"libupper.so\"\n\n[[listeners]]\naddr = \"unix:s.sock\"\nplugin = \"upper\"\n\n[[listeners]]\naddr = \"127.0.0.1:{{port}}\"\nplugin = \"upper\"\n"
        )
    };
    for (pid_file, other) in [
        ("nbnet.toml", "is the same file as the config file itself"),
        (
            "./sub/../libupper.so",
            "is the same file as the path of plugin \"upper\" (",
        ),
        (
            "sub/../s.sock",
            "is the same file as the socket of listener unix:",
        ),
    ] {
        let template = config(pid_file);
        let stderrs = refused(&mut sandbox, &template);
        assert_says(
            &stderrs,
            &[
                "nbnet.toml:3: [server] pid_file = ",
                other,
                "nbnet would write its PID there",
            ],
        );
        if !other.contains("itself") {
            let line = if other.contains("plugin") {
                ":7)"
            } else {
                ":10)"
            };
            assert_says(&stderrs, &[&format!("nbnet.toml{line}")]);
        }
        assert_eq!(
            fs::read_to_string(sandbox.config_path()).unwrap(),
            sandbox.render(&template),
            "the config file was changed"
        );
        assert_eq!(
            fs::read(&plugin).unwrap(),
            plugin_bytes,
            "the plugin was changed"
        );
    }
}

/// A config file name holding a newline (from `--config` or
/// `NBNET_CONFIG`) used to be printed raw: each message broke in two, and
/// a crafted name could forge a line. It is escaped now.
#[test]
fn a_config_file_name_holding_a_newline_is_escaped_in_messages() {
    let mut sandbox = Sandbox::new();
    let dir = sandbox.mkdir("a\nERROR forged");
    let config = dir.join("nbnet.toml");
    fs::write(&config, "[server]\nworkers = -1\n").unwrap();
    let from_flag = sandbox.run(&["--config", config.to_str().unwrap(), "--check"]);
    let from_env = {
        let mut command = sandbox.command();
        command.env("NBNET_CONFIG", &config).arg("--check");
        let out = command.output().expect("run nbnet");
        Outcome {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    for out in [&from_flag, &from_env] {
        assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
        assert!(
            out.stderr
                .contains("a\\nERROR forged/nbnet.toml:2: [server] workers = -1"),
            "{}",
            out.stderr
        );
        assert!(
            !out.stderr.lines().any(|l| l.starts_with("ERROR forged")),
            "{}",
            out.stderr
        );
    }
    // A file that cannot be read: the same.
    let missing = dir.join("missing.toml");
    let out = sandbox.run(&["--config", missing.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("a\\nERROR forged/missing.toml: cannot read the config file"),
        "{}",
        out.stderr
    );
}
