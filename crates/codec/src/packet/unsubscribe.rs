//! UNSUBSCRIBE (§3.10) and UNSUBACK (§3.11).

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::properties::{AckProperties, UnsubscribeProperties, section_len};
use crate::protocol::{PacketId, PacketType, ProtocolVersion};
use crate::reason::{ReasonCode, ReasonCodeContext};
use crate::topic::TopicFilter;
use crate::wire::{Reader, write_binary};

/// UNSUBSCRIBE: removes subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier.
    pub packet_id: PacketId,
    /// The filters; never empty on the wire.
    pub filters: Vec<TopicFilter>,
    /// UNSUBSCRIBE properties (5.0 only).
    pub properties: UnsubscribeProperties,
}

impl Unsubscribe {
    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            UnsubscribeProperties::decode(&mut r)?
        } else {
            UnsubscribeProperties::default()
        };
        let mut filters = Vec::with_capacity(r.count_entries(0));
        while r.remaining() > 0 {
            filters.push(
                TopicFilter::from_string(r.string()?).map_err(DecodeError::InvalidTopicFilter)?,
            );
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
        }
        Ok(Self {
            packet_id,
            filters,
            properties,
        })
    }

    pub(crate) fn check(&self) -> Result<(), EncodeError> {
        if self.filters.is_empty() {
            return Err(EncodeError::Empty("UNSUBSCRIBE"));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let mut len = 2 + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
        if version.is_v5() {
            len += section_len(self.properties.len());
        }
        len
    }

    pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.write(buf, self.properties.len());
        }
        for f in &self.filters {
            write_binary(buf, f.as_bytes());
        }
    }
}

/// UNSUBACK: acknowledges an UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet Identifier of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// One Reason Code per filter (5.0); 3.1/3.1.1 have none: empty when decoded, ignored when
    /// encoded.
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (5.0 only).
    pub properties: AckProperties,
}

impl UnsubAck {
    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        if !version.is_v5() && r.remaining() != 2 {
            return Err(DecodeError::InvalidRemainingLength {
                packet_type: PacketType::UnsubAck,
                len: r.remaining(),
            });
        }
        let packet_id = PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)?;
        let mut reason_codes = Vec::new();
        let mut properties = AckProperties::default();
        if version.is_v5() {
            properties = AckProperties::decode(&mut r, PacketType::UnsubAck)?;
            reason_codes.reserve(r.remaining());
            while r.remaining() > 0 {
                let code = r.u8()?;
                reason_codes.push(
                    ReasonCode::from_u8(code)
                        .filter(|c| c.allowed_in(ReasonCodeContext::UnsubAck))
                        .ok_or(DecodeError::InvalidReasonCode {
                            packet: PacketType::UnsubAck,
                            code,
                        })?,
                );
            }
            if reason_codes.is_empty() {
                return Err(DecodeError::InvalidRemainingLength {
                    packet_type: PacketType::UnsubAck,
                    len: 2,
                });
            }
        }
        Ok(Self {
            packet_id,
            reason_codes,
            properties,
        })
    }

    pub(crate) fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        if version.is_v5() && self.reason_codes.is_empty() {
            return Err(EncodeError::Empty("UNSUBACK"));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + section_len(self.properties.len()) + self.reason_codes.len()
        } else {
            2
        }
    }

    pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.write(buf, self.properties.len());
            for rc in &self.reason_codes {
                buf.put_u8(rc.as_u8());
            }
        }
    }
}
