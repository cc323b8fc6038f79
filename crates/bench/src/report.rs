//! What a run reports: the live progress line, JSON lines, and the final summary.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::accounting::Percentiles;
use crate::client::Counters;
use crate::procstat::Proc;

/// The broker's resource use over a run, from `/proc/<pid>`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerUsage {
    /// The pid sampled.
    pub pid: u32,
    /// CPU over the measured phase, percent of one core.
    pub cpu_pct: f64,
    /// RSS when the measured phase began, KiB.
    pub rss_start_kib: u64,
    /// RSS when it ended, KiB.
    pub rss_end_kib: u64,
    /// Largest RSS seen, KiB.
    pub rss_max_kib: u64,
    /// Idle-connection runs: RSS growth per connection, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_bytes: Option<f64>,
}

/// The final result of a run: one JSON object with `"type": "summary"`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Always `summary`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Scenario or subcommand.
    pub scenario: String,
    /// Transport used.
    pub transport: &'static str,
    /// MQTT version used.
    pub mqtt: &'static str,
    /// QoS of the messages.
    pub qos: u8,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Publishing clients.
    pub publishers: usize,
    /// Subscribing clients.
    pub subscribers: usize,
    /// Target rate per publisher (msg/s), 0 = unlimited.
    pub rate_per_publisher: f64,
    /// Seconds from the start signal to the last PUBLISH written (idle runs: the hold time).
    pub duration_secs: f64,
    /// Clients that got a successful CONNACK.
    pub connected: u64,
    /// Clients that failed to connect or subscribe.
    pub connect_failures: u64,
    /// Connections per second over the connect phase.
    pub connect_rate: f64,
    /// First packet (TCP SYN, QUIC Initial) to CONNACK, microseconds.
    pub connect_latency_us: Percentiles,
    /// Idle-connection runs with `--broker-pid`: the broker's CPU time over the connect phase
    /// divided by the clients connected, microseconds (kernel time in its threads included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_us_per_connect: Option<f64>,
    /// Idle-connection runs: this generator's CPU time over the connect phase per client
    /// connected, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench_cpu_us_per_connect: Option<f64>,
    /// PUBLISHes written.
    pub sent: u64,
    /// PUBLISHes acknowledged with success (QoS 1/2).
    pub acked: u64,
    /// PUBLISHes acknowledged with an error reason code.
    pub rejected: u64,
    /// Deliveries expected (each subscriber counts each message it should get), when known.
    pub expected: Option<u64>,
    /// Deliveries received, duplicates included.
    pub received: u64,
    /// Distinct deliveries received.
    pub unique: u64,
    /// Deliveries missing: expected minus unique, or, for `sub`, the gaps in sequence numbers.
    pub lost: u64,
    /// Deliveries received more than once.
    pub duplicates: u64,
    /// Messages without a benchmark header.
    pub foreign: u64,
    /// PUBLISHes written per second.
    pub sent_rate: f64,
    /// Deliveries per second, from the start to the last delivery.
    pub recv_rate: f64,
    /// End-to-end latency, microseconds.
    pub latency_us: Percentiles,
    /// The broker's CPU and memory, with `--broker-pid`.
    pub broker: Option<BrokerUsage>,
    /// This generator's own CPU over the same phase, percent of one core.
    pub bench_cpu_pct: f64,
    /// Clients that stopped on an error.
    pub errors: u64,
    /// The first such error.
    pub first_error: Option<String>,
}

impl Summary {
    /// The summary as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The summary for people.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "{} over {} (MQTT {}): {} publishers, {} subscribers, QoS {}, {} B payload",
            self.scenario,
            self.transport,
            self.mqtt,
            self.publishers,
            self.subscribers,
            self.qos,
            self.payload_bytes
        ));
        line(format!(
            "connect:   {} ok, {} failed, {:.0}/s, CONNACK p50 {} us p99 {} us",
            self.connected,
            self.connect_failures,
            self.connect_rate,
            self.connect_latency_us.p50,
            self.connect_latency_us.p99
        ));
        if self.publishers + self.subscribers > 0 {
            line(format!(
                "sent:      {} in {:.2} s = {:.0} msg/s ({} acked, {} rejected)",
                self.sent, self.duration_secs, self.sent_rate, self.acked, self.rejected
            ));
            let expected = self.expected.map_or("?".to_string(), |e| e.to_string());
            line(format!(
                "received:  {} = {:.0} msg/s (expected {expected}, lost {}, duplicates {}, foreign {})",
                self.received, self.recv_rate, self.lost, self.duplicates, self.foreign
            ));
            let l = &self.latency_us;
            line(format!(
                "latency:   p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us  (mean {:.0} us, n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
            ));
        }
        if let Some(us) = self.broker_cpu_us_per_connect {
            line(format!(
                "connect CPU: broker {us:.1} us per connect, generator {:.1} us per connect",
                self.bench_cpu_us_per_connect.unwrap_or(0.0)
            ));
        }
        if let Some(b) = &self.broker {
            let per_conn = b
                .rss_per_conn_bytes
                .map_or(String::new(), |v| format!(", {v:.0} B per idle connection"));
            line(format!(
                "broker:    pid {} CPU {:.0}%  RSS {} -> {} KiB (max {}){per_conn}",
                b.pid, b.cpu_pct, b.rss_start_kib, b.rss_end_kib, b.rss_max_kib
            ));
        }
        line(format!("generator: CPU {:.0}%", self.bench_cpu_pct));
        if self.errors > 0 {
            line(format!(
                "errors:    {} clients, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("")
            ));
        }
        s
    }
}

/// One progress line as JSON: `"type": "progress"`.
#[derive(Debug, Serialize)]
struct Progress {
    #[serde(rename = "type")]
    kind: &'static str,
    elapsed_secs: f64,
    connected: u64,
    sent: u64,
    acked: u64,
    received: u64,
    sent_rate: f64,
    recv_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_rss_kib: Option<u64>,
}

/// Prints progress every `interval` until `stop`, as JSON lines on stdout with `json`, else as
/// one rewritten line on stderr when it is a terminal. Returns the largest broker RSS seen.
pub async fn progress(
    counters: Arc<Counters>,
    interval: Duration,
    json: bool,
    broker: Option<Proc>,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    use std::io::IsTerminal;
    let tty = !json && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
    tick.tick().await;
    let (mut last_t, mut last_sent, mut last_recv) = (started, 0u64, 0u64);
    let mut rss_max = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
        let sent = counters.sent.load(Relaxed);
        let recv = counters.received.load(Relaxed);
        let rss = broker.and_then(Proc::sample).map(|s| s.rss_kib);
        rss_max = rss_max.max(rss.unwrap_or(0));
        let p = Progress {
            kind: "progress",
            elapsed_secs: now.duration_since(started).as_secs_f64(),
            connected: counters.connected.load(Relaxed),
            sent,
            acked: counters.acked.load(Relaxed),
            received: recv,
            sent_rate: (sent - last_sent) as f64 / dt,
            recv_rate: (recv - last_recv) as f64 / dt,
            broker_rss_kib: rss,
        };
        (last_t, last_sent, last_recv) = (now, sent, recv);
        if json {
            if let Ok(line) = serde_json::to_string(&p) {
                println!("{line}");
            }
        } else if tty {
            let rss = rss.map_or(String::new(), |r| format!("  broker RSS {r} KiB"));
            eprint!(
                "\r\x1b[2K{:6.1}s  conn {}  sent {} ({:.0}/s)  recv {} ({:.0}/s){rss}",
                p.elapsed_secs, p.connected, p.sent, p.sent_rate, p.received, p.recv_rate
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
        let _ = std::io::stderr().flush();
    }
    rss_max
}
