//! Finds libnghttp3 with pkg-config: the one `cargo xtask build` puts in `target/c/` (found through
//! `PKG_CONFIG_PATH`, which the workspace's `.cargo/config.toml` sets), or a system nghttp3 >= 1.0.

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let lib = match pkg_config::Config::new()
        .atleast_version("1.0")
        .statik(true)
        .probe("libnghttp3")
    {
        Ok(lib) => lib,
        Err(err) => {
            eprintln!(
                "mqttd-nghttp3-sys: libnghttp3 >= 1.0 was not found by pkg-config; run `cargo xtask build` \
                 in the mqttd workspace to build the pinned nghttp3 into target/c/ ({err})"
            );
            std::process::exit(1);
        }
    };
    // Relink when `cargo xtask build` replaces the archive.
    for dir in &lib.link_paths {
        let archive = dir.join("libnghttp3.a");
        if archive.is_file() {
            println!("cargo:rerun-if-changed={}", archive.display());
        }
        println!("cargo:libdir={}", dir.display());
    }
    if let Some(include) = lib.include_paths.first() {
        // Dependents read this as DEP_NGHTTP3_INCLUDE.
        println!("cargo:include={}", include.display());
    }
    println!("cargo:version={}", lib.version);
}
