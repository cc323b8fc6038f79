//! Faults, each with a clear outcome and no silent loss: a data directory locked by another
//! running broker, a corrupted database file, a commit that fails (the fault-injecting store
//! wrapper below, in a broker served over real TCP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mqttd::config::{Config, StorageKind};
use mqttd::message::SharedMessage;
use mqttd::store::{MemoryStore, SessionState, Store, StoreError};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::{Broker, TempDir, WAIT, poll_until, v5_publish_reason};

#[test]
fn a_second_broker_on_a_locked_data_directory_refuses_to_start() {
    let dir = TempDir::new("locked");
    let first = Broker::start(&dir.0, &[]);
    let stderr = match Broker::try_start(&dir.0, &[]) {
        Ok(_) => panic!("a second broker started on a locked data directory"),
        Err(e) => e,
    };
    let shown = dir.0.display().to_string();
    assert!(
        stderr.contains(&shown),
        "the message names the directory: {stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    // The first one is unharmed.
    assert!(std::net::TcpStream::connect(first.addr).is_ok());
    first.kill();
    // And once it is gone, the directory is usable again.
    Broker::start(&dir.0, &[]).kill();
}

#[test]
fn a_corrupted_database_file_is_refused_naming_the_file_and_the_way_out() {
    let dir = TempDir::new("corrupt");
    // A real database first, then damaged: its header overwritten.
    Broker::start(&dir.0, &[]).kill();
    let file = dir.0.join(mqttd::store_redb::DB_FILE);
    let mut bytes = std::fs::read(&file).expect("read database");
    for b in bytes.iter_mut().take(4096) {
        *b = 0xA5;
    }
    std::fs::write(&file, &bytes).expect("write database");
    let stderr = match Broker::try_start(&dir.0, &[]) {
        Ok(_) => panic!("started on a corrupted database"),
        Err(e) => e,
    };
    assert!(
        stderr.contains(&file.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("move the file away"),
        "says how to recover: {stderr}"
    );
    // Truncated: the same.
    std::fs::write(&file, &bytes[..3000]).expect("truncate");
    let stderr = match Broker::try_start(&dir.0, &[]) {
        Ok(_) => panic!("started on a truncated database"),
        Err(e) => e,
    };
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(
        !stderr.contains("panicked"),
        "a message, not a panic: {stderr}"
    );
}

/// A store whose commits fail while `fail` is set and something was written since the last
/// successful commit (a full disk, an I/O error): the fault-injecting wrapper.
struct Faulty {
    inner: MemoryStore,
    fail: Arc<AtomicBool>,
    pending: bool,
}

impl Store for Faulty {
    fn load_sessions(&mut self) -> Result<Vec<SessionState>, StoreError> {
        self.inner.load_sessions()
    }
    fn save_session(&mut self, state: &SessionState) -> Result<(), StoreError> {
        self.pending = true;
        self.inner.save_session(state)
    }
    fn remove_session(&mut self, client_id: &str) -> Result<(), StoreError> {
        self.pending = true;
        self.inner.remove_session(client_id)
    }
    fn load_retained(&mut self) -> Result<Vec<SharedMessage>, StoreError> {
        self.inner.load_retained()
    }
    fn save_retained(&mut self, message: &SharedMessage) -> Result<(), StoreError> {
        self.pending = true;
        self.inner.save_retained(message)
    }
    fn remove_retained(&mut self, topic: &str) -> Result<(), StoreError> {
        self.pending = true;
        self.inner.remove_retained(topic)
    }
    fn commit(&mut self) -> Result<(), StoreError> {
        if self.pending && self.fail.load(Ordering::SeqCst) {
            return Err(StoreError(
                "I/O error: No space left on device (os error 28)".into(),
            ));
        }
        self.pending = false;
        Ok(())
    }
}

type V5 = (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop);

async fn v5_connect(addr: SocketAddr, id: &str) -> V5 {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    poll_until(&mut el, &format!("{id}: CONNACK"), |ev| match ev {
        Ok(rumqttc::v5::Event::Incoming(P5::ConnAck(_))) => Some(()),
        Ok(_) => None,
        Err(e) => panic!("5.0 connection failed: {e}"),
    })
    .await;
    (client, el)
}

async fn v5_publish(c: &mut V5, retain: bool) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    v5_publish_reason(
        &c.0,
        &mut c.1,
        "faulty/t",
        retain,
        b"x".to_vec(),
        "5.0 connection",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_never_acknowledged() {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let fail = Arc::new(AtomicBool::new(false));
    let store = Faulty {
        inner: MemoryStore::new(),
        fail: fail.clone(),
        pending: false,
    };
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: None,
        sys_interval: None,
        storage: StorageKind::Redb,
        ..Config::default()
    };
    let running = mqttd::server::start_with_store(config, Box::new(store))
        .await
        .expect("start");
    let addr = running.mqtt_addr;
    // A persistent subscriber, so that a message has somewhere to be stored.
    let mut o = MqttOptions::new("faulty-sub", "127.0.0.1", addr.port());
    o.set_clean_session(false);
    let (sub, mut sub_el) = AsyncClient::new(o, 10);
    sub.subscribe("faulty/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    poll_until(&mut sub_el, "subscriber: SUBACK", |ev| match ev {
        Ok(Event::Incoming(Packet::SubAck(_))) => Some(()),
        Ok(_) => None,
        Err(e) => panic!("subscriber: {e}"),
    })
    .await;
    sub.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, async { while sub_el.poll().await.is_ok() {} }).await;

    let mut v5 = v5_connect(addr, "faulty-v5a").await;
    let mut v5_retain = v5_connect(addr, "faulty-v5b").await;
    assert_eq!(v5_publish(&mut v5, false).await, PubAckReason::Success);

    fail.store(true, Ordering::SeqCst);
    // 5.0: a failure reason code instead of the acknowledgement, plain and retained.
    assert_eq!(
        v5_publish(&mut v5, false).await,
        PubAckReason::UnspecifiedError
    );
    assert_eq!(
        v5_publish(&mut v5_retain, true).await,
        PubAckReason::UnspecifiedError
    );

    // 3.1.1 has no way to say "not stored": the connection is closed, never acknowledged.
    let mut o = MqttOptions::new("faulty-v3", "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 10);
    client
        .publish("faulty/t", QoS::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    poll_until(&mut el, "3.1.1: the connection closed", |ev| match ev {
        Ok(Event::Incoming(Packet::PubAck(_))) => panic!("3.1.1 PUBACK for what was not stored"),
        Ok(_) => None,
        Err(_) => Some(()),
    })
    .await;

    // Once the store works again, so do acknowledgements (what was refused stays pending in
    // the store and is retried by this commit).
    fail.store(false, Ordering::SeqCst);
    let mut v5 = v5_connect(addr, "faulty-v5c").await;
    assert_eq!(v5_publish(&mut v5, false).await, PubAckReason::Success);
    tokio::time::timeout(WAIT, running.shutdown())
        .await
        .expect("shutdown");
}
