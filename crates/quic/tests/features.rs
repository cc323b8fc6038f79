//! Retry, QUIC v2, key update, BBR, stream reset / STOP_SENDING codes, close codes, endpoint
//! shutdown, send-on-flush streams; against our own stack and quinn.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mqttd_quic::{CongestionControl, ConnectionError, Endpoint, StreamError, Version};
use mqttd_test_support::{Link, Relay};
use support::{Pki, Rng, echo, quinn_echo, sha256, spawn_echo, spawn_quinn_echo};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Connects a quinn client that trusts the test PKI to `addr` as "localhost"; the endpoint
/// is returned too, to live as long as the connection.
async fn quinn_connect(pki: &Pki, addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    let q = pki.quinn_client();
    let qc = q
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("quinn handshake");
    (q, qc)
}

/// Waits (bounded) until the client holds a session ticket for "localhost".
async fn wait_for_ticket(cfg: &mqttd_quic::ClientConfig) {
    let deadline = tokio::time::Instant::now() + LIMIT / 3;
    while !cfg.tls.has_ticket("localhost") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_retry_works_for_our_client_and_quinn() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        cfg.retry = true;
        let server = Endpoint::server(cfg, localhost()).expect("server");
        let addr = server.local_addr();
        spawn_echo(server.clone());

        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake through Retry");
        assert_eq!(echo(&conn, b"retry".to_vec()).await, b"retry");

        let (_q, qc) = quinn_connect(&pki, addr).await;
        assert_eq!(
            quinn_echo(&qc, b"quinn retry".to_vec()).await,
            b"quinn retry"
        );
        assert!(server.stats().retries.load(Ordering::Relaxed) >= 2);
        qc.close(0u32.into(), b"");
        conn.close(0, b"");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_v2_key_update_and_bbr() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        let mut t = support::transport();
        t.versions = vec![Version::V2, Version::V1];
        cfg.transport = Arc::new(t);
        let server = Endpoint::server(cfg, localhost()).expect("server");
        let addr = server.local_addr();
        spawn_echo(server.clone());

        let client = Endpoint::client(localhost()).expect("client");
        let mut cc = pki.client_config();
        let mut t = support::transport();
        t.versions = vec![Version::V2];
        t.congestion_control = CongestionControl::Bbr;
        cc.transport = Arc::new(t);
        let conn = client
            .connect(&cc, addr, "localhost")
            .expect("connect")
            .await
            .expect("v2 handshake");
        assert_eq!(conn.version(), Version::V2.wire());
        let payload = Rng(3).bytes(2 << 20);
        assert!(echo(&conn, payload.clone()).await == payload);
        // Key update once the handshake is confirmed (after the first round trips).
        let mut updated = false;
        for _ in 0..50 {
            if conn.initiate_key_update() {
                updated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(updated, "key update never allowed");
        let payload = Rng(4).bytes(2 << 20);
        assert!(
            echo(&conn, payload.clone()).await == payload,
            "data after key update"
        );
        conn.close(0, b"");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_with_quinn() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server =
            quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("quinn");
        let addr = server.local_addr().expect("addr");
        spawn_quinn_echo(server.clone());
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let payload = Rng(5).bytes(1 << 20);
        assert!(echo(&conn, payload.clone()).await == payload);
        let mut updated = false;
        for _ in 0..50 {
            if conn.initiate_key_update() {
                updated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(updated, "key update never allowed");
        let payload = Rng(6).bytes(4 << 20);
        let got = echo(&conn, payload.clone()).await;
        assert_eq!(
            sha256(&got),
            sha256(&payload),
            "data after key update with quinn"
        );
        conn.close(0, b"");
        server.close(0u32.into(), b"");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_stop_sending_and_close_codes_reach_quinn() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = Endpoint::server(pki.server_config(), localhost()).expect("server");
        let addr = server.local_addr();
        let q = pki.quinn_client();
        let qconn = q.connect(addr, "localhost").expect("connect");
        let ours = server.accept().await.expect("incoming");
        let (qconn, ours) = tokio::join!(qconn, ours);
        let (qconn, ours) = (qconn.expect("quinn"), ours.expect("ours"));

        // Our RESET_STREAM code reaches quinn's reader.
        let (mut s, _r) = ours.open_bi().await.expect("open");
        s.write_all(b"partial").await.expect("write");
        s.reset(77).expect("reset");
        let (_qs, mut qr) = qconn.accept_bi().await.expect("accept");
        let err = qr.read_to_end(1000).await.expect_err("reset must surface");
        assert!(format!("{err:?}").contains("77"), "quinn saw {err:?}");

        // quinn's STOP_SENDING code reaches our writer.
        let (mut s2, _r2) = ours.open_bi().await.expect("open");
        s2.write_all(b"x").await.expect("write");
        let (_qs2, mut qr2) = qconn.accept_bi().await.expect("accept");
        qr2.stop(88u32.into()).expect("stop");
        assert_eq!(s2.stopped().await, Some(88));
        let mut err = None;
        for _ in 0..100 {
            match s2.write(b"more").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err, Some(StreamError::Stopped(88)));

        // quinn's RESET_STREAM code reaches our reader.
        let (mut qs3, _qr3) = qconn.open_bi().await.expect("open");
        qs3.write_all(b"y").await.expect("write");
        qs3.reset(99u32.into()).expect("reset");
        let (_s3, mut r3) = ours.accept_bi().await.expect("accept");
        let e = r3.read_to_end(100).await.expect_err("reset");
        assert!(
            matches!(
                e,
                mqttd_quic::ReadToEndError::Stream(StreamError::Reset(99))
            ),
            "{e:?}"
        );

        // Our application close code reaches quinn.
        ours.close(4242, b"bye");
        match qconn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(u64::from(c.error_code), 4242);
                assert_eq!(&c.reason[..], b"bye");
            }
            other => panic!("quinn saw {other:?}"),
        }
        assert_eq!(ours.closed().await, ConnectionError::LocallyClosed);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_close_and_wait_idle_reach_quinn() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = Endpoint::server(pki.server_config(), localhost()).expect("server");
        let addr = server.local_addr();
        spawn_echo(server.clone());
        let q = pki.quinn_client();
        let mut conns = Vec::new();
        for _ in 0..5 {
            let c = q
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            // One echo per connection: the server has then seen the client's Finished, so
            // the connections are established on both sides. A server closing before that
            // must send the close as a transport CONNECTION_CLOSE with APPLICATION_ERROR
            // (RFC 9000, 10.2.3), which is not what this test is about.
            assert_eq!(quinn_echo(&c, b"up".to_vec()).await, b"up");
            conns.push(c);
        }
        server.close(9, b"shutdown");
        for c in &conns {
            match c.closed().await {
                quinn::ConnectionError::ApplicationClosed(a) => {
                    assert_eq!(u64::from(a.error_code), 9)
                }
                other => panic!("quinn saw {other:?}"),
            }
        }
        server.wait_idle().await;
        assert_eq!(server.open_connections(), 0);
        // A closed endpoint refuses new connections.
        let refused = q.connect(addr, "localhost").expect("connect").await;
        assert!(refused.is_err(), "closed endpoint accepted a connection");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_rtt_accepted_by_us_and_rejected_by_a_server_without_our_ticket_key() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server_a = Endpoint::server(pki.server_config(), localhost()).expect("server a");
        spawn_echo(server_a.clone());
        let client = Endpoint::client(localhost()).expect("client");
        let cfg = pki.client_config();
        let conn = client
            .connect(&cfg, server_a.local_addr(), "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        assert_eq!(echo(&conn, b"warm".to_vec()).await, b"warm");
        wait_for_ticket(&cfg).await;
        assert!(cfg.tls.has_ticket("localhost"), "no ticket");
        conn.close(0, b"");

        // Accepted by the server that issued the ticket.
        let (conn, accepted) = client
            .connect(&cfg, server_a.local_addr(), "localhost")
            .expect("connect")
            .into_0rtt()
            .map_err(|_| "no 0-RTT")
            .expect("0-RTT");
        let (mut s, mut r) = conn.open_bi().await.expect("open");
        s.write_all(b"early").await.expect("write");
        s.finish().expect("finish");
        assert!(accepted.await, "our server rejected our 0-RTT");
        assert_eq!(r.read_to_end(100).await.expect("read"), b"early");
        conn.close(0, b"");
        wait_for_ticket(&cfg).await;

        // Rejected by a server that cannot decrypt the ticket: the early stream fails, the
        // connection carries on and new streams work. The server's replies are held until the
        // stream is open and written, so it is certainly a 0-RTT stream (on a busy machine the
        // handshake could otherwise complete first, and a stream opened after it is an
        // ordinary one that works).
        let server_b = Endpoint::server(pki.server_config(), localhost()).expect("server b");
        spawn_echo(server_b.clone());
        let relay = Relay::start(server_b.local_addr(), Link::delay(Duration::ZERO)).await;
        relay.hold_server();
        assert!(
            cfg.tls.has_ticket("localhost"),
            "no ticket for the rejection case"
        );
        let connecting = client
            .connect(&cfg, relay.addr(), "localhost")
            .expect("connect");
        let (conn, accepted) = connecting
            .into_0rtt()
            .map_err(|_| "no 0-RTT")
            .expect("0-RTT attempt");
        let (mut s, mut r) = conn.open_bi().await.expect("open");
        let _ = s.write_all(b"early").await;
        let _ = s.finish();
        assert!(
            !conn.is_handshake_complete(),
            "the handshake completed although the server was not heard"
        );
        relay.release();
        assert!(!accepted.await, "0-RTT accepted without the ticket key");
        assert!(
            r.read_to_end(100).await.is_err(),
            "rejected early stream must fail"
        );
        assert_eq!(echo(&conn, b"after".to_vec()).await, b"after");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_with_connection_refused() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        cfg.max_connections = 2;
        let server = Endpoint::server(cfg, localhost()).expect("server");
        spawn_echo(server.clone());
        let addr = server.local_addr();
        let client = Endpoint::client(localhost()).expect("client");
        let cc = pki.client_config();
        let a = client
            .connect(&cc, addr, "localhost")
            .expect("connect")
            .await
            .expect("first");
        let b = client
            .connect(&cc, addr, "localhost")
            .expect("connect")
            .await
            .expect("second");
        let third = client
            .connect(&cc, addr, "localhost")
            .expect("connect")
            .await;
        match third {
            Err(ConnectionError::ConnectionClosed { code: 0x2, .. }) => {}
            other => panic!("third connection: {other:?}"),
        }
        assert_eq!(server.open_connections(), 2);
        // The refusal is stateless; every Initial datagram of the attempt is refused.
        assert!(server.stats().refused.load(Ordering::Relaxed) >= 1);
        // Room again once one closes.
        a.close(0, b"");
        drop(a);
        // The server frees the slot after the draining period (3 PTO), and a loaded machine
        // can inflate the RTT estimate that PTO is made of: allow up to 20 s.
        let mut outcome = None;
        for _ in 0..400 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if server.open_connections() < 2 {
                outcome = Some(
                    client
                        .connect(&cc, addr, "localhost")
                        .expect("connect")
                        .await
                        .map(|_| ()),
                );
                break;
            }
        }
        match outcome {
            Some(Ok(())) => {}
            other => panic!("no room after a connection closed: {other:?}"),
        }
        drop(b);
    })
    .await
    .expect("timed out");
}

/// Waits (bounded) until the connection has neither sent nor received a packet for 200 ms: no
/// ACK, probe or handshake leftover is pending any more.
async fn until_quiet(conn: &mqttd_quic::Connection) {
    let deadline = tokio::time::Instant::now() + LIMIT / 3;
    let mut last = (u64::MAX, u64::MAX);
    while tokio::time::Instant::now() < deadline {
        let s = conn.stats();
        let now = (s.sent_packets, s.recv_packets);
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the connection never went quiet: {:?}", conn.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_on_flush_stream_sends_at_flush_to_quinn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    timeout(LIMIT, async {
        let pki = Pki::new();
        let q = quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("quinn");
        let addr = q.local_addr().expect("addr");
        spawn_quinn_echo(q);
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.set_send_on_flush(true);

        // Request/response rounds, each written and flushed by the writing task.
        let mut rng = Rng(0x5eed_f1a5);
        for round in 0..200usize {
            let msg = rng.bytes(1 + round % 300);
            send.write_all(&msg).await.expect("write");
            send.flush().await.expect("flush");
            let mut got = vec![0u8; msg.len()];
            recv.read_exact(&mut got).await.expect("echo");
            assert_eq!(got, msg, "round {round}");
        }

        // A write left unflushed waits: on a quiet connection nothing is sent for it...
        until_quiet(&conn).await;
        let before = conn.stats().sent_packets;
        send.write_all(b"held until flush").await.expect("write");
        let mut got = [0u8; 16];
        let early = timeout(Duration::from_millis(500), recv.read_exact(&mut got)).await;
        assert!(early.is_err(), "unflushed data was echoed: {early:?}");
        assert_eq!(
            conn.stats().sent_packets,
            before,
            "a write alone sent packets"
        );
        // ...and the flush sends it.
        send.flush().await.expect("flush");
        recv.read_exact(&mut got).await.expect("echo after flush");
        assert_eq!(&got, b"held until flush");

        // Writes larger than the send buffer still go out as they wait for room (the driver
        // is woken for those), and the flush sends the rest.
        let bulk = rng.bytes(1 << 20);
        let digest = sha256(&bulk);
        let reader = tokio::spawn(async move {
            let mut echoed = vec![0u8; 1 << 20];
            recv.read_exact(&mut echoed).await.expect("bulk echo");
            echoed
        });
        send.write_all(&bulk).await.expect("bulk write");
        send.flush().await.expect("flush");
        let echoed = reader.await.expect("reader");
        assert_eq!(sha256(&echoed), digest);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_the_ack_of_their_request_to_quinn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = Endpoint::server(pki.server_config(), localhost()).expect("server");
        let addr = server.local_addr();
        // An echo whose reading task hands each read to a writing task, which answers with
        // one flushed write a little later: as the broker's reader hands a PUBLISH to its core
        // and the connection's task writes the PUBACK.
        tokio::spawn(async move {
            let Some(connecting) = server.accept().await else {
                return;
            };
            let Ok(conn) = connecting.await else { return };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            send.set_send_on_flush(true);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    // The broker routes a message before it answers; other tasks run meanwhile.
                    for _ in 0..50 {
                        tokio::task::yield_now().await;
                    }
                    if send.write_all(&data).await.is_err() || send.flush().await.is_err() {
                        break;
                    }
                }
            });
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = recv.read(&mut buf).await {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let (_q, qc) = quinn_connect(&pki, addr).await;
        let (mut send, mut recv) = qc.open_bi().await.expect("open");
        let mut rng = Rng(0xac4_e0d);
        // The first rounds warm up (handshake leftovers: HANDSHAKE_DONE, new connection IDs,
        // the first RTT samples); the rest are counted.
        const WARM_UP: usize = 20;
        const ROUNDS: u64 = 200;
        let mut before = 0;
        for n in 0..WARM_UP + ROUNDS as usize {
            if n == WARM_UP {
                before = qc.stats().udp_rx.datagrams;
            }
            let msg = rng.bytes(1 + n % 200);
            send.write_all(&msg).await.expect("write");
            let mut got = vec![0u8; msg.len()];
            recv.read_exact(&mut got).await.expect("echo");
            assert_eq!(got, msg, "round {n}");
        }
        let datagrams = qc.stats().udp_rx.datagrams - before;
        // Each answer carries the ACK of its request: about one datagram per round, where an
        // ACK-only packet per request made it two.
        assert!(
            datagrams <= ROUNDS * 3 / 2,
            "{datagrams} datagrams from the server for {ROUNDS} request/response rounds"
        );
        qc.close(0u32.into(), b"");
    })
    .await
    .expect("timed out");
}

/// The ACK hold must not swallow ACKs: packets the application never answers (a publisher's
/// QoS 0 stream) are still acknowledged, each soon after it arrived, so the peer neither
/// probes nor resends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_packets_are_acknowledged_to_quinn() {
    use tokio::io::AsyncReadExt;
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = Endpoint::server(pki.server_config(), localhost()).expect("server");
        let addr = server.local_addr();
        let (total_tx, total_rx) = tokio::sync::oneshot::channel::<usize>();
        // Reads the stream to its end and never writes.
        tokio::spawn(async move {
            let Some(connecting) = server.accept().await else {
                return;
            };
            let Ok(conn) = connecting.await else { return };
            let Ok((_send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let mut total = 0;
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = recv.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            let _ = total_tx.send(total);
            // Keep the connection until the client closes it.
            let _ = conn.closed().await;
        });
        let (_q, qc) = quinn_connect(&pki, addr).await;
        let (mut send, _recv) = qc.open_bi().await.expect("open");
        // One write to settle the handshake's leftovers (HANDSHAKE_DONE, connection IDs).
        send.write_all(&[0u8; 100]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        const ROUNDS: u64 = 30;
        let sent_before = qc.stats().udp_tx.datagrams;
        for n in 0..ROUNDS {
            let acks = qc.stats().frame_rx.acks;
            send.write_all(&[n as u8; 100]).await.expect("write");
            // Bounded: the ACK is due within our ACK hold plus scheduling.
            let acked = async {
                while qc.stats().frame_rx.acks == acks {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            timeout(Duration::from_secs(5), acked)
                .await
                .unwrap_or_else(|_| panic!("round {n}: no ACK from the server"));
        }
        let sent = qc.stats().udp_tx.datagrams - sent_before;
        send.finish().expect("finish");
        let total = timeout(Duration::from_secs(10), total_rx)
            .await
            .expect("server read to the end")
            .expect("server task");
        assert_eq!(total, 100 * (ROUNDS as usize + 1), "bytes the server read");
        // One datagram per write: no probe or retransmission was needed for a missing ACK
        // (slack for a probe under a loaded machine).
        assert!(
            sent <= ROUNDS * 3 / 2,
            "{sent} datagrams from quinn for {ROUNDS} writes"
        );
        assert_eq!(
            qc.stats().path.lost_packets,
            0,
            "packets quinn declared lost"
        );
        qc.close(0u32.into(), b"");
    })
    .await
    .expect("timed out");
}
