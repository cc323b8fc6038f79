//! MQTT over QUIC end to end: the real `mqttd` binary on free loopback ports, driven by an
//! independent client made of **quinn** (QUIC) and **rumqttc's `mqttbytes`** (MQTT 3.1.1
//! packets) — no mqttd code on the client side — next to rumqttc TCP clients.

mod client;
mod early;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, PubComp, PubRec, PubRel, Publish};
use sha2::Digest;
use tokio::sync::mpsc;

use client::{QuicMqtt, WAIT, quinn_endpoint};

/// Upper bound of a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// A running `mqttd` process (QUIC on a free UDP port, certificate generated into a fresh data
/// directory), killed on drop.
pub struct Broker {
    child: Child,
    /// MQTT over TCP.
    pub tcp: SocketAddr,
    /// MQTT over QUIC (UDP).
    pub quic: SocketAddr,
    /// The SHA-256 fingerprint the broker printed.
    pub fingerprint: String,
    /// Its data directory (removed on drop).
    pub data_dir: PathBuf,
}

impl Broker {
    /// Starts the binary with QUIC and TCP on free ports plus `args`; reads the addresses.
    pub fn start(name: &str, args: &[&str]) -> Broker {
        let data_dir = std::env::temp_dir().join(format!(
            "mqttd-quic-e2e-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
            .args(["--listen", "127.0.0.1:0", "--http-enabled", "false"])
            .args(["--quic-listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(["--sys-interval-secs", "0", "--data-dir"])
            .arg(&data_dir)
            .args(args)
            // One malloc arena: the memory tests read RSS, and glibc's per-thread arenas keep
            // freed memory of transient buffers, which made RSS a noisy proxy for live memory.
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mqttd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Keep draining so the broker never blocks on a full pipe.
                let _ = tx.send(line);
            }
        });
        let (mut tcp, mut quic, mut fingerprint) = (None, None, None);
        let deadline = std::time::Instant::now() + WAIT;
        while tcp.is_none() || quic.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("mqttd printed its addresses in time");
            if let Some(rest) = line.split("mqtt://").nth(1) {
                tcp = rest.trim().parse().ok();
            }
            if let Some(rest) = line.split("quic://").nth(1) {
                quic = rest.split(' ').next().and_then(|a| a.parse().ok());
                fingerprint = rest
                    .split("sha256 ")
                    .nth(1)
                    .map(|f| f.trim_end_matches(')').to_owned());
            }
        }
        Broker {
            child,
            tcp: tcp.expect("tcp address"),
            quic: quic.expect("quic address"),
            fingerprint: fingerprint.expect("fingerprint"),
            data_dir,
        }
    }

    /// The generated certificate (PEM) the broker serves.
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir.join("quic-cert.pem")).expect("generated certificate")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A rumqttc 3.1.1 TCP client whose incoming packets arrive on a channel.
struct Tcp {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Packet>,
    task: tokio::task::JoinHandle<()>,
    session_present: bool,
}

async fn tcp_client(broker: &Broker, id: &str, clean: bool) -> Tcp {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.tcp.port());
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    let session_present = match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(rumqttc::Packet::ConnAck(a))) => a.session_present,
        other => panic!("{id}: expected CONNACK, got {other:?}"),
    };
    Tcp {
        client,
        rx,
        task,
        session_present,
    }
}

impl Tcp {
    async fn next(&mut self) -> rumqttc::Packet {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(p)) => p,
            other => panic!("TCP client: expected a packet, got {other:?}"),
        }
    }

    async fn next_publish(&mut self) -> rumqttc::Publish {
        loop {
            if let rumqttc::Packet::Publish(p) = self.next().await {
                return p;
            }
        }
    }

    /// Publishes at QoS 1 and waits for every PUBACK.
    async fn publish_qos1(&mut self, topic: &str, payloads: impl IntoIterator<Item = Vec<u8>>) {
        let mut n = 0;
        for p in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, p)
                .await
                .expect("queue publish");
            n += 1;
        }
        while n > 0 {
            if let rumqttc::Packet::PubAck(_) = self.next().await {
                n -= 1;
            }
        }
    }

    /// Sends DISCONNECT (after anything queued, acks included) and waits until the broker has
    /// handled it (it closes the connection: the event loop ends with an error).
    async fn disconnect(self) {
        self.client.disconnect().await.expect("disconnect");
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("event loop ends after DISCONNECT")
            .expect("event loop task");
    }
}

fn run(test: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(TEST_LIMIT, test)
            .await
            .expect("test finished within its time limit");
    });
}

/// The broker logs/prints the SHA-256 of the certificate it generated; the client checks it
/// against the certificate file it trusts.
#[test]
fn generated_certificate_fingerprint_matches_the_served_file() {
    let broker = Broker::start("fingerprint", &[]);
    let pem = pem::parse(broker.cert_pem()).expect("PEM certificate");
    let digest = sha2::Sha256::digest(pem.contents());
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(broker.fingerprint, hex.join(":"));
}

/// quinn + mqttbytes subscriber and publisher against a rumqttc TCP client: QoS 0, 1 and 2
/// both ways through the broker. In multi-stream mode the subscription and the publishes use
/// two different data streams, and every ack and delivery must come back on the right one.
async fn exchange_qos_0_1_2(multi: bool) {
    let broker = if multi {
        Broker::start("qos-multi", &["--quic-multi-stream", "true"])
    } else {
        Broker::start("qos", &[])
    };
    let ep = quinn_endpoint();
    let (mut quic, ack) = QuicMqtt::connect(&ep, &broker, "quic-1", true, 30).await;
    assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
    assert_eq!(quic.alpn().as_deref(), Some(&b"mqtt"[..]));
    let (mut sub_stream, mut pub_stream) = if multi {
        (
            Some(quic.open_stream().await),
            Some(quic.open_stream().await),
        )
    } else {
        (None, None)
    };
    sub_stream
        .as_mut()
        .unwrap_or(&mut quic)
        .subscribe(1, "q/#", QoS::ExactlyOnce)
        .await;

    let mut tcp = tcp_client(&broker, "tcp-1", true).await;
    tcp.client
        .subscribe("t/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    loop {
        if let rumqttc::Packet::SubAck(_) = tcp.next().await {
            break;
        }
    }

    // TCP -> QUIC, each QoS.
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        tcp.client
            .publish(format!("q/{i}"), qos, false, format!("to quic {i}"))
            .await
            .expect("publish");
        let p = sub_stream
            .as_mut()
            .unwrap_or(&mut quic)
            .receive_publish()
            .await;
        assert_eq!(p.topic, format!("q/{i}"));
        assert_eq!(p.qos, qos);
        assert_eq!(&p.payload[..], format!("to quic {i}").as_bytes());
    }

    // QUIC -> TCP, each QoS with its full handshake.
    let mut pkid = 10;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let stream = pub_stream.as_mut().unwrap_or(&mut quic);
        pkid += 1;
        let mut p = Publish::new(format!("t/{i}"), qos, format!("to tcp {i}"));
        if qos != QoS::AtMostOnce {
            p.pkid = pkid;
        }
        stream.send(Packet::Publish(p)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                assert_eq!(stream.recv().await, Packet::PubAck(PubAck::new(pkid)));
            }
            QoS::ExactlyOnce => {
                assert_eq!(stream.recv().await, Packet::PubRec(PubRec::new(pkid)));
                stream.send(Packet::PubRel(PubRel::new(pkid))).await;
                assert_eq!(stream.recv().await, Packet::PubComp(PubComp::new(pkid)));
            }
        }
        let got = tcp.next_publish().await;
        assert_eq!(got.topic, format!("t/{i}"));
        assert_eq!(got.qos, qos);
        assert_eq!(&got.payload[..], format!("to tcp {i}").as_bytes());
    }
    if multi {
        // PINGREQ on the control stream is answered there.
        quic.send(Packet::PingReq).await;
        assert_eq!(quic.recv().await, Packet::PingResp);
    }
    quic.disconnect().await;
    tcp.disconnect().await;
}

#[test]
fn quic_client_exchanges_qos_0_1_2_with_a_tcp_client() {
    run(exchange_qos_0_1_2(false));
}

#[test]
fn multi_stream_client_exchanges_qos_0_1_2_with_a_tcp_client() {
    run(exchange_qos_0_1_2(true));
}

/// Head-of-line blocking. A subscriber reads topic B but not topic A while 32 MB of QoS 0
/// traffic floods A. Multi-stream mode (A and B on their own streams): B's QoS 1 messages keep
/// arriving while A's stream is stalled by QUIC flow control, and the broker's memory stays
/// within the stream queue bound. Single-stream mode (the same subscriptions on one stream):
/// B is stuck behind A — its first message, if any, comes after at least 1000 of A's.
///
/// The publisher waits for a QoS 1 acknowledgement every `SYNC_EVERY` messages: the broker's
/// ingress channel holds up to 8192 publishes waiting for the core, and unpaced, how full it
/// got depended on scheduling (RSS grew 12-18 MiB with 3 test copies in parallel, once
/// 21.5 MiB on CI, against 8-12 MiB paced). Paced, the figure measures what the stalled
/// stream costs, not how far the core lagged behind the publisher's socket.
async fn head_of_line(multi: bool) {
    const FLOOD: usize = 16_000;
    /// Messages between two QoS 1 round trips of the publisher (1 MiB of payload).
    const SYNC_EVERY: usize = 500;
    let payload = vec![0xA5u8; 2048];
    let mut args = vec!["--connection-buffer", "1024"];
    if multi {
        args.extend(["--quic-multi-stream", "true"]);
    }
    let broker = Broker::start(if multi { "hol-multi" } else { "hol-single" }, &args);
    let ep = quinn_endpoint();
    let (mut quic, _) = QuicMqtt::connect(&ep, &broker, "hol-sub", true, 60).await;
    let (mut a, mut b) = if multi {
        (
            Some(quic.open_stream().await),
            Some(quic.open_stream().await),
        )
    } else {
        (None, None)
    };
    a.as_mut()
        .unwrap_or(&mut quic)
        .subscribe(1, "hol/a", QoS::AtMostOnce)
        .await;
    b.as_mut()
        .unwrap_or(&mut quic)
        .subscribe(2, "hol/b", QoS::AtLeastOnce)
        .await;
    let rss_before = rss_kib(&broker);

    let mut publisher = tcp_client(&broker, "hol-pub", true).await;
    for i in 0..FLOOD {
        publisher
            .client
            .publish("hol/a", QoS::AtMostOnce, false, payload.clone())
            .await
            .expect("publish");
        if (i + 1) % SYNC_EVERY == 0 {
            // The broker handled the publishes so far once this QoS 1 publish (same
            // connection, later) is acked.
            publisher
                .publish_qos1("hol/other", [b"sync".to_vec()])
                .await;
        }
    }
    publisher
        .publish_qos1("hol/b", (0..20u8).map(|i| vec![b'b', i]))
        .await;

    if multi {
        let b = b.as_mut().expect("stream B");
        for i in 0..20u8 {
            let p = b.receive_publish().await;
            assert_eq!(p.topic, "hol/b");
            assert_eq!(
                &p.payload[..],
                &[b'b', i][..],
                "B keeps flowing while A is stalled"
            );
        }
        let grown = rss_kib(&broker).saturating_sub(rss_before);
        eprintln!("multi-stream: broker RSS grew {grown} KiB with topic A stalled");
        // Queue bound 1024 x 2 KiB, the stream's 4 MiB send buffer, allocator slack; the flood
        // itself was 32 MiB.
        assert!(
            grown < 20 * 1024,
            "broker grew by {grown} KiB for a stalled stream"
        );
        assert!(quic.connection_alive());
        drop(a);
    } else {
        let mut a_before_b = 0usize;
        let mut saw_b = false;
        while let Some(p) = tokio::time::timeout(Duration::from_secs(5), quic.try_recv())
            .await
            .ok()
            .flatten()
        {
            match p {
                Packet::Publish(p) if p.topic == "hol/a" => a_before_b += 1,
                Packet::Publish(p) if p.topic == "hol/b" => {
                    saw_b = true;
                    break;
                }
                _ => {}
            }
        }
        eprintln!("single-stream: {a_before_b} of A's messages before B (B seen: {saw_b})");
        assert!(
            !saw_b || a_before_b >= 1000,
            "single stream: B came after only {a_before_b} of A's messages"
        );
    }
    publisher.disconnect().await;
}

/// Resident memory of the broker process in KiB.
fn rss_kib(broker: &Broker) -> usize {
    std::fs::read_to_string(format!("/proc/{}/status", broker.child.id()))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn multi_stream_topic_b_flows_while_topic_a_is_stalled() {
    run(head_of_line(true));
}

#[test]
fn single_stream_topic_b_is_stuck_behind_stalled_topic_a() {
    run(head_of_line(false));
}

/// Multi-stream mode: a data stream abandoned (STOP_SENDING + RESET_STREAM) with a QoS 1
/// message delivered but not acknowledged ends only its own flows: the message comes again on
/// the control stream with DUP set, later messages of that subscription arrive there, and the
/// connection and its other streams carry on.
#[test]
fn multi_stream_reset_data_stream_loses_no_qos1_message() {
    run(async {
        let broker = Broker::start("reset", &["--quic-multi-stream", "true"]);
        let ep = quinn_endpoint();
        let (mut quic, _) = QuicMqtt::connect(&ep, &broker, "resetter", true, 60).await;
        let mut doomed = quic.open_stream().await;
        doomed.subscribe(1, "rs/#", QoS::AtLeastOnce).await;
        let mut other = quic.open_stream().await;
        other.subscribe(2, "keep/#", QoS::AtLeastOnce).await;
        let mut publisher = tcp_client(&broker, "rs-pub", true).await;
        publisher.publish_qos1("rs/1", [b"first".to_vec()]).await;
        // Received on its data stream but never acknowledged.
        match doomed.recv().await {
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"first"),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
        doomed.abandon();
        let p = quic.receive_publish().await;
        assert_eq!(
            &p.payload[..],
            b"first",
            "redelivered on the control stream"
        );
        assert!(p.dup);
        publisher.publish_qos1("rs/2", [b"second".to_vec()]).await;
        assert_eq!(&quic.receive_publish().await.payload[..], b"second");
        publisher.publish_qos1("keep/x", [b"kept".to_vec()]).await;
        assert_eq!(&other.receive_publish().await.payload[..], b"kept");
        quic.disconnect().await;
        publisher.disconnect().await;
    });
}

/// A client offering another ALPN is refused in the handshake with TLS alert 120
/// (no_application_protocol, QUIC error 0x178).
#[test]
fn wrong_alpn_is_refused_with_alert_120() {
    run(async {
        let broker = Broker::start("alpn", &[]);
        let ep = quinn_endpoint();
        let config = client::quinn_config(&broker.cert_pem(), b"h3");
        let err = tokio::time::timeout(
            WAIT,
            ep.connect_with(config, broker.quic, "localhost")
                .expect("connect"),
        )
        .await
        .expect("refused in time")
        .expect_err("the handshake must fail");
        match err {
            quinn::ConnectionError::ConnectionClosed(c) => {
                assert_eq!(
                    c.error_code,
                    quinn::TransportErrorCode::crypto(120),
                    "{c:?}"
                );
            }
            other => panic!("expected CONNECTION_CLOSE with alert 120, got {other:?}"),
        }
        // The listener still serves the right ALPN.
        let (quic, _) = QuicMqtt::connect(&ep, &broker, "after-alpn", true, 30).await;
        quic.disconnect().await;
    });
}

/// Garbage datagrams (random bytes, fake long and short headers, truncated Initials) aimed at
/// the listener do not disturb a connected client; a client whose stream carries a malformed
/// MQTT packet is disconnected alone.
#[test]
fn garbage_datagrams_and_a_malformed_packet_do_not_disturb_other_clients() {
    run(async {
        // The default durable store: held packets (CONNACK, DISCONNECT 0x81) still reach a
        // connection that closes within the same batch.
        let broker = Broker::start("garbage", &[]);
        let ep = quinn_endpoint();
        let (mut sub, _) = QuicMqtt::connect(&ep, &broker, "steady", true, 30).await;
        sub.subscribe(1, "g/#", QoS::AtLeastOnce).await;
        let mut tcp = tcp_client(&broker, "g-pub", true).await;

        let junk = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..20u32 {
            for i in 0..50usize {
                let len = [1, 20, 60, 1200, 1350][i % 5];
                let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                match i % 4 {
                    0 => d[0] |= 0xC0,                // long header, random version
                    1 => d[0] = (d[0] & 0x3F) | 0x40, // short header, unknown CID
                    2 if len > 5 => {
                        // An "Initial" of QUIC v1 with garbage after the version.
                        d[0] = 0xC0;
                        d[1..5].copy_from_slice(&1u32.to_be_bytes());
                    }
                    _ => {}
                }
                let _ = junk.send_to(&d, broker.quic);
            }
            tcp.publish_qos1("g/x", [round.to_be_bytes().to_vec()])
                .await;
            let p = sub.receive_publish().await;
            assert_eq!(&p.payload[..], &round.to_be_bytes()[..]);
        }

        // A QUIC client sends a PUBLISH with QoS 3 (malformed): the broker closes its stream.
        let (mut bad, _) = QuicMqtt::connect(&ep, &broker, "bad", true, 30).await;
        bad.send_raw(&[0x36, 0x05, 0x00, 0x01, b'g', 0x00, 0x01])
            .await;
        bad.expect_closed().await;

        // The same over MQTT 5.0 (raw bytes): DISCONNECT with reason code 0x81 (Malformed
        // Packet) after the CONNACK, then the end of the stream.
        let (mut v5, _v5_conn) = client::raw_stream(&ep, &broker).await;
        let connect_v5 = [
            0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00,
            0x02, b'v', b'5',
        ];
        v5.send_raw(&connect_v5).await;
        v5.send_raw(&[0x36, 0x05, 0x00, 0x01, b'g', 0x00, 0x01])
            .await;
        let reply = v5.read_to_end().await;
        assert_eq!(reply.first(), Some(&0x20), "CONNACK first: {reply:02x?}");
        let after = 2 + usize::from(reply[1]);
        assert_eq!(reply.get(3), Some(&0x00), "CONNACK Success: {reply:02x?}");
        assert_eq!(
            reply.get(after..after + 3).map(|d| [d[0], d[2]]),
            Some([0xE0, 0x81]),
            "DISCONNECT 0x81 Malformed Packet: {reply:02x?}"
        );

        // The others are unaffected.
        tcp.publish_qos1("g/after", [b"still here".to_vec()]).await;
        let p = sub.receive_publish().await;
        assert_eq!(&p.payload[..], b"still here");
        sub.disconnect().await;
        tcp.disconnect().await;
    });
}

/// A persistent session started over QUIC resumes over TCP and back over QUIC, with its
/// subscription and the QoS 1 messages queued while it was offline delivered each time.
#[test]
fn persistent_session_moves_quic_tcp_quic_with_queued_qos1() {
    run(async {
        // In memory (fast). `Tcp::disconnect` waits until the broker closed the link after the
        // DISCONNECT, so the next publish cannot be sent to the old link (it was, and came
        // again with DUP, when it returned right after sending: 3 of 8 runs with sync storage).
        let broker = Broker::start("resume", &["--storage", "memory"]);
        let ep = quinn_endpoint();
        let mut publisher = tcp_client(&broker, "resume-pub", true).await;

        let (mut quic, ack) = QuicMqtt::connect(&ep, &broker, "roamer", false, 30).await;
        assert!(!ack.session_present);
        quic.subscribe(1, "r/#", QoS::AtLeastOnce).await;
        quic.disconnect().await;

        // Offline: queued for the session.
        publisher
            .publish_qos1("r/a", (0..3u8).map(|i| vec![b'a', i]))
            .await;
        let mut tcp = tcp_client(&broker, "roamer", false).await;
        assert!(tcp.session_present, "the QUIC session resumes over TCP");
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = tcp.next_publish().await;
            assert_eq!(p.qos, QoS::AtLeastOnce);
            got.push(p.payload.to_vec());
        }
        assert_eq!(got, (0..3u8).map(|i| vec![b'a', i]).collect::<Vec<_>>());
        tcp.disconnect().await;

        publisher
            .publish_qos1("r/b", (0..3u8).map(|i| vec![b'b', i]))
            .await;
        let (mut quic, ack) = QuicMqtt::connect(&ep, &broker, "roamer", false, 30).await;
        assert!(ack.session_present, "the session resumes over QUIC again");
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = quic.receive_publish().await;
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert!(!p.dup, "acknowledged over TCP: not a redelivery");
            got.push(p.payload.to_vec());
        }
        assert_eq!(got, (0..3u8).map(|i| vec![b'b', i]).collect::<Vec<_>>());
        // The subscription itself came along: a live message arrives too.
        publisher.publish_qos1("r/live", [b"live".to_vec()]).await;
        assert_eq!(&quic.receive_publish().await.payload[..], b"live");
        quic.disconnect().await;
        publisher.disconnect().await;
    });
}

/// The client moves to a new UDP port while a stream of QoS 1 messages is arriving; the
/// connection (and so the MQTT session) survives and every message arrives exactly once.
#[test]
fn migration_mid_stream_delivers_every_qos1_message_exactly_once() {
    run(async {
        let broker = Broker::start("migrate", &[]);
        migrate_mid_stream(&broker).await;
    });
}

/// The body of the migration test, also run against a listener with migration off.
pub async fn migrate_mid_stream(broker: &Broker) {
    move_mid_stream(broker, None).await;
}

/// 600 QoS 1 messages to a QUIC subscriber; a quarter of the way the client moves to a new
/// port: by itself (`quinn::Endpoint::rebind`, an active migration), or, with `nat`, the NAT
/// relay it talks through switches to a new outside port (a NAT rebinding the client does not
/// even see). Every message must arrive exactly once on the same connection.
pub async fn move_mid_stream(broker: &Broker, nat: Option<&early::NatRelay>) {
    const N: u32 = 600;
    let ep = quinn_endpoint();
    let to = nat.map_or(broker.quic, |n| n.addr);
    let (mut sub, _) = QuicMqtt::connect_via(&ep, broker, to, "mover", false, 30).await;
    sub.subscribe(1, "m/#", QoS::AtLeastOnce).await;
    let mut publisher = tcp_client(broker, "m-pub", true).await;
    let pubs = tokio::spawn(async move {
        for chunk in 0..N / 50 {
            publisher
                .publish_qos1(
                    "m/x",
                    (chunk * 50..chunk * 50 + 50).map(|i| i.to_be_bytes().to_vec()),
                )
                .await;
        }
        publisher
    });
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let before = ep.local_addr().expect("addr");
    let mut moved_at = None;
    while seen.len() < N as usize {
        // Bounded like every read (`WAIT`); a stall says where it happened.
        let Ok(p) = tokio::time::timeout(client::WAIT, sub.receive_publish()).await else {
            panic!(
                "no message for {:?}: {} of {N} seen, moved at {moved_at:?}, NAT rebinds {:?}; {}",
                client::WAIT,
                seen.len(),
                nat.map(|n| n.rebinds()),
                sub.diagnostics()
            );
        };
        let n = u32::from_be_bytes(p.payload[..4].try_into().expect("4 bytes"));
        *seen.entry(n).or_default() += 1;
        if seen.len() == (N / 4) as usize && moved_at.is_none() {
            match nat {
                Some(nat) => {
                    nat.rebind().await;
                    // The broker learns the new binding only from the client's next packet; a
                    // client that has read everything and acknowledged it before the rebind has
                    // nothing left to send, and the broker's packets (and its loss probes) go
                    // to the dead binding. A real client speaks again at its keep alive (or a
                    // QUIC keep alive); here it does so at once instead of after 30 s.
                    sub.send(Packet::PingReq).await;
                }
                None => {
                    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                    ep.rebind(socket).expect("rebind");
                }
            }
            moved_at = Some(n);
        }
    }
    assert!(moved_at.is_some());
    match nat {
        Some(nat) => assert!(nat.rebinds() >= 1, "the NAT rebound"),
        None => assert_ne!(ep.local_addr().expect("addr"), before, "the client moved"),
    }
    // Nothing more (no duplicates) within a grace period.
    sub.send(Packet::PingReq).await;
    assert_eq!(sub.recv().await, Packet::PingResp);
    assert!(
        seen.values().all(|&c| c == 1),
        "duplicates: {:?}",
        seen.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>()
    );
    assert!(
        sub.connection_alive(),
        "the same QUIC connection carried on"
    );
    let publisher = pubs.await.expect("publisher");
    sub.disconnect().await;
    publisher.disconnect().await;
}

/// QUIC idle timeout and MQTT keep alive together: with a 2 s QUIC idle timeout, a client
/// silent for 5 s (MQTT keep alive 30 s) is still connected (the broker's PINGs keep QUIC
/// alive); a client silent past 1.5 x its 1 s keep alive is closed by the broker.
#[test]
fn quic_idle_timeout_defers_to_mqtt_keep_alive() {
    run(async {
        let broker = Broker::start("idle", &["--quic-idle-timeout-secs", "2"]);
        let ep = quinn_endpoint();
        let (mut quiet, _) = QuicMqtt::connect(&ep, &broker, "quiet", true, 30).await;
        let (mut lapsed, _) = QuicMqtt::connect(&ep, &broker, "lapsed", true, 1).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        quiet.send(Packet::PingReq).await;
        assert_eq!(
            quiet.recv().await,
            Packet::PingResp,
            "a live connection stays open"
        );
        lapsed.expect_closed().await;
        quiet.disconnect().await;
    });
}

/// Runs `mqttd pub`/`mqttd sub` to completion, bounded by `WAIT`.
fn cli(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mqttd client");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `mqttd pub` and `mqttd sub` over QUIC (trusting the broker's generated certificate with
/// `--cafile`, or `--insecure`) and TCP, through the broker; without either flag the
/// self-signed certificate is refused.
#[test]
fn cli_pub_and_sub_over_quic_and_tcp() {
    let broker = Broker::start("cli", &[]);
    let quic_port = broker.quic.port().to_string();
    let tcp_port = broker.tcp.port().to_string();
    let cafile = broker.data_dir.join("quic-cert.pem");
    let cafile = cafile.to_str().expect("utf-8 path");

    let untrusted = cli(&[
        "pub",
        "--quic",
        "-H",
        "127.0.0.1",
        "-p",
        &quic_port,
        "-t",
        "c/r",
        "-m",
        "x",
    ]);
    assert!(
        !untrusted.status.success(),
        "a self-signed certificate must not be trusted by default"
    );
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );

    let retained = cli(&[
        "pub",
        "--quic",
        "--insecure",
        "-H",
        "127.0.0.1",
        "-p",
        &quic_port,
        "-t",
        "c/r",
        "-m",
        "retained",
        "-r",
        "-q",
        "1",
    ]);
    assert!(
        retained.status.success(),
        "{}",
        String::from_utf8_lossy(&retained.stderr)
    );

    // The subscriber gets the retained message at once (so it is subscribed), then a live one.
    let mut sub = Command::new(env!("CARGO_BIN_EXE_mqttd"))
        .args([
            "sub",
            "--quic",
            "--cafile",
            cafile,
            "-H",
            "127.0.0.1",
            "-p",
            &quic_port,
        ])
        .args(["-t", "c/#", "-q", "2", "-C", "2", "-v", "-W", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqttd sub");
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("read");
    assert_eq!(first, "c/r retained");
    let live = cli(&[
        "pub",
        "-H",
        "127.0.0.1",
        "-p",
        &tcp_port,
        "-t",
        "c/x",
        "-m",
        "over tcp",
        "-q",
        "2",
    ]);
    assert!(
        live.status.success(),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    let second = lines.next().expect("a line").expect("read");
    assert_eq!(second, "c/x over tcp");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = sub.try_wait().expect("try_wait") {
            assert!(status.success(), "mqttd sub exits 0 after -C 2");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mqttd sub did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
