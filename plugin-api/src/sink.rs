//! The host side of a response: the one implementation of the
//! [`RawResponse`] callbacks (`write`, `reserve`, `commit`, `set_error`).
//!
//! The nbnet host and [`crate::testing::TestHost`] both use it, so a plugin's
//! unit tests see exactly the rules the server enforces: the size limit, a
//! refused write failing the request even if the plugin then returns
//! success, and `reserve`/`commit` accepted only as a matched, uninterrupted
//! pair.

use std::ffi::c_void;

use crate::abi::{RawConnection, RawResponse, NBNET_ERR, NBNET_OK};

/// Collects one response into a caller's buffer, after what is already in it.
#[derive(Debug)]
pub struct ResponseSink<'a> {
    out: &'a mut Vec<u8>,
    /// Where this response's payload starts in `out`.
    payload_start: usize,
    /// Largest payload accepted.
    max: usize,
    /// A write, reserve or commit was refused: the request fails.
    refused: bool,
    /// The plugin's (or the sink's) explanation.
    error: Option<String>,
    /// The last `reserve`: where its room starts (the buffer's length then)
    /// and how many bytes; cleared by `commit` and by any `write` or
    /// `reserve`, which may move the buffer and invalidate the pointer.
    reserved: Option<(usize, usize)>,
}

impl<'a> ResponseSink<'a> {
    /// A sink appending at the end of `out`, accepting up to `max` bytes.
    #[inline]
    pub fn new(out: &'a mut Vec<u8>, max: usize) -> Self {
        ResponseSink {
            payload_start: out.len(),
            out,
            max,
            refused: false,
            error: None,
            reserved: None,
        }
    }

    /// The [`RawResponse`] to hand to a plugin's `process`. It points to this
    /// sink: keep the sink where it is (don't move it) until the call returns.
    #[inline]
    pub fn raw(&mut self, conn: *const RawConnection) -> RawResponse {
        RawResponse {
            host: (self as *mut ResponseSink<'a>).cast::<c_void>(),
            write: sink_write,
            set_error: sink_set_error,
            conn,
            reserve: sink_reserve,
            commit: sink_commit,
        }
    }

    /// Ends the response: whether anything was refused, and the error text.
    #[inline]
    pub fn finish(self) -> (bool, Option<String>) {
        (self.refused, self.error)
    }

    #[inline]
    fn written(&self) -> usize {
        self.out.len() - self.payload_start
    }
}

/// The sink behind a response.
///
/// # Safety
/// `response` must be a [`RawResponse`] made by [`ResponseSink::raw`] whose
/// sink is alive and has not moved.
unsafe fn sink<'s>(response: *mut RawResponse) -> &'s mut ResponseSink<'s> {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *(*response).host.cast::<ResponseSink<'s>>() }
}

unsafe extern "C" fn sink_write(response: *mut RawResponse, data: *const u8, len: usize) -> i32 {
    // SAFETY: plugins get responses made by `ResponseSink::raw` for the call.
    let sink = unsafe { sink(response) };
    // A write moves the end of the response (and may move the buffer): an
    // outstanding reservation is void.
    sink.reserved = None;
    if len > sink.max - sink.written() {
        sink.refused = true;
        return NBNET_ERR;
    }
    if len > 0 {
        // SAFETY: the plugin passes `len` readable bytes at `data`.
        sink.out
            .extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
    }
    NBNET_OK
}

unsafe extern "C" fn sink_reserve(response: *mut RawResponse, len: usize) -> *mut u8 {
    // SAFETY: as in `sink_write`.
    let sink = unsafe { sink(response) };
    sink.reserved = None;
    if len > sink.max - sink.written() {
        sink.refused = true;
        return std::ptr::null_mut();
    }
    sink.out.reserve(len);
    let at = sink.out.len();
    sink.reserved = Some((at, len));
    // SAFETY: `reserve` made room for `len` bytes after the current length.
    // The pointer stays valid while the Vec is not touched; `write`, another
    // `reserve` and `commit` are the only ways the plugin can touch it, and
    // each voids this reservation (checked in `sink_commit`).
    unsafe { sink.out.as_mut_ptr().add(at) }
}

unsafe extern "C" fn sink_commit(response: *mut RawResponse, len: usize) -> i32 {
    // SAFETY: as in `sink_write`.
    let sink = unsafe { sink(response) };
    match sink.reserved.take() {
        // Only the current reservation, unmoved, and at most its size.
        Some((at, room)) if at == sink.out.len() && len <= room => {
            // SAFETY: `at + len` is within the capacity reserved at `at` (the
            // buffer has not changed since), and the plugin initialized those
            // `len` bytes (the contract of `commit`).
            unsafe { sink.out.set_len(at + len) };
            NBNET_OK
        }
        _ => {
            sink.refused = true;
            sink.error.get_or_insert_with(|| {
                format!("commit({len}) without a matching reserve of at least that size (or after a write)")
            });
            NBNET_ERR
        }
    }
}

unsafe extern "C" fn sink_set_error(response: *mut RawResponse, msg: *const u8, len: usize) {
    // SAFETY: as in `sink_write`.
    let sink = unsafe { sink(response) };
    sink.error = Some(if msg.is_null() || len == 0 {
        String::new()
    } else {
        // SAFETY: the plugin passes `len` readable bytes at `msg`.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len) }).into_owned()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` against a sink (max 16 payload bytes, after 10 bytes
    /// already in the buffer) through the same callbacks a plugin uses.
    fn with_sink(steps: impl FnOnce(*mut RawResponse)) -> (Vec<u8>, bool, Option<String>) {
        let mut out = b"HEADER....".to_vec();
        let conn = RawConnection {
            id: 1,
            peer: c"p".as_ptr(),
            listener: c"l".as_ptr(),
        };
        let mut sink = ResponseSink::new(&mut out, 16);
        let mut response = sink.raw(&conn);
        steps(&mut response);
        let (refused, error) = sink.finish();
        (out, refused, error)
    }

    // SAFETY (the three tests below): `r` is a live response for the
    // closure; pointers from `reserve` are used within the room it returned.

    #[test]
    fn reserve_then_commit_appends_exactly_what_was_written() {
        let (out, refused, _) = with_sink(|r| unsafe {
            let p = ((*r).reserve)(r, 8);
            p.copy_from_nonoverlapping(b"abc".as_ptr(), 3);
            assert_eq!(((*r).commit)(r, 3), NBNET_OK);
        });
        assert!(!refused);
        assert_eq!(&out[10..], b"abc");
    }

    #[test]
    fn a_write_between_reserve_and_commit_voids_the_reservation() {
        let (out, refused, error) = with_sink(|r| unsafe {
            let _ = ((*r).reserve)(r, 8);
            assert_eq!(((*r).write)(r, b"x".as_ptr(), 1), NBNET_OK);
            assert_eq!(((*r).commit)(r, 8), NBNET_ERR);
        });
        assert!(refused);
        assert_eq!(&out[10..], b"x", "no uninitialized bytes exposed");
        assert!(error.unwrap().contains("without a matching reserve"));
    }

    #[test]
    fn commit_beyond_the_reservation_or_twice_is_refused_and_the_limit_holds() {
        let (out, refused, _) = with_sink(|r| unsafe {
            let p = ((*r).reserve)(r, 4);
            p.write_bytes(b'y', 4);
            assert_eq!(((*r).commit)(r, 5), NBNET_ERR);
            assert_eq!(((*r).commit)(r, 4), NBNET_ERR, "the reservation is gone");
            assert!(((*r).reserve)(r, 17).is_null(), "over the limit");
        });
        assert!(refused);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn a_refused_write_is_remembered() {
        let (out, refused, _) = with_sink(|r| unsafe {
            assert_eq!(((*r).write)(r, [0u8; 17].as_ptr(), 17), NBNET_ERR);
            assert_eq!(((*r).write)(r, b"ok".as_ptr(), 2), NBNET_OK);
        });
        assert!(refused, "the request fails even though a later write fit");
        assert_eq!(&out[10..], b"ok");
    }
}
