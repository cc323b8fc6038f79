//! The benchmark payload and the pre-encoded PUBLISH it travels in.
//!
//! Every payload starts with a 24-byte header: a magic number, the publisher's index, the
//! message's sequence number and the send time (nanoseconds since the Unix epoch, so a `sub` in
//! one process can time a `pub` in another on the same machine). The rest is filler up to the
//! requested size.
//!
//! A publisher does not build a `Publish` per message: [`PublishTemplate`] encodes one with the
//! codec, then each message is a copy of those bytes with the packet identifier and the header
//! patched in place, so the hot path allocates nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use mqttd_codec::{Packet, PacketId, ProtocolVersion, Publish, QoS, Topic};

/// Bytes of header at the start of every benchmark payload.
pub const HEADER_LEN: usize = 24;

/// "MQDB" in big endian: marks a payload written by `mqttd-bench`.
pub const MAGIC: u32 = 0x4d51_4442;

/// The header carried at the start of a benchmark payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Index of the publishing client within its run.
    pub publisher: u32,
    /// Sequence number of the message for that publisher, from 0.
    pub seq: u64,
    /// Send time, nanoseconds since the Unix epoch.
    pub sent_ns: u64,
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HEADER_LEN`] (the template guarantees it is not).
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Reads a header from a received payload; `None` if it is not one of ours.
    pub fn read(payload: &[u8]) -> Option<Self> {
        let h = payload.get(..HEADER_LEN)?;
        let word = |r: std::ops::Range<usize>| h[r].iter().fold(0u64, |a, b| a << 8 | *b as u64);
        if word(0..4) != MAGIC as u64 {
            return None;
        }
        Some(Self {
            publisher: word(4..8) as u32,
            seq: word(8..16),
            sent_ns: word(16..24),
        })
    }
}

/// Wall-clock nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One PUBLISH encoded once, stamped per message.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Bytes,
    packet_id_at: Option<usize>,
    header_at: usize,
}

impl PublishTemplate {
    /// Encodes a PUBLISH of `payload_len` bytes on `topic`.
    ///
    /// Fails if `payload_len` is below [`HEADER_LEN`] or the packet cannot be encoded.
    pub fn new(
        topic: Topic,
        qos: QoS,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            payload_len >= HEADER_LEN,
            "payload size {payload_len} is below the {HEADER_LEN}-byte benchmark header"
        );
        let packet_id = (qos != QoS::AtMostOnce).then_some(PacketId::MIN);
        let payload = Bytes::from(vec![b'x'; payload_len]);
        let packet = Packet::Publish(Publish::new(topic, qos, packet_id, payload));
        let mut buf = BytesMut::new();
        packet
            .encode(version, &mut buf)
            .map_err(|e| anyhow::anyhow!("cannot encode the PUBLISH template: {e}"))?;
        // The payload is the last field; the packet identifier sits just before the properties
        // (one zero byte in 5.0, none before).
        let header_at = buf.len() - payload_len;
        let props_len = if version == ProtocolVersion::V5 { 1 } else { 0 };
        let packet_id_at = packet_id.map(|_| header_at - props_len - 2);
        Ok(Self {
            bytes: buf.freeze(),
            packet_id_at,
            header_at,
        })
    }

    /// Bytes of one encoded message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a PUBLISH has at least a fixed header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Appends one message to `out`, with `packet_id` (ignored at QoS 0) and `header`.
    pub fn write(&self, out: &mut BytesMut, packet_id: u16, header: &Header) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let msg = &mut out[start..];
        if let Some(at) = self.packet_id_at {
            msg[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        header.write(&mut msg[self.header_at..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_codec::decode;

    fn roundtrip(version: ProtocolVersion, qos: QoS, size: usize) {
        let topic = Topic::new("bench/t/7").expect("topic");
        let t = PublishTemplate::new(topic.clone(), qos, size, version).expect("template");
        let mut buf = BytesMut::new();
        let header = Header {
            publisher: 7,
            seq: 123_456_789_012,
            sent_ns: now_ns(),
        };
        t.write(&mut buf, 0xBEEF, &header);
        t.write(&mut buf, 2, &Header { seq: 1, ..header });
        assert_eq!(buf.len(), 2 * t.len());
        for (pid, seq) in [(0xBEEF, header.seq), (2, 1)] {
            let packet = decode(&mut buf, version, 1 << 20)
                .expect("valid")
                .expect("whole");
            let Packet::Publish(p) = packet else {
                panic!("not a PUBLISH: {packet:?}")
            };
            assert_eq!(p.topic, topic);
            assert_eq!(p.qos, qos);
            assert_eq!(p.payload.len(), size);
            assert_eq!(
                p.packet_id.map(|id| id.get()),
                (qos != QoS::AtMostOnce).then_some(pid)
            );
            assert_eq!(Header::read(&p.payload), Some(Header { seq, ..header }));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn template_decodes_with_patched_id_and_header() {
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for size in [HEADER_LEN, 64, 4096, 200_000] {
                    roundtrip(version, qos, size);
                }
            }
        }
    }

    #[test]
    fn short_payload_is_refused() {
        let topic = Topic::new("a").expect("topic");
        assert!(PublishTemplate::new(topic, QoS::AtMostOnce, 10, ProtocolVersion::V5).is_err());
    }

    #[test]
    fn foreign_payload_is_not_a_header() {
        assert_eq!(Header::read(b"hello"), None);
        assert_eq!(Header::read(&[0u8; 64]), None);
    }
}
