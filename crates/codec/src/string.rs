//! [`MqttString`]: a UTF-8 Encoded String as MQTT defines it (§1.5.4), held in [`Bytes`].
//!
//! Invariant: the bytes are valid UTF-8 (so no surrogates, which UTF-8 cannot encode), contain no
//! U+0000, and are at most 65,535 bytes long. Decoding checks this once; afterwards the value is
//! a cheap, reference-counted slice of the receive buffer.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

use crate::error::DecodeError;

/// Longest string or binary field MQTT can carry (two-byte length prefix).
pub const MAX_STRING_LEN: usize = 65_535;

/// A validated MQTT UTF-8 string sharing its bytes with the buffer it was decoded from.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MqttString(Bytes);

impl MqttString {
    /// The empty string.
    pub const fn new() -> Self {
        Self(Bytes::new())
    }

    /// A string from a `'static` literal, checked.
    pub fn from_static(s: &'static str) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::from_static(s.as_bytes()))
    }

    /// Validates `bytes` as an MQTT string: UTF-8, no U+0000, at most 65,535 bytes.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        check_str(&bytes)?;
        Ok(Self(bytes))
    }

    /// Wraps bytes already known to satisfy the invariant (validated UTF-8, no U+0000, short).
    pub(crate) fn from_checked(bytes: Bytes) -> Self {
        Self(bytes)
    }

    /// The string.
    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either runs `check_str` (which validates UTF-8) or, for
        // `from_checked`, receives bytes its caller has validated; the bytes are immutable.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes (a slice of the receive buffer when decoded).
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Takes the underlying bytes.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks the MQTT string rules on raw bytes; returns the `str` on success.
#[inline]
pub(crate) fn check_str(bytes: &[u8]) -> Result<&str, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::StringTooLong(bytes.len()));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    if bytes.contains(&0) {
        return Err(DecodeError::NullCharacter);
    }
    Ok(s)
}

impl Deref for MqttString {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MqttString {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for MqttString {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Borrow<str> for MqttString {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for MqttString {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MqttString {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl TryFrom<&str> for MqttString {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for MqttString {
    type Error = DecodeError;
    fn try_from(s: String) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::from(s))
    }
}

impl TryFrom<Bytes> for MqttString {
    type Error = DecodeError;
    fn try_from(b: Bytes) -> Result<Self, DecodeError> {
        Self::from_bytes(b)
    }
}
