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

/// What one connection alone may hold past `max_buffered_bytes` without
/// being closed for it: two frames in and twice the output limit, the most
/// the inline path lets it hold.
pub(super) fn lone_allowance(limits: &super::reactor::Limits) -> usize {
    limits
        .max_pending_output_bytes
        .saturating_mul(2)
        .saturating_add(2 * (limits.max_frame_bytes + crate::codec::HEADER_LEN))
}

impl Reactor {
    /// After an event in which one connection's buffers grew to
    /// `held_after`: whether to [`Reactor::shed`] (the budget is passed,
    /// and not by one connection within its [`lone_allowance`]).
    #[inline]
    pub(super) fn must_shed(&self, held_after: usize) -> bool {
        self.buffered > self.limits.max_buffered_bytes
            && (self.holders > 1 || held_after > lone_allowance(&self.limits))
    }

    /// The connections' buffers hold more than `max_buffered_bytes`
    /// together: closes the connections holding the most, largest first,
    /// until they hold no more than that. The last connection holding
    /// anything is not closed for it while it holds no more than
    /// [`lone_allowance`] (what `max_frame_bytes` and
    /// `max_pending_output_bytes` let one connection hold on the inline
    /// path), so a lone large frame always gets through; next to others,
    /// the largest holder goes first. Past the allowance it is closed too:
    /// answers to deferred or pooled requests are not bounded by those two
    /// (up to `max_deferred_per_connection` answers of `max_frame_bytes`
    /// each), and a client asking for many large answers without reading
    /// them made a worker hold hundreds of MB.
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
            if self.buffered <= budget || (left == 1 && held <= lone_allowance(&self.limits)) {
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
