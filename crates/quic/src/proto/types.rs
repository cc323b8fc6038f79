//! Small value types shared by the sans-IO layer and the endpoint.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_ngtcp2_sys as sys;

/// A QUIC connection ID (0 to 20 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConnectionId {
    len: u8,
    bytes: [u8; 20],
}

impl ConnectionId {
    /// The longest connection ID QUIC v1 allows.
    pub const MAX_LEN: usize = 20;

    /// A connection ID with these bytes, or `None` if longer than 20 bytes.
    pub fn from_slice(data: &[u8]) -> Option<Self> {
        if data.len() > Self::MAX_LEN {
            return None;
        }
        let mut bytes = [0u8; 20];
        bytes[..data.len()].copy_from_slice(data);
        Some(ConnectionId {
            len: data.len() as u8,
            bytes,
        })
    }

    /// A random connection ID of `len` bytes (clamped to 20).
    pub fn random(len: usize) -> Self {
        let len = len.min(Self::MAX_LEN);
        let mut bytes = [0u8; 20];
        fill_random(&mut bytes[..len]);
        ConnectionId {
            len: len as u8,
            bytes,
        }
    }

    /// The bytes of the ID.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub(crate) fn to_ngtcp2(self) -> sys::ngtcp2_cid {
        sys::ngtcp2_cid {
            datalen: self.len as usize,
            data: self.bytes,
        }
    }

    pub(crate) fn from_ngtcp2(cid: &sys::ngtcp2_cid) -> Self {
        let len = cid.datalen.min(Self::MAX_LEN);
        let mut bytes = [0u8; 20];
        bytes[..len].copy_from_slice(&cid.data[..len]);
        ConnectionId {
            len: len as u8,
            bytes,
        }
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        // The OS RNG does not fail on the platforms we support; if it ever does, refuse to
        // continue with predictable connection IDs or tokens.
        std::process::abort();
    }
}

/// A stream ID as QUIC numbers streams: the two low bits give initiator and direction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub(crate) i64);

impl StreamId {
    /// The numeric ID.
    pub fn index(self) -> u64 {
        self.0 as u64
    }
    /// Whether the stream is bidirectional.
    pub fn is_bidi(self) -> bool {
        self.0 & 0x2 == 0
    }
    /// Whether the client opened the stream.
    pub fn is_client_initiated(self) -> bool {
        self.0 & 0x1 == 0
    }
    /// Direction of the stream.
    pub fn dir(self) -> Dir {
        if self.is_bidi() { Dir::Bi } else { Dir::Uni }
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Stream direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Bidirectional.
    Bi,
    /// Unidirectional.
    Uni,
}

/// Which end of the connection this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The endpoint that initiated the connection.
    Client,
    /// The endpoint that accepted it.
    Server,
}

/// A network path: the local and the remote socket address of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Path {
    /// Our address (the socket's, or the packet's destination address).
    pub local: SocketAddr,
    /// The peer's address.
    pub remote: SocketAddr,
}

/// Explicit Congestion Notification codepoint, as in the IP header's two ECN bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ecn {
    /// Not ECN-capable.
    #[default]
    NotEct,
    /// ECT(1).
    Ect1,
    /// ECT(0).
    Ect0,
    /// Congestion experienced.
    Ce,
}

impl Ecn {
    /// From the two ECN bits of an IP header.
    pub fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            1 => Ecn::Ect1,
            2 => Ecn::Ect0,
            3 => Ecn::Ce,
            _ => Ecn::NotEct,
        }
    }
    /// The two ECN bits for an IP header.
    pub fn bits(self) -> u8 {
        match self {
            Ecn::NotEct => 0,
            Ecn::Ect1 => 1,
            Ecn::Ect0 => 2,
            Ecn::Ce => 3,
        }
    }
}

/// Datagrams to send, written by [`crate::proto::Connection::poll_transmit`] into the caller's
/// buffer: `size` bytes, split into `segment_size` datagrams when more than one (GSO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send.
    pub destination: SocketAddr,
    /// The local address to send from.
    pub source: SocketAddr,
    /// ECN codepoint for the IP header.
    pub ecn: Ecn,
    /// Bytes written at the start of the buffer.
    pub size: usize,
    /// Size of every datagram but the last, if the buffer holds more than one.
    pub segment_size: Option<usize>,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The peer closed the connection with an application error code.
    #[error(
        "closed by peer: application error {code}: {}",
        String::from_utf8_lossy(reason)
    )]
    ApplicationClosed {
        /// The code the peer's application gave.
        code: u64,
        /// The reason phrase.
        reason: Bytes,
    },
    /// The peer closed the connection with a transport error code.
    #[error(
        "closed by peer: transport error {code:#x}: {}",
        String::from_utf8_lossy(reason)
    )]
    ConnectionClosed {
        /// The QUIC transport error code.
        code: u64,
        /// The reason phrase.
        reason: Bytes,
    },
    /// We closed the connection.
    #[error("closed locally")]
    LocallyClosed,
    /// Nothing was received for the idle timeout.
    #[error("idle timeout")]
    TimedOut,
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The peer sent a stateless reset.
    #[error("stateless reset by peer")]
    Reset,
    /// The peer speaks none of our versions.
    #[error("no common QUIC version")]
    VersionMismatch,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// A protocol violation or an internal error ended the connection.
    #[error("transport error: {0}")]
    Transport(String),
}

/// Process-wide origin of ngtcp2 timestamps.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1))
}

/// An `Instant` as an ngtcp2 timestamp (nanoseconds since the process epoch).
pub(crate) fn to_ts(now: Instant) -> sys::ngtcp2_tstamp {
    now.saturating_duration_since(epoch()).as_nanos() as u64
}

/// An ngtcp2 timestamp back as an `Instant`.
pub(crate) fn from_ts(ts: sys::ngtcp2_tstamp) -> Instant {
    epoch() + Duration::from_nanos(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_ids_classify() {
        let now = Instant::now();
        let back = from_ts(to_ts(now));
        assert!(back <= now && now - back < Duration::from_micros(1));
        assert!(StreamId(0).is_bidi() && StreamId(0).is_client_initiated());
        assert!(!StreamId(3).is_bidi() && !StreamId(3).is_client_initiated());
        let cid = ConnectionId::random(16);
        assert_eq!(cid.as_bytes().len(), 16);
        assert_eq!(ConnectionId::from_ngtcp2(&cid.to_ngtcp2()), cid);
        assert!(ConnectionId::from_slice(&[0; 21]).is_none());
    }
}
