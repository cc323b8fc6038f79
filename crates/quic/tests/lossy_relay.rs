//! Transfers through a UDP relay that drops 5% of datagrams and delays/reorders others.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqttd_quic::Endpoint;
use mqttd_test_support::{Counts, Link, Relay};
use support::{Pki, Rng, sha256};
use tokio::net::UdpSocket;
use tokio::time::timeout;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_mib_both_directions_through_a_lossy_reordering_relay() {
    timeout(Duration::from_secs(50), async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        cfg.transport = Arc::new(support::transport());
        let server = Endpoint::server(cfg, localhost()).expect("server");
        // 5 % loss; a quarter of the rest held back 1-15 ms (reordered).
        let relay = Relay::start(server.local_addr(), Link::lossy(5, 0x1055)).await;

        let up = Rng(21).bytes(4 << 20);
        let down = Rng(22).bytes(4 << 20);
        let (up_hash, down_hash) = (sha256(&up), sha256(&down));
        let srv = server.clone();
        let down2 = down.clone();
        let server_task = tokio::spawn(async move {
            let conn = srv
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("server handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("accept");
            let writer = tokio::spawn(async move {
                send.write_all(&down2).await.expect("server write");
                send.finish().expect("finish");
                send
            });
            let got = recv.read_to_end(8 << 20).await.expect("server read");
            let _send = writer.await.expect("writer");
            conn.closed().await;
            got
        });

        let client = Endpoint::client(localhost()).expect("client");
        let mut cc = pki.client_config();
        cc.transport = Arc::new(support::transport());
        let conn = client
            .connect(&cc, relay.addr(), "localhost")
            .expect("connect")
            .await
            .expect("handshake via relay");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let writer = tokio::spawn(async move {
            send.write_all(&up).await.expect("client write");
            send.finish().expect("finish");
            send
        });
        let got_down = recv.read_to_end(8 << 20).await.expect("client read");
        let mut send = writer.await.expect("writer");
        // Closing discards unacknowledged data: wait until the upload is acknowledged.
        assert_eq!(send.stopped().await, None);
        assert_eq!(sha256(&got_down), down_hash, "download corrupted");
        conn.close(0, b"done");
        let got_up = server_task.await.expect("server task");
        assert_eq!(sha256(&got_up), up_hash, "upload corrupted");
        let Counts {
            received: total,
            dropped,
            ..
        } = relay.counts();
        assert!(
            dropped * 100 >= total * 3,
            "relay dropped only {dropped} of {total}"
        );
        let stats = conn.stats();
        assert!(stats.lost_packets > 0, "no loss was detected: {stats:?}");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lost_the_connection_resets_the_client_statelessly() {
    timeout(Duration::from_secs(20), async {
        let pki = Pki::new();
        let key = [0x42u8; 32];
        let make = || {
            let mut cfg = pki.server_config();
            cfg.transport = Arc::new(support::transport());
            cfg.stateless_reset_key = Some(key);
            Endpoint::server(cfg, localhost()).expect("server")
        };
        // Two servers sharing the reset key: the second knows nothing of the connection, like a
        // restarted process behind the same address.
        let (a, b) = (make(), make());
        support::spawn_echo(a.clone());
        let target = Arc::new(Mutex::new(a.local_addr()));
        let relay = UdpSocket::bind(localhost()).await.expect("relay");
        let relay_addr = relay.local_addr().expect("addr");
        let t = target.clone();
        let servers = [a.local_addr(), b.local_addr()];
        tokio::spawn(async move {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = relay.recv_from(&mut buf).await {
                let to = if servers.contains(&from) {
                    // Only the current target's packets reach the client.
                    if from != *t.lock().expect("target") {
                        continue;
                    }
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    *t.lock().expect("target")
                };
                let _ = relay.send_to(&buf[..n], to).await;
            }
        });
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), relay_addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut s, mut r) = conn.open_bi().await.expect("open");
        s.write_all(b"one").await.expect("write");
        assert_eq!(
            r.read_chunk(10).await.expect("read").as_deref(),
            Some(&b"one"[..])
        );
        // The relay now sends the client's packets to the server that never saw them.
        *target.lock().expect("target") = b.local_addr();
        s.write_all(b"two").await.expect("write");
        let err = conn.closed().await;
        assert_eq!(err, mqttd_quic::ConnectionError::Reset);
        assert!(
            b.stats()
                .stateless_resets
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    })
    .await
    .expect("timed out");
}
