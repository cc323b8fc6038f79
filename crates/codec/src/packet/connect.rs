//! CONNECT (§3.1).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::properties::{ConnectProperties, WillProperties, section_len};
use crate::protocol::{ProtocolVersion, QoS};
use crate::string::MqttString;
use crate::topic::Topic;
use crate::wire::{Reader, write_binary};

/// CONNECT: the first packet a client sends. It carries its own protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol revision, from the Protocol Name and Level.
    pub protocol_version: ProtocolVersion,
    /// Clean Start (5.0) / Clean Session (3.1, 3.1.1).
    pub clean_start: bool,
    /// Keep Alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client Identifier; may be empty (the server assigns one, or in 3.1.1 only with clean
    /// session). Its length and characters are the server's policy, not checked here.
    pub client_id: MqttString,
    /// The Will Message, if the Will Flag is set.
    pub will: Option<Will>,
    /// User Name.
    pub username: Option<MqttString>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (5.0 only).
    pub properties: ConnectProperties,
}

/// The Will Message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic.
    pub topic: Topic,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// Will Properties (5.0 only).
    pub properties: WillProperties,
}

impl Connect {
    /// A CONNECT with clean start, no will, no credentials and no properties.
    pub fn new(protocol_version: ProtocolVersion, client_id: MqttString, keep_alive: u16) -> Self {
        Self {
            protocol_version,
            clean_start: true,
            keep_alive,
            client_id,
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }
    }

    pub(crate) fn decode(mut r: Reader) -> Result<Self, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        let protocol_version = match (&name[..], level) {
            (b"MQTT", 4) => ProtocolVersion::V3_1_1,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQIsdp", 3) => ProtocolVersion::V3_1,
            (b"MQTT", _) | (b"MQIsdp", _) => {
                return Err(DecodeError::UnsupportedProtocolLevel { level });
            }
            _ => return Err(DecodeError::InvalidProtocolName),
        };
        let v5 = protocol_version.is_v5();
        let flags = r.u8()?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::ConnectReservedFlag);
        }
        let clean_start = flags & 0x02 != 0;
        let will_flag = flags & 0x04 != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let password_flag = flags & 0x40 != 0;
        let username_flag = flags & 0x80 != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(DecodeError::WillFlagsWithoutWill);
        }
        let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidQoS)?;
        if !v5 && password_flag && !username_flag {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties = if v5 {
            ConnectProperties::decode(&mut r)?
        } else {
            ConnectProperties::default()
        };
        let client_id = r.string()?;
        if !v5 && client_id.is_empty() && !clean_start {
            return Err(DecodeError::EmptyClientIdWithoutCleanSession);
        }
        let will = if will_flag {
            let properties = if v5 {
                WillProperties::decode(&mut r)?
            } else {
                WillProperties::default()
            };
            let topic = Topic::from_string(r.string()?).map_err(DecodeError::InvalidTopicName)?;
            let payload = r.binary()?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if username_flag {
            Some(r.string()?)
        } else {
            None
        };
        let password = if password_flag {
            Some(r.binary()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            protocol_version,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    pub(crate) fn check(&self) -> Result<(), EncodeError> {
        let v5 = self.protocol_version.is_v5();
        if !v5 && self.password.is_some() && self.username.is_none() {
            return Err(EncodeError::NotInVersion("password without user name"));
        }
        let mut longest = self.password.as_ref().map_or(0, Bytes::len);
        if v5 {
            longest = longest.max(self.properties.max_binary());
        }
        if let Some(w) = &self.will {
            longest = longest.max(w.payload.len());
            if v5 {
                longest = longest.max(w.properties.max_binary());
            }
        }
        if longest > crate::string::MAX_STRING_LEN {
            return Err(EncodeError::BinaryTooLong(longest));
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        let v = self.protocol_version;
        let mut len = 2 + v.protocol_name().len() + 1 + 1 + 2 + 2 + self.client_id.len();
        if v.is_v5() {
            len += section_len(self.properties.len());
        }
        if let Some(w) = &self.will {
            len += 2 + w.topic.len() + 2 + w.payload.len();
            if v.is_v5() {
                len += section_len(w.properties.len());
            }
        }
        len += self.username.as_ref().map_or(0, |u| 2 + u.len());
        len += self.password.as_ref().map_or(0, |p| 2 + p.len());
        len
    }

    pub(crate) fn write_body(&self, buf: &mut BytesMut) {
        let v = self.protocol_version;
        write_binary(buf, v.protocol_name().as_bytes());
        buf.put_u8(v.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos.as_u8() << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        buf.put_u8(flags);
        buf.put_u16(self.keep_alive);
        if v.is_v5() {
            self.properties.write(buf, self.properties.len());
        }
        write_binary(buf, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v.is_v5() {
                w.properties.write(buf, w.properties.len());
            }
            write_binary(buf, w.topic.as_bytes());
            write_binary(buf, &w.payload);
        }
        if let Some(u) = &self.username {
            write_binary(buf, u.as_bytes());
        }
        if let Some(p) = &self.password {
            write_binary(buf, p);
        }
    }
}
