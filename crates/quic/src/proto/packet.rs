//! Stateless packet handling for an endpoint: reading the invariant header fields, and writing
//! Version Negotiation, Stateless Reset and Retry packets, and Retry tokens.

use std::ffi::c_int;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mqttd_ngtcp2_sys as sys;

use super::types::{ConnectionId, fill_random, to_ts};
use crate::addr::write_sockaddr;

/// The version-independent fields of a packet header (RFC 8999).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Long header (handshake packets) or short header (1-RTT).
    pub long: bool,
    /// The version, for long headers (0 for short headers).
    pub version: u32,
    /// Destination Connection ID.
    pub dcid: ConnectionId,
    /// Source Connection ID (long headers only).
    pub scid: ConnectionId,
}

/// What decoding the invariant header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A header in a version we speak (or a short header).
    Supported(Header),
    /// A long header in a version we do not speak: answer with Version Negotiation.
    UnsupportedVersion(Header),
    /// Garbage.
    Invalid,
}

/// Decodes the invariant fields of `data`, whose short-header DCIDs are `short_dcid_len` long.
pub fn decode(data: &[u8], short_dcid_len: usize) -> Decoded {
    // ngtcp2 reads the first byte unconditionally.
    if data.is_empty() {
        return Decoded::Invalid;
    }
    let mut vc = sys::ngtcp2_version_cid {
        version: 0,
        dcid: std::ptr::null(),
        dcidlen: 0,
        scid: std::ptr::null(),
        scidlen: 0,
    };
    // SAFETY: `data` is valid for its length; `vc` is valid for writes and its pointers will
    // point into `data`, which outlives their use below.
    let rv = unsafe {
        sys::ngtcp2_pkt_decode_version_cid(&mut vc, data.as_ptr(), data.len(), short_dcid_len)
    };
    if rv != 0 && rv != sys::NGTCP2_ERR_VERSION_NEGOTIATION {
        return Decoded::Invalid;
    }
    let cid = |p: *const u8, len: usize| -> Option<ConnectionId> {
        if len == 0 || p.is_null() {
            return Some(ConnectionId::default());
        }
        // SAFETY: ngtcp2 points into `data` and checked the length against it.
        ConnectionId::from_slice(unsafe { std::slice::from_raw_parts(p, len) })
    };
    let (Some(dcid), Some(scid)) = (cid(vc.dcid, vc.dcidlen), cid(vc.scid, vc.scidlen)) else {
        return Decoded::Invalid;
    };
    let long = data.first().is_some_and(|b| b & 0x80 != 0);
    let header = Header {
        long,
        version: vc.version,
        dcid,
        scid,
    };
    if rv == sys::NGTCP2_ERR_VERSION_NEGOTIATION {
        Decoded::UnsupportedVersion(header)
    } else {
        Decoded::Supported(header)
    }
}

/// A client's first packet, parsed by `ngtcp2_accept`.
#[derive(Debug, Clone)]
pub struct Initial {
    /// The header fields.
    pub header: Header,
    /// The token field (from a Retry or NEW_TOKEN), possibly empty.
    pub token: Vec<u8>,
}

/// Checks that `data` is an acceptable first packet of a new connection (an Initial of a
/// supported version, at least 1200 bytes); `None` means drop it.
pub fn accept_initial(data: &[u8]) -> Option<Initial> {
    if data.is_empty() {
        return None;
    }
    // SAFETY: all-zero is a valid ngtcp2_pkt_hd.
    let mut hd: sys::ngtcp2_pkt_hd = unsafe { std::mem::zeroed() };
    // SAFETY: `data` is valid for its length; `hd` is valid for writes and its token pointer
    // points into `data`, used before `data` goes away.
    let rv = unsafe { sys::ngtcp2_accept(&mut hd, data.as_ptr(), data.len()) };
    if rv != 0 {
        return None;
    }
    let token = if hd.token.is_null() || hd.tokenlen == 0 {
        Vec::new()
    } else {
        // SAFETY: ngtcp2 points into `data` with a checked length.
        unsafe { std::slice::from_raw_parts(hd.token, hd.tokenlen) }.to_vec()
    };
    Some(Initial {
        header: Header {
            long: true,
            version: hd.version,
            dcid: ConnectionId::from_ngtcp2(&hd.dcid),
            scid: ConnectionId::from_ngtcp2(&hd.scid),
        },
        token,
    })
}

/// Writes a Version Negotiation packet answering `header`, offering `versions`.
pub fn write_version_negotiation(
    header: &Header,
    versions: &[u32],
    out: &mut Vec<u8>,
) -> Option<usize> {
    out.resize(1200, 0);
    let mut unused = [0u8; 1];
    fill_random(&mut unused);
    // Add a reserved (greasing) version so clients do not ossify on our list.
    let mut sv: Vec<u32> = versions.to_vec();
    sv.push(0x1a2a_3a4a);
    // SAFETY: `out` has 1200 writable bytes; CIDs and versions are valid for their lengths. The
    // VN packet echoes the client's SCID as DCID and its DCID as SCID.
    let n = unsafe {
        sys::ngtcp2_pkt_write_version_negotiation(
            out.as_mut_ptr(),
            out.len(),
            unused[0],
            header.scid.as_bytes().as_ptr(),
            header.scid.as_bytes().len(),
            header.dcid.as_bytes().as_ptr(),
            header.dcid.as_bytes().len(),
            sv.as_ptr(),
            sv.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    out.truncate(n as usize);
    Some(n as usize)
}

/// Writes a Stateless Reset for a short-header packet of `received_len` bytes that went to an
/// unknown connection ID. The reset is shorter than what triggered it (so two endpoints cannot
/// loop) and at least 21 bytes; `None` if the trigger is too short to answer.
pub fn write_stateless_reset(
    token: &[u8; 16],
    received_len: usize,
    out: &mut Vec<u8>,
) -> Option<usize> {
    // RFC 9000 §10.3.3: answer short triggers with one byte less (never a loop), down to
    // the smallest reset ngtcp2 writes (5 random bytes + 16-byte token).
    const MIN_LEN: usize = 5 + 16;
    if received_len <= MIN_LEN {
        return None;
    }
    let len = (received_len - 1).min(43);
    let randlen = len - 16;
    let mut rand = vec![0u8; randlen];
    fill_random(&mut rand);
    out.resize(len, 0);
    let t = sys::ngtcp2_stateless_reset_token { data: *token };
    // SAFETY: `out` has `len` writable bytes; token and random bytes are valid.
    let n = unsafe {
        sys::ngtcp2_pkt_write_stateless_reset2(
            out.as_mut_ptr(),
            out.len(),
            &t,
            rand.as_ptr(),
            rand.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    out.truncate(n as usize);
    Some(n as usize)
}

/// Mints a Retry token binding the client's address, the original DCID and the time.
pub fn generate_retry_token(
    secret: &[u8; 32],
    version: u32,
    remote: SocketAddr,
    retry_scid: &ConnectionId,
    odcid: &ConnectionId,
    now: Instant,
) -> Option<Vec<u8>> {
    let mut token = vec![0u8; 256];
    let mut sa = sys::ngtcp2_sockaddr_union::default();
    let salen = write_sockaddr(remote, &mut sa);
    let rscid = retry_scid.to_ngtcp2();
    let od = odcid.to_ngtcp2();
    // SAFETY: `token` has room for NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN2 (well under 256) bytes;
    // every other pointer is valid for the call.
    let n = unsafe {
        sys::ngtcp2_crypto_generate_retry_token2(
            token.as_mut_ptr(),
            secret.as_ptr(),
            secret.len(),
            version,
            (&raw const sa).cast(),
            salen,
            &rscid,
            &od,
            to_ts(now),
        )
    };
    if n <= 0 {
        return None;
    }
    token.truncate(n as usize);
    Some(token)
}

/// Verifies a Retry token; returns the original DCID it carries.
pub fn verify_retry_token(
    secret: &[u8; 32],
    version: u32,
    remote: SocketAddr,
    dcid: &ConnectionId,
    token: &[u8],
    lifetime: Duration,
    now: Instant,
) -> Option<ConnectionId> {
    let mut sa = sys::ngtcp2_sockaddr_union::default();
    let salen = write_sockaddr(remote, &mut sa);
    let d = dcid.to_ngtcp2();
    let mut odcid = sys::ngtcp2_cid::default();
    // SAFETY: every pointer is valid for the call; `odcid` is valid for writes.
    let rv: c_int = unsafe {
        sys::ngtcp2_crypto_verify_retry_token2(
            &mut odcid,
            token.as_ptr(),
            token.len(),
            secret.as_ptr(),
            secret.len(),
            version,
            (&raw const sa).cast(),
            salen,
            &d,
            lifetime.as_nanos() as u64,
            to_ts(now),
        )
    };
    (rv == 0).then(|| ConnectionId::from_ngtcp2(&odcid))
}

/// Writes a Retry packet sending the client to `new_scid` with `token`.
pub fn write_retry(
    header: &Header,
    new_scid: &ConnectionId,
    token: &[u8],
    out: &mut Vec<u8>,
) -> Option<usize> {
    out.resize(1200, 0);
    let dcid = header.scid.to_ngtcp2();
    let scid = new_scid.to_ngtcp2();
    let odcid = header.dcid.to_ngtcp2();
    // SAFETY: `out` has 1200 writable bytes; all CIDs and the token are valid for the call.
    let n = unsafe {
        sys::ngtcp2_crypto_write_retry(
            out.as_mut_ptr(),
            out.len(),
            header.version,
            &dcid,
            &scid,
            &odcid,
            token.as_ptr(),
            token.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    out.truncate(n as usize);
    Some(n as usize)
}

/// Writes a CONNECTION_CLOSE in an Initial packet refusing a connection attempt (e.g. over the
/// connection limit), without creating any state.
pub fn write_refusal(header: &Header, out: &mut Vec<u8>) -> Option<usize> {
    out.resize(1200, 0);
    let dcid = header.scid.to_ngtcp2();
    let scid = header.dcid.to_ngtcp2();
    // CONNECTION_REFUSED (RFC 9000 §20.1).
    let code = 0x2;
    // SAFETY: `out` has 1200 writable bytes; the CIDs are valid for the call.
    let n = unsafe {
        sys::ngtcp2_crypto_write_connection_close(
            out.as_mut_ptr(),
            out.len(),
            header.version,
            &dcid,
            &scid,
            code,
            std::ptr::null(),
            0,
        )
    };
    if n <= 0 {
        return None;
    }
    out.truncate(n as usize);
    Some(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_garbage_without_panicking_and_flags_unknown_versions() {
        assert_eq!(decode(&[], 16), Decoded::Invalid);
        // Long header, version 0x0a0a0a0a (reserved), DCID len 8, SCID len 0.
        let mut pkt = vec![0xc0, 0x0a, 0x0a, 0x0a, 0x0a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0];
        pkt.resize(1200, 0);
        match decode(&pkt, 16) {
            Decoded::UnsupportedVersion(h) => {
                assert_eq!(h.dcid.as_bytes(), &[1, 2, 3, 4, 5, 6, 7, 8]);
                let mut out = Vec::new();
                let n = write_version_negotiation(&h, &[1], &mut out).expect("VN");
                assert!(n > 7 && out[0] & 0x80 != 0);
                assert_eq!(&out[1..5], &[0, 0, 0, 0]);
            }
            other => panic!("expected VN trigger, got {other:?}"),
        }
        let mut out = Vec::new();
        assert!(write_stateless_reset(&[7; 16], 21, &mut out).is_none());
        assert_eq!(write_stateless_reset(&[7; 16], 30, &mut out), Some(29));
        let n = write_stateless_reset(&[7; 16], 100, &mut out).expect("reset");
        assert!((21..100).contains(&n));
        assert_eq!(&out[n - 16..], &[7; 16]);
    }
}
