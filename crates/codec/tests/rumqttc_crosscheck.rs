//! Cross-checks with an independent codec, rumqttc's `mqttbytes` (v4 = MQTT 3.1.1, v5):
//! over a generated corpus, packets we encode decode with rumqttc to the same packet, and
//! packets rumqttc encodes decode with ours to the same packet.
//!
//! The corpus is restricted to what rumqttc can represent: no AUTH (it has none), passwords
//! that are non-empty UTF-8 and user names that are non-empty (it uses "" for absent), no
//! 5.0 DISCONNECT properties (rumqttc does not export the type to build them). rumqttc 0.24's
//! 5.0 DISCONNECT is broken in three ways, so 5.0 DISCONNECT is only cross-checked for the
//! packet rumqttc writes correctly (Normal disconnection, two bytes) in the rumqttc-to-ours
//! direction: its `Packet::read` rejects a remaining length of 0 (allowed by §3.14.2.1), its
//! `Disconnect::read` requires a property length after the reason code (§3.14.2.2.1 makes it
//! optional), and its `Disconnect::write` without properties announces a remaining length of 1
//! but writes two bytes (our decoder rightly reports the stray byte).

mod common;

use bytes::{Bytes, BytesMut};
use mqttd_codec::*;
use proptest::prelude::*;
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::QoS as R5QoS;
use rumqttc::v5::mqttbytes::v5 as r5;

const MAX: usize = 1 << 20;

fn s(v: &MqttString) -> String {
    v.as_str().to_owned()
}
fn os(v: &Option<MqttString>) -> Option<String> {
    v.as_ref().map(s)
}
fn users(u: &UserProperties) -> Vec<(String, String)> {
    u.iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
fn q4(q: QoS) -> rumqttc::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}
fn q5(q: QoS) -> R5QoS {
    match q {
        QoS::AtMostOnce => R5QoS::AtMostOnce,
        QoS::AtLeastOnce => R5QoS::AtLeastOnce,
        QoS::ExactlyOnce => R5QoS::ExactlyOnce,
    }
}
fn flag(b: Option<bool>) -> Option<u8> {
    b.map(u8::from)
}
fn fmt(f: Option<PayloadFormat>) -> Option<u8> {
    f.map(|f| match f {
        PayloadFormat::Unspecified => 0,
        PayloadFormat::Utf8 => 1,
    })
}
fn pid(p: Option<PacketId>) -> u16 {
    p.map_or(0, PacketId::get)
}

/// Makes a generated packet representable by rumqttc (see the module docs).
fn representable(mut p: Packet, v: ProtocolVersion) -> Option<Packet> {
    match &mut p {
        Packet::Auth(_) => return None,
        Packet::Connect(c) => {
            if c.username.as_ref().is_some_and(|u| u.is_empty()) {
                c.username = Some(MqttString::try_from("user").unwrap());
            }
            if let Some(pw) = &c.password
                && (pw.is_empty() || std::str::from_utf8(pw).is_err() || pw.contains(&0))
            {
                c.password = Some(Bytes::from_static(b"secret"));
            }
            if !v.is_v5() && c.password.is_some() && c.username.is_none() {
                c.password = None;
            }
        }
        // rumqttc does not export its `DisconnectProperties`.
        Packet::Disconnect(d) => d.properties = DisconnectProperties::default(),
        _ => {}
    }
    Some(p)
}

// --- ours -> rumqttc v4 --------------------------------------------------------------------

fn to_r4(p: &Packet) -> r4::Packet {
    use r4::Packet as P;
    match p {
        Packet::Connect(c) => P::Connect(r4::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive: c.keep_alive,
            client_id: s(&c.client_id),
            clean_session: c.clean_start,
            last_will: c.will.as_ref().map(|w| r4::LastWill {
                topic: w.topic.to_string(),
                message: w.payload.clone(),
                qos: q4(w.qos),
                retain: w.retain,
            }),
            login: c.username.as_ref().map(|u| r4::Login {
                username: s(u),
                password: c
                    .password
                    .as_ref()
                    .map(|p| String::from_utf8(p.to_vec()).unwrap())
                    .unwrap_or_default(),
            }),
        }),
        Packet::ConnAck(c) => P::ConnAck(r4::ConnAck {
            session_present: c.session_present,
            code: match c.reason_code.to_v3_connack() {
                0 => r4::ConnectReturnCode::Success,
                1 => r4::ConnectReturnCode::RefusedProtocolVersion,
                2 => r4::ConnectReturnCode::BadClientId,
                3 => r4::ConnectReturnCode::ServiceUnavailable,
                4 => r4::ConnectReturnCode::BadUserNamePassword,
                _ => r4::ConnectReturnCode::NotAuthorized,
            },
        }),
        Packet::Publish(x) => P::Publish(r4::Publish {
            dup: x.dup,
            qos: q4(x.qos),
            retain: x.retain,
            topic: x.topic.to_string(),
            pkid: pid(x.packet_id),
            payload: x.payload.clone(),
        }),
        Packet::PubAck(a) => P::PubAck(r4::PubAck {
            pkid: a.packet_id.get(),
        }),
        Packet::PubRec(a) => P::PubRec(r4::PubRec {
            pkid: a.packet_id.get(),
        }),
        Packet::PubRel(a) => P::PubRel(r4::PubRel {
            pkid: a.packet_id.get(),
        }),
        Packet::PubComp(a) => P::PubComp(r4::PubComp {
            pkid: a.packet_id.get(),
        }),
        Packet::Subscribe(x) => P::Subscribe(r4::Subscribe {
            pkid: x.packet_id.get(),
            filters: x
                .filters
                .iter()
                .map(|f| r4::SubscribeFilter {
                    path: f.filter.to_string(),
                    qos: q4(f.options.qos),
                })
                .collect(),
        }),
        Packet::SubAck(x) => P::SubAck(r4::SubAck {
            pkid: x.packet_id.get(),
            return_codes: x
                .reason_codes
                .iter()
                .map(|c| match c.to_v3_suback() {
                    0 => r4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
                    1 => r4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                    2 => r4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::ExactlyOnce),
                    _ => r4::SubscribeReasonCode::Failure,
                })
                .collect(),
        }),
        Packet::Unsubscribe(x) => P::Unsubscribe(r4::Unsubscribe {
            pkid: x.packet_id.get(),
            topics: x.filters.iter().map(|f| f.to_string()).collect(),
        }),
        Packet::UnsubAck(x) => P::UnsubAck(r4::UnsubAck {
            pkid: x.packet_id.get(),
        }),
        Packet::PingReq => P::PingReq,
        Packet::PingResp => P::PingResp,
        Packet::Disconnect(_) => P::Disconnect,
        Packet::Auth(_) => unreachable!("filtered out"),
    }
}

fn write_r4(p: &r4::Packet, buf: &mut BytesMut) {
    use r4::Packet as P;
    let r = match p {
        P::Connect(x) => x.write(buf),
        P::ConnAck(x) => x.write(buf),
        P::Publish(x) => x.write(buf),
        P::PubAck(x) => x.write(buf),
        P::PubRec(x) => x.write(buf),
        P::PubRel(x) => x.write(buf),
        P::PubComp(x) => x.write(buf),
        P::Subscribe(x) => x.write(buf),
        P::SubAck(x) => x.write(buf),
        P::Unsubscribe(x) => x.write(buf),
        P::UnsubAck(x) => x.write(buf),
        P::PingReq => r4::PingReq.write(buf),
        P::PingResp => r4::PingResp.write(buf),
        P::Disconnect => r4::Disconnect.write(buf),
    };
    r.expect("rumqttc v4 writes");
}

// --- ours -> rumqttc v5 --------------------------------------------------------------------

fn r5_conn_code(c: ReasonCode) -> r5::ConnectReturnCode {
    use ReasonCode as R;
    use r5::ConnectReturnCode as C;
    match c {
        R::Success => C::Success,
        R::UnspecifiedError => C::UnspecifiedError,
        R::MalformedPacket => C::MalformedPacket,
        R::ProtocolError => C::ProtocolError,
        R::ImplementationSpecificError => C::ImplementationSpecificError,
        R::UnsupportedProtocolVersion => C::UnsupportedProtocolVersion,
        R::ClientIdentifierNotValid => C::ClientIdentifierNotValid,
        R::BadUserNameOrPassword => C::BadUserNamePassword,
        R::NotAuthorized => C::NotAuthorized,
        R::ServerUnavailable => C::ServerUnavailable,
        R::ServerBusy => C::ServerBusy,
        R::Banned => C::Banned,
        R::BadAuthenticationMethod => C::BadAuthenticationMethod,
        R::TopicNameInvalid => C::TopicNameInvalid,
        R::PacketTooLarge => C::PacketTooLarge,
        R::QuotaExceeded => C::QuotaExceeded,
        R::PayloadFormatInvalid => C::PayloadFormatInvalid,
        R::RetainNotSupported => C::RetainNotSupported,
        R::QoSNotSupported => C::QoSNotSupported,
        R::UseAnotherServer => C::UseAnotherServer,
        R::ServerMoved => C::ServerMoved,
        R::ConnectionRateExceeded => C::ConnectionRateExceeded,
        other => panic!("not a CONNACK code: {other}"),
    }
}

macro_rules! pub_reason {
    ($name:ident, $ty:ty) => {
        fn $name(c: ReasonCode) -> $ty {
            use ReasonCode as R;
            type T = $ty;
            match c {
                R::Success => T::Success,
                R::NoMatchingSubscribers => T::NoMatchingSubscribers,
                R::UnspecifiedError => T::UnspecifiedError,
                R::ImplementationSpecificError => T::ImplementationSpecificError,
                R::NotAuthorized => T::NotAuthorized,
                R::TopicNameInvalid => T::TopicNameInvalid,
                R::PacketIdentifierInUse => T::PacketIdentifierInUse,
                R::QuotaExceeded => T::QuotaExceeded,
                R::PayloadFormatInvalid => T::PayloadFormatInvalid,
                other => panic!("not a PUBACK/PUBREC code: {other}"),
            }
        }
    };
}
pub_reason!(r5_puback, r5::PubAckReason);
pub_reason!(r5_pubrec, r5::PubRecReason);

fn r5_pubrel(c: ReasonCode) -> r5::PubRelReason {
    if c == ReasonCode::Success {
        r5::PubRelReason::Success
    } else {
        r5::PubRelReason::PacketIdentifierNotFound
    }
}
fn r5_pubcomp(c: ReasonCode) -> r5::PubCompReason {
    if c == ReasonCode::Success {
        r5::PubCompReason::Success
    } else {
        r5::PubCompReason::PacketIdentifierNotFound
    }
}

fn r5_suback(c: ReasonCode) -> r5::SubscribeReasonCode {
    use ReasonCode as R;
    use r5::SubscribeReasonCode as S;
    match c {
        R::Success => S::Success(R5QoS::AtMostOnce),
        R::GrantedQoS1 => S::Success(R5QoS::AtLeastOnce),
        R::GrantedQoS2 => S::Success(R5QoS::ExactlyOnce),
        R::UnspecifiedError => S::Unspecified,
        R::ImplementationSpecificError => S::ImplementationSpecific,
        R::NotAuthorized => S::NotAuthorized,
        R::TopicFilterInvalid => S::TopicFilterInvalid,
        R::PacketIdentifierInUse => S::PkidInUse,
        R::QuotaExceeded => S::QuotaExceeded,
        R::SharedSubscriptionsNotSupported => S::SharedSubscriptionsNotSupported,
        R::SubscriptionIdentifiersNotSupported => S::SubscriptionIdNotSupported,
        R::WildcardSubscriptionsNotSupported => S::WildcardSubscriptionsNotSupported,
        other => panic!("not a SUBACK code: {other}"),
    }
}

fn r5_unsuback(c: ReasonCode) -> r5::UnsubAckReason {
    use ReasonCode as R;
    use r5::UnsubAckReason as U;
    match c {
        R::Success => U::Success,
        R::NoSubscriptionExisted => U::NoSubscriptionExisted,
        R::UnspecifiedError => U::UnspecifiedError,
        R::ImplementationSpecificError => U::ImplementationSpecificError,
        R::NotAuthorized => U::NotAuthorized,
        R::TopicFilterInvalid => U::TopicFilterInvalid,
        R::PacketIdentifierInUse => U::PacketIdentifierInUse,
        other => panic!("not an UNSUBACK code: {other}"),
    }
}

fn r5_disconnect(c: ReasonCode) -> r5::DisconnectReasonCode {
    use ReasonCode as R;
    use r5::DisconnectReasonCode as D;
    match c {
        R::Success => D::NormalDisconnection,
        R::DisconnectWithWillMessage => D::DisconnectWithWillMessage,
        R::UnspecifiedError => D::UnspecifiedError,
        R::MalformedPacket => D::MalformedPacket,
        R::ProtocolError => D::ProtocolError,
        R::ImplementationSpecificError => D::ImplementationSpecificError,
        R::NotAuthorized => D::NotAuthorized,
        R::ServerBusy => D::ServerBusy,
        R::ServerShuttingDown => D::ServerShuttingDown,
        R::KeepAliveTimeout => D::KeepAliveTimeout,
        R::SessionTakenOver => D::SessionTakenOver,
        R::TopicFilterInvalid => D::TopicFilterInvalid,
        R::TopicNameInvalid => D::TopicNameInvalid,
        R::ReceiveMaximumExceeded => D::ReceiveMaximumExceeded,
        R::TopicAliasInvalid => D::TopicAliasInvalid,
        R::PacketTooLarge => D::PacketTooLarge,
        R::MessageRateTooHigh => D::MessageRateTooHigh,
        R::QuotaExceeded => D::QuotaExceeded,
        R::AdministrativeAction => D::AdministrativeAction,
        R::PayloadFormatInvalid => D::PayloadFormatInvalid,
        R::RetainNotSupported => D::RetainNotSupported,
        R::QoSNotSupported => D::QoSNotSupported,
        R::UseAnotherServer => D::UseAnotherServer,
        R::ServerMoved => D::ServerMoved,
        R::SharedSubscriptionsNotSupported => D::SharedSubscriptionNotSupported,
        R::ConnectionRateExceeded => D::ConnectionRateExceeded,
        R::MaximumConnectTime => D::MaximumConnectTime,
        R::SubscriptionIdentifiersNotSupported => D::SubscriptionIdentifiersNotSupported,
        R::WildcardSubscriptionsNotSupported => D::WildcardSubscriptionsNotSupported,
        other => panic!("not a DISCONNECT code: {other}"),
    }
}

/// rumqttc models absent properties as `None`.
fn some_if<T>(empty: bool, v: T) -> Option<T> {
    if empty { None } else { Some(v) }
}

macro_rules! ack_props {
    ($ty:ident, $p:expr) => {{
        let p: &AckProperties = $p;
        some_if(
            p.reason_string.is_none() && p.user_properties.is_empty(),
            r5::$ty {
                reason_string: os(&p.reason_string),
                user_properties: users(&p.user_properties),
            },
        )
    }};
}

fn to_r5(p: &Packet) -> r5::Packet {
    use r5::Packet as P;
    match p {
        Packet::Connect(c) => {
            let cp = &c.properties;
            let props = r5::ConnectProperties {
                session_expiry_interval: cp.session_expiry_interval,
                receive_maximum: cp.receive_maximum,
                max_packet_size: cp.maximum_packet_size,
                topic_alias_max: cp.topic_alias_maximum,
                request_response_info: flag(cp.request_response_information),
                request_problem_info: flag(cp.request_problem_information),
                user_properties: users(&cp.user_properties),
                authentication_method: os(&cp.authentication_method),
                authentication_data: cp.authentication_data.clone(),
            };
            let will = c.will.as_ref().map(|w| {
                let wp = &w.properties;
                r5::LastWill {
                    topic: w.topic.as_bytes().clone(),
                    message: w.payload.clone(),
                    qos: q5(w.qos),
                    retain: w.retain,
                    properties: some_if(
                        *wp == WillProperties::default(),
                        r5::LastWillProperties {
                            delay_interval: wp.will_delay_interval,
                            payload_format_indicator: fmt(wp.payload_format_indicator),
                            message_expiry_interval: wp.message_expiry_interval,
                            content_type: os(&wp.content_type),
                            response_topic: wp.response_topic.as_ref().map(|t| t.to_string()),
                            correlation_data: wp.correlation_data.clone(),
                            user_properties: users(&wp.user_properties),
                        },
                    ),
                }
            });
            let login = (c.username.is_some() || c.password.is_some()).then(|| r5::Login {
                username: c.username.as_ref().map(s).unwrap_or_default(),
                password: c
                    .password
                    .as_ref()
                    .map(|p| String::from_utf8(p.to_vec()).unwrap())
                    .unwrap_or_default(),
            });
            P::Connect(
                r5::Connect {
                    keep_alive: c.keep_alive,
                    client_id: s(&c.client_id),
                    clean_start: c.clean_start,
                    properties: some_if(*cp == ConnectProperties::default(), props),
                },
                will,
                login,
            )
        }
        Packet::ConnAck(c) => {
            let p = &c.properties;
            P::ConnAck(r5::ConnAck {
                session_present: c.session_present,
                code: r5_conn_code(c.reason_code),
                properties: some_if(
                    *p == ConnAckProperties::default(),
                    r5::ConnAckProperties {
                        session_expiry_interval: p.session_expiry_interval,
                        receive_max: p.receive_maximum,
                        max_qos: p.maximum_qos.map(QoS::as_u8),
                        retain_available: flag(p.retain_available),
                        max_packet_size: p.maximum_packet_size,
                        assigned_client_identifier: os(&p.assigned_client_identifier),
                        topic_alias_max: p.topic_alias_maximum,
                        reason_string: os(&p.reason_string),
                        user_properties: users(&p.user_properties),
                        wildcard_subscription_available: flag(p.wildcard_subscription_available),
                        subscription_identifiers_available: flag(
                            p.subscription_identifiers_available,
                        ),
                        shared_subscription_available: flag(p.shared_subscription_available),
                        server_keep_alive: p.server_keep_alive,
                        response_information: os(&p.response_information),
                        server_reference: os(&p.server_reference),
                        authentication_method: os(&p.authentication_method),
                        authentication_data: p.authentication_data.clone(),
                    },
                ),
            })
        }
        Packet::Publish(x) => {
            let p = &x.properties;
            P::Publish(r5::Publish {
                dup: x.dup,
                qos: q5(x.qos),
                retain: x.retain,
                topic: x.topic.as_bytes().clone(),
                pkid: pid(x.packet_id),
                payload: x.payload.clone(),
                properties: some_if(
                    *p == PublishProperties::default(),
                    r5::PublishProperties {
                        payload_format_indicator: fmt(p.payload_format_indicator),
                        message_expiry_interval: p.message_expiry_interval,
                        topic_alias: p.topic_alias,
                        response_topic: p.response_topic.as_ref().map(|t| t.to_string()),
                        correlation_data: p.correlation_data.clone(),
                        user_properties: users(&p.user_properties),
                        subscription_identifiers: p
                            .subscription_identifiers
                            .iter()
                            .map(|&i| i as usize)
                            .collect(),
                        content_type: os(&p.content_type),
                    },
                ),
            })
        }
        Packet::PubAck(a) => P::PubAck(r5::PubAck {
            pkid: a.packet_id.get(),
            reason: r5_puback(a.reason_code),
            properties: ack_props!(PubAckProperties, &a.properties),
        }),
        Packet::PubRec(a) => P::PubRec(r5::PubRec {
            pkid: a.packet_id.get(),
            reason: r5_pubrec(a.reason_code),
            properties: ack_props!(PubRecProperties, &a.properties),
        }),
        Packet::PubRel(a) => P::PubRel(r5::PubRel {
            pkid: a.packet_id.get(),
            reason: r5_pubrel(a.reason_code),
            properties: ack_props!(PubRelProperties, &a.properties),
        }),
        Packet::PubComp(a) => P::PubComp(r5::PubComp {
            pkid: a.packet_id.get(),
            reason: r5_pubcomp(a.reason_code),
            properties: ack_props!(PubCompProperties, &a.properties),
        }),
        Packet::Subscribe(x) => P::Subscribe(r5::Subscribe {
            pkid: x.packet_id.get(),
            filters: x
                .filters
                .iter()
                .map(|f| r5::Filter {
                    path: f.filter.to_string(),
                    qos: q5(f.options.qos),
                    nolocal: f.options.no_local,
                    preserve_retain: f.options.retain_as_published,
                    retain_forward_rule: match f.options.retain_handling {
                        RetainHandling::SendAtSubscribe => r5::RetainForwardRule::OnEverySubscribe,
                        RetainHandling::SendAtSubscribeIfNew => {
                            r5::RetainForwardRule::OnNewSubscribe
                        }
                        RetainHandling::DoNotSend => r5::RetainForwardRule::Never,
                    },
                })
                .collect(),
            properties: some_if(
                x.properties == SubscribeProperties::default(),
                r5::SubscribeProperties {
                    id: x.properties.subscription_identifier.map(|i| i as usize),
                    user_properties: users(&x.properties.user_properties),
                },
            ),
        }),
        Packet::SubAck(x) => P::SubAck(r5::SubAck {
            pkid: x.packet_id.get(),
            return_codes: x.reason_codes.iter().map(|&c| r5_suback(c)).collect(),
            properties: ack_props!(SubAckProperties, &x.properties),
        }),
        Packet::Unsubscribe(x) => P::Unsubscribe(r5::Unsubscribe {
            pkid: x.packet_id.get(),
            filters: x.filters.iter().map(|f| f.to_string()).collect(),
            properties: some_if(
                x.properties.user_properties.is_empty(),
                r5::UnsubscribeProperties {
                    user_properties: users(&x.properties.user_properties),
                },
            ),
        }),
        Packet::UnsubAck(x) => P::UnsubAck(r5::UnsubAck {
            pkid: x.packet_id.get(),
            reasons: x.reason_codes.iter().map(|&c| r5_unsuback(c)).collect(),
            properties: ack_props!(UnsubAckProperties, &x.properties),
        }),
        Packet::PingReq => P::PingReq(r5::PingReq),
        Packet::PingResp => P::PingResp(r5::PingResp),
        Packet::Disconnect(d) => P::Disconnect(r5::Disconnect {
            reason_code: r5_disconnect(d.reason_code),
            properties: None,
        }),
        Packet::Auth(_) => unreachable!("filtered out"),
    }
}

fn v311_packet() -> impl Strategy<Value = Packet> {
    common::packet(ProtocolVersion::V3_1_1).prop_filter_map("not representable", |p| {
        representable(p, ProtocolVersion::V3_1_1)
    })
}

fn v5_packet() -> impl Strategy<Value = Packet> {
    common::packet(ProtocolVersion::V5).prop_filter_map("not representable", |p| {
        representable(p, ProtocolVersion::V5)
    })
}

proptest! {
    #![proptest_config(common::config(1000))]

    /// 3.1.1: ours encodes, rumqttc decodes the same packet.
    #[test]
    fn v311_ours_to_rumqttc(p in v311_packet()) {
        let mut buf = BytesMut::new();
        p.encode(ProtocolVersion::V3_1_1, &mut buf).unwrap();
        let theirs = r4::read(&mut buf, MAX).unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(theirs, to_r4(&p));
    }

    /// 3.1.1: rumqttc encodes, ours decodes the same packet, and the bytes are identical.
    #[test]
    fn v311_rumqttc_to_ours(p in v311_packet()) {
        let mut buf = BytesMut::new();
        write_r4(&to_r4(&p), &mut buf);
        let wire = buf.clone().freeze();
        let ours = decode(&mut buf, ProtocolVersion::V3_1_1, MAX).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&ours, &p);
        prop_assert_eq!(p.to_bytes(ProtocolVersion::V3_1_1).unwrap(), wire);
    }

    /// 5.0: ours encodes, rumqttc decodes the same packet.
    #[test]
    fn v5_ours_to_rumqttc(p in v5_packet()) {
        let mut buf = BytesMut::new();
        p.encode(ProtocolVersion::V5, &mut buf).unwrap();
        if matches!(p, Packet::Disconnect(_)) {
            // rumqttc's v5 DISCONNECT reader is broken (see the module docs).
            return Ok(());
        }
        let theirs = r5::Packet::read(&mut buf, Some(MAX)).unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(theirs, to_r5(&p));
    }

    /// 5.0: rumqttc encodes, ours decodes the same packet.
    #[test]
    fn v5_rumqttc_to_ours(p in v5_packet()) {
        if matches!(&p, Packet::Disconnect(d) if d.reason_code != ReasonCode::Success) {
            // rumqttc's v5 DISCONNECT writer is broken (see the module docs).
            return Ok(());
        }
        let mut buf = BytesMut::new();
        to_r5(&p).write(&mut buf).unwrap();
        let ours = decode(&mut buf, ProtocolVersion::V5, MAX).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(ours, p);
    }
}
