//! The MQTT-over-QUIC listener (`shared/DESIGN.md`, "MQTT over QUIC").
//!
//! One `mqttd-quic` server endpoint on UDP (14567 by default), ALPN `mqtt`, TLS 1.3. Every
//! accepted connection is admitted under the same `max_connections` as TCP and handed to the
//! very same [`serve_connection`] as a TCP socket, so sessions, subscriptions and queued
//! messages are shared by both transports.
//!
//! - Single-stream mode (the default): the first client-initiated bidirectional stream is the
//!   MQTT byte stream. Further bidirectional streams are refused with
//!   STOP_SENDING/RESET_STREAM ([`STREAM_REFUSED`]).
//! - Multi-stream mode (`quic_multi_stream`, EMQX compatible): the first stream is the control
//!   stream and every further one a data stream; see [`streams`](self) for the routing rules.
//!
//! Timers: the QUIC idle timeout only ends connections whose peer is gone. The broker sends a
//! QUIC PING when it has sent nothing for a third of the idle timeout, so a live connection
//! with no MQTT traffic keeps answering and is never closed early; a client that stops talking
//! MQTT is closed by the broker's keep-alive check (1.5 x Keep Alive), exactly as over TCP.
//!
//! 0-RTT (`quic_zero_rtt`, off by default): the listener issues session tickets that allow
//! early data and takes each connection before its handshake completes
//! ([`Connecting::into_0rtt`]), so a resumed client's CONNECT sent as 0-RTT data is served at
//! once and the CONNACK leaves as 0.5-RTT data right behind the server's handshake flight: the
//! client has it after one round trip instead of two. ngtcp2 keeps the anti-amplification limit
//! (at most 3x what the unvalidated client sent) on those packets too. Early data can be
//! replayed by anyone who recorded the client's first flight, and the TLS layer does not keep
//! a single-use ticket cache, so a replay is not detected. The replayed handshake never
//! completes, which bounds what it can do: from early data the broker serves the first packet
//! (the CONNECT) only; everything after it waits until the handshake completed. A replayed
//! CONNECT still takes effect: it takes over a session with that client identifier (closing a
//! live connection with the same ID), `clean_session`/`clean_start` discards stored state, a
//! will in it is published when the never-completing connection ends, and messages queued for
//! a resumed session are sent to it (encrypted with keys the replayer does not have; QoS 1/2
//! ones stay unacknowledged and are delivered again on the next connection, QoS 0 ones are
//! lost). Enable 0-RTT only when that is acceptable (e.g. clients without wills on a network
//! where recording and replaying is not a concern).
//!
//! Migration (`quic_migration`, on by default): clients may move to a new address and keep
//! their connection (ngtcp2 validates the new path). Off, the listener sends the
//! `disable_active_migration` transport parameter so compliant clients do not move on their
//! own; a client whose address changes anyway (NAT rebinding, or a client ignoring the
//! parameter) is still validated and followed, so the MQTT session survives either way.
//!
//! Certificates: `quic_cert`/`quic_key` when configured; otherwise a self-signed certificate
//! (rcgen, names `localhost`, `127.0.0.1`, `::1`) is generated into the data directory on the
//! first start and reused afterwards. Its SHA-256 fingerprint is logged so clients can pin it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mqttd_quic::{Connecting, Endpoint, RecvStream, SendStream, ServerConfig, TransportConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};

use crate::config::QuicConfig;
use crate::server::{ConnContext, serve_connection};

mod streams;

/// The ALPN protocol of MQTT over QUIC (EMQX's, and the only one the listener accepts).
pub const ALPN: &[u8] = b"mqtt";

/// Application error code for a stream the broker does not use (single-stream mode:
/// any bidirectional stream after the first). HTTP/3's H3_STREAM_CREATION_ERROR value.
pub const STREAM_REFUSED: u64 = 0x103;

/// Application error code closing a connection refused at `max_connections`.
pub const CONNECTION_REFUSED: u64 = 0x2;

/// File names of the generated certificate and key inside the data directory.
const GENERATED_CERT: &str = "quic-cert.pem";
const GENERATED_KEY: &str = "quic-key.pem";

/// Why the QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The UDP socket could not be bound.
    #[error("cannot listen for MQTT over QUIC on {addr} (`quic_listen`): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The certificate could not be generated.
    #[error("cannot generate the QUIC certificate: {0}")]
    Generate(String),
    /// The certificate chain or key is not usable.
    #[error("QUIC TLS configuration (`quic_cert`, `quic_key`): {0}")]
    Tls(#[from] mqttd_tls::TlsError),
    /// The certificate file holds no PEM certificate.
    #[error("{0}: no PEM certificate found (`quic_cert`)")]
    NoCertificate(PathBuf),
}

/// A running QUIC listener.
#[derive(Debug)]
pub struct QuicListener {
    /// The UDP address it listens on.
    pub local_addr: SocketAddr,
    /// SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fingerprint: String,
    /// Where the certificate came from (the configured file or the generated one).
    pub cert_path: PathBuf,
    /// Whether the certificate was generated by this start.
    pub generated: bool,
    task: tokio::task::JoinHandle<()>,
}

impl QuicListener {
    /// Waits until the accept loop has ended (after shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Colon-separated upper-case hex of the SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The certificate and key to serve: configured files, or the generated pair in `data_dir`
/// (created on first use, with `listen`'s address among its names). Returns PEM chain, PEM
/// key, the certificate's path and whether it was generated now. The TLS-over-TCP listener
/// serves the same generated pair.
pub(crate) fn certificate(
    cert_and_key: Option<&(PathBuf, PathBuf)>,
    listen: SocketAddr,
    data_dir: &Path,
) -> Result<(Vec<u8>, Vec<u8>, PathBuf, bool), QuicError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| QuicError::File {
            path: path.to_owned(),
            source,
        })
    };
    if let Some((cert, key)) = cert_and_key {
        return Ok((read(cert)?, read(key)?, cert.clone(), false));
    }
    let cert_path = data_dir.join(GENERATED_CERT);
    let key_path = data_dir.join(GENERATED_KEY);
    if cert_path.exists() && key_path.exists() {
        return Ok((read(&cert_path)?, read(&key_path)?, cert_path, false));
    }
    std::fs::create_dir_all(data_dir).map_err(|source| QuicError::File {
        path: data_dir.to_owned(),
        source,
    })?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| QuicError::Generate(e.to_string()))?;
    let cert_pem = generated.cert.pem().into_bytes();
    let key_pem = generated.key_pair.serialize_pem().into_bytes();
    write_private(&key_path, &key_pem)?;
    std::fs::write(&cert_path, &cert_pem).map_err(|source| QuicError::File {
        path: cert_path.clone(),
        source,
    })?;
    Ok((cert_pem, key_pem, cert_path, true))
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), QuicError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|source| QuicError::File {
            path: path.to_owned(),
            source,
        })
}

/// The DER of the first certificate in a PEM chain.
pub(crate) fn leaf_der(chain_pem: &[u8], path: &Path) -> Result<Vec<u8>, QuicError> {
    pem::parse_many(chain_pem)
        .ok()
        .and_then(|blocks| {
            blocks
                .into_iter()
                .find(|b| b.tag() == "CERTIFICATE")
                .map(|b| b.into_contents())
        })
        .ok_or_else(|| QuicError::NoCertificate(path.to_owned()))
}

/// The QUIC endpoint configuration for `config` and this certificate.
fn server_config(
    config: &QuicConfig,
    cert_pem: &[u8],
    key_pem: &[u8],
    max_connections: usize,
) -> Result<ServerConfig, QuicError> {
    let tls = mqttd_tls::ServerConfig::builder()
        .cert_chain_pem(cert_pem)
        .private_key_pem(key_pem)
        .alpn(&[ALPN])
        .max_early_data(if config.zero_rtt { u32::MAX } else { 0 })
        .build()?;
    let mut server = ServerConfig::new(tls);
    let idle = config.idle_timeout;
    server.transport = Arc::new(TransportConfig {
        idle_timeout: idle,
        // PINGs keep a live but quiet connection (and the NAT binding in front of it) open;
        // only a peer that stops answering reaches the idle timeout.
        keep_alive: (!idle.is_zero()).then(|| idle / 3),
        max_concurrent_bidi_streams: config.max_streams,
        // MQTT over QUIC uses bidirectional streams only.
        max_concurrent_uni_streams: 0,
        // No unreliable-datagram extension yet (DESIGN.md: a later, opt-in extension).
        max_datagram_frame_size: 0,
        // Large datagrams where the path carries them (loopback, jumbo frames): a busy
        // connection's MQTT packets leave in a few large datagrams instead of many small ones.
        // Only connections that carried bulk data probe past 1452 bytes, so idle clients keep
        // small buffers (mqttd-quic, `TransportConfig::max_udp_payload_size`).
        max_udp_payload_size: mqttd_quic::MAX_UDP_PAYLOAD,
        ..TransportConfig::default()
    });
    server.retry = config.retry;
    server.migration = config.migration;
    server.max_connections = max_connections;
    Ok(server)
}

/// Binds the QUIC listener and starts accepting connections into the broker behind `ctx`,
/// until `shutdown` turns true.
pub async fn start(
    config: &QuicConfig,
    data_dir: &Path,
    ctx: ConnContext,
    shutdown: watch::Receiver<bool>,
) -> Result<QuicListener, QuicError> {
    let (cert_pem, key_pem, cert_path, generated) =
        certificate(config.cert_and_key.as_ref(), config.listen, data_dir)?;
    let fingerprint = fingerprint(&leaf_der(&cert_pem, &cert_path)?);
    let server = server_config(config, &cert_pem, &key_pem, ctx.limits().max_connections)?;
    let endpoint = Endpoint::server(server, config.listen).map_err(|source| QuicError::Bind {
        addr: config.listen,
        source,
    })?;
    let local_addr = endpoint.local_addr();
    if generated {
        tracing::info!(cert = %cert_path.display(), sha256 = %fingerprint, "generated a self-signed QUIC certificate");
    }
    tracing::info!(quic = %local_addr, cert = %cert_path.display(), sha256 = %fingerprint, zero_rtt = config.zero_rtt, retry = config.retry, migration = config.migration, "MQTT over QUIC listening");
    let task = tokio::spawn(accept_loop(endpoint, ctx, shutdown, config.clone()));
    Ok(QuicListener {
        local_addr,
        fingerprint,
        cert_path,
        generated,
        task,
    })
}

async fn accept_loop(
    endpoint: Endpoint,
    ctx: ConnContext,
    mut shutdown: watch::Receiver<bool>,
    config: QuicConfig,
) {
    loop {
        let connecting = tokio::select! {
            c = endpoint.accept() => c,
            _ = shutdown.changed() => break,
        };
        let Some(connecting) = connecting else { break };
        tokio::spawn(serve_quic(
            connecting,
            endpoint.clone(),
            ctx.clone(),
            shutdown.clone(),
            config.clone(),
        ));
    }
    // Connection tasks hold endpoint clones: the socket lives until the last one ends.
}

/// Handshake (or early acceptance), the MQTT stream, admission, then a clean close.
async fn serve_quic(
    connecting: Connecting,
    _endpoint: Endpoint,
    ctx: ConnContext,
    mut shutdown: watch::Receiver<bool>,
    config: QuicConfig,
) {
    let Some(peer) = connecting.remote_address() else {
        return;
    };
    // With 0-RTT on, the connection is taken before its handshake completes, so a CONNECT
    // sent as early data is read at once and the CONNACK leaves right after the handshake
    // flight. The connection ends (and the stream with it) if the handshake then fails.
    let early = if config.zero_rtt {
        connecting.into_0rtt().map(|(conn, _accepted)| conn)
    } else {
        Err(connecting)
    };
    let conn = match early {
        Ok(conn) => conn,
        Err(connecting) => tokio::select! {
            c = connecting => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "QUIC handshake failed");
                    return;
                }
            },
            _ = shutdown.changed() => return,
        },
    };
    // The first client-initiated bidirectional stream carries MQTT; the client has the
    // CONNECT timeout to open it (and, taken early, to finish its handshake).
    let stream = tokio::select! {
        s = tokio::time::timeout(ctx.limits().connect_timeout, conn.accept_bi()) => s,
        _ = shutdown.changed() => return,
    };
    let (mut send, recv) = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC connection ended before its MQTT stream");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no MQTT stream in time");
            conn.close(0, b"no MQTT stream in time");
            return;
        }
    };
    // Admitted once a stream exists: handshakes that never open one (a flood of Initials)
    // take no slot from real clients.
    let Some(admission) = ctx.admit() else {
        tracing::warn!(%peer, "QUIC connection refused: max_connections reached");
        conn.close(CONNECTION_REFUSED, b"max_connections");
        return;
    };
    // Early data is served up to the end of the CONNECT only; the rest waits until the
    // handshake proved the client holds the resumption secret (a replay never gets there).
    let gate = (!conn.is_handshake_complete()).then(|| conn.clone());
    if config.multi_stream {
        serve_multi_stream(conn, send, recv, peer, admission, ctx, gate).await;
        return;
    }
    // Single-stream mode: any further stream is refused, never left to buffer.
    let refuser = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Ok((mut s, mut r)) = conn.accept_bi().await {
                let _ = r.stop(STREAM_REFUSED);
                let _ = s.reset(STREAM_REFUSED);
            }
        })
    };
    let (give_back, returned) = oneshot::channel();
    // The connection task flushes after each batch of packets: the batch is sent from that
    // task then, with no hop through the connection's driver.
    send.set_send_on_flush(true);
    let io = QuicIo {
        halves: Some((send, recv)),
        give_back: Some(give_back),
        gate: gate.map(EarlyGate::new),
    };
    serve_connection(io, peer, admission.conn, ctx).await;
    drop(admission);
    // Keep both halves open while lingering: dropping the receive half now would send
    // STOP_SENDING, and a stream the peer then resets may be closed before our last packets
    // (a DISCONNECT, a refusing CONNACK) are delivered.
    let halves = tokio::time::timeout(Duration::from_secs(1), returned).await;
    linger(&conn).await;
    drop(halves);
    refuser.abort();
    conn.close(0, b"");
}

/// After the broker finished a connection's stream (FIN after its last packet): gives the
/// peer time to read it and close the connection itself, as a TCP FIN would, before the
/// broker closes it (CONNECTION_CLOSE drops whatever is not delivered yet).
async fn linger(conn: &mqttd_quic::Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
}

/// Multi-stream mode: the control stream and every data stream the client opens, merged into
/// the one byte stream the core serves.
async fn serve_multi_stream(
    conn: mqttd_quic::Connection,
    send: SendStream,
    recv: RecvStream,
    peer: SocketAddr,
    admission: crate::server::Admission,
    ctx: ConnContext,
    gate: Option<mqttd_quic::Connection>,
) {
    let max = ctx.limits().max_packet_size as usize;
    let shared = streams::Shared::new(ctx.limits().connection_buffer, ctx.metrics().clone());
    let (to_core, from_streams) = tokio::sync::mpsc::channel(64);
    let (control_slot, control_writer) = shared.add_stream(send);
    let (connected_tx, connected) = oneshot::channel();
    // Its handle keeps the control stream's receive half (returned at its end) open until the
    // connection closes.
    let control_reader = tokio::spawn(streams::read_stream(
        shared.clone(),
        control_slot,
        recv,
        to_core.clone(),
        max,
        Some(connected_tx),
        gate,
    ));
    let acceptor = {
        let conn = conn.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            // Data streams are read once CONNECT went in (and, for an early connection, the
            // handshake completed): the core must see it first.
            if connected.await.is_err() {
                return;
            }
            while let Ok((s, r)) = conn.accept_bi().await {
                let (slot, _writer) = shared.add_stream(s);
                tokio::spawn(streams::read_stream(
                    shared.clone(),
                    slot,
                    r,
                    to_core.clone(),
                    max,
                    None,
                    None,
                ));
            }
        })
    };
    let io = streams::MuxIo::new(shared, from_streams);
    serve_connection(io, peer, admission.conn, ctx).await;
    drop(admission);
    acceptor.abort();
    // The writers finish their streams once drained; give the control stream's last packets
    // (a DISCONNECT) time to arrive before the connection closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), control_writer).await;
    linger(&conn).await;
    drop(control_reader);
    conn.close(0, b"");
}

/// One QUIC bidirectional stream as the byte stream [`serve_connection`] expects. On drop both
/// halves are handed back so the connection task can keep them open while it lingers.
struct QuicIo {
    halves: Option<(SendStream, RecvStream)>,
    give_back: Option<oneshot::Sender<(SendStream, RecvStream)>>,
    /// Before the handshake completed: lets only the first packet (the CONNECT) through.
    gate: Option<EarlyGate>,
}

/// What an early connection may read before its handshake completed: the bytes of the first
/// MQTT packet, found from its fixed header, and nothing after them.
struct EarlyGate {
    handshake: Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
    /// The fixed header read so far (type byte and up to four length bytes).
    header: Vec<u8>,
    /// Length of the whole first packet, once its header is complete.
    first_len: Option<usize>,
    passed: usize,
}

/// What [`EarlyGate::poll`] allows.
enum Allowance {
    /// The handshake completed: no more gating.
    Open,
    /// Up to this many bytes of the first packet.
    Bytes(usize),
    /// The first packet went through; wait for the handshake.
    Wait,
    /// The handshake failed (or the connection ended).
    Failed,
}

impl EarlyGate {
    fn new(conn: mqttd_quic::Connection) -> Self {
        EarlyGate {
            handshake: Box::pin(async move { conn.handshake_complete().await.is_ok() }),
            header: Vec::with_capacity(5),
            first_len: None,
            passed: 0,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Allowance {
        match self.handshake.as_mut().poll(cx) {
            Poll::Ready(true) => return Allowance::Open,
            Poll::Ready(false) => return Allowance::Failed,
            Poll::Pending => {}
        }
        match self.first_len {
            // The header byte by byte, so not one byte past the packet is read.
            None => Allowance::Bytes(1),
            Some(len) if self.passed < len => Allowance::Bytes(len - self.passed),
            Some(_) => Allowance::Wait,
        }
    }

    /// Accounts for bytes let through.
    fn passed(&mut self, bytes: &[u8]) {
        self.passed += bytes.len();
        if self.first_len.is_some() {
            return;
        }
        self.header.extend_from_slice(bytes);
        // Remaining Length: up to four bytes of 7 bits, the high bit meaning "more".
        let mut remaining = 0usize;
        for (i, b) in self.header.iter().skip(1).enumerate() {
            remaining |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.first_len = Some(self.header.len() + remaining);
                return;
            }
            if i == 3 {
                // Malformed: let the core read these bytes and refuse them.
                self.first_len = Some(self.header.len());
                return;
            }
        }
    }
}

impl Drop for QuicIo {
    fn drop(&mut self) {
        if let (Some(halves), Some(tx)) = (self.halves.take(), self.give_back.take()) {
            let _ = tx.send(halves);
        }
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((_, recv)) = this.halves.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if let Some(gate) = this.gate.as_mut() {
            match gate.poll(cx) {
                Allowance::Open => this.gate = None,
                Allowance::Wait => return Poll::Pending,
                Allowance::Failed => {
                    return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
                }
                Allowance::Bytes(n) => {
                    let mut chunk = [0u8; 512];
                    let n = n.min(buf.remaining()).min(chunk.len());
                    let mut limited = ReadBuf::new(&mut chunk[..n]);
                    std::task::ready!(Pin::new(recv).poll_read(cx, &mut limited))?;
                    gate.passed(limited.filled());
                    buf.put_slice(limited.filled());
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Pin::new(recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().halves.as_mut() {
            Some((s, _)) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().halves.as_mut() {
            Some((s, _)) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().halves.as_mut() {
            Some((s, _)) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_reused_and_fingerprinted() {
        let dir = std::env::temp_dir().join(format!("mqttd-quic-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = QuicConfig::default();
        let (cert, key, path, generated) =
            certificate(None, config.listen, &dir).expect("generate");
        assert!(generated);
        assert_eq!(path, dir.join(GENERATED_CERT));
        let fp = fingerprint(&leaf_der(&cert, &path).expect("a certificate"));
        assert_eq!(fp.len(), 32 * 3 - 1);
        // The pair is a valid TLS configuration.
        server_config(&config, &cert, &key, 10).expect("usable certificate");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(GENERATED_KEY))
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is private");
        }
        // The second start reuses it: same fingerprint.
        let (cert2, _, _, generated2) = certificate(None, config.listen, &dir).expect("reuse");
        assert!(!generated2);
        assert_eq!(
            fingerprint(&leaf_der(&cert2, &path).expect("a certificate")),
            fp
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_without_a_certificate_is_named() {
        let err = leaf_der(b"not pem", Path::new("x.pem")).expect_err("no certificate");
        assert!(err.to_string().starts_with("x.pem:"), "{err}");
    }
}
