//! The sans-IO connection: one `ngtcp2_conn` and the Rust state its callbacks touch.
//!
//! # Ownership and invariants
//! - [`Connection`] owns the `ngtcp2_conn`, its [`TlsSession`](crate::tls::TlsSession) and a
//!   heap-allocated [`Shared`] block whose address is the connection's `user_data`. Nothing else
//!   holds these pointers, so whoever holds `&mut Connection` is the only code touching ngtcp2.
//! - Callbacks reach `Shared` through `user_data` only while an ngtcp2 function called from a
//!   `Connection` method is running. Those methods never keep a Rust reference to `Shared`
//!   alive across an ngtcp2 call, so the callback's `&mut Shared` is the only one.
//! - Every callback runs inside `catch_unwind`; a panic or an error is recorded in `Shared` and
//!   reported to ngtcp2 as `NGTCP2_ERR_CALLBACK_FAILURE`, which makes the connection close.
//! - Stream data handed to ngtcp2 lives in `Bytes` chunks kept in the stream's `unacked` queue
//!   until ngtcp2 reports it acknowledged (`acked_stream_data_offset`), because ngtcp2 may
//!   retransmit from those pointers at any time before that.
//! - Received stream data is credited back to the peer (`extend_max_stream_offset`,
//!   `extend_max_offset`) only when the application reads it: that is the flow control.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use mqttd_ngtcp2_sys as sys;

use super::types::{
    ConnectionError, ConnectionId, Dir, Ecn, Path, Side, StreamId, Transmit, fill_random, from_ts,
    to_ts,
};
use crate::addr::{OwnedPath, read_path};
use crate::config::{ClientConfig, CongestionControl, ServerConfig, TransportConfig};
use crate::tls;

/// Application-visible things that happened on a connection, drained with
/// [`Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The TLS handshake completed.
    HandshakeCompleted,
    /// The peer opened a stream.
    StreamOpened(StreamId),
    /// A stream has data (or its end, or a reset) to read.
    StreamReadable(StreamId),
    /// A stream can take more data.
    StreamWritable(StreamId),
    /// Our side of a stream is complete: FIN sent and everything acknowledged.
    StreamFinished(StreamId),
    /// The peer reset its sending side of a stream (RESET_STREAM).
    StreamReset {
        /// The stream.
        id: StreamId,
        /// The application error code.
        code: u64,
    },
    /// The peer asked us to stop sending on a stream (STOP_SENDING).
    StreamStopped {
        /// The stream.
        id: StreamId,
        /// The application error code.
        code: u64,
    },
    /// More streams of this direction may be opened.
    StreamsAvailable(Dir),
    /// A datagram arrived (read it with [`Connection::recv_datagram`]).
    DatagramReceived,
    /// The server rejected 0-RTT: streams opened before the handshake were discarded, and
    /// their IDs will be handed out again by later `open_*` calls.
    ZeroRttRejected,
    /// The connection ended; no more events follow.
    ConnectionLost(ConnectionError),
}

/// Things the endpoint must know to route packets, drained with
/// [`Connection::poll_endpoint_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointEvent {
    /// We issued a new connection ID: route packets carrying it to this connection.
    NewCid(ConnectionId),
    /// The peer retired a connection ID.
    RetireCid(ConnectionId),
}

/// Why an operation on a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No such stream (never opened, or already finished and released).
    #[error("unknown or closed stream")]
    UnknownStream,
    /// Nothing to read yet / no room to write yet: wait for the matching event.
    #[error("stream blocked")]
    Blocked,
    /// We already finished or reset this direction.
    #[error("stream already finished")]
    Finished,
    /// The peer reset the stream with this code.
    #[error("stream reset by peer with code {0}")]
    Reset(u64),
    /// The peer sent STOP_SENDING with this code.
    #[error("peer stopped the stream with code {0}")]
    Stopped(u64),
    /// The server rejected 0-RTT and the stream's data was discarded.
    #[error("0-RTT rejected")]
    ZeroRttRejected,
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
}

/// Why a connection could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS session could not be created.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] tls::TlsError),
    /// ngtcp2 refused the parameters.
    #[error("ngtcp2: {0}")]
    Ngtcp2(String),
}

/// Per-connection statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Lowest RTT seen.
    pub min_rtt: Duration,
    /// Latest RTT sample.
    pub latest_rtt: Duration,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Bytes sent but not yet acknowledged or declared lost.
    pub bytes_in_flight: u64,
    /// Packets sent.
    pub sent_packets: u64,
    /// UDP payload bytes sent.
    pub sent_bytes: u64,
    /// Packets received.
    pub recv_packets: u64,
    /// UDP payload bytes received.
    pub recv_bytes: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Bytes declared lost.
    pub lost_bytes: u64,
}

/// What a stream's send side is doing.
#[derive(Default)]
struct SendHalf {
    /// Handed to ngtcp2, not yet acknowledged: ngtcp2 may point into these bytes.
    unacked: VecDeque<Bytes>,
    unacked_len: usize,
    /// Written by the application, not yet handed to ngtcp2.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    fin_requested: bool,
    fin_sent: bool,
    /// Reset by us or stopped by the peer: no more writes.
    shut: Option<StreamError>,
    /// ngtcp2 said the peer's flow-control window is full.
    flow_blocked: bool,
    queued: bool,
    /// The application waits for room.
    want_writable: bool,
}

/// What a stream's receive side holds.
#[derive(Default)]
struct RecvHalf {
    /// Received, not yet read, in order. One buffer the frames of a burst are appended to (not
    /// an allocation per frame); reads split it. Empty and unallocated once read.
    buf: BytesMut,
    fin: bool,
    reset: Option<u64>,
    /// We sent STOP_SENDING: discard further data.
    stopped: bool,
    notified: bool,
    /// The application saw the end (FIN, reset) or stopped reading.
    app_done: bool,
}

#[derive(Default)]
struct Stream {
    send: SendHalf,
    recv: RecvHalf,
    /// ngtcp2 closed the stream (both directions done).
    closed: bool,
}

/// The most bytes one GSO send may carry (the kernel refuses a batch over 64 KiB).
const GSO_MAX_BYTES: usize = 65_000;

/// The least a stream's receive buffer grows by when a frame does not fit.
const RECV_BUFFER_MIN: usize = 16 * 1024;

/// The state callbacks touch. Lives in its own heap block whose address is `user_data`.
struct Shared {
    side: Side,
    events: VecDeque<Event>,
    endpoint_events: VecDeque<EndpointEvent>,
    streams: HashMap<i64, Stream>,
    send_ready: VecDeque<i64>,
    datagrams: VecDeque<Bytes>,
    datagram_queue_limit: usize,
    datagram_notified: bool,
    reset_secret: [u8; 32],
    handshake_completed: bool,
    handshake_reported: bool,
    stateless_reset: bool,
    /// A callback failed or panicked: why.
    failure: Option<String>,
    stream_send_buffer: usize,
    qlog: Option<std::io::BufWriter<std::fs::File>>,
}

impl Shared {
    fn stream(&mut self, id: i64) -> &mut Stream {
        self.streams.entry(id).or_default()
    }

    fn queue_send(&mut self, id: i64) {
        if let Some(s) = self.streams.get_mut(&id)
            && !s.send.queued
            && !s.send.flow_blocked
            && s.send.shut.is_none()
            && (s.send.pending_len > 0 || (s.send.fin_requested && !s.send.fin_sent))
        {
            s.send.queued = true;
            self.send_ready.push_back(id);
        }
    }
}

/// Where the connection is in its life.
enum State {
    Open,
    /// We sent CONNECTION_CLOSE; we answer further packets with it until `deadline`.
    Closing {
        packet: Vec<u8>,
        path: Path,
        deadline: Instant,
        resend: bool,
    },
    /// The peer closed; we stay silent until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// Nothing more to do; the endpoint may forget the connection.
    Drained,
}

/// Why we are closing, before the CONNECTION_CLOSE is written.
enum PendingClose {
    Application { code: u64, reason: Vec<u8> },
    Liberr(c_int),
    TlsAlert(u8),
}

/// One QUIC connection without I/O: datagrams and time go in, datagrams, timers and events
/// come out. See the module documentation for the invariants.
pub struct Connection {
    conn: NonNull<sys::ngtcp2_conn>,
    tls: Box<tls::TlsSession>,
    shared: NonNull<Shared>,
    side: Side,
    state: State,
    path: Path,
    pending_close: Option<PendingClose>,
    lost: Option<ConnectionError>,
    /// A packet written after a batch that could not join it (other size or path).
    stash: Option<(Vec<u8>, Transmit)>,
    datagrams_out: VecDeque<Bytes>,
    initial_scid: ConnectionId,
    zero_rtt: bool,
    stored_0rtt_params: bool,
    /// The connection carried enough data to probe for large datagrams.
    large_probes: bool,
    config: Arc<TransportConfig>,
}

// SAFETY: the `ngtcp2_conn`, the TLS session and `Shared` are exclusively owned by this value and
// only reached through `&mut self`; ngtcp2 and OpenSSL keep no thread-local state for a
// connection, so moving the whole bundle to another thread is sound.
unsafe impl Send for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        self.tls.detach();
        // SAFETY: `conn` came from `ngtcp2_conn_*_new` and is deleted exactly once, here; the TLS
        // session was detached above as its contract requires.
        unsafe { sys::ngtcp2_conn_del(self.conn.as_ptr()) };
        // SAFETY: `shared` came from `Box::into_raw` in `new` and no callback can run any more.
        drop(unsafe { Box::from_raw(self.shared.as_ptr()) });
    }
}

fn liberr_string(err: c_int) -> String {
    // SAFETY: ngtcp2_strerror returns a pointer to a static NUL-terminated string.
    let s = unsafe { CStr::from_ptr(sys::ngtcp2_strerror(err)) };
    format!("{} ({err})", s.to_string_lossy())
}

/// UDP payload sizes Path MTU discovery probes, in order: ngtcp2's defaults (a Japanese fiber
/// service's MTU, tunnels, the IPv6 minimum, PPPoE, less 48 bytes of IPv6 and UDP headers),
/// jumbo frames, and the largest payload an IPv6 datagram carries (loopback).
static PMTUD_PROBES: [u16; 8] = [1406, 1342, 1232, 1444, 8952, 16384, 32768, LOOPBACK_PROBE];

/// The last probe: [`MAX_UDP_PAYLOAD`](crate::MAX_UDP_PAYLOAD) (65,487 fits in a `u16`).
const LOOPBACK_PROBE: u16 = crate::config::MAX_UDP_PAYLOAD as u16;

/// Path MTU probes up to this UDP payload size (ngtcp2's defaults, the usual Internet MTUs) are
/// sent as soon as the handshake is confirmed; larger ones only after [`LARGE_PROBES_AFTER`].
const SMALL_PROBES_MAX: usize = 1452;

/// Bytes a connection must have sent and received before it probes past [`SMALL_PROBES_MAX`].
/// A receiver keeps a decryption buffer as large as the largest packet it got (ngtcp2 never
/// shrinks it) and a sender writes packets into buffers of that size: a 64 KiB probe on every
/// connection would cost each idle one (an MQTT client between messages) that much memory on
/// both sides. Connections that carry data in bulk pass this quickly (a QoS 1 stream of 64-byte
/// messages in milliseconds) and then save per-packet costs with large datagrams.
const LARGE_PROBES_AFTER: u64 = 256 * 1024;

/// Below this smoothed RTT the connection is not paced. The drivers' timers (tokio's) fire on
/// whole milliseconds: on such a path a pacing gap (tens of microseconds on loopback) becomes a
/// sleep to the next millisecond tick, so the pacer, not the congestion window, sets the rate.
/// Packets then leave as the congestion window allows, at most one send quantum per batch.
/// Longer paths, where bursts matter and a millisecond is small against the RTT, stay paced.
const PACING_MIN_RTT: Duration = Duration::from_millis(5);

fn settings_for(config: &TransportConfig, now: Instant) -> sys::ngtcp2_settings {
    let mut settings = std::mem::MaybeUninit::<sys::ngtcp2_settings>::zeroed();
    // SAFETY: the pointer is valid for writes of one ngtcp2_settings of this version.
    unsafe {
        sys::ngtcp2_settings_default_versioned(
            sys::NGTCP2_SETTINGS_VERSION as c_int,
            settings.as_mut_ptr(),
        )
    };
    // SAFETY: initialised by ngtcp2_settings_default above.
    let mut settings = unsafe { settings.assume_init() };
    settings.initial_ts = to_ts(now);
    settings.cc_algo = match config.congestion_control {
        CongestionControl::Cubic => sys::ngtcp2_cc_algo_NGTCP2_CC_ALGO_CUBIC,
        CongestionControl::Bbr => sys::ngtcp2_cc_algo_NGTCP2_CC_ALGO_BBR,
        CongestionControl::Reno => sys::ngtcp2_cc_algo_NGTCP2_CC_ALGO_RENO,
    };
    settings.max_tx_udp_payload_size = config
        .max_udp_payload_size
        .clamp(1200, sys::NGTCP2_MAX_TX_UDP_PAYLOAD_SIZE as usize);
    // Path MTU discovery tries these sizes in order (those above the configured maximum are
    // skipped; after a failure, only smaller ones): ngtcp2's defaults (the usual Internet
    // MTUs), then jumbo frames and the loopback MTU, where one large datagram replaces dozens.
    settings.pmtud_probes = PMTUD_PROBES.as_ptr();
    settings.pmtud_probeslen = PMTUD_PROBES.len();
    settings.max_window = config.max_receive_window;
    settings.max_stream_window = config.max_stream_receive_window;
    settings.handshake_timeout = config.handshake_timeout.as_nanos() as u64;
    // Every ack-eliciting packet makes the ACK due at once, so the next packet we send carries
    // it, whenever that is. The driver holds back ACK-only packets for a moment (its
    // `ACK_HOLD`): the application's answer usually comes first and takes the ACK along. With
    // ngtcp2's default (due after two packets or an eighth of the RTT) a quick answer left
    // without the ACK, which then needed a packet of its own.
    settings.ack_thresh = 1;
    settings.rand_ctx = sys::ngtcp2_rand_ctx {
        native_handle: std::ptr::null_mut(),
    };
    settings
}

fn params_for(config: &TransportConfig) -> sys::ngtcp2_transport_params {
    let mut params = std::mem::MaybeUninit::<sys::ngtcp2_transport_params>::zeroed();
    // SAFETY: the pointer is valid for writes of one ngtcp2_transport_params of this version.
    unsafe {
        sys::ngtcp2_transport_params_default_versioned(
            sys::NGTCP2_TRANSPORT_PARAMS_VERSION as c_int,
            params.as_mut_ptr(),
        )
    };
    // SAFETY: initialised above.
    let mut p = unsafe { params.assume_init() };
    p.initial_max_data = config.receive_window;
    p.initial_max_stream_data_bidi_local = config.stream_receive_window;
    p.initial_max_stream_data_bidi_remote = config.stream_receive_window;
    p.initial_max_stream_data_uni = config.stream_receive_window;
    p.initial_max_streams_bidi = config.max_concurrent_bidi_streams;
    p.initial_max_streams_uni = config.max_concurrent_uni_streams;
    p.max_idle_timeout = config.idle_timeout.as_nanos() as u64;
    p.max_datagram_frame_size = config.max_datagram_frame_size;
    p.active_connection_id_limit = 4;
    p
}

fn callbacks(side: Side) -> sys::ngtcp2_callbacks {
    // SAFETY: ngtcp2_callbacks is a plain C struct of optional function pointers; all-zero is
    // "no callback" for every field.
    let mut cb: sys::ngtcp2_callbacks = unsafe { std::mem::zeroed() };
    match side {
        Side::Client => {
            cb.client_initial = Some(sys::ngtcp2_crypto_client_initial_cb);
            cb.recv_retry = Some(sys::ngtcp2_crypto_recv_retry_cb);
        }
        Side::Server => {
            cb.recv_client_initial = Some(sys::ngtcp2_crypto_recv_client_initial_cb);
        }
    }
    cb.recv_crypto_data = Some(sys::ngtcp2_crypto_recv_crypto_data_cb);
    cb.encrypt = Some(sys::ngtcp2_crypto_encrypt_cb);
    cb.decrypt = Some(sys::ngtcp2_crypto_decrypt_cb);
    cb.hp_mask = Some(sys::ngtcp2_crypto_hp_mask_cb);
    cb.update_key = Some(sys::ngtcp2_crypto_update_key_cb);
    cb.delete_crypto_aead_ctx = Some(sys::ngtcp2_crypto_delete_crypto_aead_ctx_cb);
    cb.delete_crypto_cipher_ctx = Some(sys::ngtcp2_crypto_delete_crypto_cipher_ctx_cb);
    cb.get_path_challenge_data2 = Some(sys::ngtcp2_crypto_get_path_challenge_data2_cb);
    cb.version_negotiation = Some(sys::ngtcp2_crypto_version_negotiation_cb);
    cb.rand = Some(cb_rand);
    cb.get_new_connection_id2 = Some(cb_get_new_connection_id);
    cb.remove_connection_id = Some(cb_remove_connection_id);
    cb.handshake_completed = Some(cb_handshake_completed);
    cb.recv_stream_data = Some(cb_recv_stream_data);
    cb.acked_stream_data_offset = Some(cb_acked_stream_data_offset);
    cb.stream_open = Some(cb_stream_open);
    cb.stream_close2 = Some(cb_stream_close);
    cb.stream_reset = Some(cb_stream_reset);
    cb.recv_stop_sending = Some(cb_recv_stop_sending);
    cb.extend_max_stream_data = Some(cb_extend_max_stream_data);
    cb.extend_max_local_streams_bidi = Some(cb_extend_max_streams_bidi);
    cb.extend_max_local_streams_uni = Some(cb_extend_max_streams_uni);
    cb.recv_datagram = Some(cb_recv_datagram);
    cb.recv_stateless_reset2 = Some(cb_recv_stateless_reset);
    cb.tls_early_data_rejected = Some(cb_tls_early_data_rejected);
    cb.path_validation = Some(cb_path_validation);
    cb
}

/// Stateless reset token for `cid` derived from the endpoint's secret.
pub(crate) fn reset_token(secret: &[u8; 32], cid: &ConnectionId) -> Option<[u8; 16]> {
    let mut token = [0u8; 16];
    let raw = cid.to_ngtcp2();
    // SAFETY: `token` has room for NGTCP2_STATELESS_RESET_TOKENLEN bytes; secret and cid are
    // valid for the lengths given.
    let rv = unsafe {
        sys::ngtcp2_crypto_generate_stateless_reset_token(
            token.as_mut_ptr(),
            secret.as_ptr(),
            secret.len(),
            &raw,
        )
    };
    (rv == 0).then_some(token)
}

/// What the server learnt from a client's first Initial packet.
#[derive(Debug, Clone)]
pub struct InitialInfo {
    /// The Destination Connection ID the client chose.
    pub dcid: ConnectionId,
    /// The client's Source Connection ID.
    pub scid: ConnectionId,
    /// The version the client chose.
    pub version: u32,
    /// After a Retry: the DCID of the client's very first Initial, recovered from the token,
    /// and the validated token.
    pub retry: Option<(ConnectionId, Vec<u8>)>,
}

impl Connection {
    /// Starts a client connection to `path.remote` for `server_name`; the first datagrams are
    /// available from [`poll_transmit`](Self::poll_transmit) at once.
    pub fn client(
        config: &ClientConfig,
        server_name: &str,
        path: Path,
        now: Instant,
        reset_secret: [u8; 32],
    ) -> Result<Self, ConnectError> {
        tls::init();
        let transport = config.transport.clone();
        let dcid = ConnectionId::random(18);
        let scid = ConnectionId::random(transport.cid_len.clamp(8, 20));
        let session = tls::TlsSession::client(&config.tls, server_name)?;
        let params = params_for(&transport);
        let version = transport
            .versions
            .first()
            .map_or(mqttd_ngtcp2_sys::NGTCP2_PROTO_VER_V1, |v| v.wire());
        let mut conn = Self::new(
            Side::Client,
            session,
            dcid,
            scid,
            path,
            version,
            params,
            None,
            now,
            reset_secret,
            transport,
        )?;
        if let Some(early) = conn.tls.early_transport_params() {
            // SAFETY: `conn` is live; the slice is valid for its length.
            let rv = unsafe {
                sys::ngtcp2_conn_decode_and_set_0rtt_transport_params(
                    conn.conn.as_ptr(),
                    early.as_ptr(),
                    early.len(),
                )
            };
            conn.zero_rtt = rv == 0;
        }
        Ok(conn)
    }

    /// Creates the server side of a connection from a client's first Initial packet; feed that
    /// packet to [`handle_datagram`](Self::handle_datagram) next.
    pub fn server(
        config: &ServerConfig,
        initial: &InitialInfo,
        path: Path,
        now: Instant,
        reset_secret: [u8; 32],
    ) -> Result<Self, ConnectError> {
        tls::init();
        let transport = config.transport.clone();
        let scid = ConnectionId::random(transport.cid_len.clamp(8, 20));
        let session = tls::TlsSession::server(&config.tls)?;
        let mut params = params_for(&transport);
        match &initial.retry {
            Some((odcid, _)) => {
                params.original_dcid = odcid.to_ngtcp2();
                params.retry_scid = initial.dcid.to_ngtcp2();
                params.retry_scid_present = 1;
            }
            None => params.original_dcid = initial.dcid.to_ngtcp2(),
        }
        params.original_dcid_present = 1;
        params.disable_active_migration = u8::from(!config.migration);
        if let Some(token) = reset_token(&reset_secret, &scid) {
            params.stateless_reset_token = token;
            params.stateless_reset_token_present = 1;
        }
        Self::new(
            Side::Server,
            session,
            initial.scid,
            scid,
            path,
            initial.version,
            params,
            initial.retry.as_ref().map(|(_, t)| t.as_slice()),
            now,
            reset_secret,
            transport,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        side: Side,
        mut session: Box<tls::TlsSession>,
        dcid: ConnectionId,
        scid: ConnectionId,
        path: Path,
        version: u32,
        params: sys::ngtcp2_transport_params,
        retry_token: Option<&[u8]>,
        now: Instant,
        reset_secret: [u8; 32],
        config: Arc<TransportConfig>,
    ) -> Result<Self, ConnectError> {
        let mut settings = settings_for(&config, now);
        let preferred: Vec<u32> = config.versions.iter().map(|v| v.wire()).collect();
        if !preferred.is_empty() {
            settings.preferred_versions = preferred.as_ptr();
            settings.preferred_versionslen = preferred.len();
        }
        if let Some(token) = retry_token {
            settings.token = token.as_ptr();
            settings.tokenlen = token.len();
            settings.token_type = sys::ngtcp2_token_type_NGTCP2_TOKEN_TYPE_RETRY;
        }
        let shared = Box::new(Shared {
            side,
            events: VecDeque::new(),
            endpoint_events: VecDeque::new(),
            streams: HashMap::new(),
            send_ready: VecDeque::new(),
            datagrams: VecDeque::new(),
            datagram_queue_limit: config.datagram_receive_queue.max(1),
            datagram_notified: false,
            reset_secret,
            handshake_completed: false,
            handshake_reported: false,
            stateless_reset: false,
            failure: None,
            stream_send_buffer: config.stream_send_buffer.max(1),
            qlog: None,
        });
        let mut shared = shared;
        if let Some(dir) = &config.qlog_dir {
            let name = format!(
                "{}-{scid:?}.sqlog",
                if side == Side::Client {
                    "client"
                } else {
                    "server"
                }
            );
            match std::fs::File::create(dir.join(name)) {
                Ok(f) => {
                    shared.qlog = Some(std::io::BufWriter::new(f));
                    settings.qlog_write = Some(cb_qlog_write);
                }
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot create qlog file")
                }
            }
        }
        let shared = NonNull::from(Box::leak(shared));
        let cb = callbacks(side);
        let raw_dcid = dcid.to_ngtcp2();
        let raw_scid = scid.to_ngtcp2();
        let mut owned_path = OwnedPath::new(path.local, path.remote);
        let mut conn: *mut sys::ngtcp2_conn = std::ptr::null_mut();
        let ctor = match side {
            Side::Client => sys::ngtcp2_conn_client_new_versioned,
            Side::Server => sys::ngtcp2_conn_server_new_versioned,
        };
        // SAFETY: every pointer is valid for the duration of the call (ngtcp2 copies the CIDs,
        // path, callbacks, settings, token and parameters); `shared` stays valid until the
        // connection is deleted in `Drop`.
        let rv = unsafe {
            ctor(
                &mut conn,
                &raw_dcid,
                &raw_scid,
                owned_path.as_ptr(),
                version,
                sys::NGTCP2_CALLBACKS_VERSION as c_int,
                &cb,
                sys::NGTCP2_SETTINGS_VERSION as c_int,
                &settings,
                sys::NGTCP2_TRANSPORT_PARAMS_VERSION as c_int,
                &params,
                std::ptr::null(),
                shared.as_ptr().cast(),
            )
        };
        drop(preferred);
        let Some(conn) = NonNull::new(conn).filter(|_| rv == 0) else {
            // SAFETY: `shared` came from Box::leak above and no connection references it.
            drop(unsafe { Box::from_raw(shared.as_ptr()) });
            return Err(ConnectError::Ngtcp2(liberr_string(rv)));
        };
        // SAFETY: `conn` is live; the session is boxed (stable address) and owned by the
        // Connection, which detaches it before deleting `conn`.
        unsafe { session.attach(conn.as_ptr()) };
        if let Some(ka) = config.keep_alive {
            // SAFETY: `conn` is live.
            unsafe { sys::ngtcp2_conn_set_keep_alive_timeout(conn.as_ptr(), ka.as_nanos() as u64) };
        }
        Ok(Connection {
            conn,
            tls: session,
            shared,
            side,
            state: State::Open,
            path,
            pending_close: None,
            lost: None,
            stash: None,
            datagrams_out: VecDeque::new(),
            initial_scid: scid,
            zero_rtt: false,
            stored_0rtt_params: false,
            large_probes: false,
            config,
        })
    }

    fn raw(&self) -> *mut sys::ngtcp2_conn {
        self.conn.as_ptr()
    }

    /// The callback state. Never hold the returned reference across an ngtcp2 call.
    fn shared(&mut self) -> &mut Shared {
        // SAFETY: `shared` is valid for the Connection's life; no callback is running because
        // callbacks only run inside ngtcp2 calls, and callers drop this reference before making one.
        unsafe { self.shared.as_mut() }
    }

    /// The transport settings this connection was made with.
    pub fn transport(&self) -> &TransportConfig {
        &self.config
    }

    /// Which side this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The Source Connection ID this endpoint chose first.
    pub fn initial_scid(&self) -> ConnectionId {
        self.initial_scid
    }

    /// The current network path (it changes with migration).
    pub fn path(&self) -> Path {
        // SAFETY: `conn` is live; the returned path points into the connection and is read
        // before any other ngtcp2 call.
        match unsafe { read_path(sys::ngtcp2_conn_get_path(self.raw())) } {
            Some((local, remote)) => Path { local, remote },
            None => self.path,
        }
    }

    /// Whether the handshake completed.
    pub fn is_handshake_complete(&mut self) -> bool {
        self.shared().handshake_completed
    }

    /// Whether the client may send 0-RTT data now (resumption parameters were found).
    pub fn is_zero_rtt(&self) -> bool {
        self.zero_rtt
    }

    /// Whether the server accepted our 0-RTT data (client), or 0-RTT was used (server).
    pub fn zero_rtt_accepted(&self) -> bool {
        self.tls.early_data_accepted()
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.tls.alpn()
    }

    /// The server name the client asked for (SNI).
    pub fn server_name(&self) -> Option<String> {
        self.tls.server_name()
    }

    /// The QUIC version in use.
    pub fn version(&self) -> u32 {
        // SAFETY: `conn` is live.
        unsafe { sys::ngtcp2_conn_get_negotiated_version(self.raw()) }
    }

    /// Whether the connection has nothing left to do and can be dropped.
    pub fn is_drained(&self) -> bool {
        matches!(self.state, State::Drained)
    }

    /// Whether the connection is closing, draining or drained.
    pub fn is_closed(&self) -> bool {
        !matches!(self.state, State::Open) || self.pending_close.is_some()
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has more to send than what the protocol
    /// state produces by itself (ACKs, flow-control credit, retransmissions): stream data or
    /// datagrams the application queued, a packet held back for a full send buffer, or a close.
    /// Also `true` once the connection is no longer open.
    pub fn has_queued_output(&mut self) -> bool {
        self.is_closed()
            || self.stash.is_some()
            || !self.datagrams_out.is_empty()
            || !self.shared().send_ready.is_empty()
    }

    /// Feeds one received UDP datagram.
    pub fn handle_datagram(&mut self, now: Instant, path: Path, ecn: Ecn, data: &[u8]) {
        match &mut self.state {
            State::Open => {}
            State::Closing { resend, .. } => {
                *resend = true;
                return;
            }
            State::Draining { .. } | State::Drained => return,
        }
        if self.pending_close.is_some() {
            return;
        }
        let mut owned = OwnedPath::new(path.local, path.remote);
        let pi = sys::ngtcp2_pkt_info { ecn: ecn.bits() };
        // SAFETY: `conn` is live; path, packet info and data are valid for the call; no Rust
        // reference to `Shared` is alive.
        let rv = unsafe {
            sys::ngtcp2_conn_read_pkt_versioned(
                self.raw(),
                owned.as_ptr(),
                sys::NGTCP2_PKT_INFO_VERSION as c_int,
                &pi,
                data.as_ptr(),
                data.len(),
                to_ts(now),
            )
        };
        self.after_ngtcp2_call(now);
        if rv != 0 {
            self.handle_error(now, rv);
        }
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) must be called, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Open => {
                if self.pending_close.is_some() || self.stash.is_some() {
                    return Some(from_ts(0));
                }
                // SAFETY: `conn` is live.
                let expiry = unsafe { sys::ngtcp2_conn_get_expiry(self.raw()) };
                (expiry != u64::MAX).then(|| from_ts(expiry))
            }
            State::Closing { deadline, .. } | State::Draining { deadline } => Some(*deadline),
            State::Drained => None,
        }
    }

    /// Runs timers that are due at `now` (loss detection, ACK delay, idle and handshake timeouts,
    /// pacing).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Open => {}
            State::Closing { deadline, .. } | State::Draining { deadline } => {
                if now >= *deadline {
                    self.state = State::Drained;
                }
                return;
            }
            State::Drained => return,
        }
        // SAFETY: `conn` is live; no Rust reference to `Shared` is alive.
        let rv = unsafe { sys::ngtcp2_conn_handle_expiry(self.raw(), to_ts(now)) };
        self.after_ngtcp2_call(now);
        if rv != 0 {
            self.handle_error(now, rv);
        }
    }

    /// Work to do after ngtcp2 ran callbacks: completed handshakes.
    fn after_ngtcp2_call(&mut self, _now: Instant) {
        let sh = self.shared();
        if sh.handshake_completed && !sh.handshake_reported {
            sh.handshake_reported = true;
            sh.events.push_back(Event::HandshakeCompleted);
            if self.side == Side::Client && !self.stored_0rtt_params {
                self.stored_0rtt_params = true;
                let mut buf = [0u8; 256];
                // SAFETY: `conn` is live; the buffer is valid for its length.
                let n = unsafe {
                    sys::ngtcp2_conn_encode_0rtt_transport_params(
                        self.raw(),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    self.tls.store_early_transport_params(&buf[..n as usize]);
                }
            }
        }
    }

    fn handle_error(&mut self, now: Instant, rv: c_int) {
        let failure = self.shared().failure.take();
        match rv {
            sys::NGTCP2_ERR_DRAINING => {
                let err = if self.shared().stateless_reset {
                    ConnectionError::Reset
                } else {
                    self.peer_close_reason()
                };
                self.enter_draining(now, err);
            }
            sys::NGTCP2_ERR_CLOSING => {}
            sys::NGTCP2_ERR_IDLE_CLOSE => {
                self.state = State::Drained;
                self.report_lost(ConnectionError::TimedOut);
            }
            sys::NGTCP2_ERR_DROP_CONN | sys::NGTCP2_ERR_RETRY => {
                self.state = State::Drained;
                self.report_lost(ConnectionError::Transport(liberr_string(rv)));
            }
            sys::NGTCP2_ERR_RECV_VERSION_NEGOTIATION | sys::NGTCP2_ERR_VERSION_NEGOTIATION => {
                self.state = State::Drained;
                self.report_lost(ConnectionError::VersionMismatch);
            }
            sys::NGTCP2_ERR_HANDSHAKE_TIMEOUT => {
                self.state = State::Drained;
                self.report_lost(ConnectionError::HandshakeTimeout);
            }
            sys::NGTCP2_ERR_CRYPTO => {
                // SAFETY: `conn` is live.
                let alert = unsafe { sys::ngtcp2_conn_get_tls_alert(self.raw()) };
                let why = self
                    .tls
                    .take_error()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| format!("TLS alert {alert}"));
                self.pending_close = Some(PendingClose::TlsAlert(alert));
                self.report_lost(ConnectionError::Tls(why));
            }
            _ => {
                let why = failure.unwrap_or_else(|| liberr_string(rv));
                tracing::debug!(error = %why, "closing connection after ngtcp2 error");
                self.pending_close = Some(PendingClose::Liberr(rv));
                self.report_lost(ConnectionError::Transport(why));
            }
        }
    }

    fn peer_close_reason(&mut self) -> ConnectionError {
        // SAFETY: `conn` is live; the returned pointer is valid until the next ngtcp2 call.
        let cc = unsafe { &*sys::ngtcp2_conn_get_ccerr(self.raw()) };
        let reason = if cc.reason.is_null() || cc.reasonlen == 0 {
            Bytes::new()
        } else {
            // SAFETY: ngtcp2 keeps `reason` valid for `reasonlen` bytes.
            Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(cc.reason, cc.reasonlen) })
        };
        if cc.type_ == sys::ngtcp2_ccerr_type_NGTCP2_CCERR_TYPE_APPLICATION {
            ConnectionError::ApplicationClosed {
                code: cc.error_code,
                reason,
            }
        } else {
            ConnectionError::ConnectionClosed {
                code: cc.error_code,
                reason,
            }
        }
    }

    fn close_period(&self) -> Duration {
        // SAFETY: `conn` is live.
        let pto = unsafe { sys::ngtcp2_conn_get_pto(self.raw()) };
        Duration::from_nanos(pto.saturating_mul(3)).max(Duration::from_millis(10))
    }

    fn enter_draining(&mut self, now: Instant, err: ConnectionError) {
        let deadline = now + self.close_period();
        self.state = State::Draining { deadline };
        self.report_lost(err);
    }

    fn report_lost(&mut self, err: ConnectionError) {
        if self.lost.is_none() {
            self.lost = Some(err.clone());
            self.shared().events.push_back(Event::ConnectionLost(err));
        }
    }

    /// Why the connection ended, once it did.
    pub fn close_reason(&self) -> Option<&ConnectionError> {
        self.lost.as_ref()
    }

    /// Closes the connection with an application error code; the CONNECTION_CLOSE goes out with
    /// the next [`poll_transmit`](Self::poll_transmit).
    pub fn close(&mut self, code: u64, reason: &[u8]) {
        if !matches!(self.state, State::Open) || self.pending_close.is_some() {
            return;
        }
        self.pending_close = Some(PendingClose::Application {
            code,
            reason: reason.to_vec(),
        });
        self.report_lost(ConnectionError::LocallyClosed);
    }

    /// Drains the next application event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.shared().events.pop_front()
    }

    /// Drains the next routing event for the endpoint.
    pub fn poll_endpoint_event(&mut self) -> Option<EndpointEvent> {
        self.shared().endpoint_events.pop_front()
    }

    /// Writes the next datagrams to send into `buf` (cleared first), at most `max_datagrams`
    /// of them of equal size (for GSO). Returns `None` when there is nothing to send now.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        max_datagrams: usize,
    ) -> Option<Transmit> {
        buf.clear();
        if let Some((data, t)) = self.stash.take() {
            buf.extend_from_slice(&data);
            return Some(t);
        }
        match &mut self.state {
            State::Open => {}
            State::Closing {
                packet,
                path,
                resend,
                ..
            } => {
                if !*resend {
                    return None;
                }
                *resend = false;
                buf.extend_from_slice(packet);
                return Some(Transmit {
                    destination: path.remote,
                    source: path.local,
                    ecn: Ecn::NotEct,
                    size: packet.len(),
                    segment_size: None,
                });
            }
            State::Draining { .. } | State::Drained => return None,
        }
        if let Some(close) = self.pending_close.take() {
            return self.write_close(now, buf, close);
        }
        self.write_packets(now, buf, max_datagrams.max(1))
    }

    fn write_close(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        close: PendingClose,
    ) -> Option<Transmit> {
        let mut ccerr = std::mem::MaybeUninit::<sys::ngtcp2_ccerr>::zeroed();
        // SAFETY: the pointer is valid for writes of one ngtcp2_ccerr.
        unsafe { sys::ngtcp2_ccerr_default(ccerr.as_mut_ptr()) };
        // SAFETY: initialised above.
        let mut ccerr = unsafe { ccerr.assume_init() };
        let reason_buf;
        match &close {
            PendingClose::Application { code, reason } => {
                reason_buf = reason.clone();
                // SAFETY: `reason_buf` outlives the write below, which reads the reason.
                unsafe {
                    sys::ngtcp2_ccerr_set_application_error(
                        &mut ccerr,
                        *code,
                        reason_buf.as_ptr(),
                        reason_buf.len(),
                    )
                };
            }
            PendingClose::Liberr(err) => {
                // SAFETY: no reason phrase.
                unsafe { sys::ngtcp2_ccerr_set_liberr(&mut ccerr, *err, std::ptr::null(), 0) };
            }
            PendingClose::TlsAlert(alert) => {
                // SAFETY: no reason phrase.
                unsafe { sys::ngtcp2_ccerr_set_tls_alert(&mut ccerr, *alert, std::ptr::null(), 0) };
            }
        }
        let size = 1500;
        buf.resize(size, 0);
        let mut ps = PathStorage::new();
        let mut pi = sys::ngtcp2_pkt_info { ecn: 0 };
        // SAFETY: `conn` is live; buffer, path storage and ccerr are valid for the call.
        let n = unsafe {
            sys::ngtcp2_conn_write_connection_close_versioned(
                self.raw(),
                ps.path(),
                sys::NGTCP2_PKT_INFO_VERSION as c_int,
                &mut pi,
                buf.as_mut_ptr(),
                size,
                &ccerr,
                to_ts(now),
            )
        };
        let deadline = now + self.close_period();
        if n <= 0 {
            // Nothing can be sent (e.g. no keys yet): the connection just ends.
            buf.clear();
            self.state = State::Drained;
            return None;
        }
        let n = n as usize;
        buf.truncate(n);
        let path = ps.read().unwrap_or(self.path);
        self.state = State::Closing {
            packet: buf.clone(),
            path,
            deadline,
            resend: false,
        };
        Some(Transmit {
            destination: path.remote,
            source: path.local,
            ecn: Ecn::from_bits(pi.ecn),
            size: n,
            segment_size: None,
        })
    }

    fn write_packets(
        &mut self,
        now: Instant,
        buf: &mut Vec<u8>,
        max_datagrams: usize,
    ) -> Option<Transmit> {
        let ts = to_ts(now);
        // SAFETY: `conn` is live.
        let mtu =
            unsafe { sys::ngtcp2_conn_get_path_max_tx_udp_payload_size(self.raw()) }.max(1200);
        // SAFETY: `conn` is live.
        let quantum = unsafe { sys::ngtcp2_conn_get_send_quantum(self.raw()) };
        // SAFETY: `conn` is live.
        let max_tx = unsafe { sys::ngtcp2_conn_get_max_tx_udp_payload_size(self.raw()) }.max(mtu);
        // Room for Path MTU probes past the usual Internet sizes only once the connection is
        // busy (see `LARGE_PROBES_AFTER`): ngtcp2 keeps a probe that does not fit for later.
        let max_tx = if max_tx > SMALL_PROBES_MAX && !self.large_probes {
            if self.carried_bytes() >= LARGE_PROBES_AFTER {
                self.large_probes = true;
                max_tx
            } else {
                max_tx.min(mtu.max(SMALL_PROBES_MAX))
            }
        } else {
            max_tx
        };
        // A GSO send carries at most 64 KiB: with a large path MTU, fewer segments fit.
        let max_pkts = (quantum / mtu)
            .clamp(1, max_datagrams)
            .min((GSO_MAX_BYTES / mtu).max(1));
        // Each packet is written with room for `max_tx` bytes so ngtcp2 can emit Path MTU
        // probes; regular packets are at most `mtu` and form the GSO segments. Packets are
        // written into the spare capacity (no zeroing) and the length set afterwards.
        buf.clear();
        let cap = mtu * (max_pkts - 1) + max_tx;
        buf.reserve(cap);
        let base = buf.as_mut_ptr();
        let mut len = 0usize;
        let mut count = 0usize;
        let mut first: Option<Transmit> = None;
        let mut iov: Vec<sys::ngtcp2_vec> = Vec::with_capacity(16);
        let mut result = None;
        loop {
            if len + max_tx > cap {
                break;
            }
            let mut ps = PathStorage::new();
            let mut pi = sys::ngtcp2_pkt_info { ecn: 0 };
            let mut pdatalen: sys::ngtcp2_ssize = -1;
            // SAFETY: `len + max_tx <= cap <= buf.capacity()`, so the offset stays inside the
            // allocation.
            let dest = unsafe { base.add(len) };
            // Datagrams first: they are small and latency-sensitive.
            let nwrite;
            if let Some(dgram) = self.datagrams_out.front() {
                let v = sys::ngtcp2_vec {
                    base: dgram.as_ptr().cast_mut(),
                    len: dgram.len(),
                };
                let mut accepted: c_int = 0;
                // SAFETY: `conn` is live; the destination has `mtu` writable bytes; the datagram
                // bytes are valid during the call (ngtcp2 copies them into the packet).
                nwrite = unsafe {
                    sys::ngtcp2_conn_writev_datagram_versioned(
                        self.raw(),
                        ps.path(),
                        sys::NGTCP2_PKT_INFO_VERSION as c_int,
                        &mut pi,
                        dest,
                        max_tx,
                        &mut accepted,
                        sys::NGTCP2_WRITE_DATAGRAM_FLAG_MORE,
                        0,
                        &v,
                        1,
                        ts,
                    )
                };
                if accepted != 0 {
                    self.datagrams_out.pop_front();
                } else if nwrite < 0 && nwrite != sys::NGTCP2_ERR_WRITE_MORE as sys::ngtcp2_ssize {
                    // Too large for the peer, or the peer does not take datagrams: drop it.
                    self.datagrams_out.pop_front();
                    if nwrite == sys::NGTCP2_ERR_INVALID_ARGUMENT as sys::ngtcp2_ssize
                        || nwrite == sys::NGTCP2_ERR_INVALID_STATE as sys::ngtcp2_ssize
                    {
                        continue;
                    }
                }
            } else {
                iov.clear();
                let (sid, flags) = self.next_stream_chunk(&mut iov);
                // SAFETY: `conn` is live; the destination has `mtu` writable bytes; the iovecs
                // point into `Bytes` chunks of the stream's pending queue, which stay alive (moved
                // to `unacked`) until ngtcp2 acknowledges them; no reference to Shared is alive.
                nwrite = unsafe {
                    sys::ngtcp2_conn_writev_stream_versioned(
                        self.raw(),
                        ps.path(),
                        sys::NGTCP2_PKT_INFO_VERSION as c_int,
                        &mut pi,
                        dest,
                        max_tx,
                        &mut pdatalen,
                        flags,
                        sid,
                        iov.as_ptr(),
                        iov.len(),
                        ts,
                    )
                };
                if sid >= 0 {
                    self.account_stream_write(sid, pdatalen, flags, nwrite);
                }
            }
            if nwrite == sys::NGTCP2_ERR_WRITE_MORE as sys::ngtcp2_ssize {
                continue;
            }
            if nwrite < 0 {
                let rv = nwrite as c_int;
                if rv == sys::NGTCP2_ERR_STREAM_DATA_BLOCKED
                    || rv == sys::NGTCP2_ERR_STREAM_SHUT_WR
                    || rv == sys::NGTCP2_ERR_STREAM_NOT_FOUND
                {
                    continue;
                }
                self.after_ngtcp2_call(now);
                self.handle_error(now, rv);
                if len == 0 {
                    return self.poll_transmit(now, buf, max_datagrams);
                }
                break;
            }
            if nwrite == 0 {
                break;
            }
            let n = nwrite as usize;
            let p = ps.read().unwrap_or(self.path);
            let ecn = Ecn::from_bits(pi.ecn);
            match &first {
                None => {
                    first = Some(Transmit {
                        destination: p.remote,
                        source: p.local,
                        ecn,
                        size: n,
                        segment_size: None,
                    });
                    len = n;
                    count = 1;
                    // A short first packet (or a PMTU probe) cannot be followed by GSO segments
                    // of the regular size.
                    if n != mtu {
                        break;
                    }
                }
                Some(f) => {
                    if p.remote != f.destination || p.local != f.source || ecn != f.ecn || n > mtu {
                        // SAFETY: ngtcp2 just wrote `n` bytes at `base + len`, inside the
                        // allocation.
                        let stashed =
                            unsafe { std::slice::from_raw_parts(base.add(len), n) }.to_vec();
                        self.stash = Some((
                            stashed,
                            Transmit {
                                destination: p.remote,
                                source: p.local,
                                ecn,
                                size: n,
                                segment_size: None,
                            },
                        ));
                        break;
                    }
                    len += n;
                    count += 1;
                    if n < mtu {
                        break;
                    }
                }
            }
            if count >= max_pkts {
                break;
            }
        }
        self.after_ngtcp2_call(now);
        if let Some(mut t) = first {
            // SAFETY: the first `len` bytes were written by ngtcp2 (packets are contiguous) and
            // `len <= cap <= capacity`.
            unsafe { buf.set_len(len) };
            t.size = len;
            t.segment_size = (count > 1).then_some(mtu);
            if self.smoothed_rtt() >= PACING_MIN_RTT {
                // SAFETY: `conn` is live.
                unsafe { sys::ngtcp2_conn_update_pkt_tx_time(self.raw(), ts) };
            }
            result = Some(t);
        } else {
            buf.clear();
        }
        result
    }

    /// Picks the next stream with data to send and fills `iov` with its pending chunks.
    fn next_stream_chunk(&mut self, iov: &mut Vec<sys::ngtcp2_vec>) -> (i64, u32) {
        let sh = self.shared();
        while let Some(&id) = sh.send_ready.front() {
            let Some(s) = sh.streams.get_mut(&id) else {
                sh.send_ready.pop_front();
                continue;
            };
            let send = &mut s.send;
            if send.shut.is_some()
                || send.flow_blocked
                || (send.pending_len == 0 && (!send.fin_requested || send.fin_sent))
            {
                send.queued = false;
                sh.send_ready.pop_front();
                continue;
            }
            let mut total = 0;
            for chunk in send.pending.iter().take(16) {
                iov.push(sys::ngtcp2_vec {
                    base: chunk.as_ptr().cast_mut(),
                    len: chunk.len(),
                });
                total += chunk.len();
            }
            let mut flags = sys::NGTCP2_WRITE_STREAM_FLAG_MORE;
            if send.fin_requested && total == send.pending_len {
                flags |= sys::NGTCP2_WRITE_STREAM_FLAG_FIN;
            }
            return (id, flags);
        }
        (-1, 0)
    }

    /// Moves what ngtcp2 took from a stream's pending queue to its unacked queue.
    fn account_stream_write(
        &mut self,
        id: i64,
        pdatalen: sys::ngtcp2_ssize,
        flags: u32,
        nwrite: sys::ngtcp2_ssize,
    ) {
        let sh = self.shared();
        let Some(s) = sh.streams.get_mut(&id) else {
            return;
        };
        let send = &mut s.send;
        if pdatalen >= 0 {
            let mut left = pdatalen as usize;
            while left > 0 {
                let Some(front) = send.pending.front_mut() else {
                    break;
                };
                let take = left.min(front.len());
                let piece = front.split_to(take);
                if front.is_empty() {
                    send.pending.pop_front();
                }
                send.pending_len -= take;
                send.unacked_len += take;
                send.unacked.push_back(piece);
                left -= take;
            }
            if flags & sys::NGTCP2_WRITE_STREAM_FLAG_FIN != 0 && send.pending_len == 0 {
                send.fin_sent = true;
            }
        }
        let rv = nwrite as c_int;
        if rv == sys::NGTCP2_ERR_STREAM_DATA_BLOCKED {
            send.flow_blocked = true;
        } else if rv == sys::NGTCP2_ERR_STREAM_SHUT_WR || rv == sys::NGTCP2_ERR_STREAM_NOT_FOUND {
            send.pending.clear();
            send.pending_len = 0;
            if send.shut.is_none() {
                send.shut = Some(StreamError::Finished);
            }
        }
        // Round-robin: a stream that still has data goes to the back of the queue once its
        // packet is done, so many streams share the connection fairly.
        if nwrite != sys::NGTCP2_ERR_WRITE_MORE as sys::ngtcp2_ssize || pdatalen > 0 {
            if let Some(pos) = sh.send_ready.iter().position(|&x| x == id) {
                sh.send_ready.remove(pos);
            }
            if let Some(s) = sh.streams.get_mut(&id) {
                s.send.queued = false;
            }
            sh.queue_send(id);
        }
    }

    // ---- streams -------------------------------------------------------------------------

    fn open_stream(&mut self, dir: Dir) -> Option<StreamId> {
        if !matches!(self.state, State::Open) || self.pending_close.is_some() {
            return None;
        }
        let mut id: i64 = -1;
        // SAFETY: `conn` is live; `id` is valid for writes.
        let rv = unsafe {
            match dir {
                Dir::Bi => {
                    sys::ngtcp2_conn_open_bidi_stream(self.raw(), &mut id, std::ptr::null_mut())
                }
                Dir::Uni => {
                    sys::ngtcp2_conn_open_uni_stream(self.raw(), &mut id, std::ptr::null_mut())
                }
            }
        };
        if rv != 0 {
            return None;
        }
        // A fresh entry: after 0-RTT rejection ngtcp2 hands out the discarded IDs again.
        self.shared().streams.insert(id, Stream::default());
        Some(StreamId(id))
    }

    /// Opens a bidirectional stream, or `None` if the peer's stream limit is reached (wait for
    /// [`Event::StreamsAvailable`]).
    pub fn open_bi(&mut self) -> Option<StreamId> {
        self.open_stream(Dir::Bi)
    }

    /// Opens a unidirectional stream, or `None` if the peer's stream limit is reached.
    pub fn open_uni(&mut self) -> Option<StreamId> {
        self.open_stream(Dir::Uni)
    }

    fn lost_error(&self) -> Option<StreamError> {
        self.lost.clone().map(StreamError::ConnectionLost)
    }

    /// Buffers `data` for sending on stream `id`. Takes as much as the stream's send buffer has
    /// room for and returns how much; [`StreamError::Blocked`] when none.
    pub fn stream_write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        if data.is_empty() {
            return Ok(0);
        }
        let room = self.stream_send_room(id)?;
        let n = room.min(data.len());
        self.stream_write_bytes(id, Bytes::copy_from_slice(&data[..n]))?;
        Ok(n)
    }

    /// Room left in a stream's send buffer; [`StreamError::Blocked`] when full (and then a
    /// [`Event::StreamWritable`] follows once there is room).
    pub fn stream_send_room(&mut self, id: StreamId) -> Result<usize, StreamError> {
        if let Some(e) = self.lost_error() {
            return Err(e);
        }
        let sh = self.shared();
        let limit = sh.stream_send_buffer;
        let s = sh
            .streams
            .get_mut(&id.0)
            .ok_or(StreamError::UnknownStream)?;
        if let Some(e) = &s.send.shut {
            return Err(e.clone());
        }
        if s.send.fin_requested || s.closed {
            return Err(StreamError::Finished);
        }
        let used = s.send.pending_len + s.send.unacked_len;
        if used >= limit {
            s.send.want_writable = true;
            return Err(StreamError::Blocked);
        }
        Ok(limit - used)
    }

    /// Buffers a whole `Bytes` for sending, without copying, ignoring the send-buffer limit.
    pub fn stream_write_bytes(&mut self, id: StreamId, data: Bytes) -> Result<(), StreamError> {
        self.stream_send_room(id).or_else(|e| match e {
            StreamError::Blocked => Ok(0),
            e => Err(e),
        })?;
        if data.is_empty() {
            return Ok(());
        }
        let sh = self.shared();
        let s = sh
            .streams
            .get_mut(&id.0)
            .ok_or(StreamError::UnknownStream)?;
        s.send.pending_len += data.len();
        s.send.pending.push_back(data);
        sh.queue_send(id.0);
        Ok(())
    }

    /// Finishes the sending side of a stream: FIN goes out after the buffered data.
    pub fn stream_finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        if let Some(e) = self.lost_error() {
            return Err(e);
        }
        let sh = self.shared();
        let s = sh
            .streams
            .get_mut(&id.0)
            .ok_or(StreamError::UnknownStream)?;
        if let Some(e) = &s.send.shut {
            return Err(e.clone());
        }
        if s.send.fin_requested {
            return Err(StreamError::Finished);
        }
        s.send.fin_requested = true;
        sh.queue_send(id.0);
        Ok(())
    }

    /// Abandons the sending side of a stream with RESET_STREAM and `code`.
    pub fn stream_reset(&mut self, id: StreamId, code: u64) -> Result<(), StreamError> {
        {
            let sh = self.shared();
            let s = sh
                .streams
                .get_mut(&id.0)
                .ok_or(StreamError::UnknownStream)?;
            if s.send.shut.is_some() {
                return Ok(());
            }
            s.send.shut = Some(StreamError::Finished);
            s.send.pending.clear();
            s.send.pending_len = 0;
        }
        // SAFETY: `conn` is live; no reference to Shared is alive.
        unsafe { sys::ngtcp2_conn_shutdown_stream_write(self.raw(), 0, id.0, code) };
        Ok(())
    }

    /// Asks the peer to stop sending on a stream (STOP_SENDING with `code`); buffered unread
    /// data is discarded.
    pub fn stream_stop(&mut self, id: StreamId, code: u64) -> Result<(), StreamError> {
        let discarded = {
            let sh = self.shared();
            let s = sh
                .streams
                .get_mut(&id.0)
                .ok_or(StreamError::UnknownStream)?;
            if s.recv.stopped {
                return Ok(());
            }
            s.recv.stopped = true;
            let n = s.recv.buf.len();
            s.recv.buf = BytesMut::new();
            n
        };
        // SAFETY: `conn` is live; no reference to Shared is alive.
        unsafe {
            sys::ngtcp2_conn_extend_max_offset(self.raw(), discarded as u64);
            sys::ngtcp2_conn_shutdown_stream_read(self.raw(), 0, id.0, code);
        }
        self.maybe_forget(id.0);
        Ok(())
    }

    /// Reads from a stream into `buf`: `Ok(Some(n))` bytes, `Ok(None)` at the end of the stream,
    /// [`StreamError::Blocked`] when nothing is buffered yet. Credits the peer's flow-control
    /// window with what was read.
    pub fn stream_read(
        &mut self,
        id: StreamId,
        buf: &mut [u8],
    ) -> Result<Option<usize>, StreamError> {
        self.stream_read_with(id, buf.len(), |data| {
            buf[..data.len()].copy_from_slice(data)
        })
    }

    /// Reads up to `max` buffered bytes of a stream by handing them to `f` (once, as one
    /// slice), without an intermediate buffer: `Ok(Some(n))` bytes, `Ok(None)` at the end of
    /// the stream, [`StreamError::Blocked`] when nothing is buffered yet. Credits the peer's
    /// flow-control window with what was read.
    pub fn stream_read_with(
        &mut self,
        id: StreamId,
        max: usize,
        f: impl FnOnce(&[u8]),
    ) -> Result<Option<usize>, StreamError> {
        let n;
        {
            let sh = self.shared();
            let s = sh
                .streams
                .get_mut(&id.0)
                .ok_or(StreamError::UnknownStream)?;
            let r = &mut s.recv;
            r.notified = false;
            if r.buf.is_empty() {
                return self.recv_end(id);
            }
            n = r.buf.len().min(max);
            f(&r.buf[..n]);
            if n == r.buf.len() {
                // Read out: keep no allocation while the stream is quiet.
                r.buf = BytesMut::new();
            } else {
                let _ = r.buf.split_to(n);
            }
        }
        self.credit(id, n);
        Ok(Some(n))
    }

    /// What a read finds on a stream with nothing buffered.
    fn recv_end(&mut self, id: StreamId) -> Result<Option<usize>, StreamError> {
        let lost = self.lost_error();
        let sh = self.shared();
        let Some(s) = sh.streams.get_mut(&id.0) else {
            return Err(StreamError::UnknownStream);
        };
        let r = &s.recv;
        if let Some(code) = r.reset {
            return Err(StreamError::Reset(code));
        }
        if r.fin {
            self.maybe_forget(id.0);
            return Ok(None);
        }
        if r.stopped {
            return Err(StreamError::Finished);
        }
        Err(lost.unwrap_or(StreamError::Blocked))
    }

    /// Reads the buffered data of a stream without copying, up to `max` bytes.
    pub fn stream_read_chunk(
        &mut self,
        id: StreamId,
        max: usize,
    ) -> Result<Option<Bytes>, StreamError> {
        let chunk;
        {
            let sh = self.shared();
            let s = sh
                .streams
                .get_mut(&id.0)
                .ok_or(StreamError::UnknownStream)?;
            let r = &mut s.recv;
            r.notified = false;
            if r.buf.is_empty() {
                return self.recv_end(id).map(|_| None);
            }
            let take = r.buf.len().min(max.max(1));
            chunk = if take == r.buf.len() {
                std::mem::take(&mut r.buf).freeze()
            } else {
                r.buf.split_to(take).freeze()
            };
        }
        self.credit(id, chunk.len());
        Ok(Some(chunk))
    }

    fn credit(&mut self, id: StreamId, n: usize) {
        if n == 0 || !matches!(self.state, State::Open) {
            return;
        }
        // SAFETY: `conn` is live; no reference to Shared is alive.
        unsafe {
            sys::ngtcp2_conn_extend_max_stream_offset(self.raw(), id.0, n as u64);
            sys::ngtcp2_conn_extend_max_offset(self.raw(), n as u64);
        }
    }

    /// Drops a stream's state once ngtcp2 closed it and the application saw its end.
    fn maybe_forget(&mut self, id: i64) {
        let sh = self.shared();
        if let Some(s) = sh.streams.get_mut(&id) {
            s.recv.app_done = true;
            if s.closed {
                sh.streams.remove(&id);
            }
        }
    }

    /// Bytes received on a stream and not yet read by the application.
    pub fn stream_recv_buffered(&mut self, id: StreamId) -> usize {
        self.shared()
            .streams
            .get(&id.0)
            .map_or(0, |s| s.recv.buf.len())
    }

    /// Whether a stream still exists (opened and not yet fully finished and read).
    pub fn stream_exists(&mut self, id: StreamId) -> bool {
        self.shared().streams.contains_key(&id.0)
    }

    // ---- datagrams -----------------------------------------------------------------------

    /// Queues an unreliable datagram (RFC 9221). Returns `false` if the peer does not accept
    /// datagrams or it is too large.
    pub fn send_datagram(&mut self, data: Bytes) -> bool {
        if self.lost.is_some() {
            return false;
        }
        // SAFETY: `conn` is live; the returned pointer is null before the handshake.
        let remote = unsafe { sys::ngtcp2_conn_get_remote_transport_params(self.raw()) };
        let max = if remote.is_null() {
            0
        } else {
            // SAFETY: non-null pointer into the connection, valid until the next ngtcp2 call.
            unsafe { (*remote).max_datagram_frame_size }
        };
        // Frame type + length varint overhead.
        if (data.len() as u64) + 9 > max {
            return false;
        }
        if self.datagrams_out.len() >= self.config.datagram_receive_queue.max(1) {
            self.datagrams_out.pop_front();
        }
        self.datagrams_out.push_back(data);
        true
    }

    /// The next received datagram.
    pub fn recv_datagram(&mut self) -> Option<Bytes> {
        let sh = self.shared();
        sh.datagram_notified = false;
        sh.datagrams.pop_front()
    }

    // ---- misc ----------------------------------------------------------------------------

    fn conn_info(&self) -> sys::ngtcp2_conn_info {
        let mut info = std::mem::MaybeUninit::<sys::ngtcp2_conn_info>::zeroed();
        // SAFETY: `conn` is live; the pointer is valid for writes of one ngtcp2_conn_info.
        unsafe {
            sys::ngtcp2_conn_get_conn_info_versioned(
                self.raw(),
                sys::NGTCP2_CONN_INFO_VERSION as c_int,
                info.as_mut_ptr(),
            )
        };
        // SAFETY: filled in above (and zero-initialised before).
        unsafe { info.assume_init() }
    }

    /// UDP payload bytes sent and received so far.
    fn carried_bytes(&self) -> u64 {
        let i = self.conn_info();
        i.bytes_sent.saturating_add(i.bytes_recv)
    }

    fn smoothed_rtt(&self) -> Duration {
        Duration::from_nanos(self.conn_info().smoothed_rtt)
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        let i = self.conn_info();
        Stats {
            rtt: Duration::from_nanos(i.smoothed_rtt),
            min_rtt: Duration::from_nanos(i.min_rtt),
            latest_rtt: Duration::from_nanos(i.latest_rtt),
            cwnd: i.cwnd,
            bytes_in_flight: i.bytes_in_flight,
            sent_packets: i.pkt_sent,
            sent_bytes: i.bytes_sent,
            recv_packets: i.pkt_recv,
            recv_bytes: i.bytes_recv,
            lost_packets: i.pkt_lost,
            lost_bytes: i.bytes_lost,
        }
    }

    /// Starts a key update (RFC 9001 §6); only valid once the handshake is confirmed.
    pub fn initiate_key_update(&mut self, now: Instant) -> bool {
        // SAFETY: `conn` is live.
        let rv = unsafe { sys::ngtcp2_conn_initiate_key_update(self.raw(), to_ts(now)) };
        rv == 0
    }

    /// Client: moves the connection to a new local address (after rebinding the socket).
    ///
    /// Returns `true` for an active migration: a fresh connection ID on the new path, which
    /// ngtcp2 validates. When that is not allowed (the server sent `disable_active_migration`,
    /// the handshake is not confirmed yet, or no spare connection ID) the connection still
    /// follows the socket, exactly as after a NAT rebinding: same connection ID, and the server
    /// validates the new address itself. Returns `false` then.
    pub fn migrate(&mut self, now: Instant, local: std::net::SocketAddr) -> bool {
        let path = Path {
            local,
            remote: self.path.remote,
        };
        let mut owned = OwnedPath::new(path.local, path.remote);
        // SAFETY: `conn` is live; the path is valid for the call (ngtcp2 copies it).
        let rv =
            unsafe { sys::ngtcp2_conn_initiate_migration(self.raw(), owned.as_ptr(), to_ts(now)) };
        self.after_ngtcp2_call(now);
        self.path = path;
        if rv == 0 {
            return true;
        }
        tracing::debug!(error = %liberr_string(rv), "no active migration: following the socket like a NAT rebinding");
        // SAFETY: `conn` is live; the path's local address points into `owned`, which outlives
        // the call (ngtcp2 copies the address into the current path's own storage).
        unsafe {
            let p = &*owned.as_ptr();
            sys::ngtcp2_conn_set_local_addr(self.raw(), &p.local);
        }
        false
    }

    /// Whether the peer sent the `disable_active_migration` transport parameter (`false` until
    /// its transport parameters arrived).
    pub fn peer_disables_active_migration(&self) -> bool {
        // SAFETY: `conn` is live; the returned pointer is null before the peer's parameters
        // arrived and otherwise valid until the next ngtcp2 call, which `&self` excludes.
        let params = unsafe { sys::ngtcp2_conn_get_remote_transport_params(self.raw()) };
        // SAFETY: non-null pointer into the connection (see above).
        !params.is_null() && unsafe { (*params).disable_active_migration != 0 }
    }

    /// The connection IDs this side currently uses for itself (to route incoming packets).
    pub fn local_cids(&self) -> Vec<ConnectionId> {
        // SAFETY: `conn` is live; a null destination asks for the count.
        let n = unsafe { sys::ngtcp2_conn_get_scid(self.raw(), std::ptr::null_mut()) };
        let mut cids = vec![sys::ngtcp2_cid::default(); n];
        // SAFETY: `cids` has room for `n` CIDs.
        let n = unsafe { sys::ngtcp2_conn_get_scid(self.raw(), cids.as_mut_ptr()) };
        cids.truncate(n);
        cids.iter().map(ConnectionId::from_ngtcp2).collect()
    }
}

/// An `ngtcp2_path_storage` that ngtcp2 fills with a packet's path; must not move after `path()`.
struct PathStorage(sys::ngtcp2_path_storage);

impl PathStorage {
    fn new() -> Self {
        // SAFETY: all-zero is a valid (empty) ngtcp2_path_storage.
        PathStorage(unsafe { std::mem::zeroed() })
    }
    fn path(&mut self) -> *mut sys::ngtcp2_path {
        // SAFETY: initialises the storage's path to point at its own address buffers; `self`
        // is not moved until the ngtcp2 call that uses the pointer returns.
        unsafe { sys::ngtcp2_path_storage_zero(&mut self.0) };
        &raw mut self.0.path
    }
    fn read(&self) -> Option<Path> {
        // SAFETY: the path's pointers point into `self.0` (set by `path()`), or are null.
        unsafe { read_path(&self.0.path) }.map(|(local, remote)| Path { local, remote })
    }
}

// ---- callbacks ---------------------------------------------------------------------------

/// Runs `f` on the connection's `Shared` state, catching panics: the body of every callback.
///
/// # Safety
/// `user_data` must be the `Shared` pointer given to `ngtcp2_conn_*_new`, and no other reference
/// to that `Shared` may be alive (see the module invariants).
unsafe fn with_shared(
    user_data: *mut c_void,
    f: impl FnOnce(&mut Shared) -> Result<(), String>,
) -> c_int {
    let shared = user_data.cast::<Shared>();
    if shared.is_null() {
        return sys::NGTCP2_ERR_CALLBACK_FAILURE;
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: guaranteed by the caller.
        f(unsafe { &mut *shared })
    }));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(why)) => {
            // SAFETY: as above; the closure's reference is gone.
            unsafe { (*shared).failure = Some(why) };
            sys::NGTCP2_ERR_CALLBACK_FAILURE
        }
        Err(_) => {
            // SAFETY: as above; the closure's reference is gone.
            unsafe { (*shared).failure = Some("panic in an ngtcp2 callback".into()) };
            sys::NGTCP2_ERR_CALLBACK_FAILURE
        }
    }
}

unsafe extern "C" fn cb_qlog_write(
    user_data: *mut c_void,
    flags: u32,
    data: *const c_void,
    datalen: usize,
) {
    use std::io::Write;
    // SAFETY: user_data is our Shared; data is valid for datalen bytes during the call. The
    // return code is ignored by ngtcp2 (qlog is best effort), so errors only stop the log.
    let _ = unsafe {
        with_shared(user_data, |sh| {
            if let Some(w) = sh.qlog.as_mut() {
                if datalen > 0 {
                    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), datalen);
                    if w.write_all(bytes).is_err() {
                        sh.qlog = None;
                        return Ok(());
                    }
                }
                if flags & sys::NGTCP2_QLOG_WRITE_FLAG_FIN != 0 {
                    let _ = w.flush();
                }
            }
            Ok(())
        })
    };
}

unsafe extern "C" fn cb_rand(dest: *mut u8, destlen: usize, _ctx: *const sys::ngtcp2_rand_ctx) {
    if dest.is_null() || destlen == 0 {
        return;
    }
    // SAFETY: ngtcp2 passes a buffer of `destlen` writable bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(dest, destlen) };
    // fill_random cannot unwind (it aborts on RNG failure).
    fill_random(buf);
}

unsafe extern "C" fn cb_get_new_connection_id(
    _conn: *mut sys::ngtcp2_conn,
    cid: *mut sys::ngtcp2_cid,
    token: *mut sys::ngtcp2_stateless_reset_token,
    cidlen: usize,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared (module invariants); cid and token are valid for writes.
    unsafe {
        with_shared(user_data, |sh| {
            let new = ConnectionId::random(cidlen);
            let t = reset_token(&sh.reset_secret, &new).ok_or("reset token")?;
            *cid = new.to_ngtcp2();
            (*token).data = t;
            sh.endpoint_events.push_back(EndpointEvent::NewCid(new));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_remove_connection_id(
    _conn: *mut sys::ngtcp2_conn,
    cid: *const sys::ngtcp2_cid,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared; cid is valid for reads.
    unsafe {
        with_shared(user_data, |sh| {
            sh.endpoint_events
                .push_back(EndpointEvent::RetireCid(ConnectionId::from_ngtcp2(&*cid)));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_handshake_completed(
    _conn: *mut sys::ngtcp2_conn,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            sh.handshake_completed = true;
            Ok(())
        })
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn cb_recv_stream_data(
    _conn: *mut sys::ngtcp2_conn,
    flags: u32,
    stream_id: i64,
    _offset: u64,
    data: *const u8,
    datalen: usize,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared; data is valid for datalen bytes during the call.
    unsafe {
        with_shared(user_data, |sh| {
            let s = sh.stream(stream_id);
            if datalen > 0 && !s.recv.stopped {
                let r = &mut s.recv.buf;
                if r.capacity() - r.len() < datalen {
                    // Room for a burst of frames, so most frames are a copy, not an allocation.
                    r.reserve(datalen.max(RECV_BUFFER_MIN));
                }
                r.extend_from_slice(std::slice::from_raw_parts(data, datalen));
            }
            if flags & sys::NGTCP2_STREAM_DATA_FLAG_FIN != 0 {
                s.recv.fin = true;
            }
            if !s.recv.notified {
                s.recv.notified = true;
                sh.events
                    .push_back(Event::StreamReadable(StreamId(stream_id)));
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_acked_stream_data_offset(
    _conn: *mut sys::ngtcp2_conn,
    stream_id: i64,
    _offset: u64,
    datalen: u64,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            let limit = sh.stream_send_buffer;
            let Some(s) = sh.streams.get_mut(&stream_id) else {
                return Ok(());
            };
            let send = &mut s.send;
            let mut left = datalen as usize;
            while left > 0 {
                let Some(front) = send.unacked.front_mut() else {
                    break;
                };
                let take = left.min(front.len());
                front.advance(take);
                if front.is_empty() {
                    send.unacked.pop_front();
                }
                send.unacked_len -= take;
                left -= take;
            }
            if send.want_writable && send.unacked_len + send.pending_len < limit {
                send.want_writable = false;
                sh.events
                    .push_back(Event::StreamWritable(StreamId(stream_id)));
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_stream_open(
    _conn: *mut sys::ngtcp2_conn,
    stream_id: i64,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            sh.stream(stream_id);
            sh.events
                .push_back(Event::StreamOpened(StreamId(stream_id)));
            Ok(())
        })
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn cb_stream_close(
    _conn: *mut sys::ngtcp2_conn,
    _flags: u32,
    stream_id: i64,
    _rx_app_error_code: u64,
    _tx_app_error_code: u64,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            let Some(s) = sh.streams.get_mut(&stream_id) else {
                return Ok(());
            };
            s.closed = true;
            // ngtcp2 no longer references the stream's send data.
            s.send.unacked.clear();
            s.send.unacked_len = 0;
            let finished = s.send.fin_sent && s.send.shut.is_none();
            s.send.pending.clear();
            s.send.pending_len = 0;
            if s.send.shut.is_none() {
                s.send.shut = Some(StreamError::Finished);
            }
            let id = StreamId(stream_id);
            if finished {
                sh.events.push_back(Event::StreamFinished(id));
            }
            // Wake both halves: readers see the end, writers see the stream closed.
            sh.events.push_back(Event::StreamReadable(id));
            sh.events.push_back(Event::StreamWritable(id));
            let send_only = !id.is_bidi() && id.is_client_initiated() == (sh.side == Side::Client);
            if send_only || sh.streams.get(&stream_id).is_some_and(|s| s.recv.app_done) {
                sh.streams.remove(&stream_id);
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_stream_reset(
    _conn: *mut sys::ngtcp2_conn,
    stream_id: i64,
    _final_size: u64,
    app_error_code: u64,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            let s = sh.stream(stream_id);
            s.recv.reset = Some(app_error_code);
            sh.events.push_back(Event::StreamReset {
                id: StreamId(stream_id),
                code: app_error_code,
            });
            sh.events
                .push_back(Event::StreamReadable(StreamId(stream_id)));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_recv_stop_sending(
    _conn: *mut sys::ngtcp2_conn,
    stream_id: i64,
    app_error_code: u64,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            let s = sh.stream(stream_id);
            s.send.shut = Some(StreamError::Stopped(app_error_code));
            s.send.pending.clear();
            s.send.pending_len = 0;
            sh.events.push_back(Event::StreamStopped {
                id: StreamId(stream_id),
                code: app_error_code,
            });
            sh.events
                .push_back(Event::StreamWritable(StreamId(stream_id)));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_extend_max_stream_data(
    _conn: *mut sys::ngtcp2_conn,
    stream_id: i64,
    _max_data: u64,
    user_data: *mut c_void,
    _stream_user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            if let Some(s) = sh.streams.get_mut(&stream_id) {
                s.send.flow_blocked = false;
            }
            sh.queue_send(stream_id);
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_extend_max_streams_bidi(
    _conn: *mut sys::ngtcp2_conn,
    _max: u64,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            sh.events.push_back(Event::StreamsAvailable(Dir::Bi));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_extend_max_streams_uni(
    _conn: *mut sys::ngtcp2_conn,
    _max: u64,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            sh.events.push_back(Event::StreamsAvailable(Dir::Uni));
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_recv_datagram(
    _conn: *mut sys::ngtcp2_conn,
    _flags: u32,
    data: *const u8,
    datalen: usize,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared; data is valid for datalen bytes during the call.
    unsafe {
        with_shared(user_data, |sh| {
            if sh.datagrams.len() >= sh.datagram_queue_limit {
                sh.datagrams.pop_front();
            }
            let bytes = if datalen == 0 {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(std::slice::from_raw_parts(data, datalen))
            };
            sh.datagrams.push_back(bytes);
            if !sh.datagram_notified {
                sh.datagram_notified = true;
                sh.events.push_back(Event::DatagramReceived);
            }
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_recv_stateless_reset(
    _conn: *mut sys::ngtcp2_conn,
    _sr: *const sys::ngtcp2_pkt_stateless_reset2,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            sh.stateless_reset = true;
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_tls_early_data_rejected(
    _conn: *mut sys::ngtcp2_conn,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared.
    unsafe {
        with_shared(user_data, |sh| {
            // ngtcp2 discards the streams opened in 0-RTT and will hand out their IDs again:
            // forget them (the tokio layer invalidates their handles).
            let side = sh.side;
            sh.streams
                .retain(|&id, _| StreamId(id).is_client_initiated() != (side == Side::Client));
            sh.send_ready.clear();
            sh.events.push_back(Event::ZeroRttRejected);
            Ok(())
        })
    }
}

unsafe extern "C" fn cb_path_validation(
    _conn: *mut sys::ngtcp2_conn,
    _flags: u32,
    path: *const sys::ngtcp2_path,
    _fallback: *const sys::ngtcp2_path,
    res: sys::ngtcp2_path_validation_result,
    user_data: *mut c_void,
) -> c_int {
    // SAFETY: user_data is our Shared; path is valid during the call.
    unsafe {
        with_shared(user_data, |_sh| {
            let p = read_path(path);
            tracing::debug!(
                ?p,
                ok =
                    res == sys::ngtcp2_path_validation_result_NGTCP2_PATH_VALIDATION_RESULT_SUCCESS,
                "path validation finished"
            );
            Ok(())
        })
    }
}
