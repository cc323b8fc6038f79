//! Bad input over raw TCP: each gets the right reason code or a close in bounded time, memory
//! does not grow with a claimed length, and a client beside keeps receiving every message.

use std::time::{Duration, Instant};

use mqttd_codec::{Connect, Packet, ProtocolVersion, ReasonCode};

use crate::clients::v4;
use crate::common::{Mqttd, Raw, mstr};

/// Asserts the broker closes `raw` within `limit`, and returns what it sent first.
async fn closed_within(raw: &mut Raw, limit: Duration, what: &str) -> Vec<Packet> {
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        match raw.recv_within(limit.saturating_sub(start.elapsed())).await {
            Ok(Some(p)) => seen.push(p),
            Ok(None) => return seen,
            Err(_) => panic!("{what}: connection still open after {limit:?}"),
        }
    }
}

fn connect_bytes(version: ProtocolVersion, id: &str) -> Vec<u8> {
    Packet::Connect(Box::new(Connect::new(version, mstr(id), 30)))
        .to_bytes(version)
        .expect("encode")
        .to_vec()
}

#[tokio::test]
async fn bad_input_is_refused_in_bounded_time_and_neighbours_keep_receiving() {
    let broker = Mqttd::start(&["--connect-timeout-secs", "1"]);
    let port = broker.port();

    // The neighbour: a subscriber that must get every one of N messages.
    const N: usize = 100;
    let mut sub = v4(port, "beside-sub", true, None).await;
    sub.client
        .subscribe("beside/t", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.suback().await;
    let publisher = v4(port, "beside-pub", true, None).await;
    let feed = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .client
                .publish("beside/t", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                .await
                .expect("publish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publisher
    });

    let rss_before = broker.rss_kib();

    // Garbage.
    let mut raw = Raw::tcp(port).await;
    raw.send_bytes(b"\xff\xfe garbage that is not MQTT at all \x00\x01\x02")
        .await;
    closed_within(&mut raw, Duration::from_secs(2), "garbage").await;

    // CONNECT claiming 256 MiB of remaining length, several at once: refused from the header.
    let mut claims = Vec::new();
    for _ in 0..20 {
        let mut raw = Raw::tcp(port).await;
        raw.send_bytes(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await;
        raw.send_bytes(&[0u8; 64 * 1024]).await;
        claims.push(raw);
    }
    for raw in &mut claims {
        closed_within(raw, Duration::from_secs(2), "256 MiB CONNECT").await;
    }
    let rss_after = broker.rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew with the claimed length: {rss_before} KiB -> {rss_after} KiB"
    );

    // A partial CONNECT, then silence: closed by the CONNECT timeout (1 s here).
    let mut raw = Raw::tcp(port).await;
    let bytes = connect_bytes(ProtocolVersion::V3_1_1, "partial");
    raw.send_bytes(&bytes[..bytes.len() / 2]).await;
    let t = Instant::now();
    closed_within(&mut raw, Duration::from_secs(3), "partial CONNECT").await;
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "closed by the timeout, not at once"
    );

    // A PUBLISH before CONNECT.
    let mut raw = Raw::tcp(port).await;
    raw.send_bytes(&[0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'])
        .await;
    let seen = closed_within(&mut raw, Duration::from_secs(2), "PUBLISH before CONNECT").await;
    assert!(seen.is_empty(), "{seen:?}");

    // An unsupported protocol level: CONNACK 0x01 (3.1.1 form) then close.
    let mut raw = Raw::tcp(port).await;
    raw.version = ProtocolVersion::V3_1_1;
    let mut bytes = connect_bytes(ProtocolVersion::V3_1_1, "lvl");
    bytes[8] = 9; // protocol level byte: 0x10, len, 0x00 0x04 'M' 'Q' 'T' 'T', level
    raw.send_bytes(&bytes).await;
    let seen = closed_within(&mut raw, Duration::from_secs(2), "bad protocol level").await;
    assert!(
        matches!(seen.first(), Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::UnsupportedProtocolVersion),
        "{seen:?}"
    );

    // A second CONNECT (5.0): DISCONNECT 0x82, then close.
    let (mut raw, ack) =
        Raw::connect(port, Connect::new(ProtocolVersion::V5, mstr("twice"), 30)).await;
    assert_eq!(ack.reason_code, ReasonCode::Success);
    raw.send_bytes(&connect_bytes(ProtocolVersion::V5, "twice"))
        .await;
    let seen = closed_within(&mut raw, Duration::from_secs(2), "second CONNECT").await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::ProtocolError),
        "{seen:?}"
    );

    // A malformed packet after CONNECT (5.0): DISCONNECT with the codec's reason, then close.
    let (mut raw, _) = Raw::connect(
        port,
        Connect::new(ProtocolVersion::V5, mstr("malformed"), 30),
    )
    .await;
    raw.send_bytes(&[0x62, 0x00]).await; // PUBREL without a packet id
    let seen = closed_within(&mut raw, Duration::from_secs(2), "malformed PUBREL").await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code.is_error()),
        "{seen:?}"
    );

    // The neighbour got everything, in order.
    let _publisher = tokio::time::timeout(Duration::from_secs(20), feed)
        .await
        .expect("feed in time")
        .expect("feed");
    for i in 0..N {
        let p = sub.next_publish().await;
        assert_eq!(String::from_utf8_lossy(&p.payload), i.to_string());
    }
}

#[tokio::test]
async fn max_connections_is_enforced() {
    let broker = Mqttd::start(&["--max-connections", "2"]);
    let port = broker.port();
    let (_a, _) = Raw::connect(port, Connect::new(ProtocolVersion::V5, mstr("a"), 30)).await;
    let (_b, _) = Raw::connect(port, Connect::new(ProtocolVersion::V5, mstr("b"), 30)).await;
    let mut c = Raw::tcp(port).await;
    c.send_bytes(&connect_bytes(ProtocolVersion::V5, "c")).await;
    let seen = closed_within(&mut c, Duration::from_secs(2), "over the limit").await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn keep_alive_timeout_closes_silent_client() {
    let broker = Mqttd::start(&[]);
    let mut c = Connect::new(ProtocolVersion::V5, mstr("silent"), 1);
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect(broker.port(), c).await;
    let t = Instant::now();
    let seen = closed_within(&mut raw, Duration::from_secs(4), "keep alive").await;
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "not before 1.5x keep alive"
    );
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::KeepAliveTimeout),
        "{seen:?}"
    );
}

#[tokio::test]
async fn oversized_packet_after_connect_gets_0x95() {
    let broker = Mqttd::start(&["--max-packet-size", "1024"]);
    let (mut raw, ack) = Raw::connect(
        broker.port(),
        Connect::new(ProtocolVersion::V5, mstr("big"), 30),
    )
    .await;
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    // A PUBLISH header announcing 1 MiB: refused from the header alone.
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x40]).await;
    let seen = closed_within(&mut raw, Duration::from_secs(2), "oversized PUBLISH").await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::PacketTooLarge),
        "{seen:?}"
    );
}

#[tokio::test]
async fn slow_subscriber_overflows_by_policy_and_never_blocks_others() {
    let broker = Mqttd::start(&["--connection-buffer", "16", "--max-queued-messages", "32"]);
    let port = broker.port();
    // The slow one subscribes and then never reads.
    let (mut slow, _) =
        Raw::connect(port, Connect::new(ProtocolVersion::V5, mstr("slow"), 0)).await;
    slow.send(Packet::Subscribe(mqttd_codec::Subscribe {
        packet_id: mqttd_codec::PacketId::new(1).expect("non-zero"),
        filters: vec![mqttd_codec::SubscribeFilter {
            filter: mqttd_codec::TopicFilter::new("flood/#").expect("filter"),
            options: mqttd_codec::SubscriptionOptions::qos(mqttd_codec::QoS::AtMostOnce),
        }],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(slow.recv().await, Some(Packet::SubAck(_))));
    let mut fast = v4(port, "fast", true, None).await;
    fast.client
        .subscribe("flood/end", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    fast.suback().await;
    let publisher = v4(port, "flooder", true, None).await;
    // 40 MB of QoS 0 towards a reader that never reads: far more than socket buffers hold.
    let payload = vec![b'x'; 16 * 1024];
    for _ in 0..2500 {
        publisher
            .client
            .publish(
                "flood/data",
                rumqttc::QoS::AtMostOnce,
                false,
                payload.clone(),
            )
            .await
            .expect("publish");
    }
    publisher
        .client
        .publish("flood/end", rumqttc::QoS::AtLeastOnce, false, "end")
        .await
        .expect("publish");
    // The router was never blocked: the fast subscriber gets the marker.
    let p = fast.next_publish().await;
    assert_eq!(&p.payload[..], b"end");
    // And the drops were counted.
    let http = broker.http.expect("http");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = tokio::net::TcpStream::connect(http)
            .await
            .expect("connect http");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read");
        let dropped: u64 = body
            .lines()
            .find_map(|l| l.strip_prefix("mqttd_messages_dropped_qos0_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("dropped counter");
        if dropped > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no drop counted: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(slow);
}
