//! PROXY protocol header parser (placeholder until the full parser lands).

use std::fmt;
use std::net::SocketAddr;

/// Longest header accepted.
pub const MAX_HEADER_LEN: usize = 536;

/// What the header said about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxied {
    /// A proxied connection.
    Tcp {
        /// The real client.
        source: SocketAddr,
        /// The address it connected to.
        destination: SocketAddr,
    },
    /// Use the connection's own addresses.
    Local,
}

/// A bad header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError(String);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProxyError {}

/// Looks at the front of a connection's bytes.
pub fn parse(_buf: &[u8]) -> Result<Option<(Proxied, usize)>, ProxyError> {
    Err(ProxyError("PROXY protocol not supported yet".into()))
}
