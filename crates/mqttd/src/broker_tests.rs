//! Unit tests of the sans-IO core: one test per rule, two or more simulated clients, simulated time.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_codec::{
    Connect, Disconnect, MqttString, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel,
    Publish, QoS, ReasonCode, RetainHandling, Subscribe, SubscribeFilter, SubscriptionOptions,
    Topic, TopicFilter, Unsubscribe, Will,
};

use super::*;
use crate::config::{Anonymous, Limits};
use crate::metrics::Metrics;
use crate::session::{enqueue, next_packet_id};
use crate::store::{MemoryStore, Store};
use crate::store::{Outgoing, SessionState};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct H {
    b: Broker<MemoryStore>,
    now: Instant,
    metrics: Arc<Metrics>,
    inbox: std::collections::HashMap<ConnId, Vec<Transmit>>,
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

fn mstr(s: &str) -> MqttString {
    MqttString::from_bytes(Bytes::copy_from_slice(s.as_bytes())).expect("valid string")
}

fn connect(v: ProtocolVersion, id: &str) -> Connect {
    let mut c = Connect::new(v, mstr(id), 0);
    c.clean_start = true;
    c
}

fn persistent(v: ProtocolVersion, id: &str) -> Connect {
    let mut c = connect(v, id);
    c.clean_start = false;
    if v.is_v5() {
        c.properties.session_expiry_interval = Some(3600);
    }
    c
}

fn publish(topic: &str, qos: QoS, id: u16, payload: &str) -> Packet {
    let p = Publish::new(
        Topic::new(topic).expect("topic"),
        qos,
        (qos != QoS::AtMostOnce).then(|| pid(id)),
        Bytes::copy_from_slice(payload.as_bytes()),
    );
    Packet::Publish(p)
}

fn subscribe(id: u16, filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(id),
        filters: vec![SubscribeFilter {
            filter: TopicFilter::new(filter).expect("filter"),
            options,
        }],
        properties: Default::default(),
    })
}

fn sub(id: u16, filter: &str, qos: QoS) -> Packet {
    subscribe(id, filter, SubscriptionOptions::qos(qos))
}

impl H {
    fn new() -> H {
        Self::with(Limits::default(), Anonymous::Loopback)
    }

    fn with(limits: Limits, anonymous: Anonymous) -> H {
        let metrics = Arc::new(Metrics::new());
        let now = Instant::now();
        let b = Broker::new(
            BrokerOptions {
                limits,
                allow_anonymous: anonymous,
            },
            MemoryStore::new(),
            metrics.clone(),
            now,
        )
        .expect("broker");
        H {
            b,
            now,
            metrics,
            inbox: Default::default(),
        }
    }

    /// Everything transmitted since the last call, to every connection (nothing kept).
    fn drain(&mut self) -> Vec<(ConnId, Transmit)> {
        let mut all: Vec<(ConnId, Transmit)> = Vec::new();
        for (c, ts) in self.inbox.drain() {
            all.extend(ts.into_iter().map(|t| (c, t)));
        }
        all.extend(std::iter::from_fn(|| self.b.poll_transmit()));
        all
    }

    /// Transmits to `conn` since the last call, acknowledged as written; others are kept.
    fn out(&mut self, conn: ConnId) -> Vec<Transmit> {
        while let Some((c, t)) = self.b.poll_transmit() {
            self.inbox.entry(c).or_default().push(t);
        }
        let mine = self.inbox.remove(&conn).unwrap_or_default();
        let n = mine
            .iter()
            .filter(|t| matches!(t, Transmit::Packet(Packet::Publish(_))))
            .count();
        if n > 0 {
            self.b.handle_written(conn, n, self.now);
        }
        mine
    }

    fn connect(&mut self, conn: ConnId, c: Connect) -> Vec<Transmit> {
        self.b.handle_connect(conn, LOCAL, c, self.now);
        self.out(conn)
    }

    fn send(&mut self, conn: ConnId, p: Packet) {
        self.b.handle_packet(conn, p, self.now);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.b.handle_timeout(self.now);
    }
}

fn connack(t: &[Transmit]) -> &mqttd_codec::ConnAck {
    match t.first() {
        Some(Transmit::Packet(Packet::ConnAck(a))) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn publishes(t: &[Transmit]) -> Vec<&Publish> {
    t.iter()
        .filter_map(|t| match t {
            Transmit::Packet(Packet::Publish(p)) => Some(p),
            _ => None,
        })
        .collect()
}

fn payloads(t: &[Transmit]) -> Vec<String> {
    publishes(t)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn has_close(t: &[Transmit]) -> bool {
    t.iter().any(|t| matches!(t, Transmit::Close))
}

fn disconnect_reason(t: &[Transmit]) -> Option<ReasonCode> {
    t.iter().find_map(|t| match t {
        Transmit::Packet(Packet::Disconnect(d)) => Some(d.reason_code),
        _ => None,
    })
}

#[test]
fn connack_announces_limits_and_session_present() {
    let mut h = H::new();
    let t = h.connect(1, persistent(V5, "c"));
    let a = connack(&t);
    assert_eq!(a.reason_code, ReasonCode::Success);
    assert!(!a.session_present);
    assert_eq!(a.properties.receive_maximum, Some(1024));
    assert_eq!(a.properties.topic_alias_maximum, Some(64));
    h.send(1, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    h.drain();
    let t = h.connect(2, persistent(V5, "c"));
    assert!(connack(&t).session_present);
    // Clean start discards it.
    h.send(2, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    let t = h.connect(3, connect(V5, "c"));
    assert!(!connack(&t).session_present);
}

#[test]
fn assigned_client_identifier_and_v3_empty_id_rules() {
    let mut h = H::new();
    let t = h.connect(1, connect(V5, ""));
    let id = connack(&t)
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    assert!(id.as_str().starts_with("mqttd-"));
    let t = h.connect(2, connect(V4, ""));
    assert_eq!(connack(&t).reason_code, ReasonCode::Success);
    let t = h.connect(3, persistent(V4, ""));
    assert_eq!(
        connack(&t).reason_code,
        ReasonCode::ClientIdentifierNotValid
    );
    assert!(has_close(&t));
}

#[test]
fn anonymous_only_on_loopback() {
    let mut h = H::new();
    h.b.handle_connect(
        1,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        connect(V5, "far"),
        h.now,
    );
    let t = h.out(1);
    assert_eq!(connack(&t).reason_code, ReasonCode::NotAuthorized);
    assert!(has_close(&t));
    let mut h = H::with(Limits::default(), Anonymous::Always);
    h.b.handle_connect(
        1,
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        connect(V5, "far"),
        h.now,
    );
    assert_eq!(connack(&h.out(1)).reason_code, ReasonCode::Success);
}

#[test]
fn qos_flows_inbound_and_downgrade() {
    let mut h = H::new();
    h.connect(1, connect(V5, "sub"));
    h.connect(2, connect(V5, "pub"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    // QoS 1 in: PUBACK.
    h.send(2, publish("t", QoS::AtLeastOnce, 10, "one"));
    let t = h.out(2);
    assert!(
        matches!(&t[0], Transmit::Packet(Packet::PubAck(a)) if a.packet_id == pid(10) && a.reason_code == ReasonCode::Success)
    );
    // QoS 2 in: PUBREC, then PUBREL -> PUBCOMP. Delivered once even if retransmitted.
    h.send(2, publish("t", QoS::ExactlyOnce, 11, "two"));
    let t = h.out(2);
    assert!(matches!(&t[0], Transmit::Packet(Packet::PubRec(r)) if r.packet_id == pid(11)));
    h.send(2, publish("t", QoS::ExactlyOnce, 11, "two"));
    assert!(matches!(&h.out(2)[0], Transmit::Packet(Packet::PubRec(_))));
    h.send(2, Packet::PubRel(PubRel::new(pid(11))));
    assert!(
        matches!(&h.out(2)[0], Transmit::Packet(Packet::PubComp(c)) if c.reason_code == ReasonCode::Success)
    );
    // Unknown PUBREL: PUBCOMP with Packet Identifier not found.
    h.send(2, Packet::PubRel(PubRel::new(pid(99))));
    assert!(
        matches!(&h.out(2)[0], Transmit::Packet(Packet::PubComp(c)) if c.reason_code == ReasonCode::PacketIdentifierNotFound)
    );
    // The subscriber got both, downgraded to its QoS 1.
    let t = h.out(1);
    let p = publishes(&t);
    assert_eq!(payloads(&t), vec!["one", "two"]);
    assert!(
        p.iter()
            .all(|p| p.qos == QoS::AtLeastOnce && p.packet_id.is_some())
    );
    // No subscriber: 5.0 gets No matching subscribers.
    h.send(2, publish("nobody", QoS::AtLeastOnce, 12, "x"));
    assert!(
        matches!(&h.out(2)[0], Transmit::Packet(Packet::PubAck(a)) if a.reason_code == ReasonCode::NoMatchingSubscribers)
    );
}

#[test]
fn outgoing_qos2_flow() {
    let mut h = H::new();
    h.connect(1, connect(V5, "sub"));
    h.connect(2, connect(V5, "pub"));
    h.send(1, sub(1, "t", QoS::ExactlyOnce));
    h.out(1);
    h.send(2, publish("t", QoS::ExactlyOnce, 5, "x"));
    let t = h.out(1);
    let id = publishes(&t)[0].packet_id.expect("id");
    h.send(1, Packet::PubRec(PubRec::new(id)));
    assert!(matches!(&h.out(1)[0], Transmit::Packet(Packet::PubRel(r)) if r.packet_id == id));
    h.send(1, Packet::PubComp(PubComp::new(id)));
    assert!(h.out(1).is_empty());
    assert_eq!(
        h.b.sessions.get("sub").map(|s| s.state.outgoing.len()),
        Some(0)
    );
}

#[test]
fn inflight_window_from_receive_maximum() {
    let mut h = H::new();
    let mut c = connect(V5, "sub");
    c.properties.receive_maximum = Some(2);
    h.connect(1, c);
    h.connect(2, connect(V5, "pub"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    for i in 0..5 {
        h.send(2, publish("t", QoS::AtLeastOnce, 10 + i, &i.to_string()));
    }
    let t = h.out(1);
    assert_eq!(payloads(&t), vec!["0", "1"]);
    assert_eq!(h.b.queued("sub"), Some(3));
    let first = publishes(&t)[0].packet_id.expect("id");
    h.send(1, Packet::PubAck(PubAck::new(first)));
    assert_eq!(payloads(&h.out(1)), vec!["2"]);
}

#[test]
fn packet_ids_skip_ids_in_use() {
    let mut state = SessionState::new(Arc::from("c"), 0);
    state.last_packet_id = u16::MAX - 1;
    state.outgoing.insert(u16::MAX, Outgoing::Released);
    state.outgoing.insert(1, Outgoing::Released);
    assert_eq!(next_packet_id(&mut state), 2);
}

#[test]
fn persistent_session_queues_and_redelivers_with_dup() {
    let mut h = H::new();
    h.connect(1, persistent(V4, "sub"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    h.connect(2, connect(V4, "pub"));
    h.send(2, publish("t", QoS::AtLeastOnce, 1, "unacked"));
    assert_eq!(payloads(&h.out(1)), vec!["unacked"]);
    // Network loss before the PUBACK.
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    h.send(2, publish("t", QoS::AtLeastOnce, 2, "offline1"));
    h.send(2, publish("t", QoS::AtMostOnce, 0, "qos0-not-queued"));
    h.send(2, publish("t", QoS::AtLeastOnce, 3, "offline2"));
    assert_eq!(h.b.queued("sub"), Some(2));
    let t = h.connect(3, persistent(V4, "sub"));
    assert!(connack(&t).session_present);
    let p = publishes(&t);
    assert_eq!(payloads(&t), vec!["unacked", "offline1", "offline2"]);
    assert!(p[0].dup, "redelivery carries DUP");
    assert!(!p[1].dup && !p[2].dup);
    // The persistent session is in the store.
    h.b.flush_store();
    let stored = h.b.store().session("sub").expect("stored");
    assert_eq!(stored.subscriptions.len(), 1);
    assert_eq!(stored.outgoing.len(), 3);
}

#[test]
fn released_qos2_resends_pubrel_on_reconnect() {
    let mut h = H::new();
    h.connect(1, persistent(V5, "sub"));
    h.send(1, sub(1, "t", QoS::ExactlyOnce));
    h.out(1);
    h.connect(2, connect(V5, "pub"));
    h.send(2, publish("t", QoS::ExactlyOnce, 1, "x"));
    let id = publishes(&h.out(1))[0].packet_id.expect("id");
    h.send(1, Packet::PubRec(PubRec::new(id)));
    h.out(1);
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    let t = h.connect(3, persistent(V5, "sub"));
    assert!(
        t.iter()
            .any(|t| matches!(t, Transmit::Packet(Packet::PubRel(r)) if r.packet_id == id))
    );
    assert!(publishes(&t).is_empty());
}

#[test]
fn takeover_disconnects_old_connection_with_0x8e() {
    let mut h = H::new();
    h.connect(1, persistent(V5, "c"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    h.b.handle_connect(2, LOCAL, persistent(V5, "c"), h.now);
    let all = h.drain();
    let old: Vec<Transmit> = all
        .iter()
        .filter(|(c, _)| *c == 1)
        .map(|(_, t)| t.clone())
        .collect();
    let new: Vec<Transmit> = all
        .iter()
        .filter(|(c, _)| *c == 2)
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(disconnect_reason(&old), Some(ReasonCode::SessionTakenOver));
    assert!(has_close(&old));
    assert!(connack(&new).session_present);
    assert_eq!(h.b.connected(), 1);
    // Packets from the old connection are ignored; the subscription lives on.
    h.send(1, publish("t", QoS::AtMostOnce, 0, "late"));
    h.connect(3, connect(V5, "pub"));
    h.send(3, publish("t", QoS::AtMostOnce, 0, "hi"));
    assert_eq!(payloads(&h.out(2)), vec!["hi"]);
}

fn with_will(mut c: Connect, topic: &str, delay: Option<u32>) -> Connect {
    let mut will = Will {
        topic: Topic::new(topic).expect("topic"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    will.properties.will_delay_interval = delay;
    c.will = Some(will);
    c
}

fn watcher(h: &mut H, conn: ConnId) {
    h.connect(conn, connect(V5, &format!("watch{conn}")));
    h.send(conn, sub(1, "will/#", QoS::AtLeastOnce));
    h.out(conn);
}

#[test]
fn will_on_network_loss_not_on_normal_disconnect() {
    let mut h = H::new();
    watcher(&mut h, 9);
    h.connect(1, with_will(connect(V5, "a"), "will/a", None));
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
    h.connect(2, with_will(connect(V5, "b"), "will/b", None));
    h.send(2, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert!(payloads(&h.out(9)).is_empty());
    h.connect(3, with_will(connect(V5, "c"), "will/c", None));
    h.send(
        3,
        Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage)),
    );
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
    // A protocol error publishes the will too.
    h.connect(4, with_will(connect(V5, "d"), "will/d", None));
    h.b.handle_protocol_error(4, ReasonCode::MalformedPacket, h.now);
    assert_eq!(
        disconnect_reason(&h.out(4)),
        Some(ReasonCode::MalformedPacket)
    );
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
}

#[test]
fn will_delay_interval_and_cancellation() {
    let mut h = H::new();
    watcher(&mut h, 9);
    h.connect(1, with_will(persistent(V5, "a"), "will/a", Some(5)));
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    h.advance(Duration::from_secs(4));
    assert!(payloads(&h.out(9)).is_empty());
    h.advance(Duration::from_secs(2));
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
    // Reconnecting within the delay cancels it.
    h.connect(2, with_will(persistent(V5, "b"), "will/b", Some(5)));
    h.b.handle_closed(2, CloseReason::NetworkError, h.now);
    h.advance(Duration::from_secs(2));
    h.connect(3, persistent(V5, "b"));
    h.advance(Duration::from_secs(10));
    assert!(payloads(&h.out(9)).is_empty());
    // The delay is capped by the session expiry: a session that ends publishes at once.
    h.connect(4, with_will(connect(V5, "c"), "will/c", Some(100)));
    h.b.handle_closed(4, CloseReason::NetworkError, h.now);
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
}

#[test]
fn keep_alive_is_one_and_a_half_times() {
    let mut h = H::new();
    watcher(&mut h, 9);
    let mut c = with_will(connect(V5, "k"), "will/k", None);
    c.keep_alive = 10;
    h.connect(1, c);
    h.advance(Duration::from_secs(14));
    h.send(1, Packet::PingReq);
    assert!(matches!(&h.out(1)[0], Transmit::Packet(Packet::PingResp)));
    h.advance(Duration::from_secs(15));
    assert!(h.out(1).is_empty(), "exactly 1.5x is still fine");
    h.advance(Duration::from_secs(1));
    let t = h.out(1);
    assert_eq!(disconnect_reason(&t), Some(ReasonCode::KeepAliveTimeout));
    assert!(has_close(&t));
    assert_eq!(
        payloads(&h.out(9)),
        vec!["gone"],
        "will on keep-alive timeout"
    );
}

#[test]
fn server_keep_alive_caps_client_value() {
    let limits = Limits {
        max_keep_alive: 30,
        ..Limits::default()
    };
    let mut h = H::with(limits, Anonymous::Loopback);
    let mut c = connect(V5, "k");
    c.keep_alive = 0;
    let t = h.connect(1, c);
    assert_eq!(connack(&t).properties.server_keep_alive, Some(30));
    h.advance(Duration::from_secs(46));
    assert_eq!(
        disconnect_reason(&h.out(1)),
        Some(ReasonCode::KeepAliveTimeout)
    );
}

#[test]
fn session_expiry() {
    let mut h = H::new();
    let mut c = persistent(V5, "e");
    c.properties.session_expiry_interval = Some(10);
    h.connect(1, c);
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    h.advance(Duration::from_secs(9));
    assert!(h.b.has_session("e"));
    h.advance(Duration::from_secs(2));
    assert!(!h.b.has_session("e"));
    assert!(h.b.router.is_empty());
    // Expiry 0 (the 5.0 default): the session ends with the connection.
    h.connect(2, connect(V5, "z"));
    h.b.handle_closed(2, CloseReason::NetworkError, h.now);
    assert!(!h.b.has_session("z"));
    // DISCONNECT may change a non-zero expiry, but not from 0 to non-zero.
    h.connect(3, connect(V5, "y"));
    let mut d = Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(100);
    h.send(3, Packet::Disconnect(d));
    assert_eq!(
        disconnect_reason(&h.out(3)),
        Some(ReasonCode::ProtocolError)
    );
}

#[test]
fn retained_set_clear_and_retain_handling() {
    let mut h = H::new();
    h.connect(1, connect(V5, "pub"));
    let mut p = publish("r/a", QoS::AtLeastOnce, 1, "kept");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    h.send(1, p);
    h.out(1);
    h.connect(2, connect(V5, "s"));
    // Retain Handling 0: sent on every subscribe, with RETAIN set.
    h.send(2, sub(1, "r/+", QoS::AtLeastOnce));
    let t = h.out(2);
    assert!(
        matches!(&t[0], Transmit::Packet(Packet::SubAck(_))),
        "SUBACK first"
    );
    let p = publishes(&t);
    assert_eq!(p.len(), 1);
    assert!(p[0].retain);
    // Retain Handling 1: only if the subscription is new.
    let rh1 = SubscriptionOptions {
        retain_handling: RetainHandling::SendAtSubscribeIfNew,
        ..SubscriptionOptions::qos(QoS::AtLeastOnce)
    };
    h.send(2, subscribe(2, "r/+", rh1));
    assert!(publishes(&h.out(2)).is_empty());
    h.send(2, subscribe(3, "r/#", rh1));
    assert_eq!(publishes(&h.out(2)).len(), 1);
    // Retain Handling 2: never.
    h.connect(3, connect(V5, "s3"));
    let rh2 = SubscriptionOptions {
        retain_handling: RetainHandling::DoNotSend,
        ..SubscriptionOptions::qos(QoS::AtLeastOnce)
    };
    h.send(3, subscribe(1, "r/a", rh2));
    assert!(publishes(&h.out(3)).is_empty());
    // An empty retained payload clears it.
    let mut p = publish("r/a", QoS::AtMostOnce, 0, "");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    h.send(1, p);
    h.drain();
    h.connect(4, connect(V5, "s4"));
    h.send(4, sub(1, "r/#", QoS::AtLeastOnce));
    assert!(publishes(&h.out(4)).is_empty());
    assert_eq!(h.b.store().retained_count(), 0);
}

#[test]
fn retain_as_published_and_live_retain_flag() {
    let mut h = H::new();
    h.connect(1, connect(V5, "plain"));
    h.send(1, sub(1, "t", QoS::AtMostOnce));
    h.connect(2, connect(V5, "rap"));
    let rap = SubscriptionOptions {
        retain_as_published: true,
        ..SubscriptionOptions::qos(QoS::AtMostOnce)
    };
    h.send(2, subscribe(1, "t", rap));
    h.drain();
    h.connect(3, connect(V5, "pub"));
    let mut p = publish("t", QoS::AtMostOnce, 0, "x");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    h.send(3, p);
    assert!(
        !publishes(&h.out(1))[0].retain,
        "live message: RETAIN cleared by default"
    );
    assert!(
        publishes(&h.out(2))[0].retain,
        "Retain As Published keeps it"
    );
}

#[test]
fn no_local() {
    let mut h = H::new();
    h.connect(1, connect(V5, "me"));
    let nl = SubscriptionOptions {
        no_local: true,
        ..SubscriptionOptions::qos(QoS::AtMostOnce)
    };
    h.send(1, subscribe(1, "t", nl));
    h.connect(2, connect(V5, "other"));
    h.out(1);
    h.send(1, publish("t", QoS::AtMostOnce, 0, "mine"));
    h.send(2, publish("t", QoS::AtMostOnce, 0, "theirs"));
    assert_eq!(payloads(&h.out(1)), vec!["theirs"]);
}

#[test]
fn overlapping_subscriptions_one_copy_max_qos_all_identifiers() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    let mut s1 = sub(1, "a/+", QoS::AtMostOnce);
    if let Packet::Subscribe(s) = &mut s1 {
        s.properties.subscription_identifier = Some(7);
    }
    let mut s2 = sub(2, "a/#", QoS::AtLeastOnce);
    if let Packet::Subscribe(s) = &mut s2 {
        s.properties.subscription_identifier = Some(9);
    }
    h.send(1, s1);
    h.send(1, s2);
    h.out(1);
    h.connect(2, connect(V5, "p"));
    h.send(2, publish("a/b", QoS::ExactlyOnce, 1, "x"));
    let t = h.out(1);
    let p = publishes(&t);
    assert_eq!(p.len(), 1, "one copy per client");
    assert_eq!(p[0].qos, QoS::AtLeastOnce, "highest granted QoS");
    let mut ids = p[0].properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
}

#[test]
fn unsubscribe_reasons() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    h.send(1, sub(1, "t", QoS::AtMostOnce));
    h.out(1);
    let u = |id: u16| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(id),
            filters: vec![TopicFilter::new("t").expect("filter")],
            properties: Default::default(),
        })
    };
    h.send(1, u(2));
    assert!(
        matches!(&h.out(1)[0], Transmit::Packet(Packet::UnsubAck(a)) if a.reason_codes == vec![ReasonCode::Success])
    );
    h.send(1, u(3));
    assert!(
        matches!(&h.out(1)[0], Transmit::Packet(Packet::UnsubAck(a)) if a.reason_codes == vec![ReasonCode::NoSubscriptionExisted])
    );
}

#[test]
fn shared_subscription_round_robin_and_no_retained() {
    let mut h = H::new();
    for c in 1..=3 {
        h.connect(c, connect(if c == 3 { V4 } else { V5 }, &format!("s{c}")));
        h.send(c, sub(1, "$share/g/jobs/+", QoS::AtLeastOnce));
        h.out(c);
    }
    h.connect(9, connect(V5, "pub"));
    for i in 0..30 {
        h.send(9, publish("jobs/x", QoS::AtLeastOnce, 1 + i, "j"));
    }
    let counts: Vec<usize> = (1..=3).map(|c| publishes(&h.out(c)).len()).collect();
    assert_eq!(counts, vec![10, 10, 10]);
    // A disconnected member is skipped while others are connected.
    h.b.handle_closed(2, CloseReason::NetworkError, h.now);
    for i in 0..10 {
        h.send(9, publish("jobs/x", QoS::AtLeastOnce, 100 + i, "j"));
    }
    assert_eq!(publishes(&h.out(1)).len() + publishes(&h.out(3)).len(), 10);
}

#[test]
fn topic_alias_inbound() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    h.send(1, sub(1, "long/topic/name", QoS::AtMostOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    let mut p = Publish::new(
        Topic::new("long/topic/name").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"1"),
    );
    p.properties.topic_alias = Some(3);
    h.send(2, Packet::Publish(p));
    let mut p = Publish::new(
        Topic::empty(),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"2"),
    );
    p.properties.topic_alias = Some(3);
    h.send(2, Packet::Publish(p));
    let t = h.out(1);
    assert_eq!(payloads(&t), vec!["1", "2"]);
    assert!(
        publishes(&t)
            .iter()
            .all(|p| p.topic.as_str() == "long/topic/name")
    );
    // Alias above the maximum: DISCONNECT 0x94.
    let mut p = Publish::new(
        Topic::new("x").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::new(),
    );
    p.properties.topic_alias = Some(65);
    h.send(2, Packet::Publish(p));
    assert_eq!(
        disconnect_reason(&h.out(2)),
        Some(ReasonCode::TopicAliasInvalid)
    );
    // Unknown alias with an empty topic: protocol error.
    h.connect(3, connect(V5, "p3"));
    let mut p = Publish::new(Topic::empty(), QoS::AtMostOnce, None, Bytes::new());
    p.properties.topic_alias = Some(1);
    h.send(3, Packet::Publish(p));
    assert_eq!(
        disconnect_reason(&h.out(3)),
        Some(ReasonCode::ProtocolError)
    );
}

#[test]
fn topic_alias_outbound() {
    let mut h = H::new();
    let mut c = connect(V5, "s");
    c.properties.topic_alias_maximum = Some(1);
    h.connect(1, c);
    h.send(1, sub(1, "#", QoS::AtMostOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    for topic in ["a/b", "a/b", "c/d"] {
        h.send(2, publish(topic, QoS::AtMostOnce, 0, topic));
    }
    let t = h.out(1);
    let p = publishes(&t);
    assert_eq!(
        (p[0].topic.as_str(), p[0].properties.topic_alias),
        ("a/b", Some(1))
    );
    assert_eq!(
        (p[1].topic.as_str(), p[1].properties.topic_alias),
        ("", Some(1))
    );
    assert_eq!(
        (p[2].topic.as_str(), p[2].properties.topic_alias),
        ("c/d", None),
        "aliases used up"
    );
}

#[test]
fn maximum_packet_size_outbound_drops() {
    let mut h = H::new();
    let mut c = connect(V5, "small");
    c.properties.maximum_packet_size = Some(64);
    h.connect(1, c);
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    h.send(2, publish("t", QoS::AtLeastOnce, 1, &"x".repeat(100)));
    h.send(2, publish("t", QoS::AtLeastOnce, 2, "small"));
    assert_eq!(payloads(&h.out(1)), vec!["small"]);
    assert_eq!(
        h.metrics
            .messages_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn message_expiry_forwards_remaining_time_and_drops_expired() {
    let mut h = H::new();
    h.connect(1, persistent(V5, "s"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.out(1);
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    h.connect(2, connect(V5, "p"));
    let mut p = Publish::new(
        Topic::new("t").expect("t"),
        QoS::AtLeastOnce,
        Some(pid(1)),
        Bytes::from_static(b"short"),
    );
    p.properties.message_expiry_interval = Some(5);
    h.send(2, Packet::Publish(p));
    let mut p = Publish::new(
        Topic::new("t").expect("t"),
        QoS::AtLeastOnce,
        Some(pid(2)),
        Bytes::from_static(b"long"),
    );
    p.properties.message_expiry_interval = Some(100);
    h.send(2, Packet::Publish(p));
    h.advance(Duration::from_secs(10));
    let t = h.connect(3, persistent(V5, "s"));
    let p = publishes(&t);
    assert_eq!(payloads(&t), vec!["long"]);
    assert_eq!(p[0].properties.message_expiry_interval, Some(90));
}

#[test]
fn properties_are_forwarded() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    h.send(1, sub(1, "t", QoS::AtMostOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    let mut p = Publish::new(
        Topic::new("t").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"{}"),
    );
    p.properties.content_type = Some(mstr("application/json"));
    p.properties.response_topic = Some(Topic::new("reply/here").expect("t"));
    p.properties.correlation_data = Some(Bytes::from_static(b"corr"));
    p.properties.payload_format_indicator = Some(mqttd_codec::PayloadFormat::Utf8);
    p.properties.user_properties =
        vec![mqttd_codec::UserProperty::new(mstr("k"), mstr("v"))].into();
    let sent = p.properties.clone();
    h.send(2, Packet::Publish(p));
    let t = h.out(1);
    assert_eq!(publishes(&t)[0].properties, sent);
}

#[test]
fn overflow_policy_drops_qos0_first_and_counts() {
    let d = |qos: QoS, s: &'static str| Delivery {
        message: Arc::new(crate::message::Message {
            topic: Topic::new("t").expect("t"),
            payload: Bytes::from_static(s.as_bytes()),
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
    };
    let mut q = std::collections::VecDeque::new();
    assert_eq!(enqueue(&mut q, d(QoS::AtLeastOnce, "a"), 3), None);
    assert_eq!(enqueue(&mut q, d(QoS::AtMostOnce, "b"), 3), None);
    assert_eq!(enqueue(&mut q, d(QoS::AtLeastOnce, "c"), 3), None);
    // Full: the QoS 0 one goes.
    assert_eq!(
        enqueue(&mut q, d(QoS::AtLeastOnce, "d"), 3),
        Some(QoS::AtMostOnce)
    );
    // Full of QoS 1: the new message goes.
    assert_eq!(
        enqueue(&mut q, d(QoS::AtLeastOnce, "e"), 3),
        Some(QoS::AtLeastOnce)
    );
    let left: Vec<&[u8]> = q.iter().map(|d| &d.message.payload[..]).collect();
    assert_eq!(left, vec![b"a", b"c", b"d"]);
}

#[test]
fn slow_subscriber_never_blocks_and_overflow_is_counted() {
    let limits = Limits {
        connection_buffer: 16,
        max_queued_messages: 10,
        ..Limits::default()
    };
    let mut h = H::with(limits, Anonymous::Loopback);
    h.connect(1, connect(V5, "slow"));
    h.send(1, sub(1, "t", QoS::AtMostOnce));
    h.connect(2, connect(V5, "fast"));
    h.send(2, sub(1, "t", QoS::AtMostOnce));
    h.drain();
    h.connect(3, connect(V5, "p"));
    for i in 0..100 {
        h.send(3, publish("t", QoS::AtMostOnce, 0, &i.to_string()));
        // The fast one writes everything; the slow one never reports a write.
        let all = h.drain();
        let n = all
            .iter()
            .filter(|(c, t)| *c == 2 && matches!(t, Transmit::Packet(Packet::Publish(_))))
            .count();
        assert_eq!(n, 1, "fast subscriber gets message {i}");
        h.b.handle_written(2, n, h.now);
    }
    // Slow: 16 handed to its connection, 10 queued, 74 dropped and counted.
    assert_eq!(h.b.queued("slow"), Some(10));
    let dropped = h
        .metrics
        .messages_dropped_qos0
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 74);
    // When it catches up, it gets the newest queued messages.
    h.b.handle_written(1, 16, h.now);
    let t = h.out(1);
    assert_eq!(payloads(&t).first().map(String::as_str), Some("90"));
}

#[test]
fn second_connect_and_server_packets_are_protocol_errors() {
    let mut h = H::new();
    h.connect(1, connect(V5, "c"));
    h.send(1, Packet::Connect(Box::new(connect(V5, "c"))));
    let t = h.out(1);
    assert_eq!(disconnect_reason(&t), Some(ReasonCode::ProtocolError));
    assert!(has_close(&t));
    h.connect(2, connect(V4, "d"));
    h.send(2, Packet::PingResp);
    let t = h.out(2);
    assert_eq!(
        disconnect_reason(&t),
        None,
        "3.1.1 has no DISCONNECT from the server"
    );
    assert!(has_close(&t));
}

#[test]
fn invalid_filter_gets_failure_reason() {
    let limits = Limits {
        max_topic_levels: 3,
        ..Limits::default()
    };
    let mut h = H::with(limits, Anonymous::Loopback);
    h.connect(1, connect(V5, "c"));
    h.send(1, sub(1, "a/b/c/d", QoS::AtMostOnce));
    assert!(
        matches!(&h.out(1)[0], Transmit::Packet(Packet::SubAck(a)) if a.reason_codes == vec![ReasonCode::TopicFilterInvalid])
    );
    h.send(1, publish("a/b/c/d", QoS::AtMostOnce, 0, "x"));
    assert_eq!(
        disconnect_reason(&h.out(1)),
        Some(ReasonCode::TopicNameInvalid)
    );
}

#[test]
fn clients_cannot_publish_to_sys() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    h.send(1, sub(1, "$SYS/#", QoS::AtMostOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    h.send(
        2,
        publish("$SYS/broker/uptime", QoS::AtLeastOnce, 1, "fake"),
    );
    assert!(
        matches!(&h.out(2)[0], Transmit::Packet(Packet::PubAck(a)) if a.reason_code == ReasonCode::NotAuthorized)
    );
    assert!(h.out(1).is_empty());
    h.b.publish_sys(vec![("$SYS/broker/uptime", "1 seconds".into())], h.now);
    assert_eq!(payloads(&h.out(1)), vec!["1 seconds"]);
}

#[test]
fn shutdown_sends_0x8b_to_v5_and_closes_all() {
    let mut h = H::new();
    h.connect(1, with_will(connect(V5, "a"), "will/a", None));
    h.connect(2, connect(V4, "b"));
    watcher(&mut h, 9);
    h.b.shutdown(h.now);
    let all = h.drain();
    let to = |c: ConnId| {
        all.iter()
            .filter(|(x, _)| *x == c)
            .map(|(_, t)| t.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        disconnect_reason(&to(1)),
        Some(ReasonCode::ServerShuttingDown)
    );
    assert!(has_close(&to(1)));
    assert_eq!(disconnect_reason(&to(2)), None);
    assert!(has_close(&to(2)));
    assert!(payloads(&to(9)).is_empty(), "no will on server shutdown");
    assert_eq!(h.b.connected(), 0);
}

#[test]
fn sessions_and_retained_are_restored_from_the_store() {
    let mut h = H::new();
    h.connect(1, persistent(V5, "s"));
    h.send(1, sub(1, "t", QoS::AtLeastOnce));
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    h.connect(2, connect(V5, "p"));
    let mut p = publish("t", QoS::AtLeastOnce, 1, "queued");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    h.send(2, p);
    h.b.flush_store();
    let mut store = MemoryStore::new();
    for s in h.b.store.load_sessions().expect("sessions") {
        store.save_session(&s).expect("save");
    }
    for m in h.b.store.load_retained().expect("retained") {
        store.save_retained(&m).expect("save");
    }
    // A new broker on the same store: the session, its subscription and queue are back.
    let metrics = Arc::new(Metrics::new());
    let mut b = Broker::new(
        BrokerOptions {
            limits: Limits::default(),
            allow_anonymous: Anonymous::Loopback,
        },
        store,
        metrics,
        h.now,
    )
    .expect("broker");
    b.handle_connect(1, LOCAL, persistent(V5, "s"), h.now);
    let t: Vec<Transmit> = std::iter::from_fn(|| b.poll_transmit())
        .map(|(_, t)| t)
        .collect();
    assert!(connack(&t).session_present);
    assert_eq!(payloads(&t), vec!["queued"]);
    assert_eq!(b.retained.len(), 1);
}

#[test]
fn payload_format_invalid_is_refused() {
    let mut h = H::new();
    h.connect(1, connect(V5, "s"));
    h.send(1, sub(1, "t", QoS::AtMostOnce));
    h.out(1);
    h.connect(2, connect(V5, "p"));
    let mut p = Publish::new(
        Topic::new("t").expect("t"),
        QoS::AtLeastOnce,
        Some(pid(1)),
        Bytes::from_static(b"\xff\xfe"),
    );
    p.properties.payload_format_indicator = Some(mqttd_codec::PayloadFormat::Utf8);
    h.send(2, Packet::Publish(p));
    assert!(
        matches!(&h.out(2)[0], Transmit::Packet(Packet::PubAck(a)) if a.reason_code == ReasonCode::PayloadFormatInvalid)
    );
    assert!(h.out(1).is_empty());
}

#[test]
fn delayed_will_published_at_session_end_keeps_its_expiry() {
    let mut h = H::new();
    watcher(&mut h, 9);
    let mut c = with_will(persistent(V5, "a"), "will/a", Some(30));
    c.properties.session_expiry_interval = Some(10);
    if let Some(w) = c.will.as_mut() {
        w.properties.message_expiry_interval = Some(100);
    }
    h.connect(1, c);
    h.b.handle_closed(1, CloseReason::NetworkError, h.now);
    // The delay (30 s) is capped by the session expiry (10 s).
    h.advance(Duration::from_secs(9));
    assert!(payloads(&h.out(9)).is_empty());
    h.advance(Duration::from_secs(2));
    let t = h.out(9);
    assert_eq!(payloads(&t), vec!["gone"]);
    assert_eq!(
        publishes(&t)[0].properties.message_expiry_interval,
        Some(100)
    );
    // A clean start of the same client id ends a session with a pending will: published now.
    h.connect(2, with_will(persistent(V5, "b"), "will/b", Some(30)));
    h.b.handle_closed(2, CloseReason::NetworkError, h.now);
    h.connect(3, connect(V5, "b"));
    assert_eq!(payloads(&h.out(9)), vec!["gone"]);
}

#[test]
fn expired_retained_messages_are_removed_by_their_timer() {
    let mut h = H::new();
    h.connect(1, connect(V5, "p"));
    let mut p = Publish::new(
        Topic::new("r/x").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"soon gone"),
    );
    p.retain = true;
    p.properties.message_expiry_interval = Some(5);
    h.send(1, Packet::Publish(p));
    assert_eq!(h.b.store().retained_count(), 1);
    h.advance(Duration::from_secs(4));
    assert_eq!(h.b.store().retained_count(), 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.b.store().retained_count(), 0);
    assert_eq!(h.b.retained.len(), 0);
}

#[test]
fn keep_alive_timer_of_a_taken_over_connection_is_stale() {
    let mut h = H::new();
    let mut c = persistent(V5, "k");
    c.keep_alive = 2;
    h.connect(1, c);
    // Taken over by a connection without keep alive: the old timer must not close it.
    h.connect(2, persistent(V5, "k"));
    h.drain();
    h.advance(Duration::from_secs(10));
    assert!(h.out(2).is_empty());
    assert_eq!(h.b.connected(), 1);
}

#[test]
fn volatile_store_takes_no_snapshots() {
    let metrics = Arc::new(Metrics::new());
    let now = Instant::now();
    let opts = BrokerOptions {
        limits: Limits::default(),
        allow_anonymous: Anonymous::Loopback,
    };
    let mut b = Broker::new(opts, MemoryStore::volatile(), metrics, now).expect("broker");
    b.handle_connect(1, LOCAL, persistent(V5, "s"), now);
    b.handle_packet(1, sub(1, "t", QoS::AtLeastOnce), now);
    let mut p = Publish::new(
        Topic::new("t").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"r"),
    );
    p.retain = true;
    b.handle_packet(1, Packet::Publish(p), now);
    b.flush_store();
    assert_eq!(b.store().session_count(), 0);
    assert_eq!(b.store().retained_count(), 0);
    // The broker itself still has both.
    assert!(b.has_session("s"));
    assert_eq!(b.retained.len(), 1);
}

#[test]
fn enhanced_authentication_is_refused() {
    let mut h = H::new();
    let mut c = connect(V5, "auth");
    c.properties.authentication_method = Some(mstr("SCRAM-SHA-1"));
    let t = h.connect(1, c);
    assert_eq!(connack(&t).reason_code, ReasonCode::BadAuthenticationMethod);
    assert!(has_close(&t));
}

/// Sync durability (`commit_held`): a store whose commits complete when the test says so, and
/// that records the payload of every message it was given to keep.
struct Recorder {
    inner: MemoryStore,
    changed: bool,
    started: Arc<std::sync::Mutex<std::collections::VecDeque<crate::store::Completer>>>,
    kept: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Store for Recorder {
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, crate::store::StoreError> {
        self.inner.load_sessions()
    }
    fn save_session(&mut self, state: &SessionState) -> Result<(), crate::store::StoreError> {
        self.changed = true;
        let queued = state.queue.iter();
        let in_flight = state.outgoing.values().filter_map(|o| match o {
            Outgoing::Publish(d) => Some(d),
            Outgoing::Released => None,
        });
        let mut kept = self.kept.lock().expect("lock");
        for d in queued.chain(in_flight) {
            kept.push(String::from_utf8_lossy(&d.message.payload).into_owned());
        }
        self.inner.save_session(state)
    }
    fn remove_session(&mut self, client_id: &str) -> Result<(), crate::store::StoreError> {
        self.changed = true;
        self.inner.remove_session(client_id)
    }
    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, crate::store::StoreError> {
        self.inner.load_retained()
    }
    fn save_retained(&mut self, m: &SharedMessage) -> Result<(), crate::store::StoreError> {
        self.changed = true;
        self.inner.save_retained(m)
    }
    fn remove_retained(&mut self, topic: &str) -> Result<(), crate::store::StoreError> {
        self.changed = true;
        self.inner.remove_retained(topic)
    }
    fn start_commit(&mut self) -> crate::store::CommitTicket {
        self.changed = false;
        let (ticket, done) = crate::store::CommitTicket::pending();
        self.started.lock().expect("lock").push_back(done);
        ticket
    }
    fn has_pending(&self) -> bool {
        self.changed
    }
}

/// A broker driven as the server drives it with `durability = "sync"`.
struct SyncH {
    b: Broker<Recorder>,
    now: Instant,
    commit: Option<InFlightCommit>,
    closed: Vec<ConnId>,
    started: Arc<std::sync::Mutex<std::collections::VecDeque<crate::store::Completer>>>,
    kept: Arc<std::sync::Mutex<Vec<String>>>,
}

impl SyncH {
    fn new() -> SyncH {
        let started = Arc::new(std::sync::Mutex::new(Default::default()));
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = Recorder {
            inner: MemoryStore::new(),
            changed: false,
            started: started.clone(),
            kept: kept.clone(),
        };
        let now = Instant::now();
        let opts = BrokerOptions {
            limits: Limits::default(),
            allow_anonymous: Anonymous::Loopback,
        };
        let b = Broker::new(opts, store, Arc::new(Metrics::new()), now).expect("broker");
        SyncH {
            b,
            now,
            commit: None,
            closed: Vec::new(),
            started,
            kept,
        }
    }

    /// One batch of events, then what the driver does after it; the packets handed over.
    fn batch(
        &mut self,
        events: impl FnOnce(&mut Broker<Recorder>, Instant),
    ) -> Vec<(ConnId, Transmit)> {
        events(&mut self.b, self.now);
        self.b.commit_held(&mut self.commit, &mut self.closed);
        self.closed.clear();
        std::iter::from_fn(|| self.b.poll_transmit()).collect()
    }

    /// Commits being written.
    fn writing(&self) -> usize {
        self.started.lock().expect("lock").len()
    }

    /// The oldest commit completes (`ok` or failed); the packets handed over.
    fn complete(&mut self, ok: bool) -> Vec<(ConnId, Transmit)> {
        let done = self
            .started
            .lock()
            .expect("lock")
            .pop_front()
            .expect("a commit is being written");
        done.complete(if ok {
            Ok(())
        } else {
            Err(crate::store::StoreError("I/O error".into()))
        });
        let mut c = self.commit.take().expect("a commit in flight");
        let r = c.wait();
        self.b.complete_commit(&mut c, r, true, &mut self.closed);
        if !c.is_empty() {
            self.commit = Some(c);
        }
        std::iter::from_fn(|| self.b.poll_transmit()).collect()
    }

    /// Completes every commit (and those their completions start).
    fn settle(&mut self) -> Vec<(ConnId, Transmit)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            if self.commit.is_none() {
                break;
            }
            out.extend(self.complete(true));
        }
        assert!(self.commit.is_none(), "commits keep starting");
        out
    }

    fn was_kept(&self, payload: &str) -> bool {
        self.kept.lock().expect("lock").iter().any(|p| p == payload)
    }
}

fn pubacks(out: &[(ConnId, Transmit)], conn: ConnId) -> Vec<u16> {
    out.iter()
        .filter_map(|(c, t)| match t {
            Transmit::Packet(Packet::PubAck(a)) if *c == conn => Some(a.packet_id.get()),
            _ => None,
        })
        .collect()
}

fn delivered(out: &[(ConnId, Transmit)], conn: ConnId) -> Vec<(String, QoS, Option<u16>)> {
    out.iter()
        .filter_map(|(c, t)| match t {
            Transmit::Packet(Packet::Publish(p)) if *c == conn => Some((
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.qos,
                p.packet_id.map(NonZeroU16::get),
            )),
            _ => None,
        })
        .collect()
}

/// Subscriber "s" (conn 1, persistent, QoS `qos` on "t") and publisher "p" (conn 2,
/// persistent), both acknowledged.
fn sync_pair(qos: QoS) -> SyncH {
    let mut h = SyncH::new();
    h.batch(|b, now| {
        b.handle_connect(1, LOCAL, persistent(V5, "s"), now);
        b.handle_packet(1, sub(1, "t", qos), now);
        b.handle_connect(2, LOCAL, persistent(V5, "p"), now);
    });
    let out = h.settle();
    assert!(
        out.iter()
            .any(|(c, t)| *c == 1 && matches!(t, Transmit::Packet(Packet::SubAck(_))))
    );
    h
}

#[test]
fn sync_qos1_delivery_leaves_before_the_commit_and_the_puback_waits_for_it() {
    let mut h = sync_pair(QoS::AtLeastOnce);
    let out = h.batch(|b, now| b.handle_packet(2, publish("t", QoS::AtLeastOnce, 1, "m1"), now));
    assert_eq!(h.writing(), 1, "the message is being committed");
    assert_eq!(
        delivered(&out, 1),
        vec![("m1".to_owned(), QoS::AtLeastOnce, Some(1))],
        "delivered before the commit completed"
    );
    assert!(
        pubacks(&out, 2).is_empty(),
        "not acknowledged before the commit"
    );
    // Events that do not acknowledge it do not free it.
    let out = h.batch(|b, now| b.handle_packet(2, Packet::PingReq, now));
    assert!(pubacks(&out, 2).is_empty());
    assert!(
        h.was_kept("m1"),
        "captured while the subscriber had not acknowledged it"
    );
    let out = h.complete(true);
    assert_eq!(pubacks(&out, 2), vec![1], "acknowledged once durable");
}

#[test]
fn sync_puback_waits_for_every_persistent_session_or_the_commit_and_keeps_its_order() {
    let mut h = sync_pair(QoS::AtLeastOnce);
    // A second persistent subscriber, offline: the message is queued for it.
    h.batch(|b, now| {
        b.handle_connect(3, LOCAL, persistent(V5, "off"), now);
        b.handle_packet(3, sub(1, "q", QoS::AtLeastOnce), now);
        b.handle_packet(3, sub(2, "t", QoS::AtLeastOnce), now);
        b.handle_closed(3, CloseReason::NetworkError, now);
    });
    h.settle();
    // Something else is being committed meanwhile, so nothing below starts a commit.
    h.batch(|b, now| b.handle_connect(4, LOCAL, persistent(V5, "x"), now));
    assert_eq!(h.writing(), 1);
    let out = h.batch(|b, now| {
        b.handle_packet(2, publish("t", QoS::AtLeastOnce, 1, "both"), now);
        b.handle_packet(2, publish("t", QoS::AtLeastOnce, 2, "also"), now);
    });
    let ids: Vec<u16> = delivered(&out, 1).iter().filter_map(|d| d.2).collect();
    assert_eq!(ids.len(), 2);
    // The online subscriber acknowledges both; the offline one still holds them.
    let out = h.batch(|b, now| {
        for id in &ids {
            b.handle_packet(1, Packet::PubAck(PubAck::new(pid(*id))), now);
        }
    });
    assert!(
        pubacks(&out, 2).is_empty(),
        "an offline session still holds them"
    );
    // The commit in flight did not capture them; the next one does, and then they go, in order.
    let out = h.complete(true);
    assert!(pubacks(&out, 2).is_empty());
    assert_eq!(h.writing(), 1);
    let out = h.complete(true);
    assert_eq!(pubacks(&out, 2), vec![1, 2]);
    assert!(h.was_kept("both") && h.was_kept("also"));
    assert_eq!(h.b.queued("off"), Some(2));
}

#[test]
fn sync_a_message_acknowledged_before_its_commit_is_never_written_and_its_puback_goes_at_once() {
    let mut h = sync_pair(QoS::AtLeastOnce);
    // A commit is being written (another client's session), so the publish waits for the next.
    h.batch(|b, now| b.handle_connect(4, LOCAL, persistent(V5, "x"), now));
    assert_eq!(h.writing(), 1);
    let out = h.batch(|b, now| b.handle_packet(2, publish("t", QoS::AtLeastOnce, 7, "gone"), now));
    assert!(pubacks(&out, 2).is_empty());
    let d = delivered(&out, 1);
    assert_eq!(d.len(), 1);
    let id = d[0].2.expect("QoS 1 packet id");
    // The subscriber acknowledges it: the PUBACK goes at once, before any commit completed.
    let out = h.batch(|b, now| b.handle_packet(1, Packet::PubAck(PubAck::new(pid(id))), now));
    assert_eq!(
        pubacks(&out, 2),
        vec![7],
        "fully delivered: no commit to wait for"
    );
    assert_eq!(h.writing(), 1, "still the first commit");
    h.settle();
    assert!(
        !h.was_kept("gone"),
        "the message was never handed to the store"
    );
    // A message no persistent session holds needs no commit at all.
    let out =
        h.batch(|b, now| b.handle_packet(2, publish("nobody", QoS::AtLeastOnce, 8, "x"), now));
    assert_eq!(pubacks(&out, 2), vec![8]);
    assert!(h.commit.is_none());
}

#[test]
fn sync_qos2_and_retained_still_wait_for_the_commit() {
    let mut h = sync_pair(QoS::ExactlyOnce);
    let out = h.batch(|b, now| b.handle_packet(2, publish("t", QoS::ExactlyOnce, 1, "once"), now));
    assert_eq!(h.writing(), 1);
    assert!(
        out.is_empty(),
        "neither the PUBREC nor the QoS 2 delivery before the commit: {out:?}"
    );
    let out = h.complete(true);
    assert!(
        out.iter()
            .any(|(c, t)| *c == 2 && matches!(t, Transmit::Packet(Packet::PubRec(_))))
    );
    assert_eq!(
        delivered(&out, 1),
        vec![("once".to_owned(), QoS::ExactlyOnce, Some(1))]
    );
    // A retained QoS 1 message waits for its commit even once every session acknowledged it.
    let mut p = publish("t", QoS::AtLeastOnce, 2, "kept");
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    let out = h.batch(|b, now| b.handle_packet(2, p, now));
    let id = delivered(&out, 1)[0].2.expect("id");
    let out = h.batch(|b, now| {
        b.handle_packet(1, Packet::PubAck(PubAck::new(pid(id))), now);
    });
    assert!(pubacks(&out, 2).is_empty());
    let out = h.settle();
    assert_eq!(pubacks(&out, 2), vec![2]);
}

fn suback_codes(t: &[Transmit]) -> Vec<ReasonCode> {
    t.iter()
        .find_map(|t| match t {
            Transmit::Packet(Packet::SubAck(s)) => Some(s.reason_codes.clone()),
            _ => None,
        })
        .expect("a SUBACK")
}

fn puback_code(t: &[Transmit]) -> ReasonCode {
    t.iter()
        .find_map(|t| match t {
            Transmit::Packet(Packet::PubAck(a)) => Some(a.reason_code),
            _ => None,
        })
        .expect("a PUBACK")
}

fn user(mut c: Connect, name: &str) -> Connect {
    c.username = Some(mstr(name));
    c
}

const ACL: &str = "topic read public/#\n\
                   user alice\n\
                   topic fleet/#\n\
                   topic deny fleet/secret/#\n\
                   user bob\n\
                   topic write fleet/bob\n\
                   pattern readwrite devices/%c/#\n";

/// A retained QoS 0 PUBLISH.
fn retained(topic: &str, payload: &str) -> Packet {
    let mut p = publish(topic, QoS::AtMostOnce, 0, payload);
    if let Packet::Publish(x) = &mut p {
        x.retain = true;
    }
    p
}

fn with_acl() -> H {
    let mut h = H::new();
    h.b.set_acl(Some(
        crate::acl::Acl::parse(ACL, std::path::Path::new("acl")).expect("acl"),
    ));
    h
}

#[test]
fn acl_refuses_subscriptions_and_publishes_and_filters_deliveries() {
    let mut h = with_acl();
    h.connect(1, user(connect(V5, "a1"), "alice"));
    h.send(1, sub(1, "fleet/#", QoS::AtLeastOnce));
    h.send(1, sub(2, "fleet/secret/#", QoS::AtLeastOnce));
    h.send(1, sub(3, "public/#", QoS::AtLeastOnce));
    let t = h.out(1);
    let codes: Vec<ReasonCode> = t
        .iter()
        .filter_map(|t| match t {
            Transmit::Packet(Packet::SubAck(s)) => Some(s.reason_codes[0]),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            ReasonCode::GrantedQoS1,
            ReasonCode::NotAuthorized,
            ReasonCode::NotAuthorized
        ],
        "alice may read fleet/# but not its secret part, nor the anonymous public/#"
    );
    // bob may write fleet/bob only; 5.0 hears Not Authorized for the rest, 3.1.1 is acked.
    h.connect(2, user(connect(V5, "b1"), "bob"));
    h.send(2, publish("fleet/bob", QoS::AtLeastOnce, 1, "ok"));
    assert_eq!(puback_code(&h.out(2)), ReasonCode::Success);
    assert_eq!(payloads(&h.out(1)), vec!["ok"]);
    h.send(2, publish("fleet/alice", QoS::AtLeastOnce, 2, "no"));
    assert_eq!(puback_code(&h.out(2)), ReasonCode::NotAuthorized);
    h.connect(3, user(connect(V4, "b2"), "bob"));
    h.send(3, publish("fleet/other", QoS::AtLeastOnce, 1, "no"));
    assert!(matches!(
        h.out(3).first(),
        Some(Transmit::Packet(Packet::PubAck(_)))
    ));
    assert!(h.out(1).is_empty(), "a denied publish is not routed");
    // alice publishes into the secret part (denied) and elsewhere in fleet/ (allowed): her
    // fleet/# subscription gets only what she may read.
    h.send(
        1,
        publish("fleet/secret/key", QoS::AtLeastOnce, 3, "secret"),
    );
    assert_eq!(puback_code(&h.out(1)), ReasonCode::NotAuthorized);
    h.connect(4, connect(V5, "anon"));
    h.send(
        4,
        publish("devices/anon/state", QoS::AtMostOnce, 0, "own device"),
    );
    h.send(4, publish("fleet/x", QoS::AtMostOnce, 0, "not allowed"));
    h.out(4);
    assert!(h.out(1).is_empty());
    // A pattern: each client reads and writes under its own identifier.
    h.send(4, sub(1, "devices/anon/#", QoS::AtMostOnce));
    h.send(4, sub(2, "devices/a1/#", QoS::AtMostOnce));
    let t = h.out(4);
    assert_eq!(
        t.iter()
            .filter_map(|t| match t {
                Transmit::Packet(Packet::SubAck(s)) => Some(s.reason_codes[0]),
                _ => None,
            })
            .collect::<Vec<_>>(),
        vec![ReasonCode::Success, ReasonCode::NotAuthorized]
    );
}

#[test]
fn acl_filters_wide_subscriptions_retained_messages_and_queued_ones() {
    let mut h = H::new();
    h.b.set_acl(Some(
        crate::acl::Acl::parse(
            "user root\ntopic readwrite #\nuser sensor\ntopic readwrite plant/#\ntopic deny plant/admin/#\n",
            std::path::Path::new("acl"),
        )
        .expect("acl"),
    ));
    h.connect(1, user(connect(V5, "root"), "root"));
    h.send(1, publish("plant/admin/pin", QoS::AtMostOnce, 0, "1234"));
    h.send(1, retained("plant/admin/pin", "retained pin"));
    h.send(1, retained("plant/temp", "retained temp"));
    h.out(1);
    // plant/# is covered by a read rule; the deny covers only part of it, so the
    // subscription is granted and the denied topics are filtered message by message,
    // retained ones included.
    h.connect(2, user(persistent(V5, "s1"), "sensor"));
    h.send(2, sub(1, "plant/#", QoS::AtLeastOnce));
    let t = h.out(2);
    assert_eq!(suback_codes(&t), vec![ReasonCode::GrantedQoS1]);
    assert_eq!(payloads(&t), vec!["retained temp"]);
    h.send(1, publish("plant/admin/pin", QoS::AtLeastOnce, 1, "5678"));
    h.send(1, publish("plant/temp", QoS::AtLeastOnce, 2, "21"));
    h.out(1);
    let t = h.out(2);
    assert_eq!(payloads(&t), vec!["21"]);
    let delivered = publishes(&t)[0].packet_id.expect("QoS 1");
    h.send(2, Packet::PubAck(PubAck::new(delivered)));
    // Offline: the queue is filtered as well when the session comes back.
    h.send(2, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    h.out(2);
    h.send(1, publish("plant/admin/pin", QoS::AtLeastOnce, 3, "9999"));
    h.send(1, publish("plant/temp", QoS::AtLeastOnce, 4, "22"));
    h.out(1);
    let t = h.connect(3, user(persistent(V5, "s1"), "sensor"));
    assert!(connack(&t).session_present);
    assert_eq!(payloads(&t), vec!["22"]);
    // A will on a topic the client may not write is refused at CONNECT.
    let t = h.connect(
        4,
        with_will(user(connect(V5, "s2"), "sensor"), "plant/admin/x", None),
    );
    assert_eq!(connack(&t).reason_code, ReasonCode::NotAuthorized);
    assert!(has_close(&t));
}
