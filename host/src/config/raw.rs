//! The config file as written, before validation: serde shapes whose
//! values keep their spans, so that every problem names its own line.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use toml::de::{DeArray, DeTable, DeValue};

use super::error::{bounded, Lines, Problem};
use super::{LogFormat, LogLevel, QUOTE_CHARS, SHOWN_PROBLEMS};

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
    #[serde(default)]
    pub(super) tls: Option<Spanned<crate::tls::RawTls>>,
}

/// `[log]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: LogLevel,
    pub(super) file: Option<Spanned<String>>,
    pub(super) format: LogFormat,
}

/// What [`read`] makes of a file that is valid TOML.
pub(super) struct Read {
    /// The file as written, less what had to be left out; `None` when it
    /// could not be read into shape at all.
    pub(super) raw: Option<RawConfig>,
    /// Every unknown key and value of the wrong type (or missing), each at
    /// its line and column, in the order found.
    pub(super) problems: Vec<Problem>,
    /// Whether only keys were left out (an unknown key, a value of the
    /// wrong type: the default stands in), so that the rest can be checked
    /// as is; not when a whole entry was (it lacked a required key).
    pub(super) complete: bool,
}

/// Reads `text` into a [`RawConfig`], finding every unknown key and every
/// value of the wrong type in one run: serde stops at the first error, so
/// each error's key (found by its span) is taken out of the parsed
/// document and the rest read again, until it reads (at most
/// [`SHOWN_PROBLEMS`] rounds, each linear in the size of the file). A
/// table that lacks a required key is taken out whole; its "missing field"
/// is not reported when it was caused by taking out a wrong value.
/// A TOML syntax error (one: the parser cannot go on) is the `Err`.
pub(super) fn read(text: &str, lines: &Lines) -> Result<Read, Vec<Problem>> {
    let place = |span: Option<std::ops::Range<usize>>, path: &str, message: &str| {
        let message = bounded(message.trim_end(), 3 * QUOTE_CHARS);
        Problem {
            line: span.as_ref().map(|s| lines.line_of(s.start)),
            column: span.as_ref().map(|s| lines.column_of(s.start)),
            message: if path.is_empty() {
                message
            } else {
                format!("{path}: {message}")
            },
        }
    };
    let mut doc = DeTable::parse(text).map_err(|e| vec![place(e.span(), "", e.message())])?;
    let original = doc.clone();
    let mut problems = Vec::new();
    // Keys taken out, by the span of their table and their name.
    let mut taken: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut complete = true;
    for _ in 0..=SHOWN_PROBLEMS {
        let error = match RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => {
                return Ok(Read {
                    raw: Some(raw),
                    problems,
                    complete,
                })
            }
            Err(error) => error,
        };
        let Some(span) = error.span() else {
            problems.push(place(None, "", error.message()));
            break;
        };
        let root = doc.span();
        // The path as the file has it (taking entries out renumbers the
        // rest of their array).
        let mut path = Vec::new();
        take_out(
            original.clone().get_mut(),
            root.clone(),
            &span,
            &mut path,
            &mut None,
        );
        let mut from = None;
        if !take_out(doc.get_mut(), root, &span, &mut Vec::new(), &mut from) {
            problems.push(place(Some(span), "", error.message()));
            break;
        }
        let missing = error.message().starts_with("missing field");
        if missing {
            complete = false;
        }
        // "missing field `addr`" for an addr taken out as of the wrong
        // type says nothing new.
        let echo = missing
            && taken.iter().any(|(table, key)| {
                *table == span && error.message() == format!("missing field `{key}`")
            });
        if !echo {
            problems.push(place(
                Some(span.clone()),
                &show_path(&path),
                error.message(),
            ));
        }
        taken.extend(from);
    }
    Ok(Read {
        raw: None,
        problems,
        complete: false,
    })
}

/// Sorts `problems` into file order (stable: problems without a place
/// last, problems at one place in the order found).
pub(super) fn in_file_order(problems: &mut [Problem]) {
    problems.sort_by_key(|p| (p.line.unwrap_or(usize::MAX), p.column.unwrap_or(0)));
}

/// One step of a key path: a table key or an array index.
enum Step {
    Key(String),
    Index(usize),
}

/// `server.workers`, `listeners[1].addr` (0-based, as serde paths go).
fn show_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&crate::logging::untrusted(key));
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn contains(outer: &Span, inner: &Span) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The byte range a table or key spans in the file.
type Span = std::ops::Range<usize>;

/// Takes out of `table` (spanning `span`) the innermost key (or array
/// entry) whose key or value holds the byte range `at`, recording its path
/// and, for a key, `(table's span, key)` in `from`; false if none does.
fn take_out(
    table: &mut DeTable,
    span: Span,
    at: &Span,
    path: &mut Vec<Step>,
    from: &mut Option<(Span, String)>,
) -> bool {
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        path.push(Step::Key(key.get_ref().to_string()));
        let inner_span = value.span();
        let inside = match value.get_mut() {
            DeValue::Table(inner) => take_out(inner, inner_span, at, path, from),
            DeValue::Array(items) => take_out_of_array(items, at, path, from),
            _ => false,
        };
        if inside {
            return true;
        }
        if contains(&key.span(), at) || contains(&value.span(), at) {
            hit = Some(key.get_ref().to_string());
            break;
        }
        path.pop();
    }
    match hit {
        Some(key) => {
            table.remove(key.as_str());
            *from = Some((span, key));
            true
        }
        None => false,
    }
}

/// [`take_out`] for the entries of an array.
fn take_out_of_array(
    items: &mut DeArray,
    at: &Span,
    path: &mut Vec<Step>,
    from: &mut Option<(Span, String)>,
) -> bool {
    let mut hit = None;
    for (i, item) in items.iter_mut().enumerate() {
        path.push(Step::Index(i));
        let inner_span = item.span();
        let inside = match item.get_mut() {
            DeValue::Table(inner) => take_out(inner, inner_span, at, path, from),
            DeValue::Array(inner) => take_out_of_array(inner, at, path, from),
            _ => false,
        };
        if inside {
            return true;
        }
        if contains(&item.span(), at) {
            hit = Some(i);
            break;
        }
        path.pop();
    }
    match hit {
        Some(i) => {
            let kept: DeArray = std::mem::replace(items, DeArray::new())
                .into_iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, item)| item)
                .collect();
            *items = kept;
            true
        }
        None => false,
    }
}
