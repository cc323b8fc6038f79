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
