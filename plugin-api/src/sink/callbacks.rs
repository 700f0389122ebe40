//! The `extern "C"` callbacks a plugin calls through a response (`grow`,
//! `write`, `reserve`, `commit`, `defer`, `set_error`): each finds the
//! [`ResponseSink`] behind the pointer and applies its rules.

use super::*;

/// The callbacks a response is lent with, folded (XOR) into one word.
#[inline(always)]
pub(super) fn callbacks_seal() -> usize {
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

pub(super) unsafe extern "C" fn sink_grow(response: *mut RawResponse, additional: usize) -> i32 {
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

pub(super) unsafe extern "C" fn sink_write(
    response: *mut RawResponse,
    data: *const u8,
    len: usize,
) -> i32 {
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

pub(super) unsafe extern "C" fn sink_reserve(response: *mut RawResponse, len: usize) -> *mut u8 {
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

pub(super) unsafe extern "C" fn sink_commit(response: *mut RawResponse, len: usize) -> i32 {
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

pub(super) unsafe extern "C" fn sink_defer(response: *mut RawResponse) -> *mut RawDeferred {
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

pub(super) unsafe extern "C" fn sink_set_error(
    response: *mut RawResponse,
    msg: *const u8,
    len: usize,
) {
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
