//! Fuzz target: the framing codec (`nbnet::codec`) on arbitrary bytes, with
//! an arbitrary `max_frame_bytes` and arbitrary split points.
//!
//! Input layout (so that seeds are easy to write by hand, see
//! `corpus/codec/`):
//!
//! - byte 0: selects `max_frame_bytes` ([`max_frame_bytes`]);
//! - byte 1: `k` = byte 1 % 16, the number of chunk sizes that follow;
//! - the next `k` bytes: sizes of the chunks pushed into a `FrameReader`
//!   (the rest of the stream is pushed last, in one chunk);
//! - everything after: the byte stream, as a client would send it.
//!
//! Checked, for every frame of the stream and every prefix of it:
//!
//! - `FrameDecoder::decode` never panics and agrees with a simple model
//!   written from the documented rules ([`model`]);
//! - `Frame { len }` implies `HEADER_LEN + len <= buf.len()` and
//!   `1 <= len <= max`; `Incomplete { total: Some(t) }` implies
//!   `t > buf.len()`; `Incomplete { total: None }` implies a short header;
//! - results are stable as bytes arrive: once an error is reported, every
//!   longer buffer reports the same error; a known total does not change;
//! - `encode` of each decoded payload gives back exactly the bytes it came
//!   from (headers are canonical);
//! - a `FrameReader` fed the stream in the given chunks yields the same
//!   payloads, then the same error (again on every later call, even after
//!   more bytes are pushed), or `None` when the stream ends mid-frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbnet::codec::{
    encode, Decoded, FrameDecoder, FrameError, FrameReader, HEADER_LEN, MAX_DECLARED,
};

/// Limits worth trying: every small one (0 included, which the config
/// refuses but the decoder must survive), and the large edges.
fn max_frame_bytes(selector: u8) -> usize {
    const LARGE: [usize; 8] = [
        16 * 1024 * 1024,
        MAX_DECLARED as usize,
        MAX_DECLARED as usize - 1,
        usize::MAX,
        usize::MAX - HEADER_LEN,
        u32::MAX as usize,
        1_000_000_000,
        999_999_999,
    ];
    match selector {
        0..=199 => usize::from(selector),
        200..=247 => 1 << (selector - 200 + 8).min(63),
        _ => LARGE[usize::from(selector - 248)],
    }
}

/// The documented rules, written as plainly as possible.
fn model(buf: &[u8], max: usize) -> Result<Decoded, FrameError> {
    let header = &buf[..buf.len().min(HEADER_LEN)];
    if let Some(position) = header.iter().position(|b| !b.is_ascii_digit()) {
        return Err(FrameError::NotADigit {
            position,
            byte: header[position],
        });
    }
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { total: None });
    }
    let declared: u64 = std::str::from_utf8(header).unwrap().parse().unwrap();
    if declared == 0 {
        return Err(FrameError::ZeroLength);
    }
    if u128::from(declared) > max as u128 {
        return Err(FrameError::TooLong { declared, max });
    }
    let total = HEADER_LEN as u128 + u128::from(declared);
    if buf.len() as u128 >= total {
        Ok(Decoded::Frame {
            len: declared as usize,
        })
    } else {
        Ok(Decoded::Incomplete {
            total: Some(usize::try_from(total).expect("a 64-bit target")),
        })
    }
}

/// Decodes `buf` and checks the result against the invariants and the model.
fn decode_checked(decoder: &FrameDecoder, buf: &[u8]) -> Result<Decoded, FrameError> {
    let max = decoder.max_frame_bytes();
    let got = decoder.decode(buf);
    match &got {
        Ok(Decoded::Frame { len }) => {
            assert!(
                HEADER_LEN + len <= buf.len(),
                "{got:?} does not fit in {} bytes",
                buf.len()
            );
            assert!(*len >= 1 && *len <= max, "{got:?} with max {max}");
        }
        Ok(Decoded::Incomplete { total: Some(t) }) => {
            assert!(*t > buf.len(), "{got:?} with {} bytes", buf.len());
            assert!(
                buf.len() >= HEADER_LEN,
                "{got:?} before the header is complete"
            );
            assert!(*t - HEADER_LEN <= max, "{got:?} with max {max}");
        }
        Ok(Decoded::Incomplete { total: None }) => {
            assert!(buf.len() < HEADER_LEN, "{got:?} with a complete header");
        }
        Err(FrameError::NotADigit { position, byte }) => {
            assert!(*position < HEADER_LEN && buf[*position] == *byte && !byte.is_ascii_digit());
        }
        Err(FrameError::ZeroLength) => assert!(buf.len() >= HEADER_LEN),
        Err(FrameError::TooLong { declared, max: m }) => {
            assert!(*m == max && *declared > max as u64 && *declared <= MAX_DECLARED);
        }
    }
    // Every error displays as one line of text.
    if let Err(e) = &got {
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
    }
    assert_eq!(
        got,
        model(buf, max),
        "decode disagrees with the model on {buf:?}"
    );
    got
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (chunk_count, rest) = match rest.split_first() {
        Some((&k, rest)) => (usize::from(k % 16).min(rest.len()), rest),
        None => (0, rest),
    };
    let (chunks, stream) = rest.split_at(chunk_count);
    let max = max_frame_bytes(selector);
    let decoder = FrameDecoder::new(max);
    assert_eq!(decoder.max_frame_bytes(), max);

    // Walk the stream frame by frame, as the reactor does, trying every
    // prefix of each frame: what a connection sees as the bytes arrive.
    let mut payloads: Vec<&[u8]> = Vec::new();
    let mut pos = 0;
    let end: Result<(), FrameError> = loop {
        let rest = &stream[pos..];
        let mut first_error: Option<FrameError> = None;
        let mut known_total: Option<usize> = None;
        let mut frame_len = None;
        for n in 0..=rest.len() {
            match decode_checked(&decoder, &rest[..n]) {
                Ok(Decoded::Frame { len }) => {
                    assert!(first_error.is_none(), "an error went away at {n} bytes");
                    assert_eq!(n, HEADER_LEN + len, "a frame was complete earlier");
                    frame_len = Some(len);
                    break;
                }
                Ok(Decoded::Incomplete { total }) => {
                    assert!(first_error.is_none(), "an error went away at {n} bytes");
                    if let Some(t) = known_total {
                        assert_eq!(total, Some(t), "the total changed at {n} bytes");
                    }
                    known_total = total;
                }
                Err(e) => match &first_error {
                    Some(first) => assert_eq!(&e, first, "the error changed at {n} bytes"),
                    None => first_error = Some(e),
                },
            }
        }
        // A frame is complete: the longest buffer must agree with its prefix.
        if let Some(len) = frame_len {
            assert_eq!(
                decode_checked(&decoder, rest),
                Ok(Decoded::Frame { len }),
                "more bytes after a complete frame changed the answer"
            );
            let payload = &rest[HEADER_LEN..HEADER_LEN + len];
            let mut encoded = Vec::new();
            encode(payload, &mut encoded);
            assert_eq!(
                &encoded[..],
                &rest[..HEADER_LEN + len],
                "encode does not round-trip"
            );
            payloads.push(payload);
            pos += HEADER_LEN + len;
            continue;
        }
        break match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        };
    };

    // The same stream through a FrameReader, in the fuzzer's chunks.
    let mut reader = FrameReader::new(max);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut error: Option<FrameError> = None;
    let mut at: usize = 0;
    let sizes = chunks.iter().map(|&c| usize::from(c)).chain([usize::MAX]);
    for size in sizes {
        let chunk = &stream[at..at.saturating_add(size).min(stream.len())];
        at += chunk.len();
        reader.push(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(payload)) => {
                    assert!(error.is_none(), "a frame after an error");
                    got.push(payload);
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some(first) = &error {
                        assert_eq!(&e, first, "the reader's error changed");
                    }
                    error = Some(e);
                    break;
                }
            }
        }
        if at == stream.len() {
            break;
        }
    }
    assert_eq!(
        got.len(),
        payloads.len(),
        "the reader yields another number of frames"
    );
    for (i, (g, p)) in got.iter().zip(&payloads).enumerate() {
        assert_eq!(&g[..], *p, "frame {i} differs");
    }
    match (end, error) {
        (Ok(()), None) => assert_eq!(reader.next_frame(), Ok(None)),
        (Err(want), Some(e)) => {
            assert_eq!(e, want, "the reader reports another error");
            // Poisoned: the same error for ever, whatever arrives.
            reader.push(b"0000000001x");
            assert_eq!(reader.next_frame(), Err(want.clone()));
            assert_eq!(reader.next_frame(), Err(want));
        }
        (end, error) => panic!("decoder walk ended with {end:?}, the reader with {error:?}"),
    }
});
