//! [`UserProperties`]: the User Properties of one packet, kept in their wire form.
//!
//! Invariant: `raw` is a sequence of complete, validated User Property entries exactly as MQTT 5
//! encodes them (identifier 0x26, then name and value as length-prefixed UTF-8 strings), and
//! `count` is how many. Decoding slices them out of the receive buffer when they are contiguous
//! (always so for packets this codec encoded) and copies them once otherwise, so decoding never
//! allocates per property; encoding is one copy of `raw`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::properties::PropertyId;
use crate::string::{MqttString, check_str_bytes};

/// A User Property: a name/value pair of UTF-8 strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserProperty {
    /// The name.
    pub name: MqttString,
    /// The value.
    pub value: MqttString,
}

impl UserProperty {
    /// A pair from two validated strings.
    pub fn new(name: MqttString, value: MqttString) -> Self {
        Self { name, value }
    }
}

/// The User Properties of a packet, in order; names may repeat.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct UserProperties {
    /// `None` when empty (never `Some` of an empty buffer): an absent `Bytes` costs nothing to
    /// build or drop, which matters on the PUBLISH hot path where properties are usually empty.
    raw: Option<Bytes>,
    count: usize,
}

impl UserProperties {
    /// No properties.
    pub const fn new() -> Self {
        Self {
            raw: None,
            count: 0,
        }
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or_default()
    }

    /// How many properties.
    #[inline]
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The pairs, in order, borrowed.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            raw: self.bytes(),
            pos: 0,
        }
    }

    /// The pairs as owned [`UserProperty`] values sharing this packet's memory.
    pub fn to_vec(&self) -> Vec<UserProperty> {
        let mut out = Vec::with_capacity(self.count);
        let Some(raw) = &self.raw else {
            return out;
        };
        let mut pos = 0;
        while pos < raw.len() {
            let (n0, n1, v0, v1) = entry(raw, pos);
            out.push(UserProperty::new(
                MqttString::from_valid(raw.slice(n0..n1)),
                MqttString::from_valid(raw.slice(v0..v1)),
            ));
            pos = v1;
        }
        out
    }

    /// The value of the first property with this name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Appends a pair, validating both strings (copies the existing properties once).
    pub fn push(&mut self, name: &str, value: &str) -> Result<(), DecodeError> {
        check_str_bytes(name.as_bytes())?;
        check_str_bytes(value.as_bytes())?;
        self.push_unchecked(name.as_bytes(), value.as_bytes());
        Ok(())
    }

    /// Appends a pair of already validated strings.
    pub fn push_property(&mut self, p: &UserProperty) {
        self.push_unchecked(p.name.as_bytes(), p.value.as_bytes());
    }

    fn push_unchecked(&mut self, name: &[u8], value: &[u8]) {
        let mut buf = BytesMut::with_capacity(self.bytes().len() + 5 + name.len() + value.len());
        buf.put_slice(self.bytes());
        put_entry(&mut buf, name, value);
        self.raw = Some(buf.freeze());
        self.count += 1;
    }

    /// Bytes on the wire.
    #[inline]
    pub(crate) fn encoded_len(&self) -> usize {
        self.bytes().len()
    }

    /// The entries in wire form.
    #[inline]
    pub(crate) fn wire(&self) -> &[u8] {
        self.bytes()
    }

    #[inline]
    pub(crate) fn write(&self, buf: &mut BytesMut) {
        if let Some(raw) = &self.raw {
            buf.put_slice(raw);
        }
    }
}

fn put_entry(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_u8(PropertyId::UserProperty as u8);
    buf.put_u16(name.len() as u16);
    buf.put_slice(name);
    buf.put_u16(value.len() as u16);
    buf.put_slice(value);
}

/// Offsets of the name and value of the entry at `pos` (valid by the invariant).
#[inline]
fn entry(raw: &[u8], pos: usize) -> (usize, usize, usize, usize) {
    let n0 = pos + 3;
    let n1 = n0 + usize::from(u16::from_be_bytes([raw[pos + 1], raw[pos + 2]]));
    let v0 = n1 + 2;
    let v1 = v0 + usize::from(u16::from_be_bytes([raw[n1], raw[n1 + 1]]));
    (n0, n1, v0, v1)
}

/// `bytes` as a `str`; `bytes` is known to be valid UTF-8 (the type's invariant), so the
/// empty fallback is never taken.
#[inline]
fn valid_str(bytes: &[u8]) -> &str {
    let s = std::str::from_utf8(bytes);
    debug_assert!(s.is_ok(), "unvalidated User Property {bytes:?}");
    s.unwrap_or_default()
}

/// Iterator over `(name, value)` pairs.
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.raw.len() {
            return None;
        }
        let (n0, n1, v0, v1) = entry(self.raw, self.pos);
        self.pos = v1;
        // Kept in wire form, so each string is checked again here (the standard check; the
        // entries were validated when they were decoded or pushed, so it always passes).
        Some((valid_str(&self.raw[n0..n1]), valid_str(&self.raw[v0..v1])))
    }
}

impl<'a> IntoIterator for &'a UserProperties {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl FromIterator<UserProperty> for UserProperties {
    fn from_iter<I: IntoIterator<Item = UserProperty>>(iter: I) -> Self {
        let mut buf = BytesMut::new();
        let mut count = 0;
        for p in iter {
            put_entry(&mut buf, p.name.as_bytes(), p.value.as_bytes());
            count += 1;
        }
        Self {
            raw: (count > 0).then(|| buf.freeze()),
            count,
        }
    }
}

impl From<Vec<UserProperty>> for UserProperties {
    fn from(v: Vec<UserProperty>) -> Self {
        v.into_iter().collect()
    }
}

impl fmt::Debug for UserProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Collects the User Property entries of one property block while it is being read.
pub(crate) struct Collector {
    /// Contiguous range of entries in the block so far.
    range: Option<(usize, usize)>,
    /// Entries copied once they stopped being contiguous.
    spill: Option<BytesMut>,
    count: usize,
    /// Length of the property block: what a spill may need at most.
    block_len: usize,
}

impl Collector {
    /// A collector for a property block of `block_len` bytes.
    pub(crate) fn new(block_len: usize) -> Self {
        Self {
            range: None,
            spill: None,
            count: 0,
            block_len,
        }
    }

    /// Records the validated entry at `start..end` of `block` (the packet holding the property
    /// block; offsets are into it).
    #[inline]
    pub(crate) fn add(&mut self, block: &Bytes, start: usize, end: usize) {
        self.count += 1;
        if let Some(spill) = &mut self.spill {
            spill.put_slice(&block[start..end]);
            return;
        }
        match &mut self.range {
            None => self.range = Some((start, end)),
            Some((_, e)) if *e == start => *e = end,
            Some((s, e)) => {
                // Interleaved with other properties: copy (bounded by the block's size).
                let mut spill = BytesMut::with_capacity(self.block_len);
                spill.put_slice(&block[*s..*e]);
                spill.put_slice(&block[start..end]);
                self.spill = Some(spill);
            }
        }
    }

    pub(crate) fn finish(self, block: &Bytes) -> UserProperties {
        let raw = match (self.spill, self.range) {
            (Some(spill), _) => Some(spill.freeze()),
            (None, Some((s, e))) => Some(block.slice(s..e)),
            (None, None) => None,
        };
        UserProperties {
            raw,
            count: self.count,
        }
    }
}
