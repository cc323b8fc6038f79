//! tokio-util [`Decoder`]/[`Encoder`] for [`Codec`] (feature `tokio-codec`), for use with
//! `tokio_util::codec::Framed`.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::decode::{Codec, Status, check};
use crate::error::{DecodeError, EncodeError};
use crate::packet::Packet;

/// Errors of the tokio-util codec: I/O from the transport, or a protocol error.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent an invalid packet.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A packet could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        let packet = Codec::decode(self, src)?;
        if packet.is_none() {
            // Reserve what the announced packet still needs: bounded by the maximum packet
            // size, which `check` has already enforced.
            if let Status::Incomplete { needed } = check(src, self.max_packet_size())? {
                src.reserve(needed);
            }
        }
        Ok(packet)
    }
}

impl Encoder<&Packet> for Codec {
    type Error = CodecError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(Codec::encode(self, item, dst)?)
    }
}

impl Encoder<Packet> for Codec {
    type Error = CodecError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(Codec::encode(self, &item, dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Connect, MqttString, ProtocolVersion};

    #[test]
    fn decoder_fixes_the_version_from_connect_and_reserves() {
        let mut codec = Codec::new(1024);
        let connect = Connect::new(
            ProtocolVersion::V3_1_1,
            MqttString::try_from("c").unwrap_or_default(),
            30,
        );
        let mut wire = BytesMut::new();
        Encoder::encode(&mut codec, Packet::from(connect.clone()), &mut wire).unwrap_or(());
        Encoder::encode(&mut codec, &Packet::PingReq, &mut wire).unwrap_or(());
        let mut partial = wire.split_to(3);
        assert!(matches!(
            Decoder::decode(&mut codec, &mut partial),
            Ok(None)
        ));
        assert!(partial.capacity() >= wire.len());
        partial.unsplit(wire);
        assert!(
            matches!(Decoder::decode(&mut codec, &mut partial), Ok(Some(Packet::Connect(c))) if *c == connect)
        );
        assert_eq!(codec.version(), Some(ProtocolVersion::V3_1_1));
        assert!(matches!(
            Decoder::decode(&mut codec, &mut partial),
            Ok(Some(Packet::PingReq))
        ));
        let mut big = BytesMut::from(&[0x30u8, 0xFF, 0x7F][..]);
        assert!(matches!(
            Decoder::decode(&mut codec, &mut big),
            Err(CodecError::Decode(DecodeError::PacketTooLarge { .. }))
        ));
    }
}
