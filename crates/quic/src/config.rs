//! Transport, server and client configuration.

use std::sync::Arc;
use std::time::Duration;

use crate::tls;

/// The largest UDP payload an IPv6 datagram on loopback carries (MTU 65536 less the IPv6 and
/// UDP headers): the largest [`TransportConfig::max_udp_payload_size`] worth setting, and the
/// last size Path MTU discovery probes.
pub const MAX_UDP_PAYLOAD: usize = 65_487;

/// The QUIC versions this crate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// QUIC version 1 (RFC 9000).
    V1,
    /// QUIC version 2 (RFC 9369).
    V2,
}

impl Version {
    /// The version number on the wire.
    pub fn wire(self) -> u32 {
        match self {
            Version::V1 => mqttd_ngtcp2_sys::NGTCP2_PROTO_VER_V1,
            Version::V2 => mqttd_ngtcp2_sys::NGTCP2_PROTO_VER_V2,
        }
    }
}

/// The congestion controller ngtcp2 runs for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// CUBIC (RFC 9438), the default.
    #[default]
    Cubic,
    /// BBR.
    Bbr,
    /// NewReno.
    Reno,
}

/// Transport parameters and local limits shared by both sides of a connection.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Close the connection after this long without packets (the smaller of both sides' values
    /// applies). `Duration::ZERO` disables the idle timeout.
    pub idle_timeout: Duration,
    /// Send a PING when nothing was sent for this long (keeps NAT bindings and idle timers
    /// alive). `None` disables keep-alives.
    pub keep_alive: Option<Duration>,
    /// Give up a handshake that has not completed after this long.
    pub handshake_timeout: Duration,
    /// Initial connection-level receive window in bytes.
    pub receive_window: u64,
    /// The connection-level window auto-tuning grows up to this many bytes.
    pub max_receive_window: u64,
    /// Initial receive window per stream in bytes.
    pub stream_receive_window: u64,
    /// The per-stream window auto-tuning grows up to this many bytes.
    pub max_stream_receive_window: u64,
    /// How many bidirectional streams the peer may have open at once.
    pub max_concurrent_bidi_streams: u64,
    /// How many unidirectional streams the peer may have open at once.
    pub max_concurrent_uni_streams: u64,
    /// Largest DATAGRAM frame accepted from the peer (RFC 9221); 0 disables datagrams.
    pub max_datagram_frame_size: u64,
    /// How many received datagrams are buffered before the oldest is dropped.
    pub datagram_receive_queue: usize,
    /// Bytes a stream may buffer for sending (written but not yet acknowledged) before writes
    /// wait: the send-side back-pressure.
    pub stream_send_buffer: usize,
    /// The congestion controller.
    pub congestion_control: CongestionControl,
    /// Largest UDP payload this endpoint sends. Path MTU discovery probes up to it: the usual
    /// Internet sizes (up to 1444 bytes), then, when this allows, 8952 (jumbo frames), 16384,
    /// 32768 and 65487 (the loopback MTU); a probe the path drops ends the search upwards
    /// (without congestion penalty). Larger datagrams carry the same data in fewer packets,
    /// so fewer per-packet costs (encryption, ACKs, system calls) on paths that allow them.
    /// Probes past 1452 bytes wait until the connection sent and received 256 KiB: both ends
    /// keep buffers as large as the largest packet (ngtcp2 never shrinks its decryption
    /// buffer), which idle connections are spared.
    pub max_udp_payload_size: usize,
    /// Versions in order of preference; the first is what a client starts with.
    pub versions: Vec<Version>,
    /// Length of connection IDs this endpoint issues (8..=20).
    pub cid_len: usize,
    /// Write a qlog (JSON-SEQ, ngtcp2's events) per connection into this directory, named
    /// `<side>-<source connection id>.sqlog`.
    pub qlog_dir: Option<std::path::PathBuf>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            handshake_timeout: Duration::from_secs(10),
            receive_window: 4 << 20,
            max_receive_window: 24 << 20,
            stream_receive_window: 1 << 20,
            max_stream_receive_window: 16 << 20,
            max_concurrent_bidi_streams: 128,
            max_concurrent_uni_streams: 128,
            max_datagram_frame_size: 65535,
            datagram_receive_queue: 1024,
            stream_send_buffer: 4 << 20,
            congestion_control: CongestionControl::Cubic,
            max_udp_payload_size: 1452,
            versions: vec![Version::V1, Version::V2],
            cid_len: 16,
            qlog_dir: None,
        }
    }
}

/// Configuration of a server endpoint.
#[derive(Clone)]
pub struct ServerConfig {
    /// TLS: certificate, key, ALPN, 0-RTT.
    pub tls: tls::ServerConfig,
    /// Transport parameters and limits.
    pub transport: Arc<TransportConfig>,
    /// Always validate client addresses with a Retry before creating connection state.
    pub retry: bool,
    /// Turn Retry on automatically when more than this many handshakes started in the last
    /// second (protects against Initial floods from spoofed addresses).
    pub retry_above_handshakes_per_sec: u32,
    /// Most established and handshaking connections at once; further Initials are refused with
    /// CONNECTION_CLOSE(CONNECTION_REFUSED).
    pub max_connections: usize,
    /// Most connections still in their handshake at once.
    pub max_half_open: usize,
    /// How long a Retry token stays valid.
    pub retry_token_lifetime: Duration,
    /// Key deriving stateless-reset tokens. Keep it stable across restarts (and share it
    /// between servers behind one address) so clients of a lost connection are reset at once
    /// instead of waiting for their idle timeout; `None` picks a random key per endpoint.
    pub stateless_reset_key: Option<[u8; 32]>,
    /// Allow clients to migrate actively to a new address (default). `false` sends the
    /// `disable_active_migration` transport parameter: compliant clients keep their address
    /// for the life of the connection. The server still follows a client whose address changes
    /// underneath it (NAT rebinding, validated by ngtcp2 with PATH_CHALLENGE), because that is
    /// indistinguishable from a client moving without asking; the parameter only tells clients
    /// not to move on their own.
    pub migration: bool,
}

impl ServerConfig {
    /// A configuration with default transport settings and limits.
    pub fn new(tls: tls::ServerConfig) -> Self {
        ServerConfig {
            tls,
            transport: Arc::new(TransportConfig::default()),
            retry: false,
            retry_above_handshakes_per_sec: 2000,
            max_connections: 10_000,
            max_half_open: 1000,
            retry_token_lifetime: Duration::from_secs(10),
            stateless_reset_key: None,
            migration: true,
        }
    }
}

/// Configuration of client connections.
#[derive(Clone)]
pub struct ClientConfig {
    /// TLS: trusted roots, ALPN, session cache for 0-RTT.
    pub tls: tls::ClientConfig,
    /// Transport parameters and limits.
    pub transport: Arc<TransportConfig>,
}

impl ClientConfig {
    /// A configuration with default transport settings.
    pub fn new(tls: tls::ClientConfig) -> Self {
        ClientConfig {
            tls,
            transport: Arc::new(TransportConfig::default()),
        }
    }
}
