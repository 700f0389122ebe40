//! What the master answers on `[admin]`: `/metrics` (from a snapshot of
//! the scoreboard and the master's own counts) and `/healthz`.

use super::*;

impl Master {
    /// Answers an admin request: `GET /metrics` or `GET /healthz`.
    pub(super) fn answer_admin(&self, method: &str, path: &str) -> admin::Reply {
        let text = |status, body: &str| admin::Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        };
        if method != "GET" {
            return text(405, "only GET is served here\n");
        }
        match path {
            "/metrics" => admin::Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics::render(&self.snapshot()),
            },
            "/healthz" => {
                let ready = self
                    .workers
                    .values()
                    .any(|w| w.role != Role::Draining && self.scoreboard.slot(w.board).is_ready());
                match (self.phase, ready) {
                    (Phase::Serving, _) if self.lame_duck.is_some() => text(503, "draining\n"),
                    (Phase::Serving, true) => text(200, "ok\n"),
                    (Phase::Serving, false) => text(503, "no worker ready\n"),
                    (Phase::Stopping { .. }, _) => text(503, "stopping\n"),
                }
            }
            _ => text(404, "not found: try /metrics or /healthz\n"),
        }
    }

    /// The numbers `/metrics` shows, read from the scoreboard now.
    pub(super) fn snapshot(&self) -> metrics::Snapshot {
        let mut all = self.retired.clone();
        let mut slots = self.retired_slots.clone();
        for index in 0..self.slots.len() {
            slots.entry(index).or_default();
        }
        let mut workers: Vec<metrics::WorkerView> = self
            .workers
            .iter()
            .map(|(pid, worker)| {
                let mut totals = Totals::default();
                totals.add(
                    &self.scoreboard.slot(worker.board).stats,
                    &worker.plugins,
                    true,
                );
                all.merge(&totals);
                slots.entry(worker.index).or_default().merge(&totals);
                metrics::WorkerView {
                    index: worker.index,
                    pid: pid.as_raw(),
                    role: match worker.role {
                        Role::Serving => "serving",
                        Role::Outgoing => "outgoing",
                        Role::Draining => "draining",
                    },
                    process: metrics::ProcessStats::read(Some(pid.as_raw())),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.index, w.pid));
        metrics::Snapshot {
            workers,
            slots,
            all,
            restarts: self.restarts_total,
            last_exits: self.last_exits.clone(),
            exits: self.exits,
            timeouts: self.timeouts.clone(),
            log_lines_dropped: crate::logging::dropped_lines(),
            drain_kills: self.drain_kills,
            reloads: self.reloads.outcomes(),
            master: metrics::ProcessStats::read(None),
        }
    }
}
