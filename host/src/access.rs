//! Per-listener access lists: `allow` and `deny`, lists of CIDR networks
//! (IPv4 and IPv6; a bare address is that one host). A client is refused
//! when its address is in `deny`, or when `allow` is not empty and its
//! address is in none of it — deny wins, as in nginx. The address checked
//! is the real client's: the peer of the TCP connection, or on a
//! `proxy_protocol` listener the source the PROXY header gives (the
//! connection from the proxy itself is not checked: the proxy is trusted,
//! `proxy_protocol` says so). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
//! from a dual-stack socket) are checked as the IPv4 address they are.

use std::net::IpAddr;

use ipnet::IpNet;

/// A listener's `allow` and `deny` lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessList {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AccessList {
    /// Parses the two lists; the error names the entry and the list.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<AccessList, String> {
        Ok(AccessList {
            allow: parse_list("allow", allow)?,
            deny: parse_list("deny", deny)?,
        })
    }

    /// Whether both lists are empty (every client is admitted).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a client at `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }
}

fn parse_list(key: &str, entries: &[String]) -> Result<Vec<IpNet>, String> {
    entries
        .iter()
        .map(|entry| parse_entry(key, entry))
        .collect()
}

fn parse_entry(key: &str, entry: &str) -> Result<IpNet, String> {
    let text = entry.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = text.parse().map_err(|_| {
        format!(
            "{key} entry {entry:?} is not an IP address or a CIDR network (for example \"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\")"
        )
    })?;
    // An IPv4-mapped IPv6 network (::ffff:a.b.c.d/N, N >= 96) is the IPv4
    // network it maps: clients are checked as IPv4 (see the module doc).
    let net = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    };
    if net.trunc() != net {
        return Err(format!(
            "{key} entry {entry:?} has bits set past its /{} prefix; write the network as {} (or the single host as {})",
            net.prefix_len(),
            net.trunc(),
            net.addr()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(allow: &[&str], deny: &[&str]) -> AccessList {
        let s = |v: &[&str]| v.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        AccessList::parse(&s(allow), &s(deny)).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_an_empty_allow_admits_everyone_else() {
        let acl = list(&[], &["192.0.2.0/24", "2001:db8::/32"]);
        assert!(!acl.permits(ip("192.0.2.7")));
        assert!(!acl.permits(ip("2001:db8::1")));
        assert!(acl.permits(ip("198.51.100.1")));
        assert!(acl.permits(ip("::1")));
        let acl = list(&["10.0.0.0/8", "::1"], &["10.1.0.0/16"]);
        assert!(acl.permits(ip("10.2.3.4")));
        assert!(!acl.permits(ip("10.1.3.4")), "deny wins over allow");
        assert!(!acl.permits(ip("192.0.2.7")), "not in allow");
        assert!(acl.permits(ip("::1")));
        assert!(!acl.permits(ip("::2")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_checked_as_ipv4() {
        let acl = list(&["127.0.0.0/8"], &[]);
        assert!(acl.permits(ip("::ffff:127.0.0.1")));
        let acl = list(&["::ffff:10.0.0.1"], &[]);
        assert!(acl.permits(ip("10.0.0.1")));
        // Hostile pass: a mapped *network* never matched an IPv4 client.
        let acl = list(&[], &["::ffff:127.0.0.0/104"]);
        assert!(!acl.permits(ip("127.0.0.1")));
        assert!(!acl.permits(ip("::ffff:127.0.0.1")));
        assert!(acl.permits(ip("10.0.0.1")));
    }

    #[test]
    fn bad_entries_are_named_with_what_to_write() {
        let e = AccessList::parse(&["10.0.0.1/8".into()], &[]).unwrap_err();
        assert!(
            e.contains("allow entry \"10.0.0.1/8\"") && e.contains("10.0.0.0/8"),
            "{e}"
        );
        let e = AccessList::parse(&[], &["example.com".into()]).unwrap_err();
        assert!(e.contains("deny entry \"example.com\""), "{e}");
        let e = AccessList::parse(&[], &["10.0.0.0/33".into()]).unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
    }
}
