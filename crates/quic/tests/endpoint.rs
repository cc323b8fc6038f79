//! Our client against our server over loopback UDP.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqttd_quic::{ConnectionError, Endpoint};
use support::{Pki, Rng, spawn_echo};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

fn server(pki: &Pki, tweak: impl FnOnce(&mut mqttd_quic::ServerConfig)) -> Endpoint {
    let mut cfg = pki.server_config();
    cfg.transport = Arc::new(support::transport());
    tweak(&mut cfg);
    Endpoint::server(cfg, "127.0.0.1:0".parse().expect("addr")).expect("bind server")
}

#[tokio::test]
async fn handshake_echo_and_datagrams() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let srv = server(&pki, |_| {});
        let addr = srv.local_addr();
        spawn_echo(srv.clone());
        let client = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        assert_eq!(conn.alpn().as_deref(), Some(&b"mqtt"[..]));
        let payload = Rng(5).bytes(1 << 20);
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        let p = payload.clone();
        let writer = tokio::spawn(async move {
            send.write_all(&p).await.expect("write");
            send.finish().expect("finish");
        });
        let got = recv.read_to_end(2 << 20).await.expect("read");
        writer.await.expect("writer");
        assert!(got == payload, "echo corrupted ({} bytes)", got.len());

        conn.send_datagram(Bytes::from_static(b"ping"))
            .expect("datagram");
        let d = conn.read_datagram().await.expect("datagram back");
        assert_eq!(&d[..], b"ping");
        let stats = conn.stats();
        assert!(stats.rtt > Duration::ZERO && stats.sent_bytes > (1 << 20));
        conn.close(7, b"done");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn idle_timeout_closes_both_sides() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let srv = server(&pki, |c| {
            let mut t = support::transport();
            t.idle_timeout = Duration::from_millis(300);
            c.transport = Arc::new(t);
        });
        let addr = srv.local_addr();
        let client = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let mut cc = pki.client_config();
        let mut t = support::transport();
        t.idle_timeout = Duration::from_millis(300);
        cc.transport = Arc::new(t);
        let conn = client.connect(&cc, addr, "localhost").expect("connect");
        let incoming = srv.accept().await.expect("incoming");
        let (conn, server_conn) = tokio::join!(conn, incoming);
        let (conn, server_conn) = (conn.expect("client"), server_conn.expect("server"));
        let (a, b) = tokio::join!(conn.closed(), server_conn.closed());
        assert_eq!(a, ConnectionError::TimedOut);
        assert_eq!(b, ConnectionError::TimedOut);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn dropping_the_server_endpoint_sends_connection_close() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let srv = server(&pki, |_| {});
        let addr = srv.local_addr();
        let client = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect");
        let incoming = srv.accept().await.expect("incoming");
        let (conn, server_conn) = tokio::join!(conn, incoming);
        let conn = conn.expect("client");
        drop(server_conn);
        drop(srv);
        let err = conn.closed().await;
        assert!(
            matches!(err, ConnectionError::ApplicationClosed { code: 0, .. }),
            "client saw {err:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn qlog_files_are_written_when_configured() {
    timeout(LIMIT, async {
        let dir = std::env::temp_dir().join(format!("mqttd-quic-qlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("qlog dir");
        let pki = Pki::new();
        let srv = server(&pki, |_| {});
        let addr = srv.local_addr();
        spawn_echo(srv.clone());
        let client = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        let mut cc = pki.client_config();
        let mut t = support::transport();
        t.qlog_dir = Some(dir.clone());
        cc.transport = Arc::new(t);
        let conn = client
            .connect(&cc, addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        conn.close(0, b"");
        drop(conn);
        drop(client);
        // The qlog is written as the connection goes away: look until it is there (bounded).
        let client_qlog_written = || {
            std::fs::read_dir(&dir).expect("read dir").any(|entry| {
                let path = entry.expect("entry").path();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                path.to_string_lossy().contains("client-") && text.contains("qlog")
            })
        };
        let deadline = tokio::time::Instant::now() + LIMIT / 2;
        let mut found = client_qlog_written();
        while !found && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            found = client_qlog_written();
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(found, "no client qlog with content");
    })
    .await
    .expect("test timed out");
}
