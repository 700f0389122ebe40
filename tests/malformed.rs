//! The table of malformed configs and plugin files (issue 3's "Proof"): each
//! one is refused both by `nbnet --check` and at startup, promptly, with a
//! non-zero exit and a message naming the config file and line, or the
//! plugin file and the reason.
//!
//! Add a row when a new way to get the config wrong is found.

use nbnet_tests::Sandbox;

/// One bad setup: a name, what goes in `[server]`, extra top-level TOML,
/// the `[[plugins]]` path, the listener address, and what the error must say.
struct Case {
    name: &'static str,
    server: &'static str,
    extra: &'static str,
    plugin: &'static str,
    addr: &'static str,
    says: &'static [&'static str],
}

const fn case(name: &'static str, says: &'static [&'static str]) -> Case {
    Case {
        name,
        server: "",
        extra: "",
        plugin: "{upper}",
        addr: "127.0.0.1:{port}",
        says,
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            server: "workerz = 2",
            ..case("unknown key in [server]", &["workerz", "nbnet.toml:3:"])
        },
        Case {
            server: "workers = \"two\"",
            ..case("value of the wrong type", &["nbnet.toml:3:", "workers"])
        },
        Case {
            server: "read_timeout = \"soon\"",
            ..case(
                "unparseable duration",
                &["nbnet.toml:3:", "invalid duration"],
            )
        },
        Case {
            server: "max_frame_bytes = 0",
            ..case("zero max_frame_bytes", &["nbnet.toml", "max_frame_bytes"])
        },
        Case {
            server: "max_connections = 0",
            ..case("zero max_connections", &["nbnet.toml", "max_connections"])
        },
        Case {
            server: "plugin_timeout = 0",
            ..case(
                "zero plugin_timeout",
                &["nbnet.toml:3:", "plugin_timeout = 0 is out of range"],
            )
        },
        Case {
            server: "max_pending_output_bytes = 0",
            ..case(
                "zero max_pending_output_bytes",
                &["nbnet.toml", "max_pending_output_bytes"],
            )
        },
        Case {
            server: "max_restarts = -1",
            ..case("negative max_restarts", &["nbnet.toml:3:"])
        },
        Case {
            extra: "[log]\nlevel = \"loud\"\n",
            ..case("unknown log level", &["nbnet.toml", "loud"])
        },
        Case {
            extra: "this is not toml\n",
            ..case("not TOML at all", &["nbnet.toml:"])
        },
        Case {
            extra: "[admin]\naddr = \"127.0.0.1:{port}\"\n",
            ..case(
                "admin address equal to a listener's",
                &["nbnet.toml", "[admin] addr"],
            )
        },
        Case {
            extra: "[admin]\nport = 1\n",
            ..case("unknown key in [admin]", &["nbnet.toml", "port"])
        },
        Case {
            extra: "[[listeners]]\naddr = \"127.0.0.1:{port}\"\nplugin = \"p\"\n",
            ..case("duplicate listener", &["nbnet.toml", "duplicate listener"])
        },
        Case {
            extra: "[[plugins]]\nname = \"p\"\npath = \"{echo}\"\n",
            ..case(
                "duplicate plugin name",
                &["nbnet.toml", "duplicate plugin name \"p\""],
            )
        },
        Case {
            extra: "[[listeners]]\naddr = \"127.0.0.1:{port2}\"\nplugin = \"nope\"\n",
            ..case(
                "listener naming an undefined plugin",
                &["nbnet.toml", "names plugin \"nope\""],
            )
        },
        Case {
            addr: "localhost:{port}",
            ..case(
                "listener address that is not IP:PORT",
                &["nbnet.toml", "is not IP:PORT"],
            )
        },
        // [::2] is not an address of this host: binding it fails without any
        // packet being sent.
        Case {
            addr: "[::2]:{port}",
            ..case(
                "unbindable listener address",
                &["nbnet.toml", "[::2]", "listen"],
            )
        },
        Case {
            addr: "unix:{dir}/no/such/folder/s.sock",
            ..case("unix socket in a missing folder", &["nbnet.toml", "unix:"])
        },
        Case {
            extra: "",
            addr: "unix:{dir}/s.sock\"\nreuseport = true\n#\"",
            ..case("reuseport on a unix listener", &["nbnet.toml", "reuseport"])
        },
        Case {
            plugin: "{dir}/missing.so",
            ..case("missing plugin file", &["missing.so", "no such file"])
        },
        Case {
            plugin: "{dir}/a-directory",
            ..case(
                "directory instead of a plugin file",
                &["a-directory", "is a directory"],
            )
        },
        Case {
            plugin: "{dir}/text.so",
            ..case(
                "text file named .so",
                &["text.so", "cannot load it as a shared library"],
            )
        },
        Case {
            plugin: "{system_lib}",
            ..case(
                "shared library that is not a plugin",
                &["not an nbnet plugin"],
            )
        },
        Case {
            plugin: "{bad_abi}",
            ..case(
                "C plugin with the wrong ABI major",
                &["incompatible ABI", "99"],
            )
        },
        Case {
            plugin: "{newer_minor}",
            ..case(
                "C plugin built for a newer ABI minor",
                &["newer than this host"],
            )
        },
        Case {
            plugin: "{missing_process}",
            ..case("C plugin without process", &["NULL init or process"])
        },
        Case {
            plugin: "{fail_init}",
            ..case(
                "Rust plugin whose init fails",
                &["init failed", "fail_init always refuses to start"],
            )
        },
        Case {
            plugin: "{upper}\"\nconfig = { shout = true }\n#\"",
            ..case(
                "unknown key in a plugin's own config table",
                &["init failed", "invalid config", "shout"],
            )
        },
    ]
}

fn render(case: &Case) -> String {
    format!(
        "# malformed: {}\n[server]\n{}\n\n{}\n[[plugins]]\nname = \"p\"\npath = \"{}\"\n\n[[listeners]]\naddr = \"{}\"\nplugin = \"p\"\n",
        case.name, case.server, case.extra, case.plugin, case.addr
    )
}

#[test]
fn every_malformed_config_or_plugin_is_refused_by_check_and_at_startup() {
    let cases = cases();
    assert!(cases.len() >= 20, "the table must keep at least 20 rows");
    let mut failures = Vec::new();
    for case in &cases {
        let template = render(case);
        let mut sandbox = Sandbox::new();
        sandbox.mkdir("a-directory");
        sandbox.write("text.so", b"not a shared library\n");

        let checked = sandbox.check(&template);
        let (status, started) = sandbox.expect_startup_failure(&template);
        for (what, ok, stderr) in [
            ("--check", !checked.status.success(), &checked.stderr),
            ("start", !status.success(), &started),
        ] {
            if !ok {
                failures.push(format!("{} — {what} accepted it:\n{stderr}", case.name));
                continue;
            }
            for needle in case.says {
                if !stderr.contains(needle) {
                    failures.push(format!(
                        "{} — {what}'s message lacks {needle:?}:\n{stderr}",
                        case.name
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n\n{}",
        failures.len(),
        cases.len() * 2,
        failures.join("\n\n")
    );
}
