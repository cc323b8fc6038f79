//! Conversions between `std::net::SocketAddr` and ngtcp2's C socket addresses, and an owned
//! `ngtcp2_path` whose pointers stay valid while it lives.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use mqttd_ngtcp2_sys as sys;

/// Writes `addr` into `storage` and returns the address length for ngtcp2.
pub(crate) fn write_sockaddr(
    addr: SocketAddr,
    storage: &mut sys::ngtcp2_sockaddr_union,
) -> sys::ngtcp2_socklen {
    match addr {
        SocketAddr::V4(a) => {
            let sin = sys::sockaddr_in {
                sin_family: libc::AF_INET as sys::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: sys::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            storage.in_ = sin;
            std::mem::size_of::<sys::sockaddr_in>() as sys::ngtcp2_socklen
        }
        SocketAddr::V6(a) => {
            let sin6 = sys::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as sys::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: sys::in6_addr {
                    __in6_u: sys::in6_addr__bindgen_ty_1 {
                        __u6_addr8: a.ip().octets(),
                    },
                },
                sin6_scope_id: a.scope_id(),
            };
            storage.in6 = sin6;
            std::mem::size_of::<sys::sockaddr_in6>() as sys::ngtcp2_socklen
        }
    }
}

/// Reads a socket address written by ngtcp2 (or by [`write_sockaddr`]).
///
/// # Safety
/// `addr` must be null or point to a valid `sockaddr` of at least `len` bytes.
pub(crate) unsafe fn read_sockaddr(
    addr: *const sys::ngtcp2_sockaddr,
    len: sys::ngtcp2_socklen,
) -> Option<SocketAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `addr` points to a sockaddr; every sockaddr starts with the
    // family field.
    let family = unsafe { (*addr).sa_family } as i32;
    if family == libc::AF_INET && len as usize >= std::mem::size_of::<sys::sockaddr_in>() {
        // SAFETY: the family says it is a sockaddr_in and the length covers one.
        let sin = unsafe { std::ptr::read_unaligned(addr.cast::<sys::sockaddr_in>()) };
        let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
        Some(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sin.sin_port),
        )))
    } else if family == libc::AF_INET6 && len as usize >= std::mem::size_of::<sys::sockaddr_in6>() {
        // SAFETY: the family says it is a sockaddr_in6 and the length covers one.
        let sin6 = unsafe { std::ptr::read_unaligned(addr.cast::<sys::sockaddr_in6>()) };
        // SAFETY: every variant of the address union is 16 plain bytes.
        let octets = unsafe { sin6.sin6_addr.__in6_u.__u6_addr8 };
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(octets),
            u16::from_be(sin6.sin6_port),
            u32::from_be(sin6.sin6_flowinfo),
            sin6.sin6_scope_id,
        )))
    } else {
        None
    }
}

/// A network path (local and remote address) in the C layout ngtcp2 expects.
///
/// Boxed by its users when ngtcp2 must see a stable address; here the `ngtcp2_path` is rebuilt
/// by [`OwnedPath::as_ptr`] each time so moving the struct never leaves a dangling pointer.
pub(crate) struct OwnedPath {
    local: sys::ngtcp2_sockaddr_union,
    local_len: sys::ngtcp2_socklen,
    remote: sys::ngtcp2_sockaddr_union,
    remote_len: sys::ngtcp2_socklen,
    path: sys::ngtcp2_path,
}

impl OwnedPath {
    pub(crate) fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let mut p = OwnedPath {
            local: sys::ngtcp2_sockaddr_union::default(),
            local_len: 0,
            remote: sys::ngtcp2_sockaddr_union::default(),
            remote_len: 0,
            path: sys::ngtcp2_path {
                local: sys::ngtcp2_addr {
                    addr: std::ptr::null_mut(),
                    addrlen: 0,
                },
                remote: sys::ngtcp2_addr {
                    addr: std::ptr::null_mut(),
                    addrlen: 0,
                },
                user_data: std::ptr::null_mut(),
            },
        };
        p.local_len = write_sockaddr(local, &mut p.local);
        p.remote_len = write_sockaddr(remote, &mut p.remote);
        p
    }

    /// A pointer to an `ngtcp2_path` that points into `self`; valid until `self` moves or drops.
    pub(crate) fn as_ptr(&mut self) -> *const sys::ngtcp2_path {
        self.path.local.addr = (&raw mut self.local).cast();
        self.path.local.addrlen = self.local_len;
        self.path.remote.addr = (&raw mut self.remote).cast();
        self.path.remote.addrlen = self.remote_len;
        &raw const self.path
    }
}

/// Reads both addresses of an `ngtcp2_path`.
///
/// # Safety
/// `path` must point to a valid `ngtcp2_path` whose address pointers are valid.
pub(crate) unsafe fn read_path(path: *const sys::ngtcp2_path) -> Option<(SocketAddr, SocketAddr)> {
    if path.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    let p = unsafe { &*path };
    // SAFETY: ngtcp2 keeps `addr`/`addrlen` consistent.
    let local = unsafe { read_sockaddr(p.local.addr, p.local.addrlen) }?;
    // SAFETY: as above.
    let remote = unsafe { read_sockaddr(p.remote.addr, p.remote.addrlen) }?;
    Some((local, remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip() {
        for a in ["127.0.0.1:4433", "[::1]:443", "[fe80::1%2]:9", "0.0.0.0:0"] {
            let addr: SocketAddr = a.parse().expect("literal");
            let mut s = sys::ngtcp2_sockaddr_union::default();
            let len = write_sockaddr(addr, &mut s);
            // SAFETY: `s` was just written with a valid address of `len` bytes.
            let back = unsafe { read_sockaddr((&raw const s).cast(), len) };
            assert_eq!(back, Some(addr));
        }
        let mut p = OwnedPath::new(
            "127.0.0.1:1".parse().expect("literal"),
            "[::1]:2".parse().expect("literal"),
        );
        // SAFETY: `p` is alive and not moved while the pointer is used.
        let read = unsafe { read_path(p.as_ptr()) };
        assert_eq!(
            read,
            Some((
                "127.0.0.1:1".parse().expect("literal"),
                "[::1]:2".parse().expect("literal")
            ))
        );
    }
}
