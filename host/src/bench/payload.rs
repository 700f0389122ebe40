//! Unique request payloads and their verification, without I/O.
//!
//! Every request carries its own identity, so a response can be checked
//! against the very request it answers (not just "some valid frame"):
//!
//! ```text
//! payload = ID[ID_LEN - p ..]  ++  FILL[seq % 26 .. seq % 26 + size - p]     p = min(size, ID_LEN)
//! ID      = connection id as 8 lowercase hex digits ++ sequence number as 16 lowercase hex digits
//! FILL    = "abcdefghijklmnopqrstuvwxyzabcd…" (lowercase, so `upper` changes every byte of it)
//! ```
//!
//! Payloads shorter than [`ID_LEN`] keep the low-order (fastest-changing)
//! digits of the id. The filler is precomputed once (and its upper-case copy),
//! so building and checking a 64 KiB payload is a `memcpy` and a `memcmp`:
//! the load generator must stay cheaper than the server it measures.

use crate::codec::{header, HEADER_LEN};

/// Bytes of the identity (connection id + sequence number) at the front of a payload.
pub const ID_LEN: usize = 24;

const ALPHABET: usize = 26;

/// What a correct response to a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The request itself.
    Echo,
    /// The request in ASCII upper case.
    Upper,
    /// Anything: only the framing is checked.
    None,
}

impl Expect {
    /// The value as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Expect::Echo => "echo",
            Expect::Upper => "upper",
            Expect::None => "none",
        }
    }
}

/// Builds and checks the payloads of one run (all of one size).
#[derive(Debug, Clone)]
pub struct Payloads {
    size: usize,
    /// Put before every payload (`--prefix`; answers then go unchecked).
    prefix: Vec<u8>,
    fill: Vec<u8>,
    fill_upper: Vec<u8>,
}

impl Payloads {
    /// Payloads of `size` bytes (at least 1: the protocol has no empty requests).
    pub fn new(size: usize) -> Self {
        assert!(size > 0, "payload size must be at least 1");
        let fill: Vec<u8> = (0..size + ALPHABET)
            .map(|i| b'a' + (i % ALPHABET) as u8)
            .collect();
        let fill_upper = fill.to_ascii_uppercase();
        Self {
            size,
            prefix: Vec::new(),
            fill,
            fill_upper,
        }
    }

    /// The same payloads with `prefix` before each.
    pub fn with_prefix(mut self, prefix: &[u8]) -> Self {
        self.prefix = prefix.to_vec();
        self
    }

    /// Request size in bytes (the prefix included).
    pub fn size(&self) -> usize {
        self.prefix.len() + self.size
    }

    /// Appends the complete request frame (header + payload) for `(conn, seq)` to `out`.
    pub fn encode_request(&self, conn: u32, seq: u64, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.size());
        out.extend_from_slice(&header(self.size()));
        out.extend_from_slice(&self.prefix);
        let id = identity(conn, seq);
        let p = self.size.min(ID_LEN);
        out.extend_from_slice(&id[ID_LEN - p..]);
        let off = (seq % ALPHABET as u64) as usize;
        out.extend_from_slice(&self.fill[off..off + self.size - p]);
    }

    /// The request payload for `(conn, seq)` (for tests and messages).
    pub fn request(&self, conn: u32, seq: u64) -> Vec<u8> {
        let mut frame = Vec::new();
        self.encode_request(conn, seq, &mut frame);
        frame.split_off(HEADER_LEN)
    }

    /// Whether `response` is the correct answer to request `(conn, seq)`.
    pub fn check(&self, expect: Expect, conn: u32, seq: u64, response: &[u8]) -> bool {
        let (id_ok, fill) = match expect {
            Expect::None => return true,
            Expect::Echo => (identity(conn, seq), &self.fill),
            Expect::Upper => {
                let mut id = identity(conn, seq);
                id.make_ascii_uppercase();
                (id, &self.fill_upper)
            }
        };
        if response.len() != self.size {
            return false;
        }
        let p = self.size.min(ID_LEN);
        let off = (seq % ALPHABET as u64) as usize;
        response[..p] == id_ok[ID_LEN - p..] && response[p..] == fill[off..off + self.size - p]
    }
}

/// The 24 lowercase hex digits identifying request `seq` of connection `conn`.
fn identity(conn: u32, seq: u64) -> [u8; ID_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; ID_LEN];
    let mut c = conn;
    for byte in id[..8].iter_mut().rev() {
        *byte = HEX[(c & 0xf) as usize];
        c >>= 4;
    }
    let mut s = seq;
    for byte in id[8..].iter_mut().rev() {
        *byte = HEX[(s & 0xf) as usize];
        s >>= 4;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoded, FrameDecoder};

    #[test]
    fn request_layout_is_id_then_rotating_lowercase_fill() {
        let p = Payloads::new(30);
        let req = p.request(0x1f, 27);
        assert_eq!(&req[..24], b"0000001f000000000000001b");
        assert_eq!(&req[24..], b"bcdefg"); // 27 % 26 = 1: starts at 'b'
    }

    #[test]
    fn encoded_frame_decodes_to_the_payload() {
        let p = Payloads::new(64);
        let mut out = b"junk".to_vec();
        p.encode_request(3, 9, &mut out);
        let frame = &out[4..];
        assert_eq!(
            FrameDecoder::new(1 << 20).decode(frame),
            Ok(Decoded::Frame { len: 64 })
        );
        assert_eq!(&frame[HEADER_LEN..], &p.request(3, 9)[..]);
    }

    #[test]
    fn payloads_are_unique_per_connection_and_sequence() {
        let p = Payloads::new(64);
        let mut seen = std::collections::HashSet::new();
        for conn in 0..20 {
            for seq in 0..200 {
                assert!(seen.insert(p.request(conn, seq)));
            }
        }
    }

    #[test]
    fn short_payloads_keep_the_low_order_digits() {
        let p = Payloads::new(4);
        assert_eq!(p.request(1, 0x1234), b"1234");
        assert_ne!(p.request(1, 1), p.request(1, 2));
    }

    #[test]
    fn echo_accepts_its_own_request_only() {
        for size in [1, 5, 24, 25, 64, 70_000] {
            let p = Payloads::new(size);
            let req = p.request(7, 100);
            assert!(p.check(Expect::Echo, 7, 100, &req), "size {size}");
            assert!(!p.check(Expect::Echo, 7, 101, &req), "size {size}");
            assert!(!p.check(Expect::Echo, 7, 100, &req[1..]), "size {size}");
            let mut corrupted = req.clone();
            *corrupted.last_mut().unwrap() ^= 1;
            assert!(!p.check(Expect::Echo, 7, 100, &corrupted), "size {size}");
        }
        let p = Payloads::new(64);
        assert!(!p.check(Expect::Echo, 8, 100, &p.request(7, 100)));
    }

    #[test]
    fn upper_wants_the_ascii_uppercase_request() {
        let p = Payloads::new(64);
        let req = p.request(0xab, 0xcdef);
        assert!(!p.check(Expect::Upper, 0xab, 0xcdef, &req));
        assert!(p.check(Expect::Upper, 0xab, 0xcdef, &req.to_ascii_uppercase()));
        assert!(!p.check(
            Expect::Upper,
            0xab,
            0xcdee,
            &p.request(0xab, 0xcdee).to_ascii_lowercase()
        ));
    }

    #[test]
    fn none_accepts_anything() {
        let p = Payloads::new(64);
        assert!(p.check(Expect::None, 0, 0, b""));
        assert!(p.check(Expect::None, 0, 0, b"whatever"));
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::*;

    #[test]
    fn a_prefix_goes_before_every_payload_and_counts_in_the_frame() {
        let payloads = Payloads::new(30).with_prefix(b"GET ");
        assert_eq!(payloads.size(), 34);
        let request = payloads.request(1, 2);
        assert!(request.starts_with(b"GET 00000001"), "{request:?}");
        assert_eq!(request.len(), 34);
        let mut frame = Vec::new();
        payloads.encode_request(1, 2, &mut frame);
        assert_eq!(&frame[..HEADER_LEN], &header(34));
        assert!(payloads.check(Expect::None, 1, 2, b"NOT_FOUND"));
    }
}
