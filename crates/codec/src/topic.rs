//! [`Topic`] (a Topic Name, §4.7) and [`TopicFilter`] (a Topic Filter, with shared subscriptions
//! `$share/{ShareName}/{filter}`, §4.8.2), validated on construction. Matching a name against a
//! filter is the broker's router's job, not the codec's.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::string::MqttString;

/// Why a topic name or topic filter is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long [MQTT-4.7.3-1].
    #[error("empty topic")]
    Empty,
    /// Longer than 65,535 bytes, not UTF-8, or containing U+0000.
    #[error("topic is not a valid MQTT string")]
    InvalidString,
    /// A topic name contains `+` or `#` [MQTT-3.3.2-2].
    #[error("wildcard in a topic name")]
    WildcardInTopicName,
    /// `#` not alone in the last level, or `+` not alone in its level [MQTT-4.7.1-1], [MQTT-4.7.1-2].
    #[error("wildcard not occupying an entire topic level, or `#` not last")]
    InvalidWildcard,
    /// `$share/` without a non-empty share name free of `+`/`#`, or without a filter after it
    /// [MQTT-4.8.2-1], [MQTT-4.8.2-2].
    #[error("malformed shared subscription")]
    InvalidSharedSubscription,
}

/// A validated Topic Name: an MQTT string without wildcards.
///
/// Empty only when built by [`Topic::empty`] or decoded from an MQTT 5 PUBLISH that relies on a
/// Topic Alias; every other constructor rejects the empty string.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(MqttString);

impl Topic {
    /// Validates a topic name.
    pub fn new(name: &str) -> Result<Self, TopicError> {
        Self::from_bytes(Bytes::copy_from_slice(name.as_bytes()))
    }

    /// Validates a topic name held in `bytes` (no copy).
    pub fn from_bytes(bytes: Bytes) -> Result<Self, TopicError> {
        let s = MqttString::from_bytes(bytes).map_err(|_| TopicError::InvalidString)?;
        Self::from_string(s)
    }

    /// Validates an MQTT string as a topic name.
    #[inline]
    pub fn from_string(s: MqttString) -> Result<Self, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        Self::from_string_allow_empty(s)
    }

    /// As [`Topic::from_string`] but accepting the empty name (MQTT 5 topic alias).
    #[inline]
    pub(crate) fn from_string_allow_empty(s: MqttString) -> Result<Self, TopicError> {
        if s.as_bytes().iter().any(|&b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInTopicName);
        }
        Ok(Self(s))
    }

    /// Wraps a string already checked to hold no wildcard.
    #[inline]
    pub(crate) fn from_checked(s: MqttString) -> Self {
        Self(s)
    }

    /// The empty topic name, valid only in an MQTT 5 PUBLISH carrying a Topic Alias.
    pub const fn empty() -> Self {
        Self(MqttString::new())
    }

    /// The name.
    #[inline]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The name as an [`MqttString`].
    #[inline]
    pub fn as_mqtt_string(&self) -> &MqttString {
        &self.0
    }

    /// The underlying bytes.
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// Whether the name starts with `$` (such topics do not match filters starting with a
    /// wildcard, [MQTT-4.7.2-1]).
    pub fn is_system(&self) -> bool {
        self.0.as_bytes().first() == Some(&b'$')
    }

    /// The topic levels, split on `/`.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.as_str().split('/')
    }
}

impl Deref for Topic {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for Topic {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, TopicError> {
        Self::new(s)
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

const SHARE_PREFIX: &str = "$share/";

/// A validated Topic Filter, possibly a shared subscription `$share/{ShareName}/{filter}`.
///
/// `$share/...` is parsed in every protocol version (as mosquitto and EMQX do for 3.1.1).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicFilter {
    full: MqttString,
    /// Byte offset of the filter proper: 0, or past `$share/{ShareName}/` for a shared one.
    filter_start: u16,
}

impl TopicFilter {
    /// Validates a topic filter.
    pub fn new(filter: &str) -> Result<Self, TopicError> {
        Self::from_bytes(Bytes::copy_from_slice(filter.as_bytes()))
    }

    /// Validates a topic filter held in `bytes` (no copy).
    pub fn from_bytes(bytes: Bytes) -> Result<Self, TopicError> {
        let s = MqttString::from_bytes(bytes).map_err(|_| TopicError::InvalidString)?;
        Self::from_string(s)
    }

    /// Validates an MQTT string as a topic filter.
    pub fn from_string(full: MqttString) -> Result<Self, TopicError> {
        let s = full.as_str();
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        let mut filter_start = 0;
        if let Some(rest) = s.strip_prefix(SHARE_PREFIX) {
            let Some((group, filter)) = rest.split_once('/') else {
                return Err(TopicError::InvalidSharedSubscription);
            };
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::InvalidSharedSubscription);
            }
            // At most 65,535 bytes, so the offset fits.
            filter_start = (SHARE_PREFIX.len() + group.len() + 1) as u16;
        }
        check_filter(&s[usize::from(filter_start)..])?;
        Ok(Self { full, filter_start })
    }

    /// The whole filter as sent, including any `$share/{ShareName}/` prefix.
    #[inline]
    pub fn as_str(&self) -> &str {
        self.full.as_str()
    }

    /// The whole filter as an [`MqttString`].
    #[inline]
    pub fn as_mqtt_string(&self) -> &MqttString {
        &self.full
    }

    /// The underlying bytes of the whole filter.
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        self.full.as_bytes()
    }

    /// The filter proper: without the `$share/{ShareName}/` prefix of a shared subscription.
    #[inline]
    pub fn filter(&self) -> &str {
        &self.as_str()[usize::from(self.filter_start)..]
    }

    /// The ShareName of a shared subscription, `None` for an ordinary one.
    pub fn share_name(&self) -> Option<&str> {
        if self.filter_start == 0 {
            None
        } else {
            Some(&self.as_str()[SHARE_PREFIX.len()..usize::from(self.filter_start) - 1])
        }
    }

    /// Whether this is a shared subscription.
    #[inline]
    pub fn is_shared(&self) -> bool {
        self.filter_start != 0
    }

    /// Whether the filter proper contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }

    /// The levels of the filter proper, split on `/`.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.filter().split('/')
    }
}

/// Wildcard placement rules for the filter proper.
fn check_filter(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            _ if level.contains(['+', '#']) => return Err(TopicError::InvalidWildcard),
            _ => {}
        }
        if level == "#" && !last {
            return Err(TopicError::InvalidWildcard);
        }
    }
    Ok(())
}

impl Deref for TopicFilter {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, TopicError> {
        Self::new(s)
    }
}

impl PartialEq<&str> for TopicFilter {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(Topic::new("a/b/c").is_ok());
        assert!(Topic::new("/").is_ok());
        assert!(Topic::new("$SYS/x").unwrap().is_system());
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert_eq!(Topic::new("a/+"), Err(TopicError::WildcardInTopicName));
        assert_eq!(Topic::new("a/#"), Err(TopicError::WildcardInTopicName));
        assert_eq!(Topic::new("a\0b"), Err(TopicError::InvalidString));
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "+/#", "$SYS/#",
        ] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in ["a/#/b", "a+", "a/b#", "#/a", "a/+b", "++", "##"] {
            assert_eq!(
                TopicFilter::new(bad),
                Err(TopicError::InvalidWildcard),
                "{bad}"
            );
        }
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_subscriptions() {
        let f = TopicFilter::new("$share/g1/a/+/c").unwrap();
        assert!(f.is_shared());
        assert_eq!(f.share_name(), Some("g1"));
        assert_eq!(f.filter(), "a/+/c");
        assert!(f.has_wildcards());
        let plain = TopicFilter::new("a/b").unwrap();
        assert_eq!(plain.share_name(), None);
        assert_eq!(plain.filter(), "a/b");
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/g+/a",
            "$share/#/a",
        ] {
            assert_eq!(
                TopicFilter::new(bad),
                Err(TopicError::InvalidSharedSubscription),
                "{bad}"
            );
        }
        assert_eq!(
            TopicFilter::new("$share/g/a/#/b"),
            Err(TopicError::InvalidWildcard)
        );
        // `$shared` is not the prefix: an ordinary filter.
        assert!(!TopicFilter::new("$shared/g/a").unwrap().is_shared());
    }
}
