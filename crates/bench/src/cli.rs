//! Command-line interface: subcommands `pub`, `sub`, `conn` and the scenario presets `fan-in`,
//! `fan-out`, `pairs` and `conn-storm`, each turned into a [`Plan`].

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mqttd_codec::{ProtocolVersion, QoS, Topic, TopicFilter};

use crate::plan::{Plan, PubSpec, SubSpec, Workload};

/// mqttd-bench: an MQTT load generator.
///
/// Measures throughput, end-to-end latency (from a timestamp in each payload), loss and
/// duplicates (from sequence numbers), connection rate, and with --broker-pid the broker's CPU
/// and memory. Every run stops by itself, after --duration or --count.
#[derive(Debug, Parser)]
#[command(name = "mqttd-bench", version, about)]
pub struct Cli {
    /// Worker threads of the generator [default: the number of CPUs].
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Run the subscribers on a runtime of their own with this many worker threads, apart
    /// from the publishers (as if they were another process): a delivery is then read when it
    /// arrives, not after the publisher tasks queued on the same worker ran, which otherwise
    /// adds the generator's own scheduling to the latency of a broker that answers quickly.
    /// 0 (the default): one runtime for all clients.
    #[arg(long, global = true, default_value_t = 0)]
    pub sub_threads: usize,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// A subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publishers only: CLIENTS clients publish to TOPIC.
    Pub(PubArgs),
    /// Subscribers only: CLIENTS clients subscribe to TOPIC and time what arrives.
    Sub(SubArgs),
    /// Idle connections: connect CLIENTS clients, hold them, disconnect.
    Conn(ConnArgs),
    /// Scenario: PUBLISHERS publishers, each on its own topic, to one wildcard subscriber.
    FanIn(FanInArgs),
    /// Scenario: one publisher to SUBSCRIBERS subscribers of its topic.
    FanOut(FanOutArgs),
    /// Scenario: PAIRS publisher/subscriber pairs, each pair on its own topic.
    Pairs(PairsArgs),
    /// Scenario: a connection storm (2,000 clients by default) with connects/s and broker RSS
    /// per idle connection.
    ConnStorm(ConnStormArgs),
    /// MQTT over QUIC through a lossy relay: bulk traffic on topic A, small probes on topic B;
    /// B's delivery latency in single-stream or multi-stream mode (head-of-line blocking).
    Hol(HolArgs),
}

/// `hol`.
#[derive(Debug, Clone, Args)]
pub struct HolArgs {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The broker's MQTT-over-QUIC port (UDP); the subscriber reaches it through the relay.
    #[arg(long, default_value_t = 14567)]
    pub quic_port: u16,
    /// The broker's MQTT-over-TCP port; the publishers use it directly.
    #[arg(short = 'p', long, default_value_t = 1883)]
    pub port: u16,
    /// Multi-stream mode: one data stream per topic (the broker must run with
    /// `quic_multi_stream = true`). Off: single-stream mode.
    #[arg(long)]
    pub multi_stream: bool,
    /// Share of datagrams the relay drops, each way.
    #[arg(long, default_value_t = 0.05)]
    pub loss: f64,
    /// Milliseconds the relay delays each datagram, each way.
    #[arg(long, default_value_t = 20.0)]
    pub delay_ms: f64,
    /// Seed of the relay's drop decisions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Bulk messages per second on topic A (QoS 1).
    #[arg(long, default_value_t = 50.0)]
    pub bulk_rate: f64,
    /// Bulk message size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub bulk_size: usize,
    /// Probe messages per second on topic B (QoS 1, 64 bytes).
    #[arg(long, default_value_t = 20.0)]
    pub probe_rate: f64,
    /// Seconds of publishing.
    #[arg(short = 'd', long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds allowed afterwards for deliveries under way.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
}

impl HolArgs {
    /// The run's options, with the broker's addresses resolved.
    pub fn options(&self) -> anyhow::Result<crate::hol::HolOptions> {
        use std::net::ToSocketAddrs;
        let addr = |port: u16| -> anyhow::Result<std::net::SocketAddr> {
            (self.host.as_str(), port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| anyhow::anyhow!("{} resolves to no address", self.host))
        };
        anyhow::ensure!(
            (0.0..1.0).contains(&self.loss),
            "--loss must be in [0, 1), got {}",
            self.loss
        );
        anyhow::ensure!(
            self.bulk_rate > 0.0 && self.probe_rate > 0.0,
            "--bulk-rate and --probe-rate must be above 0"
        );
        Ok(crate::hol::HolOptions {
            quic: addr(self.quic_port)?,
            tcp: addr(self.port)?,
            multi_stream: self.multi_stream,
            loss: self.loss,
            delay: Duration::from_secs_f64(self.delay_ms.max(0.0) / 1000.0),
            seed: self.seed,
            bulk_rate: self.bulk_rate,
            bulk_size: self.bulk_size.max(crate::payload::HEADER_LEN),
            probe_rate: self.probe_rate,
            duration: secs("--duration", self.duration)?,
            drain: secs("--drain", self.drain)?,
        })
    }
}

/// The MQTT protocol version the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5")]
    V5,
}

impl MqttVersion {
    /// The codec's name for it.
    pub fn protocol(self) -> ProtocolVersion {
        match self {
            MqttVersion::V311 => ProtocolVersion::V3_1_1,
            MqttVersion::V5 => ProtocolVersion::V5,
        }
    }

    /// As printed in reports.
    pub fn label(self) -> &'static str {
        match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        }
    }
}

/// How clients reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    /// Plain TCP.
    Tcp,
    /// MQTT over QUIC, single-stream mode (the first bidirectional stream carries MQTT), ALPN
    /// `mqtt`.
    Quic,
}

/// Where the broker is and how clients connect to it.
#[derive(Debug, Clone, Args)]
pub struct ConnectOpts {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (UDP with `--transport quic`; mqttd listens for QUIC on 14567).
    #[arg(short = 'p', long, default_value_t = 1883)]
    pub port: u16,
    /// Transport.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: TransportKind,
    /// MQTT protocol version.
    #[arg(long = "mqtt", value_enum, default_value = "3.1.1")]
    pub mqtt: MqttVersion,
    /// New connections per second over all clients; 0 = as fast as possible.
    #[arg(short = 'R', long, default_value_t = 0)]
    pub connect_rate: u32,
    /// Connection attempts in progress at once (TCP connect to CONNACK).
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Keep alive in seconds.
    #[arg(short = 'k', long, default_value_t = 60)]
    pub keep_alive: u16,
    /// Client identifier prefix; each client appends its role and index.
    #[arg(long, default_value = "mqttd-bench")]
    pub client_id_prefix: String,
    /// Persistent sessions: clean session 0 (3.1.1) / clean start 0 with a one-hour Session
    /// Expiry (5.0), so the broker keeps (and a durable broker stores) each client's session.
    #[arg(long)]
    pub persistent: bool,
    /// QUIC: accept any server certificate (encrypted, not authenticated).
    #[arg(long)]
    pub insecure: bool,
    /// QUIC: trust the CA certificates (or the self-signed certificate) in this PEM file
    /// instead of the system roots.
    #[arg(long, conflicts_with = "insecure")]
    pub cafile: Option<std::path::PathBuf>,
    /// QUIC: the name the server certificate is checked against (and sent as SNI)
    /// [default: --host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// QUIC: client UDP sockets the connections are spread over, round robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub quic_endpoints: u16,
    /// QUIC: a fresh TLS context per client, so every connection makes a full handshake like
    /// an independent device (about 12 ms of generator CPU per client to build, not counted
    /// in connect times). Default: one shared context; a client resumes a session when an
    /// unused ticket from an earlier client is at hand.
    #[arg(long)]
    pub quic_full_handshake: bool,
    /// QUIC: write a qlog per connection into this directory (for diagnosing stalls).
    #[arg(long)]
    pub quic_qlog: Option<std::path::PathBuf>,
}

/// What the run prints and samples.
#[derive(Debug, Clone, Args)]
pub struct OutputOpts {
    /// Print JSON lines (a `progress` object per interval, then one `summary`) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Sample this process's CPU and RSS from /proc (the broker under test).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Milliseconds between progress lines.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

/// The messages each publisher sends.
#[derive(Debug, Clone, Args)]
pub struct LoadOpts {
    /// QoS of PUBLISH and SUBSCRIBE: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 24: the timestamp and sequence header).
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,
    /// Messages per second per publisher (fixed-rate mode, for latency); 0 = unlimited.
    #[arg(short = 'r', long, default_value_t = 0.0)]
    pub rate: f64,
    /// Unacknowledged QoS 1/2 PUBLISHes per publisher (capped by the broker's Receive Maximum).
    #[arg(short = 'w', long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Seconds of publishing (an upper bound when --count is given).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Messages per publisher; the run stops when every publisher has sent them.
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// Seconds to wait after publishing for acknowledgements and deliveries still under way.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Seconds without any delivery after which the drain ends early (the rest counts as lost).
    #[arg(long, default_value_t = 1.0)]
    pub drain_idle: f64,
}

/// `pub`.
#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    /// Publishing clients.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub clients: u32,
    /// Topic; `%i` becomes the client's number (1-based).
    #[arg(short = 't', long, default_value = "bench/%i")]
    pub topic: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `sub`.
#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    /// Subscribing clients.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub clients: u32,
    /// Topic filter; `%i` becomes the client's number (1-based).
    #[arg(short = 't', long, default_value = "bench/#")]
    pub topic: String,
    /// QoS of the subscription: 0, 1 or 2.
    #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Seconds to listen.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many messages over all clients.
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `conn`.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Clients to connect.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub clients: u32,
    /// Seconds to hold the connections once all are up.
    #[arg(short = 'd', long, default_value_t = 5.0)]
    pub duration: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `conn-storm`: `conn` with storm defaults.
#[derive(Debug, Clone, Args)]
pub struct ConnStormArgs {
    /// Clients to connect.
    #[arg(short = 'c', long, default_value_t = 2000)]
    pub clients: u32,
    /// Seconds to hold the connections once all are up (RSS is sampled after the first).
    #[arg(short = 'd', long, default_value_t = 2.0)]
    pub duration: f64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `fan-in`.
#[derive(Debug, Clone, Args)]
pub struct FanInArgs {
    /// Publishers.
    #[arg(long, default_value_t = 4)]
    pub publishers: u32,
    /// Publishers' topic (`%i` = publisher number); the subscriber's filter is this with `%i`
    /// replaced by `+`.
    #[arg(short = 't', long, default_value = "bench/fan-in/%i")]
    pub topic: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `fan-out`.
#[derive(Debug, Clone, Args)]
pub struct FanOutArgs {
    /// Subscribers.
    #[arg(long, default_value_t = 4)]
    pub subscribers: u32,
    /// The topic.
    #[arg(short = 't', long, default_value = "bench/fan-out")]
    pub topic: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

/// `pairs`.
#[derive(Debug, Clone, Args)]
pub struct PairsArgs {
    /// Publisher/subscriber pairs.
    #[arg(long, default_value_t = 8)]
    pub pairs: u32,
    /// Topic of pair `%i`.
    #[arg(short = 't', long, default_value = "bench/pairs/%i")]
    pub topic: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadOpts,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub output: OutputOpts,
}

fn qos(n: u8) -> QoS {
    QoS::from_u8(n).unwrap_or(QoS::AtMostOnce)
}

fn secs(what: &str, s: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        (0.0..1e7).contains(&s),
        "{what} must be a number of seconds >= 0, got {s}"
    );
    Ok(Duration::from_secs_f64(s))
}

/// `pattern` with `%i` replaced by `n`.
pub fn expand(pattern: &str, n: u32) -> String {
    pattern.replace("%i", &n.to_string())
}

fn topic(pattern: &str, n: u32) -> anyhow::Result<Topic> {
    let name = expand(pattern, n);
    Topic::new(&name).map_err(|e| anyhow::anyhow!("invalid topic `{name}`: {e}"))
}

fn filter(pattern: &str) -> anyhow::Result<TopicFilter> {
    TopicFilter::new(pattern).map_err(|e| anyhow::anyhow!("invalid topic filter `{pattern}`: {e}"))
}

fn workload(load: &LoadOpts) -> anyhow::Result<Workload> {
    anyhow::ensure!(
        load.rate.is_finite() && load.rate >= 0.0,
        "--rate must be >= 0, got {}",
        load.rate
    );
    Ok(Workload {
        qos: qos(load.qos),
        size: load.size,
        rate: load.rate,
        inflight: load.inflight,
        duration: secs("--duration", load.duration)?,
        count: load.count,
        drain: secs("--drain", load.drain)?,
        drain_idle: secs("--drain-idle", load.drain_idle)?,
    })
}

impl Command {
    /// The plan this command runs, with its connection and output options.
    pub fn plan(&self) -> anyhow::Result<(Plan, ConnectOpts, OutputOpts)> {
        match self {
            Command::Pub(a) => {
                let publishers = (1..=a.clients)
                    .map(|n| {
                        Ok(PubSpec {
                            topic: topic(&a.topic, n)?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let plan = Plan::messages("pub", publishers, Vec::new(), workload(&a.load)?);
                Ok((plan, a.connect.clone(), a.output.clone()))
            }
            Command::Sub(a) => {
                let subscribers = (1..=a.clients)
                    .map(|n| {
                        Ok(SubSpec {
                            filter: filter(&expand(&a.topic, n))?,
                            expects: None,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let load = Workload {
                    qos: qos(a.qos),
                    duration: secs("--duration", a.duration)?,
                    ..Workload::default()
                };
                let mut plan = Plan::messages("sub", Vec::new(), subscribers, load);
                plan.receive_count = a.count;
                Ok((plan, a.connect.clone(), a.output.clone()))
            }
            Command::Conn(a) => Ok((
                Plan::idle("conn", a.clients, secs("--duration", a.duration)?),
                a.connect.clone(),
                a.output.clone(),
            )),
            Command::ConnStorm(a) => Ok((
                Plan::idle("conn-storm", a.clients, secs("--duration", a.duration)?),
                a.connect.clone(),
                a.output.clone(),
            )),
            Command::FanIn(a) => {
                let publishers = (1..=a.publishers)
                    .map(|n| {
                        Ok(PubSpec {
                            topic: topic(&a.topic, n)?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let subscribers = vec![SubSpec {
                    filter: filter(&a.topic.replace("%i", "+"))?,
                    expects: Some((0..a.publishers).collect()),
                }];
                let plan = Plan::messages("fan-in", publishers, subscribers, workload(&a.load)?);
                Ok((plan, a.connect.clone(), a.output.clone()))
            }
            Command::FanOut(a) => {
                let publishers = vec![PubSpec {
                    topic: topic(&a.topic, 1)?,
                }];
                let subscribers = (1..=a.subscribers)
                    .map(|_| {
                        Ok(SubSpec {
                            filter: filter(&expand(&a.topic, 1))?,
                            expects: Some(vec![0]),
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let plan = Plan::messages("fan-out", publishers, subscribers, workload(&a.load)?);
                Ok((plan, a.connect.clone(), a.output.clone()))
            }
            Command::Hol(_) => anyhow::bail!("`hol` is not a message plan"),
            Command::Pairs(a) => {
                let publishers = (1..=a.pairs)
                    .map(|n| {
                        Ok(PubSpec {
                            topic: topic(&a.topic, n)?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let subscribers = (1..=a.pairs)
                    .map(|n| {
                        Ok(SubSpec {
                            filter: filter(&expand(&a.topic, n))?,
                            expects: Some(vec![n - 1]),
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let plan = Plan::messages("pairs", publishers, subscribers, workload(&a.load)?);
                Ok((plan, a.connect.clone(), a.output.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(args: &[&str]) -> Plan {
        let cli = Cli::try_parse_from(args).expect("valid arguments");
        cli.command.plan().expect("valid plan").0
    }

    #[test]
    fn presets_wire_publishers_to_subscribers() {
        let p = plan_of(&["mqttd-bench", "fan-in", "--publishers", "3", "-q", "1"]);
        assert_eq!(p.publishers.len(), 3);
        assert_eq!(p.publishers[2].topic.as_str(), "bench/fan-in/3");
        assert_eq!(p.subscribers[0].filter.as_str(), "bench/fan-in/+");
        assert_eq!(p.subscribers[0].expects, Some(vec![0, 1, 2]));
        assert_eq!(p.load.qos, QoS::AtLeastOnce);

        let p = plan_of(&["mqttd-bench", "fan-out", "--subscribers", "2"]);
        assert_eq!(p.publishers.len(), 1);
        assert_eq!(p.subscribers.len(), 2);
        assert_eq!(p.subscribers[1].expects, Some(vec![0]));

        let p = plan_of(&["mqttd-bench", "pairs", "--pairs", "2", "-n", "5"]);
        assert_eq!(p.subscribers[1].filter.as_str(), "bench/pairs/2");
        assert_eq!(p.subscribers[1].expects, Some(vec![1]));
        assert_eq!(p.load.count, Some(5));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(Cli::try_parse_from(["mqttd-bench", "pub", "-q", "3"]).is_err());
        assert!(Cli::try_parse_from(["mqttd-bench", "pub", "--mqtt", "4"]).is_err());
        let cli = Cli::try_parse_from(["mqttd-bench", "pub", "-t", "a/#"]).expect("parses");
        assert!(cli.command.plan().is_err());
        let cli = Cli::try_parse_from(["mqttd-bench", "pub", "--duration=-1"]).expect("parses");
        assert!(cli.command.plan().is_err());
    }
}
