//! ngtcp2's crypto backend, in Rust: every function `crypto/shared.c` expects from a TLS backend,
//! exported with `#[no_mangle] extern "C"` and implemented on OpenSSL 3.5's EVP layer.
//!
//! Handles given to ngtcp2 as `native_handle`:
//! - `ngtcp2_crypto_aead` → `&'static Aead` (the cipher plus its tag length);
//! - `ngtcp2_crypto_cipher` (header protection) → `&'static Hp`;
//! - `ngtcp2_crypto_md` → `*const EVP_MD` (static digests);
//! - `ngtcp2_crypto_aead_ctx` → `*mut EVP_CIPHER_CTX` keyed once, reused for every packet;
//! - `ngtcp2_crypto_cipher_ctx` → `Box<HpCtx>`;
//! - the TLS native handle of a connection → `*mut TlsSession`.
//!
//! No function here unwinds into C: bodies run under [`guard`], which turns a panic into the
//! function's failure value.

use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::OnceLock;

use foreign_types::ForeignTypeRef;
use mqttd_ngtcp2_sys::*;
use openssl::md::{Md, MdRef};
use openssl::pkey::Id;
use openssl::pkey_ctx::{HkdfMode, PkeyCtx};
use openssl_sys as ffi;

use crate::ossl;
use crate::session::TlsSession;

/// An AEAD algorithm as ngtcp2 sees it.
pub(crate) struct Aead {
    pub(crate) cipher: *const ffi::EVP_CIPHER,
    pub(crate) tag_len: usize,
}

/// A header-protection cipher.
pub(crate) struct Hp {
    pub(crate) cipher: *const ffi::EVP_CIPHER,
    pub(crate) chacha: bool,
}

/// A keyed header-protection context.
pub(crate) struct HpCtx {
    ctx: *mut ffi::EVP_CIPHER_CTX,
    chacha: bool,
}

/// The algorithms mqttd uses, fetched from OpenSSL's default provider once per process.
pub(crate) struct Algorithms {
    pub(crate) aes_128_gcm: Aead,
    pub(crate) aes_256_gcm: Aead,
    pub(crate) chacha20_poly1305: Aead,
    pub(crate) aes_128_ecb: Hp,
    pub(crate) aes_256_ecb: Hp,
    pub(crate) chacha20: Hp,
    pub(crate) sha256: &'static MdRef,
    pub(crate) sha384: &'static MdRef,
}

// SAFETY: the pointers refer to immutable, reference-counted OpenSSL algorithm objects that live
// for the whole process (fetched once, never freed) and that OpenSSL allows sharing across threads.
unsafe impl Send for Algorithms {}
// SAFETY: as above; nothing here is ever mutated after initialisation.
unsafe impl Sync for Algorithms {}

fn fetch(
    name: &std::ffi::CStr,
    legacy: unsafe extern "C" fn() -> *const ffi::EVP_CIPHER,
) -> *const ffi::EVP_CIPHER {
    // SAFETY: EVP_CIPHER_fetch takes a NUL-terminated name; null library context and properties
    // mean the defaults. A fetched cipher avoids an implicit fetch on every context init.
    let fetched = unsafe { ffi::EVP_CIPHER_fetch(ptr::null_mut(), name.as_ptr(), ptr::null()) };
    if fetched.is_null() {
        // SAFETY: the legacy getters return static cipher objects.
        unsafe { legacy() }
    } else {
        fetched
    }
}

/// The process-wide algorithm table.
pub(crate) fn algorithms() -> &'static Algorithms {
    static ALGORITHMS: OnceLock<Algorithms> = OnceLock::new();
    ALGORITHMS.get_or_init(|| {
        openssl::init();
        Algorithms {
            aes_128_gcm: Aead {
                cipher: fetch(c"AES-128-GCM", ffi::EVP_aes_128_gcm),
                tag_len: 16,
            },
            aes_256_gcm: Aead {
                cipher: fetch(c"AES-256-GCM", ffi::EVP_aes_256_gcm),
                tag_len: 16,
            },
            chacha20_poly1305: Aead {
                cipher: fetch(c"ChaCha20-Poly1305", ffi::EVP_chacha20_poly1305),
                tag_len: 16,
            },
            aes_128_ecb: Hp {
                cipher: fetch(c"AES-128-ECB", ffi::EVP_aes_128_ecb),
                chacha: false,
            },
            aes_256_ecb: Hp {
                cipher: fetch(c"AES-256-ECB", ffi::EVP_aes_256_ecb),
                chacha: false,
            },
            chacha20: Hp {
                cipher: fetch(c"ChaCha20", ffi::EVP_chacha20),
                chacha: true,
            },
            sha256: Md::sha256(),
            sha384: Md::sha384(),
        }
    })
}

/// TLS 1.3 cipher suites mqttd offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// TLS_AES_128_GCM_SHA256 (0x1301), the mandatory one.
    Aes128GcmSha256,
    /// TLS_AES_256_GCM_SHA384 (0x1302).
    Aes256GcmSha384,
    /// TLS_CHACHA20_POLY1305_SHA256 (0x1303).
    Chacha20Poly1305Sha256,
}

impl CipherSuite {
    /// Every suite, in mqttd's default preference order.
    pub const ALL: [CipherSuite; 3] = [
        CipherSuite::Aes128GcmSha256,
        CipherSuite::Aes256GcmSha384,
        CipherSuite::Chacha20Poly1305Sha256,
    ];

    /// The OpenSSL / IANA name.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes128GcmSha256 => "TLS_AES_128_GCM_SHA256",
            CipherSuite::Aes256GcmSha384 => "TLS_AES_256_GCM_SHA384",
            CipherSuite::Chacha20Poly1305Sha256 => "TLS_CHACHA20_POLY1305_SHA256",
        }
    }

    /// The suite with this two-byte TLS identifier.
    pub fn from_protocol_id(id: [u8; 2]) -> Option<Self> {
        match id {
            [0x13, 0x01] => Some(CipherSuite::Aes128GcmSha256),
            [0x13, 0x02] => Some(CipherSuite::Aes256GcmSha384),
            [0x13, 0x03] => Some(CipherSuite::Chacha20Poly1305Sha256),
            _ => None,
        }
    }

    /// Fills an ngtcp2 crypto context for this suite.
    pub(crate) fn fill(self, ctx: &mut ngtcp2_crypto_ctx) {
        let algs = algorithms();
        let (aead, md, hp, max_enc, max_fail) = match self {
            CipherSuite::Aes128GcmSha256 => (
                &algs.aes_128_gcm,
                algs.sha256,
                &algs.aes_128_ecb,
                1u64 << 23,
                1u64 << 52,
            ),
            CipherSuite::Aes256GcmSha384 => (
                &algs.aes_256_gcm,
                algs.sha384,
                &algs.aes_256_ecb,
                1 << 23,
                1 << 52,
            ),
            CipherSuite::Chacha20Poly1305Sha256 => (
                &algs.chacha20_poly1305,
                algs.sha256,
                &algs.chacha20,
                1 << 62,
                1 << 36,
            ),
        };
        set_aead(&mut ctx.aead, aead);
        ctx.md.native_handle = md.as_ptr() as *mut c_void;
        ctx.hp.native_handle = hp as *const Hp as *mut c_void;
        ctx.max_encryption = max_enc;
        ctx.max_decryption_failure = max_fail;
    }
}

fn set_aead(aead: &mut ngtcp2_crypto_aead, alg: &'static Aead) {
    aead.native_handle = alg as *const Aead as *mut c_void;
    aead.max_overhead = alg.tag_len;
}

/// Runs `body`, turning a panic into `fail` (nothing unwinds into C).
pub(crate) fn guard<T>(fail: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            tracing::error!(panic = %crate::session::panic_text(&*panic), "panic in the QUIC crypto backend");
            fail
        }
    }
}

/// # Safety
/// `aead` must hold a handle set by this module.
unsafe fn aead_of(aead: *const ngtcp2_crypto_aead) -> &'static Aead {
    // SAFETY: per the contract, native_handle points at one of the static `Aead`s.
    unsafe { &*((*aead).native_handle as *const Aead) }
}

/// # Safety
/// `md` must hold a handle set by this module.
unsafe fn md_of(md: *const ngtcp2_crypto_md) -> &'static MdRef {
    // SAFETY: per the contract, native_handle is a static EVP_MD.
    unsafe { MdRef::from_ptr((*md).native_handle as *mut ffi::EVP_MD) }
}

/// # Safety
/// `(ptr, len)` must describe readable memory, or `len` must be 0.
unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_ctx_initial(ctx: *mut ngtcp2_crypto_ctx) -> *mut ngtcp2_crypto_ctx {
    guard(ptr::null_mut(), || {
        // SAFETY: ngtcp2 passes a writable context.
        let c = unsafe { &mut *ctx };
        CipherSuite::Aes128GcmSha256.fill(c);
        c.max_encryption = 0;
        c.max_decryption_failure = 0;
        ctx
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_aes_128_gcm(
    aead: *mut ngtcp2_crypto_aead,
) -> *mut ngtcp2_crypto_aead {
    guard(ptr::null_mut(), || {
        // SAFETY: ngtcp2 passes a writable aead.
        set_aead(unsafe { &mut *aead }, &algorithms().aes_128_gcm);
        aead
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_retry(aead: *mut ngtcp2_crypto_aead) -> *mut ngtcp2_crypto_aead {
    ngtcp2_crypto_aead_aes_128_gcm(aead)
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_md_sha256(md: *mut ngtcp2_crypto_md) -> *mut ngtcp2_crypto_md {
    guard(ptr::null_mut(), || {
        // SAFETY: ngtcp2 passes a writable md.
        unsafe { (*md).native_handle = algorithms().sha256.as_ptr() as *mut c_void };
        md
    })
}

/// `ngtcp2_crypto_aead_init`: `aead_native_handle` must be a handle this crate produced.
#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_init(
    aead: *mut ngtcp2_crypto_aead,
    aead_native_handle: *mut c_void,
) -> *mut ngtcp2_crypto_aead {
    guard(ptr::null_mut(), || {
        // SAFETY: the handle is one of our static `Aead`s (the only kind this backend hands out).
        let alg = unsafe { &*(aead_native_handle as *const Aead) };
        // SAFETY: writable aead from the caller.
        let a = unsafe { &mut *aead };
        a.native_handle = aead_native_handle;
        a.max_overhead = alg.tag_len;
        aead
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_ctx_tls(
    ctx: *mut ngtcp2_crypto_ctx,
    tls: *mut c_void,
) -> *mut ngtcp2_crypto_ctx {
    guard(ptr::null_mut(), || {
        // SAFETY: the TLS native handle of a connection is always a live TlsSession.
        let session = unsafe { &*(tls as *const TlsSession) };
        match session.cipher_suite() {
            Some(suite) => {
                // SAFETY: writable ctx from the caller.
                suite.fill(unsafe { &mut *ctx });
                ctx
            }
            None => ptr::null_mut(),
        }
    })
}

/// 0-RTT keys use the resumed session's suite, which OpenSSL reports as the current cipher.
#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_ctx_tls_early(
    ctx: *mut ngtcp2_crypto_ctx,
    tls: *mut c_void,
) -> *mut ngtcp2_crypto_ctx {
    ngtcp2_crypto_ctx_tls(ctx, tls)
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_md_hashlen(md: *const ngtcp2_crypto_md) -> usize {
    // SAFETY: md holds one of our digests.
    guard(0, || unsafe { md_of(md) }.size())
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_keylen(aead: *const ngtcp2_crypto_aead) -> usize {
    // SAFETY: aead holds one of our handles; the getter only reads the static cipher.
    guard(
        0,
        || unsafe { ossl::EVP_CIPHER_get_key_length(aead_of(aead).cipher) } as usize,
    )
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_noncelen(aead: *const ngtcp2_crypto_aead) -> usize {
    // SAFETY: as above.
    guard(
        0,
        || unsafe { ossl::EVP_CIPHER_get_iv_length(aead_of(aead).cipher) } as usize,
    )
}

/// Creates an AEAD context keyed with `key` for encryption (`enc` = 1) or decryption (0).
///
/// # Safety
/// `aead` holds our handle, `key` has the cipher's key length.
unsafe fn aead_ctx_new(
    aead: *const ngtcp2_crypto_aead,
    key: *const u8,
    noncelen: usize,
    enc: c_int,
) -> *mut ffi::EVP_CIPHER_CTX {
    // SAFETY: plain allocation.
    let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
    if ctx.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: `aead` holds our handle (caller contract).
    let cipher = unsafe { aead_of(aead) }.cipher;
    // SAFETY: plain getter on a static cipher.
    let default_noncelen = unsafe { ossl::EVP_CIPHER_get_iv_length(cipher) } as usize;
    // SAFETY: ctx is fresh; the cipher is static; key has the right length (caller contract); the
    // IV length control is valid for every AEAD we use. QUIC's nonce is the ciphers' default
    // length (12 bytes), so cipher and key go in one init call; only another length needs the
    // cipher set first, then the IV length, then the key.
    let ok = unsafe {
        if noncelen == default_noncelen {
            ffi::EVP_CipherInit_ex(ctx, cipher, ptr::null_mut(), key, ptr::null(), enc) == 1
        } else {
            ffi::EVP_CipherInit_ex(ctx, cipher, ptr::null_mut(), ptr::null(), ptr::null(), enc) == 1
                && ffi::EVP_CIPHER_CTX_ctrl(
                    ctx,
                    ossl::EVP_CTRL_AEAD_SET_IVLEN,
                    noncelen as c_int,
                    ptr::null_mut(),
                ) == 1
                && ffi::EVP_CipherInit_ex(ctx, ptr::null(), ptr::null_mut(), key, ptr::null(), enc)
                    == 1
        }
    };
    if !ok {
        // SAFETY: ctx was allocated above and is not used afterwards.
        unsafe { ffi::EVP_CIPHER_CTX_free(ctx) };
        return ptr::null_mut();
    }
    ctx
}

/// Keys a new AEAD context into `aead_ctx` (the body of both `*_init` callbacks).
///
/// # Safety
/// ngtcp2's contract for the `*_init` callbacks: `aead_ctx` is writable, `aead` holds our
/// handle and `key` has the cipher's key length.
unsafe fn aead_ctx_init(
    aead_ctx: *mut ngtcp2_crypto_aead_ctx,
    aead: *const ngtcp2_crypto_aead,
    key: *const u8,
    noncelen: usize,
    enc: c_int,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller's contract matches aead_ctx_new's.
        let ctx = unsafe { aead_ctx_new(aead, key, noncelen, enc) };
        if ctx.is_null() {
            return -1;
        }
        // SAFETY: writable aead_ctx per the contract.
        unsafe { (*aead_ctx).native_handle = ctx.cast() };
        0
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_ctx_encrypt_init(
    aead_ctx: *mut ngtcp2_crypto_aead_ctx,
    aead: *const ngtcp2_crypto_aead,
    key: *const u8,
    noncelen: usize,
) -> c_int {
    // SAFETY: ngtcp2 calls this with the contract aead_ctx_init documents.
    unsafe { aead_ctx_init(aead_ctx, aead, key, noncelen, 1) }
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_ctx_decrypt_init(
    aead_ctx: *mut ngtcp2_crypto_aead_ctx,
    aead: *const ngtcp2_crypto_aead,
    key: *const u8,
    noncelen: usize,
) -> c_int {
    // SAFETY: as for encrypt_init.
    unsafe { aead_ctx_init(aead_ctx, aead, key, noncelen, 0) }
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_aead_ctx_free(aead_ctx: *mut ngtcp2_crypto_aead_ctx) {
    guard((), || {
        // SAFETY: the handle is null or a context made by aead_ctx_new; ngtcp2 frees it once.
        unsafe {
            let ctx = (*aead_ctx).native_handle as *mut ffi::EVP_CIPHER_CTX;
            if !ctx.is_null() {
                ffi::EVP_CIPHER_CTX_free(ctx);
                (*aead_ctx).native_handle = ptr::null_mut();
            }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_cipher_ctx_encrypt_init(
    cipher_ctx: *mut ngtcp2_crypto_cipher_ctx,
    cipher: *const ngtcp2_crypto_cipher,
    key: *const u8,
) -> c_int {
    guard(-1, || {
        // SAFETY: cipher holds one of our static `Hp`s.
        let hp = unsafe { &*((*cipher).native_handle as *const Hp) };
        // SAFETY: plain allocation.
        let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return -1;
        }
        // SAFETY: fresh ctx, static cipher, key of the cipher's length (ngtcp2's contract).
        let ok = unsafe {
            ffi::EVP_EncryptInit_ex(ctx, hp.cipher, ptr::null_mut(), key, ptr::null()) == 1
                && ffi::EVP_CIPHER_CTX_set_padding(ctx, 0) == 1
        };
        if !ok {
            // SAFETY: allocated above, unused afterwards.
            unsafe { ffi::EVP_CIPHER_CTX_free(ctx) };
            return -1;
        }
        let boxed = Box::new(HpCtx {
            ctx,
            chacha: hp.chacha,
        });
        // SAFETY: writable cipher_ctx from the caller.
        unsafe { (*cipher_ctx).native_handle = Box::into_raw(boxed).cast() };
        0
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_cipher_ctx_free(cipher_ctx: *mut ngtcp2_crypto_cipher_ctx) {
    guard((), || {
        // SAFETY: the handle is null or a Box<HpCtx> from cipher_ctx_encrypt_init, freed once.
        unsafe {
            let raw = (*cipher_ctx).native_handle as *mut HpCtx;
            if !raw.is_null() {
                let hp = Box::from_raw(raw);
                ffi::EVP_CIPHER_CTX_free(hp.ctx);
                (*cipher_ctx).native_handle = ptr::null_mut();
            }
        }
    })
}

/// HKDF through `EVP_PKEY_derive`: one algorithm fetch and a fresh context per call. The
/// fallback when [`hkdf_hmac`] cannot set up its HMAC context.
fn hkdf_pkey(
    mode: HkdfMode,
    md: &MdRef,
    dest: &mut [u8],
    key: &[u8],
    salt: Option<&[u8]>,
    info: &[u8],
) -> Result<(), openssl::error::ErrorStack> {
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_mode(mode)?;
    ctx.set_hkdf_md(md)?;
    ctx.set_hkdf_key(key)?;
    if let Some(salt) = salt {
        ctx.set_hkdf_salt(salt)?;
    }
    if !info.is_empty() {
        ctx.add_hkdf_info(info)?;
    }
    let n = ctx.derive(Some(dest))?;
    if n != dest.len() {
        return Err(openssl::error::ErrorStack::get());
    }
    Ok(())
}

/// OpenSSL's HMAC, fetched once per process (null if the provider lacks it).
fn hmac_mac() -> *mut ffi::EVP_MAC {
    static MAC: OnceLock<usize> = OnceLock::new();
    *MAC.get_or_init(|| {
        // SAFETY: NUL-terminated name; null library context and properties mean the defaults.
        unsafe { ffi::EVP_MAC_fetch(ptr::null_mut(), c"HMAC".as_ptr(), ptr::null()) as usize }
    }) as *mut ffi::EVP_MAC
}

/// HMAC contexts with their digest already set (fetched once), one per digest used on this
/// thread, re-keyed for every HMAC. HKDF is two or three HMACs for the short outputs QUIC
/// needs; running them on a reused context costs no fetch, no parameter parsing and no context
/// allocation per derivation, which OpenSSL's HKDF (`EVP_KDF` or `EVP_PKEY_derive`) pays on
/// every call (its extract step even fetches HMAC and the digest by name each time). ngtcp2
/// derives ~30 keys, IVs, HP keys and stateless-reset tokens per connection and side.
/// Per thread because an `EVP_MAC_CTX` is mutable state.
struct HmacCtxs(Vec<(*const ffi::EVP_MD, *mut ffi::EVP_MAC_CTX)>);

impl Drop for HmacCtxs {
    fn drop(&mut self) {
        for &(_, ctx) in &self.0 {
            // SAFETY: made by EVP_MAC_CTX_new below, owned here, freed once.
            unsafe { ffi::EVP_MAC_CTX_free(ctx) };
        }
    }
}

thread_local! {
    static HMAC_CTXS: std::cell::RefCell<HmacCtxs> =
        const { std::cell::RefCell::new(HmacCtxs(Vec::new())) };
}

/// A new HMAC context for `md`, or null.
fn hmac_ctx_new(md: &MdRef) -> *mut ffi::EVP_MAC_CTX {
    let mac = hmac_mac();
    if mac.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: md is a live static digest; the name is static and NUL-terminated.
    let name = unsafe { ossl::EVP_MD_get0_name(md.as_ptr()) };
    if name.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: mac is a fetched algorithm that lives for the process.
    let ctx = unsafe { ffi::EVP_MAC_CTX_new(mac) };
    if ctx.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: `name` is NUL-terminated; OpenSSL copies what it keeps.
    let name_len = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes().len();
    let params = [
        ossl::param(
            ossl::OSSL_MAC_PARAM_DIGEST,
            ossl::OSSL_PARAM_UTF8_STRING,
            name as *mut c_void,
            name_len,
        ),
        ossl::param_end(),
    ];
    // SAFETY: live context; the parameters point at live data for the duration of the call.
    if unsafe { ffi::EVP_MAC_CTX_set_params(ctx, params.as_ptr()) } != 1 {
        // SAFETY: allocated above, unused afterwards.
        unsafe { ffi::EVP_MAC_CTX_free(ctx) };
        return ptr::null_mut();
    }
    ctx
}

/// HMAC(`key`, concatenation of `parts`) into `out`, whose length must be the digest size.
///
/// # Safety
/// `ctx` is a live HMAC context owned by the caller's thread.
unsafe fn hmac(ctx: *mut ffi::EVP_MAC_CTX, key: &[u8], parts: &[&[u8]], out: &mut [u8]) -> bool {
    // A zero-length key must still be a valid pointer: a null key would keep the previous one.
    static EMPTY: u8 = 0;
    let key_ptr = if key.is_empty() {
        &EMPTY as *const u8
    } else {
        key.as_ptr()
    };
    let mut written = 0;
    // SAFETY: ctx is live (caller); every pointer covers its length for the duration of the call.
    unsafe {
        ffi::EVP_MAC_init(ctx, key_ptr, key.len(), ptr::null()) == 1
            && parts
                .iter()
                .all(|p| p.is_empty() || ffi::EVP_MAC_update(ctx, p.as_ptr(), p.len()) == 1)
            && ffi::EVP_MAC_final(ctx, out.as_mut_ptr(), &mut written, out.len()) == 1
            && written == out.len()
    }
}

/// HKDF (RFC 5869) in `mode` (an `EVP_KDF_HKDF_MODE_*` value) on this thread's HMAC context for
/// `md`; `None` if no context could be made (the caller falls back to [`hkdf_pkey`]).
/// Extract-only writes the PRK, so `dest` must be the digest size; an absent salt is the empty
/// one, which HMAC pads to the same key as RFC 5869's string of zeros.
fn hkdf_hmac(
    mode: c_int,
    md: &MdRef,
    dest: &mut [u8],
    key: &[u8],
    salt: Option<&[u8]>,
    info: &[u8],
) -> Option<bool> {
    let md_ptr = md.as_ptr() as *const ffi::EVP_MD;
    HMAC_CTXS
        .try_with(|cell| {
            let mut ctxs = cell.try_borrow_mut().ok()?;
            let ctx = match ctxs.0.iter().find(|c| c.0 == md_ptr) {
                Some(c) => c.1,
                None => {
                    let c = hmac_ctx_new(md);
                    if c.is_null() {
                        return None;
                    }
                    ctxs.0.push((md_ptr, c));
                    c
                }
            };
            let hash_len = md.size();
            // Block of the largest digest we use (SHA-384); anything larger takes the fallback.
            let mut prk = [0u8; 64];
            let mut block = [0u8; 64];
            let mut next = [0u8; 64];
            if hash_len > prk.len() {
                return None;
            }
            // SAFETY: ctx belongs to this thread's table, which stays borrowed for the whole
            // derivation; the buffers are local.
            let ok = unsafe {
                match mode {
                    ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY => {
                        dest.len() == hash_len && hmac(ctx, salt.unwrap_or(&[]), &[key], dest)
                    }
                    _ => {
                        let expand_only = mode == ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY;
                        let extracted = expand_only
                            || hmac(ctx, salt.unwrap_or(&[]), &[key], &mut prk[..hash_len]);
                        let prk: &[u8] = if expand_only { key } else { &prk[..hash_len] };
                        // T(i) = HMAC(PRK, T(i-1) | info | i), at most 255 blocks.
                        let mut ok = extracted && dest.len() <= 255 * hash_len;
                        let mut prev_len = 0;
                        for (i, out) in dest.chunks_mut(hash_len).enumerate() {
                            let counter = [(i + 1) as u8];
                            ok = ok
                                && hmac(
                                    ctx,
                                    prk,
                                    &[&block[..prev_len], info, &counter],
                                    &mut next[..hash_len],
                                );
                            if !ok {
                                break;
                            }
                            block[..hash_len].copy_from_slice(&next[..hash_len]);
                            out.copy_from_slice(&block[..out.len()]);
                            prev_len = hash_len;
                        }
                        ok
                    }
                }
            };
            // Leave no secret in the reused context (OpenSSL keeps a copy of the key and the
            // keyed digest states): re-key it with the empty key, which frees the copy with
            // `OPENSSL_secure_clear_free` and overwrites every state.
            static EMPTY: u8 = 0;
            // SAFETY: as above; a valid pointer with length 0.
            unsafe { ffi::EVP_MAC_init(ctx, &EMPTY, 0, ptr::null()) };
            // SAFETY: local buffers of the given lengths.
            unsafe {
                ossl::OPENSSL_cleanse(prk.as_mut_ptr().cast(), prk.len());
                ossl::OPENSSL_cleanse(block.as_mut_ptr().cast(), block.len());
                ossl::OPENSSL_cleanse(next.as_mut_ptr().cast(), next.len());
            }
            Some(ok)
        })
        .ok()
        .flatten()
}

/// HKDF in `mode` (an `EVP_KDF_HKDF_MODE_*` value).
fn hkdf(
    mode: c_int,
    md: &MdRef,
    dest: &mut [u8],
    key: &[u8],
    salt: Option<&[u8]>,
    info: &[u8],
) -> Result<(), openssl::error::ErrorStack> {
    match hkdf_hmac(mode, md, dest, key, salt, info) {
        Some(true) => Ok(()),
        Some(false) => Err(openssl::error::ErrorStack::get()),
        None => {
            let mode = match mode {
                ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY => HkdfMode::EXTRACT_ONLY,
                ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY => HkdfMode::EXPAND_ONLY,
                _ => HkdfMode::EXTRACT_THEN_EXPAND,
            };
            hkdf_pkey(mode, md, dest, key, salt, info)
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_hkdf_extract(
    dest: *mut u8,
    md: *const ngtcp2_crypto_md,
    secret: *const u8,
    secretlen: usize,
    salt: *const u8,
    saltlen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: ngtcp2 passes readable inputs and a destination of the digest's size.
        unsafe {
            let md = md_of(md);
            let out = std::slice::from_raw_parts_mut(dest, md.size());
            match hkdf(
                ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY,
                md,
                out,
                slice(secret, secretlen),
                Some(slice(salt, saltlen)),
                &[],
            ) {
                Ok(()) => 0,
                Err(_) => -1,
            }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_hkdf_expand(
    dest: *mut u8,
    destlen: usize,
    md: *const ngtcp2_crypto_md,
    secret: *const u8,
    secretlen: usize,
    info: *const u8,
    infolen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: ngtcp2 passes readable inputs and a writable destination of destlen bytes.
        unsafe {
            let out = std::slice::from_raw_parts_mut(dest, destlen);
            match hkdf(
                ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY,
                md_of(md),
                out,
                slice(secret, secretlen),
                None,
                slice(info, infolen),
            ) {
                Ok(()) => 0,
                Err(_) => -1,
            }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_hkdf(
    dest: *mut u8,
    destlen: usize,
    md: *const ngtcp2_crypto_md,
    secret: *const u8,
    secretlen: usize,
    salt: *const u8,
    saltlen: usize,
    info: *const u8,
    infolen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: as for hkdf_expand.
        unsafe {
            let out = std::slice::from_raw_parts_mut(dest, destlen);
            let salt = slice(salt, saltlen);
            match hkdf(
                ossl::EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND,
                md_of(md),
                out,
                slice(secret, secretlen),
                Some(salt),
                slice(info, infolen),
            ) {
                Ok(()) => 0,
                Err(_) => -1,
            }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_encrypt(
    dest: *mut u8,
    aead: *const ngtcp2_crypto_aead,
    aead_ctx: *const ngtcp2_crypto_aead_ctx,
    plaintext: *const u8,
    plaintextlen: usize,
    nonce: *const u8,
    _noncelen: usize,
    aad: *const u8,
    aadlen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: aead and aead_ctx are ours; dest has room for plaintextlen + tag (ngtcp2's
        // contract; dest may equal plaintext, which EVP supports); nonce has the IV length set at
        // init; aad is readable.
        unsafe {
            let tag_len = aead_of(aead).tag_len;
            let ctx = (*aead_ctx).native_handle as *mut ffi::EVP_CIPHER_CTX;
            let tag = dest.add(plaintextlen);
            // The tag is read straight into place with one get_params call: cheaper per packet
            // than EVP_CIPHER_CTX_ctrl(GET_TAG), which builds a parameter array and dispatches
            // through its control switch first.
            let mut params = ossl::aead_tag_params(tag.cast(), tag_len);
            let mut len: c_int = 0;
            let ok = ossl::EVP_EncryptInit_ex2(ctx, ptr::null(), ptr::null(), nonce, ptr::null())
                == 1
                && (aadlen == 0
                    || ffi::EVP_EncryptUpdate(
                        ctx,
                        ptr::null_mut(),
                        &mut len,
                        aad,
                        aadlen as c_int,
                    ) == 1)
                && (plaintextlen == 0
                    || ffi::EVP_EncryptUpdate(
                        ctx,
                        dest,
                        &mut len,
                        plaintext,
                        plaintextlen as c_int,
                    ) == 1)
                && ffi::EVP_EncryptFinal_ex(ctx, tag, &mut len) == 1
                && ossl::EVP_CIPHER_CTX_get_params(ctx, params.as_mut_ptr()) == 1;
            if ok { 0 } else { -1 }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_decrypt(
    dest: *mut u8,
    aead: *const ngtcp2_crypto_aead,
    aead_ctx: *const ngtcp2_crypto_aead_ctx,
    ciphertext: *const u8,
    ciphertextlen: usize,
    nonce: *const u8,
    _noncelen: usize,
    aad: *const u8,
    aadlen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: as for encrypt; dest has room for ciphertextlen - tag bytes.
        unsafe {
            let tag_len = aead_of(aead).tag_len;
            if ciphertextlen < tag_len {
                return -1;
            }
            let body = ciphertextlen - tag_len;
            let ctx = (*aead_ctx).native_handle as *mut ffi::EVP_CIPHER_CTX;
            // The nonce and the expected tag go in with one init call (the tag as an init
            // parameter, which OpenSSL applies after the IV), not an extra ctrl(SET_TAG). OpenSSL
            // only reads the tag, so the cast away from const is sound.
            let params = ossl::aead_tag_params(ciphertext.add(body) as *mut c_void, tag_len);
            let mut len: c_int = 0;
            let ok =
                ossl::EVP_DecryptInit_ex2(ctx, ptr::null(), ptr::null(), nonce, params.as_ptr())
                    == 1
                    && (aadlen == 0
                        || ffi::EVP_DecryptUpdate(
                            ctx,
                            ptr::null_mut(),
                            &mut len,
                            aad,
                            aadlen as c_int,
                        ) == 1)
                    && (body == 0
                        || ffi::EVP_DecryptUpdate(ctx, dest, &mut len, ciphertext, body as c_int)
                            == 1)
                    && ffi::EVP_DecryptFinal_ex(ctx, dest.add(body), &mut len) == 1;
            if ok { 0 } else { -1 }
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_hp_mask(
    dest: *mut u8,
    _hp: *const ngtcp2_crypto_cipher,
    hp_ctx: *const ngtcp2_crypto_cipher_ctx,
    sample: *const u8,
) -> c_int {
    guard(-1, || {
        // SAFETY: hp_ctx holds our Box<HpCtx>; sample has NGTCP2_HP_SAMPLELEN bytes; dest has at
        // least NGTCP2_HP_MASKLEN bytes, and we write exactly that many.
        unsafe {
            let hp = &*((*hp_ctx).native_handle as *const HpCtx);
            let mut mask = [0u8; 32];
            let mut len: c_int = 0;
            let ok = if hp.chacha {
                const ZEROS: [u8; 16] = [0; 16];
                ffi::EVP_EncryptInit_ex(hp.ctx, ptr::null(), ptr::null_mut(), ptr::null(), sample)
                    == 1
                    && ffi::EVP_EncryptUpdate(
                        hp.ctx,
                        mask.as_mut_ptr(),
                        &mut len,
                        ZEROS.as_ptr(),
                        ZEROS.len() as c_int,
                    ) == 1
            } else {
                ffi::EVP_EncryptUpdate(
                    hp.ctx,
                    mask.as_mut_ptr(),
                    &mut len,
                    sample,
                    NGTCP2_HP_SAMPLELEN as c_int,
                ) == 1
            };
            if !ok {
                return -1;
            }
            ptr::copy_nonoverlapping(mask.as_ptr(), dest, NGTCP2_HP_MASKLEN as usize);
            0
        }
    })
}

/// Fills `data` from OpenSSL's CSPRNG.
pub(crate) fn random(data: &mut [u8]) -> bool {
    openssl::rand::rand_bytes(data).is_ok()
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_random(data: *mut u8, datalen: usize) -> c_int {
    guard(-1, || {
        if datalen == 0 {
            return 0;
        }
        // SAFETY: ngtcp2 passes a writable buffer of datalen bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(data, datalen) };
        if random(buf) { 0 } else { -1 }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_get_path_challenge_data_cb(
    _conn: *mut ngtcp2_conn,
    data: *mut u8,
    _user_data: *mut c_void,
) -> c_int {
    guard(NGTCP2_ERR_CALLBACK_FAILURE, || {
        // SAFETY: ngtcp2 passes NGTCP2_PATH_CHALLENGE_DATALEN writable bytes.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(data, NGTCP2_PATH_CHALLENGE_DATALEN as usize) };
        if random(buf) {
            0
        } else {
            NGTCP2_ERR_CALLBACK_FAILURE
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_get_path_challenge_data2_cb(
    _conn: *mut ngtcp2_conn,
    data: *mut ngtcp2_path_challenge_data,
    _user_data: *mut c_void,
) -> c_int {
    guard(NGTCP2_ERR_CALLBACK_FAILURE, || {
        // SAFETY: ngtcp2 passes a writable challenge struct.
        let buf = unsafe { &mut (*data).data };
        if random(buf) {
            0
        } else {
            NGTCP2_ERR_CALLBACK_FAILURE
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_read_write_crypto_data(
    conn: *mut ngtcp2_conn,
    _level: ngtcp2_encryption_level,
    data: *const u8,
    datalen: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: conn is live (ngtcp2 is calling us for it) and its TLS native handle is the
        // TlsSession attached to it; ngtcp2 serialises calls per connection.
        unsafe {
            let session = ngtcp2_conn_get_tls_native_handle(conn) as *mut TlsSession;
            if session.is_null() {
                return -1;
            }
            (*session).read_write_crypto_data(conn, slice(data, datalen))
        }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_set_local_transport_params(
    tls: *mut c_void,
    buf: *const u8,
    len: usize,
) -> c_int {
    guard(-1, || {
        // SAFETY: tls is the connection's TlsSession; buf holds len readable bytes.
        unsafe { (*(tls as *mut TlsSession)).set_local_transport_params(slice(buf, len)) }
    })
}

#[unsafe(no_mangle)]
extern "C" fn ngtcp2_crypto_set_remote_transport_params(
    _conn: *mut ngtcp2_conn,
    _tls: *mut c_void,
) -> c_int {
    // OpenSSL hands the peer's parameters to the got_transport_params callback instead.
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-thread HMAC path gives the same bytes as OpenSSL's EVP_PKEY HKDF, for every
    /// mode and digest, with and without salt and info, for one- and multi-block outputs (and it
    /// is the path actually taken).
    #[test]
    fn hkdf_over_hmac_matches_the_evp_pkey_path() {
        let algs = algorithms();
        let key: Vec<u8> = (0..48u8).map(|i| i.wrapping_mul(37)).collect();
        let salt = [0x5au8; 20];
        let info = b"tls13 quic key";
        let modes = [
            ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY,
            ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY,
            ossl::EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND,
        ];
        let pkey_mode = |raw| match raw {
            ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY => HkdfMode::EXTRACT_ONLY,
            ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY => HkdfMode::EXPAND_ONLY,
            _ => HkdfMode::EXTRACT_THEN_EXPAND,
        };
        for md in [algs.sha256, algs.sha384] {
            for raw in modes {
                for (salt, info) in [
                    (Some(&salt[..]), &info[..]),
                    (Some(&[][..]), &[][..]),
                    (None, &info[..]),
                ] {
                    let lens: &[usize] = if raw == ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY {
                        &[md.size()]
                    } else {
                        &[12, 16, 32, 42, 48, 100]
                    };
                    for &len in lens {
                        let (mut fast, mut slow) = (vec![0u8; len], vec![0u8; len]);
                        let salt_for_extract = match (raw, salt) {
                            (ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY, _) => None,
                            (_, s) => s,
                        };
                        assert_eq!(
                            hkdf_hmac(raw, md, &mut fast, &key, salt_for_extract, info),
                            Some(true),
                            "HMAC path taken and succeeded"
                        );
                        hkdf_pkey(pkey_mode(raw), md, &mut slow, &key, salt_for_extract, info)
                            .unwrap();
                        assert_eq!(fast, slow, "mode {raw}, {} salt/info", len);
                        assert_ne!(fast, vec![0u8; len]);
                    }
                }
            }
        }
    }

    /// RFC 5869 Appendix A.1 (SHA-256) through the HMAC path: PRK and OKM byte for byte.
    #[test]
    fn hkdf_over_hmac_gives_the_rfc_5869_vectors() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let sha256 = algorithms().sha256;
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0..=0x0cu8).collect();
        let info: Vec<u8> = (0xf0..=0xf9u8).collect();
        let mut prk = [0u8; 32];
        let extract = ossl::EVP_KDF_HKDF_MODE_EXTRACT_ONLY;
        assert_eq!(
            hkdf_hmac(extract, sha256, &mut prk, &ikm, Some(&salt), &[]),
            Some(true)
        );
        assert_eq!(
            prk.to_vec(),
            hex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
        );
        let okm = hex(
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        );
        let mut out = [0u8; 42];
        let expand = ossl::EVP_KDF_HKDF_MODE_EXPAND_ONLY;
        assert_eq!(
            hkdf_hmac(expand, sha256, &mut out, &prk, None, &info),
            Some(true)
        );
        assert_eq!(out.to_vec(), okm);
        let mut out = [0u8; 42];
        let both = ossl::EVP_KDF_HKDF_MODE_EXTRACT_AND_EXPAND;
        assert_eq!(
            hkdf_hmac(both, sha256, &mut out, &ikm, Some(&salt), &info),
            Some(true)
        );
        assert_eq!(out.to_vec(), okm);
    }
}
