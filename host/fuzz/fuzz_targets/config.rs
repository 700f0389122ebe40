//! Fuzz target: config parsing (`nbnet::config::parse`) on arbitrary UTF-8.
//!
//! Checked: it never panics; an error names the file on every problem, with
//! a line number inside the text (or none) and a message; a config it
//! accepts satisfies what the rest of nbnet relies on (at least one
//! listener, every listener pointing at a defined plugin, unique non-empty
//! names and addresses, limits in range, absolute paths, and each
//! plugin's config table handed on as TOML that parses again), and every
//! message is short whatever the input.

#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nbnet::codec::MAX_DECLARED;
use nbnet::config::{self, parse};

const FILE: &str = "/fuzz/nbnet.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(Path::new(FILE), text) {
        Err(error) => {
            assert_eq!(error.file, Path::new(FILE));
            assert!(!error.problems.is_empty(), "an error without problems");
            let lines = text.matches('\n').count() + 1;
            for problem in &error.problems {
                let (line, message) = (&problem.line, &problem.message);
                assert!(!message.trim().is_empty(), "an empty message");
                if let Some(column) = problem.column {
                    assert!(column >= 1, "column {column}: {message}");
                }
                if let Some(line) = line {
                    assert!(
                        (1..=lines).contains(line),
                        "line {line} of {lines}: {message}"
                    );
                }
            }
            for message in error.problems.iter().map(|p| &p.message) {
                // Values are quoted cut short: no message grows with the input.
                assert!(
                    message.len() < 32_000,
                    "a message of {} bytes",
                    message.len()
                );
            }
            let shown = error.to_string();
            assert!(
                shown.starts_with(&format!("{FILE}:")),
                "the error does not start with the file name: {shown:?}"
            );
            // One `file[:line]: message` entry per problem.
            assert!(
                shown.matches(FILE).count() >= error.problems.len(),
                "{shown:?}"
            );
        }
        Ok(config) => {
            assert_eq!(config.file, Path::new(FILE));
            assert!(!config.listeners.is_empty(), "accepted without listeners");
            let server = &config.server;
            assert!(server.max_frame_bytes >= 1 && server.max_frame_bytes as u64 <= MAX_DECLARED);
            assert!((1..=config::MAX_CONNECTIONS).contains(&server.max_connections));
            assert!(server.workers <= config::MAX_WORKERS);
            assert!(server.max_restarts <= config::MAX_RESTARTS);
            for d in [
                server.read_timeout,
                server.plugin_timeout,
                server.init_timeout,
                server.restart_window,
                server.shutdown_timeout,
            ] {
                assert!((config::MIN_DURATION..=config::MAX_DURATION).contains(&d));
                // What the run-time code computes with it.
                let _ = config::deadline(std::time::Instant::now(), d).checked_sub(d / 64);
            }
            assert!(server.max_pending_output_bytes >= 1);
            assert!(server.max_requests_per_worker <= config::MAX_REQUESTS);
            assert!(server.max_requests_jitter <= config::MAX_REQUESTS);
            for seed in [0, 1, u64::MAX] {
                let _ = server.retire_after(seed);
            }
            if let Some(pid_file) = &server.pid_file {
                assert!(pid_file.is_absolute(), "relative pid_file {pid_file:?}");
            }
            let mut names = HashSet::new();
            for plugin in &config.plugins {
                assert!(!plugin.name.is_empty(), "an empty plugin name");
                assert!(
                    names.insert(&plugin.name),
                    "duplicate plugin {:?}",
                    plugin.name
                );
                assert!(plugin.path.is_absolute(), "relative path {:?}", plugin.path);
                if let Err(e) = plugin.config_toml.parse::<toml::Table>() {
                    panic!(
                        "plugin {:?}: its config table is not TOML again: {e}\n{}",
                        plugin.name, plugin.config_toml
                    );
                }
            }
            let mut addrs = HashSet::new();
            for listener in &config.listeners {
                assert!(listener.plugin < config.plugins.len());
                assert!(
                    addrs.insert(&listener.addr),
                    "duplicate listener {}",
                    listener.addr
                );
            }
        }
    }
});
