//! The bindings link against the pinned ngtcp2 and its entry points behave as documented.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::ptr;

use mqttd_ngtcp2_sys::*;

#[test]
fn version_is_the_pinned_one() {
    // SAFETY: ngtcp2_version returns a pointer to a static struct (or null if too old).
    let info = unsafe { ngtcp2_version(0) };
    assert!(!info.is_null());
    // SAFETY: non-null, points at ngtcp2's static info whose version_str is a C string.
    let (num, text) = unsafe { ((*info).version_num, CStr::from_ptr((*info).version_str)) };
    assert_eq!(text.to_str().unwrap(), "1.25.0");
    assert_eq!(num, 0x011900);
}

fn cid(bytes: &[u8]) -> ngtcp2_cid {
    let mut cid = ngtcp2_cid::default();
    cid.data[..bytes.len()].copy_from_slice(bytes);
    cid.datalen = bytes.len();
    cid
}

#[test]
fn transport_params_round_trip() {
    let mut params = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: the function initialises the whole struct of the given version.
    let mut params = unsafe {
        ngtcp2_transport_params_default_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            params.as_mut_ptr(),
        );
        params.assume_init()
    };
    params.initial_max_data = 1 << 24;
    params.initial_max_stream_data_bidi_local = 256 * 1024;
    params.initial_max_stream_data_bidi_remote = 128 * 1024;
    params.initial_max_streams_bidi = 100;
    params.initial_max_streams_uni = 3;
    params.max_idle_timeout = 30 * NGTCP2_SECONDS;
    params.max_datagram_frame_size = 1200;
    params.active_connection_id_limit = 8;
    params.initial_scid = cid(&[1, 2, 3, 4, 5, 6, 7, 8]);
    params.initial_scid_present = 1;

    let mut buf = [0u8; 512];
    // SAFETY: buf is writable for its length; params is a valid struct of the current version.
    let n = unsafe {
        ngtcp2_transport_params_encode_versioned(
            buf.as_mut_ptr(),
            buf.len(),
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            &params,
        )
    };
    assert!(n > 0, "encode failed: {n}");

    let mut decoded = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: decoded is writable, buf[..n] holds the encoding.
    let rv = unsafe {
        ngtcp2_transport_params_decode_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            decoded.as_mut_ptr(),
            buf.as_ptr(),
            n as usize,
        )
    };
    assert_eq!(rv, 0);
    // SAFETY: a successful decode fills the struct.
    let decoded = unsafe { decoded.assume_init() };
    assert_eq!(decoded.initial_max_data, params.initial_max_data);
    assert_eq!(
        decoded.initial_max_stream_data_bidi_local,
        params.initial_max_stream_data_bidi_local
    );
    assert_eq!(
        decoded.initial_max_stream_data_bidi_remote,
        params.initial_max_stream_data_bidi_remote
    );
    assert_eq!(decoded.initial_max_streams_bidi, 100);
    assert_eq!(decoded.initial_max_streams_uni, 3);
    assert_eq!(decoded.max_idle_timeout, params.max_idle_timeout);
    assert_eq!(decoded.max_datagram_frame_size, 1200);
    assert_eq!(decoded.active_connection_id_limit, 8);
    assert_eq!(decoded.initial_scid_present, 1);
    assert_eq!(
        &decoded.initial_scid.data[..decoded.initial_scid.datalen],
        &[1, 2, 3, 4, 5, 6, 7, 8]
    );

    // A truncated encoding is rejected, not misread.
    let mut again = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: as above, with a shorter (still in-bounds) length.
    let rv = unsafe {
        ngtcp2_transport_params_decode_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            again.as_mut_ptr(),
            buf.as_ptr(),
            n as usize - 1,
        )
    };
    assert_ne!(rv, 0);
}

unsafe extern "C" fn rand(dest: *mut u8, len: usize, _ctx: *const ngtcp2_rand_ctx) {
    // SAFETY: ngtcp2 passes a writable buffer of `len` bytes.
    unsafe { ptr::write_bytes(dest, 7, len) };
}

#[test]
fn client_connection_is_created_and_freed() {
    let mut local: libc_sockaddr_in = libc_sockaddr_in::loopback(50000);
    let mut remote: libc_sockaddr_in = libc_sockaddr_in::loopback(14567);
    let path = ngtcp2_path {
        local: ngtcp2_addr {
            addr: (&raw mut local).cast(),
            addrlen: size_of::<libc_sockaddr_in>() as _,
        },
        remote: ngtcp2_addr {
            addr: (&raw mut remote).cast(),
            addrlen: size_of::<libc_sockaddr_in>() as _,
        },
        user_data: ptr::null_mut(),
    };
    let callbacks = ngtcp2_callbacks {
        rand: Some(rand),
        ..Default::default()
    };
    let mut settings = MaybeUninit::<ngtcp2_settings>::zeroed();
    let mut params = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: both functions initialise their whole struct.
    let (settings, params) = unsafe {
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION as i32, settings.as_mut_ptr());
        ngtcp2_transport_params_default_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            params.as_mut_ptr(),
        );
        (settings.assume_init(), params.assume_init())
    };
    let dcid = cid(&[9; 18]);
    let scid = cid(&[3; 16]);
    let mut conn: *mut ngtcp2_conn = ptr::null_mut();
    // SAFETY: every pointer refers to a live, initialised value of the declared version; ngtcp2
    // copies the path, settings and parameters.
    let rv = unsafe {
        ngtcp2_conn_client_new_versioned(
            &mut conn,
            &dcid,
            &scid,
            &path,
            NGTCP2_PROTO_VER_V1,
            NGTCP2_CALLBACKS_VERSION as i32,
            &callbacks,
            NGTCP2_SETTINGS_VERSION as i32,
            &settings,
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            &params,
            ptr::null(),
            ptr::null_mut(),
        )
    };
    assert_eq!(rv, 0);
    assert!(!conn.is_null());
    // SAFETY: conn was just created and is not used after being freed.
    unsafe {
        assert_eq!(ngtcp2_conn_is_server(conn), 0);
        assert_eq!(
            ngtcp2_conn_get_client_chosen_version(conn),
            NGTCP2_PROTO_VER_V1
        );
        ngtcp2_conn_del(conn);
    }
}

/// A `struct sockaddr_in` laid out as glibc does (the test avoids a libc dependency).
#[repr(C)]
struct libc_sockaddr_in {
    family: u16,
    port: [u8; 2],
    addr: [u8; 4],
    zero: [u8; 8],
}

impl libc_sockaddr_in {
    fn loopback(port: u16) -> Self {
        Self {
            family: 2,
            port: port.to_be_bytes(),
            addr: [127, 0, 0, 1],
            zero: [0; 8],
        }
    }
}

#[test]
fn macro_constants_match_the_header() {
    // The library's own defaults are built from the same macros the crate re-declares.
    let mut settings = MaybeUninit::<ngtcp2_settings>::zeroed();
    // SAFETY: initialises the whole struct.
    let settings = unsafe {
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION as i32, settings.as_mut_ptr());
        settings.assume_init()
    };
    assert_eq!(settings.initial_rtt, NGTCP2_DEFAULT_INITIAL_RTT);
    let mut params = MaybeUninit::<ngtcp2_transport_params>::zeroed();
    // SAFETY: initialises the whole struct.
    let params = unsafe {
        ngtcp2_transport_params_default_versioned(
            NGTCP2_TRANSPORT_PARAMS_VERSION as i32,
            params.as_mut_ptr(),
        );
        params.assume_init()
    };
    assert_eq!(params.max_ack_delay, NGTCP2_DEFAULT_MAX_ACK_DELAY);
    // SAFETY: plain query functions on version numbers.
    unsafe {
        assert_ne!(ngtcp2_is_supported_version(NGTCP2_PROTO_VER_V1), 0);
        assert_ne!(ngtcp2_is_supported_version(NGTCP2_PROTO_VER_V2), 0);
        assert_eq!(ngtcp2_is_supported_version(0x0000_0002), 0);
    }
}
