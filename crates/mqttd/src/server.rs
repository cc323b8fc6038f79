//! The tokio edges: the TCP listener, one task per connection, and the core task that owns the
//! [`Broker`].
//!
//! Shape (mini-redis's `server.rs`/`shutdown.rs`, quinn's driver):
//! - The listener accepts while a connection permit is free (`max_connections`); over the limit
//!   a connection is closed at once and counted.
//! - A connection is any byte stream plus a peer address ([`serve_connection`] is generic over
//!   `AsyncRead + AsyncWrite`): its reader half decodes packets and sends them to the core over
//!   the bounded event channel (so a fast publisher is slowed by TCP back-pressure, never the
//!   core); its writer half drains a bounded per-connection channel of [`Transmit`]s, encodes
//!   them in batches and reports how many PUBLISHes it wrote (the core's credit).
//! - The core task is the only owner of the `Broker`. It never awaits a connection: it uses
//!   `try_send`; a connection whose channel is full even for control packets is killed.
//! - Shutdown: a `watch` flips; the listener stops accepting, the core sends DISCONNECT 0x8B to
//!   5.0 clients and closes every connection; writers flush what is queued; `run` returns when
//!   every connection task has ended (a counted drop of an mpsc sender) or the grace time is up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use mqttd_codec::{
    ConnAck, Connect, DecodeError, Packet, ProtocolVersion, ReasonCode, decode, decode_connect,
};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::broker::{Broker, BrokerOptions, CloseReason, ConnId, InFlightCommit, Transmit};
use crate::config::{Config, Durability, Limits};
use crate::metrics::Metrics;
use crate::store::Store;

/// An input to the core task.
#[derive(Debug)]
pub enum Event {
    /// A connection sent its CONNECT.
    Connect {
        /// The connection.
        conn: ConnId,
        /// Its peer.
        peer: SocketAddr,
        /// The decoded CONNECT.
        connect: Box<Connect>,
        /// Where the core sends its packets.
        tx: mpsc::Sender<Box<Transmit>>,
        /// Kills the connection when it cannot keep up.
        kill: Arc<Notify>,
    },
    /// A packet on an established connection.
    Packet {
        /// The connection.
        conn: ConnId,
        /// The packet.
        packet: Packet,
    },
    /// The peer broke the protocol; the core tells it (5.0) and closes.
    ProtocolError {
        /// The connection.
        conn: ConnId,
        /// The reason code for the DISCONNECT.
        reason: ReasonCode,
    },
    /// The writer wrote this many PUBLISH packets.
    Written {
        /// The connection.
        conn: ConnId,
        /// How many.
        n: usize,
    },
    /// The connection ended.
    Closed {
        /// The connection.
        conn: ConnId,
    },
}

/// What every connection task needs, whatever transport accepted it. A listener (TCP now,
/// QUIC later) admits a connection with [`ConnContext::admit`] and hands the stream to
/// [`serve_connection`].
#[derive(Clone, Debug)]
pub struct ConnContext {
    events: mpsc::Sender<Event>,
    limits: Limits,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    next_conn: Arc<AtomicU64>,
    /// Held by every connection task: the core waits for all clones to drop on shutdown.
    _alive: mpsc::Sender<()>,
}

/// A connection admitted under `max_connections`; the slot is freed on drop.
#[derive(Debug)]
pub struct Admission {
    /// The connection's identifier.
    pub conn: ConnId,
    _permit: OwnedSemaphorePermit,
}

impl ConnContext {
    /// The limits every connection runs under (another listener reads its timeouts here).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The broker's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Takes a connection slot, or `None` at `max_connections` (counted as refused).
    pub fn admit(&self) -> Option<Admission> {
        Metrics::add(&self.metrics.connections_accepted, 1);
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Admission {
                conn: self.next_conn.fetch_add(1, Ordering::Relaxed) + 1,
                _permit: permit,
            }),
            Err(_) => {
                Metrics::add(&self.metrics.connections_refused, 1);
                None
            }
        }
    }
}

/// A running broker: its addresses and how to stop it.
#[derive(Debug)]
pub struct Running {
    /// The MQTT listener's address.
    pub mqtt_addr: SocketAddr,
    /// The HTTP listener's address, if enabled.
    pub http_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    ctx: ConnContext,
}

impl Running {
    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        let Running {
            shutdown,
            done,
            ctx,
            ..
        } = self;
        let _ = shutdown.send(true);
        // Our context clone would keep the event channel open and the wait below waiting.
        drop(ctx);
        let _ = done.await;
    }

    /// Waits until the broker has stopped (after a shutdown started elsewhere).
    pub async fn wait(self) {
        let Running { done, ctx, .. } = self;
        drop(ctx);
        let _ = done.await;
    }

    /// The context another listener (QUIC) uses to serve connections into this broker.
    pub fn context(&self) -> ConnContext {
        self.ctx.clone()
    }

    /// A handle that starts a shutdown.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Opens the configured store (`storage`, `data_dir`), binds the listeners and starts the
/// broker's tasks.
pub async fn start(config: Config) -> std::io::Result<Running> {
    let store = crate::store_redb::open_configured(&config)?;
    start_with_store(config, store).await
}

/// [`start`] with a given store (tests inject faults this way).
pub async fn start_with_store(config: Config, store: Box<dyn Store>) -> std::io::Result<Running> {
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen for MQTT on {} (`listen`): {e}",
                config.listen
            ),
        )
    })?;
    let mqtt_addr = listener.local_addr()?;
    let http = match config.http_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen for HTTP on {addr} (`http_listen`): {e}"),
            )
        })?),
        None => None,
    };
    let http_addr = match &http {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(l) = http {
        tokio::spawn(crate::http::serve(l, metrics.clone(), shutdown_rx.clone()));
    }
    let loading = Instant::now();
    let broker = Broker::new(
        BrokerOptions {
            limits: config.limits.clone(),
            allow_anonymous: config.allow_anonymous,
        },
        store,
        metrics.clone(),
        Instant::now(),
    )
    .map_err(std::io::Error::other)?;
    crate::store_redb::log_restored(&broker, loading);
    let (events_tx, events_rx) = mpsc::channel(8192);
    let (alive_tx, alive_rx) = mpsc::channel::<()>(1);
    let ctx = ConnContext {
        events: events_tx,
        limits: config.limits.clone(),
        metrics: metrics.clone(),
        permits: Arc::new(Semaphore::new(config.limits.max_connections)),
        next_conn: Arc::new(AtomicU64::new(0)),
        _alive: alive_tx,
    };
    let core = tokio::spawn(run_core(
        broker,
        events_rx,
        shutdown_rx.clone(),
        config.clone(),
        metrics.clone(),
    ));
    let accept = tokio::spawn(accept_loop(listener, ctx.clone(), shutdown_rx));
    let grace = config.shutdown_grace;
    let done = tokio::spawn(async move {
        let _ = accept.await;
        // Every connection task holds an `_alive` sender; recv() returns None when all are gone.
        let mut alive_rx = alive_rx;
        let _ = tokio::time::timeout(grace + Duration::from_secs(1), alive_rx.recv()).await;
        let _ = core.await;
    });
    Ok(Running {
        mqtt_addr,
        http_addr,
        shutdown: shutdown_tx,
        done,
        ctx,
    })
}

async fn accept_loop(listener: TcpListener, ctx: ConnContext, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(admission) = ctx.admit() else {
            tracing::warn!(%peer, max_connections = ctx.limits.max_connections, "connection refused: limit reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, admission.conn, ctx).await;
            drop(admission);
        });
    }
}

/// Reads until one CONNECT is decoded. `Ok(None)`: the peer closed first.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    metrics: &Metrics,
) -> Result<Option<Connect>, DecodeError> {
    loop {
        if let Some(c) = decode_connect(buf, max)? {
            return Ok(Some(c));
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => Metrics::add(&metrics.bytes_received, n as u64),
        }
    }
}

/// The protocol level a partial CONNECT announces, if the buffer holds that far.
fn announced_level(buf: &[u8]) -> Option<u8> {
    // Fixed header (1 byte + 1-4 length bytes), then protocol name (2 + n) and the level byte.
    let mut i = 1;
    while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
        i += 1;
    }
    let name_at = i + 1;
    let len = usize::from(u16::from_be_bytes([
        *buf.get(name_at)?,
        *buf.get(name_at + 1)?,
    ]));
    buf.get(name_at + 2 + len).copied()
}

/// Serves one MQTT connection over any byte stream until it ends.
pub async fn serve_connection<IO>(io: IO, peer: SocketAddr, conn: ConnId, ctx: ConnContext)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let max = ctx.limits.max_packet_size as usize;
    // Small at first: most connections are idle most of the time; it grows with the packets.
    let mut buf = BytesMut::with_capacity(512);
    let connect = match tokio::time::timeout(
        ctx.limits.connect_timeout,
        read_connect(&mut rd, &mut buf, max, &ctx.metrics),
    )
    .await
    {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time");
            return;
        }
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad CONNECT");
            // 3.1.1 has return codes for two CONNECT errors; 5.0 has a reason code for all.
            let reply = if let Some(code) = e.connack_code_v3() {
                ReasonCode::from_v3_connack(code).map(|rc| (ProtocolVersion::V3_1_1, rc))
            } else if announced_level(&buf) == Some(5) {
                Some((ProtocolVersion::V5, e.reason_code()))
            } else {
                None
            };
            if let Some((version, rc)) = reply {
                let mut out = BytesMut::new();
                if Packet::ConnAck(Box::new(ConnAck::new(rc)))
                    .encode(version, &mut out)
                    .is_ok()
                {
                    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
                }
            }
            let _ = wr.shutdown().await;
            return;
        }
    };
    let version = connect.protocol_version;
    let capacity = ctx.limits.connection_buffer + 2 * usize::from(ctx.limits.max_inflight) + 64;
    let (tx, rx) = mpsc::channel(capacity);
    let kill = Arc::new(Notify::new());
    let event = Event::Connect {
        conn,
        peer,
        connect: Box::new(connect),
        tx,
        kill: kill.clone(),
    };
    if ctx.events.send(event).await.is_err() {
        return;
    }
    let mut writer = tokio::spawn(write_loop(
        wr,
        rx,
        version,
        conn,
        ctx.events.clone(),
        ctx.metrics.clone(),
    ));
    let mut writer_done = false;
    'read: loop {
        loop {
            match decode(&mut buf, version, max) {
                Ok(Some(packet)) => {
                    if ctx
                        .events
                        .send(Event::Packet { conn, packet })
                        .await
                        .is_err()
                    {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%peer, conn, error = %e, "malformed packet");
                    let _ = ctx
                        .events
                        .send(Event::ProtocolError {
                            conn,
                            reason: e.reason_code(),
                        })
                        .await;
                    break 'read;
                }
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => Metrics::add(&ctx.metrics.bytes_received, n as u64),
            },
            _ = &mut writer => { writer_done = true; break }
            _ = kill.notified() => { writer.abort(); break }
        }
    }
    let _ = ctx.events.send(Event::Closed { conn }).await;
    if !writer_done {
        // The core drops our sender on Closed; the writer then flushes what is queued and ends.
        tokio::select! {
            _ = &mut writer => {}
            _ = kill.notified() => writer.abort(),
            _ = tokio::time::sleep(Duration::from_secs(10)) => writer.abort(),
        }
    }
    drop(ctx);
}

/// Payloads at least this large are written from the shared `Bytes` (vectored write) instead
/// of being copied into the connection's write buffer.
const ZERO_COPY_MIN: usize = 1024;

/// The encoded bytes of one batch: small packets coalesced in a buffer, large payloads kept
/// as the shared `Bytes` the publisher's read produced.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
    segments: Vec<Bytes>,
    len: usize,
}

impl Outbox {
    fn push(
        &mut self,
        packet: Packet,
        version: ProtocolVersion,
    ) -> Result<(), mqttd_codec::EncodeError> {
        let Packet::Publish(mut p) = packet else {
            let before = self.buf.len();
            packet.encode(version, &mut self.buf)?;
            self.len += self.buf.len() - before;
            return Ok(());
        };
        if p.payload.len() < ZERO_COPY_MIN {
            let before = self.buf.len();
            Packet::Publish(p).encode(version, &mut self.buf)?;
            self.len += self.buf.len() - before;
            return Ok(());
        }
        let payload = std::mem::take(&mut p.payload);
        // Encode everything but the payload, then fix the Remaining Length to include it.
        let mut head = BytesMut::new();
        Packet::Publish(p).encode(version, &mut head)?;
        let (rest_len, varint_len) =
            read_varint(&head[1..]).ok_or(mqttd_codec::EncodeError::PacketTooLarge(0))?;
        let total = rest_len + payload.len();
        if total > 268_435_455 {
            return Err(mqttd_codec::EncodeError::PacketTooLarge(total));
        }
        let before = self.buf.len();
        self.buf.extend_from_slice(&head[..1]);
        write_varint(&mut self.buf, total);
        self.buf.extend_from_slice(&head[1 + varint_len..]);
        self.len += self.buf.len() - before + payload.len();
        self.segments.push(self.buf.split().freeze());
        self.segments.push(payload);
        Ok(())
    }

    /// Writes everything, vectored; returns the byte count.
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<usize> {
        if !self.buf.is_empty() {
            self.segments.push(self.buf.split().freeze());
        }
        let written = self.len;
        let mut first = 0;
        while first < self.segments.len() {
            let slices: Vec<std::io::IoSlice<'_>> = self.segments[first..]
                .iter()
                .take(64)
                .map(|b| std::io::IoSlice::new(b))
                .collect();
            let mut n = wr.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let seg = &mut self.segments[first];
                if n >= seg.len() {
                    n -= seg.len();
                    first += 1;
                } else {
                    seg.advance(n);
                    n = 0;
                }
            }
        }
        self.segments.clear();
        self.len = 0;
        if self.buf.capacity() > 1 << 20 {
            self.buf = BytesMut::with_capacity(16 * 1024);
        }
        Ok(written)
    }
}

fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn write_varint(buf: &mut BytesMut, mut v: usize) {
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        buf.extend_from_slice(&[byte]);
        if v == 0 {
            break;
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Box<Transmit>>,
    version: ProtocolVersion,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
) {
    let mut out = Outbox::default();
    let mut batch = Vec::with_capacity(64);
    loop {
        if rx.recv_many(&mut batch, 64).await == 0 {
            break; // The core let go of this connection.
        }
        let mut publishes = 0;
        let mut close = false;
        for t in batch.drain(..) {
            match *t {
                Transmit::Packet(p) => {
                    if matches!(p, Packet::Publish(_)) {
                        publishes += 1;
                    }
                    if let Err(e) = out.push(p, version) {
                        tracing::warn!(conn, error = %e, "cannot encode packet");
                    }
                }
                Transmit::Close => {
                    close = true;
                    break;
                }
            }
        }
        match out.write_to(&mut wr).await {
            Ok(n) => Metrics::add(&metrics.bytes_sent, n as u64),
            Err(_) => break,
        }
        if publishes > 0
            && events
                .send(Event::Written { conn, n: publishes })
                .await
                .is_err()
        {
            break;
        }
        if close {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

struct Handle {
    tx: mpsc::Sender<Box<Transmit>>,
    kill: Arc<Notify>,
}

async fn run_core(
    mut broker: Broker<Box<dyn Store>>,
    mut events: mpsc::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
    config: Config,
    metrics: Arc<Metrics>,
) {
    let mut handles: HashMap<ConnId, Handle> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sys_every = config.sys_interval.unwrap_or(Duration::from_secs(3600));
    let mut sys = tokio::time::interval(sys_every);
    sys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(256);
    // `durability = "sync"`: a batch's packets (its acknowledgements among them) wait for the
    // one commit that makes the whole batch durable (group commit). The store's writer thread
    // commits while this task goes on with the next events, whose packets wait for the next
    // commit, started as soon as the one in flight completes (pipelined).
    let hold = broker.is_durable() && config.durability == Durability::Sync;
    let periodic = broker.is_durable() && config.durability == Durability::Periodic;
    let mut commit_tick = tokio::time::interval(config.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut committing: Option<InFlightCommit> = None;
    // Connections closed whose last packets are not handed over yet (with sync durability,
    // those of closes before a commit started wait in it); their handles go once they are.
    let mut closed = Vec::new();
    loop {
        tokio::select! {
            n = events.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                for ev in batch.drain(..) {
                    if hold && let Event::Closed { conn } = ev {
                        // Held packets for this connection (a CONNACK, a DISCONNECT with its
                        // reason code) still go out after the commit: its writer flushes what it
                        // was handed once the handle is dropped.
                        broker.handle_closed(conn, CloseReason::NetworkError, now);
                        closed.push(conn);
                        continue;
                    }
                    handle_event(&mut broker, &mut handles, ev, now);
                    if !hold {
                        dispatch(&mut broker, &mut handles, now);
                    }
                }
                if hold {
                    sync_commit(&mut broker, &mut handles, &mut committing, &mut closed, now);
                } else {
                    broker.flush_store();
                }
            }
            result = crate::broker::committed(&mut committing) => {
                if let Some(mut c) = committing.take() {
                    let gone = broker.complete_commit(&mut c, result, hold, &mut closed);
                    if !c.is_empty() {
                        committing = Some(c);
                    }
                    dispatch(&mut broker, &mut handles, Instant::now());
                    for conn in gone {
                        handles.remove(&conn);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                broker.handle_timeout(now);
                if hold {
                    sync_commit(&mut broker, &mut handles, &mut committing, &mut closed, now);
                } else {
                    dispatch(&mut broker, &mut handles, now);
                }
            }
            _ = commit_tick.tick(), if periodic && committing.is_none() => {
                committing = broker.start_commit();
                dispatch(&mut broker, &mut handles, Instant::now());
            }
            _ = sys.tick(), if config.sys_interval.is_some() => {
                let now = Instant::now();
                broker.publish_sys(metrics.sys_topics(), now);
                if hold {
                    sync_commit(&mut broker, &mut handles, &mut committing, &mut closed, now);
                } else {
                    dispatch(&mut broker, &mut handles, now);
                }
            }
            _ = shutdown.changed() => {
                tracing::info!(clients = broker.connected(), "shutting down");
                let now = Instant::now();
                broker.shutdown(now);
                // The commit in flight (and those its completion starts) first, in order.
                while let Some(mut c) = committing.take() {
                    let result = c.result().await;
                    let gone = broker.complete_commit(&mut c, result, hold, &mut closed);
                    if !c.is_empty() {
                        committing = Some(c);
                    }
                    dispatch(&mut broker, &mut handles, now);
                    for conn in gone {
                        handles.remove(&conn);
                    }
                }
                crate::store_redb::commit(&mut broker);
                dispatch(&mut broker, &mut handles, now);
                handles.clear();
                break;
            }
        }
    }
    // Keep draining events so no connection task blocks on a full channel while it ends.
    let deadline = tokio::time::sleep(config.shutdown_grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            n = events.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                for ev in batch.drain(..) {
                    if let Event::Connect { tx, .. } = ev {
                        // Accepted just before shutdown: refuse it politely.
                        let refuse = ConnAck::new(ReasonCode::ServerShuttingDown);
                        let _ = tx.try_send(Box::new(Transmit::Packet(refuse.into())));
                        let _ = tx.try_send(Box::new(Transmit::Close));
                    }
                }
            }
            _ = &mut deadline => break,
        }
    }
}

fn handle_event(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut HashMap<ConnId, Handle>,
    ev: Event,
    now: Instant,
) {
    match ev {
        Event::Connect {
            conn,
            peer,
            connect,
            tx,
            kill,
        } => {
            handles.insert(conn, Handle { tx, kill });
            broker.handle_connect(conn, peer.ip(), *connect, now);
        }
        Event::Packet { conn, packet } => broker.handle_packet(conn, packet, now),
        Event::ProtocolError { conn, reason } => broker.handle_protocol_error(conn, reason, now),
        Event::Written { conn, n } => broker.handle_written(conn, n, now),
        Event::Closed { conn } => {
            handles.remove(&conn);
            broker.handle_closed(conn, CloseReason::NetworkError, now);
        }
    }
}

/// `durability = "sync"`: starts (or queues behind the one in flight) a commit of what the
/// events so far changed, which holds their packets; with nothing to commit and nothing in
/// flight, hands the packets over at once.
fn sync_commit(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut HashMap<ConnId, Handle>,
    committing: &mut Option<InFlightCommit>,
    closed: &mut Vec<ConnId>,
    now: Instant,
) {
    broker.commit_held(committing, closed);
    if committing.is_none() {
        dispatch(broker, handles, now);
        for conn in closed.drain(..) {
            handles.remove(&conn);
        }
    }
}

/// Hands every pending transmit to its connection without ever waiting.
fn dispatch(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut HashMap<ConnId, Handle>,
    now: Instant,
) {
    while let Some((conn, t)) = broker.poll_transmit() {
        let Some(h) = handles.get(&conn) else {
            continue;
        };
        let close = matches!(t, Transmit::Close);
        // Boxed in the channel: a slot is a pointer, so an idle connection's channel block
        // costs 32 pointers instead of 32 packets.
        match h.tx.try_send(Box::new(t)) {
            Ok(()) if close => {
                handles.remove(&conn);
            }
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn, "connection cannot keep up; closing it");
                if let Some(h) = handles.remove(&conn) {
                    h.kill.notify_one();
                }
                broker.handle_closed(conn, CloseReason::NetworkError, now);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                handles.remove(&conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_codec::{Publish, QoS, Topic, decode};

    #[tokio::test]
    async fn large_payloads_are_written_from_shared_bytes_and_decode_the_same() {
        let payload = Bytes::from(vec![7u8; 200_000]);
        let mut p = Publish::new(
            Topic::new("big/t").expect("topic"),
            QoS::AtLeastOnce,
            std::num::NonZeroU16::new(3),
            payload.clone(),
        );
        p.properties.user_properties = vec![mqttd_codec::UserProperty::new(
            mqttd_codec::MqttString::from_static("k").expect("k"),
            mqttd_codec::MqttString::from_static("v").expect("v"),
        )]
        .into();
        let small = Publish::new(
            Topic::new("s").expect("topic"),
            QoS::AtMostOnce,
            None,
            Bytes::from_static(b"x"),
        );
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut out = Outbox::default();
            out.push(Packet::Publish(small.clone()), version)
                .expect("encode");
            out.push(Packet::Publish(p.clone()), version)
                .expect("encode");
            out.push(Packet::PingResp, version).expect("encode");
            // The payload segment is the publisher's buffer, not a copy.
            assert!(out.segments.iter().any(|s| s.as_ptr() == payload.as_ptr()));
            let mut wire = Vec::new();
            let n = out.write_to(&mut wire).await.expect("write");
            assert_eq!(n, wire.len());
            let mut buf = BytesMut::from(&wire[..]);
            let got: Vec<Packet> =
                std::iter::from_fn(|| decode(&mut buf, version, 1 << 20).expect("valid")).collect();
            let mut want = p.clone();
            if !version.is_v5() {
                want.properties = Default::default();
            }
            assert_eq!(got.len(), 3);
            assert!(matches!(&got[0], Packet::Publish(x) if x.payload[..] == b"x"[..]));
            assert_eq!(got[1], Packet::Publish(want));
            assert_eq!(got[2], Packet::PingResp);
        }
    }

    /// A connection is any byte stream: here an in-memory duplex pipe stands in for the QUIC
    /// stream that will use the same entry point.
    #[tokio::test]
    async fn any_byte_stream_serves_a_connection() {
        use mqttd_codec::{Connect, MqttString, SubscribeFilter, SubscriptionOptions, TopicFilter};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            http_listen: None,
            storage: crate::config::StorageKind::Memory,
            ..Config::default()
        };
        let running = start(config).await.expect("start");
        let ctx = running.context();
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");

        let mut clients = Vec::new();
        for id in ["pipe-sub", "pipe-pub"] {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let admission = ctx.admit().expect("a free slot");
            let ctx = ctx.clone();
            tokio::spawn(async move {
                serve_connection(theirs, peer, admission.conn, ctx).await;
                drop(admission);
            });
            let mut ours = ours;
            let connect = Connect::new(
                ProtocolVersion::V5,
                MqttString::from_static(id).expect("id"),
                30,
            );
            let bytes = Packet::Connect(Box::new(connect))
                .to_bytes(ProtocolVersion::V5)
                .expect("encode");
            ours.write_all(&bytes).await.expect("write");
            clients.push((ours, BytesMut::new()));
        }
        async fn next(io: &mut tokio::io::DuplexStream, buf: &mut BytesMut) -> Packet {
            loop {
                if let Some(p) = decode(buf, ProtocolVersion::V5, 1 << 20).expect("valid") {
                    return p;
                }
                let n = tokio::time::timeout(Duration::from_secs(5), io.read_buf(buf))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "closed");
            }
        }
        for (io, buf) in &mut clients {
            assert!(
                matches!(next(io, buf).await, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success)
            );
        }
        let sub = Packet::Subscribe(mqttd_codec::Subscribe {
            packet_id: std::num::NonZeroU16::MIN,
            filters: vec![SubscribeFilter {
                filter: TopicFilter::new("pipe/#").expect("filter"),
                options: SubscriptionOptions::default(),
            }],
            properties: Default::default(),
        });
        let (sub_io, sub_buf) = &mut clients[0];
        sub_io
            .write_all(&sub.to_bytes(ProtocolVersion::V5).expect("encode"))
            .await
            .expect("write");
        assert!(matches!(next(sub_io, sub_buf).await, Packet::SubAck(_)));
        let publish = Packet::Publish(mqttd_codec::Publish::new(
            mqttd_codec::Topic::new("pipe/x").expect("topic"),
            mqttd_codec::QoS::AtMostOnce,
            None,
            Bytes::from_static(b"through a pipe"),
        ));
        let (pub_io, _) = &mut clients[1];
        pub_io
            .write_all(&publish.to_bytes(ProtocolVersion::V5).expect("encode"))
            .await
            .expect("write");
        let (sub_io, sub_buf) = &mut clients[0];
        assert!(
            matches!(next(sub_io, sub_buf).await, Packet::Publish(p) if &p.payload[..] == b"through a pipe")
        );
        drop(clients);
        // Every context clone must go for the shutdown to finish without waiting out the grace.
        drop(ctx);
        tokio::time::timeout(Duration::from_secs(3), running.shutdown())
            .await
            .expect("shutdown in time");
    }
}
