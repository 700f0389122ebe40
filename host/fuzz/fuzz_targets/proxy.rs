//! Fuzz target: the PROXY protocol parser (`nbnet::proxy::parse`) on
//! arbitrary bytes: what a client (or a broken load balancer) can send first
//! on a listener with `proxy_protocol = true`.
//!
//! Input: the bytes as they arrive, nothing else (so the seeds in
//! `corpus/proxy/` are plain headers, valid, truncated or broken).
//!
//! Checked, for the input and every prefix of it (the parser is stateless,
//! so a prefix is what the connection has received so far):
//!
//! - `parse` never panics;
//! - it answers as bytes arrive: "need more" (`Ok(None)`) for a while, then
//!   either a header or an error, and never changes its mind: once a header
//!   of `n` bytes is complete, every longer buffer gives the very same header
//!   and `n` (bytes after the header are never looked at), and every shorter
//!   one is `Ok(None)`; once an error is reported, every longer buffer is an
//!   error too ("never guess": a connection once refused stays refused);
//! - a header is at most `MAX_HEADER_LEN` bytes, a v1 one at most
//!   `V1_MAX_LEN` and ends in CRLF, a v2 one is exactly 16 bytes plus its
//!   length field;
//! - the addresses it reports are the ones in the header: a v1 TCP4 line is
//!   exactly the line printed back from the result (IPv4 and ports have one
//!   spelling), a TCP6 line printed back parses to the same result, and a v2
//!   header's address block holds the reported addresses and ports in network
//!   byte order, with the family the header names;
//! - an error displays as one short line, names the version it was parsing,
//!   and `NotProxyProtocol` quotes only the first bytes received.

#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use nbnet::proxy::{parse, Proxied, ProxyError, MAX_HEADER_LEN, V1_MAX_LEN, V2_MAX_BLOCK};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// A header found at the front of `buf`, `n` bytes long, saying `proxied`:
/// checks it against the bytes.
fn check_header(buf: &[u8], proxied: &Proxied, n: usize) {
    assert!(
        n >= 1 && n <= buf.len(),
        "consumed {n} of {} bytes",
        buf.len()
    );
    assert!(n <= MAX_HEADER_LEN, "a header of {n} bytes");
    let header = &buf[..n];
    if header.starts_with(b"PROXY ") {
        assert!(n <= V1_MAX_LEN, "a v1 line of {n} bytes");
        assert!(header.ends_with(b"\r\n"), "a v1 line not ending in CRLF");
        assert!(
            !header[..n - 2].iter().any(|&b| b == b'\r' || b == b'\n'),
            "CR or LF inside a v1 line"
        );
        match proxied {
            Proxied::Local => assert!(header.starts_with(b"PROXY UNKNOWN")),
            Proxied::Tcp {
                source,
                destination,
            } => {
                let (s, d) = (source.ip(), destination.ip());
                assert_eq!(s.is_ipv4(), d.is_ipv4(), "mixed families in {header:?}");
                let protocol = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                let line = format!(
                    "PROXY {protocol} {s} {d} {} {}\r\n",
                    source.port(),
                    destination.port()
                );
                if s.is_ipv4() {
                    assert_eq!(
                        line.as_bytes(),
                        header,
                        "the v1 line is not the addresses it gave"
                    );
                } else {
                    // IPv6 has many spellings: the canonical one must say the same.
                    let again = parse(line.as_bytes());
                    assert_eq!(again, Ok(Some((proxied.clone(), line.len()))), "{line:?}");
                }
            }
        }
    } else {
        assert!(
            header.starts_with(V2_SIGNATURE),
            "neither v1 nor v2: {header:?}"
        );
        let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
        assert!(length <= V2_MAX_BLOCK);
        assert_eq!(n, 16 + length, "v2 consumed other than its length field");
        assert_eq!(header[12] >> 4, 2, "version");
        let block = &header[16..];
        match proxied {
            Proxied::Local => {}
            Proxied::Tcp {
                source,
                destination,
            } => {
                assert_eq!(header[12], 0x21, "addresses from a LOCAL header");
                let (s, d) = (source.ip(), destination.ip());
                let (family, size) = if s.is_ipv4() { (0x11, 4) } else { (0x21, 16) };
                assert_eq!(header[13], family, "addresses of another family");
                assert_eq!(s.is_ipv4(), d.is_ipv4(), "mixed families");
                let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                assert_eq!(octets(s), &block[..size]);
                assert_eq!(octets(d), &block[size..2 * size]);
                assert_eq!(source.port(), port(2 * size));
                assert_eq!(destination.port(), port(2 * size + 2));
            }
        }
    }
}

fn check_error(buf: &[u8], error: &ProxyError) {
    let text = error.to_string();
    assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
    // Bytes are quoted escaped and cut short: no message grows with the input.
    assert!(text.len() < 1024, "a message of {} bytes", text.len());
    assert!(text.is_ascii(), "{text:?}");
    match error {
        ProxyError::NotProxyProtocol { first_bytes } => {
            assert!(first_bytes.len() <= 16 && buf.starts_with(first_bytes));
            assert!(!buf.is_empty(), "an empty buffer refused");
        }
        ProxyError::BadV1(_) => {
            assert!(buf.starts_with(b"PROXY "));
            assert!(text.starts_with("PROXY v1: "), "{text:?}");
        }
        ProxyError::BadV2(_) => {
            assert!(buf.starts_with(V2_SIGNATURE));
            assert!(text.starts_with("PROXY v2: "), "{text:?}");
        }
        ProxyError::TooLong { version, length } => match version {
            1 => assert!(*length > V1_MAX_LEN && buf.starts_with(b"PROXY ")),
            2 => assert!(*length > MAX_HEADER_LEN && buf.starts_with(V2_SIGNATURE)),
            _ => panic!("TooLong of version {version}"),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    let mut header: Option<(Proxied, usize)> = None;
    let mut refused_at: Option<usize> = None;
    for k in 0..=data.len() {
        let got = parse(&data[..k]);
        match &got {
            Ok(None) => {
                assert!(header.is_none(), "a header of {header:?} gone at {k} bytes");
                assert!(
                    refused_at.is_none(),
                    "refused at {refused_at:?} bytes, not at {k}"
                );
            }
            Ok(Some((proxied, n))) => {
                assert!(
                    refused_at.is_none(),
                    "refused at {refused_at:?} bytes, a header at {k}"
                );
                match &header {
                    Some(first) => assert_eq!(
                        (proxied, n),
                        (&first.0, &first.1),
                        "another header with {k} bytes"
                    ),
                    None => {
                        // Complete exactly when its last byte arrives.
                        assert_eq!(*n, k, "a header of {n} bytes seen only at {k}");
                        check_header(&data[..k], proxied, *n);
                        header = Some((proxied.clone(), *n));
                    }
                }
            }
            Err(e) => {
                assert!(
                    header.is_none(),
                    "a header of {header:?}, then {e} at {k} bytes"
                );
                check_error(&data[..k], e);
                refused_at.get_or_insert(k);
            }
        }
        if k == data.len() {
            assert_eq!(got, full);
        }
    }
    // The header alone, followed by anything else, is the same header.
    if let Some((proxied, n)) = header {
        let mut other = data[..n].to_vec();
        other.extend_from_slice(b"0000000002hi");
        assert_eq!(parse(&other), Ok(Some((proxied, n))));
    }
});
