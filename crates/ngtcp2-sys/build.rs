//! Finds libngtcp2 with pkg-config: the one `cargo xtask build` puts in `target/c/` (found through
//! `PKG_CONFIG_PATH`, which the workspace's `.cargo/config.toml` sets), or a system ngtcp2 >= 1.12.

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let lib = match pkg_config::Config::new()
        .atleast_version("1.12")
        .statik(true)
        .probe("libngtcp2")
    {
        Ok(lib) => lib,
        Err(err) => {
            eprintln!(
                "mqttd-ngtcp2-sys: libngtcp2 >= 1.12 was not found by pkg-config; run `cargo xtask build` \
                 in the mqttd workspace to build the pinned ngtcp2 into target/c/ ({err})"
            );
            std::process::exit(1);
        }
    };
    // Relink when `cargo xtask build` replaces the archive.
    for dir in &lib.link_paths {
        let archive = dir.join("libngtcp2.a");
        if archive.is_file() {
            println!("cargo:rerun-if-changed={}", archive.display());
        }
        // Dependents (mqttd-tls) read this as DEP_NGTCP2_LIBDIR to find libngtcp2_crypto_shared.a.
        println!("cargo:libdir={}", dir.display());
    }
    if let Some(include) = lib.include_paths.first() {
        // Dependents read this as DEP_NGTCP2_INCLUDE.
        println!("cargo:include={}", include.display());
    }
    println!("cargo:version={}", lib.version);
}
