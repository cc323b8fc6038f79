//! Interop with quinn 0.11 in both directions over loopback: our client against a quinn server,
//! and a quinn client against our server.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqttd_quic::Endpoint;
use support::{Pki, Rng, echo, quinn_echo, sha256, spawn_echo, spawn_quinn_echo};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(40);
const BIG: usize = 16 << 20;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn quinn_server(pki: &Pki) -> quinn::Endpoint {
    quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("quinn server")
}

fn our_server(pki: &Pki) -> Endpoint {
    let mut cfg = pki.server_config();
    cfg.transport = Arc::new(support::transport());
    Endpoint::server(cfg, localhost()).expect("our server")
}

fn our_client_config(pki: &Pki) -> mqttd_quic::ClientConfig {
    let mut cfg = pki.client_config();
    cfg.transport = Arc::new(support::transport());
    cfg
}

// ---- our client -> quinn server ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_quinn_server_echo_streams_datagrams() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = quinn_server(&pki);
        let addr = server.local_addr().expect("addr");
        spawn_quinn_echo(server.clone());
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&our_client_config(&pki), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake with quinn");
        assert_eq!(conn.alpn().as_deref(), Some(&b"mqtt"[..]));

        // 16 MiB echo on one stream, SHA-256 compared.
        let payload = Rng(1).bytes(BIG);
        let want = sha256(&payload);
        let got = echo(&conn, payload).await;
        assert_eq!(got.len(), BIG);
        assert_eq!(sha256(&got), want, "16 MiB echo corrupted");

        // 100 concurrent streams.
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let payload = Rng(i + 100).bytes(10_000 + i as usize * 100);
                let got = echo(&conn, payload.clone()).await;
                assert!(got == payload, "stream {i} corrupted");
            }));
        }
        for t in tasks {
            t.await.expect("stream task");
        }

        // Datagrams both ways.
        for i in 0..5u8 {
            conn.send_datagram(Bytes::from(vec![i; 100]))
                .expect("send datagram");
            let d = conn.read_datagram().await.expect("datagram");
            assert_eq!(&d[..], &[i; 100][..]);
        }
        conn.close(0, b"done");
        server.close(0u32.into(), b"");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_0rtt_and_migration_against_quinn() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = quinn_server(&pki);
        let addr = server.local_addr().expect("addr");
        spawn_quinn_echo(server.clone());
        let client = Endpoint::client(localhost()).expect("client");
        let cfg = our_client_config(&pki);

        // First connection: get a session ticket.
        let conn = client
            .connect(&cfg, addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let got = echo(&conn, b"hello".to_vec()).await;
        assert_eq!(got, b"hello");
        let deadline = tokio::time::Instant::now() + LIMIT / 4;
        while !cfg.tls.has_ticket("localhost") && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            cfg.tls.has_ticket("localhost"),
            "no session ticket from quinn"
        );
        conn.close(0, b"");
        drop(conn);

        // Second connection: 0-RTT.
        let connecting = client.connect(&cfg, addr, "localhost").expect("connect");
        let (conn, accepted) = connecting
            .into_0rtt()
            .map_err(|_| "no 0-RTT")
            .expect("0-RTT available");
        let (mut send, mut recv) = conn.open_bi().await.expect("open in 0-RTT");
        send.write_all(b"early data").await.expect("write early");
        send.finish().expect("finish");
        assert!(accepted.await, "quinn rejected our 0-RTT");
        assert!(conn.zero_rtt_accepted());
        let got = recv.read_to_end(1024).await.expect("read");
        assert_eq!(got, b"early data");

        // Migration mid-transfer: rebind to a new socket while 4 MiB echo.
        let payload = Rng(9).bytes(4 << 20);
        let want = sha256(&payload);
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let writer = tokio::spawn(async move {
            let (a, b) = payload.split_at(payload.len() / 4);
            send.write_all(a).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.write_all(b).await.expect("write after migration");
            send.finish().expect("finish");
        });
        let old = client.local_addr();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let new = client.rebind(localhost()).expect("rebind");
        assert_ne!(old, new);
        let mut got = Vec::new();
        recv.read_to_end(8 << 20)
            .await
            .map(|v| got = v)
            .expect("read after migration");
        writer.await.expect("writer");
        assert_eq!(sha256(&got), want, "transfer corrupted across migration");
        conn.close(0, b"");
        server.close(0u32.into(), b"");
    })
    .await
    .expect("timed out");
}

// ---- quinn client -> our server ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quinn_client_our_server_echo_streams_datagrams() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = our_server(&pki);
        let addr = server.local_addr();
        spawn_echo(server.clone());
        let client = pki.quinn_client();
        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let hd = conn
            .handshake_data()
            .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .expect("handshake data");
        assert_eq!(hd.protocol.as_deref(), Some(&b"mqtt"[..]));

        let payload = Rng(2).bytes(BIG);
        let want = sha256(&payload);
        let got = quinn_echo(&conn, payload).await;
        assert_eq!(got.len(), BIG);
        assert_eq!(sha256(&got), want, "16 MiB echo corrupted");

        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let payload = Rng(i + 200).bytes(10_000 + i as usize * 100);
                let got = quinn_echo(&conn, payload.clone()).await;
                assert!(got == payload, "stream {i} corrupted");
            }));
        }
        for t in tasks {
            t.await.expect("stream task");
        }

        for i in 0..5u8 {
            conn.send_datagram(Bytes::from(vec![i; 200]))
                .expect("send datagram");
            let d = conn.read_datagram().await.expect("datagram");
            assert_eq!(&d[..], &[i; 200][..]);
        }
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quinn_client_0rtt_and_migration_against_our_server() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let server = our_server(&pki);
        let addr = server.local_addr();
        spawn_echo(server.clone());
        let client = pki.quinn_client();

        let conn = client
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        assert_eq!(quinn_echo(&conn, b"hello".to_vec()).await, b"hello");
        // Give the NewSessionTicket time to arrive before closing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.close(0u32.into(), b"");

        let connecting = client.connect(addr, "localhost").expect("connect");
        let (conn, accepted) = connecting
            .into_0rtt()
            .map_err(|_| "no 0-RTT")
            .expect("quinn has 0-RTT");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(b"early data").await.expect("write");
        send.finish().expect("finish");
        assert!(accepted.await, "our server rejected 0-RTT");
        let got = recv.read_to_end(1024).await.expect("read");
        assert_eq!(got, b"early data");

        // Migration mid-transfer.
        let payload = Rng(11).bytes(4 << 20);
        let want = sha256(&payload);
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let writer = tokio::spawn(async move {
            let (a, b) = payload.split_at(payload.len() / 4);
            send.write_all(a).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.write_all(b).await.expect("write after migration");
            send.finish().expect("finish");
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let old = client.local_addr().expect("addr");
        client
            .rebind(std::net::UdpSocket::bind(localhost()).expect("bind"))
            .expect("rebind");
        assert_ne!(client.local_addr().expect("addr"), old);
        let got = recv
            .read_to_end(8 << 20)
            .await
            .expect("read after migration");
        writer.await.expect("writer");
        assert_eq!(sha256(&got), want, "transfer corrupted across migration");
        assert_eq!(
            server.open_connections(),
            1,
            "the migrated client must stay one connection"
        );
        conn.close(0u32.into(), b"");
        client.wait_idle().await;
    })
    .await
    .expect("timed out");
}
