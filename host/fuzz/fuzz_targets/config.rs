//! Fuzz target: config parsing (`nbnet::config::parse`) on arbitrary UTF-8.
//!
//! Checked: it never panics; an error names the file on every problem, with
//! a line number inside the text (or none) and a message; a config it
//! accepts satisfies what the rest of nbnet relies on (at least one
//! listener, every listener pointing at a defined plugin, unique non-empty
//! names and addresses, limits in range, absolute paths, and each
//! plugin's config table handed on as TOML that parses again).

#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nbnet::codec::MAX_DECLARED;
use nbnet::config::parse;

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
            for (line, message) in &error.problems {
                assert!(!message.trim().is_empty(), "an empty message");
                if let Some(line) = line {
                    assert!(
                        (1..=lines).contains(line),
                        "line {line} of {lines}: {message}"
                    );
                }
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
            assert!(server.max_connections >= 1);
            assert!(!server.read_timeout.is_zero());
            assert!(!server.plugin_timeout.is_zero());
            assert!(!server.restart_window.is_zero());
            assert!(!server.shutdown_timeout.is_zero());
            assert!(server.max_pending_output_bytes >= 1);
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
