//! Storage of everything that must outlive a connection: persistent session state and
//! retained messages.
//!
//! The broker keeps its working copy in memory and hands every change of a persistent
//! session's state to the [`Store`] at the end of each batch of events ([`Store::save_session`]),
//! and every change of a retained message immediately. At start it loads both back. The
//! in-memory implementation ([`MemoryStore`]) keeps snapshots; a durable one (redb) will write
//! the same [`SessionState`] values to disk. Everything a session needs to resume
//! (subscriptions, unacknowledged QoS 1/2 messages both ways, queued messages, the packet-id
//! counter, a pending will) is a field of [`SessionState`], so nothing is lost across the trait.
//!
//! Times are `std::time::Instant`s because the core is driven by a monotonic `now`. A durable
//! store converts each deadline (`expires_at`, `publish_at`, a message's `expires_at`) to wall
//! clock when saving (`SystemTime::now() + (deadline - Instant::now())`) and back when loading;
//! [`crate::broker::Broker::new`] restarts session expiry clocks at load anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use mqttd_codec::QoS;

use crate::message::SharedMessage;
use crate::router::ClientId;

/// A subscription as the session remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Maximum QoS granted.
    pub qos: QoS,
    /// No Local: never receive own messages through this subscription.
    pub no_local: bool,
    /// Retain As Published: keep the RETAIN flag on forwarded messages.
    pub retain_as_published: bool,
    /// Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// The Subscription Identifier, if the SUBSCRIBE had one.
    pub subscription_id: Option<u32>,
}

/// A message waiting for delivery to one session, with the per-subscriber decisions made.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The shared message.
    pub message: SharedMessage,
    /// QoS after downgrade to the subscription's.
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of every matching subscription.
    pub subscription_ids: Vec<u32>,
}

/// A QoS 1/2 message sent to the client and not yet fully acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Publish(Delivery),
    /// PUBREC received and PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// A will waiting for its Will Delay Interval after the connection ended.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingWill {
    /// The will, as a message.
    pub message: SharedMessage,
    /// When to publish it.
    pub publish_at: Instant,
}

/// Everything about a session that outlives its connection.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    /// The client identifier.
    pub client_id: ClientId,
    /// Session Expiry Interval in seconds; `u32::MAX` never expires.
    pub expiry_interval: u32,
    /// When the session ends while disconnected.
    pub expires_at: Option<Instant>,
    /// Subscriptions by full filter (including any `$share/group/` prefix).
    pub subscriptions: BTreeMap<String, Subscription>,
    /// Outgoing QoS 1/2 messages by packet id, in send order within the map's key order;
    /// `send_order` keeps the order for redelivery.
    pub outgoing: BTreeMap<u16, Outgoing>,
    /// Packet ids of outgoing messages in the order they were first sent.
    pub send_order: VecDeque<u16>,
    /// Incoming QoS 2 packet ids: PUBREC sent, PUBREL not yet received.
    pub incoming_qos2: BTreeSet<u16>,
    /// Messages waiting for the inflight window or for the client to come back.
    pub queue: VecDeque<Delivery>,
    /// The last packet id used.
    pub last_packet_id: u16,
    /// A will waiting for its delay.
    pub pending_will: Option<PendingWill>,
}

impl SessionState {
    /// A fresh, empty session.
    pub fn new(client_id: ClientId, expiry_interval: u32) -> Self {
        SessionState {
            client_id,
            expiry_interval,
            expires_at: None,
            subscriptions: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            send_order: VecDeque::new(),
            incoming_qos2: BTreeSet::new(),
            queue: VecDeque::new(),
            last_packet_id: 0,
            pending_will: None,
        }
    }

    /// Whether the session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }
}

/// What a store failed to do.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// Where persistent session state and retained messages are kept.
pub trait Store: Send + 'static {
    /// Every stored session, at start.
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError>;
    /// Records the current state of a persistent session.
    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError>;
    /// Forgets a session (ended, expired, or replaced by a clean start).
    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError>;
    /// Every retained message, at start.
    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError>;
    /// Retains a message for its topic.
    fn save_retained(&mut self, message: &SharedMessage) -> Result<(), StoreError>;
    /// Clears the retained message of a topic.
    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError>;
    /// Whether saving is worth anything: `false` lets the broker skip every save (a volatile
    /// store whose contents die with the process anyway).
    fn is_persistent(&self) -> bool {
        true
    }
    /// Makes every change since the last commit durable, in one transaction (the broker calls
    /// this once per batch of events and releases that batch's acknowledgements after it
    /// returns `Ok`). Stores that write through do nothing here.
    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl<S: Store + ?Sized> Store for Box<S> {
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
        (**self).load_sessions()
    }
    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
        (**self).save_session(state)
    }
    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
        (**self).remove_session(client_id)
    }
    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
        (**self).load_retained()
    }
    fn save_retained(&mut self, message: &SharedMessage) -> Result<(), StoreError> {
        (**self).save_retained(message)
    }
    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
        (**self).remove_retained(topic)
    }
    fn is_persistent(&self) -> bool {
        (**self).is_persistent()
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        (**self).commit()
    }
}

/// Keeps everything in memory. [`MemoryStore::new`] keeps snapshots (tests restore a broker
/// from them); [`MemoryStore::volatile`] is what `storage = "memory"` runs with: the broker's
/// own state is the only copy, so no per-change snapshot is taken.
#[derive(Debug)]
pub struct MemoryStore {
    sessions: HashMap<ClientId, SessionState>,
    retained: HashMap<String, SharedMessage>,
    keep: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store that keeps snapshots.
    pub fn new() -> Self {
        MemoryStore {
            sessions: HashMap::new(),
            retained: HashMap::new(),
            keep: true,
        }
    }

    /// An empty store that keeps nothing: state lives only in the broker.
    pub fn volatile() -> Self {
        MemoryStore {
            keep: false,
            ..Self::new()
        }
    }

    /// The stored state of a session, if any.
    pub fn session(&self, client_id: &str) -> Option<&SessionState> {
        self.sessions.get(client_id)
    }

    /// Number of stored sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of stored retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }
}

impl Store for MemoryStore {
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
        Ok(self.sessions.values().cloned().collect())
    }

    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
        self.sessions.insert(state.client_id.clone(), state.clone());
        Ok(())
    }

    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
        self.sessions.remove(client_id);
        Ok(())
    }

    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
        Ok(self.retained.values().cloned().collect())
    }

    fn save_retained(&mut self, message: &SharedMessage) -> Result<(), StoreError> {
        self.retained
            .insert(message.topic.as_str().to_owned(), message.clone());
        Ok(())
    }

    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
        self.retained.remove(topic);
        Ok(())
    }

    fn is_persistent(&self) -> bool {
        self.keep
    }
}
