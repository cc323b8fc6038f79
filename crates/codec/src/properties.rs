//! MQTT 5 properties (§2.2.2): one struct per packet kind, holding exactly the properties that
//! packet may carry, so the allow rules of §2.2.2.2 are enforced by the types when encoding and
//! checked property by property when decoding.
//!
//! Decoding rejects unknown identifiers (Malformed Packet), a property in a packet that may not
//! carry it, a second copy of a property that may appear once, and forbidden values (Protocol
//! Error). Strings and binary values are slices of the receive buffer. In MQTT 3.1/3.1.1 there
//! are no properties: encoding ignores them and decoding leaves them empty.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::protocol::{PacketType, QoS};
use crate::string::MqttString;
use crate::topic::Topic;
use crate::user_properties::{Collector, UserProperties};
use crate::wire::{Cursor, Reader, VARINT_MAX, varint_len, write_binary, write_varint};

/// A property identifier (§2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)] // The names are the specification's.
pub enum PropertyId {
    PayloadFormatIndicator = 0x01,
    MessageExpiryInterval = 0x02,
    ContentType = 0x03,
    ResponseTopic = 0x08,
    CorrelationData = 0x09,
    SubscriptionIdentifier = 0x0B,
    SessionExpiryInterval = 0x11,
    AssignedClientIdentifier = 0x12,
    ServerKeepAlive = 0x13,
    AuthenticationMethod = 0x15,
    AuthenticationData = 0x16,
    RequestProblemInformation = 0x17,
    WillDelayInterval = 0x18,
    RequestResponseInformation = 0x19,
    ResponseInformation = 0x1A,
    ServerReference = 0x1C,
    ReasonString = 0x1F,
    ReceiveMaximum = 0x21,
    TopicAliasMaximum = 0x22,
    TopicAlias = 0x23,
    MaximumQoS = 0x24,
    RetainAvailable = 0x25,
    UserProperty = 0x26,
    MaximumPacketSize = 0x27,
    WildcardSubscriptionAvailable = 0x28,
    SubscriptionIdentifierAvailable = 0x29,
    SharedSubscriptionAvailable = 0x2A,
}

impl PropertyId {
    /// The identifier for its byte, if MQTT 5 defines it.
    pub const fn from_u8(v: u8) -> Option<Self> {
        use PropertyId::*;
        Some(match v {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQoS,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }
}

/// The Payload Format Indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadFormat {
    /// 0: unspecified bytes.
    Unspecified,
    /// 1: UTF-8 encoded character data. The codec does not validate the payload (the
    /// specification lets the receiver choose, [MQTT-3.3.2-4]).
    Utf8,
}

/// Properties of CONNECT (§3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)] // One field per property, named as in the specification.
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    /// Never 0.
    pub receive_maximum: Option<u16>,
    /// Never 0.
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<bool>,
    pub request_problem_information: Option<bool>,
    pub authentication_method: Option<MqttString>,
    pub authentication_data: Option<Bytes>,
    pub user_properties: UserProperties,
}

/// Will Properties, in the CONNECT payload (§3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<PayloadFormat>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttString>,
    pub response_topic: Option<Topic>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
}

/// Properties of CONNACK (§3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    /// Never 0.
    pub receive_maximum: Option<u16>,
    /// Only QoS 0 or 1.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    /// Never 0.
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<MqttString>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<MqttString>,
    pub user_properties: UserProperties,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<MqttString>,
    pub server_reference: Option<MqttString>,
    pub authentication_method: Option<MqttString>,
    pub authentication_data: Option<Bytes>,
}

/// Properties of PUBLISH (§3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<PayloadFormat>,
    pub message_expiry_interval: Option<u32>,
    /// Never 0.
    pub topic_alias: Option<u16>,
    pub response_topic: Option<Topic>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
    /// Server to client only; each in 1..=268,435,455; may repeat.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<MqttString>,
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: a Reason String and
/// User Properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct AckProperties {
    pub reason_string: Option<MqttString>,
    pub user_properties: UserProperties,
}

/// Properties of SUBSCRIBE (§3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SubscribeProperties {
    /// In 1..=268,435,455.
    pub subscription_identifier: Option<u32>,
    pub user_properties: UserProperties,
}

/// Properties of UNSUBSCRIBE (§3.10.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct UnsubscribeProperties {
    pub user_properties: UserProperties,
}

/// Properties of DISCONNECT (§3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<MqttString>,
    pub user_properties: UserProperties,
    pub server_reference: Option<MqttString>,
}

/// Properties of AUTH (§3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct AuthProperties {
    pub authentication_method: Option<MqttString>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<MqttString>,
    pub user_properties: UserProperties,
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// One property value as read from the wire, typed by its identifier (§2.2.2.2).
enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(MqttString),
    Bin(Bytes),
}

/// Reads the Property Length and calls `f` for each property in order, except User
/// Properties, which are validated and collected into the returned [`UserProperties`].
#[inline]
fn read_each(
    r: &mut Reader,
    mut f: impl FnMut(PropertyId, Value) -> Result<(), DecodeError>,
) -> Result<UserProperties, DecodeError> {
    let len = r.varint()? as usize;
    if len == 0 {
        return Ok(UserProperties::new());
    }
    if len > r.remaining() {
        return Err(DecodeError::InvalidPropertyLength);
    }
    // Read the block in place (no handle of its own: no reference-count traffic).
    let end = r.limit(len);
    let p = &mut *r;
    let mut users = Collector::new(len);
    while p.remaining() > 0 {
        let start = p.position();
        let raw = p.varint()?;
        let id = u8::try_from(raw)
            .ok()
            .and_then(PropertyId::from_u8)
            .ok_or(DecodeError::UnknownProperty(raw.min(255) as u8))?;
        use PropertyId::*;
        let value = match id {
            PayloadFormatIndicator
            | RequestProblemInformation
            | RequestResponseInformation
            | MaximumQoS
            | RetainAvailable
            | WildcardSubscriptionAvailable
            | SubscriptionIdentifierAvailable
            | SharedSubscriptionAvailable => Value::Byte(p.u8()?),
            ServerKeepAlive | ReceiveMaximum | TopicAliasMaximum | TopicAlias => {
                Value::U16(p.u16()?)
            }
            MessageExpiryInterval
            | SessionExpiryInterval
            | WillDelayInterval
            | MaximumPacketSize => Value::U32(p.u32()?),
            SubscriptionIdentifier => Value::VarInt(p.varint()?),
            ContentType
            | ResponseTopic
            | AssignedClientIdentifier
            | AuthenticationMethod
            | ResponseInformation
            | ServerReference
            | ReasonString => Value::Str(p.string()?),
            CorrelationData | AuthenticationData => Value::Bin(p.binary()?),
            UserProperty => {
                p.skip_string()?;
                p.skip_string()?;
                users.add(p.bytes(), start, p.position());
                continue;
            }
        };
        f(id, value)?;
    }
    r.unlimit(end);
    Ok(users.finish(r.bytes()))
}

/// Stores `v` in `slot`, rejecting a second occurrence.
#[inline]
fn set<T>(slot: &mut Option<T>, v: T, id: PropertyId) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(id));
    }
    *slot = Some(v);
    Ok(())
}

fn flag(b: u8, id: PropertyId) -> Result<bool, DecodeError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue(id)),
    }
}

fn format(b: u8, id: PropertyId) -> Result<PayloadFormat, DecodeError> {
    Ok(if flag(b, id)? {
        PayloadFormat::Utf8
    } else {
        PayloadFormat::Unspecified
    })
}

fn nonzero_u16(v: u16, id: PropertyId) -> Result<u16, DecodeError> {
    if v == 0 {
        Err(DecodeError::InvalidPropertyValue(id))
    } else {
        Ok(v)
    }
}

fn nonzero_u32(v: u32, id: PropertyId) -> Result<u32, DecodeError> {
    if v == 0 {
        Err(DecodeError::InvalidPropertyValue(id))
    } else {
        Ok(v)
    }
}

fn response_topic(s: MqttString) -> Result<Topic, DecodeError> {
    Topic::from_string(s).map_err(|_| DecodeError::InvalidPropertyValue(PropertyId::ResponseTopic))
}

fn not_allowed(id: PropertyId, packet: PacketType) -> DecodeError {
    DecodeError::PropertyNotAllowed {
        property: id,
        packet,
    }
}

impl ConnectProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::SessionExpiryInterval, Value::U32(x)) => {
                    set(&mut p.session_expiry_interval, x, id)
                }
                (I::ReceiveMaximum, Value::U16(x)) => {
                    set(&mut p.receive_maximum, nonzero_u16(x, id)?, id)
                }
                (I::MaximumPacketSize, Value::U32(x)) => {
                    set(&mut p.maximum_packet_size, nonzero_u32(x, id)?, id)
                }
                (I::TopicAliasMaximum, Value::U16(x)) => set(&mut p.topic_alias_maximum, x, id),
                (I::RequestResponseInformation, Value::Byte(x)) => {
                    set(&mut p.request_response_information, flag(x, id)?, id)
                }
                (I::RequestProblemInformation, Value::Byte(x)) => {
                    set(&mut p.request_problem_information, flag(x, id)?, id)
                }
                (I::AuthenticationMethod, Value::Str(x)) => {
                    set(&mut p.authentication_method, x, id)
                }
                (I::AuthenticationData, Value::Bin(x)) => set(&mut p.authentication_data, x, id),
                _ => Err(not_allowed(id, PacketType::Connect)),
            }
        })?;
        // Authentication Data without a method is a Protocol Error (§3.1.2.11.10).
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(DecodeError::InvalidPropertyValue(
                PropertyId::AuthenticationData,
            ));
        }
        Ok(p)
    }
}

impl WillProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::WillDelayInterval, Value::U32(x)) => set(&mut p.will_delay_interval, x, id),
                (I::PayloadFormatIndicator, Value::Byte(x)) => {
                    set(&mut p.payload_format_indicator, format(x, id)?, id)
                }
                (I::MessageExpiryInterval, Value::U32(x)) => {
                    set(&mut p.message_expiry_interval, x, id)
                }
                (I::ContentType, Value::Str(x)) => set(&mut p.content_type, x, id),
                (I::ResponseTopic, Value::Str(x)) => {
                    set(&mut p.response_topic, response_topic(x)?, id)
                }
                (I::CorrelationData, Value::Bin(x)) => set(&mut p.correlation_data, x, id),
                _ => Err(not_allowed(id, PacketType::Connect)),
            }
        })?;
        Ok(p)
    }
}

impl ConnAckProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::SessionExpiryInterval, Value::U32(x)) => {
                    set(&mut p.session_expiry_interval, x, id)
                }
                (I::ReceiveMaximum, Value::U16(x)) => {
                    set(&mut p.receive_maximum, nonzero_u16(x, id)?, id)
                }
                (I::MaximumQoS, Value::Byte(x)) => {
                    let q = if flag(x, id)? {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    set(&mut p.maximum_qos, q, id)
                }
                (I::RetainAvailable, Value::Byte(x)) => {
                    set(&mut p.retain_available, flag(x, id)?, id)
                }
                (I::MaximumPacketSize, Value::U32(x)) => {
                    set(&mut p.maximum_packet_size, nonzero_u32(x, id)?, id)
                }
                (I::AssignedClientIdentifier, Value::Str(x)) => {
                    set(&mut p.assigned_client_identifier, x, id)
                }
                (I::TopicAliasMaximum, Value::U16(x)) => set(&mut p.topic_alias_maximum, x, id),
                (I::ReasonString, Value::Str(x)) => set(&mut p.reason_string, x, id),
                (I::WildcardSubscriptionAvailable, Value::Byte(x)) => {
                    set(&mut p.wildcard_subscription_available, flag(x, id)?, id)
                }
                (I::SubscriptionIdentifierAvailable, Value::Byte(x)) => {
                    set(&mut p.subscription_identifiers_available, flag(x, id)?, id)
                }
                (I::SharedSubscriptionAvailable, Value::Byte(x)) => {
                    set(&mut p.shared_subscription_available, flag(x, id)?, id)
                }
                (I::ServerKeepAlive, Value::U16(x)) => set(&mut p.server_keep_alive, x, id),
                (I::ResponseInformation, Value::Str(x)) => set(&mut p.response_information, x, id),
                (I::ServerReference, Value::Str(x)) => set(&mut p.server_reference, x, id),
                (I::AuthenticationMethod, Value::Str(x)) => {
                    set(&mut p.authentication_method, x, id)
                }
                (I::AuthenticationData, Value::Bin(x)) => set(&mut p.authentication_data, x, id),
                _ => Err(not_allowed(id, PacketType::ConnAck)),
            }
        })?;
        Ok(p)
    }
}

impl PublishProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::PayloadFormatIndicator, Value::Byte(x)) => {
                    set(&mut p.payload_format_indicator, format(x, id)?, id)
                }
                (I::MessageExpiryInterval, Value::U32(x)) => {
                    set(&mut p.message_expiry_interval, x, id)
                }
                (I::TopicAlias, Value::U16(x)) => {
                    if x == 0 {
                        return Err(DecodeError::TopicAliasZero);
                    }
                    set(&mut p.topic_alias, x, id)
                }
                (I::ResponseTopic, Value::Str(x)) => {
                    set(&mut p.response_topic, response_topic(x)?, id)
                }
                (I::CorrelationData, Value::Bin(x)) => set(&mut p.correlation_data, x, id),
                (I::SubscriptionIdentifier, Value::VarInt(x)) => {
                    p.subscription_identifiers.push(nonzero_u32(x, id)?);
                    Ok(())
                }
                (I::ContentType, Value::Str(x)) => set(&mut p.content_type, x, id),
                _ => Err(not_allowed(id, PacketType::Publish)),
            }
        })?;
        Ok(p)
    }
}

impl AckProperties {
    pub(crate) fn decode(r: &mut Reader, packet: PacketType) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| match (id, v) {
            (PropertyId::ReasonString, Value::Str(x)) => set(&mut p.reason_string, x, id),
            _ => Err(not_allowed(id, packet)),
        })?;
        Ok(p)
    }
}

impl SubscribeProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| match (id, v) {
            (PropertyId::SubscriptionIdentifier, Value::VarInt(x)) => {
                set(&mut p.subscription_identifier, nonzero_u32(x, id)?, id)
            }
            _ => Err(not_allowed(id, PacketType::Subscribe)),
        })?;
        Ok(p)
    }
}

impl UnsubscribeProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let user_properties = read_each(r, |id, _| Err(not_allowed(id, PacketType::Unsubscribe)))?;
        Ok(Self { user_properties })
    }
}

impl DisconnectProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::SessionExpiryInterval, Value::U32(x)) => {
                    set(&mut p.session_expiry_interval, x, id)
                }
                (I::ReasonString, Value::Str(x)) => set(&mut p.reason_string, x, id),
                (I::ServerReference, Value::Str(x)) => set(&mut p.server_reference, x, id),
                _ => Err(not_allowed(id, PacketType::Disconnect)),
            }
        })?;
        Ok(p)
    }
}

impl AuthProperties {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut p = Self::default();
        p.user_properties = read_each(r, |id, v| {
            use PropertyId as I;
            match (id, v) {
                (I::AuthenticationMethod, Value::Str(x)) => {
                    set(&mut p.authentication_method, x, id)
                }
                (I::AuthenticationData, Value::Bin(x)) => set(&mut p.authentication_data, x, id),
                (I::ReasonString, Value::Str(x)) => set(&mut p.reason_string, x, id),
                _ => Err(not_allowed(id, PacketType::Auth)),
            }
        })?;
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding: `len` is the Property Length value (without its own prefix); `write` writes the
// prefix and the properties. Binary values longer than 65,535 bytes are rejected by the packet
// encoder's `check` before anything is written.

#[inline]
fn l_byte<T>(o: &Option<T>) -> usize {
    if o.is_some() { 2 } else { 0 }
}
#[inline]
fn l_u16<T>(o: &Option<T>) -> usize {
    if o.is_some() { 3 } else { 0 }
}
#[inline]
fn l_u32(o: &Option<u32>) -> usize {
    if o.is_some() { 5 } else { 0 }
}
#[inline]
fn l_str<T: AsRef<[u8]>>(o: &Option<T>) -> usize {
    o.as_ref().map_or(0, |s| 3 + s.as_ref().len())
}
#[inline]
fn l_users(u: &UserProperties) -> usize {
    u.encoded_len()
}

#[inline]
fn w_byte(buf: &mut BytesMut, id: PropertyId, v: Option<u8>) {
    if let Some(v) = v {
        buf.put_u8(id as u8);
        buf.put_u8(v);
    }
}
#[inline]
fn w_bool(buf: &mut BytesMut, id: PropertyId, v: Option<bool>) {
    w_byte(buf, id, v.map(u8::from));
}
#[inline]
fn w_u16(buf: &mut BytesMut, id: PropertyId, v: Option<u16>) {
    if let Some(v) = v {
        buf.put_u8(id as u8);
        buf.put_u16(v);
    }
}
#[inline]
fn w_u32(buf: &mut BytesMut, id: PropertyId, v: Option<u32>) {
    if let Some(v) = v {
        buf.put_u8(id as u8);
        buf.put_u32(v);
    }
}
#[inline]
fn w_bin<T: AsRef<[u8]>>(buf: &mut BytesMut, id: PropertyId, v: &Option<T>) {
    if let Some(v) = v {
        buf.put_u8(id as u8);
        write_binary(buf, v.as_ref());
    }
}
#[inline]
fn w_users(buf: &mut BytesMut, u: &UserProperties) {
    u.write(buf);
}
fn format_byte(f: Option<PayloadFormat>) -> Option<u8> {
    f.map(|f| match f {
        PayloadFormat::Unspecified => 0,
        PayloadFormat::Utf8 => 1,
    })
}

/// Longest binary property value, for the encoder's size checks.
#[inline]
fn max_bin<T: AsRef<[u8]>>(o: &Option<T>) -> usize {
    o.as_ref().map_or(0, |b| b.as_ref().len())
}

/// Property Length plus its own Variable Byte Integer prefix.
#[inline]
pub(crate) fn section_len(len: usize) -> usize {
    varint_len(len) + len
}

impl ConnectProperties {
    pub(crate) fn len(&self) -> usize {
        l_u32(&self.session_expiry_interval)
            + l_u16(&self.receive_maximum)
            + l_u32(&self.maximum_packet_size)
            + l_u16(&self.topic_alias_maximum)
            + l_byte(&self.request_response_information)
            + l_byte(&self.request_problem_information)
            + l_str(&self.authentication_method)
            + l_str(&self.authentication_data)
            + l_users(&self.user_properties)
    }
    pub(crate) fn max_binary(&self) -> usize {
        max_bin(&self.authentication_data)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        w_u32(buf, I::SessionExpiryInterval, self.session_expiry_interval);
        w_u16(buf, I::ReceiveMaximum, self.receive_maximum);
        w_u32(buf, I::MaximumPacketSize, self.maximum_packet_size);
        w_u16(buf, I::TopicAliasMaximum, self.topic_alias_maximum);
        w_bool(
            buf,
            I::RequestResponseInformation,
            self.request_response_information,
        );
        w_bool(
            buf,
            I::RequestProblemInformation,
            self.request_problem_information,
        );
        w_bin(buf, I::AuthenticationMethod, &self.authentication_method);
        w_bin(buf, I::AuthenticationData, &self.authentication_data);
        w_users(buf, &self.user_properties);
    }
}

impl WillProperties {
    pub(crate) fn len(&self) -> usize {
        l_u32(&self.will_delay_interval)
            + l_byte(&self.payload_format_indicator)
            + l_u32(&self.message_expiry_interval)
            + l_str(&self.content_type)
            + l_str(&self.response_topic.as_ref().map(|t| t.as_bytes()))
            + l_str(&self.correlation_data)
            + l_users(&self.user_properties)
    }
    pub(crate) fn max_binary(&self) -> usize {
        max_bin(&self.correlation_data)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        w_u32(buf, I::WillDelayInterval, self.will_delay_interval);
        w_byte(
            buf,
            I::PayloadFormatIndicator,
            format_byte(self.payload_format_indicator),
        );
        w_u32(buf, I::MessageExpiryInterval, self.message_expiry_interval);
        w_bin(buf, I::ContentType, &self.content_type);
        w_bin(
            buf,
            I::ResponseTopic,
            &self.response_topic.as_ref().map(|t| t.as_bytes()),
        );
        w_bin(buf, I::CorrelationData, &self.correlation_data);
        w_users(buf, &self.user_properties);
    }
}

impl ConnAckProperties {
    pub(crate) fn len(&self) -> usize {
        l_u32(&self.session_expiry_interval)
            + l_u16(&self.receive_maximum)
            + l_byte(&self.maximum_qos)
            + l_byte(&self.retain_available)
            + l_u32(&self.maximum_packet_size)
            + l_str(&self.assigned_client_identifier)
            + l_u16(&self.topic_alias_maximum)
            + l_str(&self.reason_string)
            + l_users(&self.user_properties)
            + l_byte(&self.wildcard_subscription_available)
            + l_byte(&self.subscription_identifiers_available)
            + l_byte(&self.shared_subscription_available)
            + l_u16(&self.server_keep_alive)
            + l_str(&self.response_information)
            + l_str(&self.server_reference)
            + l_str(&self.authentication_method)
            + l_str(&self.authentication_data)
    }
    pub(crate) fn max_binary(&self) -> usize {
        max_bin(&self.authentication_data)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        w_u32(buf, I::SessionExpiryInterval, self.session_expiry_interval);
        w_u16(buf, I::ReceiveMaximum, self.receive_maximum);
        w_byte(buf, I::MaximumQoS, self.maximum_qos.map(QoS::as_u8));
        w_bool(buf, I::RetainAvailable, self.retain_available);
        w_u32(buf, I::MaximumPacketSize, self.maximum_packet_size);
        w_bin(
            buf,
            I::AssignedClientIdentifier,
            &self.assigned_client_identifier,
        );
        w_u16(buf, I::TopicAliasMaximum, self.topic_alias_maximum);
        w_bin(buf, I::ReasonString, &self.reason_string);
        w_users(buf, &self.user_properties);
        w_bool(
            buf,
            I::WildcardSubscriptionAvailable,
            self.wildcard_subscription_available,
        );
        w_bool(
            buf,
            I::SubscriptionIdentifierAvailable,
            self.subscription_identifiers_available,
        );
        w_bool(
            buf,
            I::SharedSubscriptionAvailable,
            self.shared_subscription_available,
        );
        w_u16(buf, I::ServerKeepAlive, self.server_keep_alive);
        w_bin(buf, I::ResponseInformation, &self.response_information);
        w_bin(buf, I::ServerReference, &self.server_reference);
        w_bin(buf, I::AuthenticationMethod, &self.authentication_method);
        w_bin(buf, I::AuthenticationData, &self.authentication_data);
    }
}

impl PublishProperties {
    /// Whether User Properties are the only properties (or there are none): the common case,
    /// tested without branches so the encoder can skip the per-property checks.
    #[inline(always)]
    fn only_user_properties(&self) -> bool {
        self.payload_format_indicator.is_none()
            & self.message_expiry_interval.is_none()
            & self.topic_alias.is_none()
            & self.response_topic.is_none()
            & self.correlation_data.is_none()
            & self.subscription_identifiers.is_empty()
            & self.content_type.is_none()
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        if self.only_user_properties() {
            return l_users(&self.user_properties);
        }
        l_byte(&self.payload_format_indicator)
            + l_u32(&self.message_expiry_interval)
            + l_u16(&self.topic_alias)
            + l_str(&self.response_topic.as_ref().map(|t| t.as_bytes()))
            + l_str(&self.correlation_data)
            + l_users(&self.user_properties)
            + self
                .subscription_identifiers
                .iter()
                .map(|&i| 1 + varint_len(i as usize))
                .sum::<usize>()
            + l_str(&self.content_type)
    }
    #[inline]
    pub(crate) fn max_binary(&self) -> usize {
        max_bin(&self.correlation_data)
    }
    #[inline]
    pub(crate) fn bad_subscription_id(&self) -> Option<u32> {
        self.subscription_identifiers
            .iter()
            .copied()
            .find(|&i| i == 0 || i > VARINT_MAX)
    }
    #[inline]
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        if len == 0 {
            return;
        }
        w_byte(
            buf,
            I::PayloadFormatIndicator,
            format_byte(self.payload_format_indicator),
        );
        w_u32(buf, I::MessageExpiryInterval, self.message_expiry_interval);
        w_u16(buf, I::TopicAlias, self.topic_alias);
        w_bin(
            buf,
            I::ResponseTopic,
            &self.response_topic.as_ref().map(|t| t.as_bytes()),
        );
        w_bin(buf, I::CorrelationData, &self.correlation_data);
        w_users(buf, &self.user_properties);
        for &id in &self.subscription_identifiers {
            buf.put_u8(I::SubscriptionIdentifier as u8);
            write_varint(buf, id as usize);
        }
        w_bin(buf, I::ContentType, &self.content_type);
    }

    /// As [`PublishProperties::write`], through the PUBLISH encoder's [`Cursor`] (same bytes).
    #[inline]
    pub(crate) fn write_to(&self, c: &mut Cursor<'_>, len: usize) {
        use PropertyId as I;
        c.varint(len);
        if self.only_user_properties() {
            c.slice(self.user_properties.wire());
            return;
        }
        if let Some(f) = format_byte(self.payload_format_indicator) {
            c.u8(I::PayloadFormatIndicator as u8);
            c.u8(f);
        }
        if let Some(v) = self.message_expiry_interval {
            c.u8(I::MessageExpiryInterval as u8);
            c.u32(v);
        }
        if let Some(v) = self.topic_alias {
            c.u8(I::TopicAlias as u8);
            c.u16(v);
        }
        if let Some(t) = &self.response_topic {
            c.u8(I::ResponseTopic as u8);
            c.binary(t.as_bytes());
        }
        if let Some(d) = &self.correlation_data {
            c.u8(I::CorrelationData as u8);
            c.binary(d);
        }
        c.slice(self.user_properties.wire());
        for &id in &self.subscription_identifiers {
            c.u8(I::SubscriptionIdentifier as u8);
            c.varint(id as usize);
        }
        if let Some(t) = &self.content_type {
            c.u8(I::ContentType as u8);
            c.binary(t.as_bytes());
        }
    }
}

impl AckProperties {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        l_str(&self.reason_string) + l_users(&self.user_properties)
    }
    #[inline]
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        write_varint(buf, len);
        w_bin(buf, PropertyId::ReasonString, &self.reason_string);
        w_users(buf, &self.user_properties);
    }
}

impl SubscribeProperties {
    pub(crate) fn len(&self) -> usize {
        self.subscription_identifier
            .map_or(0, |i| 1 + varint_len(i as usize))
            + l_users(&self.user_properties)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        write_varint(buf, len);
        if let Some(id) = self.subscription_identifier {
            buf.put_u8(PropertyId::SubscriptionIdentifier as u8);
            write_varint(buf, id as usize);
        }
        w_users(buf, &self.user_properties);
    }
}

impl UnsubscribeProperties {
    pub(crate) fn len(&self) -> usize {
        l_users(&self.user_properties)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        write_varint(buf, len);
        w_users(buf, &self.user_properties);
    }
}

impl DisconnectProperties {
    pub(crate) fn len(&self) -> usize {
        l_u32(&self.session_expiry_interval)
            + l_str(&self.reason_string)
            + l_users(&self.user_properties)
            + l_str(&self.server_reference)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        w_u32(buf, I::SessionExpiryInterval, self.session_expiry_interval);
        w_bin(buf, I::ReasonString, &self.reason_string);
        w_users(buf, &self.user_properties);
        w_bin(buf, I::ServerReference, &self.server_reference);
    }
}

impl AuthProperties {
    pub(crate) fn len(&self) -> usize {
        l_str(&self.authentication_method)
            + l_str(&self.authentication_data)
            + l_str(&self.reason_string)
            + l_users(&self.user_properties)
    }
    pub(crate) fn max_binary(&self) -> usize {
        max_bin(&self.authentication_data)
    }
    pub(crate) fn write(&self, buf: &mut BytesMut, len: usize) {
        use PropertyId as I;
        write_varint(buf, len);
        w_bin(buf, I::AuthenticationMethod, &self.authentication_method);
        w_bin(buf, I::AuthenticationData, &self.authentication_data);
        w_bin(buf, I::ReasonString, &self.reason_string);
        w_users(buf, &self.user_properties);
    }
}
