//! One benchmark client: a connection and the loop it runs (publisher, subscriber or idle).
//!
//! Each client is one tokio task owning both halves of its connection, a read and a write
//! `BytesMut`. Reads and writes proceed concurrently in one `select!`; whatever must be sent
//! (PUBLISHes, acks, PINGREQ) is appended to the write buffer and written in as few system calls
//! as the socket allows. Incoming packets are decoded zero-copy by `mqttd-codec`. Counters shared
//! with the progress line are updated once per batch, not per message.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use mqttd_codec::{
    Connect, Disconnect, MqttString, Packet, PacketId, ProtocolVersion, PubAck, PubComp, PubRec,
    PubRel, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscribeProperties, SubscriptionOptions,
    TopicFilter, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use crate::accounting::Receipts;
use crate::payload::{Header, PublishTemplate, now_ns};
use crate::plan::Workload;
use crate::transport::Transport;

/// Largest packet accepted from the broker.
const MAX_PACKET: usize = 16 << 20;
/// Bytes a publisher encodes ahead before waiting for the socket.
const WRITE_BATCH: usize = 64 * 1024;
/// Read buffer headroom reserved before each read.
const READ_CHUNK: usize = 64 * 1024;
/// Initial capacity of each connection's read and write buffers, and the room reserved for a
/// handshake read: a CONNECT and a CONNACK take tens of bytes. Busy clients grow their buffers
/// (`READ_CHUNK`, `WRITE_BATCH`); idle ones (a storm's thousands) stay this small, which keeps the
/// generator's own memory growth (page faults, heap extensions) out of its cost per connect.
const INITIAL_BUFFER: usize = 256;
/// Time allowed for TCP connect plus CONNECT/CONNACK, and for SUBSCRIBE/SUBACK.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Session Expiry Interval (seconds) of 5.0 persistent sessions: longer than any run.
const PERSISTENT_SESSION_EXPIRY: u32 = 3600;

/// Counters every client adds to, read by the progress line.
#[derive(Debug, Default)]
pub struct Counters {
    /// PUBLISHes written.
    pub sent: AtomicU64,
    /// PUBLISHes acknowledged (PUBACK, or PUBCOMP at QoS 2) with success.
    pub acked: AtomicU64,
    /// PUBLISHes received by subscribers.
    pub received: AtomicU64,
    /// Clients connected (CONNACK with success).
    pub connected: AtomicU64,
}

/// An open MQTT connection with its buffers.
pub struct Conn<T: Transport> {
    reader: T::Reader,
    writer: T::Writer,
    rbuf: BytesMut,
    wbuf: BytesMut,
    version: ProtocolVersion,
    /// The broker's Receive Maximum (65535 when it announced none).
    pub receive_maximum: u16,
    keep_alive: Duration,
    /// When the transport sent the connection's first packet.
    pub began: Instant,
}

fn encode(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) -> Result<()> {
    packet
        .encode(version, out)
        .map_err(|e| anyhow!("cannot encode {:?}: {e}", packet.packet_type()))
}

impl<T: Transport> Conn<T> {
    /// Connects, sends CONNECT (no credentials; a clean or a persistent session) and waits for
    /// a successful CONNACK.
    pub async fn connect(
        transport: &T,
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        keep_alive: u16,
        persistent: bool,
    ) -> Result<Self> {
        timeout(
            HANDSHAKE_TIMEOUT,
            Self::connect_inner(transport, addr, version, client_id, keep_alive, persistent),
        )
        .await
        .map_err(|_| anyhow!("{client_id}: no CONNACK within {HANDSHAKE_TIMEOUT:?}"))?
    }

    async fn connect_inner(
        transport: &T,
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        keep_alive: u16,
        persistent: bool,
    ) -> Result<Self> {
        let (reader, writer, began) = transport
            .connect(addr)
            .await
            .with_context(|| format!("{client_id}: cannot connect to {addr}"))?;
        let id = MqttString::from_bytes(Bytes::copy_from_slice(client_id.as_bytes()))
            .map_err(|e| anyhow!("invalid client id `{client_id}`: {e}"))?;
        let mut conn = Self {
            reader,
            writer,
            // Small at first: idle connections (conn-storm) stay cheap; busy ones grow.
            rbuf: BytesMut::with_capacity(INITIAL_BUFFER),
            wbuf: BytesMut::with_capacity(INITIAL_BUFFER),
            version,
            receive_maximum: u16::MAX,
            keep_alive: Duration::from_secs(keep_alive.into()),
            began: Instant::from_std(began),
        };
        let mut connect = Connect::new(version, id, keep_alive);
        if persistent {
            connect.clean_start = false;
            if version == ProtocolVersion::V5 {
                connect.properties.session_expiry_interval = Some(PERSISTENT_SESSION_EXPIRY);
            }
        }
        let connect = Packet::Connect(Box::new(connect));
        encode(&connect, version, &mut conn.wbuf)?;
        conn.flush().await?;
        match conn.read_packet().await? {
            Packet::ConnAck(ack) if !ack.reason_code.is_error() => {
                if let Some(max) = ack.properties.receive_maximum {
                    conn.receive_maximum = max;
                }
                if let Some(ka) = ack.properties.server_keep_alive {
                    conn.keep_alive = Duration::from_secs(ka.into());
                }
                Ok(conn)
            }
            Packet::ConnAck(ack) => bail!("{client_id}: CONNACK refused: {:?}", ack.reason_code),
            other => bail!(
                "{client_id}: expected CONNACK, got {:?}",
                other.packet_type()
            ),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.writer.write_all_buf(&mut self.wbuf).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Flushes once the write buffer is empty: a QUIC stream in send-on-flush mode sends the
    /// batch from this task then (TCP has nothing to flush).
    async fn flush_if_written(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            self.writer.flush().await?;
        }
        Ok(())
    }

    /// Reads until one whole packet is decoded (handshakes only; the loops decode in batches).
    async fn read_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = decode(&mut self.rbuf, self.version, MAX_PACKET)? {
                return Ok(p);
            }
            self.rbuf.reserve(INITIAL_BUFFER);
            if self.reader.read_buf(&mut self.rbuf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// Subscribes to `filter` at `qos` and checks the SUBACK grants it.
    pub async fn subscribe(&mut self, filter: TopicFilter, qos: QoS) -> Result<()> {
        let shown = filter.as_str().to_string();
        timeout(HANDSHAKE_TIMEOUT, self.subscribe_inner(filter, qos))
            .await
            .map_err(|_| anyhow!("no SUBACK for `{shown}` within {HANDSHAKE_TIMEOUT:?}"))?
    }

    async fn subscribe_inner(&mut self, filter: TopicFilter, qos: QoS) -> Result<()> {
        let shown = filter.as_str().to_string();
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![SubscribeFilter {
                filter,
                options: SubscriptionOptions::qos(qos),
            }],
            properties: SubscribeProperties::default(),
        });
        encode(&subscribe, self.version, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            match self.read_packet().await? {
                Packet::SubAck(ack) => {
                    return match ack.reason_codes.first() {
                        Some(code) if !code.is_error() => Ok(()),
                        code => bail!("subscription to `{shown}` refused: {code:?}"),
                    };
                }
                // A retained message may arrive before the SUBACK: not part of the run.
                Packet::Publish(_) | Packet::PingResp => {}
                other => bail!("expected SUBACK, got {:?}", other.packet_type()),
            }
        }
    }

    /// Sends DISCONNECT and closes, ignoring errors: the run is over either way.
    pub async fn disconnect(mut self) {
        let d = Packet::Disconnect(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION));
        if encode(&d, self.version, &mut self.wbuf).is_ok() {
            let _ = timeout(Duration::from_secs(2), self.flush()).await;
        }
        let _ = self.writer.shutdown().await;
    }

    fn ping_every(&self) -> Duration {
        if self.keep_alive.is_zero() {
            Duration::from_secs(3600)
        } else {
            self.keep_alive / 2
        }
    }
}

/// Packet identifiers in use, a bit each.
struct InflightIds {
    used: Vec<u64>,
    next: u16,
}

impl InflightIds {
    fn new() -> Self {
        Self {
            used: vec![0; 1024],
            next: 1,
        }
    }

    /// A free identifier (the caller keeps fewer than 65535 in use).
    fn allocate(&mut self) -> u16 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            let (w, m) = (id as usize / 64, 1u64 << (id % 64));
            if self.used[w] & m == 0 {
                self.used[w] |= m;
                return id;
            }
        }
    }

    /// Frees `id`; false if it was not in use (a stray or repeated ack).
    fn release(&mut self, id: u16) -> bool {
        let (w, m) = (id as usize / 64, 1u64 << (id % 64));
        let was = self.used[w] & m != 0;
        self.used[w] &= !m;
        was
    }
}

/// What a publisher did.
#[derive(Debug, Default)]
pub struct PubOutcome {
    /// PUBLISHes written.
    pub sent: u64,
    /// PUBLISHes acknowledged with success.
    pub acked: u64,
    /// PUBLISHes acknowledged with an error reason code.
    pub rejected: u64,
    /// When the last PUBLISH was written.
    pub last_send: Option<Instant>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Publishes until the workload's duration or count, then waits (up to its drain time) for the
/// outstanding acknowledgements and disconnects.
pub async fn run_publisher<T: Transport>(
    mut conn: Conn<T>,
    publisher: u32,
    template: PublishTemplate,
    load: Workload,
    start: Instant,
    counters: &Counters,
) -> PubOutcome {
    let mut out = PubOutcome::default();
    if let Err(e) = publish_loop(
        &mut conn, publisher, &template, &load, start, counters, &mut out,
    )
    .await
    {
        out.error = Some(format!("publisher {}: {e:#}", publisher + 1));
    } else {
        conn.disconnect().await;
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn publish_loop<T: Transport>(
    conn: &mut Conn<T>,
    publisher: u32,
    template: &PublishTemplate,
    load: &Workload,
    start: Instant,
    counters: &Counters,
    out: &mut PubOutcome,
) -> Result<()> {
    let qos = load.qos;
    let version = conn.version;
    let window = if qos == QoS::AtMostOnce {
        u64::MAX
    } else {
        u64::from(load.inflight.min(conn.receive_maximum).max(1))
    };
    let interval = (load.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / load.rate));
    let deadline = start + load.duration;
    let ping_every = conn.ping_every();
    let mut ids = InflightIds::new();
    let mut inflight = 0u64;
    let mut seq = 0u64;
    let mut next_due = start;
    let mut last_tx = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut timer = pin!(sleep_until(deadline));

    loop {
        let now = Instant::now();
        let sending = now < deadline && load.count.is_none_or(|c| seq < c);
        if !sending {
            let stopped = *stopped_at.get_or_insert(now);
            let settled = inflight == 0 && conn.wbuf.is_empty();
            if settled || now >= stopped + load.drain {
                return Ok(());
            }
        }
        if now >= last_tx + ping_every && conn.wbuf.is_empty() {
            encode(&Packet::PingReq, version, &mut conn.wbuf)?;
            last_tx = now;
        }
        if sending && conn.wbuf.len() < WRITE_BATCH {
            let before = seq;
            while conn.wbuf.len() < WRITE_BATCH
                && inflight < window
                && load.count.is_none_or(|c| seq < c)
            {
                if let Some(iv) = interval {
                    if next_due > now {
                        break;
                    }
                    next_due += iv;
                }
                let packet_id = if qos == QoS::AtMostOnce {
                    0
                } else {
                    inflight += 1;
                    ids.allocate()
                };
                let header = Header {
                    publisher,
                    seq,
                    sent_ns: now_ns(),
                };
                template.write(&mut conn.wbuf, packet_id, &header);
                seq += 1;
            }
            if seq > before {
                counters.sent.fetch_add(seq - before, Relaxed);
                out.sent = seq;
                out.last_send = Some(now);
            }
        }

        // The next moment something is due without any I/O happening.
        let mut wake = last_tx + ping_every;
        match stopped_at {
            Some(stopped) => wake = wake.min(stopped + load.drain),
            None => {
                wake = wake.min(deadline);
                if interval.is_some() && inflight < window && conn.wbuf.len() < WRITE_BATCH {
                    wake = wake.min(next_due);
                }
            }
        }
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }

        tokio::select! {
            biased;
            r = conn.reader.read_buf(&mut conn.rbuf) => {
                if r? == 0 {
                    bail!("the broker closed the connection");
                }
                let (mut acked, mut rejected) = (0u64, 0u64);
                while let Some(packet) = decode(&mut conn.rbuf, version, MAX_PACKET)? {
                    match packet {
                        Packet::PubAck(a) if ids.release(a.packet_id.get()) => {
                            inflight -= 1;
                            if a.reason_code.is_error() { rejected += 1 } else { acked += 1 }
                        }
                        Packet::PubRec(r) => {
                            if r.reason_code.is_error() {
                                if ids.release(r.packet_id.get()) {
                                    inflight -= 1;
                                    rejected += 1;
                                }
                            } else {
                                encode(&Packet::PubRel(PubRel::new(r.packet_id)), version, &mut conn.wbuf)?;
                            }
                        }
                        Packet::PubComp(c) if ids.release(c.packet_id.get()) => {
                            inflight -= 1;
                            acked += 1;
                        }
                        Packet::Disconnect(d) => bail!("the broker disconnected: {:?}", d.reason_code),
                        _ => {}
                    }
                }
                conn.rbuf.reserve(READ_CHUNK);
                if acked > 0 {
                    counters.acked.fetch_add(acked, Relaxed);
                }
                out.acked += acked;
                out.rejected += rejected;
            }
            r = conn.writer.write_buf(&mut conn.wbuf), if !conn.wbuf.is_empty() => {
                r?;
                conn.flush_if_written().await?;
                last_tx = Instant::now();
            }
            _ = &mut timer => {}
        }
    }
}

/// What a subscriber received.
#[derive(Debug, Default)]
pub struct SubOutcome {
    /// Messages, duplicates and latencies.
    pub receipts: Receipts,
    /// When the last message arrived.
    pub last_recv: Option<Instant>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Receives, acknowledges and accounts for messages until `stop` turns true.
pub async fn run_subscriber<T: Transport>(
    mut conn: Conn<T>,
    index: u32,
    mut stop: watch::Receiver<bool>,
    counters: &Counters,
) -> SubOutcome {
    let mut out = SubOutcome::default();
    match subscribe_loop(&mut conn, &mut stop, counters, &mut out).await {
        Ok(()) => conn.disconnect().await,
        Err(e) => out.error = Some(format!("subscriber {}: {e:#}", index + 1)),
    }
    out
}

async fn subscribe_loop<T: Transport>(
    conn: &mut Conn<T>,
    stop: &mut watch::Receiver<bool>,
    counters: &Counters,
    out: &mut SubOutcome,
) -> Result<()> {
    let version = conn.version;
    let mut ping = tokio::time::interval(conn.ping_every());
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    while !*stop.borrow() {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = conn.reader.read_buf(&mut conn.rbuf) => {
                if r? == 0 {
                    bail!("the broker closed the connection");
                }
                let now = now_ns();
                let mut publishes = 0u64;
                while let Some(packet) = decode(&mut conn.rbuf, version, MAX_PACKET)? {
                    match packet {
                        Packet::Publish(p) => {
                            publishes += 1;
                            match Header::read(&p.payload) {
                                Some(h) => out.receipts.record(h.publisher, h.seq, h.sent_ns, now),
                                None => out.receipts.foreign += 1,
                            }
                            match (p.qos, p.packet_id) {
                                (QoS::AtLeastOnce, Some(id)) => encode(&Packet::PubAck(PubAck::new(id)), version, &mut conn.wbuf)?,
                                (QoS::ExactlyOnce, Some(id)) => encode(&Packet::PubRec(PubRec::new(id)), version, &mut conn.wbuf)?,
                                _ => {}
                            }
                        }
                        Packet::PubRel(r) => encode(&Packet::PubComp(PubComp::new(r.packet_id)), version, &mut conn.wbuf)?,
                        Packet::Disconnect(d) => bail!("the broker disconnected: {:?}", d.reason_code),
                        _ => {}
                    }
                }
                conn.rbuf.reserve(READ_CHUNK);
                if publishes > 0 {
                    counters.received.fetch_add(publishes, Relaxed);
                    out.last_recv = Some(Instant::now());
                }
            }
            r = conn.writer.write_buf(&mut conn.wbuf), if !conn.wbuf.is_empty() => {
                r?;
                conn.flush_if_written().await?;
            }
            _ = ping.tick() => encode(&Packet::PingReq, version, &mut conn.wbuf)?,
        }
    }
    // Acks still buffered go out before DISCONNECT.
    let _ = timeout(Duration::from_secs(2), conn.flush()).await;
    Ok(())
}

/// Holds an idle connection (answering keep alive) until `stop` turns true, then disconnects.
pub async fn hold_idle<T: Transport>(
    mut conn: Conn<T>,
    mut stop: watch::Receiver<bool>,
) -> Option<String> {
    let result: Result<()> = async {
        let version = conn.version;
        let mut ping = tokio::time::interval(conn.ping_every());
        ping.tick().await;
        while !*stop.borrow() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = conn.reader.read_buf(&mut conn.rbuf) => {
                    if r? == 0 {
                        bail!("the broker closed the connection");
                    }
                    while let Some(packet) = decode(&mut conn.rbuf, version, MAX_PACKET)? {
                        if let Packet::Disconnect(d) = packet {
                            bail!("the broker disconnected: {:?}", d.reason_code);
                        }
                    }
                }
                r = conn.writer.write_buf(&mut conn.wbuf), if !conn.wbuf.is_empty() => {
                    r?;
                    conn.flush_if_written().await?;
                }
                _ = ping.tick() => encode(&Packet::PingReq, version, &mut conn.wbuf)?,
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            conn.disconnect().await;
            None
        }
        Err(e) => Some(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_ids_skip_those_in_use_and_wrap() {
        let mut ids = InflightIds::new();
        assert_eq!(ids.allocate(), 1);
        assert_eq!(ids.allocate(), 2);
        assert!(ids.release(1));
        assert!(!ids.release(1));
        ids.next = u16::MAX;
        assert_eq!(ids.allocate(), u16::MAX);
        // Wraps past 0 to 1 (free again), skips 2 (in use).
        assert_eq!(ids.allocate(), 1);
        assert_eq!(ids.allocate(), 3);
    }
}
