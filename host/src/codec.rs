//! Wire framing for nbnet: a 10-byte ASCII decimal length header, then the payload.
//!
//! Every message, in both directions, is `HEADER_LEN` ASCII digits (`'0'..='9'`),
//! zero-padded, giving the payload length, followed by exactly that many payload
//! bytes: `0000000002hi`. Clients pipeline, so one read may hold several frames
//! back to back, and a frame may be split anywhere across reads.
//!
//! # Why the decoder is pure
//! The reactor owns the bytes and does the I/O; [`FrameDecoder::decode`] only looks
//! at the front of a connection's unconsumed bytes and says what is there. That makes
//! it testable at every split point without sockets, and it never allocates: a
//! header may declare up to 9_999_999_999 bytes, and nothing here reserves the
//! declared size. [`FrameReader`] is a small owning wrapper for clients and tests.
//!
//! # Invariants
//! - A header byte that is not an ASCII digit is an error as soon as it is seen,
//!   reported with its position, even before the header is complete.
//! - A declared length of zero, or above `max_frame_bytes`, is an error as soon
//!   as the header is complete, whatever follows.
//! - Lengths are parsed into `u64` (ten digits always fit), so parsing never overflows.
//! - `Decoded::Frame { len }` implies `HEADER_LEN + len <= buf.len()`;
//!   `Decoded::Incomplete { total: Some(t) }` implies `t > buf.len()`.
//! - Encoding is for trusted host output: any payload of at most [`MAX_DECLARED`]
//!   bytes, including an empty one (header `0000000000`).

use std::fmt;

/// Length of the ASCII decimal header in front of every frame.
pub const HEADER_LEN: usize = 10;
/// Largest length a header can declare (ten nines).
pub const MAX_DECLARED: u64 = 9_999_999_999;

/// A protocol error in a frame header. The connection that sent it cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Byte `byte` at header position `position` (0-based) is not an ASCII digit.
    NotADigit { position: usize, byte: u8 },
    /// The header declares a zero-length payload.
    ZeroLength,
    /// The header declares `declared` bytes, above the configured `max`.
    TooLong { declared: u64, max: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotADigit { position, byte } => write!(
                f,
                "header byte {position} is 0x{byte:02x} ('{}'), not an ASCII digit",
                byte.escape_ascii()
            ),
            Self::ZeroLength => f.write_str("header declares a zero-length frame"),
            Self::TooLong { declared, max } => write!(
                f,
                "header declares {declared} bytes, above max_frame_bytes = {max}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// Its index in [`crate::scoreboard::PROTOCOL_ERROR_KINDS`] (the
    /// `kind` label of `nbnet_protocol_errors_total`).
    pub fn kind(&self) -> usize {
        match self {
            Self::NotADigit { .. } => 0,
            Self::ZeroLength => 1,
            Self::TooLong { .. } => 2,
        }
    }
}

/// Outcome of looking at the front of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A complete frame: its payload is `buf[HEADER_LEN .. HEADER_LEN + len]`, and
    /// `HEADER_LEN + len` bytes are consumed.
    Frame { len: usize },
    /// Not enough bytes yet. `total` is the buffer length (header + payload) needed for
    /// the frame to complete once the header is complete; `None` while it is not.
    Incomplete { total: Option<usize> },
}

/// Pure decoder configured with the maximum payload size. No I/O, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder that rejects frames declaring more than `max_frame_bytes` payload bytes.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    /// The configured maximum payload size.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Looks at the front of `buf` (unconsumed bytes of one connection's stream).
    ///
    /// A non-digit is rejected as soon as it is seen (even if the header is not complete
    /// yet); zero and over-limit lengths are rejected as soon as the header is complete,
    /// whatever follows.
    #[inline]
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        // Fast path: a whole header of ten digits, parsed eight at a time.
        if let Some(header) = buf.first_chunk::<HEADER_LEN>() {
            if let Some(declared) = parse_digits(header) {
                return self.judge(declared, buf.len());
            }
        }
        self.decode_bytewise(buf)
    }

    /// The complete, valid frame at the front of `buf`: its payload and the
    /// bytes after it, or `None` for anything else (an incomplete frame, or
    /// a bad header: ask [`decode`](Self::decode) which). The per-request
    /// fast path: no `Result` to build and match, one comparison per check,
    /// and no further bounds checks needed by the caller.
    #[inline(always)]
    pub fn split_frame<'b>(&self, buf: &'b [u8]) -> Option<(&'b [u8], &'b [u8])> {
        let (header, rest) = buf.split_first_chunk::<HEADER_LEN>()?;
        let len = usize::try_from(parse_digits(header)?).ok()?;
        // `len - 1 < max` is `0 < len <= max` in one comparison.
        if len.wrapping_sub(1) < self.max_frame_bytes && len <= rest.len() {
            Some(rest.split_at(len))
        } else {
            None
        }
    }

    /// The reference decoder: byte by byte, so that a bad byte is reported
    /// with its position and a partial header is judged as far as it goes.
    fn decode_bytewise(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let mut declared: u64 = 0;
        for (position, &byte) in buf.iter().take(HEADER_LEN).enumerate() {
            if !byte.is_ascii_digit() {
                return Err(FrameError::NotADigit { position, byte });
            }
            declared = declared * 10 + u64::from(byte - b'0');
        }
        if buf.len() < HEADER_LEN {
            return Ok(Decoded::Incomplete { total: None });
        }
        self.judge(declared, buf.len())
    }

    /// Given a complete header declaring `declared` bytes and `available`
    /// bytes in the buffer: a frame, an incomplete one, or an error.
    #[inline]
    fn judge(&self, declared: u64, available: usize) -> Result<Decoded, FrameError> {
        let max = self.max_frame_bytes;
        if declared == 0 {
            return Err(FrameError::ZeroLength);
        }
        // `declared <= max` means it fits in usize; only HEADER_LEN + len can
        // still overflow (on 32-bit).
        let total = match usize::try_from(declared) {
            Ok(len) if len <= max => len.checked_add(HEADER_LEN),
            _ => None,
        };
        let Some(total) = total else {
            return Err(FrameError::TooLong { declared, max });
        };
        Ok(if available >= total {
            Decoded::Frame {
                len: total - HEADER_LEN,
            }
        } else {
            Decoded::Incomplete { total: Some(total) }
        })
    }
}

/// Ten ASCII digits as a number, or `None` if any byte is not a digit.
///
/// The last eight are checked and combined at once inside a `u64` (the
/// "SWAR" trick), the first two inside a `u16`: this runs for every
/// request, and a byte-at-a-time loop costs several times the instructions.
#[inline]
fn parse_digits(header: &[u8; HEADER_LEN]) -> Option<u64> {
    let (top, low) = header.split_first_chunk::<2>()?;
    let low: &[u8; 8] = low.try_into().ok()?;
    // Every byte must be 0..=9: no high bits after subtracting '0', and no
    // carry into the high nibble when adding 6.
    let low = u64::from_le_bytes(*low).wrapping_sub(0x3030_3030_3030_3030);
    let top = u16::from_le_bytes(*top).wrapping_sub(0x3030);
    if (low | low.wrapping_add(0x0606_0606_0606_0606)) & 0xF0F0_F0F0_F0F0_F0F0 != 0
        || (top | top.wrapping_add(0x0606)) & 0xF0F0 != 0
    {
        return None;
    }
    // Combine neighbours: 8 digits -> 4 pairs -> 2 quads -> 1 number. The
    // first digit is the lowest byte (little-endian load), the most significant.
    let pairs = (low.wrapping_mul(10) + (low >> 8)) & 0x00FF_00FF_00FF_00FF;
    let quads = (pairs.wrapping_mul(100) + (pairs >> 16)) & 0x0000_FFFF_0000_FFFF;
    let low = (quads.wrapping_mul(10_000) + (quads >> 32)) & 0xFFFF_FFFF;
    if top == 0 {
        // "00…": under 100 MB, as nearly every frame is.
        return Some(low);
    }
    let top = u64::from(top & 0xFF) * 10 + u64::from(top >> 8);
    Some(top * 100_000_000 + low)
}

/// Appends one frame (header + payload) to `out`. The caller guarantees
/// `payload.len() <= MAX_DECLARED` (debug-asserted); an empty payload encodes as `0000000000`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(payload.len()));
    out.extend_from_slice(payload);
}

/// The 10-digit zero-padded header for `len` (see [`write_header`]).
#[inline]
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    write_header(len, &mut header);
    header
}

/// Writes the 10-digit zero-padded header for `len` into `dst`, without formatting
/// machinery or allocation. The caller guarantees `len <= MAX_DECLARED` (debug-asserted).
///
/// This runs once per response, so it avoids a digit loop: the low eight
/// digits are computed side by side inside one `u64` (the mirror of
/// [`parse_digits`]), the top two with one more division.
#[inline]
pub fn write_header(len: usize, dst: &mut [u8; HEADER_LEN]) {
    debug_assert!(
        len as u64 <= MAX_DECLARED,
        "frame length {len} exceeds MAX_DECLARED"
    );
    let n = len as u64;
    if n < 100 {
        // Small answers (an acknowledgement, a short value): eight zeros
        // and one digit pair.
        dst[..8].copy_from_slice(b"00000000");
        dst[8..].copy_from_slice(&DIGIT_PAIRS[n as usize]);
        return;
    }
    if n < 10_000 {
        // Most other frames: six zeros and two digit pairs from a table.
        let (high, low) = ((n / 100) as usize, (n % 100) as usize);
        dst[..6].copy_from_slice(b"000000");
        dst[6..8].copy_from_slice(&DIGIT_PAIRS[high]);
        dst[8..].copy_from_slice(&DIGIT_PAIRS[low]);
        return;
    }
    // Frames under 100 MB skip a 64-bit division.
    let (top, low) = if n < 100_000_000 {
        (0, n as u32)
    } else {
        ((n / 100_000_000) as u32, (n % 100_000_000) as u32)
    };
    let (high, rest) = dst.split_at_mut(2);
    high.copy_from_slice(&DIGIT_PAIRS[top as usize]);
    rest.copy_from_slice(&eight_digits(low));
}

/// "00", "01", … "99".
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut table = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        table[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    table
};

/// `x < 10^8` as eight ASCII digits, most significant first.
///
/// Splits into lanes inside a `u64` (little-endian: the first digit ends up
/// in the lowest byte): 4+4 digits in two 32-bit lanes, then 2+2 in 16-bit
/// lanes, then 1+1 in bytes. Division by 100 and 10 within a lane is a
/// multiply and shift that is exact for the lane's range (x < 10^4 and
/// x < 100), and no lane's product reaches into its neighbour.
#[inline]
fn eight_digits(x: u32) -> [u8; 8] {
    debug_assert!(x < 100_000_000);
    let quads = u64::from(x / 10_000) | (u64::from(x % 10_000) << 32);
    let over_100 = ((quads * 5243) >> 19) & 0x0000_007F_0000_007F;
    let pairs = over_100 | ((quads - over_100 * 100) << 16);
    let over_10 = ((pairs * 103) >> 10) & 0x000F_000F_000F_000F;
    let digits = over_10 | ((pairs - over_10 * 10) << 8);
    (digits | 0x3030_3030_3030_3030).to_le_bytes()
}

/// Incremental decoder that owns a buffer: push bytes in any split, pop complete payloads.
/// For streaming clients and tests; the host's reactor uses [`FrameDecoder`] on its own buffers.

#[derive(Debug)]
pub struct FrameReader {
    decoder: FrameDecoder,
    buf: Vec<u8>,
    start: usize,
    error: Option<FrameError>,
}

impl FrameReader {
    /// A reader that rejects frames declaring more than `max_frame_bytes` payload bytes.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            decoder: FrameDecoder::new(max_frame_bytes),
            buf: Vec::new(),
            start: 0,
            error: None,
        }
    }

    /// Appends received bytes, first dropping those already consumed. Ignored once poisoned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete payload (copied out), `None` if incomplete, `Err` on a protocol error
    /// (the reader is then poisoned and keeps returning the same error).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        match self.decoder.decode(&self.buf[self.start..]) {
            Ok(Decoded::Frame { len }) => {
                let from = self.start + HEADER_LEN;
                let payload = self.buf[from..from + len].to_vec();
                self.start = from + len;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(payload))
            }
            Ok(Decoded::Incomplete { .. }) => Ok(None),
            Err(err) => {
                self.error = Some(err.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB16: usize = 16 * 1024 * 1024;

    fn not_digit(position: usize, byte: u8) -> FrameError {
        FrameError::NotADigit { position, byte }
    }

    fn too_long(declared: u64, max: usize) -> FrameError {
        FrameError::TooLong { declared, max }
    }

    fn incomplete(total: Option<usize>) -> Result<Decoded, FrameError> {
        Ok(Decoded::Incomplete { total })
    }

    fn drain(reader: &mut FrameReader, into: &mut Vec<Vec<u8>>) {
        while let Some(p) = reader.next_frame().expect("valid stream") {
            into.push(p);
        }
    }

    fn stream_of(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        payloads.iter().for_each(|p| encode(p, &mut out));
        out
    }

    fn three() -> Vec<Vec<u8>> {
        vec![b"a".to_vec(), b"bc".to_vec(), b"hello, world".to_vec()]
    }

    #[test]
    fn a_two_byte_frame_round_trips_and_empty_payloads_encode_as_zeros() {
        let d = FrameDecoder::new(MIB16);
        assert_eq!(d.max_frame_bytes(), MIB16);
        assert_eq!(d.decode(b"0000000002hi"), Ok(Decoded::Frame { len: 2 }));
        let mut out = Vec::new();
        encode(b"HI", &mut out);
        assert_eq!(out, b"0000000002HI");
        encode(b"", &mut out);
        assert_eq!(out, b"0000000002HI0000000000");
        let mut r = FrameReader::new(MIB16);
        r.push(b"0000000002hi");
        assert_eq!(r.next_frame(), Ok(Some(b"hi".to_vec())));
        assert_eq!(r.next_frame(), Ok(None));
    }

    #[test]
    fn three_pipelined_frames_survive_every_two_chunk_split_and_one_byte_at_a_time() {
        let stream = stream_of(&three());
        for cut in 0..=stream.len() {
            let (mut r, mut got) = (FrameReader::new(64), Vec::new());
            for chunk in [&stream[..cut], &stream[cut..]] {
                r.push(chunk);
                drain(&mut r, &mut got);
            }
            assert_eq!(got, three(), "cut at {cut}");
        }
        let (mut r, mut got) = (FrameReader::new(64), Vec::new());
        for b in stream {
            r.push(&[b]);
            drain(&mut r, &mut got);
        }
        assert_eq!(got, three());
        assert!(r.buf.is_empty());
    }

    #[test]
    fn a_partial_header_is_incomplete_then_the_total_is_known_until_the_payload_arrives() {
        let d = FrameDecoder::new(MIB16);
        let frame = b"0000000005hello";
        for n in 0..HEADER_LEN {
            assert_eq!(d.decode(&frame[..n]), incomplete(None));
        }
        for n in HEADER_LEN..frame.len() {
            assert_eq!(d.decode(&frame[..n]), incomplete(Some(15)));
        }
        assert_eq!(d.decode(frame), Ok(Decoded::Frame { len: 5 }));
    }

    #[test]
    fn a_non_digit_is_rejected_at_the_first_bad_byte_before_the_header_completes() {
        let d = FrameDecoder::new(MIB16);
        let err = d.decode(b"00A").unwrap_err();
        assert_eq!(err, not_digit(2, b'A'));
        let msg = "header byte 2 is 0x41 ('A'), not an ASCII digit";
        assert_eq!(err.to_string(), msg);
        for byte in [b' ', b'+', b'-'] {
            assert_eq!(d.decode(&[byte, b'1']), Err(not_digit(0, byte)));
        }
        assert_eq!(d.decode(b"000000000xhi"), Err(not_digit(9, b'x')));
    }

    #[test]
    fn zero_and_over_limit_lengths_are_rejected_once_the_header_completes() {
        let d = FrameDecoder::new(5);
        assert_eq!(d.decode(b"0000000000"), Err(FrameError::ZeroLength));
        assert_eq!(d.decode(b"0000000005"), incomplete(Some(15)));
        assert_eq!(d.decode(b"0000000005hello"), Ok(Decoded::Frame { len: 5 }));
        assert_eq!(d.decode(b"0000000006"), Err(too_long(6, 5)));
        let huge = FrameDecoder::new(MIB16).decode(b"9999999999").unwrap_err();
        assert_eq!(huge, too_long(MAX_DECLARED, MIB16));
        let msg = "header declares 9999999999 bytes, above max_frame_bytes = 16777216";
        assert_eq!(huge.to_string(), msg);
    }

    #[test]
    fn a_poisoned_reader_keeps_returning_the_same_error() {
        let mut r = FrameReader::new(MIB16);
        r.push(b"0000000001x00?");
        assert_eq!(r.next_frame(), Ok(Some(b"x".to_vec())));
        assert_eq!(r.next_frame(), Err(not_digit(2, b'?')));
        r.push(b"0000000001y");
        assert_eq!(r.next_frame(), Err(not_digit(2, b'?')));
    }

    #[test]
    fn the_reader_buffer_stays_small_on_a_long_stream() {
        let mut r = FrameReader::new(64);
        let chunk = stream_of(&three());
        let (front, back) = chunk.split_at(chunk.len() - 3);
        for _ in 0..10_000 {
            // Each push leaves a partial frame behind, so the reader must compact.
            r.push(front);
            while r.next_frame().unwrap().is_some() {}
            r.push(back);
            while r.next_frame().unwrap().is_some() {}
        }
        assert!(r.buf.capacity() <= 4 * chunk.len());
    }

    #[test]
    fn write_header_pads_with_zeros() {
        let mut cases = vec![(1, "0000000001"), (9, "0000000009"), (10, "0000000010")];
        cases.push((12345, "0000012345"));
        #[cfg(target_pointer_width = "64")]
        cases.push((9_999_999_999, "9999999999"));
        for (len, want) in cases {
            let mut h = [0u8; HEADER_LEN];
            write_header(len, &mut h);
            assert_eq!(&h, want.as_bytes(), "len {len}");
        }
    }

    #[test]
    fn every_length_writes_and_parses_back() {
        for len in [
            1usize,
            9,
            10,
            99,
            100,
            12_345_678,
            99_999_999,
            100_000_000,
            9_999_999_999,
        ] {
            let mut header = [0u8; HEADER_LEN];
            write_header(len, &mut header);
            assert_eq!(parse_digits(&header), Some(len as u64), "{len}");
        }
        assert_eq!(parse_digits(b"00000000x1"), None);
        assert_eq!(parse_digits(b"0000000/01"), None);
        assert_eq!(parse_digits(b"000000000:"), None);
    }

    proptest! {
        #[test]
        fn the_header_writer_agrees_with_format(len in prop_oneof![
            0usize..100_000,
            0usize..=usize::try_from(MAX_DECLARED).unwrap_or(usize::MAX),
        ]) {
            let mut header = [0u8; HEADER_LEN];
            write_header(len, &mut header);
            let want = format!("{len:010}");
            prop_assert_eq!(&header[..], want.as_bytes());
        }

        #[test]
        fn split_frame_takes_exactly_the_valid_complete_frames(
            len in 0usize..40,
            extra in prop::collection::vec(any::<u8>(), 0..50),
            cut in any::<prop::sample::Index>(),
            max in prop_oneof![Just(usize::MAX), 0usize..45],
        ) {
            // A well-formed header (the random test above rarely makes one).
            let mut bytes = format!("{len:010}").into_bytes();
            bytes.extend_from_slice(&extra);
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            let decoder = FrameDecoder::new(max);
            match decoder.decode(bytes) {
                Ok(Decoded::Frame { len }) => {
                    let (payload, rest) = decoder.split_frame(bytes).expect("a complete frame");
                    prop_assert_eq!(payload, &bytes[HEADER_LEN..HEADER_LEN + len]);
                    prop_assert_eq!(rest, &bytes[HEADER_LEN + len..]);
                }
                _ => prop_assert_eq!(decoder.split_frame(bytes), None),
            }
        }

        #[test]
        fn the_complete_frame_fast_path_agrees_with_decode(
            bytes in prop::collection::vec(prop_oneof![4 => b'0'..=b'9', 1 => any::<u8>()], 0..40),
            max in prop_oneof![Just(usize::MAX), 0usize..30],
        ) {
            let decoder = FrameDecoder::new(max);
            let expected = match decoder.decode(&bytes) {
                Ok(Decoded::Frame { len }) => Some(len),
                _ => None,
            };
            prop_assert_eq!(decoder.split_frame(&bytes).map(|(payload, _)| payload.len()), expected);
        }

        #[test]
        fn the_fast_header_parser_agrees_with_the_bytewise_one(
            header in prop::collection::vec(prop_oneof![3 => b'0'..=b'9', 1 => any::<u8>()], 10..=14),
            max in prop_oneof![Just(usize::MAX), 1usize..100_000],
        ) {
            let decoder = FrameDecoder::new(max);
            prop_assert_eq!(decoder.decode(&header), decoder.decode_bytewise(&header));
        }

        #[test]
        fn random_payloads_cut_anywhere_come_back_in_order(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 1..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let stream = stream_of(&payloads);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.extend([0, stream.len()]);
            cuts.sort_unstable();
            let (mut r, mut got) = (FrameReader::new(300), Vec::new());
            for w in cuts.windows(2) {
                r.push(&stream[w[0]..w[1]]);
                drain(&mut r, &mut got);
            }
            prop_assert_eq!(got, payloads);
            prop_assert_eq!(r.next_frame(), Ok(None));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder_or_reader(
            bytes in prop::collection::vec(prop_oneof![b'0'..=b'9', any::<u8>()], 0..80),
            max in 0usize..64,
        ) {
            match FrameDecoder::new(max).decode(&bytes) {
                Ok(Decoded::Frame { len }) => prop_assert!(HEADER_LEN + len <= bytes.len()),
                Ok(Decoded::Incomplete { total: Some(t) }) => prop_assert!(t > bytes.len()),
                Ok(Decoded::Incomplete { total: None }) => prop_assert!(bytes.len() < HEADER_LEN),
                Err(_) => {}
            }
            let mut r = FrameReader::new(max);
            r.push(&bytes);
            while let Ok(Some(p)) = r.next_frame() {
                prop_assert!(!p.is_empty() && p.len() <= max);
            }
        }
    }
}
