//! Restart time with a large durable state: writes SESSIONS persistent sessions with PER_SESSION
//! queued QoS 1 messages each into a fresh redb data directory, then times what a start does
//! (open the database, load and index every session: `Broker::new`).
//!
//! `cargo run --release -p mqttd --example restore -- [SESSIONS] [PER_SESSION] [PAYLOAD_BYTES]`
//! (defaults: 10000 100 64, i.e. one million queued messages).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use mqttd::broker::{Broker, BrokerOptions};
use mqttd::config::{Anonymous, Limits};
use mqttd::message::Message;
use mqttd::metrics::Metrics;
use mqttd::store::{Delivery, SessionState, Store, Subscription};
use mqttd::store_redb::{CommitMode, RedbStore};
use mqttd_codec::{QoS, Topic};

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sessions = arg(1, 10_000);
    let per_session = arg(2, 100);
    let size = arg(3, 64);
    let dir = std::env::temp_dir().join(format!("mqttd-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let started = Instant::now();
    {
        let mut store = RedbStore::open(&dir, CommitMode::Immediate)?;
        let payload = Bytes::from(vec![b'x'; size]);
        for s in 0..sessions {
            let id = format!("client-{s}");
            let mut state = SessionState::new(Arc::from(id.as_str()), u32::MAX);
            state.subscriptions.insert(
                format!("t/{s}/#"),
                Subscription {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                },
            );
            for m in 0..per_session {
                let message = Arc::new(Message {
                    topic: Topic::new(&format!("t/{s}/{m}"))?,
                    payload: payload.clone(),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                    expires_at: None,
                    publisher: Some(Arc::from("publisher")),
                });
                state.queue.push_back(Delivery {
                    message,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    subscription_ids: Vec::new(),
                    hold: Default::default(),
                });
            }
            store.save_session(&state)?;
            if s % 1000 == 999 {
                store.commit()?;
            }
        }
        store.commit()?;
    }
    let size_mb = std::fs::metadata(dir.join(mqttd::store_redb::DB_FILE))?.len() as f64 / 1e6;
    println!(
        "wrote {sessions} sessions x {per_session} queued messages ({size} B payloads) in {:.2?}: {size_mb:.0} MB",
        started.elapsed()
    );

    let started = Instant::now();
    let store = RedbStore::open(&dir, CommitMode::Immediate)?;
    let opened = started.elapsed();
    let opts = BrokerOptions {
        limits: Limits::default(),
        allow_anonymous: Anonymous::Loopback,
    };
    let broker = Broker::new(opts, store, Arc::new(Metrics::new()), Instant::now())?;
    let r = broker.restored();
    println!(
        "restart: open {opened:.2?}, total {:.2?}: {} sessions, {} subscriptions, {} queued, {} in flight",
        started.elapsed(),
        r.sessions,
        r.subscriptions,
        r.queued,
        r.inflight
    );
    drop(broker);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
