//! Two sans-IO connections driven against each other in memory: no sockets, simulated time,
//! simulated loss.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mqttd_quic::proto::{self, Connection, Ecn, Event, Path, packet};
use support::{Pki, Rng};

struct Pair {
    client: Connection,
    server: Option<Connection>,
    server_cfg: mqttd_quic::ServerConfig,
    now: Instant,
    rng: Rng,
    loss_percent: u64,
    client_addr: SocketAddr,
    server_addr: SocketAddr,
    buf: Vec<u8>,
    delivered: usize,
    dropped: usize,
    /// The largest datagram each side sent: client, server.
    largest: [usize; 2],
}

impl Pair {
    fn new(pki: &Pki, loss_percent: u64, seed: u64) -> Pair {
        let client_addr: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let server_addr: SocketAddr = "10.0.0.2:4433".parse().expect("addr");
        let now = Instant::now();
        let client = Connection::client(
            &pki.client_config(),
            "localhost",
            Path {
                local: client_addr,
                remote: server_addr,
            },
            now,
            [1; 32],
        )
        .expect("client");
        Pair {
            client,
            server: None,
            server_cfg: pki.server_config(),
            now,
            rng: Rng(seed),
            loss_percent,
            client_addr,
            server_addr,
            buf: Vec::new(),
            delivered: 0,
            dropped: 0,
            largest: [0; 2],
        }
    }

    fn deliver_to_server(&mut self, data: &[u8]) {
        if self.server.is_none() {
            let Some(init) = packet::accept_initial(data) else {
                return;
            };
            let info = proto::InitialInfo {
                dcid: init.header.dcid,
                scid: init.header.scid,
                version: init.header.version,
                retry: None,
            };
            let path = Path {
                local: self.server_addr,
                remote: self.client_addr,
            };
            self.server = Some(
                Connection::server(&self.server_cfg, &info, path, self.now, [2; 32])
                    .expect("server"),
            );
        }
        let path = Path {
            local: self.server_addr,
            remote: self.client_addr,
        };
        if let Some(s) = self.server.as_mut() {
            s.handle_datagram(self.now, path, Ecn::NotEct, data);
        }
    }

    /// Moves every pending datagram across (dropping some); returns whether anything moved.
    fn exchange(&mut self) -> bool {
        let mut moved = false;
        while let Some(t) = self.client.poll_transmit(self.now, &mut self.buf, 10) {
            moved = true;
            let data = std::mem::take(&mut self.buf);
            for seg in data[..t.size].chunks(t.segment_size.unwrap_or(t.size)) {
                self.largest[0] = self.largest[0].max(seg.len());
                if self.rng.chance(self.loss_percent) {
                    self.dropped += 1;
                    continue;
                }
                self.delivered += 1;
                self.deliver_to_server(seg);
            }
            self.buf = data;
        }
        if let Some(server) = self.server.as_mut() {
            let path = Path {
                local: self.client_addr,
                remote: self.server_addr,
            };
            while let Some(t) = server.poll_transmit(self.now, &mut self.buf, 10) {
                moved = true;
                for seg in self.buf[..t.size].chunks(t.segment_size.unwrap_or(t.size)) {
                    self.largest[1] = self.largest[1].max(seg.len());
                    if self.rng.chance(self.loss_percent) {
                        self.dropped += 1;
                        continue;
                    }
                    self.delivered += 1;
                    self.client
                        .handle_datagram(self.now, path, Ecn::NotEct, seg);
                }
            }
        }
        moved
    }

    /// One step: exchange, and if idle advance the clock to the next timer.
    fn step(&mut self) {
        if self.exchange() {
            // A little simulated latency per round.
            self.now += Duration::from_micros(500);
            self.client.handle_timeout(self.now);
            if let Some(s) = self.server.as_mut() {
                s.handle_timeout(self.now);
            }
            return;
        }
        let mut next = self.client.poll_timeout();
        if let Some(t) = self.server.as_ref().and_then(|s| s.poll_timeout()) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(t) = next {
            self.now = self.now.max(t);
        } else {
            self.now += Duration::from_millis(1);
        }
        self.client.handle_timeout(self.now);
        if let Some(s) = self.server.as_mut() {
            s.handle_timeout(self.now);
        }
    }
}

fn drain_events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// Writes what the stream takes of `data` now (0 when flow control blocks it); fails the test
/// on any other error.
fn write_some(c: &mut Connection, sid: proto::StreamId, data: &[u8]) -> usize {
    match c.stream_write(sid, data) {
        Ok(n) => n,
        Err(proto::StreamError::Blocked) => 0,
        Err(e) => panic!("client write: {e}"),
    }
}

/// Steps `pair` until the client's handshake completed (bounded; fails the test otherwise).
fn complete_handshake(pair: &mut Pair) {
    for _ in 0..100_000 {
        pair.step();
        if drain_events(&mut pair.client).contains(&Event::HandshakeCompleted) {
            return;
        }
    }
    panic!("handshake did not complete");
}

/// Handshake, then the client sends `len` bytes on a bidi stream, the server echoes them back.
fn echo(loss_percent: u64, len: usize, seed: u64) -> (usize, usize) {
    let pki = Pki::new();
    let mut pair = Pair::new(&pki, loss_percent, seed);
    let payload = Rng(seed ^ 0xabcdef).bytes(len);
    complete_handshake(&mut pair);
    assert_eq!(pair.client.alpn().as_deref(), Some(&b"mqtt"[..]));

    let sid = pair.client.open_bi().expect("open stream");
    let mut sent = 0;
    let mut server_stream = None;
    let mut server_got: Vec<u8> = Vec::new();
    let mut server_echoed = 0;
    let mut server_fin = false;
    let mut client_got: Vec<u8> = Vec::new();
    let mut client_fin = false;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..2_000_000 {
        if sent < payload.len() {
            sent += write_some(&mut pair.client, sid, &payload[sent..]);
            if sent == payload.len() {
                pair.client.stream_finish(sid).expect("finish");
            }
        }
        pair.step();
        let server = pair.server.as_mut().expect("server exists after handshake");
        for ev in drain_events(server) {
            if let Event::StreamOpened(id) = ev {
                server_stream = Some(id);
            }
        }
        if let Some(id) = server_stream {
            while !server_fin {
                match server.stream_read(id, &mut buf) {
                    Ok(Some(n)) => server_got.extend_from_slice(&buf[..n]),
                    Ok(None) => server_fin = true,
                    Err(proto::StreamError::Blocked) => break,
                    Err(e) => panic!("server read: {e}"),
                }
            }
            while server_echoed < server_got.len() {
                match server.stream_write(id, &server_got[server_echoed..]) {
                    Ok(n) => server_echoed += n,
                    Err(proto::StreamError::Blocked) => break,
                    Err(e) => panic!("server write: {e}"),
                }
            }
            if server_fin && server_echoed == server_got.len() && server_echoed == len {
                let _ = server.stream_finish(id);
            }
        }
        drain_events(&mut pair.client);
        loop {
            match pair.client.stream_read(sid, &mut buf) {
                Ok(Some(n)) => client_got.extend_from_slice(&buf[..n]),
                Ok(None) => {
                    client_fin = true;
                    break;
                }
                Err(proto::StreamError::Blocked) => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
        if client_fin {
            break;
        }
    }
    assert!(
        client_fin,
        "echo did not finish: sent {sent}, server got {}, client got {}",
        server_got.len(),
        client_got.len()
    );
    assert_eq!(server_got.len(), len);
    assert!(server_got == payload, "server received corrupted data");
    assert!(client_got == payload, "client received corrupted echo");

    // Close: the server sees the application close code.
    pair.client.close(42, b"bye");
    for _ in 0..1000 {
        pair.loss_percent = 0;
        pair.step();
        if pair.client.is_drained() {
            break;
        }
    }
    let server = pair.server.as_mut().expect("server");
    let evs = drain_events(server);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            Event::ConnectionLost(proto::ConnectionError::ApplicationClosed { code: 42, .. })
        )),
        "server did not see the close: {evs:?}"
    );
    (pair.delivered, pair.dropped)
}

#[test]
fn handshake_and_echo_in_memory() {
    echo(0, 256 * 1024, 7);
}

#[test]
fn echo_survives_ten_percent_loss() {
    let (delivered, dropped) = echo(10, 512 * 1024, 99);
    assert!(
        dropped > 10,
        "loss simulation dropped only {dropped} of {}",
        delivered + dropped
    );
}

/// Path MTU discovery past the usual Internet sizes waits until a connection carried data in
/// bulk: an idle connection keeps to packets of at most 1452 bytes (so neither side holds
/// buffers for larger ones), and one that moved a megabyte probes further and then sends large
/// datagrams, on a path (here: memory) that carries them.
#[test]
fn large_datagrams_only_after_bulk_data() {
    let pki = Pki::new();
    let mut pair = Pair::new(&pki, 0, 5);
    let transport = std::sync::Arc::new(mqttd_quic::TransportConfig {
        max_udp_payload_size: mqttd_quic::MAX_UDP_PAYLOAD,
        ..support::transport()
    });
    let mut client_cfg = pki.client_config();
    client_cfg.transport = transport.clone();
    pair.server_cfg.transport = transport;
    pair.client = Connection::client(
        &client_cfg,
        "localhost",
        Path {
            local: pair.client_addr,
            remote: pair.server_addr,
        },
        pair.now,
        [1; 32],
    )
    .expect("client");
    complete_handshake(&mut pair);
    // Idle, a little traffic: ten small messages each way over two simulated seconds.
    let sid = pair.client.open_bi().expect("open stream");
    let idle_until = pair.now + Duration::from_secs(2);
    let mut buf = vec![0u8; 64 * 1024];
    let mut server_stream = None;
    let mut round = 0;
    while pair.now < idle_until {
        if round < 10 {
            pair.client.stream_write(sid, &[7u8; 100]).expect("write");
        }
        round += 1;
        // Time moves in small steps, not to the next timer (which may be the idle timeout).
        if !pair.exchange() {
            pair.now += Duration::from_millis(20);
        }
        pair.client.handle_timeout(pair.now);
        let server = pair.server.as_mut().expect("server");
        server.handle_timeout(pair.now);
        for ev in drain_events(server) {
            if let Event::StreamOpened(id) = ev {
                server_stream = Some(id);
            }
        }
        if let Some(id) = server_stream {
            while let Ok(Some(_)) = server.stream_read(id, &mut buf) {}
        }
        drain_events(&mut pair.client);
    }
    assert!(server_stream.is_some(), "the server never saw the stream");
    assert!(
        pair.largest.iter().all(|&n| (1200..=1452).contains(&n)),
        "an idle connection sent datagrams of {:?} bytes",
        pair.largest
    );
    // Bulk: a megabyte from the client, read by the server as it arrives.
    let payload = vec![9u8; 1 << 20];
    let mut sent = 0;
    let mut received = 0;
    for _ in 0..200_000 {
        if sent < payload.len() {
            sent += write_some(&mut pair.client, sid, &payload[sent..]);
        }
        pair.step();
        let server = pair.server.as_mut().expect("server");
        drain_events(server);
        let id = server_stream.expect("stream");
        while let Ok(Some(n)) = server.stream_read(id, &mut buf) {
            received += n;
        }
        drain_events(&mut pair.client);
        if received >= payload.len() && pair.largest[0] > 1452 {
            break;
        }
    }
    assert_eq!(received, payload.len(), "bulk data did not arrive");
    assert!(
        pair.largest[0] >= 8952,
        "after a megabyte the client still sent datagrams of at most {} bytes",
        pair.largest[0]
    );
}
