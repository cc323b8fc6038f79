//! How a benchmark client reaches the broker: a byte stream split into a read and a write half.
//!
//! Two transports: [`Tcp`], and [`Quic`], MQTT over QUIC in single-stream mode (the first
//! client-initiated bidirectional stream carries the MQTT bytes exactly as TCP would; DESIGN.md,
//! "MQTT over QUIC"), on `mqttd-quic`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A way to open an MQTT byte stream to a broker.
pub trait Transport: Clone + Send + Sync + 'static {
    /// The read half of a connection.
    type Reader: AsyncRead + Unpin + Send + 'static;
    /// The write half of a connection.
    type Writer: AsyncWrite + Unpin + Send + 'static;

    /// Its name in reports (`tcp`, `quic`).
    fn name(&self) -> &'static str;

    /// Opens one connection to `addr`; also returns when its first packet left, after any
    /// local preparation (building a TLS context), so connect times measure the network
    /// handshake, not the generator's setup.
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<(Self::Reader, Self::Writer, Instant)>> + Send;
}

/// MQTT over plain TCP, with Nagle off so small packets leave at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp;

impl Transport for Tcp {
    type Reader = OwnedReadHalf;
    type Writer = OwnedWriteHalf;

    fn name(&self) -> &'static str {
        "tcp"
    }

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> io::Result<(OwnedReadHalf, OwnedWriteHalf, Instant)> {
        let began = Instant::now();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok((r, w, began))
    }
}

/// The ALPN of MQTT over QUIC (EMQX's, and mqttd's).
pub const MQTT_ALPN: &[u8] = b"mqtt";

/// How [`Quic`] authenticates the broker.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept any certificate: encrypted, not authenticated (test setups, self-signed brokers).
    Insecure,
    /// Trust exactly the CA certificates (or the self-signed certificate) in this PEM.
    CaPem(Vec<u8>),
    /// The system's CA roots.
    System,
}

/// Settings of the QUIC transport.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    /// How the server certificate is checked.
    pub trust: Trust,
    /// The name the certificate is checked against (and sent as SNI).
    pub server_name: String,
    /// Client UDP sockets (endpoints) the connections are spread over, round robin.
    pub endpoints: usize,
    /// A fresh TLS context per client, so every connection makes a full handshake, as
    /// independent devices would. Off: one context (and session-ticket cache) for all
    /// clients, so a client resumes a session when an unused ticket is at hand. A context costs
    /// about 12 ms of generator CPU to build (OpenSSL 3), which the connect time excludes.
    pub full_handshake: bool,
    /// QUIC idle timeout of the client side.
    pub idle_timeout: Duration,
    /// Write a qlog per connection into this directory.
    pub qlog_dir: Option<std::path::PathBuf>,
}

/// MQTT over QUIC, single-stream mode: each connection's first bidirectional stream is the MQTT
/// byte stream. Connections share a few client endpoints (UDP sockets), assigned round robin.
#[derive(Clone)]
pub struct Quic {
    inner: Arc<QuicInner>,
}

struct QuicInner {
    endpoints: Vec<mqttd_quic::Endpoint>,
    next: AtomicUsize,
    opts: QuicOptions,
    /// The shared client configuration when sessions are resumed.
    shared: Option<mqttd_quic::ClientConfig>,
    transport: Arc<mqttd_quic::TransportConfig>,
}

impl std::fmt::Debug for Quic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quic")
            .field("endpoints", &self.inner.endpoints.len())
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl Quic {
    /// Binds the client endpoints for connections to `remote` (must run inside a tokio runtime).
    pub fn new(opts: QuicOptions, remote: SocketAddr) -> Result<Self> {
        let local: SocketAddr = if remote.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoints = (0..opts.endpoints.max(1))
            .map(|_| mqttd_quic::Endpoint::client(local))
            .collect::<io::Result<Vec<_>>>()
            .context("cannot bind a client UDP socket")?;
        let transport = Arc::new(mqttd_quic::TransportConfig {
            idle_timeout: opts.idle_timeout,
            // MQTT over QUIC uses bidirectional streams only, and no datagrams.
            max_concurrent_uni_streams: 0,
            max_datagram_frame_size: 0,
            // As the broker's listener: large datagrams once a connection carries bulk data,
            // where the path allows them (loopback).
            max_udp_payload_size: mqttd_quic::MAX_UDP_PAYLOAD,
            qlog_dir: opts.qlog_dir.clone(),
            ..mqttd_quic::TransportConfig::default()
        });
        // Built even when unused: a bad CA file fails at start, not per client.
        let first = client_config(&opts, &transport)?;
        let shared = (!opts.full_handshake).then_some(first);
        Ok(Self {
            inner: Arc::new(QuicInner {
                endpoints,
                next: AtomicUsize::new(0),
                opts,
                shared,
                transport,
            }),
        })
    }
}

fn client_config(
    opts: &QuicOptions,
    transport: &Arc<mqttd_quic::TransportConfig>,
) -> Result<mqttd_quic::ClientConfig> {
    let mut tls = mqttd_tls::ClientConfig::builder().alpn(&[MQTT_ALPN]);
    tls = match &opts.trust {
        Trust::Insecure => tls.danger_accept_invalid_certs(true),
        Trust::CaPem(pem) => tls.ca_pem(pem),
        Trust::System => tls,
    };
    let mut config = mqttd_quic::ClientConfig::new(tls.build().context("QUIC client TLS")?);
    config.transport = transport.clone();
    Ok(config)
}

/// Reads a CA file for [`Trust::CaPem`].
pub fn read_ca(path: &Path) -> Result<Trust> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Trust::CaPem(pem))
}

impl Transport for Quic {
    type Reader = mqttd_quic::RecvStream;
    type Writer = mqttd_quic::SendStream;

    fn name(&self) -> &'static str {
        "quic"
    }

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> io::Result<(mqttd_quic::RecvStream, mqttd_quic::SendStream, Instant)> {
        let inner = &self.inner;
        let endpoint = &inner.endpoints[inner.next.fetch_add(1, Relaxed) % inner.endpoints.len()];
        let config = match &inner.shared {
            Some(c) => c.clone(),
            None => client_config(&inner.opts, &inner.transport)
                .map_err(|e| io::Error::other(format!("{e:#}")))?,
        };
        let began = Instant::now();
        let connecting = endpoint
            .connect(&config, addr, &inner.opts.server_name)
            .map_err(|e| io::Error::other(format!("QUIC: {e}")))?;
        let conn = connecting
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, format!("QUIC: {e}")))?;
        // The stream handles keep the connection open; dropping both closes it.
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| io::Error::other(format!("QUIC: {e}")))?;
        // The client loops flush after each batch of writes.
        send.set_send_on_flush(true);
        Ok((recv, send, began))
    }
}
