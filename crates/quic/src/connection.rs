//! The tokio connection handle and its driver task.
//!
//! Each connection's [`proto::Connection`] sits in a mutex inside [`ConnInner`]. Its driver task
//! (spawned by the endpoint) is the one that runs timers, writes packets and turns protocol
//! events into task wake-ups; the endpoint's receive task feeds datagrams in, and stream handles
//! read and write buffers, each holding the lock only for the synchronous call and then
//! notifying the driver. A stream in send-on-flush mode sends from the flushing task instead
//! ([`ConnInner::transmit_now`]). After a receive the driver holds back an ACK-only packet
//! for a moment ([`ACK_HOLD`]), so that the application's answer carries the ACK. The lock is
//! never held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::endpoint::EndpointInner;
use crate::proto::{self, ConnectionError, Dir, EndpointEvent, Event, Stats, StreamId};
use crate::stream::{RecvStream, SendStream};

/// Everything about a connection that handles and the driver share.
pub(crate) struct ConnInner {
    pub(crate) state: Mutex<ConnState>,
    /// Wakes the driver: something to send, a timer to re-arm. The receive task notifies it
    /// directly; everything else goes through [`ConnInner::wake_driver`].
    pub(crate) notify: Notify,
    /// The driver was woken for more than received packets (see [`ConnInner::wake_driver`]):
    /// it must not hold back what it has to send.
    asked: AtomicBool,
    /// Application handles (Connection, streams) alive; the last one to go closes.
    app_refs: AtomicUsize,
    pub(crate) id: u64,
    /// For sends from application tasks ([`ConnInner::transmit_now`]).
    endpoint: Weak<EndpointInner>,
}

pub(crate) struct ConnState {
    pub(crate) proto: proto::Connection,
    incoming: [VecDeque<StreamId>; 2],
    accept_wakers: [Vec<Waker>; 2],
    open_wakers: [Vec<Waker>; 2],
    pub(crate) read_wakers: HashMap<StreamId, Waker>,
    pub(crate) write_wakers: HashMap<StreamId, Waker>,
    datagram_wakers: Vec<Waker>,
    handshake_wakers: Vec<Waker>,
    closed_wakers: Vec<Waker>,
    zero_rtt_wakers: Vec<Waker>,
    pub(crate) handshake_done: bool,
    zero_rtt_rejected: bool,
    /// Bumped when 0-RTT is rejected: stream handles from before are void.
    pub(crate) stream_epoch: u32,
    pub(crate) error: Option<ConnectionError>,
    pub(crate) endpoint_events: Vec<EndpointEvent>,
    /// Bytes read by the application since the driver was last woken for flow-control credit.
    pub(crate) unannounced_credit: usize,
    /// Credit worth waking the driver for (a quarter of the smaller window, at most 64 KiB).
    announce_credit: usize,
    /// The timer the driver sleeps until, as of its last pass (`None`: no timer). A send from
    /// an application task that moves the connection's timer earlier wakes the driver.
    driver_deadline: Option<Instant>,
    /// The end of the driver's ACK hold, while one runs (see [`ACK_HOLD`]): the receive task
    /// need not wake it for the ACKs of further packets.
    pub(crate) ack_hold_until: Option<Instant>,
    /// Packets received since the connection last sent one.
    pub(crate) rx_since_tx: usize,
}

fn dir_index(d: Dir) -> usize {
    match d {
        Dir::Bi => 0,
        Dir::Uni => 1,
    }
}

fn wake_all(w: &mut Vec<Waker>) {
    for w in w.drain(..) {
        w.wake();
    }
}

/// Why an application task's send wakes the driver.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    No,
    /// The connection's next timer moved earlier than the driver's.
    Rearm,
    /// More to do than the task did: packets left over, routing changes, the end.
    Asked,
}

impl ConnState {
    /// After a send from an application task (the lock is held): whether and why the driver
    /// must be woken.
    fn wake_after_send(&self) -> Wake {
        if !self.endpoint_events.is_empty() || self.proto.is_drained() {
            return Wake::Asked;
        }
        // During an ACK hold the driver's timers wait for the hold's end.
        let timer = self
            .proto
            .poll_timeout()
            .map(|t| self.ack_hold_until.map_or(t, |h| t.max(h)));
        if timer.is_some_and(|t| self.driver_deadline.is_none_or(|d| t < d)) {
            Wake::Rearm
        } else {
            Wake::No
        }
    }

    /// Records that the application read `n` bytes; returns whether the driver should be woken
    /// to announce the new flow-control credit. Waking it for every read would cost a task
    /// switch per read (with MQTT-sized messages the reader catches up with every packet).
    /// The credit also leaves with whatever the driver sends next (ACKs, data); a wake is
    /// needed only once the credit is a good share of the windows, so a sender that used up
    /// its window (it then holds at least that much credit's worth of unread data here) is
    /// never left waiting for it.
    pub(crate) fn note_read(&mut self, n: usize) -> bool {
        self.unannounced_credit += n;
        if self.unannounced_credit >= self.announce_credit {
            self.unannounced_credit = 0;
            true
        } else {
            false
        }
    }

    /// Turns protocol events into wake-ups; routing events are kept for the driver.
    pub(crate) fn process_events(&mut self) {
        while let Some(ev) = self.proto.poll_endpoint_event() {
            self.endpoint_events.push(ev);
        }
        while let Some(ev) = self.proto.poll_event() {
            match ev {
                Event::HandshakeCompleted => {
                    self.handshake_done = true;
                    wake_all(&mut self.handshake_wakers);
                    wake_all(&mut self.zero_rtt_wakers);
                }
                Event::StreamOpened(id) => {
                    let i = dir_index(id.dir());
                    self.incoming[i].push_back(id);
                    wake_all(&mut self.accept_wakers[i]);
                }
                Event::StreamReadable(id) | Event::StreamReset { id, .. } => {
                    if let Some(w) = self.read_wakers.remove(&id) {
                        w.wake();
                    }
                }
                Event::StreamWritable(id)
                | Event::StreamStopped { id, .. }
                | Event::StreamFinished(id) => {
                    if let Some(w) = self.write_wakers.remove(&id) {
                        w.wake();
                    }
                }
                Event::StreamsAvailable(d) => wake_all(&mut self.open_wakers[dir_index(d)]),
                Event::DatagramReceived => wake_all(&mut self.datagram_wakers),
                Event::ZeroRttRejected => {
                    self.zero_rtt_rejected = true;
                    self.stream_epoch += 1;
                    wake_all(&mut self.zero_rtt_wakers);
                    for (_, w) in self.read_wakers.drain() {
                        w.wake();
                    }
                    for (_, w) in self.write_wakers.drain() {
                        w.wake();
                    }
                }
                Event::ConnectionLost(e) => {
                    if self.error.is_none() {
                        self.error = Some(e);
                    }
                    self.wake_everything();
                }
            }
        }
    }

    fn wake_everything(&mut self) {
        for w in self
            .accept_wakers
            .iter_mut()
            .chain(self.open_wakers.iter_mut())
        {
            wake_all(w);
        }
        wake_all(&mut self.datagram_wakers);
        wake_all(&mut self.handshake_wakers);
        wake_all(&mut self.closed_wakers);
        wake_all(&mut self.zero_rtt_wakers);
        for (_, w) in self.read_wakers.drain() {
            w.wake();
        }
        for (_, w) in self.write_wakers.drain() {
            w.wake();
        }
    }
}

impl ConnInner {
    pub(crate) fn new(
        proto: proto::Connection,
        id: u64,
        endpoint: Weak<EndpointInner>,
    ) -> Arc<Self> {
        let t = proto.transport();
        let window = t.stream_receive_window.min(t.receive_window);
        let announce_credit = usize::try_from(window / 4)
            .unwrap_or(usize::MAX)
            .clamp(1, 64 * 1024);
        Arc::new(ConnInner {
            state: Mutex::new(ConnState {
                proto,
                incoming: [VecDeque::new(), VecDeque::new()],
                accept_wakers: [Vec::new(), Vec::new()],
                open_wakers: [Vec::new(), Vec::new()],
                read_wakers: HashMap::new(),
                write_wakers: HashMap::new(),
                datagram_wakers: Vec::new(),
                handshake_wakers: Vec::new(),
                closed_wakers: Vec::new(),
                zero_rtt_wakers: Vec::new(),
                handshake_done: false,
                zero_rtt_rejected: false,
                stream_epoch: 0,
                error: None,
                endpoint_events: Vec::new(),
                unannounced_credit: 0,
                announce_credit,
                driver_deadline: None,
                ack_hold_until: None,
                rx_since_tx: 0,
            }),
            notify: Notify::new(),
            asked: AtomicBool::new(false),
            app_refs: AtomicUsize::new(0),
            id,
            endpoint,
        })
    }

    /// Wakes the driver for something other than received packets: data or a close to send,
    /// flow-control credit to announce, a timer to re-arm, a routing change.
    pub(crate) fn wake_driver(&self) {
        self.asked.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether the receive task should wake the driver after feeding it packets (the lock is
    /// held): not while the driver holds back an ACK, unless there is more than ACKs to send
    /// or enough packets arrived that the peer should hear of them now.
    pub(crate) fn wake_after_receive(st: &mut ConnState) -> bool {
        st.ack_hold_until.is_none()
            || st.rx_since_tx >= ACK_HOLD_PACKETS
            || st.proto.has_queued_output()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A panic while holding the lock leaves protocol state we can still close cleanly.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the connection has to send right now (stream data, ACKs) from the calling
    /// task instead of waking the driver for it: the path of a [`SendStream`] in send-on-flush
    /// mode. Up to [`INLINE_BATCHES`] packet batches; the driver is woken for anything left
    /// over, for routing changes, and when the connection's next timer moved earlier than the
    /// one the driver sleeps until (the loss-detection timer of the packets just sent).
    pub(crate) fn transmit_now(&self) {
        let Some(endpoint) = self.endpoint.upgrade() else {
            self.wake_driver();
            return;
        };
        // Read once per flush: the socket changes only on a rebind.
        let socket = endpoint.socket();
        let max_gso = socket.max_gso_segments();
        let wake = TRANSMIT_BUF.with_borrow_mut(|buf| {
            for _ in 0..INLINE_BATCHES {
                let (t, wake) = {
                    let mut st = self.lock();
                    if st.error.is_some() {
                        return Wake::Asked;
                    }
                    let t = st.proto.poll_transmit(Instant::now(), buf, max_gso);
                    if t.is_some() {
                        st.rx_since_tx = 0;
                    }
                    st.process_events();
                    (t, st.wake_after_send())
                };
                let Some(t) = t else { return wake };
                // With the send buffer full the batch is dropped, as a full queue on the path
                // would drop it; the connection's loss recovery resends its data.
                if let Err(e) = socket.try_send(&t, &buf[..t.size]) {
                    tracing::debug!(error = %e, "UDP send failed");
                }
                if wake != Wake::No {
                    return wake;
                }
            }
            Wake::Asked
        });
        match wake {
            Wake::No => {}
            // Only the timer moved: the driver re-arms it and may go on holding an ACK.
            Wake::Rearm => self.notify.notify_one(),
            Wake::Asked => self.wake_driver(),
        }
    }

    pub(crate) fn acquire(self: &Arc<Self>) -> Arc<Self> {
        self.app_refs.fetch_add(1, Ordering::AcqRel);
        self.clone()
    }

    pub(crate) fn release(&self) {
        if self.app_refs.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Nobody can use the connection any more: close it as quinn does.
            let mut st = self.lock();
            if !st.proto.is_closed() {
                st.proto.close(0, b"");
                st.process_events();
            }
            drop(st);
            self.wake_driver();
        }
    }
}

/// Packet batches [`ConnInner::transmit_now`] sends before it leaves the rest to the driver.
const INLINE_BATCHES: usize = 4;

thread_local! {
    /// The packet buffer of sends from application tasks: one per thread (it holds a GSO batch
    /// of up to 64 KiB), not one per connection or stream.
    static TRANSMIT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A driver keeps its packet buffers while its next timer is this close (it is busy).
const KEEP_BUFFERS_FOR: Duration = Duration::from_millis(50);

/// How long the driver holds back an ACK-only packet after a receive.
///
/// Each received packet makes its ACK due at once (ngtcp2's `ack_thresh` is 1), and the next
/// packet sent carries it. Sent by the driver right after the receive, the ACK went in a packet
/// of its own, a send system call (and a wake-up of the peer) on top of the answer the
/// application sent a moment later. The hold lets that answer, or any other data sent within
/// it, carry the ACK. It never delays data: the driver holds only while nothing but ACKs,
/// flow-control credit and retransmissions is pending, and any write, close or credit
/// announcement ends the hold. The peer sees the hold as ACK delay, which its loss detection
/// allows for up to our `max_ack_delay` (25 ms).
pub(crate) const ACK_HOLD: Duration = Duration::from_millis(1);

/// Packets received during an ACK hold after which the ACK goes out anyway (a sender with a
/// full congestion window waits for it).
pub(crate) const ACK_HOLD_PACKETS: usize = 8;

/// Drives one connection: timers, packet writes, wake-ups. Runs until the connection drained.
pub(crate) async fn drive(conn: Arc<ConnInner>, endpoint: Arc<EndpointInner>) {
    const MAX_BATCHES: usize = 8;
    let max_gso = endpoint.max_gso_segments();
    let mut bufs: Vec<Vec<u8>> = (0..MAX_BATCHES).map(|_| Vec::new()).collect();
    let mut transmits: Vec<proto::Transmit> = Vec::with_capacity(MAX_BATCHES);
    let mut handshake_reported = false;
    // Woken by a notification (not by the timer) since the last pass.
    let mut notified = false;
    loop {
        transmits.clear();
        let asked = conn.asked.swap(false, Ordering::AcqRel);
        let (timeout, drained, events) = {
            let mut st = conn.lock();
            let now = Instant::now();
            // Woken only for received packets, with nothing to send but their ACK: wait a
            // little for the application's answer, which carries the ACK (see `ACK_HOLD`).
            let hold = (!asked
                && st.handshake_done
                && st.rx_since_tx < ACK_HOLD_PACKETS
                && !st.proto.has_queued_output())
            .then(|| match st.ack_hold_until {
                Some(h) => h,
                None if notified => now + ACK_HOLD,
                None => now,
            })
            .filter(|&h| now < h);
            st.ack_hold_until = hold;
            if hold.is_none() {
                if st.proto.poll_timeout().is_some_and(|t| t <= now) {
                    st.proto.handle_timeout(now);
                }
                for buf in bufs.iter_mut() {
                    match st.proto.poll_transmit(now, buf, max_gso) {
                        Some(t) => transmits.push(t),
                        None => break,
                    }
                }
                if !transmits.is_empty() {
                    st.rx_since_tx = 0;
                }
            }
            st.process_events();
            let events = std::mem::take(&mut st.endpoint_events);
            if st.handshake_done && !handshake_reported {
                handshake_reported = true;
                tracing::debug!(
                    id = conn.id,
                    remote = %st.proto.path().remote,
                    version = st.proto.version(),
                    zero_rtt = st.proto.zero_rtt_accepted(),
                    "handshake completed"
                );
                endpoint.handshake_done(&conn);
            }
            // While holding, timers due earlier (the ACK's among them) wait for the hold's end:
            // loss detection runs at most `ACK_HOLD` late.
            let timeout = match hold {
                Some(h) => Some(st.proto.poll_timeout().map_or(h, |t| t.max(h))),
                None => st.proto.poll_timeout(),
            };
            st.driver_deadline = timeout;
            (timeout, st.proto.is_drained(), events)
        };
        endpoint.apply_routing(&conn, &events);
        for (t, buf) in transmits.iter().zip(bufs.iter()) {
            endpoint.send(t, &buf[..t.size]).await;
        }
        if drained {
            break;
        }
        if transmits.len() == MAX_BATCHES {
            tokio::task::yield_now().await;
            continue;
        }
        if transmits.is_empty() && timeout.is_none_or(|t| t > Instant::now() + KEEP_BUFFERS_FOR) {
            // Going quiet: give the packet buffers back (they can hold a GSO batch each), so
            // an idle connection stays small. A busy one keeps them: allocating and freeing
            // them per wake-up costs page faults.
            for b in bufs.iter_mut() {
                *b = Vec::new();
            }
        }
        let sleep = async {
            match timeout {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        notified = false;
        tokio::select! {
            _ = conn.notify.notified() => {
                notified = true;
                // Woken by the receive task or an application call: the tasks woken with us
                // (readers about to answer, writers) go first, so what they write leaves in
                // the same packets as the ACKs instead of in packets of its own.
                tokio::task::yield_now().await;
            }
            _ = sleep => {}
        }
    }
    {
        let mut st = conn.lock();
        let stats = st.proto.stats();
        tracing::debug!(
            id = conn.id,
            reason = ?st.proto.close_reason(),
            rtt = ?stats.rtt,
            sent_bytes = stats.sent_bytes,
            sent_packets = stats.sent_packets,
            recv_bytes = stats.recv_bytes,
            recv_packets = stats.recv_packets,
            lost_packets = stats.lost_packets,
            "connection drained"
        );
        if st.error.is_none() {
            st.error = Some(
                st.proto
                    .close_reason()
                    .cloned()
                    .unwrap_or(ConnectionError::LocallyClosed),
            );
        }
        st.wake_everything();
    }
    endpoint.forget(&conn);
}

/// A QUIC connection; cheap to clone. The connection closes (application code 0) when the last
/// handle, including stream handles, is dropped.
pub struct Connection {
    pub(crate) inner: Arc<ConnInner>,
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        Connection {
            inner: self.inner.acquire(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.inner.release();
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Connection {
    fn poll_open(&self, cx: &mut Context<'_>, dir: Dir) -> Poll<Result<StreamId, ConnectionError>> {
        let mut st = self.inner.lock();
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone()));
        }
        let id = match dir {
            Dir::Bi => st.proto.open_bi(),
            Dir::Uni => st.proto.open_uni(),
        };
        match id {
            Some(id) => Poll::Ready(Ok(id)),
            None => {
                st.open_wakers[dir_index(dir)].push(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Opens a bidirectional stream, waiting while the peer's stream limit is reached.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_open(cx, Dir::Bi)).await?;
        Ok((
            SendStream::new(&self.inner, id),
            RecvStream::new(&self.inner, id),
        ))
    }

    /// Opens a unidirectional stream, waiting while the peer's stream limit is reached.
    pub async fn open_uni(&self) -> Result<SendStream, ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_open(cx, Dir::Uni)).await?;
        Ok(SendStream::new(&self.inner, id))
    }

    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
        dir: Dir,
    ) -> Poll<Result<StreamId, ConnectionError>> {
        let mut st = self.inner.lock();
        let i = dir_index(dir);
        if let Some(id) = st.incoming[i].pop_front() {
            return Poll::Ready(Ok(id));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone()));
        }
        st.accept_wakers[i].push(cx.waker().clone());
        Poll::Pending
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_accept(cx, Dir::Bi)).await?;
        Ok((
            SendStream::new(&self.inner, id),
            RecvStream::new(&self.inner, id),
        ))
    }

    /// Waits for the peer to open a unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, ConnectionError> {
        let id = std::future::poll_fn(|cx| self.poll_accept(cx, Dir::Uni)).await?;
        Ok(RecvStream::new(&self.inner, id))
    }

    /// Sends an unreliable datagram (RFC 9221).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        let mut st = self.inner.lock();
        if let Some(e) = &st.error {
            return Err(SendDatagramError::ConnectionLost(e.clone()));
        }
        if !st.proto.send_datagram(data) {
            return Err(SendDatagramError::Unsupported);
        }
        drop(st);
        self.inner.wake_driver();
        Ok(())
    }

    /// Waits for the next datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        std::future::poll_fn(|cx| {
            let mut st = self.inner.lock();
            if let Some(d) = st.proto.recv_datagram() {
                return Poll::Ready(Ok(d));
            }
            if let Some(e) = &st.error {
                return Poll::Ready(Err(e.clone()));
            }
            st.datagram_wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Closes the connection with an application error code and reason.
    pub fn close(&self, code: u64, reason: &[u8]) {
        let mut st = self.inner.lock();
        st.proto.close(code, reason);
        st.process_events();
        drop(st);
        self.inner.wake_driver();
    }

    /// Waits until the connection is closed, for whatever reason.
    pub async fn closed(&self) -> ConnectionError {
        std::future::poll_fn(|cx| {
            let mut st = self.inner.lock();
            if let Some(e) = &st.error {
                return Poll::Ready(e.clone());
            }
            st.closed_wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.lock().error.clone()
    }

    /// Statistics: RTT, congestion window, bytes and packets.
    pub fn stats(&self) -> Stats {
        self.inner.lock().proto.stats()
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.stats().rtt
    }

    /// The peer's current address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.lock().proto.path().remote
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.inner.lock().proto.alpn()
    }

    /// The negotiated QUIC version number.
    pub fn version(&self) -> u32 {
        self.inner.lock().proto.version()
    }

    /// Whether 0-RTT data was accepted (client) or received (server).
    pub fn zero_rtt_accepted(&self) -> bool {
        self.inner.lock().proto.zero_rtt_accepted()
    }

    /// Whether the TLS handshake has completed. Always true for a connection that came from
    /// awaiting a [`Connecting`]; false for one taken early with [`Connecting::into_0rtt`]
    /// until the handshake finishes.
    pub fn is_handshake_complete(&self) -> bool {
        self.inner.lock().handshake_done
    }

    /// Waits until the TLS handshake has completed (at once if it has); an error if the
    /// connection ended first.
    pub async fn handshake_complete(&self) -> Result<(), ConnectionError> {
        std::future::poll_fn(|cx| {
            let mut st = self.inner.lock();
            if st.handshake_done {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &st.error {
                return Poll::Ready(Err(e.clone()));
            }
            if !st.handshake_wakers.iter().any(|w| w.will_wake(cx.waker())) {
                st.handshake_wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Whether the peer sent the `disable_active_migration` transport parameter (a server with
    /// migration off); `false` until its transport parameters arrived. [`Endpoint::rebind`]
    /// does not actively migrate such a connection.
    ///
    /// [`Endpoint::rebind`]: crate::Endpoint::rebind
    pub fn peer_disables_active_migration(&self) -> bool {
        self.inner.lock().proto.peer_disables_active_migration()
    }

    /// Starts a TLS key update; false if not possible yet (handshake not confirmed, or an
    /// update is in progress).
    pub fn initiate_key_update(&self) -> bool {
        let ok = self.inner.lock().proto.initiate_key_update(Instant::now());
        self.inner.wake_driver();
        ok
    }

    /// A stable identifier of this connection within its endpoint.
    pub fn stable_id(&self) -> u64 {
        self.inner.id
    }
}

/// Why a datagram could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendDatagramError {
    /// The peer does not accept datagrams, or this one is larger than it accepts.
    #[error("datagrams unsupported by peer or too large")]
    Unsupported,
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
}

/// A connection attempt in progress (client) or an incoming connection (server): resolves when
/// the handshake completes.
pub struct Connecting {
    pub(crate) inner: Option<Arc<ConnInner>>,
}

impl Connecting {
    pub(crate) fn new(inner: &Arc<ConnInner>) -> Self {
        Connecting {
            inner: Some(inner.acquire()),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> Option<SocketAddr> {
        self.inner.as_ref().map(|i| i.lock().proto.path().remote)
    }

    /// Uses the connection before its handshake completes, like quinn's method of that name.
    ///
    /// Client: if resumption parameters allow 0-RTT, returns the connection at once so streams
    /// can be used before the handshake completes (their data travels as 0-RTT), and a future
    /// telling whether the server accepted the early data. Otherwise gives `self` back.
    ///
    /// Server: always succeeds. Streams the client opened in 0-RTT can be accepted and read as
    /// soon as their packets are decrypted, and what the server writes leaves as 0.5-RTT data
    /// (1-RTT packets right after its handshake flight, still bound by the anti-amplification
    /// limit) instead of one round trip later. The future resolves once the handshake completed
    /// (`true` if the client's 0-RTT was accepted) or failed (`false`).
    ///
    /// # Security
    /// Server side, data read before the handshake completes is 0-RTT data: an attacker who
    /// recorded a client's first flight can replay it (the replay never completes a handshake,
    /// but whatever the application did with the early data is done). Act on early data only
    /// where that is acceptable, and wait for the future (or
    /// [`Connection::handshake_complete`]) before anything else. The client is not
    /// authenticated yet either, and its address not validated.
    pub fn into_0rtt(mut self) -> Result<(Connection, ZeroRttAccepted), Connecting> {
        let Some(inner) = self.inner.take() else {
            return Err(self);
        };
        let early = {
            let st = inner.lock();
            st.proto.side() == proto::Side::Server || st.proto.is_zero_rtt()
        };
        if !early {
            self.inner = Some(inner);
            return Err(self);
        }
        let conn = Connection { inner };
        let accepted = ZeroRttAccepted {
            inner: conn.inner.clone(),
        };
        Ok((conn, accepted))
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        if let Some(i) = self.inner.take() {
            i.release();
        }
    }
}

impl Future for Connecting {
    type Output = Result<Connection, ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_ref() else {
            return Poll::Ready(Err(ConnectionError::LocallyClosed));
        };
        let mut st = inner.lock();
        if st.handshake_done {
            drop(st);
            let inner = self.inner.take().expect("checked above");
            return Poll::Ready(Ok(Connection { inner }));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(e.clone()));
        }
        st.handshake_wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

/// Resolves to whether 0-RTT data was accepted (client: by the server; server: from the
/// client), once the handshake completes; `false` if it failed.
pub struct ZeroRttAccepted {
    inner: Arc<ConnInner>,
}

impl Future for ZeroRttAccepted {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut st = self.inner.lock();
        if st.zero_rtt_rejected {
            return Poll::Ready(false);
        }
        // Before the error: a handshake that completed tells the truth even if the connection
        // closed right after it.
        if st.handshake_done {
            return Poll::Ready(st.proto.zero_rtt_accepted());
        }
        if st.error.is_some() {
            return Poll::Ready(false);
        }
        st.zero_rtt_wakers.push(cx.waker().clone());
        Poll::Pending
    }
}
