//! What durability costs where it does work: fan-in QoS 1 to one *persistent* subscriber (every
//! message is stored in its session before the PUBACK), with the broker in this process.
//!
//! `cargo run --release -p mqttd --example durable_fanin -- [memory|sync|periodic|none|PORT] [SECONDS] [PUBLISHERS]`
//!
//! A number instead of a mode measures the broker already listening on that loopback port
//! (mosquitto, for instance) with the same clients.
//!
//! Prints acknowledged and delivered messages per second and the delivery latency (p50/p99).
//! `mqttd-bench` measures clean sessions, for which no storage is involved at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mqttd::config::{Config, Durability, StorageKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "sync".into());
    let secs: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8);
    let publishers: usize = std::env::args()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("mqttd-durable-fanin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (storage, durability) = match mode.as_str() {
        "memory" => (StorageKind::Memory, Durability::Sync),
        "periodic" => (StorageKind::Redb, Durability::Periodic),
        "none" => (StorageKind::Redb, Durability::None),
        _ => (StorageKind::Redb, Durability::Sync),
    };
    let mut config = Config {
        listen: "127.0.0.1:0".parse()?,
        http_listen: None,
        sys_interval: None,
        storage,
        durability,
        data_dir: dir.clone(),
        ..Config::default()
    };
    config.limits.max_queued_messages = 1_000_000;
    let external: Option<u16> = mode.parse().ok();
    let running = match external {
        Some(_) => None,
        None => Some(mqttd::server::start(config).await?),
    };
    let port = match (&running, external) {
        (Some(r), _) => r.mqtt_addr.port(),
        (None, Some(p)) => p,
        (None, None) => return Err("no broker".into()),
    };
    let epoch = Instant::now();

    let mut o = MqttOptions::new("durable-sub", "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(60));
    let (sub, mut sub_el) = AsyncClient::new(o, 100);
    sub.subscribe("bench/#", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_el.poll().await? {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = received.clone();
    let subscriber = tokio::spawn(async move {
        let mut latencies = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(3), sub_el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    rx.fetch_add(1, Ordering::Relaxed);
                    if p.payload.len() >= 8 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&p.payload[..8]);
                        let sent = u64::from_be_bytes(b);
                        let now = epoch.elapsed().as_micros() as u64;
                        latencies.push(now.saturating_sub(sent));
                    }
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        latencies
    });

    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let acked = acked.clone();
        let stop = stop.clone();
        let mut o = MqttOptions::new(format!("durable-pub-{i}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_inflight(64);
        let (client, mut el) = AsyncClient::new(o, 64);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut payload = vec![b'x'; 64];
                payload[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
                if client
                    .publish(format!("bench/{i}"), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = ev {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let acked_n = acked.load(Ordering::Relaxed);
    let mut latencies = subscriber.await?;
    for t in &tasks {
        t.abort();
    }
    latencies.sort_unstable();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{mode}: {publishers} publishers -> 1 persistent subscriber, QoS 1, 64 B, {secs} s: \
         acked {} msg/s, delivered {} msg/s, latency p50 {} us p99 {} us",
        acked_n / secs,
        received.load(Ordering::Relaxed) / secs,
        q(0.5),
        q(0.99)
    );
    if let Some(running) = running {
        tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
