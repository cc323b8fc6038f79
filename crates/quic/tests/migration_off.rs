//! `ServerConfig::migration = false`: the server sends `disable_active_migration`, our client
//! then does not migrate actively on `rebind` but carries on from the new socket like after a
//! NAT rebinding, which the server validates and follows.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use mqttd_quic::Endpoint;
use support::{Pki, echo, spawn_echo};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_off_reaches_the_client_and_a_rebinding_client_is_still_followed() {
    timeout(LIMIT, async {
        let pki = Pki::new();

        // Default: migration allowed.
        let open = Endpoint::server(pki.server_config(), localhost()).expect("server");
        spawn_echo(open.clone());
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), open.local_addr(), "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        assert!(!conn.peer_disables_active_migration());
        conn.close(0, b"");

        // Off: the parameter reaches the client.
        let mut cfg = pki.server_config();
        cfg.migration = false;
        let server = Endpoint::server(cfg, localhost()).expect("server");
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        {
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(c) = server.accept().await {
                    let Ok(conn) = c.await else { continue };
                    let _ = tx.send(conn.clone());
                    while let Ok((mut s, mut r)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            if let Ok(data) = r.read_to_end(1 << 20).await {
                                let _ = s.write_all(&data).await;
                                let _ = s.finish();
                            }
                        });
                    }
                }
            });
        }
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), server.local_addr(), "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        assert!(conn.peer_disables_active_migration());
        assert_eq!(echo(&conn, b"before".to_vec()).await, b"before");
        let server_side = accepted.recv().await.expect("server connection");
        let before = server_side.remote_address();
        assert_eq!(before, client.local_addr());

        // The client's address changes (it must not migrate actively, so this is what a NAT
        // rebinding looks like to the server): the connection carries on from the new port.
        let new = client.rebind(localhost()).expect("rebind");
        assert_ne!(new, before);
        assert_eq!(echo(&conn, b"after".to_vec()).await, b"after");
        // The server followed the client to its new address on the same connection.
        for _ in 0..100 {
            if server_side.remote_address() == new {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server_side.remote_address(), new);
        assert_eq!(server.open_connections(), 1);
        conn.close(0, b"");
    })
    .await
    .expect("timed out");
}
