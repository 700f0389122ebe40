//! The host side of a response: the one implementation of the
//! [`RawResponse`] protocol (the in-place `data`/`len`/`cap` fields and the
//! `grow`, `write`, `reserve`, `commit` and `set_error` callbacks).
//!
//! The nbnet host and [`crate::testing::TestHost`] both use it, so a plugin's
//! unit tests see exactly the rules the server enforces: the size limit, a
//! refused write failing the request even if the plugin then returns
//! success, `reserve`/`commit` accepted only as a matched, uninterrupted
//! pair, and `len` never past `cap`.
//!
//! # How the in-place fields map onto the buffer
//!
//! Responses are appended to one `Vec<u8>` (the host's output for a whole
//! read). While a plugin runs, the Vec's length stays at the start of the
//! response's payload; `data` points there, `cap` is the Vec's spare
//! capacity (clamped to the limit), and the plugin's `len` bytes live in that
//! spare capacity. Every callback first *absorbs* them (extends the Vec's
//! length over them, so a reallocation carries them along), does its work
//! with ordinary `Vec` calls, then *releases* them again. [`ResponseSink::finish`]
//! absorbs for good.

use std::ffi::c_void;

use crate::abi::{RawBatch, RawConnection, RawDeferred, RawResponse, NBNET_ERR, NBNET_OK};

/// What makes completion handles for a sink's `defer` callback (ABI 1.3):
/// the nbnet worker's completion queue, or [`crate::testing::TestHost`]'s.
pub trait Deferrer {
    /// A handle for one more deferred request and the token its completion
    /// will carry, or why not (the request then fails).
    fn defer(&mut self) -> Result<(*mut RawDeferred, u64), String>;
}

mod callbacks;
use callbacks::*;

/// A request answered later: where its (empty) answer sits in the sink's
/// buffer, and the token its completion carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Offset in the buffer where the deferred request's answer starts
    /// (right after its prefix, whose length says 0).
    pub at: usize,
    /// The handle's token (see [`Deferrer::defer`]).
    pub token: u64,
}

/// Why a response failed; see [`ResponseSink::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// `process` returned an error; the plugin's message if it set one.
    Plugin(Option<String>),
    /// The plugin tried to go past the size limit (a refused `write`,
    /// `reserve` or `grow`); the plugin's message if it set one.
    TooLarge(Option<String>),
    /// The plugin broke the buffer protocol (a `commit` without its
    /// `reserve`, `len` past `cap`): what it did.
    Misuse(String),
}

/// Collects responses into a caller's buffer, one after the other, after
/// what is already in it. One sink serves any number of `process` calls
/// (each between [`begin`](Self::begin) and [`finish`](Self::finish)), so
/// its set-up is paid once per batch of requests, not once per request.
///
/// `#[repr(C)]` with the [`RawResponse`] first: the callbacks find the sink
/// from the response pointer they are given.
#[repr(C)]
#[derive(Debug)]
pub struct ResponseSink {
    raw: RawResponse,
    /// The responses so far: complete frames, and the one being written.
    out: Vec<u8>,
    /// Where the current response's payload starts in `out` (its length
    /// while the plugin runs).
    payload_start: usize,
    /// Largest payload accepted.
    max: usize,
    /// A write, reserve or grow was refused: the request fails.
    refused: bool,
    /// The buffer protocol was broken: the request fails with this.
    misuse: Option<String>,
    /// The plugin's explanation (`set_error`).
    error: Option<String>,
    /// The last `reserve`: `len` when it was made and the room it gave;
    /// cleared by `commit` and by every other call, which may move `data`.
    reserved: Option<(usize, usize)>,
    /// While a `process_batch` call runs: its batch, whose `answer_start`
    /// says where the answer under the size limit starts. Null otherwise.
    batch: *const RawBatch,
    /// The prefix size of the running batch (the host's own copy: the
    /// plugin can write to the batch).
    batch_prefix: usize,
    /// The window last lent to the plugin (`data`, `cap`), kept here
    /// because the plugin can write to the response's fields: the host
    /// trusts only its own copies.
    lent_data: *mut u8,
    lent_cap: usize,
    /// The connection the host lends, kept for the same reason: every
    /// host-owned field of the response is checked after each call and put
    /// back if a plugin changed it, so one plugin's stray write cannot reach
    /// the next call (of any plugin).
    conn: *const RawConnection,
    /// The callbacks and `conn` as lent, folded into one word (XOR): the
    /// check after each call is then a handful of instructions.
    seal: usize,
    /// The callbacks alone, folded (computed once).
    callbacks: usize,
    /// Makes completion handles for `defer`; null: deferring is refused.
    deferrer: Option<*mut dyn Deferrer>,
    /// The requests deferred since the last [`clear_marks`](Self::clear_marks),
    /// in order.
    marks: Vec<Mark>,
}

impl ResponseSink {
    /// A sink appending to `out`, each response at most `max` bytes, for
    /// requests that arrive on `conn` (see [`set_connection`](Self::set_connection)).
    ///
    /// A server keeps one sink (and its buffer) for good and clears the
    /// buffer once it is sent: setting up the callbacks is not paid per read.
    #[inline]
    pub fn new(out: Vec<u8>, max: usize, conn: *const RawConnection) -> Self {
        ResponseSink {
            raw: RawResponse {
                host: std::ptr::null_mut(),
                write: sink_write,
                set_error: sink_set_error,
                conn,
                reserve: sink_reserve,
                commit: sink_commit,
                data: std::ptr::null_mut(),
                len: 0,
                cap: 0,
                grow: sink_grow,
                defer: sink_defer,
            },
            payload_start: out.len(),
            out,
            max,
            refused: false,
            misuse: None,
            error: None,
            reserved: None,
            batch: std::ptr::null(),
            batch_prefix: 0,
            lent_data: std::ptr::null_mut(),
            lent_cap: 0,
            conn,
            seal: callbacks_seal() ^ conn as usize,
            callbacks: callbacks_seal(),
            deferrer: None,
            marks: Vec::new(),
        }
    }

    /// Lets plugins defer their answers (ABI 1.3): `deferrer` makes the
    /// handles. It must stay valid (and not move) while the sink is used.
    pub fn set_deferrer(&mut self, deferrer: *mut dyn Deferrer) {
        self.deferrer = Some(deferrer);
    }

    /// The requests deferred since the last [`clear_marks`](Self::clear_marks).
    #[inline]
    pub fn marks(&self) -> &[Mark] {
        &self.marks
    }

    /// How many requests were deferred since the last `clear_marks`.
    #[inline(always)]
    pub fn deferred(&self) -> usize {
        self.marks.len()
    }

    /// Forgets the marks (once the caller has taken them over).
    #[inline]
    pub fn clear_marks(&mut self) {
        self.marks.clear();
    }

    /// The connection the next requests come on: what plugins see as the
    /// response's `conn`. It must stay valid while they are answered.
    #[inline]
    pub fn set_connection(&mut self, conn: *const RawConnection) {
        self.raw.conn = conn;
        self.conn = conn;
        self.seal = self.callbacks ^ conn as usize;
    }

    /// Puts back every host-owned field of the response. The plugin can
    /// write to every field: a call that changed one is caught after it
    /// (see [`fields_intact`](Self::fields_intact)), and the fields are
    /// lent again as they should be, so a plugin that swapped `grow` or
    /// `write` cannot break the next call of any plugin of the worker.
    #[cold]
    fn lend_again(&mut self) {
        self.raw.host = (self as *mut ResponseSink).cast::<c_void>();
        self.raw.write = sink_write;
        self.raw.set_error = sink_set_error;
        self.raw.conn = self.conn;
        self.raw.reserve = sink_reserve;
        self.raw.commit = sink_commit;
        self.raw.grow = sink_grow;
        self.raw.defer = sink_defer;
    }

    /// Whether the plugin left the host's fields of the response alone
    /// (`data` and `cap` are checked by [`window_intact`](Self::window_intact)):
    /// the callbacks and `conn`, folded as [`seal`](Self::seal) was, and
    /// `host`. (A plugin could change two of them so that the fold still
    /// matches — deliberately; a hostile plugin can corrupt its process in
    /// any case. Every accidental change is caught.)
    #[inline(always)]
    fn fields_intact(&self) -> bool {
        let folded = (self.raw.write as usize)
            ^ (self.raw.set_error as usize)
            ^ (self.raw.reserve as usize)
            ^ (self.raw.commit as usize)
            ^ (self.raw.grow as usize)
            ^ (self.raw.defer as usize)
            ^ (self.raw.conn as usize);
        // Non-short-circuit `&`: two comparisons, one branch.
        (folded == self.seal)
            & (self.raw.host == (self as *const ResponseSink).cast_mut().cast::<c_void>())
    }

    /// Records which host field the plugin changed, as a misuse.
    #[cold]
    fn note_changed_fields(&mut self) {
        let changed = [
            (
                self.raw.host != (self as *const ResponseSink).cast_mut().cast::<c_void>(),
                "host",
            ),
            (
                self.raw.write as usize != sink_write as *const () as usize,
                "write",
            ),
            (
                self.raw.set_error as usize != sink_set_error as *const () as usize,
                "set_error",
            ),
            (self.raw.conn != self.conn, "conn"),
            (
                self.raw.reserve as usize != sink_reserve as *const () as usize,
                "reserve",
            ),
            (
                self.raw.commit as usize != sink_commit as *const () as usize,
                "commit",
            ),
            (
                self.raw.grow as usize != sink_grow as *const () as usize,
                "grow",
            ),
            (
                self.raw.defer as usize != sink_defer as *const () as usize,
                "defer",
            ),
        ];
        let names: Vec<&str> = changed.iter().filter(|c| c.0).map(|c| c.1).collect();
        if !names.is_empty() {
            self.misuse.get_or_insert_with(|| {
                format!(
                    "changed the response's {} (the host's fields: a plugin may only write data[len..cap] and advance len); restored for the next call",
                    names.join(", ")
                )
            });
            self.lend_again();
        }
    }

    /// The responses in the buffer (complete frames), outside a call.
    #[inline]
    pub fn buffer(&self) -> &[u8] {
        &self.out
    }

    /// The buffer itself, outside a call (e.g. to clear it once sent).
    #[inline]
    pub fn buffer_mut(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Gives the buffer back.
    pub fn into_buffer(self) -> Vec<u8> {
        self.out
    }

    /// Largest payload accepted per response.
    #[inline]
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes in the buffer (complete responses and prefixes), outside a call.
    #[inline]
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// Starts a response: appends `prefix` (the host's frame header, filled
    /// in later with [`finish`](Self::finish)'s result), makes room for about
    /// `size_hint` payload bytes, and returns the [`RawResponse`] to pass to
    /// `process`. Keep the sink where it is (don't move it) until `finish`.
    #[inline]
    pub fn begin(&mut self, prefix: &[u8], size_hint: usize) -> *mut RawResponse {
        self.out.reserve(prefix.len() + size_hint);
        self.out.extend_from_slice(prefix);
        self.payload_start = self.out.len();
        self.raw.host = (self as *mut ResponseSink).cast::<c_void>();
        self.raw.len = 0;
        self.batch = std::ptr::null();
        // (`refused` is false here: every end of a response takes it.)
        self.reserved = None;
        self.refresh();
        &mut self.raw
    }

    /// Starts the answers to `batch` (see [`RawBatch`]), whose answers are
    /// each preceded by `prefix` bytes: makes room for about `size_hint`
    /// bytes and returns the [`RawResponse`] to pass to `process_batch`.
    ///
    /// # Safety
    /// `batch` must stay valid (and not move) until
    /// [`finish_batch`](Self::finish_batch): the sink reads its
    /// `answer_start` during the plugin's calls. Pass the same raw pointer
    /// to the plugin (no `&mut` to it may be alive meanwhile). Keep the
    /// sink where it is too.
    #[inline]
    pub unsafe fn begin_batch(
        &mut self,
        batch: *const RawBatch,
        prefix: usize,
        size_hint: usize,
    ) -> *mut RawResponse {
        self.out.reserve(size_hint);
        self.payload_start = self.out.len();
        self.raw.host = (self as *mut ResponseSink).cast::<c_void>();
        self.raw.len = 0;
        self.batch = batch;
        self.batch_prefix = prefix;
        self.refused = false;
        self.reserved = None;
        self.refresh();
        &mut self.raw
    }

    /// Ends a batch that answered `answered` requests with the lengths in
    /// `lens`: writes `prefix(len)` before each answer and keeps the
    /// answers in the buffer. `Ok(answered)` when every answer is sound
    /// (`answered` may be short of the batch when the plugin stopped at
    /// its budget); `Err((answered_ok, why))` when request `answered_ok`
    /// failed or the plugin broke the protocol (the answers before it are
    /// kept).
    pub fn finish_batch<const P: usize>(
        &mut self,
        answered: usize,
        count: usize,
        lens: &[usize],
        mut prefix: impl FnMut(usize) -> [u8; P],
    ) -> Result<usize, (usize, SinkError)> {
        // The usual case, checked with the least work: every request
        // answered, nothing refused or reported, the window intact, and the
        // lengths adding up to exactly what was written.
        if answered == count
            && count > 0
            && answered <= lens.len()
            && self.window_intact()
            && self.fields_intact()
            && !self.refused
            && self.misuse.is_none()
            && self.error.is_none()
        {
            let written = self.raw.len;
            let mut end: usize = 0;
            let mut fits = true;
            // SAFETY: `payload_start <= capacity`: in bounds of the allocation.
            let base = unsafe { self.out.as_mut_ptr().add(self.payload_start) };
            for &len in &lens[..answered] {
                if len > self.max {
                    fits = false;
                    break;
                }
                // No overflow: `len <= max` (just checked) and
                // `end <= written`, both far below `usize::MAX`.
                let next = end + P + len;
                if next > written {
                    fits = false;
                    break;
                }
                let bytes = prefix(len);
                // SAFETY: `end + P <= next <= written <= lent_cap`: within the
                // allocation, in the room the plugin skipped for the prefix.
                unsafe { base.add(end).copy_from_nonoverlapping(bytes.as_ptr(), P) };
                end = next;
            }
            if fits && end == written {
                self.batch = std::ptr::null();
                // SAFETY: every byte up to `payload_start + written` is
                // initialized: the prefixes just now, the rest by the plugin.
                unsafe { self.out.set_len(self.payload_start + written) };
                return Ok(answered);
            }
            // Something is off: the careful path below sorts it out (the
            // prefixes written meanwhile are harmless: nothing past
            // `payload_start` is kept unless the account holds).
        }
        self.finish_batch_carefully(answered, count, lens, prefix)
    }

    #[cold]
    #[inline(never)]
    fn finish_batch_carefully<const P: usize>(
        &mut self,
        answered: usize,
        count: usize,
        lens: &[usize],
        mut prefix: impl FnMut(usize) -> [u8; P],
    ) -> Result<usize, (usize, SinkError)> {
        // Where the last answer began, by the plugin's account (read
        // before the batch is let go).
        let last_start = self.answer_start();
        self.batch = std::ptr::null();
        if !self.window_intact() {
            self.overrun();
        }
        self.note_changed_fields();
        let error = self.error.take();
        let refused_in_call = std::mem::take(&mut self.refused);
        if answered > count || answered > lens.len() {
            self.misuse.get_or_insert_with(|| {
                format!("process_batch returned {answered} for a batch of {count} requests")
            });
        } else if answered == 0 && error.is_none() && !refused_in_call {
            self.misuse.get_or_insert_with(|| {
                "process_batch answered none of its requests and gave no error (it must answer at least one)".into()
            });
        }
        let answered = answered.min(count).min(lens.len());
        let written = self.raw.len;
        // One pass over the plugin's account: each answer's prefix is
        // written as soon as the answer is known to lie within what was
        // written (harmless if the account then proves wrong: nothing past
        // `payload_start` is kept in that case).
        let mut end: usize = 0;
        let mut counted = 0;
        let mut over_limit = false;
        // SAFETY: `payload_start <= capacity`: in bounds of the allocation.
        let base = unsafe { self.out.as_mut_ptr().add(self.payload_start) };
        for &len in &lens[..answered] {
            if len > self.max {
                over_limit = true;
                break;
            }
            // No overflow: `len <= max` and `end <= written`, both far
            // below `usize::MAX`.
            let next = end + P + len;
            if next > written {
                break;
            }
            let bytes = prefix(len);
            // SAFETY: `end + P <= next <= written <= lent_cap`: the prefix
            // lies in the Vec's allocation, in the room the plugin skipped.
            unsafe { base.add(end).copy_from_nonoverlapping(bytes.as_ptr(), P) };
            end = next;
            counted += 1;
        }
        // The lengths must account for exactly the bytes written before
        // the failing answer (or all of them when nothing failed): else the
        // host would send bytes the plugin did not write as an answer.
        let failed = refused_in_call || error.is_some() && answered < count;
        let expected_end = if failed {
            last_start.saturating_sub(P).min(written)
        } else {
            written
        };
        let (kept, end) = if self.misuse.is_some() {
            (0, 0)
        } else if over_limit || counted == answered && end == expected_end {
            // All of them, or those before the one over the limit.
            (counted, end)
        } else {
            self.misuse = Some(format!(
                "process_batch's answer lengths (prefixes included) add up to more or less than the {expected_end} bytes it wrote"
            ));
            (0, 0)
        };
        // SAFETY: every byte up to `payload_start + end` is initialized:
        // the prefixes just now, the answers by the plugin (its contract;
        // the SDK fills each prefix room too, before the host does).
        unsafe { self.out.set_len(self.payload_start + end) };
        self.reserved = None;
        let failure = if let Some(misuse) = self.misuse.take() {
            Some(SinkError::Misuse(misuse))
        } else if over_limit || refused_in_call {
            Some(SinkError::TooLarge(error))
        } else if kept < count {
            // Stopped early: an error if it said so, else its budget.
            error.map(|message| SinkError::Plugin(Some(message)))
        } else {
            None
        };
        match failure {
            None => Ok(kept),
            Some(why) => Err((kept, why)),
        }
    }

    /// Ends the response begun by [`begin`](Self::begin), given what
    /// `process` returned: `Ok` with the payload length (the response is
    /// then in the buffer, its prefix at `buffered() - len - prefix.len()`),
    /// or why it failed (the response and its prefix are removed).
    #[inline(always)]
    pub fn finish(&mut self, rc: i32, prefix_len: usize) -> Result<usize, SinkError> {
        let len = self.raw.len;
        if rc == NBNET_OK
            && self.window_intact()
            && self.fields_intact()
            && !self.refused
            && self.misuse.is_none()
        {
            // SAFETY: `len <= cap` bytes after `payload_start` are within the
            // Vec's capacity, and the plugin initialized them (the contract
            // of the in-place fields, of `commit`, and of `write`).
            unsafe { self.out.set_len(self.payload_start + len) };
            self.error = None;
            return Ok(len);
        }
        Err(self.fail(rc, prefix_len))
    }

    #[cold]
    fn fail(&mut self, rc: i32, prefix_len: usize) -> SinkError {
        if !self.window_intact() {
            self.overrun();
        }
        self.note_changed_fields();
        self.out.truncate(self.payload_start - prefix_len);
        self.reserved = None;
        let error = self.error.take();
        if let Some(misuse) = self.misuse.take() {
            self.refused = false;
            return SinkError::Misuse(misuse);
        }
        if std::mem::take(&mut self.refused) {
            return SinkError::TooLarge(error);
        }
        debug_assert_ne!(rc, NBNET_OK);
        SinkError::Plugin(error)
    }

    /// Whether the response's window is as the host lent it, with `len`
    /// within it. The plugin may only advance `len`; `data` and `cap` are
    /// the host's.
    #[inline(always)]
    fn window_intact(&self) -> bool {
        // Non-short-circuit `&`: three comparisons, one branch.
        (self.raw.len <= self.lent_cap)
            & (self.raw.data == self.lent_data)
            & (self.raw.cap == self.lent_cap)
    }

    /// The window was broken (`len` past `cap`, or `data`/`cap` changed by
    /// the plugin): a plugin bug. What was written is dropped, and the
    /// window is lent again as it was.
    #[cold]
    fn overrun(&mut self) {
        self.misuse.get_or_insert_with(|| {
            if self.raw.data != self.lent_data {
                "changed the response's data (only len is the plugin's to change; call grow for more room)".to_string()
            } else if self.raw.cap != self.lent_cap {
                format!(
                    "changed the response's cap from {} to {} (only len is the plugin's to change; call grow for more room)",
                    self.lent_cap, self.raw.cap
                )
            } else {
                format!(
                    "set the response's len to {} past its cap of {} (write only into data[len..cap]; call grow for more room)",
                    self.raw.len, self.lent_cap
                )
            }
        });
        self.raw.len = 0;
        self.raw.data = self.lent_data;
        self.raw.cap = self.lent_cap;
    }

    /// [`finish`](Self::finish), then overwrites the response's prefix
    /// with `prefix(len)` now that the payload length is known.
    #[inline(always)]
    pub fn finish_with_prefix<const P: usize>(
        &mut self,
        rc: i32,
        prefix: impl FnOnce(usize) -> [u8; P],
    ) -> Result<usize, SinkError> {
        let len = self.finish(rc, P)?;
        let bytes = prefix(len);
        let at = self
            .payload_start
            .checked_sub(P)
            .expect("begin appended a prefix of this size");
        // SAFETY: `at + P == payload_start <= out.len()`: the bytes are
        // within the Vec (the prefix `begin` appended) and initialized.
        unsafe {
            self.out
                .as_mut_ptr()
                .add(at)
                .copy_from_nonoverlapping(bytes.as_ptr(), P)
        };
        Ok(len)
    }

    /// Payload bytes written so far (after [`absorb`](Self::absorb)).
    #[inline]
    fn written(&self) -> usize {
        self.out.len() - self.payload_start
    }

    /// Makes the plugin's in-place bytes part of the Vec (see the module doc).
    fn absorb(&mut self) {
        if !self.window_intact() {
            self.overrun();
        }
        // SAFETY: as in `finish`: `len <= lent_cap`, within capacity,
        // initialized by the plugin.
        unsafe { self.out.set_len(self.payload_start + self.raw.len) };
    }

    /// Hands the bytes back to the in-place fields (see the module doc).
    fn release(&mut self) {
        self.raw.len = self.written();
        // SAFETY: shrinking the length over initialized bytes.
        unsafe { self.out.set_len(self.payload_start) };
        self.refresh();
    }

    /// Points `data`/`cap` at the Vec's spare capacity, clamped to the limit.
    #[inline]
    fn refresh(&mut self) {
        let room = self.out.capacity() - self.payload_start;
        // SAFETY: `payload_start <= capacity`: in bounds of the allocation.
        self.lent_data = unsafe { self.out.as_mut_ptr().add(self.payload_start) };
        self.lent_cap = room.min(self.answer_start().saturating_add(self.max));
        self.raw.data = self.lent_data;
        self.raw.cap = self.lent_cap;
    }

    /// Where the answer the size limit applies to starts (0 outside a batch).
    #[inline]
    fn answer_start(&self) -> usize {
        if self.batch.is_null() {
            return 0;
        }
        // SAFETY: set by `begin_batch` to a batch alive until `finish_batch`.
        let start = unsafe { std::ptr::addr_of!((*self.batch).answer_start).read() };
        // The plugin sets it; it is never past the room for one more prefix
        // (a larger value would lift the size limit).
        start.min(self.raw.len.min(self.lent_cap) + self.batch_prefix)
    }

    /// Room for `additional` more payload bytes, within the limit.
    fn make_room(&mut self, additional: usize) -> bool {
        // The answer may end at most `max` bytes after it starts (in a
        // batch, room asked for the prefix before it does not count).
        let limit = self.answer_start().saturating_add(self.max);
        if self.written().saturating_add(additional) > limit
            || self.out.try_reserve(additional).is_err()
        {
            self.refused = true;
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests;
