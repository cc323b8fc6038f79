//! Durability of the real `mqttd` binary with its default storage (redb, `durability = "sync"`):
//! SIGKILL at seeded random moments while rumqttc clients publish, restart on the same data
//! directory, check that nothing acknowledged was lost. Plus the startup faults (a locked data
//! directory, a corrupted database file), a failing commit through a fault-injecting store, and a
//! real full disk (a small tmpfs: the test needs root).
//!
//! `MQTTD_CRASH_SEED` picks another seed; `MQTTD_CRASH_DURABILITY=none` runs the crash test
//! against `durability = "none"` to see it fail (acknowledgements sent before anything is stored).

mod crash;
mod disk_full;
mod faults;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Upper bound of any single wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// An MQTT client's event loop (rumqttc's 3.1.1 and 5.0 ones).
pub trait EventLoop {
    /// What one poll yields.
    type Event;
    /// The next event (or connection error).
    fn next(&mut self) -> impl std::future::Future<Output = Self::Event>;
}

impl EventLoop for rumqttc::EventLoop {
    type Event = Result<rumqttc::Event, rumqttc::ConnectionError>;
    async fn next(&mut self) -> Self::Event {
        self.poll().await
    }
}

impl EventLoop for rumqttc::v5::EventLoop {
    type Event = Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>;
    async fn next(&mut self) -> Self::Event {
        self.poll().await
    }
}

/// Polls `el` until `pick` returns something for an event (or a connection error), within
/// [`WAIT`] in all; panics naming `what` when nothing came in time.
pub async fn poll_until<L: EventLoop, T>(
    el: &mut L,
    what: &str,
    mut pick: impl FnMut(L::Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, el.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"));
        if let Some(t) = pick(ev) {
            return t;
        }
    }
}

/// Publishes `payload` on `topic` at QoS 1 over MQTT 5.0 and returns the PUBACK's reason code
/// (rumqttc reports a failure code as a connection error; both are turned into the code).
pub async fn v5_publish_reason(
    client: &rumqttc::v5::AsyncClient,
    el: &mut rumqttc::v5::EventLoop,
    topic: &str,
    retain: bool,
    payload: Vec<u8>,
    what: &str,
) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            retain,
            payload,
        )
        .await
        .expect("publish");
    poll_until(el, &format!("{what}: PUBACK"), |ev| match ev {
        Ok(rumqttc::v5::Event::Incoming(P5::PubAck(a))) => Some(a.reason),
        Err(rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::PubAckFail {
            reason,
        })) => Some(reason),
        Ok(_) => None,
        Err(e) => panic!("{what}: {e}"),
    })
    .await
}

/// A running broker, killed on drop.
pub struct Broker {
    /// The process.
    pub child: Child,
    /// Its MQTT address.
    pub addr: SocketAddr,
}

impl Broker {
    /// Starts the binary on `data_dir` with the given extra flags and waits for its address.
    pub fn start(data_dir: &Path, args: &[&str]) -> Broker {
        match Broker::try_start(data_dir, args) {
            Ok(b) => b,
            Err(stderr) => panic!("mqttd did not start: {stderr}"),
        }
    }

    /// Starts the binary; `Err` holds what it wrote on stderr when it exits instead.
    pub fn try_start(data_dir: &Path, args: &[&str]) -> Result<Broker, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args(["--listen", "127.0.0.1:0", "--http-enabled", "false"])
            .args(["--quic-enabled", "false", "--sys-interval-secs", "0"])
            .args(["--log-level", "warn", "--max-queued-messages", "1000000"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mqttd");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let (etx, erx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
            }
            let _ = etx.send(all);
        });
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) => {
                    if let Some(addr) = line
                        .split("mqtt://")
                        .nth(1)
                        .and_then(|a| a.trim().parse().ok())
                    {
                        return Ok(Broker { child, addr });
                    }
                }
                Err(_) => {
                    if let Ok(Some(_)) = child.try_wait() {
                        return Err(erx.recv_timeout(WAIT).unwrap_or_default());
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "mqttd printed no address in time"
                    );
                }
            }
        }
    }

    /// SIGKILL, and wait until the process is gone (its file lock with it).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory.
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "mqttd-durability-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
