//! `mqttd-bench hol`: head-of-line blocking through a lossy link, MQTT over QUIC single-stream
//! against multi-stream mode.
//!
//! A bulk publisher sends large QoS 1 messages on topic A and a probe publisher small ones at a
//! fixed rate on topic B, both over TCP straight to the broker. One subscriber takes both topics
//! over QUIC through an in-process UDP relay that drops a share of the datagrams (both ways)
//! and delays the rest. In single-stream mode both topics share the one MQTT stream, so a lost
//! packet of A also holds back B behind it; in multi-stream mode (EMQX-compatible: control
//! stream first, one data stream per SUBSCRIBE) B has its own stream. The figure is B's
//! delivery latency (p50/p99) in each mode; the broker must run with its multi-stream mode set
//! to match (`quic_multi_stream`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use mqttd_codec::{
    Connect, MqttString, Packet, PacketId, ProtocolVersion, PubAck, QoS, Subscribe,
    SubscribeFilter, SubscribeProperties, SubscriptionOptions, Topic, TopicFilter, decode,
};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};

use crate::accounting::{Percentiles, Receipts, new_histogram};
use crate::client::{Conn, Counters, run_publisher};
use crate::payload::{Header, PublishTemplate, now_ns};
use crate::plan::Workload;
use crate::transport::{MQTT_ALPN, Tcp};

/// Settings of one `hol` run.
#[derive(Debug, Clone)]
pub struct HolOptions {
    /// The broker's MQTT-over-QUIC address (reached through the relay).
    pub quic: SocketAddr,
    /// The broker's MQTT-over-TCP address (the publishers).
    pub tcp: SocketAddr,
    /// Multi-stream mode: one data stream per topic.
    pub multi_stream: bool,
    /// Share of datagrams the relay drops, each way.
    pub loss: f64,
    /// Delay the relay adds, each way.
    pub delay: Duration,
    /// Seed of the relay's drop decisions.
    pub seed: u64,
    /// Bulk messages per second on topic A.
    pub bulk_rate: f64,
    /// Bulk message size.
    pub bulk_size: usize,
    /// Probe messages per second on topic B.
    pub probe_rate: f64,
    /// How long to publish.
    pub duration: Duration,
    /// Time allowed afterwards for deliveries still under way.
    pub drain: Duration,
}

/// What a `hol` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct HolSummary {
    /// Always `hol`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `single-stream` or `multi-stream`.
    pub mode: &'static str,
    /// Drop share each way.
    pub loss: f64,
    /// Added delay each way, milliseconds.
    pub delay_ms: f64,
    /// Bulk (topic A) messages sent and received.
    pub bulk_sent: u64,
    /// Bulk messages received by the subscriber.
    pub bulk_received: u64,
    /// Probe (topic B) messages sent.
    pub probe_sent: u64,
    /// Probe messages received.
    pub probe_received: u64,
    /// Topic B delivery latency, microseconds.
    pub probe_latency_us: Percentiles,
    /// Topic A delivery latency, microseconds.
    pub bulk_latency_us: Percentiles,
    /// Datagrams the relay dropped.
    pub dropped_datagrams: u64,
}

/// A small deterministic generator for drop decisions (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A UDP relay between one client and the broker that drops `loss` of the datagrams each way
/// and delays the rest by `delay`. Returns its client-facing address.
async fn start_relay(
    upstream: SocketAddr,
    loss: f64,
    delay: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) -> Result<SocketAddr> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(upstream).await?;
    let addr = front.local_addr()?;
    let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    // One delayed-send task per direction keeps datagrams in order.
    let (to_broker, mut to_broker_rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let (to_client, mut to_client_rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    {
        let back = back.clone();
        tokio::spawn(async move {
            while let Some((at, d)) = to_broker_rx.recv().await {
                sleep_until(at).await;
                let _ = back.send(&d).await;
            }
        });
    }
    {
        let (front, client) = (front.clone(), client.clone());
        tokio::spawn(async move {
            while let Some((at, d)) = to_client_rx.recv().await {
                sleep_until(at).await;
                let peer = *client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(peer) = peer {
                    let _ = front.send_to(&d, peer).await;
                }
            }
        });
    }
    let (f2, s2, d2) = (front.clone(), stop.clone(), dropped.clone());
    tokio::spawn(async move {
        let mut rng = Rng(seed | 1);
        let mut buf = vec![0u8; 65536];
        while !s2.load(Relaxed) {
            let Ok((n, from)) = f2.recv_from(&mut buf).await else {
                break;
            };
            *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
            if rng.next_f64() < loss {
                d2.fetch_add(1, Relaxed);
                continue;
            }
            let _ = to_broker.send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])));
        }
    });
    tokio::spawn(async move {
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let mut buf = vec![0u8; 65536];
        while !stop.load(Relaxed) {
            let Ok(n) = back.recv(&mut buf).await else {
                break;
            };
            if rng.next_f64() < loss {
                dropped.fetch_add(1, Relaxed);
                continue;
            }
            let _ = to_client.send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])));
        }
    });
    Ok(addr)
}

const V: ProtocolVersion = ProtocolVersion::V3_1_1;
const ANSWER: Duration = Duration::from_secs(20);

fn encode(p: &Packet) -> Result<BytesMut> {
    let mut out = BytesMut::new();
    p.encode(V, &mut out)
        .map_err(|e| anyhow!("cannot encode {:?}: {e}", p.packet_type()))?;
    Ok(out)
}

/// Reads until one whole packet is decoded.
async fn read_packet(recv: &mut mqttd_quic::RecvStream, buf: &mut BytesMut) -> Result<Packet> {
    loop {
        if let Some(p) = decode(buf, V, 1 << 20)? {
            return Ok(p);
        }
        buf.reserve(4096);
        if recv.read_buf(buf).await? == 0 {
            bail!("the broker closed the stream");
        }
    }
}

fn subscribe(packet_id: u16, filters: &[&str]) -> Result<Packet> {
    Ok(Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(packet_id).ok_or_else(|| anyhow!("packet id 0"))?,
        filters: filters
            .iter()
            .map(|f| {
                Ok(SubscribeFilter {
                    filter: TopicFilter::new(f).map_err(|e| anyhow!("filter {f}: {e}"))?,
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                })
            })
            .collect::<Result<_>>()?,
        properties: SubscribeProperties::default(),
    }))
}

/// Reads one stream's deliveries until `stop`, acknowledging each on the same stream.
async fn receive(
    mut send: mqttd_quic::SendStream,
    mut recv: mqttd_quic::RecvStream,
    mut buf: BytesMut,
    mut stop: watch::Receiver<bool>,
) -> Result<[Receipts; 2]> {
    // Per topic: publisher 0 (bulk, A) and 1 (probe, B).
    let mut receipts = [Receipts::new(), Receipts::new()];
    let mut acks = BytesMut::new();
    loop {
        while let Some(p) = decode(&mut buf, V, 1 << 20)? {
            if let Packet::Publish(p) = p {
                match Header::read(&p.payload) {
                    Some(h) if h.publisher < 2 => receipts[h.publisher as usize].record(
                        h.publisher,
                        h.seq,
                        h.sent_ns,
                        now_ns(),
                    ),
                    _ => receipts[0].foreign += 1,
                }
                if let Some(id) = p.packet_id {
                    Packet::PubAck(PubAck::new(id))
                        .encode(V, &mut acks)
                        .map_err(|e| anyhow!("PUBACK: {e}"))?;
                }
            }
        }
        if !acks.is_empty() {
            send.write_all(&acks).await?;
            acks.clear();
        }
        buf.reserve(64 * 1024);
        tokio::select! {
            _ = stop.changed() => return Ok(receipts),
            r = recv.read_buf(&mut buf) => {
                if r? == 0 {
                    return Ok(receipts);
                }
            }
        }
    }
}

/// Runs one `hol` measurement.
pub async fn run_hol(o: HolOptions) -> Result<HolSummary> {
    let stop_relay = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let relay = start_relay(
        o.quic,
        o.loss,
        o.delay,
        o.seed,
        stop_relay.clone(),
        dropped.clone(),
    )
    .await?;

    // The subscriber, over QUIC through the relay.
    let tls = mqttd_tls::ClientConfig::builder()
        .alpn(&[MQTT_ALPN])
        .danger_accept_invalid_certs(true)
        .build()
        .context("QUIC client TLS")?;
    let mut config = mqttd_quic::ClientConfig::new(tls);
    config.transport = Arc::new(mqttd_quic::TransportConfig {
        idle_timeout: Duration::from_secs(120),
        max_concurrent_uni_streams: 0,
        max_datagram_frame_size: 0,
        ..mqttd_quic::TransportConfig::default()
    });
    let endpoint = mqttd_quic::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    let conn = timeout(ANSWER, endpoint.connect(&config, relay, "localhost")?)
        .await
        .map_err(|_| anyhow!("no QUIC handshake through the relay within {ANSWER:?}"))??;
    let (mut csend, mut crecv) = conn.open_bi().await?;
    let id = MqttString::from_bytes(Bytes::from_static(b"mqttd-bench-hol-sub"))
        .map_err(|e| anyhow!("client id: {e}"))?;
    csend
        .write_all(&encode(&Packet::Connect(Box::new(Connect::new(
            V, id, 60,
        ))))?)
        .await?;
    let mut cbuf = BytesMut::new();
    match timeout(ANSWER, read_packet(&mut crecv, &mut cbuf)).await?? {
        Packet::ConnAck(a) if !a.reason_code.is_error() => {}
        other => bail!("expected a successful CONNACK, got {other:?}"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = Vec::new();
    if o.multi_stream {
        for (n, topic) in [(1u16, "hol/a"), (2, "hol/b")] {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&encode(&subscribe(n, &[topic])?)?).await?;
            let mut buf = BytesMut::new();
            match timeout(ANSWER, read_packet(&mut recv, &mut buf)).await?? {
                Packet::SubAck(_) => {}
                other => bail!("expected SUBACK on the data stream, got {other:?}"),
            }
            readers.push(tokio::spawn(receive(send, recv, buf, stop_rx.clone())));
        }
        // The control stream stays open (and read) for PINGRESP and the like.
        readers.push(tokio::spawn(receive(csend, crecv, cbuf, stop_rx.clone())));
    } else {
        csend
            .write_all(&encode(&subscribe(1, &["hol/a", "hol/b"])?)?)
            .await?;
        match timeout(ANSWER, read_packet(&mut crecv, &mut cbuf)).await?? {
            Packet::SubAck(_) => {}
            other => bail!("expected SUBACK, got {other:?}"),
        }
        readers.push(tokio::spawn(receive(csend, crecv, cbuf, stop_rx.clone())));
    }

    // The publishers, over TCP straight to the broker: publisher 0 bulk on A, 1 probes on B.
    let counters = Arc::new(Counters::default());
    let start = Instant::now() + Duration::from_millis(100);
    let mut pubs = Vec::new();
    for (i, topic, size, rate) in [
        (0u32, "hol/a", o.bulk_size, o.bulk_rate),
        (1, "hol/b", 64, o.probe_rate),
    ] {
        let template = PublishTemplate::new(
            Topic::new(topic).map_err(|e| anyhow!("{topic}: {e}"))?,
            QoS::AtLeastOnce,
            size,
            V,
        )?;
        let conn = Conn::connect(
            &Tcp,
            o.tcp,
            V,
            &format!("mqttd-bench-hol-pub-{i}"),
            60,
            false,
        )
        .await?;
        let load = Workload {
            qos: QoS::AtLeastOnce,
            size,
            rate,
            inflight: 1024,
            duration: o.duration,
            count: None,
            drain: o.drain,
            drain_idle: o.drain,
        };
        let counters = counters.clone();
        pubs.push(tokio::spawn(async move {
            run_publisher(conn, i, template, load, start, &counters).await
        }));
    }
    let mut sent = [0u64; 2];
    for (i, p) in pubs.into_iter().enumerate() {
        let out = p.await.map_err(|e| anyhow!("publisher task: {e}"))?;
        if let Some(e) = out.error {
            bail!("{e}");
        }
        sent[i] = out.sent;
    }
    // Deliveries under way through the lossy link.
    let until = Instant::now() + o.drain;
    tokio::time::sleep_until(until).await;
    let _ = stop_tx.send(true);
    let mut latency = [new_histogram(), new_histogram()];
    let mut received = [0u64; 2];
    for r in readers {
        let got = r.await.map_err(|e| anyhow!("subscriber task: {e}"))??;
        for (i, g) in got.iter().enumerate() {
            latency[i]
                .add(&g.latency_us)
                .map_err(|e| anyhow!("histogram: {e}"))?;
            received[i] += g.unique_from(i as u32);
        }
    }
    stop_relay.store(true, Relaxed);
    conn.close(0, b"");
    Ok(HolSummary {
        kind: "hol",
        mode: if o.multi_stream {
            "multi-stream"
        } else {
            "single-stream"
        },
        loss: o.loss,
        delay_ms: o.delay.as_secs_f64() * 1000.0,
        bulk_sent: sent[0],
        bulk_received: received[0],
        probe_sent: sent[1],
        probe_received: received[1],
        probe_latency_us: Percentiles::of(&latency[1]),
        bulk_latency_us: Percentiles::of(&latency[0]),
        dropped_datagrams: dropped.load(Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_drops_about_the_share_asked_for_and_repeats_with_its_seed() {
        let draw = |seed: u64| {
            let mut rng = Rng(seed | 1);
            (0..100_000).filter(|_| rng.next_f64() < 0.05).count()
        };
        let dropped = draw(7);
        assert!((4_500..5_500).contains(&dropped), "{dropped} of 100000");
        assert_eq!(draw(7), dropped, "same seed, same drops");
        let first = |seed: u64| {
            let mut rng = Rng(seed | 1);
            (0..64).map(|_| rng.next_f64()).collect::<Vec<_>>()
        };
        assert_ne!(first(7), first(8), "another seed, other drops");
        let mut rng = Rng(3);
        assert!((0..1000).all(|_| (0.0..1.0).contains(&rng.next_f64())));
    }
}
