//! The worker's memory budget for connection buffers (`max_buffered_bytes`):
//! what its connections hold in partial requests and unsent answers, and
//! the shedding of the largest holders when they hold too much — Redis'
//! `maxmemory-clients` beside `client-query-buffer-limit`.

use std::time::Instant;

use super::conn::Close;
use super::reactor::{OverloadLog, Reactor};

/// A connection's buffers went from holding `before` bytes to `after`: the
/// worker's total (`buffered`) and count of holders follow.
#[inline]
pub(super) fn account(buffered: &mut usize, holders: &mut usize, before: usize, after: usize) {
    *buffered = buffered.saturating_sub(before) + after;
    match (before, after) {
        (0, 1..) => *holders += 1,
        (1.., 0) => *holders = holders.saturating_sub(1),
        _ => {}
    }
}

impl Reactor {
    /// The connections' buffers hold more than `max_buffered_bytes`
    /// together: closes the connections holding the most, largest first,
    /// until they hold no more than that. One connection alone is never
    /// closed for it (`max_frame_bytes` and `max_pending_output_bytes`
    /// bound its memory), so a lone large frame always gets through; next
    /// to others, the largest holder goes first.
    #[cold]
    #[inline(never)]
    pub(super) fn shed(&mut self, now: Instant) {
        let budget = self.limits.max_buffered_bytes;
        let before = self.buffered;
        let mut holders: Vec<(usize, usize)> = self
            .connections
            .iter()
            .map(|(key, conn)| (conn.buffered_bytes(), key))
            .filter(|&(held, _)| held > 0)
            .collect();
        debug_assert_eq!(
            holders.iter().map(|&(held, _)| held).sum::<usize>(),
            before,
            "buffered bytes accounting"
        );
        holders.sort_unstable_by(|a, b| b.cmp(a));
        let mut closed: Vec<(String, usize)> = Vec::new();
        for (left, &(held, key)) in (1..=holders.len()).rev().zip(&holders) {
            if self.buffered <= budget || left == 1 {
                break;
            }
            closed.push((self.connections[key].peer().to_string(), held));
            self.close(key, Close::OverBudget { held });
        }
        if closed.is_empty() {
            return;
        }
        self.slot
            .stats
            .buffer_budget_closes
            .add(closed.len() as u64);
        match self.shed_log.admit(now) {
            Some(suppressed) => {
                const NAMED: usize = 5;
                let mut named: Vec<String> = closed
                    .iter()
                    .take(NAMED)
                    .map(|(peer, held)| format!("{peer} ({held} bytes)"))
                    .collect();
                if closed.len() > NAMED {
                    named.push(format!("and {} more", closed.len() - NAMED));
                }
                tracing::warn!(
                    "this worker's connections held {before} bytes of unfinished requests and unsent responses, over max_buffered_bytes = {budget}: closed the {} holding the most: {}; raise max_buffered_bytes if legitimate clients send or receive that much at once{}",
                    closed.len(),
                    named.join(", "),
                    OverloadLog::since_last(suppressed)
                );
            }
            None => tracing::debug!(
                "over max_buffered_bytes again: closed {} connection(s)",
                closed.len()
            ),
        }
    }
}
