//! `vendor/sources.toml` and `cargo xtask vendor`: fetch, verify and extract the pinned C sources.
//!
//! Invariant: `vendor/<name>-<version>/` exists only when it holds a complete extraction of an
//! archive whose sha256 matched the pin. Extraction happens in a temporary sibling directory that
//! is renamed into place at the end, so an interrupted or failed run leaves nothing half-written.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The whole of `vendor/sources.toml`.
#[derive(Debug, Deserialize)]
pub struct Sources {
    /// One entry per pinned C library.
    pub library: Vec<Library>,
}

/// One pinned C library.
#[derive(Debug, Clone, Deserialize)]
pub struct Library {
    /// Short name, e.g. `ngtcp2`.
    pub name: String,
    /// Upstream version, e.g. `1.25.0`.
    pub version: String,
    /// The numeric version as the library's `version.h` spells it, e.g. `0x011900`.
    pub version_num: String,
    /// SPDX license of the C library.
    pub license: String,
    /// License file inside the extracted tree.
    pub license_file: String,
    /// The registry archive that carries the source.
    pub archive: Archive,
    /// sha256 of the archive file, lower-case hex.
    pub sha256: String,
    /// Directory inside the archive (below its top-level `<crate>-<version>/`).
    pub path: String,
}

/// A `.crate` file on the Rust crates registry used as a source archive.
#[derive(Debug, Clone, Deserialize)]
pub struct Archive {
    /// Crate name on the registry.
    #[serde(rename = "crate")]
    pub krate: String,
    /// Exact crate version.
    pub version: String,
}

impl Library {
    /// `vendor/<name>-<version>` below `vendor_dir`.
    pub fn dir(&self, vendor_dir: &Path) -> PathBuf {
        vendor_dir.join(format!("{}-{}", self.name, self.version))
    }

    /// File name of the archive, as cargo caches it.
    fn archive_file_name(&self) -> String {
        format!("{}-{}.crate", self.archive.krate, self.archive.version)
    }
}

/// Reads and parses `vendor/sources.toml`.
pub fn load(root: &Path) -> Result<Sources> {
    let path = root.join("vendor/sources.toml");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("{} is not a valid sources manifest", path.display()))
}

/// Looks a library up by name.
pub fn library<'a>(sources: &'a Sources, name: &str) -> Result<&'a Library> {
    sources
        .library
        .iter()
        .find(|l| l.name == name)
        .with_context(|| format!("vendor/sources.toml has no library named `{name}`"))
}

/// Makes sure every library is extracted under `vendor_dir`; returns their directories.
pub fn vendor_all(sources: &Sources, vendor_dir: &Path) -> Result<Vec<PathBuf>> {
    sources
        .library
        .iter()
        .map(|lib| ensure(lib, vendor_dir))
        .collect()
}

const STAMP: &str = ".mqttd-vendor-sha256";

/// Extracts `lib` into `vendor_dir` unless a verified extraction is already there (no network then).
pub fn ensure(lib: &Library, vendor_dir: &Path) -> Result<PathBuf> {
    let dest = lib.dir(vendor_dir);
    if fs::read_to_string(dest.join(STAMP)).is_ok_and(|s| s.trim() == lib.sha256) {
        return Ok(dest);
    }
    let archive = fetch_archive(lib)?;
    extract_verified(lib, &archive, vendor_dir)?;
    Ok(dest)
}

/// Finds the archive in cargo's download cache, asking cargo to download it when it is absent.
///
/// Cargo is the registry client here: it knows the configured registry, its proxy and its TLS roots,
/// and it names no host in this code.
fn fetch_archive(lib: &Library) -> Result<PathBuf> {
    if let Some(found) = find_in_cargo_cache(lib) {
        return Ok(found);
    }
    let spec = format!("{}@{}", lib.archive.krate, lib.archive.version);
    eprintln!(
        "xtask: downloading {spec} from the crates registry (source of {} {})",
        lib.name, lib.version
    );
    // `cargo info` outside any workspace downloads the `.crate` into the cache.
    let outside = std::env::temp_dir();
    let output = Command::new(cargo())
        .args(["info", "--quiet", &spec])
        .current_dir(&outside)
        .output()
        .context("cannot run cargo to download the source archive")?;
    if !output.status.success() {
        bail!(
            "cannot download {spec} (the source of {} {}) from the crates registry: {}",
            lib.name,
            lib.version,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    find_in_cargo_cache(lib).with_context(|| {
        format!(
            "cargo reported {spec} but its archive is not in the cargo cache ({})",
            cargo_home().display()
        )
    })
}

fn find_in_cargo_cache(lib: &Library) -> Option<PathBuf> {
    let cache = cargo_home().join("registry/cache");
    let file = lib.archive_file_name();
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path().join(&file))
        .find(|p| p.is_file())
}

fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cargo")
}

/// The cargo that runs us (set by `cargo run`), or the one on PATH.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Checks `archive` against the pin and extracts `lib.path` into `vendor_dir/<name>-<version>`.
///
/// On any error nothing is left under `vendor_dir` for this library.
pub fn extract_verified(lib: &Library, archive: &Path, vendor_dir: &Path) -> Result<()> {
    let bytes =
        fs::read(archive).with_context(|| format!("cannot read archive {}", archive.display()))?;
    let actual = hex(&Sha256::digest(&bytes));
    if actual != lib.sha256 {
        bail!(
            "the archive {} for {} {} has sha256 {actual} but vendor/sources.toml pins {}; \
             it is corrupt or truncated: delete it and run `cargo xtask vendor` again",
            archive.display(),
            lib.name,
            lib.version,
            lib.sha256
        );
    }
    fs::create_dir_all(vendor_dir)
        .with_context(|| format!("cannot create {}", vendor_dir.display()))?;
    let dest = lib.dir(vendor_dir);
    let staging = vendor_dir.join(format!(
        ".partial-{}-{}-{}",
        lib.name,
        lib.version,
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staging);
    let result = unpack(lib, &bytes, &staging).and_then(|()| {
        fs::write(staging.join(STAMP), format!("{}\n", lib.sha256))?;
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&staging, &dest)
            .with_context(|| format!("cannot move the sources into {}", dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.with_context(|| {
        format!(
            "cannot extract {} {} from {}",
            lib.name,
            lib.version,
            archive.display()
        )
    })
}

fn unpack(lib: &Library, gz: &[u8], staging: &Path) -> Result<()> {
    let prefix =
        PathBuf::from(format!("{}-{}", lib.archive.krate, lib.archive.version)).join(&lib.path);
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    let mut extracted = 0usize;
    for entry in tar.entries().context("the archive is not a gzip'd tar")? {
        let mut entry = entry.context("the archive is truncated or damaged")?;
        let path = entry
            .path()
            .context("an archive entry has an invalid path")?
            .into_owned();
        let Ok(rel) = path.strip_prefix(&prefix) else {
            continue;
        };
        if rel.as_os_str().is_empty() || !entry.header().entry_type().is_file() {
            continue;
        }
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("archive entry {} escapes its directory", path.display());
        }
        let out = staging.join(rel);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut data)
            .context("the archive is truncated or damaged")?;
        fs::write(&out, data).with_context(|| format!("cannot write {}", out.display()))?;
        extracted += 1;
    }
    if extracted == 0 {
        bail!("the archive holds nothing under {}", prefix.display());
    }
    if !staging.join(&lib.license_file).is_file() {
        bail!(
            "the archive holds no {} license file under {}",
            lib.license_file,
            prefix.display()
        );
    }
    Ok(())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small `.crate`-shaped archive with `files` under `demo-0.1.0/deps/demo/`.
    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("demo-0.1.0/deps/demo/{name}"), *data)
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn spec(sha256: String) -> Library {
        Library {
            name: "demo".into(),
            version: "1.0.0".into(),
            version_num: "0x010000".into(),
            license: "MIT".into(),
            license_file: "COPYING".into(),
            archive: Archive {
                krate: "demo".into(),
                version: "0.1.0".into(),
            },
            sha256,
            path: "deps/demo".into(),
        }
    }

    #[test]
    fn a_verified_archive_is_extracted_with_its_license() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = archive(&[("COPYING", b"MIT"), ("lib/a.c", b"int a;")]);
        let path = tmp.path().join("demo-0.1.0.crate");
        fs::write(&path, &bytes).unwrap();
        let lib = spec(hex(&Sha256::digest(&bytes)));
        let vendor = tmp.path().join("vendor");
        extract_verified(&lib, &path, &vendor).unwrap();
        assert_eq!(
            fs::read(vendor.join("demo-1.0.0/lib/a.c")).unwrap(),
            b"int a;"
        );
        // The second run is satisfied by the stamp: no archive needed at all.
        assert_eq!(ensure(&lib, &vendor).unwrap(), vendor.join("demo-1.0.0"));
        let names: Vec<_> = fs::read_dir(&vendor)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("demo-1.0.0")]);
    }

    #[test]
    fn a_corrupted_archive_is_rejected_and_nothing_is_extracted() {
        let tmp = tempfile::tempdir().unwrap();
        let good = archive(&[("COPYING", b"MIT"), ("lib/a.c", b"int a;")]);
        let lib = spec(hex(&Sha256::digest(&good)));
        let mut bad = good.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 0x55;
        let path = tmp.path().join("demo-0.1.0.crate");
        fs::write(&path, &bad).unwrap();
        let vendor = tmp.path().join("vendor");
        let err = format!("{:#}", extract_verified(&lib, &path, &vendor).unwrap_err());
        assert!(
            err.contains("sha256") && err.contains("corrupt or truncated"),
            "{err}"
        );
        assert!(!vendor.join("demo-1.0.0").exists());
    }

    #[test]
    fn a_truncated_archive_leaves_no_partial_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let full = archive(&[("COPYING", b"MIT"), ("lib/big.c", &big)]);
        let truncated = &full[..full.len() / 2];
        // Pin the truncated bytes so the checksum passes and extraction itself must fail cleanly.
        let lib = spec(hex(&Sha256::digest(truncated)));
        let path = tmp.path().join("demo-0.1.0.crate");
        fs::write(&path, truncated).unwrap();
        let vendor = tmp.path().join("vendor");
        assert!(extract_verified(&lib, &path, &vendor).is_err());
        assert_eq!(
            fs::read_dir(&vendor).unwrap().count(),
            0,
            "nothing may be left behind"
        );
    }

    #[test]
    fn the_committed_manifest_pins_both_libraries() {
        let root = crate::workspace_root();
        let sources = load(&root).unwrap();
        assert_eq!(library(&sources, "ngtcp2").unwrap().version, "1.25.0");
        assert_eq!(library(&sources, "nghttp3").unwrap().version, "1.18.0");
        for lib in &sources.library {
            assert_eq!(lib.sha256.len(), 64, "{}", lib.name);
        }
    }
}
