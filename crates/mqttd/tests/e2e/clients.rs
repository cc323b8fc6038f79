//! rumqttc (3.1.1 and 5.0 APIs) against the real broker.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::common::{Mqttd, WAIT};

/// Bound of a client's connection (TCP connect and CONNACK), in rumqttc and while waiting for
/// the CONNACK. rumqttc's own default of 5 s failed the 1000-client test on a loaded machine
/// (1000 simultaneous handshakes; the event loop ended before its CONNACK).
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// A rumqttc 3.1.1 client whose incoming packets arrive on a channel.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<rumqttc::Packet>,
    pub task: JoinHandle<()>,
}

pub async fn v4(port: u16, id: &str, clean: bool, will: Option<rumqttc::LastWill>) -> V4 {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    // rumqttc's default is 10 KiB; the broker's is 1 MiB.
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(w) = will {
        opts.set_last_will(w);
    }
    start_v4(opts).await
}

/// [`v4`] over TLS (rumqttc's rustls, an implementation independent of the broker's OpenSSL),
/// verifying the broker's name `127.0.0.1`.
pub async fn v4_tls(port: u16, id: &str, clean: bool, tls: rumqttc::TlsConfiguration) -> V4 {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(rumqttc::Transport::tls_with_config(tls));
    start_v4(opts).await
}

async fn start_v4(opts: rumqttc::MqttOptions) -> V4 {
    let id = opts.client_id();
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
    let mut net = el.network_options();
    net.set_connection_timeout(CONNECT_WAIT.as_secs());
    el.set_network_options(net);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let name = id.clone();
    let task = tokio::spawn(async move {
        let mut connected = false;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    connected = true;
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if !connected {
                        eprintln!("{name}: connection failed: {e}");
                    }
                    return;
                }
            }
        }
    });
    // Wait for the CONNACK.
    match tokio::time::timeout(CONNECT_WAIT, rx.recv()).await {
        Ok(Some(rumqttc::Packet::ConnAck(_))) => {}
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    V4 { client, rx, task }
}

impl V4 {
    /// The next incoming PUBLISH (other packets are skipped).
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(rumqttc::Packet::Publish(p))) => return p,
                Ok(Some(_)) => {}
                Ok(None) => panic!("client event loop ended"),
                Err(_) => panic!("no PUBLISH within {WAIT:?}"),
            }
        }
    }

    /// Waits for the next SUBACK.
    pub async fn suback(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(rumqttc::Packet::SubAck(_))) => return,
                Ok(Some(_)) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }
}

use rumqttc::v5 as r5;
use rumqttc::v5::mqttbytes::v5::Packet as P5;

/// A rumqttc 5.0 client whose incoming packets arrive on a channel.
pub struct V5 {
    pub client: r5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<P5>,
    /// Dropping the handle detaches the event loop; kept so a test can await it.
    pub _task: JoinHandle<()>,
}

pub async fn v5(port: u16, id: &str, clean: bool, expiry: Option<u32>) -> V5 {
    let mut opts = r5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_connection_timeout(CONNECT_WAIT.as_secs());
    opts.set_clean_start(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(e) = expiry {
        let mut props = r5::mqttbytes::v5::ConnectProperties::new();
        props.session_expiry_interval = Some(e);
        opts.set_connect_properties(props);
    }
    let (client, mut el) = r5::AsyncClient::new(opts, 1000);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(r5::Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    match tokio::time::timeout(CONNECT_WAIT, rx.recv()).await {
        Ok(Some(P5::ConnAck(_))) => {}
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    }
    V5 {
        client,
        rx,
        _task: task,
    }
}

impl V5 {
    pub async fn next_publish(&mut self) -> r5::mqttbytes::v5::Publish {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(P5::Publish(p))) => return p,
                Ok(Some(_)) => {}
                Ok(None) => panic!("client event loop ended"),
                Err(_) => panic!("no PUBLISH within {WAIT:?}"),
            }
        }
    }

    pub async fn suback(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(P5::SubAck(_))) => return,
                Ok(Some(_)) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Collects PUBLISHes until none arrives for `quiet`.
    pub async fn drain_publishes(&mut self, quiet: Duration) -> Vec<r5::mqttbytes::v5::Publish> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline
            && let Ok(Some(p)) = tokio::time::timeout(quiet, self.rx.recv()).await
        {
            if let P5::Publish(p) = p {
                out.push(p);
            }
        }
        out
    }
}

#[tokio::test]
async fn qos_round_trips_rumqttc_v311() {
    let broker = Mqttd::start(&[]);
    let mut sub = v4(broker.port(), "rt-sub", true, None).await;
    sub.client
        .subscribe("rt/#", rumqttc::QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    let publisher = v4(broker.port(), "rt-pub", true, None).await;
    for (i, qos) in [
        rumqttc::QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .client
            .publish(format!("rt/{i}"), qos, false, vec![i as u8; 10])
            .await
            .expect("publish");
        let p = sub.next_publish().await;
        assert_eq!(p.topic, format!("rt/{i}"));
        assert_eq!(p.qos, qos, "granted QoS 2 keeps the publish QoS");
        assert_eq!(&p.payload[..], &[i as u8; 10][..]);
    }
    // Downgrade to the subscription's QoS.
    let mut low = v4(broker.port(), "rt-low", true, None).await;
    low.client
        .subscribe("rt/#", rumqttc::QoS::AtMostOnce)
        .await
        .expect("subscribe");
    low.suback().await;
    publisher
        .client
        .publish("rt/x", rumqttc::QoS::ExactlyOnce, false, "d")
        .await
        .expect("publish");
    assert_eq!(low.next_publish().await.qos, rumqttc::QoS::AtMostOnce);
}

#[tokio::test]
async fn qos_round_trips_rumqttc_v5_with_properties() {
    let broker = Mqttd::start(&[]);
    let mut sub = v5(broker.port(), "rt5-sub", true, None).await;
    sub.client
        .subscribe("rt5/+", r5::mqttbytes::QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    let publisher = v5(broker.port(), "rt5-pub", true, None).await;
    for (i, qos) in [
        r5::mqttbytes::QoS::AtMostOnce,
        r5::mqttbytes::QoS::AtLeastOnce,
        r5::mqttbytes::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        let props = r5::mqttbytes::v5::PublishProperties {
            content_type: Some("text/plain".into()),
            response_topic: Some("rt5/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"c-1")),
            user_properties: vec![("k".into(), format!("v{i}"))],
            payload_format_indicator: Some(1),
            ..Default::default()
        };
        publisher
            .client
            .publish_with_properties(format!("rt5/{i}"), qos, false, format!("m{i}"), props)
            .await
            .expect("publish");
        let p = sub.next_publish().await;
        assert_eq!(&p.topic[..], format!("rt5/{i}").as_bytes());
        assert_eq!(p.qos, qos);
        let props = p.properties.expect("properties forwarded");
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(props.response_topic.as_deref(), Some("rt5/reply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(
            props.user_properties,
            vec![("k".to_string(), format!("v{i}"))]
        );
        assert_eq!(props.payload_format_indicator, Some(1));
    }
}

#[tokio::test]
async fn persistent_session_receives_qos1_published_while_offline() {
    let broker = Mqttd::start(&[]);
    let mut sub = v4(broker.port(), "offline-sub", false, None).await;
    sub.client
        .subscribe("off/t", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    sub.client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, sub.task).await;
    let publisher = v4(broker.port(), "offline-pub", true, None).await;
    for i in 0..5 {
        publisher
            .client
            .publish("off/t", rumqttc::QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .expect("publish");
    }
    // Give the broker time to take them all (the publisher's acks prove it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut back = v4(broker.port(), "offline-sub", false, None).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let p = back.next_publish().await;
        assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(got, vec!["m0", "m1", "m2", "m3", "m4"]);
}

#[tokio::test]
async fn takeover_disconnects_the_old_client_with_0x8e() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    // The old client: mosquitto_sub (5.0, persistent session), printing what it receives.
    let old = std::process::Command::new(crate::common::mosquitto("mosquitto_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-i",
            "same-id",
            "-c",
        ])
        .args(["-x", "60", "-q", "1", "-t", "take/t", "-d", "-W", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub");
    broker.wait_metric("mqttd_subscriptions", |n| n == 1);
    // The new client: rumqttc 5.0 with the same client id resumes the session.
    let started = std::time::Instant::now();
    let mut second = v5(port, "same-id", false, Some(60)).await;
    let out = tokio::task::spawn_blocking(move || old.wait_with_output())
        .await
        .expect("join")
        .expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Received DISCONNECT (142)"),
        "old client output: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "old client closed promptly"
    );
    // The session (and its subscription) moved to the new connection.
    let publisher = v5(port, "take-pub", true, None).await;
    publisher
        .client
        .publish("take/t", r5::mqttbytes::QoS::AtLeastOnce, false, "after")
        .await
        .expect("publish");
    assert_eq!(&second.next_publish().await.payload[..], b"after");
}

#[tokio::test]
async fn shared_subscription_splits_load_across_three_subscribers() {
    let broker = Mqttd::start(&[]);
    // Two 5.0 members and one 3.1.1 member (mosquitto and EMQX accept `$share/` from 3.1.1).
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut s = v5(broker.port(), &format!("share-{i}"), true, None).await;
        s.client
            .subscribe("$share/workers/jobs/#", r5::mqttbytes::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        s.suback().await;
        subs.push(s);
    }
    let mut v3 = v4(broker.port(), "share-v3", true, None).await;
    v3.client
        .subscribe("$share/workers/jobs/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    v3.suback().await;
    let publisher = v4(broker.port(), "share-pub", true, None).await;
    for i in 0..30 {
        publisher
            .client
            .publish(format!("jobs/{i}"), rumqttc::QoS::AtLeastOnce, false, "job")
            .await
            .expect("publish");
    }
    let mut counts = Vec::new();
    for s in &mut subs {
        counts.push(s.drain_publishes(Duration::from_millis(700)).await.len());
    }
    let mut n3 = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline
        && let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(700), v3.rx.recv()).await
    {
        if matches!(p, rumqttc::Packet::Publish(_)) {
            n3 += 1;
        }
    }
    counts.push(n3);
    assert_eq!(
        counts.iter().sum::<usize>(),
        30,
        "every job delivered once: {counts:?}"
    );
    assert_eq!(counts, vec![10, 10, 10], "round-robin split");
}

#[tokio::test]
async fn thousand_concurrent_clients_publish_and_receive() {
    const N: usize = 1000;
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let ready = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = v4(port, &format!("load-{i}"), true, None).await;
            c.client
                .subscribe(format!("load/{i}"), rumqttc::QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            c.suback().await;
            ready.wait().await;
            let to = (i + 1) % N;
            c.client
                .publish(
                    format!("load/{to}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("from {i}"),
                )
                .await
                .expect("publish");
            let p = c.next_publish().await;
            let from = (i + N - 1) % N;
            assert_eq!(String::from_utf8_lossy(&p.payload), format!("from {from}"));
            // Stay connected until everyone has received.
            c
        }));
    }
    let mut clients = Vec::with_capacity(N);
    for t in tasks {
        clients.push(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("in time")
                .expect("client task"),
        );
    }
    assert_eq!(clients.len(), N);
}

#[tokio::test]
async fn large_payload_fans_out_intact() {
    let broker = Mqttd::start(&[]);
    let mut subs = Vec::new();
    for i in 0..3 {
        let mut s = v4(broker.port(), &format!("big-sub-{i}"), true, None).await;
        s.client
            .subscribe("big/t", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        s.suback().await;
        subs.push(s);
    }
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let publisher = v4(broker.port(), "big-pub", true, None).await;
    publisher
        .client
        .publish("big/t", rumqttc::QoS::AtLeastOnce, false, payload.clone())
        .await
        .expect("publish");
    publisher
        .client
        .publish("big/t", rumqttc::QoS::AtMostOnce, false, "small")
        .await
        .expect("publish");
    for s in &mut subs {
        assert_eq!(&s.next_publish().await.payload[..], &payload[..]);
        assert_eq!(&s.next_publish().await.payload[..], b"small");
    }
}

/// `worker_threads = 1` (one thread for connections and the core, the durable store's writer
/// apart): QoS 1 and 2 flows and a persistent session that queues while its client is away
/// all work as on the default runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_threaded_broker_serves_qos_flows_and_durable_sessions() {
    let dir = crate::common::fresh_dir("single-thread");
    let broker = Mqttd::start(&[
        "--worker-threads",
        "1",
        "--storage",
        "redb",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
    ]);
    let port = broker.port();
    let mut sub = v4(port, "st-sub", false, None).await;
    // QoS 1 on the subscriber's side: a QoS 2 delivery still being released when the client
    // goes would be released again on its return, which rumqttc refuses as unsolicited.
    sub.client
        .subscribe("st/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    let publisher = v4(port, "st-pub", true, None).await;
    for (qos, payload) in [
        (rumqttc::QoS::AtLeastOnce, "one"),
        (rumqttc::QoS::ExactlyOnce, "two"),
    ] {
        publisher
            .client
            .publish("st/x", qos, false, payload)
            .await
            .expect("publish");
        assert_eq!(&sub.next_publish().await.payload[..], payload.as_bytes());
    }
    sub.client.disconnect().await.expect("disconnect");
    let _ = tokio::time::timeout(WAIT, sub.task).await;
    publisher
        .client
        .publish("st/y", rumqttc::QoS::AtLeastOnce, false, "queued")
        .await
        .expect("publish");
    let mut sub = v4(port, "st-sub", false, None).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"queued");
    let _ = std::fs::remove_dir_all(&dir);
}
