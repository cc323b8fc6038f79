//! Primitive wire types of MQTT (§1.5): integers, Variable Byte Integers, UTF-8 strings and
//! binary data, read from one whole packet held in a [`Bytes`] and written into a [`BytesMut`].
//!
//! Invariant: a [`Reader`] never reads past the end of the packet it was given; every read checks
//! the remaining length first and fails with [`DecodeError::UnexpectedEof`]. Strings and binary
//! data are returned as slices of the packet's `Bytes` (no copy).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::string::{MqttString, check_str_bytes};

/// The largest value a Variable Byte Integer can hold (§1.5.5): 268,435,455.
pub const VARINT_MAX: u32 = 268_435_455;

/// Outcome of reading a Variable Byte Integer from a possibly incomplete buffer.
pub(crate) enum VarInt {
    /// The value and how many bytes encoded it.
    Value(u32, usize),
    /// The buffer ends before the integer does.
    Incomplete,
}

/// Reads a Variable Byte Integer from the start of `buf`, rejecting encodings longer than four
/// bytes and non-minimal ones (a trailing `0x00` continuation byte) [MQTT-1.5.5-1].
#[inline]
pub(crate) fn read_varint(buf: &[u8]) -> Result<VarInt, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(VarInt::Incomplete);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(DecodeError::NonMinimalVarInt);
            }
            return Ok(VarInt::Value(value, i + 1));
        }
    }
    Err(DecodeError::VarIntTooLong)
}

/// How many bytes the Variable Byte Integer encoding of `value` takes.
#[inline]
pub(crate) const fn varint_len(value: usize) -> usize {
    if value < 128 {
        1
    } else if value < 16_384 {
        2
    } else if value < 2_097_152 {
        3
    } else {
        4
    }
}

/// Writes `value` (at most [`VARINT_MAX`], checked by the caller) as a Variable Byte Integer.
#[inline]
pub(crate) fn write_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Writes a length-prefixed string or binary field; the caller guarantees `len <= 65535`.
#[inline]
pub(crate) fn write_binary(buf: &mut BytesMut, data: &[u8]) {
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

/// A cursor over the variable header and payload of one packet.
///
/// Invariant: `pos <= end <= buf.len()`; reads stop at `end` (the end of the packet, or of the
/// property block being read, see [`Reader::limit`]).
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    end: usize,
}

impl Reader {
    /// A reader over `buf`, which holds exactly the bytes after the fixed header.
    #[inline(always)]
    pub(crate) fn new(buf: Bytes) -> Self {
        Self::at(buf, 0)
    }

    /// A reader over `buf` starting at `pos` (e.g. past the fixed header); `pos <= buf.len()`.
    #[inline(always)]
    pub(crate) fn at(buf: Bytes, pos: usize) -> Self {
        debug_assert!(pos <= buf.len());
        let end = buf.len();
        Self {
            buf,
            pos: pos.min(end),
            end,
        }
    }

    /// Restricts reading to the next `len` bytes (a property block) and returns the previous
    /// end, for [`Reader::unlimit`]. The caller has checked `len <= remaining()`.
    #[inline(always)]
    pub(crate) fn limit(&mut self, len: usize) -> usize {
        debug_assert!(len <= self.remaining());
        let old = self.end;
        self.end = self.pos + len.min(self.remaining());
        old
    }

    /// Restores the end saved by [`Reader::limit`] once the block is read.
    #[inline(always)]
    pub(crate) fn unlimit(&mut self, end: usize) {
        debug_assert!(self.pos <= end && end <= self.buf.len());
        self.end = end.min(self.buf.len()).max(self.pos);
    }

    /// The packet's bytes (positions are offsets into it).
    #[inline(always)]
    pub(crate) fn bytes(&self) -> &Bytes {
        &self.buf
    }

    /// Bytes left to read.
    #[inline(always)]
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// How many `(length-prefixed string, `extra` bytes)` entries the rest holds, counting a
    /// truncated last one; used to size a `Vec` exactly before parsing (bounded by the packet).
    pub(crate) fn count_entries(&self, extra: usize) -> usize {
        let rest = &self.buf[self.pos..self.end];
        let (mut at, mut n) = (0, 0);
        while at < rest.len() {
            n += 1;
            let len = match rest.get(at..at + 2) {
                Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
                None => break,
            };
            at += 2 + len + extra;
        }
        n
    }

    /// Offset of the next byte to read.
    #[inline]
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Validates a UTF-8 Encoded String and steps over it without slicing it out.
    #[inline]
    pub(crate) fn skip_string(&mut self) -> Result<(), DecodeError> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        check_str_bytes(&self.buf[self.pos..self.pos + len])?;
        self.pos += len;
        Ok(())
    }

    /// Fails with [`DecodeError::TrailingBytes`] unless everything has been read.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    #[inline(always)]
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.remaining() < n {
            Err(DecodeError::UnexpectedEof)
        } else {
            Ok(())
        }
    }

    #[inline(always)]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }

    #[inline(always)]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        let v = u16::from_be_bytes([self.buf[self.pos], self.buf[self.pos + 1]]);
        self.pos += 2;
        Ok(v)
    }

    #[inline(always)]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        let b = &self.buf[self.pos..self.pos + 4];
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.pos += 4;
        Ok(v)
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf[self.pos..self.end])? {
            VarInt::Value(v, n) => {
                self.pos += n;
                Ok(v)
            }
            VarInt::Incomplete => Err(DecodeError::UnexpectedEof),
        }
    }

    /// `n` raw bytes as a slice of the packet.
    #[inline(always)]
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        let v = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(v)
    }

    /// Everything that is left (a PUBLISH or will payload).
    #[inline(always)]
    pub(crate) fn rest(&mut self) -> Bytes {
        // Hand over the packet's own handle instead of slicing it: no reference-count traffic.
        debug_assert_eq!(self.end, self.buf.len(), "rest() inside a limited block");
        let mut v = std::mem::take(&mut self.buf);
        v.advance(self.pos);
        self.pos = 0;
        self.end = 0;
        v
    }

    /// A two-byte-length-prefixed Binary Data field (§1.5.6).
    #[inline]
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    /// A UTF-8 Encoded String (§1.5.4), validated.
    #[inline]
    pub(crate) fn string(&mut self) -> Result<MqttString, DecodeError> {
        let bytes = self.binary()?;
        MqttString::from_bytes(bytes)
    }
}

/// Appends `len` bytes to `buf` and lets `f` write them through a [`Cursor`] (see
/// [`Cursor::append`]).
#[cfg(test)]
pub(crate) fn write_reserved(buf: &mut BytesMut, len: usize, f: impl FnOnce(&mut Cursor<'_>)) {
    let mut c = Cursor::append(buf, len);
    f(&mut c);
    c.finish();
}

/// A writer over bytes just appended to a `BytesMut` (see [`Cursor::append`]); every write is
/// bounds-checked against them (overrunning panics: an encoder length bug, never
/// input-driven).
pub(crate) struct Cursor<'a> {
    dst: &'a mut [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Appends `len` bytes to `buf` for the caller to write through the returned cursor. The
    /// encoders compute the exact length first, so this is one capacity check and one length
    /// update per packet instead of a capacity check, a copy and a length update per `put`.
    ///
    /// The bytes are zeroed before the cursor overwrites them (safe code cannot expose spare
    /// capacity otherwise). A short write (a packet head, a small packet) zeroes a fixed-size
    /// block, a few inlined vector stores instead of a `memset` call, and cuts the length back
    /// to `len`; this is done only when `buf` already has that much spare capacity, so it never
    /// grows the buffer beyond what the packet needs. A large payload is better appended after
    /// the head with `put_slice` (one `memcpy`, nothing zeroed).
    #[inline(always)]
    pub(crate) fn append(buf: &'a mut BytesMut, len: usize) -> Self {
        let start = buf.len();
        let spare = buf.capacity() - start;
        if len <= 64 && spare >= 64 {
            buf.extend_from_slice(&[0; 64]);
            buf.truncate(start + len);
        } else if len <= 128 && spare >= 128 {
            buf.extend_from_slice(&[0; 128]);
            buf.truncate(start + len);
        } else {
            buf.resize(start + len, 0);
        }
        Cursor {
            dst: &mut buf[start..],
            pos: 0,
        }
    }

    /// Ends the writes; in debug builds, checks that exactly the appended bytes were written.
    #[inline(always)]
    pub(crate) fn finish(self) {
        debug_assert_eq!(
            self.pos,
            self.dst.len(),
            "encoded length differs from the computed length"
        );
    }
}

impl Cursor<'_> {
    /// Copies `src` (panics past the reservation: an encoder length bug, never input-driven).
    #[inline(always)]
    pub(crate) fn slice(&mut self, src: &[u8]) {
        let end = self.pos + src.len();
        let dst = &mut self.dst[self.pos..end];
        let n = src.len();
        // Topics, short payloads and property values are mostly small: copy them with a few
        // overlapping fixed-size moves (inlined) instead of a call to `memcpy`.
        if (16..=32).contains(&n) {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        } else if (32..=64).contains(&n) {
            dst[..32].copy_from_slice(&src[..32]);
            dst[n - 32..].copy_from_slice(&src[n - 32..]);
        } else if (8..16).contains(&n) {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        } else {
            dst.copy_from_slice(src);
        }
        self.pos = end;
    }

    /// One byte.
    #[inline(always)]
    pub(crate) fn u8(&mut self, v: u8) {
        self.dst[self.pos] = v;
        self.pos += 1;
    }

    /// A big-endian `u16`.
    #[inline(always)]
    pub(crate) fn u16(&mut self, v: u16) {
        self.slice(&v.to_be_bytes());
    }

    /// A big-endian `u32`.
    #[inline(always)]
    pub(crate) fn u32(&mut self, v: u32) {
        self.slice(&v.to_be_bytes());
    }

    /// A Variable Byte Integer (`value` at most [`VARINT_MAX`], checked by the caller).
    #[inline(always)]
    pub(crate) fn varint(&mut self, value: usize) {
        if value < 128 {
            self.u8(value as u8);
            return;
        }
        let mut value = value;
        loop {
            let byte = (value % 128) as u8;
            value /= 128;
            if value == 0 {
                self.u8(byte);
                break;
            }
            self.u8(byte | 0x80);
        }
    }

    /// A two-byte-length-prefixed string or binary field; the caller guarantees `len <= 65535`.
    #[inline(always)]
    pub(crate) fn binary(&mut self, data: &[u8]) {
        self.u16(data.len() as u16);
        self.slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every copy size (the inlined small-copy branches and the `memcpy` one) writes exactly
    /// the source bytes after what was already written, and the buffer length follows, whether
    /// the buffer has just enough room (zero-filled in place) or plenty (fixed-size blocks).
    #[test]
    fn cursor_copies_every_size_exactly() {
        let src: Vec<u8> = (0..=255u8).collect();
        for spare in [0, 64, 128, 1024] {
            for n in 0..=200 {
                let mut buf = BytesMut::with_capacity(2 + spare);
                buf.put_slice(b"xy");
                write_reserved(&mut buf, 3 + n + 2, |c| {
                    c.u8(0xAA);
                    c.u16(0x0102);
                    c.slice(&src[..n]);
                    c.u16(0xBEEF);
                });
                let mut want = vec![b'x', b'y', 0xAA, 0x01, 0x02];
                want.extend_from_slice(&src[..n]);
                want.extend_from_slice(&[0xBE, 0xEF]);
                assert_eq!(&buf[..], &want[..], "n = {n}, spare = {spare}");
            }
        }
    }

    /// The cursor's Variable Byte Integer matches the `BytesMut` writer at every length boundary.
    #[test]
    fn cursor_varint_matches_writer() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            VARINT_MAX as usize,
        ] {
            let mut a = BytesMut::new();
            write_varint(&mut a, v);
            let mut b = BytesMut::new();
            write_reserved(&mut b, varint_len(v), |c| c.varint(v));
            assert_eq!(a, b, "{v}");
        }
    }
}
