use super::*;

const HEADER: &[u8] = b"HEADER....";

/// Runs `steps` against one response (max 16 payload bytes, after
/// "earlier" already in the buffer and a 10-byte prefix) through the same
/// fields and callbacks a plugin uses. Returns the buffer and the outcome.
fn with_sink(rc: i32, steps: impl FnOnce(*mut RawResponse)) -> (Vec<u8>, Result<usize, SinkError>) {
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
