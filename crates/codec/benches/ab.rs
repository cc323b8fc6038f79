//! Interleaved A/B timing of mqttd-codec against rumqttc, robust to a machine shared with other
//! work: each round times both codecs back to back on fresh copies of the same bytes (alternating
//! which goes first), and the report gives the median of each and the ratio of medians.
//! Same cases as `benches/codec.rs` (the criterion bench).
//!
//! Two extra kinds of rows, which are NOT like-for-like comparisons of the two codecs:
//! - `memcpy_floor/...`: a bare `put_slice` of the payload into a reserved `BytesMut`, at the
//!   same offset (and so the same alignment) as the payload in the encoded packet, timed
//!   against both encoders in the same rounds. Any encoder that copies the payload into one
//!   `BytesMut` pays it, so `rumqttc / floor` is the highest ratio a copying encoder can reach.
//! - `encode_head_zero_copy/...`: our `Publish::encode_head` (everything but the payload) plus
//!   a handle on the payload `Bytes` for a vectored write, against rumqttc's full copying
//!   encode: a different API doing less work, shown for what it saves.
//!
//! `cargo bench -p mqttd-codec --bench ab`

use std::hint::black_box;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqttd_codec::{Packet, PacketId, ProtocolVersion, Publish, QoS, Topic, decode};
use rumqttc::mqttbytes::v4 as r4;
use rumqttc::v5::mqttbytes::v5 as r5;

const MAX: usize = 1 << 24;
const TOPIC: &str = "sensors/building-7/floor-3/temperature";
/// Rounds per case (odd, for a median); `AB_ROUNDS` overrides it (e.g. longer runs to profile).
fn rounds() -> usize {
    std::env::var("AB_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(201)
        | 1
}

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

impl Theirs {
    /// rumqttc's encoder for this version, into `out`.
    fn write(&self, out: &mut BytesMut) {
        match self {
            Theirs::V4(p) => p.write(out).unwrap(),
            Theirs::V5(p) => p.write(out).unwrap(),
        };
    }
}

/// The same message for rumqttc, sharing `payload` (so both encoders copy from the same memory).
fn theirs(payload: Bytes, v5: bool) -> Theirs {
    if v5 {
        Theirs::V5(r5::Publish {
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
        })
    } else {
        let mut p = r4::Publish::from_bytes(TOPIC, rumqttc::mqttbytes::QoS::AtLeastOnce, payload);
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

/// An empty buffer with at least `cap` bytes of capacity, starting on a 64-byte boundary.
fn aligned(cap: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(cap + 64);
    let skip = b.as_ptr().align_offset(64);
    b.resize(skip, 0);
    b.advance(skip);
    assert_eq!(b.as_ptr().align_offset(64), 0);
    b
}

/// Median nanoseconds per call of `a` and `b`, interleaved; `setup` builds each call's input.
fn ab<I>(
    calls: usize,
    mut setup: impl FnMut() -> I,
    mut a: impl FnMut(&mut I),
    mut b: impl FnMut(&mut I),
) -> (f64, f64) {
    let rounds = rounds();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Inputs built alternately, so neither side's are systematically older (colder in
        // the cache) than the other's.
        let (mut ia, mut ib): (Vec<I>, Vec<I>) = (0..calls).map(|_| (setup(), setup())).unzip();
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
    (ta[rounds / 2], tb[rounds / 2])
}

/// Median nanoseconds per call of `a`, `b` and `c`, interleaved (the order rotates each round).
fn ab3(mut a: impl FnMut(), mut b: impl FnMut(), mut c: impl FnMut()) -> (f64, f64, f64) {
    const CALLS: usize = 1000;
    let rounds = rounds();
    let mut t = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..3 {
            let which = (round + k) % 3;
            let f: &mut dyn FnMut() = match which {
                0 => &mut a,
                1 => &mut b,
                _ => &mut c,
            };
            let start = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            t[which].push(start.elapsed().as_nanos() as f64 / CALLS as f64);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[rounds / 2]
    };
    let [ta, tb, tc] = &mut t;
    (med(ta), med(tb), med(tc))
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
    // Optional substring filters on the case names (e.g. `-- decode/ v311`); flags are ignored.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
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
            let Packet::Publish(p) = &packet else {
                unreachable!()
            };
            let t = theirs(p.payload.clone(), v5);

            if wanted(&format!("decode/{case}")) {
                report(
                    &format!("decode/{case}"),
                    ab(
                        1000,
                        || BytesMut::from(&wire[..]),
                        // Like rumqttc's side: check the packet, drop it inside the timing.
                        |buf| {
                            let p = decode(buf, version, MAX);
                            assert!(matches!(black_box(&p), Ok(Some(Packet::Publish(_)))));
                        },
                        |buf| their_decode(buf, v5),
                    ),
                );
            }

            // Output buffers at the same alignment: a 4 KiB copy's speed depends on it.
            let mut out = aligned(2 * wire.len());
            let mut out2 = aligned(2 * wire.len());
            if wanted(&format!("encode/{case}")) {
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
                            t.write(&mut out2);
                            black_box(&out2);
                        },
                    ),
                );
            }

            let payload_at = wire.len() - size;
            if wanted(&format!("memcpy_floor/{case}")) {
                // The bare payload copy, at the payload's offset in the packet.
                let mut floor = aligned(2 * wire.len());
                floor.extend_from_slice(&wire[..payload_at]);
                let payload = p.payload.clone();
                let (tf, to, tt) = ab3(
                    || {
                        floor.truncate(payload_at);
                        floor.put_slice(&payload);
                        black_box(&floor);
                    },
                    || {
                        out.clear();
                        packet.encode(version, &mut out).unwrap();
                        black_box(&out);
                    },
                    || {
                        out2.clear();
                        t.write(&mut out2);
                        black_box(&out2);
                    },
                );
                println!(
                    "{:<40} floor {tf:>12.1} ns   mqttd {to:>10.1} ns   rumqttc {tt:>10.1} ns   \
                     rumqttc/floor {:.2}x   mqttd/floor {:.2}x",
                    format!("memcpy_floor/{case}"),
                    tt / tf,
                    to / tf
                );
            }
            if wanted(&format!("encode_head_zero_copy/{case}")) {
                report(
                    &format!("encode_head_zero_copy/{case}"),
                    ab(
                        1000,
                        || (),
                        |_| {
                            // What a writer needs for `head.chain(payload)` / writev.
                            out.clear();
                            p.encode_head(version, &mut out).unwrap();
                            let payload = p.payload.clone();
                            black_box((&out, &payload));
                        },
                        |_| {
                            out2.clear();
                            t.write(&mut out2);
                            black_box(&out2);
                        },
                    ),
                );
            }

            let mut stream = BytesMut::new();
            while stream.len() + wire.len() <= 1 << 20 {
                stream.extend_from_slice(&wire);
            }
            let stream = stream.freeze();
            if wanted(&format!("stream_1MiB/{case}")) {
                report(
                    &format!("stream_1MiB/{case}"),
                    ab(
                        1,
                        || BytesMut::from(&stream[..]),
                        |buf| {
                            // The same check as rumqttc's side (and as the single decode).
                            while !buf.is_empty() {
                                let p = decode(buf, version, MAX);
                                assert!(matches!(black_box(&p), Ok(Some(Packet::Publish(_)))));
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
}
