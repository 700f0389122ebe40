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

/// The callbacks a response is lent with, folded (XOR) into one word.
#[inline(always)]
fn callbacks_seal() -> usize {
    (sink_write as *const () as usize)
        ^ (sink_set_error as *const () as usize)
        ^ (sink_reserve as *const () as usize)
        ^ (sink_commit as *const () as usize)
        ^ (sink_grow as *const () as usize)
        ^ (sink_defer as *const () as usize)
}

/// The sink behind a response.
///
/// # Safety
/// `response` must be a [`RawResponse`] returned by [`ResponseSink::begin`]
/// whose sink is alive and has not moved.
unsafe fn sink<'s>(response: *mut RawResponse) -> &'s mut ResponseSink {
    // The sink is found from the response's own address (the response is
    // the first field of the `#[repr(C)]` sink), not from its `host` field,
    // which the plugin can overwrite.
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *response.cast::<ResponseSink>() }
}

/// The most bytes of a plugin's message that are read (longer ones are cut
/// anyway when logged): a wrong `len` then costs no huge copy.
const MAX_MESSAGE: usize = 1 << 20;

unsafe extern "C" fn sink_grow(response: *mut RawResponse, additional: usize) -> i32 {
    // SAFETY: plugins get responses made by `ResponseSink::begin` for the call.
    let sink = unsafe { sink(response) };
    sink.reserved = None;
    sink.absorb();
    let ok = sink.make_room(additional);
    sink.release();
    if ok {
        NBNET_OK
    } else {
        NBNET_ERR
    }
}

unsafe extern "C" fn sink_write(response: *mut RawResponse, data: *const u8, len: usize) -> i32 {
    // SAFETY: as in `sink_grow`.
    let sink = unsafe { sink(response) };
    // A write moves the end of the response (and may move the buffer): an
    // outstanding reservation is void.
    sink.reserved = None;
    if data.is_null() && len > 0 {
        sink.misuse
            .get_or_insert_with(|| format!("write(NULL, {len}): no bytes to append"));
        return NBNET_ERR;
    }
    sink.absorb();
    // Bytes from the response itself ("say it twice") must be found again
    // after `make_room`, which may move the buffer.
    let own = (data as usize)
        .checked_sub(sink.out.as_ptr() as usize)
        .filter(|&offset| {
            offset
                .checked_add(len)
                .is_some_and(|end| end <= sink.out.len())
        });
    let ok = sink.make_room(len);
    if ok && len > 0 {
        match own {
            Some(offset) => sink.out.extend_from_within(offset..offset + len),
            // SAFETY: the plugin passes `len` readable bytes at `data`, not
            // in the host's buffer (checked above), so still valid.
            None => sink
                .out
                .extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) }),
        }
    }
    sink.release();
    if ok {
        NBNET_OK
    } else {
        NBNET_ERR
    }
}

unsafe extern "C" fn sink_reserve(response: *mut RawResponse, len: usize) -> *mut u8 {
    // SAFETY: as in `sink_grow`.
    let sink = unsafe { sink(response) };
    sink.reserved = None;
    sink.absorb();
    let ok = sink.make_room(len);
    sink.release();
    if !ok {
        return std::ptr::null_mut();
    }
    let at = sink.raw.len;
    sink.reserved = Some((at, len));
    // SAFETY: `make_room` left room for `len` bytes after `len`, so
    // `data + at` is within the allocation. It stays valid while the Vec is
    // not touched; only calls on this response touch it, and each voids the
    // reservation (checked in `sink_commit`).
    unsafe { sink.raw.data.add(at) }
}

unsafe extern "C" fn sink_commit(response: *mut RawResponse, len: usize) -> i32 {
    // SAFETY: as in `sink_grow`.
    let sink = unsafe { sink(response) };
    match sink.reserved.take() {
        // Only the current reservation, with `len` unchanged since, and at
        // most its size.
        Some((at, room)) if at == sink.raw.len && len <= room => {
            // `at + len <= cap`: `reserve` made that room and nothing moved.
            sink.raw.len = at + len;
            NBNET_OK
        }
        _ => {
            sink.misuse.get_or_insert_with(|| {
                format!("commit({len}) without a matching reserve of at least that size (or after another call)")
            });
            NBNET_ERR
        }
    }
}

unsafe extern "C" fn sink_defer(response: *mut RawResponse) -> *mut RawDeferred {
    // SAFETY: as in `sink_grow`.
    let sink = unsafe { sink(response) };
    // Where this request's answer starts: after its prefix, at the
    // response's start (or, in a batch, at the current answer's start).
    let at = sink.payload_start + sink.answer_start();
    if sink.marks.last().is_some_and(|m| m.at == at) {
        sink.misuse
            .get_or_insert_with(|| "deferred the same request twice".into());
        return std::ptr::null_mut();
    }
    let Some(deferrer) = sink.deferrer else {
        sink.misuse.get_or_insert_with(|| {
            "deferred its answer, but this host cannot defer answers here".into()
        });
        return std::ptr::null_mut();
    };
    // SAFETY: `set_deferrer`'s caller keeps it valid while the sink is used.
    match unsafe { (*deferrer).defer() } {
        Ok((handle, token)) => {
            sink.marks.push(Mark { at, token });
            handle
        }
        Err(why) => {
            sink.misuse.get_or_insert(why);
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn sink_set_error(response: *mut RawResponse, msg: *const u8, len: usize) {
    // SAFETY: as in `sink_grow`.
    let sink = unsafe { sink(response) };
    sink.error = Some(if msg.is_null() || len == 0 {
        String::new()
    } else {
        // SAFETY: the plugin passes `len` readable bytes at `msg` (at most
        // MAX_MESSAGE of them are read).
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len.min(MAX_MESSAGE)) })
            .into_owned()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &[u8] = b"HEADER....";

    /// Runs `steps` against one response (max 16 payload bytes, after
    /// "earlier" already in the buffer and a 10-byte prefix) through the same
    /// fields and callbacks a plugin uses. Returns the buffer and the outcome.
    fn with_sink(
        rc: i32,
        steps: impl FnOnce(*mut RawResponse),
    ) -> (Vec<u8>, Result<usize, SinkError>) {
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        let mut sink = ResponseSink::new(b"earlier".to_vec(), 16, &conn);
        let response = sink.begin(HEADER, 4);
        steps(response);
        let result = sink.finish(rc, HEADER.len());
        (sink.into_buffer(), result)
    }

    // SAFETY (the tests below): `r` is a live response for the closure;
    // pointers from `reserve` and `data` are used within the room given.

    #[test]
    fn in_place_writes_within_cap_need_no_call() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            assert!((*r).cap >= 4, "the size hint is honoured");
            (*r).data.copy_from_nonoverlapping(b"abcd".as_ptr(), 4);
            (*r).len = 4;
        });
        assert_eq!(result, Ok(4));
        assert_eq!(out, b"earlierHEADER....abcd");
    }

    #[test]
    fn grow_keeps_what_was_written_and_stops_at_the_limit() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            (*r).data.copy_from_nonoverlapping(b"ab".as_ptr(), 2);
            (*r).len = 2;
            assert_eq!(((*r).grow)(r, 14), NBNET_OK);
            assert!((*r).cap - (*r).len >= 14);
            assert!((*r).cap <= 16, "cap never exceeds the limit");
            (*r).data.add(2).write_bytes(b'z', 14);
            (*r).len = 16;
        });
        assert_eq!(result, Ok(16));
        assert_eq!(&out[17..], b"abzzzzzzzzzzzzzz");
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            assert_eq!(((*r).grow)(r, 17), NBNET_ERR);
        });
        assert_eq!(result, Err(SinkError::TooLarge(None)));
        assert_eq!(
            out, b"earlier",
            "the failed response and its prefix are gone"
        );
    }

    #[test]
    fn len_past_cap_fails_the_request_and_exposes_nothing() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            (*r).len = (*r).cap + 1;
        });
        assert!(matches!(result, Err(SinkError::Misuse(m)) if m.contains("past its cap")));
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn callbacks_and_in_place_writes_mix() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            (*r).data.write(b'a');
            (*r).len += 1;
            assert_eq!(((*r).write)(r, b"bc".as_ptr(), 2), NBNET_OK);
            assert_eq!((*r).len, 3);
            (*r).data.add(3).write(b'd');
            (*r).len += 1;
        });
        assert_eq!(result, Ok(4));
        assert_eq!(&out[17..], b"abcd");
    }

    #[test]
    fn reserve_then_commit_appends_exactly_what_was_written() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            let p = ((*r).reserve)(r, 8);
            p.copy_from_nonoverlapping(b"abc".as_ptr(), 3);
            assert_eq!(((*r).commit)(r, 3), NBNET_OK);
        });
        assert_eq!(result, Ok(3));
        assert_eq!(&out[17..], b"abc");
    }

    #[test]
    fn a_write_between_reserve_and_commit_voids_the_reservation() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            let _ = ((*r).reserve)(r, 8);
            assert_eq!(((*r).write)(r, b"x".as_ptr(), 1), NBNET_OK);
            assert_eq!(((*r).commit)(r, 8), NBNET_ERR);
        });
        assert!(
            matches!(result, Err(SinkError::Misuse(m)) if m.contains("without a matching reserve"))
        );
        assert_eq!(out, b"earlier", "no uninitialized bytes exposed");
    }

    #[test]
    fn commit_beyond_the_reservation_or_twice_is_refused_and_the_limit_holds() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            let p = ((*r).reserve)(r, 4);
            p.write_bytes(b'y', 4);
            assert_eq!(((*r).commit)(r, 5), NBNET_ERR);
            assert_eq!(((*r).commit)(r, 4), NBNET_ERR, "the reservation is gone");
            assert!(((*r).reserve)(r, 17).is_null(), "over the limit");
        });
        assert!(matches!(result, Err(SinkError::Misuse(_))));
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn a_refused_write_is_remembered() {
        let (out, result) = with_sink(NBNET_OK, |r| unsafe {
            assert_eq!(((*r).write)(r, [0u8; 17].as_ptr(), 17), NBNET_ERR);
            assert_eq!(((*r).write)(r, b"ok".as_ptr(), 2), NBNET_OK);
        });
        assert_eq!(
            result,
            Err(SinkError::TooLarge(None)),
            "the request fails even though a later write fit"
        );
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn a_plugin_error_carries_its_message_and_the_sink_serves_the_next_response() {
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        let mut sink = ResponseSink::new(Vec::new(), 16, &conn);
        let r = sink.begin(b"H", 0);
        // SAFETY: `r` is live until `finish`.
        unsafe {
            assert_eq!(((*r).write)(r, b"partial".as_ptr(), 7), NBNET_OK);
            ((*r).set_error)(r, b"nope".as_ptr(), 4);
        }
        assert_eq!(
            sink.finish(NBNET_ERR, 1),
            Err(SinkError::Plugin(Some("nope".into())))
        );
        let r = sink.begin(b"H", 0);
        // SAFETY: as above.
        unsafe { assert_eq!(((*r).write)(r, b"ok".as_ptr(), 2), NBNET_OK) };
        assert_eq!(sink.finish(NBNET_OK, 1), Ok(2));
        assert_eq!(sink.buffer(), b"Hok");
    }

    /// A batch of `lens.len()` answers written as a plugin would (prefix
    /// skipped, answer bytes), then finished with `answered`.
    fn batch(
        answers: &[&[u8]],
        lens: &[usize],
        answered: usize,
        error: Option<&str>,
    ) -> (Vec<u8>, Result<usize, (usize, SinkError)>) {
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        let mut sink = ResponseSink::new(b"earlier".to_vec(), 16, &conn);
        let description = RawBatch {
            requests: std::ptr::null(),
            count: lens.len(),
            lens: std::ptr::null_mut(),
            prefix: 2,
            budget: usize::MAX,
            answer_start: 0,
            progress: std::ptr::null_mut(),
        };
        let mut description = description;
        let b: *mut RawBatch = &mut description;
        // SAFETY: `description` outlives the batch and is only used through
        // `b`; `r` is live until `finish_batch`; room is made first, and the
        // prefix room is filled, as the SDK does.
        unsafe {
            let r = sink.begin_batch(b, 2, 64);
            for answer in answers {
                let start = (*r).len + 2;
                std::ptr::addr_of_mut!((*b).answer_start).write(start);
                if ((*r).grow)(r, 2 + answer.len()) != NBNET_OK {
                    break;
                }
                (*r).data.add((*r).len).write_bytes(b'0', 2);
                (*r).len += 2;
                (*r).data
                    .add((*r).len)
                    .copy_from_nonoverlapping(answer.as_ptr(), answer.len());
                (*r).len += answer.len();
            }
            if let Some(message) = error {
                ((*r).set_error)(r, message.as_ptr(), message.len());
            }
        }
        let result = sink.finish_batch(answered, lens.len(), lens, |len| [b'<', b'0' + len as u8]);
        (sink.into_buffer(), result)
    }

    #[test]
    fn a_batch_gets_its_prefixes_written_before_each_answer() {
        let (out, result) = batch(&[b"ab", b"c"], &[2, 1], 2, None);
        assert_eq!(result, Ok(2));
        assert_eq!(out, b"earlier<2ab<1c");
    }

    #[test]
    fn a_batch_that_stops_early_keeps_what_it_answered() {
        let (out, result) = batch(&[b"ab"], &[2, 0, 0], 1, None);
        assert_eq!(result, Ok(1), "no error: the rest come in a later call");
        assert_eq!(out, b"earlier<2ab");
    }

    #[test]
    fn a_failed_request_mid_batch_keeps_the_answers_before_it() {
        let (out, result) = batch(&[b"ab", b"partial"], &[2, 0], 1, Some("nope"));
        assert_eq!(result, Err((1, SinkError::Plugin(Some("nope".into())))));
        assert_eq!(out, b"earlier<2ab", "the partial answer is dropped");
    }

    #[test]
    fn lengths_that_do_not_add_up_to_what_was_written_send_nothing() {
        let (out, result) = batch(&[b"ab"], &[2, 5], 2, None);
        assert!(matches!(result, Err((0, SinkError::Misuse(m))) if m.contains("add up")));
        assert_eq!(out, b"earlier", "nothing of a batch whose account is wrong");
        // Off by the prefix (lengths that include it): caught, not sent.
        let (out, result) = batch(&[b"ab", b"c"], &[4, 3], 2, None);
        assert!(matches!(result, Err((0, SinkError::Misuse(_)))));
        assert_eq!(out, b"earlier");
        // Lengths short of what was written: caught too.
        let (out, result) = batch(&[b"abc", b"d"], &[2, 1], 2, None);
        assert!(matches!(result, Err((0, SinkError::Misuse(_)))));
        assert_eq!(out, b"earlier");
        let (_, result) = batch(&[b"ab"], &[2], 3, None);
        assert!(matches!(result, Err((0, SinkError::Misuse(m))) if m.contains("returned 3")));
    }

    #[test]
    fn a_huge_length_is_refused_not_an_overflow() {
        let (out, result) = batch(&[b"ab"], &[usize::MAX], 1, None);
        assert!(matches!(result, Err((0, SinkError::TooLarge(None)))));
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn a_batch_that_answers_nothing_and_says_nothing_is_a_misuse() {
        let (out, result) = batch(&[], &[0, 0], 0, None);
        assert!(matches!(result, Err((0, SinkError::Misuse(m))) if m.contains("none")));
        assert_eq!(out, b"earlier");
    }

    #[test]
    fn a_plugin_that_changes_data_or_raises_cap_fails_and_nothing_is_sent() {
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        let mut sink = ResponseSink::new(b"earlier".to_vec(), 16, &conn);
        let r = sink.begin(HEADER, 4);
        // SAFETY: `r` is live until `finish`; only its fields are written.
        unsafe {
            (*r).cap = usize::MAX;
            (*r).len = 1 << 20;
        }
        let result = sink.finish(NBNET_OK, HEADER.len());
        assert!(
            matches!(&result, Err(SinkError::Misuse(m)) if m.contains("changed the response's cap")),
            "a raised cap does not lift the host's bound: {result:?}"
        );
        assert_eq!(sink.buffer(), b"earlier");
        // Pointing `data` at the plugin's own memory is caught too (the host
        // would otherwise send its own unwritten room as the answer).
        let mut elsewhere = [0u8; 8];
        let r = sink.begin(HEADER, 4);
        // SAFETY: as above.
        unsafe {
            (*r).data = elsewhere.as_mut_ptr();
            (*r).len = 2;
        }
        let result = sink.finish(NBNET_OK, HEADER.len());
        assert!(
            matches!(&result, Err(SinkError::Misuse(m)) if m.contains("changed the response's data"))
        );
        assert_eq!(sink.buffer(), b"earlier");
        // The next response is served normally.
        let r = sink.begin(HEADER, 4);
        // SAFETY: as above; within the room lent.
        unsafe { assert_eq!(((*r).write)(r, b"ok".as_ptr(), 2), NBNET_OK) };
        assert_eq!(sink.finish(NBNET_OK, HEADER.len()), Ok(2));
    }

    #[test]
    fn a_write_of_the_response_own_bytes_survives_the_buffer_moving() {
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
            flags: 0,
            tls_version: 0,
            tls_subject: std::ptr::null(),
            tls_sans: std::ptr::null(),
        };
        let mut sink = ResponseSink::new(Vec::new(), 1 << 20, &conn);
        let r = sink.begin(b"", 0);
        // SAFETY: `r` is live until `finish`; the writes copy from the
        // response's own bytes, which the host must find again.
        unsafe {
            assert_eq!(((*r).write)(r, b"abcd".as_ptr(), 4), NBNET_OK);
            for _ in 0..12 {
                let (data, len) = ((*r).data, (*r).len);
                assert_eq!(((*r).write)(r, data, len), NBNET_OK);
            }
        }
        assert_eq!(sink.finish(NBNET_OK, 0), Ok(4 << 12));
        assert!(sink.buffer().chunks(4).all(|c| c == b"abcd"));
    }

    #[test]
    fn each_answer_may_reach_the_limit_but_not_pass_it() {
        let full = [b'z'; 16];
        let (out, result) = batch(&[b"ab", &full], &[2, 16], 2, None);
        assert_eq!(result, Ok(2), "16 bytes after a prefix: exactly the limit");
        assert_eq!(&out[out.len() - 16..], &full);
        let (out, result) = batch(&[b"ab", &[b'z'; 17]], &[2, 17], 2, None);
        assert!(matches!(result, Err((1, SinkError::TooLarge(None)))));
        assert_eq!(out, b"earlier<2ab", "the answer before it is kept");
    }
}
