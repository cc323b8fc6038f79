//! SUBSCRIBE (§3.8) and SUBACK (§3.9).

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::properties::{AckProperties, SubscribeProperties, section_len};
use crate::protocol::{PacketId, PacketType, ProtocolVersion, QoS};
use crate::reason::{ReasonCode, ReasonCodeContext};
use crate::topic::TopicFilter;
use crate::wire::{Reader, VARINT_MAX, write_binary};

/// Retain Handling subscription option (5.0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendAtSubscribeIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

/// Subscription Options (§3.8.3.1). In 3.1/3.1.1 only `qos` exists: the other options are
/// ignored when encoding and default when decoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local: do not forward this client's own messages back to it.
    pub no_local: bool,
    /// Retain As Published: keep the RETAIN flag when forwarding.
    pub retain_as_published: bool,
    /// Retain Handling.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with this QoS and every other option at its default.
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            ..Self::default()
        }
    }

    fn to_byte(self, version: ProtocolVersion) -> u8 {
        let mut b = self.qos.as_u8();
        if version.is_v5() {
            b |= u8::from(self.no_local) << 2;
            b |= u8::from(self.retain_as_published) << 3;
            b |= (self.retain_handling as u8) << 4;
        }
        b
    }

    fn from_byte(b: u8, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let reserved = if version.is_v5() { 0xC0 } else { 0xFC };
        if b & reserved != 0 {
            return Err(DecodeError::InvalidSubscriptionOptions(b));
        }
        let qos = QoS::from_u8(b & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let retain_handling = match (b >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtSubscribeIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::InvalidRetainHandling),
        };
        Ok(Self {
            qos,
            no_local: b & 0x04 != 0,
            retain_as_published: b & 0x08 != 0,
            retain_handling,
        })
    }
}

/// One Topic Filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscribeFilter {
    /// The filter.
    pub filter: TopicFilter,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE: one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier.
    pub packet_id: PacketId,
    /// The filters, in order; never empty on the wire.
    pub filters: Vec<SubscribeFilter>,
    /// SUBSCRIBE properties (5.0 only).
    pub properties: SubscribeProperties,
}

impl Subscribe {
    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            SubscribeProperties::decode(&mut r)?
        } else {
            SubscribeProperties::default()
        };
        let mut filters = Vec::with_capacity(r.count_entries(1));
        while r.remaining() > 0 {
            let filter =
                TopicFilter::from_string(r.string()?).map_err(DecodeError::InvalidTopicFilter)?;
            let options = SubscriptionOptions::from_byte(r.u8()?, version)?;
            if options.no_local && filter.is_shared() {
                return Err(DecodeError::NoLocalOnSharedSubscription);
            }
            filters.push(SubscribeFilter { filter, options });
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
        }
        Ok(Self {
            packet_id,
            filters,
            properties,
        })
    }

    pub(crate) fn check(&self) -> Result<(), EncodeError> {
        if self.filters.is_empty() {
            return Err(EncodeError::Empty("SUBSCRIBE"));
        }
        if let Some(id) = self.properties.subscription_identifier
            && (id == 0 || id > VARINT_MAX)
        {
            return Err(EncodeError::InvalidSubscriptionId(id));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let mut len = 2 + self
            .filters
            .iter()
            .map(|f| 3 + f.filter.len())
            .sum::<usize>();
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
            write_binary(buf, f.filter.as_bytes());
            buf.put_u8(f.options.to_byte(version));
        }
    }
}

/// SUBACK: one Reason Code per filter of the SUBSCRIBE, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet Identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// Granted QoS (`Success`, `GrantedQoS1`, `GrantedQoS2`) or a failure per filter. In
    /// 3.1.1 every failure is sent as 0x80 and decoded as `UnspecifiedError`.
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (5.0 only).
    pub properties: AckProperties,
}

impl SubAck {
    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_id = PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)?;
        let properties = if version.is_v5() {
            AckProperties::decode(&mut r, PacketType::SubAck)?
        } else {
            AckProperties::default()
        };
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while r.remaining() > 0 {
            let code = r.u8()?;
            let rc = if version.is_v5() {
                ReasonCode::from_u8(code)
                    .filter(|c| c.allowed_in(ReasonCodeContext::SubAck))
                    .ok_or(DecodeError::InvalidReasonCode {
                        packet: PacketType::SubAck,
                        code,
                    })?
            } else {
                ReasonCode::from_v3_suback(code).ok_or(DecodeError::InvalidReturnCode(code))?
            };
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::InvalidRemainingLength {
                packet_type: PacketType::SubAck,
                len: 2,
            });
        }
        Ok(Self {
            packet_id,
            reason_codes,
            properties,
        })
    }

    pub(crate) fn check(&self) -> Result<(), EncodeError> {
        if self.reason_codes.is_empty() {
            return Err(EncodeError::Empty("SUBACK"));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        let mut len = 2 + self.reason_codes.len();
        if version.is_v5() {
            len += section_len(self.properties.len());
        }
        len
    }

    pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.write(buf, self.properties.len());
            for rc in &self.reason_codes {
                buf.put_u8(rc.as_u8());
            }
        } else {
            for rc in &self.reason_codes {
                buf.put_u8(rc.to_v3_suback());
            }
        }
    }
}
