//! One test per validation rule: the violating bytes, the typed error, and the Reason Code an
//! MQTT 5 server sends for it.

use bytes::BytesMut;
use mqttd_codec::*;

use ProtocolVersion::{V3_1, V3_1_1, V5};
use ReasonCode as R;

const MAX: usize = 1 << 16;

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

#[track_caller]
fn fail(bytes: &[u8], version: ProtocolVersion, error: DecodeError, reason: ReasonCode) {
    let mut buf = BytesMut::from(bytes);
    let got = decode(&mut buf, version, MAX);
    assert_eq!(got, Err(error.clone()), "bytes {bytes:02X?}");
    assert_eq!(error.reason_code(), reason);
}

/// A v5 CONNECT body with the given flags and properties, client id "c", then `tail`.
fn connect_v5(flags: u8, props: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut b = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        5,
        flags,
        0,
        0,
        props.len() as u8,
    ];
    b.extend_from_slice(props);
    b.extend_from_slice(&[0, 1, b'c']);
    b.extend_from_slice(tail);
    frame(0x10, &b)
}

fn connect_v311(flags: u8, client_id: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut b = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        flags,
        0,
        0,
        0,
        client_id.len() as u8,
    ];
    b.extend_from_slice(client_id);
    b.extend_from_slice(tail);
    frame(0x10, &b)
}

/// A v5 PUBLISH QoS 0 with topic `t` and the given property bytes.
fn publish_v5_props(props: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 1, b't', props.len() as u8];
    b.extend_from_slice(props);
    frame(0x30, &b)
}

// --- Fixed header --------------------------------------------------------------------------

#[test]
fn reserved_flag_bits() {
    for (first, t) in [
        (0x11, PacketType::Connect),
        (0x21, PacketType::ConnAck),
        (0x41, PacketType::PubAck),
        (0x60, PacketType::PubRel),
        (0x80, PacketType::Subscribe),
        (0xA0, PacketType::Unsubscribe),
        (0xC8, PacketType::PingReq),
        (0xE2, PacketType::Disconnect),
    ] {
        fail(
            &[first, 0x02, 0x00, 0x01],
            V3_1_1,
            DecodeError::InvalidHeaderFlags {
                packet_type: t,
                flags: first & 0x0F,
            },
            R::MalformedPacket,
        );
    }
}

#[test]
fn reserved_packet_types() {
    fail(
        &[0x00, 0x00],
        V3_1_1,
        DecodeError::InvalidPacketType(0),
        R::MalformedPacket,
    );
    // AUTH does not exist before 5.0.
    fail(
        &[0xF0, 0x00],
        V3_1_1,
        DecodeError::InvalidPacketType(15),
        R::MalformedPacket,
    );
    fail(
        &[0xF0, 0x00],
        V3_1,
        DecodeError::InvalidPacketType(15),
        R::MalformedPacket,
    );
}

#[test]
fn publish_qos_3() {
    fail(
        &frame(0x36, &[0, 1, b't', 0, 1]),
        V3_1_1,
        DecodeError::InvalidQoS,
        R::MalformedPacket,
    );
}

#[test]
fn publish_dup_with_qos_0() {
    fail(
        &frame(0x38, &[0, 1, b't']),
        V3_1_1,
        DecodeError::DupWithQoS0,
        R::MalformedPacket,
    );
}

#[test]
fn packet_identifier_zero() {
    fail(
        &frame(0x32, &[0, 1, b't', 0, 0]),
        V3_1_1,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
    fail(
        &[0x40, 0x02, 0x00, 0x00],
        V5,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
    fail(
        &[0x62, 0x02, 0x00, 0x00],
        V3_1_1,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
    fail(
        &frame(0x82, &[0, 0, 0, 1, b'#', 0]),
        V3_1_1,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
    fail(
        &frame(0xA2, &[0, 0, 0, 1, b'#']),
        V3_1_1,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
    fail(
        &frame(0x90, &[0, 0, 0]),
        V3_1_1,
        DecodeError::ZeroPacketId,
        R::MalformedPacket,
    );
}

#[test]
fn remaining_length_longer_than_4_bytes() {
    fail(
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        V3_1_1,
        DecodeError::VarIntTooLong,
        R::MalformedPacket,
    );
    assert_eq!(
        check(&[0x30, 0x80, 0x80, 0x80, 0x80], MAX),
        Err(DecodeError::VarIntTooLong)
    );
}

#[test]
fn remaining_length_not_minimal() {
    fail(
        &[0xC0, 0x80, 0x00],
        V3_1_1,
        DecodeError::NonMinimalVarInt,
        R::MalformedPacket,
    );
    fail(
        &[0x30, 0x83, 0x80, 0x00],
        V5,
        DecodeError::NonMinimalVarInt,
        R::MalformedPacket,
    );
}

#[test]
fn property_varint_not_minimal() {
    // Subscription Identifier 1 encoded in two bytes.
    let mut b = vec![0, 1, 4, 0x0B, 0x81, 0x00, 0x00];
    b.extend_from_slice(&[0, 1, b'#', 0]);
    fail(
        &frame(0x82, &b[..]),
        V5,
        DecodeError::NonMinimalVarInt,
        R::MalformedPacket,
    );
}

#[test]
fn packet_too_large_before_allocation() {
    // Announces 2 MB; only the header is present. Rejected without waiting for the body.
    fail(
        &[0x30, 0x80, 0x80, 0x80, 0x01],
        V5,
        DecodeError::PacketTooLarge {
            size: 2_097_157,
            max: MAX,
        },
        R::PacketTooLarge,
    );
    // The limit counts the fixed header: 4 + 65532 = MAX is fine, one more is not.
    assert_eq!(
        check(&[0x30, 0xFC, 0xFF, 0x03], MAX),
        Ok(Status::Incomplete { needed: 65_532 })
    );
    assert_eq!(
        check(&[0x30, 0xFD, 0xFF, 0x03], MAX),
        Err(DecodeError::PacketTooLarge {
            size: MAX + 1,
            max: MAX
        })
    );
}

#[test]
fn trailing_bytes() {
    fail(
        &[0xC0, 0x01, 0x00],
        V3_1_1,
        DecodeError::InvalidRemainingLength {
            packet_type: PacketType::PingReq,
            len: 1,
        },
        R::MalformedPacket,
    );
    fail(
        &[0x40, 0x03, 0x00, 0x01, 0x00],
        V3_1_1,
        DecodeError::InvalidRemainingLength {
            packet_type: PacketType::PubAck,
            len: 3,
        },
        R::MalformedPacket,
    );
    fail(
        &[0xE0, 0x01, 0x00],
        V3_1_1,
        DecodeError::InvalidRemainingLength {
            packet_type: PacketType::Disconnect,
            len: 1,
        },
        R::MalformedPacket,
    );
    fail(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        V3_1_1,
        DecodeError::TrailingBytes(1),
        R::MalformedPacket,
    );
    fail(
        &[0x40, 0x05, 0x00, 0x01, 0x00, 0x00, 0xFF],
        V5,
        DecodeError::TrailingBytes(1),
        R::MalformedPacket,
    );
    fail(
        &connect_v311(0x02, b"c", &[0xAA]),
        V3_1_1,
        DecodeError::TrailingBytes(1),
        R::MalformedPacket,
    );
    fail(
        &[0xE0, 0x03, 0x00, 0x00, 0x00],
        V5,
        DecodeError::TrailingBytes(1),
        R::MalformedPacket,
    );
    assert_eq!(
        decode_frame(bytes::Bytes::from_static(&[0xC0, 0x00, 0x00]), V3_1_1),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn field_runs_past_the_packet() {
    // Topic length 5 with 1 byte of topic.
    fail(
        &frame(0x30, &[0, 5, b't']),
        V3_1_1,
        DecodeError::UnexpectedEof,
        R::MalformedPacket,
    );
    fail(
        &[0x40, 0x01, 0x00],
        V5,
        DecodeError::UnexpectedEof,
        R::MalformedPacket,
    );
}

// --- Strings and topics --------------------------------------------------------------------

#[test]
fn malformed_utf8() {
    for bad in [
        &[0xC3, 0x28][..],
        &[0xC0, 0x80],
        &[0xFF],
        &[0xF0, 0x9F, 0x98],
    ] {
        let mut b = vec![0, bad.len() as u8];
        b.extend_from_slice(bad);
        fail(
            &frame(0x30, &b),
            V3_1_1,
            DecodeError::InvalidUtf8,
            R::MalformedPacket,
        );
    }
}

#[test]
fn surrogates_in_strings() {
    // U+D800 encoded as UTF-8 (CESU style) is not valid UTF-8 [MQTT-1.5.4-1].
    fail(
        &frame(0x30, &[0, 3, 0xED, 0xA0, 0x80]),
        V3_1_1,
        DecodeError::InvalidUtf8,
        R::MalformedPacket,
    );
    fail(
        &connect_v311(0x02, &[0xED, 0xBF, 0xBF], &[]),
        V3_1_1,
        DecodeError::InvalidUtf8,
        R::MalformedPacket,
    );
}

#[test]
fn null_character_in_strings() {
    fail(
        &frame(0x30, &[0, 3, b'a', 0, b'b']),
        V3_1_1,
        DecodeError::NullCharacter,
        R::MalformedPacket,
    );
    fail(
        &connect_v311(0x02, &[b'c', 0], &[]),
        V3_1_1,
        DecodeError::NullCharacter,
        R::MalformedPacket,
    );
    // In a user property too.
    fail(
        &publish_v5_props(&[0x26, 0, 1, 0, 0, 1, b'v']),
        V5,
        DecodeError::NullCharacter,
        R::MalformedPacket,
    );
}

#[test]
fn wildcards_in_publish_topic() {
    for t in [&b"a/+"[..], b"#", b"a/#", b"+"] {
        let mut b = vec![0, t.len() as u8];
        b.extend_from_slice(t);
        fail(
            &frame(0x30, &b),
            V3_1_1,
            DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
            R::TopicNameInvalid,
        );
    }
    // In a will topic as well.
    let tail = [0, 1, b'+', 0, 0];
    fail(
        &connect_v311(0x06, b"c", &tail),
        V3_1_1,
        DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
        R::TopicNameInvalid,
    );
}

/// A PUBLISH with several faults reports the first in field order: the topic before a
/// missing or zero packet identifier (QoS 1), in both versions.
#[test]
fn publish_reports_topic_faults_before_packet_id_faults() {
    for version in [V3_1_1, V5] {
        // Wildcard topic, packet identifier cut off after one byte.
        fail(
            &frame(0x32, &[0, 1, b'#', 0]),
            version,
            DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
            R::TopicNameInvalid,
        );
        // Wildcard topic, no packet identifier at all.
        fail(
            &frame(0x32, &[0, 1, b'+']),
            version,
            DecodeError::InvalidTopicName(TopicError::WildcardInTopicName),
            R::TopicNameInvalid,
        );
        // U+0000 in the topic, packet identifier 0.
        fail(
            &frame(0x32, &[0, 1, 0, 0, 0]),
            version,
            DecodeError::NullCharacter,
            R::MalformedPacket,
        );
        // A valid topic, then a truncated packet identifier: end of packet.
        fail(
            &frame(0x32, &[0, 1, b'a', 0]),
            version,
            DecodeError::UnexpectedEof,
            R::MalformedPacket,
        );
    }
    // Empty topic in 3.1.1 before a zero packet identifier.
    fail(
        &frame(0x32, &[0, 0, 0, 0]),
        V3_1_1,
        DecodeError::InvalidTopicName(TopicError::Empty),
        R::TopicNameInvalid,
    );
}

#[test]
fn empty_topic_in_v311() {
    fail(
        &frame(0x30, &[0, 0, b'x']),
        V3_1_1,
        DecodeError::InvalidTopicName(TopicError::Empty),
        R::TopicNameInvalid,
    );
}

#[test]
fn zero_length_topic_without_alias() {
    fail(
        &frame(0x30, &[0, 0, 0]),
        V5,
        DecodeError::EmptyTopicWithoutAlias,
        R::ProtocolError,
    );
    // With an alias it is fine.
    let mut buf = BytesMut::from(&frame(0x30, &[0, 0, 3, 0x23, 0, 1])[..]);
    assert!(matches!(
        decode(&mut buf, V5, MAX),
        Ok(Some(Packet::Publish(_)))
    ));
}

#[test]
fn topic_alias_zero() {
    fail(
        &publish_v5_props(&[0x23, 0, 0]),
        V5,
        DecodeError::TopicAliasZero,
        R::TopicAliasInvalid,
    );
}

#[test]
fn invalid_topic_filters() {
    for (f, e) in [
        (&b"a/#/b"[..], TopicError::InvalidWildcard),
        (b"a+", TopicError::InvalidWildcard),
        (b"a/b#", TopicError::InvalidWildcard),
        (b"", TopicError::Empty),
        (b"$share/g", TopicError::InvalidSharedSubscription),
        (b"$share//a", TopicError::InvalidSharedSubscription),
    ] {
        let mut b = vec![0, 1, 0, f.len() as u8];
        b.extend_from_slice(f);
        b.push(0);
        fail(
            &frame(0x82, &b),
            V3_1_1,
            DecodeError::InvalidTopicFilter(e),
            R::TopicFilterInvalid,
        );
        let mut u = vec![0, 1, 0, f.len() as u8];
        u.extend_from_slice(f);
        fail(
            &frame(0xA2, &u),
            V3_1_1,
            DecodeError::InvalidTopicFilter(e),
            R::TopicFilterInvalid,
        );
    }
}

// --- Properties ----------------------------------------------------------------------------

#[test]
fn duplicate_properties() {
    fail(
        &publish_v5_props(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]),
        V5,
        DecodeError::DuplicateProperty(PropertyId::MessageExpiryInterval),
        R::ProtocolError,
    );
    fail(
        &[0x40, 0x0C, 0, 1, 0, 8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b'],
        V5,
        DecodeError::DuplicateProperty(PropertyId::ReasonString),
        R::ProtocolError,
    );
    fail(
        &connect_v5(0x02, &[0x21, 0, 1, 0x21, 0, 1], &[]),
        V5,
        DecodeError::DuplicateProperty(PropertyId::ReceiveMaximum),
        R::ProtocolError,
    );
    // A SUBSCRIBE may carry only one Subscription Identifier.
    fail(
        &frame(0x82, &[0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'#', 0]),
        V5,
        DecodeError::DuplicateProperty(PropertyId::SubscriptionIdentifier),
        R::ProtocolError,
    );
}

#[test]
fn repeatable_properties_are_not_duplicates() {
    let mut buf = BytesMut::from(
        &publish_v5_props(&[
            0x0B, 1, 0x0B, 2, 0x26, 0, 1, b'k', 0, 0, 0x26, 0, 1, b'k', 0, 0,
        ])[..],
    );
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V5, MAX) else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 2]);
    assert_eq!(p.properties.user_properties.len(), 2);
}

#[test]
fn property_not_allowed_in_packet() {
    fail(
        &publish_v5_props(&[0x11, 0, 0, 0, 1]),
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::SessionExpiryInterval,
            packet: PacketType::Publish,
        },
        R::ProtocolError,
    );
    fail(
        &[0x40, 0x06, 0, 1, 0, 2, 0x23, 0],
        V5,
        DecodeError::UnexpectedEof,
        R::MalformedPacket,
    );
    fail(
        &[0x40, 0x07, 0, 1, 0, 3, 0x23, 0, 1],
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::TopicAlias,
            packet: PacketType::PubAck,
        },
        R::ProtocolError,
    );
    fail(
        &connect_v5(0x02, &[0x23, 0, 1], &[]),
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::TopicAlias,
            packet: PacketType::Connect,
        },
        R::ProtocolError,
    );
    // Will Delay Interval belongs to the will properties, not the CONNECT properties.
    fail(
        &connect_v5(0x02, &[0x18, 0, 0, 0, 1], &[]),
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::WillDelayInterval,
            packet: PacketType::Connect,
        },
        R::ProtocolError,
    );
    fail(
        &frame(0xA2, &[0, 1, 2, 0x0B, 1, 0, 1, b'#']),
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::SubscriptionIdentifier,
            packet: PacketType::Unsubscribe,
        },
        R::ProtocolError,
    );
    fail(
        &[0xE0, 0x04, 0x00, 0x02, 0x24, 0x01],
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::MaximumQoS,
            packet: PacketType::Disconnect,
        },
        R::ProtocolError,
    );
    fail(
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x17, 0x01],
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::RequestProblemInformation,
            packet: PacketType::ConnAck,
        },
        R::ProtocolError,
    );
    fail(
        &[0xF0, 0x04, 0x18, 0x02, 0x11, 0x00],
        V5,
        DecodeError::UnexpectedEof,
        R::MalformedPacket,
    );
    fail(
        &[0xF0, 0x06, 0x18, 0x04, 0x23, 0x00, 0x01, 0x00],
        V5,
        DecodeError::PropertyNotAllowed {
            property: PropertyId::TopicAlias,
            packet: PacketType::Auth,
        },
        R::ProtocolError,
    );
}

#[test]
fn unknown_property() {
    fail(
        &publish_v5_props(&[0x04, 0]),
        V5,
        DecodeError::UnknownProperty(0x04),
        R::MalformedPacket,
    );
    fail(
        &publish_v5_props(&[0x7F, 0]),
        V5,
        DecodeError::UnknownProperty(0x7F),
        R::MalformedPacket,
    );
}

#[test]
fn property_length_exceeds_packet() {
    fail(
        &frame(0x30, &[0, 1, b't', 9, 0x01, 0]),
        V5,
        DecodeError::InvalidPropertyLength,
        R::MalformedPacket,
    );
}

#[test]
fn invalid_property_values() {
    for (props, id) in [
        (&[0x01u8, 2][..], PropertyId::PayloadFormatIndicator),
        (&[0x0B, 0], PropertyId::SubscriptionIdentifier),
        (&[0x08, 0, 1, b'#'], PropertyId::ResponseTopic),
    ] {
        fail(
            &publish_v5_props(props),
            V5,
            DecodeError::InvalidPropertyValue(id),
            R::ProtocolError,
        );
    }
    for (props, id) in [
        (&[0x21u8, 0, 0][..], PropertyId::ReceiveMaximum),
        (&[0x27, 0, 0, 0, 0], PropertyId::MaximumPacketSize),
        (&[0x17, 2], PropertyId::RequestProblemInformation),
        (&[0x19, 7], PropertyId::RequestResponseInformation),
        (&[0x16, 0, 1, b'd'], PropertyId::AuthenticationData),
    ] {
        fail(
            &connect_v5(0x02, props, &[]),
            V5,
            DecodeError::InvalidPropertyValue(id),
            R::ProtocolError,
        );
    }
    for (props, id) in [
        (&[0x24u8, 2][..], PropertyId::MaximumQoS),
        (&[0x25, 2], PropertyId::RetainAvailable),
        (&[0x28, 3], PropertyId::WildcardSubscriptionAvailable),
        (&[0x29, 9], PropertyId::SubscriptionIdentifierAvailable),
        (&[0x2A, 2], PropertyId::SharedSubscriptionAvailable),
    ] {
        let mut b = vec![0, 0, props.len() as u8];
        b.extend_from_slice(props);
        fail(
            &frame(0x20, &b),
            V5,
            DecodeError::InvalidPropertyValue(id),
            R::ProtocolError,
        );
    }
}

// --- Reason codes --------------------------------------------------------------------------

#[test]
fn invalid_reason_codes() {
    // Not a reason code at all.
    fail(
        &[0x40, 0x03, 0, 1, 0x03],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::PubAck,
            code: 0x03,
        },
        R::MalformedPacket,
    );
    // A real code that PUBREL may not carry.
    fail(
        &[0x62, 0x03, 0, 1, 0x10],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::PubRel,
            code: 0x10,
        },
        R::MalformedPacket,
    );
    fail(
        &[0x20, 0x03, 0, 0x04, 0],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code: 0x04,
        },
        R::MalformedPacket,
    );
    fail(
        &[0x90, 0x04, 0, 1, 0, 0x11],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::SubAck,
            code: 0x11,
        },
        R::MalformedPacket,
    );
    fail(
        &[0xB0, 0x04, 0, 1, 0, 0x01],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::UnsubAck,
            code: 0x01,
        },
        R::MalformedPacket,
    );
    fail(
        &[0xE0, 0x01, 0x01],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::Disconnect,
            code: 0x01,
        },
        R::MalformedPacket,
    );
    fail(
        &[0xF0, 0x02, 0x80, 0x00],
        V5,
        DecodeError::InvalidReasonCode {
            packet: PacketType::Auth,
            code: 0x80,
        },
        R::MalformedPacket,
    );
    // 3.1.1 return codes.
    fail(
        &[0x20, 0x02, 0, 6],
        V3_1_1,
        DecodeError::InvalidReturnCode(6),
        R::MalformedPacket,
    );
    fail(
        &[0x90, 0x03, 0, 1, 3],
        V3_1_1,
        DecodeError::InvalidReturnCode(3),
        R::MalformedPacket,
    );
}

#[test]
fn connack_reserved_flags() {
    fail(
        &[0x20, 0x02, 0x02, 0x00],
        V3_1_1,
        DecodeError::InvalidConnAckFlags(0x02),
        R::MalformedPacket,
    );
}

// --- CONNECT -------------------------------------------------------------------------------

#[test]
fn protocol_name_and_level_mismatch() {
    let lvl = |name: &[u8], level: u8| {
        let mut b = vec![0, name.len() as u8];
        b.extend_from_slice(name);
        b.extend_from_slice(&[level, 0x02, 0, 0, 0, 1, b'c']);
        frame(0x10, &b)
    };
    fail(
        &lvl(b"MQTT", 3),
        V5,
        DecodeError::UnsupportedProtocolLevel { level: 3 },
        R::UnsupportedProtocolVersion,
    );
    fail(
        &lvl(b"MQTT", 6),
        V5,
        DecodeError::UnsupportedProtocolLevel { level: 6 },
        R::UnsupportedProtocolVersion,
    );
    fail(
        &lvl(b"MQIsdp", 4),
        V5,
        DecodeError::UnsupportedProtocolLevel { level: 4 },
        R::UnsupportedProtocolVersion,
    );
    fail(
        &lvl(b"MQTX", 4),
        V5,
        DecodeError::InvalidProtocolName,
        R::UnsupportedProtocolVersion,
    );
    fail(
        &lvl(b"mqtt", 4),
        V5,
        DecodeError::InvalidProtocolName,
        R::UnsupportedProtocolVersion,
    );
    assert_eq!(
        DecodeError::UnsupportedProtocolLevel { level: 6 }.connack_code_v3(),
        Some(1)
    );
}

#[test]
fn connect_reserved_flag() {
    fail(
        &connect_v311(0x03, b"c", &[]),
        V3_1_1,
        DecodeError::ConnectReservedFlag,
        R::MalformedPacket,
    );
}

#[test]
fn will_qos_or_retain_without_will_flag() {
    fail(
        &connect_v311(0x0A, b"c", &[]),
        V3_1_1,
        DecodeError::WillFlagsWithoutWill,
        R::MalformedPacket,
    );
    fail(
        &connect_v311(0x22, b"c", &[]),
        V3_1_1,
        DecodeError::WillFlagsWithoutWill,
        R::MalformedPacket,
    );
    fail(
        &connect_v5(0x12, &[], &[]),
        V5,
        DecodeError::WillFlagsWithoutWill,
        R::MalformedPacket,
    );
}

#[test]
fn will_qos_3() {
    fail(
        &connect_v311(0x1E, b"c", &[0, 1, b'w', 0, 0]),
        V3_1_1,
        DecodeError::InvalidQoS,
        R::MalformedPacket,
    );
}

#[test]
fn password_without_username_in_v311() {
    fail(
        &connect_v311(0x42, b"c", &[0, 1, b'p']),
        V3_1_1,
        DecodeError::PasswordWithoutUsername,
        R::MalformedPacket,
    );
    // Allowed in 5.0.
    let mut buf = BytesMut::from(&connect_v5(0x42, &[], &[0, 1, b'p'])[..]);
    assert!(
        matches!(decode(&mut buf, V5, MAX), Ok(Some(Packet::Connect(c))) if c.username.is_none() && c.password.is_some())
    );
}

#[test]
fn empty_client_id_without_clean_session_in_v311() {
    let e = DecodeError::EmptyClientIdWithoutCleanSession;
    assert_eq!(e.connack_code_v3(), Some(2));
    fail(
        &connect_v311(0x00, b"", &[]),
        V3_1_1,
        e,
        R::ClientIdentifierNotValid,
    );
}

#[test]
fn first_packet_must_be_connect() {
    let mut buf = BytesMut::from(&[0xC0u8, 0x00][..]);
    let e = decode_connect(&mut buf, MAX).unwrap_err();
    assert_eq!(e, DecodeError::ExpectedConnect(PacketType::PingReq));
    assert_eq!(e.reason_code(), R::ProtocolError);
    let mut codec = Codec::new(MAX);
    let mut buf = BytesMut::from(&[0x30u8, 0x03, 0, 1, b't'][..]);
    assert_eq!(
        codec.decode(&mut buf),
        Err(DecodeError::ExpectedConnect(PacketType::Publish))
    );
}

// --- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------

#[test]
fn subscription_options_reserved_bits() {
    fail(
        &frame(0x82, &[0, 1, 0, 1, b'#', 0x40]),
        V3_1_1,
        DecodeError::InvalidSubscriptionOptions(0x40),
        R::MalformedPacket,
    );
    // 3.1.1 has only the QoS bits.
    fail(
        &frame(0x82, &[0, 1, 0, 1, b'#', 0x04]),
        V3_1_1,
        DecodeError::InvalidSubscriptionOptions(0x04),
        R::MalformedPacket,
    );
    fail(
        &frame(0x82, &[0, 1, 0, 0, 1, b'#', 0xC0]),
        V5,
        DecodeError::InvalidSubscriptionOptions(0xC0),
        R::MalformedPacket,
    );
}

#[test]
fn subscription_qos_3() {
    fail(
        &frame(0x82, &[0, 1, 0, 1, b'#', 0x03]),
        V3_1_1,
        DecodeError::InvalidQoS,
        R::MalformedPacket,
    );
}

#[test]
fn retain_handling_3() {
    fail(
        &frame(0x82, &[0, 1, 0, 0, 1, b'#', 0x30]),
        V5,
        DecodeError::InvalidRetainHandling,
        R::ProtocolError,
    );
}

#[test]
fn no_local_on_shared_subscription() {
    let f = b"$share/g/a";
    let mut b = vec![0, 1, 0, 0, f.len() as u8];
    b.extend_from_slice(f);
    b.push(0x04);
    fail(
        &frame(0x82, &b),
        V5,
        DecodeError::NoLocalOnSharedSubscription,
        R::ProtocolError,
    );
}

#[test]
fn subscribe_and_unsubscribe_need_a_filter() {
    fail(
        &[0x82, 0x02, 0, 1],
        V3_1_1,
        DecodeError::NoTopicFilters(PacketType::Subscribe),
        R::ProtocolError,
    );
    fail(
        &[0xA2, 0x03, 0, 1, 0],
        V5,
        DecodeError::NoTopicFilters(PacketType::Unsubscribe),
        R::ProtocolError,
    );
}

#[test]
fn v31_follows_v311_rules() {
    // 3.1 shares 3.1.1's framing rules: e.g. reserved flags and password without user name.
    fail(
        &[0x60, 0x02, 0, 1],
        V3_1,
        DecodeError::InvalidHeaderFlags {
            packet_type: PacketType::PubRel,
            flags: 0,
        },
        R::MalformedPacket,
    );
    let mut b = vec![
        0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x42, 0, 0, 0, 1, b'c', 0, 1, b'p',
    ];
    let bytes = frame(0x10, &b);
    fail(
        &bytes,
        V3_1,
        DecodeError::PasswordWithoutUsername,
        R::MalformedPacket,
    );
    b.clear();
}
