//! Log setup: `tracing` to stderr, level from `[log] level`, `RUST_LOG` wins.
//!
//! The writer is a plain blocking stderr: `tracing_appender::non_blocking`
//! runs a writer thread, which does not exist in a forked worker (its logs
//! would be lost) and which a master that forks must not have (see
//! `shared/notes/dependencies.md`). Log lines are short and rare (never per
//! request at `info`), so blocking writes cost nothing that matters.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Installs the global subscriber. Call once, in the master, before forking.
pub fn init(level: LogLevel) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(level.as_str()),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
