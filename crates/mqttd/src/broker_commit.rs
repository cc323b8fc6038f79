//! Durability of the broker's state: committing the store once per batch of events (group
//! commit), holding back the packets that tell a client something is stored until it is, and,
//! when a commit fails, turning those acknowledgements into failures so that no client is told
//! that something was stored when it was not.
//!
//! Pipelined: [`Broker::commit_held`] hands the changed sessions to the store, whose writer
//! thread commits them while the driver goes on handling events; [`Broker::complete_commit`]
//! releases what waited for it when the store reports the result. While one commit is being
//! written the next batch gathers (it starts when the writer is free again), so a commit
//! captures the sessions as late as possible: what was delivered and acknowledged in the
//! meantime is never written at all.
//!
//! What waits (`durability = "sync"`), per connection and in the connection's order (a packet
//! behind a waiting one waits too, so a client never sees them reordered):
//! - CONNACK, SUBACK, UNSUBACK, PUBREC, PUBREL, PUBCOMP and a QoS 2 PUBLISH to a subscriber
//!   wait for the commit that captures the state they report. A QoS 2 delivery that left
//!   before its message was durable would be delivered a second time after a crash (the
//!   publisher, never acknowledged, sends it again): exactly-once needs the commit first.
//! - A PUBACK for a client's QoS 1 PUBLISH waits for that commit too, unless every persistent
//!   session that holds the message has acknowledged it first (or dropped it by policy): the
//!   message is then fully delivered, nothing of it is left to make durable, and the PUBACK
//!   goes at once ([`AckHold`] counts the sessions' shares). A retained message always waits
//!   for its commit.
//! - QoS 0/1 deliveries to subscribers do not wait: they leave at once.
//!
//! What a crash can and cannot cause, with these rules: a message the broker acknowledged is
//! never lost (it was either durable in every persistent session that had not acknowledged it,
//! or already acknowledged by all of them); a QoS 1 message may be delivered twice (it left
//! before its commit and the publisher, whose PUBACK had not gone, sends it again, or it was
//! stored in flight and is sent again with DUP); a QoS 2 message is delivered once.

use std::collections::VecDeque;

use mqttd_codec::{ConnAck, Packet, QoS, ReasonCode};

use super::{Broker, ConnId, Transmit};
use crate::router::{FastMap, FastSet};
use crate::store::{AckHold, CommitTicket, Outgoing, Store, StoreError};

/// Commits the store is writing, oldest first. Hand it back to [`Broker::complete_commit`] with
/// the result of [`InFlightCommit::result`] (or [`InFlightCommit::wait`]), which is the
/// oldest's. The packets that wait for them are kept by the broker.
#[derive(Debug, Default)]
pub struct InFlightCommit {
    stages: VecDeque<Stage>,
}

/// One commit; without a ticket, one that needs no writing (nothing changed since the one
/// before it): it completes with the one before.
#[derive(Debug)]
struct Stage {
    /// Its number (0: a commit no packet waits for, `durability = "periodic"`).
    seq: u64,
    ticket: Option<CommitTicket>,
    /// Connections with packets waiting for it.
    conns: Vec<ConnId>,
}

/// Commits being written at once (the writer writes those queued behind the one it is
/// writing together). One: the next commit captures the sessions when the writer is free, as
/// late as possible, so what was acknowledged meanwhile is not written.
const MAX_IN_FLIGHT: usize = 1;

impl InFlightCommit {
    /// Completes when the oldest commit has been written (or failed); at once with `Ok` when
    /// there is none.
    pub async fn result(&mut self) -> Result<(), StoreError> {
        match self.stages.front_mut().and_then(|s| s.ticket.as_mut()) {
            Some(t) => t.await,
            None => Ok(()),
        }
    }

    /// Blocks until the oldest commit has been written (or failed).
    pub fn wait(&mut self) -> Result<(), StoreError> {
        self.stages
            .front_mut()
            .and_then(|s| s.ticket.as_mut())
            .map_or(Ok(()), CommitTicket::wait)
    }

    /// Whether no commit is in flight.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Commits being written (not counting those that need no writing).
    fn writing(&self) -> usize {
        self.stages.iter().filter(|s| s.ticket.is_some()).count()
    }
}

/// Completes when the oldest commit in `commit` does; never when there is none (for a
/// `select!` branch).
pub async fn committed(commit: &mut Option<InFlightCommit>) -> Result<(), StoreError> {
    match commit {
        Some(c) if !c.is_empty() => c.result().await,
        _ => std::future::pending().await,
    }
}

/// The packets that wait for durability (`durability = "sync"`), per connection, and those
/// free to go. See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Holds {
    /// Set by the first [`Broker::commit_held`]: acknowledgements wait, and PUBACKs carry an
    /// [`AckHold`].
    pub(super) active: bool,
    /// The hold of the message being routed (empty when none).
    pub(super) routing: AckHold,
    /// Holds of the PUBACKs in the broker's queue, not yet sorted, by connection and packet id.
    pub(super) acks: FastMap<(ConnId, u16), AckHold>,
    /// Packets free to go, in order.
    pub(super) out: VecDeque<(ConnId, Transmit)>,
    /// Connections whose first waiting packet may have become free (a PUBACK's last share in
    /// a session went).
    pub(super) check: Vec<ConnId>,
    queues: FastMap<ConnId, Waiting>,
    /// Commits started (the next one is `started + 1`); every one up to `done` is complete.
    started: u64,
    done: u64,
    /// Connections with packets waiting for commit `started + 1`.
    next_conns: Vec<ConnId>,
    /// Connections that closed while packets waited for them; handed back once those went.
    closing: FastSet<ConnId>,
    /// Closed connections whose last packets went.
    gone: Vec<ConnId>,
}

/// A connection's waiting packets, in order.
#[derive(Debug, Default)]
struct Waiting {
    packets: VecDeque<Held>,
    /// The commit the last packet that needs one waits for.
    last: u64,
}

#[derive(Debug)]
struct Held {
    /// The commit it waits for; 0 for none (it waits only for the packets before it).
    until: u64,
    /// A PUBACK's hold: it may go before its commit once no session shares it.
    hold: AckHold,
    transmit: Transmit,
}

impl Held {
    fn is_free(&self, done: u64) -> bool {
        self.until <= done || (self.hold.is_some() && self.hold.is_last())
    }
}

/// Whether a packet tells its client something that must be durable first.
fn needs_commit(t: &Transmit) -> bool {
    match t {
        Transmit::Packet(p) => match p {
            Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::ConnAck(_) => true,
            Packet::Publish(p) => p.qos == QoS::ExactlyOnce,
            _ => false,
        },
        Transmit::Close => false,
    }
}

/// What a broker restored from its store at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Persistent sessions.
    pub sessions: usize,
    /// Subscriptions of those sessions.
    pub subscriptions: usize,
    /// Messages queued for them.
    pub queued: usize,
    /// Outgoing QoS 1/2 messages sent and not yet acknowledged (redelivered with DUP).
    pub inflight: usize,
    /// Retained messages.
    pub retained: usize,
}

impl<S: Store> Broker<S> {
    /// Whether the store keeps anything beyond the process (commits are worth waiting for).
    pub fn is_durable(&self) -> bool {
        self.persist
    }

    /// How much state the broker holds right now; right after [`Broker::new`], what it restored.
    pub fn restored(&self) -> Restored {
        let mut r = Restored {
            sessions: self.sessions.len(),
            retained: self.retained.len(),
            ..Restored::default()
        };
        for s in self.sessions.values() {
            r.subscriptions += s.state.subscriptions.len();
            r.queued += s.state.queue.len();
            r.inflight += s
                .state
                .outgoing
                .values()
                .filter(|o| matches!(o, Outgoing::Publish(_)))
                .count();
        }
        r
    }

    /// Number of packets waiting for a commit (or for the packets before them).
    pub fn held(&self) -> usize {
        self.holds.queues.values().map(|w| w.packets.len()).sum()
    }

    /// Hands every persistent session changed since the last call to the store and commits the
    /// store in one transaction, blocking. Until this returns, the acknowledgements produced
    /// since the last commit must stay in [`Broker::poll_transmit`]'s queue: the caller calls
    /// this before dispatching them.
    ///
    /// On failure every acknowledgement still queued becomes a refusal: PUBACK and PUBREC carry
    /// 0x80 (Unspecified error) and SUBACK 0x80 for each filter for a 5.0 client, a 5.0 CONNACK
    /// becomes 0x80 followed by a close, and a 3.1.1 connection (which has no way to say "not
    /// stored") is closed instead of acknowledged. The store keeps the unsaved changes and
    /// retries them at the next commit.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        let result = match self.save_dirty() {
            Some(e) => Err(e),
            None if self.persist => self.store.commit(),
            None => Ok(()),
        };
        if result.is_err() {
            self.fail_acks();
        }
        result
    }

    /// Starts a commit of every change so far without holding any packet (`durability =
    /// "periodic"`); `None` when there is nothing to commit or the store finished on the spot.
    pub fn start_commit(&mut self) -> Option<InFlightCommit> {
        let changed = !self.dirty.is_empty();
        let mut ticket = match self.save_dirty() {
            Some(e) => CommitTicket::ready(Err(e)),
            None if !self.persist || (!changed && !self.store.has_pending()) => return None,
            None => self.store.start_commit(),
        };
        if let Some(result) = ticket.try_take() {
            if let Err(e) = result {
                tracing::error!(error = %e, "commit failed");
            }
            return None;
        }
        Some(InFlightCommit {
            stages: VecDeque::from([Stage {
                seq: 0,
                ticket: Some(ticket),
                conns: Vec::new(),
            }]),
        })
    }

    /// Group commit (`durability = "sync"`), after a batch of events: sorts the packets the
    /// batch produced into those free to go (left for [`Broker::poll_transmit`]) and those
    /// that wait (see the module documentation), and, unless a commit is being written
    /// already, hands the persistent sessions changed since the last commit to the store and
    /// starts its commit ([`Store::start_commit`]). Waiting packets go when
    /// [`Broker::complete_commit`] completes their commit, or (a PUBACK) when the last session
    /// holding its message acknowledged it.
    ///
    /// `closed` holds connections that closed; those with packets still waiting are taken
    /// (and handed back by [`Broker::complete_commit`] once their packets went), and closed
    /// connections whose last packets went meanwhile are added: after dispatching the free
    /// packets the driver may forget every connection left in `closed`. `commit` is `None`
    /// afterwards when no commit is in flight; nothing waits then.
    pub fn commit_held(&mut self, commit: &mut Option<InFlightCommit>, closed: &mut Vec<ConnId>) {
        self.holds.active = true;
        let mut c = commit.take().unwrap_or_default();
        self.sort_transmits();
        self.start_stage(&mut c);
        self.release_checked();
        self.settle_closed(closed);
        if !c.is_empty() {
            *commit = Some(c);
        }
    }

    /// Completes the oldest commit in `commit` with the store's `result` (of
    /// [`InFlightCommit::result`]): afterwards [`Broker::poll_transmit`] yields the packets
    /// that waited for it (on failure, acknowledgements turned into refusals as
    /// [`Broker::commit`] describes). With `hold` (`durability = "sync"`), goes on as
    /// [`Broker::commit_held`] does (the next commit starts with everything since); the
    /// returned connections (closed) may be forgotten once the packets are handed over.
    pub fn complete_commit(
        &mut self,
        commit: &mut InFlightCommit,
        result: Result<(), StoreError>,
        hold: bool,
        closed: &mut Vec<ConnId>,
    ) -> Vec<ConnId> {
        let Some(done) = commit.stages.pop_front() else {
            return std::mem::take(closed);
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "commit failed: the batch's acknowledgements refused");
        }
        let failed = result.is_err();
        self.finish_stage(done, failed);
        // Those that needed no writing depended on this one.
        while commit.stages.front().is_some_and(|s| s.ticket.is_none()) {
            if let Some(s) = commit.stages.pop_front() {
                self.finish_stage(s, failed);
            }
        }
        if hold {
            self.sort_transmits();
            self.start_stage(commit);
            self.release_checked();
            self.settle_closed(closed);
        }
        std::mem::take(closed)
    }

    /// Starts the next commit unless one is being written: a real one when something changed,
    /// else (packets wait for it) one that completes with the one before, or at once.
    fn start_stage(&mut self, c: &mut InFlightCommit) {
        if c.writing() >= MAX_IN_FLIGHT {
            return;
        }
        let changed = !self.dirty.is_empty();
        let ticket = match self.save_dirty() {
            Some(e) => Some(CommitTicket::ready(Err(e))),
            None if !self.persist || (!changed && !self.store.has_pending()) => None,
            None => Some(self.store.start_commit()),
        };
        if ticket.is_none() && self.holds.next_conns.is_empty() {
            return;
        }
        self.holds.started += 1;
        let mut stage = Stage {
            seq: self.holds.started,
            ticket,
            conns: std::mem::take(&mut self.holds.next_conns),
        };
        if c.is_empty() {
            // Nothing before it: complete it now if it needs no writing or the store finished.
            match stage.ticket.as_mut().map(CommitTicket::try_take) {
                None => return self.finish_stage(stage, false),
                Some(Some(result)) => {
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "commit failed: the batch's acknowledgements refused");
                    }
                    return self.finish_stage(stage, result.is_err());
                }
                Some(None) => {}
            }
        }
        c.stages.push_back(stage);
    }

    /// A commit completed: its packets go (on failure, acknowledgements as refusals).
    fn finish_stage(&mut self, stage: Stage, failed: bool) {
        if stage.seq == 0 {
            return;
        }
        self.holds.done = stage.seq;
        for conn in stage.conns {
            if failed {
                self.fail_waiting(conn, stage.seq);
            }
            self.release(conn);
        }
    }

    /// Moves every packet queued since the last call to the free packets or to its
    /// connection's waiting ones.
    fn sort_transmits(&mut self) {
        let next = self.holds.started + 1;
        let h = &mut self.holds;
        while let Some((conn, t)) = self.transmits.pop_front() {
            let hold = match &t {
                Transmit::Packet(Packet::PubAck(a)) => h
                    .acks
                    .remove(&(conn, a.packet_id.get()))
                    .unwrap_or_default(),
                _ => AckHold::default(),
            };
            let needs = needs_commit(&t);
            if !h.queues.contains_key(&conn) && (!needs || (hold.is_some() && hold.is_last())) {
                h.out.push_back((conn, t));
                continue;
            }
            let w = h.queues.entry(conn).or_default();
            let until = if needs {
                if w.last != next {
                    w.last = next;
                    h.next_conns.push(conn);
                }
                next
            } else {
                0
            };
            w.packets.push_back(Held {
                until,
                hold,
                transmit: t,
            });
        }
    }

    /// Releases the free packets at the front of the connections in `check`.
    fn release_checked(&mut self) {
        let check = std::mem::take(&mut self.holds.check);
        for conn in &check {
            self.release(*conn);
        }
        self.holds.check = check;
        self.holds.check.clear();
    }

    /// Releases the packets at the front of `conn`'s waiting ones that are free to go.
    fn release(&mut self, conn: ConnId) {
        let h = &mut self.holds;
        let Some(w) = h.queues.get_mut(&conn) else {
            return;
        };
        while w.packets.front().is_some_and(|p| p.is_free(h.done)) {
            if let Some(p) = w.packets.pop_front() {
                h.out.push_back((conn, p.transmit));
            }
        }
        if w.packets.is_empty() {
            h.queues.remove(&conn);
            if h.closing.remove(&conn) {
                h.gone.push(conn);
            }
        }
    }

    /// Takes the connections in `closed` with packets waiting; adds those whose last packets
    /// went.
    fn settle_closed(&mut self, closed: &mut Vec<ConnId>) {
        let h = &mut self.holds;
        closed.retain(|conn| {
            if h.queues.contains_key(conn) {
                h.closing.insert(*conn);
                false
            } else {
                true
            }
        });
        closed.append(&mut h.gone);
    }

    /// The acknowledgements of `conn` that wait for commit `seq` (which failed) become refusals.
    fn fail_waiting(&mut self, conn: ConnId, seq: u64) {
        let Some(mut w) = self.holds.queues.remove(&conn) else {
            return;
        };
        let mut packets = VecDeque::with_capacity(w.packets.len());
        for p in w.packets.drain(..) {
            if p.until != seq {
                packets.push_back(p);
                continue;
            }
            let (first, then) = self.refusal(conn, p.transmit);
            for transmit in std::iter::once(first).chain(then) {
                packets.push_back(Held {
                    until: 0,
                    hold: AckHold::default(),
                    transmit,
                });
            }
        }
        w.packets = packets;
        self.holds.queues.insert(conn, w);
    }

    /// Hands every changed persistent session to the store; the first error, if any.
    fn save_dirty(&mut self) -> Option<StoreError> {
        let mut failed = None;
        for id in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.sessions.get(&id)
                && s.state.is_persistent()
                && let Err(e) = self.store.save_session(&s.state)
            {
                tracing::error!(client = %id, error = %e, "cannot save session");
                failed.get_or_insert(e);
            }
        }
        failed
    }

    /// Whether `conn` is the current link of a 5.0 client.
    fn is_v5(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .and_then(|c| self.sessions.get(c))
            .and_then(|s| s.link.as_ref())
            .is_some_and(|l| l.conn == conn && l.version.is_v5())
    }

    /// Every acknowledgement queued turned into a refusal (or a close).
    fn fail_acks(&mut self) {
        let transmits = std::mem::take(&mut self.transmits);
        for (conn, t) in transmits {
            let (first, then) = self.refusal(conn, t);
            self.transmits.push_back((conn, first));
            if let Some(t) = then {
                self.transmits.push_back((conn, t));
            }
        }
    }

    /// `t` as a refusal when it is an acknowledgement (with a close after it, or a close
    /// alone for 3.1.1), else unchanged.
    fn refusal(&mut self, conn: ConnId, t: Transmit) -> (Transmit, Option<Transmit>) {
        let Transmit::Packet(p) = t else {
            return (t, None);
        };
        let is_ack = match &p {
            Packet::PubAck(a) => !a.reason_code.is_error(),
            Packet::PubRec(r) => !r.reason_code.is_error(),
            Packet::SubAck(_) => true,
            Packet::ConnAck(a) => a.reason_code == ReasonCode::Success,
            _ => false,
        };
        if !is_ack {
            return (Transmit::Packet(p), None);
        }
        if !self.is_v5(conn) {
            return (Transmit::Close, None);
        }
        let p = match p {
            Packet::PubAck(mut a) => {
                a.reason_code = ReasonCode::UnspecifiedError;
                Packet::PubAck(a)
            }
            Packet::PubRec(mut r) => {
                r.reason_code = ReasonCode::UnspecifiedError;
                // The flow ends with this PUBREC: the id is free for a new message (and
                // the session is saved again without it).
                if let Some(client) = self.conns.get(&conn).cloned()
                    && let Some(s) = self.sessions.get_mut(&client)
                {
                    s.state.incoming_qos2.remove(&r.packet_id.get());
                    self.mark_dirty(&client);
                }
                Packet::PubRec(r)
            }
            Packet::SubAck(mut a) => {
                for rc in &mut a.reason_codes {
                    if !rc.is_error() {
                        *rc = ReasonCode::UnspecifiedError;
                    }
                }
                Packet::SubAck(a)
            }
            Packet::ConnAck(_) => {
                let ack = ConnAck::new(ReasonCode::UnspecifiedError);
                return (Transmit::Packet(ack.into()), Some(Transmit::Close));
            }
            other => other,
        };
        (Transmit::Packet(p), None)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::num::NonZeroU16;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use bytes::Bytes;
    use mqttd_codec::{
        Connect, MqttString, ProtocolVersion, Publish, QoS, Subscribe, SubscribeFilter,
        SubscriptionOptions, Topic, TopicFilter,
    };

    use super::*;
    use crate::broker::BrokerOptions;
    use crate::config::{Anonymous, Limits};
    use crate::message::SharedMessage;
    use crate::metrics::Metrics;
    use crate::store::{MemoryStore, SessionState};

    /// A store whose commits fail while `fail` is set: the fault-injecting wrapper.
    struct Faulty {
        inner: MemoryStore,
        fail: Arc<AtomicBool>,
        commits: usize,
    }

    impl Store for Faulty {
        fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
            self.inner.load_sessions()
        }
        fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
            self.inner.save_session(state)
        }
        fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
            self.inner.remove_session(client_id)
        }
        fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
            self.inner.load_retained()
        }
        fn save_retained(&mut self, m: &SharedMessage) -> Result<(), StoreError> {
            self.inner.save_retained(m)
        }
        fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
            self.inner.remove_retained(topic)
        }
        fn commit(&mut self) -> Result<(), StoreError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(StoreError("I/O error: No space left on device".into()));
            }
            self.commits += 1;
            Ok(())
        }
    }

    fn broker(fail: Arc<AtomicBool>) -> Broker<Faulty> {
        let store = Faulty {
            inner: MemoryStore::new(),
            fail,
            commits: 0,
        };
        let opts = BrokerOptions {
            limits: Limits::default(),
            allow_anonymous: Anonymous::Always,
        };
        Broker::new(opts, store, Arc::new(Metrics::new()), Instant::now()).expect("broker")
    }

    fn connect(b: &mut Broker<Faulty>, conn: ConnId, id: &'static str, v: ProtocolVersion) {
        let mut c = Connect::new(v, MqttString::from_static(id).expect("id"), 30);
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(3600);
        b.handle_connect(conn, IpAddr::V4(Ipv4Addr::LOCALHOST), c, Instant::now());
    }

    fn drain<S: Store>(b: &mut Broker<S>) -> Vec<(ConnId, Transmit)> {
        std::iter::from_fn(|| b.poll_transmit()).collect()
    }

    /// A SUBSCRIBE to topic `t` at `qos`.
    fn subscribe_t(qos: QoS) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: NonZeroU16::MIN,
            filters: vec![SubscribeFilter {
                filter: TopicFilter::new("t").expect("filter"),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Default::default(),
        })
    }

    fn publish(qos: QoS, id: u16) -> Packet {
        Packet::Publish(Publish::new(
            Topic::new("t").expect("topic"),
            qos,
            NonZeroU16::new(id),
            Bytes::from_static(b"m"),
        ))
    }

    #[test]
    fn session_expiry_keeps_counting_across_a_restart() {
        let now = Instant::now();
        let mut store = MemoryStore::new();
        // Disconnected with an hour to live, 59 min 59 s of which passed while the broker was down.
        let mut gone = SessionState::new(Arc::from("gone"), 3600);
        gone.expires_at = Some(now + std::time::Duration::from_secs(1));
        store.save_session(&gone).expect("save");
        // Stored while connected (a crash): its clock starts at the restart.
        store
            .save_session(&SessionState::new(Arc::from("kept"), 3600))
            .expect("save");
        let fail = Arc::new(AtomicBool::new(false));
        let store = Faulty {
            inner: store,
            fail,
            commits: 0,
        };
        let opts = BrokerOptions {
            limits: Limits::default(),
            allow_anonymous: Anonymous::Always,
        };
        let mut b = Broker::new(opts, store, Arc::new(Metrics::new()), now).expect("broker");
        assert!(b.has_session("gone") && b.has_session("kept"));
        b.handle_timeout(now + std::time::Duration::from_secs(2));
        assert!(!b.has_session("gone"), "expired while the broker was down");
        assert!(b.has_session("kept"));
    }

    #[test]
    fn acks_wait_for_the_commit_and_a_failed_commit_turns_them_into_refusals() {
        let fail = Arc::new(AtomicBool::new(false));
        let mut b = broker(fail.clone());
        let now = Instant::now();
        connect(&mut b, 1, "sub", ProtocolVersion::V5);
        b.handle_packet(1, subscribe_t(QoS::ExactlyOnce), now);
        b.commit().expect("commit");
        drain(&mut b);
        b.handle_packet(1, Packet::Disconnect(Default::default()), now);
        connect(&mut b, 2, "pub5", ProtocolVersion::V5);
        connect(&mut b, 3, "pub3", ProtocolVersion::V3_1_1);
        b.commit().expect("commit");
        drain(&mut b);

        fail.store(true, Ordering::Relaxed);
        b.handle_packet(2, publish(QoS::AtLeastOnce, 1), now);
        b.handle_packet(2, publish(QoS::ExactlyOnce, 2), now);
        b.handle_packet(3, publish(QoS::AtLeastOnce, 1), now);
        connect(&mut b, 4, "new5", ProtocolVersion::V5);
        assert!(b.commit().is_err());
        let out = drain(&mut b);
        let for_conn = |c: ConnId| -> Vec<&Transmit> {
            out.iter()
                .filter(|(k, _)| *k == c)
                .map(|(_, t)| t)
                .collect()
        };
        let v5 = for_conn(2);
        assert!(
            matches!(v5[0], Transmit::Packet(Packet::PubAck(a)) if a.reason_code == ReasonCode::UnspecifiedError),
            "{v5:?}"
        );
        assert!(
            matches!(v5[1], Transmit::Packet(Packet::PubRec(r)) if r.reason_code == ReasonCode::UnspecifiedError),
            "{v5:?}"
        );
        assert_eq!(
            for_conn(3),
            vec![&Transmit::Close],
            "3.1.1: closed, never acked"
        );
        let new = for_conn(4);
        assert!(
            matches!(new[0], Transmit::Packet(Packet::ConnAck(a)) if a.reason_code == ReasonCode::UnspecifiedError)
        );
        assert_eq!(new[1], &Transmit::Close);
        // The refused QoS 2 id is free again: a new message with it is a new message.
        fail.store(false, Ordering::Relaxed);
        b.handle_packet(2, publish(QoS::ExactlyOnce, 2), now);
        b.commit().expect("commit");
        let out = drain(&mut b);
        assert!(
            out.iter().any(|(c, t)| *c == 2
                && matches!(t, Transmit::Packet(Packet::PubRec(r)) if r.reason_code == ReasonCode::Success))
        );
        // What was not stored was kept pending and is saved by the next commit.
        assert!(b.store().commits >= 3);
        let saved = b.store().inner.session("sub").expect("saved session");
        assert!(saved.queue.len() >= 3, "{}", saved.queue.len());
    }

    /// A store whose commits complete when the test says so: the writer thread's stand-in.
    struct Piped {
        inner: MemoryStore,
        changed: bool,
        started: Arc<std::sync::Mutex<std::collections::VecDeque<crate::store::Completer>>>,
    }

    impl Store for Piped {
        fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
            self.inner.load_sessions()
        }
        fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
            self.changed = true;
            self.inner.save_session(state)
        }
        fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
            self.changed = true;
            self.inner.remove_session(client_id)
        }
        fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
            self.inner.load_retained()
        }
        fn save_retained(&mut self, m: &SharedMessage) -> Result<(), StoreError> {
            self.changed = true;
            self.inner.save_retained(m)
        }
        fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
            self.changed = true;
            self.inner.remove_retained(topic)
        }
        fn start_commit(&mut self) -> CommitTicket {
            self.changed = false;
            let (ticket, done) = CommitTicket::pending();
            self.started.lock().expect("lock").push_back(done);
            ticket
        }
        fn has_pending(&self) -> bool {
            self.changed
        }
    }

    fn acks(out: &[(ConnId, Transmit)], conn: ConnId) -> Vec<(u16, ReasonCode)> {
        out.iter()
            .filter_map(|(c, t)| match t {
                Transmit::Packet(Packet::PubAck(a)) if *c == conn => {
                    Some((a.packet_id.get(), a.reason_code))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pipelined_commits_release_each_batch_in_order_and_refuse_only_a_failed_one_s_acks() {
        let started = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let store = Piped {
            inner: MemoryStore::new(),
            changed: false,
            started: started.clone(),
        };
        let opts = BrokerOptions {
            limits: Limits::default(),
            allow_anonymous: Anonymous::Always,
        };
        let mut b =
            Broker::new(opts, store, Arc::new(Metrics::new()), Instant::now()).expect("broker");
        let now = Instant::now();
        let mut c = Connect::new(
            ProtocolVersion::V5,
            MqttString::from_static("sub").expect("id"),
            30,
        );
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(3600);
        b.handle_connect(1, IpAddr::V4(Ipv4Addr::LOCALHOST), c, now);
        b.handle_packet(1, subscribe_t(QoS::AtLeastOnce), now);
        b.handle_packet(1, Packet::Disconnect(Default::default()), now);
        let mut c = Connect::new(
            ProtocolVersion::V5,
            MqttString::from_static("pub").expect("id"),
            30,
        );
        c.clean_start = true;
        b.handle_connect(2, IpAddr::V4(Ipv4Addr::LOCALHOST), c, now);
        let mut commit = None;
        let mut closed = Vec::new();
        b.commit_held(&mut commit, &mut closed);
        let complete = |ok: bool| {
            let done = started
                .lock()
                .expect("lock")
                .pop_front()
                .expect("a commit started");
            done.complete(if ok {
                Ok(())
            } else {
                Err(StoreError("I/O error: No space left on device".into()))
            });
        };
        complete(true);
        let mut c = commit.take().expect("in flight");
        let r = c.wait();
        b.complete_commit(&mut c, r, true, &mut closed);
        assert!(c.is_empty());
        drain(&mut b);

        // A commit is being written: the next batches gather for the one after it.
        let mut commit = None;
        for id in 1..=3 {
            b.handle_packet(2, publish(QoS::AtLeastOnce, id), now);
            b.commit_held(&mut commit, &mut closed);
            assert!(commit.is_some(), "a commit holds the acknowledgement");
            assert!(
                acks(&drain(&mut b), 2).is_empty(),
                "nothing acknowledged yet"
            );
        }
        assert_eq!(started.lock().expect("lock").len(), MAX_IN_FLIGHT);
        assert_eq!(b.held(), 3);
        let mut c = commit.take().expect("in flight");

        // The first completes: its ack goes; the next commit starts with the two others.
        complete(true);
        let r = c.wait();
        b.complete_commit(&mut c, r, true, &mut closed);
        assert_eq!(acks(&drain(&mut b), 2), vec![(1, ReasonCode::Success)]);
        assert_eq!(started.lock().expect("lock").len(), 1);

        // It fails: both its acks become refusals, in order.
        complete(false);
        let r = c.wait();
        assert!(r.is_err());
        b.complete_commit(&mut c, r, true, &mut closed);
        assert_eq!(
            acks(&drain(&mut b), 2),
            vec![
                (2, ReasonCode::UnspecifiedError),
                (3, ReasonCode::UnspecifiedError)
            ]
        );
        assert!(c.is_empty(), "nothing changed since: no further commit");
        assert_eq!(b.held(), 0);

        // The next message gets its own commit.
        let mut commit = None;
        b.handle_packet(2, publish(QoS::AtLeastOnce, 4), now);
        b.commit_held(&mut commit, &mut closed);
        let mut c = commit.take().expect("in flight");
        complete(true);
        let r = c.wait();
        b.complete_commit(&mut c, r, true, &mut closed);
        assert_eq!(acks(&drain(&mut b), 2), vec![(4, ReasonCode::Success)]);
        assert!(c.is_empty());
        // Every message was saved in the offline subscriber's session.
        assert_eq!(b.queued("sub"), Some(4));
    }
}
