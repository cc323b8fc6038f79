//! Server-side early acceptance (`Connecting::into_0rtt` on the server): 0-RTT stream data is
//! read before the handshake completes and the answer leaves as 0.5-RTT data, one round trip
//! sooner than after the handshake. Measured in round trips through a relay that delays every
//! datagram, with an independent client (quinn).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttd_quic::Endpoint;
use support::{Pki, spawn_delay_relay};
use tokio::sync::mpsc;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);
/// One-way delay of the relay; a round trip is twice that.
const ONE_WAY: Duration = Duration::from_millis(50);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// What the server saw of one request.
#[derive(Debug)]
struct Seen {
    request: Vec<u8>,
    /// Whether the handshake had completed when the request was read in full.
    handshake_done_at_read: bool,
    /// Whether the client's 0-RTT was accepted.
    zero_rtt: bool,
}

/// Accepts every connection early; echoes the first stream's request. A request of `late`
/// waits for the handshake before answering (what a server without early acceptance does).
fn spawn_early_server(ep: Endpoint, seen: mpsc::UnboundedSender<Seen>) {
    tokio::spawn(async move {
        while let Some(connecting) = ep.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok((conn, accepted)) = connecting.into_0rtt() else {
                    panic!("the server side always converts");
                };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let Ok(request) = recv.read_to_end(1024).await else {
                    return;
                };
                let handshake_done_at_read = conn.is_handshake_complete();
                if request == b"late" && conn.handshake_complete().await.is_err() {
                    return;
                }
                if send.write_all(&request).await.is_err() {
                    return;
                }
                let _ = send.finish();
                let zero_rtt = accepted.await;
                let _ = seen.send(Seen {
                    request,
                    handshake_done_at_read,
                    zero_rtt,
                });
                conn.closed().await;
            });
        }
    });
}

/// Sends `request` on a fresh stream and reads the echo.
async fn exchange(conn: &quinn::Connection, request: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(request).await.expect("write");
    send.finish().expect("finish");
    recv.read_to_end(1024).await.expect("read the echo")
}

/// A resumed quinn connection sending `request` as 0-RTT data: how long from the first
/// datagram to the answer, and whether the server accepted the early data.
async fn zero_rtt_exchange(
    client: &quinn::Endpoint,
    relay: SocketAddr,
    request: &[u8],
) -> (Duration, bool) {
    let start = Instant::now();
    let connecting = client.connect(relay, "localhost").expect("connect");
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("quinn has no 0-RTT ticket from our server");
    };
    let echo = exchange(&conn, request).await;
    let elapsed = start.elapsed();
    assert_eq!(echo, request);
    let accepted = accepted.await;
    conn.close(0u32.into(), b"");
    (elapsed, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reads_0rtt_data_before_the_handshake_and_answers_a_round_trip_sooner() {
    timeout(LIMIT, async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        cfg.transport = Arc::new(support::transport());
        let server = Endpoint::server(cfg, localhost()).expect("server");
        let (tx, mut seen) = mpsc::unbounded_channel();
        spawn_early_server(server.clone(), tx);
        let relay = spawn_delay_relay(server.local_addr(), ONE_WAY).await;
        let rtt = (ONE_WAY * 2).as_secs_f64();
        let mut client = quinn::Endpoint::client(localhost()).expect("quinn client");
        client.set_default_client_config(pki.quinn_client_config());

        // A full handshake first, for the session ticket.
        let conn = client
            .connect(relay, "localhost")
            .expect("connect")
            .await
            .expect("handshake through the relay");
        assert_eq!(exchange(&conn, b"warm").await, b"warm");
        let warm = seen.recv().await.expect("server saw the warm-up");
        assert!(warm.handshake_done_at_read && !warm.zero_rtt);
        // The ticket travels with HANDSHAKE_DONE; give it a round trip to settle.
        tokio::time::sleep(ONE_WAY * 4).await;
        conn.close(0u32.into(), b"");

        // Resumed: the request is 0-RTT data; the server reads it before the handshake
        // completes and its answer arrives after one round trip.
        let (early, accepted) = zero_rtt_exchange(&client, relay, b"early").await;
        assert!(accepted, "our server rejected quinn's 0-RTT");
        let s = seen.recv().await.expect("server saw the early request");
        assert_eq!(s.request, b"early");
        assert!(
            !s.handshake_done_at_read,
            "0-RTT data must be readable before the handshake completes"
        );
        assert!(s.zero_rtt);

        // The same, but the server answers only after the handshake: two round trips.
        let (late, accepted) = zero_rtt_exchange(&client, relay, b"late").await;
        assert!(accepted);
        let s = seen.recv().await.expect("server saw the late request");
        assert!(!s.handshake_done_at_read && s.zero_rtt);

        let early_rtts = early.as_secs_f64() / rtt;
        let late_rtts = late.as_secs_f64() / rtt;
        eprintln!("0.5-RTT answer after {early_rtts:.2} RTT, after-handshake answer after {late_rtts:.2} RTT");
        assert!(
            early_rtts <= 1.5,
            "the 0.5-RTT answer took {early_rtts:.2} RTT (expected about 1)"
        );
        assert!(
            late_rtts >= 1.9,
            "an answer after the handshake cannot come before 2 RTT: {late_rtts:.2}"
        );
        assert!(late_rtts - early_rtts >= 0.6, "no round trip saved");
        client.wait_idle().await;
    })
    .await
    .expect("timed out");
}
