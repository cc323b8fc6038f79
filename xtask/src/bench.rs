//! `cargo xtask bench broker`: the broker benchmark matrix.
//!
//! Builds `mqttd` and `mqttd-bench` in release, then for every case of the matrix and every
//! repetition starts each contender's broker fresh on free loopback ports, runs
//! `mqttd-bench --json --broker-pid` against it, and stops it. Contenders alternate within a case
//! and their order rotates between repetitions, so slow drift of the machine does not favour one.
//!
//! The matrix has three groups, each with its own contenders, ratios and files in
//! `bench/results/` (`--only` picks groups; a group not run keeps its files):
//! - `broker` (`broker-matrix.*`): mqttd against mosquitto (Debian) and rumqttd (the crates
//!   registry, pinned, installed into `target/peers`), all over TCP without persistence;
//! - `quic` (`quic-matrix.*`): MQTT over QUIC, single-stream mode: mqttd over QUIC against
//!   mqttd over TCP, and against LabOverWire's quinn-based broker (`mqttv5-cli`, pinned,
//!   installed into `target/peers`) over QUIC (and its TCP for reference); handshake time to
//!   CONNACK and memory per idle QUIC client;
//! - `storage` (`storage-matrix.*`): mqttd with durable storage (redb, `durability = "sync"`)
//!   against `--storage memory` and mosquitto, with persistent sessions.
//!
//! Each group writes a Markdown table of medians with ratios (`.md`), every raw summary
//! (`.jsonl`) and a throughput chart (`.svg`).
//!
//! Configs are equivalent where the brokers allow: loopback only, anonymous, no persistence
//! (except the storage group's durable mqttd), no logging beyond warnings, 1024 inflight QoS 1/2
//! messages per client, 10^6 queued messages per client (so none drops by queue limit), no
//! connection throttling. TCP_NODELAY stays each broker's default (mqttd sets it; mosquitto and
//! rumqttd leave Nagle on, and mosquitto measured slightly faster that way here).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::sources;

/// The rumqttd release the matrix compares against.
const RUMQTTD_VERSION: &str = "0.20.0";
/// The mqttv5-cli release (LabOverWire's broker, the QUIC peer) the matrix compares against.
const MQTTV5_VERSION: &str = "0.29.10";
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Client UDP sockets `mqttd-bench` spreads its QUIC connections over. Measured against mqttd
/// (3 runs of 3 s each, alternating, on the shared 2-CPU machine; medians): 8 pairs QoS 1 made
/// 110k deliveries/s over 1 socket, 163k over 4 and 155k over 16; fan-in 4→1 QoS 1 181k, 170k
/// and 207k (within the noise). One socket's receive task is the limit with 16 clients; a few
/// suffice.
const QUIC_ENDPOINTS: &str = "4";
const USAGE: &str = "usage: cargo xtask bench broker [--duration-secs N] [--reps N] \
                     [--only broker,quic,storage] [--brokers mqttd,mosquitto,rumqttd,mqttv5] \
                     [--cases ID,...] [--mqttd-threads 1|2|4] [--out DIR]\n       \
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

/// The groups of the matrix, by `--only` name.
const GROUPS: [&str; 3] = ["broker", "quic", "storage"];

#[derive(Debug)]
struct Options {
    duration_secs: u64,
    reps: usize,
    brokers: Vec<BrokerKind>,
    only: Vec<&'static str>,
    cases: Option<Vec<String>>,
    /// Also run mqttd with this many worker threads, as one more contender of the broker
    /// group (`--mqttd-threads`), next to mqttd with its default.
    mqttd_threads: Option<usize>,
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
                BrokerKind::Mqttv5,
            ],
            only: GROUPS.to_vec(),
            cases: None,
            mqttd_threads: None,
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
                "--only" => {
                    o.only = value()?
                        .split(',')
                        .map(|g| {
                            GROUPS.iter().copied().find(|x| *x == g).with_context(|| {
                                format!("unknown group `{g}` (broker, quic, storage)")
                            })
                        })
                        .collect::<Result<_>>()?;
                }
                "--cases" => {
                    o.cases = Some(value()?.split(',').map(str::to_string).collect());
                }
                "--mqttd-threads" => {
                    let n = value()?
                        .parse()
                        .context("--mqttd-threads takes a thread count")?;
                    threads_label(n)?;
                    o.mqttd_threads = Some(n);
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
    /// LabOverWire's `mqttv5 broker` (quinn-based QUIC).
    Mqttv5,
}

impl BrokerKind {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "mqttd" => Self::Mqttd,
            "mosquitto" => Self::Mosquitto,
            "rumqttd" => Self::Rumqttd,
            "mqttv5" => Self::Mqttv5,
            other => bail!("unknown broker `{other}` (mqttd, mosquitto, rumqttd, mqttv5)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Mqttd => "mqttd",
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
            Self::Mqttv5 => "mqttv5",
        }
    }
}

/// How the load generator reaches a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Tcp,
    /// MQTT over QUIC, single-stream mode.
    Quic,
}

/// mqttd's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// `--storage memory`.
    Memory,
    /// redb in the data directory with `durability = "sync"` (the default).
    Sync,
}

/// One column of a group: a broker, reached over a wire, with a storage setting.
#[derive(Debug, Clone, Copy)]
struct Contender {
    label: &'static str,
    broker: BrokerKind,
    wire: Wire,
    storage: Storage,
    /// mqttd's `--worker-threads`; `None`: its default.
    threads: Option<usize>,
}

const fn contender(label: &'static str, broker: BrokerKind, wire: Wire) -> Contender {
    Contender {
        label,
        broker,
        wire,
        storage: Storage::Memory,
        threads: None,
    }
}

/// The column label of mqttd run with `n` worker threads (`--mqttd-threads`).
fn threads_label(n: usize) -> Result<&'static str> {
    Ok(match n {
        1 => "mqttd 1 thread",
        2 => "mqttd 2 threads",
        4 => "mqttd 4 threads",
        _ => bail!("--mqttd-threads takes 1, 2 or 4"),
    })
}

/// What a case is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// Deliveries per second at saturation (and p99 latency there).
    Throughput,
    /// Latency at a fixed rate.
    Latency,
    /// Connects per second, time to CONNACK and memory per idle connection.
    Connections,
}

struct Case {
    id: &'static str,
    title: &'static str,
    measure: Measure,
    args: Vec<String>,
    /// QUIC contenders make a full handshake per client (a fresh TLS context each).
    full_handshake: bool,
}

/// A part of the matrix with its own contenders, ratios and result files.
struct Group {
    id: &'static str,
    /// File name stem in the output directory.
    stem: &'static str,
    title: &'static str,
    /// What the reader needs to know about configs and targets.
    notes: &'static [&'static str],
    contenders: Vec<Contender>,
    /// Ratio columns: (a, b) shows a / b for throughput (b / a where lower is better), so
    /// above 1 always favours a.
    ratios: Vec<(&'static str, &'static str)>,
    cases: Vec<Case>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn groups(duration: u64) -> Vec<Group> {
    let d = duration.to_string();
    let msgs = |scenario: &str, size: &str, extra: &[&str]| -> Vec<String> {
        let mut v = strings(&[scenario, "--mqtt", "3.1.1", "-s", size, "-w", "64"]);
        v.extend(strings(extra));
        v.extend(["-d".to_string(), d.clone(), "--drain".into(), "3".into()]);
        v
    };
    let case = |id, title, measure, args| Case {
        id,
        title,
        measure,
        args,
        full_handshake: false,
    };
    use BrokerKind::*;
    use Measure::*;
    let mqttd_sync = Contender {
        storage: Storage::Sync,
        ..contender("mqttd sync", Mqttd, Wire::Tcp)
    };
    vec![
        Group {
            id: "broker",
            stem: "broker-matrix",
            title: "Broker benchmark matrix",
            notes: &[
                "Configs: loopback, anonymous, no persistence (mqttd `--storage memory`), 1024 inflight and 10^6 queued messages per client, no connect throttling, TCP_NODELAY as each broker's default. mqttd runs its default runtime (one worker thread per CPU); `--mqttd-threads N` adds a column `mqttd N thread(s)` with `--worker-threads N`.",
            ],
            contenders: vec![
                contender("mqttd", Mqttd, Wire::Tcp),
                contender("mosquitto", Mosquitto, Wire::Tcp),
                contender("rumqttd", Rumqttd, Wire::Tcp),
            ],
            ratios: vec![("mqttd", "mosquitto"), ("mqttd", "rumqttd")],
            cases: vec![
                case(
                    "fan-in-q0",
                    "fan-in 4→1, QoS 0",
                    Throughput,
                    msgs("fan-in", "64", &["--publishers", "4", "-q", "0"]),
                ),
                case(
                    "fan-in-q1",
                    "fan-in 4→1, QoS 1",
                    Throughput,
                    msgs("fan-in", "64", &["--publishers", "4", "-q", "1"]),
                ),
                case(
                    "fan-in-q1-4k",
                    "fan-in 4→1, QoS 1, 4 KiB",
                    Throughput,
                    msgs("fan-in", "4096", &["--publishers", "4", "-q", "1"]),
                ),
                case(
                    "fan-out-q0",
                    "fan-out 1→4, QoS 0",
                    Throughput,
                    msgs("fan-out", "64", &["--subscribers", "4", "-q", "0"]),
                ),
                case(
                    "fan-out-q1",
                    "fan-out 1→4, QoS 1",
                    Throughput,
                    msgs("fan-out", "64", &["--subscribers", "4", "-q", "1"]),
                ),
                case(
                    "pairs-q1",
                    "8 pairs, QoS 1",
                    Throughput,
                    msgs("pairs", "64", &["--pairs", "8", "-q", "1"]),
                ),
                case(
                    "pairs-q1-5k",
                    "8 pairs, QoS 1, fixed 5k msg/s total",
                    Latency,
                    msgs("pairs", "64", &["--pairs", "8", "-q", "1", "-r", "625"]),
                ),
                case(
                    "conn-storm",
                    "connection storm, 2,000 clients",
                    Connections,
                    strings(&["conn-storm", "--mqtt", "3.1.1", "-c", "2000", "-d", "2"]),
                ),
            ],
        },
        Group {
            id: "quic",
            stem: "quic-matrix",
            title: "MQTT over QUIC benchmark matrix",
            notes: &[
                "MQTT over QUIC in single-stream mode (the first bidirectional stream carries MQTT), ALPN `mqtt`, TLS 1.3; `mqttd-bench --transport quic --insecure --quic-endpoints 4` (connections spread over 4 client UDP sockets; the certificate is not verified).",
                "mqttd: one broker config for its TCP and QUIC columns (QUIC listener on, `--storage memory`, 1024 inflight, 10^6 queued). mqttv5: LabOverWire's quinn-based broker from `mqttv5-cli`, `--quic-delivery-strategy control-only --storage-backend memory --no-persistence`, a self-signed certificate made by the xtask; its other settings are its defaults (64 outbound inflight per client).",
                "Targets (issue 9): mqttd QUIC >= 0.7x mqttd TCP (aim 1.0x); mqttd QUIC >= 1.5x mqttv5 QUIC; RSS per idle QUIC client < 64 KiB.",
                "Handshake: 200 clients one after another, each a full handshake with a fresh TLS context (no resumption); the time from the client's first packet (QUIC Initial, TCP SYN) to CONNACK, in ms on loopback. The 2,000-client case shares one TLS context, so clients resume sessions when a ticket is at hand; RSS per idle connection is the broker's RSS growth divided by the clients.",
            ],
            contenders: vec![
                contender("mqttd QUIC", Mqttd, Wire::Quic),
                contender("mqttd TCP", Mqttd, Wire::Tcp),
                contender("mqttv5 QUIC", Mqttv5, Wire::Quic),
                contender("mqttv5 TCP", Mqttv5, Wire::Tcp),
            ],
            ratios: vec![
                ("mqttd QUIC", "mqttd TCP"),
                ("mqttd QUIC", "mqttv5 QUIC"),
                ("mqttv5 QUIC", "mqttv5 TCP"),
            ],
            cases: vec![
                case(
                    "quic-fan-in-q1",
                    "fan-in 4→1, QoS 1",
                    Throughput,
                    msgs("fan-in", "64", &["--publishers", "4", "-q", "1"]),
                ),
                case(
                    "quic-pairs-q1",
                    "8 pairs, QoS 1",
                    Throughput,
                    msgs("pairs", "64", &["--pairs", "8", "-q", "1"]),
                ),
                Case {
                    full_handshake: true,
                    ..case(
                        "quic-handshake",
                        "handshake, 200 fresh clients one at a time",
                        Connections,
                        strings(&[
                            "conn",
                            "--mqtt",
                            "3.1.1",
                            "-c",
                            "200",
                            "--connect-concurrency",
                            "1",
                            "-d",
                            "1",
                        ]),
                    )
                },
                case(
                    "quic-idle",
                    "2,000 concurrent idle clients",
                    Connections,
                    strings(&["conn-storm", "--mqtt", "3.1.1", "-c", "2000", "-d", "2"]),
                ),
            ],
        },
        Group {
            id: "storage",
            stem: "storage-matrix",
            title: "Durable storage benchmark matrix",
            notes: &[
                "mqttd sync: the default storage, redb in a fresh data directory per run with `durability = \"sync\"` (every acknowledged change is committed and fsynced before its PUBACK/SUBACK/CONNACK; group commit). mqttd memory: `--storage memory`. mosquitto: `persistence false` (it acknowledges before anything is on disk in every setting).",
                "Every client has a persistent session (`mqttd-bench --persistent`: clean session 0), so each QoS 1 message is stored for the subscriber's session before the publisher's PUBACK.",
                "Targets (issue 10): mqttd sync >= 0.5x mqttd memory throughput and >= 1.0x mosquitto.",
            ],
            contenders: vec![
                mqttd_sync,
                contender("mqttd memory", Mqttd, Wire::Tcp),
                contender("mosquitto", Mosquitto, Wire::Tcp),
            ],
            ratios: vec![("mqttd sync", "mqttd memory"), ("mqttd sync", "mosquitto")],
            cases: vec![
                case(
                    "storage-fan-in-q1",
                    "fan-in 4→1, QoS 1, persistent sessions",
                    Throughput,
                    msgs(
                        "fan-in",
                        "64",
                        &["--publishers", "4", "-q", "1", "--persistent"],
                    ),
                ),
                case(
                    "storage-pairs-q1",
                    "8 pairs, QoS 1, persistent sessions",
                    Throughput,
                    msgs("pairs", "64", &["--pairs", "8", "-q", "1", "--persistent"]),
                ),
            ],
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

/// A peer broker from the crates registry at a pinned version, installed once into
/// `target/peers`; the string says how (or why not).
fn install_peer(
    root: &Path,
    krate: &str,
    version: &str,
    bin_name: &str,
    extra: &[&str],
    why_unlocked: &str,
) -> (Peer, String) {
    let peers = root.join("target/peers");
    let bin = peers.join("bin").join(bin_name);
    let stamp = peers.join(format!("{krate}-{version}.installed"));
    if bin.exists()
        && let Ok(how) = fs::read_to_string(&stamp)
    {
        return (Peer::Ready(bin), how.trim().to_string());
    }
    if bin.exists() {
        // Installed by hand (or by an older xtask): `cargo install` would only say so.
        let how = format!(
            "a {bin_name} binary found in target/peers without an install record (reports `{}`)",
            version_of(&bin.to_string_lossy(), &["--version"])
        );
        return (Peer::Ready(bin), how);
    }
    let spec = format!("{krate}@{version}");
    let peers_s = peers.to_string_lossy().to_string();
    let mut base = vec!["install", spec.as_str(), "--root", peers_s.as_str()];
    base.extend_from_slice(extra);
    let shown_extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" {}", extra.join(" "))
    };
    eprintln!("xtask: installing {spec} into target/peers (once)");
    let mut with_lock = base.clone();
    with_lock.insert(1, "--locked");
    let how = if cargo(root, &with_lock).is_ok() {
        format!("`cargo install --locked {spec}{shown_extra}`")
    } else {
        eprintln!("xtask: `cargo install --locked {spec}` failed; retrying without --locked");
        if let Err(e) = cargo(root, &base) {
            let why = format!(
                "`cargo install {spec}{shown_extra}` failed here ({e:#}); install it by hand \
                 into target/peers or leave it out with --brokers"
            );
            return (Peer::Unavailable(why.clone()), why);
        }
        format!("`cargo install {spec}{shown_extra}` without `--locked` ({why_unlocked})")
    };
    let _ = fs::write(&stamp, format!("{how}\n"));
    if bin.exists() {
        (Peer::Ready(bin), how)
    } else {
        let why = format!("{spec} installed no bin/{bin_name}");
        (Peer::Unavailable(why.clone()), why)
    }
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("cannot bind a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0").context("cannot bind a free loopback UDP port")?;
    Ok(s.local_addr()?.port())
}

/// A running broker, killed on drop.
struct Running {
    child: Child,
    /// MQTT over TCP.
    port: u16,
    /// MQTT over QUIC (UDP), when the broker serves it.
    udp: Option<u16>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The self-signed certificate and key (PEM files) the QUIC peer broker serves.
fn peer_certificate(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert = work.join("peer-quic-cert.pem");
    let key = work.join("peer-quic-key.pem");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot generate a self-signed certificate")?;
    fs::write(&cert, made.cert.pem())?;
    fs::write(&key, made.key_pair.serialize_pem())?;
    Ok((cert, key))
}

fn start_broker(
    who: &Contender,
    bin: &Path,
    work: &Path,
    tag: &str,
    peer_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<Running> {
    let port = free_port()?;
    let log_path = work.join(format!("{tag}.log"));
    let log = fs::File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    let mut udp = None;
    match who.broker {
        BrokerKind::Mqttd => {
            let quic_port = free_udp_port()?;
            udp = Some(quic_port);
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--quic-listen", &format!("127.0.0.1:{quic_port}")])
                .args([
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
            if let Some(n) = who.threads {
                cmd.args(["--worker-threads", &n.to_string()]);
            }
            match who.storage {
                // The same as mosquitto's `persistence false` and rumqttd.
                Storage::Memory => cmd.args(["--storage", "memory"]),
                Storage::Sync => cmd.args(["--storage", "redb", "--durability", "sync"]),
            };
            // A fresh directory per run (the redb file, the generated QUIC certificate), never
            // the working directory.
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
        BrokerKind::Mqttv5 => {
            let (cert, key) = peer_cert.context("the QUIC peer needs a certificate")?;
            let quic_port = free_udp_port()?;
            udp = Some(quic_port);
            let storage = work.join(format!("{tag}.mqttv5-storage"));
            let _ = fs::remove_dir_all(&storage);
            cmd.args(["broker", "--host", &format!("127.0.0.1:{port}")])
                .args(["--quic-host", &format!("127.0.0.1:{quic_port}")])
                // With a certificate it also serves MQTT over TLS: on another free port, not
                // its default 0.0.0.0:8883.
                .args(["--tls-host", &format!("127.0.0.1:{}", free_port()?)])
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key)
                .args([
                    "--quic-delivery-strategy",
                    "control-only",
                    "--allow-anonymous",
                    "true",
                    "--no-persistence",
                    "--storage-backend",
                    "memory",
                    "--no-sys-topics",
                    "--non-interactive",
                    "--max-clients",
                    "1000000",
                ])
                .arg("--storage-dir")
                .arg(storage);
        }
    }
    let child = cmd
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut running = Running { child, port, udp };
    let until = Instant::now() + Duration::from_secs(15);
    let quic_ready = |r: &Running| -> bool {
        match (who.wire, who.broker, r.udp) {
            (Wire::Tcp, _, _) => true,
            // mqttd prints its QUIC address once the listener is bound.
            (Wire::Quic, BrokerKind::Mqttd, _) => {
                fs::read_to_string(&log_path).is_ok_and(|l| l.contains("over QUIC on quic://"))
            }
            // Bound by the broker when we cannot bind it.
            (Wire::Quic, _, Some(p)) => UdpSocket::bind(("127.0.0.1", p)).is_err(),
            (Wire::Quic, _, None) => false,
        }
    };
    while TcpStream::connect(("127.0.0.1", port)).is_err() || !quic_ready(&running) {
        if let Some(status) = running.child.try_wait()? {
            bail!(
                "{} exited at start ({status}); see {}",
                who.label,
                log_path.display()
            );
        }
        if Instant::now() > until {
            bail!(
                "{} did not listen on port {port} within 15 s; see {}",
                who.label,
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(running)
}

/// Runs `mqttd-bench` once against `broker`; returns its summary object.
fn run_bench(
    bench: &Path,
    case: &Case,
    who: &Contender,
    broker: &Running,
    limit: Duration,
) -> Result<Value> {
    let mut cmd = Command::new(bench);
    cmd.args(&case.args);
    let port = match (who.wire, broker.udp) {
        (Wire::Tcp, _) => broker.port,
        (Wire::Quic, Some(udp)) => {
            cmd.args([
                "--transport",
                "quic",
                "--insecure",
                "--quic-endpoints",
                QUIC_ENDPOINTS,
            ]);
            if case.full_handshake {
                cmd.arg("--quic-full-handshake");
            }
            udp
        }
        (Wire::Quic, None) => bail!("{} serves no QUIC", who.label),
    };
    let mut child = cmd
        .args(["-p", &port.to_string(), "--json", "--interval-ms", "60000"])
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

type Results = BTreeMap<(&'static str, &'static str), Cell>;

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

/// Facts about the run for the reports' headers.
struct Environment {
    root: PathBuf,
    how: BTreeMap<BrokerKind, String>,
    load_before: String,
    load_after: String,
    uptime_before: String,
    uptime_after: String,
    took: Duration,
}

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
    let mut all = groups(o.duration_secs);
    let known: Vec<&'static str> = all
        .iter()
        .flat_map(|g| g.cases.iter().map(|c| c.id))
        .collect();
    if let Some(ids) = &o.cases
        && let Some(bad) = ids.iter().find(|i| !known.contains(&i.as_str()))
    {
        bail!("no case `{bad}`; the cases are {}", known.join(", "));
    }
    // The selected groups, contenders (by --brokers) and cases.
    all.retain(|g| o.only.contains(&g.id));
    if let Some(n) = o.mqttd_threads
        && let Some(g) = all.iter_mut().find(|g| g.id == "broker")
    {
        let label = threads_label(n)?;
        let at = g
            .contenders
            .iter()
            .position(|c| c.label == "mqttd")
            .map_or(0, |i| i + 1);
        g.contenders.insert(
            at,
            Contender {
                threads: Some(n),
                ..contender(label, BrokerKind::Mqttd, Wire::Tcp)
            },
        );
        g.ratios.insert(1, (label, "mosquitto"));
    }
    for g in &mut all {
        g.contenders.retain(|c| o.brokers.contains(&c.broker));
        g.cases.retain(|c| {
            o.cases
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|i| i == c.id))
        });
    }
    all.retain(|g| !g.cases.is_empty() && !g.contenders.is_empty());
    if all.is_empty() {
        bail!("nothing to run: no selected group has a selected case and broker");
    }
    let needed: Vec<BrokerKind> = {
        let mut v: Vec<BrokerKind> = all
            .iter()
            .flat_map(|g| g.contenders.iter().map(|c| c.broker))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let mut peers: BTreeMap<BrokerKind, Peer> = BTreeMap::new();
    let mut how: BTreeMap<BrokerKind, String> = BTreeMap::new();
    for kind in needed {
        let peer = match kind {
            BrokerKind::Mqttd => Peer::Ready(release.join("mqttd")),
            BrokerKind::Mosquitto if Path::new(MOSQUITTO).exists() => {
                Peer::Ready(PathBuf::from(MOSQUITTO))
            }
            BrokerKind::Mosquitto => {
                Peer::Unavailable(format!("{MOSQUITTO} missing (apt-get install mosquitto)"))
            }
            BrokerKind::Rumqttd => {
                // TCP only: the TLS and WebSocket features are not benchmarked. rumqttd
                // 0.20.0's lock file pins metrics 0.22.1, which rustc 1.95 rejects (E0521).
                let (peer, h) = install_peer(
                    root,
                    "rumqttd",
                    RUMQTTD_VERSION,
                    "rumqttd",
                    &["--no-default-features"],
                    "its lock file's metrics 0.22.1 does not build on this rustc",
                );
                how.insert(kind, h);
                peer
            }
            BrokerKind::Mqttv5 => {
                let (peer, h) = install_peer(
                    root,
                    "mqttv5-cli",
                    MQTTV5_VERSION,
                    "mqttv5",
                    &[],
                    "its lock file pins a webpki-roots release the registry here does not have",
                );
                how.insert(kind, h);
                peer
            }
        };
        if let Peer::Unavailable(why) = &peer {
            eprintln!("xtask: {} unavailable: {why}", kind.name());
        }
        peers.insert(kind, peer);
    }
    let out_dir = root.join(&o.out);
    fs::create_dir_all(&out_dir)?;
    let work = root.join("target/bench-work");
    fs::create_dir_all(&work)?;
    let peer_cert = if matches!(peers.get(&BrokerKind::Mqttv5), Some(Peer::Ready(_))) {
        Some(peer_certificate(&work)?)
    } else {
        None
    };
    let limit = Duration::from_secs(o.duration_secs + 60);
    for group in &all {
        let group_started = Instant::now();
        let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let uptime_before = version_of("uptime", &[]);
        let mut results = Results::new();
        let mut raw = String::new();
        let ready: Vec<(Contender, PathBuf)> = group
            .contenders
            .iter()
            .filter_map(|c| match peers.get(&c.broker) {
                Some(Peer::Ready(p)) => Some((*c, p.clone())),
                _ => None,
            })
            .collect();
        for rep in 0..o.reps {
            for (ci, case) in group.cases.iter().enumerate() {
                // Rotate the order so no contender always runs first (or after a given other).
                let mut order = ready.clone();
                if !order.is_empty() {
                    let by = (rep + ci) % order.len();
                    order.rotate_left(by);
                }
                for (who, bin) in order {
                    let tag = format!("{}-{}-{rep}", case.id, who.label.replace(' ', "-"));
                    let cell = results.entry((case.id, who.label)).or_default();
                    let outcome = start_broker(&who, &bin, &work, &tag, peer_cert.as_ref())
                        .and_then(|b| run_bench(&bench, case, &who, &b, limit));
                    match outcome {
                        Ok(summary) => {
                            eprintln!(
                                "xtask: {tag}: {:.0} msg/s, p99 {} us, {:.0} conn/s, CONNACK p50 {} us, lost {}, errors {}",
                                f(&summary, &["recv_rate"]).unwrap_or(0.0),
                                f(&summary, &["latency_us", "p99"]).unwrap_or(0.0),
                                f(&summary, &["connect_rate"]).unwrap_or(0.0),
                                f(&summary, &["connect_latency_us", "p50"]).unwrap_or(0.0),
                                f(&summary, &["lost"]).unwrap_or(0.0),
                                f(&summary, &["errors"]).unwrap_or(0.0),
                            );
                            let _ = writeln!(
                                raw,
                                "{}",
                                serde_json::json!({"case": case.id, "broker": who.label, "rep": rep, "summary": summary})
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
            how: how.clone(),
            load_before,
            load_after: fs::read_to_string("/proc/loadavg").unwrap_or_default(),
            uptime_before,
            uptime_after: version_of("uptime", &[]),
            took: group_started.elapsed(),
        };
        let md = markdown(o, group, &peers, &results, &env);
        fs::write(out_dir.join(format!("{}.md", group.stem)), md)?;
        fs::write(out_dir.join(format!("{}.jsonl", group.stem)), raw)?;
        chart(
            &out_dir.join(format!("{}.svg", group.stem)),
            group,
            &results,
        )?;
        eprintln!(
            "xtask: wrote {}/{}.{{md,jsonl,svg}} in {:.0}s",
            o.out.display(),
            group.stem,
            group_started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "xtask: the matrix took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn markdown(
    o: &Options,
    group: &Group,
    peers: &BTreeMap<BrokerKind, Peer>,
    results: &Results,
    env: &Environment,
) -> String {
    let cols = &group.contenders;
    let mut s = String::new();
    let _ = writeln!(s, "# {}\n", group.title);
    let _ = writeln!(
        s,
        "Produced by `{}` (this group: {:.0} s).\n",
        o.command_line,
        env.took.as_secs_f64()
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
        "- Machine: {cpus} CPUs shared by the brokers and the load generator (loopback), Linux {kernel}; other work (builds) may run on it too."
    );
    let loadavg = |l: &str| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        s,
        "- Load average (1/5/15 min) before: {}; after: {}. `uptime` before: `{}`; after: `{}` (other work on the machine skews absolute numbers; the alternating order spreads it over the contenders).",
        loadavg(&env.load_before),
        loadavg(&env.load_after),
        env.uptime_before,
        env.uptime_after
    );
    let mut versions = vec![format!("mqttd at {rev}")];
    let in_group = |k: BrokerKind| cols.iter().any(|c| c.broker == k);
    if in_group(BrokerKind::Mosquitto) {
        versions.push(version_of(MOSQUITTO, &["-h"]));
    }
    if in_group(BrokerKind::Rumqttd) {
        versions.push(format!(
            "rumqttd {RUMQTTD_VERSION} from the crates registry, TCP only, installed with {}",
            env.how
                .get(&BrokerKind::Rumqttd)
                .map_or("—", String::as_str)
        ));
    }
    if in_group(BrokerKind::Mqttv5) {
        versions.push(format!(
            "mqttv5-cli {MQTTV5_VERSION} (LabOverWire, quinn) from the crates registry, installed with {}",
            env.how.get(&BrokerKind::Mqttv5).map_or("—", String::as_str)
        ));
    }
    let _ = writeln!(s, "- {}.", versions.join("; "));
    let _ = writeln!(
        s,
        "- Load: `mqttd-bench` (release), MQTT 3.1.1, 64 B payloads unless noted, {} s of publishing per run, inflight window 64; each cell is the median of {} run(s); a fresh broker per run, contenders alternating. Raw summaries: `{}.jsonl`; chart: `{}.svg`.",
        o.duration_secs, o.reps, group.stem, group.stem
    );
    for note in group.notes {
        let _ = writeln!(s, "- {note}");
    }
    s.push('\n');
    for (kind, peer) in peers {
        if let Peer::Unavailable(why) = peer
            && in_group(*kind)
        {
            let _ = writeln!(s, "**{} not measured**: {why}\n", kind.name());
        }
    }
    let header = |s: &mut String, first: &str, unit: &str| {
        let _ = write!(s, "| {first} |");
        for c in cols {
            let _ = write!(s, " {}{unit} |", c.label);
        }
        for (a, b) in &group.ratios {
            let _ = write!(s, " {a} vs {b} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in 0..cols.len() + group.ratios.len() {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
    };
    // One table row: the median of `path` per contender, scaled, then the ratios
    // (`lower_is_better` turns a / b into b / a so that above 1 always favours a).
    let row = |s: &mut String,
               label: &str,
               id: &'static str,
               path: &[&str],
               scale: f64,
               digits: usize,
               lower_is_better: bool| {
        let value = |l: &str| {
            results
                .get(&(id, l))
                .and_then(|c| c.median(path))
                .filter(|v| v.is_finite())
        };
        let _ = write!(s, "| {label} |");
        for c in cols {
            let shown = match (value(c.label), results.get(&(id, c.label))) {
                (Some(v), _) => fmt_num(Some(v), scale, digits),
                (None, Some(cell)) if !cell.errors.is_empty() => "failed".to_string(),
                _ => "—".to_string(),
            };
            let _ = write!(s, " {shown} |");
        }
        for (a, b) in &group.ratios {
            let r = if lower_is_better {
                ratio(value(b), value(a))
            } else {
                ratio(value(a), value(b))
            };
            let _ = write!(s, " {r} |");
        }
        s.push('\n');
    };
    let ratio_note = "Ratio columns `A vs B` are A / B for throughput and B / A for latency, CPU per connect and memory: above 1 always favours A.";

    if group.cases.iter().any(|c| c.measure == Measure::Throughput) {
        let _ = writeln!(
            s,
            "## Throughput at saturation (deliveries received per second)\n"
        );
        let _ = writeln!(s, "{ratio_note}\n");
        header(&mut s, "case", " k msg/s");
        for c in group
            .cases
            .iter()
            .filter(|c| c.measure == Measure::Throughput)
        {
            row(&mut s, c.title, c.id, &["recv_rate"], 1000.0, 1, false);
        }
    }
    let timed: Vec<&Case> = group
        .cases
        .iter()
        .filter(|c| c.measure != Measure::Connections)
        .filter(|c| !c.args.windows(2).any(|w| w[0] == "-q" && w[1] == "0"))
        .collect();
    if !timed.is_empty() {
        let _ = writeln!(
            s,
            "\n## Latency (end to end, publisher to subscriber, ms)\n"
        );
        let _ = writeln!(
            s,
            "p99 at saturation for the QoS 1 cases above; p50/p99/p99.9 at a fixed rate. {ratio_note}\n"
        );
        header(&mut s, "case", " ms");
        for c in timed {
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
    }
    let conns: Vec<&Case> = group
        .cases
        .iter()
        .filter(|c| c.measure == Measure::Connections)
        .collect();
    if !conns.is_empty() {
        let _ = writeln!(s, "\n## Connections\n");
        let _ = writeln!(
            s,
            "Time to CONNACK: from the client's first packet (TCP SYN, QUIC Initial) to CONNACK. {ratio_note}\n"
        );
        header(&mut s, "metric", "");
        for c in conns {
            let t = c.title;
            // With a fresh TLS context per client the connect rate measures how fast the
            // generator builds contexts, not the broker.
            if !c.full_handshake {
                row(
                    &mut s,
                    &format!("{t} — connects/s"),
                    c.id,
                    &["connect_rate"],
                    1.0,
                    0,
                    false,
                );
            }
            for (label, key) in [("p50", "p50"), ("p99", "p99")] {
                row(
                    &mut s,
                    &format!("{t} — time to CONNACK {label} (ms)"),
                    c.id,
                    &["connect_latency_us", key],
                    1000.0,
                    2,
                    true,
                );
            }
            if !c.full_handshake {
                // What the broker spends per connect, independent of how fast the generator
                // (on the same two cores) can go: the generator-proof comparison.
                row(
                    &mut s,
                    &format!("{t} — broker CPU per connect (µs)"),
                    c.id,
                    &["broker_cpu_us_per_connect"],
                    1.0,
                    1,
                    true,
                );
                row(
                    &mut s,
                    &format!("{t} — generator CPU per connect (µs)"),
                    c.id,
                    &["bench_cpu_us_per_connect"],
                    1.0,
                    1,
                    true,
                );
            }
            row(
                &mut s,
                &format!("{t} — broker RSS per idle connection (KiB)"),
                c.id,
                &["broker", "rss_per_conn_bytes"],
                1024.0,
                2,
                true,
            );
        }
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
    for c in &group.cases {
        for who in cols {
            let Some(cl) = results.get(&(c.id, who.label)) else {
                continue;
            };
            if cl.runs.is_empty() {
                let why = cl.errors.first().map_or("", String::as_str);
                let why: String = why.chars().take(160).collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | failed: {} | | | | | |",
                    c.title,
                    who.label,
                    why.replace('|', "/").replace('\n', " ")
                );
                continue;
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                c.title,
                who.label,
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

fn chart(path: &Path, group: &Group, results: &Results) -> Result<()> {
    use plotters::prelude::*;
    let shown: Vec<&Case> = group
        .cases
        .iter()
        .filter(|c| c.measure == Measure::Throughput)
        .collect();
    let cols = &group.contenders;
    let value = |c: &Case, label: &'static str| {
        results
            .get(&(c.id, label))
            .and_then(|cell| cell.median(&["recv_rate"]))
            .unwrap_or(0.0)
            / 1000.0
    };
    let ymax = shown
        .iter()
        .flat_map(|c| cols.iter().map(move |w| value(c, w.label)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let n = shown.len().max(1) as f64;
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: throughput at saturation (k deliveries/s, median)",
                group.title
            ),
            ("sans-serif", 20),
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
        RGBColor(0xe7, 0x29, 0x8a),
    ];
    let width = 0.8 / cols.len().max(1) as f64;
    for (bi, who) in cols.iter().enumerate() {
        let color = colors[bi % colors.len()];
        chart
            .draw_series(shown.iter().enumerate().map(|(ci, c)| {
                let x0 = ci as f64 + 0.1 + bi as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, value(c, who.label))],
                    color.filled(),
                )
            }))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(who.label)
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
        assert_eq!(o.brokers.len(), 4);
        assert_eq!(o.only, GROUPS.to_vec());
        let o = Options::parse(&args(&["--only", "quic,storage"])).expect("valid");
        assert_eq!(o.only, vec!["quic", "storage"]);
        assert!(Options::parse(&args(&["--only", "tls"])).is_err());
        assert!(Options::parse(&args(&["--reps", "0"])).is_err());
        assert!(Options::parse(&args(&["--brokers", "emqx"])).is_err());
        assert!(Options::parse(&args(&["--duration-secs"])).is_err());
    }

    #[test]
    fn matrix_has_the_issue_cases() {
        let all = groups(10);
        let ids: Vec<&str> = all
            .iter()
            .flat_map(|g| g.cases.iter().map(|c| c.id))
            .collect();
        for id in [
            "fan-in-q0",
            "fan-in-q1",
            "fan-in-q1-4k",
            "fan-out-q0",
            "fan-out-q1",
            "pairs-q1",
            "pairs-q1-5k",
            "conn-storm",
            "quic-fan-in-q1",
            "quic-pairs-q1",
            "quic-handshake",
            "quic-idle",
            "storage-fan-in-q1",
            "storage-pairs-q1",
        ] {
            assert!(ids.contains(&id), "{id}");
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "case ids are unique");
    }

    #[test]
    fn every_ratio_names_contenders_of_its_group() {
        for g in groups(10) {
            let labels: Vec<&str> = g.contenders.iter().map(|c| c.label).collect();
            for (a, b) in &g.ratios {
                assert!(
                    labels.contains(a) && labels.contains(b),
                    "{}: {a} / {b}",
                    g.id
                );
            }
            assert!(GROUPS.contains(&g.id));
        }
    }

    #[test]
    fn quic_cases_reach_quic_and_storage_cases_keep_sessions() {
        let all = groups(10);
        let quic = all.iter().find(|g| g.id == "quic").expect("quic group");
        assert!(quic.contenders.iter().any(|c| c.wire == Wire::Quic));
        let storage = all
            .iter()
            .find(|g| g.id == "storage")
            .expect("storage group");
        assert!(
            storage
                .contenders
                .iter()
                .any(|c| c.storage == Storage::Sync)
        );
        for c in &storage.cases {
            assert!(c.args.iter().any(|a| a == "--persistent"), "{}", c.id);
        }
    }
}
