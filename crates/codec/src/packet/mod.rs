//! [`Packet`]: one variant per MQTT control packet, and its encoder.
//!
//! Encoding first checks what the types cannot (QoS/packet identifier agreement, binary fields
//! up to 65,535 bytes, the 268,435,455-byte remaining length limit), then computes the exact
//! length, reserves it once and writes.

mod ack;
mod connack;
mod connect;
mod disconnect;
mod publish;
mod subscribe;
mod unsubscribe;

pub use ack::{PubAck, PubComp, PubRec, PubRel};
pub use connack::ConnAck;
pub use connect::{Connect, Will};
pub use disconnect::{Auth, Disconnect};
pub use publish::Publish;
pub use subscribe::{RetainHandling, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions};
pub use unsubscribe::{UnsubAck, Unsubscribe};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::protocol::{PacketType, ProtocolVersion};
use crate::string::MAX_STRING_LEN;
use crate::wire::{Reader, VARINT_MAX, varint_len, write_varint};

/// An MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (boxed: large and rare).
    Connect(Box<Connect>),
    /// CONNACK (boxed: large and rare).
    ConnAck(Box<ConnAck>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(PubAck),
    /// PUBREC.
    PubRec(PubRec),
    /// PUBREL.
    PubRel(PubRel),
    /// PUBCOMP.
    PubComp(PubComp),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect(Disconnect),
    /// AUTH (5.0 only).
    Auth(Auth),
}

impl Packet {
    /// The control packet type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::Connect(_) => PacketType::Connect,
            Self::ConnAck(_) => PacketType::ConnAck,
            Self::Publish(_) => PacketType::Publish,
            Self::PubAck(_) => PacketType::PubAck,
            Self::PubRec(_) => PacketType::PubRec,
            Self::PubRel(_) => PacketType::PubRel,
            Self::PubComp(_) => PacketType::PubComp,
            Self::Subscribe(_) => PacketType::Subscribe,
            Self::SubAck(_) => PacketType::SubAck,
            Self::Unsubscribe(_) => PacketType::Unsubscribe,
            Self::UnsubAck(_) => PacketType::UnsubAck,
            Self::PingReq => PacketType::PingReq,
            Self::PingResp => PacketType::PingResp,
            Self::Disconnect(_) => PacketType::Disconnect,
            Self::Auth(_) => PacketType::Auth,
        }
    }

    /// Decodes the variable header and payload of one packet, `body` being exactly the
    /// `remaining length` bytes after a fixed header whose first byte is `first`.
    #[inline(never)]
    pub(crate) fn decode_body(
        first: u8,
        body: Bytes,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let ptype = header_type(first, version)?;
        if ptype == PacketType::Publish {
            return Publish::decode_some(first & 0x0F, body, 0, version)?
                .ok_or(DecodeError::UnexpectedEof);
        }
        let r = Reader::new(body);
        Ok(match ptype {
            PacketType::Publish => unreachable!("handled above"),
            PacketType::PubAck => Self::PubAck(PubAck::decode(r, version)?),
            PacketType::PubRec => Self::PubRec(PubRec::decode(r, version)?),
            PacketType::PubRel => Self::PubRel(PubRel::decode(r, version)?),
            PacketType::PubComp => Self::PubComp(PubComp::decode(r, version)?),
            PacketType::Connect => Self::Connect(Box::new(Connect::decode(r)?)),
            PacketType::ConnAck => Self::ConnAck(Box::new(ConnAck::decode(r, version)?)),
            PacketType::Subscribe => Self::Subscribe(Subscribe::decode(r, version)?),
            PacketType::SubAck => Self::SubAck(SubAck::decode(r, version)?),
            PacketType::Unsubscribe => Self::Unsubscribe(Unsubscribe::decode(r, version)?),
            PacketType::UnsubAck => Self::UnsubAck(UnsubAck::decode(r, version)?),
            PacketType::PingReq | PacketType::PingResp => {
                if r.remaining() != 0 {
                    return Err(DecodeError::InvalidRemainingLength {
                        packet_type: ptype,
                        len: r.remaining(),
                    });
                }
                if ptype == PacketType::PingReq {
                    Self::PingReq
                } else {
                    Self::PingResp
                }
            }
            PacketType::Disconnect => Self::Disconnect(Disconnect::decode(r, version)?),
            PacketType::Auth => Self::Auth(Auth::decode(r)?),
        })
    }

    /// Checks what the types do not guarantee; returns the remaining length and, for PUBLISH,
    /// the property length (computed once, reused by the writer).
    #[inline]
    fn measure(&self, version: ProtocolVersion) -> Result<(usize, usize), EncodeError> {
        let v5 = version.is_v5();
        let mut props = 0;
        let body = match self {
            Self::Publish(p) => {
                p.check(version)?;
                if v5 {
                    props = p.properties.len();
                }
                p.body_len(version, props)
            }
            Self::Connect(c) => {
                c.check()?;
                c.body_len()
            }
            Self::ConnAck(c) => {
                check_binary(if v5 { c.properties.max_binary() } else { 0 })?;
                c.body_len(version)
            }
            Self::PubAck(a) => a.body_len(version),
            Self::PubRec(a) => a.body_len(version),
            Self::PubRel(a) => a.body_len(version),
            Self::PubComp(a) => a.body_len(version),
            Self::Subscribe(s) => {
                s.check()?;
                s.body_len(version)
            }
            Self::SubAck(s) => {
                s.check()?;
                s.body_len(version)
            }
            Self::Unsubscribe(u) => {
                u.check()?;
                u.body_len(version)
            }
            Self::UnsubAck(u) => {
                u.check(version)?;
                u.body_len(version)
            }
            Self::PingReq | Self::PingResp => 0,
            Self::Disconnect(d) => d.body_len(version),
            Self::Auth(a) => {
                if !v5 {
                    return Err(EncodeError::NotInVersion("AUTH"));
                }
                check_binary(a.properties.max_binary())?;
                a.body_len()
            }
        };
        if body > VARINT_MAX as usize {
            return Err(EncodeError::PacketTooLarge(body));
        }
        Ok((body, props))
    }

    /// The exact number of bytes [`Packet::encode`] writes for `version` (fixed header
    /// included), or why it cannot be encoded.
    pub fn encoded_len(&self, version: ProtocolVersion) -> Result<usize, EncodeError> {
        let (body, _) = self.measure(version)?;
        Ok(1 + varint_len(body) + body)
    }

    /// Appends the packet, encoded for `version`, to `buf` (reserving the exact length once).
    /// A CONNECT is always encoded in its own `protocol_version`. Properties are dropped for
    /// 3.1/3.1.1. On error nothing is written.
    #[inline]
    pub fn encode(&self, version: ProtocolVersion, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Self::Publish(p) => p.encode_packet(version, buf),
            _ => self.encode_other(version, buf),
        }
    }

    /// [`Packet::encode`] for everything but PUBLISH, out of line so that the PUBLISH path
    /// does not pay this function's stack frame.
    #[inline(never)]
    fn encode_other(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let version = match self {
            Self::Connect(c) => c.protocol_version,
            _ => version,
        };
        let (body, props) = self.measure(version)?;
        let ptype = self.packet_type();
        let flags = match self {
            Self::Publish(p) => p.flags(),
            _ => ptype.fixed_flags(),
        };
        buf.reserve(1 + varint_len(body) + body);
        buf.put_u8(((ptype as u8) << 4) | flags);
        write_varint(buf, body);
        #[cfg(debug_assertions)]
        let start = buf.len();
        match self {
            Self::Publish(p) => p.write_body(version, props, buf),
            Self::Connect(c) => c.write_body(buf),
            Self::ConnAck(c) => c.write_body(version, buf),
            Self::PubAck(a) => a.write_body(version, buf),
            Self::PubRec(a) => a.write_body(version, buf),
            Self::PubRel(a) => a.write_body(version, buf),
            Self::PubComp(a) => a.write_body(version, buf),
            Self::Subscribe(s) => s.write_body(version, buf),
            Self::SubAck(s) => s.write_body(version, buf),
            Self::Unsubscribe(u) => u.write_body(version, buf),
            Self::UnsubAck(u) => u.write_body(version, buf),
            Self::PingReq | Self::PingResp => {}
            Self::Disconnect(d) => d.write_body(version, buf),
            Self::Auth(a) => a.write_body(buf),
        }
        #[cfg(debug_assertions)]
        debug_assert_eq!(
            buf.len() - start,
            body,
            "encoded length mismatch for {ptype}"
        );
        Ok(())
    }

    /// Encodes into a new buffer of exactly the right size.
    pub fn to_bytes(&self, version: ProtocolVersion) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::new();
        self.encode(version, &mut buf)?;
        Ok(buf.freeze())
    }
}

fn check_binary(len: usize) -> Result<(), EncodeError> {
    if len > MAX_STRING_LEN {
        Err(EncodeError::BinaryTooLong(len))
    } else {
        Ok(())
    }
}

/// Validates the first byte of a fixed header: a known type for this version and its flags.
#[inline]
pub(crate) fn header_type(first: u8, version: ProtocolVersion) -> Result<PacketType, DecodeError> {
    let t = first >> 4;
    let ptype = match PacketType::from_u8(t) {
        Some(PacketType::Auth) if !version.is_v5() => None,
        other => other,
    }
    .ok_or(DecodeError::InvalidPacketType(t))?;
    let flags = first & 0x0F;
    if ptype != PacketType::Publish && flags != ptype.fixed_flags() {
        return Err(DecodeError::InvalidHeaderFlags {
            packet_type: ptype,
            flags,
        });
    }
    Ok(ptype)
}

macro_rules! from_packet {
    ($($name:ident),*) => {$(
        impl From<$name> for Packet {
            fn from(p: $name) -> Self {
                Packet::$name(p)
            }
        }
    )*};
}
from_packet!(
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth
);

impl From<Connect> for Packet {
    fn from(p: Connect) -> Self {
        Packet::Connect(Box::new(p))
    }
}

impl From<ConnAck> for Packet {
    fn from(p: ConnAck) -> Self {
        Packet::ConnAck(Box::new(p))
    }
}
