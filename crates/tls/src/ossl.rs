//! OpenSSL 3.5 declarations that `openssl-sys` 0.9 does not provide, checked against the headers
//! openssl-src 300.5.5 ships (`ssl.h`, `core.h`, `core_dispatch.h`, `evp.h`).

use std::ffi::{c_int, c_uchar, c_void};

use openssl_sys::{EVP_CIPHER, SSL};

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

// `ssl.h`: SSL_get_early_data_status results.
pub const SSL_EARLY_DATA_ACCEPTED: c_int = 2;

// `evp.h`: AEAD controls (EVP_CTRL_AEAD_* alias the GCM values).
pub const EVP_CTRL_AEAD_SET_IVLEN: c_int = 0x9;
pub const EVP_CTRL_AEAD_GET_TAG: c_int = 0x10;
pub const EVP_CTRL_AEAD_SET_TAG: c_int = 0x11;

unsafe extern "C" {
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
}

// `ssl.h`: SSL_OP_BIT(24).
pub const SSL_OP_NO_ANTI_REPLAY: u64 = 1 << 24;
