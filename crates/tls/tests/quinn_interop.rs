//! Independence: ngtcp2 on mqttd-tls handshakes in memory with `quinn-proto` (sans-IO, rustls with
//! ring) as the peer, in both roles, for every cipher suite, ALPN `mqtt`, and stream data flows
//! both ways on streams each side opens. Our stack agreeing with itself is not enough.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttd_ngtcp2_sys::*;
use mqttd_tls::{CipherSuite, ClientConfig, ServerConfig};
use quinn_proto::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, StreamEvent,
    StreamId,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{Side, TestPki};

const MQTT: &[&[u8]] = &[b"mqtt"];
/// The addresses `support::Side` uses for the ngtcp2 end: a client on 40000, a server on 14567.
const NGTCP2_CLIENT: &str = "127.0.0.1:40000";
const NGTCP2_SERVER: &str = "127.0.0.1:14567";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn quinn_server_config(pki: &TestPki) -> quinn_proto::ServerConfig {
    let chain = vec![CertificateDer::from_pem_slice(pki.leaf_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.leaf_key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    quinn_proto::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()))
}

fn quinn_client_config(pki: &TestPki) -> quinn_proto::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    quinn_proto::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

/// The quinn-proto end: one endpoint with at most one connection, on the same fake clock as the
/// ngtcp2 end (one tick = 1 ms).
struct Quinn {
    endpoint: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    /// The ngtcp2 end's address.
    peer: SocketAddr,
    epoch: Instant,
    connected: bool,
    lost: Option<String>,
    received: HashMap<StreamId, Vec<u8>>,
    /// Peer-opened bidirectional streams, in order.
    accepted: Vec<StreamId>,
    /// Data still to write: (stream, bytes, written so far, finish when done).
    outgoing: Vec<(StreamId, Vec<u8>, usize)>,
}

impl Quinn {
    fn new(server: Option<quinn_proto::ServerConfig>, peer: &str) -> Self {
        Quinn {
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                server.map(Arc::new),
                false,
                None,
            ),
            conn: None,
            peer: peer.parse().unwrap(),
            epoch: Instant::now(),
            connected: false,
            lost: None,
            received: HashMap::new(),
            accepted: Vec::new(),
            outgoing: Vec::new(),
        }
    }

    fn now(&self, tick: u64) -> Instant {
        self.epoch + Duration::from_millis(tick)
    }

    fn conn(&mut self) -> &mut Connection {
        &mut self.conn.as_mut().expect("no quinn connection").1
    }

    fn connect(&mut self, config: quinn_proto::ClientConfig, tick: u64) {
        let now = self.now(tick);
        let (ch, conn) = self
            .endpoint
            .connect(now, config, self.peer, "localhost")
            .unwrap();
        self.conn = Some((ch, conn));
    }

    /// Takes one datagram from the ngtcp2 end; returns any stateless response.
    fn recv(&mut self, datagram: &[u8], tick: u64) -> Vec<Vec<u8>> {
        let now = self.now(tick);
        let mut buf = Vec::new();
        let event = self.endpoint.handle(
            now,
            self.peer,
            None,
            None,
            BytesMut::from(datagram),
            &mut buf,
        );
        match event {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let mut resp = Vec::new();
                match self.endpoint.accept(incoming, now, &mut resp, None) {
                    Ok((ch, conn)) => self.conn = Some((ch, conn)),
                    Err(e) => panic!("quinn refused the connection: {:?}", e.cause),
                }
            }
            Some(DatagramEvent::ConnectionEvent(_, event)) => self.conn().handle_event(event),
            Some(DatagramEvent::Response(t)) => return vec![buf[..t.size].to_vec()],
            None => {}
        }
        Vec::new()
    }

    /// Runs timers, application events and stream I/O; returns the datagrams to send.
    fn poll(&mut self, tick: u64) -> Vec<Vec<u8>> {
        let now = self.now(tick);
        let Some((ch, conn)) = self.conn.as_mut() else {
            return Vec::new();
        };
        if conn.poll_timeout().is_some_and(|t| t <= now) {
            conn.handle_timeout(now);
        }
        while let Some(event) = conn.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(*ch, event) {
                conn.handle_event(event);
            }
        }
        while let Some(event) = conn.poll() {
            match event {
                Event::Connected => self.connected = true,
                Event::ConnectionLost { reason } => self.lost = Some(reason.to_string()),
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = conn.streams().accept(Dir::Bi) {
                        self.accepted.push(id);
                    }
                }
                _ => {}
            }
        }
        // Read everything readable on the streams we know of.
        let ids: Vec<StreamId> = self
            .accepted
            .iter()
            .chain(self.outgoing.iter().map(|(id, _, _)| id))
            .copied()
            .collect();
        for id in ids {
            let mut rs = conn.recv_stream(id);
            let Ok(mut chunks) = rs.read(true) else {
                continue;
            };
            while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                self.received
                    .entry(id)
                    .or_default()
                    .extend_from_slice(&chunk.bytes);
            }
            let _ = chunks.finalize();
        }
        for (id, data, done) in &mut self.outgoing {
            if *done < data.len() {
                let mut ss = conn.send_stream(*id);
                if let Ok(n) = ss.write(&data[*done..]) {
                    *done += n;
                    if *done == data.len() {
                        ss.finish().unwrap();
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            out.push(buf[..t.size].to_vec());
            buf.clear();
        }
        out
    }

    fn received_on(&self, id: StreamId) -> &[u8] {
        self.received.get(&id).map(|v| &v[..]).unwrap_or(&[])
    }

    fn handshake(&mut self) -> Box<HandshakeData> {
        self.conn()
            .crypto_session()
            .handshake_data()
            .expect("handshake data")
            .downcast::<HandshakeData>()
            .unwrap()
    }
}

/// Runs ngtcp2's timers; a failure there fails the test.
fn expire(side: &mut Side, tick: u64) {
    // SAFETY: live connection.
    unsafe {
        if ngtcp2_conn_get_expiry(side.conn) <= support::now_ns(tick) {
            let rv = ngtcp2_conn_handle_expiry(side.conn, support::now_ns(tick));
            assert_eq!(rv, 0, "ngtcp2 handle_expiry");
        }
    }
}

fn deliver_to_ngtcp2(side: &mut Side, datagrams: Vec<Vec<u8>>, tick: u64) {
    for d in datagrams {
        let rv = side.recv(&d, tick);
        assert!(
            rv == 0 || rv == NGTCP2_ERR_DRAINING,
            "ngtcp2 read_pkt: {rv} ({:?})",
            side.tls.take_error().map(|e| e.to_string())
        );
    }
}

fn deliver_to_quinn(quinn: &mut Quinn, datagrams: Vec<Vec<u8>>, tick: u64) -> Vec<Vec<u8>> {
    let mut responses = Vec::new();
    for d in datagrams {
        responses.extend(quinn.recv(&d, tick));
    }
    responses
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// ngtcp2 client (our backend) ↔ quinn-proto server (rustls + ring).
fn ngtcp2_client_quinn_server(suite: CipherSuite) {
    let pki = TestPki::new();
    let mut quinn = Quinn::new(Some(quinn_server_config(&pki)), NGTCP2_CLIENT);
    let client_cfg = ClientConfig::builder()
        .ca_pem(pki.ca_pem.as_bytes())
        .alpn(MQTT)
        .cipher_suites(&[suite])
        .build()
        .unwrap();
    let mut client = Side::client(&client_cfg, NGTCP2_PROTO_VER_V1, 0);

    let request = pattern(40_000, 1);
    let reply = pattern(25_000, 2);
    let pushed = b"PUBLISH from quinn-proto".to_vec();
    let mut client_stream = None;
    let mut server_stream = None;
    let mut to_quinn = client.send(0).unwrap();
    for tick in 1..2_000 {
        let responses = deliver_to_quinn(&mut quinn, std::mem::take(&mut to_quinn), tick);
        deliver_to_ngtcp2(&mut client, responses, tick);
        if let Some(reason) = &quinn.lost {
            panic!("{suite:?}: quinn lost the connection: {reason}");
        }
        let to_client = quinn.poll(tick);
        deliver_to_ngtcp2(&mut client, to_client, tick);
        expire(&mut client, tick);

        if client.handshake_completed && client_stream.is_none() {
            let id = client.open_bidi();
            client.outgoing.push((id, request.clone(), 0));
            client_stream = Some(id);
        }
        if quinn.connected && server_stream.is_none() {
            let id = quinn
                .conn()
                .streams()
                .open(Dir::Bi)
                .expect("quinn opens a stream");
            quinn.outgoing.push((id, pushed.clone(), 0));
            server_stream = Some(id);
        }
        if let Some(&id) = quinn.accepted.first()
            && quinn.received_on(id).len() == request.len()
            && quinn.outgoing.iter().all(|(i, _, _)| *i != id)
        {
            quinn.outgoing.push((id, reply.clone(), 0));
        }
        to_quinn = client
            .send(tick)
            .unwrap_or_else(|e| panic!("{suite:?}: ngtcp2 write: {e}"));

        if let (Some(c), Some(s)) = (client_stream, server_stream)
            && client.received_on(c) == &reply[..]
            && client.received_on(s.index() as i64 * 4 + 1) == &pushed[..]
        {
            let id = quinn.accepted[0];
            assert_eq!(quinn.received_on(id), &request[..], "{suite:?}");
            assert_eq!(id.index() as i64 * 4, c, "quinn saw the client's stream");
            assert_eq!(client.tls.cipher_suite(), Some(suite));
            assert_eq!(client.tls.alpn().as_deref(), Some(&b"mqtt"[..]));
            let hd = quinn.handshake();
            assert_eq!(hd.protocol.as_deref(), Some(&b"mqtt"[..]));
            assert_eq!(hd.server_name.as_deref(), Some("localhost"));
            assert!(client.handshake_completed && quinn.connected);
            return;
        }
    }
    panic!(
        "{suite:?}: no completion: ngtcp2 handshake {} quinn connected {} ngtcp2 got {} quinn got {:?}",
        client.handshake_completed,
        quinn.connected,
        client.received.iter().map(|(_, d)| d.len()).sum::<usize>(),
        quinn.received.values().map(Vec::len).collect::<Vec<_>>(),
    );
}

/// quinn-proto client (rustls + ring) ↔ ngtcp2 server (our backend).
fn quinn_client_ngtcp2_server(suite: CipherSuite) {
    let pki = TestPki::new();
    let server_cfg = ServerConfig::builder()
        .cert_chain_pem(pki.leaf_pem.as_bytes())
        .private_key_pem(pki.leaf_key_pem.as_bytes())
        .alpn(MQTT)
        .cipher_suites(&[suite])
        .build()
        .unwrap();
    let mut quinn = Quinn::new(None, NGTCP2_SERVER);
    quinn.connect(quinn_client_config(&pki), 0);
    let first = quinn.poll(0);
    assert!(!first.is_empty(), "quinn sent its Initial");
    let mut server = Side::server(&server_cfg, &first[0], 0);
    deliver_to_ngtcp2(&mut server, first, 0);

    let request = pattern(40_000, 3);
    let reply = pattern(25_000, 4);
    let pushed = b"PUBLISH from ngtcp2".to_vec();
    let mut client_stream = None;
    let mut server_stream = None;
    let mut replied = false;
    for tick in 1..2_000 {
        let to_quinn = server
            .send(tick)
            .unwrap_or_else(|e| panic!("{suite:?}: ngtcp2 write: {e}"));
        let responses = deliver_to_quinn(&mut quinn, to_quinn, tick);
        deliver_to_ngtcp2(&mut server, responses, tick);
        if let Some(reason) = &quinn.lost {
            panic!("{suite:?}: quinn lost the connection: {reason}");
        }
        if quinn.connected && client_stream.is_none() {
            let id = quinn
                .conn()
                .streams()
                .open(Dir::Bi)
                .expect("quinn opens a stream");
            quinn.outgoing.push((id, request.clone(), 0));
            client_stream = Some(id);
        }
        if server.handshake_completed && server_stream.is_none() {
            let id = server.open_bidi();
            server.outgoing.push((id, pushed.clone(), 0));
            server_stream = Some(id);
        }
        if let Some(c) = client_stream
            && !replied
            && server.received_on(c.index() as i64 * 4) == &request[..]
        {
            server
                .outgoing
                .push((c.index() as i64 * 4, reply.clone(), 0));
            replied = true;
        }
        let to_server = quinn.poll(tick);
        deliver_to_ngtcp2(&mut server, to_server, tick);
        expire(&mut server, tick);

        if let (Some(c), Some(s)) = (client_stream, server_stream)
            && quinn.received_on(c) == &reply[..]
            && quinn
                .accepted
                .first()
                .is_some_and(|&id| quinn.received_on(id) == &pushed[..])
        {
            assert_eq!(quinn.accepted[0].index() as i64 * 4 + 1, s);
            assert_eq!(server.tls.cipher_suite(), Some(suite));
            assert_eq!(server.tls.alpn().as_deref(), Some(&b"mqtt"[..]));
            assert_eq!(server.tls.server_name().as_deref(), Some("localhost"));
            let hd = quinn.handshake();
            assert_eq!(hd.protocol.as_deref(), Some(&b"mqtt"[..]));
            assert!(server.handshake_completed && quinn.connected);
            return;
        }
    }
    panic!(
        "{suite:?}: no completion: ngtcp2 handshake {} quinn connected {} ngtcp2 got {} quinn got {:?}",
        server.handshake_completed,
        quinn.connected,
        server.received.iter().map(|(_, d)| d.len()).sum::<usize>(),
        quinn.received.values().map(Vec::len).collect::<Vec<_>>(),
    );
}

#[test]
fn ngtcp2_client_with_quinn_server_every_suite() {
    for suite in CipherSuite::ALL {
        ngtcp2_client_quinn_server(suite);
    }
}

#[test]
fn quinn_client_with_ngtcp2_server_every_suite() {
    for suite in CipherSuite::ALL {
        quinn_client_ngtcp2_server(suite);
    }
}

/// ALPN mismatch against quinn: our client offers `mqtt`, quinn only speaks `h3`; rustls answers
/// with no_application_protocol (alert 120) and our client records it.
#[test]
fn alpn_mismatch_with_quinn_server_is_alert_120() {
    let pki = TestPki::new();
    let mut config = quinn_server_config(&pki);
    let chain = vec![CertificateDer::from_pem_slice(pki.leaf_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.leaf_key_pem.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    config.crypto = Arc::new(QuicServerConfig::try_from(tls).unwrap());
    let mut quinn = Quinn::new(Some(config), NGTCP2_CLIENT);
    let mut client = Side::client(&pki.client_config(MQTT), NGTCP2_PROTO_VER_V1, 0);
    let mut to_quinn = client.send(0).unwrap();
    for tick in 1..50 {
        deliver_to_quinn(&mut quinn, std::mem::take(&mut to_quinn), tick);
        for d in quinn.poll(tick) {
            client.recv(&d, tick);
        }
        to_quinn = client.send(tick).unwrap_or_default();
    }
    assert!(!client.handshake_completed);
    let (kind, code) = client.last_error();
    assert_eq!(
        kind, ngtcp2_ccerr_type_NGTCP2_CCERR_TYPE_TRANSPORT,
        "transport close"
    );
    assert_eq!(code, NGTCP2_CRYPTO_ERROR as u64 | 120, "crypto error 0x178");
}

/// An ngtcp2 client and a quinn-proto server exchanging datagrams one round per tick.
struct ClientPair {
    client: Box<Side>,
    quinn: Quinn,
    to_quinn: Vec<Vec<u8>>,
    tick: u64,
}

impl ClientPair {
    fn new(pki: &TestPki) -> Self {
        let quinn = Quinn::new(Some(quinn_server_config(pki)), NGTCP2_CLIENT);
        let mut client = Side::client(&pki.client_config(MQTT), NGTCP2_PROTO_VER_V1, 0);
        let to_quinn = client.send(0).unwrap();
        ClientPair {
            client,
            quinn,
            to_quinn,
            tick: 0,
        }
    }

    fn step(&mut self) {
        self.tick += 1;
        let tick = self.tick;
        let responses = deliver_to_quinn(&mut self.quinn, std::mem::take(&mut self.to_quinn), tick);
        deliver_to_ngtcp2(&mut self.client, responses, tick);
        if let Some(reason) = &self.quinn.lost {
            panic!("quinn lost the connection: {reason}");
        }
        let to_client = self.quinn.poll(tick);
        deliver_to_ngtcp2(&mut self.client, to_client, tick);
        expire(&mut self.client, tick);
        self.to_quinn = self.client.send(tick).expect("ngtcp2 write");
    }

    /// Steps until `done` holds (checked after every round), at most 2,000 rounds.
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Side, &mut Quinn, u64) -> bool) {
        for _ in 0..2_000 {
            self.step();
            if done(&mut self.client, &mut self.quinn, self.tick) {
                return;
            }
        }
        panic!("never reached: {what}");
    }
}

/// Key updates across implementations: ngtcp2 initiates one (quinn must derive the same next
/// keys to read the data that follows, and ngtcp2 to read quinn's answer), then quinn forces one
/// and ngtcp2 must follow.
#[test]
fn key_updates_both_ways_with_quinn_peer() {
    let pki = TestPki::new();
    let mut pair = ClientPair::new(&pki);
    pair.run_until(
        "handshake confirmed and ngtcp2 key update initiated",
        |c, q, tick| {
            // SAFETY: live connection; refused (non-zero) until the handshake is confirmed.
            c.handshake_completed
                && q.connected
                && unsafe { ngtcp2_conn_initiate_key_update(c.conn, support::now_ns(tick)) } == 0
        },
    );
    let id = pair.client.open_bidi();
    let request = pattern(30_000, 5);
    pair.client.outgoing.push((id, request.clone(), 0));
    pair.run_until(
        "quinn read the data sent after ngtcp2's key update",
        |_, q, _| {
            q.accepted
                .first()
                .is_some_and(|&s| q.received_on(s) == &request[..])
        },
    );
    let quinn_stream = pair.quinn.accepted[0];
    let reply = pattern(20_000, 6);
    pair.quinn.outgoing.push((quinn_stream, reply.clone(), 0));
    pair.run_until("ngtcp2 read quinn's answer", |c, _, _| {
        c.received_on(id) == &reply[..]
    });
    // ngtcp2 derives the keys after next (its update_key callback) once an update is confirmed and
    // a PTO has passed; quinn, for its part, refuses a forced update while it still keeps the
    // previous keys (about three PTOs). A quiet second of fake time covers both.
    let quiet = |pair: &mut ClientPair| {
        let until = pair.tick + 1_000;
        pair.run_until("a quiet second", |_, _, tick| tick >= until);
    };
    quiet(&mut pair);
    assert!(
        pair.client.key_updates >= 2,
        "ngtcp2 derived keys at confirmation and again after its update: {}",
        pair.client.key_updates
    );

    let before = pair.client.key_updates;
    pair.quinn.conn().force_key_update();
    let pushed = pattern(10_000, 7);
    let sid = pair.quinn.conn().streams().open(Dir::Bi).unwrap();
    pair.quinn.outgoing.push((sid, pushed.clone(), 0));
    pair.run_until(
        "ngtcp2 read the data sent after quinn's key update",
        |c, _, _| c.received_on(sid.index() as i64 * 4 + 1) == &pushed[..],
    );
    quiet(&mut pair);
    assert!(
        pair.client.key_updates > before,
        "ngtcp2 followed quinn's key update"
    );
}
