//! TLS on listeners: the `tls = { … }` settings, the certificate and key
//! files, and the rustls configurations built from them.
//!
//! The master reads every file when it loads the config (at startup, on
//! each reload, and for `--check`): it may be root and the workers may not
//! be able to read the key. The [`rustls::ServerConfig`] is built there,
//! before fork, so every worker inherits the same one — including the
//! session-ticket keys ([`tickets`]: made from a secret the master keeps
//! for its whole life), so a client resumes its session on any worker,
//! before and after a reload.
//!
//! The per-connection side (the handshake and records inside the worker's
//! reactor) is [`crate::worker::tls`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub mod tickets;

/// `tls = { cert, key, client_ca, min_version }` as written in a listener.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, the server's own first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// PEM CA certificate(s): clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<String>,
    /// Lowest TLS version accepted: "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: Option<String>,
}

/// A listener's TLS, ready to serve: built by the master, inherited by workers.
#[derive(Clone)]
pub struct TlsListener {
    /// What every connection of the listener is served with.
    pub config: Arc<ServerConfig>,
    /// The certificate file (absolute), for messages.
    pub cert_file: PathBuf,
    /// Whether clients must present a certificate (mutual TLS).
    pub client_auth: bool,
    /// Things worth saying that do not stop the server (an expired
    /// certificate…), each naming its file.
    pub warnings: Vec<String>,
}

impl fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener")
            .field("cert_file", &self.cert_file)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// Logs the warnings of every TLS listener of `config` (at startup and on
/// each reload; `--check` prints them).
pub fn log_warnings(config: &crate::config::Config) {
    for listener in &config.listeners {
        for warning in listener.tls.iter().flat_map(|tls| &tls.warnings) {
            tracing::warn!("listener {}: {warning}", listener.addr);
        }
    }
}

/// The crypto provider of both sides: ring (no cmake/aws-lc-rs build).
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange
/// (X25519MLKEM768 is aws-lc-rs only); classical X25519/P-256 remain.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Counters of [`crate::scoreboard::Stats::tls`], by index.
pub mod counters {
    /// Handshakes completed (full or resumed).
    pub const HANDSHAKES: usize = 0;
    /// Of those, resumed sessions (no certificate exchange).
    pub const RESUMED: usize = 1;
    /// TLS connections closed at a frame boundary when their worker was
    /// replaced: a TLS session cannot move to another process.
    pub const HANDOVER_CLOSES: usize = 2;
    /// First of the failure counters, in [`FAILURE_REASONS`] order.
    pub const FAILURES: usize = 3;
    /// The `reason` label of `nbnet_tls_handshake_failures_total`.
    pub const FAILURE_REASONS: [&str; 5] = [
        // The client's first bytes are not a TLS record (plaintext on a TLS port).
        "not_tls",
        // No client certificate, or one the client CA did not sign, or
        // one expired or not yet valid.
        "client_certificate",
        // Any other protocol failure: no common version or cipher suite,
        // a malformed message, an alert from the client.
        "protocol",
        // The client closed in the middle of the handshake.
        "truncated",
        // Still handshaking when closed by read_timeout (or a worker stop).
        "incomplete",
    ];
    /// How many counters.
    pub const COUNT: usize = FAILURES + FAILURE_REASONS.len();
}

/// Reads and checks the files of `raw` (paths relative to `base`, the
/// config file's folder) and builds the server configuration. Errors name
/// the file and the reason, and say what to do.
pub fn load(raw: &RawTls, base: &Path) -> Result<TlsListener, Vec<String>> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let resolve =
        |written: &str| std::path::absolute(base.join(written)).unwrap_or(base.join(written));
    let cert_file = resolve(&raw.cert);
    let key_file = resolve(&raw.key);
    let versions: &[&'static rustls::SupportedProtocolVersion] = match raw
        .min_version
        .as_deref()
        .map(str::trim)
    {
        None | Some("1.2") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("1.3") => &[&rustls::version::TLS13],
        Some(other) => {
            problems.push(format!(
                    "tls min_version = {other:?} is not a TLS version nbnet speaks: use \"1.2\" (the default) or \"1.3\""
                ));
            &[&rustls::version::TLS13]
        }
    };
    let certs = read_certificates(&cert_file, "cert", &mut problems);
    if let Some(leaf) = certs.first() {
        if let Some(warning) = validity_warning(leaf, &cert_file) {
            warnings.push(warning);
        }
    }
    let key = read_key(&key_file, &mut problems);
    let roots = raw.client_ca.as_deref().map(|written| {
        let file = resolve(written);
        let cas = read_certificates(&file, "client_ca", &mut problems);
        let context = tickets::context(Some(&cas));
        let mut roots = RootCertStore::empty();
        for ca in cas {
            if let Some(warning) = validity_warning(&ca, &file) {
                warnings.push(warning);
            }
            if let Err(e) = roots.add(ca) {
                problems.push(format!(
                    "tls client_ca {}: a certificate in it cannot be a trust anchor ({e})",
                    file.display()
                ));
            }
        }
        (file, roots, context)
    });
    let (Some(key), false) = (key, certs.is_empty()) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder =
        match ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions) {
            Ok(builder) => builder,
            Err(e) => return Err(vec![format!("tls: {e}")]),
        };
    let client_auth = roots.is_some();
    let mut context = tickets::context(None);
    let builder = match roots {
        None => builder.with_no_client_auth(),
        Some((file, roots, with_cas)) => {
            context = with_cas;
            match rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            {
                Ok(verifier) => builder.with_client_cert_verifier(verifier),
                Err(e) => {
                    return Err(vec![format!(
                        "tls client_ca {}: cannot verify clients with it ({e}); give a PEM file of CA certificates",
                        file.display()
                    )])
                }
            }
        }
    };
    let mut config = match builder.with_single_cert(certs, key) {
        Ok(config) => config,
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(vec![format!(
                "tls key {} does not match the certificate in {} (the key's public half is not the certificate's); give the key the certificate was issued for",
                key_file.display(),
                cert_file.display()
            )])
        }
        Err(e) => {
            return Err(vec![format!(
                "tls key {} cannot be used with the certificate in {}: {e}",
                key_file.display(),
                cert_file.display()
            )])
        }
    };
    // Session resumption: stateless tickets (TLS 1.3 and 1.2) whose keys
    // every worker derives from the master's secret, the same before and
    // after a reload; the default in-memory session cache stays for TLS
    // 1.2 session ids (per worker).
    config.ticketer = tickets::Ticketer::for_listener(context)
        .map_err(|e| vec![format!("tls: cannot make a session ticket key: {e}")])?;
    Ok(TlsListener {
        config: Arc::new(config),
        cert_file,
        client_auth,
        warnings,
    })
}

/// The largest certificate, key or CA file read (a long chain of large
/// certificates is well under it).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a certificate, key or CA file the way nothing can stall or bloat
/// the master that reads it (at startup, `--check` and every reload, as
/// root): opened non-blocking (a FIFO must not wait for a writer), only a
/// regular file, at most [`MAX_PEM_BYTES`]. The error follows "tls KEY
/// FILE: ".
fn read_small_file(file: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(file)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let meta = opened
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "is {}, not a regular file; name the PEM file itself",
            crate::config::not_a_file(&meta.file_type()).unwrap_or("not a regular file")
        ));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "is {} bytes, over the {MAX_PEM_BYTES}-byte limit for a PEM file; is it the right file?",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "grew over the {MAX_PEM_BYTES}-byte limit for a PEM file while it was read"
        ));
    }
    Ok(bytes)
}

/// Reads a file's PEM certificates; problems name the file and the key.
fn read_certificates(
    file: &Path,
    key: &str,
    problems: &mut Vec<String>,
) -> Vec<CertificateDer<'static>> {
    let bytes = match read_small_file(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push(format!("tls {key} {}: {e}", file.display()));
            return Vec::new();
        }
    };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        match cert {
            Ok(cert) => certs.push(cert),
            Err(e) => {
                problems.push(format!(
                    "tls {key} {}: not a valid PEM file ({e})",
                    file.display()
                ));
                return Vec::new();
            }
        }
    }
    if certs.is_empty() {
        problems.push(format!(
            "tls {key} {}: holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\"); give the certificate chain in PEM form, the server's own first",
            file.display()
        ));
    }
    for cert in &certs {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            problems.push(format!(
                "tls {key} {}: a certificate in it is not valid X.509 ({e})",
                file.display()
            ));
            return Vec::new();
        }
    }
    certs
}

/// Reads a PEM private key.
fn read_key(file: &Path, problems: &mut Vec<String>) -> Option<PrivateKeyDer<'static>> {
    let bytes = match read_small_file(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push(format!("tls key {}: {e}", file.display()));
            return None;
        }
    };
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Some(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            problems.push(format!(
                "tls key {}: holds no PEM private key (\"-----BEGIN PRIVATE KEY-----\", RSA or EC); give the certificate's private key in PEM form",
                file.display()
            ));
            None
        }
        Err(e) => {
            problems.push(format!(
                "tls key {}: not a valid PEM private key ({e})",
                file.display()
            ));
            None
        }
    }
}

/// A warning when `cert` is expired or not yet valid.
fn validity_warning(cert: &CertificateDer<'_>, file: &Path) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    let subject = parsed.subject().to_string();
    if validity.not_after < now {
        Some(format!(
            "tls certificate {} ({subject}) expired on {}: clients will refuse it; renew it and run nbnet reload",
            file.display(),
            validity.not_after
        ))
    } else if validity.not_before > now {
        Some(format!(
            "tls certificate {} ({subject}) is not valid before {}: clients will refuse it until then",
            file.display(),
            validity.not_before
        ))
    } else {
        None
    }
}

/// The client certificate's subject (RFC 4514 text) and its subject
/// alternative names (`DNS:…`, `IP:…`, `URI:…`, `email:…`, comma
/// separated), for plugins.
pub fn describe_client(cert: &CertificateDer<'_>) -> (String, String) {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return (String::new(), String::new());
    };
    let subject = rfc4514(parsed.subject());
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => sans.push(format!("DNS:{}", escape(dns))),
                GeneralName::RFC822Name(mail) => sans.push(format!("email:{}", escape(mail))),
                GeneralName::URI(uri) => sans.push(format!("URI:{}", escape(uri))),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => {
                        let b: [u8; 4] = (*bytes).try_into().unwrap_or_default();
                        sans.push(format!("IP:{}", std::net::Ipv4Addr::from(b)))
                    }
                    16 => {
                        let b: [u8; 16] = (*bytes).try_into().unwrap_or_default();
                        sans.push(format!("IP:{}", std::net::Ipv6Addr::from(b)))
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    (subject, sans.join(","))
}

/// `name` as RFC 4514 text: the last RDN first, attributes of one RDN
/// joined by `+`, each value escaped (see [`escape`]) — so that a `,` in
/// a name can never be read as the start of another attribute.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type();
                    let key = x509_parser::objects::oid2abbrev(oid, registry)
                        .map_or_else(|_| oid.to_id_string(), str::to_string);
                    let value = match attr.as_str() {
                        Ok(text) => escape(text),
                        // Not a string type: its DER bytes, in hex (RFC 4514 2.4).
                        Err(_) => format!(
                            "#{}",
                            attr.attr_value()
                                .data
                                .iter()
                                .map(|b| format!("{b:02x}"))
                                .collect::<String>()
                        ),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// Escapes a value as RFC 4514 does: `"` `+` `,` `;` `<` `>` `\` get a
/// backslash, as do a leading `#` or space and a trailing space; control
/// characters become `\XX` (hex).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Client side (`nbnet send --tls`, `nbnet bench --tls`): what to trust
/// and who to be.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// CA certificate(s) that signed the server's certificate. `None`: the
    /// server's certificate is not verified (`--insecure`).
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name to verify the server's certificate against; by default the
    /// address's IP (or "localhost" for a Unix socket).
    pub server_name: Option<String>,
}

/// Builds a client configuration (session resumption on: rustls' default
/// in-memory client cache).
pub fn client_config(options: &ClientOptions) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &options.ca {
        Some(file) => {
            let mut problems = Vec::new();
            let mut roots = RootCertStore::empty();
            for ca in read_certificates(file, "--ca", &mut problems) {
                if let Err(e) = roots.add(ca) {
                    problems.push(format!("--ca {}: {e}", file.display()));
                }
            }
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider()))),
    };
    let config = match &options.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let mut problems = Vec::new();
            let certs = read_certificates(cert, "--cert", &mut problems);
            let key = read_key(key, &mut problems);
            match key {
                Some(key) if problems.is_empty() => builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("--cert/--key: {e}"))?,
                _ => return Err(problems.join("; ")),
            }
        }
    };
    Ok(Arc::new(config))
}

/// The server name a client verifies: `--server-name`, else the address's IP.
pub fn server_name(options: &ClientOptions, addr: &str) -> Result<ServerName<'static>, String> {
    let text = match &options.server_name {
        Some(name) => name.clone(),
        None => match addr.parse::<std::net::SocketAddr>() {
            Ok(addr) => addr.ip().to_string(),
            Err(_) => "localhost".to_string(),
        },
    };
    ServerName::try_from(text.clone()).map_err(|e| format!("server name {text:?}: {e}"))
}

/// `--insecure`: accepts any server certificate (signatures still checked).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `--tls` and its options (`nbnet send`, `nbnet bench`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Speak TLS to the server.
    #[arg(long)]
    pub tls: bool,
    /// PEM CA certificate(s) that signed the server's certificate.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[arg(long, requires = "tls", conflicts_with = "ca")]
    pub insecure: bool,
    /// Client certificate (PEM) for mutual TLS; needs --key.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key"])]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's IP).
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub server_name: Option<String>,
}

impl TlsArgs {
    /// The client options, `None` without `--tls`; an error (a usage
    /// error) when neither `--ca` nor `--insecure` is given.
    pub fn options(&self) -> Result<Option<ClientOptions>, String> {
        if !self.tls {
            return Ok(None);
        }
        if self.ca.is_none() && !self.insecure {
            return Err(
                "--tls needs --ca FILE (the CA that signed the server's certificate), or --insecure to skip verifying it".into(),
            );
        }
        Ok(Some(ClientOptions {
            ca: self.ca.clone(),
            identity: self.cert.clone().zip(self.key.clone()),
            server_name: self.server_name.clone(),
        }))
    }
}
