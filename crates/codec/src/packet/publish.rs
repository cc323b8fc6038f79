//! PUBLISH (§3.3): the hot path. Decoding validates the topic once and slices topic and payload
//! out of the receive buffer; encoding computes the exact length and writes once.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::Packet;
use crate::properties::{PublishProperties, section_len};
use crate::protocol::{PacketId, ProtocolVersion, QoS};
use crate::string::{MqttString, Scan, check_str_bytes, scan};
use crate::topic::{Topic, TopicError};
use crate::wire::{Cursor, Reader, VARINT_MAX, write_binary};

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP: a re-delivery (never set with QoS 0).
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Topic Name; empty only in 5.0 with a Topic Alias property.
    pub topic: Topic,
    /// Packet Identifier: `Some` exactly when `qos` is 1 or 2.
    pub packet_id: Option<PacketId>,
    /// PUBLISH properties (5.0 only).
    pub properties: PublishProperties,
    /// Application payload (a slice of the receive buffer when decoded).
    pub payload: Bytes,
}

impl Publish {
    /// A PUBLISH without DUP, RETAIN or properties. `packet_id` must be `Some` for QoS 1 and 2.
    pub fn new(topic: Topic, qos: QoS, packet_id: Option<PacketId>, payload: Bytes) -> Self {
        Self {
            dup: false,
            qos,
            retain: false,
            topic,
            packet_id,
            properties: PublishProperties::default(),
            payload,
        }
    }

    /// Decodes a PUBLISH from `frame`, the whole packet, whose variable header starts at
    /// `header`, building the packet directly in the caller's `Result<Option<Packet>>` so the
    /// 250-byte value is not copied from one wrapper to the next on the hot path (always `Some`
    /// on success).
    ///
    /// The header is read from the raw bytes; the only operations on the `Bytes` handle are one
    /// slice for the topic and one advance for the payload (in 3.1/3.1.1).
    #[inline(always)]
    pub(crate) fn decode_some(
        flags: u8,
        mut frame: Bytes,
        header: usize,
        version: ProtocolVersion,
    ) -> Result<Option<Packet>, DecodeError> {
        let dup = flags & 0b1000 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQoS)?;
        let retain = flags & 0b0001 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupWithQoS0);
        }
        let v5 = version.is_v5();
        // The layout first, from the raw bytes.
        let raw: &[u8] = &frame;
        let topic_len = match raw.get(header..header + 2) {
            Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
            None => return Err(DecodeError::UnexpectedEof),
        };
        let topic_at = header + 2;
        let topic_end = topic_at + topic_len;
        if topic_end > raw.len() {
            return Err(DecodeError::UnexpectedEof);
        }
        let pos = if qos == QoS::AtMostOnce {
            topic_end
        } else {
            topic_end + 2
        };
        let Some(id_bytes) = raw.get(topic_end..pos) else {
            // Truncated in the packet identifier: a bad topic is still the error to report.
            let name = &raw[topic_at..topic_end];
            check_str_bytes(name)?;
            check_topic(&scan(name)?, name.is_empty(), v5)?;
            return Err(DecodeError::UnexpectedEof);
        };
        // Two bytes with QoS 1 and 2, none with QoS 0 (then unused).
        let id = match id_bytes {
            [hi, lo] => u16::from_be_bytes([*hi, *lo]),
            _ => 0,
        };
        // Then the handles, and only then the topic check: the check's work separates the
        // (out-of-line) advance's stores from the copy of the handle into the result, which
        // otherwise stalls on store forwarding.
        let topic = frame.slice(topic_at..topic_end);
        if !v5 {
            frame.advance(pos);
        }
        // One word-at-a-time pass (U+0000, wildcards), the standard UTF-8 check, then the rules.
        let scanned = scan(&topic)?;
        let topic = MqttString::from_scanned(topic, &scanned)?;
        check_topic(&scanned, topic.is_empty(), v5)?;
        let topic = Topic::from_checked(topic);
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(PacketId::new(id).ok_or(DecodeError::ZeroPacketId)?)
        };
        if v5 {
            return Self::decode_v5_rest(dup, qos, retain, topic, packet_id, frame, pos);
        }
        Ok(Some(Packet::Publish(Self {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties: PublishProperties::default(),
            payload: frame,
        })))
    }

    /// The 5.0 rest of [`Publish::decode_some`]: properties from `pos`, then the payload. Out
    /// of line, so that the 3.1.1 path keeps a small stack frame.
    #[inline(never)]
    fn decode_v5_rest(
        dup: bool,
        qos: QoS,
        retain: bool,
        topic: Topic,
        packet_id: Option<PacketId>,
        frame: Bytes,
        pos: usize,
    ) -> Result<Option<Packet>, DecodeError> {
        let mut r = Reader::at(frame, pos);
        let properties = PublishProperties::decode(&mut r)?;
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicWithoutAlias);
        }
        let payload = r.rest();
        Ok(Some(Packet::Publish(Self {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload,
        })))
    }

    #[inline]
    pub(crate) fn flags(&self) -> u8 {
        (u8::from(self.dup) << 3) | (self.qos.as_u8() << 1) | u8::from(self.retain)
    }

    #[inline]
    pub(crate) fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        if self.packet_id.is_some() != (self.qos != QoS::AtMostOnce) {
            return Err(EncodeError::PacketIdMismatch);
        }
        if version.is_v5() {
            if self.topic.is_empty() && self.properties.topic_alias.is_none() {
                return Err(EncodeError::NotInVersion("empty topic without topic alias"));
            }
            let b = self.properties.max_binary();
            if b > crate::string::MAX_STRING_LEN {
                return Err(EncodeError::BinaryTooLong(b));
            }
            if let Some(id) = self.properties.bad_subscription_id() {
                return Err(EncodeError::InvalidSubscriptionId(id));
            }
        } else if self.topic.is_empty() {
            return Err(EncodeError::NotInVersion("empty topic name"));
        }
        Ok(())
    }

    /// The whole-packet encoder for the hot path: checks, one exact reservation, then the
    /// fields in order.
    #[inline]
    pub(crate) fn encode_packet(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        self.encode_parts(version, buf, true)
    }

    /// Encodes everything but the payload: fixed header, topic, packet identifier and
    /// properties. Sending these bytes followed by [`Publish::payload`] (e.g. with
    /// `bytes::Buf::chain` or a vectored write) sends the whole packet without copying the
    /// payload, which is what a broker fanning one message out to many subscribers wants.
    pub fn encode_head(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        self.encode_parts(version, buf, false)
    }

    /// Shared by both encoders; always inlined, so each gets its own copy with `with_payload`
    /// fixed (and the hot whole-packet path stays inlined into its caller).
    #[inline(always)]
    fn encode_parts(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
        with_payload: bool,
    ) -> Result<(), EncodeError> {
        self.check(version)?;
        let props = if version.is_v5() {
            self.properties.len()
        } else {
            0
        };
        let body = self.body_len(version, props);
        if body > VARINT_MAX as usize {
            return Err(EncodeError::PacketTooLarge(body));
        }
        let total = 1 + crate::wire::varint_len(body) + body;
        if with_payload {
            // One reservation for the whole packet: the head, then the payload appended with
            // one copy.
            buf.reserve(total);
        }
        let mut c = Cursor::append(buf, total - self.payload.len());
        c.u8((3 << 4) | self.flags());
        c.varint(body);
        // Topics are at most 65,535 bytes (an `MqttString` invariant).
        c.binary(self.topic.as_bytes());
        if let Some(id) = self.packet_id {
            c.u16(id.get());
        }
        if version.is_v5() {
            self.properties.write_to(&mut c, props);
        }
        c.finish();
        if with_payload {
            // The payload with one copy, into the reservation made above.
            buf.put_slice(&self.payload);
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn body_len(&self, version: ProtocolVersion, props_len: usize) -> usize {
        let mut len = 2 + self.topic.len() + self.payload.len();
        if self.packet_id.is_some() {
            len += 2;
        }
        if version.is_v5() {
            len += section_len(props_len);
        }
        len
    }

    #[inline]
    pub(crate) fn write_body(
        &self,
        version: ProtocolVersion,
        props_len: usize,
        buf: &mut BytesMut,
    ) {
        write_binary(buf, self.topic.as_bytes());
        if let Some(id) = self.packet_id {
            buf.put_u16(id.get());
        }
        if version.is_v5() {
            self.properties.write(buf, props_len);
        }
        buf.put_slice(&self.payload);
    }
}

/// The Topic Name rules once the name is known to be an MQTT string (`scanned` describes it):
/// no wildcards, empty only in 5.0 (where a Topic Alias must then be present, checked with the
/// properties).
#[inline(always)]
fn check_topic(scanned: &Scan, empty: bool, v5: bool) -> Result<(), DecodeError> {
    if scanned.has_wildcard {
        return Err(DecodeError::InvalidTopicName(
            TopicError::WildcardInTopicName,
        ));
    }
    if empty && !v5 {
        return Err(DecodeError::InvalidTopicName(TopicError::Empty));
    }
    Ok(())
}
