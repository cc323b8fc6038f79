//! Bulk throughput, handshakes per second and memory per idle connection on loopback: ours
//! against quinn 0.11 in the same run. `cargo bench -p mqttd-quic --bench quic`
//! (environment: `QUIC_BENCH_MB` transfer size, `QUIC_BENCH_HANDSHAKES`, `QUIC_BENCH_IDLE`,
//! `QUIC_BENCH_REPS` repetitions; each repetition alternates the stacks, figures are medians;
//! `QUIC_BENCH_ONLY` a comma-separated subset of `bulk,handshakes,memory`;
//! `QUIC_BENCH_STACKS` a subset of `ours,quinn`, to profile one side alone).
//!
//! Key exchange: quinn here runs rustls with the `ring` provider, which offers X25519 (then the
//! NIST curves) and no post-quantum group. OpenSSL 3.5's default prefers the hybrid
//! X25519MLKEM768 and its client sends key shares for it and for X25519. So handshakes are
//! measured like with like (ours configured with `groups(&["X25519"])` on both ends, against
//! quinn's X25519) and, separately, with our default hybrid group.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttd_quic::Endpoint;
use support::{Pki, spawn_echo};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time used by this process so far (user + system, all threads), in seconds; 10 ms
/// resolution. Handshakes per CPU-second is robust against other load on a shared machine,
/// where wall-clock rates mostly measure the neighbours.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A rate measured two ways: per wall-clock second and per CPU-second of this process.
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

/// A sink server: reads every bidi stream to the end and answers with one byte.
fn spawn_sink(ep: Endpoint) {
    tokio::spawn(async move {
        while let Some(c) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = c.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(_)) = recv.read_chunk(usize::MAX).await {}
                        let _ = send.write_all(b"k").await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
}

fn spawn_quinn_sink(ep: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(i) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = i.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(_)) = recv.read_chunk(usize::MAX, true).await {}
                        let _ = send.write_all(b"k").await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
}

/// Our key exchange setting for a run.
#[derive(Clone, Copy)]
enum Groups {
    /// OpenSSL 3.5's default list (X25519MLKEM768 first).
    Default,
    /// X25519 only, on both ends: the group quinn + rustls/ring negotiates.
    X25519,
    /// X25519 and TLS_AES_256_GCM_SHA384 only, on both ends: the group and the suite quinn +
    /// rustls/ring negotiate with each other (rustls prefers AES-256-GCM-SHA384; ours prefers
    /// AES-128-GCM-SHA256, whose SHA-256 key schedule is cheaper).
    X25519Aes256,
}

impl Groups {
    fn list(self) -> Option<&'static [&'static str]> {
        match self {
            Groups::Default => None,
            Groups::X25519 | Groups::X25519Aes256 => Some(&["X25519"]),
        }
    }

    fn suites(self) -> &'static [mqttd_tls::CipherSuite] {
        match self {
            Groups::X25519Aes256 => &[mqttd_tls::CipherSuite::Aes256GcmSha384],
            _ => &mqttd_tls::CipherSuite::ALL,
        }
    }
}

fn client_cfg(pki: &Pki, groups: Groups) -> mqttd_quic::ClientConfig {
    let mut b = mqttd_tls::ClientConfig::builder()
        .ca_pem(pki.ca_pem.as_bytes())
        .alpn(&[support::ALPN])
        .cipher_suites(groups.suites())
        .enable_early_data(true);
    if let Some(list) = groups.list() {
        b = b.groups(list);
    }
    mqttd_quic::ClientConfig::new(b.build().expect("client TLS config"))
}

fn server_cfg(pki: &Pki) -> mqttd_quic::ServerConfig {
    server_cfg_with(pki, Groups::Default)
}

fn server_cfg_with(pki: &Pki, groups: Groups) -> mqttd_quic::ServerConfig {
    let mut b = mqttd_tls::ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(pki.key_pem.as_bytes())
        .alpn(&[support::ALPN])
        .cipher_suites(groups.suites());
    if let Some(list) = groups.list() {
        b = b.groups(list);
    }
    let mut cfg = mqttd_quic::ServerConfig::new(b.build().expect("server TLS config"));
    cfg.transport = Arc::new(mqttd_quic::TransportConfig {
        max_concurrent_bidi_streams: 1000,
        ..Default::default()
    });
    cfg.max_connections = 100_000;
    cfg.max_half_open = 100_000;
    cfg.retry_above_handshakes_per_sec = u32::MAX;
    cfg
}

async fn ours_throughput(pki: &Pki, bytes: usize) -> Rate {
    let server = Endpoint::server(server_cfg(pki), localhost()).expect("server");
    spawn_sink(server.clone());
    let client = Endpoint::client(localhost()).expect("client");
    let conn = client
        .connect(&pki.client_config(), server.local_addr(), "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let chunk = bytes::Bytes::from(vec![0xabu8; 256 * 1024]);
    let (start, cpu0) = (Instant::now(), cpu_secs());
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut sent = 0;
    while sent < bytes {
        send.write_chunk(chunk.clone()).await.expect("write");
        sent += chunk.len();
    }
    send.finish().expect("finish");
    let ack = recv.read_to_end(10).await.expect("ack");
    assert_eq!(ack, b"k");
    let (secs, cpu) = (start.elapsed().as_secs_f64(), (cpu_secs() - cpu0).max(0.01));
    if std::env::var_os("QUIC_BENCH_VERBOSE").is_some() {
        eprintln!("ours: {:?}", conn.stats());
    }
    conn.close(0, b"");
    let mib = sent as f64 / (1024.0 * 1024.0);
    Rate {
        wall: mib / secs,
        cpu: mib / cpu,
    }
}

async fn quinn_throughput(pki: &Pki, bytes: usize) -> Rate {
    let server = quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("server");
    let addr = server.local_addr().expect("addr");
    spawn_quinn_sink(server.clone());
    let client = pki.quinn_client();
    let conn = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let chunk = bytes::Bytes::from(vec![0xabu8; 256 * 1024]);
    let (start, cpu0) = (Instant::now(), cpu_secs());
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let mut sent = 0;
    while sent < bytes {
        send.write_chunk(chunk.clone()).await.expect("write");
        sent += chunk.len();
    }
    send.finish().expect("finish");
    let ack = recv.read_to_end(10).await.expect("ack");
    assert_eq!(ack, b"k");
    let (secs, cpu) = (start.elapsed().as_secs_f64(), (cpu_secs() - cpu0).max(0.01));
    if std::env::var_os("QUIC_BENCH_VERBOSE").is_some() {
        let s = conn.stats();
        eprintln!(
            "quinn: lost {} of {} packets, rtt {:?}, cwnd {}",
            s.path.lost_packets, s.udp_tx.datagrams, s.path.rtt, s.path.cwnd
        );
    }
    conn.close(0u32.into(), b"");
    let mib = sent as f64 / (1024.0 * 1024.0);
    Rate {
        wall: mib / secs,
        cpu: mib / cpu,
    }
}

const PARALLEL: usize = 8;

async fn ours_handshakes(pki: &Pki, n: usize, groups: Groups) -> Rate {
    let server = Endpoint::server(server_cfg_with(pki, groups), localhost()).expect("server");
    spawn_echo(server.clone());
    let addr = server.local_addr();
    let client = Endpoint::client(localhost()).expect("client");
    let cfg = client_cfg(pki, groups);
    let (start, cpu0) = (Instant::now(), cpu_secs());
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let client = client.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / PARALLEL {
                let conn = client
                    .connect(&cfg, addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake");
                conn.close(0, b"");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let done = (n / PARALLEL * PARALLEL) as f64;
    Rate {
        wall: done / start.elapsed().as_secs_f64(),
        cpu: done / (cpu_secs() - cpu0).max(0.01),
    }
}

async fn quinn_handshakes(pki: &Pki, n: usize) -> Rate {
    let server = quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("server");
    let addr = server.local_addr().expect("addr");
    support::spawn_quinn_echo(server.clone());
    let client = pki.quinn_client();
    let (start, cpu0) = (Instant::now(), cpu_secs());
    let mut tasks = Vec::new();
    for _ in 0..PARALLEL {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / PARALLEL {
                let conn = client
                    .connect(addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake");
                conn.close(0u32.into(), b"");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let done = (n / PARALLEL * PARALLEL) as f64;
    Rate {
        wall: done / start.elapsed().as_secs_f64(),
        cpu: done / (cpu_secs() - cpu0).max(0.01),
    }
}

/// RSS growth per idle established connection, both ends in this process, divided by two.
async fn ours_idle_memory(pki: &Pki, n: usize) -> usize {
    let server = Endpoint::server(server_cfg(pki), localhost()).expect("server");
    let addr = server.local_addr();
    let accepted = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let acc = accepted.clone();
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(c) = srv.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                if let Ok(conn) = c.await {
                    acc.lock().await.push(conn);
                }
            });
        }
    });
    let client = Endpoint::client(localhost()).expect("client");
    let cfg = pki.client_config();
    // Warm up allocator pools and TLS with a few connections first.
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(
            client
                .connect(&cfg, addr, "localhost")
                .expect("connect")
                .await
                .expect("hs"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    for _ in 0..n {
        conns.push(
            client
                .connect(&cfg, addr, "localhost")
                .expect("connect")
                .await
                .expect("hs"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    assert!(accepted.lock().await.len() >= n);
    after.saturating_sub(before) / n / 2
}

async fn quinn_idle_memory(pki: &Pki, n: usize) -> usize {
    let server = quinn::Endpoint::server(pki.quinn_server_config(), localhost()).expect("server");
    let addr = server.local_addr().expect("addr");
    let accepted = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let acc = accepted.clone();
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(i) = srv.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                if let Ok(conn) = i.await {
                    acc.lock().await.push(conn);
                }
            });
        }
    });
    let client = pki.quinn_client();
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(
            client
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("hs"),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    for _ in 0..n {
        conns.push(
            client
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("hs"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    assert!(accepted.lock().await.len() >= n);
    after.saturating_sub(before) / n / 2
}

/// Whether `item` is selected by the comma-separated list in environment variable `name`
/// (unset: everything is).
fn selected(name: &str, item: &str) -> bool {
    std::env::var(name).map_or(true, |v| v.split(',').any(|s| s.trim() == item))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this binary with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mb = env("QUIC_BENCH_MB", if quick { 4 } else { 256 });
    let hs = env("QUIC_BENCH_HANDSHAKES", if quick { 16 } else { 800 });
    let idle = env("QUIC_BENCH_IDLE", if quick { 10 } else { 1000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let reps = env("QUIC_BENCH_REPS", if quick { 1 } else { 3 }).max(1);
    let (ours, quinn) = (
        selected("QUIC_BENCH_STACKS", "ours"),
        selected("QUIC_BENCH_STACKS", "quinn"),
    );
    rt.block_on(async {
        let pki = Pki::new();
        let bytes = mb << 20;
        let wall = |v: &[Rate]| median(v.iter().map(|r| r.wall).collect());
        let cpu = |v: &[Rate]| median(v.iter().map(|r| r.cpu).collect());
        // Alternate the stacks in every repetition to share machine noise fairly; medians.
        if selected("QUIC_BENCH_ONLY", "bulk") {
            let (mut ours_t, mut quinn_t) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                if ours {
                    ours_t.push(ours_throughput(&pki, bytes).await);
                }
                if quinn {
                    quinn_t.push(quinn_throughput(&pki, bytes).await);
                }
            }
            if ours && quinn {
                let (ow, qw, oc, qc) = (wall(&ours_t), wall(&quinn_t), cpu(&ours_t), cpu(&quinn_t));
                println!("bulk transfer ({mb} MiB, one stream, median of {reps}): ours {ow:.0} MiB/s, quinn {qw:.0} MiB/s, ratio {:.2}; MiB per CPU-second: ours {oc:.0}, quinn {qc:.0}, ratio {:.2}", ow / qw, oc / qc);
            }
        }
        if selected("QUIC_BENCH_ONLY", "handshakes") {
            let (mut ours_x, mut ours_d, mut quinn_h) = (Vec::new(), Vec::new(), Vec::new());
            let mut ours_a = Vec::new();
            for _ in 0..reps {
                if ours {
                    ours_x.push(ours_handshakes(&pki, hs, Groups::X25519).await);
                }
                if quinn {
                    quinn_h.push(quinn_handshakes(&pki, hs).await);
                }
                if ours && quinn {
                    ours_d.push(ours_handshakes(&pki, hs, Groups::Default).await);
                    ours_a.push(ours_handshakes(&pki, hs, Groups::X25519Aes256).await);
                }
            }
            if ours && quinn {
                let (qw, qc) = (wall(&quinn_h), cpu(&quinn_h));
                for (label, ours) in [
                    ("X25519 on both stacks", &ours_x),
                    (
                        "X25519 and TLS_AES_256_GCM_SHA384 (quinn's) on both stacks",
                        &ours_a,
                    ),
                    ("ours with OpenSSL's default X25519MLKEM768 vs quinn's X25519", &ours_d),
                ] {
                    let (ow, oc) = (wall(ours), cpu(ours));
                    println!("handshakes ({hs}, {PARALLEL} in parallel, median of {reps}), {label}: ours {ow:.0}/s, quinn {qw:.0}/s, ratio {:.2}; per CPU-second: ours {oc:.0}, quinn {qc:.0}, ratio {:.2}", ow / qw, oc / qc);
                }
            } else {
                let (label, v) = if ours { ("ours, X25519", &ours_x) } else { ("quinn", &quinn_h) };
                println!("handshakes ({hs}, {PARALLEL} in parallel, median of {reps}), {label}: {:.0}/s, {:.0} per CPU-second", wall(v), cpu(v));
            }
        }
        if selected("QUIC_BENCH_ONLY", "memory") && ours && quinn {
            let ours_m = ours_idle_memory(&pki, idle).await;
            let quinn_m = quinn_idle_memory(&pki, idle).await;
            println!("memory per idle established connection (RSS delta over {idle}, per end): ours {} KiB, quinn {} KiB", ours_m / 1024, quinn_m / 1024);
        }
    });
}
