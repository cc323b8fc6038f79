//! End-to-end: the real `mqttd-bench` binary against a real, independent broker (mosquitto 2,
//! started on a free loopback port with a temporary config). Checks the counts the generator
//! reports: every QoS 1/2 message exactly once, consistent QoS 0 accounting, JSON lines that
//! parse, idle connections and broker sampling.
//!
//! mosquitto must be installed (`.ci/run` installs it): without it these tests fail, they do not
//! skip.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BENCH, assert_exactly_once, bench, free_port, json_lines, n, summary};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A mosquitto process on a free port, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Self {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: install Debian's `mosquitto` package (apt-get install \
             mosquitto; .ci/run does this) — these tests need an independent broker"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1024\nlog_dest stderr\n\
                 log_type error\n"
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        let mut m = Mosquitto {
            child,
            port,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("mosquitto exited at start ({status})");
            }
            assert!(Instant::now() < until, "mosquitto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn pid(&self) -> u32 {
        self.child.id()
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
    // Give it time to subscribe.
    std::thread::sleep(Duration::from_millis(500));
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
