//! Durability of the broker's state: committing the store once per batch of events (group
//! commit) and, when a commit fails, turning the batch's acknowledgements into failures so that
//! no client is told that something was stored when it was not.
//!
//! Pipelined: [`Broker::commit_held`] hands the changed sessions to the store, whose writer
//! thread commits them while the driver goes on handling events; the packets produced before
//! the commit started wait in the [`InFlightCommit`], and [`Broker::complete_commit`] releases
//! them (or their refusals) when the store reports the result. Up to four commits are in flight
//! at once (the store writes those queued behind the one it is writing together), so the
//! writer starts the next one as soon as it is done with one, without waiting for the driver
//! to hear of it.

use std::collections::VecDeque;

use mqttd_codec::{ConnAck, Packet, ReasonCode};

use super::{Broker, ConnId, Transmit};
use crate::store::{CommitTicket, Outgoing, Store, StoreError};

/// Commits the store is writing, oldest first, and the packets that wait for each
/// (acknowledgements among them). Hand it back to [`Broker::complete_commit`] with the result
/// of [`InFlightCommit::result`] (or [`InFlightCommit::wait`]), which is the oldest's.
#[derive(Debug, Default)]
pub struct InFlightCommit {
    stages: VecDeque<Stage>,
}

#[derive(Debug)]
struct Stage {
    ticket: CommitTicket,
    held: VecDeque<(ConnId, Transmit)>,
    closed: Vec<ConnId>,
}

/// Commits in flight at once: one being written, the next ones queued behind it (the store
/// writes queued commits together). Bounds the snapshots taken per write.
const MAX_IN_FLIGHT: usize = 4;

impl InFlightCommit {
    /// Completes when the oldest commit has been written (or failed); at once with `Ok` when
    /// there is none.
    pub async fn result(&mut self) -> Result<(), StoreError> {
        match self.stages.front_mut() {
            Some(s) => (&mut s.ticket).await,
            None => Ok(()),
        }
    }

    /// Blocks until the oldest commit has been written (or failed).
    pub fn wait(&mut self) -> Result<(), StoreError> {
        self.stages.front_mut().map_or(Ok(()), |s| s.ticket.wait())
    }

    /// Number of packets waiting for these commits.
    pub fn held(&self) -> usize {
        self.stages.iter().map(|s| s.held.len()).sum()
    }

    /// Whether no commit is in flight.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
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

    /// Hands every persistent session changed since the last call to the store and commits the
    /// store in one transaction. Until this returns, the acknowledgements produced since the
    /// last commit must stay in [`Broker::poll_transmit`]'s queue: the driver calls this before
    /// dispatching them.
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
        let stage = self.start_stage(false, &mut Vec::new())?;
        Some(InFlightCommit {
            stages: VecDeque::from([stage]),
        })
    }

    /// Group commit (`durability = "sync"`), after a batch of events: unless the most commits
    /// that may be in flight are already, hands the persistent sessions changed since the
    /// last call to the store and starts its commit ([`Store::start_commit`]); every packet
    /// produced so far then waits in `commit`, with the connections in `closed` (taken),
    /// until [`Broker::complete_commit`] releases them: nothing is acknowledged before it is
    /// durable. Packets left in the queue (the most commits in flight already, or nothing
    /// changed while one is) wait for the next call or completion.
    ///
    /// `commit` stays `None` when nothing waits: nothing changed, the store keeps nothing, or
    /// the store finished on the spot (its result applied already: on failure the queued
    /// acknowledgements became refusals, as with [`Broker::commit`]). The queued packets and
    /// the `closed` connections' last packets are then free to go.
    pub fn commit_held(&mut self, commit: &mut Option<InFlightCommit>, closed: &mut Vec<ConnId>) {
        let in_flight = commit.as_ref().map_or(0, |c| c.stages.len());
        if in_flight >= MAX_IN_FLIGHT {
            return;
        }
        if let Some(stage) = self.start_stage(true, closed) {
            commit
                .get_or_insert_with(InFlightCommit::default)
                .stages
                .push_back(stage);
        }
    }

    /// Completes the oldest commit in `commit` with the store's `result` (of
    /// [`InFlightCommit::result`]): afterwards [`Broker::poll_transmit`] yields exactly the
    /// packets free to go, those it held first (on failure, acknowledgements turned into
    /// refusals as [`Broker::commit`] describes); the returned connections (closed before it
    /// started) may be forgotten once they are handed over. With `hold`, changes and packets
    /// that came after the commits in flight started go into a new commit (with `closed`),
    /// or behind the last one in flight when nothing changed.
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
        let mut released = done.held;
        let mut gone = done.closed;
        if let Err(e) = result {
            tracing::error!(error = %e, "commit failed: the batch's acknowledgements refused");
            released = self.fail_acks_in(released);
        }
        if hold {
            match self.start_stage(true, closed) {
                Some(stage) => commit.stages.push_back(stage),
                // Nothing to commit: they need no commit, only to keep their order.
                None => match commit.stages.back_mut() {
                    Some(last) => {
                        last.held.append(&mut self.transmits);
                        last.closed.append(closed);
                    }
                    None => gone.append(closed),
                },
            }
        }
        released.append(&mut self.transmits);
        self.transmits = released;
        gone
    }

    /// Hands the changed sessions to the store and starts its commit; with `hold`, the
    /// queued packets and `closed` go into the stage. `None` when nothing waits (see
    /// [`Broker::commit_held`]).
    fn start_stage(&mut self, hold: bool, closed: &mut Vec<ConnId>) -> Option<Stage> {
        let changed = !self.dirty.is_empty();
        let mut ticket = match self.save_dirty() {
            Some(e) => CommitTicket::ready(Err(e)),
            None if !self.persist || (!changed && !self.store.has_pending()) => return None,
            None => self.store.start_commit(),
        };
        if let Some(result) = ticket.try_take() {
            if let Err(e) = result {
                tracing::error!(error = %e, "commit failed: the batch's acknowledgements refused");
                self.fail_acks();
            }
            return None;
        }
        let (held, closed) = if hold {
            (std::mem::take(&mut self.transmits), std::mem::take(closed))
        } else {
            (VecDeque::new(), Vec::new())
        };
        Some(Stage {
            ticket,
            held,
            closed,
        })
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

    fn fail_acks(&mut self) {
        let transmits = std::mem::take(&mut self.transmits);
        self.transmits = self.fail_acks_in(transmits);
    }

    /// `transmits` with every acknowledgement turned into a refusal (or a close).
    fn fail_acks_in(
        &mut self,
        mut transmits: VecDeque<(ConnId, Transmit)>,
    ) -> VecDeque<(ConnId, Transmit)> {
        let mut out = VecDeque::with_capacity(transmits.len());
        for (conn, t) in transmits.drain(..) {
            let Transmit::Packet(p) = t else {
                out.push_back((conn, t));
                continue;
            };
            let is_ack = match &p {
                Packet::PubAck(a) => !a.reason_code.is_error(),
                Packet::PubRec(r) => !r.reason_code.is_error(),
                Packet::SubAck(_) => true,
                Packet::ConnAck(a) => a.reason_code == ReasonCode::Success,
                _ => false,
            };
            if !is_ack {
                out.push_back((conn, Transmit::Packet(p)));
                continue;
            }
            if !self.is_v5(conn) {
                out.push_back((conn, Transmit::Close));
                continue;
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
                    out.push_back((conn, Transmit::Packet(ack.into())));
                    out.push_back((conn, Transmit::Close));
                    continue;
                }
                other => other,
            };
            out.push_back((conn, Transmit::Packet(p)));
        }
        out
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
    fn pipelined_commits_release_each_batch_in_order_and_refuse_only_a_failed_one() {
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

        // One batch more than commits may be in flight: the last waits behind them.
        let batches = MAX_IN_FLIGHT as u16 + 1;
        let mut commit = None;
        for id in 1..=batches {
            b.handle_packet(2, publish(QoS::AtLeastOnce, id), now);
            b.commit_held(&mut commit, &mut closed);
            // The driver hands packets over only when no commit is in flight.
            assert!(commit.is_some(), "a commit holds the acknowledgement");
        }
        assert_eq!(started.lock().expect("lock").len(), MAX_IN_FLIGHT);
        let mut c = commit.take().expect("in flight");
        assert_eq!(c.held(), MAX_IN_FLIGHT);

        // The first completes: its ack goes; the last batch starts a commit.
        complete(true);
        let r = c.wait();
        b.complete_commit(&mut c, r, true, &mut closed);
        assert_eq!(acks(&drain(&mut b), 2), vec![(1, ReasonCode::Success)]);
        assert_eq!(started.lock().expect("lock").len(), MAX_IN_FLIGHT);

        // The second fails: only its ack becomes a refusal.
        complete(false);
        let r = c.wait();
        assert!(r.is_err());
        b.complete_commit(&mut c, r, true, &mut closed);
        assert_eq!(
            acks(&drain(&mut b), 2),
            vec![(2, ReasonCode::UnspecifiedError)]
        );

        // The others, one by one and in order.
        for id in 3..=batches {
            assert!(!c.is_empty());
            complete(true);
            let r = c.wait();
            b.complete_commit(&mut c, r, true, &mut closed);
            assert_eq!(acks(&drain(&mut b), 2), vec![(id, ReasonCode::Success)]);
        }
        assert!(c.is_empty(), "nothing changed since: no further commit");
        // Every message was saved in the offline subscriber's session.
        assert_eq!(b.queued("sub"), Some(usize::from(batches)));
    }
}
