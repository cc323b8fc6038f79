//! [`MqttString`]: a UTF-8 Encoded String as MQTT defines it (§1.5.4), held in [`Bytes`].
//!
//! Invariant: the bytes are valid UTF-8 (so no surrogates, which UTF-8 cannot encode), contain no
//! U+0000, and are at most 65,535 bytes long. Decoding checks this once; afterwards the value is
//! a cheap, reference-counted slice of the receive buffer.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;

use crate::error::DecodeError;

/// Longest string or binary field MQTT can carry (two-byte length prefix).
pub const MAX_STRING_LEN: usize = 65_535;

/// A validated MQTT string sharing its bytes with the buffer it was decoded from.
///
/// Held as a [`ByteString`] (UTF-8 checked once, when it is built), so [`MqttString::as_str`]
/// costs nothing, and hashing agrees with `str`'s (as [`Borrow<str>`] requires).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MqttString(ByteString);

impl MqttString {
    /// The empty string.
    pub const fn new() -> Self {
        Self(ByteString::new())
    }

    /// A string from a `'static` literal, checked.
    pub fn from_static(s: &'static str) -> Result<Self, DecodeError> {
        Self::from_bytes(Bytes::from_static(s.as_bytes()))
    }

    /// Validates `bytes` as an MQTT string: UTF-8, no U+0000, at most 65,535 bytes.
    #[inline]
    pub fn from_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        let scan = scan(&bytes)?;
        Self::from_scanned(bytes, &scan)
    }

    /// Finishes [`MqttString::from_bytes`] once [`scan`] has looked at `bytes`: the UTF-8 check
    /// (one pass of the standard library's validator, the only one the string ever gets), then
    /// U+0000 (malformed UTF-8 is the error reported when both are wrong).
    #[inline]
    pub(crate) fn from_scanned(bytes: Bytes, scan: &Scan) -> Result<Self, DecodeError> {
        let s = ByteString::try_from(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if scan.has_nul {
            return Err(DecodeError::NullCharacter);
        }
        Ok(Self(s))
    }

    /// Wraps bytes known to satisfy the invariant (taken from a string validated earlier); the
    /// UTF-8 check is repeated (the only way to a `str` without `unsafe`), its impossible
    /// failure gives the empty string.
    pub(crate) fn from_valid(bytes: Bytes) -> Self {
        let s = ByteString::try_from(bytes);
        debug_assert!(s.is_ok(), "unvalidated string");
        Self(s.unwrap_or_default())
    }

    /// The string.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The underlying bytes (a slice of the receive buffer when decoded).
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// Takes the underlying bytes.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.0.into_bytes()
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

/// Checks the MQTT string rules on raw bytes that are kept in wire form (no `str` needed now):
/// ASCII, the usual case, is settled by the word-at-a-time scan alone; anything non-ASCII also
/// goes through the standard UTF-8 check.
#[inline]
pub(crate) fn check_str_bytes(bytes: &[u8]) -> Result<(), DecodeError> {
    let scan = scan(bytes)?;
    if scan.non_ascii {
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    }
    if scan.has_nul {
        return Err(DecodeError::NullCharacter);
    }
    Ok(())
}

/// What [`scan`] learned in its one pass (exact for arbitrary byte values).
pub(crate) struct Scan {
    /// Whether any byte is 0x80 or above (then the standard UTF-8 check decides).
    pub(crate) non_ascii: bool,
    /// Whether any byte is 0x00 (U+0000: no multi-byte UTF-8 sequence contains a zero byte).
    pub(crate) has_nul: bool,
    /// Whether the string contains `+` or `#` (no multi-byte sequence contains those bytes
    /// either), so topic validation needs no second pass.
    pub(crate) has_wildcard: bool,
}

/// The length limit, then one word-at-a-time pass over `bytes`. UTF-8 itself is not checked.
#[inline(always)]
pub(crate) fn scan(bytes: &[u8]) -> Result<Scan, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::StringTooLong(bytes.len()));
    }
    let (non_ascii, has_nul, has_wildcard) = scan_words(bytes);
    Ok(Scan {
        non_ascii,
        has_nul,
        has_wildcard,
    })
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// One pass over `bytes`, eight bytes at a time in a `u64` (SWAR): (any non-ASCII byte, any
/// zero byte, any `+` or `#`). All three answers are exact for arbitrary byte values.
#[inline(always)]
fn scan_words(bytes: &[u8]) -> (bool, bool, bool) {
    // Accumulate the zero-byte terms of every word and test their high bits once at the end
    // (`(v - LO) & !v & HI` is non-zero exactly when `v` has a zero byte, and `& HI`
    // distributes over `|`).
    let (mut any, mut nul, mut wild) = (0u64, 0u64, 0u64);
    let mut word = |v: u64| {
        any |= v;
        nul |= v.wrapping_sub(LO) & !v;
        // `+` (0x2B) and `#` (0x23) differ only in bit 3, and no other byte becomes 0x2B when
        // that bit is set: one test finds both.
        let w = (v | (LO * 0x08)) ^ (LO * b'+' as u64);
        wild |= w.wrapping_sub(LO) & !w;
    };
    let load = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    if bytes.len() >= 8 {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            word(load(c));
        }
        if !chunks.remainder().is_empty() {
            // The last eight bytes, overlapping the previous word: no padding, no copy.
            word(load(&bytes[bytes.len() - 8..]));
        }
    } else {
        // Short: build one word, padded with a byte that is neither special nor non-ASCII.
        let mut v = LO * u64::from(b'a');
        for (i, &b) in bytes.iter().enumerate() {
            v = (v & !(0xFF << (8 * i))) | (u64::from(b) << (8 * i));
        }
        word(v);
    }
    (any & HI != 0, nul & HI != 0, wild & HI != 0)
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
        self.0.as_bytes()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-by-byte definition of what [`scan_words`] answers.
    fn bytewise(v: &[u8]) -> (bool, bool, bool) {
        (
            v.iter().any(|&b| b >= 0x80),
            v.contains(&0),
            v.iter().any(|&b| b == b'+' || b == b'#'),
        )
    }

    /// The word-at-a-time scan agrees with the obvious byte-by-byte definition for every
    /// position of a special byte, in ASCII and non-ASCII strings of every length up to 40, and
    /// the string checks give the error (or wildcard answer) the rules say.
    #[test]
    fn scan_matches_bytewise_definition() {
        for len in 0..40 {
            for pos in 0..len {
                for special in [0u8, b'+', b'#', b'a', 0x7F, 0x80, 0xFF] {
                    for prefix in ["", "é"] {
                        let mut v: Vec<u8> = prefix.as_bytes().to_vec();
                        v.extend(std::iter::repeat_n(b'x', len));
                        let at = prefix.len() + pos;
                        v[at] = special;
                        assert_eq!(scan_words(&v), bytewise(&v), "{v:?}");
                        let got = MqttString::from_bytes(Bytes::from(v.clone()));
                        let checked = check_str_bytes(&v);
                        let want = if special >= 0x80 {
                            Err(DecodeError::InvalidUtf8)
                        } else if special == 0 {
                            Err(DecodeError::NullCharacter)
                        } else {
                            Ok(())
                        };
                        assert_eq!(got.as_ref().map(|_| ()), want.as_ref().map(|_| ()), "{v:?}");
                        assert_eq!(checked, want, "{v:?}");
                        if want.is_ok() {
                            let wild = special == b'+' || special == b'#';
                            assert_eq!(scan(&v).map(|s| s.has_wildcard).ok(), Some(wild));
                            assert_eq!(got.map(|s| s.as_str().as_bytes() == v), Ok(true));
                        }
                    }
                }
            }
        }
        // Malformed UTF-8 wins over U+0000 when both are present.
        assert_eq!(
            MqttString::from_bytes(Bytes::from_static(&[0xC3, 0x28, 0x00])).err(),
            Some(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            check_str_bytes(&[0xC3, 0x28]),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            scan(&[b'a'; 9][..]).map(|s| s.has_wildcard).ok(),
            Some(false)
        );
    }

    /// `Borrow<str>` lets a string key be looked up by `&str` in a hash map.
    #[test]
    fn hash_agrees_with_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(MqttString::from_static("a/b").unwrap(), 1);
        assert_eq!(map.get("a/b"), Some(&1));
        assert_eq!(map.get("a/c"), None);
    }
}
