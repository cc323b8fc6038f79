//! mosquitto_pub / mosquitto_sub against the real broker, and raw-codec clients for what the CLI
//! clients cannot express (aliases, expiry, abrupt close, shutdown).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use mqttd_codec::{
    Connect, Packet, PacketId, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    SubscribeFilter, SubscriptionOptions, Topic, TopicFilter, Will,
};

use crate::common::{Mqttd, Raw, mosquitto, mstr, run_tool as run};

fn args(port: u16, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "-h".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

fn spawn_sub(port: u16, rest: &[&str]) -> std::process::Child {
    Command::new(mosquitto("mosquitto_sub"))
        .args(args(port, rest))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_sub")
}

fn wait_output(child: std::process::Child) -> Output {
    // mosquitto_sub exits by itself: -C (count) or -W (timeout) is always given.
    child.wait_with_output().expect("mosquitto_sub output")
}

#[test]
fn qos_round_trips_mosquitto_v31_v311_and_v5() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    for version in ["mqttv31", "mqttv311", "mqttv5"] {
        for qos in ["0", "1", "2"] {
            let topic = format!("mq/{version}/{qos}");
            let sub = spawn_sub(
                port,
                &[
                    "-V", version, "-q", qos, "-t", &topic, "-C", "1", "-W", "10", "-v",
                ],
            );
            // Let the subscription land before publishing.
            broker.wait_metric("mqttd_subscriptions", |n| n == 1);
            let out = run(
                "mosquitto_pub",
                &args(
                    port,
                    &["-V", version, "-q", qos, "-t", &topic, "-m", "hello"],
                ),
            );
            assert!(
                out.status.success(),
                "mosquitto_pub: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = wait_output(sub);
            // The subscriber's clean session ends with it.
            broker.wait_metric("mqttd_subscriptions", |n| n == 0);
            assert!(
                out.status.success(),
                "mosquitto_sub: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("{topic} hello")
            );
        }
    }
}

#[test]
fn retained_message_delivered_on_subscribe_and_cleared() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let out = run(
        "mosquitto_pub",
        &args(port, &["-t", "ret/a", "-m", "kept", "-r", "-q", "1"]),
    );
    assert!(out.status.success());
    let out = run(
        "mosquitto_sub",
        &args(port, &["-t", "ret/#", "-C", "1", "-W", "5", "-v"]),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ret/a kept");
    // Retain handling 2 (5.0): nothing on subscribe.
    let out = run(
        "mosquitto_sub",
        &args(
            port,
            &[
                "-V",
                "mqttv5",
                "-t",
                "ret/#",
                "--retain-handling",
                "2",
                "-W",
                "1",
            ],
        ),
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // An empty retained message clears it.
    let out = run("mosquitto_pub", &args(port, &["-t", "ret/a", "-n", "-r"]));
    assert!(out.status.success());
    let out = run("mosquitto_sub", &args(port, &["-t", "ret/#", "-W", "1"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "cleared"
    );
}

#[test]
fn sys_topics_published() {
    let broker = Mqttd::start(&["--sys-interval-secs", "1"]);
    let out = run(
        "mosquitto_sub",
        &args(
            broker.port(),
            &["-t", "$SYS/broker/version", "-C", "1", "-W", "5"],
        ),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("mqttd "),
        "{out:?}"
    );
    // `#` does not match `$SYS`.
    let out = run(
        "mosquitto_sub",
        &args(broker.port(), &["-t", "#", "-W", "2"]),
    );
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

fn connect5(id: &str) -> Connect {
    Connect::new(ProtocolVersion::V5, mstr(id), 30)
}

fn sub_packet(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).expect("non-zero"),
        filters: vec![SubscribeFilter {
            filter: TopicFilter::new(filter).expect("filter"),
            options: SubscriptionOptions::qos(qos),
        }],
        properties: Default::default(),
    })
}

async fn subscribed(
    port: u16,
    id: &str,
    filter: &str,
    configure: impl FnOnce(&mut Connect),
) -> Raw {
    let mut c = connect5(id);
    configure(&mut c);
    let (mut raw, ack) = Raw::connect(port, c).await;
    assert_eq!(ack.reason_code, ReasonCode::Success);
    raw.send(sub_packet(filter, QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    raw
}

async fn next_publish(raw: &mut Raw) -> Publish {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(p)) => return p,
            Some(_) => {}
            None => panic!("closed while waiting for a PUBLISH"),
        }
    }
}

#[tokio::test]
async fn will_published_on_abrupt_close() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let sub = spawn_sub(port, &["-t", "wills/#", "-C", "1", "-W", "10", "-v"]);
    broker.wait_metric("mqttd_subscriptions", |n| n == 1);
    let mut c = Connect::new(ProtocolVersion::V3_1_1, mstr("dies"), 30);
    c.will = Some(Will {
        topic: Topic::new("wills/dies").expect("topic"),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let (raw, ack) = Raw::connect(port, c).await;
    assert_eq!(ack.reason_code, ReasonCode::Success);
    drop(raw); // No DISCONNECT: the socket just goes away.
    let out = tokio::task::spawn_blocking(move || wait_output(sub))
        .await
        .expect("join");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "wills/dies offline"
    );
}

#[tokio::test]
async fn topic_alias_both_ways() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let mut sub = subscribed(port, "alias-sub", "alias/#", |c| {
        c.properties.topic_alias_maximum = Some(4)
    })
    .await;
    let (mut publisher, ack) = Raw::connect(port, connect5("alias-pub")).await;
    assert!(ack.properties.topic_alias_maximum.unwrap_or(0) >= 1);
    // Client -> broker: set alias 1, then publish by alias only.
    let mut p = Publish::new(
        Topic::new("alias/long/topic").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"1"),
    );
    p.properties.topic_alias = Some(1);
    publisher.send(Packet::Publish(p)).await;
    let mut p = Publish::new(
        Topic::empty(),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"2"),
    );
    p.properties.topic_alias = Some(1);
    publisher.send(Packet::Publish(p)).await;
    // Broker -> client: first with topic and alias, then alias only.
    let first = next_publish(&mut sub).await;
    assert_eq!(first.topic.as_str(), "alias/long/topic");
    let alias = first
        .properties
        .topic_alias
        .expect("broker assigned an alias");
    let second = next_publish(&mut sub).await;
    assert_eq!(second.topic.as_str(), "", "second one by alias only");
    assert_eq!(second.properties.topic_alias, Some(alias));
    assert_eq!(&second.payload[..], b"2");
    // An alias above the broker's maximum: DISCONNECT 0x94.
    let mut p = Publish::new(
        Topic::new("alias/x").expect("t"),
        QoS::AtMostOnce,
        None,
        Bytes::new(),
    );
    p.properties.topic_alias = Some(u16::MAX);
    publisher.send(Packet::Publish(p)).await;
    let seen = publisher.until_closed().await;
    assert!(
        seen.iter().any(
            |p| matches!(p, Packet::Disconnect(d) if d.reason_code == ReasonCode::TopicAliasInvalid)
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn message_expiry_drops_expired_and_forwards_remaining() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let (mut publisher, _) = Raw::connect(port, connect5("exp-pub")).await;
    let published = std::time::Instant::now();
    for (topic, secs) in [("exp/short", 1u32), ("exp/long", 100)] {
        let mut p = Publish::new(
            Topic::new(topic).expect("t"),
            QoS::AtLeastOnce,
            PacketId::new(1),
            Bytes::from_static(b"x"),
        );
        p.retain = true;
        p.properties.message_expiry_interval = Some(secs);
        publisher.send(Packet::Publish(p)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut sub = subscribed(port, "exp-sub", "exp/#", |_| {}).await;
    let p = next_publish(&mut sub).await;
    assert_eq!(p.topic.as_str(), "exp/long", "the expired one is gone");
    let left = p
        .properties
        .message_expiry_interval
        .expect("remaining expiry forwarded");
    // At least 2.2 s went by; how much more depends on the machine's load (subscribing took
    // over a second on a loaded one), so the lower bound is what actually went by.
    let waited = u32::try_from(published.elapsed().as_secs()).unwrap_or(u32::MAX);
    let lowest = 100u32.saturating_sub(waited + 1);
    assert!(
        (lowest..=99).contains(&left),
        "remaining {left} after {waited} s"
    );
    assert!(
        sub.recv_within(Duration::from_millis(500)).await.is_err(),
        "nothing else"
    );
}

#[tokio::test]
async fn graceful_shutdown_sends_0x8b() {
    let mut broker = Mqttd::start(&[]);
    let port = broker.port();
    let (mut v5, _) = Raw::connect(port, connect5("bye")).await;
    let (mut v3, _) = Raw::connect(
        port,
        Connect::new(ProtocolVersion::V3_1_1, mstr("bye3"), 30),
    )
    .await;
    broker.terminate();
    let seen = v5.until_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::ServerShuttingDown),
        "{seen:?}"
    );
    assert!(v3.until_closed().await.is_empty(), "3.1.1: just closed");
    // Nothing left to flush: the exit does not wait for the grace period.
    let status = broker.wait_exit(Duration::from_secs(3));
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn http_metrics_and_health() {
    let broker = Mqttd::start(&[]);
    let http = broker.http.expect("http address");
    let _client = subscribed(broker.port(), "metrics-client", "m/#", |_| {}).await;
    for (path, want) in [
        ("/metrics", "mqttd_clients_connected 1"),
        ("/health", "\"status\":\"ok\""),
    ] {
        let mut s = tokio::net::TcpStream::connect(http)
            .await
            .expect("connect http");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
            .await
            .expect("in time")
            .expect("read");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains(want), "{path}: {body}");
    }
}

#[tokio::test]
async fn assigned_client_identifier_and_empty_id_rules() {
    let broker = Mqttd::start(&[]);
    let port = broker.port();
    let (_c, ack) = Raw::connect(port, connect5("")).await;
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let id = ack
        .properties
        .assigned_client_identifier
        .expect("assigned id");
    assert!(!id.is_empty());
    let mut v3 = Connect::new(ProtocolVersion::V3_1_1, mstr(""), 30);
    v3.clean_start = false;
    let (mut raw, ack) = Raw::connect(port, v3).await;
    assert_eq!(ack.reason_code, ReasonCode::ClientIdentifierNotValid);
    assert!(raw.until_closed().await.is_empty());
}
