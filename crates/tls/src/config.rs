//! Safe TLS configuration: what a server or a client presents and accepts. Built once, shared by
//! every connection (`Arc` inside; cloning is cheap).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use openssl::ex_data::Index;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    AlpnError, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslRef, SslSession,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;

use crate::backend::CipherSuite;
use crate::error::TlsError;

/// PEM bytes plus where they came from, for error messages.
#[derive(Clone)]
struct Pem {
    bytes: Vec<u8>,
    origin: String,
}

fn pem_from_file(what: &'static str, path: &Path) -> Result<Pem, TlsError> {
    std::fs::read(path)
        .map(|bytes| Pem {
            bytes,
            origin: path.display().to_string(),
        })
        .map_err(|source| TlsError::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn pem_from_memory(bytes: &[u8]) -> Pem {
    Pem {
        bytes: bytes.to_vec(),
        origin: "memory".into(),
    }
}

fn certs(what: &'static str, pem: &Pem) -> Result<Vec<X509>, TlsError> {
    let certs = X509::stack_from_pem(&pem.bytes).map_err(|e| TlsError::BadPem {
        what,
        origin: pem.origin.clone(),
        detail: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            what,
            origin: pem.origin.clone(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn private_key(pem: &Pem) -> Result<PKey<Private>, TlsError> {
    PKey::private_key_from_pem(&pem.bytes).map_err(|e| TlsError::BadPem {
        what: "private key",
        origin: pem.origin.clone(),
        detail: e.to_string(),
    })
}

/// ALPN protocols in TLS wire format (length-prefixed).
pub(crate) fn alpn_wire(protocols: &[Vec<u8>]) -> Result<Vec<u8>, TlsError> {
    let mut wire = Vec::new();
    for p in protocols {
        let len = u8::try_from(p.len())
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| {
                TlsError::Config(format!(
                    "ALPN protocol {:?} must be 1 to 255 bytes",
                    String::from_utf8_lossy(p)
                ))
            })?;
        wire.push(len);
        wire.extend_from_slice(p);
    }
    Ok(wire)
}

fn suites(list: &[CipherSuite]) -> Result<String, TlsError> {
    if list.is_empty() {
        return Err(TlsError::Config(
            "at least one cipher suite is needed".into(),
        ));
    }
    Ok(list.iter().map(|s| s.name()).collect::<Vec<_>>().join(":"))
}

/// Checks a key-exchange group list and joins it in OpenSSL's `:`-separated syntax.
fn groups_list(groups: &[String]) -> Result<String, TlsError> {
    if groups.is_empty() {
        return Err(TlsError::Config(
            "at least one key exchange group is needed (or leave groups unset for OpenSSL's default)"
                .into(),
        ));
    }
    for g in groups {
        if g.is_empty() || g.contains([':', '\0']) || g.chars().any(char::is_whitespace) {
            return Err(TlsError::Config(format!(
                "key exchange group {g:?} is not a group name (one name per entry, no ':' or spaces)"
            )));
        }
    }
    Ok(groups.join(":"))
}

fn base_builder(
    cipher_suites: &[CipherSuite],
    groups: Option<&[String]>,
) -> Result<SslContextBuilder, TlsError> {
    crate::init();
    let mut b = SslContextBuilder::new(SslMethod::tls())?;
    // QUIC is TLS 1.3 only (RFC 9001, section 4.2).
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ciphersuites(&suites(cipher_suites)?)?;
    if let Some(groups) = groups {
        let list = groups_list(groups)?;
        // groups_list refused NUL bytes, so set_groups_list cannot panic on them.
        b.set_groups_list(&list).map_err(|e| {
            TlsError::Config(format!(
                "key exchange groups \"{list}\" not accepted by OpenSSL (unknown or unsupported \
                 name?): {e}"
            ))
        })?;
        b.set_ex_data(groups_index(), format!("[{}]", groups.join(", ")));
    }
    if let Some(path) = std::env::var_os("SSLKEYLOGFILE").filter(|p| !p.is_empty()) {
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => {
                let file = Mutex::new(file);
                b.set_keylog_callback(move |_, line| {
                    if let Ok(mut f) = file.lock() {
                        let _ = writeln!(f, "{line}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(path = %Path::new(&path).display(), error = %e, "cannot open SSLKEYLOGFILE")
            }
        }
    }
    Ok(b)
}

/// Index of the client's ALPN offer, kept on the SSL object for error messages.
pub(crate) fn alpn_offer_index() -> Index<Ssl, Vec<u8>> {
    static INDEX: OnceLock<Index<Ssl, Vec<u8>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL cannot allocate an ex_data index"))
}

/// Index of the session-cache key (the server name) of a client connection.
pub(crate) fn cache_key_index() -> Index<Ssl, String> {
    static INDEX: OnceLock<Index<Ssl, String>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL cannot allocate an ex_data index"))
}

/// Index of the configured key-exchange group list (`[X25519, P-256]`) on an SSL context, for
/// error messages; absent means OpenSSL's default list.
pub(crate) fn groups_index() -> Index<SslContext, String> {
    static INDEX: OnceLock<Index<SslContext, String>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        SslContext::new_ex_index().expect("OpenSSL cannot allocate an ex_data index")
    })
}

/// The server's ALPN choice: its most preferred protocol that the client offered.
fn select_alpn<'a>(
    ssl: &mut SslRef,
    server_wire: &[u8],
    client: &'a [u8],
) -> Result<&'a [u8], AlpnError> {
    // Kept for the error message should nothing match.
    ssl.set_ex_data(alpn_offer_index(), client.to_vec());
    for wanted in wire_entries(server_wire) {
        if let Some(offered) = wire_entries(client).find(|offered| *offered == wanted) {
            return Ok(offered);
        }
    }
    Err(AlpnError::ALERT_FATAL)
}

/// The protocols of a length-prefixed ALPN list; a truncated last entry is ignored.
pub(crate) fn wire_entries(mut wire: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = wire.split_first()?;
        let len = usize::from(len);
        if rest.len() < len {
            wire = &[];
            return None;
        }
        let (entry, tail) = rest.split_at(len);
        wire = tail;
        Some(entry)
    })
}

/// A server's TLS configuration.
#[derive(Clone)]
pub struct ServerConfig {
    pub(crate) inner: Arc<ServerInner>,
}

pub(crate) struct ServerInner {
    pub(crate) ctx: SslContext,
    pub(crate) alpn: Vec<Vec<u8>>,
    pub(crate) early_data: bool,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("alpn", &self.inner.alpn)
            .field("early_data", &self.inner.early_data)
            .finish()
    }
}

impl ServerConfig {
    /// Starts a configuration; a certificate chain and its key are required.
    pub fn builder() -> ServerConfigBuilder {
        ServerConfigBuilder {
            chain: None,
            key: None,
            alpn: Vec::new(),
            suites: CipherSuite::ALL.to_vec(),
            max_early_data: u32::MAX,
            client_ca: None,
            groups: None,
            error: None,
        }
    }

    /// The ALPN protocols the server accepts, in preference order.
    pub fn alpn(&self) -> &[Vec<u8>] {
        &self.inner.alpn
    }
}

/// Builds a [`ServerConfig`].
pub struct ServerConfigBuilder {
    chain: Option<Pem>,
    key: Option<Pem>,
    alpn: Vec<Vec<u8>>,
    suites: Vec<CipherSuite>,
    max_early_data: u32,
    client_ca: Option<Pem>,
    groups: Option<Vec<String>>,
    error: Option<TlsError>,
}

impl ServerConfigBuilder {
    fn keep<T>(&mut self, r: Result<T, TlsError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    /// The certificate chain (leaf first) as PEM bytes.
    pub fn cert_chain_pem(mut self, pem: &[u8]) -> Self {
        self.chain = Some(pem_from_memory(pem));
        self
    }

    /// The certificate chain (leaf first) from a PEM file.
    pub fn cert_chain_file(mut self, path: impl AsRef<Path>) -> Self {
        let r = pem_from_file("certificate chain", path.as_ref());
        self.chain = self.keep(r);
        self
    }

    /// The private key as PEM bytes.
    pub fn private_key_pem(mut self, pem: &[u8]) -> Self {
        self.key = Some(pem_from_memory(pem));
        self
    }

    /// The private key from a PEM file.
    pub fn private_key_file(mut self, path: impl AsRef<Path>) -> Self {
        let r = pem_from_file("private key", path.as_ref());
        self.key = self.keep(r);
        self
    }

    /// ALPN protocols accepted, in the server's preference order. A client offering none of them
    /// is refused with alert 120 (no_application_protocol), as RFC 9001 requires.
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// The TLS 1.3 cipher suites offered (default: all three).
    pub fn cipher_suites(mut self, suites: &[CipherSuite]) -> Self {
        self.suites = suites.to_vec();
        self
    }

    /// The key exchange groups (TLS 1.3 `supported_groups`) this side accepts, in preference
    /// order, by OpenSSL name: `"X25519MLKEM768"` (hybrid post-quantum), `"X25519"`,
    /// `"SecP256r1MLKEM768"`, `"P-256"`, `"P-384"`, `"P-521"`, `"X448"`, `"ffdhe2048"`, ...
    ///
    /// Unset (the default) means OpenSSL 3.5's default list, which prefers the hybrid
    /// `X25519MLKEM768` (ML-KEM-768 + X25519, resistant to "harvest now, decrypt later"), then
    /// `X25519`, then the NIST curves; an OpenSSL 3.5 client sends key shares for both
    /// `X25519MLKEM768` and `X25519` in its first flight. The hybrid costs more per handshake
    /// (ML-KEM key generation and encapsulation, about 1.2 KB more in each direction, so the
    /// client's first flight spans two Initial packets) than `X25519` alone, which is what most
    /// other QUIC stacks (e.g. quinn with rustls) still use by default. `&["X25519"]` trades the
    /// post-quantum protection for that speed. When the two sides' lists share no group, the
    /// server refuses the handshake with alert 40 (handshake_failure) and its error names both
    /// lists. An unknown name fails `build()`.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
        self
    }

    /// 0-RTT: 0 disables early data; any other value enables it (QUIC always advertises
    /// 0xffffffff in the ticket, RFC 9001 section 4.6.1). Default: enabled.
    pub fn max_early_data(mut self, bytes: u32) -> Self {
        self.max_early_data = bytes;
        self
    }

    /// Requires client certificates signed by one of these CAs (PEM), i.e. mutual TLS.
    pub fn client_ca_pem(mut self, pem: &[u8]) -> Self {
        self.client_ca = Some(pem_from_memory(pem));
        self
    }

    /// Requires client certificates signed by a CA from this PEM file.
    pub fn client_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        let r = pem_from_file("client CA certificates", path.as_ref());
        self.client_ca = self.keep(r);
        self
    }

    /// Checks everything (PEM syntax, key matches certificate, ALPN lengths) and builds.
    pub fn build(self) -> Result<ServerConfig, TlsError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let chain = self
            .chain
            .ok_or_else(|| TlsError::Config("the server needs a certificate chain".into()))?;
        let key_pem = self
            .key
            .ok_or_else(|| TlsError::Config("the server needs a private key".into()))?;
        let mut b = base_builder(&self.suites, self.groups.as_deref())?;
        let chain_certs = certs("certificate chain", &chain)?;
        let key = private_key(&key_pem)?;
        b.set_certificate(&chain_certs[0])?;
        for extra in &chain_certs[1..] {
            b.add_extra_chain_cert(extra.clone())?;
        }
        let mismatch = || TlsError::KeyMismatch {
            cert: chain.origin.clone(),
            key: key_pem.origin.clone(),
        };
        b.set_private_key(&key).map_err(|_| mismatch())?;
        b.check_private_key().map_err(|_| mismatch())?;
        // Send exactly the configured chain. Without this, a chain of only the leaf makes
        // OpenSSL try to complete it on every handshake (an X509_verify_cert over the context's
        // certificate store, which a server context here never fills, so it finds nothing).
        b.set_mode(SslMode::NO_AUTO_CHAIN);
        b.set_session_id_context(b"mqttd")?;

        let alpn = self.alpn.clone();
        let server_wire = alpn_wire(&alpn)?;
        b.set_alpn_select_callback(move |ssl, client| select_alpn(ssl, &server_wire, client));

        if self.max_early_data > 0 {
            b.set_max_early_data(u32::MAX)?;
            // OpenSSL's anti-replay cache would make every ticket single-use per process and
            // refuse 0-RTT on any other, as in ngtcp2's server. Early data can therefore be
            // replayed: the application must limit what it serves before the handshake
            // completes (mqttd serves only the CONNECT; see mqttd's quic.rs for what a replayed
            // CONNECT can still do). `max_early_data` is only set when the user enabled 0-RTT.
            b.set_options(openssl::ssl::SslOptions::from_bits_retain(
                crate::ossl::SSL_OP_NO_ANTI_REPLAY,
            ));
        }
        if let Some(ca) = &self.client_ca {
            let mut store = X509StoreBuilder::new()?;
            for cert in certs("client CA certificates", ca)? {
                b.add_client_ca(&cert)?;
                store.add_cert(cert)?;
            }
            b.set_verify_cert_store(store.build())?;
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        Ok(ServerConfig {
            inner: Arc::new(ServerInner {
                ctx: b.build(),
                alpn: self.alpn,
                early_data: self.max_early_data > 0,
            }),
        })
    }
}

/// A client's TLS configuration, including its cache of session tickets for resumption and 0-RTT.
#[derive(Clone)]
pub struct ClientConfig {
    pub(crate) inner: Arc<ClientInner>,
}

pub(crate) struct ClientInner {
    pub(crate) ctx: SslContext,
    pub(crate) alpn: Vec<Vec<u8>>,
    pub(crate) early_data: bool,
    pub(crate) cache: Arc<Mutex<SessionCache>>,
}

/// Tickets and 0-RTT transport parameters per server name.
#[derive(Default)]
pub(crate) struct SessionCache {
    pub(crate) tickets: HashMap<String, SslSession>,
    pub(crate) early_params: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("alpn", &self.inner.alpn)
            .field("early_data", &self.inner.early_data)
            .finish()
    }
}

impl ClientConfig {
    /// Starts a configuration that trusts the system's CA roots.
    pub fn builder() -> ClientConfigBuilder {
        ClientConfigBuilder {
            roots: None,
            alpn: Vec::new(),
            suites: CipherSuite::ALL.to_vec(),
            identity: None,
            early_data: true,
            verify: true,
            groups: None,
            error: None,
        }
    }

    /// Whether a session ticket for `server_name` is cached (the next connection resumes).
    pub fn has_ticket(&self, server_name: &str) -> bool {
        self.inner
            .cache
            .lock()
            .is_ok_and(|c| c.tickets.contains_key(server_name))
    }
}

/// Builds a [`ClientConfig`].
pub struct ClientConfigBuilder {
    roots: Option<Pem>,
    alpn: Vec<Vec<u8>>,
    suites: Vec<CipherSuite>,
    identity: Option<(Pem, Pem)>,
    early_data: bool,
    verify: bool,
    groups: Option<Vec<String>>,
    error: Option<TlsError>,
}

impl ClientConfigBuilder {
    /// Accepts any server certificate, without checking its chain or name (for test setups and
    /// `mqttd pub --insecure`: the connection is encrypted but the server is not authenticated).
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.verify = !accept;
        self
    }

    /// Trusts exactly these CA certificates (PEM) instead of the system roots.
    pub fn ca_pem(mut self, pem: &[u8]) -> Self {
        self.roots = Some(pem_from_memory(pem));
        self
    }

    /// Trusts exactly the CA certificates in this PEM file instead of the system roots.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        match pem_from_file("CA certificates", path.as_ref()) {
            Ok(p) => self.roots = Some(p),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// ALPN protocols offered, in preference order.
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// The TLS 1.3 cipher suites offered (default: all three).
    pub fn cipher_suites(mut self, suites: &[CipherSuite]) -> Self {
        self.suites = suites.to_vec();
        self
    }

    /// A client certificate chain and key (PEM) for servers that require mutual TLS.
    pub fn client_cert_pem(mut self, chain: &[u8], key: &[u8]) -> Self {
        self.identity = Some((pem_from_memory(chain), pem_from_memory(key)));
        self
    }

    /// The key exchange groups (TLS 1.3 `supported_groups`) this side accepts, in preference
    /// order, by OpenSSL name: `"X25519MLKEM768"` (hybrid post-quantum), `"X25519"`,
    /// `"SecP256r1MLKEM768"`, `"P-256"`, `"P-384"`, `"P-521"`, `"X448"`, `"ffdhe2048"`, ...
    ///
    /// Unset (the default) means OpenSSL 3.5's default list, which prefers the hybrid
    /// `X25519MLKEM768` (ML-KEM-768 + X25519, resistant to "harvest now, decrypt later"), then
    /// `X25519`, then the NIST curves; an OpenSSL 3.5 client sends key shares for both
    /// `X25519MLKEM768` and `X25519` in its first flight. The hybrid costs more per handshake
    /// (ML-KEM key generation and encapsulation, about 1.2 KB more in each direction, so the
    /// client's first flight spans two Initial packets) than `X25519` alone, which is what most
    /// other QUIC stacks (e.g. quinn with rustls) still use by default. `&["X25519"]` trades the
    /// post-quantum protection for that speed. When the two sides' lists share no group, the
    /// server refuses the handshake with alert 40 (handshake_failure) and its error names both
    /// lists. An unknown name fails `build()`.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
        self
    }

    /// Whether to send 0-RTT data when a ticket allows it (default: yes).
    pub fn enable_early_data(mut self, on: bool) -> Self {
        self.early_data = on;
        self
    }

    /// Checks everything and builds.
    pub fn build(self) -> Result<ClientConfig, TlsError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut b = base_builder(&self.suites, self.groups.as_deref())?;
        match &self.roots {
            Some(pem) => {
                let mut store = X509StoreBuilder::new()?;
                for cert in certs("CA certificates", pem)? {
                    store.add_cert(cert)?;
                }
                b.set_verify_cert_store(store.build())?;
            }
            None => b.set_default_verify_paths()?,
        }
        b.set_verify(if self.verify {
            SslVerifyMode::PEER
        } else {
            SslVerifyMode::NONE
        });
        if let Some((chain, key_pem)) = &self.identity {
            let chain_certs = certs("client certificate chain", chain)?;
            let key = private_key(key_pem)?;
            b.set_certificate(&chain_certs[0])?;
            for extra in &chain_certs[1..] {
                b.add_extra_chain_cert(extra.clone())?;
            }
            let mismatch = || TlsError::KeyMismatch {
                cert: chain.origin.clone(),
                key: key_pem.origin.clone(),
            };
            b.set_private_key(&key).map_err(|_| mismatch())?;
            b.check_private_key().map_err(|_| mismatch())?;
        }
        let cache = Arc::new(Mutex::new(SessionCache::default()));
        let tickets = Arc::clone(&cache);
        b.set_session_cache_mode(SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL);
        b.set_new_session_callback(move |ssl, session| {
            if let (Some(key), Ok(mut cache)) = (ssl.ex_data(cache_key_index()), tickets.lock()) {
                cache.tickets.insert(key.clone(), session);
            }
        });
        let alpn = self.alpn.clone();
        // Validate lengths now, so a bad ALPN fails here and not per connection.
        alpn_wire(&alpn)?;
        Ok(ClientConfig {
            inner: Arc::new(ClientInner {
                ctx: b.build(),
                alpn,
                early_data: self.early_data,
                cache,
            }),
        })
    }
}
