//! Allocation bounds, measured with a counting global allocator (this test binary only):
//! a packet announced larger than the maximum packet size is rejected with no allocation at
//! all, and decoding any input allocates at most 16 times the packet size (plus a constant):
//! User Properties, strings and binary data are slices of the input and allocate nothing; only
//! the topic filters of SUBSCRIBE/UNSUBSCRIBE (a 40-byte `TopicFilter` for as little as 3 bytes
//! on the wire) and PUBLISH subscription identifiers take a `Vec`, sized exactly.

mod common;

use bytes::BytesMut;
use mqttd_codec::*;
use proptest::prelude::*;

/// Bytes allocated by this thread while `f` runs (the `allocation-counter` crate is this test
/// binary's global allocator and counts per thread, so other tests running in parallel do not
/// count; a reallocation counts its new size).
fn allocated_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    let Some(out) = out else {
        unreachable!("measure runs the closure")
    };
    (out, usize::try_from(info.bytes_total).unwrap_or(usize::MAX))
}

/// The counter is installed: an allocation of a known size is seen, so a zero below cannot
/// pass for want of counting.
#[test]
fn the_counter_counts() {
    let (v, bytes) = allocated_during(|| Vec::<u8>::with_capacity(1000));
    assert_eq!(v.capacity(), 1000);
    assert_eq!(bytes, 1000);
}

#[test]
fn oversized_packet_is_rejected_without_allocating() {
    let max = 1024;
    for header in [
        &[0x30u8, 0x81, 0x08][..],
        &[0x30, 0xFF, 0xFF, 0xFF, 0x7F],
        &[0x82, 0x80, 0x80, 0x40],
    ] {
        let mut buf = BytesMut::from(header);
        let (r, bytes) = allocated_during(|| decode(&mut buf, ProtocolVersion::V5, max));
        assert!(
            matches!(r, Err(DecodeError::PacketTooLarge { .. })),
            "{r:?}"
        );
        assert_eq!(bytes, 0);
        let (r, bytes) = allocated_during(|| decode_connect(&mut buf, max));
        assert!(r.is_err());
        assert_eq!(bytes, 0);
    }
}

#[test]
fn incomplete_packet_allocates_nothing() {
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0x7F, 0x00, 0x01][..]);
    let (r, bytes) = allocated_during(|| decode(&mut buf, ProtocolVersion::V5, MAX_PACKET_SIZE));
    assert_eq!(r, Ok(None));
    assert_eq!(bytes, 0);
}

/// Bytes allocated per byte of packet, at most (plus a constant for the shared buffer handle
/// and a boxed CONNECT/CONNACK).
const FACTOR: usize = 16;
const CONSTANT: usize = 1024;

proptest! {
    #![proptest_config(common::config(500))]

    #[test]
    fn decoding_allocates_in_proportion_to_the_packet(
        (v, p) in common::version().prop_flat_map(|v| (Just(v), common::packet(v))),
        flip in any::<(prop::sample::Index, u8)>(),
    ) {
        let mut bytes = p.to_bytes(v).unwrap().to_vec();
        let i = flip.0.index(bytes.len());
        bytes[i] ^= flip.1;
        let len = bytes.len();
        let mut buf = BytesMut::from(&bytes[..]);
        let (_r, allocated) = allocated_during(|| decode(&mut buf, v, 4096));
        prop_assert!(allocated <= FACTOR * len + CONSTANT, "{allocated} bytes for a {len}-byte packet");
    }
}

#[test]
fn many_user_properties_stay_within_the_factor() {
    // The worst case for amplification: empty user properties, 5 bytes each on the wire.
    let n = 10_000;
    let mut props = Vec::new();
    for _ in 0..n {
        props.extend_from_slice(&[0x26, 0, 0, 0, 0]);
    }
    let mut body = vec![0, 1, b't'];
    let mut len = props.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        body.push(b);
        if len == 0 {
            break;
        }
    }
    body.extend(props);
    let mut packet = vec![0x30];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        packet.push(b);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    let size = packet.len();
    let mut buf = BytesMut::from(&packet[..]);
    let (r, allocated) = allocated_during(|| decode(&mut buf, ProtocolVersion::V5, 1 << 20));
    let Ok(Some(Packet::Publish(p))) = r else {
        panic!("{r:?}")
    };
    assert_eq!(p.properties.user_properties.len(), n);
    assert!(
        allocated <= FACTOR * size + CONSTANT,
        "{allocated} for {size}"
    );
    eprintln!("{n} empty user properties: {size} bytes on the wire, {allocated} bytes allocated");
}

#[test]
fn many_tiny_topic_filters_stay_within_the_factor() {
    for (first, entry, v) in [
        (0x82u8, &[0u8, 1, b'a', 0][..], ProtocolVersion::V3_1_1),
        (0xA2, &[0, 1, b'a'], ProtocolVersion::V3_1_1),
    ] {
        let n = 5_000;
        let mut body = vec![0, 1];
        for _ in 0..n {
            body.extend_from_slice(entry);
        }
        let mut packet = vec![first];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            packet.push(b);
            if len == 0 {
                break;
            }
        }
        packet.extend(body);
        let size = packet.len();
        let mut buf = BytesMut::from(&packet[..]);
        let (r, allocated) = allocated_during(|| decode(&mut buf, v, 1 << 20));
        assert!(matches!(r, Ok(Some(_))), "{r:?}");
        assert!(
            allocated <= FACTOR * size + CONSTANT,
            "{allocated} for {size}"
        );
        eprintln!("{n} one-byte filters: {size} bytes on the wire, {allocated} bytes allocated");
    }
}
