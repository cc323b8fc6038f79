//! # mqttd-codec
//!
//! A zero-copy codec for MQTT 3.1 (`MQIsdp`, level 3), 3.1.1 (level 4) and 5.0 (level 5): every
//! control packet, every 5.0 property with its per-packet allow rules, every reason code.
//!
//! It does no I/O and has no runtime: bytes in, [`Packet`]s out, and back. Decoding is strict
//! (each violation is a typed [`DecodeError`] that maps to the Reason Code a 5.0 server sends)
//! and zero-copy (topics, strings, binary properties and payloads are [`bytes::Bytes`] slices of
//! the receive buffer). The maximum packet size is enforced from the fixed header, before
//! anything is allocated. Matching topics against filters, sessions and QoS state belong to the
//! broker, not here. The crate has no `unsafe` code.
//!
//! ## API at a glance
//!
//! ```text
//! // Decoding (streaming: Ok(None) = need more bytes; nothing consumed then)
//! decode(&mut BytesMut, ProtocolVersion, max_packet_size) -> Result<Option<Packet>, DecodeError>
//! decode_bytes(&mut Bytes, ProtocolVersion, max_packet_size) -> Result<Option<Packet>, DecodeError>
//! decode_connect(&mut BytesMut, max_packet_size) -> Result<Option<Connect>, DecodeError>  // first packet, version unknown
//! decode_frame(Bytes, ProtocolVersion) -> Result<Packet, DecodeError>                    // exactly one whole packet
//! check(&[u8], max_packet_size) -> Result<Status, DecodeError>  // Status::Complete{len} | Incomplete{needed}
//! Codec::new(max).decode(&mut BytesMut) / .encode(&Packet, &mut BytesMut) / .missing(&[u8])
//!                                        // per-connection state; tokio-util Decoder/Encoder with feature `tokio-codec`
//!
//! // Encoding (exact length computed first, one reserve, nothing written on error)
//! Packet::encode(&self, ProtocolVersion, &mut BytesMut) -> Result<(), EncodeError>
//! Packet::encoded_len(&self, ProtocolVersion) -> Result<usize, EncodeError>
//! Packet::to_bytes(&self, ProtocolVersion) -> Result<Bytes, EncodeError>
//! Publish::encode_head(&self, ProtocolVersion, &mut BytesMut) -> Result<(), EncodeError>
//!                                        // all but the payload: send head + payload without copying it
//!
//! // Errors
//! DecodeError::reason_code(&self) -> ReasonCode      // what a 5.0 server sends before closing
//! DecodeError::connack_code_v3(&self) -> Option<u8>  // 3.1.1: CONNACK return code 1 or 2, else just close
//!
//! // Packets
//! enum Packet { Connect(Box<Connect>), ConnAck(Box<ConnAck>), Publish, PubAck, PubRec, PubRel, PubComp,
//!               Subscribe, SubAck, Unsubscribe, UnsubAck, PingReq, PingResp, Disconnect, Auth }
//! Connect { protocol_version, clean_start, keep_alive, client_id: MqttString, will: Option<Will>,
//!           username: Option<MqttString>, password: Option<Bytes>, properties: ConnectProperties }
//! Will { topic: Topic, payload: Bytes, qos, retain, properties: WillProperties }
//! ConnAck { session_present, reason_code, properties: ConnAckProperties }
//! Publish { dup, qos, retain, topic: Topic, packet_id: Option<PacketId>, properties: PublishProperties, payload: Bytes }
//! PubAck | PubRec | PubRel | PubComp { packet_id, reason_code, properties: AckProperties }
//! Subscribe { packet_id, filters: Vec<SubscribeFilter { filter: TopicFilter, options: SubscriptionOptions }>,
//!             properties: SubscribeProperties }
//! SubscriptionOptions { qos, no_local, retain_as_published, retain_handling: RetainHandling }
//! SubAck { packet_id, reason_codes: Vec<ReasonCode>, properties: AckProperties }
//! Unsubscribe { packet_id, filters: Vec<TopicFilter>, properties: UnsubscribeProperties }
//! UnsubAck { packet_id, reason_codes: Vec<ReasonCode> /* empty in 3.1.1 */, properties: AckProperties }
//! Disconnect { reason_code, properties: DisconnectProperties }
//! Auth { reason_code, properties: AuthProperties }                                   // 5.0 only
//!
//! // Vocabulary
//! ProtocolVersion { V3_1, V3_1_1, V5 }   QoS { AtMostOnce, AtLeastOnce, ExactlyOnce }
//! PacketId = NonZeroU16                  ReasonCode (every 5.0 code; to/from 3.1.1 return codes)
//! UserProperties (wire form; iter() -> (&str, &str), push, get, to_vec)
//! MqttString (UTF-8 checked once, held as a bytestring::ByteString over the receive buffer)
//! Topic (no wildcards)  TopicFilter (share_name(), filter())
//! ```
//!
//! ## Example
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use mqttd_codec::{decode, Packet, ProtocolVersion, Publish, PacketId, QoS, Topic};
//!
//! let publish = Publish::new(
//!     Topic::new("sensors/1/temp").unwrap(),
//!     QoS::AtLeastOnce,
//!     PacketId::new(7),
//!     Bytes::from_static(b"21.5"),
//! );
//! let mut buf = BytesMut::new();
//! Packet::Publish(publish.clone()).encode(ProtocolVersion::V5, &mut buf).unwrap();
//!
//! // A partial buffer decodes to None; the rest completes it.
//! let mut partial = buf.split_to(5);
//! assert_eq!(decode(&mut partial, ProtocolVersion::V5, 1 << 20), Ok(None));
//! partial.unsplit(buf);
//! let packet = decode(&mut partial, ProtocolVersion::V5, 1 << 20).unwrap();
//! assert_eq!(packet, Some(Packet::Publish(publish)));
//! ```
//!
//! ## Choices where the specifications leave room
//! - Packet Identifier 0, DUP on QoS 0, reserved flag bits and malformed subscription options
//!   are Malformed Packet (0x81); a property in the wrong packet, a duplicate property, a
//!   forbidden property value, Retain Handling 3, No Local on a shared subscription and an empty
//!   SUBSCRIBE/UNSUBSCRIBE are Protocol Error (0x82).
//! - An invalid topic filter in SUBSCRIBE fails the whole packet with Topic Filter invalid
//!   (0x8F); an invalid topic name in PUBLISH with Topic Name invalid (0x90).
//! - `$share/{ShareName}/{filter}` is parsed in every version.
//! - A payload with Payload Format Indicator 1 is not checked for UTF-8 (the receiver may).
//! - Encoding uses the shortest form (acks, DISCONNECT and AUTH omit a Success reason code and
//!   empty properties), so bytes using a longer legal form re-encode shorter.

#![forbid(unsafe_code)]

mod decode;
mod error;
mod packet;
mod properties;
mod protocol;
mod reason;
mod string;
#[cfg(feature = "tokio-codec")]
mod tokio_codec;
mod topic;
mod user_properties;
mod wire;

pub use decode::{Codec, Status, check, decode, decode_bytes, decode_connect, decode_frame};
pub use error::{DecodeError, EncodeError};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PubAck, PubComp, PubRec, PubRel, Publish,
    RetainHandling, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck, Unsubscribe,
    Will,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PayloadFormat, PropertyId, PublishProperties, SubscribeProperties, UnsubscribeProperties,
    WillProperties,
};
pub use protocol::{PacketId, PacketType, ProtocolVersion, QoS};
pub use reason::{ReasonCode, ReasonCodeContext};
pub use string::{MAX_STRING_LEN, MqttString};
#[cfg(feature = "tokio-codec")]
pub use tokio_codec::CodecError;
pub use topic::{Topic, TopicError, TopicFilter};
pub use user_properties::{Iter as UserPropertiesIter, UserProperties, UserProperty};
pub use wire::VARINT_MAX;

/// The largest packet MQTT can frame: a 268,435,455-byte remaining length plus a 5-byte fixed
/// header. Use it as `max_packet_size` to disable the limit.
pub const MAX_PACKET_SIZE: usize = VARINT_MAX as usize + 5;
