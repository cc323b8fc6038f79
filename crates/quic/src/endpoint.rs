//! The tokio endpoint: one UDP socket, a receive task routing datagrams by connection ID, and a
//! driver task per connection.
//!
//! The receive task decodes only the invariant header: packets for a known connection ID are fed
//! to that connection (under its lock, then its driver is notified); unknown versions get
//! Version Negotiation; unknown short-header packets get a Stateless Reset; Initials of a
//! supported version may create a connection, subject to the connection and half-open limits
//! and optional Retry. The routing table holds every connection ID a connection issued, so
//! packets for CIDs issued after the handshake (and after migration) still find it.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};

use crate::config::{ClientConfig, ServerConfig};
use crate::connection::{ConnInner, Connecting, drive};
use crate::proto::{self, ConnectionId, EndpointEvent, Path, packet};

/// A UDP socket and its quinn-udp state.
pub(crate) struct Socket {
    io: UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
}

impl Socket {
    fn bind(addr: SocketAddr) -> io::Result<Arc<Socket>> {
        let std_sock = std::net::UdpSocket::bind(addr)?;
        std_sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&std_sock).into())?;
        // Bulk transfers need more than the default socket buffers.
        let _ = state.set_recv_buffer_size((&std_sock).into(), 4 << 20);
        let _ = state.set_send_buffer_size((&std_sock).into(), 4 << 20);
        let io = UdpSocket::from_std(std_sock)?;
        let local = io.local_addr()?;
        Ok(Arc::new(Socket { io, state, local }))
    }

    /// GSO segments one send may carry (1 without GSO).
    pub(crate) fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, 64)
    }

    /// One send attempt of a batch; `WouldBlock` when the send buffer is full.
    pub(crate) fn try_send(&self, t: &proto::Transmit, data: &[u8]) -> io::Result<()> {
        let src_ip = if self.local.ip().is_unspecified() {
            Some(t.source.ip())
        } else {
            None
        };
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: quinn_udp::EcnCodepoint::from_bits(t.ecn.bits()),
            contents: data,
            segment_size: t.segment_size,
            src_ip,
        };
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), &transmit)
        })
    }
}

struct Route {
    conn: Arc<ConnInner>,
}

struct ConnEntry {
    conn: Arc<ConnInner>,
    cids: Vec<ConnectionId>,
    remote: SocketAddr,
    handshaking: bool,
}

#[derive(Default)]
struct Table {
    routes: HashMap<ConnectionId, Route>,
    conns: HashMap<u64, ConnEntry>,
    /// Connections by the peer address they started on: a Stateless Reset carries no CID we
    /// know, so it is matched to a connection by where it comes from (ngtcp2 checks the token).
    by_remote: HashMap<SocketAddr, Arc<ConnInner>>,
    half_open: usize,
    closing: bool,
    /// Handshakes started in the current one-second window (for automatic Retry).
    window_start: Option<Instant>,
    window_count: u32,
    resets_in_window: u32,
    reset_window_start: Option<Instant>,
}

/// Shared endpoint state; drivers and the receive task hold it.
pub(crate) struct EndpointInner {
    socket: RwLock<Arc<Socket>>,
    table: Mutex<Table>,
    server: Option<ServerConfig>,
    reset_secret: [u8; 32],
    token_secret: [u8; 32],
    cid_len: usize,
    next_id: AtomicU64,
    incoming: Mutex<Option<mpsc::UnboundedSender<Connecting>>>,
    /// Notified whenever a connection is forgotten (for `wait_idle`).
    idle: Notify,
    /// Notified when the socket was replaced (the receive task restarts on the new one).
    rebound: Notify,
    stats: EndpointStats,
    /// The last user handle is gone: the receive task may stop once connections drained.
    dropped: std::sync::atomic::AtomicBool,
}

/// Counters of what the endpoint did with packets that matched no connection.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Version Negotiation packets sent.
    pub version_negotiations: AtomicU64,
    /// Stateless Resets sent.
    pub stateless_resets: AtomicU64,
    /// Retry packets sent.
    pub retries: AtomicU64,
    /// Connection attempts refused (limits, shutdown).
    pub refused: AtomicU64,
    /// Datagrams dropped as invalid or unroutable.
    pub dropped: AtomicU64,
    /// Connections accepted (server) or started (client).
    pub connections: AtomicU64,
}

impl EndpointInner {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn socket(&self) -> Arc<Socket> {
        self.socket
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn max_gso_segments(&self) -> usize {
        self.socket().max_gso_segments()
    }

    /// Sends one batch (one datagram, or several of `segment_size` with GSO), waiting while
    /// the socket's send buffer is full.
    pub(crate) async fn send(&self, t: &proto::Transmit, data: &[u8]) {
        let socket = self.socket();
        loop {
            match socket.try_send(t, data) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.io.writable().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP send failed");
                    return;
                }
            }
        }
    }

    /// Applies routing changes from a connection.
    pub(crate) fn apply_routing(&self, conn: &Arc<ConnInner>, events: &[EndpointEvent]) {
        if events.is_empty() {
            return;
        }
        let mut t = self.table();
        for ev in events {
            match *ev {
                EndpointEvent::NewCid(cid) => {
                    t.routes.insert(cid, Route { conn: conn.clone() });
                    if let Some(e) = t.conns.get_mut(&conn.id) {
                        e.cids.push(cid);
                    }
                }
                EndpointEvent::RetireCid(cid) => {
                    if t.routes.get(&cid).is_some_and(|r| r.conn.id == conn.id) {
                        t.routes.remove(&cid);
                    }
                }
            }
        }
    }

    /// Marks a connection's handshake as done (it no longer counts as half-open).
    pub(crate) fn handshake_done(&self, conn: &Arc<ConnInner>) {
        let mut t = self.table();
        if let Some(e) = t.conns.get_mut(&conn.id)
            && e.handshaking
        {
            e.handshaking = false;
            t.half_open -= 1;
        }
    }

    /// Removes a drained connection from the tables.
    pub(crate) fn forget(&self, conn: &Arc<ConnInner>) {
        let mut t = self.table();
        if let Some(e) = t.conns.remove(&conn.id) {
            if e.handshaking {
                t.half_open -= 1;
            }
            if t.by_remote.get(&e.remote).is_some_and(|c| c.id == conn.id) {
                t.by_remote.remove(&e.remote);
            }
            for cid in e.cids {
                if t.routes.get(&cid).is_some_and(|r| r.conn.id == conn.id) {
                    t.routes.remove(&cid);
                }
            }
        }
        drop(t);
        self.idle.notify_waiters();
    }

    fn register(
        self: &Arc<Self>,
        proto: proto::Connection,
        extra_cid: Option<ConnectionId>,
    ) -> Arc<ConnInner> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let remote = proto.path().remote;
        let mut cids = proto.local_cids();
        cids.push(proto.initial_scid());
        if let Some(c) = extra_cid {
            cids.push(c);
        }
        let conn = ConnInner::new(proto, id, Arc::downgrade(self));
        {
            let mut t = self.table();
            for cid in &cids {
                t.routes.insert(*cid, Route { conn: conn.clone() });
            }
            t.conns.insert(
                id,
                ConnEntry {
                    conn: conn.clone(),
                    cids,
                    remote,
                    handshaking: true,
                },
            );
            t.by_remote.insert(remote, conn.clone());
            t.half_open += 1;
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(conn.clone(), self.clone()));
        conn
    }

    async fn send_raw(&self, to: SocketAddr, local: SocketAddr, data: &[u8]) {
        let t = proto::Transmit {
            destination: to,
            source: local,
            ecn: proto::Ecn::NotEct,
            size: data.len(),
            segment_size: None,
        };
        self.send(&t, data).await;
    }

    /// The connection a packet with this header belongs to, if any. A short-header packet with
    /// an unknown connection ID may be a Stateless Reset from a peer we talk to: it goes to the
    /// connection that started on that address (ngtcp2 checks the token).
    fn route(&self, header: &packet::Header, remote: SocketAddr) -> Option<Arc<ConnInner>> {
        let t = self.table();
        match t.routes.get(&header.dcid) {
            Some(r) => Some(r.conn.clone()),
            None if !header.long => t.by_remote.get(&remote).cloned(),
            None => None,
        }
    }

    /// Handles one received datagram that belongs to no connection: Version Negotiation,
    /// a new connection, or a Stateless Reset.
    async fn handle_unrouted(
        self: &Arc<Self>,
        now: Instant,
        path: Path,
        decoded: packet::Decoded,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) {
        let header = match decoded {
            packet::Decoded::Invalid => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            packet::Decoded::UnsupportedVersion(h) => {
                // Only answer datagrams that could be an Initial (anti-amplification), and
                // only as a server.
                if self.server.is_some() && data.len() >= 1200 {
                    let versions = self.server_versions();
                    if packet::write_version_negotiation(&h, &versions, scratch).is_some() {
                        self.stats
                            .version_negotiations
                            .fetch_add(1, Ordering::Relaxed);
                        self.send_raw(path.remote, path.local, scratch).await;
                    }
                } else {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            packet::Decoded::Supported(h) => h,
        };
        if header.long {
            if self.server.is_some() {
                self.accept(now, path, data, scratch).await;
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        self.stateless_reset(now, path, &header, data.len(), scratch)
            .await;
    }

    fn server_versions(&self) -> Vec<u32> {
        match &self.server {
            Some(s) => s.transport.versions.iter().map(|v| v.wire()).collect(),
            None => vec![mqttd_ngtcp2_sys::NGTCP2_PROTO_VER_V1],
        }
    }

    async fn stateless_reset(
        &self,
        now: Instant,
        path: Path,
        header: &packet::Header,
        len: usize,
        scratch: &mut Vec<u8>,
    ) {
        {
            let mut t = self.table();
            let start = *t.reset_window_start.get_or_insert(now);
            if now.duration_since(start) > Duration::from_secs(1) {
                t.reset_window_start = Some(now);
                t.resets_in_window = 0;
            }
            // Bound the reflection we offer to spoofed floods.
            if t.resets_in_window >= 1000 {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            t.resets_in_window += 1;
        }
        let Some(token) = proto::reset_token(&self.reset_secret, &header.dcid) else {
            return;
        };
        if packet::write_stateless_reset(&token, len, scratch).is_some() {
            self.stats.stateless_resets.fetch_add(1, Ordering::Relaxed);
            self.send_raw(path.remote, path.local, scratch).await;
        } else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn accept(
        self: &Arc<Self>,
        now: Instant,
        path: Path,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) {
        let Some(server) = &self.server else { return };
        let Some(initial) = packet::accept_initial(data) else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let header = initial.header;
        // Limits and the automatic-Retry rate, decided under one lock.
        let (refuse, drop_it, rate_retry) = {
            let mut t = self.table();
            let start = *t.window_start.get_or_insert(now);
            if now.duration_since(start) > Duration::from_secs(1) {
                t.window_start = Some(now);
                t.window_count = 0;
            }
            let refuse = t.closing || t.conns.len() >= server.max_connections;
            let drop_it = t.half_open >= server.max_half_open;
            (
                refuse,
                drop_it,
                t.window_count >= server.retry_above_handshakes_per_sec,
            )
        };
        if refuse {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            if packet::write_refusal(&header, scratch).is_some() {
                self.send_raw(path.remote, path.local, scratch).await;
            }
            return;
        }
        if drop_it {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut retry = None;
        if !initial.token.is_empty()
            && initial.token[0] == mqttd_ngtcp2_sys::NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY2 as u8
        {
            match packet::verify_retry_token(
                &self.token_secret,
                header.version,
                path.remote,
                &header.dcid,
                &initial.token,
                server.retry_token_lifetime,
                now,
            ) {
                Some(odcid) => retry = Some((odcid, initial.token.clone())),
                None => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else if server.retry || rate_retry {
            let new_scid = ConnectionId::random(self.cid_len);
            let Some(token) = packet::generate_retry_token(
                &self.token_secret,
                header.version,
                path.remote,
                &new_scid,
                &header.dcid,
                now,
            ) else {
                return;
            };
            if packet::write_retry(&header, &new_scid, &token, scratch).is_some() {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                self.send_raw(path.remote, path.local, scratch).await;
            }
            return;
        }
        self.table().window_count += 1;
        let info = proto::InitialInfo {
            dcid: header.dcid,
            scid: header.scid,
            version: header.version,
            retry,
        };
        let proto = match proto::Connection::server(server, &info, path, now, self.reset_secret) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create server connection");
                return;
            }
        };
        let conn = self.register(proto, Some(header.dcid));
        tracing::debug!(id = conn.id, remote = %path.remote, retry = info.retry.is_some(), "accepting connection");
        let sender = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(tx) = sender {
            let _ = tx.send(Connecting::new(&conn));
        }
        {
            let mut st = conn.lock();
            st.proto
                .handle_datagram(now, path, proto::Ecn::NotEct, data);
            st.process_events();
        }
        conn.wake_driver();
    }

    fn connections(&self) -> Vec<Arc<ConnInner>> {
        self.table()
            .conns
            .values()
            .map(|e| e.conn.clone())
            .collect()
    }

    fn close_all(&self, code: u64, reason: &[u8]) {
        self.table().closing = true;
        for c in self.connections() {
            {
                let mut st = c.lock();
                st.proto.close(code, reason);
                st.process_events();
            }
            c.wake_driver();
        }
        // Stop handing out new connections.
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// How many datagrams for one connection the receive task feeds under one lock before it lets
/// the connection's driver (and readers) at the state.
const FEED_PER_LOCK: usize = 32;

/// Receives datagrams until the endpoint is closed and idle (or the socket is replaced).
async fn recv_loop(inner: Arc<EndpointInner>, socket: Arc<Socket>) {
    let batch = quinn_udp::BATCH_SIZE.min(32);
    // With GRO one receive returns up to `gro_segments` datagrams glued together.
    let buf_len = (socket.state.gro_segments().max(1) * 1500).max(65536);
    let mut bufs: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; buf_len]).collect();
    let mut metas = vec![RecvMeta::default(); batch];
    let mut scratch = Vec::with_capacity(1500);
    loop {
        if !Arc::ptr_eq(&inner.socket(), &socket) || inner.is_finished() {
            return;
        }
        let res = {
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            tokio::select! {
                r = socket.io.readable() => {
                    if r.is_err() {
                        return;
                    }
                    socket.io.try_io(Interest::READABLE, || socket.state.recv((&socket.io).into(), &mut iovs, &mut metas))
                }
                _ = inner.rebound.notified() => continue,
                _ = inner.idle.notified() => continue,
            }
        };
        let n = match res {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // ICMP errors (connection refused) surface here on Linux; they are not fatal.
                tracing::trace!(error = %e, "UDP recv error");
                continue;
            }
        };
        let now = Instant::now();
        // The connection the previous datagram of this batch went to: consecutive datagrams
        // (a GRO batch always) mostly share it, and then skip the routing table.
        let mut last: Option<(ConnectionId, Arc<ConnInner>)> = None;
        for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
            let local = match meta.dst_ip {
                Some(ip) if socket.local.ip().is_unspecified() => {
                    SocketAddr::new(ip, socket.local.port())
                }
                _ => socket.local,
            };
            let path = Path {
                local,
                remote: normalize(meta.addr),
            };
            let ecn = meta
                .ecn
                .map_or(proto::Ecn::NotEct, |e| proto::Ecn::from_bits(e as u8));
            let stride = meta.stride.max(1);
            let mut segments = buf[..meta.len].chunks(stride).peekable();
            while let Some(seg) = segments.next() {
                let decoded = packet::decode(seg, inner.cid_len);
                let packet::Decoded::Supported(header) = decoded else {
                    inner
                        .handle_unrouted(now, path, decoded, seg, &mut scratch)
                        .await;
                    continue;
                };
                let conn = match &last {
                    Some((cid, c)) if *cid == header.dcid => Some(c.clone()),
                    _ => inner.route(&header, path.remote),
                };
                let Some(conn) = conn else {
                    inner
                        .handle_unrouted(now, path, decoded, seg, &mut scratch)
                        .await;
                    continue;
                };
                // This datagram and the following ones for the same connection, under one
                // lock; the driver is woken once for them (it sends the ACKs and whatever the
                // application wrote meanwhile).
                let (handshake_now_done, wake) = {
                    let mut st = conn.lock();
                    let was = st.handshake_done;
                    st.proto.handle_datagram(now, path, ecn, seg);
                    let mut fed = 1;
                    while fed < FEED_PER_LOCK {
                        let Some(next) = segments.peek() else { break };
                        if !matches!(packet::decode(next, inner.cid_len),
                            packet::Decoded::Supported(h) if h.dcid == header.dcid)
                        {
                            break;
                        }
                        st.proto.handle_datagram(now, path, ecn, next);
                        segments.next();
                        fed += 1;
                    }
                    st.process_events();
                    st.rx_since_tx += fed;
                    (
                        !was && st.handshake_done,
                        ConnInner::wake_after_receive(&mut st),
                    )
                };
                if handshake_now_done {
                    inner.handshake_done(&conn);
                }
                if wake {
                    conn.notify.notify_one();
                }
                last = Some((header.dcid, conn));
            }
        }
    }
}

fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

impl EndpointInner {
    /// The receive task may stop: nobody can use the endpoint and every connection drained.
    /// A closed endpoint that still has users keeps answering (refusing new connections).
    fn is_finished(&self) -> bool {
        let t = self.table();
        t.closing && t.conns.is_empty() && self.dropped.load(Ordering::Acquire)
    }
}

/// A QUIC endpoint bound to one UDP socket: a server (accepting connections), a client
/// (making them), or both. Dropping the last `Endpoint` handle closes every connection with a
/// CONNECTION_CLOSE the peers see.
pub struct Endpoint {
    inner: Arc<EndpointInner>,
    handle: Arc<EndpointHandle>,
    incoming: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Connecting>>>,
}

impl Clone for Endpoint {
    fn clone(&self) -> Self {
        Endpoint {
            inner: self.inner.clone(),
            handle: self.handle.clone(),
            incoming: self.incoming.clone(),
        }
    }
}

/// Closes the endpoint when the last user handle goes.
struct EndpointHandle(Arc<EndpointInner>);

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::Release);
        self.0.close_all(0, b"endpoint dropped");
        self.0.idle.notify_waiters();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.inner.socket().local)
            .finish()
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, server: Option<ServerConfig>) -> io::Result<Self> {
        mqttd_tls::init();
        let socket = Socket::bind(addr)?;
        let mut reset_secret = [0u8; 32];
        let mut token_secret = [0u8; 32];
        getrandom::fill(&mut reset_secret).map_err(io::Error::other)?;
        if let Some(key) = server.as_ref().and_then(|s| s.stateless_reset_key) {
            reset_secret = key;
        }
        getrandom::fill(&mut token_secret).map_err(io::Error::other)?;
        let cid_len = server
            .as_ref()
            .map_or(16, |s| s.transport.cid_len.clamp(8, 20));
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(EndpointInner {
            socket: RwLock::new(socket),
            table: Mutex::new(Table::default()),
            server,
            reset_secret,
            token_secret,
            cid_len,
            next_id: AtomicU64::new(0),
            incoming: Mutex::new(Some(tx)),
            idle: Notify::new(),
            rebound: Notify::new(),
            stats: EndpointStats::default(),
            dropped: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(recv_loop(inner.clone(), inner.socket()));
        Ok(Endpoint {
            handle: Arc::new(EndpointHandle(inner.clone())),
            inner,
            incoming: Arc::new(tokio::sync::Mutex::new(rx)),
        })
    }

    /// A server endpoint on `addr` (it can also make client connections).
    pub fn server(config: ServerConfig, addr: SocketAddr) -> io::Result<Self> {
        Self::new(addr, Some(config))
    }

    /// A client-only endpoint on `addr` (use port 0 for any).
    pub fn client(addr: SocketAddr) -> io::Result<Self> {
        Self::new(addr, None)
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.socket().local
    }

    /// Counters of stateless packet handling.
    pub fn stats(&self) -> &EndpointStats {
        &self.inner.stats
    }

    /// How many connections (handshaking or established) the endpoint holds.
    pub fn open_connections(&self) -> usize {
        self.inner.table().conns.len()
    }

    /// How many entries the routing table holds (connection IDs).
    pub fn routing_entries(&self) -> usize {
        self.inner.table().routes.len()
    }

    /// Starts a connection to `remote`, verifying the certificate for `server_name`.
    pub fn connect(
        &self,
        config: &ClientConfig,
        remote: SocketAddr,
        server_name: &str,
    ) -> Result<Connecting, proto::ConnectError> {
        let local = self.local_addr();
        let local = if local.ip().is_unspecified() {
            // Best effort: ngtcp2 only needs a consistent local address for the path.
            let ip: IpAddr = if remote.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            if remote.ip().is_loopback() {
                SocketAddr::new(ip, local.port())
            } else {
                local
            }
        } else {
            local
        };
        let path = Path { local, remote };
        let proto = proto::Connection::client(
            config,
            server_name,
            path,
            Instant::now(),
            self.inner.reset_secret,
        )?;
        let conn = self.inner.register(proto, None);
        conn.wake_driver();
        Ok(Connecting::new(&conn))
    }

    /// Waits for the next incoming connection; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Connecting> {
        self.incoming.lock().await.recv().await
    }

    /// Client: moves to a new UDP socket bound to `addr` and migrates every connection to it
    /// (path validation follows). A connection whose server sent `disable_active_migration`
    /// (or whose handshake is not confirmed yet) is not actively migrated: it keeps its
    /// connection ID and carries on from the new socket as after a NAT rebinding, which the
    /// server validates and follows.
    pub fn rebind(&self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let socket = Socket::bind(addr)?;
        let local = socket.local;
        *self.inner.socket.write().unwrap_or_else(|e| e.into_inner()) = socket.clone();
        // The old receive task sees the new socket and exits; one starts for the new socket.
        self.inner.rebound.notify_waiters();
        tokio::spawn(recv_loop(self.inner.clone(), socket));
        let now = Instant::now();
        for c in self.inner.connections() {
            {
                let mut st = c.lock();
                // A wildcard socket keeps the IP the connection used (the route to the peer is
                // the same host's) with the new port, as the receive path reports it.
                let conn_local = if local.ip().is_unspecified() {
                    SocketAddr::new(st.proto.path().local.ip(), local.port())
                } else {
                    local
                };
                if !st.proto.migrate(now, conn_local) {
                    tracing::debug!(
                        id = c.id,
                        "no active migration (peer disabled it, or too early): the connection follows the socket like a NAT rebinding"
                    );
                }
            }
            c.wake_driver();
        }
        Ok(local)
    }

    /// Closes every connection with `code` and `reason` and refuses new ones.
    pub fn close(&self, code: u64, reason: &[u8]) {
        self.inner.close_all(code, reason);
    }

    /// Waits until every connection has finished closing.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.table().conns.is_empty() {
                return;
            }
            notified.await;
        }
    }
}
