//! Raw FFI bindings to [nghttp3](https://nghttp2.org/nghttp3/) 1.18 (HTTP/3 and QPACK), generated
//! by bindgen and committed (`cargo xtask bindgen` regenerates them; `cargo xtask bindgen --check`
//! fails when they are stale). Declarations only; the safe wrapper is a later crate (`mqttd-h3`).
//!
//! # Linking
//! The build script finds `libnghttp3` with pkg-config: normally the static library that
//! `cargo xtask build` compiles from the pinned sources (with sfparse) into `target/c/`, or a
//! system nghttp3 >= 1.0.
//!
//! Constructors such as `nghttp3_conn_client_new` and `nghttp3_settings_default` are C macros over
//! `*_versioned` functions: call those with the `NGHTTP3_*_VERSION` constants.

#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!("bindings.rs");

// Macros with casts, which bindgen cannot evaluate. Values from `nghttp3.h` 1.18.

/// `NGHTTP3_NANOSECONDS`: one nanosecond as an `nghttp3_duration`.
pub const NGHTTP3_NANOSECONDS: nghttp3_duration = 1;
/// `NGHTTP3_MICROSECONDS`.
pub const NGHTTP3_MICROSECONDS: nghttp3_duration = 1_000 * NGHTTP3_NANOSECONDS;
/// `NGHTTP3_MILLISECONDS`.
pub const NGHTTP3_MILLISECONDS: nghttp3_duration = 1_000 * NGHTTP3_MICROSECONDS;
/// `NGHTTP3_SECONDS`.
pub const NGHTTP3_SECONDS: nghttp3_duration = 1_000 * NGHTTP3_MILLISECONDS;
