//! The independent MQTT-over-QUIC client: quinn for QUIC, rumqttc's `mqttbytes` (3.1.1) for
//! the packets, nothing from mqttd.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, Disconnect, Packet, PingReq, PubAck, PubComp, PubRec, Publish, Subscribe,
    read,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};

use crate::Broker;

/// Upper bound for any single wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// A quinn client endpoint on a free loopback port.
pub fn quinn_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal")).expect("quinn endpoint")
}

/// quinn's client configuration trusting `cert_pem` (the broker's self-signed certificate),
/// offering `alpn`.
pub fn quinn_config(cert_pem: &[u8], alpn: &[u8]) -> quinn::ClientConfig {
    let mut roots = quinn::rustls::RootCertStore::empty();
    for block in pem::parse_many(cert_pem).expect("PEM") {
        roots
            .add(quinn::rustls::pki_types::CertificateDer::from(
                block.into_contents(),
            ))
            .expect("root");
    }
    let provider = Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// Like [`quinn_config`], with TLS early data enabled: connections made with one clone of it
/// share rustls' session store, so the second can resume and send 0-RTT data.
pub fn quinn_config_0rtt(cert_pem: &[u8]) -> quinn::ClientConfig {
    let mut roots = quinn::rustls::RootCertStore::empty();
    for block in pem::parse_many(cert_pem).expect("PEM") {
        roots
            .add(quinn::rustls::pki_types::CertificateDer::from(
                block.into_contents(),
            ))
            .expect("root");
    }
    let provider = Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// One MQTT 3.1.1 session over a quinn connection: its first bidirectional stream (the only
/// one in single-stream mode, the control stream in multi-stream mode) is `self` through
/// `Deref`.
pub struct QuicMqtt {
    conn: quinn::Connection,
    control: MqttStream,
}

/// MQTT packets over one quinn bidirectional stream.
pub struct MqttStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl std::ops::Deref for QuicMqtt {
    type Target = MqttStream;
    fn deref(&self) -> &MqttStream {
        &self.control
    }
}

impl std::ops::DerefMut for QuicMqtt {
    fn deref_mut(&mut self) -> &mut MqttStream {
        &mut self.control
    }
}

fn encode(p: &Packet, out: &mut BytesMut) {
    let r = match p {
        Packet::Connect(c) => c.write(out),
        Packet::Publish(c) => c.write(out),
        Packet::PubAck(c) => c.write(out),
        Packet::PubRec(c) => c.write(out),
        Packet::PubRel(c) => c.write(out),
        Packet::PubComp(c) => c.write(out),
        Packet::Subscribe(c) => c.write(out),
        Packet::PingReq => PingReq.write(out),
        Packet::Disconnect => Disconnect.write(out),
        other => panic!("the test client does not send {other:?}"),
    };
    r.expect("encode");
}

impl QuicMqtt {
    /// Wraps a connection and its MQTT stream (nothing sent yet).
    pub fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        QuicMqtt {
            conn,
            control: MqttStream {
                send,
                recv,
                buf: BytesMut::new(),
            },
        }
    }

    /// A CONNECT packet (MQTT 3.1.1).
    pub fn connect_packet(id: &str, clean: bool, keep_alive: u16) -> Packet {
        let mut connect = Connect::new(id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        Packet::Connect(connect)
    }

    /// Connects over QUIC, opens the stream and exchanges CONNECT/CONNACK.
    pub async fn connect(
        ep: &quinn::Endpoint,
        broker: &Broker,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (QuicMqtt, ConnAck) {
        Self::connect_via(ep, broker, broker.quic, id, clean, keep_alive).await
    }

    /// [`connect`](Self::connect) to `addr` (a relay in front of the broker).
    pub async fn connect_via(
        ep: &quinn::Endpoint,
        broker: &Broker,
        addr: std::net::SocketAddr,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (QuicMqtt, ConnAck) {
        let config = quinn_config(&broker.cert_pem(), b"mqtt");
        let conn = tokio::time::timeout(
            WAIT,
            ep.connect_with(config, addr, "localhost").expect("connect"),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        let (send, recv) = conn.open_bi().await.expect("open stream");
        let mut c = QuicMqtt {
            conn,
            control: MqttStream {
                send,
                recv,
                buf: BytesMut::new(),
            },
        };
        let mut connect = Connect::new(id);
        connect.clean_session = clean;
        connect.keep_alive = keep_alive;
        c.send(Packet::Connect(connect)).await;
        match c.recv().await {
            Packet::ConnAck(a) => (c, a),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|h| h.protocol)
    }

    /// Whether the QUIC connection is still open.
    pub fn connection_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The client's view of the connection, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "remote {}, close reason {:?}, {:?}",
            self.conn.remote_address(),
            self.conn.close_reason(),
            self.conn.stats()
        )
    }

    /// Opens a data stream (multi-stream mode).
    pub async fn open_stream(&self) -> MqttStream {
        let (send, recv) = self.conn.open_bi().await.expect("open stream");
        MqttStream {
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    /// Sends DISCONNECT, finishes the stream and closes the connection once the broker ended it.
    pub async fn disconnect(mut self) {
        self.send(Packet::Disconnect).await;
        let _ = self.control.send.finish();
        // The broker closes the stream after DISCONNECT; then the connection.
        let _ =
            tokio::time::timeout(WAIT, async { while self.try_recv().await.is_some() {} }).await;
        self.conn.close(0u32.into(), b"bye");
    }
}

impl MqttStream {
    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        encode(&p, &mut out);
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.send.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// The next packet, or `None` when the stream ended or the connection closed.
    pub async fn try_recv(&mut self) -> Option<Packet> {
        loop {
            match read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(MqttError::InsufficientBytes(_)) => {}
                Err(e) => panic!("malformed packet from the broker: {e:?}"),
            }
            let chunk = tokio::time::timeout(WAIT, self.recv.read_chunk(64 * 1024, true))
                .await
                .expect("a packet in time");
            match chunk {
                Ok(Some(c)) => self.buf.extend_from_slice(&c.bytes),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.try_recv().await.expect("stream open")
    }

    /// Every byte until the broker ends the stream.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let rest = tokio::time::timeout(WAIT, self.recv.read_to_end(1 << 20))
            .await
            .expect("the stream ends in time")
            .expect("read");
        let mut all = self.buf.split().to_vec();
        all.extend_from_slice(&rest);
        all
    }

    /// Waits until the broker ends the MQTT stream (or the connection).
    pub async fn expect_closed(&mut self) {
        while let Some(p) = self.try_recv().await {
            assert!(
                matches!(p, Packet::PingResp | Packet::Disconnect),
                "unexpected {p:?} before the close"
            );
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, pkid: u16, filter: &str, qos: QoS) {
        let mut s = Subscribe::new(filter, qos);
        s.pkid = pkid;
        self.send(Packet::Subscribe(s)).await;
        match self.recv().await {
            Packet::SubAck(a) if a.pkid == pkid => {}
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    /// The next PUBLISH, acknowledged as its QoS requires (QoS 2: PUBREC, PUBREL, PUBCOMP).
    pub async fn receive_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Packet::Publish(p) => {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(p.pkid))).await,
                        QoS::ExactlyOnce => {
                            self.send(Packet::PubRec(PubRec::new(p.pkid))).await;
                            match self.recv().await {
                                Packet::PubRel(r) if r.pkid == p.pkid => {}
                                other => panic!("expected PUBREL {}, got {other:?}", p.pkid),
                            }
                            self.send(Packet::PubComp(PubComp::new(p.pkid))).await;
                        }
                    }
                    return p;
                }
                Packet::PubRel(r) => self.send(Packet::PubComp(PubComp::new(r.pkid))).await,
                Packet::PingResp => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }

    /// Stops reading and resets the sending side (the client abandons the stream).
    pub fn abandon(mut self) {
        let _ = self.recv.stop(0u32.into());
        let _ = self.send.reset(0u32.into());
    }
}

/// A bare stream on a fresh quinn connection, for raw bytes (no CONNECT sent).
pub async fn raw_stream(ep: &quinn::Endpoint, broker: &Broker) -> (MqttStream, quinn::Connection) {
    let config = quinn_config(&broker.cert_pem(), b"mqtt");
    let conn = tokio::time::timeout(
        WAIT,
        ep.connect_with(config, broker.quic, "localhost")
            .expect("connect"),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("open stream");
    (
        MqttStream {
            send,
            recv,
            buf: BytesMut::new(),
        },
        conn,
    )
}
