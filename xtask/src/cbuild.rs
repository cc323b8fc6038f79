//! `cargo xtask build`'s first half: compile the vendored C libraries with `cc` into `target/c/`.
//!
//! Layout produced (the prefix every `.pc` file names):
//! - `target/c/include/{ngtcp2,nghttp3}/*.h` — public headers plus the generated `version.h`;
//! - `target/c/lib/libngtcp2.a`, `libngtcp2_crypto_shared.a` (ngtcp2's `crypto/shared.c` only, the
//!   backend-independent half of the crypto helper; mqttd-tls supplies the backend in Rust),
//!   `libnghttp3.a`;
//! - `target/c/lib/pkgconfig/{libngtcp2,libngtcp2_crypto_shared,libnghttp3}.pc`;
//! - `target/c/obj/<lib>-<version>/` — object files, reused while their source, the headers and the
//!   compiler flags are unchanged (so a second build compiles nothing).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use crate::sources::{self, Library, Sources};

/// Defines every library is compiled with on glibc (see shared/BUILDCHAIN.md).
const PLATFORM_DEFINES: &[&str] = &[
    "HAVE_ARPA_INET_H",
    "HAVE_NETINET_IN_H",
    "HAVE_UNISTD_H",
    "HAVE_ENDIAN_H",
    "HAVE_BYTESWAP_H",
    "HAVE_DECL_BE64TOH=1",
    "HAVE_DECL_BSWAP_64=1",
    "HAVE_EXPLICIT_BZERO",
    "NDEBUG",
];

/// One static archive to produce.
struct Archive {
    /// Archive name without `lib`/`.a`, also the pkg-config module name without `lib`.
    name: &'static str,
    version: String,
    description: &'static str,
    sources: Vec<PathBuf>,
    /// Extra include directories (private headers) besides `target/c/include`.
    private_includes: Vec<PathBuf>,
    defines: Vec<&'static str>,
    /// Directories whose headers the sources depend on (for up-to-date checks).
    header_dirs: Vec<PathBuf>,
    /// pkg-config `Requires:` line.
    requires: &'static str,
}

/// What one run did, for the summary line and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Object files compiled in this run.
    pub compiled: usize,
    /// Object files found up to date.
    pub reused: usize,
}

/// Vendors (if needed) and compiles all C libraries into `prefix` (normally `target/c`).
pub fn build(root: &Path, prefix: &Path) -> Result<Report> {
    // Tests call this from parallel threads; two builds writing one prefix must not interleave.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let sources = sources::load(root)?;
    sources::vendor_all(&sources, &root.join("vendor"))?;
    build_from(root, &sources, prefix)
}

fn build_from(root: &Path, sources: &Sources, prefix: &Path) -> Result<Report> {
    let ngtcp2 = sources::library(sources, "ngtcp2")?;
    let nghttp3 = sources::library(sources, "nghttp3")?;
    let ngtcp2_dir = ngtcp2.dir(&root.join("vendor"));
    let nghttp3_dir = nghttp3.dir(&root.join("vendor"));
    let include = prefix.join("include");

    install_headers(
        ngtcp2,
        &ngtcp2_dir.join("lib/includes/ngtcp2"),
        &include.join("ngtcp2"),
    )?;
    install_headers(
        ngtcp2,
        &ngtcp2_dir.join("crypto/includes/ngtcp2"),
        &include.join("ngtcp2"),
    )?;
    install_headers(
        nghttp3,
        &nghttp3_dir.join("lib/includes/nghttp3"),
        &include.join("nghttp3"),
    )?;

    let archives = [
        Archive {
            name: "ngtcp2",
            version: ngtcp2.version.clone(),
            description: "ngtcp2 QUIC library (vendored and built by `cargo xtask build`)",
            sources: c_files(&ngtcp2_dir.join("lib"))?,
            private_includes: vec![ngtcp2_dir.join("lib")],
            defines: vec!["NGTCP2_STATICLIB"],
            header_dirs: vec![ngtcp2_dir.join("lib"), include.join("ngtcp2")],
            requires: "",
        },
        Archive {
            name: "ngtcp2_crypto_shared",
            version: ngtcp2.version.clone(),
            description: "ngtcp2 crypto helper, backend-independent part (crypto/shared.c)",
            sources: vec![ngtcp2_dir.join("crypto/shared.c")],
            private_includes: vec![ngtcp2_dir.join("crypto"), ngtcp2_dir.join("lib")],
            defines: vec!["NGTCP2_STATICLIB"],
            header_dirs: vec![
                ngtcp2_dir.join("crypto"),
                ngtcp2_dir.join("lib"),
                include.join("ngtcp2"),
            ],
            requires: "libngtcp2",
        },
        Archive {
            name: "nghttp3",
            version: nghttp3.version.clone(),
            description: "nghttp3 HTTP/3 library (vendored and built by `cargo xtask build`)",
            sources: {
                let mut files = c_files(&nghttp3_dir.join("lib"))?;
                files.push(nghttp3_dir.join("lib/sfparse/sfparse.c"));
                files
            },
            private_includes: vec![nghttp3_dir.join("lib")],
            defines: vec!["NGHTTP3_STATICLIB"],
            header_dirs: vec![
                nghttp3_dir.join("lib"),
                nghttp3_dir.join("lib/sfparse"),
                include.join("nghttp3"),
            ],
            requires: "",
        },
    ];

    let mut total = Report::default();
    for archive in &archives {
        let report = compile_archive(archive, prefix)
            .with_context(|| format!("building lib{}.a failed", archive.name))?;
        total.compiled += report.compiled;
        total.reused += report.reused;
        write_pc(archive, prefix)?;
    }
    Ok(total)
}

/// Copies `*.h` from `from` into `to`, and generates `version.h` from `version.h.in`.
fn install_headers(lib: &Library, from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".h") {
            write_if_changed(&to.join(name), &fs::read(&path)?)?;
        } else if name == "version.h.in" {
            let text = fs::read_to_string(&path)?
                .replace("@PACKAGE_VERSION@", &lib.version)
                .replace("@PACKAGE_VERSION_NUM@", &lib.version_num);
            write_if_changed(&to.join("version.h"), text.as_bytes())?;
        }
    }
    Ok(())
}

/// Writes `data` unless the file already holds it (keeps mtimes stable for incremental builds).
pub fn write_if_changed(path: &Path, data: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))
}

fn c_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no C sources in {}", dir.display());
    }
    Ok(files)
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host triple")
}

fn compile_archive(archive: &Archive, prefix: &Path) -> Result<Report> {
    let obj_dir = prefix
        .join("obj")
        .join(format!("{}-{}", archive.name, archive.version));
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&obj_dir)?;
    fs::create_dir_all(&lib_dir)?;

    let triple = host_triple()?;
    let mut build = cc::Build::new();
    build
        .target(&triple)
        .host(&triple)
        .opt_level(2)
        .debug(false)
        .pic(true)
        .warnings(false)
        .cargo_metadata(false)
        .out_dir(&obj_dir)
        .include(prefix.join("include"));
    for dir in &archive.private_includes {
        build.include(dir);
    }
    for define in PLATFORM_DEFINES.iter().chain(&archive.defines) {
        match define.split_once('=') {
            Some((k, v)) => build.define(k, v),
            None => build.define(define, None),
        };
    }
    let compiler = build
        .try_get_compiler()
        .context("no C compiler found (install gcc)")?;

    // The flags are part of every object's inputs: a change of flags rebuilds everything.
    let flags = format!("{:?} {:?}", compiler.path(), compiler.args());
    let stamp = obj_dir.join("flags");
    write_if_changed(&stamp, flags.as_bytes())?;
    let mut newest_input = mtime(&stamp)?;
    for dir in &archive.header_dirs {
        for entry in fs::read_dir(dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "h") {
                newest_input = newest_input.max(mtime(&entry.path())?);
            }
        }
    }

    let jobs: Vec<(PathBuf, PathBuf)> = archive
        .sources
        .iter()
        .map(|src| {
            let stem = src
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            (src.clone(), obj_dir.join(format!("{stem}.o")))
        })
        .collect();
    let stale: Vec<&(PathBuf, PathBuf)> = jobs
        .iter()
        .filter(|(src, obj)| match (mtime(src), mtime(obj)) {
            (Ok(s), Ok(o)) => o < s.max(newest_input),
            _ => true,
        })
        .collect();

    let queue = Mutex::new(stale.iter().copied());
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                    let Some((src, obj)) = next else { break };
                    let mut cmd = compiler.to_command();
                    cmd.arg("-c").arg(src).arg("-o").arg(obj);
                    match cmd.output() {
                        Ok(out) if out.status.success() => {}
                        Ok(out) => failures
                            .lock()
                            .map(|mut f| {
                                f.push(format!(
                                    "{}:\n{}",
                                    src.display(),
                                    String::from_utf8_lossy(&out.stderr)
                                ))
                            })
                            .unwrap_or(()),
                        Err(e) => failures
                            .lock()
                            .map(|mut f| {
                                f.push(format!("{}: cannot run the C compiler: {e}", src.display()))
                            })
                            .unwrap_or(()),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_default();
    if !failures.is_empty() {
        bail!("the C compiler failed:\n{}", failures.join("\n"));
    }

    let lib = lib_dir.join(format!("lib{}.a", archive.name));
    if !stale.is_empty() || !lib.exists() {
        let tmp = lib_dir.join(format!("lib{}.a.tmp", archive.name));
        let _ = fs::remove_file(&tmp);
        let mut ar = build.try_get_archiver().context("no archiver (ar) found")?;
        ar.arg("crs")
            .arg(&tmp)
            .args(jobs.iter().map(|(_, obj)| obj));
        let status = ar.status().context("cannot run ar")?;
        if !status.success() {
            bail!("ar failed for lib{}.a", archive.name);
        }
        fs::rename(&tmp, &lib)?;
    }
    Ok(Report {
        compiled: stale.len(),
        reused: jobs.len() - stale.len(),
    })
}

fn mtime(path: &Path) -> Result<SystemTime> {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("cannot stat {}", path.display()))
}

fn write_pc(archive: &Archive, prefix: &Path) -> Result<()> {
    let define = archive
        .defines
        .iter()
        .map(|d| format!(" -D{d}"))
        .collect::<String>();
    let pc = format!(
        "prefix={prefix}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n\
         Name: lib{name}\nDescription: {desc}\nVersion: {version}\nRequires: {requires}\n\
         Libs: -L${{libdir}} -l{name}\nCflags: -I${{includedir}}{define}\n",
        prefix = prefix.display(),
        name = archive.name,
        desc = archive.description,
        version = archive.version,
        requires = archive.requires,
    );
    let dir = prefix.join("lib/pkgconfig");
    fs::create_dir_all(&dir)?;
    write_if_changed(&dir.join(format!("lib{}.pc", archive.name)), pc.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real libraries build, and a second build compiles nothing.
    #[test]
    fn build_is_incremental() {
        let root = crate::workspace_root();
        let prefix = root.join("target/c");
        build(&root, &prefix).unwrap();
        let again = build(&root, &prefix).unwrap();
        assert_eq!(again.compiled, 0, "{again:?}");
        assert!(again.reused > 50, "{again:?}");
        for lib in ["libngtcp2.a", "libngtcp2_crypto_shared.a", "libnghttp3.a"] {
            assert!(prefix.join("lib").join(lib).is_file(), "{lib}");
        }
        let version = fs::read_to_string(prefix.join("include/ngtcp2/version.h")).unwrap();
        assert!(version.contains("#define NGTCP2_VERSION \"1.25.0\""));
        assert!(version.contains("#define NGTCP2_VERSION_NUM 0x011900"));
    }
}
