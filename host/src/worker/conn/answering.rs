//! Answering the complete frames of one read: calling the plugin once per
//! frame, or once for all of them (`process_batch`) when the client
//! pipelines — the inner loop of [`super::Connection::on_readable`].

use std::ffi::CStr;
use std::time::Instant;

use super::*;
use crate::codec::HEADER_LEN;
use crate::plugin::{ProcessError, RawRequest, ResponseSink};
use crate::scoreboard::Outcome;

/// What answering frames needs besides the bytes and the response sink:
/// the connection's context, and its name for the debug log.
pub(super) struct Answering<'a, 'c> {
    pub(super) ctx: &'a mut Context<'c>,
    /// For the debug log only: converted to text only if that is enabled.
    pub(super) peer: &'a CStr,
    /// The connection's hint that its client pipelines.
    pub(super) pipelining: &'a mut bool,
    /// The payload length of the frame at which answering one by one
    /// stopped to batch the rest: already decoded, not decoded again.
    pub(super) decoded_first: Option<usize>,
    /// Requests this read may defer before answering stops (the
    /// connection's `max_deferred_per_connection` less those pending).
    pub(super) deferred_room: usize,
}

impl Answering<'_, '_> {
    /// Decodes and answers the complete frames at the front of `data`,
    /// appending each response frame to `out`. Returns the bytes consumed.
    #[inline(always)]
    pub(super) fn frames(
        &mut self,
        data: &[u8],
        sink: &mut ResponseSink,
        batch: &mut Batch,
    ) -> Result<usize, Close> {
        // A read holding one request (a client waiting for each answer)
        // goes through `process`: a batch of one would cost more than a
        // plain call. When more follows the first frame, and the plugin can
        // take them at once, they all go in one `process_batch` call.
        let batches = self.ctx.plugin.batches();
        if batches && *self.pipelining {
            return self.frames_in_one_call(data, None, sink, batch);
        }
        let answered = self.frames_one_by_one(data, sink, batches)?;
        if answered == data.len()
            || !batches
            || sink.buffered() >= self.ctx.output_budget
            || sink.deferred() >= self.deferred_room
        {
            return Ok(answered);
        }
        let first = self.decoded_first.take();
        Ok(answered + self.frames_in_one_call(&data[answered..], first, sink, batch)?)
    }

    /// For plugins with `process_batch`: decodes every complete frame,
    /// then hands them all to the plugin in one call, so the cost of
    /// crossing into the plugin is paid once per read, not per request.
    #[inline(never)]
    ///
    /// `first`: the payload length of the first frame, when the caller
    /// has decoded it already.
    fn frames_in_one_call(
        &mut self,
        data: &[u8],
        first: Option<usize>,
        sink: &mut ResponseSink,
        batch: &mut Batch,
    ) -> Result<usize, Close> {
        let stats = self.ctx.stats;
        let budget = self.ctx.output_budget.saturating_sub(sink.buffered());
        batch.requests.clear();
        let mut rest = data;
        let mut size_hint = 0;
        if let Some(len) = first.filter(|&len| HEADER_LEN + len <= data.len()) {
            let (payload, after) = data[HEADER_LEN..].split_at(len);
            size_hint += HEADER_LEN + len;
            batch.requests.push(RawRequest {
                data: payload.as_ptr(),
                len,
            });
            rest = after;
        }
        while let Some((payload, after)) = self.ctx.decoder.split_frame(rest) {
            size_hint += HEADER_LEN + payload.len();
            batch.requests.push(RawRequest {
                data: payload.as_ptr(),
                len: payload.len(),
            });
            rest = after;
        }
        let start = data.len() - rest.len();
        // Several requests in one read: the client pipelines (a single one
        // sends its next read through `process` again).
        *self.pipelining = batch.requests.len() > 1;
        // What stopped the loop: the end, a partial frame, or a bad header.
        let bad_header = match rest.is_empty() {
            true => None,
            false => self.ctx.decoder.decode(rest).err(),
        };
        if batch.requests.is_empty() {
            return match bad_header {
                Some(e) => Err(Close::Protocol(Box::new(e))),
                None => Ok(0),
            };
        }
        let began = self.ctx.time_plugin_calls.then(Instant::now);
        self.ctx.slot.enter(self.ctx.plugin_index);
        let result = self.ctx.plugin.process_batch(
            &batch.requests,
            &mut batch.lens,
            sink,
            size_hint,
            budget,
            self.ctx.slot.progress_counter(),
        );
        self.ctx.slot.leave();
        let (answered, failure) = match result {
            Ok(answered) => (answered, None),
            Err((answered, e)) => (answered, Some(e)),
        };
        *self.ctx.served += answered as u64;
        if let Some(stats) = stats {
            stats.record_answered(answered as u64);
            if let Some(began) = began {
                // One call, several requests: each gets an equal share.
                let handled = answered + usize::from(failure.is_some());
                stats.record_latency_shared(began.elapsed(), handled as u64);
            }
        }
        tracing::debug!(
            peer = ?self.peer,
            requests = batch.requests.len(),
            answered,
            "batch processed"
        );
        if let Some(e) = failure {
            if let Some(stats) = stats {
                stats.record_failure(outcome(&e));
            }
            return Err(Close::Plugin(Box::new(e)));
        }
        if answered < batch.requests.len() {
            // Stopped at the budget: the rest wait for the client to read.
            return Ok(self.start_of_request(data, first, answered));
        }
        match bad_header {
            Some(e) => Err(Close::Protocol(Box::new(e))),
            None => Ok(start),
        }
    }

    /// Where request `k` of a batch built from `data` (and `first`) starts,
    /// found again by decoding: the batch's request table is lent to the
    /// plugin, which could have written to it, so it is not read back.
    #[cold]
    fn start_of_request(&self, data: &[u8], first: Option<usize>, k: usize) -> usize {
        let mut rest = data;
        let mut skipped = 0;
        if let Some(len) = first.filter(|&len| HEADER_LEN + len <= data.len()) {
            if k == 0 {
                return 0;
            }
            rest = &data[HEADER_LEN + len..];
            skipped = 1;
        }
        while skipped < k {
            let Some((_, after)) = self.ctx.decoder.split_frame(rest) else {
                break;
            };
            rest = after;
            skipped += 1;
        }
        data.len() - rest.len()
    }

    /// Decodes and answers the complete frames at the front of `data`, one
    /// `process` call each, appending each response frame to `out`.
    /// Returns the bytes consumed.
    ///
    /// This loop runs once per request: it is kept to decoding, the plugin
    /// call and its scoreboard marks. Counting is done once per read.
    #[inline(always)]
    ///
    /// With `unless_more`, answers only a frame that ends the data: it
    /// stops before one with more bytes after it (the caller batches).
    fn frames_one_by_one(
        &mut self,
        data: &[u8],
        sink: &mut ResponseSink,
        unless_more: bool,
    ) -> Result<usize, Close> {
        let stats = self.ctx.stats;
        let mut rest = data;
        let mut answered = 0;
        let ended = loop {
            if rest.is_empty() || sink.buffered() >= self.ctx.output_budget {
                // All answered, or enough answers waiting: the client must
                // read those before the rest are answered.
                break Ok(());
            }
            let Some((payload, after)) = self.ctx.decoder.split_frame(rest) else {
                // Not a complete frame: a partial one (wait for more), or a
                // bad header. (`split_frame` takes every frame `decode`
                // accepts; the codec's tests check that they agree.)
                match self.ctx.decoder.decode(rest) {
                    Err(e) => break Err(Close::Protocol(Box::new(e))),
                    Ok(_) => break Ok(()),
                }
            };
            if unless_more && !after.is_empty() {
                self.decoded_first = Some(payload.len());
                break Ok(());
            }
            let len = payload.len();
            // Reading the clock twice costs about as much as the rest of a
            // small request: only when an admin listener can show the
            // latency histogram.
            let began = self.ctx.time_plugin_calls.then(Instant::now);
            self.ctx.slot.enter(self.ctx.plugin_index);
            let result = self.ctx.plugin.process(payload, sink);
            self.ctx.slot.leave();
            if let (Some(began), Some(stats)) = (began, stats) {
                stats.record_latency(began.elapsed());
            }
            let response = match result {
                Ok(response) => {
                    tracing::debug!(peer = ?self.peer, request = len, response, "frame processed");
                    response
                }
                Err(e) => {
                    if let Some(stats) = stats {
                        stats.record_failure(outcome(&e));
                    }
                    break Err(Close::Plugin(Box::new(e)));
                }
            };
            answered += 1;
            rest = after;
            // Enough deferred answers pending: they must complete before
            // the rest are answered. (Checked only after an empty answer,
            // which a deferred request leaves; the room is at least 1 when
            // a read starts, see `process_read`.)
            if response == 0 && sink.deferred() >= self.deferred_room {
                break Ok(());
            }
        };
        let start = data.len() - rest.len();
        *self.ctx.served += answered;
        if let Some(stats) = stats {
            stats.record_answered(answered);
        }
        ended.map(|()| start)
    }
}

/// Classifies a plugin call for the statistics. The Rust SDK reports a
/// caught panic as an error whose message starts with "panicked".
fn outcome(error: &ProcessError) -> Outcome {
    match error {
        ProcessError::Plugin(message) if message.starts_with("panicked") => Outcome::Panic,
        _ => Outcome::Error,
    }
}
