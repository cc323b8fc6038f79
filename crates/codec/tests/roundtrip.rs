//! encode then decode is the identity, for arbitrary valid packets of every type and version;
//! `encoded_len` is exact; decoding a stream of packets split at arbitrary points yields them
//! all back.

mod common;

use bytes::{Buf, BytesMut};
use mqttd_codec::*;
use proptest::prelude::*;

const MAX: usize = MAX_PACKET_SIZE;

proptest! {
    #![proptest_config(common::config(1000))]

    #[test]
    fn encode_decode_is_identity((v, p) in common::version().prop_flat_map(|v| (Just(v), common::packet(v)))) {
        let mut buf = BytesMut::new();
        p.encode(v, &mut buf).unwrap();
        prop_assert_eq!(p.encoded_len(v).unwrap(), buf.len());
        let bytes = buf.clone().freeze();
        let got = decode(&mut buf, v, MAX).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&got, &p);
        prop_assert_eq!(decode_frame(bytes.clone(), v).unwrap(), p.clone());
        if let Packet::Connect(c) = &p {
            let mut buf = BytesMut::from(&bytes[..]);
            prop_assert_eq!(decode_connect(&mut buf, MAX).unwrap(), Some((**c).clone()));
        }
        // The maximum packet size is inclusive.
        prop_assert!(check(&bytes, bytes.len()).is_ok());
        let too_large = matches!(check(&bytes, bytes.len() - 1), Err(DecodeError::PacketTooLarge { .. }));
        prop_assert!(too_large);
    }
}

proptest! {
    #![proptest_config(common::config(300))]

    /// The head plus the payload is exactly the packet.
    #[test]
    fn publish_head_plus_payload_is_the_packet(
        (v, p) in common::version().prop_flat_map(|v| (Just(v), common::publish(v))),
        prefix in proptest::collection::vec(any::<u8>(), 0..80),
        spare in prop_oneof![Just(0usize), 0usize..300, Just(4096)],
    ) {
        let packet = Packet::Publish(p.clone()).to_bytes(v).unwrap();
        // Head alone, then the payload chained after it (what a vectored write sends).
        let mut head = BytesMut::new();
        p.encode_head(v, &mut head).unwrap();
        let mut chained = head.clone().freeze().chain(p.payload.clone());
        prop_assert_eq!(chained.copy_to_bytes(chained.remaining()), packet.clone());
        head.extend_from_slice(&p.payload);
        prop_assert_eq!(head.freeze(), packet.clone());
        // Both encoders append exactly the packet after what the buffer held, whatever its
        // spare capacity.
        for with_payload in [false, true] {
            let mut buf = BytesMut::with_capacity(prefix.len() + spare);
            buf.extend_from_slice(&prefix);
            if with_payload {
                Packet::Publish(p.clone()).encode(v, &mut buf).unwrap();
            } else {
                p.encode_head(v, &mut buf).unwrap();
                buf.extend_from_slice(&p.payload);
            }
            prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
            prop_assert_eq!(&buf[prefix.len()..], &packet[..]);
        }
    }
}

proptest! {
    #![proptest_config(common::config(200))]

    #[test]
    fn stream_split_anywhere(
        (v, ps) in common::version().prop_flat_map(|v| (Just(v), proptest::collection::vec(common::packet(v), 1..8))),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut wire = BytesMut::new();
        for p in &ps {
            p.encode(v, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for end in points {
            buf.extend_from_slice(&wire[at..end]);
            at = end;
            while let Some(p) = decode(&mut buf, v, MAX).unwrap() {
                got.push(p);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, ps);
    }
}
