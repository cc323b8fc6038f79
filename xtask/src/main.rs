//! `cargo xtask`: the mqttd build chain as Rust code.
//!
//! Commands (each one function below):
//! - `vendor`  — fetch and verify the pinned C sources into `vendor/`;
//! - `build`   — vendor, compile ngtcp2/nghttp3 into `target/c/`, then build the workspace;
//! - `bindgen [--check]` — regenerate (or check) the committed FFI bindings;
//! - `run [ARGS…]` — build and start the `mqttd` broker with ARGS;
//! - `test`    — everything CI checks: fmt, clippy, bindings, the workspace tests;
//! - `bench broker [--duration-secs N] [--reps N] [--only broker,quic,storage]` — the broker
//!   benchmark matrix (TCP peers, MQTT over QUIC, durable storage) into `bench/results/`.
//!
//! The xtask is never a runtime dependency of any crate.

mod bench;
mod bindings;
mod cbuild;
mod sources;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <vendor | build | bindgen [--check] | run [ARGS...] | test | valgrind | bench broker [OPTIONS]>";

fn main() {
    if let Err(err) = run_cli() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run_cli() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("vendor") => vendor(&root),
        Some("build") => build(&root),
        Some("bindgen") => match args.get(1).map(String::as_str) {
            None => bindgen(&root),
            Some("--check") => bindgen_check(&root),
            Some(other) => bail!("unknown bindgen option `{other}`; {USAGE}"),
        },
        Some("run") => run(&root, &args[1..]),
        Some("test") => test(&root),
        Some("valgrind") => valgrind(&root),
        Some("bench") => bench::run(&root, &args[1..]),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`; {USAGE}"),
        None => bail!("{USAGE}"),
    }
}

/// The workspace root (the xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn vendor(root: &Path) -> Result<()> {
    let sources = sources::load(root)?;
    for lib in &sources.library {
        let dir = sources::ensure(lib, &root.join("vendor"))?;
        let shown = dir.strip_prefix(root).unwrap_or(&dir).display();
        eprintln!(
            "xtask: {shown} is ready ({} license in {shown}/{})",
            lib.license, lib.license_file
        );
    }
    Ok(())
}

/// Compiles the C libraries only (no cargo build).
fn build_c(root: &Path) -> Result<()> {
    let started = Instant::now();
    let report = cbuild::build(root, &root.join("target/c"))?;
    eprintln!(
        "xtask: C libraries in target/c ({} compiled, {} up to date, {:.1}s)",
        report.compiled,
        report.reused,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build(root: &Path) -> Result<()> {
    build_c(root)?;
    cargo(root, &["build", "--workspace"])
}

fn bindgen(root: &Path) -> Result<()> {
    build_c(root)?;
    bindings::write_all(root)
}

fn bindgen_check(root: &Path) -> Result<()> {
    build_c(root)?;
    bindings::check_all(root, &root.join("target/c/include"))?;
    eprintln!("xtask: the committed bindings are current");
    Ok(())
}

fn run(root: &Path, args: &[String]) -> Result<()> {
    build_c(root)?;
    let mut cmd = vec![
        "run",
        "--release",
        "--package",
        "mqttd",
        "--bin",
        "mqttd",
        "--",
    ];
    // With no arguments, run the shipped default configuration (loopback MQTT on 1883).
    let default_config = root.join("crates/mqttd/mqttd.toml");
    let default_config = default_config.to_string_lossy();
    if args.is_empty() {
        cmd.extend(["--config", &*default_config]);
    }
    cmd.extend(args.iter().map(String::as_str));
    cargo(root, &cmd)
}

/// Runs the in-memory TLS handshake tests under valgrind: no definitely-lost bytes, no invalid
/// reads or writes (the FFI layers' memory contract).
fn valgrind(root: &Path) -> Result<()> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        bail!("valgrind is not installed: install the Debian package `valgrind` (`.ci/run` does)");
    }
    let out = Command::new(sources::cargo())
        .args([
            "test",
            "-p",
            "mqttd-tls",
            "--test",
            "handshake",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .output()
        .context("cannot run cargo to build the handshake tests")?;
    if !out.status.success() {
        bail!(
            "building the handshake tests failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = stdout
        .lines()
        .filter(|l| l.contains("\"name\":\"handshake\"") && l.contains("\"test\":true"))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = l[start..].find('"')? + start;
            Some(l[start..end].to_owned())
        })
        .context("cargo did not report the handshake test executable")?;
    let supp = root.join("crates/tls/tests/valgrind.supp");
    let status = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--error-exitcode=1",
            "--quiet",
        ])
        .arg(format!("--suppressions={}", supp.display()))
        .arg(&exe)
        .args(["--test-threads=1"])
        .current_dir(root)
        .status()
        .context("cannot run valgrind")?;
    if !status.success() {
        bail!("valgrind found memory errors or definite leaks in the TLS handshake tests");
    }
    Ok(())
}

fn test(root: &Path) -> Result<()> {
    let started = Instant::now();
    build_c(root)?;
    step("cargo fmt --check", || {
        cargo(root, &["fmt", "--all", "--", "--check"])
    })?;
    step("cargo clippy", || {
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    step("bindings check", || {
        bindings::check_all(root, &root.join("target/c/include"))
    })?;
    step("cargo test", || cargo(root, &["test", "--workspace"]))?;
    step("valgrind (mqttd-tls handshakes)", || valgrind(root))?;
    eprintln!(
        "xtask: all checks passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("xtask: == {name}");
    let started = Instant::now();
    f().with_context(|| format!("step `{name}` failed"))?;
    eprintln!(
        "xtask: == {name} ok ({:.0}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(sources::cargo())
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
