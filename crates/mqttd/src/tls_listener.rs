//! The MQTT-over-TLS listener (TCP, 8883 by convention; `shared/DESIGN.md`, "Broker").
//!
//! Off unless `tls_listen` is set, like a mosquitto `listener 8883` with its `certfile`. Each
//! accepted socket is admitted under the same `max_connections` as the other listeners, the
//! TLS handshake runs under `connect_timeout_secs`, and the decrypted stream is handed to the
//! very same [`serve_connection`] as a plain TCP socket or a QUIC stream: one session layer for
//! every transport, so a persistent session moves freely between TCP, TLS and QUIC.
//!
//! - TLS 1.2 and 1.3 by default (many devices in the field still speak only 1.2), or TLS 1.3
//!   only (`tls_min_version = "1.3"`); the cipher suites are Mozilla's "intermediate" set as
//!   OpenSSL 3.5 knows it (forward secrecy and AEAD only).
//! - Certificates: `tls_cert`/`tls_key` when configured; otherwise the broker's generated
//!   self-signed pair in the data directory, the same one the QUIC listener serves, so a
//!   client that trusts `quic-cert.pem` trusts both.
//! - Client certificates: with `tls_cafile`, clients may present a certificate, which must
//!   then chain to one of those CAs; `tls_require_certificate` refuses clients without one
//!   (mosquitto's `require_certificate`).
//! - ALPN: `mqtt` is selected when the client offers it; a client offering something else (or
//!   nothing) gets no ALPN answer and carries on, as with mosquitto.
//! - Idle connections give their TLS buffers back (`SSL_MODE_RELEASE_BUFFERS`), so a fleet of
//!   quiet devices costs little more over TLS than over plain TCP.
//!
//! A client that fails the handshake (plain MQTT on the TLS port, a wrong or missing client
//! certificate, no common version, a stall) is logged at debug level and closed; it never
//! reaches the broker and costs the other clients nothing but its accept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::pkey::PKey;
use openssl::ssl::{
    AlpnError, Ssl, SslAcceptor, SslMethod, SslMode, SslVerifyMode, SslVersion, select_next_proto,
};
use openssl::x509::X509;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_openssl::SslStream;

use crate::config::{TlsConfig, TlsVersion};
use crate::quic::{QuicError, certificate, fingerprint, leaf_der};
use crate::server::{ConnContext, serve_connection};

/// ALPN protocol list (wire format) the listener selects from: MQTT's.
const ALPN_WIRE: &[u8] = b"\x04mqtt";

/// Why the TLS listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum TlsListenerError {
    /// The TCP socket could not be bound.
    #[error("cannot listen for MQTT over TLS on {addr} (`tls_listen`): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate or key could not be read, generated or parsed.
    #[error("{0}")]
    Certificate(#[from] QuicError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// OpenSSL refused part of the configuration.
    #[error("MQTT over TLS configuration ({what}): {source}")]
    Tls {
        /// Which setting or file.
        what: String,
        /// OpenSSL's errors.
        source: ErrorStack,
    },
}

/// A running TLS listener.
#[derive(Debug)]
pub struct TlsListener {
    /// The TCP address it listens on.
    pub local_addr: SocketAddr,
    /// SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fingerprint: String,
    /// Where the certificate came from (the configured file or the generated one).
    pub cert_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Waits until the accept loop has ended (after shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn tls_error(what: impl Into<String>) -> impl FnOnce(ErrorStack) -> TlsListenerError {
    let what = what.into();
    move |source| TlsListenerError::Tls { what, source }
}

/// The OpenSSL acceptor for `config` serving this PEM chain and key.
fn acceptor(
    config: &TlsConfig,
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
) -> Result<SslAcceptor, TlsListenerError> {
    let cert_what = cert_path.display().to_string();
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(tls_error("OpenSSL context"))?;
    let mut chain = X509::stack_from_pem(cert_pem)
        .map_err(tls_error(cert_what.clone()))?
        .into_iter();
    let leaf = chain
        .next()
        .ok_or_else(|| QuicError::NoCertificate(cert_path.to_owned()))?;
    b.set_certificate(&leaf)
        .map_err(tls_error(cert_what.clone()))?;
    for extra in chain {
        b.add_extra_chain_cert(extra)
            .map_err(tls_error(cert_what.clone()))?;
    }
    let key = PKey::private_key_from_pem(key_pem).map_err(tls_error("`tls_key`"))?;
    b.set_private_key(&key).map_err(tls_error(
        "`tls_key`, which must be the key of the certificate",
    ))?;
    b.check_private_key()
        .map_err(tls_error("`tls_key` does not match `tls_cert`"))?;
    let min = match config.min_version {
        TlsVersion::V1_2 => SslVersion::TLS1_2,
        TlsVersion::V1_3 => SslVersion::TLS1_3,
    };
    b.set_min_proto_version(Some(min))
        .map_err(tls_error("`tls_min_version`"))?;
    match &config.cafile {
        Some(ca) => {
            let what = format!("`tls_cafile` {}", ca.display());
            let pem = std::fs::read(ca).map_err(|source| TlsListenerError::File {
                path: ca.clone(),
                source,
            })?;
            let cas = X509::stack_from_pem(&pem).map_err(tls_error(what.clone()))?;
            if cas.is_empty() {
                return Err(QuicError::NoCertificate(ca.clone()).into());
            }
            for ca_cert in &cas {
                b.cert_store_mut()
                    .add_cert(ca_cert.clone())
                    .map_err(tls_error(what.clone()))?;
                b.add_client_ca(ca_cert).map_err(tls_error(what.clone()))?;
            }
            let mut mode = SslVerifyMode::PEER;
            if config.require_certificate {
                mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
            }
            b.set_verify(mode);
            // Resumed sessions must carry the same verification context.
            b.set_session_id_context(b"mqttd")
                .map_err(tls_error(what))?;
        }
        None => b.set_verify(SslVerifyMode::NONE),
    }
    b.set_alpn_select_callback(|_, offered| {
        select_next_proto(ALPN_WIRE, offered).ok_or(AlpnError::NOACK)
    });
    b.set_mode(SslMode::RELEASE_BUFFERS);
    Ok(b.build())
}

/// Binds the TLS listener and starts accepting connections into the broker behind `ctx`,
/// until `shutdown` turns true.
pub async fn start(
    config: &TlsConfig,
    data_dir: &Path,
    ctx: ConnContext,
    shutdown: watch::Receiver<bool>,
) -> Result<TlsListener, TlsListenerError> {
    let (cert_pem, key_pem, cert_path, generated) =
        certificate(config.cert_and_key.as_ref(), config.listen, data_dir)?;
    let fingerprint = fingerprint(&leaf_der(&cert_pem, &cert_path)?);
    let acceptor = Arc::new(acceptor(config, &cert_pem, &key_pem, &cert_path)?);
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| TlsListenerError::Bind {
                addr: config.listen,
                source,
            })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| TlsListenerError::Bind {
            addr: config.listen,
            source,
        })?;
    if generated {
        tracing::info!(cert = %cert_path.display(), sha256 = %fingerprint, "generated a self-signed certificate");
    }
    tracing::info!(tls = %local_addr, cert = %cert_path.display(), sha256 = %fingerprint, client_certificates = config.cafile.is_some(), "MQTT over TLS listening");
    let task = tokio::spawn(accept_loop(listener, acceptor, ctx, shutdown));
    Ok(TlsListener {
        local_addr,
        fingerprint,
        cert_path,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<SslAcceptor>,
    ctx: ConnContext,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "TLS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admission) = ctx.admit() else {
            tracing::warn!(%peer, max_connections = ctx.limits().max_connections, "TLS connection refused: limit reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let timeout = ctx.limits().connect_timeout;
            match tokio::time::timeout(timeout, handshake(&acceptor, stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, peer, admission.conn, ctx).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {
                    tracing::debug!(%peer, ?timeout, "TLS handshake timed out");
                }
            }
            drop(admission);
        });
    }
}

/// Runs the server side of the TLS handshake on `tcp`.
async fn handshake(acceptor: &SslAcceptor, tcp: TcpStream) -> Result<SslStream<TcpStream>, String> {
    let ssl = Ssl::new(acceptor.context()).map_err(|e| e.to_string())?;
    let mut tls = SslStream::new(ssl, tcp).map_err(|e| e.to_string())?;
    Pin::new(&mut tls)
        .accept()
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TlsConfig {
        TlsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_and_key: None,
            cafile: None,
            require_certificate: false,
            min_version: TlsVersion::V1_2,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqttd-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused_by_name() {
        let dir = temp_dir("mismatch");
        let (cert, _, path, _) = certificate(None, config().listen, &dir).expect("generate");
        let other = rcgen::KeyPair::generate().expect("key");
        let Err(err) = acceptor(&config(), &cert, other.serialize_pem().as_bytes(), &path) else {
            panic!("mismatched key")
        };
        let text = err.to_string();
        assert!(
            text.contains("`tls_key`") && text.contains("mismatch"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cafile_without_certificates_is_named() {
        let dir = temp_dir("cafile");
        let (cert, key, path, _) = certificate(None, config().listen, &dir).expect("generate");
        let ca = dir.join("empty-ca.pem");
        std::fs::write(&ca, b"no certificates here\n").expect("write");
        let mut c = config();
        c.cafile = Some(ca.clone());
        let Err(err) = acceptor(&c, &cert, &key, &path) else {
            panic!("empty cafile")
        };
        assert!(err.to_string().contains("empty-ca.pem"), "{err}");
        c.cafile = Some(dir.join("missing.pem"));
        let Err(err) = acceptor(&c, &cert, &key, &path) else {
            panic!("missing cafile")
        };
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
