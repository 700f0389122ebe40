//! Validation of values against their ranges, collecting every problem
//! with its line: the shared [`Checker`] and the `[server]` table.

use super::*;

/// A file nbnet writes (`[server] pid_file`, `[log] file`), which nothing
/// else in the config may name: not the config file, a plugin, a Unix
/// listener's socket, nor the other written file.
pub(super) struct Written<'p> {
    pub(super) key: &'static str,
    pub(super) line: Option<usize>,
    pub(super) path: &'p Path,
    /// `path` normalised lexically, to compare.
    pub(super) normal: PathBuf,
    /// What nbnet would do to the file.
    pub(super) does: &'static str,
}

impl<'p> Written<'p> {
    pub(super) fn new(
        key: &'static str,
        line: Option<usize>,
        path: &'p Path,
        does: &'static str,
    ) -> Self {
        Written {
            key,
            line,
            path,
            normal: normalize_lexically(path),
            does,
        }
    }

    /// `file:line` of its key, for a message about another key.
    pub(super) fn place(&self, file: &Path) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", shown(file)),
            None => shown(file),
        }
    }
}

/// Whether `a` (normalised lexically) and the absolute path `b` name the
/// same file: equal once both are normalised, or the same name in the same
/// folder once the folders are resolved through symlinks (only paths with
/// the same file name touch the disk).
pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    let b = normalize_lexically(b);
    if a.file_name() != b.file_name() {
        return false;
    }
    a == b || socket_file(a) == socket_file(&b)
}

/// Collects problems, each with the line it is on.
pub(super) struct Checker<'a, 'text> {
    pub(super) lines: &'a Lines<'text>,
    pub(super) problems: Vec<Problem>,
}

impl Checker<'_, '_> {
    pub(super) fn problem(&mut self, line: Option<usize>, message: String) {
        self.problems.push(Problem::at(line, message));
    }

    /// Refuses each file of `written` that is `path` (the use `what`
    /// describes), on the written key's line.
    pub(super) fn shared(&mut self, written: &[Written], path: &Path, what: impl Fn() -> String) {
        for file in written {
            if same_file(&file.normal, path) {
                self.problem(
                    file.line,
                    format!(
                        "{} = {} is the same file as {}: {}; give each its own path",
                        file.key,
                        shown(file.path),
                        what(),
                        file.does
                    ),
                );
            }
        }
    }

    pub(super) fn out_of_range(&mut self, key: &str, span_start: usize, value: &str, range: &str) {
        self.problem(
            Some(self.lines.line_of(span_start)),
            format!("[server] {key} = {value} is out of range: must be between {range}"),
        );
    }

    /// `[server] key`: a whole number within `range`, or `default`.
    pub(super) fn count(
        &mut self,
        key: &str,
        value: &Option<Spanned<Int>>,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> u64 {
        let Some(value) = value else {
            return default;
        };
        let Int(n) = *value.get_ref();
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                let bounds = format!("{} and {}", range.start(), range.end());
                self.out_of_range(key, value.span().start, &n.to_string(), &bounds);
                default
            }
        }
    }

    /// [`Checker::count`] for a `usize` key (its range also capped at
    /// `usize::MAX`).
    pub(super) fn count_usize(
        &mut self,
        key: &str,
        value: &Option<Spanned<Int>>,
        range: RangeInclusive<u64>,
        default: usize,
    ) -> usize {
        let top = (*range.end()).min(usize::MAX as u64);
        let n = self.count(key, value, *range.start()..=top, default as u64);
        usize::try_from(n).unwrap_or(default)
    }

    /// `[server] key`: a duration from [`MIN_DURATION`] to [`MAX_DURATION`],
    /// or `default`.
    pub(super) fn duration(
        &mut self,
        key: &str,
        value: &Option<Spanned<Dur>>,
        default: Duration,
    ) -> Duration {
        self.duration_from(key, value, default, MIN_DURATION)
    }

    /// [`Checker::duration`] with another lower bound (`drain_delay` may
    /// be 0).
    pub(super) fn duration_from(
        &mut self,
        key: &str,
        value: &Option<Spanned<Dur>>,
        default: Duration,
        min: Duration,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        let bounds = format!(
            "{} and {}",
            humantime::format_duration(min),
            humantime::format_duration(MAX_DURATION)
        );
        let start = value.span().start;
        let (parsed, shown) = match value.get_ref() {
            Dur::Seconds(n) => (
                u64::try_from(*n).ok().map(Duration::from_secs),
                n.to_string(),
            ),
            Dur::Text(text) => match humantime::parse_duration(text) {
                Ok(d) => (Some(d), quote(text)),
                Err(humantime::DurationError::NumberOverflow) => (None, quote(text)),
                Err(e) => {
                    self.problem(
                        Some(self.lines.line_of(start)),
                        format!(
                            "[server] {key}: invalid duration {} ({e}); write e.g. \"30s\", \"500ms\" or a number of seconds",
                            quote(text)
                        ),
                    );
                    return default;
                }
            },
        };
        match parsed {
            Some(d) if (min..=MAX_DURATION).contains(&d) => d,
            _ => {
                self.out_of_range(key, start, &shown, &bounds);
                default
            }
        }
    }

    /// A file path `key` (e.g. `[server] pid_file`), resolved against
    /// `base` and checked; `without` says what leaving the key out means.
    pub(super) fn path(
        &mut self,
        key: &str,
        value: &Option<Spanned<String>>,
        base: &Path,
        without: &str,
    ) -> Option<PathBuf> {
        let text = value.as_ref()?;
        let line = Some(self.lines.line_of(text.span().start));
        let written = text.get_ref();
        let path = std::path::absolute(base.join(written)).unwrap_or_else(|_| base.join(written));
        let why = if written.is_empty() {
            Some(format!("is empty; remove the key for {without}"))
        } else if written.contains(char::is_control) {
            Some("contains a control character".to_string())
        } else if path.as_os_str().len() > MAX_PATH_BYTES {
            Some(format!(
                "is {} bytes long once resolved, over the system's limit of {MAX_PATH_BYTES}",
                path.as_os_str().len()
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                self.problem(line, format!("{key} = {} {why}", quote(written)));
                None
            }
            None => Some(path),
        }
    }

    /// `[server]`, each key checked against its range.
    pub(super) fn server(&mut self, raw: &RawServer, base: &Path) -> ServerConfig {
        let d = ServerConfig::default();
        let max_bytes = MAX_DECLARED;
        let pid_file = self.path("[server] pid_file", &raw.pid_file, base, "no PID file");
        ServerConfig {
            workers: self.count_usize("workers", &raw.workers, 0..=MAX_WORKERS as u64, d.workers),
            max_restarts: self.count(
                "max_restarts",
                &raw.max_restarts,
                0..=u64::from(MAX_RESTARTS),
                d.max_restarts.into(),
            ) as u32,
            restart_window: self.duration("restart_window", &raw.restart_window, d.restart_window),
            plugin_timeout: self.duration("plugin_timeout", &raw.plugin_timeout, d.plugin_timeout),
            init_timeout: self.duration("init_timeout", &raw.init_timeout, d.init_timeout),
            read_timeout: self.duration("read_timeout", &raw.read_timeout, d.read_timeout),
            max_frame_bytes: self.count_usize(
                "max_frame_bytes",
                &raw.max_frame_bytes,
                1..=max_bytes,
                d.max_frame_bytes,
            ),
            max_connections: self.count_usize(
                "max_connections",
                &raw.max_connections,
                1..=MAX_CONNECTIONS as u64,
                d.max_connections,
            ),
            max_pending_output_bytes: self.count_usize(
                "max_pending_output_bytes",
                &raw.max_pending_output_bytes,
                1..=max_bytes,
                d.max_pending_output_bytes,
            ),
            max_buffered_bytes: self.count_usize(
                "max_buffered_bytes",
                &raw.max_buffered_bytes,
                1..=MAX_BUFFERED_BYTES,
                d.max_buffered_bytes,
            ),
            max_deferred_per_connection: self.count_usize(
                "max_deferred_per_connection",
                &raw.max_deferred_per_connection,
                1..=MAX_DEFERRED as u64,
                d.max_deferred_per_connection,
            ),
            max_deferred_per_worker: self.count_usize(
                "max_deferred_per_worker",
                &raw.max_deferred_per_worker,
                1..=MAX_DEFERRED as u64,
                d.max_deferred_per_worker,
            ),
            deferred_timeout: self.duration(
                "deferred_timeout",
                &raw.deferred_timeout,
                d.deferred_timeout,
            ),
            shutdown_timeout: self.duration(
                "shutdown_timeout",
                &raw.shutdown_timeout,
                d.shutdown_timeout,
            ),
            drain_delay: self.duration_from(
                "drain_delay",
                &raw.drain_delay,
                d.drain_delay,
                Duration::ZERO,
            ),
            max_requests_per_worker: self.count(
                "max_requests_per_worker",
                &raw.max_requests_per_worker,
                0..=MAX_REQUESTS,
                d.max_requests_per_worker,
            ),
            max_requests_jitter: self.count(
                "max_requests_jitter",
                &raw.max_requests_jitter,
                0..=MAX_REQUESTS,
                d.max_requests_jitter,
            ),
            pid_file,
            run_as: self.run_as(raw),
            allow_root: raw.allow_root.as_ref().is_some_and(|a| *a.get_ref()),
        }
    }

    /// `[server] user` and `group`, looked up on this machine.
    pub(super) fn run_as(&mut self, raw: &RawServer) -> Option<crate::privileges::RunAs> {
        let Some(user) = &raw.user else {
            if let Some(group) = &raw.group {
                self.problem(
                    Some(self.lines.line_of(group.span().start)),
                    "[server] group needs [server] user: name the user the workers run as".into(),
                );
            }
            return None;
        };
        let line = Some(self.lines.line_of(user.span().start));
        if let Some(allow) = raw.allow_root.as_ref().filter(|a| *a.get_ref()) {
            self.problem(
                Some(self.lines.line_of(allow.span().start)),
                "[server] allow_root = true and user are contradictory: with user, plugins never run as root; remove one".into(),
            );
        }
        let group = raw.group.as_ref().map(|g| g.get_ref().as_str());
        match crate::privileges::resolve(user.get_ref(), group) {
            Ok(run_as) => Some(run_as),
            Err(why) => {
                let line = match (&raw.group, why.contains("group")) {
                    (Some(group), true) => Some(self.lines.line_of(group.span().start)),
                    _ => line,
                };
                self.problem(line, format!("[server] {why}"));
                None
            }
        }
    }
}
