//! [`DecodeError`] and [`EncodeError`].
//!
//! Every decode error names the rule that was broken and maps, through
//! [`DecodeError::reason_code`], to the Reason Code an MQTT 5 server sends in its CONNACK or
//! DISCONNECT before closing. An MQTT 3.1/3.1.1 server just closes the connection, except for the
//! two CONNECT errors that 3.1.1 answers with a CONNACK return code
//! ([`DecodeError::connack_code_v3`]).

use crate::properties::PropertyId;
use crate::protocol::PacketType;
use crate::reason::ReasonCode;
use crate::topic::TopicError;

/// Why bytes are not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The fixed header announces a packet larger than the maximum packet size; nothing was
    /// allocated for it.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge {
        /// The whole packet's size (fixed header included), as announced.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A Variable Byte Integer continues past its fourth byte [MQTT-1.5.5].
    #[error("variable byte integer longer than 4 bytes")]
    VarIntTooLong,
    /// A Variable Byte Integer not in its shortest form [MQTT-1.5.5-1].
    #[error("variable byte integer not minimally encoded")]
    NonMinimalVarInt,
    /// Packet type 0, or 15 (AUTH) before MQTT 5.
    #[error("reserved packet type {0}")]
    InvalidPacketType(u8),
    /// The fixed header's low nibble is not what the packet type requires [MQTT-2.2.2-2].
    #[error("invalid fixed header flags {flags:#06b} for {packet_type}")]
    InvalidHeaderFlags {
        /// The packet.
        packet_type: PacketType,
        /// The flags received.
        flags: u8,
    },
    /// QoS 3 in a PUBLISH, a will or a subscription [MQTT-3.3.1-4].
    #[error("invalid QoS 3")]
    InvalidQoS,
    /// DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2].
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupWithQoS0,
    /// Packet Identifier 0 [MQTT-2.2.1-3].
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A field runs past the end of the packet.
    #[error("packet ends in the middle of a field")]
    UnexpectedEof,
    /// Bytes left after the last field of the packet.
    #[error("{0} unexpected bytes at the end of the packet")]
    TrailingBytes(usize),
    /// A packet whose remaining length must be exact has another one.
    #[error("invalid remaining length {len} for {packet_type}")]
    InvalidRemainingLength {
        /// The packet.
        packet_type: PacketType,
        /// The length received.
        len: usize,
    },
    /// A string is not well-formed UTF-8 (this includes encoded surrogates) [MQTT-1.5.4-1].
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A string contains U+0000 [MQTT-1.5.4-2].
    #[error("string contains U+0000")]
    NullCharacter,
    /// A string longer than 65,535 bytes (only when building a string, never on the wire).
    #[error("string of {0} bytes is longer than 65535")]
    StringTooLong(usize),
    /// An invalid Topic Name (wildcards, empty in 3.1.1, ...).
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    /// An invalid Topic Filter (`a/#/b`, `a+`, bad `$share/`, ...).
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    /// An MQTT 5 PUBLISH with an empty Topic Name and no Topic Alias [MQTT-3.3.2-1].
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
    /// Topic Alias 0 [MQTT-3.3.2-8].
    #[error("topic alias 0")]
    TopicAliasZero,
    /// A property identifier MQTT 5 does not define.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u8),
    /// A property that may appear once appears twice.
    #[error("duplicate property {0:?}")]
    DuplicateProperty(PropertyId),
    /// A property not allowed in this packet (or in the will properties).
    #[error("property {property:?} not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property.
        property: PropertyId,
        /// The packet it appeared in.
        packet: PacketType,
    },
    /// A property with a value the specification forbids (Receive Maximum 0, a flag byte other
    /// than 0 or 1, Maximum QoS 2, Subscription Identifier 0, ...).
    #[error("invalid value for property {0:?}")]
    InvalidPropertyValue(PropertyId),
    /// The properties' length runs past the end of the packet.
    #[error("property length exceeds the packet")]
    InvalidPropertyLength,
    /// A byte that is not a Reason Code, or one this packet may not carry.
    #[error("reason code {code:#04x} not valid in {packet}")]
    InvalidReasonCode {
        /// The packet.
        packet: PacketType,
        /// The byte received.
        code: u8,
    },
    /// An MQTT 3.1.1 CONNACK or SUBACK return code outside the defined ones.
    #[error("invalid return code {0:#04x}")]
    InvalidReturnCode(u8),
    /// CONNACK acknowledge flags with reserved bits set [MQTT-3.2.2-1].
    #[error("invalid CONNACK acknowledge flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    /// A Protocol Name other than `MQTT` or `MQIsdp`.
    #[error("unknown protocol name")]
    InvalidProtocolName,
    /// A Protocol Level this codec does not speak, or one that does not match the Protocol
    /// Name (`MQIsdp` goes with 3, `MQTT` with 4 and 5).
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocolLevel {
        /// The level received.
        level: u8,
    },
    /// The CONNECT reserved flag is set [MQTT-3.1.2-3].
    #[error("CONNECT reserved flag set")]
    ConnectReservedFlag,
    /// Will QoS or Will Retain set without the Will Flag [MQTT-3.1.2-11], [MQTT-3.1.2-13],
    /// [MQTT-3.1.2-15].
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    /// Password flag without user name flag in MQTT 3.1/3.1.1 [MQTT-3.1.2-22].
    #[error("password without user name")]
    PasswordWithoutUsername,
    /// Zero-length Client Identifier with Clean Session 0 in MQTT 3.1/3.1.1 [MQTT-3.1.3-7].
    #[error("empty client identifier requires clean session")]
    EmptyClientIdWithoutCleanSession,
    /// Subscription options with reserved bits set [MQTT-3.8.3-5], or a 3.1.1 requested-QoS byte
    /// with its upper six bits set [MQTT-3-8.3-4].
    #[error("invalid subscription options {0:#04x}")]
    InvalidSubscriptionOptions(u8),
    /// Retain Handling 3 [MQTT-3.8.3-5].
    #[error("retain handling 3")]
    InvalidRetainHandling,
    /// No Local on a shared subscription [MQTT-3.8.3-4].
    #[error("no local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    /// A SUBSCRIBE or UNSUBSCRIBE without any topic filter [MQTT-3.8.3-3], [MQTT-3.10.3-2].
    #[error("{0} without topic filters")]
    NoTopicFilters(PacketType),
    /// The first packet of a connection is not CONNECT [MQTT-3.1.0-1].
    #[error("expected CONNECT, got {0}")]
    ExpectedConnect(PacketType),
}

impl DecodeError {
    /// The Reason Code an MQTT 5 server sends (in CONNACK if the CONNECT was bad, in DISCONNECT
    /// otherwise) before closing the connection.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            InvalidTopicName(_) => ReasonCode::TopicNameInvalid,
            InvalidTopicFilter(_) => ReasonCode::TopicFilterInvalid,
            TopicAliasZero => ReasonCode::TopicAliasInvalid,
            InvalidProtocolName | UnsupportedProtocolLevel { .. } => {
                ReasonCode::UnsupportedProtocolVersion
            }
            EmptyClientIdWithoutCleanSession => ReasonCode::ClientIdentifierNotValid,
            EmptyTopicWithoutAlias
            | DuplicateProperty(_)
            | PropertyNotAllowed { .. }
            | InvalidPropertyValue(_)
            | InvalidRetainHandling
            | NoLocalOnSharedSubscription
            | NoTopicFilters(_)
            | ExpectedConnect(_) => ReasonCode::ProtocolError,
            VarIntTooLong
            | NonMinimalVarInt
            | InvalidPacketType(_)
            | InvalidHeaderFlags { .. }
            | InvalidQoS
            | DupWithQoS0
            | ZeroPacketId
            | UnexpectedEof
            | TrailingBytes(_)
            | InvalidRemainingLength { .. }
            | InvalidUtf8
            | NullCharacter
            | StringTooLong(_)
            | UnknownProperty(_)
            | InvalidPropertyLength
            | InvalidReasonCode { .. }
            | InvalidReturnCode(_)
            | InvalidConnAckFlags(_)
            | ConnectReservedFlag
            | WillFlagsWithoutWill
            | PasswordWithoutUsername
            | InvalidSubscriptionOptions(_) => ReasonCode::MalformedPacket,
        }
    }

    /// For an MQTT 3.1/3.1.1 server: the CONNACK return code to send before closing, for the
    /// two errors 3.1.1 answers that way (1 unacceptable protocol version, 2 identifier
    /// rejected); `None` means close the connection without a CONNACK.
    pub fn connack_code_v3(&self) -> Option<u8> {
        match self {
            Self::UnsupportedProtocolLevel { .. } => Some(1),
            Self::EmptyClientIdWithoutCleanSession => Some(2),
            _ => None,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The remaining length would exceed 268,435,455 bytes.
    #[error("packet too large to encode ({0} bytes of remaining length)")]
    PacketTooLarge(usize),
    /// A binary field (payload of a will, password, correlation or authentication data) is
    /// longer than 65,535 bytes.
    #[error("binary field of {0} bytes is longer than 65535")]
    BinaryTooLong(usize),
    /// A QoS 0 PUBLISH with a packet identifier, or a QoS 1/2 one without.
    #[error("packet identifier presence does not match QoS")]
    PacketIdMismatch,
    /// A packet or field that does not exist in the target protocol version (AUTH before 5.0,
    /// an empty topic name without MQTT 5).
    #[error("{0} cannot be encoded in this protocol version")]
    NotInVersion(&'static str),
    /// SUBSCRIBE/UNSUBSCRIBE with no filter, or SUBACK/UNSUBACK with no reason code in 5.0.
    #[error("{0} needs at least one entry")]
    Empty(&'static str),
    /// A [`crate::Codec`] asked to encode before any CONNECT fixed the protocol version.
    #[error("protocol version not known yet")]
    VersionUnknown,
    /// A Subscription Identifier outside 1..=268,435,455.
    #[error("invalid subscription identifier {0}")]
    InvalidSubscriptionId(u32),
}
