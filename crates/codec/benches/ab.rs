//! Interleaved A/B timing of mqttd-codec against rumqttc, robust to a machine shared with other
//! work: each round times both codecs back to back on fresh copies of the same bytes (alternating
//! which goes first), and the report gives the median of each and the ratio of medians.
//! Same cases as `benches/codec.rs` (the criterion bench).
//!
//! `cargo bench -p mqttd-codec --bench ab`

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use mqttd_codec::{Packet, PacketId, ProtocolVersion, Publish, QoS, Topic, decode};
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

const MAX: usize = 1 << 24;
const TOPIC: &str = "sensors/building-7/floor-3/temperature";
const ROUNDS: usize = 201;

fn ours(payload: usize, v5: bool) -> Packet {
    let mut p = Publish::new(
        Topic::new(TOPIC).unwrap(),
        QoS::AtLeastOnce,
        PacketId::new(4242),
        Bytes::from(vec![0xA5u8; payload]),
    );
    if v5 {
        p.properties
            .user_properties
            .push("trace-id", "4bf92f3577b34da6")
            .unwrap();
        p.properties
            .user_properties
            .push("source", "gateway-12")
            .unwrap();
    }
    Packet::Publish(p)
}

enum Theirs {
    V4(r4::Publish),
    V5(r5::Publish),
}

fn theirs(payload: usize, v5: bool) -> Theirs {
    if v5 {
        Theirs::V5(r5::Publish {
            dup: false,
            qos: rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            retain: false,
            topic: Bytes::from_static(TOPIC.as_bytes()),
            pkid: 4242,
            payload: Bytes::from(vec![0xA5u8; payload]),
            properties: Some(r5::PublishProperties {
                user_properties: vec![
                    ("trace-id".into(), "4bf92f3577b34da6".into()),
                    ("source".into(), "gateway-12".into()),
                ],
                ..Default::default()
            }),
        })
    } else {
        let mut p = r4::Publish::from_bytes(
            TOPIC,
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            Bytes::from(vec![0xA5u8; payload]),
        );
        p.pkid = 4242;
        Theirs::V4(p)
    }
}

fn their_decode(buf: &mut BytesMut, v5: bool) {
    if v5 {
        assert!(matches!(
            r5::Packet::read(buf, Some(MAX)),
            Ok(r5::Packet::Publish(_))
        ));
    } else {
        assert!(matches!(r4::read(buf, MAX), Ok(r4::Packet::Publish(_))));
    }
}

/// Median nanoseconds per call of `a` and `b`, interleaved; `setup` builds each call's input.
fn ab<I>(
    calls: usize,
    mut setup: impl FnMut() -> I,
    mut a: impl FnMut(&mut I),
    mut b: impl FnMut(&mut I),
) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut ia: Vec<I> = (0..calls).map(|_| setup()).collect();
        let mut ib: Vec<I> = (0..calls).map(|_| setup()).collect();
        let mut time_a = || {
            let t = Instant::now();
            ia.iter_mut().for_each(&mut a);
            t.elapsed().as_nanos() as f64 / calls as f64
        };
        let mut time_b = || {
            let t = Instant::now();
            ib.iter_mut().for_each(&mut b);
            t.elapsed().as_nanos() as f64 / calls as f64
        };
        if round % 2 == 0 {
            ta.push(time_a());
            tb.push(time_b());
        } else {
            tb.push(time_b());
            ta.push(time_a());
        }
    }
    ta.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    (ta[ROUNDS / 2], tb[ROUNDS / 2])
}

fn report(name: &str, (ours, theirs): (f64, f64)) {
    println!(
        "{name:<40} mqttd {ours:>12.1} ns   rumqttc {theirs:>12.1} ns   ratio {:.2}x",
        theirs / ours
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (label, v5) in [("v311", false), ("v5_2props", true)] {
        let version = if v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V3_1_1
        };
        for (size_name, size) in [("64B", 64), ("4KiB", 4096)] {
            let case = format!("publish_qos1_{size_name}_{label}");
            let packet = ours(size, v5);
            let wire = packet.to_bytes(version).unwrap();
            let t = theirs(size, v5);

            report(
                &format!("decode/{case}"),
                ab(
                    1000,
                    || BytesMut::from(&wire[..]),
                    |buf| drop(black_box(decode(buf, version, MAX).unwrap())),
                    |buf| their_decode(buf, v5),
                ),
            );

            let mut out = BytesMut::with_capacity(2 * wire.len());
            let mut out2 = BytesMut::with_capacity(2 * wire.len());
            report(
                &format!("encode/{case}"),
                ab(
                    1000,
                    || (),
                    |_| {
                        out.clear();
                        packet.encode(version, &mut out).unwrap();
                        black_box(&out);
                    },
                    |_| {
                        out2.clear();
                        match &t {
                            Theirs::V4(p) => p.write(&mut out2).unwrap(),
                            Theirs::V5(p) => p.write(&mut out2).unwrap(),
                        };
                        black_box(&out2);
                    },
                ),
            );

            let mut stream = BytesMut::new();
            while stream.len() + wire.len() <= 1 << 20 {
                stream.extend_from_slice(&wire);
            }
            let stream = stream.freeze();
            report(
                &format!("stream_1MiB/{case}"),
                ab(
                    1,
                    || BytesMut::from(&stream[..]),
                    |buf| {
                        while let Some(p) = decode(buf, version, MAX).unwrap() {
                            black_box(p);
                        }
                    },
                    |buf| {
                        while !buf.is_empty() {
                            their_decode(buf, v5);
                        }
                    },
                ),
            );
        }
    }
}
