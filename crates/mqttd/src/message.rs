//! [`Message`]: one application message as the broker holds it between its publisher and its
//! subscribers. Shared behind an `Arc`: fan-out to N subscribers clones a pointer, never the
//! payload (`bytes::Bytes`) or the topic (a slice of the publisher's receive buffer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_codec::{PublishProperties, QoS, Topic};

use crate::router::ClientId;

/// An application message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The topic name (never an alias: aliases are per connection).
    pub topic: Topic,
    /// The payload, shared by every queue it sits in.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// Properties forwarded to subscribers: payload format, content type, response topic,
    /// correlation data, user properties. `topic_alias`, `subscription_identifiers` and
    /// `message_expiry_interval` are per delivery and are set when the PUBLISH is built.
    pub properties: PublishProperties,
    /// When the Message Expiry Interval runs out, if it has one.
    pub expires_at: Option<Instant>,
    /// The publishing client, for No Local; `None` for the broker's own (`$SYS`, wills keep theirs).
    pub publisher: Option<ClientId>,
}

/// A shared message.
pub type SharedMessage = Arc<Message>;

impl Message {
    /// True once its Message Expiry Interval has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The Message Expiry Interval to forward: the time left, rounded up, at least 1 s
    /// while not expired.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }

    /// The absolute expiry for an interval received at `now`.
    pub fn expiry_from(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|s| now + Duration::from_secs(u64::from(s)))
    }
}
