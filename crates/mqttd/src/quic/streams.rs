//! Multi-stream mode (EMQX compatible): one MQTT connection over several QUIC streams.
//!
//! The first client-initiated bidirectional stream is the control stream (CONNECT, CONNACK,
//! PINGREQ, AUTH, DISCONNECT, and anything a client chooses to send there); every further one
//! is a data stream. The broker core still sees one byte stream ([`serve_connection`] is not
//! aware of streams): [`MuxIo`] merges whole packets from all streams into its read side and
//! splits what the core writes back into packets, routed by packet kind:
//!
//! - an ack (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) goes to the stream its packet came on;
//! - a PUBLISH goes to the stream whose SUBSCRIBE made the matching subscription (the control
//!   stream for subscriptions made there or in an earlier connection); PUBREL follows its
//!   PUBLISH;
//! - everything else goes to the control stream.
//!
//! Each stream has its own queue and writer task, so a stream stalled by QUIC flow control (a
//! slow reader of one topic) never blocks another: no head-of-line blocking between topics.
//! Bounds: a data stream's queue holds at most `connection_buffer` packets; QoS 0 PUBLISHes
//! beyond it are dropped and counted (`mqttd_messages_dropped_qos0_total`); QoS 1/2 ones are
//! always queued — their number is bounded by the session's inflight window (Receive
//! Maximum), which all streams of the connection share. A full control-stream queue pushes
//! back on the core, as a TCP socket does.
//!
//! A data stream that is reset, stopped or closed ends only its own flows: its subscriptions
//! stay in the session (they belong to it, not to a stream) and deliver on the control stream
//! from then on, and every QoS 1/2 PUBLISH queued or in flight on it that the client has not
//! acknowledged is sent again on the control stream with DUP set. A QoS 1/2 message is never
//! lost with its stream.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use mqttd_quic::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

use crate::metrics::Metrics;

/// Index of a stream within one connection; the control stream is 0.
type Slot = usize;

const CONTROL: Slot = 0;

/// Length of the first packet in `buf` (fixed header included) if it is complete; `Err` for
/// a Remaining Length that is not a valid variable byte integer or exceeds `max`.
fn frame_len(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, ()> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            if len > max {
                return Err(());
            }
            return Ok((buf.len() >= header + len).then_some((header, header + len)));
        }
    }
    Err(())
}

/// A cursor over a packet's variable header; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (v, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_be_bytes(*v))
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(v)
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.bytes(n)
    }

    fn varint(&mut self) -> Option<usize> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = *self.bytes(1)?.first()?;
            v |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The v5 properties block, as bytes.
    fn properties(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()?;
        self.bytes(n)
    }
}

/// The Topic Alias property (0x23) in a v5 PUBLISH properties block.
fn topic_alias(mut props: &[u8]) -> Option<u16> {
    // Only the identifiers a PUBLISH may carry; anything else stops the scan.
    while let Some((&id, rest)) = props.split_first() {
        let mut c = Cursor(rest);
        match id {
            0x23 => return c.u16(),
            0x01 => {
                c.bytes(1)?;
            }
            0x02 => {
                c.bytes(4)?;
            }
            0x03 | 0x08 | 0x09 => {
                c.string()?;
            }
            0x0B => {
                c.varint()?;
            }
            0x26 => {
                c.string()?;
                c.string()?;
            }
            _ => return None,
        }
        props = c.0;
    }
    None
}

/// Whether `topic` matches `filter` (`+`, `#`, `$`-topics, `$share/group/` prefix).
fn matches(filter: &[u8], topic: &[u8]) -> bool {
    let filter = match filter.strip_prefix(b"$share/") {
        Some(rest) => match rest.iter().position(|&b| b == b'/') {
            Some(i) => &rest[i + 1..],
            None => return false,
        },
        None => filter,
    };
    if topic.first() == Some(&b'$') && matches!(filter.first(), Some(b'+' | b'#')) {
        return false;
    }
    let mut f = filter.split(|&b| b == b'/');
    let mut t = topic.split(|&b| b == b'/');
    loop {
        match (f.next(), t.next()) {
            (Some(b"#"), _) => return true,
            (Some(b"+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One stream's outbound side.
struct Outq {
    queue: VecDeque<Bytes>,
    notify: Arc<Notify>,
    /// The writer failed (stream reset or stopped): route around it.
    dead: bool,
}

/// An outbound QoS 1/2 PUBLISH the client has not acknowledged yet.
struct Unacked {
    slot: Slot,
    /// The packet, kept until PUBACK/PUBREC so it can be sent again if its stream dies.
    copy: Option<Bytes>,
}

/// Routing state shared by the stream tasks and [`MuxIo`].
struct Mux {
    v5: bool,
    bound: usize,
    outs: Vec<Outq>,
    /// Inbound QoS 1/2 PUBLISH (and PUBREL) packet id -> stream of its acks.
    inbound_acks: HashMap<u16, Slot>,
    /// SUBSCRIBE/UNSUBSCRIBE packet id -> stream of its SUBACK/UNSUBACK.
    sub_acks: HashMap<u16, Slot>,
    /// Subscriptions made on this connection and their stream.
    filters: Vec<(Bytes, Slot)>,
    /// Outbound QoS 1/2 PUBLISHes by packet id.
    unacked: HashMap<u16, Unacked>,
    /// Outbound topic aliases (v5) -> topic.
    aliases: HashMap<u16, Bytes>,
    /// Waiting for room in the control queue.
    control_waker: Option<Waker>,
    /// The core's write side was shut down: writers finish their streams when drained.
    closing: bool,
    metrics: Arc<Metrics>,
}

/// Routing state of one multi-stream connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct Shared(Arc<Mutex<Mux>>);

impl Shared {
    pub(crate) fn new(bound: usize, metrics: Arc<Metrics>) -> Shared {
        Shared(Arc::new(Mutex::new(Mux {
            v5: false,
            bound,
            outs: Vec::new(),
            inbound_acks: HashMap::new(),
            sub_acks: HashMap::new(),
            filters: Vec::new(),
            unacked: HashMap::new(),
            aliases: HashMap::new(),
            control_waker: None,
            closing: false,
            metrics,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Mux> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a stream and starts its writer; returns its slot (0 for the first: control).
    pub(crate) fn add_stream(&self, send: SendStream) -> (Slot, tokio::task::JoinHandle<()>) {
        let notify = Arc::new(Notify::new());
        let slot = {
            let mut m = self.lock();
            m.outs.push(Outq {
                queue: VecDeque::new(),
                notify: notify.clone(),
                dead: false,
            });
            m.outs.len() - 1
        };
        let task = tokio::spawn(write_stream(self.clone(), slot, send, notify));
        (slot, task)
    }

    /// Records what an inbound packet means for routing (which stream its acks and the
    /// deliveries of its subscriptions go to).
    fn inspect_inbound(&self, slot: Slot, packet: &[u8], header: usize) {
        let mut m = self.lock();
        let kind = packet[0] >> 4;
        let mut c = Cursor(&packet[header..]);
        match kind {
            // CONNECT: protocol name, then the level.
            1 if c.string().is_some() => m.v5 = c.bytes(1) == Some(&[5]),
            3 if (packet[0] >> 1) & 3 > 0 && c.string().is_some() => {
                if let Some(id) = c.u16() {
                    m.inbound_acks.insert(id, slot);
                }
            }
            4 | 7 => {
                if let Some(id) = c.u16() {
                    m.unacked.remove(&id);
                }
            }
            5 => {
                if let Some(id) = c.u16()
                    && let Some(u) = m.unacked.get_mut(&id)
                {
                    // Received: from now on only its PUBREL may need resending, which the
                    // session does on resume.
                    u.copy = None;
                }
            }
            6 => {
                if let Some(id) = c.u16() {
                    m.inbound_acks.insert(id, slot);
                }
            }
            8 | 10 => {
                let Some(id) = c.u16() else { return };
                m.sub_acks.insert(id, slot);
                if m.v5 && c.properties().is_none() {
                    return;
                }
                while let Some(f) = c.string() {
                    let f = Bytes::copy_from_slice(f);
                    m.filters.retain(|(g, _)| *g != f);
                    if kind == 8 {
                        if c.bytes(1).is_none() {
                            break;
                        }
                        m.filters.push((f, slot));
                    }
                }
            }
            _ => {}
        }
    }

    /// The stream an outbound packet goes to; records what acks will need.
    fn route_outbound(m: &mut Mux, packet: &Bytes, header: usize) -> Slot {
        let kind = packet[0] >> 4;
        let mut c = Cursor(&packet[header..]);
        let slot = match kind {
            3 => {
                let qos = (packet[0] >> 1) & 3;
                let Some(topic) = c.string() else {
                    return CONTROL;
                };
                let id = if qos > 0 { c.u16() } else { None };
                let mut topic = Bytes::copy_from_slice(topic);
                if m.v5
                    && let Some(alias) = c.properties().and_then(topic_alias)
                {
                    if topic.is_empty() {
                        topic = m.aliases.get(&alias).cloned().unwrap_or_default();
                    } else {
                        m.aliases.insert(alias, topic.clone());
                    }
                }
                let slot = m
                    .filters
                    .iter()
                    .find(|(f, _)| matches(f, &topic))
                    .map_or(CONTROL, |(_, s)| *s);
                if let Some(id) = id {
                    m.unacked.insert(
                        id,
                        Unacked {
                            slot,
                            copy: (slot != CONTROL).then(|| packet.clone()),
                        },
                    );
                }
                slot
            }
            4 | 5 | 7 => {
                let id = c.u16();
                match id {
                    Some(id) if kind == 5 => m.inbound_acks.get(&id).copied(),
                    Some(id) => m.inbound_acks.remove(&id),
                    None => None,
                }
                .unwrap_or(CONTROL)
            }
            6 => c
                .u16()
                .and_then(|id| m.unacked.get(&id))
                .map_or(CONTROL, |u| u.slot),
            9 | 11 => c
                .u16()
                .and_then(|id| m.sub_acks.remove(&id))
                .unwrap_or(CONTROL),
            _ => CONTROL,
        };
        if m.outs.get(slot).is_some_and(|o| !o.dead) {
            slot
        } else {
            CONTROL
        }
    }

    /// A data stream's writer failed: its subscriptions deliver on the control stream from
    /// now on, and its unacknowledged QoS 1/2 PUBLISHes are sent again there with DUP set.
    fn stream_died(&self, slot: Slot) {
        if slot == CONTROL {
            return;
        }
        let mut guard = self.lock();
        let m = &mut *guard;
        let Some(out) = m.outs.get_mut(slot) else {
            return;
        };
        out.dead = true;
        out.queue.clear();
        for (_, s) in m.filters.iter_mut() {
            if *s == slot {
                *s = CONTROL;
            }
        }
        for s in m.inbound_acks.values_mut().chain(m.sub_acks.values_mut()) {
            if *s == slot {
                *s = CONTROL;
            }
        }
        let mut again: Vec<(u16, Bytes)> = Vec::new();
        for (id, u) in m.unacked.iter_mut() {
            if u.slot == slot {
                u.slot = CONTROL;
                if let Some(copy) = u.copy.take() {
                    let mut b = BytesMut::from(&copy[..]);
                    b[0] |= 0x08;
                    again.push((*id, b.freeze()));
                }
            }
        }
        // In packet-id order, which is the order they were sent in within a window.
        again.sort_by_key(|(id, _)| *id);
        if !again.is_empty() {
            tracing::debug!(
                resent = again.len(),
                "data stream ended; its unacknowledged messages move to the control stream"
            );
        }
        let control = &mut m.outs[CONTROL];
        control.queue.extend(again.into_iter().map(|(_, b)| b));
        control.notify.notify_one();
    }

    /// Ends every writer once its queue is drained (the core is done with the connection).
    fn close(&self) {
        let mut m = self.lock();
        m.closing = true;
        for o in &m.outs {
            o.notify.notify_one();
        }
    }
}

/// Writes one stream's queue until the connection closes or the stream fails.
async fn write_stream(shared: Shared, slot: Slot, mut send: SendStream, notify: Arc<Notify>) {
    let mut batch = Vec::with_capacity(64);
    loop {
        let closing = {
            let mut m = shared.lock();
            let bound = m.bound;
            let q = &mut m.outs[slot].queue;
            let n = q.len().min(64);
            batch.extend(q.drain(..n));
            let room = q.len() < bound;
            let closing = m.closing && batch.is_empty();
            if slot == CONTROL
                && room
                && let Some(w) = m.control_waker.take()
            {
                w.wake();
            }
            closing
        };
        if closing {
            let _ = send.finish();
            return;
        }
        if batch.is_empty() {
            // Idle: also notice the client abandoning the stream (STOP_SENDING), so what is
            // in flight on it moves to the control stream now, not at the next write.
            tokio::select! {
                _ = notify.notified() => continue,
                _ = send.stopped() => {
                    shared.stream_died(slot);
                    return;
                }
            }
        }
        for b in batch.drain(..) {
            if send.write_chunk(b).await.is_err() {
                shared.stream_died(slot);
                return;
            }
        }
    }
}

/// Reads one stream, forwarding whole packets to the core in order.
///
/// The control stream's reader signals `first` after forwarding the first packet (CONNECT:
/// data streams are read only after it) and sends an empty chunk at its end (the end of the
/// connection for the core). With `gate` (a connection taken before its handshake completed)
/// it forwards the first packet from 0-RTT data and then waits for the handshake.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn read_stream(
    shared: Shared,
    slot: Slot,
    mut recv: RecvStream,
    to_core: mpsc::Sender<Bytes>,
    max_packet: usize,
    mut first: Option<tokio::sync::oneshot::Sender<()>>,
    mut gate: Option<mqttd_quic::Connection>,
) -> RecvStream {
    read_packets(
        &shared, slot, &mut recv, &to_core, max_packet, &mut first, &mut gate,
    )
    .await;
    if slot == CONTROL {
        let _ = to_core.send(Bytes::new()).await;
    }
    // Returned, not dropped: dropping it would send STOP_SENDING (see `linger`).
    recv
}

async fn read_packets(
    shared: &Shared,
    slot: Slot,
    recv: &mut RecvStream,
    to_core: &mpsc::Sender<Bytes>,
    max_packet: usize,
    first: &mut Option<tokio::sync::oneshot::Sender<()>>,
    gate: &mut Option<mqttd_quic::Connection>,
) {
    let mut buf = BytesMut::new();
    loop {
        loop {
            match frame_len(&buf, max_packet) {
                Ok(Some((header, total))) => {
                    let packet = buf.split_to(total).freeze();
                    shared.inspect_inbound(slot, &packet, header);
                    if to_core.send(packet).await.is_err() {
                        return;
                    }
                    // An early connection: the CONNECT went in from 0-RTT data; nothing else
                    // is served before the handshake completed.
                    if let Some(conn) = gate.take()
                        && conn.handshake_complete().await.is_err()
                    {
                        return;
                    }
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(None) => break,
                Err(()) => {
                    // Let the core's decoder see it and answer with the right reason code.
                    let _ = to_core.send(buf.split().freeze()).await;
                    return;
                }
            }
        }
        match recv.read_chunk(64 * 1024).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Err(_) => {
                // Reset by the client: the stream is abandoned both ways.
                shared.stream_died(slot);
                return;
            }
            Ok(None) => {
                if !buf.is_empty() {
                    // A truncated packet: the core sees it as malformed.
                    let _ = to_core.send(buf.split().freeze()).await;
                }
                return;
            }
        }
    }
}

/// The one byte stream the core reads and writes for a multi-stream connection.
pub(crate) struct MuxIo {
    shared: Shared,
    from_streams: mpsc::Receiver<Bytes>,
    reading: Bytes,
    writing: BytesMut,
    eof: bool,
}

impl MuxIo {
    pub(crate) fn new(shared: Shared, from_streams: mpsc::Receiver<Bytes>) -> Self {
        MuxIo {
            shared,
            from_streams,
            reading: Bytes::new(),
            writing: BytesMut::new(),
            eof: false,
        }
    }

    /// Routes every complete packet of `self.writing` to its stream's queue.
    fn route(&mut self) {
        let mut guard = self.shared.lock();
        let m = &mut *guard;
        // The core writes what it encoded: no size limit to enforce here.
        while let Ok(Some((header, total))) = frame_len(&self.writing, usize::MAX) {
            let packet = self.writing.split_to(total).freeze();
            let slot = Shared::route_outbound(m, &packet, header);
            let qos0_publish = packet[0] >> 4 == 3 && (packet[0] >> 1) & 3 == 0;
            if slot != CONTROL && qos0_publish && m.outs[slot].queue.len() >= m.bound {
                // A stalled data stream: QoS 0 overflow is dropped, as a session queue does.
                Metrics::add(&m.metrics.messages_dropped, 1);
                Metrics::add(&m.metrics.messages_dropped_qos0, 1);
                continue;
            }
            let out = &mut m.outs[slot];
            out.queue.push_back(packet);
            out.notify.notify_one();
        }
    }
}

impl AsyncRead for MuxIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eof {
            return Poll::Ready(Ok(()));
        }
        if this.reading.is_empty() {
            match this.from_streams.poll_recv(cx) {
                // An empty chunk is the control stream's end: the connection's end.
                Poll::Ready(Some(b)) if b.is_empty() => {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(b)) => this.reading = b,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.reading.len().min(buf.remaining());
        buf.put_slice(&this.reading[..n]);
        this.reading.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        {
            let mut m = this.shared.lock();
            if m.outs.is_empty() {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            // Back-pressure from the control stream only: data streams never block the core.
            if m.outs[CONTROL].queue.len() >= m.bound {
                m.control_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        this.writing.extend_from_slice(data);
        this.route();
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shared.close();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxIo {
    fn drop(&mut self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching() {
        assert!(matches(b"a/#", b"a/b/c"));
        assert!(matches(b"a/#", b"a"));
        assert!(matches(b"a/+/c", b"a/b/c"));
        assert!(!matches(b"a/+", b"a/b/c"));
        assert!(!matches(b"#", b"$SYS/x"));
        assert!(matches(b"$share/g/a/+", b"a/b"));
        assert!(!matches(b"a/b", b"a/c"));
    }

    #[test]
    fn framing() {
        assert_eq!(frame_len(&[0x30], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x02, 0, 0], 100), Ok(Some((2, 4))));
        assert_eq!(frame_len(&[0x30, 0x02, 0], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], 100), Err(()));
        assert_eq!(frame_len(&[0x30, 0x80, 0x01], 100), Err(()));
    }

    #[test]
    fn topic_alias_is_found_among_publish_properties() {
        // Payload Format Indicator, then Topic Alias 7.
        assert_eq!(topic_alias(&[0x01, 0x01, 0x23, 0x00, 0x07]), Some(7));
        assert_eq!(topic_alias(&[0x02, 0, 0, 0, 5]), None);
        assert_eq!(topic_alias(&[0x23, 0x00]), None);
    }
}
