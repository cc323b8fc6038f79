//! CONNACK (§3.2).

use bytes::{BufMut, BytesMut};

use crate::error::DecodeError;
use crate::properties::{ConnAckProperties, section_len};
use crate::protocol::{PacketType, ProtocolVersion};
use crate::reason::{ReasonCode, ReasonCodeContext};
use crate::wire::Reader;

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// Connect Reason Code (5.0) or the 5.0 code matching the 3.1.1 return code; encoding to
    /// 3.1/3.1.1 maps it with [`ReasonCode::to_v3_connack`].
    pub reason_code: ReasonCode,
    /// CONNACK properties (5.0 only).
    pub properties: ConnAckProperties,
}

impl ConnAck {
    /// A CONNACK with this code, no session present and no properties.
    pub fn new(reason_code: ReasonCode) -> Self {
        Self {
            session_present: false,
            reason_code,
            properties: ConnAckProperties::default(),
        }
    }

    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let flags = r.u8()?;
        if flags & !0x01 != 0 {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        let code = r.u8()?;
        let (reason_code, properties) = if version.is_v5() {
            let rc = ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ReasonCodeContext::ConnAck))
                .ok_or(DecodeError::InvalidReasonCode {
                    packet: PacketType::ConnAck,
                    code,
                })?;
            (rc, ConnAckProperties::decode(&mut r)?)
        } else {
            let rc =
                ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReturnCode(code))?;
            (rc, ConnAckProperties::default())
        };
        r.finish()?;
        Ok(Self {
            session_present: flags & 0x01 != 0,
            reason_code,
            properties,
        })
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + section_len(self.properties.len())
        } else {
            2
        }
    }

    pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u8(u8::from(self.session_present));
        if version.is_v5() {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.write(buf, self.properties.len());
        } else {
            buf.put_u8(self.reason_code.to_v3_connack());
        }
    }
}
