//! DISCONNECT (§3.14) and AUTH (§3.15): a Reason Code and properties in 5.0, both omitted on the
//! wire when Success and empty.

use bytes::{BufMut, BytesMut};

use crate::error::DecodeError;
use crate::properties::{AuthProperties, DisconnectProperties, section_len};
use crate::protocol::{PacketType, ProtocolVersion};
use crate::reason::{ReasonCode, ReasonCodeContext};
use crate::wire::Reader;

/// DISCONNECT: the last packet of a connection, from either side (server side in 5.0 only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disconnect {
    /// Disconnect Reason Code (5.0); Normal disconnection in 3.1/3.1.1.
    pub reason_code: ReasonCode,
    /// Properties (5.0 only).
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with this reason and no properties.
    pub fn new(reason_code: ReasonCode) -> Self {
        Self {
            reason_code,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(mut r: Reader, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let mut d = Self::default();
        if !version.is_v5() {
            if r.remaining() != 0 {
                return Err(DecodeError::InvalidRemainingLength {
                    packet_type: PacketType::Disconnect,
                    len: r.remaining(),
                });
            }
            return Ok(d);
        }
        if r.remaining() > 0 {
            let code = r.u8()?;
            d.reason_code = ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ReasonCodeContext::Disconnect))
                .ok_or(DecodeError::InvalidReasonCode {
                    packet: PacketType::Disconnect,
                    code,
                })?;
            if r.remaining() > 0 {
                d.properties = DisconnectProperties::decode(&mut r)?;
            }
        }
        r.finish()?;
        Ok(d)
    }

    pub(crate) fn body_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() {
            return 0;
        }
        let pl = self.properties.len();
        if pl > 0 {
            1 + section_len(pl)
        } else if self.reason_code != ReasonCode::Success {
            1
        } else {
            0
        }
    }

    pub(crate) fn write_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        if !version.is_v5() {
            return;
        }
        let pl = self.properties.len();
        if pl > 0 {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.write(buf, pl);
        } else if self.reason_code != ReasonCode::Success {
            buf.put_u8(self.reason_code.as_u8());
        }
    }
}

/// AUTH (5.0 only): extended authentication exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason_code: ReasonCode,
    /// Properties (Authentication Method is required by the exchange, not checked here).
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(mut r: Reader) -> Result<Self, DecodeError> {
        let mut a = Self::default();
        if r.remaining() > 0 {
            let code = r.u8()?;
            a.reason_code = ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ReasonCodeContext::Auth))
                .ok_or(DecodeError::InvalidReasonCode {
                    packet: PacketType::Auth,
                    code,
                })?;
            a.properties = AuthProperties::decode(&mut r)?;
        }
        r.finish()?;
        Ok(a)
    }

    pub(crate) fn body_len(&self) -> usize {
        let pl = self.properties.len();
        if pl == 0 && self.reason_code == ReasonCode::Success {
            0
        } else {
            1 + section_len(pl)
        }
    }

    pub(crate) fn write_body(&self, buf: &mut BytesMut) {
        let pl = self.properties.len();
        if pl == 0 && self.reason_code == ReasonCode::Success {
            return;
        }
        buf.put_u8(self.reason_code.as_u8());
        self.properties.write(buf, pl);
    }
}
