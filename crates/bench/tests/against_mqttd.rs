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
        ..Default::default()
    };
    mqttd::server::start(config)
        .await
        .expect("start mqttd on a free port")
}

/// Runs the generator off the runtime's threads (it is a blocking child process).
async fn bench_async(port: u16, args: &'static [&'static str]) -> serde_json::Value {
    tokio::task::spawn_blocking(move || summary(&bench(port, args)))
        .await
        .expect("mqttd-bench runner")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_scenarios_against_mqttd_count_every_message_once() {
    let broker = start_mqttd().await;
    let port = broker.mqtt_addr.port();

    let s = bench_async(
        port,
        &["fan-in", "--publishers", "4", "-q", "1", "-n", "2000"],
    )
    .await;
    assert_exactly_once(&s, 8000);

    let s = bench_async(
        port,
        &["fan-out", "--subscribers", "3", "-q", "1", "-n", "1000"],
    )
    .await;
    assert_exactly_once(&s, 3000);

    let s = bench_async(
        port,
        &[
            "pairs", "--pairs", "4", "-q", "1", "-n", "1000", "--mqtt", "5",
        ],
    )
    .await;
    assert_exactly_once(&s, 4000);

    let s = bench_async(port, &["conn", "-c", "200", "-d", "0.3"]).await;
    assert_eq!(n(&s, "connected"), 200, "{s}");
    broker.shutdown().await;
}
