//! Hostile input against our server: random and truncated datagrams, short Initials, unknown
//! versions, floods of Initials from many ports; and the anti-amplification limit.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqttd_quic::Endpoint;
use mqttd_quic::proto::{self, Path};
use support::{Pki, Rng, spawn_echo};
use tokio::net::UdpSocket;
use tokio::time::timeout;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A genuine first client datagram (an Initial padded to >= 1200 bytes) for `server`.
fn client_initial(pki: &Pki, from: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut c = proto::Connection::client(
        &pki.client_config(),
        "localhost",
        Path {
            local: from,
            remote: server,
        },
        Instant::now(),
        [3; 32],
    )
    .expect("client");
    let mut buf = Vec::new();
    let t = c
        .poll_transmit(Instant::now(), &mut buf, 1)
        .expect("initial");
    buf.truncate(t.size);
    buf
}

/// Whether RFC 9000 asks a server to answer `d` with Version Negotiation: a long header of an
/// unknown, non-zero version, in a datagram large enough to be an Initial, with valid CID lengths.
fn vn_due(d: &[u8]) -> bool {
    if d.len() < 1200 || d[0] & 0x80 == 0 {
        return false;
    }
    let version = u32::from_be_bytes([d[1], d[2], d[3], d[4]]);
    if version == 0 || version == 1 || version == 0x6b33_43cf {
        return false;
    }
    let dcid_len = d[5] as usize;
    let Some(&scid_len) = d.get(6 + dcid_len) else {
        return false;
    };
    // RFC 8999 allows up to 255-byte CIDs in unknown versions, but the server only answers
    // those it can echo (QUIC v1 limits, as ngtcp2 checks).
    dcid_len <= 20 && scid_len <= 20 && 7 + dcid_len + scid_len as usize <= d.len()
}

/// Counts long-header Version Negotiation packets (version 0) arriving on `sock`.
fn count_vn(sock: Arc<UdpSocket>, vn: Arc<AtomicUsize>, total: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sock.recv(&mut buf).await {
            total.fetch_add(1, Ordering::Relaxed);
            if n >= 5 && buf[0] & 0x80 != 0 && buf[1..5] == [0, 0, 0, 0] {
                vn.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_and_initial_floods() {
    timeout(Duration::from_secs(50), async {
        let pki = Pki::new();
        let mut cfg = pki.server_config();
        let mut t = support::transport();
        t.handshake_timeout = Duration::from_secs(3);
        cfg.transport = Arc::new(t);
        cfg.max_connections = 200;
        cfg.max_half_open = 100;
        cfg.retry_above_handshakes_per_sec = 50;
        let server = Endpoint::server(cfg, localhost()).expect("server");
        let addr = server.local_addr();
        spawn_echo(server.clone());

        let attacker = Arc::new(UdpSocket::bind(localhost()).await.expect("bind"));
        attacker.connect(addr).await.expect("connect");
        let vn = Arc::new(AtomicUsize::new(0));
        let replies = Arc::new(AtomicUsize::new(0));
        count_vn(attacker.clone(), vn.clone(), replies.clone());

        let initial = client_initial(&pki, attacker.local_addr().expect("addr"), addr);
        assert!(initial.len() >= 1200);
        let mut rng = Rng(0x5eed);
        let mut wrong_version_sent = 0;
        for i in 0..100_000u32 {
            let dgram: Vec<u8> = match i % 5 {
                // Random bytes of random length (including empty).
                0 => {
                    let n = (rng.next() % 1500) as usize;
                    rng.bytes(n)
                }
                // A real Initial truncated anywhere.
                1 => initial[..(rng.next() as usize % initial.len())].to_vec(),
                // A real Initial with random bytes flipped.
                2 => {
                    let mut d = initial.clone();
                    for _ in 0..4 {
                        let j = rng.next() as usize % d.len();
                        d[j] ^= rng.next() as u8 | 1;
                    }
                    d
                }
                // An unknown-version long header of Initial size: VN is due.
                3 => {
                    let mut d = initial.clone();
                    d[1..5].copy_from_slice(&(0x5a5a_0000 | (i & 0xffff)).to_be_bytes());
                    if d[1..5] == [0, 0, 0, 1] {
                        d[4] = 2;
                    }
                    d
                }
                // A short-header packet for an unknown connection.
                _ => {
                    let n = 20 + (rng.next() % 200) as usize;
                    let mut d = rng.bytes(n);
                    d[0] = 0x40 | (d[0] & 0x3f);
                    d
                }
            };
            if vn_due(&dgram) {
                wrong_version_sent += 1;
            }
            let _ = attacker.send(&dgram).await;
            if i % 64 == 0 {
                // Let the server keep up so the socket buffer does not just drop everything.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        // Initials below 1200 bytes create nothing.
        let before = server.open_connections();
        for n in [1199usize, 1000, 600] {
            let _ = attacker.send(&initial[..n]).await;
        }

        // A flood of genuine Initials from many source ports, and a well-behaved client at the
        // same time. The Initials are built first and then sent back to back: built one by one
        // in between (a TLS client each, slow on a busy machine), they came at a rate close to
        // the Retry threshold.
        let mut flooders = Vec::new();
        for _ in 0..400 {
            let s = UdpSocket::bind(localhost()).await.expect("bind");
            let init = client_initial(&pki, s.local_addr().expect("addr"), addr);
            flooders.push((s, init));
        }
        for (s, init) in &flooders {
            s.send_to(init, addr).await.expect("send");
        }
        let client = Endpoint::client(localhost()).expect("client");
        let conn = client
            .connect(&pki.client_config(), addr, "localhost")
            .expect("connect")
            .await
            .expect("well-behaved client must connect during the flood");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(b"still alive").await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(100).await.expect("read"), b"still alive");

        assert!(
            server.open_connections() <= 200,
            "connection table unbounded: {}",
            server.open_connections()
        );
        assert!(server.routing_entries() <= 200 * 8);
        let stats = server.stats();
        // Wait for VN replies to drain in.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The server answered unknown-version Initials and nothing else with VN (loopback UDP
        // drops some of 100,000 datagrams when the machine is busy, hence the lower bound of
        // one half), and the answers reached the sender.
        let answered = stats.version_negotiations.load(Ordering::Relaxed);
        assert!(
            answered * 2 >= wrong_version_sent && answered <= wrong_version_sent,
            "VN answered {answered} of {wrong_version_sent} unknown-version Initials"
        );
        let seen = vn.load(Ordering::Relaxed);
        assert!(
            seen > 0 && seen <= answered as usize,
            "saw {seen} VN packets, server sent {answered}"
        );
        assert!(
            stats.retries.load(Ordering::Relaxed) > 0,
            "Retry never kicked in under the flood"
        );
        assert!(
            stats.stateless_resets.load(Ordering::Relaxed) > 0,
            "no stateless reset for unknown short-header packets"
        );
        assert!(before <= 1 + 100_000 / 5, "sanity");
        drop(flooders);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_respects_anti_amplification_before_validation() {
    timeout(Duration::from_secs(20), async {
        let pki = Pki::new();
        let server = Endpoint::server(pki.server_config(), localhost()).expect("server");
        let addr = server.local_addr();
        // A client that sends its first Initial and then goes silent: the server cannot
        // validate its address and must stay within 3x what it received.
        let sock = UdpSocket::bind(localhost()).await.expect("bind");
        let initial = client_initial(&pki, sock.local_addr().expect("addr"), addr);
        sock.send_to(&initial, addr).await.expect("send");
        let received_by_server = initial.len();
        let mut sent_by_server = 0;
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        {
            sent_by_server += n;
        }
        assert!(sent_by_server > 0, "server sent nothing");
        assert!(
            sent_by_server <= 3 * received_by_server,
            "amplification: received {received_by_server}, sent {sent_by_server}"
        );
    })
    .await
    .expect("timed out");
}
