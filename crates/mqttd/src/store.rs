//! Storage of everything that must outlive a connection: persistent session state and
//! retained messages.
//!
//! The broker keeps its working copy in memory and hands every change of a persistent
//! session's state to the [`Store`] at the end of each batch of events ([`Store::save_session`]),
//! and every change of a retained message immediately. At start it loads both back. The
//! in-memory implementation ([`MemoryStore`]) keeps snapshots; the durable one
//! ([`crate::store_redb::RedbStore`]) writes what changed since it last saw the session (new
//! messages once each, small per-session deltas; [`QueueLog`] tells it how the queue changed). Everything a session needs to resume
//! (subscriptions, unacknowledged QoS 1/2 messages both ways, queued messages, the packet-id
//! counter, a pending will) is a field of [`SessionState`], so nothing is lost across the trait.
//!
//! Times are `std::time::Instant`s because the core is driven by a monotonic `now`. A durable
//! store converts each deadline (`expires_at`, `publish_at`, a message's `expires_at`) to wall
//! clock when saving (`SystemTime::now() + (deadline - Instant::now())`) and back when loading;
//! [`crate::broker::Broker::new`] restarts session expiry clocks at load anyway.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use mqttd_codec::QoS;

use crate::broker::ConnId;
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
    /// Whether a publisher's PUBACK waits for this delivery (see [`AckHold`]).
    pub hold: AckHold,
}

/// A share in a publisher's PUBACK that waits (`durability = "sync"`): every QoS 1/2 delivery
/// of a client's QoS 1 message into a persistent session carries one, and so does the PUBACK.
/// When the PUBACK's is the last share left, every persistent session that held the message
/// has acknowledged it (or dropped it by policy) and the PUBACK may go without waiting for a
/// commit: nothing of the message is left to make durable. Counted by the deliveries that
/// hold it, so every way a delivery goes (acknowledged, dropped, its session ended) counts.
///
/// A copy is not a share: cloning gives an empty hold, so a snapshot of a session (a store's)
/// never keeps a PUBACK waiting. Two holds always compare equal (bookkeeping, not state).
#[derive(Default)]
pub struct AckHold(Option<Arc<ConnId>>);

impl AckHold {
    /// A new hold for the PUBACK to send on `conn`.
    pub fn new(conn: ConnId) -> AckHold {
        AckHold(Some(Arc::new(conn)))
    }

    /// Another share in the same PUBACK (for a delivery).
    pub fn share(&self) -> AckHold {
        AckHold(self.0.clone())
    }

    /// Whether this is a share in a PUBACK.
    pub fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// Whether no share but this one is left (always for an empty hold).
    pub fn is_last(&self) -> bool {
        self.0.as_ref().is_none_or(|a| Arc::strong_count(a) == 1)
    }

    /// The connection of the PUBACK when dropping this share leaves only the PUBACK's: the
    /// PUBACK may then go.
    pub fn frees(&self) -> Option<ConnId> {
        self.0
            .as_ref()
            .filter(|a| Arc::strong_count(a) == 2)
            .map(|a| **a)
    }
}

impl Clone for AckHold {
    fn clone(&self) -> Self {
        AckHold(None)
    }
}

impl PartialEq for AckHold {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for AckHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AckHold(held)"
        } else {
            "AckHold(none)"
        })
    }
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
    /// How `queue` changed since this value was created or loaded (kept by
    /// [`crate::session::Session`]), so that a store writing deltas writes only what changed.
    pub queue_log: QueueLog,
}

/// Counts of the changes made to a session's queue, for a store that writes deltas: it
/// compares them with the counts at its last save to tell which messages left the front and
/// which were appended, without walking the queue. A change that is neither (a message removed
/// from the middle) counts in `reshaped`, and the store then rewrites the whole queue; so does
/// any count that does not add up.
///
/// Bookkeeping, not state: any two logs compare equal, so that two sessions with the same
/// contents are equal however they came to be.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLog {
    /// Messages taken from the front.
    pub popped: u64,
    /// Messages appended at the back.
    pub pushed: u64,
    /// Other changes (a message removed from the middle).
    pub reshaped: u64,
}

impl PartialEq for QueueLog {
    fn eq(&self, _: &Self) -> bool {
        true
    }
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
            queue_log: QueueLog::default(),
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
    /// Makes every change since the last commit durable, in one transaction, and returns when
    /// it is (or failed). Stores that write through do nothing here.
    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Starts making every change since the last commit durable and returns at once: the
    /// ticket completes when the commit did. Commits complete in the order they were started,
    /// and a failed one keeps its changes for the next. The broker calls this once per batch
    /// of events and releases the batch's acknowledgements when the ticket completes with
    /// `Ok`, while it goes on with the next batch (pipelined group commit). The default
    /// commits on the spot.
    fn start_commit(&mut self) -> CommitTicket {
        CommitTicket::ready(self.commit())
    }
    /// Whether anything was saved or removed since the last commit started: when nothing
    /// was, there is nothing to wait for. The default says yes.
    fn has_pending(&self) -> bool {
        true
    }
}

/// The outcome of a commit that may still be running on a store's writer thread: a future
/// for the async driver, [`CommitTicket::wait`] for blocking callers.
#[derive(Debug)]
pub struct CommitTicket(Arc<TicketSlot>);

/// Completes a [`CommitTicket`] (held by the writer). Dropped without [`Completer::complete`]
/// (the writer died), the ticket completes with an error.
#[derive(Debug)]
pub struct Completer(Option<Arc<TicketSlot>>);

#[derive(Debug, Default)]
struct TicketSlot {
    state: Mutex<TicketState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct TicketState {
    result: Option<Result<(), StoreError>>,
    waker: Option<Waker>,
}

impl CommitTicket {
    /// A ticket that already has its result.
    pub fn ready(result: Result<(), StoreError>) -> CommitTicket {
        let slot = TicketSlot::default();
        lock(&slot.state).result = Some(result);
        CommitTicket(Arc::new(slot))
    }

    /// A pending ticket and the [`Completer`] that gives it its result.
    pub fn pending() -> (CommitTicket, Completer) {
        let slot = Arc::new(TicketSlot::default());
        (CommitTicket(slot.clone()), Completer(Some(slot)))
    }

    /// The result, if the commit has finished (taken: a second call returns `None`).
    pub fn try_take(&mut self) -> Option<Result<(), StoreError>> {
        lock(&self.0.state).result.take()
    }

    /// Blocks the calling thread until the commit has finished (the result is taken: call it
    /// once).
    pub fn wait(&mut self) -> Result<(), StoreError> {
        let mut state = lock(&self.0.state);
        loop {
            if let Some(r) = state.result.take() {
                return r;
            }
            state = self
                .0
                .done
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Future for CommitTicket {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.0.state);
        match state.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Completer {
    /// Gives the ticket its result and wakes whoever waits for it.
    pub fn complete(mut self, result: Result<(), StoreError>) {
        if let Some(slot) = self.0.take() {
            slot.fill(result);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.fill(Err(StoreError("the store's writer stopped".into())));
        }
    }
}

impl TicketSlot {
    fn fill(&self, result: Result<(), StoreError>) {
        let waker = {
            let mut state = lock(&self.state);
            state.result = Some(result);
            state.waker.take()
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

fn lock(m: &Mutex<TicketState>) -> std::sync::MutexGuard<'_, TicketState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    fn start_commit(&mut self) -> CommitTicket {
        (**self).start_commit()
    }
    fn has_pending(&self) -> bool {
        (**self).has_pending()
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
