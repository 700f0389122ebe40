//! Renders the master's view of the server as Prometheus text exposition
//! (version 0.0.4). Pure: a [`Snapshot`] in, text out, so it is unit-tested
//! without sockets.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::scoreboard::{
    PluginTotals, Totals, LATENCY_BOUNDS_US, PROTOCOL_ERROR_KINDS, READ_TIMEOUT_STATES,
};

/// A metric family read from per-worker totals: name, type, help, value.
type WorkerFamily = (&'static str, &'static str, &'static str, fn(&Totals) -> u64);
/// A metric family read from per-plugin totals: name, help, value.
type PluginFamily = (&'static str, &'static str, fn(&PluginTotals) -> u64);

/// Why a slot's last worker exited: the fixed values of the `reason` label
/// (the sentence is in the log).
pub const EXIT_REASONS: [&str; 5] = [
    // It exited with a status code (a crash that called exit, or exit(0)
    // while serving).
    "exit_code",
    // A signal killed it (SIGSEGV, SIGABRT, SIGKILL from outside…).
    "signal",
    // The watchdog killed it: a plugin call hung past plugin_timeout
    // (or init_timeout while loading).
    "watchdog",
    // A plugin refused to load or init.
    "plugin_load_failed",
    // It died before it was ready, not in a plugin's init.
    "boot_failed",
];

/// How reloads ended: the `outcome` label of `nbnet_reloads_total`.
pub const RELOAD_OUTCOMES: [&str; 4] = ["done", "refused", "rolled_back", "cancelled"];

/// A process's resources, read from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// When it started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
}

impl ProcessStats {
    /// Reads `/proc/<pid>` (`/proc/self` for `None`); `None` when the
    /// process is gone or `/proc` cannot be read.
    pub fn read(pid: Option<i32>) -> Option<ProcessStats> {
        let dir = match pid {
            Some(pid) => format!("/proc/{pid}"),
            None => "/proc/self".to_string(),
        };
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        let statm = std::fs::read_to_string(format!("{dir}/statm")).ok()?;
        let open_fds = std::fs::read_dir(format!("{dir}/fd")).ok()?.count() as u64;
        // Field 22 of stat: start time in clock ticks after boot. Fields are
        // counted after the command name, which is in parentheses and may
        // hold spaces: the fields after its last ')' start at field 3.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let start_ticks: u64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
        let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        Some(ProcessStats {
            start_time_seconds: boot_time()? as f64 + start_ticks as f64 / ticks as f64,
            resident_memory_bytes: resident_pages * page as u64,
            open_fds,
        })
    }
}

/// The boot time, seconds since the Unix epoch (`btime` in `/proc/stat`).
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// One live worker, as the master sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    /// Pool slot (the `worker` label).
    pub index: usize,
    /// Process id (the `nbnet_worker_pid` gauge, never a label).
    pub pid: i32,
    /// "serving", "outgoing" or "draining".
    pub role: &'static str,
    /// Its resources, if `/proc` could be read.
    pub process: Option<ProcessStats>,
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Live workers.
    pub workers: Vec<WorkerView>,
    /// Per pool slot: the numbers of every worker that has had the slot,
    /// live and exited, so that a slot's counters never go backwards and
    /// the slots add up to the whole (gauges: its live workers only).
    pub slots: BTreeMap<usize, Totals>,
    /// Live and exited workers together, plus what the master counts
    /// itself (hand-overs it could not relay).
    pub all: Totals,
    /// Worker restarts since the master started.
    pub restarts: u64,
    /// The last exit of each slot's worker: (slot, one of [`EXIT_REASONS`]).
    pub last_exits: BTreeMap<usize, &'static str>,
    /// Worker exits by reason (indexes of [`EXIT_REASONS`]).
    pub exits: [u64; EXIT_REASONS.len()],
    /// Hung plugin calls killed by the watchdog, per plugin.
    pub timeouts: BTreeMap<String, u64>,
    /// Log lines the master and its workers could not write.
    pub log_lines_dropped: u64,
    /// Workers killed because they were still draining past
    /// `shutdown_timeout` and the grace period.
    pub drain_kills: u64,
    /// Reloads by outcome (indexes of [`RELOAD_OUTCOMES`]).
    pub reloads: [u64; RELOAD_OUTCOMES.len()],
    /// The master's own resources.
    pub master: Option<ProcessStats>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `/metrics` body. Every series the server knows of is there from
/// the start, at 0; no label holds a process id or a sentence, so the
/// number of series stays bounded (slots × fixed values).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8192);
    let all = &snapshot.all;

    family(
        &mut out,
        "nbnet_build_info",
        "gauge",
        "The nbnet version and the plugin ABI it loads (value is always 1).",
    );
    let _ = writeln!(
        out,
        "nbnet_build_info{{version=\"{}\",abi=\"{}.{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        nbnet_plugin_api::abi::ABI_MAJOR,
        nbnet_plugin_api::abi::ABI_MINOR
    );

    if let Some(master) = snapshot.master {
        for (name, kind, help, value) in [
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the master since the Unix epoch, in seconds.",
                master.start_time_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the master, in bytes.",
                master.resident_memory_bytes as f64,
            ),
            (
                "process_open_fds",
                "gauge",
                "File descriptors the master has open.",
                master.open_fds as f64,
            ),
        ] {
            family(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }

    family(
        &mut out,
        "nbnet_workers",
        "gauge",
        "Worker processes alive, by role.",
    );
    for role in ["serving", "outgoing", "draining"] {
        let count = snapshot.workers.iter().filter(|w| w.role == role).count();
        let _ = writeln!(out, "nbnet_workers{{role=\"{role}\"}} {count}");
    }
    // One series per (slot, role): should two workers share both (not
    // expected), the later one is shown.
    let mut live: BTreeMap<(usize, &str), &WorkerView> = BTreeMap::new();
    for worker in &snapshot.workers {
        live.insert((worker.index, worker.role), worker);
    }
    type Gauge = (&'static str, &'static str, fn(&WorkerView) -> Option<f64>);
    let gauges: [Gauge; 4] = [
        ("nbnet_worker_pid", "Process id of each live worker.", |w| {
            Some(f64::from(w.pid))
        }),
        (
            "nbnet_worker_start_time_seconds",
            "Start time of each live worker since the Unix epoch, in seconds.",
            |w| w.process.map(|p| p.start_time_seconds),
        ),
        (
            "nbnet_worker_resident_memory_bytes",
            "Resident memory of each live worker, in bytes.",
            |w| w.process.map(|p| p.resident_memory_bytes as f64),
        ),
        (
            "nbnet_worker_open_fds",
            "File descriptors each live worker has open.",
            |w| w.process.map(|p| p.open_fds as f64),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        for ((index, role), worker) in &live {
            if let Some(value) = value(worker) {
                let _ = writeln!(out, "{name}{{worker=\"{index}\",role=\"{role}\"}} {value}");
            }
        }
    }

    family(
        &mut out,
        "nbnet_worker_restarts_total",
        "counter",
        "Workers restarted after dying.",
    );
    let _ = writeln!(out, "nbnet_worker_restarts_total {}", snapshot.restarts);
    family(
        &mut out,
        "nbnet_worker_exits_total",
        "counter",
        "Serving workers that died, by reason (the log line says more).",
    );
    for (reason, count) in EXIT_REASONS.iter().zip(snapshot.exits) {
        let _ = writeln!(
            out,
            "nbnet_worker_exits_total{{reason=\"{reason}\"}} {count}"
        );
    }
    family(
        &mut out,
        "nbnet_worker_last_exit_info",
        "gauge",
        "Why each slot's last worker died (value is always 1).",
    );
    for (index, reason) in &snapshot.last_exits {
        let _ = writeln!(
            out,
            "nbnet_worker_last_exit_info{{worker=\"{index}\",reason=\"{reason}\"}} 1"
        );
    }
    family(
        &mut out,
        "nbnet_reloads_total",
        "counter",
        "Reloads (SIGHUP, nbnet reload) by outcome.",
    );
    for (outcome, count) in RELOAD_OUTCOMES.iter().zip(snapshot.reloads) {
        let _ = writeln!(out, "nbnet_reloads_total{{outcome=\"{outcome}\"}} {count}");
    }
    family(
        &mut out,
        "nbnet_log_lines_dropped_total",
        "counter",
        "Log lines the master and its workers could not write (log stream lost: closed pipe, hung-up terminal, full disk); the server kept running.",
    );
    let _ = writeln!(
        out,
        "nbnet_log_lines_dropped_total {}",
        snapshot.log_lines_dropped
    );
    family(
        &mut out,
        "nbnet_drain_kills_total",
        "counter",
        "Workers killed because they were still draining past shutdown_timeout plus the grace period.",
    );
    let _ = writeln!(out, "nbnet_drain_kills_total {}", snapshot.drain_kills);
    family(
        &mut out,
        "nbnet_handover_failures_total",
        "counter",
        "Connections closed at a frame boundary because they could not be handed over (by the worker or by the master relaying them).",
    );
    let _ = writeln!(
        out,
        "nbnet_handover_failures_total {}",
        all.handover_failures
    );

    let per_slot: [WorkerFamily; 14] = [
        (
            "nbnet_connections_open",
            "gauge",
            "Client connections open.",
            |t| t.connections_open,
        ),
        (
            "nbnet_connections_total",
            "counter",
            "Client connections accepted.",
            |t| t.connections_total,
        ),
        (
            "nbnet_received_bytes_total",
            "counter",
            "Request bytes received.",
            |t| t.bytes_in,
        ),
        (
            "nbnet_sent_bytes_total",
            "counter",
            "Response bytes sent.",
            |t| t.bytes_out,
        ),
        (
            "nbnet_buffer_budget_closes_total",
            "counter",
            "Connections closed because the worker's connections together held more than max_buffered_bytes (largest first).",
            |t| t.buffer_budget_closes,
        ),
        (
            "nbnet_max_connections_reached_total",
            "counter",
            "Times a worker stopped accepting because it held max_connections (new clients wait in the listen backlog until one closes).",
            |t| t.max_connections_reached,
        ),
        (
            "nbnet_connections_handed_over_total",
            "counter",
            "Open connections handed over to another worker when theirs was replaced (reload, recycling, SIGTTOU).",
            |t| t.connections_handed_over,
        ),
        (
            "nbnet_connections_adopted_total",
            "counter",
            "Open connections handed over to this slot's worker by one being replaced.",
            |t| t.connections_adopted,
        ),
        (
            "nbnet_access_refused_total",
            "counter",
            "Clients refused by a listener's allow/deny lists (closed before a request was read).",
            |t| t.access_refused,
        ),
        (
            "nbnet_deferred_total",
            "counter",
            "Requests a plugin deferred, to answer later (ABI 1.3).",
            |t| t.deferred,
        ),
        (
            "nbnet_deferred_timeouts_total",
            "counter",
            "Deferred requests not completed within deferred_timeout (connection closed).",
            |t| t.deferred_timeouts,
        ),
        (
            "nbnet_deferred_late_total",
            "counter",
            "Deferred completions that arrived after their connection had closed (nothing sent).",
            |t| t.deferred_late,
        ),
        (
            "nbnet_deferred_refused_total",
            "counter",
            "Deferred completions refused because the handle was completed already.",
            |t| t.deferred_refused,
        ),
        (
            "nbnet_requests_total",
            "counter",
            "Requests handled (answered or failed by a plugin).",
            |t| t.plugins.values().map(|p| p.requests).sum(),
        ),
    ];
    const BY_SLOT: &str = " By pool slot (`worker`), counting every worker the slot has had; Prometheus sums give the whole server.";
    for (name, kind, help, value) in per_slot {
        family(&mut out, name, kind, &format!("{help}{BY_SLOT}"));
        for (index, totals) in &snapshot.slots {
            let _ = writeln!(out, "{name}{{worker=\"{index}\"}} {}", value(totals));
        }
    }
    family(
        &mut out,
        "nbnet_protocol_errors_total",
        "counter",
        &format!(
            "Connections closed for breaking the framing (or PROXY) protocol, by kind.{BY_SLOT}"
        ),
    );
    for (index, totals) in &snapshot.slots {
        for (kind, count) in PROTOCOL_ERROR_KINDS.iter().zip(totals.protocol_errors) {
            let _ = writeln!(
                out,
                "nbnet_protocol_errors_total{{worker=\"{index}\",kind=\"{kind}\"}} {count}"
            );
        }
    }
    family(
        &mut out,
        "nbnet_read_timeouts_total",
        "counter",
        &format!(
            "Connections closed after read_timeout without progress, idle or mid-frame.{BY_SLOT}"
        ),
    );
    for (index, totals) in &snapshot.slots {
        for (state, count) in READ_TIMEOUT_STATES.iter().zip(totals.read_timeouts) {
            let _ = writeln!(
                out,
                "nbnet_read_timeouts_total{{worker=\"{index}\",state=\"{state}\"}} {count}"
            );
        }
    }

    write_tls(&mut out, &snapshot.slots, BY_SLOT);

    let per_plugin: [PluginFamily; 3] = [
        (
            "nbnet_plugin_requests_total",
            "Requests handled by the plugin (answered or failed).",
            |p| p.requests,
        ),
        (
            "nbnet_plugin_errors_total",
            "Requests the plugin failed (panics included).",
            |p| p.errors,
        ),
        (
            "nbnet_plugin_panics_total",
            "Rust panics caught in the plugin.",
            |p| p.panics,
        ),
    ];
    for (name, help, value) in per_plugin {
        family(&mut out, name, "counter", help);
        for (plugin, totals) in &all.plugins {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\"}} {}",
                label(plugin),
                value(totals)
            );
        }
    }
    family(
        &mut out,
        "nbnet_plugin_timeouts_total",
        "counter",
        "Plugin calls that hung past plugin_timeout (their worker was killed).",
    );
    for plugin in all.plugins.keys() {
        let count = snapshot.timeouts.get(plugin).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "nbnet_plugin_timeouts_total{{plugin=\"{}\"}} {count}",
            label(plugin)
        );
    }
    // Timeouts of a plugin no longer configured (after a reload).
    for (plugin, count) in &snapshot.timeouts {
        if !all.plugins.contains_key(plugin) {
            let _ = writeln!(
                out,
                "nbnet_plugin_timeouts_total{{plugin=\"{}\"}} {count}",
                label(plugin)
            );
        }
    }

    family(
        &mut out,
        "nbnet_plugin_latency_seconds",
        "histogram",
        "Time spent in the plugin per request.",
    );
    for (plugin, totals) in &all.plugins {
        let plugin = label(plugin);
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BOUNDS_US.iter().zip(&totals.buckets) {
            cumulative += count;
            let _ = writeln!(
                out,
                "nbnet_plugin_latency_seconds_bucket{{plugin=\"{plugin}\",le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        cumulative += totals.buckets.last().copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "nbnet_plugin_latency_seconds_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "nbnet_plugin_latency_seconds_sum{{plugin=\"{plugin}\"}} {}",
            totals.latency_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "nbnet_plugin_latency_seconds_count{{plugin=\"{plugin}\"}} {}",
            totals.requests
        );
    }
    out
}

/// The TLS families (see [`crate::tls::counters`]), per slot.
fn write_tls(out: &mut String, slots: &BTreeMap<usize, Totals>, by_slot: &str) {
    use crate::tls::counters::{FAILURES, FAILURE_REASONS, HANDOVER_CLOSES, HANDSHAKES, RESUMED};
    for (name, help, index) in [
        (
            "nbnet_tls_handshakes_total",
            "TLS handshakes completed (full or resumed).",
            HANDSHAKES,
        ),
        (
            "nbnet_tls_resumed_total",
            "TLS handshakes that resumed an earlier session (no certificate exchange).",
            RESUMED,
        ),
        (
            "nbnet_tls_handover_closes_total",
            "TLS connections closed at a frame boundary (with close_notify) when their worker was replaced: a TLS session cannot move to another process.",
            HANDOVER_CLOSES,
        ),
    ] {
        family(out, name, "counter", &format!("{help}{by_slot}"));
        for (slot, totals) in slots {
            let _ = writeln!(out, "{name}{{worker=\"{slot}\"}} {}", totals.tls[index]);
        }
    }
    family(
        out,
        "nbnet_tls_handshake_failures_total",
        "counter",
        &format!("TLS handshakes that failed, by reason: not_tls (plaintext on a TLS port), client_certificate (missing or refused), protocol, truncated (the client closed), incomplete (read_timeout or a worker stop).{by_slot}"),
    );
    for (slot, totals) in slots {
        for (k, reason) in FAILURE_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "nbnet_tls_handshake_failures_total{{worker=\"{slot}\",reason=\"{reason}\"}} {}",
                totals.tls[FAILURES + k]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut plugin = PluginTotals {
            requests: 3,
            errors: 1,
            panics: 1,
            latency_ns: 1_500_000,
            ..PluginTotals::default()
        };
        plugin.buckets[0] = 2;
        plugin.buckets[3] = 1;
        let mut all = Totals {
            connections_total: 4,
            ..Totals::default()
        };
        all.protocol_errors[2] = 1;
        all.plugins.insert("up\"per".to_string(), plugin);
        all.plugins
            .insert("idle".to_string(), PluginTotals::default());
        let mut slot1 = all.clone();
        slot1.connections_total = 1;
        let mut slot0 = all.clone();
        slot0.connections_total = 3;
        Snapshot {
            workers: vec![WorkerView {
                index: 0,
                pid: 42,
                role: "serving",
                process: Some(ProcessStats {
                    start_time_seconds: 1.5e9,
                    resident_memory_bytes: 4096,
                    open_fds: 9,
                }),
            }],
            slots: [(0, slot0), (1, slot1)].into(),
            all,
            restarts: 2,
            last_exits: [(0, "signal")].into(),
            exits: [0, 1, 0, 0, 0],
            timeouts: [("up\"per".to_string(), 1)].into(),
            log_lines_dropped: 7,
            drain_kills: 3,
            reloads: [1, 0, 2, 0],
            master: ProcessStats::read(None),
        }
    }

    #[test]
    fn renders_families_with_cumulative_buckets_and_escaped_labels() {
        let text = render(&snapshot());
        for line in [
            "nbnet_workers{role=\"serving\"} 1",
            "nbnet_worker_pid{worker=\"0\",role=\"serving\"} 42",
            "nbnet_worker_open_fds{worker=\"0\",role=\"serving\"} 9",
            "nbnet_worker_restarts_total 2",
            "nbnet_worker_exits_total{reason=\"signal\"} 1",
            "nbnet_worker_exits_total{reason=\"watchdog\"} 0",
            "nbnet_reloads_total{outcome=\"rolled_back\"} 2",
            "nbnet_reloads_total{outcome=\"refused\"} 0",
            "nbnet_log_lines_dropped_total 7",
            "nbnet_drain_kills_total 3",
            "nbnet_worker_last_exit_info{worker=\"0\",reason=\"signal\"} 1",
            "nbnet_connections_total{worker=\"0\"} 3",
            "nbnet_connections_total{worker=\"1\"} 1",
            "nbnet_protocol_errors_total{worker=\"1\",kind=\"too_long\"} 1",
            "nbnet_protocol_errors_total{worker=\"1\",kind=\"proxy_header\"} 0",
            "nbnet_read_timeouts_total{worker=\"0\",state=\"idle\"} 0",
            "nbnet_plugin_panics_total{plugin=\"up\\\"per\"} 1",
            "nbnet_plugin_timeouts_total{plugin=\"up\\\"per\"} 1",
            // Known before its first timeout.
            "nbnet_plugin_timeouts_total{plugin=\"idle\"} 0",
            "nbnet_plugin_latency_seconds_bucket{plugin=\"up\\\"per\",le=\"0.000005\"} 2",
            "nbnet_plugin_latency_seconds_bucket{plugin=\"up\\\"per\",le=\"0.00005\"} 3",
            "nbnet_plugin_latency_seconds_bucket{plugin=\"up\\\"per\",le=\"+Inf\"} 3",
            "nbnet_plugin_latency_seconds_count{plugin=\"up\\\"per\"} 3",
            "# TYPE nbnet_plugin_latency_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn no_series_is_an_aggregate_and_no_label_holds_a_pid_or_a_sentence() {
        let text = render(&snapshot());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(!line.contains("worker=\"all\""), "{line}");
            assert!(!line.contains("pid=\""), "{line}");
            assert!(
                !line.contains(' ') || line.matches(' ').count() == 1,
                "{line}"
            );
        }
        assert!(text.contains(&format!(
            "nbnet_build_info{{version=\"{}\",abi=\"",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn the_master_reads_its_own_process_numbers() {
        let stats = ProcessStats::read(None).expect("/proc/self");
        assert!(stats.open_fds >= 3, "{stats:?}");
        assert!(stats.resident_memory_bytes > 0, "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started within the last day, and not in the future (+ tick rounding).
        assert!(
            stats.start_time_seconds <= now + 1.0 && stats.start_time_seconds > now - 86_400.0,
            "{stats:?} vs {now}"
        );
        assert_eq!(ProcessStats::read(Some(i32::MAX)), None);
    }
}
