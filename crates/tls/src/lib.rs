//! `mqttd-tls`: ngtcp2's crypto backend written in Rust on OpenSSL 3.5's QUIC TLS API, and the
//! safe TLS configuration mqttd's QUIC layer uses.
//!
//! - [`ServerConfig`] / [`ClientConfig`]: certificates and keys (PEM files or bytes), ALPN,
//!   TLS 1.3 cipher suites, key exchange groups (default: OpenSSL 3.5's list, hybrid post-quantum
//!   X25519MLKEM768 first; `groups(&["X25519"])` for the classic, cheaper one), CA roots and
//!   server-name verification, mutual TLS, session tickets with resumption and 0-RTT,
//!   `SSLKEYLOGFILE` for Wireshark.
//! - [`TlsSession`]: one connection's TLS state, attached to an `ngtcp2_conn` by the QUIC layer.
//! - The backend: every `ngtcp2_crypto_*` function ngtcp2's `crypto/shared.c` needs (AEAD, header
//!   protection, HKDF, randomness, the CRYPTO-data exchange, transport parameters) is defined here
//!   with `#[no_mangle] extern "C"`, and `shared.c` itself is linked into this crate (see
//!   `build.rs`). A program that uses ngtcp2's crypto helper functions must depend on this crate.
//!
//! This crate does no I/O and owns no connection: the QUIC layer (`mqttd-quic`) drives it.
//! All `unsafe` sits in `backend`, `session` and `ossl`; C callbacks never unwind.

mod backend;
mod config;
mod error;
mod ossl;
mod session;

pub use backend::CipherSuite;
pub use config::{ClientConfig, ClientConfigBuilder, ServerConfig, ServerConfigBuilder};
pub use error::{TlsError, alert_name};
pub use session::TlsSession;

/// Initialises OpenSSL and the backend's algorithm table. Idempotent and cheap after the first
/// call; every constructor here calls it, so calling it is only needed before using ngtcp2's
/// crypto helper functions directly.
pub fn init() {
    let _ = backend::algorithms();
}

/// Fills `buf` from OpenSSL's CSPRNG (for connection IDs, tokens and stateless-reset secrets).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), TlsError> {
    openssl::rand::rand_bytes(buf).map_err(TlsError::from)
}

/// An ngtcp2 crypto context (AEAD, hash and header-protection handles of this backend) for
/// `suite`, as ngtcp2 would get it after the handshake; for tests and benchmarks that call the
/// `ngtcp2_crypto_*` functions directly.
pub fn crypto_ctx(suite: CipherSuite) -> mqttd_ngtcp2_sys::ngtcp2_crypto_ctx {
    let mut ctx = mqttd_ngtcp2_sys::ngtcp2_crypto_ctx::default();
    suite.fill(&mut ctx);
    ctx
}
