//! [`Session`]: one client's protocol state, sans-IO.
//!
//! A session is its durable [`SessionState`] (what the [`Store`](crate::store::Store) keeps)
//! plus, while connected, a [`Link`]: what only makes sense for the current connection (protocol
//! version, keep alive, the client's Receive Maximum / Maximum Packet Size / Topic Alias Maximum,
//! alias maps both ways, the will, the write credit).
//!
//! Rules held here:
//! - Outgoing QoS 1/2: a packet id is allocated only when a message enters the inflight window
//!   (`min(client Receive Maximum, max_inflight)`; PUBREL-pending ids count until PUBCOMP).
//!   Unacknowledged messages are resent with DUP, in their original order, on reconnection only.
//! - The queue is bounded; on overflow the oldest queued QoS 0 message goes first, then the new
//!   message ([`enqueue`]).
//! - Messages leave the queue only while the link has write credit, so a slow connection backs
//!   up into its own bounded queue and never into the router.
//! - A message larger than the client's Maximum Packet Size is dropped for it, as if delivered.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use mqttd_codec::{
    Packet, PacketId, ProtocolVersion, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode, Topic,
};

use crate::broker::{ConnId, Transmit};
use crate::message::Message;
use crate::router::ClientId;
use crate::store::{Delivery, Outgoing, QueueLog, SessionState};

/// A will as given in CONNECT: published when the connection ends abnormally.
#[derive(Debug, Clone)]
pub struct WillSpec {
    /// The will as a message (its expiry starts when it is published).
    pub message: Message,
    /// Its Message Expiry Interval.
    pub expiry_interval: Option<u32>,
    /// Will Delay Interval in seconds.
    pub delay: u32,
}

/// The current connection of a session.
#[derive(Debug)]
pub struct Link {
    /// The connection.
    pub conn: ConnId,
    /// Its protocol version.
    pub version: ProtocolVersion,
    /// 1.5 x the effective keep alive; zero disables the check.
    pub keep_alive_timeout: Duration,
    /// When the last packet arrived.
    pub last_seen: Instant,
    /// Outgoing QoS 1/2 window: min(client Receive Maximum, broker max_inflight).
    pub window: usize,
    /// The client's Maximum Packet Size.
    pub max_packet_size: usize,
    /// The client's Topic Alias Maximum (aliases the broker may use towards it).
    pub alias_max_out: u16,
    /// Aliases the client set, towards the broker.
    pub aliases_in: HashMap<u16, Topic>,
    /// Aliases the broker set, towards the client.
    pub aliases_out: HashMap<Topic, u16>,
    /// Packets handed to the driver and not yet reported written.
    pub in_transit: usize,
    /// The will, until a normal DISCONNECT clears it. Boxed: most clients have none, and a
    /// link without one should not carry the room for it.
    pub will: Option<Box<WillSpec>>,
    /// Request Problem Information (reason strings allowed).
    pub problem_info: bool,
}

/// What a [`Session::pump`] did, for the broker's counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pumped {
    /// PUBLISH packets handed out.
    pub sent: u64,
    /// QoS of each message dropped (expired, or too large for the client).
    pub dropped: Vec<QoS>,
}

/// One client's session. See the module documentation.
#[derive(Debug)]
pub struct Session {
    /// What outlives the connection.
    pub state: SessionState,
    /// The connection, while there is one.
    pub link: Option<Link>,
}

impl Session {
    /// A fresh session, not connected.
    pub fn new(client_id: ClientId, expiry_interval: u32) -> Self {
        Session {
            state: SessionState::new(client_id, expiry_interval),
            link: None,
        }
    }

    /// Whether a connection is attached.
    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    /// Appends a delivery to the queue under the overflow policy; returns the QoS of what was
    /// dropped, if anything.
    pub fn enqueue(&mut self, d: Delivery, max_queued: usize) -> Option<QoS> {
        enqueue_logged(
            &mut self.state.queue,
            &mut self.state.queue_log,
            d,
            max_queued,
        )
    }

    /// Moves queued messages to the connection while it has credit (`credit` packets in
    /// transit at most) and, for QoS 1/2, room in the inflight window.
    pub fn pump(
        &mut self,
        credit: usize,
        now: Instant,
        out: &mut VecDeque<(ConnId, Transmit)>,
    ) -> Pumped {
        self.pump_readable(credit, now, out, None)
    }

    /// [`Session::pump`] under the client's topic access rules: a queued message on a topic
    /// it may not read is discarded as if delivered (it may have been queued before the rules
    /// were known, e.g. for a session restored from the store before its client came back).
    pub fn pump_readable(
        &mut self,
        credit: usize,
        now: Instant,
        out: &mut VecDeque<(ConnId, Transmit)>,
        acl: Option<&crate::acl::ClientAcl>,
    ) -> Pumped {
        let mut result = Pumped::default();
        let Some(link) = self.link.as_mut() else {
            return result;
        };
        let state = &mut self.state;
        while let Some(front) = state.queue.front() {
            if link.in_transit >= credit {
                break;
            }
            if front.message.is_expired(now)
                || acl.is_some_and(|a| !a.may_receive(front.message.topic.as_str()))
            {
                if let Some(d) = state.queue.pop_front() {
                    state.queue_log.popped += 1;
                    result.dropped.push(d.qos);
                }
                continue;
            }
            if front.qos != QoS::AtMostOnce && state.outgoing.len() >= link.window {
                break;
            }
            let Some(d) = state.queue.pop_front() else {
                break;
            };
            state.queue_log.popped += 1;
            let packet_id = if d.qos == QoS::AtMostOnce {
                None
            } else {
                NonZeroU16::new(next_packet_id(state))
            };
            let packet = Packet::Publish(build_publish(&d, packet_id, false, link, now));
            // Without a client limit there is nothing to check (and the length is not computed
            // per delivery): the codec's own bound is far above any packet the broker accepts.
            if link.max_packet_size != usize::MAX
                && packet
                    .encoded_len(link.version)
                    .map_or(true, |len| len > link.max_packet_size)
            {
                // Too large for this client: discarded as if delivered [MQTT-3.1.2-25].
                undo_alias(link, &d);
                result.dropped.push(d.qos);
                continue;
            }
            if let Some(p) = packet_id {
                state.outgoing.insert(p.get(), Outgoing::Publish(d));
                state.send_order.push_back(p.get());
            }
            link.in_transit += 1;
            result.sent += 1;
            out.push_back((link.conn, Transmit::Packet(packet)));
        }
        result
    }

    /// Resends every unacknowledged outgoing message after a (re)connection: PUBLISH with DUP
    /// for those not yet acknowledged, PUBREL for released QoS 2. Returns the PUBLISH count.
    pub fn redeliver(&mut self, now: Instant, out: &mut VecDeque<(ConnId, Transmit)>) -> u64 {
        let Some(link) = self.link.as_mut() else {
            return 0;
        };
        let mut sent = 0;
        for id in &self.state.send_order {
            let packet = match self.state.outgoing.get(id) {
                Some(Outgoing::Publish(d)) => {
                    link.in_transit += 1;
                    sent += 1;
                    Packet::Publish(build_publish(d, NonZeroU16::new(*id), true, link, now))
                }
                Some(Outgoing::Released) => match NonZeroU16::new(*id) {
                    Some(p) => Packet::PubRel(PubRel::new(p)),
                    None => continue,
                },
                None => continue,
            };
            out.push_back((link.conn, Transmit::Packet(packet)));
        }
        sent
    }

    fn complete(&mut self, id: u16) -> Option<Outgoing> {
        let gone = self.state.outgoing.remove(&id);
        if let Some(pos) = self.state.send_order.iter().position(|p| *p == id) {
            self.state.send_order.remove(pos);
        }
        gone
    }

    /// PUBACK for an outgoing QoS 1 message. Unknown ids are ignored. Returns the connection
    /// of a publisher's PUBACK that this acknowledgement may free (its message's last
    /// [`AckHold`](crate::store::AckHold) share in a session went).
    pub fn on_puback(&mut self, id: PacketId) -> Option<ConnId> {
        if matches!(self.state.outgoing.get(&id.get()), Some(Outgoing::Publish(d)) if d.qos == QoS::AtLeastOnce)
            && let Some(Outgoing::Publish(d)) = self.complete(id.get())
        {
            return d.hold.frees();
        }
        None
    }

    /// PUBREC for an outgoing QoS 2 message: the PUBREL to send, or `None` when the client
    /// refused the message with an error reason (the flow ends there).
    pub fn on_pubrec(&mut self, rec: &PubRec) -> Option<PubRel> {
        let id = rec.packet_id.get();
        let pending = matches!(self.state.outgoing.get(&id), Some(Outgoing::Publish(d)) if d.qos == QoS::ExactlyOnce);
        if pending && rec.reason_code.is_error() {
            let _ = self.complete(id);
            return None;
        }
        let mut rel = PubRel::new(rec.packet_id);
        if pending || matches!(self.state.outgoing.get(&id), Some(Outgoing::Released)) {
            self.state.outgoing.insert(id, Outgoing::Released);
        } else {
            rel.reason_code = ReasonCode::PacketIdentifierNotFound;
        }
        Some(rel)
    }

    /// PUBREL for an incoming QoS 2 message: the PUBCOMP to send.
    pub fn on_pubrel(&mut self, id: PacketId) -> PubComp {
        let mut comp = PubComp::new(id);
        if !self.state.incoming_qos2.remove(&id.get()) {
            comp.reason_code = ReasonCode::PacketIdentifierNotFound;
        }
        comp
    }

    /// PUBCOMP for an outgoing QoS 2 message.
    pub fn on_pubcomp(&mut self, id: PacketId) {
        if matches!(self.state.outgoing.get(&id.get()), Some(Outgoing::Released)) {
            let _ = self.complete(id.get());
        }
    }
}

/// Appends `d` to a bounded queue; on overflow drops the oldest QoS 0 message, else the new
/// one. Returns the QoS of what was dropped.
pub fn enqueue(queue: &mut VecDeque<Delivery>, d: Delivery, max: usize) -> Option<QoS> {
    enqueue_logged(queue, &mut QueueLog::default(), d, max)
}

/// [`enqueue`], counting the changes in `log`.
fn enqueue_logged(
    queue: &mut VecDeque<Delivery>,
    log: &mut QueueLog,
    d: Delivery,
    max: usize,
) -> Option<QoS> {
    if queue.len() < max {
        queue.push_back(d);
        log.pushed += 1;
        return None;
    }
    if let Some(pos) = queue.iter().position(|q| q.qos == QoS::AtMostOnce) {
        queue.remove(pos);
        if pos == 0 {
            log.popped += 1;
        } else {
            log.reshaped += 1;
        }
        queue.push_back(d);
        log.pushed += 1;
        return Some(QoS::AtMostOnce);
    }
    Some(d.qos)
}

/// The next packet id not in use by an outgoing message.
pub fn next_packet_id(state: &mut SessionState) -> u16 {
    // The window is at most 65,535 so a free id always exists when this is called.
    for _ in 0..=u16::MAX {
        state.last_packet_id = state.last_packet_id.checked_add(1).unwrap_or(1);
        if !state.outgoing.contains_key(&state.last_packet_id) {
            break;
        }
    }
    state.last_packet_id
}

fn undo_alias(link: &mut Link, d: &Delivery) {
    // An alias assigned to a packet that is not sent would leave the client unaware of it.
    if let Some(a) = link.aliases_out.get(&d.message.topic).copied()
        && usize::from(a) == link.aliases_out.len()
    {
        link.aliases_out.remove(&d.message.topic);
    }
}

/// Builds the PUBLISH for one delivery: packet id, DUP, outgoing topic alias, remaining
/// expiry, subscription identifiers. The payload is shared, not copied.
fn build_publish(
    d: &Delivery,
    packet_id: Option<PacketId>,
    dup: bool,
    link: &mut Link,
    now: Instant,
) -> Publish {
    let m = &d.message;
    let mut properties = m.properties.clone();
    properties.message_expiry_interval = m.remaining_expiry(now);
    properties
        .subscription_identifiers
        .clone_from(&d.subscription_ids);
    let mut topic = m.topic.clone();
    if link.version.is_v5() && link.alias_max_out > 0 {
        match link.aliases_out.get(&m.topic) {
            // A redelivery keeps the full topic: the new connection has no aliases yet.
            Some(&a) if !dup => {
                properties.topic_alias = Some(a);
                topic = Topic::empty();
            }
            Some(&a) => properties.topic_alias = Some(a),
            None if link.aliases_out.len() < usize::from(link.alias_max_out) => {
                let a = link.aliases_out.len() as u16 + 1;
                link.aliases_out.insert(m.topic.clone(), a);
                properties.topic_alias = Some(a);
            }
            None => {}
        }
    }
    Publish {
        dup: dup && d.qos != QoS::AtMostOnce,
        qos: d.qos,
        retain: d.retain,
        topic,
        packet_id,
        properties,
        payload: m.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn link(window: usize, max_packet_size: usize, alias_max_out: u16) -> Link {
        Link {
            conn: 7,
            version: ProtocolVersion::V5,
            keep_alive_timeout: Duration::ZERO,
            last_seen: Instant::now(),
            window,
            max_packet_size,
            alias_max_out,
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            in_transit: 0,
            will: None,
            problem_info: true,
        }
    }

    fn delivery(topic: &str, qos: QoS, payload: &'static [u8]) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: Topic::new(topic).expect("topic"),
                payload: Bytes::from_static(payload),
                qos,
                retain: false,
                properties: Default::default(),
                expires_at: None,
                publisher: None,
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            hold: Default::default(),
        }
    }

    fn publishes(out: &VecDeque<(ConnId, Transmit)>) -> Vec<&Publish> {
        out.iter()
            .filter_map(|(_, t)| match t {
                Transmit::Packet(Packet::Publish(p)) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pump_respects_credit_and_window() {
        let now = Instant::now();
        let mut s = Session::new(Arc::from("c"), 0);
        s.link = Some(link(2, usize::MAX, 0));
        for _ in 0..3 {
            s.enqueue(delivery("t", QoS::AtLeastOnce, b"q1"), 10);
        }
        s.enqueue(delivery("t", QoS::AtMostOnce, b"q0"), 10);
        let mut out = VecDeque::new();
        // Window of 2: the third QoS 1 waits, and the QoS 0 behind it keeps its order.
        assert_eq!(s.pump(100, now, &mut out).sent, 2);
        assert_eq!(s.state.queue.len(), 2);
        let ids: Vec<u16> = publishes(&out)
            .iter()
            .filter_map(|p| p.packet_id)
            .map(|p| p.get())
            .collect();
        assert_eq!(ids, vec![1, 2]);
        s.on_puback(PacketId::new(1).expect("id"));
        out.clear();
        // Credit: one packet in transit allowed, two already are.
        assert_eq!(s.pump(2, now, &mut out).sent, 0);
        if let Some(l) = s.link.as_mut() {
            l.in_transit = 0;
        }
        assert_eq!(s.pump(100, now, &mut out).sent, 2);
        assert!(s.state.queue.is_empty());
    }

    #[test]
    fn qos2_outgoing_flow_and_redelivery_order() {
        let now = Instant::now();
        let mut s = Session::new(Arc::from("c"), 60);
        s.link = Some(link(10, usize::MAX, 0));
        s.enqueue(delivery("t", QoS::ExactlyOnce, b"a"), 10);
        s.enqueue(delivery("t", QoS::ExactlyOnce, b"b"), 10);
        let mut out = VecDeque::new();
        s.pump(100, now, &mut out);
        let id1 = PacketId::new(1).expect("id");
        let rel = s.on_pubrec(&PubRec::new(id1)).expect("PUBREL");
        assert_eq!(rel.reason_code, ReasonCode::Success);
        // Reconnection: PUBREL for the released one, PUBLISH with DUP for the other, in order.
        s.link = Some(link(10, usize::MAX, 0));
        out.clear();
        assert_eq!(s.redeliver(now, &mut out), 1);
        assert!(matches!(&out[0].1, Transmit::Packet(Packet::PubRel(r)) if r.packet_id == id1));
        assert!(
            matches!(&out[1].1, Transmit::Packet(Packet::Publish(p)) if p.dup && &p.payload[..] == b"b")
        );
        s.on_pubcomp(id1);
        assert_eq!(s.state.outgoing.len(), 1);
        assert_eq!(s.state.send_order, VecDeque::from([2]));
        // A PUBREC with an error ends the flow without PUBREL.
        let mut rec = PubRec::new(PacketId::new(2).expect("id"));
        rec.reason_code = ReasonCode::UnspecifiedError;
        assert!(s.on_pubrec(&rec).is_none());
        assert!(s.state.outgoing.is_empty());
        // Unknown ids.
        let unknown = PacketId::new(9).expect("id");
        assert_eq!(
            s.on_pubrec(&PubRec::new(unknown)).map(|r| r.reason_code),
            Some(ReasonCode::PacketIdentifierNotFound)
        );
        assert_eq!(
            s.on_pubrel(unknown).reason_code,
            ReasonCode::PacketIdentifierNotFound
        );
    }

    #[test]
    fn oversized_message_is_dropped_and_its_alias_not_kept() {
        let now = Instant::now();
        let mut s = Session::new(Arc::from("c"), 0);
        s.link = Some(link(10, 40, 4));
        s.enqueue(delivery("big", QoS::AtLeastOnce, &[0u8; 64]), 10);
        s.enqueue(delivery("small", QoS::AtLeastOnce, b"ok"), 10);
        let mut out = VecDeque::new();
        let pumped = s.pump(100, now, &mut out);
        assert_eq!(pumped.sent, 1);
        assert_eq!(pumped.dropped, vec![QoS::AtLeastOnce]);
        let p = publishes(&out);
        assert_eq!(
            (p[0].topic.as_str(), p[0].properties.topic_alias),
            ("small", Some(1))
        );
        assert_eq!(
            s.state.outgoing.len(),
            1,
            "no packet id kept for the dropped one"
        );
    }
}
