//! PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header a
//! load balancer puts in front of a TCP stream to say who the real client is.
//!
//! # The format
//! - **v1** is one ASCII line of at most [`V1_MAX_LEN`] bytes, CRLF included:
//!   `PROXY TCP4 <src ip> <dst ip> <src port> <dst port>\r\n` (or `TCP6`), fields
//!   separated by exactly one space, ports decimal without leading zeros, or
//!   `PROXY UNKNOWN<anything>\r\n`, where the rest of the line is ignored.
//! - **v2** is binary: a 12-byte signature (`\r\n\r\n\0\r\nQUIT\n`), a version/command
//!   byte (version 2; LOCAL or PROXY), a family/protocol byte, a big-endian length,
//!   then that many bytes: the addresses (12 for INET, 36 for INET6, 216 for UNIX)
//!   followed by TLVs, which are skipped. A length above [`V2_MAX_BLOCK`] is refused.
//!
//! The spec's rule is "never guess": the listener requires the header, so bytes that
//! cannot begin one (a plain nbnet frame, a lowercase `proxy`, a DGRAM header) are an
//! error as soon as they are seen, and the connection is closed.
//!
//! # Why the parser is pure
//! The connection state machine owns the bytes and does the I/O; [`parse`] only looks
//! at the front of a connection's received bytes and says what is there: not enough
//! yet, a complete header of `n` bytes, or an error. It keeps no state and never
//! reads past the header, so it gives the same answer at any split of the stream and
//! is tested at every split point without sockets.
//!
//! # Decisions
//! - v2 LOCAL ignores the family/protocol byte, as the spec says (health checks).
//! - v2 PROXY with UNSPEC family or UNSPEC protocol, or over UNIX, is [`Proxied::Local`];
//!   DGRAM is an error (this is a stream listener); TLVs are skipped unread.
//! - v2 lengths above [`V2_MAX_BLOCK`] are refused, so no header exceeds [`MAX_HEADER_LEN`].
//! - v1 lines are checked field by field as they arrive, so garbage is refused before
//!   the CRLF; a lone CR or LF is an error; ports and IPv4 octets take no leading zeros.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest v1 line, CRLF included (the spec's limit).
pub const V1_MAX_LEN: usize = 107;
/// Largest v2 length field accepted (addresses plus TLVs); above it is [`ProxyError::TooLong`].
pub const V2_MAX_BLOCK: usize = 4096;
/// Longest header this parser accepts (for bounding the read buffer).
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_BLOCK;

const V1_PREFIX: &[u8] = b"PROXY ";
const V1_PROTOCOLS: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
const V1_NAMES: [&str; 4] = [
    "source address",
    "destination address",
    "source port",
    "destination port",
];
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED_LEN: usize = 16;
const SHOWN_BYTES: usize = 16;

/// What the header said about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxied {
    /// A proxied connection: the real client (`source`) and the address it connected to (`destination`).
    Tcp {
        /// The real client's address.
        source: SocketAddr,
        /// The address the client connected to (the proxy's listener).
        destination: SocketAddr,
    },
    /// LOCAL (v2), UNKNOWN (v1), or an address family nbnet does not use (UNSPEC/UNIX): use the connection's own addresses.
    Local,
}

/// Why the front of a connection is not a valid PROXY header. The connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes are a prefix of neither the v1 nor the v2 form.
    NotProxyProtocol {
        /// Up to the first 16 bytes received, for the log line.
        first_bytes: Vec<u8>,
    },
    /// A malformed v1 line; the message says which part.
    BadV1(String),
    /// A malformed v2 header; the message says which part.
    BadV2(String),
    /// The header would be longer than this parser accepts for its version
    /// ([`V1_MAX_LEN`] for v1, [`MAX_HEADER_LEN`] for v2).
    TooLong {
        /// Protocol version, 1 or 2.
        version: u8,
        /// Bytes the header needs, at least.
        length: usize,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProxyProtocol { first_bytes } => {
                let start = show(first_bytes);
                write!(f, "not a PROXY protocol header (starts with {start})")
            }
            Self::BadV1(message) => write!(f, "PROXY v1: {message}"),
            Self::BadV2(message) => write!(f, "PROXY v2: {message}"),
            Self::TooLong { version, length } => {
                let limit = if *version == 1 {
                    V1_MAX_LEN
                } else {
                    MAX_HEADER_LEN
                };
                write!(
                    f,
                    "PROXY v{version}: header of {length}+ bytes, limit {limit}"
                )
            }
        }
    }
}

impl std::error::Error for ProxyError {}

/// Looks at the front of a connection's received bytes.
/// Ok(None): need more bytes (the buffer is a strict prefix of a possibly valid header).
/// Ok(Some((proxied, consumed))): a complete header of `consumed` bytes.
/// Err: not a valid header; the connection must be closed.
pub fn parse(buf: &[u8]) -> Result<Option<(Proxied, usize)>, ProxyError> {
    if agrees(buf, V1_PREFIX) {
        parse_v1(buf)
    } else if agrees(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        let first_bytes = buf[..buf.len().min(SHOWN_BYTES)].to_vec();
        Err(ProxyError::NotProxyProtocol { first_bytes })
    }
}

/// Whether `buf` and `magic` agree on their common length.
fn agrees(buf: &[u8], magic: &[u8]) -> bool {
    let n = buf.len().min(magic.len());
    buf[..n] == magic[..n]
}

/// Quotes bytes for a log line, escaping anything that is not printable ASCII.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn bad_v1(message: impl Into<String>) -> ProxyError {
    ProxyError::BadV1(message.into())
}

fn bad_v2(message: impl Into<String>) -> ProxyError {
    ProxyError::BadV2(message.into())
}

fn too_long(version: u8, length: usize) -> ProxyError {
    ProxyError::TooLong { version, length }
}

fn tcp(source: IpAddr, source_port: u16, destination: IpAddr, destination_port: u16) -> Proxied {
    let source = SocketAddr::new(source, source_port);
    let destination = SocketAddr::new(destination, destination_port);
    Proxied::Tcp {
        source,
        destination,
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Proxied, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if window.len() == V1_MAX_LEN {
            return Err(too_long(1, V1_MAX_LEN + 1));
        }
        return v1_fields(&buf[V1_PREFIX.len().min(buf.len())..], false).map(|_| None);
    };
    let line = &buf[V1_PREFIX.len()..end];
    match (window[end], buf.get(end + 1)) {
        (b'\n', _) => Err(bad_v1("LF without CR")),
        _ if end + 2 > V1_MAX_LEN => Err(too_long(1, end + 2)),
        (_, None) => v1_fields(line, true).map(|_| None),
        (_, Some(b'\n')) => Ok(v1_fields(line, true)?.map(|p| (p, end + 2))),
        (_, Some(_)) => Err(bad_v1("CR not followed by LF")),
    }
}

/// Checks the fields after `PROXY `. With `complete == false` the last field may still
/// be growing: it is only checked for plausible bytes, and the result is `None`.
fn v1_fields(line: &[u8], complete: bool) -> Result<Option<Proxied>, ProxyError> {
    let mut fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let pending = if complete { None } else { fields.pop() };
    let Some(&protocol) = fields.first() else {
        let so_far = pending.unwrap_or_default();
        if V1_PROTOCOLS.iter().any(|p| p.starts_with(so_far)) {
            return Ok(None);
        }
        return Err(bad_v1(format!("unknown protocol {}", show(so_far))));
    };
    let v6 = match protocol {
        b"TCP4" => false,
        b"TCP6" => true,
        b"UNKNOWN" => return Ok(complete.then_some(Proxied::Local)),
        _ => return Err(bad_v1(format!("unknown protocol {}", show(protocol)))),
    };
    if fields[1..].iter().any(|f| f.is_empty()) {
        return Err(bad_v1("empty field (double or trailing space)"));
    }
    if fields.len() + usize::from(pending.is_some()) > 5 {
        return Err(bad_v1("more than 5 fields"));
    }
    let (mut ips, mut ports) = (Vec::new(), Vec::new());
    for (i, field) in fields.iter().enumerate().skip(1) {
        match i {
            1 | 2 => ips.push(v1_ip(field, v6, V1_NAMES[i - 1])?),
            _ => ports.push(v1_port(field, V1_NAMES[i - 1])?),
        }
    }
    if let Some(so_far) = pending {
        let plausible = |b: &u8| b.is_ascii_hexdigit() || b":.".contains(b);
        if !so_far.iter().all(plausible) {
            let name = V1_NAMES[fields.len() - 1];
            return Err(bad_v1(format!("bad {name} {}", show(so_far))));
        }
        return Ok(None);
    }
    match (ips.as_slice(), ports.as_slice()) {
        (&[s, d], &[sp, dp]) => Ok(Some(tcp(s, sp, d, dp))),
        _ => Err(bad_v1(format!("expected 5 fields, found {}", fields.len()))),
    }
}

/// An address in the family the protocol field named (IPv4 octets without leading zeros).
fn v1_ip(field: &[u8], v6: bool, name: &str) -> Result<IpAddr, ProxyError> {
    let ip = std::str::from_utf8(field)
        .ok()
        .and_then(|t| t.parse::<IpAddr>().ok());
    ip.filter(|ip| ip.is_ipv6() == v6)
        .ok_or_else(|| bad_v1(format!("bad {name} {}", show(field))))
}

/// A port is 1 to 5 ASCII digits, no leading zero (the spec forbids them), at most 65535.
fn v1_port(field: &[u8], name: &str) -> Result<u16, ProxyError> {
    let digits = field.iter().all(u8::is_ascii_digit) && (field.len() == 1 || field[0] != b'0');
    let port = std::str::from_utf8(field)
        .ok()
        .filter(|_| digits)
        .and_then(|t| t.parse().ok());
    port.ok_or_else(|| bad_v1(format!("bad {name} {}", show(field))))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Proxied, usize)>, ProxyError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    let (version, command) = (version_command >> 4, version_command & 0x0F);
    if version != 2 {
        return Err(bad_v2(format!("version {version}, expected 2")));
    }
    if command > 1 {
        return Err(bad_v2(format!("command {command}, not LOCAL or PROXY")));
    }
    let Some(&family_protocol) = buf.get(13) else {
        return Ok(None);
    };
    let (family, protocol) = (family_protocol >> 4, family_protocol & 0x0F);
    // LOCAL: "discard the protocol block including the family which is ignored".
    let needed = if command == 0 {
        0
    } else {
        v2_needed(family, protocol)?
    };
    let Some(&[high, low]) = buf.get(14..16) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    if length > V2_MAX_BLOCK {
        return Err(too_long(2, V2_FIXED_LEN + length));
    }
    if length < needed {
        return Err(bad_v2(format!(
            "length {length} too short for family {family}"
        )));
    }
    let total = V2_FIXED_LEN + length;
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(None);
    };
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let proxied = match (command, family, protocol) {
        (1, 1, 1) => tcp(ip::<4>(block), port(8), ip::<4>(&block[4..]), port(10)),
        (1, 2, 1) => tcp(ip::<16>(block), port(32), ip::<16>(&block[16..]), port(34)),
        _ => Proxied::Local,
    };
    Ok(Some((proxied, total)))
}

/// The address in the first `N` bytes (4 for IPv4, 16 for IPv6), network byte order.
fn ip<const N: usize>(bytes: &[u8]) -> IpAddr
where
    IpAddr: From<[u8; N]>,
{
    let mut octets = [0; N];
    octets.copy_from_slice(&bytes[..N]);
    IpAddr::from(octets)
}

/// Checks a PROXY command's family/protocol nibbles; returns the address bytes they need
/// (0 when either is UNSPEC: the spec says to ignore the address information then).
fn v2_needed(family: u8, protocol: u8) -> Result<usize, ProxyError> {
    let needed = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(bad_v2(format!("unknown address family {family}"))),
    };
    match protocol {
        0 => Ok(0),
        1 => Ok(needed),
        2 => Err(bad_v2("DGRAM transport, but this is a stream listener")),
        _ => Err(bad_v2(format!("unknown transport protocol {protocol}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const INET: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 0x1F, 0x90, 0, 80];
    const FRAME: &[u8] = b"0000000002hi";

    fn v1(fields: &str) -> Vec<u8> {
        format!("PROXY {fields}\r\n").into_bytes()
    }

    fn v2(version_command: u8, family_protocol: u8, block: &[u8]) -> Vec<u8> {
        let length = u16::try_from(block.len()).unwrap().to_be_bytes();
        let bytes = [version_command, family_protocol];
        [V2_SIGNATURE, &bytes, &length, block].concat()
    }

    fn tcp_of(source: &str, destination: &str) -> Proxied {
        let s: SocketAddr = source.parse().unwrap();
        let d: SocketAddr = destination.parse().unwrap();
        tcp(s.ip(), s.port(), d.ip(), d.port())
    }

    /// What `INET` says.
    fn inet() -> Proxied {
        tcp_of("1.2.3.4:8080", "5.6.7.8:80")
    }

    fn octets(ip: IpAddr) -> Vec<u8> {
        match ip {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        }
    }

    /// `header` followed by an nbnet frame parses to `expected`, consuming exactly the header.
    fn parses(header: &[u8], expected: Proxied) {
        let buf = [header, FRAME].concat();
        assert_eq!(parse(&buf), Ok(Some((expected, header.len()))));
    }

    fn fails(buf: &[u8], needle: &str) {
        let message = parse(buf).unwrap_err().to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    #[test]
    fn v1_tcp4_gives_source_and_destination() {
        let p = tcp_of("192.168.0.1:56324", "10.0.0.2:443");
        parses(&v1("TCP4 192.168.0.1 10.0.0.2 56324 443"), p);
        let p = tcp_of("0.0.0.0:0", "255.255.255.255:65535");
        parses(&v1("TCP4 0.0.0.0 255.255.255.255 0 65535"), p);
    }

    #[test]
    fn v1_tcp6_gives_source_and_destination() {
        let p = tcp_of("[2001:db8::1]:1", "[::1]:2");
        parses(&v1("TCP6 2001:db8::1 ::1 1 2"), p);
        let ones = ["ffff"; 8].join(":");
        let p = tcp_of(&format!("[{ones}]:65535"), &format!("[{ones}]:0"));
        parses(&v1(&format!("TCP6 {ones} {ones} 65535 0")), p);
    }

    #[test]
    fn v1_unknown_is_local_whatever_follows() {
        parses(&v1("UNKNOWN"), Proxied::Local);
        parses(b"PROXY UNKNOWN  \xff any 9.9 -1\r\n", Proxied::Local);
        let ones = ["ffff"; 8].join(":");
        let longest = v1(&format!("UNKNOWN {ones} {ones} 65535 65535"));
        assert_eq!(longest.len(), V1_MAX_LEN);
        parses(&longest, Proxied::Local);
    }

    #[test]
    fn v1_header_leaves_the_frame_after_it() {
        let got = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n0000000002hi");
        assert_eq!(got, Ok(Some((tcp_of("1.2.3.4:1", "5.6.7.8:2"), 32))));
    }

    #[test]
    fn v2_inet_and_inet6_stream_give_source_and_destination() {
        parses(&v2(0x21, 0x11, &INET), inet());
        let (s, d) = ("::1".parse().unwrap(), "2001:db8::7".parse().unwrap());
        let block = [octets(s), octets(d), vec![0xFF, 0xFF, 0, 0]].concat();
        parses(&v2(0x21, 0x21, &block), tcp(s, 65535, d, 0));
    }

    #[test]
    fn v2_local_unspec_and_unix_are_local() {
        // LOCAL (0x20) ignores the family byte; PROXY (0x21) with UNSPEC or UNIX carries no IP.
        let local = [(0x00, &[][..]), (0xFF, &[1, 2, 3]), (0x12, &INET)].map(|(f, b)| (0x20, f, b));
        let proxy = [(0x00, &[][..]), (0x10, &[]), (0x31, &[0; 216])].map(|(f, b)| (0x21, f, b));
        for (version_command, family_protocol, block) in local.into_iter().chain(proxy) {
            parses(&v2(version_command, family_protocol, block), Proxied::Local);
        }
    }

    #[test]
    fn v2_tlvs_after_the_addresses_are_skipped_up_to_the_cap() {
        let block = [&INET[..], &[0x04, 0, 2, b'h', b'i', 0x01, 0, 0]].concat();
        parses(&v2(0x21, 0x11, &block), inet());
        let longest = v2(0x21, 0x11, &[7; V2_MAX_BLOCK]);
        assert_eq!(longest.len(), MAX_HEADER_LEN);
        parses(&longest, tcp_of("7.7.7.7:1799", "7.7.7.7:1799"));
    }

    #[test]
    fn every_strict_prefix_of_a_valid_header_needs_more_bytes() {
        let headers = [
            v1("TCP4 192.168.0.1 10.0.0.2 56324 443"),
            v1("TCP6 2001:db8::1 ::1 1 2"),
            v1("UNKNOWN x y"),
            v2(0x21, 0x11, &[&INET[..], &[0x04, 0, 1, 9]].concat()),
            v2(0x21, 0x21, &[0; 36]),
            v2(0x20, 0x00, &[]),
        ];
        for (i, header) in headers.iter().enumerate() {
            for split in 0..header.len() {
                assert_eq!(parse(&header[..split]), Ok(None), "{i} at {split}");
            }
            assert!(matches!(parse(header), Ok(Some((_, n))) if n == header.len()));
        }
    }

    #[test]
    fn plain_nbnet_frame_or_wrong_signature_is_refused_at_once() {
        let expected = r#"not a PROXY protocol header (starts with "0000000002hi")"#;
        assert_eq!(parse(FRAME).unwrap_err().to_string(), expected);
        let mut bad_signature = v2(0x21, 0x11, &INET);
        bad_signature[6] = b'X';
        fails(&bad_signature[..7], "not a PROXY protocol header");
        for buf in [&b"0"[..], b"PROXYTCP4", b"proxy TCP4 ", b"\r\n\r\nGET"] {
            fails(buf, "not a PROXY protocol header");
        }
    }

    #[test]
    fn v2_bad_version_command_or_transport_is_refused_as_soon_as_seen() {
        fails(&v2(0x11, 0x11, &INET)[..13], "v2: version 1, expected 2");
        fails(&v2(0x31, 0x11, &INET)[..13], "version 3");
        fails(&v2(0x22, 0x11, &INET)[..13], "command 2");
        fails(&v2(0x21, 0x12, &INET)[..14], "DGRAM");
        fails(&v2(0x21, 0x22, &[0; 36]), "DGRAM");
        fails(&v2(0x21, 0x41, &INET), "address family 4");
        fails(&v2(0x21, 0x13, &INET), "transport protocol 3");
    }

    #[test]
    fn v2_length_shorter_than_the_family_needs_or_above_the_cap_is_refused() {
        fails(&v2(0x21, 0x11, &[0; 11])[..16], "length 11 too short");
        fails(&v2(0x21, 0x21, &[0; 35]), "length 35 too short");
        fails(&v2(0x21, 0x31, &[0; 215]), "length 215 too short");
        let too_long = v2(0x20, 0x00, &[0; V2_MAX_BLOCK + 1]);
        fails(&too_long[..16], "v2: header of 4113+ bytes, limit 4112");
    }

    #[test]
    fn v1_line_without_crlf_within_107_bytes_is_too_long() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN, b'a');
        assert_eq!(parse(&line[..V1_MAX_LEN - 1]), Ok(None));
        fails(&line, "PROXY v1: header of 108+ bytes, limit 107");
        line[V1_MAX_LEN - 1] = b'\r';
        fails(&line, "108+ bytes");
    }

    #[test]
    fn v1_bad_addresses_are_refused() {
        let expected = r#"PROXY v1: bad source address "1.2.3.256""#;
        fails(&v1("TCP4 1.2.3.256 1.2.3.4 1 2"), expected);
        fails(&v1("TCP4 1.2.3.4 ::1 1 2"), "bad destination address");
        fails(&v1("TCP6 1.2.3.4 ::1 1 2"), "bad source address");
        fails(&v1("TCP4 01.2.3.4 1.2.3.4 1 2"), "bad source address");
    }

    #[test]
    fn v1_bad_ports_are_refused() {
        let expected = r#"PROXY v1: bad source port "99999""#;
        fails(&v1("TCP4 1.2.3.4 1.2.3.4 99999 2"), expected);
        for port in ["65536", "+1", "-1", "080", "00", "1a", "123456"] {
            let line = v1(&format!("TCP4 1.2.3.4 1.2.3.4 1 {port}"));
            fails(&line, &format!("bad destination port \"{port}\""));
        }
    }

    #[test]
    fn v1_needs_single_spaces_five_fields_crlf_and_uppercase() {
        fails(&v1("TCP4 1.2.3.4  5.6.7.8 1 2"), "empty field");
        fails(&v1("TCP4 1.2.3.4 5.6.7.8 1 2 "), "empty field");
        fails(&v1(" TCP4 1.2.3.4 5.6.7.8 1 2"), "unknown protocol \"\"");
        fails(&v1("TCP4 1.2.3.4 5.6.7.8 1"), "5 fields, found 4");
        fails(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR");
        fails(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "not followed by LF");
        fails(&v1("tcp4 1.2.3.4 5.6.7.8 1 2"), "protocol \"tcp4\"");
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"), Ok(None));
    }

    #[test]
    fn v1_garbage_is_refused_before_the_crlf_arrives() {
        fails(b"PROXY tcp", "unknown protocol \"tcp\"");
        fails(b"PROXY TCP5 ", "unknown protocol \"TCP5\"");
        fails(b"PROXY TCP4 1.2.3.x", "bad source address \"1.2.3.x\"");
        fails(b"PROXY TCP4 999.1.1.1 ", "bad source address \"999.1.1.1\"");
        fails(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", "more than 5 fields");
    }

    /// A valid header of any form the parser accepts, and what it must parse to.
    fn valid_header() -> impl Strategy<Value = (Vec<u8>, Proxied)> {
        let v4 = any::<(Ipv4Addr, Ipv4Addr)>().prop_map(|(s, d)| (IpAddr::V4(s), IpAddr::V4(d)));
        let v6 = any::<(Ipv6Addr, Ipv6Addr)>().prop_map(|(s, d)| (IpAddr::V6(s), IpAddr::V6(d)));
        let ends = (prop_oneof![v4, v6], any::<(u16, u16)>());
        let v1_tcp = ends.clone().prop_map(|((s, d), (sp, dp))| {
            let protocol = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            let line = v1(&format!("{protocol} {s} {d} {sp} {dp}"));
            (line, tcp(s, sp, d, dp))
        });
        let not_crlf = any::<u8>().prop_filter("no CR or LF", |b| *b != b'\r' && *b != b'\n');
        let v1_unknown = vec(not_crlf, 0..=91).prop_map(|rest| {
            let line = [b"PROXY UNKNOWN ", &rest[..], b"\r\n"].concat();
            (line, Proxied::Local)
        });
        let v2_tcp = (ends, vec(any::<u8>(), 0..64)).prop_map(|(((s, d), (sp, dp)), tlvs)| {
            let ports = [sp.to_be_bytes(), dp.to_be_bytes()].concat();
            let block = [octets(s), octets(d), ports, tlvs].concat();
            let family = if s.is_ipv4() { 0x11 } else { 0x21 };
            (v2(0x21, family, &block), tcp(s, sp, d, dp))
        });
        let v2_local = (any::<u8>(), vec(any::<u8>(), 0..300))
            .prop_map(|(family, block)| (v2(0x20, family, &block), Proxied::Local));
        let v2_unspec = vec(any::<u8>(), 0..300).prop_map(|b| (v2(0x21, 0x00, &b), Proxied::Local));
        prop_oneof![v1_tcp, v1_unknown, v2_tcp, v2_local, v2_unspec]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_overconsume(
            start in prop::sample::select(vec![
                &b""[..], b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                V2_SIGNATURE, b"\r\n\r\n\0\r\nQUIT\n\x21", b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
            ]),
            rest in vec(any::<u8>(), 0..300),
        ) {
            let buf = [start, &rest].concat();
            if let Ok(Some((_, consumed))) = parse(&buf) {
                prop_assert!(consumed <= buf.len() && consumed <= MAX_HEADER_LEN);
            }
        }

        #[test]
        fn valid_header_parses_the_same_at_any_split_and_before_any_tail(
            (header, expected) in valid_header(),
            tail in vec(any::<u8>(), 0..64),
            split in any::<prop::sample::Index>(),
        ) {
            let buf = [&header[..], &tail].concat();
            prop_assert_eq!(parse(&buf), Ok(Some((expected, header.len()))));
            prop_assert_eq!(parse(&header[..split.index(header.len())]), Ok(None));
        }
    }
}
