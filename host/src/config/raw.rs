//! The config file as written, before validation: serde shapes whose
//! values keep their spans, so that every problem names its own line.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use super::{LogFormat, LogLevel};

// The file as written, before validation. Spans let errors name lines.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) plugins: Vec<Spanned<RawPlugin>>,
    #[serde(default)]
    pub(super) listeners: Vec<Spanned<RawListener>>,
}

/// `[server]` as written: every key with its span (so that its problems
/// name its own line), numbers as written (so that a range check, not a
/// type error, reports a negative or huge one).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) workers: Option<Spanned<Int>>,
    pub(super) max_restarts: Option<Spanned<Int>>,
    pub(super) restart_window: Option<Spanned<Dur>>,
    pub(super) plugin_timeout: Option<Spanned<Dur>>,
    pub(super) init_timeout: Option<Spanned<Dur>>,
    pub(super) read_timeout: Option<Spanned<Dur>>,
    pub(super) max_frame_bytes: Option<Spanned<Int>>,
    pub(super) max_connections: Option<Spanned<Int>>,
    pub(super) max_pending_output_bytes: Option<Spanned<Int>>,
    pub(super) max_buffered_bytes: Option<Spanned<Int>>,
    pub(super) max_deferred_per_connection: Option<Spanned<Int>>,
    pub(super) max_deferred_per_worker: Option<Spanned<Int>>,
    pub(super) deferred_timeout: Option<Spanned<Dur>>,
    pub(super) shutdown_timeout: Option<Spanned<Dur>>,
    pub(super) drain_delay: Option<Spanned<Dur>>,
    pub(super) max_requests_per_worker: Option<Spanned<Int>>,
    pub(super) max_requests_jitter: Option<Spanned<Int>>,
    pub(super) pid_file: Option<Spanned<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) allow_root: Option<Spanned<bool>>,
}

/// A TOML integer of any size the parser accepts (beyond `i64`, toml hands
/// over `u64` and `u128` values too), saturated into an `i128`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Int(pub(super) i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Int, E> {
                Ok(Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A duration as written: whole seconds (`30`) or a humantime string
/// (`"30s"`, `"500ms"`, `"2m"`); interpreted and range-checked by
/// [`Checker::duration`].
#[derive(Debug, Clone)]
pub(super) enum Dur {
    Seconds(i128),
    Text(String),
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a duration: a string like \"30s\" or \"500ms\", or a number of seconds",
                )
            }
            fn visit_i64<E>(self, v: i64) -> Result<Dur, E> {
                Ok(Dur::Seconds(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur::Seconds(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Dur, E> {
                Ok(Dur::Seconds(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Dur, E> {
                Ok(Dur::Seconds(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Dur, E> {
                Ok(Dur::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlugin {
    pub(super) name: Spanned<String>,
    pub(super) path: Spanned<String>,
    #[serde(default)]
    pub(super) config: Option<toml::Table>,
    pub(super) threads: Option<Spanned<Int>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) addr: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) addr: Spanned<String>,
    pub(super) plugin: Spanned<String>,
    #[serde(default)]
    pub(super) proxy_protocol: bool,
    #[serde(default)]
    pub(super) reuseport: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) deny: Option<Spanned<Vec<String>>>,
}

/// `[log]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: LogLevel,
    pub(super) file: Option<Spanned<String>>,
    pub(super) format: LogFormat,
}
