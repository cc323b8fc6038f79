//! Helpers shared by the end-to-end tests: run the real `mqttd-bench` binary and read its JSON.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Command, Output};

use serde_json::Value;

/// The binary under test.
pub const BENCH: &str = env!("CARGO_BIN_EXE_mqttd-bench");

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// The drain of QoS 1/2 runs: every message must arrive, so a pause in deliveries (a busy
/// machine, a loss recovery) must not end the count early. The default ends the drain after
/// one second without a delivery and counts the rest as lost, which made these tests fail on a
/// loaded machine with every message acknowledged. A complete run ends the drain at once.
pub const QOS12_DRAIN: [&str; 4] = ["--drain", "60", "--drain-idle", "20"];

/// The arguments with [`QOS12_DRAIN`] added to a publishing scenario at QoS 1 or 2.
fn with_drain<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    let publishing = matches!(
        args.first(),
        Some(&("pub" | "fan-in" | "fan-out" | "pairs"))
    );
    let qos12 = args
        .windows(2)
        .any(|w| matches!(w, ["-q" | "--qos", "1" | "2"]));
    if publishing && qos12 {
        all.extend(QOS12_DRAIN);
    }
    all
}

/// Runs `mqttd-bench ARGS -p PORT --json` and returns its output, failing on a non-zero exit.
/// QoS 1/2 publishing runs get [`QOS12_DRAIN`].
pub fn bench(port: u16, args: &[&str]) -> Output {
    let out = Command::new(BENCH)
        .args(with_drain(args))
        .args(["-p", &port.to_string(), "--json"])
        .output()
        .expect("run mqttd-bench");
    assert!(
        out.status.success(),
        "mqttd-bench {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every stdout line parsed as JSON; the last one must be the summary.
pub fn json_lines(out: &Output) -> Vec<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = lines.last().expect("at least the summary line");
    assert_eq!(last["type"], "summary", "last line: {last}");
    lines
}

pub fn summary(out: &Output) -> Value {
    json_lines(out).pop().expect("summary")
}

pub fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

/// Every message of a QoS 1/2 run arrived exactly once at every subscriber that should get it.
pub fn assert_exactly_once(s: &Value, expected: u64) {
    assert_eq!(
        n(s, "sent"),
        n(s, "acked"),
        "every PUBLISH acknowledged: {s}"
    );
    assert_eq!(n(s, "expected"), expected, "{s}");
    assert_eq!(n(s, "received"), expected, "{s}");
    assert_eq!(n(s, "unique"), expected, "{s}");
    assert_eq!(n(s, "lost"), 0, "{s}");
    assert_eq!(n(s, "duplicates"), 0, "{s}");
    assert_eq!(n(s, "foreign"), 0, "{s}");
    assert_eq!(n(s, "errors"), 0, "{s}");
    let latency = &s["latency_us"];
    assert_eq!(n(latency, "count"), expected, "{s}");
    assert!(
        n(latency, "p50") > 0 && n(latency, "p50") <= n(latency, "max"),
        "{s}"
    );
}
