//! Renders the master's view of the server as Prometheus text exposition
//! (version 0.0.4). Pure: a [`Snapshot`] in, text out, so it is unit-tested
//! without sockets.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::scoreboard::{PluginTotals, Totals, LATENCY_BOUNDS_US};

/// A metric family read from per-worker totals: name, type, help, value.
type WorkerFamily = (&'static str, &'static str, &'static str, fn(&Totals) -> u64);
/// A metric family read from per-plugin totals: name, help, value.
type PluginFamily = (&'static str, &'static str, fn(&PluginTotals) -> u64);

/// One live worker, as the master sees it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    /// Pool slot (the `worker` label).
    pub index: usize,
    /// Process id.
    pub pid: i32,
    /// "serving", "outgoing" or "draining".
    pub role: &'static str,
    /// Its numbers since it started.
    pub totals: Totals,
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Live workers.
    pub workers: Vec<WorkerView>,
    /// Live and exited workers together, so totals never go backwards.
    pub all: Totals,
    /// Worker restarts since the master started.
    pub restarts: u64,
    /// The last exit of each slot's worker: (slot, reason).
    pub last_exits: BTreeMap<usize, String>,
    /// Hung plugin calls killed by the watchdog, per plugin.
    pub timeouts: BTreeMap<String, u64>,
    /// Log lines the master and its workers could not write.
    pub log_lines_dropped: u64,
    /// Workers killed because they were still draining past
    /// `shutdown_timeout` and the grace period.
    pub drain_kills: u64,
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

/// The `/metrics` body.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let all = &snapshot.all;

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
    family(
        &mut out,
        "nbnet_worker_restarts_total",
        "counter",
        "Workers restarted after dying.",
    );
    let _ = writeln!(out, "nbnet_worker_restarts_total {}", snapshot.restarts);
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
        "nbnet_worker_last_exit_info",
        "gauge",
        "Why each slot's last worker exited (value is always 1).",
    );
    for (index, reason) in &snapshot.last_exits {
        let _ = writeln!(
            out,
            "nbnet_worker_last_exit_info{{worker=\"{index}\",reason=\"{}\"}} 1",
            label(reason)
        );
    }

    let per_worker: [WorkerFamily; 14] = [
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
            "nbnet_bytes_received_total",
            "counter",
            "Request bytes received.",
            |t| t.bytes_in,
        ),
        (
            "nbnet_bytes_sent_total",
            "counter",
            "Response bytes sent.",
            |t| t.bytes_out,
        ),
        (
            "nbnet_protocol_errors_total",
            "counter",
            "Connections closed for breaking the framing protocol.",
            |t| t.protocol_errors,
        ),
        (
            "nbnet_buffer_budget_closes_total",
            "counter",
            "Connections closed because the worker's connections together held more than max_buffered_bytes (largest first).",
            |t| t.buffer_budget_closes,
        ),
        (
            "nbnet_connections_handed_over_total",
            "counter",
            "Open connections this worker handed over to another when it was replaced (reload, recycling, SIGTTOU).",
            |t| t.connections_handed_over,
        ),
        (
            "nbnet_connections_adopted_total",
            "counter",
            "Open connections handed over to this worker by one being replaced.",
            |t| t.connections_adopted,
        ),
        (
            "nbnet_handover_failures_total",
            "counter",
            "Connections closed at a frame boundary because they could not be handed over.",
            |t| t.handover_failures,
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
            "Requests handled (answered or failed by the plugin).",
            |t| t.plugins.values().map(|p| p.requests).sum(),
        ),
    ];
    for (name, kind, help, value) in per_worker {
        family(
            &mut out,
            name,
            kind,
            &format!("{help} Per live worker, and `worker=\"all\"` including exited workers."),
        );
        for worker in &snapshot.workers {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{}\",pid=\"{}\"}} {}",
                worker.index,
                worker.pid,
                value(&worker.totals)
            );
        }
        let _ = writeln!(out, "{name}{{worker=\"all\"}} {}", value(all));
    }

    let per_plugin: [PluginFamily; 3] = [
        (
            "nbnet_plugin_requests_total",
            "Requests handled by the plugin.",
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
    for (plugin, count) in &snapshot.timeouts {
        let _ = writeln!(
            out,
            "nbnet_plugin_timeouts_total{{plugin=\"{}\"}} {count}",
            label(plugin)
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_cumulative_buckets_and_escaped_labels() {
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
        all.plugins.insert("up\"per".to_string(), plugin);
        let snapshot = Snapshot {
            workers: vec![WorkerView {
                index: 0,
                pid: 42,
                role: "serving",
                totals: all.clone(),
            }],
            all,
            restarts: 2,
            last_exits: [(0, "killed by SIGSEGV".to_string())].into(),
            timeouts: [("upper".to_string(), 1)].into(),
            log_lines_dropped: 7,
            drain_kills: 3,
        };
        let text = render(&snapshot);
        for line in [
            "nbnet_workers{role=\"serving\"} 1",
            "nbnet_worker_restarts_total 2",
            "nbnet_log_lines_dropped_total 7",
            "nbnet_drain_kills_total 3",
            "nbnet_worker_last_exit_info{worker=\"0\",reason=\"killed by SIGSEGV\"} 1",
            "nbnet_connections_total{worker=\"0\",pid=\"42\"} 4",
            "nbnet_connections_total{worker=\"all\"} 4",
            "nbnet_requests_total{worker=\"all\"} 3",
            "nbnet_plugin_panics_total{plugin=\"up\\\"per\"} 1",
            "nbnet_plugin_timeouts_total{plugin=\"upper\"} 1",
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
}
