//! A real full disk: the data directory on a small tmpfs, filled up while the broker runs.
//! Mounting needs root (CAP_SYS_ADMIN), as CI has; without it the test fails and says so (it
//! never passes without running). The fault-injecting store in `faults.rs` covers the same
//! error path without root.
//!
//! Once a commit fails for lack of space, a 5.0 publisher gets PUBACK 0x80 (or 0x97) and a
//! 3.1.1 publisher a closed connection, never an acknowledgement; after the space is freed and
//! the broker restarted on the same directory, every message that was acknowledged is there.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::{Broker, TempDir, WAIT, poll_until, v5_publish_reason};

/// Payload size: big enough to fill the file system in a few hundred messages, small enough
/// for rumqttc's default packet size limit (10 KiB).
const PAYLOAD: usize = 8 * 1024;
/// Messages published (and acknowledged) before the file system is filled up.
const BEFORE_FULL: usize = 20;
/// Messages the publisher may send before the disk must have filled up.
const MAX_MESSAGES: usize = 3000;

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `file` until the file system is full; returns how many bytes fitted.
fn fill(file: &Path) -> u64 {
    let mut f = std::fs::File::create(file).expect("create filler");
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let zeros = vec![0u8; chunk];
        // Bounded: the file system is a few MiB.
        for _ in 0..4096 {
            match f.write(&zeros) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
    }
    let _ = f.sync_all();
    written
}

fn v3_options(id: &str, addr: SocketAddr, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o.set_max_packet_size(64 * 1024, 64 * 1024);
    o
}

async fn subscribe_and_leave(addr: SocketAddr) {
    let (client, mut el) = AsyncClient::new(v3_options("full-sub", addr, false), 10);
    client
        .subscribe("full/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    poll_until(&mut el, "full-sub: SUBACK", |ev| match ev {
        Ok(Event::Incoming(Packet::SubAck(_))) => Some(()),
        Ok(_) => None,
        Err(e) => panic!("subscriber: {e}"),
    })
    .await;
    client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, async { while el.poll().await.is_ok() {} }).await;
}

/// Publishes `payload` at QoS 1 and returns the PUBACK's reason code.
async fn v5_publish(
    client: &rumqttc::v5::AsyncClient,
    el: &mut rumqttc::v5::EventLoop,
    payload: Vec<u8>,
) -> PubAckReason {
    v5_publish_reason(client, el, "full/t", false, payload, "5.0 publisher").await
}

fn payload(n: usize) -> Vec<u8> {
    let mut p = format!("n{n}:").into_bytes();
    p.resize(PAYLOAD, b'.');
    p
}

fn id_of(payload: &[u8]) -> Option<usize> {
    let end = payload.iter().position(|&b| b == b':')?;
    std::str::from_utf8(payload.get(1..end)?).ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_never_acknowledged_and_loses_nothing_acknowledged() {
    let dir = TempDir::new("disk-full");
    let Some(_fs) = Tmpfs::mount(&dir.0, "6m") else {
        panic!(
            "cannot mount a tmpfs on {}: this test needs root (CAP_SYS_ADMIN) for a real full \
             disk; run it as root (CI does), or skip it explicitly with `--skip disk_full` \
             (faults.rs covers the error path without root)",
            dir.0.display()
        );
    };
    let data = dir.0.join("data");
    let broker = Broker::start(&data, &[]);
    let addr = broker.addr;
    subscribe_and_leave(addr).await;

    let mut o = rumqttc::v5::MqttOptions::new("full-pub5", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    // Acknowledged while there is room, then refused once the disk is full.
    let filler = dir.0.join("filler");
    let mut acked = HashSet::new();
    let mut refused = None;
    for n in 0..MAX_MESSAGES {
        if n == BEFORE_FULL {
            assert_eq!(acked.len(), BEFORE_FULL, "acknowledged while there is room");
            assert!(fill(&filler) > 0, "the filler took the free space");
        }
        match v5_publish(&client, &mut el, payload(n)).await {
            PubAckReason::Success => {
                acked.insert(n);
            }
            reason => {
                refused = Some(reason);
                break;
            }
        }
    }
    assert!(
        matches!(
            refused,
            Some(PubAckReason::UnspecifiedError | PubAckReason::QuotaExceeded)
        ),
        "a full disk refuses a 5.0 PUBLISH with 0x80 or 0x97 (got {refused:?} after {} acked)",
        acked.len()
    );

    eprintln!(
        "disk full: {} message(s) acknowledged, then {refused:?}",
        acked.len()
    );

    // 3.1.1 has no code for "not stored": the connection is closed, never acknowledged.
    let (c3, mut el3) = AsyncClient::new(v3_options("full-pub3", addr, true), 10);
    c3.publish("full/t", QoS::AtLeastOnce, false, payload(MAX_MESSAGES))
        .await
        .expect("publish");
    poll_until(&mut el3, "3.1.1: the connection closed", |ev| match ev {
        Ok(Event::Incoming(Packet::PubAck(_))) => panic!("3.1.1 PUBACK while the disk is full"),
        Ok(_) => None,
        Err(_) => Some(()),
    })
    .await;

    // Room again, a crash, a restart on the same directory: every acknowledged message is
    // delivered to the persistent subscriber.
    std::fs::remove_file(&filler).expect("remove filler");
    broker.kill();
    let broker = Broker::start(&data, &[]);
    let (sub, mut sel) = AsyncClient::new(v3_options("full-sub", broker.addr, false), 10);
    let mut got = HashSet::new();
    let deadline = Instant::now() + WAIT;
    while !acked.is_subset(&got) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), sel.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => {
                assert!(c.session_present, "the persistent session survived");
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if let Some(n) = id_of(&p.payload) {
                    got.insert(n);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber after restart: {e}"),
            Err(_) => break,
        }
    }
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    drop(sub);
    broker.kill();
}
