//! Shared test helpers: a test PKI (CA + CA:FALSE leaf for "localhost"), TLS configs for our
//! stack and for quinn, and a deterministic PRNG.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use mqttd_quic::{ClientConfig, ServerConfig, TransportConfig};

pub const ALPN: &[u8] = b"mqtt";

/// A CA and a leaf certificate for "localhost" signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub leaf_pem: String,
    pub leaf_der: Vec<u8>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mqttd-quic test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let leaf = params.signed_by(&key, &ca, &ca_key).expect("leaf");
        Pki {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            leaf_pem: leaf.pem(),
            leaf_der: leaf.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    pub fn server_tls(&self) -> mqttd_tls::ServerConfig {
        mqttd_tls::ServerConfig::builder()
            .cert_chain_pem(self.leaf_pem.as_bytes())
            .private_key_pem(self.key_pem.as_bytes())
            .alpn(&[ALPN])
            .build()
            .expect("server TLS config")
    }

    pub fn client_tls(&self) -> mqttd_tls::ClientConfig {
        mqttd_tls::ClientConfig::builder()
            .ca_pem(self.ca_pem.as_bytes())
            .alpn(&[ALPN])
            .enable_early_data(true)
            .build()
            .expect("client TLS config")
    }

    pub fn server_config(&self) -> ServerConfig {
        ServerConfig::new(self.server_tls())
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.client_tls())
    }

    pub fn quinn_server_config(&self) -> quinn::ServerConfig {
        let certs = vec![rustls::pki_types::CertificateDer::from(
            self.leaf_der.clone(),
        )];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(self.key_der.clone()),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("cert");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = u32::MAX;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(200u32.into());
        transport.stream_receive_window((4u32 << 20).into());
        transport.receive_window((16u32 << 20).into());
        transport.datagram_receive_buffer_size(Some(1 << 20));
        cfg.transport_config(Arc::new(transport));
        cfg
    }

    pub fn quinn_client_config(&self) -> quinn::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.enable_early_data = true;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(200u32.into());
        transport.stream_receive_window((4u32 << 20).into());
        transport.receive_window((16u32 << 20).into());
        transport.datagram_receive_buffer_size(Some(1 << 20));
        cfg.transport_config(Arc::new(transport));
        cfg
    }

    /// A quinn client endpoint on a loopback port that trusts this PKI.
    pub fn quinn_client(&self) -> quinn::Endpoint {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut ep = quinn::Endpoint::client(any).expect("quinn client");
        ep.set_default_client_config(self.quinn_client_config());
        ep
    }
}

/// Transport settings for tests: short idle timeout so failures end quickly.
pub fn transport() -> TransportConfig {
    TransportConfig {
        idle_timeout: Duration::from_secs(10),
        ..TransportConfig::default()
    }
}

/// xorshift64*: deterministic randomness for loss and payloads (shared with the relay).
#[allow(unused_imports)]
pub use mqttd_test_support::Rng;

/// Serves echo on every bidi stream of every connection of our endpoint; echoes datagrams.
pub fn spawn_echo(ep: mqttd_quic::Endpoint) {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        while let Some(connecting) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = connecting.await else { return };
                let c2 = conn.clone();
                tokio::spawn(async move {
                    while let Ok(d) = c2.read_datagram().await {
                        let _ = c2.send_datagram(d);
                    }
                });
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match recv.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(n) => {
                                    if send.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
}

/// Serves echo on every bidi stream of every connection of a quinn endpoint; echoes datagrams.
pub fn spawn_quinn_echo(ep: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let c2 = conn.clone();
                tokio::spawn(async move {
                    while let Ok(d) = c2.read_datagram().await {
                        let _ = c2.send_datagram(d);
                    }
                });
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match recv.read(&mut buf).await {
                                Ok(Some(n)) => {
                                    if send.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => break,
                                Err(_) => return,
                            }
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Sends `payload` on a new bidirectional stream of ours, finishes it, and returns everything
/// the peer echoed until its FIN (writing and reading at once, so any size works).
pub async fn echo(conn: &mqttd_quic::Connection, payload: Vec<u8>) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    // Room for a wrong echo to show up as different bytes rather than as "too long".
    let limit = 2 * payload.len() + 64;
    let writer = tokio::spawn(async move {
        send.write_all(&payload).await.expect("write");
        send.finish().expect("finish");
    });
    let got = recv.read_to_end(limit).await.expect("read");
    writer.await.expect("writer");
    got
}

/// [`echo`] from a quinn client connection.
pub async fn quinn_echo(conn: &quinn::Connection, payload: Vec<u8>) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    // Room for a wrong echo to show up as different bytes rather than as "too long".
    let limit = 2 * payload.len() + 64;
    let writer = tokio::spawn(async move {
        send.write_all(&payload).await.expect("write");
        send.finish().expect("finish");
    });
    let got = recv.read_to_end(limit).await.expect("read");
    writer.await.expect("writer");
    got
}
