//! Broker counters: lock-free atomics shared by the core, the connection tasks and the HTTP
//! endpoint. Rendered as Prometheus text and as `$SYS/broker/...` topics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters and gauges. Every field is updated with relaxed atomics: readers want totals, not
/// a consistent snapshot.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Clients currently connected (after CONNACK).
    pub clients_connected: AtomicU64,
    /// Connections accepted since start (TCP level).
    pub connections_accepted: AtomicU64,
    /// Connections refused because `max_connections` was reached.
    pub connections_refused: AtomicU64,
    /// Sessions known (connected or not).
    pub sessions: AtomicU64,
    /// PUBLISH packets received from clients.
    pub messages_received: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Messages dropped by the queue overflow policy, expiry or size limits.
    pub messages_dropped: AtomicU64,
    /// Of `messages_dropped`, the QoS 0 ones.
    pub messages_dropped_qos0: AtomicU64,
    /// Retained messages stored.
    pub retained_messages: AtomicU64,
    /// Subscriptions (shared ones counted per member).
    pub subscriptions: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `(name, help, kind)` of each exported metric, in output order.
const SERIES: &[(&str, &str, &str)] = &[
    (
        "mqttd_clients_connected",
        "Clients currently connected.",
        "gauge",
    ),
    (
        "mqttd_connections_accepted_total",
        "TCP connections accepted.",
        "counter",
    ),
    (
        "mqttd_connections_refused_total",
        "Connections refused at max_connections.",
        "counter",
    ),
    (
        "mqttd_sessions",
        "Sessions known, connected or not.",
        "gauge",
    ),
    (
        "mqttd_messages_received_total",
        "PUBLISH packets received.",
        "counter",
    ),
    (
        "mqttd_messages_sent_total",
        "PUBLISH packets sent.",
        "counter",
    ),
    ("mqttd_bytes_received_total", "Bytes received.", "counter"),
    ("mqttd_bytes_sent_total", "Bytes sent.", "counter"),
    (
        "mqttd_messages_dropped_total",
        "Messages dropped (overflow, expiry, size).",
        "counter",
    ),
    (
        "mqttd_messages_dropped_qos0_total",
        "QoS 0 messages dropped.",
        "counter",
    ),
    (
        "mqttd_retained_messages",
        "Retained messages stored.",
        "gauge",
    ),
    ("mqttd_subscriptions", "Subscriptions.", "gauge"),
    ("mqttd_uptime_seconds", "Seconds since start.", "gauge"),
];

impl Metrics {
    /// Fresh counters; uptime starts now.
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            clients_connected: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            messages_dropped: AtomicU64::new(0),
            messages_dropped_qos0: AtomicU64::new(0),
            retained_messages: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    pub fn sub(gauge: &AtomicU64, n: u64) {
        gauge.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, v: u64) {
        gauge.store(v, Ordering::Relaxed);
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn values(&self) -> [u64; 13] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            g(&self.clients_connected),
            g(&self.connections_accepted),
            g(&self.connections_refused),
            g(&self.sessions),
            g(&self.messages_received),
            g(&self.messages_sent),
            g(&self.bytes_received),
            g(&self.bytes_sent),
            g(&self.messages_dropped),
            g(&self.messages_dropped_qos0),
            g(&self.retained_messages),
            g(&self.subscriptions),
            self.uptime_secs(),
        ]
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        for ((name, help, kind), v) in SERIES.iter().zip(self.values()) {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        out
    }

    /// `$SYS/broker/...` topics and their values (mosquitto's names where it has one).
    pub fn sys_topics(&self) -> Vec<(&'static str, String)> {
        let v = self.values();
        vec![
            (
                "$SYS/broker/version",
                format!("mqttd {}", env!("CARGO_PKG_VERSION")),
            ),
            ("$SYS/broker/uptime", format!("{} seconds", v[12])),
            ("$SYS/broker/clients/connected", v[0].to_string()),
            ("$SYS/broker/clients/total", v[3].to_string()),
            ("$SYS/broker/messages/received", v[4].to_string()),
            ("$SYS/broker/messages/sent", v[5].to_string()),
            ("$SYS/broker/messages/dropped", v[8].to_string()),
            ("$SYS/broker/bytes/received", v[6].to_string()),
            ("$SYS/broker/bytes/sent", v[7].to_string()),
            ("$SYS/broker/retained messages/count", v[10].to_string()),
            ("$SYS/broker/subscriptions/count", v[11].to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_series() {
        let m = Metrics::new();
        Metrics::add(&m.messages_received, 3);
        Metrics::set(&m.clients_connected, 2);
        let text = m.render_prometheus();
        assert!(
            text.contains("\nmqttd_messages_received_total 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE mqttd_clients_connected gauge\nmqttd_clients_connected 2\n"));
        for (name, _, _) in SERIES {
            assert!(
                text.contains(&format!("\n{name} ")) || text.starts_with(&format!("# HELP {name}"))
            );
        }
    }

    #[test]
    fn sys_topics_are_named_like_mosquitto() {
        let m = Metrics::new();
        Metrics::add(&m.messages_sent, 9);
        let topics = m.sys_topics();
        assert!(
            topics
                .iter()
                .any(|(t, v)| *t == "$SYS/broker/messages/sent" && v == "9")
        );
        assert!(
            topics
                .iter()
                .any(|(t, v)| *t == "$SYS/broker/version" && v.starts_with("mqttd "))
        );
    }
}
