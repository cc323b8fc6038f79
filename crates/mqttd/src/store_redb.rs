//! [`RedbStore`]: the durable [`Store`], one redb database file (`mqttd.redb`) in the data
//! directory.
//!
//! Layout: table `sessions` maps a client id to the encoded [`SessionState`] of that persistent
//! session (subscriptions, queued and in-flight messages both ways, packet-id state, a pending
//! will); table `retained` maps a topic to its encoded retained message.
//!
//! Writes are buffered: [`Store::save_session`] and friends only record the new value (a
//! snapshot of the session, the retained message) in a pending map (a later save of the same
//! key replaces an earlier one). [`Store::start_commit`] hands the pending map to the store's
//! writer thread, which encodes every value and writes them in one redb write transaction
//! (one fsync) while the caller goes on: the broker's core keeps decoding and routing the next
//! batch of events while the previous batch is being made durable, and releases a batch's
//! acknowledgements when its commit completes (pipelined group commit). Commits are written in
//! the order they were started. A failed commit keeps its changes in the writer, under the
//! newer ones of the next commit, so the next commit retries them.
//!
//! Times: every deadline (`expires_at`, a will's `publish_at`) is stored as wall-clock
//! milliseconds since the Unix epoch and turned back into an `Instant` at load, so message and
//! session expiry keep counting while the broker is down.
//!
//! Messages are stored as MQTT 5.0 PUBLISH packets encoded by the codec (all properties
//! included), next to what the packet does not carry (expiry deadline, publisher).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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
use crate::store::{
    CommitTicket, Completer, Delivery, MemoryStore, Outgoing, PendingWill, SessionState, Store,
    StoreError, Subscription,
};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

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
            .field(
                "pending",
                &(self.pending.sessions.len() + self.pending.retained.len()),
            )
            .field("mode", &self.mode)
            .finish()
    }
}

/// A change waiting for a commit, encoded by the writer thread (off the broker's core).
enum Op {
    Session(Box<SessionState>),
    Retained(SharedMessage),
    Remove,
}

/// Changes by key; a later change of a key replaces an earlier one.
#[derive(Default)]
struct Batch {
    sessions: HashMap<String, Op>,
    retained: HashMap<String, Op>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.retained.is_empty()
    }

    /// Adds `older` changes under these: a key changed in both keeps this batch's change.
    fn merge_older(&mut self, older: Batch) {
        for (k, v) in older.sessions {
            self.sessions.entry(k).or_insert(v);
        }
        for (k, v) in older.retained {
            self.retained.entry(k).or_insert(v);
        }
    }
}

/// A commit for the writer thread.
struct Job {
    batch: Batch,
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
            let mut newer = job.batch;
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

/// Encodes and writes `batch` in one write transaction. Values that cannot be encoded (larger
/// than the format allows) are logged and dropped from the batch, and fail this commit.
fn write_batch(db: &Database, batch: &mut Batch, mode: CommitMode) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let clock = Clock::now();
    let mut unencodable = None;
    let mut encode = |key: &str, op: &Op| -> Option<Option<Vec<u8>>> {
        let bytes = match op {
            Op::Remove => return Some(None),
            Op::Session(s) => encode_session(s, &clock),
            Op::Retained(m) => {
                let mut w = vec![FORMAT];
                put_message(&mut w, m, &clock).map(|()| w)
            }
        };
        match bytes {
            Ok(b) => Some(Some(b)),
            Err(e) => {
                tracing::error!(key, error = %e, "cannot encode a record; it is not stored");
                unencodable
                    .get_or_insert_with(Vec::new)
                    .push(key.to_owned());
                None
            }
        }
    };
    let written = (|| {
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(match mode {
            CommitMode::Immediate => redb::Durability::Immediate,
            CommitMode::Deferred => redb::Durability::None,
        });
        {
            let mut t = txn.open_table(SESSIONS).map_err(err)?;
            for (k, op) in &batch.sessions {
                match encode(k, op) {
                    Some(Some(b)) => t.insert(k.as_str(), b.as_slice()).map(drop),
                    Some(None) => t.remove(k.as_str()).map(drop),
                    None => Ok(()),
                }
                .map_err(err)?;
            }
            let mut t = txn.open_table(RETAINED).map_err(err)?;
            for (k, op) in &batch.retained {
                match encode(k, op) {
                    Some(Some(b)) => t.insert(k.as_str(), b.as_slice()).map(drop),
                    Some(None) => t.remove(k.as_str()).map(drop),
                    None => Ok(()),
                }
                .map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    })();
    if let Some(keys) = unencodable {
        for k in &keys {
            batch.sessions.remove(k);
            batch.retained.remove(k);
        }
        written?;
        return Err(StoreError(format!(
            "cannot encode {} record(s), the first `{}`",
            keys.len(),
            keys[0]
        )));
    }
    written?;
    batch.sessions.clear();
    batch.retained.clear();
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
        let (ticket, done) = CommitTicket::pending();
        let job = Job {
            batch: std::mem::take(&mut self.pending),
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
                self.pending.merge_older(job.batch);
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
        self.load(SESSIONS, decode_session)
    }

    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
        // A snapshot (messages are shared, not copied); the writer thread encodes it.
        self.pending.sessions.insert(
            state.client_id.as_ref().to_owned(),
            Op::Session(Box::new(state.clone())),
        );
        Ok(())
    }

    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
        self.pending
            .sessions
            .insert(client_id.to_owned(), Op::Remove);
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
        self.pending.retained.insert(
            message.topic.as_str().to_owned(),
            Op::Retained(message.clone()),
        );
        Ok(())
    }

    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
        self.pending.retained.insert(topic.to_owned(), Op::Remove);
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

fn encode_session(s: &SessionState, c: &Clock) -> Result<Vec<u8>, String> {
    let mut w = vec![FORMAT];
    put_bytes(&mut w, s.client_id.as_bytes())?;
    put_u32(&mut w, s.expiry_interval);
    put_opt_time(&mut w, s.expires_at, c);
    put_len(&mut w, s.subscriptions.len())?;
    for (filter, sub) in &s.subscriptions {
        put_bytes(&mut w, filter.as_bytes())?;
        w.push(sub.qos as u8);
        w.push(u8::from(sub.no_local) | u8::from(sub.retain_as_published) << 1);
        w.push(sub.retain_handling);
        match sub.subscription_id {
            Some(id) => {
                w.push(1);
                put_u32(&mut w, id);
            }
            None => w.push(0),
        }
    }
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

/// Reads an encoded record; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
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

    fn bytes(&mut self) -> Result<&[u8], String> {
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
    let mut subscriptions = BTreeMap::new();
    for _ in 0..r.len()? {
        let filter = r.string()?;
        let qos = r.qos()?;
        let flags = r.u8()?;
        let retain_handling = r.u8()?;
        let subscription_id = if r.flag()? { Some(r.u32()?) } else { None };
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
    })
}

#[cfg(test)]
mod tests {
    use mqttd_codec::{Topic, UserProperty};

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
}
