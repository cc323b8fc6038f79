//! The tokio edges: the TCP listener, one task per connection, and the core task that owns the
//! [`Broker`].
//!
//! Shape (mini-redis's `server.rs`/`shutdown.rs`, quinn's driver):
//! - The listener accepts while a connection permit is free (`max_connections`); over the limit
//!   a connection is closed at once and counted. A TCP connection is read once right at
//!   accept: when its whole CONNECT is there (a client that sends it at once), the CONNECT goes
//!   to the core from the accept loop and the connection's task usually finds its CONNACK
//!   queued on its first run, which writes it straight to the fresh socket (no wait for epoll
//!   to report it writable). Otherwise the task reads the CONNECT as any stream's would.
//! - A connection is any byte stream plus a peer address ([`serve_connection`] is generic over
//!   `AsyncRead + AsyncWrite`), served by ONE task: it decodes packets and sends them to the
//!   core over the bounded event channel (so a fast publisher is slowed by TCP back-pressure,
//!   never the core), and at the same time writes what the core queued for it in its [`Outq`]
//!   (a plain queue taken whole per wake-up, encoded into one buffer, written with as few
//!   syscalls as the socket allows), reporting how many PUBLISHes it wrote (the core's credit).
//! - Idle connections hold almost nothing: no read or encode buffer while nothing arrives or
//!   is sent, an empty queue, the handshake's state boxed apart and freed. Busy ones read in
//!   chunks that grow to 64 KiB.
//! - The core's state (the `Broker`, the connections' queues) sits behind one lock that is
//!   never held across an await. The core task takes it once per batch of events. It never
//!   awaits a connection: it pushes onto the connection's queue; a connection whose queue is
//!   full even for control packets is killed. It hands transmits over once per batch of
//!   events, so a connection is woken once with everything the batch produced for it. After a
//!   small batch (a lightly loaded broker) it writes a TCP connection's packets to its socket
//!   itself when the connection has nothing queued or in hand: a message then goes from the
//!   publisher's read to the subscriber's socket without waking the subscriber's task.
//! - A lightly loaded broker skips the core task too: a connection task whose read brought at
//!   most a few packets (`INLINE_MAX`), with none of its earlier events still on their way to
//!   the core and the core's channel empty, takes the lock if it is free and handles each
//!   packet itself (`ConnContext::inline`), as mosquitto does on its one thread: read, route,
//!   write the delivery and the PUBACK, on the thread that read it. Anything else (larger
//!   reads, a busy core, sync durability) goes through the channel, in order per connection.
//! - Shutdown: a `watch` flips; the listener stops accepting, the core sends DISCONNECT 0x8B to
//!   5.0 clients and closes every connection; writers flush what is queued; `run` returns when
//!   every connection task has ended (a counted drop of an mpsc sender) or the grace time is up.

use std::collections::VecDeque;
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
use crate::router::FastMap;
use crate::store::Store;

/// An input to the core task.
// `Packet` is the variant nearly every event is; boxing it to shrink the rare others would
// cost an allocation per packet.
#[allow(clippy::large_enum_variant)]
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
        /// Where the core sends its packets (and how it kills the connection).
        queue: ConnQueue,
    },
    /// A packet on an established connection.
    Packet {
        /// The connection.
        conn: ConnId,
        /// The packet.
        packet: Packet,
        /// KiB of the ingress budget it holds (large PUBLISH packets only, else 0); the core
        /// gives them back once it has handled the packet.
        budget_kib: u32,
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
    /// The ACL file was reloaded: these rules apply from now on.
    Acl(Box<crate::acl::Acl>),
}

/// What every connection task needs, whatever transport accepted it. A listener (TCP now,
/// QUIC later) admits a connection with [`ConnContext::admit`] and hands the stream to
/// [`serve_connection`].
#[derive(Clone, Debug)]
pub struct ConnContext {
    events: mpsc::Sender<Event>,
    /// Shared: every connection task holds a context.
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    next_conn: Arc<AtomicU64>,
    /// Write credit going back to the core (PUBLISH packets written), apart from the event
    /// channel: a subscriber's credit must not wait behind a flood of publishes queued there,
    /// or its deliveries stall while the core ingests what it cannot deliver.
    credits: mpsc::UnboundedSender<(ConnId, usize)>,
    /// Held by every connection task: the core waits for all clones to drop on shutdown.
    _alive: mpsc::Sender<()>,
    /// The password file, when `password_file` is set.
    auth: Option<Arc<PasswordCheck>>,
    /// KiB of large PUBLISH packets on their way to the core ([`ingress_budget_kib`]): the
    /// event channel is bounded in events, this bounds it in bytes, so clients flooding big
    /// messages while the core is busy wait for room instead of filling memory.
    ingress: Arc<Semaphore>,
    /// The core's state, for packets a connection task handles itself ([`ConnContext::inline`]);
    /// `None` for a context without a core (tests).
    core: Option<Arc<SharedCore>>,
}

/// Size of the ingress budget in KiB: 64 MiB, or four of the largest packets allowed if that
/// is more (any one packet always fits).
fn ingress_budget_kib(limits: &Limits) -> usize {
    (64 << 10).max(4 * (limits.max_packet_size as usize).div_ceil(1024))
}

/// PUBLISH packets from this many bytes on take their size from the ingress budget; smaller
/// ones are bounded by the event channel's capacity alone (8192 x 4 KiB).
const BUDGETED_FROM: usize = 4096;

/// The budget (KiB) the whole packet at the front of `buf` takes: `Some` only for a large
/// PUBLISH that is completely buffered, so a slow sender never holds budget for bytes it has
/// not sent.
fn budget_of(buf: &[u8]) -> Option<u32> {
    if buf.first()? >> 4 != 3 {
        return None;
    }
    let (len, n) = read_varint(buf.get(1..)?)?;
    if len < BUDGETED_FROM || buf.len() < 1 + n + len {
        return None;
    }
    u32::try_from(len.div_ceil(1024)).ok()
}

/// Username/password checks: the password file and how many slow hash checks may run at once
/// (on blocking threads, so a flood of wrong passwords cannot take every core).
#[derive(Debug)]
struct PasswordCheck {
    /// Swapped whole by a reload; a check clones the `Arc` and verifies without the lock.
    file: std::sync::RwLock<Arc<crate::auth::Authenticator>>,
    slots: Semaphore,
}

/// A connection admitted under `max_connections`; the slot is freed on drop.
#[derive(Debug)]
pub struct Admission {
    /// The connection's identifier.
    pub conn: ConnId,
    _permit: OwnedSemaphorePermit,
}

impl ConnContext {
    /// A context whose events go to `events` and nowhere else (no core, no shutdown), with
    /// default limits and an ingress budget of `ingress_kib`: for tests of a connection task.
    #[cfg(test)]
    fn detached(events: mpsc::Sender<Event>, ingress_kib: usize) -> ConnContext {
        let (alive, _) = mpsc::channel::<()>(1);
        let (credits, _) = mpsc::unbounded_channel();
        ConnContext {
            events,
            credits,
            limits: Arc::default(),
            metrics: Arc::new(Metrics::new()),
            permits: Arc::new(Semaphore::new(1)),
            next_conn: Arc::new(AtomicU64::new(0)),
            _alive: alive,
            auth: None,
            ingress: Arc::new(Semaphore::new(ingress_kib)),
            core: None,
        }
    }

    /// Whether `connect`'s credentials must be checked against the password file before it
    /// goes to the core.
    fn checks_password(&self, connect: &Connect) -> bool {
        self.auth.is_some() && connect.username.is_some()
    }

    /// Handles `ev`, a packet of the connection whose queue is `out`, right here in the
    /// connection's task instead of sending it to the core task, when that keeps the
    /// connection's order and costs no wait: the core has nothing of this connection still to
    /// handle, nothing at all in its channel (a lightly loaded broker), and its lock is free.
    /// A lightly loaded broker so does what mosquitto does on its one thread: read a PUBLISH,
    /// route it, write the PUBACK and the delivery (directly, see [`Outq`]), with no hop to
    /// the core task and back, and no wake-up of another worker thread for it. Gives `ev`
    /// back when it must go through the channel.
    fn inline(&self, out: &Outq, ev: Event) -> Option<Event> {
        let Some(core) = &self.core else {
            return Some(ev);
        };
        if !core.inline
            || out.to_core.load(Ordering::Acquire) != 0
            || self.events.capacity() < self.events.max_capacity()
        {
            return Some(ev);
        }
        // Busy (the core task or another connection holds it) or poisoned: the channel.
        let Ok(mut state) = core.state.try_lock() else {
            return Some(ev);
        };
        let Some(st) = state.as_mut() else {
            return Some(ev);
        };
        let now = Instant::now();
        let CoreState {
            broker,
            handles,
            direct,
            inlined,
        } = st;
        *inlined += 1;
        direct.round(1);
        handle_event(broker, handles, ev, now, &self.ingress);
        dispatch(broker, handles, direct, now);
        broker.flush_store();
        None
    }

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
    reloader: Reloader,
}

/// Reloads the password and ACL files (mosquitto's SIGHUP): new connections are checked
/// against the new passwords, and every client, connected ones included, gets the new topic
/// rules. A file that no longer loads is reported and the rules in force are kept.
#[derive(Debug, Clone)]
pub struct Reloader {
    password_file: Option<std::path::PathBuf>,
    acl_file: Option<std::path::PathBuf>,
    auth: Option<Arc<PasswordCheck>>,
    /// Weak: a pending reload must not keep the broker from shutting down.
    events: mpsc::WeakSender<Event>,
}

impl Reloader {
    /// Reads the files again and applies them; the errors of those that could not be used
    /// (their previous contents stay in force).
    pub async fn reload(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let (Some(path), Some(auth)) = (&self.password_file, &self.auth) {
            match crate::auth::PasswordFile::load(path) {
                Ok(file) => {
                    let users = file.len();
                    if let Ok(mut f) = auth.file.write() {
                        *f = Arc::new(crate::auth::Authenticator::new(file));
                    }
                    tracing::info!(file = %path.display(), users, "password file reloaded");
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if let Some(path) = &self.acl_file {
            match crate::acl::Acl::load(path) {
                Ok(acl) => {
                    let sent = match self.events.upgrade() {
                        Some(events) => events.send(Event::Acl(Box::new(acl))).await.is_ok(),
                        None => false,
                    };
                    if sent {
                        tracing::info!(file = %path.display(), "ACL file reloaded");
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        for e in &errors {
            tracing::error!(error = %e, "reload failed; the previous rules stay in force");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Running {
    /// What reloads the password and ACL files (on SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

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
    let mut broker = Broker::new(
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
    let auth = match &config.password_file {
        Some(path) => {
            let file = crate::auth::PasswordFile::load(path).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?;
            tracing::info!(file = %path.display(), users = file.len(), "password authentication on");
            let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
            Some(Arc::new(PasswordCheck {
                file: std::sync::RwLock::new(Arc::new(crate::auth::Authenticator::new(file))),
                slots: Semaphore::new(parallel),
            }))
        }
        None => None,
    };
    broker.set_password_auth(auth.is_some());
    if let Some(path) = &config.acl_file {
        let acl = crate::acl::Acl::load(path)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        tracing::info!(file = %path.display(), "topic access rules on");
        broker.set_acl(Some(acl));
    }
    let hold = broker.is_durable() && config.durability == Durability::Sync;
    let shared = Arc::new(SharedCore {
        state: std::sync::Mutex::new(Some(CoreState {
            broker,
            handles: FastMap::default(),
            direct: Direct {
                left: 0,
                scratch: BytesMut::new(),
                metrics: metrics.clone(),
            },
            inlined: 0,
        })),
        // With sync durability every batch's acknowledgements wait for a commit the core task
        // tracks: everything goes through it.
        inline: !hold,
    });
    let (events_tx, events_rx) = mpsc::channel(8192);
    let (alive_tx, alive_rx) = mpsc::channel::<()>(1);
    let (credits_tx, credits_rx) = mpsc::unbounded_channel();
    let ctx = ConnContext {
        events: events_tx,
        credits: credits_tx,
        limits: Arc::new(config.limits.clone()),
        metrics: metrics.clone(),
        permits: Arc::new(Semaphore::new(config.limits.max_connections)),
        next_conn: Arc::new(AtomicU64::new(0)),
        _alive: alive_tx,
        auth,
        ingress: Arc::new(Semaphore::new(ingress_budget_kib(&config.limits))),
        core: Some(shared.clone()),
    };
    let core = tokio::spawn(run_core(
        shared,
        events_rx,
        credits_rx,
        shutdown_rx.clone(),
        config.clone(),
        metrics.clone(),
        ctx.ingress.clone(),
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
    let reloader = Reloader {
        password_file: config.password_file.clone(),
        acl_file: config.acl_file.clone(),
        auth: ctx.auth.clone(),
        events: ctx.events.downgrade(),
    };
    Ok(Running {
        mqtt_addr,
        http_addr,
        shutdown: shutdown_tx,
        done,
        ctx,
        reloader,
    })
}

async fn accept_loop(listener: TcpListener, ctx: ConnContext, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                accept_one(stream, peer, &ctx);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a new connection had sent by the time it was accepted.
enum Early {
    /// A whole CONNECT (boxed as the core's event carries it).
    Connect(Box<Connect>),
    /// Nothing yet, or part of a CONNECT (in the buffer).
    Partial,
    /// Bytes that are not a valid CONNECT: answered and closed by the connection task.
    Bad(DecodeError),
    /// The peer closed already.
    Closed,
}

/// Reads once, without waiting, what a just-accepted connection sent: on loopback and busy
/// links its CONNECT is usually there already. Decoded here, it goes to the core before the
/// connection's task first runs, and the task usually finds its CONNACK queued on that first
/// run: one poll of one task per connect instead of three, no handshake timer, no wait for the
/// runtime to report the socket readable.
fn read_now(
    stream: &tokio::net::TcpStream,
    buf: &mut BytesMut,
    max: usize,
    metrics: &Metrics,
) -> Early {
    use std::io::Read;
    let mut chunk = [0u8; READ_MIN];
    // Straight on the socket: the runtime has not polled it yet, so its own read would not
    // even try. The runtime reports readiness as epoll finds it when asked, after this read,
    // so no stale "readable" comes of it.
    match (&*socket2::SockRef::from(stream)).read(&mut chunk) {
        Ok(0) => return Early::Closed,
        Ok(n) => {
            Metrics::add(&metrics.bytes_received, n as u64);
            buf.extend_from_slice(&chunk[..n]);
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Early::Partial,
        Err(_) => return Early::Closed,
    }
    match decode_connect(buf, max) {
        Ok(Some(c)) => Early::Connect(Box::new(c)),
        Ok(None) => Early::Partial,
        Err(e) => Early::Bad(e),
    }
}

/// Admits one accepted TCP connection and starts its task; true if its whole CONNECT had
/// arrived and went to the core at once.
fn accept_one(stream: tokio::net::TcpStream, peer: SocketAddr, ctx: &ConnContext) -> bool {
    let Some(admission) = ctx.admit() else {
        tracing::warn!(%peer, max_connections = ctx.limits.max_connections, "connection refused: limit reached");
        return false;
    };
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::new();
    let early = read_now(
        &stream,
        &mut buf,
        ctx.limits.max_packet_size as usize,
        &ctx.metrics,
    );
    if matches!(early, Early::Closed) {
        return false;
    }
    // Shared with the core, which may write to it directly (see [`Outq`]).
    let stream = Arc::new(stream);
    let conn = admission.conn;
    let start = match early {
        Early::Connect(connect) if ctx.checks_password(&connect) => Start::Verify(connect),
        Early::Connect(connect) => {
            let version = connect.protocol_version;
            let queue = ConnQueue::new(queue_capacity(&ctx.limits), version, Some(stream.clone()));
            let out = queue.0.clone();
            let event = Event::Connect {
                conn,
                peer,
                connect,
                queue,
            };
            let pending = match ctx.events.try_send(event) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(ev)) => Some(Box::new(ev)),
            };
            Start::Connected {
                out,
                version,
                pending,
            }
        }
        Early::Bad(e) => Start::Handshake(Some(e)),
        Early::Partial | Early::Closed => Start::Handshake(None),
    };
    let early = matches!(start, Start::Connected { .. });
    let first = Box::new(TcpStart { buf, start, peer });
    tokio::spawn(serve_tcp(stream, ctx.clone(), admission, first));
    early
}

/// Where a TCP connection's task starts.
enum Start {
    /// Its CONNECT went to the core (or waits in `pending` for room in the channel).
    Connected {
        out: Arc<Outq>,
        version: ProtocolVersion,
        pending: Option<Box<Event>>,
    },
    /// The handshake is still to do; `Some`: the bytes read were not a valid CONNECT.
    Handshake(Option<DecodeError>),
    /// A whole CONNECT whose password must be checked first.
    Verify(Box<Connect>),
}

/// What an accepted TCP connection starts with, boxed apart so the task's future does not
/// keep room for it once the task has moved it on.
struct TcpStart {
    buf: BytesMut,
    start: Start,
    peer: SocketAddr,
}

/// Serves one accepted TCP connection until it ends. The socket is shared with the core (for
/// its direct writes), so the task reads and writes it through `&TcpStream`.
async fn serve_tcp(
    stream: Arc<tokio::net::TcpStream>,
    ctx: ConnContext,
    admission: Admission,
    first: Box<TcpStart>,
) {
    let TcpStart { buf, start, peer } = *first;
    let conn = admission.conn;
    let rd = TcpReader(&stream);
    let wr = TcpWriter {
        stream: &stream,
        fresh: true,
    };
    serve_split(rd, wr, buf, start, peer, conn, Some(&stream), &ctx).await;
    drop(admission);
}

/// The read side of a shared TCP socket.
struct TcpReader<'a>(&'a tokio::net::TcpStream);

impl AsyncRead for TcpReader<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let want = buf.remaining();
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            // A read shorter than asked for emptied the socket: like tokio's own `poll_read`,
            // forget the readiness (the outer `try_io` clears it on the WouldBlock we report
            // for it, unless an event came in since), so the next poll waits for epoll
            // instead of trying a read that would only find nothing.
            let mut read = None;
            let r = self.0.try_io(tokio::io::Interest::READABLE, || {
                let n = self.0.try_read_buf(&mut *buf)?;
                read = Some(n);
                if n > 0 && n < want {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (read, r) {
                (Some(_), _) | (None, Ok(())) => return std::task::Poll::Ready(Ok(())),
                (None, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                (None, Err(e)) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

/// The write side of a shared TCP socket, whose first write goes straight to the socket. A
/// new connection's socket can always take its small CONNACK, but the runtime only lets a
/// write through once epoll has reported the socket writable: when the CONNECT was read at
/// accept, that would cost one more wait for the runtime's next epoll round (and a wake-up of
/// the task) per connect. Later writes go through the runtime's readiness as usual.
struct TcpWriter<'a> {
    stream: &'a tokio::net::TcpStream,
    fresh: bool,
}

impl AsyncWrite for TcpWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if std::mem::take(&mut this.fresh) {
            use std::io::Write;
            match (&*socket2::SockRef::from(this.stream)).write(buf) {
                Ok(n) => return std::task::Poll::Ready(Ok(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
        loop {
            std::task::ready!(this.stream.poll_write_ready(cx))?;
            match this.stream.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return std::task::Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.fresh = false;
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return std::task::Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // Writes go straight to the socket: nothing to flush.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // What tokio's own TcpStream does: shut the write side down, now.
        std::task::Poll::Ready(
            socket2::SockRef::from(self.stream).shutdown(std::net::Shutdown::Write),
        )
    }
}

/// How many transmits a connection's queue holds before the connection counts as not keeping
/// up.
fn queue_capacity(limits: &Limits) -> usize {
    limits.connection_buffer + 2 * usize::from(limits.max_inflight) + 64
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
    let (rd, wr) = tokio::io::split(io);
    // Small at first: most connections are idle most of the time; it grows with the packets.
    let buf = BytesMut::with_capacity(READ_MIN);
    serve_split(rd, wr, buf, Start::Handshake(None), peer, conn, None, &ctx).await;
    drop(ctx);
}

/// The handshake (unless the CONNECT went to the core at accept) and the password check (when
/// one is due), then the connection: `buf` holds what was read already. One `drive` for every
/// way in, so the task's future holds one, not one per way. `direct`: a TCP socket the core
/// may write to directly (see [`Outq`]).
#[allow(clippy::too_many_arguments)]
async fn serve_split<R, W>(
    mut rd: R,
    mut wr: W,
    mut buf: BytesMut,
    start: Start,
    peer: SocketAddr,
    conn: ConnId,
    direct: Option<&Arc<tokio::net::TcpStream>>,
    ctx: &ConnContext,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Boxed: what only the handshake needs (its timer, the CONNECT, the password check) is
    // freed once it is done instead of staying in every connection's task for its whole life.
    let admitted = match start {
        Start::Connected {
            out,
            version,
            pending,
        } => {
            if let Some(ev) = pending
                && Box::pin(ctx.events.send(*ev)).await.is_err()
            {
                return;
            }
            Some((out, version))
        }
        Start::Handshake(Some(bad)) => {
            Box::pin(refuse(&mut wr, &buf, bad, peer)).await;
            None
        }
        Start::Handshake(None) => {
            match Box::pin(handshake(&mut rd, &mut wr, &mut buf, peer, ctx)).await {
                Some(connect) => Box::pin(to_core(connect, &mut wr, peer, conn, direct, ctx)).await,
                None => None,
            }
        }
        Start::Verify(connect) => {
            Box::pin(to_core(connect, &mut wr, peer, conn, direct, ctx)).await
        }
    };
    let Some((out, version)) = admitted else {
        return;
    };
    drive(rd, wr, buf, &out, version, conn, peer, ctx).await;
}

/// Checks the CONNECT's password when one is due, then hands it to the core; returns the
/// connection's queue and protocol version, or `None` when it was refused or the core is gone.
async fn to_core<W: AsyncWrite + Unpin>(
    connect: Box<Connect>,
    wr: &mut W,
    peer: SocketAddr,
    conn: ConnId,
    direct: Option<&Arc<tokio::net::TcpStream>>,
    ctx: &ConnContext,
) -> Option<(Arc<Outq>, ProtocolVersion)> {
    let connect = if ctx.checks_password(&connect) {
        authenticate(connect, wr, peer, ctx).await?
    } else {
        connect
    };
    let version = connect.protocol_version;
    let queue = ConnQueue::new(queue_capacity(&ctx.limits), version, direct.cloned());
    let out = queue.0.clone();
    let event = Event::Connect {
        conn,
        peer,
        connect,
        queue,
    };
    send_event(&ctx.events, event)
        .await
        .then_some((out, version))
}

/// Reads the CONNECT (within `connect_timeout`); a bad one is answered with the CONNACK its
/// error calls for and the connection is closed (`None`).
async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    peer: SocketAddr,
    ctx: &ConnContext,
) -> Option<Box<Connect>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = ctx.limits.max_packet_size as usize;
    match tokio::time::timeout(
        ctx.limits.connect_timeout,
        read_connect(rd, buf, max, &ctx.metrics),
    )
    .await
    {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time");
            None
        }
        Ok(Ok(Some(c))) => Some(Box::new(c)),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            refuse(wr, buf, e, peer).await;
            None
        }
    }
}

/// Checks a CONNECT's username and password against the password file on a blocking thread
/// (call it when [`ConnContext::checks_password`]); a wrong pair is answered with Bad User Name
/// or Password (3.1.1: return code 4) and the connection closed (`None`).
async fn authenticate<W: AsyncWrite + Unpin>(
    connect: Box<Connect>,
    wr: &mut W,
    peer: SocketAddr,
    ctx: &ConnContext,
) -> Option<Box<Connect>> {
    let (Some(auth), Some(user)) = (&ctx.auth, &connect.username) else {
        return Some(connect);
    };
    let ok = {
        let _slot = auth.slots.acquire().await.ok()?;
        let check = auth.clone();
        let user = user.as_str().to_owned();
        let password = connect.password.clone().unwrap_or_default();
        let file = match check.file.read() {
            Ok(f) => f.clone(),
            Err(_) => return None,
        };
        tokio::task::spawn_blocking(move || file.verify(&user, &password))
            .await
            .unwrap_or(false)
    };
    if ok {
        return Some(connect);
    }
    tracing::info!(%peer, user = %user.as_str(), "refused: bad username or password");
    let mut out = BytesMut::new();
    if Packet::ConnAck(Box::new(ConnAck::new(ReasonCode::BadUserNameOrPassword)))
        .encode(connect.protocol_version, &mut out)
        .is_ok()
    {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    }
    let _ = wr.shutdown().await;
    None
}

/// Answers a CONNECT that failed to decode with the CONNACK its error calls for (when the
/// protocol has one) and closes the connection.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, buf: &[u8], e: DecodeError, peer: SocketAddr) {
    tracing::debug!(%peer, error = %e, "bad CONNECT");
    // 3.1.1 has return codes for two CONNECT errors; 5.0 has a reason code for all.
    let reply = if let Some(code) = e.connack_code_v3() {
        ReasonCode::from_v3_connack(code).map(|rc| (ProtocolVersion::V3_1_1, rc))
    } else if announced_level(buf) == Some(5) {
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
}

/// Sends an event to the core; resolves to `false` when the core is gone. The common case
/// (room in the channel) is done before the first poll and does not wait; only a full channel
/// waits, in a boxed future, so the connection task does not carry a whole event-sized send
/// future at each of its await points.
fn send_event(events: &mpsc::Sender<Event>, ev: Event) -> impl Future<Output = bool> + '_ {
    let slow = match events.try_send(ev) {
        Ok(()) => Ok(true),
        Err(mpsc::error::TrySendError::Closed(_)) => Ok(false),
        Err(mpsc::error::TrySendError::Full(ev)) => Err(Box::pin(events.send(ev))),
    };
    async move {
        match slow {
            Ok(sent) => sent,
            Err(send) => send.await.is_ok(),
        }
    }
}

/// What [`drive`] does next: read and write, only write what the core still hands over (the
/// peer's side ended), or stop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Both,
    Draining,
}

/// The connection after its CONNECT: one task reads, decodes and forwards packets to the core,
/// and writes what the core queued for it, both at once (a peer that does not read while it
/// writes cannot stall our reads). A connection is one task and a queue with nothing in it while
/// idle, not a reader, a writer and a channel.
#[allow(clippy::too_many_arguments)]
async fn drive<R, W>(
    mut rd: R,
    mut wr: W,
    mut buf: BytesMut,
    out: &Outq,
    version: ProtocolVersion,
    conn: ConnId,
    peer: SocketAddr,
    ctx: &ConnContext,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let max = ctx.limits.max_packet_size as usize;
    let mut outbox = Outbox::default();
    let mut taken = VecDeque::new();
    let mut head = None;
    let mut phase = Phase::Both;
    let mut read_size = READ_MIN;
    // Set once the core handed over a Close (or let go): flush, then end.
    let mut closing = false;
    let mut closed_sent = false;
    let mut drain_deadline = None;
    // Bytes written since the last flush.
    let mut unflushed = false;
    'conn: loop {
        if phase == Phase::Both {
            // Decode everything buffered before waiting again. The event is built before the
            // send is awaited, so no decoded packet sits in the task across that await.
            // A read of a few packets (a lightly loaded connection) may be handled right here;
            // reads of more go to the core in one batch.
            let few = whole_packets(&buf, INLINE_MAX + 1) <= INLINE_MAX;
            loop {
                let budget_kib = match budget_of(&buf) {
                    Some(kib) => {
                        // Room in the budget (the common case) costs no wait and no
                        // allocation. The core gives the permits back (`add_permits`).
                        match ctx.ingress.try_acquire_many(kib) {
                            Ok(permit) => permit.forget(),
                            Err(_) => match Box::pin(ctx.ingress.acquire_many(kib)).await {
                                Ok(permit) => permit.forget(),
                                Err(_) => break 'conn,
                            },
                        }
                        kib
                    }
                    None => 0,
                };
                let ev = match decode(&mut buf, version, max) {
                    Ok(Some(packet)) => {
                        let ev = Event::Packet {
                            conn,
                            packet,
                            budget_kib,
                        };
                        if few {
                            match ctx.inline(out, ev) {
                                Some(ev) => ev,
                                None => continue,
                            }
                        } else {
                            ev
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%peer, conn, error = %e, "malformed packet");
                        phase = Phase::Draining;
                        Event::ProtocolError {
                            conn,
                            reason: e.reason_code(),
                        }
                    }
                };
                out.sending();
                if !send_event(&ctx.events, ev).await {
                    break 'conn;
                }
                if phase == Phase::Draining {
                    break;
                }
            }
        }
        if phase == Phase::Draining && !closed_sent {
            // The core drops this connection's queue on Closed once it has handed over what
            // it had for it; that is flushed below, then the task ends.
            closed_sent = true;
            out.sending();
            if !send_event(&ctx.events, Event::Closed { conn }).await {
                break;
            }
            drain_deadline = Some(Box::pin(tokio::time::sleep(Duration::from_secs(10))));
        }
        if outbox.is_empty() && !closing {
            match out.take(&mut taken, &mut head) {
                Taken::Killed => break,
                Taken::LetGo if taken.is_empty() && head.is_none() => closing = true,
                _ => {}
            }
            if let Some(rest) = head.take() {
                outbox.push_raw(rest);
            }
            for t in taken.drain(..) {
                match t {
                    Transmit::Packet(p) => {
                        if let Err(e) = outbox.push(p, version) {
                            tracing::warn!(conn, error = %e, "cannot encode packet");
                        }
                    }
                    Transmit::Close => {
                        closing = true;
                        break;
                    }
                }
            }
            taken.clear();
            if taken.capacity() > 1024 {
                taken = VecDeque::new();
            }
        }
        if outbox.is_empty() {
            if closing {
                break;
            }
            if unflushed {
                // All that is queued is written: the batch leaves now. A QUIC stream in
                // send-on-flush mode sends its packets here, from this task; TCP writes went
                // out already.
                unflushed = false;
                if wr.flush().await.is_err() {
                    break;
                }
            }
            // Idle: give back the encode buffer; the next batch sizes a new one.
            outbox.release();
        }
        if phase == Phase::Both && buf.is_empty() && read_size == READ_MIN {
            // Nothing buffered and a quiet peer: hold at most a small buffer while waiting
            // (`read_some` reads into a stack chunk when there is little room), not a larger
            // one.
            if buf.capacity() > IDLE_READ_BUF {
                buf = BytesMut::new();
            }
        } else if buf.capacity() - buf.len() < read_size / 2 {
            buf.reserve(read_size);
        }
        // What one read may fill: the buffer's spare room, or a stack chunk (`read_some`).
        let room = (buf.capacity() - buf.len()).max(READ_MIN);
        tokio::select! {
            r = read_some(&mut rd, &mut buf), if phase == Phase::Both => match r {
                Ok(0) | Err(_) => phase = Phase::Draining,
                Ok(n) => {
                    Metrics::add(&ctx.metrics.bytes_received, n as u64);
                    read_size = next_read_size(read_size, n, room);
                }
            },
            w = outbox.write_some(&mut wr), if !outbox.is_empty() => match w {
                Ok(n) => {
                    unflushed = true;
                    Metrics::add(&ctx.metrics.bytes_sent, n as u64);
                    if outbox.is_empty() {
                        let publishes = outbox.finish();
                        if publishes > 0
                            && !closed_sent
                            && ctx.credits.send((conn, publishes)).is_err()
                        {
                            break;
                        }
                    }
                }
                Err(_) => break,
            },
            _ = out.notified(), if outbox.is_empty() => {}
            // The timer exists only while draining (an idle connection carries none).
            _ = std::future::poll_fn(|cx| match drain_deadline.as_mut() {
                Some(sleep) => sleep.as_mut().poll(cx),
                None => std::task::Poll::Pending,
            }) => break,
        }
    }
    if !closed_sent {
        out.sending();
        send_event(&ctx.events, Event::Closed { conn }).await;
    }
    if !out.is_killed() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        })
        .await;
    }
}

/// One read from `rd` into `buf`; resolves to the bytes read (0: the peer closed). With less
/// than [`READ_MIN`] bytes of room in `buf` (an idle connection keeps almost none), the read
/// lands in a stack chunk of that size and is copied after: a small packet then takes one
/// read syscall, where `read_buf` on an empty buffer reserves only 64 bytes and a typical
/// PUBLISH needed a second read (and a second poll) for its tail.
fn read_some<'a, R: AsyncRead + Unpin>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        if buf.capacity() - buf.len() >= READ_MIN {
            let read = rd.read_buf(&mut *buf);
            tokio::pin!(read);
            return read.poll(cx);
        }
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_MIN];
        let mut chunk = tokio::io::ReadBuf::uninit(&mut chunk);
        std::task::ready!(std::pin::Pin::new(&mut *rd).poll_read(cx, &mut chunk))?;
        buf.extend_from_slice(chunk.filled());
        std::task::Poll::Ready(Ok(chunk.filled().len()))
    })
}

/// One connection's outgoing packets, from the core to the connection task: a plain queue
/// under a lock taken once per packet by the core and once per batch by the connection (which
/// swaps the whole queue out), instead of a channel with a preallocated block per connection.
/// Empty and unallocated while the connection is idle.
///
/// A plain TCP connection also lends the core its socket (`direct`): while the core is lightly
/// loaded and the connection has nothing queued or being written, the core writes a packet
/// straight to the socket (what mosquitto does on its one thread) instead of waking the
/// connection's task to write it: no task wake-up, often on another thread, between a message
/// arriving and its delivery. The lock is held across that write, so the core and the task
/// never write at once and bytes stay in order.
#[derive(Debug)]
pub struct Outq {
    state: std::sync::Mutex<OutqState>,
    ready: Notify,
    capacity: usize,
    /// The protocol version packets are encoded in (for the core's direct writes).
    version: ProtocolVersion,
    /// The connection's socket, when the core may write to it directly.
    direct: Option<Arc<tokio::net::TcpStream>>,
    /// Events of this connection sent to the core task that it has not handled yet (from 1:
    /// the queue is made for the CONNECT's event). While any are on their way, the
    /// connection's packets go the same way, in order ([`ConnContext::inline`]).
    to_core: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Default)]
struct OutqState {
    items: VecDeque<Transmit>,
    /// The rest of a packet the core wrote only in part: goes out before `items`.
    head: Option<Bytes>,
    /// The connection task took packets and may still be writing them: the core queues.
    busy: bool,
    /// The core let go: nothing more will come.
    let_go: bool,
    /// The connection could not keep up: end it now, unflushed.
    killed: bool,
}

/// What [`Outq::take`] found besides the packets.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    Open,
    LetGo,
    Killed,
}

/// The queue is full: the connection is not keeping up.
#[derive(Debug)]
struct Full;

/// How [`Outq::send`] handed a transmit over.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// Queued for the connection's task.
    Queued,
    /// Written to the socket by the caller (`bytes`; `publish`: it was a PUBLISH), all of it
    /// or the start of it with the rest left for the task.
    Written { bytes: usize, publish: bool },
}

impl Outq {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutqState> {
        // A panic while holding this lock leaves a plain queue behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, t: Transmit) -> Result<(), Full> {
        let s = self.lock();
        self.enqueue(s, t)
    }

    fn enqueue(
        &self,
        mut s: std::sync::MutexGuard<'_, OutqState>,
        t: Transmit,
    ) -> Result<(), Full> {
        if s.items.len() >= self.capacity {
            return Err(Full);
        }
        let wake = s.items.is_empty() && s.head.is_none();
        s.items.push_back(t);
        drop(s);
        if wake {
            // Pushing onto a non-empty queue needs no wake-up: the connection takes the whole
            // queue when it takes, and waits only after finding it empty.
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Writes `t` straight to the socket when `direct` is allowed, the connection lent its
    /// socket and has nothing queued or in hand (so order is kept), else queues it. `scratch`
    /// is the caller's encode buffer.
    fn send(&self, t: Transmit, direct: bool, scratch: &mut BytesMut) -> Result<Sent, Full> {
        let s = self.lock();
        let (Some(stream), Transmit::Packet(packet)) = (&self.direct, &t) else {
            return self.enqueue(s, t).map(|()| Sent::Queued);
        };
        if !direct || s.busy || s.killed || s.let_go || s.head.is_some() || !s.items.is_empty() {
            return self.enqueue(s, t).map(|()| Sent::Queued);
        }
        scratch.clear();
        if packet.encode(self.version, scratch).is_err() {
            // The task encodes it again and reports the error.
            return self.enqueue(s, t).map(|()| Sent::Queued);
        }
        use std::io::Write;
        // A plain non-blocking write: the runtime's readiness is left alone (a WouldBlock
        // here queues the packet, and the task's own write then waits for the socket).
        match (&*socket2::SockRef::from(stream.as_ref())).write(scratch) {
            Ok(n) if n > 0 => {
                let publish = matches!(packet, Packet::Publish(_));
                if n < scratch.len() {
                    scratch.advance(n);
                    let mut s = s;
                    s.head = Some(scratch.split().freeze());
                    drop(s);
                    self.ready.notify_one();
                }
                Ok(Sent::Written { bytes: n, publish })
            }
            // Full socket buffer, or an error the task will meet on its own read or write.
            _ => self.enqueue(s, t).map(|()| Sent::Queued),
        }
    }

    /// Swaps the queued packets into `into` (which must be empty) and the rest of a packet
    /// the core wrote in part into `head` (to be written first).
    fn take(&self, into: &mut VecDeque<Transmit>, head: &mut Option<Bytes>) -> Taken {
        let mut s = self.lock();
        if s.killed {
            return Taken::Killed;
        }
        std::mem::swap(&mut s.items, into);
        *head = s.head.take();
        s.busy = !into.is_empty() || head.is_some();
        if s.let_go { Taken::LetGo } else { Taken::Open }
    }

    fn is_killed(&self) -> bool {
        self.lock().killed
    }

    fn let_go(&self) {
        self.lock().let_go = true;
        self.ready.notify_one();
    }

    fn kill(&self) {
        let mut s = self.lock();
        s.killed = true;
        s.items = VecDeque::new();
        s.head = None;
        drop(s);
        self.ready.notify_one();
    }

    fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.ready.notified()
    }

    /// The connection task is sending an event to the core task.
    fn sending(&self) {
        self.to_core.fetch_add(1, Ordering::Relaxed);
    }

    /// The core task handled one of the connection's events.
    fn handled(&self) {
        self.to_core.fetch_sub(1, Ordering::Release);
    }
}

/// The core's handle on one connection's [`Outq`]; dropping it tells the connection that
/// nothing more will come (it flushes what it has and ends).
#[derive(Debug)]
pub struct ConnQueue(Arc<Outq>);

impl ConnQueue {
    fn new(
        capacity: usize,
        version: ProtocolVersion,
        direct: Option<Arc<tokio::net::TcpStream>>,
    ) -> Self {
        ConnQueue(Arc::new(Outq {
            state: std::sync::Mutex::new(OutqState::default()),
            ready: Notify::new(),
            capacity,
            version,
            direct,
            to_core: std::sync::atomic::AtomicUsize::new(1),
        }))
    }
}

impl Drop for ConnQueue {
    fn drop(&mut self) {
        self.0.let_go();
    }
}

/// The smallest read a connection asks for (and its first buffer's size).
const READ_MIN: usize = 512;
/// The read buffer an idle connection keeps at most (it reads into a stack chunk, [`read_some`]).
const IDLE_READ_BUF: usize = 64;
/// The largest: a busy publisher's packets arrive in reads this large, not one syscall each.
const READ_MAX: usize = 64 * 1024;

/// The size of the next read: doubles while reads fill the space they were given, halves when
/// they use little of it, so a busy connection reads in large chunks and an idle one goes
/// back to a small buffer.
fn next_read_size(current: usize, read: usize, spare: usize) -> usize {
    if read >= spare {
        (current * 2).min(READ_MAX)
    } else if read < current / 8 {
        (current / 2).max(READ_MIN)
    } else {
        current
    }
}

/// Payloads at least this large are written from the shared `Bytes` (vectored write) instead
/// of being copied into the connection's write buffer.
const ZERO_COPY_MIN: usize = 1024;

/// The encoded bytes of one batch: small packets coalesced in a buffer, large payloads kept
/// as the shared `Bytes` the publisher's read produced. Written with as few syscalls as the
/// socket allows (vectored when there are several segments).
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
    segments: VecDeque<Bytes>,
    /// Bytes encoded into this batch, and PUBLISH packets among them.
    len: usize,
    publishes: usize,
    /// The last batch's size: the next batch's buffer starts this large.
    last_len: usize,
}

impl Outbox {
    fn push(
        &mut self,
        packet: Packet,
        version: ProtocolVersion,
    ) -> Result<(), mqttd_codec::EncodeError> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(self.last_len.clamp(256, READ_MAX));
        }
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
            self.publishes += 1;
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
        self.publishes += 1;
        self.segments.push_back(self.buf.split().freeze());
        self.segments.push_back(payload);
        Ok(())
    }

    /// Bytes already encoded (the rest of a packet the core wrote in part), written first.
    fn push_raw(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        self.segments.push_back(bytes);
    }

    /// Nothing left to write.
    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.segments.is_empty()
    }

    /// One write (vectored when there are several segments); returns the bytes written. Safe
    /// to cancel: nothing is consumed unless the write happened.
    async fn write_some<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<usize> {
        if !self.buf.is_empty() {
            self.segments.push_back(self.buf.split().freeze());
        }
        let mut n = match self.segments.len() {
            0 => return Ok(0),
            1 => wr.write(&self.segments[0]).await?,
            _ => {
                let slices: Vec<std::io::IoSlice<'_>> = self
                    .segments
                    .iter()
                    .take(64)
                    .map(|b| std::io::IoSlice::new(b))
                    .collect();
                wr.write_vectored(&slices).await?
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let written = n;
        while n > 0 {
            let Some(seg) = self.segments.front_mut() else {
                break;
            };
            if n >= seg.len() {
                n -= seg.len();
                self.segments.pop_front();
            } else {
                seg.advance(n);
                n = 0;
            }
        }
        Ok(written)
    }

    /// Ends a batch that is fully written; returns how many PUBLISH packets it held.
    fn finish(&mut self) -> usize {
        self.last_len = self.len;
        self.len = 0;
        std::mem::take(&mut self.publishes)
    }

    /// Frees the encode buffer (an idle connection keeps none).
    fn release(&mut self) {
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Writes everything (tests).
    #[cfg(test)]
    async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<usize> {
        let mut written = 0;
        while !self.is_empty() {
            written += self.write_some(wr).await?;
        }
        self.finish();
        Ok(written)
    }
}

/// Packets read at once that a connection task may handle itself ([`ConnContext::inline`]),
/// as many as a core round that still writes directly ([`DIRECT_MAX_EVENTS`]).
const INLINE_MAX: usize = DIRECT_MAX_EVENTS;

/// How many whole packets the front of `buf` holds, counting up to `max`.
fn whole_packets(mut buf: &[u8], max: usize) -> usize {
    let mut n = 0;
    while n < max {
        let Some((len, varint)) = buf.get(1..).and_then(read_varint) else {
            break;
        };
        let Some(rest) = buf.get(1 + varint + len..) else {
            break;
        };
        buf = rest;
        n += 1;
    }
    n
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

/// What the core owns: the broker, the connections' queues, the direct writes' state. Behind
/// one lock ([`SharedCore`]) taken by the core task once per batch of events and by a
/// connection task that handles a packet itself ([`ConnContext::inline`]); never held across
/// an await.
struct CoreState {
    broker: Broker<Box<dyn Store>>,
    handles: FastMap<ConnId, ConnQueue>,
    direct: Direct,
    /// Packets connection tasks handled themselves (tests check the path is taken).
    inlined: u64,
}

/// The core's state, shared by the core task and the connection tasks; `None` once the core
/// task has taken it to shut down (nothing is handled inline after that).
struct SharedCore {
    state: std::sync::Mutex<Option<CoreState>>,
    /// Whether connection tasks may handle packets themselves (not with sync durability,
    /// whose commits the core task tracks).
    inline: bool,
}

impl std::fmt::Debug for SharedCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCore")
            .field("inline", &self.inline)
            .finish_non_exhaustive()
    }
}

impl SharedCore {
    /// Runs `f` on the state under the lock; `None` once the state was taken.
    fn with<R>(&self, f: impl FnOnce(&mut CoreState) -> R) -> Option<R> {
        // A panic under this lock ended the core task too; what is left is still consistent
        // enough to drop.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.as_mut().map(f)
    }

    /// Takes the state out: from now on only the caller handles events.
    fn take(&self) -> Option<CoreState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

async fn run_core(
    shared: Arc<SharedCore>,
    mut events: mpsc::Receiver<Event>,
    mut credits: mpsc::UnboundedReceiver<(ConnId, usize)>,
    mut shutdown: watch::Receiver<bool>,
    config: Config,
    metrics: Arc<Metrics>,
    ingress: Arc<Semaphore>,
) {
    let mut written = Vec::with_capacity(256);
    let mut credits_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sys_every = config.sys_interval.unwrap_or(Duration::from_secs(3600));
    let mut sys = tokio::time::interval(sys_every);
    sys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(256);
    // `durability = "sync"`: a batch's acknowledgements wait for the one commit that makes the
    // whole batch durable (group commit; see broker_commit.rs for what waits). The store's
    // writer thread commits while this task goes on with the next events, whose
    // acknowledgements wait for the next commit, started when the one in flight completes.
    let hold = !shared.inline;
    let periodic = shared.with(|st| st.broker.is_durable()).unwrap_or(false)
        && config.durability == Durability::Periodic;
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
                let done = shared.with(|st| {
                    let CoreState { broker, handles, direct, .. } = st;
                    direct.round(n);
                    for ev in batch.drain(..) {
                        match &ev {
                            Event::Connect { queue, .. } => queue.0.handled(),
                            Event::Packet { conn, .. }
                            | Event::ProtocolError { conn, .. }
                            | Event::Closed { conn } => {
                                if let Some(q) = handles.get(conn) {
                                    q.0.handled();
                                }
                            }
                            Event::Written { .. } | Event::Acl(_) => {}
                        }
                        if let Event::Closed { conn } = ev {
                            // Packets for this connection from this batch (or, with sync
                            // durability, held for the commit: a CONNACK, a DISCONNECT with its
                            // reason code) still go out: its writer flushes what it was handed
                            // once the handle is dropped.
                            broker.handle_closed(conn, CloseReason::NetworkError, now);
                            closed.push(conn);
                            continue;
                        }
                        handle_event(broker, handles, ev, now, &ingress);
                    }
                    if !hold {
                        // Once per batch, not per event: a writer is woken once with everything
                        // the batch produced for it, and writes it in one go.
                        dispatch(broker, handles, direct, now);
                        for conn in closed.drain(..) {
                            handles.remove(&conn);
                        }
                    }
                    if hold {
                        sync_commit(broker, handles, direct, &mut committing, &mut closed, now);
                    } else {
                        broker.flush_store();
                    }
                });
                if done.is_none() {
                    break;
                }
            }
            n = credits.recv_many(&mut written, 256), if credits_open => {
                if n == 0 {
                    credits_open = false;
                    continue;
                }
                let now = Instant::now();
                shared.with(|st| {
                    let CoreState { broker, handles, direct, .. } = st;
                    direct.round(n);
                    for (conn, n) in written.drain(..) {
                        broker.handle_written(conn, n, now);
                    }
                    if hold {
                        sync_commit(broker, handles, direct, &mut committing, &mut closed, now);
                    } else {
                        dispatch(broker, handles, direct, now);
                    }
                });
            }
            result = crate::broker::committed(&mut committing) => {
                if let Some(mut c) = committing.take() {
                    shared.with(|st| {
                        let CoreState { broker, handles, direct, .. } = st;
                        direct.round(1);
                        let gone = broker.complete_commit(&mut c, result, hold, &mut closed);
                        dispatch(broker, handles, direct, Instant::now());
                        for conn in gone {
                            handles.remove(&conn);
                        }
                    });
                    if !c.is_empty() {
                        committing = Some(c);
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                shared.with(|st| {
                    let CoreState { broker, handles, direct, .. } = st;
                    direct.round(1);
                    broker.handle_timeout(now);
                    if hold {
                        sync_commit(broker, handles, direct, &mut committing, &mut closed, now);
                    } else {
                        dispatch(broker, handles, direct, now);
                    }
                });
            }
            _ = commit_tick.tick(), if periodic && committing.is_none() => {
                shared.with(|st| {
                    let CoreState { broker, handles, direct, .. } = st;
                    committing = broker.start_commit();
                    direct.round(1);
                    dispatch(broker, handles, direct, Instant::now());
                });
            }
            _ = sys.tick(), if config.sys_interval.is_some() => {
                let now = Instant::now();
                shared.with(|st| {
                    let CoreState { broker, handles, direct, .. } = st;
                    direct.round(1);
                    broker.publish_sys(metrics.sys_topics(), now);
                    if hold {
                        sync_commit(broker, handles, direct, &mut committing, &mut closed, now);
                    } else {
                        dispatch(broker, handles, direct, now);
                    }
                });
            }
            _ = shutdown.changed() => {
                // From here on the core task alone holds the state.
                let Some(CoreState { mut broker, mut handles, mut direct, .. }) = shared.take() else {
                    break;
                };
                tracing::info!(clients = broker.connected(), "shutting down");
                let now = Instant::now();
                // Everything goes through the tasks, which flush and close.
                direct.round(usize::MAX);
                broker.shutdown(now);
                // The commit in flight (and those its completion starts) first, in order.
                while let Some(mut c) = committing.take() {
                    let result = c.result().await;
                    let gone = broker.complete_commit(&mut c, result, hold, &mut closed);
                    if !c.is_empty() {
                        committing = Some(c);
                    }
                    dispatch(&mut broker, &mut handles, &mut direct, now);
                    for conn in gone {
                        handles.remove(&conn);
                    }
                }
                crate::store_redb::commit(&mut broker);
                dispatch(&mut broker, &mut handles, &mut direct, now);
                handles.clear();
                break;
            }
        }
    }
    // The broker (and its store) goes now, not with the last connection's context.
    drop(shared.take());
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
                    if let Event::Connect { queue, .. } = ev {
                        // Accepted just before shutdown: refuse it politely.
                        let refuse = ConnAck::new(ReasonCode::ServerShuttingDown);
                        let _ = queue.0.push(Transmit::Packet(refuse.into()));
                        let _ = queue.0.push(Transmit::Close);
                    }
                }
            }
            _ = &mut deadline => break,
        }
    }
}

fn handle_event(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut FastMap<ConnId, ConnQueue>,
    ev: Event,
    now: Instant,
    ingress: &Semaphore,
) {
    match ev {
        Event::Connect {
            conn,
            peer,
            connect,
            queue,
        } => {
            handles.insert(conn, queue);
            broker.handle_connect(conn, peer.ip(), *connect, now);
        }
        Event::Packet {
            conn,
            packet,
            budget_kib,
        } => {
            broker.handle_packet(conn, packet, now);
            if budget_kib > 0 {
                ingress.add_permits(budget_kib as usize);
            }
        }
        Event::ProtocolError { conn, reason } => broker.handle_protocol_error(conn, reason, now),
        Event::Written { conn, n } => broker.handle_written(conn, n, now),
        Event::Acl(acl) => broker.set_acl(Some(*acl)),
        Event::Closed { conn } => {
            handles.remove(&conn);
            broker.handle_closed(conn, CloseReason::NetworkError, now);
        }
    }
}

/// `durability = "sync"`: starts (unless one is being written) a commit of what the events so
/// far changed; the broker keeps the acknowledgements that wait for it and hands over the
/// rest (deliveries) at once.
fn sync_commit(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut FastMap<ConnId, ConnQueue>,
    direct: &mut Direct,
    committing: &mut Option<InFlightCommit>,
    closed: &mut Vec<ConnId>,
    now: Instant,
) {
    broker.commit_held(committing, closed);
    // What is left in the broker's queue is free to go; what waits for the commit stays in it.
    dispatch(broker, handles, direct, now);
    for conn in closed.drain(..) {
        handles.remove(&conn);
    }
}

/// The core's direct writes (see [`Outq`]): how many it may still make in this round, and its
/// encode buffer.
struct Direct {
    left: usize,
    scratch: BytesMut,
    metrics: Arc<Metrics>,
}

/// A round of events this small means the core is keeping up easily: it writes what they
/// produced itself (up to [`DIRECT_WRITES`] packets). Larger rounds, a busy broker, leave the
/// writes to the connections' tasks, which run on every worker thread in parallel.
const DIRECT_MAX_EVENTS: usize = 4;
/// Direct writes per round at most.
const DIRECT_WRITES: usize = 16;

impl Direct {
    /// Sets the direct-write allowance for a round of `events` events.
    fn round(&mut self, events: usize) -> &mut Self {
        self.left = if events <= DIRECT_MAX_EVENTS {
            DIRECT_WRITES
        } else {
            0
        };
        if self.scratch.capacity() > READ_MAX {
            self.scratch = BytesMut::new();
        }
        self
    }
}

/// Hands every pending transmit to its connection without ever waiting: writes it to the
/// socket directly while `direct` allows, else queues it for the connection's task.
fn dispatch(
    broker: &mut Broker<Box<dyn Store>>,
    handles: &mut FastMap<ConnId, ConnQueue>,
    direct: &mut Direct,
    now: Instant,
) {
    while let Some((conn, t)) = broker.poll_transmit() {
        let Some(q) = handles.get(&conn) else {
            continue;
        };
        let close = matches!(t, Transmit::Close);
        match q.0.send(t, direct.left > 0, &mut direct.scratch) {
            Ok(_) if close => {
                handles.remove(&conn);
            }
            Ok(Sent::Queued) => {}
            Ok(Sent::Written { bytes, publish }) => {
                direct.left -= 1;
                Metrics::add(&direct.metrics.bytes_sent, bytes as u64);
                if publish {
                    // What the task reports for what it wrote (its credit).
                    broker.handle_written(conn, 1, now);
                }
            }
            Err(Full) => {
                tracing::warn!(conn, "connection cannot keep up; closing it");
                if let Some(q) = handles.remove(&conn) {
                    q.0.kill();
                }
                broker.handle_closed(conn, CloseReason::NetworkError, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_codec::{Publish, QoS, Topic, decode};

    /// The core writes straight to an idle connection's socket, queues while the connection's
    /// task holds packets it took, and what it queued reaches the peer after what it wrote.
    #[tokio::test]
    async fn the_core_writes_directly_only_while_the_connection_holds_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut peer = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        let ours = Arc::new(ours);
        let queue = ConnQueue::new(16, ProtocolVersion::V3_1_1, Some(ours.clone()));
        let out = queue.0.clone();
        let mut scratch = BytesMut::new();
        let publish = |n: u8| {
            Transmit::Packet(
                Publish::new(
                    Topic::new("t").expect("topic"),
                    QoS::AtMostOnce,
                    None,
                    Bytes::from(vec![n; 3]),
                )
                .into(),
            )
        };
        let sent = out.send(publish(1), true, &mut scratch).expect("room");
        assert_eq!(
            sent,
            Sent::Written {
                bytes: 8,
                publish: true
            }
        );
        // Not allowed this round: queued.
        assert_eq!(
            out.send(publish(2), false, &mut scratch).expect("room"),
            Sent::Queued
        );
        // Something queued: the next one queues behind it even when allowed.
        assert_eq!(
            out.send(publish(3), true, &mut scratch).expect("room"),
            Sent::Queued
        );
        let (mut taken, mut head) = (VecDeque::new(), None);
        assert_eq!(out.take(&mut taken, &mut head), Taken::Open);
        assert_eq!(taken.len(), 2);
        // The task holds packets: the core queues until the task comes back for more.
        assert_eq!(
            out.send(publish(4), true, &mut scratch).expect("room"),
            Sent::Queued
        );
        let mut outbox = Outbox::default();
        for t in taken.drain(..) {
            let Transmit::Packet(p) = t else {
                panic!("a packet was queued")
            };
            outbox.push(p, ProtocolVersion::V3_1_1).expect("encode");
        }
        let mut wr = TcpWriter {
            stream: &ours,
            fresh: false,
        };
        outbox.write_to(&mut wr).await.expect("write");
        assert_eq!(out.take(&mut taken, &mut head), Taken::Open);
        assert_eq!(taken.len(), 1, "the fourth, queued while the task was busy");
        taken.clear();
        assert_eq!(out.take(&mut taken, &mut head), Taken::Open);
        assert!(taken.is_empty());
        // Idle again: written directly, after the others.
        assert!(matches!(
            out.send(publish(5), true, &mut scratch),
            Ok(Sent::Written { .. })
        ));
        let mut got = BytesMut::new();
        let mut payloads = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while payloads.len() < 4 && Instant::now() < deadline {
            while let Some(p) = decode(&mut got, ProtocolVersion::V3_1_1, 1 << 20).expect("decode")
            {
                let Packet::Publish(p) = p else {
                    panic!("only PUBLISH was sent")
                };
                payloads.push(p.payload[0]);
            }
            if payloads.len() < 4 {
                let _ = tokio::time::timeout(Duration::from_secs(1), peer.read_buf(&mut got)).await;
            }
        }
        // The fourth was taken by the "task" above and dropped unwritten: 1, 2, 3 then 5.
        assert_eq!(payloads, vec![1, 2, 3, 5]);
    }

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

    /// The next packet from a raw test client (bounded wait); `None` when the broker closed.
    async fn next_packet(
        io: &mut tokio::net::TcpStream,
        buf: &mut BytesMut,
        version: ProtocolVersion,
    ) -> Option<Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(p) = decode(buf, version, 1 << 20).expect("valid") {
                return Some(p);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), io.read_buf(buf))
                .await
                .expect("an answer in time")
                .expect("read");
            if n == 0 {
                return None;
            }
        }
    }

    /// QoS 1 messages of one publisher reach the subscriber exactly once and in order, and each
    /// gets its PUBACK in order, when the publisher's packets take both ways to the broker's
    /// core: one at a time (handled inline by the connection's task while the core is idle)
    /// and in bursts of many per write (sent to the core task), switching between the two
    /// while the burst's packets may still be on their way to the core.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos1_order_holds_across_inline_and_core_handling() {
        use mqttd_codec::{PacketId, PubAck, Subscribe, SubscribeFilter, SubscriptionOptions};
        use tokio::io::AsyncWriteExt;
        let v = ProtocolVersion::V3_1_1;
        let running = memory_broker().await;
        let addr = running.mqtt_addr;
        let (mut sub, mut sub_buf) = connected(addr, v, "order-sub").await;
        let subscribe = Subscribe {
            packet_id: PacketId::new(1).expect("id"),
            filters: vec![SubscribeFilter {
                filter: mqttd_codec::TopicFilter::new("order/t").expect("filter"),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
            properties: Default::default(),
        };
        sub.write_all(&Packet::Subscribe(subscribe).to_bytes(v).expect("encode"))
            .await
            .expect("write");
        let got = next_packet(&mut sub, &mut sub_buf, v).await;
        assert!(matches!(got, Some(Packet::SubAck(_))), "got {got:?}");
        let (mut publ, mut pub_buf) = connected(addr, v, "order-pub").await;
        let publish = |i: u16| {
            let p = Publish::new(
                Topic::new("order/t").expect("topic"),
                QoS::AtLeastOnce,
                PacketId::new(i),
                Bytes::copy_from_slice(&i.to_be_bytes()),
            );
            Packet::Publish(p).to_bytes(v).expect("encode")
        };
        const ROUNDS: u16 = 20;
        const BURST: u16 = 30;
        let mut next = 1u16;
        let mut acked = Vec::new();
        for _ in 0..ROUNDS {
            // One alone, answered before the next is sent: the core is idle.
            publ.write_all(&publish(next)).await.expect("write");
            next += 1;
            let got = next_packet(&mut publ, &mut pub_buf, v).await;
            let Some(Packet::PubAck(a)) = got else {
                panic!("expected PUBACK, got {got:?}");
            };
            acked.push(a.packet_id.get());
            // A burst in one write, then one more right behind it without waiting.
            let mut burst = Vec::new();
            for _ in 0..BURST {
                burst.extend_from_slice(&publish(next));
                next += 1;
            }
            publ.write_all(&burst).await.expect("write");
            publ.write_all(&publish(next)).await.expect("write");
            next += 1;
            for _ in 0..=BURST {
                let got = next_packet(&mut publ, &mut pub_buf, v).await;
                let Some(Packet::PubAck(a)) = got else {
                    panic!("expected PUBACK, got {got:?}");
                };
                acked.push(a.packet_id.get());
            }
        }
        let sent: Vec<u16> = (1..next).collect();
        assert_eq!(acked, sent, "every PUBACK once, in order");
        // The subscriber acknowledges as it reads (its PUBACKs also go either way).
        let mut delivered = Vec::new();
        while delivered.len() < sent.len() {
            let got = next_packet(&mut sub, &mut sub_buf, v).await;
            let Some(Packet::Publish(p)) = got else {
                panic!("expected PUBLISH, got {got:?}");
            };
            let pid = p.packet_id.expect("QoS 1 has an id");
            sub.write_all(
                &Packet::PubAck(PubAck::new(pid))
                    .to_bytes(v)
                    .expect("encode"),
            )
            .await
            .expect("write");
            delivered.push(u16::from_be_bytes([p.payload[0], p.payload[1]]));
        }
        assert_eq!(delivered, sent, "every message once, in order");
        // Nothing more comes (no duplicate after the last one).
        let mut extra = [0u8; 1];
        use tokio::io::AsyncReadExt;
        let more = tokio::time::timeout(Duration::from_millis(300), sub.read(&mut extra)).await;
        assert!(more.is_err(), "nothing after the last message: {more:?}");
        let inlined = running
            .ctx
            .core
            .as_ref()
            .and_then(|c| c.with(|st| st.inlined))
            .expect("the core runs");
        assert!(
            inlined > 0,
            "some packets were handled by their connection's task"
        );
        shut_down(running, Duration::from_secs(10)).await;
    }

    /// A broker on a free loopback port with in-memory storage and no HTTP listener.
    async fn memory_broker() -> Running {
        let config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            http_listen: None,
            storage: crate::config::StorageKind::Memory,
            ..Config::default()
        };
        start(config).await.expect("start")
    }

    /// A broker, plus a listener of the test's own whose accepted sockets the test hands to
    /// `accept_one` once their first bytes are there (so which path they take is known).
    async fn broker_and_listener() -> (Running, TcpListener) {
        let running = memory_broker().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        (running, listener)
    }

    /// Shuts the broker down, failing the test if that takes longer than `within`.
    async fn shut_down(running: Running, within: Duration) {
        tokio::time::timeout(within, running.shutdown())
            .await
            .expect("shutdown in time");
    }

    /// The next packet from `client` is a CONNACK with `code`.
    async fn expect_connack(
        client: &mut tokio::net::TcpStream,
        buf: &mut BytesMut,
        v: ProtocolVersion,
        code: ReasonCode,
    ) {
        let got = next_packet(client, buf, v).await;
        assert!(
            matches!(&got, Some(Packet::ConnAck(a)) if a.reason_code == code),
            "expected CONNACK {code:?}, got {got:?}"
        );
    }

    /// A raw TCP client connected to the broker at `addr` as `id` (CONNACK Success read), with
    /// its read buffer.
    async fn connected(
        addr: SocketAddr,
        v: ProtocolVersion,
        id: &'static str,
    ) -> (tokio::net::TcpStream, BytesMut) {
        use tokio::io::AsyncWriteExt;
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = BytesMut::new();
        client
            .write_all(&connect_bytes(v, id))
            .await
            .expect("write");
        expect_connack(&mut client, &mut buf, v, ReasonCode::Success).await;
        (client, buf)
    }

    /// Connects to `listener`, writes `first` in one write, accepts, and waits until the
    /// accepted socket is readable (the bytes of one small loopback write arrive together).
    async fn accepted_after(
        listener: &TcpListener,
        first: &[u8],
    ) -> (tokio::net::TcpStream, tokio::net::TcpStream, SocketAddr) {
        use tokio::io::AsyncWriteExt;
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client.write_all(first).await.expect("write");
        let (server, peer) = listener.accept().await.expect("accept");
        tokio::time::timeout(Duration::from_secs(10), server.readable())
            .await
            .expect("readable in time")
            .expect("readable");
        (client, server, peer)
    }

    fn connect_bytes(version: ProtocolVersion, id: &'static str) -> BytesMut {
        use mqttd_codec::{Connect, MqttString};
        let connect = Connect::new(version, MqttString::from_static(id).expect("id"), 30);
        BytesMut::from(
            &Packet::Connect(Box::new(connect))
                .to_bytes(version)
                .expect("encode")[..],
        )
    }

    /// The CONNECT is there when the connection is accepted: it goes to the core from the
    /// accept loop, and the packets that came with it in the same read are served too.
    #[tokio::test]
    async fn a_connect_read_at_accept_is_answered_and_the_packets_after_it_too() {
        use mqttd_codec::{Publish, QoS, SubscribeFilter, SubscriptionOptions, Topic, TopicFilter};
        let (running, listener) = broker_and_listener().await;
        let v = ProtocolVersion::V5;
        let mut first = connect_bytes(v, "early");
        let sub = Packet::Subscribe(mqttd_codec::Subscribe {
            packet_id: std::num::NonZeroU16::MIN,
            filters: vec![SubscribeFilter {
                filter: TopicFilter::new("early/#").expect("filter"),
                options: SubscriptionOptions::default(),
            }],
            properties: Default::default(),
        });
        sub.encode(v, &mut first).expect("encode");
        let publish = Packet::Publish(Publish::new(
            Topic::new("early/x").expect("topic"),
            QoS::AtMostOnce,
            None,
            Bytes::from_static(b"came with the CONNECT"),
        ));
        publish.encode(v, &mut first).expect("encode");
        let (mut client, server, peer) = accepted_after(&listener, &first).await;
        assert!(
            accept_one(server, peer, &running.context()),
            "the whole CONNECT was there: read at accept"
        );
        let mut buf = BytesMut::new();
        expect_connack(&mut client, &mut buf, v, ReasonCode::Success).await;
        assert!(matches!(
            next_packet(&mut client, &mut buf, v).await,
            Some(Packet::SubAck(_))
        ));
        assert!(matches!(
            next_packet(&mut client, &mut buf, v).await,
            Some(Packet::Publish(p)) if &p.payload[..] == b"came with the CONNECT"
        ));
        drop(client);
        shut_down(running, Duration::from_secs(10)).await;
    }

    /// Part of a CONNECT at accept: the connection task reads the rest and answers.
    #[tokio::test]
    async fn a_connect_partly_there_at_accept_is_completed_by_the_connection() {
        use tokio::io::AsyncWriteExt;
        let (running, listener) = broker_and_listener().await;
        let v = ProtocolVersion::V3_1_1;
        let bytes = connect_bytes(v, "partial-at-accept");
        let half = bytes.len() / 2;
        let (mut client, server, peer) = accepted_after(&listener, &bytes[..half]).await;
        assert!(!accept_one(server, peer, &running.context()));
        client.write_all(&bytes[half..]).await.expect("write");
        let mut buf = BytesMut::new();
        expect_connack(&mut client, &mut buf, v, ReasonCode::Success).await;
        drop(client);
        shut_down(running, Duration::from_secs(10)).await;
    }

    /// An invalid CONNECT read at accept gets the CONNACK its error calls for, then a close.
    #[tokio::test]
    async fn a_bad_connect_read_at_accept_is_refused_and_closed() {
        let (running, listener) = broker_and_listener().await;
        let v = ProtocolVersion::V3_1_1;
        let mut bytes = connect_bytes(v, "bad-level");
        bytes[8] = 9; // the protocol level: 0x10, length, 0x00 0x04 "MQTT", level
        let (mut client, server, peer) = accepted_after(&listener, &bytes).await;
        assert!(!accept_one(server, peer, &running.context()));
        let mut buf = BytesMut::new();
        expect_connack(
            &mut client,
            &mut buf,
            v,
            ReasonCode::UnsupportedProtocolVersion,
        )
        .await;
        assert!(
            next_packet(&mut client, &mut buf, v).await.is_none(),
            "closed"
        );
        drop(client);
        shut_down(running, Duration::from_secs(10)).await;
    }

    /// A connection is any byte stream: here an in-memory duplex pipe stands in for the QUIC
    /// stream that will use the same entry point.
    #[tokio::test]
    async fn any_byte_stream_serves_a_connection() {
        use mqttd_codec::{Connect, MqttString, SubscribeFilter, SubscriptionOptions, TopicFilter};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let running = memory_broker().await;
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
        shut_down(running, Duration::from_secs(3)).await;
    }
}
#[cfg(test)]
mod budget_tests {
    use super::*;

    /// Large PUBLISH packets wait for the ingress budget: with room for one 6 KiB message,
    /// the second reaches the core only once the core has handled the first.
    #[tokio::test]
    async fn large_publishes_wait_for_the_ingress_budget() {
        use mqttd_codec::{Connect, MqttString, Publish, QoS, Topic};
        use tokio::io::AsyncWriteExt;

        let (events, mut rx) = mpsc::channel::<Event>(64);
        let ctx = ConnContext::detached(events, 8);
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        tokio::spawn(serve_connection(theirs, peer, 1, ctx.clone()));
        let v = ProtocolVersion::V3_1_1;
        let connect = Connect::new(v, MqttString::from_static("big").expect("id"), 30);
        let mut bytes = Packet::Connect(Box::new(connect))
            .to_bytes(v)
            .expect("encode")
            .to_vec();
        for n in 0..2u8 {
            let p = Publish::new(
                Topic::new("big").expect("topic"),
                QoS::AtMostOnce,
                None,
                Bytes::from(vec![n; 6 << 10]),
            );
            bytes.extend_from_slice(&Packet::Publish(p).to_bytes(v).expect("encode"));
        }
        ours.write_all(&bytes).await.expect("write");
        let next = async |rx: &mut mpsc::Receiver<Event>| {
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an event in time")
                .expect("the connection is alive")
        };
        assert!(matches!(next(&mut rx).await, Event::Connect { .. }));
        let first = next(&mut rx).await;
        let Event::Packet {
            packet: Packet::Publish(p),
            budget_kib,
            ..
        } = &first
        else {
            panic!("expected the first PUBLISH");
        };
        assert_eq!(
            (p.payload[0], *budget_kib),
            (0, 7),
            "6 KiB and its header: 7 KiB"
        );
        // The second waits while the first holds 7 of the 8 KiB.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "the second is held back");
        // The core handled the first: its KiB go back (as `handle_event` does).
        ctx.ingress.add_permits(7);
        let second = next(&mut rx).await;
        assert!(
            matches!(&second, Event::Packet { packet: Packet::Publish(p), budget_kib: 7, .. } if p.payload[0] == 1)
        );
        ctx.ingress.add_permits(7);
        assert_eq!(ctx.ingress.available_permits(), 8, "all given back");
    }

    #[test]
    fn whole_packets_counts_complete_packets_only() {
        let puback = [0x40u8, 2, 0, 1];
        let mut buf = Vec::new();
        assert_eq!(whole_packets(&buf, 5), 0);
        for n in 1..=3 {
            buf.extend_from_slice(&puback);
            assert_eq!(whole_packets(&buf, 5), n);
        }
        // Counting stops at `max`.
        assert_eq!(whole_packets(&buf, 2), 2);
        // A packet whose body (or length) is still on its way does not count.
        buf.extend_from_slice(&[0x30, 200, 1, 0]);
        assert_eq!(whole_packets(&buf, 5), 3);
        buf.truncate(12);
        buf.extend_from_slice(&[0x30, 0x80]);
        assert_eq!(whole_packets(&buf, 5), 3);
        // A multi-byte length: 200 bytes of body.
        buf.truncate(12);
        buf.extend_from_slice(&[0x30, 200, 1]);
        buf.extend_from_slice(&[0u8; 200]);
        assert_eq!(whole_packets(&buf, 5), 4);
    }

    #[test]
    fn only_whole_large_publishes_take_budget() {
        // PUBLISH, remaining length 5000 (0x88 0x27), fully buffered or not.
        let mut buf = vec![0x30, 0x88, 0x27];
        assert_eq!(budget_of(&buf), None, "not buffered yet");
        buf.resize(3 + 5000, 0);
        assert_eq!(budget_of(&buf), Some(5));
        buf[0] = 0x82; // SUBSCRIBE
        assert_eq!(budget_of(&buf), None);
        assert_eq!(budget_of(&[0x30, 0x10]), None, "small");
        let limits = Limits {
            max_packet_size: 256 << 20,
            ..Limits::default()
        };
        assert_eq!(ingress_budget_kib(&limits), 4 * (256 << 10));
        assert_eq!(ingress_budget_kib(&Limits::default()), 64 << 10);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Every connection is a task holding this future for its whole life: what it carries is
    /// what an idle connection costs (the handshake and full-channel sends are boxed apart).
    #[test]
    fn a_connection_task_stays_small() {
        fn size<F>(_: &dyn Fn(tokio::io::DuplexStream) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let (events, _rx) = mpsc::channel::<Event>(1);
        let ctx = ConnContext::detached(events, 1);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let n = size(&move |io| serve_connection(io, peer, 1, ctx.clone()));
        assert!(n <= 1536, "a connection's task future is {n} bytes");
        // The TCP listener's own task (borrowed halves, the CONNECT maybe read at accept).
        fn returned<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let tcp = returned(serve_tcp);
        assert!(tcp <= 1536, "a TCP connection's task future is {tcp} bytes");
    }
}
