//! SIGKILL the broker at seeded random moments while a rumqttc client publishes QoS 1, QoS 2 and
//! retained messages to offline persistent subscribers and QoS 1 messages to an online one
//! alone (whose acknowledgement may release the PUBACK before any commit); restart on the same
//! data directory each time; at the end every acknowledged message must be delivered (QoS 2
//! exactly once) with Session Present, and every acknowledged retained message must still be
//! retained.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::{Broker, TempDir, WAIT, poll_until};

/// Rounds of publish-then-SIGKILL (one more kill comes after the subscriptions are made).
const ROUNDS: u64 = 22;
/// Messages a round publishes at most (of each QoS) before the kill comes anyway.
const MAX_PER_ROUND: u64 = 3000;

/// splitmix64: a small seeded generator, enough for choosing kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Q1,
    /// QoS 1 to `crash/on`, which only the online persistent subscriber has.
    Q1Online,
    Q2,
    Retained,
}

/// What the publisher saw acknowledged: PUBACK for QoS 1, PUBREC for QoS 2 (the broker has
/// taken the message over at that point).
#[derive(Default)]
struct Acked {
    q1: HashSet<String>,
    q2: HashSet<String>,
    retained: HashMap<String, String>,
    /// QoS 1 to `crash/on` (only the online subscriber holds them).
    q1_online: HashSet<String>,
    /// What the online persistent subscriber of `crash/q1` and `crash/on` received during the
    /// rounds.
    online: HashSet<String>,
}

/// Connects the online persistent subscriber, checks Session Present, and collects what it
/// receives until its connection dies with the broker.
async fn online_subscriber(addr: SocketAddr) -> tokio::task::JoinHandle<Vec<String>> {
    let (client, mut el) = AsyncClient::new(options("sub-on", addr, false), 10);
    let ack = poll_until(&mut el, "sub-on: CONNACK", |ev| match ev {
        Ok(Event::Incoming(Packet::ConnAck(a))) => Some(a),
        Ok(_) => None,
        Err(e) => panic!("online subscriber: {e}"),
    })
    .await;
    assert!(
        ack.session_present,
        "sub-on: Session Present after a restart"
    );
    tokio::spawn(async move {
        let _client = client;
        let mut got = Vec::new();
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
        got
    })
}

fn options(id: &str, addr: SocketAddr, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o
}

/// Connects a persistent session, subscribes, waits for the SUBACK and leaves.
async fn subscribe_and_leave(addr: SocketAddr, id: &str, filter: &str, qos: QoS) {
    let (client, mut el) = AsyncClient::new(options(id, addr, false), 10);
    client.subscribe(filter, qos).await.expect("subscribe");
    poll_until(&mut el, &format!("{id}: SUBACK"), |ev| match ev {
        Ok(Event::Incoming(Packet::SubAck(_))) => Some(()),
        Ok(_) => None,
        Err(e) => panic!("{id}: {e}"),
    })
    .await;
    client.disconnect().await.expect("disconnect");
    // Until the DISCONNECT is out and the broker closes.
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(ev) = el.poll().await {
            if let Event::Outgoing(Outgoing::Disconnect) = ev {
                break;
            }
        }
    })
    .await;
}

/// Publishes from a fresh clean-session client until `kill_after` has passed, then SIGKILLs
/// the broker and records what was acknowledged before the connection died.
async fn publish_until_killed(broker: Broker, round: u64, kill_after: Duration, acked: &mut Acked) {
    let online = online_subscriber(broker.addr).await;
    let (client, mut el) =
        AsyncClient::new(options(&format!("pub-{round}"), broker.addr, true), 64);
    let sent: Arc<Mutex<VecDeque<(Kind, String, String)>>> = Arc::default();
    let queue = sent.clone();
    let producer = tokio::spawn(async move {
        for i in 0..MAX_PER_ROUND {
            let batch = [
                (Kind::Q1, "crash/q1".to_owned(), format!("q1-{round}-{i}")),
                (Kind::Q2, "crash/q2".to_owned(), format!("q2-{round}-{i}")),
                (
                    Kind::Q1Online,
                    "crash/on".to_owned(),
                    format!("on-{round}-{i}"),
                ),
            ];
            for (kind, topic, payload) in batch {
                let qos = if kind == Kind::Q2 {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                // Recorded before the request: the event loop sends in request order.
                queue
                    .lock()
                    .expect("lock")
                    .push_back((kind, topic.clone(), payload.clone()));
                if client.publish(topic, qos, false, payload).await.is_err() {
                    return;
                }
            }
            if i % 10 == 0 {
                let topic = format!("crash/retained/{round}-{i}");
                let payload = format!("r-{round}-{i}");
                queue.lock().expect("lock").push_back((
                    Kind::Retained,
                    topic.clone(),
                    payload.clone(),
                ));
                if client
                    .publish(topic, QoS::AtLeastOnce, true, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    let mut by_pkid: HashMap<u16, (Kind, String, String)> = HashMap::new();
    let kill_at = tokio::time::Instant::now() + kill_after;
    let mut broker = Some(broker);
    let give_up = tokio::time::Instant::now() + kill_after + WAIT;
    loop {
        let ev = tokio::select! {
            ev = el.poll() => ev,
            _ = tokio::time::sleep_until(kill_at), if broker.is_some() => {
                if let Some(b) = broker.take() {
                    b.kill();
                }
                continue;
            }
            _ = tokio::time::sleep_until(give_up) => panic!("the connection outlived the broker"),
        };
        match ev {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(entry) = sent.lock().expect("lock").pop_front() {
                    by_pkid.insert(pkid, entry);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some((kind, topic, payload)) = by_pkid.remove(&a.pkid) {
                    match kind {
                        Kind::Q1 => {
                            acked.q1.insert(payload);
                        }
                        Kind::Q1Online => {
                            acked.q1_online.insert(payload);
                        }
                        Kind::Retained => {
                            acked.retained.insert(topic, payload);
                        }
                        Kind::Q2 => panic!("PUBACK for a QoS 2 message"),
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubRec(r))) => {
                if let Some((Kind::Q2, _, payload)) = by_pkid.get(&r.pkid) {
                    acked.q2.insert(payload.clone());
                }
            }
            Ok(Event::Incoming(Packet::PubComp(c))) => {
                by_pkid.remove(&c.pkid);
            }
            Ok(_) => {}
            Err(_) if broker.is_none() => break,
            Err(e) => panic!("connection failed before the kill: {e}"),
        }
    }
    producer.abort();
    let got = tokio::time::timeout(WAIT, online)
        .await
        .expect("the online subscriber ends with the broker")
        .expect("online subscriber task");
    acked.online.extend(got);
}

/// Reconnects a persistent subscriber: asserts Session Present and collects what arrives
/// until `want` is covered and nothing more came for a while.
async fn drain(addr: SocketAddr, id: &str, want: &HashSet<String>) -> Vec<String> {
    let (_client, mut el) = AsyncClient::new(options(id, addr, false), 10);
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    // Thousands of QoS 2 messages, each flow step committed (fsync) before it goes on: on a
    // loaded machine (CI, or parallel copies of this test) that takes a while; bounded anyway.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut connacked = false;
    loop {
        let idle = if seen.is_superset(want) {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3)
        };
        let ev = match tokio::time::timeout(idle, el.poll()).await {
            Err(_) => break,
            Ok(ev) => ev.expect("subscriber connection"),
        };
        match ev {
            Event::Incoming(Packet::ConnAck(a)) => {
                assert!(
                    a.session_present,
                    "{id}: Session Present after the restarts"
                );
                connacked = true;
            }
            Event::Incoming(Packet::Publish(p)) => {
                let s = String::from_utf8_lossy(&p.payload).into_owned();
                seen.insert(s.clone());
                got.push(s);
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "{id}: still draining");
    }
    assert!(connacked, "{id}: no CONNACK");
    got
}

async fn retained(addr: SocketAddr) -> HashMap<String, String> {
    retained_under(addr, "crash/retained/#").await
}

/// Every retained message under `filter`, topic to payload.
async fn retained_under(addr: SocketAddr, filter: &str) -> HashMap<String, String> {
    let (client, mut el) = AsyncClient::new(options("retained-check", addr, true), 10);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut got = HashMap::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(800), el.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.insert(
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("retained check: {e}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let seed = std::env::var("MQTTD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d71_7474_6431_u64);
    let durability = std::env::var("MQTTD_CRASH_DURABILITY").unwrap_or_else(|_| "sync".into());
    eprintln!("crash test: seed {seed}, durability {durability}");
    let started = Instant::now();
    let mut rng = Rng(seed);
    let dir = TempDir::new("crash");
    let args = ["--durability", durability.as_str()];

    let b = Broker::start(&dir.0, &args);
    subscribe_and_leave(b.addr, "sub-q1", "crash/q1", QoS::AtLeastOnce).await;
    subscribe_and_leave(b.addr, "sub-q2", "crash/q2", QoS::ExactlyOnce).await;
    subscribe_and_leave(b.addr, "sub-on", "crash/q1", QoS::AtLeastOnce).await;
    subscribe_and_leave(b.addr, "sub-on", "crash/on", QoS::AtLeastOnce).await;
    b.kill();
    let mut kills = 1;

    let mut acked = Acked::default();
    for round in 0..ROUNDS {
        let b = Broker::start(&dir.0, &args);
        let kill_after = Duration::from_millis(rng.range(20, 400));
        publish_until_killed(b, round, kill_after, &mut acked).await;
        kills += 1;
    }
    eprintln!(
        "{kills} kills in {:?}; acknowledged: {} QoS 1, {} QoS 1 to the online subscriber \
         alone, {} QoS 2, {} retained",
        started.elapsed(),
        acked.q1.len(),
        acked.q1_online.len(),
        acked.q2.len(),
        acked.retained.len()
    );
    assert!(kills >= 20);
    assert!(
        !acked.q1.is_empty()
            && !acked.q1_online.is_empty()
            && !acked.q2.is_empty()
            && !acked.retained.is_empty(),
        "the rounds acknowledged nothing: the test would prove nothing"
    );

    let b = Broker::start(&dir.0, &args);
    let q1 = drain(b.addr, "sub-q1", &acked.q1).await;
    let q2 = drain(b.addr, "sub-q2", &acked.q2).await;
    let kept = retained(b.addr).await;
    let for_online: HashSet<String> = acked.q1.union(&acked.q1_online).cloned().collect();
    let missing_online: HashSet<String> = for_online.difference(&acked.online).cloned().collect();
    let online_rest = drain(b.addr, "sub-on", &missing_online).await;
    let online_all: HashSet<&String> = acked.online.iter().chain(online_rest.iter()).collect();
    let lost_online: Vec<&String> = for_online
        .iter()
        .filter(|m| !online_all.contains(m))
        .collect();

    let q1_set: HashSet<&String> = q1.iter().collect();
    let lost_q1: Vec<&String> = acked.q1.iter().filter(|m| !q1_set.contains(m)).collect();
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for m in &q2 {
        *counts.entry(m).or_default() += 1;
    }
    let lost_q2: Vec<&String> = acked
        .q2
        .iter()
        .filter(|m| !counts.contains_key(m))
        .collect();
    let dup_q2: Vec<&&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(m, _)| m)
        .collect();
    let lost_retained: Vec<&String> = acked
        .retained
        .iter()
        .filter(|(t, p)| kept.get(*t) != Some(p))
        .map(|(t, _)| t)
        .collect();
    eprintln!(
        "delivered after restart: {} QoS 1 ({} duplicates), {} QoS 2; online subscriber: {} \
         during the rounds, {} after; lost: {} QoS 1, {} QoS 1 online, {} QoS 2, {} retained; \
         QoS 2 duplicates: {}; total {:?}",
        q1.len(),
        q1.len() - q1_set.len(),
        q2.len(),
        acked.online.len(),
        online_rest.len(),
        lost_q1.len(),
        lost_online.len(),
        lost_q2.len(),
        lost_retained.len(),
        dup_q2.len(),
        started.elapsed()
    );
    assert!(
        lost_q1.is_empty(),
        "acknowledged QoS 1 lost: {:?}",
        &lost_q1[..lost_q1.len().min(10)]
    );
    assert!(
        lost_online.is_empty(),
        "acknowledged QoS 1 lost for the online subscriber: {:?}",
        &lost_online[..lost_online.len().min(10)]
    );
    assert!(
        lost_q2.is_empty(),
        "acknowledged QoS 2 lost: {:?}",
        &lost_q2[..lost_q2.len().min(10)]
    );
    assert!(
        dup_q2.is_empty(),
        "QoS 2 delivered twice: {:?}",
        &dup_q2[..dup_q2.len().min(10)]
    );
    assert!(
        lost_retained.is_empty(),
        "acknowledged retained lost: {:?}",
        &lost_retained[..lost_retained.len().min(10)]
    );
}

/// `durability = "periodic"`: acknowledged at once, on disk within `commit_interval_ms`; a
/// SIGKILL after that interval loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_durability_commits_within_its_interval() {
    let dir = TempDir::new("periodic");
    let args = ["--durability", "periodic", "--commit-interval-ms", "50"];
    let b = Broker::start(&dir.0, &args);
    subscribe_and_leave(b.addr, "sub-periodic", "periodic/t", QoS::AtLeastOnce).await;
    let (client, mut el) = AsyncClient::new(options("pub-periodic", b.addr, true), 10);
    client
        .publish("periodic/t", QoS::AtLeastOnce, true, "kept")
        .await
        .expect("publish");
    poll_until(&mut el, "pub-periodic: PUBACK", |ev| match ev {
        Ok(Event::Incoming(Packet::PubAck(_))) => Some(()),
        Ok(_) => None,
        Err(e) => panic!("publisher: {e}"),
    })
    .await;
    // Several commit intervals, then a crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    let b = Broker::start(&dir.0, &args);
    let want: HashSet<String> = ["kept".to_owned()].into();
    let got = drain(b.addr, "sub-periodic", &want).await;
    assert_eq!(got, vec!["kept".to_owned()]);
    let kept = retained_under(b.addr, "periodic/#").await;
    assert_eq!(kept.get("periodic/t").map(String::as_str), Some("kept"));
}
