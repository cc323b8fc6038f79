//! OpenSSL 3.5 declarations that `openssl-sys` 0.9 does not provide, checked against the headers
//! openssl-src 300.5.5 ships (`ssl.h`, `core.h`, `core_dispatch.h`, `evp.h`).

use std::ffi::{c_int, c_uchar, c_void};

use openssl_sys::{EVP_CIPHER, EVP_CIPHER_CTX, EVP_MD, OSSL_PARAM, SSL};

/// `OSSL_DISPATCH` (`core.h`): one function table entry.
#[repr(C)]
pub struct OsslDispatch {
    /// `OSSL_FUNC_*` identifier, 0 ends the table.
    pub function_id: c_int,
    /// The function, cast to a generic pointer type.
    pub function: Option<unsafe extern "C" fn()>,
}

// `core_dispatch.h`: the QUIC TLS callback identifiers.
pub const OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_SEND: c_int = 2001;
pub const OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_RECV_RCD: c_int = 2002;
pub const OSSL_FUNC_SSL_QUIC_TLS_CRYPTO_RELEASE_RCD: c_int = 2003;
pub const OSSL_FUNC_SSL_QUIC_TLS_YIELD_SECRET: c_int = 2004;
pub const OSSL_FUNC_SSL_QUIC_TLS_GOT_TRANSPORT_PARAMS: c_int = 2005;
pub const OSSL_FUNC_SSL_QUIC_TLS_ALERT: c_int = 2006;

// `ssl.h`: record protection levels handed to yield_secret.
pub const OSSL_RECORD_PROTECTION_LEVEL_NONE: u32 = 0;
pub const OSSL_RECORD_PROTECTION_LEVEL_EARLY: u32 = 1;
pub const OSSL_RECORD_PROTECTION_LEVEL_HANDSHAKE: u32 = 2;
pub const OSSL_RECORD_PROTECTION_LEVEL_APPLICATION: u32 = 3;

// `ssl.h`: `OSSL_HANDSHAKE_STATE` of a finished handshake (SSL_get_state).
pub const TLS_ST_OK: c_int = 1;

// `ssl.h`: SSL_get_early_data_status results.
pub const SSL_EARLY_DATA_ACCEPTED: c_int = 2;

// `evp.h`: AEAD controls (EVP_CTRL_AEAD_* alias the GCM values).
pub const EVP_CTRL_AEAD_SET_IVLEN: c_int = 0x9;

// `core.h` / `params.h` / `core_names.h`: an octet-string parameter, the "not yet written"
// marker of `return_size`, and the AEAD tag parameter's name.
pub const OSSL_PARAM_UTF8_STRING: u32 = 4;
pub const OSSL_PARAM_OCTET_STRING: u32 = 5;
pub const OSSL_PARAM_UNMODIFIED: usize = usize::MAX;
pub const OSSL_CIPHER_PARAM_AEAD_TAG: &std::ffi::CStr = c"tag";
// `core_names.h`: the digest of an HMAC context.
pub const OSSL_MAC_PARAM_DIGEST: &std::ffi::CStr = c"digest";
// `kdf.h`: HKDF modes.
pub const EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND: c_int = 0;
pub const EVP_KDF_HKDF_MODE_EXTRACT_ONLY: c_int = 1;
pub const EVP_KDF_HKDF_MODE_EXPAND_ONLY: c_int = 2;

unsafe extern "C" {
    pub fn SSL_get_state(s: *const SSL) -> c_int;
    pub fn SSL_set_quic_tls_cbs(s: *mut SSL, qtdis: *const OsslDispatch, arg: *mut c_void)
    -> c_int;
    pub fn SSL_set_quic_tls_transport_params(
        s: *mut SSL,
        params: *const c_uchar,
        params_len: usize,
    ) -> c_int;
    pub fn SSL_set_quic_tls_early_data_enabled(s: *mut SSL, enabled: c_int) -> c_int;
    pub fn SSL_get_early_data_status(s: *const SSL) -> c_int;
    pub fn EVP_CIPHER_get_key_length(cipher: *const EVP_CIPHER) -> c_int;
    pub fn EVP_CIPHER_get_iv_length(cipher: *const EVP_CIPHER) -> c_int;
    pub fn EVP_DecryptInit_ex2(
        ctx: *mut EVP_CIPHER_CTX,
        cipher: *const EVP_CIPHER,
        key: *const c_uchar,
        iv: *const c_uchar,
        params: *const OSSL_PARAM,
    ) -> c_int;
    pub fn EVP_EncryptInit_ex2(
        ctx: *mut EVP_CIPHER_CTX,
        cipher: *const EVP_CIPHER,
        key: *const c_uchar,
        iv: *const c_uchar,
        params: *const OSSL_PARAM,
    ) -> c_int;
    pub fn SSL_get0_group_name(s: *mut SSL) -> *const std::ffi::c_char;
    pub fn SSL_group_to_name(s: *mut SSL, id: c_int) -> *const std::ffi::c_char;
    pub fn EVP_CIPHER_CTX_get_params(ctx: *mut EVP_CIPHER_CTX, params: *mut OSSL_PARAM) -> c_int;
    pub fn EVP_MD_get0_name(md: *const EVP_MD) -> *const std::ffi::c_char;
    pub fn OPENSSL_cleanse(ptr: *mut c_void, len: usize);
}

/// An `OSSL_PARAM` of `data_type` over `(data, len)`, as the `OSSL_PARAM_construct_*` helpers
/// build it (OpenSSL keeps no pointer to it after the call it is passed to).
pub fn param(
    key: &'static std::ffi::CStr,
    data_type: u32,
    data: *mut c_void,
    len: usize,
) -> OSSL_PARAM {
    OSSL_PARAM {
        key: key.as_ptr(),
        data_type,
        data,
        data_size: len,
        return_size: OSSL_PARAM_UNMODIFIED,
    }
}

/// The terminating `OSSL_PARAM` (`OSSL_PARAM_construct_end`).
pub fn param_end() -> OSSL_PARAM {
    OSSL_PARAM {
        key: std::ptr::null(),
        data_type: 0,
        data: std::ptr::null_mut(),
        data_size: 0,
        return_size: 0,
    }
}

/// An `OSSL_PARAM` array of one AEAD-tag octet string (read or written at `tag`) and the end
/// marker, as `OSSL_PARAM_construct_octet_string` + `OSSL_PARAM_construct_end` would build it.
pub fn aead_tag_params(tag: *mut c_void, len: usize) -> [OSSL_PARAM; 2] {
    [
        param(
            OSSL_CIPHER_PARAM_AEAD_TAG,
            OSSL_PARAM_OCTET_STRING,
            tag,
            len,
        ),
        param_end(),
    ]
}

// `ssl.h`: SSL_get1_groups(s, list) is SSL_ctrl(s, SSL_CTRL_GET_GROUPS, 0, list).
pub const SSL_CTRL_GET_GROUPS: c_int = 90;
// `err.h`: the SSL library's error code.
pub const ERR_LIB_SSL: c_int = 20;
// `sslerr.h`: reasons for "no key exchange group in common".
pub const SSL_R_NO_SUITABLE_KEY_SHARE: c_int = 101;
pub const SSL_R_NO_SHARED_GROUPS: c_int = 410;

// `ssl.h`: SSL_OP_BIT(24).
pub const SSL_OP_NO_ANTI_REPLAY: u64 = 1 << 24;
