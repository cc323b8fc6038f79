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
    check_str_scan(bytes).map(|_| {
        // SAFETY: `check_str_scan` succeeded, so the bytes are valid UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    })
}

/// What [`check_str_scan`] learned on the way, so topic validation needs no second pass.
pub(crate) struct Scan {
    /// Whether the string contains `+` or `#`.
    pub(crate) has_wildcard: bool,
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// One pass over `bytes`: (any non-ASCII byte, any zero byte, any `+` or `#`). All three
/// answers are exact for arbitrary byte values.
#[inline(always)]
fn scan_words(bytes: &[u8]) -> (bool, bool, bool) {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    if bytes.len() >= 16 {
        return scan_sse2(bytes);
    }
    scan_swar(bytes)
}

/// Sixteen bytes at a time with SSE2 (part of the x86_64 baseline); the last chunk overlaps
/// the previous one instead of being padded. `bytes.len() >= 16`.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline(always)]
fn scan_sse2(bytes: &[u8]) -> (bool, bool, bool) {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128,
    };
    debug_assert!(bytes.len() >= 16);
    // SAFETY: SSE2 is enabled for this build (the `cfg` above; it is part of the x86_64
    // baseline), so its register-only intrinsics may be called.
    let (zero, bit3, plus) = unsafe {
        (
            _mm_setzero_si128(),
            _mm_set1_epi8(0x08),
            _mm_set1_epi8(b'+' as i8),
        )
    };
    let (mut hi, mut nul, mut wild) = (zero, zero, zero);
    // Full chunks, then the last sixteen bytes (overlapping the previous chunk when the
    // length is not a multiple of 16; re-reading bytes does not change the answers).
    let last = bytes.len() - 16;
    let mut at = 0;
    loop {
        let start = at.min(last);
        let chunk = &bytes[start..start + 16];
        // SAFETY: `chunk` holds 16 bytes, exactly what the unaligned 128-bit load reads; the
        // rest only reads and writes registers. SSE2 is enabled, as above.
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            hi = _mm_or_si128(hi, v);
            nul = _mm_or_si128(nul, _mm_cmpeq_epi8(v, zero));
            // `+` (0x2B) and `#` (0x23) differ only in bit 3, and no other byte becomes 0x2B
            // when that bit is set: one comparison finds both.
            wild = _mm_or_si128(wild, _mm_cmpeq_epi8(_mm_or_si128(v, bit3), plus));
        }
        if start == last {
            break;
        }
        at += 16;
    }
    // SAFETY: as above, SSE2 is enabled; register-only.
    unsafe {
        (
            _mm_movemask_epi8(hi) != 0,
            _mm_movemask_epi8(nul) != 0,
            _mm_movemask_epi8(wild) != 0,
        )
    }
}

/// Eight bytes at a time in a `u64` (SWAR); the portable path, and short strings on x86_64.
#[inline(always)]
fn scan_swar(bytes: &[u8]) -> (bool, bool, bool) {
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

/// Validates an MQTT string in one pass: ASCII is checked eight bytes at a time for U+0000 and
/// for the wildcard characters; anything non-ASCII falls back to the standard UTF-8 check.
#[inline(always)]
pub(crate) fn check_str_scan(bytes: &[u8]) -> Result<Scan, DecodeError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(DecodeError::StringTooLong(bytes.len()));
    }
    let (any, nul, wild) = scan_words(bytes);
    if any {
        // Non-ASCII somewhere: the standard check. (The zero tests above are exact for any byte
        // values, so `nul` and `wild` stand.)
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
    }
    if nul {
        return Err(DecodeError::NullCharacter);
    }
    Ok(Scan { has_wildcard: wild })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time scan agrees with the obvious byte-by-byte definition for every
    /// position of a special byte, in ASCII and non-ASCII strings of every length up to 40.
    #[test]
    fn scan_matches_bytewise_definition() {
        for len in 0..40 {
            for pos in 0..len {
                for special in [0u8, b'+', b'#', b'a', 0x7F] {
                    for prefix in ["", "é"] {
                        let mut v: Vec<u8> = prefix.as_bytes().to_vec();
                        v.extend(std::iter::repeat_n(b'x', len));
                        let at = prefix.len() + pos;
                        v[at] = special;
                        // The portable path agrees with the one this target uses.
                        assert_eq!(scan_swar(&v), scan_words(&v), "{v:?}");
                        let got = check_str_scan(&v);
                        if special == 0 {
                            assert_eq!(got.err(), Some(DecodeError::NullCharacter), "{v:?}");
                        } else {
                            let wild = special == b'+' || special == b'#';
                            assert_eq!(got.map(|s| s.has_wildcard).ok(), Some(wild), "{v:?}");
                        }
                    }
                }
            }
        }
        assert_eq!(
            check_str_scan(&[0xC3, 0x28]).err(),
            Some(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            check_str_scan(&[b'a'; 9][..]).map(|s| s.has_wildcard).ok(),
            Some(false)
        );
    }
}
