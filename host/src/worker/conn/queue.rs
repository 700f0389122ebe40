//! A connection's answers in request order once a request was deferred
//! (ABI 1.3): each deferred request holds a slot in the queue, answers to
//! later requests wait behind it, and the ready front goes out as soon as
//! it is complete (see the module doc of [`super`]).

use std::time::Instant;

use super::*;
use crate::worker::deferred::Holder;

impl Connection {
    /// Whether reading must pause for the deferred answers: as many as
    /// `max_deferred_per_connection` pending, or `max_pending_output_bytes`
    /// of answers queued behind them and requests a thread pool holds; or the worker hands its connections
    /// over and this one can move (see [`super::moving`]).
    #[inline]
    pub(super) fn must_wait(&self, ctx: &Context<'_>) -> bool {
        self.awaiting >= ctx.max_deferred
            || self.queued + self.pooled >= ctx.output_budget
            || (ctx.leaving && !self.is_tls())
            || matches!(self.queue.back(), Some(Answer::Failed(_)))
    }

    /// A deferred answer arrived (`Ok`: its response frame) or failed. Its
    /// slot is filled, the ready front of the queue is sent, and reading
    /// resumes if it was paused for the deferred answers. `Ok(progress)`
    /// as for the other events.
    pub fn on_completed(
        &mut self,
        token: u64,
        result: Result<Vec<u8>, String>,
        held: usize,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
    ) -> Result<bool, Close> {
        // The pool has let go of the request's copy.
        self.pooled = self.pooled.saturating_sub(held);
        let Some(at) = self
            .queue
            .iter()
            .position(|slot| matches!(slot, Answer::Awaiting(t) if *t == token))
        else {
            return Ok(false);
        };
        self.awaiting -= 1;
        match result {
            Ok(frame) => {
                self.queued += frame.len();
                self.queue[at] = Answer::Ready(frame);
            }
            Err(message) => {
                self.fail_at(at, crate::logging::untrusted(&message), ctx.deferred);
                if self.state == State::Reading {
                    self.transition(State::Waiting);
                }
            }
        }
        self.deliver(&ctx.slot.stats)?;
        if self.state == State::Waiting && !self.must_wait(ctx) {
            self.transition(State::Reading);
            // Frames held back, bytes that arrived meanwhile, or the EOF
            // of a peer that shut its side.
            let read_closed = self.peer_shut;
            self.on_readable(ctx, scratch, read_closed)?;
        }
        Ok(true)
    }

    /// The request of queue slot `at` failed (`message`, to log): the
    /// answers before it still go out once complete; none after it (their
    /// requests are cancelled): the connection closes when it reaches the
    /// front.
    pub(super) fn fail_at(&mut self, at: usize, message: String, deferred: &mut Deferreds) {
        for slot in self.queue.drain(at + 1..) {
            match slot {
                Answer::Awaiting(token) => deferred.cancel(token),
                Answer::Ready(bytes) => self.queued -= bytes.len(),
                Answer::Failed(_) => {}
            }
        }
        self.queue[at] = Answer::Failed(message);
        self.awaiting = self
            .queue
            .iter()
            .filter(|s| matches!(s, Answer::Awaiting(_)))
            .count();
    }

    /// Moves the ready front of the answer queue to the output and writes
    /// what the kernel takes (the rest waits for WRITABLE).
    pub(super) fn deliver(&mut self, stats: &Stats) -> Result<(), Close> {
        while let Some(Answer::Ready(_)) = self.queue.front() {
            let Some(Answer::Ready(bytes)) = self.queue.pop_front() else {
                break;
            };
            self.queued -= bytes.len();
            if self.output.is_empty() {
                self.output = bytes;
                self.written = 0;
            } else {
                self.output.extend_from_slice(&bytes);
            }
        }
        if let Some(Answer::Failed(_)) = self.queue.front() {
            // Every answer before the failed request is out (as far as
            // the kernel takes it without waiting): the connection ends.
            let _ = write_some(&mut self.stream, &self.output, &mut self.written, stats);
            let Some(Answer::Failed(message)) = self.queue.pop_front() else {
                unreachable!("checked just above");
            };
            return Err(Close::Plugin(Box::new(ProcessError::Plugin(message))));
        }
        if self.state == State::Writing || self.output.is_empty() {
            return Ok(());
        }
        if write_some(&mut self.stream, &self.output, &mut self.written, stats)? {
            self.output = Vec::new();
            self.written = 0;
        } else {
            self.transition(State::Writing);
        }
        Ok(())
    }

    /// After a read in which a plugin deferred (or while answers wait on
    /// earlier deferred ones): this read's answers join the queue in
    /// request order, each deferred request as a slot awaiting its
    /// completion; then the ready front is sent.
    #[cold]
    #[inline(never)]
    pub(super) fn queue_answers(
        &mut self,
        ctx: &mut Context<'_>,
        scratch: &mut Scratch,
    ) -> Result<(), Close> {
        let now = Instant::now();
        let buffer = scratch.responses.buffer();
        let mut from = 0;
        let mut misuse = None;
        let marks = scratch.responses.marks();
        for (i, mark) in marks.iter().enumerate() {
            // The deferred request's frame: a header saying 0 (an empty
            // answer) right before `at`.
            let header_at = mark.at.wrapping_sub(HEADER_LEN);
            if mark.at < HEADER_LEN
                || header_at < from
                || buffer.get(header_at..mark.at) != Some(&[b'0'; HEADER_LEN][..])
            {
                misuse.get_or_insert(
                    "wrote an answer to a request it deferred (defer, then answer only through the handle)",
                );
                // That request fails: the answers before it go out, then
                // the connection closes — nothing the plugin wrote for it
                // or for the requests after it is sent.
                ctx.deferred.forget(marks.len() - i);
                let end = if mark.at >= HEADER_LEN && header_at >= from {
                    header_at.min(buffer.len())
                } else {
                    from
                };
                if end > from {
                    self.queued += end - from;
                    self.queue
                        .push_back(Answer::Ready(buffer[from..end].to_vec()));
                }
                from = buffer.len();
                break;
            }
            if header_at > from {
                self.queued += header_at - from;
                self.queue
                    .push_back(Answer::Ready(buffer[from..header_at].to_vec()));
            }
            self.queue.push_back(Answer::Awaiting(mark.token));
            self.awaiting += 1;
            let held = crate::plugin::pool::take_copied(mark.token);
            self.pooled += held;
            let at = Holder {
                key: ctx.key,
                conn_id: self.id,
            };
            ctx.deferred
                .register(mark.token, at, ctx.plugin_index, now, held);
            from = mark.at;
        }
        if from < buffer.len() {
            self.queued += buffer.len() - from;
            self.queue.push_back(Answer::Ready(buffer[from..].to_vec()));
        }
        ctx.slot
            .stats
            .deferred
            .add(scratch.responses.deferred() as u64);
        scratch.responses.clear_marks();
        scratch.responses.buffer_mut().clear();
        crate::plugin::pool::forget_copied();
        if let Some(what) = misuse {
            let _ = self.deliver(&ctx.slot.stats);
            return Err(Close::Plugin(Box::new(ProcessError::Plugin(what.into()))));
        }
        self.deliver(&ctx.slot.stats)?;
        if self.state == State::Reading && self.must_wait(ctx) {
            self.transition(State::Waiting);
        }
        Ok(())
    }
}
