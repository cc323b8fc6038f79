//! Golden tests: the byte examples of the MQTT 3.1.1 and 5.0 specifications, and hand-built
//! packets for every packet type and every property. Each decodes to the expected value and
//! re-encodes to the same bytes.

use bytes::{Bytes, BytesMut};
use mqttd_codec::*;

const MAX: usize = 1 << 20;
use ProtocolVersion::{V3_1, V3_1_1, V5};

fn s(v: &str) -> MqttString {
    MqttString::try_from(v).expect("valid string")
}
fn pid(v: u16) -> PacketId {
    PacketId::new(v).expect("non-zero")
}

/// Decodes `bytes` as one packet, checks it equals `expected` and re-encodes to `bytes`.
fn golden(bytes: &[u8], version: ProtocolVersion, expected: Packet) {
    let mut buf = BytesMut::from(bytes);
    let got = decode(&mut buf, version, MAX)
        .expect("decodes")
        .expect("complete");
    assert!(buf.is_empty(), "bytes left over");
    assert_eq!(got, expected);
    let mut out = BytesMut::new();
    expected.encode(version, &mut out).expect("encodes");
    assert_eq!(&out[..], bytes, "re-encoding differs");
    assert_eq!(expected.encoded_len(version), Ok(bytes.len()));
}

/// Fixed header + body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        v.push(b);
        if len == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

// --- Specification examples --------------------------------------------------------------

/// MQTT 3.1.1 §1.5.3 / 5.0 §1.5.4: "A𪛔" is 0x00 0x05 0x41 0xF0 0xAA 0x9B 0x94.
#[test]
fn spec_utf8_string_example() {
    let body = [0x00, 0x05, 0x41, 0xF0, 0xAA, 0x9B, 0x94];
    let bytes = frame(0x30, &body);
    let expected = Publish::new(
        Topic::new("A\u{2A6D4}").unwrap(),
        QoS::AtMostOnce,
        None,
        Bytes::new(),
    );
    golden(&bytes, V3_1_1, expected.into());
}

/// MQTT 3.1.1 §2.2.3 / 5.0 §1.5.5: remaining length boundaries (1 to 4 bytes).
#[test]
fn spec_remaining_length_table() {
    for (value, encoded) in [
        (0usize, vec![0x00]),
        (127, vec![0x7F]),
        (128, vec![0x80, 0x01]),
        (16_383, vec![0xFF, 0x7F]),
        (16_384, vec![0x80, 0x80, 0x01]),
        (2_097_151, vec![0xFF, 0xFF, 0x7F]),
        (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        (268_435_455, vec![0xFF, 0xFF, 0xFF, 0x7F]),
    ] {
        let mut header = vec![0x30];
        header.extend_from_slice(&encoded);
        let expected = if value == 0 {
            Status::Complete { len: 2 }
        } else {
            Status::Incomplete { needed: value }
        };
        assert_eq!(check(&header, MAX_PACKET_SIZE), Ok(expected), "{value}");
    }
    // A real packet at the two-byte boundary: 2 (topic length) + 1 (topic) + 125 payload.
    let payload = Bytes::from(vec![7u8; 125]);
    let p = Publish::new(Topic::new("t").unwrap(), QoS::AtMostOnce, None, payload);
    let bytes = Packet::from(p).to_bytes(V3_1_1).unwrap();
    assert_eq!(&bytes[..3], &[0x30, 0x80, 0x01]);
}

/// MQTT 3.1.1 §3.1.2.10 Figure 3.6: the CONNECT variable header example (flags 0xCE,
/// keep alive 10), completed with the payload fields the flags announce.
#[test]
fn spec_connect_v311_example() {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A];
    body.extend_from_slice(&[0x00, 0x03, b'c', b'i', b'd']);
    body.extend_from_slice(&[0x00, 0x03, b'w', b'/', b't']);
    body.extend_from_slice(&[0x00, 0x03, b'b', b'y', b'e']);
    body.extend_from_slice(&[0x00, 0x01, b'u']);
    body.extend_from_slice(&[0x00, 0x01, b'p']);
    let expected = Connect {
        protocol_version: V3_1_1,
        clean_start: true,
        keep_alive: 10,
        client_id: s("cid"),
        will: Some(Will {
            topic: Topic::new("w/t").unwrap(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties::default(),
        }),
        username: Some(s("u")),
        password: Some(Bytes::from_static(b"p")),
        properties: ConnectProperties::default(),
    };
    golden(&frame(0x10, &body), V3_1_1, expected.into());
}

/// MQTT 5.0 §3.1.2.11 Figure 3-6: the CONNECT variable header example (flags 0xC2, keep alive
/// 10, Session Expiry Interval 10).
#[test]
fn spec_connect_v5_example() {
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xC2, 0x00, 0x0A, 0x05, 0x11, 0x00, 0x00, 0x00,
        0x0A,
    ];
    body.extend_from_slice(&[0x00, 0x02, b'i', b'd']);
    body.extend_from_slice(&[0x00, 0x04, b'u', b's', b'e', b'r']);
    body.extend_from_slice(&[0x00, 0x02, 0xDE, 0xAD]);
    let mut expected = Connect::new(V5, s("id"), 10);
    expected.username = Some(s("user"));
    expected.password = Some(Bytes::from_static(&[0xDE, 0xAD]));
    expected.properties.session_expiry_interval = Some(10);
    let bytes = frame(0x10, &body);
    golden(&bytes, V5, expected.clone().into());
    // And as the first packet of a connection, before the version is known.
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(decode_connect(&mut buf, MAX), Ok(Some(expected)));
}

/// MQTT 3.1 CONNECT: protocol name `MQIsdp`, level 3.
#[test]
fn connect_v31() {
    let mut body = vec![
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C,
    ];
    body.extend_from_slice(&[0x00, 0x01, b'c']);
    let expected = Connect::new(V3_1, s("c"), 60);
    let bytes = frame(0x10, &body);
    golden(&bytes, V3_1, expected.clone().into());
    let mut codec = Codec::new(MAX);
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(codec.decode(&mut buf), Ok(Some(expected.into())));
    assert_eq!(codec.version(), Some(V3_1));
}

/// MQTT 3.1.1 §3.3.2.3 Figure 3.11: PUBLISH variable header example (topic `a/b`, packet
/// identifier 10).
#[test]
fn spec_publish_example() {
    let body = [0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i'];
    let expected = Publish::new(
        Topic::new("a/b").unwrap(),
        QoS::AtLeastOnce,
        Some(pid(10)),
        Bytes::from_static(b"hi"),
    );
    golden(&frame(0x32, &body), V3_1_1, expected.clone().into());
    // Same bytes, flags DUP + QoS 2 + RETAIN.
    let mut q2 = expected;
    q2.qos = QoS::ExactlyOnce;
    q2.dup = true;
    q2.retain = true;
    golden(&frame(0x3D, &body), V3_1_1, q2.into());
}

/// MQTT 3.1.1 §3.8.3 Figure 3.22: SUBSCRIBE payload example (`a/b` QoS 1, `c/d` QoS 2,
/// packet identifier 10).
#[test]
fn spec_subscribe_example() {
    let bytes = [
        0x82, 0x0E, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/', b'd',
        0x02,
    ];
    let expected = Subscribe {
        packet_id: pid(10),
        filters: vec![
            SubscribeFilter {
                filter: TopicFilter::new("a/b").unwrap(),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            },
            SubscribeFilter {
                filter: TopicFilter::new("c/d").unwrap(),
                options: SubscriptionOptions::qos(QoS::ExactlyOnce),
            },
        ],
        properties: SubscribeProperties::default(),
    };
    golden(&bytes, V3_1_1, expected.into());
}

/// MQTT 3.1.1 §3.9.3 Figure 3.26: SUBACK payload example (0, 1, 2, failure 0x80).
#[test]
fn spec_suback_example() {
    let bytes = [0x90, 0x06, 0x00, 0x0A, 0x00, 0x01, 0x02, 0x80];
    let expected = SubAck {
        packet_id: pid(10),
        reason_codes: vec![
            ReasonCode::GRANTED_QOS0,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError,
        ],
        properties: AckProperties::default(),
    };
    golden(&bytes, V3_1_1, expected.into());
}

/// MQTT 3.1.1 §3.10.3 Figure 3.30: UNSUBSCRIBE payload example (`a/b`, `c/d`).
#[test]
fn spec_unsubscribe_example() {
    let bytes = [
        0xA2, 0x0C, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x03, b'c', b'/', b'd',
    ];
    let expected = Unsubscribe {
        packet_id: pid(10),
        filters: vec![
            TopicFilter::new("a/b").unwrap(),
            TopicFilter::new("c/d").unwrap(),
        ],
        properties: UnsubscribeProperties::default(),
    };
    golden(&bytes, V3_1_1, expected.into());
}

// --- Every packet type, both versions ------------------------------------------------------

#[test]
fn connack_v311() {
    golden(
        &[0x20, 0x02, 0x00, 0x00],
        V3_1_1,
        ConnAck::new(ReasonCode::Success).into(),
    );
    let mut present = ConnAck::new(ReasonCode::Success);
    present.session_present = true;
    golden(&[0x20, 0x02, 0x01, 0x00], V3_1_1, present.into());
    for (code, rc) in [
        (1, ReasonCode::UnsupportedProtocolVersion),
        (2, ReasonCode::ClientIdentifierNotValid),
        (3, ReasonCode::ServerUnavailable),
        (4, ReasonCode::BadUserNameOrPassword),
        (5, ReasonCode::NotAuthorized),
    ] {
        golden(&[0x20, 0x02, 0x00, code], V3_1_1, ConnAck::new(rc).into());
    }
}

#[test]
fn connack_v5() {
    golden(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        V5,
        ConnAck::new(ReasonCode::Success).into(),
    );
    golden(
        &[0x20, 0x03, 0x00, 0x8A, 0x00],
        V5,
        ConnAck::new(ReasonCode::Banned).into(),
    );
}

#[test]
fn acks_v311() {
    golden(
        &[0x40, 0x02, 0x00, 0x0A],
        V3_1_1,
        PubAck::new(pid(10)).into(),
    );
    golden(
        &[0x50, 0x02, 0x00, 0x0A],
        V3_1_1,
        PubRec::new(pid(10)).into(),
    );
    golden(
        &[0x62, 0x02, 0x00, 0x0A],
        V3_1_1,
        PubRel::new(pid(10)).into(),
    );
    golden(
        &[0x70, 0x02, 0x00, 0x0A],
        V3_1_1,
        PubComp::new(pid(10)).into(),
    );
    golden(
        &[0xB0, 0x02, 0x00, 0x0A],
        V3_1_1,
        UnsubAck {
            packet_id: pid(10),
            reason_codes: vec![],
            properties: AckProperties::default(),
        }
        .into(),
    );
    golden(&[0xC0, 0x00], V3_1_1, Packet::PingReq);
    golden(&[0xD0, 0x00], V3_1_1, Packet::PingResp);
    golden(&[0xE0, 0x00], V3_1_1, Disconnect::default().into());
}

#[test]
fn acks_v5_short_and_long_forms() {
    golden(&[0x40, 0x02, 0x01, 0x00], V5, PubAck::new(pid(256)).into());
    let mut a = PubAck::new(pid(1));
    a.reason_code = ReasonCode::NoMatchingSubscribers;
    golden(&[0x40, 0x03, 0x00, 0x01, 0x10], V5, a.clone().into());
    a.properties.reason_string = Some(s("r"));
    golden(
        &[0x40, 0x08, 0x00, 0x01, 0x10, 0x04, 0x1F, 0x00, 0x01, b'r'],
        V5,
        a.into(),
    );
    // The long forms with Success and empty properties decode too.
    for bytes in [
        &[0x40u8, 0x03, 0x00, 0x01, 0x00][..],
        &[0x40, 0x04, 0x00, 0x01, 0x00, 0x00],
    ] {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(
            decode(&mut buf, V5, MAX),
            Ok(Some(PubAck::new(pid(1)).into()))
        );
    }
    let mut rel = PubRel::new(pid(2));
    rel.reason_code = ReasonCode::PacketIdentifierNotFound;
    golden(&[0x62, 0x03, 0x00, 0x02, 0x92], V5, rel.into());
    let mut comp = PubComp::new(pid(2));
    comp.reason_code = ReasonCode::PacketIdentifierNotFound;
    golden(&[0x70, 0x03, 0x00, 0x02, 0x92], V5, comp.into());
    let mut rec = PubRec::new(pid(3));
    rec.reason_code = ReasonCode::QuotaExceeded;
    golden(&[0x50, 0x03, 0x00, 0x03, 0x97], V5, rec.into());
}

#[test]
fn subscribe_v5_options() {
    let bytes = [
        0x82, 0x0B, 0x00, 0x01, 0x02, 0x0B, 0x07, 0x00, 0x03, b'a', b'/', b'+', 0x2E,
    ];
    let expected = Subscribe {
        packet_id: pid(1),
        filters: vec![SubscribeFilter {
            filter: TopicFilter::new("a/+").unwrap(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: Some(7),
            user_properties: UserProperties::new(),
        },
    };
    golden(&bytes, V5, expected.into());
}

#[test]
fn suback_unsuback_v5() {
    golden(
        &[0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0xA2],
        V5,
        SubAck {
            packet_id: pid(1),
            reason_codes: vec![
                ReasonCode::GrantedQoS1,
                ReasonCode::WildcardSubscriptionsNotSupported,
            ],
            properties: AckProperties::default(),
        }
        .into(),
    );
    golden(
        &[0xB0, 0x05, 0x00, 0x01, 0x00, 0x00, 0x11],
        V5,
        UnsubAck {
            packet_id: pid(1),
            reason_codes: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
            properties: AckProperties::default(),
        }
        .into(),
    );
    golden(
        &[0xA2, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'#'],
        V5,
        Unsubscribe {
            packet_id: pid(1),
            filters: vec![TopicFilter::new("#").unwrap()],
            properties: UnsubscribeProperties::default(),
        }
        .into(),
    );
}

#[test]
fn disconnect_and_auth_v5() {
    golden(&[0xE0, 0x00], V5, Disconnect::default().into());
    golden(
        &[0xE0, 0x01, 0x04],
        V5,
        Disconnect::new(ReasonCode::DisconnectWithWillMessage).into(),
    );
    let mut d = Disconnect::new(ReasonCode::ServerMoved);
    d.properties.server_reference = Some(s("h"));
    golden(
        &[0xE0, 0x06, 0x9D, 0x04, 0x1C, 0x00, 0x01, b'h'],
        V5,
        d.into(),
    );
    golden(&[0xF0, 0x00], V5, Auth::default().into());
    let mut a = Auth {
        reason_code: ReasonCode::ContinueAuthentication,
        ..Auth::default()
    };
    a.properties.authentication_method = Some(s("SCRAM"));
    a.properties.authentication_data = Some(Bytes::from_static(&[1, 2]));
    golden(
        &[
            0xF0, 0x0F, 0x18, 0x0D, 0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', 0x16, 0x00,
            0x02, 0x01, 0x02,
        ],
        V5,
        a.into(),
    );
}

// --- Every property ------------------------------------------------------------------------

fn up(k: &str, v: &str) -> UserProperty {
    UserProperty::new(s(k), s(v))
}

/// Bytes of a property section: length prefix + properties.
fn props(p: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = p.concat();
    assert!(body.len() < 128);
    let mut v = vec![body.len() as u8];
    v.extend(body);
    v
}

#[test]
fn every_connect_property() {
    let mut c = Connect::new(V5, s("c"), 0);
    c.properties = ConnectProperties {
        session_expiry_interval: Some(0x0102_0304),
        receive_maximum: Some(20),
        maximum_packet_size: Some(0x1000),
        topic_alias_maximum: Some(5),
        request_response_information: Some(true),
        request_problem_information: Some(false),
        authentication_method: Some(s("m")),
        authentication_data: Some(Bytes::from_static(b"d")),
        user_properties: vec![up("k", "v"), up("k", "w")].into(),
    };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00];
    body.extend(props(&[
        &[0x11, 1, 2, 3, 4],
        &[0x21, 0, 20],
        &[0x27, 0, 0, 0x10, 0],
        &[0x22, 0, 5],
        &[0x19, 1],
        &[0x17, 0],
        &[0x15, 0, 1, b'm'],
        &[0x16, 0, 1, b'd'],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
        &[0x26, 0, 1, b'k', 0, 1, b'w'],
    ]));
    body.extend([0x00, 0x01, b'c']);
    golden(&frame(0x10, &body), V5, c.into());
}

#[test]
fn every_will_property() {
    let mut c = Connect::new(V5, s("c"), 0);
    c.will = Some(Will {
        topic: Topic::new("w").unwrap(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: WillProperties {
            will_delay_interval: Some(30),
            payload_format_indicator: Some(PayloadFormat::Utf8),
            message_expiry_interval: Some(60),
            content_type: Some(s("t")),
            response_topic: Some(Topic::new("r").unwrap()),
            correlation_data: Some(Bytes::from_static(&[9])),
            user_properties: vec![up("a", "b")].into(),
        },
    });
    // Flags: will retain 0x20 | will QoS 2 0x10 | will flag 0x04 | clean start 0x02.
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x36, 0x00, 0x00, 0x00,
    ];
    body.extend([0x00, 0x01, b'c']);
    body.extend(props(&[
        &[0x18, 0, 0, 0, 30],
        &[0x01, 1],
        &[0x02, 0, 0, 0, 60],
        &[0x03, 0, 1, b't'],
        &[0x08, 0, 1, b'r'],
        &[0x09, 0, 1, 9],
        &[0x26, 0, 1, b'a', 0, 1, b'b'],
    ]));
    body.extend([0x00, 0x01, b'w', 0x00, 0x01, b'x']);
    golden(&frame(0x10, &body), V5, c.into());
}

#[test]
fn every_connack_property() {
    let c = ConnAck {
        session_present: true,
        reason_code: ReasonCode::Success,
        properties: ConnAckProperties {
            session_expiry_interval: Some(1),
            receive_maximum: Some(2),
            maximum_qos: Some(QoS::AtLeastOnce),
            retain_available: Some(false),
            maximum_packet_size: Some(3),
            assigned_client_identifier: Some(s("a")),
            topic_alias_maximum: Some(4),
            reason_string: Some(s("r")),
            user_properties: vec![up("k", "v")].into(),
            wildcard_subscription_available: Some(true),
            subscription_identifiers_available: Some(false),
            shared_subscription_available: Some(true),
            server_keep_alive: Some(5),
            response_information: Some(s("i")),
            server_reference: Some(s("s")),
            authentication_method: Some(s("m")),
            authentication_data: Some(Bytes::from_static(b"d")),
        },
    };
    let mut body = vec![0x01, 0x00];
    body.extend(props(&[
        &[0x11, 0, 0, 0, 1],
        &[0x21, 0, 2],
        &[0x24, 1],
        &[0x25, 0],
        &[0x27, 0, 0, 0, 3],
        &[0x12, 0, 1, b'a'],
        &[0x22, 0, 4],
        &[0x1F, 0, 1, b'r'],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
        &[0x28, 1],
        &[0x29, 0],
        &[0x2A, 1],
        &[0x13, 0, 5],
        &[0x1A, 0, 1, b'i'],
        &[0x1C, 0, 1, b's'],
        &[0x15, 0, 1, b'm'],
        &[0x16, 0, 1, b'd'],
    ]));
    golden(&frame(0x20, &body), V5, c.into());
}

#[test]
fn every_publish_property() {
    let mut p = Publish::new(
        Topic::empty(),
        QoS::AtLeastOnce,
        Some(pid(1)),
        Bytes::from_static(b"P"),
    );
    p.properties = PublishProperties {
        payload_format_indicator: Some(PayloadFormat::Unspecified),
        message_expiry_interval: Some(7),
        topic_alias: Some(3),
        response_topic: Some(Topic::new("r/t").unwrap()),
        correlation_data: Some(Bytes::from_static(&[0, 1])),
        user_properties: vec![up("x", "y"), up("x", "z")].into(),
        subscription_identifiers: vec![1, 16_384],
        content_type: Some(s("json")),
    };
    let mut body = vec![0x00, 0x00, 0x00, 0x01];
    body.extend(props(&[
        &[0x01, 0],
        &[0x02, 0, 0, 0, 7],
        &[0x23, 0, 3],
        &[0x08, 0, 3, b'r', b'/', b't'],
        &[0x09, 0, 2, 0, 1],
        &[0x26, 0, 1, b'x', 0, 1, b'y'],
        &[0x26, 0, 1, b'x', 0, 1, b'z'],
        &[0x0B, 1],
        &[0x0B, 0x80, 0x80, 0x01],
        &[0x03, 0, 4, b'j', b's', b'o', b'n'],
    ]));
    body.push(b'P');
    golden(&frame(0x32, &body), V5, p.into());
}

#[test]
fn every_ack_property() {
    let ap = AckProperties {
        reason_string: Some(s("why")),
        user_properties: vec![up("k", "v")].into(),
    };
    let section = props(&[
        &[0x1F, 0, 3, b'w', b'h', b'y'],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
    ]);
    for (first, make) in [
        (
            0x40u8,
            (|a: AckProperties| {
                PubAck {
                    packet_id: PacketId::MIN,
                    reason_code: ReasonCode::Success,
                    properties: a,
                }
                .into()
            }) as fn(AckProperties) -> Packet,
        ),
        (0x50, |a| {
            PubRec {
                packet_id: PacketId::MIN,
                reason_code: ReasonCode::Success,
                properties: a,
            }
            .into()
        }),
        (0x62, |a| {
            PubRel {
                packet_id: PacketId::MIN,
                reason_code: ReasonCode::Success,
                properties: a,
            }
            .into()
        }),
        (0x70, |a| {
            PubComp {
                packet_id: PacketId::MIN,
                reason_code: ReasonCode::Success,
                properties: a,
            }
            .into()
        }),
    ] {
        let mut body = vec![0x00, 0x01, 0x00];
        body.extend(&section);
        golden(&frame(first, &body), V5, make(ap.clone()));
    }
    let mut body = vec![0x00, 0x01];
    body.extend(&section);
    body.push(0x00);
    golden(
        &frame(0x90, &body),
        V5,
        SubAck {
            packet_id: PacketId::MIN,
            reason_codes: vec![ReasonCode::Success],
            properties: ap.clone(),
        }
        .into(),
    );
    golden(
        &frame(0xB0, &body),
        V5,
        UnsubAck {
            packet_id: PacketId::MIN,
            reason_codes: vec![ReasonCode::Success],
            properties: ap,
        }
        .into(),
    );
}

#[test]
fn every_subscribe_unsubscribe_disconnect_auth_property() {
    let mut body = vec![0x00, 0x01];
    body.extend(props(&[
        &[0x0B, 0xFF, 0xFF, 0xFF, 0x7F],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
    ]));
    body.extend([0x00, 0x01, b'#', 0x00]);
    golden(
        &frame(0x82, &body),
        V5,
        Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![SubscribeFilter {
                filter: TopicFilter::new("#").unwrap(),
                options: SubscriptionOptions::default(),
            }],
            properties: SubscribeProperties {
                subscription_identifier: Some(VARINT_MAX),
                user_properties: vec![up("k", "v")].into(),
            },
        }
        .into(),
    );
    let mut body = vec![0x00, 0x01];
    body.extend(props(&[&[0x26, 0, 1, b'k', 0, 1, b'v']]));
    body.extend([0x00, 0x01, b'#']);
    golden(
        &frame(0xA2, &body),
        V5,
        Unsubscribe {
            packet_id: PacketId::MIN,
            filters: vec![TopicFilter::new("#").unwrap()],
            properties: UnsubscribeProperties {
                user_properties: vec![up("k", "v")].into(),
            },
        }
        .into(),
    );
    let mut body = vec![0x00];
    body.extend(props(&[
        &[0x11, 0, 0, 0, 9],
        &[0x1F, 0, 1, b'r'],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
        &[0x1C, 0, 1, b's'],
    ]));
    golden(
        &frame(0xE0, &body),
        V5,
        Disconnect {
            reason_code: ReasonCode::NORMAL_DISCONNECTION,
            properties: DisconnectProperties {
                session_expiry_interval: Some(9),
                reason_string: Some(s("r")),
                user_properties: vec![up("k", "v")].into(),
                server_reference: Some(s("s")),
            },
        }
        .into(),
    );
    let mut body = vec![0x19];
    body.extend(props(&[
        &[0x15, 0, 1, b'm'],
        &[0x16, 0, 1, b'd'],
        &[0x1F, 0, 1, b'r'],
        &[0x26, 0, 1, b'k', 0, 1, b'v'],
    ]));
    golden(
        &frame(0xF0, &body),
        V5,
        Auth {
            reason_code: ReasonCode::ReAuthenticate,
            properties: AuthProperties {
                authentication_method: Some(s("m")),
                authentication_data: Some(Bytes::from_static(b"d")),
                reason_string: Some(s("r")),
                user_properties: vec![up("k", "v")].into(),
            },
        }
        .into(),
    );
}

#[test]
fn properties_are_dropped_in_v311() {
    let mut p = Publish::new(
        Topic::new("t").unwrap(),
        QoS::AtMostOnce,
        None,
        Bytes::from_static(b"x"),
    );
    p.properties.user_properties.push("k", "v").unwrap();
    let bytes = Packet::from(p).to_bytes(V3_1_1).unwrap();
    assert_eq!(&bytes[..], &[0x30, 0x04, 0x00, 0x01, b't', b'x']);
}

#[test]
fn streaming_reports_missing_bytes_and_zero_copy() {
    let p = Publish::new(
        Topic::new("a/b").unwrap(),
        QoS::AtLeastOnce,
        Some(pid(5)),
        Bytes::from(vec![1u8; 300]),
    );
    let bytes = Packet::from(p.clone()).to_bytes(V5).unwrap();
    let total = bytes.len();
    // Feed byte by byte: every prefix is incomplete with an exact count once the header is in.
    let mut buf = BytesMut::new();
    for (i, b) in bytes.iter().enumerate() {
        let status = check(&buf, MAX).unwrap();
        match status {
            Status::Incomplete { needed } => {
                if i >= 3 {
                    assert_eq!(needed, total - i);
                } else {
                    assert!(needed >= 1);
                }
            }
            Status::Complete { .. } => panic!("complete too early"),
        }
        assert_eq!(decode(&mut buf, V5, MAX), Ok(None));
        buf.extend_from_slice(&[*b]);
    }
    assert_eq!(check(&buf, MAX), Ok(Status::Complete { len: total }));
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(got)) = decode(&mut buf, V5, MAX).unwrap() else {
        panic!("not a publish")
    };
    assert_eq!(got, p);
    // Topic and payload point into the receive buffer.
    let within = |ptr: *const u8| (base..base + total).contains(&(ptr as usize));
    assert!(within(got.topic.as_bytes().as_ptr()));
    assert!(within(got.payload.as_ptr()));
}

#[test]
fn back_to_back_packets() {
    let mut buf = BytesMut::new();
    let packets: Vec<Packet> = vec![
        Packet::PingReq,
        PubAck::new(pid(1)).into(),
        Publish::new(
            Topic::new("x").unwrap(),
            QoS::AtMostOnce,
            None,
            Bytes::from_static(b"1"),
        )
        .into(),
        Disconnect::default().into(),
    ];
    for p in &packets {
        p.encode(V3_1_1, &mut buf).unwrap();
    }
    let mut bytes = buf.clone().freeze();
    for p in &packets {
        assert_eq!(decode(&mut buf, V3_1_1, MAX).unwrap().as_ref(), Some(p));
        assert_eq!(
            decode_bytes(&mut bytes, V3_1_1, MAX).unwrap().as_ref(),
            Some(p)
        );
    }
    assert!(buf.is_empty() && bytes.is_empty());
    assert_eq!(decode(&mut buf, V3_1_1, MAX), Ok(None));
}

#[test]
fn user_properties_interleaved_with_other_properties() {
    // User Property, Content Type, User Property: decoded in order; re-encoded together.
    let props_bytes = props(&[
        &[0x26, 0, 1, b'a', 0, 1, b'1'],
        &[0x03, 0, 1, b't'],
        &[0x26, 0, 1, b'b', 0, 1, b'2'],
    ]);
    let mut body = vec![0, 1, b'x'];
    body.extend(&props_bytes);
    let bytes = frame(0x30, &body);
    let mut buf = BytesMut::from(&bytes[..]);
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, V5, MAX) else {
        panic!()
    };
    let pairs: Vec<_> = p.properties.user_properties.iter().collect();
    assert_eq!(pairs, vec![("a", "1"), ("b", "2")]);
    assert_eq!(p.properties.user_properties.get("b"), Some("2"));
    assert_eq!(p.properties.content_type, Some(s("t")));
    let again = Packet::from(p.clone()).to_bytes(V5).unwrap();
    assert_eq!(again.len(), bytes.len());
    assert_eq!(decode_frame(again, V5).unwrap(), Packet::Publish(p.clone()));
    let owned = p.properties.user_properties.to_vec();
    assert_eq!(owned, vec![up("a", "1"), up("b", "2")]);
}
