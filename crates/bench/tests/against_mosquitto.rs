//! End-to-end: the real `mqttd-bench` binary against a real, independent broker (mosquitto 2,
//! started on a free loopback port with a temporary config). Checks the counts the generator
//! reports: every QoS 1/2 message exactly once, consistent QoS 0 accounting, JSON lines that
//! parse, idle connections and broker sampling.
//!
//! mosquitto must be installed (`.ci/run` installs it): without it these tests fail, they do not
//! skip.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{BENCH, assert_exactly_once, bench, free_port, json_lines, n, summary};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A mosquitto process on a free port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    /// What mosquitto logged: its listener is up, a subscription, the end of its log.
    events: mpsc::Receiver<Event>,
    _dir: tempfile::TempDir,
}

/// A line of mosquitto's log that the tests wait for.
#[derive(Debug, PartialEq)]
enum Event {
    /// "mosquitto version ... running": its listener is open.
    Running,
    /// "<client id> <qos> <filter>" (`log_type subscribe`): a subscription is in place.
    Subscribed(String),
}

impl Mosquitto {
    /// Starts mosquitto on a free port. A port that another process took between
    /// [`free_port`] and mosquitto's bind ("Address already in use": mosquitto exits, and a
    /// connection test would reach the other listener) is retried with another port.
    fn start() -> Self {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: install Debian's `mosquitto` package (apt-get install \
             mosquitto; .ci/run does this) — these tests need an independent broker"
        );
        for _ in 0..5 {
            if let Some(m) = Self::try_start() {
                return m;
            }
        }
        panic!("mosquitto could not listen on any of 5 free ports");
    }

    /// One attempt: `None` if mosquitto exited before it was running.
    fn try_start() -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1024\nlog_dest stderr\n\
                 log_type error\nlog_type information\nlog_type subscribe\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        let stderr = child.stderr.take().expect("mosquitto's stderr");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                let event = match words[..] {
                    [_, "mosquitto", "version", _, "running"] => Some(Event::Running),
                    [_, _, "0" | "1" | "2", filter] => Some(Event::Subscribed(filter.to_owned())),
                    [_, "mosquitto", "version", ..] | [_, "Config", "loaded", ..] => None,
                    [_, "Opening", ..] => None,
                    _ => {
                        // Errors (and anything unexpected) stay visible.
                        eprintln!("mosquitto: {line}");
                        None
                    }
                };
                if let Some(e) = event {
                    let _ = tx.send(e);
                }
            }
            // The log ended: mosquitto exited (the channel closes).
        });
        let mut m = Mosquitto {
            child,
            port,
            events,
            _dir: dir,
        };
        match m.events.recv_timeout(Duration::from_secs(20)) {
            Ok(Event::Running) => {}
            Ok(other) => panic!("mosquitto logged {other:?} before running"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = m.child.wait().expect("mosquitto's exit status");
                eprintln!("mosquitto exited at start on port {port} ({status}); another port");
                return None;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("mosquitto not running after 20 s"),
        }
        // Running means listening; one connection proves the port is reachable.
        TcpStream::connect(("127.0.0.1", port)).expect("connect to mosquitto");
        Some(m)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to 20 s) until mosquitto has logged a subscription to `filter`.
    fn wait_subscribed(&self, filter: &str) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Subscribed(f)) if f == filter => return,
                Ok(_) => {}
                Err(e) => panic!("mosquitto logged no subscription to {filter}: {e}"),
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fan_in_qos1_counts_every_message_once() {
    let broker = Mosquitto::start();
    let pid = broker.pid().to_string();
    let out = bench(
        broker.port,
        &[
            "fan-in",
            "--publishers",
            "4",
            "-q",
            "1",
            "-n",
            "2000",
            "--broker-pid",
            &pid,
        ],
    );
    let s = summary(&out);
    assert_eq!(s["scenario"], "fan-in");
    assert_eq!(n(&s, "sent"), 8000);
    assert_exactly_once(&s, 8000);
    assert_eq!(n(&s["broker"], "pid"), u64::from(broker.pid()), "{s}");
    assert!(n(&s["broker"], "rss_max_kib") > 0, "{s}");
}

#[test]
fn fan_out_qos1_and_qos0_counts() {
    let broker = Mosquitto::start();
    let s = summary(&bench(
        broker.port,
        &["fan-out", "--subscribers", "3", "-q", "1", "-n", "1500"],
    ));
    assert_eq!(n(&s, "sent"), 1500);
    assert_exactly_once(&s, 4500);

    // QoS 0 may lose under pressure, so only the accounting must add up (rate-limited, so on
    // an idle loopback nothing is lost in practice).
    let s = summary(&bench(
        broker.port,
        &[
            "fan-out",
            "--subscribers",
            "3",
            "-q",
            "0",
            "-n",
            "1000",
            "-r",
            "5000",
        ],
    ));
    assert_eq!(n(&s, "sent"), 1000, "{s}");
    assert_eq!(n(&s, "expected"), 3000, "{s}");
    assert_eq!(n(&s, "unique") + n(&s, "lost"), 3000, "{s}");
    assert_eq!(n(&s, "duplicates"), 0, "{s}");
    assert!(n(&s, "received") > 0, "{s}");
}

#[test]
fn pairs_qos1_v5_and_qos2_count_every_message_once() {
    let broker = Mosquitto::start();
    let s = summary(&bench(
        broker.port,
        &[
            "pairs", "--pairs", "4", "-q", "1", "-n", "1000", "--mqtt", "5",
        ],
    ));
    assert_eq!(s["mqtt"], "5");
    assert_exactly_once(&s, 4000);

    let s = summary(&bench(
        broker.port,
        &["pairs", "--pairs", "2", "-q", "2", "-n", "500"],
    ));
    assert_eq!(n(&s, "qos"), 2);
    assert_exactly_once(&s, 1000);
}

#[test]
fn fixed_rate_json_lines_parse() {
    let broker = Mosquitto::start();
    // 2 publishers at 500 msg/s for 1 s: about 1000 messages, with progress lines every 200 ms.
    let out = bench(
        broker.port,
        &[
            "pairs",
            "--pairs",
            "2",
            "-q",
            "1",
            "-r",
            "500",
            "-d",
            "1",
            "--interval-ms",
            "200",
        ],
    );
    let lines = json_lines(&out);
    let progress = lines.iter().filter(|l| l["type"] == "progress").count();
    assert!(progress >= 3, "expected progress lines, got {lines:?}");
    let s = lines.last().expect("summary");
    let sent = n(s, "sent");
    assert!((900..=1010).contains(&sent), "fixed rate not kept: {s}");
    assert_exactly_once(s, sent);
}

#[test]
fn separate_sub_and_pub_processes_see_no_gaps() {
    let broker = Mosquitto::start();
    let port = broker.port.to_string();
    // `sub` runs until it has 2000 messages (or 20 s): started first, in the background.
    let sub = Command::new(BENCH)
        .args(["sub", "-p", &port, "-q", "1", "-t", "bench/#", "-n", "2000"])
        .args(["-d", "20", "--json", "--client-id-prefix", "s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqttd-bench sub");
    // Publish only once the subscription is in place (the QoS 1 messages of a subscription
    // made later would not reach it).
    broker.wait_subscribed("bench/#");
    let p = summary(&bench(
        broker.port,
        &["pub", "-c", "2", "-q", "1", "-n", "1000"],
    ));
    assert_eq!(n(&p, "acked"), 2000, "{p}");
    let out = sub.wait_with_output().expect("sub finishes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    assert_eq!(n(&s, "received"), 2000, "{s}");
    assert_eq!(n(&s, "lost"), 0, "gaps in sequence numbers: {s}");
    assert_eq!(n(&s, "duplicates"), 0, "{s}");
    assert!(s["expected"].is_null(), "{s}");
}

#[test]
fn conn_holds_idle_clients_and_samples_the_broker() {
    let broker = Mosquitto::start();
    let pid = broker.pid().to_string();
    let s = summary(&bench(
        broker.port,
        &["conn", "-c", "300", "-d", "1.2", "--broker-pid", &pid],
    ));
    assert_eq!(n(&s, "connected"), 300, "{s}");
    assert_eq!(n(&s, "connect_failures"), 0, "{s}");
    assert!(s["connect_rate"].as_f64().unwrap_or(0.0) > 0.0, "{s}");
    assert!(s["broker"]["rss_per_conn_bytes"].is_number(), "{s}");
}

#[test]
fn unreachable_broker_is_a_clear_failure() {
    let port = free_port();
    let out = Command::new(BENCH)
        .args(["pub", "-p", &port.to_string(), "-n", "1"])
        .output()
        .expect("run mqttd-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
}
