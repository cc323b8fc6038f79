//! A minimal in-memory QUIC pair on ngtcp2 + mqttd-tls: no sockets, a fake clock, datagrams handed
//! across by the test. Only what the TLS tests need (the real driver is mqttd-quic).
#![allow(dead_code)]

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::ptr;

use mqttd_ngtcp2_sys::*;
use mqttd_tls::{ClientConfig, ServerConfig, TlsSession};

/// One test certificate authority with a leaf for "localhost".
pub struct TestPki {
    pub ca_pem: String,
    pub leaf_pem: String,
    pub leaf_key_pem: String,
    pub ca_key: rcgen::KeyPair,
    pub ca_cert: rcgen::Certificate,
}

impl TestPki {
    pub fn new() -> Self {
        Self::named("mqttd test CA")
    }

    pub fn named(ca_name: &str) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let (leaf_pem, leaf_key_pem) = Self::issue(&ca_cert, &ca_key, &["localhost"]);
        TestPki {
            ca_pem: ca_cert.pem(),
            leaf_pem,
            leaf_key_pem,
            ca_key,
            ca_cert,
        }
    }

    /// A CA:FALSE leaf for `names`, signed by the CA: (certificate PEM, key PEM).
    pub fn issue(
        ca: &rcgen::Certificate,
        ca_key: &rcgen::KeyPair,
        names: &[&str],
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("leaf"),
        );
        let cert = params.signed_by(&key, ca, ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn server_config(&self, alpn: &[&[u8]]) -> ServerConfig {
        ServerConfig::builder()
            .cert_chain_pem(self.leaf_pem.as_bytes())
            .private_key_pem(self.leaf_key_pem.as_bytes())
            .alpn(alpn)
            .build()
            .unwrap()
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> ClientConfig {
        ClientConfig::builder()
            .ca_pem(self.ca_pem.as_bytes())
            .alpn(alpn)
            .build()
            .unwrap()
    }
}

/// glibc `struct sockaddr_in`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn {
    family: u16,
    port: [u8; 2],
    addr: [u8; 4],
    zero: [u8; 8],
}

impl SockaddrIn {
    fn loopback(port: u16) -> Self {
        SockaddrIn {
            family: 2,
            port: port.to_be_bytes(),
            addr: [127, 0, 0, 1],
            zero: [0; 8],
        }
    }
}

/// One side of the pair.
pub struct Side {
    pub conn: *mut ngtcp2_conn,
    pub tls: Box<TlsSession>,
    local: Box<SockaddrIn>,
    remote: Box<SockaddrIn>,
    pub handshake_completed: bool,
    /// Bytes received per stream id.
    pub received: Vec<(i64, Vec<u8>)>,
    pub key_updates: usize,
    /// Data queued for sending on a stream: (stream id, bytes, offset sent so far, fin).
    pub outgoing: Vec<(i64, Vec<u8>, usize)>,
}

pub fn now_ns(tick: u64) -> u64 {
    1_000_000_000 + tick * 1_000_000
}

unsafe extern "C" fn rand_cb(dest: *mut u8, len: usize, _ctx: *const ngtcp2_rand_ctx) {
    // SAFETY: ngtcp2 passes `len` writable bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(dest, len) };
    mqttd_tls::random_bytes(buf).unwrap();
}

unsafe extern "C" fn new_cid_cb(
    _conn: *mut ngtcp2_conn,
    cid: *mut ngtcp2_cid,
    token: *mut ngtcp2_stateless_reset_token,
    cidlen: usize,
    _user: *mut c_void,
) -> i32 {
    // SAFETY: writable outputs per ngtcp2's contract.
    unsafe {
        mqttd_tls::random_bytes(&mut (&mut *cid).data[..cidlen]).unwrap();
        (*cid).datalen = cidlen;
        mqttd_tls::random_bytes(&mut (&mut *token).data).unwrap();
    }
    0
}

unsafe extern "C" fn handshake_completed_cb(_conn: *mut ngtcp2_conn, user: *mut c_void) -> i32 {
    // SAFETY: user data is the Side.
    unsafe { (*(user as *mut Side)).handshake_completed = true };
    0
}

unsafe extern "C" fn recv_stream_data_cb(
    conn: *mut ngtcp2_conn,
    _flags: u32,
    stream_id: i64,
    _offset: u64,
    data: *const u8,
    len: usize,
    user: *mut c_void,
    _stream_user: *mut c_void,
) -> i32 {
    // SAFETY: user data is the Side; data has len bytes.
    unsafe {
        let side = &mut *(user as *mut Side);
        let bytes = if len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(data, len)
        };
        match side.received.iter_mut().find(|(id, _)| *id == stream_id) {
            Some((_, buf)) => buf.extend_from_slice(bytes),
            None => side.received.push((stream_id, bytes.to_vec())),
        }
        ngtcp2_conn_extend_max_stream_offset(conn, stream_id, len as u64);
        ngtcp2_conn_extend_max_offset(conn, len as u64);
    }
    0
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn update_key_cb(
    conn: *mut ngtcp2_conn,
    rx_secret: *mut u8,
    tx_secret: *mut u8,
    rx_aead_ctx: *mut ngtcp2_crypto_aead_ctx,
    rx_iv: *mut u8,
    tx_aead_ctx: *mut ngtcp2_crypto_aead_ctx,
    tx_iv: *mut u8,
    current_rx_secret: *const u8,
    current_tx_secret: *const u8,
    secretlen: usize,
    user: *mut c_void,
) -> i32 {
    // SAFETY: user data is the Side; the rest is forwarded untouched to the helper.
    unsafe {
        (*(user as *mut Side)).key_updates += 1;
        ngtcp2_crypto_update_key_cb(
            conn,
            rx_secret,
            tx_secret,
            rx_aead_ctx,
            rx_iv,
            tx_aead_ctx,
            tx_iv,
            current_rx_secret,
            current_tx_secret,
            secretlen,
            user,
        )
    }
}

fn callbacks(server: bool) -> ngtcp2_callbacks {
    ngtcp2_callbacks {
        client_initial: if server {
            None
        } else {
            Some(ngtcp2_crypto_client_initial_cb)
        },
        recv_client_initial: if server {
            Some(ngtcp2_crypto_recv_client_initial_cb)
        } else {
            None
        },
        recv_crypto_data: Some(ngtcp2_crypto_recv_crypto_data_cb),
        encrypt: Some(ngtcp2_crypto_encrypt_cb),
        decrypt: Some(ngtcp2_crypto_decrypt_cb),
        hp_mask: Some(ngtcp2_crypto_hp_mask_cb),
        recv_retry: if server {
            None
        } else {
            Some(ngtcp2_crypto_recv_retry_cb)
        },
        rand: Some(rand_cb),
        get_new_connection_id2: Some(new_cid_cb),
        update_key: Some(update_key_cb),
        delete_crypto_aead_ctx: Some(ngtcp2_crypto_delete_crypto_aead_ctx_cb),
        delete_crypto_cipher_ctx: Some(ngtcp2_crypto_delete_crypto_cipher_ctx_cb),
        get_path_challenge_data2: Some(ngtcp2_crypto_get_path_challenge_data2_cb),
        version_negotiation: Some(ngtcp2_crypto_version_negotiation_cb),
        handshake_completed: Some(handshake_completed_cb),
        recv_stream_data: Some(recv_stream_data_cb),
        ..Default::default()
    }
}

fn settings(tick: u64) -> ngtcp2_settings {
    let mut s = MaybeUninit::<ngtcp2_settings>::zeroed();
    // SAFETY: initialises the whole struct.
    let mut s = unsafe {
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION as i32, s.as_mut_ptr());
        s.assume_init()
    };
    s.initial_ts = now_ns(tick);
    s
}

fn params() -> ngtcp2_transport_params {
    let mut p = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: initialises the whole struct.
    let mut p = unsafe {
        ngtcp2_transport_params_default_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            p.as_mut_ptr(),
        );
        p.assume_init()
    };
    p.initial_max_data = 64 << 20;
    p.initial_max_stream_data_bidi_local = 16 << 20;
    p.initial_max_stream_data_bidi_remote = 16 << 20;
    p.initial_max_stream_data_uni = 16 << 20;
    p.initial_max_streams_bidi = 100;
    p.initial_max_streams_uni = 100;
    p.max_idle_timeout = 30 * NGTCP2_SECONDS;
    p
}

fn random_cid(len: usize) -> ngtcp2_cid {
    let mut cid = ngtcp2_cid::default();
    mqttd_tls::random_bytes(&mut cid.data[..len]).unwrap();
    cid.datalen = len;
    cid
}

impl Side {
    fn path(&mut self) -> ngtcp2_path {
        ngtcp2_path {
            local: ngtcp2_addr {
                addr: (&raw mut *self.local).cast(),
                addrlen: 16,
            },
            remote: ngtcp2_addr {
                addr: (&raw mut *self.remote).cast(),
                addrlen: 16,
            },
            user_data: ptr::null_mut(),
        }
    }

    /// A client connecting to "localhost" with `config`; applies cached 0-RTT parameters.
    pub fn client(config: &ClientConfig, version: u32, tick: u64) -> Box<Side> {
        Self::client_to(config, "localhost", version, tick)
    }

    /// A client connecting to `server_name`.
    pub fn client_to(
        config: &ClientConfig,
        server_name: &str,
        version: u32,
        tick: u64,
    ) -> Box<Side> {
        Self::client_with_cids(
            config,
            server_name,
            version,
            random_cid(18),
            random_cid(16),
            tick,
        )
    }

    /// A client with the given initial destination and source connection IDs.
    pub fn client_with_cids(
        config: &ClientConfig,
        server_name: &str,
        version: u32,
        dcid: ngtcp2_cid,
        scid: ngtcp2_cid,
        tick: u64,
    ) -> Box<Side> {
        let tls = TlsSession::client(config, server_name).unwrap();
        let mut side = Box::new(Side {
            conn: ptr::null_mut(),
            tls,
            local: Box::new(SockaddrIn::loopback(40000)),
            remote: Box::new(SockaddrIn::loopback(14567)),
            handshake_completed: false,
            received: Vec::new(),
            key_updates: 0,
            outgoing: Vec::new(),
        });
        let path = side.path();
        let user: *mut Side = &mut *side;
        // SAFETY: all inputs are live and initialised; ngtcp2 copies them. user stays valid
        // (boxed) for the connection's life.
        unsafe {
            let rv = ngtcp2_conn_client_new_versioned(
                &mut side.conn,
                &dcid,
                &scid,
                &path,
                version,
                NGTCP2_CALLBACKS_VERSION as i32,
                &callbacks(false),
                NGTCP2_SETTINGS_VERSION as i32,
                &settings(tick),
                NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
                &params(),
                ptr::null(),
                user.cast(),
            );
            assert_eq!(rv, 0);
            side.tls.attach(side.conn);
            if let Some(early) = side.tls.early_transport_params() {
                let rv = ngtcp2_conn_decode_and_set_0rtt_transport_params(
                    side.conn,
                    early.as_ptr(),
                    early.len(),
                );
                assert_eq!(rv, 0);
            }
        }
        side
    }

    /// A server accepting the client's first Initial datagram.
    pub fn server(config: &ServerConfig, first: &[u8], tick: u64) -> Box<Side> {
        let mut hd = MaybeUninit::<ngtcp2_pkt_hd>::zeroed();
        // SAFETY: hd is writable; first is readable.
        let rv = unsafe { ngtcp2_accept(hd.as_mut_ptr(), first.as_ptr(), first.len()) };
        assert_eq!(rv, 0, "ngtcp2_accept refused the Initial");
        // SAFETY: ngtcp2_accept filled the header.
        let hd = unsafe { hd.assume_init() };
        let tls = TlsSession::server(config).unwrap();
        let mut side = Box::new(Side {
            conn: ptr::null_mut(),
            tls,
            local: Box::new(SockaddrIn::loopback(14567)),
            remote: Box::new(SockaddrIn::loopback(40000)),
            handshake_completed: false,
            received: Vec::new(),
            key_updates: 0,
            outgoing: Vec::new(),
        });
        let path = side.path();
        let mut p = params();
        p.original_dcid = hd.dcid;
        p.original_dcid_present = 1;
        let scid = random_cid(16);
        let user: *mut Side = &mut *side;
        // SAFETY: as for the client.
        unsafe {
            let rv = ngtcp2_conn_server_new_versioned(
                &mut side.conn,
                &hd.scid,
                &scid,
                &path,
                hd.version,
                NGTCP2_CALLBACKS_VERSION as i32,
                &callbacks(true),
                NGTCP2_SETTINGS_VERSION as i32,
                &settings(tick),
                NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
                &p,
                ptr::null(),
                user.cast(),
            );
            assert_eq!(rv, 0);
            side.tls.attach(side.conn);
        }
        side
    }

    /// Feeds one datagram; returns ngtcp2's result.
    pub fn recv(&mut self, data: &[u8], tick: u64) -> i32 {
        let path = self.path();
        let pi = ngtcp2_pkt_info::default();
        // SAFETY: conn live; path/pi/data valid for the call.
        unsafe {
            ngtcp2_conn_read_pkt_versioned(
                self.conn,
                &path,
                NGTCP2_PKT_INFO_VERSION as i32,
                &pi,
                data.as_ptr(),
                data.len(),
                now_ns(tick),
            )
        }
    }

    /// Writes every packet ngtcp2 wants to send now, including queued stream data.
    pub fn send(&mut self, tick: u64) -> Result<Vec<Vec<u8>>, i32> {
        let mut out = Vec::new();
        for _ in 0..64 {
            let mut buf = vec![0u8; 1452];
            let mut path = self.path();
            let mut pi = ngtcp2_pkt_info::default();
            let mut written: isize = -1;
            let mut n: isize;
            let mut used_stream = None;
            if let Some((id, data, off)) = self.outgoing.iter().find(|(_, d, o)| *o < d.len()) {
                let vec = ngtcp2_vec {
                    base: data[*off..].as_ptr() as *mut u8,
                    len: data.len() - off,
                };
                // SAFETY: conn live; vec points into our queued data, which stays alive until acked
                // (the test never drops it).
                n = unsafe {
                    ngtcp2_conn_writev_stream_versioned(
                        self.conn,
                        &mut path,
                        NGTCP2_PKT_INFO_VERSION as i32,
                        &mut pi,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut written,
                        NGTCP2_WRITE_STREAM_FLAG_NONE,
                        *id,
                        &vec,
                        1,
                        now_ns(tick),
                    )
                };
                used_stream = Some(*id);
            } else {
                // SAFETY: as above, without stream data.
                n = unsafe {
                    ngtcp2_conn_writev_stream_versioned(
                        self.conn,
                        &mut path,
                        NGTCP2_PKT_INFO_VERSION as i32,
                        &mut pi,
                        buf.as_mut_ptr(),
                        buf.len(),
                        ptr::null_mut(),
                        NGTCP2_WRITE_STREAM_FLAG_NONE,
                        -1,
                        ptr::null(),
                        0,
                        now_ns(tick),
                    )
                };
            }
            if let Some(id) = used_stream
                && written > 0
                && let Some(entry) = self.outgoing.iter_mut().find(|(i, _, _)| *i == id)
            {
                entry.2 += written as usize;
            }
            if n == NGTCP2_ERR_STREAM_DATA_BLOCKED as isize
                || n == NGTCP2_ERR_STREAM_SHUT_WR as isize
            {
                n = 0;
            }
            if n == NGTCP2_ERR_STREAM_NOT_FOUND as isize
                && let Some(id) = used_stream
            {
                // The stream is gone (0-RTT rejected resets 0-RTT streams): stop sending on it.
                self.outgoing.retain(|(i, _, _)| *i != id);
                continue;
            }
            if n < 0 {
                return Err(n as i32);
            }
            if n == 0 {
                break;
            }
            buf.truncate(n as usize);
            out.push(buf);
        }
        Ok(out)
    }

    pub fn open_bidi(&mut self) -> i64 {
        let mut id = -1;
        // SAFETY: conn live.
        let rv = unsafe { ngtcp2_conn_open_bidi_stream(self.conn, &mut id, ptr::null_mut()) };
        assert_eq!(rv, 0, "cannot open a stream");
        id
    }

    pub fn received_on(&self, id: i64) -> &[u8] {
        self.received
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| &d[..])
            .unwrap_or(&[])
    }

    /// Client: remembers the server's 0-RTT parameters with the session cache.
    pub fn remember_0rtt_params(&mut self) {
        let mut buf = [0u8; 256];
        // SAFETY: conn live, buf writable.
        let n = unsafe {
            ngtcp2_conn_encode_0rtt_transport_params(self.conn, buf.as_mut_ptr(), buf.len())
        };
        assert!(n > 0, "encode 0-RTT params: {n}");
        self.tls.store_early_transport_params(&buf[..n as usize]);
    }

    pub fn last_error(&self) -> (u32, u64) {
        // SAFETY: conn live; returns a pointer into it.
        let e = unsafe { &*ngtcp2_conn_get_ccerr(self.conn) };
        (e.type_, e.error_code)
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.tls.detach();
        // SAFETY: conn was created by us and is not used after this.
        unsafe { ngtcp2_conn_del(self.conn) };
    }
}

/// Runs the handshake between a new client and server, delivering everything (optionally after
/// `mutate` has its way with each datagram). Returns the pair and the tick reached.
pub fn pair(
    client_cfg: &ClientConfig,
    server_cfg: &ServerConfig,
) -> (Box<Side>, Box<Side>, Result<u64, String>) {
    pair_with(client_cfg, server_cfg, NGTCP2_PROTO_VER_V1, |_| {})
}

pub fn pair_with(
    client_cfg: &ClientConfig,
    server_cfg: &ServerConfig,
    version: u32,
    before_first_flight: impl FnOnce(&mut Side),
) -> (Box<Side>, Box<Side>, Result<u64, String>) {
    let mut tick = 0;
    let mut client = Side::client(client_cfg, version, tick);
    before_first_flight(&mut client);
    let first = client.send(tick).unwrap();
    let mut server = Side::server(server_cfg, &first[0], tick);
    let mut to_server = first;
    let result = drive(&mut client, &mut server, &mut to_server, &mut tick);
    (client, server, result)
}

/// Exchanges datagrams until both sides finished the handshake and nothing is left in flight.
pub fn drive(
    client: &mut Side,
    server: &mut Side,
    to_server: &mut Vec<Vec<u8>>,
    tick: &mut u64,
) -> Result<u64, String> {
    for _ in 0..200 {
        *tick += 1;
        for d in to_server.drain(..) {
            let rv = server.recv(&d, *tick);
            if rv != 0 && rv != NGTCP2_ERR_DRAINING {
                return Err(format!("server read_pkt: {rv}"));
            }
        }
        let to_client = server
            .send(*tick)
            .map_err(|e| format!("server write: {e}"))?;
        let quiet = to_client.is_empty();
        for d in &to_client {
            let rv = client.recv(d, *tick);
            if rv != 0 && rv != NGTCP2_ERR_DRAINING {
                return Err(format!("client read_pkt: {rv}"));
            }
        }
        *to_server = client
            .send(*tick)
            .map_err(|e| format!("client write: {e}"))?;
        let pending = client
            .outgoing
            .iter()
            .chain(&server.outgoing)
            .any(|(_, d, o)| *o < d.len());
        if client.handshake_completed
            && server.handshake_completed
            && quiet
            && to_server.is_empty()
            && !pending
        {
            return Ok(*tick);
        }
    }
    Err("no progress after 200 rounds".into())
}
