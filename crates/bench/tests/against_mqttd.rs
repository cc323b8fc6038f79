//! End-to-end: the real `mqttd-bench` binary against mqttd itself (the broker library started
//! in this test process on a free loopback port, the same code the `mqttd` binary runs). Every
//! QoS 1 message must be counted exactly once.

mod common;

use common::{assert_exactly_once, bench, n, summary};

async fn start_mqttd() -> mqttd::server::Running {
    let config = mqttd::config::Config {
        listen: ([127, 0, 0, 1], 0).into(),
        http_listen: None,
        sys_interval: None,
        // Durable storage (the default) would write into the working directory.
        storage: mqttd::config::StorageKind::Memory,
        // Room for a whole run in one session's queue: with the default 1000, a subscriber
        // that fell behind four publishers on a loaded machine had QoS 1 messages dropped by
        // the overflow policy (2693 of 8000 "lost" over QUIC), which is the broker's limit
        // at work, not a miscount. `no_drops` checks that nothing was dropped.
        limits: mqttd::config::Limits {
            max_queued_messages: 1 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    mqttd::server::start(config)
        .await
        .expect("start mqttd on a free port")
}

/// Asserts that the broker dropped no message (queue overflow, expiry, size) during `s`.
fn no_drops(broker: &mqttd::server::Running, s: &serde_json::Value) {
    let dropped = broker
        .context()
        .metrics()
        .messages_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 0, "the broker dropped messages: {s}");
}

/// Runs the generator off the runtime's threads (it is a blocking child process).
async fn bench_async(port: u16, args: &'static [&'static str]) -> serde_json::Value {
    tokio::task::spawn_blocking(move || summary(&bench(port, args)))
        .await
        .expect("mqttd-bench runner")
}

/// Runs the generator and asserts that the broker dropped nothing and that every one of the
/// `expected` QoS 1 messages was counted exactly once.
async fn exactly_once(
    broker: &mqttd::server::Running,
    port: u16,
    args: &'static [&'static str],
    expected: u64,
) {
    let s = bench_async(port, args).await;
    no_drops(broker, &s);
    assert_exactly_once(&s, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_scenarios_against_mqttd_count_every_message_once() {
    let broker = start_mqttd().await;
    let port = broker.mqtt_addr.port();

    exactly_once(
        &broker,
        port,
        &["fan-in", "--publishers", "4", "-q", "1", "-n", "2000"],
        8000,
    )
    .await;

    exactly_once(
        &broker,
        port,
        &["fan-out", "--subscribers", "3", "-q", "1", "-n", "1000"],
        3000,
    )
    .await;

    exactly_once(
        &broker,
        port,
        &[
            "pairs", "--pairs", "4", "-q", "1", "-n", "1000", "--mqtt", "5",
        ],
        4000,
    )
    .await;

    // Subscribers on a runtime of their own (`--sub-threads`): the same exact count.
    exactly_once(
        &broker,
        port,
        &[
            "pairs",
            "--pairs",
            "4",
            "-q",
            "1",
            "-n",
            "1000",
            "--sub-threads",
            "2",
        ],
        4000,
    )
    .await;

    let s = bench_async(port, &["conn", "-c", "200", "-d", "0.3"]).await;
    assert_eq!(n(&s, "connected"), 200, "{s}");
    broker.shutdown().await;
}

/// mqttd with its MQTT-over-QUIC listener on a free UDP port (a self-signed certificate is
/// generated into `data_dir`).
async fn start_mqttd_quic(
    data_dir: &std::path::Path,
) -> (mqttd::server::Running, mqttd::quic::QuicListener) {
    let broker = start_mqttd().await;
    let quic = mqttd::config::QuicConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        ..Default::default()
    };
    let listener = mqttd::quic::start(
        &quic,
        data_dir,
        broker.context(),
        broker.shutdown_handle().subscribe(),
    )
    .await
    .expect("start the QUIC listener");
    (broker, listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_over_quic_against_mqttd_counts_every_message_once() {
    let dir = tempfile::tempdir().expect("temporary data directory");
    let (broker, listener) = start_mqttd_quic(dir.path()).await;
    let port = listener.local_addr.port();

    // Two client endpoints: connections share UDP sockets.
    let s = bench_async(
        port,
        &[
            "fan-in",
            "--transport",
            "quic",
            "--insecure",
            "--quic-endpoints",
            "2",
            "--publishers",
            "4",
            "-q",
            "1",
            "-n",
            "2000",
        ],
    )
    .await;
    assert_eq!(s["transport"], "quic", "{s}");
    no_drops(&broker, &s);
    assert_exactly_once(&s, 8000);

    exactly_once(
        &broker,
        port,
        &[
            "pairs",
            "--transport",
            "quic",
            "--insecure",
            "--pairs",
            "4",
            "-q",
            "1",
            "-n",
            "1000",
            "--mqtt",
            "5",
            "--persistent",
        ],
        4000,
    )
    .await;

    let s = bench_async(
        port,
        &[
            "conn",
            "--transport",
            "quic",
            "--insecure",
            "-c",
            "50",
            "-d",
            "0.3",
        ],
    )
    .await;
    assert_eq!(n(&s, "connected"), 50, "{s}");
    broker.shutdown().await;
    listener.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_checks_the_certificate_unless_told_not_to() {
    let dir = tempfile::tempdir().expect("temporary data directory");
    let (broker, listener) = start_mqttd_quic(dir.path()).await;
    let port = listener.local_addr.port().to_string();
    // Trusting the broker's own self-signed certificate works (its name is `localhost`).
    let cafile = listener.cert_path.to_string_lossy().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BENCH)
                .args(&args)
                .output()
                .expect("run mqttd-bench")
        })
    };
    let base = |extra: &[&str]| -> Vec<String> {
        [
            "conn",
            "--transport",
            "quic",
            "-c",
            "2",
            "-d",
            "0.1",
            "-p",
            &port,
            "--json",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let ok = run(base(&["--cafile", &cafile, "--server-name", "localhost"]))
        .await
        .expect("runner");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The system roots do not trust a self-signed certificate: every client fails.
    let refused = run(base(&[])).await.expect("runner");
    assert!(
        !refused.status.success(),
        "connected without trusting the certificate"
    );
    let s = summary(&refused);
    assert_eq!(n(&s, "connected"), 0, "{s}");
    broker.shutdown().await;
    listener.wait().await;
}
