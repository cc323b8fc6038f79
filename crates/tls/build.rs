//! Links ngtcp2's backend-independent crypto helper (`crypto/shared.c`, built by
//! `cargo xtask build` as `libngtcp2_crypto_shared.a`) into this crate, and refuses an OpenSSL
//! older than 3.5.1.
//!
//! Why here and not in `mqttd-ngtcp2-sys`: `shared.c` calls the backend functions this crate
//! defines in Rust, and this crate calls `shared.c`. Linking the archive from this crate's build
//! script bundles its object into this crate's rlib, beside the Rust backend, so the linker
//! resolves both directions inside one archive whatever the link order.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_OPENSSL_VERSION_NUMBER");
    println!("cargo:rerun-if-env-changed=DEP_NGTCP2_LIBDIR");

    // openssl-sys publishes the version it found (or built) as hex, e.g. `30500050`.
    let version = std::env::var("DEP_OPENSSL_VERSION_NUMBER").unwrap_or_default();
    match u64::from_str_radix(version.trim(), 16) {
        Ok(v) if v >= 0x3050_0010 => {}
        Ok(v) => fail(&format!(
            "OpenSSL {}.{}.{} is too old: mqttd-tls needs OpenSSL >= 3.5.1 for its QUIC TLS API \
             (SSL_set_quic_tls_cbs); use the default `vendored-openssl` feature or install OpenSSL 3.5",
            v >> 28,
            (v >> 20) & 0xff,
            (v >> 4) & 0xffff
        )),
        Err(_) => {
            fail("openssl-sys did not report the OpenSSL version (DEP_OPENSSL_VERSION_NUMBER)")
        }
    }

    let libdir = std::env::var("DEP_NGTCP2_LIBDIR")
        .map(PathBuf::from)
        .unwrap_or_default();
    let archive = libdir.join("libngtcp2_crypto_shared.a");
    if !archive.is_file() {
        fail(&format!(
            "{} is missing: run `cargo xtask build` in the mqttd workspace (it builds ngtcp2's \
             crypto/shared.c, which mqttd-tls links with its Rust backend)",
            archive.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", archive.display());
    println!("cargo:rustc-link-search=native={}", libdir.display());
    println!("cargo:rustc-link-lib=static=ngtcp2_crypto_shared");
}

fn fail(message: &str) -> ! {
    eprintln!("mqttd-tls: {message}");
    std::process::exit(1);
}
