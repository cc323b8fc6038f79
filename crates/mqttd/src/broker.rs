//! The sans-IO broker core: every session, the router and the retained store in one plain
//! struct, fed with decoded packets and the current time, drained of packets to send.
//!
//! Inputs: [`Broker::handle_connect`], [`Broker::handle_packet`], [`Broker::handle_closed`],
//! [`Broker::handle_written`], [`Broker::handle_timeout`]. Output: [`Broker::poll_transmit`].
//! No socket, no clock, no task: `now` is an argument, so every rule is unit-testable.
//!
//! Invariants:
//! - One task owns the `Broker`; connection tasks reach it only through events. No lock is
//!   taken per message: fan-out clones an `Arc<Message>` per subscriber, never the payload.
//! - A connection is identified by a [`ConnId`]; a session by its client id. `conns` maps the
//!   first to the second only while the connection is the session's current link.
//! - Back-pressure never blocks the core: each link has a credit of `connection_buffer`
//!   packets handed out and not yet reported written. Messages beyond it, or beyond the
//!   client's Receive Maximum, wait in the session's queue, which is bounded by
//!   `max_queued_messages`: on overflow the oldest queued QoS 0 message is dropped first, then
//!   the new message; every drop is counted.
//! - Overlapping subscriptions: a client gets one copy of a message, at the highest QoS of its
//!   matching subscriptions, carrying every matching Subscription Identifier (see README).

use std::cmp::Reverse;
use std::cmp::{max, min};
use std::collections::{BinaryHeap, VecDeque};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttd_codec::{
    ConnAck, ConnAckProperties, Connect, Disconnect, MqttString, Packet, PayloadFormat, PubAck,
    PubRec, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, Topic,
    UnsubAck, Unsubscribe,
};

use crate::config::{Anonymous, Limits};
use crate::message::{Message, SharedMessage};
use crate::metrics::Metrics;
use crate::retain::RetainStore;
use crate::router::{ClientId, FastMap, FastSet, Router, parse_filter, validate_topic_name};
use crate::session::{Link, Pumped, Session, WillSpec};
use crate::store::{AckHold, Delivery, PendingWill, Store, StoreError, Subscription};

/// Identifies one network connection (whatever carries it).
pub type ConnId = u64;

/// What the core asks a connection to do.
// `Close` is rare and boxing every packet would cost an allocation per send.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// Send this packet.
    Packet(Packet),
    /// Flush what was sent and close the connection.
    Close,
}

/// Why a connection ended, as its driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed or the network failed.
    NetworkError,
    /// The peer broke the protocol; the driver already told it (5.0) with this reason.
    ProtocolError(ReasonCode),
}

/// The broker-side options that are not limits.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Protocol and resource limits.
    pub limits: Limits,
    /// Anonymous access policy.
    pub allow_anonymous: Anonymous,
}

/// What a deadline in the timer heap is for. Entries are checked when they fire and ignored
/// when stale (the client sent something, reconnected, or the session is gone), so nothing is
/// ever removed from the heap early and each connection costs one entry per keep-alive period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    KeepAlive(ConnId),
    Will(ClientId),
    Expiry(ClientId),
    RetainedExpiry(Topic),
}

#[derive(Debug, Default)]
struct Aggregate {
    qos: Option<QoS>,
    retain: bool,
    ids: Vec<u32>,
}

/// The broker core. See the module documentation.
pub struct Broker<S: Store> {
    opts: BrokerOptions,
    router: Router<Subscription>,
    retained: RetainStore<SharedMessage>,
    /// Boxed: a map slot is a pointer, so the table's spare slots cost little.
    sessions: FastMap<ClientId, Box<Session>>,
    conns: FastMap<ConnId, ClientId>,
    store: S,
    metrics: Arc<Metrics>,
    transmits: VecDeque<(ConnId, Transmit)>,
    dirty: FastSet<ClientId>,
    scratch: FastMap<ClientId, Aggregate>,
    assigned_ids: u64,
    boot_id: u64,
    /// `store.is_persistent()`, read once.
    persist: bool,
    /// Packets waiting for durability, and those sorted free (`durability = "sync"`).
    holds: commit::Holds,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Usernames in CONNECTs were checked against a password file before they got here
    /// ([`Broker::set_password_auth`]).
    password_auth: bool,
    /// Topic access rules (`acl_file`), if any ([`Broker::set_acl`]).
    acl: Option<crate::acl::Acl>,
    /// Each known client's rules, resolved at its CONNECT and kept while its session lives.
    client_acls: FastMap<ClientId, crate::acl::ClientAcl>,
}

impl<S: Store> std::fmt::Debug for Broker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("sessions", &self.sessions.len())
            .field("connections", &self.conns.len())
            .field("subscriptions", &self.router.len())
            .field("retained", &self.retained.len())
            .finish()
    }
}

fn granted(qos: QoS) -> ReasonCode {
    match qos {
        QoS::AtMostOnce => ReasonCode::Success,
        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
    }
}

fn reason_string(text: &str) -> Option<MqttString> {
    MqttString::from_bytes(bytes::Bytes::copy_from_slice(text.as_bytes())).ok()
}

impl<S: Store> Broker<S> {
    /// A broker that restores sessions and retained messages from `store`.
    pub fn new(
        opts: BrokerOptions,
        mut store: S,
        metrics: Arc<Metrics>,
        now: Instant,
    ) -> Result<Self, StoreError> {
        let mut router = Router::new();
        let mut sessions = FastMap::default();
        let mut timers = BinaryHeap::new();
        for mut state in store.load_sessions()? {
            for (filter, sub) in &state.subscriptions {
                if let Ok(spec) = parse_filter(filter, usize::MAX, usize::MAX) {
                    router.subscribe(&spec, state.client_id.clone(), sub.clone());
                }
            }
            // Restarted: a session stored while disconnected keeps its deadline (a durable store
            // brings it back from wall-clock time, so expiry counts while the broker is down);
            // one stored while connected starts its clock now.
            if state.expiry_interval != u32::MAX {
                let at = state
                    .expires_at
                    .unwrap_or(now + Duration::from_secs(u64::from(state.expiry_interval)));
                state.expires_at = Some(at);
                timers.push(Reverse((at, Timer::Expiry(state.client_id.clone()))));
            }
            if let Some(w) = &state.pending_will {
                timers.push(Reverse((
                    w.publish_at,
                    Timer::Will(state.client_id.clone()),
                )));
            }
            sessions.insert(
                state.client_id.clone(),
                Box::new(Session { state, link: None }),
            );
        }
        let mut retained = RetainStore::new();
        for m in store.load_retained()? {
            let topic = m.topic.clone();
            if let Some(at) = m.expires_at {
                timers.push(Reverse((at, Timer::RetainedExpiry(topic.clone()))));
            }
            retained.insert(topic.as_str(), m);
        }
        Metrics::set(&metrics.sessions, sessions.len() as u64);
        Metrics::set(&metrics.subscriptions, router.len() as u64);
        Metrics::set(&metrics.retained_messages, retained.len() as u64);
        Ok(Broker {
            persist: store.is_persistent(),
            opts,
            router,
            retained,
            sessions,
            conns: FastMap::default(),
            store,
            metrics,
            transmits: VecDeque::new(),
            holds: commit::Holds::default(),
            dirty: FastSet::default(),
            scratch: FastMap::default(),
            assigned_ids: 0,
            boot_id: {
                use std::hash::{BuildHasher, Hasher};
                // Random per process (std's hasher keys are), so assigned ids differ across restarts.
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            timers,
            password_auth: false,
            acl: None,
            client_acls: FastMap::default(),
        })
    }

    /// Enforces topic access rules from here on (`None`: everything allowed). See
    /// [`crate::acl`] for what is checked where. Known clients get their rules resolved again
    /// from the new ones (a reloaded `acl_file` applies to connected clients at once).
    pub fn set_acl(&mut self, acl: Option<crate::acl::Acl>) {
        match &acl {
            Some(new) => {
                for (client_id, rules) in self.client_acls.iter_mut() {
                    let resolved = new.rules_for(rules.username(), client_id);
                    *rules = resolved;
                }
            }
            None => self.client_acls.clear(),
        }
        self.acl = acl;
    }

    /// Tells the broker that the connection layer checks every CONNECT carrying a username
    /// against a password file and refuses wrong ones before they arrive here: a CONNECT with a
    /// username is then authenticated, and only clients without one are subject to
    /// `allow_anonymous`.
    pub fn set_password_auth(&mut self, on: bool) {
        self.password_auth = on;
    }

    /// The store (for inspection).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The next thing to send, in order (per connection).
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Transmit)> {
        self.holds
            .out
            .pop_front()
            .or_else(|| self.transmits.pop_front())
    }

    /// Number of connected clients.
    pub fn connected(&self) -> usize {
        self.conns.len()
    }

    /// Whether a session exists for `client_id`.
    pub fn has_session(&self, client_id: &str) -> bool {
        self.sessions.contains_key(client_id)
    }

    /// Number of messages queued in a session.
    pub fn queued(&self, client_id: &str) -> Option<usize> {
        self.sessions.get(client_id).map(|s| s.state.queue.len())
    }

    fn send(&mut self, conn: ConnId, packet: impl Into<Packet>) {
        self.transmits
            .push_back((conn, Transmit::Packet(packet.into())));
    }

    fn close(&mut self, conn: ConnId) {
        self.transmits.push_back((conn, Transmit::Close));
    }

    fn refuse(&mut self, conn: ConnId, reason: ReasonCode, why: &str) {
        let mut ack = ConnAck::new(reason);
        ack.properties.reason_string = reason_string(why);
        self.send(conn, ack);
        self.close(conn);
    }

    /// A CONNECT arrived on a new connection from `peer`.
    pub fn handle_connect(&mut self, conn: ConnId, peer: IpAddr, connect: Connect, now: Instant) {
        let v = connect.protocol_version;
        let limits = self.opts.limits.clone();
        let authenticated = self.password_auth && connect.username.is_some();
        let allowed = authenticated
            || match self.opts.allow_anonymous {
                Anonymous::Always => true,
                Anonymous::Never => false,
                Anonymous::Loopback => peer.is_loopback() || peer.to_canonical().is_loopback(),
            };
        if !allowed {
            tracing::info!(%peer, "refused anonymous client");
            let why = match self.opts.allow_anonymous {
                Anonymous::Loopback => "anonymous access is allowed on loopback only",
                _ => "anonymous access is not allowed",
            };
            return self.refuse(conn, ReasonCode::NotAuthorized, why);
        }
        if connect.properties.authentication_method.is_some() {
            // No enhanced authentication method is supported (yet).
            return self.refuse(
                conn,
                ReasonCode::BadAuthenticationMethod,
                "no authentication method is supported",
            );
        }
        let mut assigned = None;
        let client_id: ClientId = if connect.client_id.is_empty() {
            if !v.is_v5() && !connect.clean_start {
                return self.refuse(
                    conn,
                    ReasonCode::ClientIdentifierNotValid,
                    "empty client id needs clean session",
                );
            }
            self.assigned_ids += 1;
            let id = format!("mqttd-{:016x}-{}", self.boot_id, self.assigned_ids);
            assigned = Some(id.clone());
            Arc::from(id)
        } else {
            Arc::from(connect.client_id.as_str())
        };
        let will = match &connect.will {
            None => None,
            Some(w) => {
                if validate_topic_name(
                    w.topic.as_str(),
                    limits.max_topic_length,
                    limits.max_topic_levels,
                )
                .is_err()
                {
                    return self.refuse(conn, ReasonCode::TopicNameInvalid, "invalid will topic");
                }
                let p = &w.properties;
                Some(Box::new(WillSpec {
                    message: Message {
                        topic: w.topic.clone(),
                        payload: w.payload.clone(),
                        qos: w.qos,
                        retain: w.retain,
                        properties: PublishProperties {
                            payload_format_indicator: p.payload_format_indicator,
                            content_type: p.content_type.clone(),
                            response_topic: p.response_topic.clone(),
                            correlation_data: p.correlation_data.clone(),
                            user_properties: p.user_properties.clone(),
                            ..PublishProperties::default()
                        },
                        expires_at: None,
                        publisher: Some(client_id.clone()),
                    },
                    expiry_interval: p.message_expiry_interval,
                    delay: p.will_delay_interval.unwrap_or(0),
                }))
            }
        };
        let client_acl = self
            .acl
            .as_ref()
            .map(|a| a.rules_for(connect.username.as_ref().map(|u| u.as_str()), &client_id));
        if let (Some(a), Some(w)) = (&client_acl, &will)
            && !a.may_publish(w.message.topic.as_str())
        {
            tracing::info!(client = %client_id, topic = w.message.topic.as_str(), "refused: will topic not allowed by the ACL");
            return self.refuse(conn, ReasonCode::NotAuthorized, "will topic not allowed");
        }
        if let Some(a) = client_acl {
            self.client_acls.insert(client_id.clone(), a);
        }
        let props = &connect.properties;
        let expiry = if v.is_v5() {
            props
                .session_expiry_interval
                .unwrap_or(0)
                .min(limits.max_session_expiry)
        } else if connect.clean_start {
            0
        } else {
            limits.v3_session_expiry
        };

        let mut wills = Vec::new();
        // Takeover: the old connection goes, with DISCONNECT 0x8E for 5.0 clients.
        if let Some(old) = self
            .sessions
            .get_mut(&client_id)
            .and_then(|s| s.link.take())
        {
            tracing::info!(client = %client_id, old = old.conn, new = conn, "session taken over");
            self.conns.remove(&old.conn);
            Metrics::sub(&self.metrics.clients_connected, 1);
            if old.version.is_v5() {
                self.send(old.conn, Disconnect::new(ReasonCode::SessionTakenOver));
            }
            self.close(old.conn);
            if let Some(w) = old.will {
                // The session continues: a delayed will is cancelled by the reconnection.
                if w.delay == 0 || connect.clean_start {
                    wills.push((w.message, w.expiry_interval));
                }
            }
        }
        let mut session_present = false;
        if connect.clean_start {
            if let Some(old) = self.sessions.remove(&client_id) {
                self.forget_session(*old, now, &mut wills);
            }
        } else if let Some(s) = self.sessions.get_mut(&client_id) {
            session_present = true;
            s.state.pending_will = None;
        }
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Box::new(Session::new(client_id.clone(), expiry)));
        session.state.expiry_interval = expiry;
        session.state.expires_at = None;

        let mut ka = connect.keep_alive;
        let mut server_keep_alive = None;
        if v.is_v5() && limits.max_keep_alive > 0 && (ka == 0 || ka > limits.max_keep_alive) {
            ka = limits.max_keep_alive;
            server_keep_alive = Some(ka);
        }
        session.link = Some(Link {
            conn,
            version: v,
            keep_alive_timeout: Duration::from_millis(u64::from(ka) * 1500),
            last_seen: now,
            window: usize::from(min(
                props.receive_maximum.unwrap_or(u16::MAX),
                limits.max_inflight,
            )),
            max_packet_size: props.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
            alias_max_out: props.topic_alias_maximum.unwrap_or(0),
            aliases_in: Default::default(),
            aliases_out: Default::default(),
            in_transit: 0,
            will,
            problem_info: props.request_problem_information.unwrap_or(true),
        });
        if ka > 0 {
            let timeout = Duration::from_millis(u64::from(ka) * 1500);
            self.timers
                .push(Reverse((now + timeout, Timer::KeepAlive(conn))));
        }
        self.conns.insert(conn, client_id.clone());
        Metrics::add(&self.metrics.clients_connected, 1);
        Metrics::set(&self.metrics.sessions, self.sessions.len() as u64);

        let mut ack = ConnAck::new(ReasonCode::Success);
        ack.session_present = session_present;
        if v.is_v5() {
            ack.properties = ConnAckProperties {
                receive_maximum: Some(limits.max_inflight),
                maximum_packet_size: Some(limits.max_packet_size),
                topic_alias_maximum: Some(limits.topic_alias_maximum),
                retain_available: Some(true),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                server_keep_alive,
                assigned_client_identifier: assigned.as_deref().and_then(reason_string),
                session_expiry_interval: props
                    .session_expiry_interval
                    .filter(|&e| e != expiry)
                    .map(|_| expiry),
                ..ConnAckProperties::default()
            };
        }
        self.send(conn, ack);
        tracing::debug!(client = %client_id, conn, version = %v, session_present, "connected");

        // Redeliver unacknowledged messages, in their original order, then the queue.
        self.redeliver(&client_id, now);
        self.pump(&client_id, now);
        self.mark_dirty(&client_id);
        for (w, exp) in wills {
            self.publish_will(w, exp, now);
        }
    }

    /// Ends a session: drops its subscriptions, publishes its pending will, forgets it.
    fn forget_session(
        &mut self,
        old: Session,
        _now: Instant,
        wills: &mut Vec<(Message, Option<u32>)>,
    ) {
        for filter in old.state.subscriptions.keys() {
            if let Ok(spec) = parse_filter(filter, usize::MAX, usize::MAX) {
                self.router.unsubscribe(&spec, &old.state.client_id);
            }
        }
        if let Some(w) = old.state.pending_will {
            // Its expiry interval waits in the properties until it is published.
            let expiry = w.message.properties.message_expiry_interval;
            wills.push(((*w.message).clone(), expiry));
        }
        let dropped = old.state.queue.len() as u64;
        if dropped > 0 {
            Metrics::add(&self.metrics.messages_dropped, dropped);
        }
        self.dirty.remove(&old.state.client_id);
        self.client_acls.remove(&old.state.client_id);
        if let Err(e) = self.store.remove_session(&old.state.client_id) {
            tracing::error!(error = %e, "cannot remove session from store");
        }
        Metrics::set(&self.metrics.subscriptions, self.router.len() as u64);
        Metrics::set(&self.metrics.sessions, self.sessions.len() as u64);
    }

    fn publish_will(&mut self, mut message: Message, expiry: Option<u32>, now: Instant) {
        message.expires_at = Message::expiry_from(expiry, now);
        message.properties.message_expiry_interval = None;
        tracing::debug!(topic = message.topic.as_str(), "publishing will");
        self.publish(Arc::new(message), now);
    }

    /// A decoded packet arrived on an established connection.
    pub fn handle_packet(&mut self, conn: ConnId, packet: Packet, now: Instant) {
        let Some(client_id) = self.conns.get(&conn).cloned() else {
            return; // A late packet from a connection that was closed or taken over.
        };
        let Some(link) = self
            .sessions
            .get_mut(&client_id)
            .and_then(|s| s.link.as_mut())
        else {
            return;
        };
        link.last_seen = now;
        match packet {
            Packet::Publish(p) => self.on_publish(conn, &client_id, p, now),
            Packet::PubAck(a) => {
                if let Some(publisher) = self.session_mut(&client_id).on_puback(a.packet_id) {
                    self.holds.check.push(publisher);
                }
                self.after_ack(&client_id, now);
            }
            Packet::PubRec(r) => match self.session_mut(&client_id).on_pubrec(&r) {
                Some(rel) => {
                    self.send(conn, rel);
                    self.mark_dirty(&client_id);
                }
                None => self.after_ack(&client_id, now),
            },
            Packet::PubRel(r) => {
                let comp = self.session_mut(&client_id).on_pubrel(r.packet_id);
                self.send(conn, comp);
                self.mark_dirty(&client_id);
            }
            Packet::PubComp(c) => {
                self.session_mut(&client_id).on_pubcomp(c.packet_id);
                self.after_ack(&client_id, now);
            }
            Packet::Subscribe(s) => self.on_subscribe(conn, &client_id, s, now),
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, &client_id, u),
            Packet::PingReq => self.send(conn, Packet::PingResp),
            Packet::Disconnect(d) => {
                let max_expiry = self.opts.limits.max_session_expiry;
                let s = self.session_mut(&client_id);
                if let Some(e) = d.properties.session_expiry_interval {
                    if s.state.expiry_interval == 0 && e > 0 {
                        return self.drop_link(conn, Some(ReasonCode::ProtocolError), true, now);
                    }
                    s.state.expiry_interval = e.min(max_expiry);
                }
                let keep_will = d.reason_code == ReasonCode::DisconnectWithWillMessage;
                if let Some(link) = self.session_mut(&client_id).link.as_mut()
                    && !keep_will
                {
                    link.will = None;
                }
                self.drop_link(conn, None, true, now);
            }
            Packet::Connect(_) => {
                tracing::debug!(client = %client_id, "second CONNECT");
                self.drop_link(conn, Some(ReasonCode::ProtocolError), true, now);
            }
            Packet::Auth(_) => {
                self.drop_link(conn, Some(ReasonCode::BadAuthenticationMethod), true, now)
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.drop_link(conn, Some(ReasonCode::ProtocolError), true, now);
            }
        }
    }

    fn session_mut(&mut self, client_id: &ClientId) -> &mut Session {
        // Callers hold a client id taken from `conns`, whose session always exists.
        self.sessions
            .entry(client_id.clone())
            .or_insert_with(|| Box::new(Session::new(client_id.clone(), 0)))
    }

    fn after_ack(&mut self, client_id: &ClientId, now: Instant) {
        self.pump(client_id, now);
        self.mark_dirty(client_id);
    }

    /// Whether an ACL is configured and `allows` says no for this client (a client without
    /// resolved rules, which cannot happen for a connected one, is denied).
    fn acl_denies(
        &self,
        client_id: &ClientId,
        allows: impl FnOnce(&crate::acl::ClientAcl) -> bool,
    ) -> bool {
        self.acl.is_some() && !self.client_acls.get(client_id).is_some_and(allows)
    }

    fn mark_dirty(&mut self, client_id: &ClientId) {
        if self.persist
            && self
                .sessions
                .get(client_id)
                .is_some_and(|s| s.state.is_persistent())
            && !self.dirty.contains(client_id)
        {
            self.dirty.insert(client_id.clone());
        }
    }

    fn on_publish(&mut self, conn: ConnId, client_id: &ClientId, mut p: Publish, now: Instant) {
        Metrics::add(&self.metrics.messages_received, 1);
        let limits = &self.opts.limits;
        let (max_len, max_levels, alias_max) = (
            limits.max_topic_length,
            limits.max_topic_levels,
            limits.topic_alias_maximum,
        );
        let session = self.session_mut(client_id);
        let Some(link) = session.link.as_mut() else {
            return;
        };
        let v5 = link.version.is_v5();
        if let Some(alias) = p.properties.topic_alias.take() {
            if !v5 || alias == 0 || alias > alias_max {
                return self.drop_link(conn, Some(ReasonCode::TopicAliasInvalid), true, now);
            }
            if p.topic.is_empty() {
                match link.aliases_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return self.drop_link(conn, Some(ReasonCode::ProtocolError), true, now);
                    }
                }
            } else {
                link.aliases_in.insert(alias, p.topic.clone());
            }
        }
        // The codec already refused wildcards, NUL and bad UTF-8; only our limits are left.
        let topic = p.topic.as_bytes();
        if topic.is_empty()
            || topic.len() > max_len
            || topic.iter().filter(|&&b| b == b'/').count() >= max_levels
        {
            return self.drop_link(conn, Some(ReasonCode::TopicNameInvalid), true, now);
        }
        let id = p.packet_id.map_or(0, NonZeroU16::get);
        if p.qos == QoS::ExactlyOnce {
            if session.state.incoming_qos2.contains(&id) {
                // A retransmission of a message we already have: acknowledge only.
                return self.send(conn, PubRec::new(p.packet_id.unwrap_or(NonZeroU16::MIN)));
            }
            if session.state.incoming_qos2.len() >= usize::from(self.opts.limits.max_inflight) {
                return self.drop_link(conn, Some(ReasonCode::ReceiveMaximumExceeded), true, now);
            }
        }
        // Clients may not publish into the broker's own `$SYS` tree, nor where the ACL forbids.
        let denied = p.topic.as_str().starts_with("$SYS/")
            || p.topic.as_str() == "$SYS"
            || self.acl_denies(client_id, |a| a.may_publish(p.topic.as_str()));
        // A payload declared UTF-8 that is not (5.0 section 3.3.2.3.2): refused, not forwarded.
        let bad_format = p.properties.payload_format_indicator == Some(PayloadFormat::Utf8)
            && std::str::from_utf8(&p.payload).is_err();
        let mut properties = p.properties;
        let expires_at = Message::expiry_from(properties.message_expiry_interval.take(), now);
        properties.subscription_identifiers.clear();
        let message = Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at,
            publisher: Some(client_id.clone()),
        });
        // Sync durability: the PUBACK of a QoS 1 message may go before its commit once every
        // persistent session that holds it acknowledged it (a retained one waits for its commit).
        let hold = match p.packet_id {
            Some(pid) if self.holds.active && p.qos == QoS::AtLeastOnce && !message.retain => {
                Some((pid, AckHold::new(conn)))
            }
            _ => None,
        };
        let matched = if denied || bad_format {
            0
        } else {
            if let Some((_, h)) = &hold {
                self.holds.routing = h.share();
            }
            let n = self.publish(message, now);
            self.holds.routing = AckHold::default();
            n
        };
        if let Some((pid, h)) = hold {
            self.holds.acks.insert((conn, pid.get()), h);
        }
        let reason = if denied {
            ReasonCode::NotAuthorized
        } else if bad_format {
            ReasonCode::PayloadFormatInvalid
        } else if matched == 0 && v5 {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        };
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(pid)) => {
                let mut ack = PubAck::new(pid);
                ack.reason_code = reason;
                self.send(conn, ack);
            }
            (QoS::ExactlyOnce, Some(pid)) => {
                let mut rec = PubRec::new(pid);
                rec.reason_code = reason;
                if !reason.is_error() {
                    self.session_mut(client_id).state.incoming_qos2.insert(id);
                    self.mark_dirty(client_id);
                }
                self.send(conn, rec);
            }
            _ => {}
        }
    }

    /// Publishes a message from any source: stores or clears it if retained, routes it.
    /// Returns the number of sessions it was delivered or queued to.
    pub fn publish(&mut self, message: SharedMessage, now: Instant) -> usize {
        if message.retain {
            let topic = message.topic.as_str();
            let res = if message.payload.is_empty() {
                self.retained.remove(topic);
                if self.persist {
                    self.store.remove_retained(topic)
                } else {
                    Ok(())
                }
            } else {
                if let Some(at) = message.expires_at {
                    self.timers
                        .push(Reverse((at, Timer::RetainedExpiry(message.topic.clone()))));
                }
                self.retained.insert(topic, message.clone());
                if self.persist {
                    self.store.save_retained(&message)
                } else {
                    Ok(())
                }
            };
            if let Err(e) = res {
                tracing::error!(error = %e, "cannot store retained message");
            }
            Metrics::set(&self.metrics.retained_messages, self.retained.len() as u64);
        }
        let mut agg = std::mem::take(&mut self.scratch);
        let sessions = &self.sessions;
        let connected = |c: &ClientId| sessions.get(c).is_some_and(|s| s.link.is_some());
        let (acl, client_acls) = (self.acl.is_some(), &self.client_acls);
        self.router.route(message.topic.as_str(), &connected, |m| {
            if m.value.no_local && !m.shared && message.publisher.as_ref() == Some(m.client) {
                return;
            }
            if acl
                && client_acls
                    .get(m.client)
                    .is_some_and(|a| !a.may_receive(message.topic.as_str()))
            {
                return;
            }
            let qos = min(message.qos, m.value.qos);
            let e = agg.entry(m.client.clone()).or_default();
            e.qos = Some(e.qos.map_or(qos, |q| max(q, qos)));
            e.retain |= message.retain && m.value.retain_as_published;
            if let Some(id) = m.value.subscription_id {
                e.ids.push(id);
            }
        });
        let n = agg.len();
        for (client, a) in agg.drain() {
            let d = Delivery {
                message: message.clone(),
                qos: a.qos.unwrap_or_default(),
                retain: a.retain,
                subscription_ids: a.ids,
                hold: Default::default(),
            };
            self.deliver(&client, d, now);
        }
        self.scratch = agg;
        n
    }

    /// Queues a delivery in a session (policy applies) and sends what the window allows.
    fn deliver(&mut self, client_id: &ClientId, d: Delivery, now: Instant) {
        let max_queued = self.opts.limits.max_queued_messages;
        let credit = self.opts.limits.connection_buffer;
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.link.is_none() && (d.qos == QoS::AtMostOnce || !s.state.is_persistent()) {
            // QoS 0 is not queued for offline clients (mosquitto's default).
            self.count_drop(d.qos);
            return;
        }
        let mut d = d;
        if d.qos != QoS::AtMostOnce && s.state.is_persistent() && self.holds.routing.is_some() {
            // The publisher's PUBACK waits for this session (or for the commit).
            d.hold = self.holds.routing.share();
        }
        // One session lookup per delivery: enqueue and pump on the same borrow. A queue that
        // already held messages is blocked at its front (credit or window; whatever unblocks
        // it pumps), so only a message entering an empty queue can go out at once.
        let was_empty = s.state.queue.is_empty();
        let dropped = s.enqueue(d, max_queued);
        let pumped = if was_empty {
            s.pump_readable(
                credit,
                now,
                &mut self.transmits,
                self.client_acls.get(client_id),
            )
        } else {
            Pumped::default()
        };
        let dirty = self.persist && s.state.is_persistent();
        if let Some(q) = dropped {
            self.count_drop(q);
        }
        self.record(pumped);
        if dirty && !self.dirty.contains(client_id) {
            self.dirty.insert(client_id.clone());
        }
    }

    fn count_drop(&self, qos: QoS) {
        Metrics::add(&self.metrics.messages_dropped, 1);
        if qos == QoS::AtMostOnce {
            Metrics::add(&self.metrics.messages_dropped_qos0, 1);
        }
    }

    /// Sends queued messages while the link has credit and the inflight window has room.
    fn pump(&mut self, client_id: &ClientId, now: Instant) {
        let credit = self.opts.limits.connection_buffer;
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let pumped = s.pump_readable(
            credit,
            now,
            &mut self.transmits,
            self.client_acls.get(client_id),
        );
        self.record(pumped);
    }

    fn record(&self, pumped: Pumped) {
        if pumped.sent > 0 {
            Metrics::add(&self.metrics.messages_sent, pumped.sent);
        }
        for q in pumped.dropped {
            self.count_drop(q);
        }
    }

    /// Resends unacknowledged messages of a session that just (re)connected.
    fn redeliver(&mut self, client_id: &ClientId, now: Instant) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let sent = s.redeliver(now, &mut self.transmits);
        Metrics::add(&self.metrics.messages_sent, sent);
    }

    fn on_subscribe(&mut self, conn: ConnId, client_id: &ClientId, sub: Subscribe, now: Instant) {
        let limits = self.opts.limits.clone();
        let sub_id = sub.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(sub.filters.len());
        let mut retained = Vec::new();
        for f in &sub.filters {
            let raw = f.filter.as_str();
            let spec = match parse_filter(raw, limits.max_topic_length, limits.max_topic_levels) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::debug!(client = %client_id, filter = raw, error = %e, "subscription refused");
                    reasons.push(ReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if self.acl_denies(client_id, |a| a.may_subscribe(spec.filter)) {
                tracing::debug!(client = %client_id, filter = raw, "subscription refused by the ACL");
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            let o = f.options;
            let entry = Subscription {
                qos: o.qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling as u8,
                subscription_id: sub_id,
            };
            let existed = self
                .router
                .subscribe(&spec, client_id.clone(), entry.clone());
            self.session_mut(client_id)
                .state
                .subscriptions
                .insert(raw.to_owned(), entry.clone());
            reasons.push(granted(o.qos));
            let send_retained = spec.share_group.is_none()
                && match o.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
            if send_retained {
                let readable = |m: &SharedMessage| {
                    !self.acl_denies(client_id, |a| a.may_receive(m.topic.as_str()))
                };
                for m in self.retained.matching(spec.filter) {
                    if !m.is_expired(now) && readable(m) {
                        retained.push(Delivery {
                            message: m.clone(),
                            qos: min(m.qos, o.qos),
                            retain: true,
                            subscription_ids: sub_id.into_iter().collect(),
                            hold: Default::default(),
                        });
                    }
                }
            }
        }
        Metrics::set(&self.metrics.subscriptions, self.router.len() as u64);
        self.send(
            conn,
            SubAck {
                packet_id: sub.packet_id,
                reason_codes: reasons,
                properties: Default::default(),
            },
        );
        for d in retained {
            self.deliver(client_id, d, now);
        }
        self.mark_dirty(client_id);
    }

    fn on_unsubscribe(&mut self, conn: ConnId, client_id: &ClientId, u: Unsubscribe) {
        let limits = &self.opts.limits;
        let (max_len, max_levels) = (limits.max_topic_length, limits.max_topic_levels);
        let mut reasons = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let raw = f.as_str();
            let Ok(spec) = parse_filter(raw, max_len, max_levels) else {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            };
            let removed = self.router.unsubscribe(&spec, client_id);
            self.session_mut(client_id).state.subscriptions.remove(raw);
            reasons.push(if removed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        Metrics::set(&self.metrics.subscriptions, self.router.len() as u64);
        self.send(
            conn,
            UnsubAck {
                packet_id: u.packet_id,
                reason_codes: reasons,
                properties: Default::default(),
            },
        );
        self.mark_dirty(client_id);
    }

    /// Ends a connection's link: optionally tells a 5.0 client why, closes it, publishes or
    /// schedules its will (unless cleared by a normal DISCONNECT), and ends or parks the session.
    fn drop_link(&mut self, conn: ConnId, reason: Option<ReasonCode>, close: bool, now: Instant) {
        let Some(client_id) = self.conns.remove(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&client_id) else {
            return;
        };
        let Some(link) = session.link.take_if(|l| l.conn == conn) else {
            return;
        };
        Metrics::sub(&self.metrics.clients_connected, 1);
        if let Some(reason) = reason
            && link.version.is_v5()
        {
            let mut d = Disconnect::new(reason);
            if link.problem_info {
                d.properties.reason_string = reason_string(&format!("{reason:?}"));
            }
            self.transmits.push_back((conn, Transmit::Packet(d.into())));
        }
        if close {
            self.transmits.push_back((conn, Transmit::Close));
        }
        let session = self.session_mut(&client_id);
        let expiry = session.state.expiry_interval;
        let mut wills = Vec::new();
        let mut new_timers = Vec::new();
        if let Some(w) = link.will {
            let delay = w.delay.min(expiry);
            if delay == 0 {
                wills.push((w.message, w.expiry_interval));
            } else {
                let mut m = w.message;
                m.expires_at = None;
                m.properties.message_expiry_interval = w.expiry_interval;
                let publish_at = now + Duration::from_secs(u64::from(delay));
                session.state.pending_will = Some(PendingWill {
                    message: Arc::new(m),
                    publish_at,
                });
                new_timers.push(Reverse((publish_at, Timer::Will(client_id.clone()))));
            }
        }
        if expiry == 0 {
            if let Some(old) = self.sessions.remove(&client_id) {
                self.forget_session(*old, now, &mut wills);
            }
        } else {
            if expiry != u32::MAX {
                let at = now + Duration::from_secs(u64::from(expiry));
                session.state.expires_at = Some(at);
                new_timers.push(Reverse((at, Timer::Expiry(client_id.clone()))));
            }
            self.timers.extend(new_timers);
            self.mark_dirty(&client_id);
        }
        tracing::debug!(client = %client_id, conn, ?reason, "disconnected");
        for (m, exp) in wills {
            self.publish_will(m, exp, now);
        }
    }

    /// The driver found a malformed packet: a 5.0 client gets DISCONNECT with `reason`, the
    /// connection closes, the will is published.
    pub fn handle_protocol_error(&mut self, conn: ConnId, reason: ReasonCode, now: Instant) {
        self.drop_link(conn, Some(reason), true, now);
    }

    /// The driver saw the connection end (network error, EOF, or a protocol error it already
    /// answered). Wills are published per the rules.
    pub fn handle_closed(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        if self.conns.contains_key(&conn) {
            tracing::debug!(conn, ?reason, "connection lost");
        }
        self.drop_link(conn, None, false, now);
    }

    /// The driver wrote `n` packets that [`Broker::poll_transmit`] handed it for `conn`.
    pub fn handle_written(&mut self, conn: ConnId, n: usize, now: Instant) {
        let Some(client_id) = self.conns.get(&conn).cloned() else {
            return;
        };
        let Some(link) = self
            .sessions
            .get_mut(&client_id)
            .and_then(|s| s.link.as_mut())
        else {
            return;
        };
        link.in_transit = link.in_transit.saturating_sub(n);
        self.pump(&client_id, now);
    }

    /// Time passed: keep-alive timeouts, delayed wills, session and retained-message expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timer))) = self.timers.pop() else {
                break;
            };
            match timer {
                Timer::KeepAlive(conn) => self.check_keep_alive(conn, now),
                Timer::Will(client) => {
                    let due = self
                        .sessions
                        .get_mut(&client)
                        .filter(|s| s.link.is_none())
                        .and_then(|s| s.state.pending_will.take_if(|w| now >= w.publish_at));
                    if let Some(w) = due {
                        let exp = w.message.properties.message_expiry_interval;
                        self.publish_will((*w.message).clone(), exp, now);
                        self.mark_dirty(&client);
                    }
                }
                Timer::Expiry(client) => {
                    let due = self.sessions.get(&client).is_some_and(|s| {
                        s.link.is_none() && s.state.expires_at.is_some_and(|at| now >= at)
                    });
                    if due && let Some(old) = self.sessions.remove(&client) {
                        tracing::debug!(client = %client, "session expired");
                        let mut wills = Vec::new();
                        self.forget_session(*old, now, &mut wills);
                        for (m, exp) in wills {
                            self.publish_will(m, exp, now);
                        }
                    }
                }
                Timer::RetainedExpiry(topic) => {
                    let expired = self
                        .retained
                        .get(topic.as_str())
                        .is_some_and(|m| m.is_expired(now));
                    if expired {
                        self.retained.remove(topic.as_str());
                        if let Err(e) = self.store.remove_retained(topic.as_str()) {
                            tracing::error!(error = %e, "cannot remove retained message");
                        }
                        Metrics::set(&self.metrics.retained_messages, self.retained.len() as u64);
                    }
                }
            }
        }
    }

    fn check_keep_alive(&mut self, conn: ConnId, now: Instant) {
        let Some(link) = self
            .conns
            .get(&conn)
            .and_then(|c| self.sessions.get(c))
            .and_then(|s| s.link.as_ref())
            .filter(|l| l.conn == conn && !l.keep_alive_timeout.is_zero())
        else {
            return; // Stale: the connection is gone.
        };
        let deadline = link.last_seen + link.keep_alive_timeout;
        if now > deadline {
            tracing::debug!(conn, "keep alive timeout");
            self.drop_link(conn, Some(ReasonCode::KeepAliveTimeout), true, now);
        } else {
            // Heard from since: check again just after the new deadline.
            let next = deadline + Duration::from_millis(1);
            self.timers.push(Reverse((next, Timer::KeepAlive(conn))));
        }
    }

    /// Publishes the broker's `$SYS` topics (retained, QoS 0).
    pub fn publish_sys(&mut self, topics: Vec<(&'static str, String)>, now: Instant) {
        for (topic, value) in topics {
            let Ok(topic) = Topic::new(topic) else {
                continue;
            };
            let m = Message {
                topic,
                payload: bytes::Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: PublishProperties::default(),
                expires_at: None,
                publisher: None,
            };
            self.publish(Arc::new(m), now);
        }
    }

    /// Server shutdown: every 5.0 client gets DISCONNECT 0x8B, every connection is closed,
    /// persistent sessions are saved.
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            // No will on server shutdown: the client did nothing wrong.
            if let Some(link) = self
                .conns
                .get(&conn)
                .and_then(|c| self.sessions.get_mut(c))
                .and_then(|s| s.link.as_mut())
            {
                link.will = None;
            }
            self.drop_link(conn, Some(ReasonCode::ServerShuttingDown), true, now);
        }
        self.flush_store();
    }

    /// Saves every persistent session changed since the last call. The driver calls this after
    /// each batch of events.
    pub fn flush_store(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.sessions.get(&id)
                && s.state.is_persistent()
                && let Err(e) = self.store.save_session(&s.state)
            {
                tracing::error!(client = %id, error = %e, "cannot save session");
            }
        }
    }
}

#[path = "broker_commit.rs"]
mod commit;
pub use commit::{InFlightCommit, Restored, committed};

#[cfg(test)]
#[path = "broker_tests.rs"]
mod tests;
