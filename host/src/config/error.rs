//! How problems are reported: [`ConfigError`] (every problem with its
//! place), and the helpers that make values and paths safe to show.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{QUOTE_CHARS, SHOWN_PROBLEMS};

/// Everything wrong with a config file.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Each problem, in file order.
    pub problems: Vec<Problem>,
}

/// One thing wrong with a config file, shown `file:line:column: message`
/// (or `file:line: message`, or `file: message`, as far as it is known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// 1-based column (in characters) on `line`, when known exactly: for
    /// an unknown key or a value of the wrong type.
    pub column: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

impl Problem {
    /// A problem on `line` (if any), column unknown.
    pub fn at(line: Option<usize>, message: String) -> Problem {
        Problem {
            line,
            column: None,
            message,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().take(SHOWN_PROBLEMS).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let file = shown(&self.file);
            let message = &problem.message;
            match (problem.line, problem.column) {
                (Some(line), Some(column)) => write!(f, "{file}:{line}:{column}: {message}")?,
                (Some(line), None) => write!(f, "{file}:{line}: {message}")?,
                (None, _) => write!(f, "{file}: {message}")?,
            }
        }
        if let Some(more) = self.problems.len().checked_sub(SHOWN_PROBLEMS) {
            if more > 0 {
                write!(
                    f,
                    "\n{}: … and {more} more problem(s) not shown; fix these first",
                    shown(&self.file)
                )?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// A path (the config file's, or one resolved against its folder) for a
/// message: as `display()` shows it, with control characters escaped
/// ([`crate::logging::untrusted`]), so that a file name holding a newline
/// (given with `--config` or `NBNET_CONFIG`) cannot break a message or
/// forge a log line.
pub fn shown(path: &Path) -> String {
    crate::logging::untrusted(&path.to_string_lossy())
}

/// `text` for a message: in double quotes, with control characters, quotes
/// and backslashes escaped, and cut after [`QUOTE_CHARS`] characters (then
/// ending in `…"` and followed by the full length), so that no value a
/// config holds can make a message long or garble a terminal or log.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(QUOTE_CHARS) + 2);
    out.push('"');
    let mut chars = text.chars();
    for c in chars.by_ref().take(QUOTE_CHARS) {
        out.extend(c.escape_debug());
    }
    if chars.next().is_some() {
        out.push_str(&format!("…\" ({} bytes in all)", text.len()));
    } else {
        out.push('"');
    }
    out
}

/// Someone else's message (the TOML parser's, which may quote values) made
/// safe to show: control characters escaped, cut after `limit` characters.
pub fn bounded(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit) + 3);
    let mut chars = text.chars();
    for c in chars.by_ref().take(limit) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// Byte offsets of line starts, computed once: a line number is then a
/// binary search, not a recount from the top (which made validation
/// quadratic in the number of entries).
pub(super) struct Lines<'a> {
    pub(super) text: &'a str,
    pub(super) starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Lines { text, starts }
    }

    /// The 1-based line of byte `offset`.
    pub(super) fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset).max(1)
    }

    /// The 1-based column, in characters, of byte `offset` on its line.
    pub(super) fn column_of(&self, offset: usize) -> usize {
        let start = self.starts[self.line_of(offset) - 1];
        self.text
            .get(start..offset.min(self.text.len()))
            .map_or(1, |before| before.chars().count() + 1)
    }
}
