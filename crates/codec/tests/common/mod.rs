//! proptest strategies for valid packets of every type, per protocol version.
#![allow(dead_code)]

use bytes::Bytes;
use mqttd_codec::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

pub fn mqtt_string() -> impl Strategy<Value = MqttString> {
    "[a-zA-Z0-9 _/+#$é\u{1F600}-]{0,12}".prop_map(|s| MqttString::try_from(s.as_str()).unwrap())
}

pub fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

pub fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        1 => vec(any::<u8>(), 100..400).prop_map(Bytes::from),
    ]
}

pub fn topic() -> impl Strategy<Value = Topic> {
    "[a-z0-9$é]{1,5}(/[a-zA-Z0-9 _]{0,4}){0,3}".prop_map(|s| Topic::new(&s).unwrap())
}

pub fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![3 => "[a-z0-9]{0,4}", 1 => Just("+".to_string())];
    (vec(level, 1..4), any::<bool>(), of("[a-z0-9]{1,4}")).prop_map(|(levels, hash, share)| {
        let mut f = levels.join("/");
        if f.is_empty() {
            f.push('x');
        }
        if hash {
            f.push_str("/#");
        }
        if let Some(g) = share {
            f = format!("$share/{g}/{f}");
        }
        TopicFilter::new(&f).unwrap()
    })
}

pub fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

pub fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

pub fn reason(ctx: ReasonCodeContext) -> impl Strategy<Value = ReasonCode> {
    let codes: Vec<ReasonCode> = (0..=255u8)
        .filter_map(ReasonCode::from_u8)
        .filter(|c| c.allowed_in(ctx))
        .collect();
    proptest::sample::select(codes)
}

pub fn users() -> impl Strategy<Value = UserProperties> {
    vec(
        (mqtt_string(), mqtt_string()).prop_map(|(k, v)| UserProperty::new(k, v)),
        0..3,
    )
    .prop_map(UserProperties::from)
}

fn flag() -> impl Strategy<Value = Option<bool>> {
    of(any::<bool>())
}

fn format() -> impl Strategy<Value = Option<PayloadFormat>> {
    of(prop_oneof![
        Just(PayloadFormat::Unspecified),
        Just(PayloadFormat::Utf8)
    ])
}

fn sub_id() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..200, 1u32..=VARINT_MAX]
}

pub fn connect_props() -> impl Strategy<Value = ConnectProperties> {
    (
        of(any::<u32>()),
        of(1u16..),
        of(1u32..),
        of(any::<u16>()),
        flag(),
        flag(),
        of((mqtt_string(), of(bin()))),
        users(),
    )
        .prop_map(
            |(se, rm, mps, tam, rri, rpi, auth, user_properties)| ConnectProperties {
                session_expiry_interval: se,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                authentication_method: auth.as_ref().map(|a| a.0.clone()),
                authentication_data: auth.and_then(|a| a.1),
                user_properties,
            },
        )
}

pub fn will_props() -> impl Strategy<Value = WillProperties> {
    (
        of(any::<u32>()),
        format(),
        of(any::<u32>()),
        of(mqtt_string()),
        of(topic()),
        of(bin()),
        users(),
    )
        .prop_map(|(wd, pf, me, ct, rt, cd, user_properties)| WillProperties {
            will_delay_interval: wd,
            payload_format_indicator: pf,
            message_expiry_interval: me,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties,
        })
}

pub fn connack_props() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            of(any::<u32>()),
            of(1u16..),
            of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            flag(),
            of(1u32..),
            of(mqtt_string()),
        ),
        (
            of(any::<u16>()),
            of(mqtt_string()),
            users(),
            flag(),
            flag(),
            flag(),
        ),
        (
            of(any::<u16>()),
            of(mqtt_string()),
            of(mqtt_string()),
            of(mqtt_string()),
            of(bin()),
        ),
    )
        .prop_map(
            |((se, rm, mq, ra, mps, aci), (tam, rs, up, wsa, sia, ssa), (ska, ri, sr, am, ad))| {
                ConnAckProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
}

pub fn publish_props() -> impl Strategy<Value = PublishProperties> {
    (
        format(),
        of(any::<u32>()),
        of(1u16..),
        of(topic()),
        of(bin()),
        users(),
        vec(sub_id(), 0..3),
        of(mqtt_string()),
    )
        .prop_map(|(pf, me, ta, rt, cd, up, si, ct)| PublishProperties {
            payload_format_indicator: pf,
            message_expiry_interval: me,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: si,
            content_type: ct,
        })
}

pub fn ack_props() -> impl Strategy<Value = AckProperties> {
    (of(mqtt_string()), users()).prop_map(|(reason_string, user_properties)| AckProperties {
        reason_string,
        user_properties,
    })
}

fn is_v5(v: ProtocolVersion) -> bool {
    v == ProtocolVersion::V5
}

pub fn connect(v: ProtocolVersion) -> BoxedStrategy<Connect> {
    let v5 = is_v5(v);
    (
        (any::<bool>(), any::<u16>(), mqtt_string()),
        of((topic(), bin(), qos(), any::<bool>(), will_props())),
        of(mqtt_string()),
        of(bin()),
        connect_props(),
    )
        .prop_map(move |((clean, ka, cid), will, username, password, props)| {
            let mut c = Connect {
                protocol_version: v,
                clean_start: clean,
                keep_alive: ka,
                client_id: cid,
                will: will.map(|(topic, payload, qos, retain, p)| Will {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties: if v5 { p } else { WillProperties::default() },
                }),
                username,
                password,
                properties: if v5 {
                    props
                } else {
                    ConnectProperties::default()
                },
            };
            if !v5 {
                if c.username.is_none() {
                    c.password = None;
                }
                if c.client_id.is_empty() {
                    c.clean_start = true;
                }
            }
            c
        })
        .boxed()
}

pub fn connack(v: ProtocolVersion) -> BoxedStrategy<ConnAck> {
    if is_v5(v) {
        (
            any::<bool>(),
            reason(ReasonCodeContext::ConnAck),
            connack_props(),
        )
            .prop_map(|(session_present, reason_code, properties)| ConnAck {
                session_present,
                reason_code,
                properties,
            })
            .boxed()
    } else {
        (any::<bool>(), 0u8..=5)
            .prop_map(|(sp, c)| ConnAck {
                session_present: sp,
                reason_code: ReasonCode::from_v3_connack(c).unwrap(),
                properties: ConnAckProperties::default(),
            })
            .boxed()
    }
}

pub fn publish(v: ProtocolVersion) -> BoxedStrategy<Publish> {
    let v5 = is_v5(v);
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        packet_id(),
        publish_props(),
        payload(),
        any::<bool>(),
    )
        .prop_map(
            move |(dup, qos, retain, topic, id, props, payload, empty_topic)| {
                let mut p = Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos,
                    retain,
                    topic,
                    packet_id: (qos != QoS::AtMostOnce).then_some(id),
                    properties: if v5 {
                        props
                    } else {
                        PublishProperties::default()
                    },
                    payload,
                };
                if v5 && empty_topic && p.properties.topic_alias.is_some() {
                    p.topic = Topic::empty();
                }
                p
            },
        )
        .boxed()
}

pub fn subscribe(v: ProtocolVersion) -> BoxedStrategy<Subscribe> {
    let v5 = is_v5(v);
    let opts = (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
        if v5 {
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: match rh {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendAtSubscribeIfNew,
                    _ => RetainHandling::DoNotSend,
                },
            }
        } else {
            SubscriptionOptions::qos(qos)
        }
    });
    (
        packet_id(),
        vec((topic_filter(), opts), 1..4),
        of(sub_id()),
        users(),
    )
        .prop_map(move |(packet_id, filters, si, up)| Subscribe {
            packet_id,
            filters: filters
                .into_iter()
                .map(|(filter, mut options)| {
                    if filter.is_shared() {
                        options.no_local = false;
                    }
                    SubscribeFilter { filter, options }
                })
                .collect(),
            properties: if v5 {
                SubscribeProperties {
                    subscription_identifier: si,
                    user_properties: up,
                }
            } else {
                SubscribeProperties::default()
            },
        })
        .boxed()
}

pub fn suback(v: ProtocolVersion) -> BoxedStrategy<SubAck> {
    if is_v5(v) {
        (
            packet_id(),
            vec(reason(ReasonCodeContext::SubAck), 1..5),
            ack_props(),
        )
            .prop_map(|(packet_id, reason_codes, properties)| SubAck {
                packet_id,
                reason_codes,
                properties,
            })
            .boxed()
    } else {
        let code = prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::GrantedQoS1),
            Just(ReasonCode::GrantedQoS2),
            Just(ReasonCode::UnspecifiedError)
        ];
        (packet_id(), vec(code, 1..5))
            .prop_map(|(packet_id, reason_codes)| SubAck {
                packet_id,
                reason_codes,
                properties: AckProperties::default(),
            })
            .boxed()
    }
}

pub fn unsubscribe(v: ProtocolVersion) -> BoxedStrategy<Unsubscribe> {
    let v5 = is_v5(v);
    (packet_id(), vec(topic_filter(), 1..4), users())
        .prop_map(move |(packet_id, filters, up)| Unsubscribe {
            packet_id,
            filters,
            properties: UnsubscribeProperties {
                user_properties: if v5 { up } else { UserProperties::new() },
            },
        })
        .boxed()
}

pub fn unsuback(v: ProtocolVersion) -> BoxedStrategy<UnsubAck> {
    if is_v5(v) {
        (
            packet_id(),
            vec(reason(ReasonCodeContext::UnsubAck), 1..5),
            ack_props(),
        )
            .prop_map(|(packet_id, reason_codes, properties)| UnsubAck {
                packet_id,
                reason_codes,
                properties,
            })
            .boxed()
    } else {
        packet_id()
            .prop_map(|packet_id| UnsubAck {
                packet_id,
                reason_codes: vec![],
                properties: AckProperties::default(),
            })
            .boxed()
    }
}

macro_rules! ack_strategy {
    ($fn:ident, $ty:ident, $ctx:expr) => {
        pub fn $fn(v: ProtocolVersion) -> BoxedStrategy<$ty> {
            if is_v5(v) {
                (packet_id(), reason($ctx), ack_props())
                    .prop_map(|(packet_id, reason_code, properties)| $ty {
                        packet_id,
                        reason_code,
                        properties,
                    })
                    .boxed()
            } else {
                packet_id().prop_map($ty::new).boxed()
            }
        }
    };
}
ack_strategy!(puback, PubAck, ReasonCodeContext::PubAckOrPubRec);
ack_strategy!(pubrec, PubRec, ReasonCodeContext::PubAckOrPubRec);
ack_strategy!(pubrel, PubRel, ReasonCodeContext::PubRelOrPubComp);
ack_strategy!(pubcomp, PubComp, ReasonCodeContext::PubRelOrPubComp);

pub fn disconnect(v: ProtocolVersion) -> BoxedStrategy<Disconnect> {
    if is_v5(v) {
        (
            reason(ReasonCodeContext::Disconnect),
            of(any::<u32>()),
            of(mqtt_string()),
            users(),
            of(mqtt_string()),
        )
            .prop_map(|(reason_code, se, rs, up, sr)| Disconnect {
                reason_code,
                properties: DisconnectProperties {
                    session_expiry_interval: se,
                    reason_string: rs,
                    user_properties: up,
                    server_reference: sr,
                },
            })
            .boxed()
    } else {
        Just(Disconnect::default()).boxed()
    }
}

pub fn auth() -> BoxedStrategy<Auth> {
    (
        reason(ReasonCodeContext::Auth),
        of(mqtt_string()),
        of(bin()),
        of(mqtt_string()),
        users(),
    )
        .prop_map(|(reason_code, am, ad, rs, up)| Auth {
            reason_code,
            properties: AuthProperties {
                authentication_method: am,
                authentication_data: ad,
                reason_string: rs,
                user_properties: up,
            },
        })
        .boxed()
}

/// Any valid packet for `v`.
pub fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut choices: Vec<BoxedStrategy<Packet>> = vec![
        connect(v).prop_map(Packet::from).boxed(),
        connack(v).prop_map(Packet::from).boxed(),
        publish(v).prop_map(Packet::from).boxed(),
        puback(v).prop_map(Packet::from).boxed(),
        pubrec(v).prop_map(Packet::from).boxed(),
        pubrel(v).prop_map(Packet::from).boxed(),
        pubcomp(v).prop_map(Packet::from).boxed(),
        subscribe(v).prop_map(Packet::from).boxed(),
        suback(v).prop_map(Packet::from).boxed(),
        unsubscribe(v).prop_map(Packet::from).boxed(),
        unsuback(v).prop_map(Packet::from).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v).prop_map(Packet::from).boxed(),
    ];
    if is_v5(v) {
        choices.push(auth().prop_map(Packet::from).boxed());
    }
    proptest::strategy::Union::new(choices).boxed()
}

/// Moderate case counts, no failure files in the source tree.
pub fn config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    }
}

pub fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V3_1),
        Just(ProtocolVersion::V3_1_1),
        Just(ProtocolVersion::V5)
    ]
}
