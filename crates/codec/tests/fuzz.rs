//! Arbitrary and mutated bytes never panic. Every packet decoded from them re-encodes, and the
//! re-encoding decodes to the same packet; for 3.1/3.1.1 (which have a single encoding for each
//! packet) the re-encoding is byte for byte the input. In 5.0 the input may use a longer legal
//! form (Success reason codes and empty properties written out, properties in another order),
//! which re-encodes to the canonical, never longer, form.

mod common;

use bytes::{Bytes, BytesMut};
use mqttd_codec::*;
use proptest::prelude::*;

const MAX: usize = 4096;

/// Decodes everything in `input`; checks each packet as described in the module docs.
fn decode_all(input: &[u8], v: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    loop {
        let before = buf.clone().freeze();
        match decode(&mut buf, v, MAX) {
            Ok(Some(p)) => {
                let consumed = before.len() - buf.len();
                let original = before.slice(..consumed);
                check_reencode(&p, &original, v)?;
            }
            Ok(None) => {
                let incomplete = matches!(check(&buf, MAX), Ok(Status::Incomplete { .. }));
                prop_assert!(incomplete);
                return Ok(());
            }
            Err(e) => {
                // Every error has a reason code; the call must not panic either.
                let _ = e.reason_code();
                let _ = e.to_string();
                return Ok(());
            }
        }
    }
}

fn check_reencode(p: &Packet, original: &Bytes, v: ProtocolVersion) -> Result<(), TestCaseError> {
    let out = p
        .to_bytes(v)
        .map_err(|e| TestCaseError::fail(format!("re-encode failed: {e}")))?;
    let again = decode_frame(out.clone(), effective(p, v))
        .map_err(|e| TestCaseError::fail(format!("re-decode failed: {e} for {p:?}")))?;
    prop_assert_eq!(&again, p);
    if effective(p, v).is_v5() {
        prop_assert!(out.len() <= original.len());
    } else {
        prop_assert_eq!(&out, original);
    }
    Ok(())
}

/// A CONNECT is encoded in its own version.
fn effective(p: &Packet, v: ProtocolVersion) -> ProtocolVersion {
    match p {
        Packet::Connect(c) => c.protocol_version,
        _ => v,
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1u8..).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Remove),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Remove(i) => {
            bytes.remove(i.index(bytes.len()));
        }
    }
}

proptest! {
    #![proptest_config(common::config(1000))]

    #[test]
    fn arbitrary_bytes_never_panic(v in common::version(), input in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&input, v)?;
        let mut buf = BytesMut::from(&input[..]);
        let _ = decode_connect(&mut buf, MAX);
        let _ = decode_frame(Bytes::from(input), v);
    }

    #[test]
    fn arbitrary_bytes_with_valid_header_never_panic(
        v in common::version(),
        first in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut input = vec![first, body.len() as u8];
        input.extend_from_slice(&body);
        decode_all(&input, v)?;
    }

    #[test]
    fn mutated_packets_never_panic(
        (v, p) in common::version().prop_flat_map(|v| (Just(v), common::packet(v))),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = p.to_bytes(v).unwrap().to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_all(&bytes, v)?;
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_connect(&mut buf, MAX);
    }
}
