//! PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4 to §3.7): a Packet Identifier, and in 5.0 a Reason
//! Code and properties, both omitted on the wire when they are Success and empty.

use bytes::{BufMut, BytesMut};

use crate::error::DecodeError;
use crate::properties::{AckProperties, section_len};
use crate::protocol::{PacketId, PacketType, ProtocolVersion};
use crate::reason::{ReasonCode, ReasonCodeContext};
use crate::wire::Reader;

macro_rules! ack_packet {
    ($(#[$doc:meta])* $name:ident, $ptype:expr, $ctx:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            /// Packet Identifier of the packet acknowledged.
            pub packet_id: PacketId,
            /// Reason Code (5.0); always Success in 3.1/3.1.1.
            pub reason_code: ReasonCode,
            /// Properties (5.0 only).
            pub properties: AckProperties,
        }

        impl $name {
            /// A successful acknowledgement without properties.
            pub fn new(packet_id: PacketId) -> Self {
                Self {
                    packet_id,
                    reason_code: ReasonCode::Success,
                    properties: AckProperties::default(),
                }
            }

            pub(crate) fn decode(r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
                let (packet_id, reason_code, properties) = decode_ack(r, version, $ptype, $ctx)?;
                Ok(Self { packet_id, reason_code, properties })
            }

            pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
                ack_len(version, self.reason_code, &self.properties)
            }

            pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
                write_ack(version, self.packet_id, self.reason_code, &self.properties, buf)
            }
        }
    };
}

ack_packet!(
    /// PUBACK: acknowledges a QoS 1 PUBLISH.
    PubAck, PacketType::PubAck, ReasonCodeContext::PubAckOrPubRec
);
ack_packet!(
    /// PUBREC: first acknowledgement of a QoS 2 PUBLISH.
    PubRec, PacketType::PubRec, ReasonCodeContext::PubAckOrPubRec
);
ack_packet!(
    /// PUBREL: releases a QoS 2 message.
    PubRel, PacketType::PubRel, ReasonCodeContext::PubRelOrPubComp
);
ack_packet!(
    /// PUBCOMP: completes a QoS 2 exchange.
    PubComp, PacketType::PubComp, ReasonCodeContext::PubRelOrPubComp
);

fn decode_ack(
    mut r: Reader,
    version: ProtocolVersion,
    packet: PacketType,
    ctx: ReasonCodeContext,
) -> Result<(PacketId, ReasonCode, AckProperties), DecodeError> {
    if !version.is_v5() && r.remaining() != 2 {
        return Err(DecodeError::InvalidRemainingLength {
            packet_type: packet,
            len: r.remaining(),
        });
    }
    let id = PacketId::new(r.u16()?).ok_or(DecodeError::ZeroPacketId)?;
    let mut reason = ReasonCode::Success;
    let mut props = AckProperties::default();
    if r.remaining() > 0 {
        let code = r.u8()?;
        reason = ReasonCode::from_u8(code)
            .filter(|c| c.allowed_in(ctx))
            .ok_or(DecodeError::InvalidReasonCode { packet, code })?;
        if r.remaining() > 0 {
            props = AckProperties::decode(&mut r, packet)?;
        }
    }
    r.finish()?;
    Ok((id, reason, props))
}

fn ack_len(version: ProtocolVersion, reason: ReasonCode, props: &AckProperties) -> usize {
    if !version.is_v5() {
        return 2;
    }
    let pl = props.len();
    if pl > 0 {
        3 + section_len(pl)
    } else if reason != ReasonCode::Success {
        3
    } else {
        2
    }
}

fn write_ack(
    version: ProtocolVersion,
    id: PacketId,
    reason: ReasonCode,
    props: &AckProperties,
    buf: &mut BytesMut,
) {
    buf.put_u16(id.get());
    if !version.is_v5() {
        return;
    }
    let pl = props.len();
    if pl > 0 {
        buf.put_u8(reason.as_u8());
        props.write(buf, pl);
    } else if reason != ReasonCode::Success {
        buf.put_u8(reason.as_u8());
    }
}
