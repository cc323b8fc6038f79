//! mqttd-codec against rumqttc's `mqttbytes` on the same bytes, in the same run.
//!
//! Cases: PUBLISH QoS 1 with a 64 B and a 4 KiB payload, MQTT 3.1.1 and MQTT 5.0 (with two user
//! properties): decode one packet, encode one packet, and decode a 1 MiB buffer of back-to-back
//! PUBLISH packets as a stream. Each group has an `mqttd` and a `rumqttc` function; compare
//! their times (or throughputs) for the ratio. Inputs are prepared outside the timed section;
//! decoded packets are dropped inside it, for both codecs. The `encode_head_zero_copy` groups
//! are not like-for-like: our head-only encoder (the payload is sent as its own `Bytes`)
//! against rumqttc's full copying encode.
//!
//! `cargo bench -p mqttd-codec -- --warm-up-time 1 --measurement-time 3`
#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, black_box, criterion_group, criterion_main};
use mqttd_codec::{
    Packet, PacketId, ProtocolVersion, Publish, QoS, Topic, UserProperties, UserProperty, decode,
};
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

const MAX: usize = 1 << 24;
const TOPIC: &str = "sensors/building-7/floor-3/temperature";

fn ours(payload: usize, v5: bool) -> Packet {
    let mut p = Publish::new(
        Topic::new(TOPIC).unwrap(),
        QoS::AtLeastOnce,
        PacketId::new(4242),
        Bytes::from(vec![0xA5u8; payload]),
    );
    if v5 {
        p.properties.user_properties = UserProperties::from(vec![
            UserProperty::new(
                "trace-id".try_into().unwrap(),
                "4bf92f3577b34da6".try_into().unwrap(),
            ),
            UserProperty::new(
                "source".try_into().unwrap(),
                "gateway-12".try_into().unwrap(),
            ),
        ]);
    }
    Packet::Publish(p)
}

/// The payload of our packet, shared with rumqttc's (both encoders copy from the same memory).
fn payload_of(p: &Packet) -> Bytes {
    match p {
        Packet::Publish(p) => p.payload.clone(),
        _ => unreachable!("the benches build PUBLISH packets"),
    }
}

/// rumqttc's encoder for the version under test, into `buf`.
fn theirs_write(t4: &r4::Publish, t5: &r5::Publish, v5: bool, buf: &mut BytesMut) {
    if v5 {
        t5.write(buf).unwrap();
    } else {
        t4.write(buf).unwrap();
    }
}

fn theirs_v4(payload: Bytes) -> r4::Publish {
    let mut p = r4::Publish::from_bytes(TOPIC, rumqttc::mqttbytes::QoS::AtLeastOnce, payload);
    p.pkid = 4242;
    p
}

fn theirs_v5(payload: Bytes) -> r5::Publish {
    r5::Publish {
        dup: false,
        qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        retain: false,
        topic: Bytes::from_static(TOPIC.as_bytes()),
        pkid: 4242,
        payload,
        properties: Some(r5::PublishProperties {
            user_properties: vec![
                ("trace-id".into(), "4bf92f3577b34da6".into()),
                ("source".into(), "gateway-12".into()),
            ],
            ..Default::default()
        }),
    }
}

fn version(v5: bool) -> ProtocolVersion {
    if v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    }
}

/// The wire bytes, checked to be the same from both encoders.
fn wire(payload: usize, v5: bool) -> Bytes {
    let packet = ours(payload, v5);
    let ours = packet.to_bytes(version(v5)).unwrap();
    let mut theirs = BytesMut::new();
    if v5 {
        theirs_v5(payload_of(&packet)).write(&mut theirs).unwrap();
    } else {
        theirs_v4(payload_of(&packet)).write(&mut theirs).unwrap();
    }
    assert_eq!(ours, theirs.freeze(), "encoders disagree");
    ours
}

fn rumqttc_decode(buf: &mut BytesMut, v5: bool) -> bool {
    if v5 {
        matches!(r5::Packet::read(buf, Some(MAX)), Ok(r5::Packet::Publish(_)))
    } else {
        matches!(r4::read(buf, MAX), Ok(r4::Packet::Publish(_)))
    }
}

fn cases() -> Vec<(String, usize, bool)> {
    let mut v = Vec::new();
    for (name, v5) in [("v311", false), ("v5_2props", true)] {
        for (size_name, size) in [("64B", 64), ("4KiB", 4096)] {
            v.push((format!("publish_qos1_{size_name}_{name}"), size, v5));
        }
    }
    v
}

fn bench_decode(c: &mut Criterion) {
    for (name, size, v5) in cases() {
        let bytes = wire(size, v5);
        let mut g = c.benchmark_group(format!("decode/{name}"));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("mqttd", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| {
                    let p = decode(buf, version(v5), MAX);
                    assert!(matches!(black_box(&p), Ok(Some(Packet::Publish(_)))));
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("rumqttc", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| assert!(black_box(rumqttc_decode(buf, v5))),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

fn bench_encode(c: &mut Criterion) {
    for (name, size, v5) in cases() {
        let len = wire(size, v5).len();
        let mut g = c.benchmark_group(format!("encode/{name}"));
        g.throughput(Throughput::Bytes(len as u64));
        let p = ours(size, v5);
        let mut buf = BytesMut::with_capacity(len * 2);
        g.bench_function("mqttd", |b| {
            b.iter(|| {
                buf.clear();
                p.encode(version(v5), &mut buf).unwrap();
                black_box(buf.len())
            })
        });
        let (t4, t5) = (theirs_v4(payload_of(&p)), theirs_v5(payload_of(&p)));
        g.bench_function("rumqttc", |b| {
            b.iter(|| {
                buf.clear();
                theirs_write(&t4, &t5, v5, &mut buf);
                black_box(buf.len())
            })
        });
        g.finish();
    }
}

/// Not like-for-like: our `Publish::encode_head` (no payload copy; a writer sends the payload
/// `Bytes` after it) against rumqttc's full copying encode.
fn bench_encode_head(c: &mut Criterion) {
    for (name, size, v5) in cases() {
        let mut g = c.benchmark_group(format!("encode_head_zero_copy/{name}"));
        let Packet::Publish(p) = ours(size, v5) else {
            unreachable!()
        };
        let len = wire(size, v5).len();
        let mut buf = BytesMut::with_capacity(len * 2);
        g.bench_function("mqttd_encode_head", |b| {
            b.iter(|| {
                buf.clear();
                p.encode_head(version(v5), &mut buf).unwrap();
                let payload = p.payload.clone();
                black_box((buf.len(), payload))
            })
        });
        let (t4, t5) = (theirs_v4(p.payload.clone()), theirs_v5(p.payload.clone()));
        g.bench_function("rumqttc_full_encode", |b| {
            b.iter(|| {
                buf.clear();
                theirs_write(&t4, &t5, v5, &mut buf);
                black_box(buf.len())
            })
        });
        g.finish();
    }
}

fn bench_stream(c: &mut Criterion) {
    for (name, size, v5) in cases() {
        let one = wire(size, v5);
        let mut stream = BytesMut::new();
        while stream.len() + one.len() <= 1 << 20 {
            stream.extend_from_slice(&one);
        }
        let stream = stream.freeze();
        let count = stream.len() / one.len();
        let mut g = c.benchmark_group(format!("stream_1MiB/{name}"));
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function("mqttd", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| {
                    let mut n = 0;
                    // The same check as rumqttc's side (and as the single decode).
                    while !buf.is_empty() {
                        let p = decode(buf, version(v5), MAX);
                        assert!(matches!(black_box(&p), Ok(Some(Packet::Publish(_)))));
                        n += 1;
                    }
                    assert_eq!(n, count);
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_function("rumqttc", |b| {
            b.iter_batched_ref(
                || BytesMut::from(&stream[..]),
                |buf| {
                    let mut n = 0;
                    while !buf.is_empty() {
                        assert!(rumqttc_decode(buf, v5));
                        n += 1;
                    }
                    assert_eq!(n, count);
                },
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_decode, bench_encode, bench_encode_head, bench_stream
}
criterion_main!(benches);
