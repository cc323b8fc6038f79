//! A small MQTT client over TCP, TLS or QUIC, for the `mqttd pub` and `mqttd sub` subcommands
//! (mosquitto_pub/mosquitto_sub for MQTT over QUIC, which no common command-line client
//! speaks).
//!
//! One connection, one stream (QUIC single-stream mode, which every MQTT-over-QUIC broker
//! accepts), MQTT 3.1.1 or 5.0 through `mqttd-codec`. Flows are sequential: `publish` waits
//! for its acknowledgement, `next_message` acknowledges what it returns.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_codec::{
    Connect, MqttString, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS,
    ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions, Topic, TopicFilter, decode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (default: 1883 over TCP, 14567 over QUIC).
    pub port: Option<u16>,
    /// MQTT over QUIC instead of TCP.
    pub quic: bool,
    /// MQTT over TLS (TCP) instead of plain TCP.
    pub tls: bool,
    /// TLS and QUIC: accept any server certificate (encrypted, not authenticated).
    pub insecure: bool,
    /// TLS and QUIC: trust the CA certificates (or the self-signed certificate) in this PEM
    /// file instead of the system roots.
    pub cafile: Option<PathBuf>,
    /// Username and password sent in the CONNECT.
    pub credentials: Option<(String, String)>,
    /// Client identifier (empty: the broker assigns one, 5.0; a random one for 3.1.1).
    pub client_id: String,
    /// MQTT protocol version.
    pub version: ProtocolVersion,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// Clean session / clean start.
    pub clean: bool,
}

/// What went wrong, for a one-line message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Name resolution, socket or stream I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration (CA file).
    #[error("TLS: {0}")]
    Tls(#[from] mqttd_tls::TlsError),
    /// The TLS (over TCP) configuration or handshake failed.
    #[error("TLS: {0}")]
    TlsTcp(String),
    /// The QUIC connection failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The broker refused or broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// A topic, filter or client identifier is not valid MQTT.
    #[error("invalid {what}: {value}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The broker closed the connection.
    #[error("connection closed by the broker")]
    Closed,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One QUIC stream plus the handles that keep its connection and endpoint open.
struct QuicStream {
    send: mqttd_quic::SendStream,
    recv: mqttd_quic::RecvStream,
    _conn: mqttd_quic::Connection,
    _endpoint: mqttd_quic::Endpoint,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().send).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}

/// How long to wait for any single answer from the broker.
const ANSWER: Duration = Duration::from_secs(10);

/// A connected MQTT client.
pub struct Client {
    io: Box<dyn Io>,
    buf: BytesMut,
    version: ProtocolVersion,
    keep_alive: Duration,
    next_id: u16,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("version", &self.version)
            .finish()
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, ClientError> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| ClientError::Protocol(format!("{host}: no address")))
}

async fn connect_quic(opts: &ClientOptions, addr: SocketAddr) -> Result<QuicStream, ClientError> {
    let mut tls = mqttd_tls::ClientConfig::builder()
        .alpn(&[crate::quic::ALPN])
        .danger_accept_invalid_certs(opts.insecure);
    if let Some(ca) = &opts.cafile {
        tls = tls.ca_file(ca);
    }
    let config = mqttd_quic::ClientConfig::new(tls.build()?);
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = mqttd_quic::Endpoint::client(local)?;
    let connecting = endpoint
        .connect(&config, addr, &opts.host)
        .map_err(|e| ClientError::Quic(e.to_string()))?;
    let conn = tokio::time::timeout(ANSWER, connecting)
        .await
        .map_err(|_| ClientError::Timeout("the QUIC handshake"))?
        .map_err(|e| ClientError::Quic(e.to_string()))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::Quic(e.to_string()))?;
    Ok(QuicStream {
        send,
        recv,
        _conn: conn,
        _endpoint: endpoint,
    })
}

/// The TLS handshake over `tcp`, verifying the broker's certificate against `opts.cafile`
/// (or the system roots) and its name against `opts.host`, unless `opts.insecure`.
async fn connect_tls(
    opts: &ClientOptions,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_openssl::SslStream<tokio::net::TcpStream>, ClientError> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let tls = |e: openssl::error::ErrorStack| ClientError::TlsTcp(e.to_string());
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(tls)?;
    if let Some(ca) = &opts.cafile {
        b.set_ca_file(ca)
            .map_err(|e| ClientError::TlsTcp(format!("{}: {e}", ca.display())))?;
    }
    if opts.insecure {
        b.set_verify(SslVerifyMode::NONE);
    }
    let ssl = b
        .build()
        .configure()
        .map_err(tls)?
        .verify_hostname(!opts.insecure)
        .into_ssl(&opts.host)
        .map_err(tls)?;
    let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(tls)?;
    tokio::time::timeout(ANSWER, Pin::new(&mut stream).connect())
        .await
        .map_err(|_| ClientError::Timeout("the TLS handshake"))?
        .map_err(|e| ClientError::TlsTcp(e.to_string()))?;
    Ok(stream)
}

impl Client {
    /// Connects and completes CONNECT/CONNACK.
    pub async fn connect(opts: &ClientOptions) -> Result<Client, ClientError> {
        let default_port = match (opts.quic, opts.tls) {
            (true, _) => 14567,
            (false, true) => 8883,
            (false, false) => 1883,
        };
        let addr = resolve(&opts.host, opts.port.unwrap_or(default_port))?;
        let io: Box<dyn Io> = if opts.quic {
            Box::new(connect_quic(opts, addr).await?)
        } else {
            let s = tokio::time::timeout(ANSWER, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| ClientError::Timeout("the TCP connection"))??;
            let _ = s.set_nodelay(true);
            if opts.tls {
                Box::new(connect_tls(opts, s).await?)
            } else {
                Box::new(s)
            }
        };
        let mut client = Client {
            io,
            buf: BytesMut::new(),
            version: opts.version,
            keep_alive: Duration::from_secs(u64::from(opts.keep_alive)),
            next_id: 0,
        };
        let mut id = opts.client_id.clone();
        if id.is_empty() && !opts.version.is_v5() {
            id = format!("mqttd-cli-{:08x}", std::process::id() ^ rand_u32());
        }
        let id =
            MqttString::from_bytes(Bytes::from(id.clone())).map_err(|_| ClientError::Invalid {
                what: "client id",
                value: id,
            })?;
        let mut connect = Connect::new(opts.version, id, opts.keep_alive);
        connect.clean_start = opts.clean;
        if let Some((user, password)) = &opts.credentials {
            connect.username = Some(MqttString::from_bytes(Bytes::from(user.clone())).map_err(
                |_| ClientError::Invalid {
                    what: "username",
                    value: user.clone(),
                },
            )?);
            connect.password = Some(Bytes::from(password.clone()));
        }
        client.send(Packet::Connect(Box::new(connect))).await?;
        match client.recv_within(ANSWER, "CONNACK").await? {
            Packet::ConnAck(a) if a.reason_code == ReasonCode::Success => Ok(client),
            Packet::ConnAck(a) => Err(ClientError::Protocol(format!(
                "connection refused: {:?} (0x{:02x})",
                a.reason_code,
                u8::from(a.reason_code)
            ))),
            other => Err(ClientError::Protocol(format!(
                "expected CONNACK, got {:?}",
                other.packet_type()
            ))),
        }
    }

    async fn send(&mut self, p: Packet) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        p.encode(self.version, &mut out)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.io.write_all(&out).await?;
        Ok(())
    }

    /// The next packet; `Closed` at the end of the stream.
    async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            match decode(&mut self.buf, self.version, 256 << 20) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(format!("malformed packet: {e}"))),
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    async fn recv_within(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Packet, ClientError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(what))?
    }

    fn packet_id(&mut self) -> NonZeroU16 {
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        NonZeroU16::new(self.next_id).unwrap_or(NonZeroU16::MIN)
    }

    /// Publishes and waits for the acknowledgement its QoS requires.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), ClientError> {
        let t = Topic::new(topic).map_err(|_| ClientError::Invalid {
            what: "topic",
            value: topic.to_owned(),
        })?;
        let id = (qos != QoS::AtMostOnce).then(|| self.packet_id());
        let mut p = Publish::new(t, qos, id, payload);
        p.retain = retain;
        self.send(Packet::Publish(p)).await?;
        let Some(id) = id else { return Ok(()) };
        loop {
            match self.recv_within(ANSWER, "the acknowledgement").await? {
                Packet::PubAck(a) if a.packet_id == id => {
                    return check(a.reason_code, "PUBACK");
                }
                Packet::PubRec(r) if r.packet_id == id => {
                    check(r.reason_code, "PUBREC")?;
                    self.send(Packet::PubRel(PubRel::new(id))).await?;
                }
                Packet::PubComp(c) if c.packet_id == id => {
                    return check(c.reason_code, "PUBCOMP");
                }
                Packet::Disconnect(d) => {
                    return Err(ClientError::Protocol(format!(
                        "disconnected by the broker: {:?}",
                        d.reason_code
                    )));
                }
                _ => {}
            }
        }
    }

    /// Subscribes to `filters` at `qos`; fails if the broker refuses any.
    pub async fn subscribe(&mut self, filters: &[String], qos: QoS) -> Result<(), ClientError> {
        let mut list = Vec::new();
        for f in filters {
            list.push(SubscribeFilter {
                filter: TopicFilter::new(f).map_err(|_| ClientError::Invalid {
                    what: "topic filter",
                    value: f.clone(),
                })?,
                options: SubscriptionOptions::qos(qos),
            });
        }
        let id = self.packet_id();
        self.send(Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: list,
            properties: Default::default(),
        }))
        .await?;
        loop {
            if let Packet::SubAck(a) = self.recv_within(ANSWER, "SUBACK").await?
                && a.packet_id == id
            {
                for (f, rc) in filters.iter().zip(&a.reason_codes) {
                    if u8::from(*rc) >= 0x80 {
                        return Err(ClientError::Protocol(format!(
                            "subscription to {f} refused: {rc:?}"
                        )));
                    }
                }
                return Ok(());
            }
        }
    }

    /// The next message, acknowledged as its QoS requires; PINGREQs keep the connection alive
    /// while waiting.
    pub async fn next_message(&mut self) -> Result<Publish, ClientError> {
        loop {
            let packet = if self.keep_alive.is_zero() {
                self.recv().await?
            } else {
                match tokio::time::timeout(self.keep_alive, self.recv()).await {
                    Ok(p) => p?,
                    Err(_) => {
                        self.send(Packet::PingReq).await?;
                        continue;
                    }
                }
            };
            match packet {
                Packet::Publish(p) => {
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => {
                            self.send(Packet::PubAck(PubAck::new(id))).await?
                        }
                        (QoS::ExactlyOnce, Some(id)) => {
                            self.send(Packet::PubRec(PubRec::new(id))).await?
                        }
                        _ => {}
                    }
                    return Ok(p);
                }
                Packet::PubRel(r) => {
                    self.send(Packet::PubComp(PubComp::new(r.packet_id)))
                        .await?
                }
                Packet::Disconnect(d) => {
                    return Err(ClientError::Protocol(format!(
                        "disconnected by the broker: {:?}",
                        d.reason_code
                    )));
                }
                _ => {}
            }
        }
    }

    /// Sends DISCONNECT and closes the stream.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(Packet::Disconnect(mqttd_codec::Disconnect::new(
            ReasonCode::Success,
        )))
        .await?;
        self.io.shutdown().await?;
        // Let the broker see the DISCONNECT before the connection goes away.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.recv().await.is_ok() {}
        })
        .await;
        Ok(())
    }
}

fn check(rc: ReasonCode, what: &str) -> Result<(), ClientError> {
    if u8::from(rc) >= 0x80 {
        Err(ClientError::Protocol(format!("{what}: {rc:?}")))
    } else {
        Ok(())
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}
