//! Framing and the decoding entry points.
//!
//! Framing reads only the fixed header: the first byte, then the remaining length (at most four
//! bytes, minimally encoded). The announced size is compared with the maximum packet size before
//! anything is split off or allocated, and nothing is parsed until the whole packet is in the
//! buffer, so a partial read costs one header peek.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::{Connect, Packet, Publish};
use crate::protocol::{PacketType, ProtocolVersion};
use crate::wire::{VarInt, read_varint};

/// What the fixed header at the start of a buffer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A whole packet of `len` bytes (fixed header included) is at the start of the buffer.
    Complete {
        /// Its total length.
        len: usize,
    },
    /// The buffer holds only part of a packet; at least `needed` more bytes must arrive
    /// (exactly `needed` once the fixed header itself is complete).
    Incomplete {
        /// The number of missing bytes.
        needed: usize,
    },
}

/// Reads the fixed header at the start of `buf` and reports whether a whole packet is there.
///
/// Fails with [`DecodeError::PacketTooLarge`] as soon as the remaining length is known and the
/// whole packet would exceed `max_packet_size` bytes (the MQTT 5 definition of packet size:
/// fixed header included), and on a malformed remaining length.
#[inline]
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Status, DecodeError> {
    if buf.len() < 2 {
        return Ok(Status::Incomplete {
            needed: 2 - buf.len(),
        });
    }
    match read_varint(&buf[1..])? {
        VarInt::Incomplete => Ok(Status::Incomplete { needed: 1 }),
        VarInt::Value(remaining, n) => {
            let len = 1 + n + remaining as usize;
            if len > max_packet_size {
                return Err(DecodeError::PacketTooLarge {
                    size: len,
                    max: max_packet_size,
                });
            }
            if buf.len() < len {
                Ok(Status::Incomplete {
                    needed: len - buf.len(),
                })
            } else {
                Ok(Status::Complete { len })
            }
        }
    }
}

/// Decodes the first packet of `buf` for `version`, removing its bytes from `buf`.
///
/// `Ok(None)` means the buffer holds only part of a packet (call [`check`] to learn how many
/// bytes are missing); nothing is consumed then. On error the connection must be closed (with
/// [`DecodeError::reason_code`] in 5.0); the buffer's content is then unspecified.
/// Topics, strings and payloads of the result are slices of `buf`'s memory.
#[inline]
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((len, header)) = frame_len(buf, max_packet_size)? else {
        return Ok(None);
    };
    let first = buf[0];
    let frame = buf.split_to(len).freeze();
    decode_split(first, frame, header, version)
}

/// PUBLISH first, on its own small path built in place; everything else through the general
/// dispatcher, which is kept out of line so the hot path's stack frame stays small. `frame` is
/// the whole packet, its fixed header `header` bytes long.
#[inline(always)]
fn decode_split(
    first: u8,
    mut frame: Bytes,
    header: usize,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    if first >> 4 == PacketType::Publish as u8 {
        Publish::decode_some(first & 0x0F, frame, header, version)
    } else {
        frame.advance(header);
        Packet::decode_body(first, frame, version).map(Some)
    }
}

/// The total length and fixed header length of the complete packet at the start of `buf`,
/// `None` if incomplete.
#[inline(always)]
fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<(usize, usize)>, DecodeError> {
    let (remaining, n) = match buf {
        [] | [_] => return Ok(None),
        // A one-byte remaining length (packets under 130 bytes): no loop.
        [_, b, ..] if *b < 0x80 => (usize::from(*b), 1),
        [_, rest @ ..] => match read_varint(rest)? {
            VarInt::Incomplete => return Ok(None),
            VarInt::Value(remaining, n) => (remaining as usize, n),
        },
    };
    let len = 1 + n + remaining;
    if len > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: len,
            max: max_packet_size,
        });
    }
    Ok((buf.len() >= len).then_some((len, 1 + n)))
}

/// As [`decode`], from a [`Bytes`] buffer (advanced past the packet on success).
#[inline]
pub fn decode_bytes(
    buf: &mut Bytes,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((len, header)) = frame_len(buf, max_packet_size)? else {
        return Ok(None);
    };
    let first = buf[0];
    let frame = buf.split_to(len);
    decode_split(first, frame, header, version)
}

/// Decodes the first packet of a connection, which must be a CONNECT, before the protocol
/// version is known (the CONNECT carries it in [`Connect::protocol_version`]).
///
/// Fails with [`DecodeError::ExpectedConnect`] for any other packet.
pub fn decode_connect(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Connect>, DecodeError> {
    if let Some(&first) = buf.first() {
        let ptype = first >> 4;
        if ptype != PacketType::Connect as u8 {
            return Err(match PacketType::from_u8(ptype) {
                Some(t) => DecodeError::ExpectedConnect(t),
                None => DecodeError::InvalidPacketType(ptype),
            });
        }
    }
    // The version only matters for packets other than CONNECT.
    match decode(buf, ProtocolVersion::V5, max_packet_size)? {
        Some(Packet::Connect(c)) => Ok(Some(*c)),
        Some(other) => Err(DecodeError::ExpectedConnect(other.packet_type())),
        None => Ok(None),
    }
}

/// Decodes exactly one whole packet (fixed header included) held in `packet`. Fails if the
/// remaining length does not match `packet`'s length.
pub fn decode_frame(mut packet: Bytes, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let first = *packet.first().ok_or(DecodeError::UnexpectedEof)?;
    let (remaining, n) = match read_varint(&packet[1..])? {
        VarInt::Value(v, n) => (v as usize, n),
        VarInt::Incomplete => return Err(DecodeError::UnexpectedEof),
    };
    let body_len = packet.len() - 1 - n;
    if remaining > body_len {
        return Err(DecodeError::UnexpectedEof);
    }
    if remaining < body_len {
        return Err(DecodeError::TrailingBytes(body_len - remaining));
    }
    packet.advance(1 + n);
    Packet::decode_body(first, packet, version)
}

/// A connection's decoding state: the negotiated version (unknown until the CONNECT) and the
/// maximum packet size. Also the tokio-util `Decoder`/`Encoder` with the `tokio-codec` feature.
#[derive(Debug, Clone)]
pub struct Codec {
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
}

impl Codec {
    /// A server-side codec: the first packet must be a CONNECT, whose version is then used.
    pub fn new(max_packet_size: usize) -> Self {
        Self {
            version: None,
            max_packet_size,
        }
    }

    /// A codec for a connection whose version is already known (client side).
    pub fn with_version(version: ProtocolVersion, max_packet_size: usize) -> Self {
        Self {
            version: Some(version),
            max_packet_size,
        }
    }

    /// The negotiated version, once known.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// Sets the version (a client sets it from its own CONNECT).
    pub fn set_version(&mut self, version: ProtocolVersion) {
        self.version = Some(version);
    }

    /// The maximum packet size accepted.
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// Changes the maximum packet size (e.g. after CONNECT negotiated a smaller one).
    pub fn set_max_packet_size(&mut self, max_packet_size: usize) {
        self.max_packet_size = max_packet_size;
    }

    /// Decodes the next packet of `buf`; the first one must be a CONNECT unless the version was
    /// given, and fixes the version. `Ok(None)`: more bytes needed ([`Codec::missing`] says how
    /// many).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        match self.version {
            Some(v) => decode(buf, v, self.max_packet_size),
            None => {
                let connect = decode_connect(buf, self.max_packet_size)?;
                Ok(connect.map(|c| {
                    self.version = Some(c.protocol_version);
                    Packet::Connect(Box::new(c))
                }))
            }
        }
    }

    /// How many more bytes `buf` needs before [`Codec::decode`] can return a packet (0 if one
    /// is complete).
    pub fn missing(&self, buf: &[u8]) -> Result<usize, DecodeError> {
        Ok(match check(buf, self.max_packet_size)? {
            Status::Complete { .. } => 0,
            Status::Incomplete { needed } => needed,
        })
    }

    /// Encodes `packet` for the connection's version (a CONNECT uses, and fixes, its own).
    pub fn encode(&mut self, packet: &Packet, buf: &mut BytesMut) -> Result<(), EncodeError> {
        if let Packet::Connect(c) = packet {
            self.version = Some(c.protocol_version);
        }
        let version = self.version.ok_or(EncodeError::VersionUnknown)?;
        packet.encode(version, buf)
    }
}
