//! Log setup: `tracing` to stderr, level from `[log] level` (changed by a
//! reload), `RUST_LOG` wins.
//!
//! The writer is a plain blocking stderr: `tracing_appender::non_blocking`
//! runs a writer thread, which does not exist in a forked worker (its logs
//! would be lost) and which a master that forks must not have (see
//! `shared/notes/dependencies.md`). Log lines are short and rare (never per
//! request at `info`), so blocking writes cost nothing that matters.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Changes the level of the installed subscriber (see [`set_level`]);
/// unset when `RUST_LOG` chose the filter.
type SetLevel = Box<dyn Fn(LogLevel) -> Result<(), String> + Send + Sync>;
static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Installs the global subscriber. Call once, in the master, before forking.
pub fn init(level: LogLevel) {
    let from_env = matches!(std::env::var("RUST_LOG"), Ok(d) if !d.trim().is_empty());
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(level.as_str()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // When stderr's reader is gone (a closed pipe, a hung-up terminal)
        // a write fails; tracing-subscriber would then report that with
        // eprintln!, which panics on the same broken stderr and took the
        // master down. A lost log stream must never stop the server.
        .log_internal_errors(false)
        // A reload may change `[log] level` (workers forked afterwards
        // inherit the new filter).
        .with_filter_reloading();
    let handle = builder.reload_handle();
    if builder.try_init().is_ok() && !from_env {
        let _ = SET_LEVEL.set(Box::new(move |level: LogLevel| {
            handle
                .reload(EnvFilter::new(level.as_str()))
                .map_err(|e| e.to_string())
        }));
    }
}

/// Sets the level `[log] level` names (a reload changed it). `Err` says why
/// it cannot be changed: `RUST_LOG` overrides `[log] level`.
pub fn set_level(level: LogLevel) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(set) => set(level),
        None => Err("RUST_LOG is set, and it overrides [log] level".to_string()),
    }
}

/// Longest text from a plugin or a client that goes into one log line; the
/// rest is counted, not logged.
pub const MAX_UNTRUSTED_CHARS: usize = 1024;

/// Makes text that a plugin or a client supplied safe to put in a log line:
/// control characters (newlines included, so nobody can forge a log line)
/// are escaped as `\n`, `\u{1b}`…, and anything past
/// [`MAX_UNTRUSTED_CHARS`] is cut with a note of how much was left out.
pub fn untrusted(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_UNTRUSTED_CHARS + 32));
    for (count, (at, c)) in text.char_indices().enumerate() {
        if count == MAX_UNTRUSTED_CHARS {
            out.push_str(&format!("… ({} more bytes)", text.len() - at));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_stays_on_one_line_and_is_bounded() {
        assert_eq!(untrusted("plain words"), "plain words");
        assert_eq!(
            untrusted("a\nERROR master: forged\r\u{1b}[31m"),
            "a\\nERROR master: forged\\r\\u{1b}[31m"
        );
        let long = "x".repeat(1 << 20);
        let shown = untrusted(&long);
        assert!(shown.len() < MAX_UNTRUSTED_CHARS + 40, "{}", shown.len());
        assert!(shown.ends_with(&format!("({} more bytes)", (1 << 20) - MAX_UNTRUSTED_CHARS)));
    }
}
