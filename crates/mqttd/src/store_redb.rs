//! [`RedbStore`]: the durable [`Store`], one redb database file (`mqttd.redb`) in the data
//! directory.
//!
//! Layout: every message a persistent session holds (queued or in flight) is stored once, in
//! table `messages` under a sequence number, however many sessions hold it; each session's
//! hold on it is a small record in `session_deliveries` (key: client id, queue or in-flight,
//! position or packet id; value: the message's number and the per-subscriber QoS, RETAIN flag
//! and subscription ids). The rest of a session is two small records: `session_heads` (expiry,
//! incoming QoS 2 packet ids, the packet-id counter, a pending will) and
//! `session_subscriptions`. Table `retained` maps a topic to its encoded retained message. A
//! commit therefore writes what changed (new messages, the deliveries that appeared or went,
//! a head), not whole sessions. A message is deleted in the commit that deletes the last
//! delivery record naming it (the store counts them in memory); at load, messages no
//! delivery names are deleted and deliveries naming no stored message are dropped (with a
//! warning). A database written by the first format (table `sessions`, one record per session)
//! is read, and rewritten in this layout by the next commit, which also drops the old table.
//!
//! [`Store::save_session`] compares the session with what the store last saw of it (a mirror:
//! packet ids and message identities in flight, the queue's record keys, the encoded head and
//! subscriptions) and records the differences in a pending batch (a later change of a key
//! replaces an earlier one). The queue's differences come from its [`QueueLog`] counts (taken
//! from the front, appended), so saving a session with a long queue costs what changed, not
//! its length. [`Store::start_commit`] hands the batch to the store's writer thread, which
//! encodes new messages and writes everything in one redb write transaction (one fsync) while
//! the caller goes on: the broker's core keeps decoding and routing the next batch of events
//! while the previous batch is being made durable, and releases a batch's acknowledgements
//! when its commit completes (pipelined group commit). Commits are written in the order they
//! were started. A failed commit keeps its changes in the writer, under the newer ones of the
//! next commit, so the next commit retries them.
//!
//! Times: every deadline (`expires_at`, a will's `publish_at`) is stored as wall-clock
//! milliseconds since the Unix epoch and turned back into an `Instant` at load, so message and
//! session expiry keep counting while the broker is down.
//!
//! Messages are stored as MQTT 5.0 PUBLISH packets encoded by the codec (all properties
//! included), next to what the packet does not carry (expiry deadline, publisher).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use mqttd_codec::{Packet, ProtocolVersion, Publish, QoS};
use redb::{Database, DatabaseError, ReadableTable, TableDefinition, TableError, TableHandle};

use crate::broker::Broker;
use crate::config::{Config, StorageKind};
use crate::message::{Message, SharedMessage};
use crate::router::FastMap;
use crate::store::{
    CommitTicket, Completer, Delivery, MemoryStore, Outgoing, PendingWill, QueueLog, SessionState,
    Store, StoreError, Subscription,
};

/// The first format: one record per session, everything in it. Read and migrated.
const LEGACY_SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("session_heads");
const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("session_subscriptions");
const DELIVERIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("session_deliveries");
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// Most messages in one message block: a block is rewritten when less than half of it is
/// still named, so its size bounds that rewrite.
const BLOCK_MESSAGES: usize = 1024;

/// Kinds of entry in a delivery block.
const QUEUED: u8 = 0;
const IN_FLIGHT: u8 = 1;

/// The database file's name inside the data directory.
pub const DB_FILE: &str = "mqttd.redb";

/// Format version of every encoded record (first byte).
const FORMAT: u8 = 1;

/// How a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// fsync before the commit returns.
    Immediate,
    /// No fsync: the commit becomes durable with the next `Immediate` one (a crash before that
    /// loses it).
    Deferred,
}

/// Why the database could not be opened, each with a message that names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {dir} (`data_dir`): {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the database's lock.
    #[error(
        "the data directory {dir} is in use: another mqttd holds the lock on {file}; stop that \
         broker or give this one another `data_dir`"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The database file.
        file: PathBuf,
    },
    /// The file is damaged or not a database.
    #[error(
        "the database file {file} is corrupted or unreadable ({detail}); to start anyway, move the \
         file away (the broker then starts with no sessions and no retained messages) or restore \
         it from a backup"
    )]
    Corrupted {
        /// The database file.
        file: PathBuf,
        /// What redb or the decoder said.
        detail: String,
    },
}

/// The durable store. See the module documentation.
pub struct RedbStore {
    db: Arc<Database>,
    file: PathBuf,
    pending: Batch,
    /// What the store last saw of each session it holds.
    mirrors: FastMap<String, Mirror>,
    /// The stored messages that delivery records name.
    refs: MessageRefs,
    mode: CommitMode,
    writer: Option<Writer>,
    /// Commits handed to the writer and not completed.
    outstanding: Arc<AtomicUsize>,
    /// Whether a failed commit's changes wait in the writer for the next commit.
    carried: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("file", &self.file)
            .field("pending", &self.pending.len())
            .field("sessions", &self.mirrors.len())
            .field("messages", &self.refs.map.len())
            .field("mode", &self.mode)
            .finish()
    }
}

/// Changes by key, waiting for a commit; a later change of a key replaces an earlier one
/// (`None` deletes). Messages are encoded by the writer thread, off the broker's core. Sorted:
/// the writer inserts and removes in key order, so consecutive changes touch the same pages
/// of redb's trees (new records go at the end of their table, acknowledged ones leave from
/// its start).
#[derive(Default)]
struct Batch {
    heads: BTreeMap<String, Option<Vec<u8>>>,
    subscriptions: BTreeMap<String, Option<Vec<u8>>>,
    /// Delivery blocks by key (client, block number).
    deliveries: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Message blocks by number: (message number, message) each.
    messages: BTreeMap<u64, Option<Vec<(u64, SharedMessage)>>>,
    retained: BTreeMap<String, Option<SharedMessage>>,
    /// Delete the first format's table (its sessions are in this batch, rewritten).
    drop_legacy: bool,
}

impl Batch {
    fn len(&self) -> usize {
        self.heads.len()
            + self.subscriptions.len()
            + self.deliveries.len()
            + self.messages.len()
            + self.retained.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0 && !self.drop_legacy
    }

    /// Adds `older` changes under these: a key changed in both keeps this batch's change.
    fn merge_older(&mut self, older: Batch) {
        fn under<K: Ord, V>(newer: &mut BTreeMap<K, V>, mut older: BTreeMap<K, V>) {
            // `append` keeps the argument's value for a key in both: the newer one.
            older.append(newer);
            *newer = older;
        }
        under(&mut self.heads, older.heads);
        under(&mut self.subscriptions, older.subscriptions);
        under(&mut self.deliveries, older.deliveries);
        under(&mut self.messages, older.messages);
        under(&mut self.retained, older.retained);
        self.drop_legacy |= older.drop_legacy;
    }

    fn clear(&mut self) {
        *self = Batch::default();
    }
}

/// What the store last saw of a session: enough to turn its next state into the records that
/// changed.
#[derive(Default)]
struct Mirror {
    /// The encoded head and subscriptions, as stored.
    head: Vec<u8>,
    subscriptions: Vec<u8>,
    /// The session's queue counts at the last save.
    log: QueueLog,
    /// Whether `queue` matches the session's queue as of `log` (a new mirror does not).
    synced: bool,
    /// Queued deliveries, in queue order (their keys increase).
    queue: VecDeque<QueuedEntry>,
    next_queue_key: u64,
    /// In-flight deliveries by packet id.
    in_flight: FastMap<u16, InFlightEntry>,
    next_order: u64,
    /// Save counter: the in-flight entries a save did not see are gone.
    generation: u64,
    /// The session's delivery blocks (one record each) and the entries written in each.
    blocks: FastMap<u64, Vec<Member>>,
    next_block: u64,
}

/// An entry of a delivery block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Queued(u64),
    InFlight(u16),
}

struct QueuedEntry {
    key: u64,
    block: u64,
    delivery: DeliveryView,
}

/// An in-flight delivery: its place in the send order and, unless released, the delivery.
struct InFlightEntry {
    order: u64,
    block: u64,
    publish: Option<DeliveryView>,
    generation: u64,
}

/// A delivery as the store holds it: the message (identity and number) and the
/// per-subscriber part.
struct DeliveryView {
    message: usize,
    seq: u64,
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
}

impl DeliveryView {
    fn new(d: &Delivery, seq: u64) -> DeliveryView {
        DeliveryView {
            message: identity(&d.message),
            seq,
            qos: d.qos,
            retain: d.retain,
            subscription_ids: d.subscription_ids.clone(),
        }
    }

    fn matches(&self, d: &Delivery) -> bool {
        self.message == identity(&d.message)
            && self.qos == d.qos
            && self.retain == d.retain
            && self.subscription_ids == d.subscription_ids
    }

    fn put(&self, w: &mut Vec<u8>) -> Result<(), String> {
        put_u64(w, self.seq);
        w.push(self.qos as u8);
        w.push(u8::from(self.retain));
        put_len(w, self.subscription_ids.len())?;
        for id in &self.subscription_ids {
            put_u32(w, *id);
        }
        Ok(())
    }
}

impl Mirror {
    /// Whether `member` of block `block` is still there (and still in that block).
    fn is_live(&self, block: u64, member: Member) -> bool {
        match member {
            Member::Queued(key) => self
                .queue
                .binary_search_by_key(&key, |e| e.key)
                .ok()
                .and_then(|i| self.queue.get(i))
                .is_some_and(|e| e.block == block),
            Member::InFlight(id) => self.in_flight.get(&id).is_some_and(|e| e.block == block),
        }
    }

    /// The record of block `block` with its live entries, or `None` when none is left (the
    /// block is then forgotten).
    fn encode_block(&mut self, block: u64) -> Result<Option<Vec<u8>>, String> {
        let Some(mut members) = self.blocks.remove(&block) else {
            return Ok(None);
        };
        members.retain(|m| self.is_live(block, *m));
        if members.is_empty() {
            return Ok(None);
        }
        let mut w = Vec::with_capacity(8 + 32 * members.len());
        w.push(FORMAT);
        put_len(&mut w, members.len())?;
        for m in &members {
            match *m {
                Member::Queued(key) => {
                    let Some(e) = self
                        .queue
                        .binary_search_by_key(&key, |e| e.key)
                        .ok()
                        .and_then(|i| self.queue.get(i))
                    else {
                        return Err("queued entry missing".into());
                    };
                    w.push(QUEUED);
                    put_u64(&mut w, key);
                    e.delivery.put(&mut w)?;
                }
                Member::InFlight(id) => {
                    let Some(e) = self.in_flight.get(&id) else {
                        return Err("in-flight entry missing".into());
                    };
                    w.push(IN_FLIGHT);
                    put_u64(&mut w, u64::from(id));
                    put_u64(&mut w, e.order);
                    match &e.publish {
                        Some(d) => {
                            w.push(1);
                            d.put(&mut w)?;
                        }
                        None => w.push(0),
                    }
                }
            }
        }
        self.blocks.insert(block, members);
        Ok(Some(w))
    }
}

/// A message's identity while the store holds it (its address: the store keeps a reference,
/// so the address is not reused meanwhile).
fn identity(m: &SharedMessage) -> usize {
    Arc::as_ptr(m) as usize
}

/// The stored messages, by identity, with how many deliveries name each, and the message
/// blocks (one record per commit's new messages) they are in.
#[derive(Default)]
struct MessageRefs {
    map: FastMap<usize, MessageRef>,
    next_seq: u64,
    /// Messages named since the last commit started: the next block.
    fresh: Vec<usize>,
    blocks: FastMap<u64, MessageBlock>,
    next_block: u64,
}

struct MessageRef {
    seq: u64,
    refs: u64,
    /// Its block; `None` until the commit that writes it starts.
    block: Option<u64>,
    /// Keeps the identity's address taken (and the message for a block's rewrite).
    message: SharedMessage,
}

struct MessageBlock {
    /// Identities written in the block (some may be gone).
    members: Vec<usize>,
    live: usize,
}

impl MessageRefs {
    /// One more delivery names `m`: its number.
    fn acquire(&mut self, m: &SharedMessage) -> u64 {
        match self.map.entry(identity(m)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let r = e.get_mut();
                r.refs += 1;
                r.seq
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.fresh.push(identity(m));
                e.insert(MessageRef {
                    seq,
                    refs: 1,
                    block: None,
                    message: m.clone(),
                });
                seq
            }
        }
    }

    /// One delivery less names the message: the last one takes it out of its block, and a
    /// block left empty is deleted with the batch, one left less than half full rewritten.
    fn release(&mut self, id: usize, pending: &mut Batch) {
        let std::collections::hash_map::Entry::Occupied(mut e) = self.map.entry(id) else {
            return;
        };
        let r = e.get_mut();
        r.refs = r.refs.saturating_sub(1);
        if r.refs > 0 {
            return;
        }
        let block = r.block;
        e.remove();
        // Not written yet: dropped from `fresh` when the block is sealed.
        let Some(b) = block else {
            return;
        };
        let Some(mb) = self.blocks.get_mut(&b) else {
            return;
        };
        mb.live = mb.live.saturating_sub(1);
        if mb.live == 0 {
            self.blocks.remove(&b);
            pending.messages.insert(b, None);
        } else if mb.live * 2 < mb.members.len() {
            let map = &self.map;
            mb.members
                .retain(|id| map.get(id).is_some_and(|r| r.block == Some(b)));
            mb.live = mb.members.len();
            pending.messages.insert(b, Some(self.block_contents(b)));
        }
    }

    fn block_contents(&self, b: u64) -> Vec<(u64, SharedMessage)> {
        self.blocks
            .get(&b)
            .map(|mb| {
                mb.members
                    .iter()
                    .filter_map(|id| self.map.get(id))
                    .filter(|r| r.block == Some(b))
                    .map(|r| (r.seq, r.message.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Puts the messages named since the last call into new blocks (of at most
    /// [`BLOCK_MESSAGES`] each), written with the batch.
    fn seal(&mut self, pending: &mut Batch) {
        let fresh = std::mem::take(&mut self.fresh);
        for chunk in fresh.chunks(BLOCK_MESSAGES) {
            self.seal_block(chunk, pending);
        }
    }

    fn seal_block(&mut self, fresh: &[usize], pending: &mut Batch) {
        let b = self.next_block;
        let mut members = Vec::with_capacity(fresh.len());
        let mut contents = Vec::with_capacity(fresh.len());
        for &id in fresh {
            // Gone meanwhile, or listed twice: not in this block.
            if let Some(r) = self.map.get_mut(&id)
                && r.block.is_none()
            {
                r.block = Some(b);
                members.push(id);
                contents.push((r.seq, r.message.clone()));
            }
        }
        if members.is_empty() {
            return;
        }
        self.next_block += 1;
        self.blocks.insert(
            b,
            MessageBlock {
                live: members.len(),
                members,
            },
        );
        pending.messages.insert(b, Some(contents));
    }
}

/// The key of a delivery block: client id (length first), block number.
fn block_key(client: &str, block: u64) -> Result<Vec<u8>, String> {
    let len = u32::try_from(client.len()).map_err(|_| "client id too long".to_owned())?;
    let mut k = Vec::with_capacity(client.len() + 12);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(client.as_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    Ok(k)
}

/// The parts of a delivery block's key.
fn parse_block_key(k: &[u8]) -> Result<(&str, u64), String> {
    let mut r = Reader(k);
    let len = r.u32()? as usize;
    let client = std::str::from_utf8(r.take(len)?).map_err(|_| "bad UTF-8".to_owned())?;
    let block = r.u64()?;
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok((client, block))
}

/// A commit for the writer thread.
struct Job {
    batch: Box<Batch>,
    mode: CommitMode,
    done: Completer,
}

/// The writer thread and its queue.
struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Finish every commit handed over (the queue ends when its sender is gone), so the
        // database is closed, its lock released, when this returns.
        if let Some(mut w) = self.writer.take() {
            drop(w.jobs.take());
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The writer thread: commits every job in order; jobs queued while it wrote the last are
/// written together in one transaction. A failed commit's changes are kept and written with
/// the next (under its newer changes).
fn write_loop(
    db: Arc<Database>,
    jobs: mpsc::Receiver<Job>,
    outstanding: Arc<AtomicUsize>,
    carry_flag: Arc<AtomicBool>,
) {
    let mut carried: Option<Batch> = None;
    while let Ok(first) = jobs.recv() {
        // Every commit queued meanwhile joins this one: one transaction, one fsync.
        let mut batch = Batch::default();
        let mut mode = CommitMode::Deferred;
        let mut done = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next {
            let mut newer = *job.batch;
            newer.merge_older(batch);
            batch = newer;
            if job.mode == CommitMode::Immediate {
                mode = CommitMode::Immediate;
            }
            done.push(job.done);
            next = jobs.try_recv().ok();
        }
        if let Some(old) = carried.take() {
            batch.merge_older(old);
        }
        let result = write_batch(&db, &mut batch, mode);
        if result.is_err() && !batch.is_empty() {
            carried = Some(batch);
        }
        carry_flag.store(carried.is_some(), Ordering::Release);
        outstanding.fetch_sub(done.len(), Ordering::AcqRel);
        for d in done {
            d.complete(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError(e.0.clone())),
            });
        }
    }
}

/// Encodes and writes `batch` in one write transaction. Messages that cannot be encoded
/// (larger than the format allows) are logged and dropped from the batch, and fail this commit.
fn write_batch(db: &Database, batch: &mut Batch, mode: CommitMode) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let clock = Clock::now();
    let mut unencodable: Vec<String> = Vec::new();
    let encode = |key: &str, m: &SharedMessage, unencodable: &mut Vec<String>| {
        let mut w = vec![FORMAT];
        match put_message(&mut w, m, &clock) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::error!(key, error = %e, "cannot encode a message; it is not stored");
                unencodable.push(key.to_owned());
                None
            }
        }
    };
    let mut bad_messages = Vec::new();
    let mut bad_retained = Vec::new();
    let written = (|| {
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(match mode {
            CommitMode::Immediate => redb::Durability::Immediate,
            CommitMode::Deferred => redb::Durability::None,
        });
        {
            let mut t = txn.open_table(MESSAGES).map_err(err)?;
            for (b, block) in &batch.messages {
                match block {
                    Some(block) => {
                        let mut w = Vec::with_capacity(8 + 128 * block.len());
                        w.push(FORMAT);
                        let mut count = 0u32;
                        put_u32(&mut w, 0);
                        for (seq, m) in block {
                            let at = w.len();
                            put_u64(&mut w, *seq);
                            if let Err(e) = put_message(&mut w, m, &clock) {
                                tracing::error!(seq, error = %e, "cannot encode a message; it is not stored");
                                unencodable.push(seq.to_string());
                                bad_messages.push((*b, *seq));
                                w.truncate(at);
                            } else {
                                count += 1;
                            }
                        }
                        w[1..5].copy_from_slice(&count.to_be_bytes());
                        t.insert(*b, w.as_slice()).map(drop)
                    }
                    None => t.remove(*b).map(drop),
                }
                .map_err(err)?;
            }
            let mut t = txn.open_table(DELIVERIES).map_err(err)?;
            for (k, v) in &batch.deliveries {
                match v {
                    Some(v) => t.insert(k.as_slice(), v.as_slice()).map(drop),
                    None => t.remove(k.as_slice()).map(drop),
                }
                .map_err(err)?;
            }
            for (table, changes) in [(HEADS, &batch.heads), (SUBSCRIPTIONS, &batch.subscriptions)] {
                let mut t = txn.open_table(table).map_err(err)?;
                for (k, v) in changes {
                    match v {
                        Some(v) => t.insert(k.as_str(), v.as_slice()).map(drop),
                        None => t.remove(k.as_str()).map(drop),
                    }
                    .map_err(err)?;
                }
            }
            let mut t = txn.open_table(RETAINED).map_err(err)?;
            for (k, m) in &batch.retained {
                match m {
                    Some(m) => match encode(k, m, &mut unencodable) {
                        Some(b) => t.insert(k.as_str(), b.as_slice()).map(drop),
                        None => {
                            bad_retained.push(k.clone());
                            Ok(())
                        }
                    },
                    None => t.remove(k.as_str()).map(drop),
                }
                .map_err(err)?;
            }
        }
        if batch.drop_legacy {
            txn.delete_table(LEGACY_SESSIONS).map_err(err)?;
        }
        txn.commit().map_err(err)
    })();
    if !unencodable.is_empty() {
        for (b, seq) in &bad_messages {
            if let Some(Some(block)) = batch.messages.get_mut(b) {
                block.retain(|(s, _)| s != seq);
            }
        }
        for k in &bad_retained {
            batch.retained.remove(k);
        }
        written?;
        return Err(StoreError(format!(
            "cannot encode {} record(s), the first `{}`",
            unencodable.len(),
            unencodable[0]
        )));
    }
    written?;
    batch.clear();
    Ok(())
}

impl RedbStore {
    /// Opens (or creates) `mqttd.redb` in `dir`, creating the directory if needed. redb takes
    /// an exclusive lock on the file and, after a crash, checks and repairs it to its last
    /// committed transaction before this returns.
    pub fn open(dir: &Path, mode: CommitMode) -> Result<RedbStore, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        let file = dir.join(DB_FILE);
        // redb asserts on some damaged files (a truncated one) instead of returning an error:
        // that too is a corrupted file, reported like the others and without a backtrace.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| Database::create(&file));
        std::panic::set_hook(hook);
        let opened = opened.map_err(|panic| OpenError::Corrupted {
            file: file.clone(),
            detail: panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "redb could not read it".into()),
        })?;
        let db = opened.map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => OpenError::Locked {
                dir: dir.to_owned(),
                file: file.clone(),
            },
            other => OpenError::Corrupted {
                file: file.clone(),
                detail: other.to_string(),
            },
        })?;
        Ok(RedbStore {
            db: Arc::new(db),
            file,
            pending: Batch::default(),
            mirrors: FastMap::default(),
            refs: MessageRefs::default(),
            mode,
            writer: None,
            outstanding: Arc::new(AtomicUsize::new(0)),
            carried: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Sets how later commits reach the disk.
    pub fn set_mode(&mut self, mode: CommitMode) {
        self.mode = mode;
    }

    /// Writes pending changes in one transaction with the given mode and waits for it (and
    /// for every commit started before).
    pub fn commit_with(&mut self, mode: CommitMode) -> Result<(), StoreError> {
        if !self.has_pending() && self.outstanding.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        self.send(mode).wait()
    }

    /// Hands pending changes to the writer thread (started on first use) for one transaction
    /// with the given mode; the ticket completes when it is written. With nothing pending, the
    /// ticket is complete at once.
    pub fn start_commit_with(&mut self, mode: CommitMode) -> CommitTicket {
        if !self.has_pending() {
            return CommitTicket::ready(Ok(()));
        }
        self.send(mode)
    }

    /// Hands pending changes (maybe none) to the writer thread, started on first use.
    fn send(&mut self, mode: CommitMode) -> CommitTicket {
        if self.writer.is_none() {
            let (tx, rx) = mpsc::channel();
            let db = self.db.clone();
            let outstanding = self.outstanding.clone();
            let carried = self.carried.clone();
            match std::thread::Builder::new()
                .name("mqttd-store-writer".into())
                .spawn(move || write_loop(db, rx, outstanding, carried))
            {
                Ok(thread) => {
                    self.writer = Some(Writer {
                        jobs: Some(tx),
                        thread: Some(thread),
                    })
                }
                Err(e) => {
                    return CommitTicket::ready(Err(StoreError(format!(
                        "cannot start the writer thread: {e}"
                    ))));
                }
            }
        }
        self.refs.seal(&mut self.pending);
        let (ticket, done) = CommitTicket::pending();
        let job = Job {
            batch: Box::new(std::mem::take(&mut self.pending)),
            mode,
            done,
        };
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let sent = self
            .writer
            .as_ref()
            .and_then(|w| w.jobs.as_ref())
            .map(|tx| tx.send(job));
        match sent {
            Some(Ok(())) => ticket,
            // The thread is gone (it panicked): the job comes back; keep its changes.
            Some(Err(mpsc::SendError(job))) => {
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                self.pending.merge_older(*job.batch);
                drop(job.done);
                ticket
            }
            None => {
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                ticket
            }
        }
    }

    fn load<T>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        decode: impl Fn(&[u8], &Clock) -> Result<T, String>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = match txn.open_table(table) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let clock = Clock::now();
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let value = decode(v.value(), &clock).map_err(|e| {
                StoreError(format!(
                    "the database file {} has an unreadable record `{}` in table `{}` ({e}); \
                     move the file away to start empty or restore it from a backup",
                    self.file.display(),
                    k.value(),
                    table.name()
                ))
            })?;
            out.push(value);
        }
        Ok(out)
    }
}

impl RedbStore {
    /// Records what changed in `s` since the store last saw it (see the module documentation).
    fn save_delta(&mut self, s: &SessionState) -> Result<(), String> {
        let clock = Clock::now();
        let head = encode_head(s, &clock)?;
        let subscriptions = encode_subscriptions(s)?;
        let client: &str = &s.client_id;
        let RedbStore {
            mirrors,
            refs,
            pending,
            ..
        } = self;
        if !mirrors.contains_key(client) {
            mirrors.insert(client.to_owned(), Mirror::default());
        }
        let Some(m) = mirrors.get_mut(client) else {
            return Err("no mirror".into());
        };
        if m.head != head {
            pending.heads.insert(client.to_owned(), Some(head.clone()));
            m.head = head;
        }
        if m.subscriptions != subscriptions {
            pending
                .subscriptions
                .insert(client.to_owned(), Some(subscriptions.clone()));
            m.subscriptions = subscriptions;
        }
        // Messages whose deliveries went: released after every new delivery took its
        // reference, so a message moving from the queue to the in-flight window stays put.
        let mut released = Vec::new();
        // Blocks that lost or changed an entry (rewritten), and the entries of the new one.
        let mut touched = Vec::new();
        let mut added = Vec::new();
        let block = m.next_block;

        // In flight, in send order; an entry keeps its order number while it stays in order.
        m.generation = m.generation.wrapping_add(1);
        let generation = m.generation;
        let mut last_order: Option<u64> = None;
        for &id in &s.send_order {
            let Some(o) = s.outgoing.get(&id) else {
                continue;
            };
            let d = match o {
                Outgoing::Publish(d) => Some(d),
                Outgoing::Released => None,
            };
            if let Some(e) = m.in_flight.get_mut(&id)
                && e.generation != generation
                && last_order.is_none_or(|l| e.order > l)
                && match (&e.publish, d) {
                    (Some(v), Some(d)) => v.matches(d),
                    (_, None) => true,
                    (None, Some(_)) => false,
                }
            {
                e.generation = generation;
                last_order = Some(e.order);
                if d.is_none()
                    && let Some(v) = e.publish.take()
                {
                    // PUBREC: the message goes, the packet id stays until PUBCOMP.
                    released.push(v.message);
                    touched.push(e.block);
                }
                continue;
            }
            let order = m.next_order;
            m.next_order += 1;
            last_order = Some(order);
            let publish = d.map(|d| DeliveryView::new(d, refs.acquire(&d.message)));
            let old = m.in_flight.insert(
                id,
                InFlightEntry {
                    order,
                    block,
                    publish,
                    generation,
                },
            );
            added.push(Member::InFlight(id));
            if let Some(old) = old {
                touched.push(old.block);
                if let Some(v) = old.publish {
                    released.push(v.message);
                }
            }
        }
        m.in_flight.retain(|_, e| {
            if e.generation == generation {
                return true;
            }
            touched.push(e.block);
            if let Some(v) = e.publish.take() {
                released.push(v.message);
            }
            false
        });

        // The queue: what left the front and what was appended, from the counts; anything
        // else (or counts that do not add up) rewrites it.
        let log = s.queue_log;
        let n = s.queue.len();
        let popped = usize::try_from(log.popped.wrapping_sub(m.log.popped)).unwrap_or(usize::MAX);
        let pushed = usize::try_from(log.pushed.wrapping_sub(m.log.pushed)).unwrap_or(usize::MAX);
        let in_step = m.synced
            && log.reshaped == m.log.reshaped
            && log.popped >= m.log.popped
            && log.pushed >= m.log.pushed
            && popped <= m.queue.len()
            && pushed <= n
            && m.queue.len() - popped == n - pushed
            && {
                let kept = n - pushed;
                kept == 0
                    || (s.queue.front().map(|d| identity(&d.message))
                        == m.queue.get(popped).map(|e| e.delivery.message)
                        && s.queue.get(kept - 1).map(|d| identity(&d.message))
                            == m.queue.back().map(|e| e.delivery.message))
            };
        let (drop_front, append_from) = if in_step {
            (popped, n - pushed)
        } else {
            (m.queue.len(), 0)
        };
        for e in m.queue.drain(..drop_front) {
            touched.push(e.block);
            released.push(e.delivery.message);
        }
        for d in s.queue.range(append_from..) {
            let key = m.next_queue_key;
            m.next_queue_key += 1;
            m.queue.push_back(QueuedEntry {
                key,
                block,
                delivery: DeliveryView::new(d, refs.acquire(&d.message)),
            });
            added.push(Member::Queued(key));
        }
        m.log = log;
        m.synced = true;

        if !added.is_empty() {
            m.next_block += 1;
            m.blocks.insert(block, added);
            touched.push(block);
        }
        touched.sort_unstable();
        touched.dedup();
        for b in touched {
            let record = m.encode_block(b)?;
            pending.deliveries.insert(block_key(client, b)?, record);
        }
        for message in released {
            refs.release(message, pending);
        }
        Ok(())
    }

    /// Reads every session (both formats), rebuilds the mirrors and message counts, and
    /// queues the clean-up of what no session names.
    fn load_all(&mut self) -> Result<Vec<SessionState>, StoreError> {
        let clock = Clock::now();
        let legacy = self.load(LEGACY_SESSIONS, decode_session)?;
        let txn = self.db.begin_read().map_err(err)?;
        let unreadable = |table: &str, key: &dyn std::fmt::Display, e: String| {
            StoreError(format!(
                "the database file {} has an unreadable record `{key}` in table `{table}` ({e}); \
                 move the file away to start empty or restore it from a backup",
                self.file.display(),
            ))
        };
        macro_rules! rows {
            ($def:expr) => {
                match txn.open_table($def) {
                    Ok(t) => Some(t),
                    Err(TableError::TableDoesNotExist(_)) => None,
                    Err(e) => return Err(err(e)),
                }
            };
        }
        // Message number -> message, how many deliveries name it, its block.
        // In number order (blocks are numbered, and their messages numbered, in the order
        // they were written): found by binary search.
        let mut messages: Vec<(u64, SharedMessage, u64, u64)> = Vec::new();
        let mut next_seq = 0;
        let mut next_block = 0;
        if let Some(t) = rows!(MESSAGES) {
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let b = k.value();
                next_block = next_block.max(b + 1);
                let mut r = Reader(v.value());
                let block = (|| {
                    if r.u8()? != FORMAT {
                        return Err("unknown record format".to_owned());
                    }
                    let n = r.len()?;
                    let mut out = Vec::with_capacity(n);
                    for _ in 0..n {
                        let seq = r.u64()?;
                        out.push((seq, r.message(&clock)?));
                    }
                    if !r.0.is_empty() {
                        return Err("trailing bytes".to_owned());
                    }
                    Ok(out)
                })()
                .map_err(|e| unreadable(MESSAGES.name(), &b, e))?;
                for (seq, m) in block {
                    next_seq = next_seq.max(seq + 1);
                    messages.push((seq, Arc::new(m), 0, b));
                }
            }
        }
        if !messages.is_sorted_by_key(|m| m.0) {
            messages.sort_unstable_by_key(|m| m.0);
        }
        let mut sessions: BTreeMap<String, (SessionState, Mirror)> = BTreeMap::new();
        if let Some(t) = rows!(HEADS) {
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let client = k.value();
                let state = decode_head(v.value(), &clock)
                    .map_err(|e| unreadable(HEADS.name(), &client, e))?;
                let mirror = Mirror {
                    head: v.value().to_vec(),
                    synced: true,
                    ..Mirror::default()
                };
                sessions.insert(client.to_owned(), (state, mirror));
            }
        }
        if let Some(t) = rows!(SUBSCRIPTIONS) {
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let client = k.value();
                let Some((state, mirror)) = sessions.get_mut(client) else {
                    self.pending.subscriptions.insert(client.to_owned(), None);
                    continue;
                };
                state.subscriptions = decode_subscriptions(v.value())
                    .map_err(|e| unreadable(SUBSCRIPTIONS.name(), &client, e))?;
                mirror.subscriptions = v.value().to_vec();
            }
        }
        if let Some(t) = rows!(DELIVERIES) {
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let key = k.value();
                let shown = || String::from_utf8_lossy(key).into_owned();
                let bad = |e: String| unreadable(DELIVERIES.name(), &shown(), e);
                let (client, block) = parse_block_key(key).map_err(bad)?;
                let Some((_, mirror)) = sessions.get_mut(client) else {
                    // No session holds it (cannot happen after an atomic commit): cleared.
                    self.pending.deliveries.insert(key.to_vec(), None);
                    continue;
                };
                mirror.next_block = mirror.next_block.max(block + 1);
                let mut r = Reader(v.value());
                let mut members = Vec::new();
                let mut lost = false;
                (|| {
                    if r.u8()? != FORMAT {
                        return Err("unknown record format".to_owned());
                    }
                    for _ in 0..r.len()? {
                        let kind = r.u8()?;
                        let id = r.u64()?;
                        let order = if kind == IN_FLIGHT {
                            Some(r.u64()?)
                        } else {
                            None
                        };
                        let reference = if kind == QUEUED || r.flag()? {
                            Some(r.delivery_ref()?)
                        } else {
                            None
                        };
                        let view = match reference {
                            Some((seq, qos, retain, subscription_ids)) => {
                                match messages
                                    .binary_search_by_key(&seq, |m| m.0)
                                    .ok()
                                    .and_then(|i| messages.get_mut(i))
                                {
                                    Some((_, message, count, _)) => {
                                        *count += 1;
                                        Some(DeliveryView {
                                            message: identity(message),
                                            seq,
                                            qos,
                                            retain,
                                            subscription_ids,
                                        })
                                    }
                                    None => {
                                        tracing::warn!(
                                            client,
                                            seq,
                                            "a stored delivery names a message that is not \
                                             stored; dropped"
                                        );
                                        lost = true;
                                        continue;
                                    }
                                }
                            }
                            None => None,
                        };
                        match (kind, order, view) {
                            (QUEUED, _, Some(delivery)) => {
                                mirror.next_queue_key = mirror.next_queue_key.max(id + 1);
                                mirror.queue.push_back(QueuedEntry {
                                    key: id,
                                    block,
                                    delivery,
                                });
                                members.push(Member::Queued(id));
                            }
                            (IN_FLIGHT, Some(order), publish) => {
                                let id = u16::try_from(id).map_err(|_| "bad packet id")?;
                                mirror.next_order = mirror.next_order.max(order + 1);
                                mirror.in_flight.insert(
                                    id,
                                    InFlightEntry {
                                        order,
                                        block,
                                        publish,
                                        generation: 0,
                                    },
                                );
                                members.push(Member::InFlight(id));
                            }
                            _ => return Err("unknown entry kind".to_owned()),
                        }
                    }
                    if !r.0.is_empty() {
                        return Err("trailing bytes".to_owned());
                    }
                    Ok(())
                })()
                .map_err(bad)?;
                mirror.blocks.insert(block, members);
                if lost {
                    // Rewritten without what was dropped.
                    let record = mirror.encode_block(block).map_err(bad)?;
                    self.pending.deliveries.insert(key.to_vec(), record);
                }
            }
        }
        drop(txn);
        // Messages no delivery names (cannot happen after an atomic commit): their blocks'
        // records are rewritten without them, or deleted.
        let mut refs = MessageRefs {
            next_seq,
            next_block,
            ..MessageRefs::default()
        };
        let mut all_blocks: BTreeMap<u64, usize> = BTreeMap::new();
        refs.map.reserve(messages.len());
        for (seq, message, count, b) in messages {
            *all_blocks.entry(b).or_default() += 1;
            if count == 0 {
                continue;
            }
            let id = identity(&message);
            let mb = refs.blocks.entry(b).or_insert_with(|| MessageBlock {
                members: Vec::new(),
                live: 0,
            });
            mb.members.push(id);
            mb.live += 1;
            refs.map.insert(
                id,
                MessageRef {
                    seq,
                    refs: count,
                    block: Some(b),
                    message,
                },
            );
        }
        for (b, written) in all_blocks {
            match refs.blocks.get(&b) {
                None => {
                    self.pending.messages.insert(b, None);
                }
                Some(mb) if mb.live < written => {
                    let contents = refs.block_contents(b);
                    self.pending.messages.insert(b, Some(contents));
                }
                Some(_) => {}
            }
        }
        self.refs = refs;
        let mut out = Vec::with_capacity(sessions.len() + legacy.len());
        for (client, (mut state, mut mirror)) in sessions {
            mirror
                .queue
                .make_contiguous()
                .sort_unstable_by_key(|e| e.key);
            for e in &mirror.queue {
                let Some(r) = self.refs.map.get(&e.delivery.message) else {
                    continue;
                };
                state.queue.push_back(Delivery {
                    message: r.message.clone(),
                    qos: e.delivery.qos,
                    retain: e.delivery.retain,
                    subscription_ids: e.delivery.subscription_ids.clone(),
                    hold: Default::default(),
                });
            }
            let mut order: Vec<(u64, u16)> = Vec::with_capacity(mirror.in_flight.len());
            for (id, e) in &mirror.in_flight {
                order.push((e.order, *id));
                let o = match &e.publish {
                    Some(v) => match self.refs.map.get(&v.message) {
                        Some(r) => Outgoing::Publish(Delivery {
                            message: r.message.clone(),
                            qos: v.qos,
                            retain: v.retain,
                            subscription_ids: v.subscription_ids.clone(),
                            hold: Default::default(),
                        }),
                        None => continue,
                    },
                    None => Outgoing::Released,
                };
                state.outgoing.insert(*id, o);
            }
            order.sort_unstable();
            state.send_order = order.into_iter().map(|(_, id)| id).collect();
            self.mirrors.insert(client, mirror);
            out.push(state);
        }
        // The first format: rewritten in this one by the next commit, which drops its table.
        if !legacy.is_empty() {
            tracing::info!(
                sessions = legacy.len(),
                "sessions in the first storage format: rewritten by the next commit"
            );
            for state in &legacy {
                self.save_session(state)?;
            }
            self.pending.drop_legacy = true;
        }
        out.extend(legacy);
        Ok(out)
    }
}

/// The store `storage` and `data_dir` ask for; the error names the directory or file and what
/// to do about it.
pub fn open_configured(config: &Config) -> std::io::Result<Box<dyn Store>> {
    Ok(match config.storage {
        // The broker's own state is the only copy.
        StorageKind::Memory => Box::new(MemoryStore::volatile()),
        StorageKind::Redb => {
            let started = Instant::now();
            let store =
                RedbStore::open(&config.data_dir, CommitMode::Immediate).map_err(|e| match e {
                    OpenError::Locked { .. } => {
                        std::io::Error::new(std::io::ErrorKind::ResourceBusy, e.to_string())
                    }
                    other => std::io::Error::other(other.to_string()),
                })?;
            tracing::info!(
                file = %store.file().display(),
                durability = ?config.durability,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "database open"
            );
            Box::new(store)
        }
    })
}

/// Logs what the broker restored at start (counts and the time loading took).
pub fn log_restored<S: Store>(broker: &Broker<S>, loading: Instant) {
    if !broker.is_durable() {
        return;
    }
    let r = broker.restored();
    tracing::info!(
        sessions = r.sessions,
        subscriptions = r.subscriptions,
        queued = r.queued,
        inflight = r.inflight,
        retained = r.retained,
        elapsed_ms = loading.elapsed().as_millis() as u64,
        "restored from the store"
    );
}

/// Commits the broker's store, off the async worker when the runtime allows it (an fsync
/// blocks), and logs a failure (the broker already turned the batch's acknowledgements into
/// refusals).
pub fn commit<S: Store>(broker: &mut Broker<S>) {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let result = if multi {
        tokio::task::block_in_place(|| broker.commit())
    } else {
        broker.commit()
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "commit failed: this batch's acknowledgements were refused");
    }
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError(e.into().to_string())
}

impl Store for RedbStore {
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
        self.load_all()
    }

    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
        self.save_delta(state).map_err(|e| {
            StoreError(format!(
                "cannot store session `{}`: {e}",
                state.client_id.as_ref()
            ))
        })
    }

    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
        let RedbStore {
            mirrors,
            refs,
            pending,
            ..
        } = self;
        if let Some(m) = mirrors.remove(client_id) {
            for b in m.blocks.keys() {
                pending
                    .deliveries
                    .insert(block_key(client_id, *b).map_err(StoreError)?, None);
            }
            for e in m.queue {
                refs.release(e.delivery.message, pending);
            }
            for e in m.in_flight.into_values() {
                if let Some(v) = e.publish {
                    refs.release(v.message, pending);
                }
            }
        }
        pending.heads.insert(client_id.to_owned(), None);
        pending.subscriptions.insert(client_id.to_owned(), None);
        Ok(())
    }

    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
        self.load(RETAINED, |b, c| {
            let mut r = Reader(b);
            if r.u8()? != FORMAT {
                return Err("unknown record format".into());
            }
            Ok(Arc::new(r.message(c)?))
        })
    }

    fn save_retained(&mut self, message: &SharedMessage) -> Result<(), StoreError> {
        self.pending
            .retained
            .insert(message.topic.as_str().to_owned(), Some(message.clone()));
        Ok(())
    }

    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
        self.pending.retained.insert(topic.to_owned(), None);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.commit_with(self.mode)
    }

    fn start_commit(&mut self) -> CommitTicket {
        self.start_commit_with(self.mode)
    }

    fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.carried.load(Ordering::Acquire)
    }
}

/// A pair of "now"s to convert deadlines between `Instant` and wall clock.
struct Clock {
    instant: Instant,
    wall: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Milliseconds since the Unix epoch of `at`.
    fn wall_ms(&self, at: Instant) -> u64 {
        let wall = if at >= self.instant {
            self.wall + (at - self.instant)
        } else {
            self.wall
                .checked_sub(self.instant - at)
                .unwrap_or(UNIX_EPOCH)
        };
        let ms = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    /// The `Instant` of a wall-clock time in milliseconds since the epoch; a past time becomes
    /// "now" at the latest (an `Instant` cannot go before the process started on every platform).
    fn instant_of(&self, ms: u64) -> Instant {
        let wall = UNIX_EPOCH + Duration::from_millis(ms);
        match wall.duration_since(self.wall) {
            Ok(ahead) => self.instant.checked_add(ahead).unwrap_or(self.instant),
            Err(behind) => self
                .instant
                .checked_sub(behind.duration())
                .unwrap_or(self.instant),
        }
    }
}

fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_be_bytes());
}

fn put_len(w: &mut Vec<u8>, n: usize) -> Result<(), String> {
    put_u32(
        w,
        u32::try_from(n).map_err(|_| "record too large".to_owned())?,
    );
    Ok(())
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) -> Result<(), String> {
    put_len(w, b.len())?;
    w.extend_from_slice(b);
    Ok(())
}

fn put_opt_time(w: &mut Vec<u8>, at: Option<Instant>, c: &Clock) {
    match at {
        Some(at) => {
            w.push(1);
            put_u64(w, c.wall_ms(at));
        }
        None => w.push(0),
    }
}

fn put_message(w: &mut Vec<u8>, m: &Message, c: &Clock) -> Result<(), String> {
    let packet_id = (m.qos != QoS::AtMostOnce).then_some(NonZeroU16::MIN);
    let mut p = Publish::new(m.topic.clone(), m.qos, packet_id, m.payload.clone());
    p.retain = m.retain;
    p.properties = m.properties.clone();
    let bytes = Packet::Publish(p)
        .to_bytes(ProtocolVersion::V5)
        .map_err(|e| e.to_string())?;
    put_bytes(w, &bytes)?;
    put_opt_time(w, m.expires_at, c);
    match &m.publisher {
        Some(id) => {
            w.push(1);
            put_bytes(w, id.as_bytes())?;
        }
        None => w.push(0),
    }
    Ok(())
}

#[cfg(test)]
fn put_delivery(w: &mut Vec<u8>, d: &Delivery, c: &Clock) -> Result<(), String> {
    put_message(w, &d.message, c)?;
    w.push(d.qos as u8);
    w.push(u8::from(d.retain));
    put_len(w, d.subscription_ids.len())?;
    for id in &d.subscription_ids {
        put_u32(w, *id);
    }
    Ok(())
}

/// A session in the first format (tests write one to check the migration).
#[cfg(test)]
fn encode_session(s: &SessionState, c: &Clock) -> Result<Vec<u8>, String> {
    let mut w = vec![FORMAT];
    put_bytes(&mut w, s.client_id.as_bytes())?;
    put_u32(&mut w, s.expiry_interval);
    put_opt_time(&mut w, s.expires_at, c);
    put_subscriptions(&mut w, &s.subscriptions)?;
    put_len(&mut w, s.outgoing.len())?;
    for (id, o) in &s.outgoing {
        put_u16(&mut w, *id);
        match o {
            Outgoing::Publish(d) => {
                w.push(1);
                put_delivery(&mut w, d, c)?;
            }
            Outgoing::Released => w.push(0),
        }
    }
    put_len(&mut w, s.send_order.len())?;
    for id in &s.send_order {
        put_u16(&mut w, *id);
    }
    put_len(&mut w, s.incoming_qos2.len())?;
    for id in &s.incoming_qos2 {
        put_u16(&mut w, *id);
    }
    put_len(&mut w, s.queue.len())?;
    for d in &s.queue {
        put_delivery(&mut w, d, c)?;
    }
    put_u16(&mut w, s.last_packet_id);
    match &s.pending_will {
        Some(will) => {
            w.push(1);
            put_message(&mut w, &will.message, c)?;
            put_u64(&mut w, c.wall_ms(will.publish_at));
        }
        None => w.push(0),
    }
    Ok(w)
}

/// A session's head record: everything but its subscriptions and its deliveries.
fn encode_head(s: &SessionState, c: &Clock) -> Result<Vec<u8>, String> {
    let mut w = Vec::with_capacity(32 + s.client_id.len() + 2 * s.incoming_qos2.len());
    w.push(FORMAT);
    put_bytes(&mut w, s.client_id.as_bytes())?;
    put_u32(&mut w, s.expiry_interval);
    put_opt_time(&mut w, s.expires_at, c);
    put_len(&mut w, s.incoming_qos2.len())?;
    for id in &s.incoming_qos2 {
        put_u16(&mut w, *id);
    }
    put_u16(&mut w, s.last_packet_id);
    match &s.pending_will {
        Some(will) => {
            w.push(1);
            put_message(&mut w, &will.message, c)?;
            put_u64(&mut w, c.wall_ms(will.publish_at));
        }
        None => w.push(0),
    }
    Ok(w)
}

fn decode_head(b: &[u8], c: &Clock) -> Result<SessionState, String> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return Err("unknown record format".into());
    }
    let mut s = SessionState::new(Arc::from(r.string()?), 0);
    s.expiry_interval = r.u32()?;
    s.expires_at = r.opt_time(c)?;
    for _ in 0..r.len()? {
        s.incoming_qos2.insert(r.u16()?);
    }
    s.last_packet_id = r.u16()?;
    if r.flag()? {
        let message = Arc::new(r.message(c)?);
        let publish_at = c.instant_of(r.u64()?);
        s.pending_will = Some(PendingWill {
            message,
            publish_at,
        });
    }
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(s)
}

fn put_subscriptions(w: &mut Vec<u8>, subs: &BTreeMap<String, Subscription>) -> Result<(), String> {
    put_len(w, subs.len())?;
    for (filter, sub) in subs {
        put_bytes(w, filter.as_bytes())?;
        w.push(sub.qos as u8);
        w.push(u8::from(sub.no_local) | u8::from(sub.retain_as_published) << 1);
        w.push(sub.retain_handling);
        match sub.subscription_id {
            Some(id) => {
                w.push(1);
                put_u32(w, id);
            }
            None => w.push(0),
        }
    }
    Ok(())
}

fn encode_subscriptions(s: &SessionState) -> Result<Vec<u8>, String> {
    let mut w = vec![FORMAT];
    put_subscriptions(&mut w, &s.subscriptions)?;
    Ok(w)
}

fn decode_subscriptions(b: &[u8]) -> Result<BTreeMap<String, Subscription>, String> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return Err("unknown record format".into());
    }
    let subs = r.subscriptions()?;
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(subs)
}

/// Reads an encoded record; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated record".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn len(&mut self) -> Result<usize, String> {
        let n = self.u32()? as usize;
        // A count can never exceed the bytes left: refuse before allocating for it.
        if n > self.0.len() {
            return Err("bad length".into());
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| "bad UTF-8".to_owned())
    }

    fn qos(&mut self) -> Result<QoS, String> {
        match self.u8()? {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            q => Err(format!("bad QoS {q}")),
        }
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            f => Err(format!("bad flag {f}")),
        }
    }

    fn opt_time(&mut self, c: &Clock) -> Result<Option<Instant>, String> {
        Ok(if self.flag()? {
            Some(c.instant_of(self.u64()?))
        } else {
            None
        })
    }

    fn message(&mut self, c: &Clock) -> Result<Message, String> {
        let raw = self.bytes()?;
        let mut buf = BytesMut::from(raw);
        let p = match mqttd_codec::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
            Ok(Some(Packet::Publish(p))) => p,
            Ok(_) => return Err("not a PUBLISH".into()),
            Err(e) => return Err(e.to_string()),
        };
        let expires_at = self.opt_time(c)?;
        let publisher = if self.flag()? {
            Some(Arc::from(self.string()?))
        } else {
            None
        };
        Ok(Message {
            topic: p.topic,
            payload: Bytes::copy_from_slice(&p.payload),
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
            expires_at,
            publisher,
        })
    }

    fn subscriptions(&mut self) -> Result<BTreeMap<String, Subscription>, String> {
        let mut subscriptions = BTreeMap::new();
        for _ in 0..self.len()? {
            let filter = self.string()?;
            let qos = self.qos()?;
            let flags = self.u8()?;
            let retain_handling = self.u8()?;
            let subscription_id = if self.flag()? {
                Some(self.u32()?)
            } else {
                None
            };
            subscriptions.insert(
                filter,
                Subscription {
                    qos,
                    no_local: flags & 1 != 0,
                    retain_as_published: flags & 2 != 0,
                    retain_handling,
                    subscription_id,
                },
            );
        }
        Ok(subscriptions)
    }

    /// A delivery record's reference: message number, QoS, RETAIN, subscription ids.
    fn delivery_ref(&mut self) -> Result<(u64, QoS, bool, Vec<u32>), String> {
        let seq = self.u64()?;
        let qos = self.qos()?;
        let retain = self.flag()?;
        let n = self.len()?;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(self.u32()?);
        }
        Ok((seq, qos, retain, ids))
    }

    fn delivery(&mut self, c: &Clock) -> Result<Delivery, String> {
        let message = Arc::new(self.message(c)?);
        let qos = self.qos()?;
        let retain = self.flag()?;
        let n = self.len()?;
        let mut subscription_ids = Vec::with_capacity(n);
        for _ in 0..n {
            subscription_ids.push(self.u32()?);
        }
        Ok(Delivery {
            message,
            qos,
            retain,
            subscription_ids,
            hold: Default::default(),
        })
    }
}

fn decode_session(b: &[u8], c: &Clock) -> Result<SessionState, String> {
    let mut r = Reader(b);
    if r.u8()? != FORMAT {
        return Err("unknown record format".into());
    }
    let client_id = Arc::from(r.string()?);
    let expiry_interval = r.u32()?;
    let expires_at = r.opt_time(c)?;
    let subscriptions = r.subscriptions()?;
    let mut outgoing = BTreeMap::new();
    for _ in 0..r.len()? {
        let id = r.u16()?;
        let o = if r.flag()? {
            Outgoing::Publish(r.delivery(c)?)
        } else {
            Outgoing::Released
        };
        outgoing.insert(id, o);
    }
    let mut send_order = VecDeque::new();
    for _ in 0..r.len()? {
        send_order.push_back(r.u16()?);
    }
    let mut incoming_qos2 = BTreeSet::new();
    for _ in 0..r.len()? {
        incoming_qos2.insert(r.u16()?);
    }
    let mut queue = VecDeque::new();
    for _ in 0..r.len()? {
        queue.push_back(r.delivery(c)?);
    }
    let last_packet_id = r.u16()?;
    let pending_will = if r.flag()? {
        let message = Arc::new(r.message(c)?);
        let publish_at = c.instant_of(r.u64()?);
        Some(PendingWill {
            message,
            publish_at,
        })
    } else {
        None
    };
    if !r.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(SessionState {
        client_id,
        expiry_interval,
        expires_at,
        subscriptions,
        outgoing,
        send_order,
        incoming_qos2,
        queue,
        last_packet_id,
        pending_will,
        queue_log: Default::default(),
    })
}

#[cfg(test)]
impl RedbStore {
    /// Messages and delivery-block records on disk (a read of the last committed state).
    fn stored_counts(&self) -> (usize, usize) {
        let txn = self.db.begin_read().expect("read");
        let messages = match txn.open_table(MESSAGES) {
            Ok(t) => t
                .iter()
                .expect("iter")
                .map(|row| {
                    let (_, v) = row.expect("row");
                    let mut r = Reader(v.value());
                    r.u8().expect("format");
                    r.u32().expect("count") as usize
                })
                .sum(),
            Err(_) => 0,
        };
        let deliveries = match txn.open_table(DELIVERIES) {
            Ok(t) => t.iter().expect("iter").count(),
            Err(_) => 0,
        };
        (messages, deliveries)
    }
}

#[cfg(test)]
mod tests {
    use mqttd_codec::{Topic, UserProperty};

    use crate::message::Message;

    use super::*;

    fn message(topic: &str, qos: QoS, payload: &'static [u8]) -> SharedMessage {
        Arc::new(Message {
            topic: Topic::new(topic).expect("topic"),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            publisher: Some(Arc::from("pub")),
        })
    }

    fn delivery(m: &SharedMessage) -> Delivery {
        Delivery {
            message: m.clone(),
            qos: m.qos,
            retain: false,
            subscription_ids: vec![3, 9],
            hold: Default::default(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mqttd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_session_and_a_retained_message_survive_reopening() {
        let dir = temp_dir("roundtrip");
        let now = Instant::now();
        let mut m = (*message("a/b", QoS::ExactlyOnce, b"payload")).clone();
        m.properties.user_properties = vec![UserProperty::new(
            mqttd_codec::MqttString::from_static("k").expect("k"),
            mqttd_codec::MqttString::from_static("v").expect("v"),
        )]
        .into();
        m.properties.content_type = Some(mqttd_codec::MqttString::from_static("text").expect("ct"));
        m.expires_at = Some(now + Duration::from_secs(100));
        let m = Arc::new(m);
        let mut s = SessionState::new(Arc::from("client-1"), 3600);
        s.expires_at = Some(now + Duration::from_secs(3600));
        s.subscriptions.insert(
            "$share/g/a/+".into(),
            Subscription {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: false,
                retain_handling: 2,
                subscription_id: Some(7),
            },
        );
        s.outgoing.insert(4, Outgoing::Publish(delivery(&m)));
        s.outgoing.insert(5, Outgoing::Released);
        s.send_order = VecDeque::from([4, 5]);
        s.incoming_qos2.insert(11);
        s.queue
            .push_back(delivery(&message("q", QoS::AtLeastOnce, b"x")));
        s.last_packet_id = 5;
        let mut will = (*message("will", QoS::AtMostOnce, b"bye")).clone();
        will.properties.message_expiry_interval = Some(30);
        s.pending_will = Some(PendingWill {
            message: Arc::new(will),
            publish_at: now + Duration::from_secs(5),
        });
        let mut retained = (*message("r/t", QoS::AtLeastOnce, b"kept")).clone();
        retained.retain = true;
        let retained = Arc::new(retained);
        {
            let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
            store.save_session(&s).expect("save");
            store.save_retained(&retained).expect("save");
            store
                .save_session(&SessionState::new(Arc::from("gone"), 10))
                .expect("save");
            store.remove_session("gone").expect("remove");
            store.commit().expect("commit");
        }
        let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("reopen");
        let loaded = store.load_sessions().expect("load");
        assert_eq!(loaded.len(), 1);
        let l = &loaded[0];
        // Deadlines come back within the clock conversion's rounding (1 ms) and the time passed.
        let close = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => {
                let d = if a > b { a - b } else { b - a };
                d < Duration::from_millis(50)
            }
            (None, None) => true,
            _ => false,
        };
        assert!(close(l.expires_at, s.expires_at));
        let mut l2 = l.clone();
        let mut s2 = s.clone();
        l2.expires_at = None;
        s2.expires_at = None;
        for st in [&mut l2, &mut s2] {
            if let Some(Outgoing::Publish(d)) = st.outgoing.get_mut(&4) {
                let mut msg = (*d.message).clone();
                msg.expires_at = None;
                d.message = Arc::new(msg);
            }
            if let Some(w) = st.pending_will.as_mut() {
                w.publish_at = now;
            }
        }
        assert_eq!(l2, s2);
        let r = store.load_retained().expect("load");
        assert_eq!(r, vec![retained]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_locked_database_is_refused_naming_the_directory() {
        let dir = temp_dir("locked");
        let first = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
        let e = RedbStore::open(&dir, CommitMode::Immediate).expect_err("locked");
        assert!(matches!(e, OpenError::Locked { .. }), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        drop(first);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_corrupted_database_is_refused_naming_the_file_and_the_way_out() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(DB_FILE), vec![0x5Au8; 64 * 1024]).expect("write");
        let e = RedbStore::open(&dir, CommitMode::Immediate).expect_err("corrupted");
        let msg = e.to_string();
        assert!(matches!(e, OpenError::Corrupted { .. }), "{msg}");
        assert!(
            msg.contains(&dir.join(DB_FILE).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("move the file away"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_truncated_database_is_refused_too() {
        let dir = temp_dir("truncated");
        {
            let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
            store
                .save_session(&SessionState::new(Arc::from("c"), 60))
                .expect("save");
            store.commit().expect("commit");
        }
        let file = dir.join(DB_FILE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open file");
        f.set_len(3000).expect("truncate");
        drop(f);
        let e = RedbStore::open(&dir, CommitMode::Immediate).expect_err("truncated");
        assert!(matches!(e, OpenError::Corrupted { .. }), "{e}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let c = Clock::now();
        let s = SessionState::new(Arc::from("c"), 5);
        let mut b = encode_session(&s, &c).expect("encode");
        assert!(decode_session(&b, &c).is_ok());
        for cut in 0..b.len() {
            assert!(decode_session(&b[..cut], &c).is_err(), "cut at {cut}");
        }
        b[2] = 0xFF;
        assert!(decode_session(&b, &c).is_err());
    }

    fn reopen(dir: &Path) -> (RedbStore, Vec<SessionState>) {
        let mut store = RedbStore::open(dir, CommitMode::Immediate).expect("open");
        let mut sessions = store.load_sessions().expect("load");
        sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        (store, sessions)
    }

    fn in_flight(s: &mut SessionState, id: u16, d: Delivery) {
        s.outgoing.insert(id, Outgoing::Publish(d));
        s.send_order.push_back(id);
    }

    fn ack(s: &mut SessionState, id: u16) {
        s.outgoing.remove(&id);
        s.send_order.retain(|p| *p != id);
    }

    #[test]
    fn a_message_held_by_several_sessions_is_stored_once_and_restored_to_each() {
        let dir = temp_dir("shared");
        let m = message("a/b", QoS::AtLeastOnce, b"shared");
        {
            let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
            for (i, name) in ["c1", "c2", "c3"].iter().enumerate() {
                let mut s = SessionState::new(Arc::from(*name), 60);
                if i == 0 {
                    in_flight(&mut s, 7, delivery(&m));
                } else {
                    s.queue.push_back(delivery(&m));
                }
                store.save_session(&s).expect("save");
            }
            store.commit().expect("commit");
            assert_eq!(
                store.stored_counts(),
                (1, 3),
                "one message, a block per session"
            );
        }
        let (store, sessions) = reopen(&dir);
        assert_eq!(sessions.len(), 3);
        let Some(Outgoing::Publish(d)) = sessions[0].outgoing.get(&7) else {
            panic!("in flight: {:?}", sessions[0].outgoing);
        };
        assert_eq!(sessions[0].send_order, VecDeque::from([7]));
        assert_eq!(d, &delivery(&m));
        for s in &sessions[1..] {
            assert_eq!(s.queue, VecDeque::from([delivery(&m)]));
            // Restored once, shared by every session that holds it.
            assert!(Arc::ptr_eq(&s.queue[0].message, &d.message));
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_acknowledged_by_every_session_is_deleted_even_across_a_restart() {
        let dir = temp_dir("gc");
        let m = message("a/b", QoS::AtLeastOnce, b"m");
        let kept = message("a/c", QoS::AtLeastOnce, b"kept");
        let (mut a, mut b) = (
            SessionState::new(Arc::from("a"), 60),
            SessionState::new(Arc::from("b"), 60),
        );
        {
            let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
            // Two commits: `m` and `kept` in two message blocks.
            in_flight(&mut a, 1, delivery(&m));
            in_flight(&mut b, 1, delivery(&m));
            store.save_session(&a).expect("save");
            store.save_session(&b).expect("save");
            store.commit().expect("commit");
            in_flight(&mut a, 2, delivery(&kept));
            store.save_session(&a).expect("save");
            store.commit().expect("commit");
            assert_eq!(store.stored_counts(), (2, 3));
            // `a` acknowledges `m`: `b` still holds it.
            ack(&mut a, 1);
            store.save_session(&a).expect("save");
            store.commit().expect("commit");
            assert_eq!(store.stored_counts().0, 2);
        }
        // Restart after that partial acknowledgement.
        let (mut store, sessions) = reopen(&dir);
        assert_eq!(sessions[0].outgoing.len(), 1, "{:?}", sessions[0].outgoing);
        assert!(sessions[0].outgoing.contains_key(&2));
        let mut b = sessions[1].clone();
        assert_eq!(b.outgoing.get(&1), Some(&Outgoing::Publish(delivery(&m))));
        ack(&mut b, 1);
        store.save_session(&b).expect("save");
        store.commit().expect("commit");
        assert_eq!(
            store.stored_counts(),
            (1, 1),
            "only `kept` and the block of a's that names it are left"
        );
        drop(store);
        let (mut store, sessions) = reopen(&dir);
        assert!(sessions[1].outgoing.is_empty());
        let mut a = sessions[0].clone();
        ack(&mut a, 2);
        store.save_session(&a).expect("save");
        store.remove_session("b").expect("remove");
        store.commit().expect("commit");
        assert_eq!(store.stored_counts(), (0, 0));
        drop(store);
        let (_, sessions) = reopen(&dir);
        assert_eq!(sessions.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_database_in_the_first_format_is_read_and_rewritten() {
        let dir = temp_dir("legacy");
        let c = Clock::now();
        let m = message("a/b", QoS::ExactlyOnce, b"old");
        let mut s = SessionState::new(Arc::from("old"), 60);
        s.subscriptions.insert(
            "a/#".into(),
            Subscription {
                qos: QoS::ExactlyOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: 1,
                subscription_id: None,
            },
        );
        in_flight(&mut s, 3, delivery(&m));
        s.outgoing.insert(4, Outgoing::Released);
        s.send_order.push_back(4);
        s.queue.push_back(delivery(&m));
        s.last_packet_id = 4;
        {
            let db = Database::create(dir.join(DB_FILE)).unwrap_or_else(|_| {
                std::fs::create_dir_all(&dir).expect("mkdir");
                Database::create(dir.join(DB_FILE)).expect("create")
            });
            let txn = db.begin_write().expect("write");
            {
                let mut t = txn.open_table(LEGACY_SESSIONS).expect("table");
                let b = encode_session(&s, &c).expect("encode");
                t.insert("old", b.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let (mut store, sessions) = reopen(&dir);
        assert_eq!(sessions, vec![s.clone()]);
        store.commit().expect("commit");
        drop(store);
        let (store, sessions) = reopen(&dir);
        assert_eq!(sessions, vec![s]);
        // The first format kept a copy of the message per delivery: two, in one block.
        assert_eq!(store.stored_counts(), (2, 1));
        let txn = store.db.begin_read().expect("read");
        assert!(
            matches!(
                txn.open_table(LEGACY_SESSIONS),
                Err(TableError::TableDoesNotExist(_))
            ),
            "the old table is gone"
        );
        drop(txn);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A seeded xorshift: the random walk below is the same on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn link(window: usize) -> crate::session::Link {
        crate::session::Link {
            conn: 1,
            version: ProtocolVersion::V5,
            keep_alive_timeout: Duration::ZERO,
            last_seen: Instant::now(),
            window,
            max_packet_size: usize::MAX,
            alias_max_out: 0,
            aliases_in: Default::default(),
            aliases_out: Default::default(),
            in_transit: 0,
            will: None,
            problem_info: true,
        }
    }

    /// Sessions driven through random enqueues (shared messages, queue overflow), sends,
    /// acknowledgements both QoS, disconnections and redeliveries, saved and committed at
    /// random points and reopened now and then: what comes back is always the state as of the
    /// last commit, and once everything is acknowledged nothing is left on disk.
    #[test]
    fn random_session_changes_are_restored_exactly_and_leave_nothing_behind() {
        use crate::session::Session;
        use mqttd_codec::{PacketId, PubRec};
        let dir = temp_dir("random");
        let now = Instant::now();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
        let mut sessions: Vec<Session> = (0..3)
            .map(|i| {
                let mut s = Session::new(Arc::from(format!("s{i}").as_str()), 600);
                s.link = Some(link(4));
                s
            })
            .collect();
        let mut reopened = 0;
        for step in 0..3000u32 {
            match rng.below(10) {
                // A message for some of the sessions (the same `Arc`).
                0..=3 => {
                    let qos = match rng.below(3) {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        _ => QoS::ExactlyOnce,
                    };
                    let m = Arc::new(Message {
                        topic: Topic::new("t").expect("topic"),
                        payload: Bytes::from(step.to_be_bytes().to_vec()),
                        qos,
                        retain: false,
                        properties: Default::default(),
                        expires_at: None,
                        publisher: None,
                    });
                    for s in &mut sessions {
                        if rng.below(3) > 0 {
                            s.enqueue(
                                Delivery {
                                    message: m.clone(),
                                    qos,
                                    retain: rng.below(2) == 0,
                                    subscription_ids: vec![step % 3],
                                    hold: Default::default(),
                                },
                                6,
                            );
                        }
                    }
                }
                4 | 5 => {
                    let s = &mut sessions[rng.below(3) as usize];
                    let mut out = VecDeque::new();
                    s.pump(usize::MAX, now, &mut out);
                }
                // Acknowledgements of what is in flight.
                6 | 7 => {
                    let s = &mut sessions[rng.below(3) as usize];
                    // Mostly the oldest, sometimes the newest (acknowledgements out of order).
                    let pick = if rng.below(4) == 0 {
                        s.state.send_order.back()
                    } else {
                        s.state.send_order.front()
                    };
                    if let Some(pid) = pick.copied().and_then(PacketId::new) {
                        match s.state.outgoing.get(&pid.get()) {
                            Some(Outgoing::Publish(d)) if d.qos == QoS::AtLeastOnce => {
                                s.on_puback(pid);
                            }
                            Some(Outgoing::Publish(_)) => {
                                s.on_pubrec(&PubRec::new(pid));
                            }
                            _ => s.on_pubcomp(pid),
                        }
                    }
                }
                8 => {
                    let s = &mut sessions[rng.below(3) as usize];
                    if s.link.is_some() {
                        s.link = None;
                    } else {
                        s.link = Some(link(4));
                        let mut out = VecDeque::new();
                        s.redeliver(now, &mut out);
                    }
                }
                _ => {
                    for s in &sessions {
                        if rng.below(2) == 0 {
                            store.save_session(&s.state).expect("save");
                        }
                    }
                    if rng.below(2) == 0 {
                        store.commit().expect("commit");
                    }
                }
            }
            if step % 500 == 499 {
                for s in &sessions {
                    store.save_session(&s.state).expect("save");
                }
                store.commit().expect("commit");
                drop(store);
                let (st, loaded) = reopen(&dir);
                store = st;
                reopened += 1;
                assert_eq!(loaded.len(), 3);
                for (s, l) in sessions.iter_mut().zip(loaded) {
                    assert_eq!(l, s.state, "step {step}");
                    // Go on from what was restored (the store's view of it came from disk).
                    s.state = l;
                }
            }
        }
        assert_eq!(reopened, 6);
        // Everything acknowledged and dropped: nothing is left.
        for s in &mut sessions {
            s.state.outgoing.clear();
            s.state.send_order.clear();
            while s.state.queue.pop_front().is_some() {
                s.state.queue_log.popped += 1;
            }
            store.save_session(&s.state).expect("save");
        }
        store.commit().expect("commit");
        assert_eq!(store.stored_counts(), (0, 0));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_block_mostly_acknowledged_is_rewritten_with_what_is_left() {
        let dir = temp_dir("compact");
        let ms: Vec<SharedMessage> = (0..4)
            .map(|i| message("t", QoS::AtLeastOnce, [b"0", b"1", b"2", b"3"][i]))
            .collect();
        let mut s = SessionState::new(Arc::from("c"), 60);
        let mut store = RedbStore::open(&dir, CommitMode::Immediate).expect("open");
        for (i, m) in ms.iter().enumerate() {
            in_flight(&mut s, i as u16 + 1, delivery(m));
        }
        store.save_session(&s).expect("save");
        store.commit().expect("commit");
        assert_eq!(store.stored_counts(), (4, 1));
        // Half acknowledged: kept as written (at most half of a block is dead weight).
        ack(&mut s, 1);
        ack(&mut s, 2);
        store.save_session(&s).expect("save");
        store.commit().expect("commit");
        assert_eq!(store.stored_counts(), (4, 1));
        // Less than half left: the block is rewritten with it alone.
        ack(&mut s, 4);
        store.save_session(&s).expect("save");
        store.commit().expect("commit");
        assert_eq!(store.stored_counts(), (1, 1));
        drop(store);
        let (_, loaded) = reopen(&dir);
        assert_eq!(loaded, vec![s]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
