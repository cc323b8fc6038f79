//! `cargo xtask bench broker`: the broker benchmark matrix.
//!
//! Builds `mqttd` and `mqttd-bench` in release, then for every case of the matrix and every
//! repetition starts each broker fresh on a free loopback port (mqttd; mosquitto from Debian;
//! rumqttd from the crates registry at a pinned version, installed into `target/peers`), runs
//! `mqttd-bench --json --broker-pid` against it, and stops it. Brokers alternate within a case
//! and their order rotates between repetitions, so slow drift of the machine does not favour one.
//! The medians go into `bench/results/broker-matrix.md` (with ratios), every raw summary into
//! `broker-matrix.jsonl`, and a throughput chart into `broker-matrix.svg`.
//!
//! Configs are equivalent where the brokers allow: loopback only, anonymous, no persistence,
//! no logging beyond warnings, 1024 inflight QoS 1/2 messages per client, 10^6 queued messages
//! per client (so none drops by queue limit), no connection throttling. TCP_NODELAY stays each
//! broker's default (mqttd sets it; mosquitto and rumqttd leave Nagle on, and mosquitto measured
//! slightly faster that way here).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::sources;

/// The rumqttd release the matrix compares against.
const RUMQTTD_VERSION: &str = "0.20.0";
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const USAGE: &str = "usage: cargo xtask bench broker [--duration-secs N] [--reps N] \
                     [--brokers mqttd,mosquitto,rumqttd] [--cases ID,...] [--out DIR]\n       \
                     cargo xtask bench quic (mqttd-quic against quinn: throughput, handshakes/s, idle memory)";

/// Entry point: `cargo xtask bench ARGS`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("broker") => broker_matrix(root, &Options::parse(&args[1..])?),
        Some("quic") => {
            crate::build_c(root)?;
            crate::cargo(
                root,
                &["bench", "--package", "mqttd-quic", "--bench", "quic"],
            )
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

#[derive(Debug)]
struct Options {
    duration_secs: u64,
    reps: usize,
    brokers: Vec<BrokerKind>,
    cases: Option<Vec<String>>,
    out: PathBuf,
    command_line: String,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            duration_secs: 10,
            reps: 3,
            brokers: vec![
                BrokerKind::Mqttd,
                BrokerKind::Mosquitto,
                BrokerKind::Rumqttd,
            ],
            cases: None,
            out: PathBuf::from("bench/results"),
            command_line: std::iter::once("cargo xtask bench broker".to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .with_context(|| format!("{flag} needs a value; {USAGE}"))
            };
            match flag.as_str() {
                "--duration-secs" => {
                    o.duration_secs = value()?
                        .parse()
                        .context("--duration-secs takes whole seconds")?;
                    if o.duration_secs == 0 {
                        bail!("--duration-secs must be at least 1");
                    }
                }
                "--reps" => {
                    o.reps = value()?.parse().context("--reps takes a count")?;
                    if o.reps == 0 {
                        bail!("--reps must be at least 1");
                    }
                }
                "--brokers" => {
                    o.brokers = value()?
                        .split(',')
                        .map(BrokerKind::parse)
                        .collect::<Result<_>>()?;
                }
                "--cases" => {
                    o.cases = Some(value()?.split(',').map(str::to_string).collect());
                }
                "--out" => o.out = PathBuf::from(value()?),
                other => bail!("unknown option `{other}`; {USAGE}"),
            }
        }
        Ok(o)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BrokerKind {
    Mqttd,
    Mosquitto,
    Rumqttd,
}

impl BrokerKind {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "mqttd" => Self::Mqttd,
            "mosquitto" => Self::Mosquitto,
            "rumqttd" => Self::Rumqttd,
            other => bail!("unknown broker `{other}` (mqttd, mosquitto, rumqttd)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Mqttd => "mqttd",
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
        }
    }
}

/// What a case is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// Deliveries per second at saturation (and p99 latency there).
    Throughput,
    /// Latency at a fixed rate.
    Latency,
    /// Connects per second and memory per idle connection.
    Connections,
}

struct Case {
    id: &'static str,
    title: &'static str,
    measure: Measure,
    args: Vec<String>,
}

fn cases(duration: u64) -> Vec<Case> {
    let d = duration.to_string();
    let msgs = |scenario: &str, size: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [scenario, "--mqtt", "3.1.1", "-s", size, "-w", "64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(["-d".to_string(), d.clone(), "--drain".into(), "3".into()]);
        v
    };
    vec![
        Case {
            id: "fan-in-q0",
            title: "fan-in 4→1, QoS 0",
            measure: Measure::Throughput,
            args: msgs("fan-in", "64", &["--publishers", "4", "-q", "0"]),
        },
        Case {
            id: "fan-in-q1",
            title: "fan-in 4→1, QoS 1",
            measure: Measure::Throughput,
            args: msgs("fan-in", "64", &["--publishers", "4", "-q", "1"]),
        },
        Case {
            id: "fan-in-q1-4k",
            title: "fan-in 4→1, QoS 1, 4 KiB",
            measure: Measure::Throughput,
            args: msgs("fan-in", "4096", &["--publishers", "4", "-q", "1"]),
        },
        Case {
            id: "fan-out-q0",
            title: "fan-out 1→4, QoS 0",
            measure: Measure::Throughput,
            args: msgs("fan-out", "64", &["--subscribers", "4", "-q", "0"]),
        },
        Case {
            id: "fan-out-q1",
            title: "fan-out 1→4, QoS 1",
            measure: Measure::Throughput,
            args: msgs("fan-out", "64", &["--subscribers", "4", "-q", "1"]),
        },
        Case {
            id: "pairs-q1",
            title: "8 pairs, QoS 1",
            measure: Measure::Throughput,
            args: msgs("pairs", "64", &["--pairs", "8", "-q", "1"]),
        },
        Case {
            id: "pairs-q1-5k",
            title: "8 pairs, QoS 1, fixed 5k msg/s total",
            measure: Measure::Latency,
            args: msgs("pairs", "64", &["--pairs", "8", "-q", "1", "-r", "625"]),
        },
        Case {
            id: "conn-storm",
            title: "connection storm, 2,000 clients",
            measure: Measure::Connections,
            args: ["conn-storm", "--mqtt", "3.1.1", "-c", "2000", "-d", "2"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        },
    ]
}

/// A broker binary ready to start, or why it is not.
enum Peer {
    Ready(PathBuf),
    Unavailable(String),
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

/// rumqttd from the crates registry, installed once into `target/peers`; the string says how.
fn rumqttd(root: &Path) -> (Peer, String) {
    let peers = root.join("target/peers");
    let bin = peers.join("bin/rumqttd");
    let stamp = peers.join(format!("rumqttd-{RUMQTTD_VERSION}.installed"));
    if bin.exists()
        && let Ok(how) = fs::read_to_string(&stamp)
    {
        return (Peer::Ready(bin), how.trim().to_string());
    }
    let spec = format!("rumqttd@{RUMQTTD_VERSION}");
    let peers_s = peers.to_string_lossy().to_string();
    // TCP only: the TLS and WebSocket features are not benchmarked.
    let base = [
        "install",
        spec.as_str(),
        "--no-default-features",
        "--root",
        peers_s.as_str(),
    ];
    eprintln!("xtask: installing {spec} into target/peers (once)");
    let mut with_lock = base.to_vec();
    with_lock.insert(1, "--locked");
    let how = if cargo(root, &with_lock).is_ok() {
        format!("`cargo install --locked {spec} --no-default-features`")
    } else {
        // rumqttd 0.20.0's lock file pins metrics 0.22.1, which rustc 1.95 rejects (E0521);
        // resolving its dependencies afresh picks a fixed 0.22.x release.
        eprintln!("xtask: `cargo install --locked {spec}` failed; retrying without --locked");
        if let Err(e) = cargo(root, &base) {
            let why = format!("`cargo install {spec}` failed here: {e:#}");
            return (Peer::Unavailable(why.clone()), why);
        }
        format!(
            "`cargo install {spec} --no-default-features` without `--locked` (its lock file's \
             metrics 0.22.1 does not build on this rustc)"
        )
    };
    let _ = fs::write(&stamp, format!("{how}\n"));
    if bin.exists() {
        (Peer::Ready(bin), how)
    } else {
        let why = format!("{spec} installed no bin/rumqttd");
        (Peer::Unavailable(why.clone()), why)
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A running broker, killed on drop.
struct Running {
    child: Child,
    port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker(kind: BrokerKind, bin: &Path, work: &Path, tag: &str) -> Result<Running> {
    let port = free_port()?;
    let log = fs::File::create(work.join(format!("{tag}.log")))?;
    let mut cmd = Command::new(bin);
    match kind {
        BrokerKind::Mqttd => {
            // `--storage memory`: the same as mosquitto's `persistence false` and rumqttd.
            cmd.args(["--listen", &format!("127.0.0.1:{port}")]).args([
                "--storage",
                "memory",
                "--http-enabled",
                "false",
                "--sys-interval-secs",
                "0",
                "--log-level",
                "warn",
                "--max-inflight",
                "1024",
                "--max-queued-messages",
                "1000000",
                "--max-connections",
                "1000000",
            ]);
            // The default durable storage (redb, durability = "sync"), in a fresh directory
            // per run, never in the working directory.
            let data = work.join(format!("{tag}.mqttd-data"));
            let _ = fs::remove_dir_all(&data);
            cmd.arg("--data-dir").arg(data);
        }
        BrokerKind::Mosquitto => {
            let conf = work.join(format!("{tag}.mosquitto.conf"));
            fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     max_inflight_messages 1024\nmax_queued_messages 1000000\n\
                     max_connections -1\nlog_dest stderr\n\
                     log_type error\nlog_type warning\n"
                ),
            )?;
            cmd.arg("-c").arg(conf);
        }
        BrokerKind::Rumqttd => {
            let conf = work.join(format!("{tag}.rumqttd.toml"));
            fs::write(
                &conf,
                format!(
                    "id = 0\n\n[router]\nid = 0\nmax_connections = 1000000\n\
                     max_outgoing_packet_count = 200\nmax_segment_size = 104857600\n\
                     max_segment_count = 10\n\n[v4.1]\nname = \"v4-1\"\n\
                     listen = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n\
                     [v4.1.connections]\nconnection_timeout_ms = 60000\n\
                     max_payload_size = 1048576\nmax_inflight_count = 1024\n\
                     dynamic_filters = true\n"
                ),
            )?;
            cmd.arg("-c").arg(conf);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut running = Running { child, port };
    let until = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = running.child.try_wait()? {
            bail!(
                "{} exited at start ({status}); see {}",
                kind.name(),
                work.join(format!("{tag}.log")).display()
            );
        }
        if Instant::now() > until {
            bail!("{} did not listen on port {port} within 15 s", kind.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(running)
}

/// Runs `mqttd-bench` once against `broker`; returns its summary object.
fn run_bench(bench: &Path, case: &Case, broker: &Running, limit: Duration) -> Result<Value> {
    let mut child = Command::new(bench)
        .args(&case.args)
        .args([
            "-p",
            &broker.port.to_string(),
            "--json",
            "--interval-ms",
            "60000",
        ])
        .args(["--broker-pid", &broker.child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start mqttd-bench")?;
    let until = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mqttd-bench did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v["type"] == "summary");
    match summary {
        Some(s) => Ok(s),
        None => bail!(
            "mqttd-bench printed no summary ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for key in path {
        v = v.get(key)?;
    }
    v.as_f64()
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    Some(if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    })
}

/// Every result of one (case, broker): the summaries, or the errors.
#[derive(Default)]
struct Cell {
    runs: Vec<Value>,
    errors: Vec<String>,
}

impl Cell {
    fn median(&self, path: &[&str]) -> Option<f64> {
        median(self.runs.iter().filter_map(|r| f(r, path)).collect())
    }
}

type Results = BTreeMap<(&'static str, BrokerKind), Cell>;

fn broker_matrix(root: &Path, o: &Options) -> Result<()> {
    let started = Instant::now();
    // mqttd links the QUIC stack: the C libraries come first, as for `cargo xtask run`.
    crate::build_c(root)?;
    cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "mqttd",
            "--package",
            "mqttd-bench",
        ],
    )?;
    let release = root.join("target/release");
    let bench = release.join("mqttd-bench");
    let mut peers: BTreeMap<BrokerKind, Peer> = BTreeMap::new();
    let mut rumqttd_how = String::new();
    for &kind in &o.brokers {
        let peer = match kind {
            BrokerKind::Mqttd => Peer::Ready(release.join("mqttd")),
            BrokerKind::Mosquitto if Path::new(MOSQUITTO).exists() => {
                Peer::Ready(PathBuf::from(MOSQUITTO))
            }
            BrokerKind::Mosquitto => {
                Peer::Unavailable(format!("{MOSQUITTO} missing (apt-get install mosquitto)"))
            }
            BrokerKind::Rumqttd => {
                let (peer, how) = rumqttd(root);
                rumqttd_how = how;
                peer
            }
        };
        if let Peer::Unavailable(why) = &peer {
            eprintln!("xtask: {} unavailable: {why}", kind.name());
        }
        peers.insert(kind, peer);
    }
    let all_cases = cases(o.duration_secs);
    let cases: Vec<&Case> = all_cases
        .iter()
        .filter(|c| {
            o.cases
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|i| i == c.id))
        })
        .collect();
    if cases.is_empty() {
        bail!(
            "no such case; the cases are {}",
            all_cases
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let out_dir = root.join(&o.out);
    fs::create_dir_all(&out_dir)?;
    let work = root.join("target/bench-work");
    fs::create_dir_all(&work)?;
    let limit = Duration::from_secs(o.duration_secs + 60);
    let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Results::new();
    let mut raw = String::new();
    let ready: Vec<(BrokerKind, PathBuf)> = o
        .brokers
        .iter()
        .filter_map(|k| match peers.get(k) {
            Some(Peer::Ready(p)) => Some((*k, p.clone())),
            _ => None,
        })
        .collect();
    for rep in 0..o.reps {
        for (ci, case) in cases.iter().enumerate() {
            // Rotate the order so no broker always runs first (or right after a given other).
            let mut order = ready.clone();
            if !order.is_empty() {
                let by = (rep + ci) % order.len();
                order.rotate_left(by);
            }
            for (kind, bin) in order {
                let tag = format!("{}-{}-{rep}", case.id, kind.name());
                let cell = results.entry((case.id, kind)).or_default();
                let outcome = start_broker(kind, &bin, &work, &tag)
                    .and_then(|b| run_bench(&bench, case, &b, limit));
                match outcome {
                    Ok(summary) => {
                        eprintln!(
                            "xtask: {tag}: {:.0} msg/s, p99 {} us, {:.0} conn/s, errors {}",
                            f(&summary, &["recv_rate"]).unwrap_or(0.0),
                            f(&summary, &["latency_us", "p99"]).unwrap_or(0.0),
                            f(&summary, &["connect_rate"]).unwrap_or(0.0),
                            f(&summary, &["errors"]).unwrap_or(0.0),
                        );
                        let _ = writeln!(
                            raw,
                            "{}",
                            serde_json::json!({"case": case.id, "broker": kind.name(), "rep": rep, "summary": summary})
                        );
                        cell.runs.push(summary);
                    }
                    Err(e) => {
                        eprintln!("xtask: {tag}: FAILED: {e:#}");
                        cell.errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    let env = Environment {
        root: root.to_path_buf(),
        rumqttd_how,
        load_before,
        load_after: fs::read_to_string("/proc/loadavg").unwrap_or_default(),
        took: started.elapsed(),
    };
    let md = markdown(o, &cases, &peers, &results, &env);
    fs::write(out_dir.join("broker-matrix.md"), md)?;
    fs::write(out_dir.join("broker-matrix.jsonl"), raw)?;
    chart(
        &out_dir.join("broker-matrix.svg"),
        &cases,
        &o.brokers,
        &results,
    )?;
    eprintln!(
        "xtask: wrote {}/broker-matrix.{{md,jsonl,svg}} in {:.0}s",
        o.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fmt_num(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or("—".to_string(), |v| format!("{:.*}", digits, v / scale))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "—".to_string(),
    }
}

fn version_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// Facts about the run for the report's header.
struct Environment {
    root: PathBuf,
    rumqttd_how: String,
    load_before: String,
    load_after: String,
    took: Duration,
}

fn markdown(
    o: &Options,
    cases: &[&Case],
    peers: &BTreeMap<BrokerKind, Peer>,
    results: &Results,
    env: &Environment,
) -> String {
    let took = env.took;
    let brokers = &o.brokers;
    let mut s = String::new();
    let _ = writeln!(s, "# Broker benchmark matrix\n");
    let _ = writeln!(
        s,
        "Produced by `{}` ({:.0} s).\n",
        o.command_line,
        took.as_secs_f64()
    );
    let root_s = env.root.to_string_lossy().to_string();
    let mut rev = version_of("git", &["-C", &root_s, "rev-parse", "--short", "HEAD"]);
    let dirty = version_of(
        "git",
        &["-C", &root_s, "status", "--porcelain", "--", "crates"],
    );
    if !dirty.is_empty() {
        rev.push_str(" with uncommitted changes under crates/");
    }
    let kernel = version_of("uname", &["-r"]);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "- Machine: {cpus} CPUs shared by the brokers and the load generator (loopback TCP), Linux {kernel}."
    );
    let loadavg = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min) before the matrix: {}; after: {} (other work on the machine \
         skews absolute numbers; the alternating order spreads it over the brokers).",
        loadavg(&env.load_before),
        loadavg(&env.load_after)
    );
    let _ = writeln!(
        s,
        "- mqttd at {rev}; {}; rumqttd {RUMQTTD_VERSION} from the crates registry, TCP only, \
         installed with {}.",
        version_of(MOSQUITTO, &["-h"]),
        if env.rumqttd_how.is_empty() {
            "—"
        } else {
            &env.rumqttd_how
        }
    );
    let _ = writeln!(
        s,
        "- Load: `mqttd-bench` (release), MQTT 3.1.1, 64 B payloads unless noted, {} s of publishing per run, inflight window 64; each cell is the median of {} run(s); a fresh broker per run, brokers alternating.",
        o.duration_secs, o.reps
    );
    let _ = writeln!(
        s,
        "- Configs: loopback, anonymous, no persistence, 1024 inflight and 10^6 queued messages per client, no connect throttling, TCP_NODELAY as each broker's default. Raw summaries: `broker-matrix.jsonl`; chart: `broker-matrix.svg`.\n"
    );
    for (kind, peer) in peers {
        if let Peer::Unavailable(why) = peer {
            let _ = writeln!(s, "**{} not measured**: {why}\n", kind.name());
        }
    }
    let has_mqttd = brokers.contains(&BrokerKind::Mqttd);
    let peers_of_mqttd: Vec<BrokerKind> = brokers
        .iter()
        .copied()
        .filter(|b| *b != BrokerKind::Mqttd)
        .collect();
    let header = |s: &mut String, first: &str, unit: &str| {
        let _ = write!(s, "| {first} |");
        for b in brokers {
            let _ = write!(s, " {}{unit} |", b.name());
        }
        if has_mqttd {
            for b in &peers_of_mqttd {
                let _ = write!(s, " mqttd vs {} |", b.name());
            }
        }
        let _ = write!(s, "\n|---|");
        let cols = brokers.len() + if has_mqttd { peers_of_mqttd.len() } else { 0 };
        for _ in 0..cols {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
    };
    // One table row: the median of `path` per broker, scaled, then mqttd's ratio to each peer
    // (`lower_is_better` turns it into peer / mqttd so that above 1 always favours mqttd).
    let row = |s: &mut String,
               label: &str,
               id: &'static str,
               path: &[&str],
               scale: f64,
               digits: usize,
               lower_is_better: bool| {
        let value = |b: BrokerKind| results.get(&(id, b)).and_then(|c| c.median(path));
        let _ = write!(s, "| {label} |");
        for &b in brokers {
            let shown = match (value(b), results.get(&(id, b))) {
                (Some(v), _) => fmt_num(Some(v), scale, digits),
                (None, Some(c)) if !c.errors.is_empty() => "failed".to_string(),
                _ => "—".to_string(),
            };
            let _ = write!(s, " {shown} |");
        }
        if has_mqttd {
            for &b in &peers_of_mqttd {
                let r = if lower_is_better {
                    ratio(value(b), value(BrokerKind::Mqttd))
                } else {
                    ratio(value(BrokerKind::Mqttd), value(b))
                };
                let _ = write!(s, " {r} |");
            }
        }
        s.push('\n');
    };

    let _ = writeln!(
        s,
        "## Throughput at saturation (deliveries received per second)\n"
    );
    let _ = writeln!(s, "Ratios above 1 favour mqttd.\n");
    header(&mut s, "case", " k msg/s");
    for c in cases.iter().filter(|c| c.measure == Measure::Throughput) {
        row(&mut s, c.title, c.id, &["recv_rate"], 1000.0, 1, false);
    }
    let _ = writeln!(
        s,
        "\n## Latency (end to end, publisher to subscriber, ms)\n"
    );
    let _ = writeln!(
        s,
        "p99 at saturation for the QoS 1 cases above; p50/p99/p99.9 at a fixed rate. \
         Ratios are peer / mqttd: above 1 favours mqttd.\n"
    );
    header(&mut s, "case", " ms");
    for c in cases.iter().filter(|c| c.measure != Measure::Connections) {
        if c.args.windows(2).any(|w| w[0] == "-q" && w[1] == "0") {
            continue;
        }
        let pcts: &[(&str, &str)] = if c.measure == Measure::Latency {
            &[("p50", "p50"), ("p99", "p99"), ("p99.9", "p999")]
        } else {
            &[("p99", "p99")]
        };
        for (label, key) in pcts {
            let label = format!("{} — {label}", c.title);
            row(&mut s, &label, c.id, &["latency_us", key], 1000.0, 2, true);
        }
    }
    if let Some(c) = cases.iter().find(|c| c.measure == Measure::Connections) {
        let _ = writeln!(s, "\n## Connections ({})\n", c.title);
        header(&mut s, "metric", "");
        row(&mut s, "connects/s", c.id, &["connect_rate"], 1.0, 0, false);
        row(
            &mut s,
            "RSS per idle connection (KiB)",
            c.id,
            &["broker", "rss_per_conn_bytes"],
            1024.0,
            2,
            true,
        );
    }
    let _ = writeln!(s, "\n## Loss, CPU and the generator's share\n");
    let _ = writeln!(
        s,
        "Medians per run. `lost` counts deliveries that never arrived before the drain ended (QoS 0 may drop by design; QoS 1 must not). The generator's CPU next to the broker's shows which one was the limit.\n"
    );
    let _ = writeln!(
        s,
        "| case | broker | lost | duplicates | errors | broker CPU % | generator CPU % | broker max RSS MiB |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        for &b in brokers {
            let Some(cl) = results.get(&(c.id, b)) else {
                continue;
            };
            if cl.runs.is_empty() {
                let why = cl.errors.first().map_or("", String::as_str);
                let why: String = why.chars().take(120).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | failed: {} | | | | | |",
                    c.title,
                    b.name(),
                    why.replace('|', "/")
                );
                continue;
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                c.title,
                b.name(),
                fmt_num(cl.median(&["lost"]), 1.0, 0),
                fmt_num(cl.median(&["duplicates"]), 1.0, 0),
                fmt_num(cl.median(&["errors"]), 1.0, 0),
                fmt_num(cl.median(&["broker", "cpu_pct"]), 1.0, 0),
                fmt_num(cl.median(&["bench_cpu_pct"]), 1.0, 0),
                fmt_num(cl.median(&["broker", "rss_max_kib"]), 1024.0, 1),
            );
        }
    }
    s
}

fn chart(path: &Path, cases: &[&Case], brokers: &[BrokerKind], results: &Results) -> Result<()> {
    use plotters::prelude::*;
    let shown: Vec<&&Case> = cases
        .iter()
        .filter(|c| c.measure == Measure::Throughput)
        .collect();
    let value = |c: &Case, b: BrokerKind| {
        results
            .get(&(c.id, b))
            .and_then(|cell| cell.median(&["recv_rate"]))
            .unwrap_or(0.0)
            / 1000.0
    };
    let ymax = shown
        .iter()
        .flat_map(|c| brokers.iter().map(move |b| value(c, *b)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let n = shown.len().max(1) as f64;
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput at saturation (k deliveries/s, median)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(70)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, 0f64..ymax)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc("k msg/s")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let colors = [
        RGBColor(0xd9, 0x5f, 0x02),
        RGBColor(0x1b, 0x9e, 0x77),
        RGBColor(0x75, 0x70, 0xb3),
    ];
    let width = 0.8 / brokers.len().max(1) as f64;
    for (bi, &b) in brokers.iter().enumerate() {
        let color = colors[bi % colors.len()];
        chart
            .draw_series(shown.iter().enumerate().map(|(ci, c)| {
                let x0 = ci as f64 + 0.1 + bi as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, value(c, b))], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(b.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (ci, c) in shown.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(ci as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            c.title.to_string(),
            (px - 70, py + 12),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn options_parse_and_reject() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Options::parse(&args(&["--duration-secs", "3", "--reps", "1"])).expect("valid");
        assert_eq!((o.duration_secs, o.reps), (3, 1));
        assert_eq!(o.brokers.len(), 3);
        assert!(Options::parse(&args(&["--reps", "0"])).is_err());
        assert!(Options::parse(&args(&["--brokers", "emqx"])).is_err());
        assert!(Options::parse(&args(&["--duration-secs"])).is_err());
    }

    #[test]
    fn matrix_has_the_issue_cases() {
        let ids: Vec<&str> = cases(10).iter().map(|c| c.id).collect();
        for id in [
            "fan-in-q0",
            "fan-in-q1",
            "fan-in-q1-4k",
            "fan-out-q0",
            "fan-out-q1",
            "pairs-q1",
            "pairs-q1-5k",
            "conn-storm",
        ] {
            assert!(ids.contains(&id), "{id}");
        }
    }
}
