//! Listener addresses: parsing `IP:PORT` and `unix:PATH`, and refusing
//! one the kernel would not let the master bind next to an earlier one.

use super::*;

/// Parses a listener address: `IP:PORT`, or `unix:PATH` (a relative path
/// resolves against the config file's folder).
pub(super) fn parse_endpoint(text: &str, base: &Path) -> Result<Endpoint, String> {
    if let Some(written) = text.strip_prefix("unix:") {
        if written.is_empty() {
            return Err(
                "listener addr \"unix:\" needs a path, e.g. \"unix:/run/nbnet.sock\"".into(),
            );
        }
        if written.contains(char::is_control) {
            return Err(format!(
                "listener addr {} contains a control character",
                quote(text)
            ));
        }
        let joined = base.join(written);
        let path = std::path::absolute(&joined).unwrap_or(joined);
        let names_a_file = !written.ends_with('/')
            && matches!(path.components().next_back(), Some(Component::Normal(_)));
        if !names_a_file {
            return Err(format!(
                "listener addr {} names a folder, not a socket file; add a file name, e.g. \"unix:/run/nbnet.sock\"",
                quote(text)
            ));
        }
        let len = path.as_os_str().len();
        if len > MAX_UNIX_PATH_BYTES {
            return Err(format!(
                "listener addr {}: the socket path is {len} bytes long once resolved ({}), over the kernel's limit of {MAX_UNIX_PATH_BYTES} bytes for a Unix socket; use a shorter path",
                quote(text),
                quote(&path.to_string_lossy())
            ));
        }
        return Ok(Endpoint::Unix(path));
    }
    text.parse::<SocketAddr>().map(Endpoint::Tcp).map_err(|_| {
        format!(
            "listener addr {} is not IP:PORT or unix:PATH (for example \"127.0.0.1:9000\", \"[::1]:9000\" or \"unix:/run/nbnet.sock\")",
            quote(text)
        )
    })
}

/// Whether a socket bound to `[::]` also takes IPv4 (it does unless
/// `net.ipv6.bindv6only` is 1: `ListenSocket::bind_tcp` leaves
/// `IPV6_V6ONLY` at the system default).
pub(super) fn v6_wildcard_takes_ipv4() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() != "1")
}

/// `path` with `.` and `name/..` removed, without looking at the disk.
pub(super) fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !matches!(out.components().next_back(), Some(Component::Normal(_))) || !out.pop()
                {
                    // `/..` is `/`; a relative path cannot go above its start.
                    if !out.has_root() {
                        out.push("..");
                    }
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The socket file a Unix listener path names, for comparing listeners:
/// its folder resolved through symlinks when it exists, otherwise the path
/// normalised lexically.
pub(super) fn socket_file(path: &Path) -> PathBuf {
    if let (Some(folder), Some(name)) = (path.parent(), path.file_name()) {
        if let Ok(real) = std::fs::canonicalize(folder) {
            return real.join(name);
        }
    }
    normalize_lexically(path)
}

/// Which addresses a TCP socket takes, for the kernel's bind conflicts.
/// An IPv4-mapped IPv6 address is its IPv4 address; the IPv6 scope only
/// matters for link-local addresses (it binds the socket to a device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TcpKey {
    pub(super) ip: IpAddr,
    pub(super) scope: u32,
    pub(super) port: u16,
}

impl TcpKey {
    pub(super) fn of(addr: &SocketAddr) -> TcpKey {
        let (ip, scope) = match addr {
            SocketAddr::V4(v4) => (IpAddr::V4(*v4.ip()), 0),
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), 0),
                None => {
                    let link_local = v6.ip().segments()[0] & 0xffc0 == 0xfe80;
                    (
                        IpAddr::V6(*v6.ip()),
                        if link_local { v6.scope_id() } else { 0 },
                    )
                }
            },
        };
        TcpKey {
            ip,
            scope,
            port: addr.port(),
        }
    }
}

/// Every listener address seen so far, to refuse one the kernel would not
/// let the master bind next to an earlier one: the same address (also when
/// written differently: an IPv4-mapped IPv6 address, or a Unix path through
/// `..` or a symlink), or an overlapping one on the same port (a wildcard
/// `0.0.0.0` or `[::]` with anything else of its family — `[::]` takes IPv4
/// too unless `bindv6only` is set) unless both have `reuseport = true`
/// (with `SO_REUSEPORT` on both sockets Linux allows that overlap).
/// Every step is a hash lookup: linear in the number of listeners.
pub(super) struct Addresses {
    pub(super) v6_takes_v4: bool,
    /// Each listener added: its line and address, for messages.
    pub(super) seen: Vec<(usize, Endpoint)>,
    pub(super) tcp: HashMap<TcpKey, usize>,
    pub(super) unix: HashMap<PathBuf, usize>,
    pub(super) ports: HashMap<u16, PortUsers>,
}

/// One port's listeners, as indexes into [`Addresses::seen`], indexed by
/// address family and then by `reuseport`.
#[derive(Default)]
pub(super) struct PortUsers {
    /// The first listener of each family.
    pub(super) any: [[Option<usize>; 2]; 2],
    /// The first wildcard listener taking each family.
    pub(super) wildcard: [[Option<usize>; 2]; 2],
}

impl Addresses {
    pub(super) fn new(v6_takes_v4: bool) -> Self {
        Addresses {
            v6_takes_v4,
            seen: Vec::new(),
            tcp: HashMap::new(),
            unix: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    /// The families a socket bound to `key` takes, and whether it is a wildcard.
    pub(super) fn families(&self, key: &TcpKey) -> (&'static [usize], bool) {
        match key.ip {
            IpAddr::V4(ip) if ip.is_unspecified() => (&[0], true),
            IpAddr::V6(ip) if ip.is_unspecified() && self.v6_takes_v4 => (&[0, 1], true),
            IpAddr::V6(ip) if ip.is_unspecified() => (&[1], true),
            IpAddr::V4(_) => (&[0], false),
            IpAddr::V6(_) => (&[1], false),
        }
    }

    /// The first earlier listener whose socket would keep one for `key`
    /// (with `reuseport`) from binding, other than an identical address: a
    /// wildcard clashes with every earlier listener of the families it
    /// takes, a specific address with every earlier wildcard taking its
    /// family; but two sockets with `SO_REUSEPORT` never clash.
    pub(super) fn overlap(&self, key: &TcpKey, reuseport: bool) -> Option<usize> {
        if key.port == 0 {
            // The kernel picks a free port for each.
            return None;
        }
        let users = self.ports.get(&key.port)?;
        let (families, wildcard) = self.families(key);
        let table = if wildcard {
            &users.any
        } else {
            &users.wildcard
        };
        let flags: &[usize] = if reuseport { &[0] } else { &[0, 1] };
        families
            .iter()
            .flat_map(|&family| flags.iter().filter_map(move |&flag| table[family][flag]))
            .min()
    }

    /// Adds a listener at `addr` on line `line`; an error says which
    /// earlier listener it cannot be bound next to.
    pub(super) fn add(
        &mut self,
        addr: &Endpoint,
        reuseport: bool,
        line: usize,
    ) -> Result<(), String> {
        let index = self.seen.len();
        let result = match addr {
            Endpoint::Tcp(socket) => self.add_tcp(socket, reuseport, index),
            Endpoint::Unix(path) => match self.unix.entry(socket_file(path)) {
                std::collections::hash_map::Entry::Occupied(first) => Err(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(index);
                    Ok(())
                }
            },
        };
        self.seen.push((line, addr.clone()));
        result.map_err(|first| {
            let (first_line, first_addr) = &self.seen[first];
            if first_addr == addr {
                format!("duplicate listener {addr} (first defined on line {first_line})")
            } else if let (Endpoint::Tcp(a), Endpoint::Tcp(b)) = (addr, first_addr) {
                if TcpKey::of(a) == TcpKey::of(b) {
                    format!(
                        "listener {addr} is the same address as listener {first_addr} on line {first_line} (an IPv4-mapped IPv6 address is its IPv4 address); remove one of them"
                    )
                } else {
                    format!(
                        "listener {addr} overlaps listener {first_addr} on line {first_line}: a wildcard address takes the port on every address of its family, so the second bind would fail with \"address in use\"; use another port, remove one, or set reuseport = true on both"
                    )
                }
            } else {
                format!(
                    "listener {addr} is the same socket file as listener {first_addr} on line {first_line}; give each its own path"
                )
            }
        })
    }

    pub(super) fn add_tcp(
        &mut self,
        socket: &SocketAddr,
        reuseport: bool,
        index: usize,
    ) -> Result<(), usize> {
        let key = TcpKey::of(socket);
        if let Some(&first) = self.tcp.get(&key) {
            return Err(first);
        }
        let overlap = self.overlap(&key, reuseport);
        self.tcp.insert(key, index);
        let (families, wildcard) = self.families(&key);
        let users = self.ports.entry(key.port).or_default();
        let flag = usize::from(reuseport);
        for &family in families {
            users.any[family][flag].get_or_insert(index);
            if wildcard {
                users.wildcard[family][flag].get_or_insert(index);
            }
        }
        overlap.map_or(Ok(()), Err)
    }

    /// Checks the `[admin]` address (bound without `SO_REUSEPORT`) against
    /// the listeners.
    pub(super) fn admin(&self, addr: SocketAddr) -> Result<(), String> {
        let key = TcpKey::of(&addr);
        if let Some(&first) = self.tcp.get(&key) {
            let (line, listener) = &self.seen[first];
            return Err(format!(
                "[admin] addr {addr} is also a [[listeners]] address ({listener}, line {line}); use another port"
            ));
        }
        if let Some(first) = self.overlap(&key, false) {
            let (line, listener) = &self.seen[first];
            return Err(format!(
                "[admin] addr {addr} overlaps listener {listener} on line {line} (the same port, and one is a wildcard address): binding both would fail with \"address in use\"; use another port"
            ));
        }
        Ok(())
    }
}
