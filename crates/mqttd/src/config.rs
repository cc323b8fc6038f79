//! Configuration: one TOML file (`mqttd.toml`), every key also a command-line flag.
//!
//! [`Settings`] is both the file's schema (serde, unknown keys refused) and the flags (clap):
//! a field `max_connections` is the key `max_connections` and the flag `--max-connections`.
//! Resolution order: built-in defaults, then the file, then the flags.
//! [`Config`] is the resolved, validated result the broker runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Who may connect without a username. Clients that send one are checked against
/// `password_file` when it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Only clients connecting from a loopback address (the default).
    Loopback,
    /// Everybody.
    Always,
    /// Nobody (every CONNECT is refused with Not Authorized).
    Never,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where session state and retained messages live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// In memory: lost on restart.
    Memory,
    /// A redb database file in the data directory (the default).
    Redb,
}

/// When the durable store's writes reach the disk, relative to the acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Committed and fsynced before the PUBACK/PUBREC/SUBACK/CONNACK that depends on it is sent
    /// (one commit per batch of events: group commit). A crash loses nothing acknowledged.
    Sync,
    /// Acknowledged at once, committed every `commit_interval_ms`. A crash loses what was
    /// acknowledged in the last interval.
    Periodic,
    /// Acknowledged at once, committed only on a clean shutdown. A crash loses everything since
    /// the last clean start.
    None,
}

/// Lowest TLS version the MQTT-over-TLS listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default: many devices in the field speak only 1.2).
    #[serde(rename = "1.2")]
    #[value(name = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    #[value(name = "1.3")]
    V1_3,
}

/// Every setting, all optional: the schema of `mqttd.toml` and the command-line flags.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// MQTT over TCP listen address [default: 127.0.0.1:1883].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// HTTP address for `/metrics` (Prometheus text) and `/health` [default: 127.0.0.1:9883].
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP endpoint [default: true].
    #[arg(long)]
    pub http_enabled: Option<bool>,
    /// Who may connect without credentials: loopback, always, never [default: loopback].
    #[arg(long)]
    pub allow_anonymous: Option<Anonymous>,
    /// Storage backend: redb (a file in `data_dir`) or memory [default: redb].
    #[arg(long)]
    pub storage: Option<StorageKind>,
    /// When stored changes reach the disk: sync (before the acknowledgement), periodic, none
    /// [default: sync].
    #[arg(long)]
    pub durability: Option<Durability>,
    /// Milliseconds between commits with `durability = "periodic"` [default: 100].
    #[arg(long)]
    pub commit_interval_ms: Option<u64>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<LogFormat>,
    /// Log filter, `tracing` env-filter syntax [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Maximum simultaneous client connections [default: 100000].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Maximum MQTT packet size in bytes, both ways [default: 1048576].
    #[arg(long)]
    pub max_packet_size: Option<u32>,
    /// Receive Maximum the broker announces: QoS 1/2 PUBLISHes a client may have unacknowledged
    /// towards the broker; also caps the broker's own inflight window per client [default: 1024].
    #[arg(long)]
    pub max_inflight: Option<u16>,
    /// Messages queued per session (offline, or beyond the inflight window) [default: 1000].
    #[arg(long)]
    pub max_queued_messages: Option<usize>,
    /// Packets buffered towards one connection before its messages queue in the session [default: 1024].
    #[arg(long)]
    pub connection_buffer: Option<usize>,
    /// Maximum topic length in bytes [default: 65535].
    #[arg(long)]
    pub max_topic_length: Option<usize>,
    /// Maximum topic levels [default: 128].
    #[arg(long)]
    pub max_topic_levels: Option<usize>,
    /// Seconds a new connection has to send CONNECT [default: 10].
    #[arg(long)]
    pub connect_timeout_secs: Option<u64>,
    /// Largest keep alive accepted; larger (or 0) values are replaced by this via Server Keep
    /// Alive for 5.0 clients. 0 means no cap [default: 0].
    #[arg(long)]
    pub max_keep_alive_secs: Option<u16>,
    /// Cap on the Session Expiry Interval in seconds [default: 4294967295, i.e. never expires].
    #[arg(long)]
    pub max_session_expiry_secs: Option<u32>,
    /// Session expiry for 3.1.1 clients with clean session 0, in seconds [default: 7200].
    #[arg(long)]
    pub v3_session_expiry_secs: Option<u32>,
    /// Topic Alias Maximum the broker announces (aliases a client may use towards it) [default: 64].
    #[arg(long)]
    pub topic_alias_maximum: Option<u16>,
    /// Seconds between `$SYS/broker/...` updates; 0 disables them [default: 10].
    #[arg(long)]
    pub sys_interval_secs: Option<u64>,
    /// Seconds to flush writes to clients on shutdown [default: 5].
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// Directory for the broker's files (the generated QUIC certificate) [default: mqttd-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// MQTT over QUIC listen address (UDP) [default: 127.0.0.1:14567].
    #[arg(long)]
    pub quic_listen: Option<SocketAddr>,
    /// Serve MQTT over QUIC [default: true].
    #[arg(long)]
    pub quic_enabled: Option<bool>,
    /// QUIC certificate chain (PEM, leaf first). Without it (and `quic_key`) a self-signed
    /// certificate is generated into the data directory on first start.
    #[arg(long)]
    pub quic_cert: Option<PathBuf>,
    /// QUIC private key (PEM), the key of `quic_cert`.
    #[arg(long)]
    pub quic_key: Option<PathBuf>,
    /// QUIC idle timeout in seconds; the broker sends QUIC PINGs at a third of it, so it only
    /// ends connections whose peer is gone. 0: no QUIC idle timeout, MQTT keep alive alone
    /// decides [default: 60].
    #[arg(long)]
    pub quic_idle_timeout_secs: Option<u64>,
    /// Bidirectional streams a QUIC client may have open at once [default: 16].
    #[arg(long)]
    pub quic_max_streams: Option<u64>,
    /// Accept 0-RTT early data: a resumed client's CONNECT travels in its first flight and the
    /// CONNACK comes back one round trip sooner. Only the CONNECT is served from early data
    /// (the rest waits for the handshake), but early data can be replayed by an attacker: see
    /// the README [default: false].
    #[arg(long)]
    pub quic_zero_rtt: Option<bool>,
    /// Validate every client address with a QUIC Retry before keeping state (costs one round
    /// trip; Retry also turns on by itself under a handshake flood) [default: false].
    #[arg(long)]
    pub quic_retry: Option<bool>,
    /// Multi-stream mode (EMQX compatible): after the control stream, each further stream
    /// carries its own PUBLISH/SUBSCRIBE flows, so one stalled topic does not block another.
    /// Off: only the first stream is used (single-stream mode) [default: false].
    #[arg(long)]
    pub quic_multi_stream: Option<bool>,
    /// Allow QUIC clients to migrate to a new address (connection migration). Off: the
    /// listener sends `disable_active_migration`, so compliant clients do not move on their
    /// own; a client whose address changes anyway (NAT rebinding) is still validated and
    /// followed, keeping its MQTT session [default: true].
    #[arg(long)]
    pub quic_migration: Option<bool>,
    /// MQTT over TLS listen address (TCP), e.g. `0.0.0.0:8883`; set it to serve MQTT over TLS
    /// [default: off].
    #[arg(long)]
    pub tls_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM, leaf first). Without it (and `tls_key`) the listener serves
    /// the self-signed certificate generated into the data directory (the QUIC listener's).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM), the key of `tls_cert`.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against. Without it,
    /// clients are not asked for a certificate.
    #[arg(long)]
    pub tls_cafile: Option<PathBuf>,
    /// Refuse TLS clients that present no certificate chaining to `tls_cafile` (mosquitto's
    /// `require_certificate`) [default: false].
    #[arg(long)]
    pub tls_require_certificate: Option<bool>,
    /// Lowest TLS version accepted: `1.2` or `1.3` [default: 1.2].
    #[arg(long)]
    pub tls_min_version: Option<TlsVersion>,
    /// Password file (`username:hash` lines: `mqttd passwd` writes Argon2id; mosquitto_passwd's
    /// files work too). Clients that send a username must then send its password; clients
    /// without one follow `allow_anonymous` [default: none].
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Topic access rules in mosquitto's `acl_file` format (`user`, `topic [read|write|
    /// readwrite|deny] FILTER`, `pattern ... %u %c`); with it, what is not allowed is denied
    /// [default: none, everything allowed].
    #[arg(long)]
    pub acl_file: Option<PathBuf>,
    /// Threads that serve connections and the broker core: 0 for one per CPU, 1 for a single
    /// thread (no cross-thread wake-ups, so less CPU per message on a small machine shared
    /// with other work, but one core at most) [default: 0].
    #[arg(long)]
    pub worker_threads: Option<usize>,
}

/// The resolved configuration the broker runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// MQTT over TCP listen address.
    pub listen: SocketAddr,
    /// HTTP listen address, if the HTTP endpoint is enabled.
    pub http_listen: Option<SocketAddr>,
    /// Anonymous access policy.
    pub allow_anonymous: Anonymous,
    /// Storage backend.
    pub storage: StorageKind,
    /// When stored changes reach the disk.
    pub durability: Durability,
    /// Commit period with [`Durability::Periodic`].
    pub commit_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Protocol and resource limits.
    pub limits: Limits,
    /// Interval of `$SYS` updates (`None`: disabled).
    pub sys_interval: Option<Duration>,
    /// Time allowed to flush writes on shutdown.
    pub shutdown_grace: Duration,
    /// Directory for the broker's files.
    pub data_dir: PathBuf,
    /// The MQTT-over-QUIC listener, if enabled.
    pub quic: Option<QuicConfig>,
    /// The MQTT-over-TLS listener, if enabled.
    pub tls: Option<TlsConfig>,
    /// Password file for username/password authentication, if any.
    pub password_file: Option<PathBuf>,
    /// Topic access rules, if any.
    pub acl_file: Option<PathBuf>,
    /// Runtime threads (0: one per CPU).
    pub worker_threads: usize,
}

/// The MQTT-over-TLS listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Certificate chain and private key (PEM files); `None`: the generated pair in the data
    /// directory.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// CA certificates client certificates are verified against (`None`: none asked for).
    pub cafile: Option<PathBuf>,
    /// Refuse clients without a certificate (needs `cafile`).
    pub require_certificate: bool,
    /// Lowest TLS version accepted.
    pub min_version: TlsVersion,
}

/// The MQTT-over-QUIC listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// Certificate chain and private key (PEM files); `None`: generated into the data directory.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// QUIC idle timeout (`Duration::ZERO`: none, MQTT keep alive alone decides).
    pub idle_timeout: Duration,
    /// Bidirectional streams a client may have open at once.
    pub max_streams: u64,
    /// Accept 0-RTT early data and serve the CONNECT in it before the handshake completes.
    pub zero_rtt: bool,
    /// Always validate client addresses with a Retry.
    pub retry: bool,
    /// Multi-stream mode (EMQX compatible) instead of single-stream mode.
    pub multi_stream: bool,
    /// Allow active connection migration (off: `disable_active_migration` is sent; NAT
    /// rebinding is still followed).
    pub migration: bool,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 14567)),
            cert_and_key: None,
            idle_timeout: Duration::from_secs(60),
            max_streams: 16,
            zero_rtt: false,
            retry: false,
            multi_stream: false,
            migration: true,
        }
    }
}

/// Protocol and resource limits, all enforced by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Maximum simultaneous connections.
    pub max_connections: usize,
    /// Maximum packet size, both ways.
    pub max_packet_size: u32,
    /// Receive Maximum announced, and cap of the broker's inflight window.
    pub max_inflight: u16,
    /// Messages queued per session.
    pub max_queued_messages: usize,
    /// Packets buffered per connection.
    pub connection_buffer: usize,
    /// Maximum topic length.
    pub max_topic_length: usize,
    /// Maximum topic levels.
    pub max_topic_levels: usize,
    /// Time allowed between accept and CONNECT.
    pub connect_timeout: Duration,
    /// Keep alive cap in seconds (0: none).
    pub max_keep_alive: u16,
    /// Session Expiry Interval cap in seconds.
    pub max_session_expiry: u32,
    /// Session expiry used for 3.1.1 persistent sessions.
    pub v3_session_expiry: u32,
    /// Topic Alias Maximum announced.
    pub topic_alias_maximum: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1024 * 1024,
            max_inflight: 1024,
            max_queued_messages: 1000,
            connection_buffer: 1024,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: 0,
            max_session_expiry: u32::MAX,
            v3_session_expiry: 7200,
            topic_alias_maximum: 64,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9883))),
            allow_anonymous: Anonymous::Loopback,
            storage: StorageKind::Redb,
            durability: Durability::Sync,
            commit_interval: Duration::from_millis(100),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            limits: Limits::default(),
            sys_interval: Some(Duration::from_secs(10)),
            shutdown_grace: Duration::from_secs(5),
            data_dir: PathBuf::from("mqttd-data"),
            quic: Some(QuicConfig::default()),
            tls: None,
            password_file: None,
            acl_file: None,
            worker_threads: 0,
        }
    }
}

/// A configuration problem, naming the file, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a bad value.
    #[error("{path}:{line}: {key}{message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem (0 if unknown).
        line: usize,
        /// "key `name`: " when the key is known, else empty.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{key}: {message}")]
    Range {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Settings {
    /// Parses the text of a config file; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        toml::from_str::<Settings>(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    (line, key_on_line(text, line, e.message()))
                }
                None => (0, None),
            };
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                key: key.map(|k| format!("key `{k}`: ")).unwrap_or_default(),
                message: e.message().to_owned(),
            }
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `self` with every key set in `over` replaced.
    pub fn overridden_by(self, over: Settings) -> Settings {
        macro_rules! merge {
            ($($f:ident),*) => { Settings { $($f: over.$f.or(self.$f)),* } };
        }
        merge!(
            listen,
            http_listen,
            http_enabled,
            allow_anonymous,
            storage,
            durability,
            commit_interval_ms,
            log_format,
            log_level,
            max_connections,
            max_packet_size,
            max_inflight,
            max_queued_messages,
            connection_buffer,
            max_topic_length,
            max_topic_levels,
            connect_timeout_secs,
            max_keep_alive_secs,
            max_session_expiry_secs,
            v3_session_expiry_secs,
            topic_alias_maximum,
            sys_interval_secs,
            shutdown_grace_secs,
            data_dir,
            quic_listen,
            quic_enabled,
            quic_cert,
            quic_key,
            quic_idle_timeout_secs,
            quic_max_streams,
            quic_zero_rtt,
            quic_retry,
            quic_multi_stream,
            quic_migration,
            tls_listen,
            tls_cert,
            tls_key,
            tls_cafile,
            tls_require_certificate,
            tls_min_version,
            password_file,
            acl_file,
            worker_threads
        )
    }

    /// Resolves against the defaults and checks ranges.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let dl = &d.limits;
        let range = |key: &'static str, message: &str| ConfigError::Range {
            key,
            message: message.into(),
        };
        let limits = Limits {
            max_connections: self.max_connections.unwrap_or(dl.max_connections),
            max_packet_size: self.max_packet_size.unwrap_or(dl.max_packet_size),
            max_inflight: self.max_inflight.unwrap_or(dl.max_inflight),
            max_queued_messages: self.max_queued_messages.unwrap_or(dl.max_queued_messages),
            connection_buffer: self.connection_buffer.unwrap_or(dl.connection_buffer),
            max_topic_length: self.max_topic_length.unwrap_or(dl.max_topic_length),
            max_topic_levels: self.max_topic_levels.unwrap_or(dl.max_topic_levels),
            connect_timeout: self
                .connect_timeout_secs
                .map_or(dl.connect_timeout, Duration::from_secs),
            max_keep_alive: self.max_keep_alive_secs.unwrap_or(dl.max_keep_alive),
            max_session_expiry: self
                .max_session_expiry_secs
                .unwrap_or(dl.max_session_expiry),
            v3_session_expiry: self.v3_session_expiry_secs.unwrap_or(dl.v3_session_expiry),
            topic_alias_maximum: self.topic_alias_maximum.unwrap_or(dl.topic_alias_maximum),
        };
        if limits.max_packet_size < 64 || limits.max_packet_size > 268_435_460 {
            return Err(range(
                "max_packet_size",
                "must be between 64 and 268435460 bytes",
            ));
        }
        if limits.max_inflight == 0 {
            return Err(range("max_inflight", "must be at least 1"));
        }
        if limits.max_connections == 0 {
            return Err(range("max_connections", "must be at least 1"));
        }
        if limits.connection_buffer < 16 {
            return Err(range("connection_buffer", "must be at least 16"));
        }
        if limits.max_topic_length == 0 || limits.max_topic_length > 65_535 {
            return Err(range("max_topic_length", "must be between 1 and 65535"));
        }
        if limits.max_topic_levels == 0 {
            return Err(range("max_topic_levels", "must be at least 1"));
        }
        if limits.connect_timeout.is_zero() {
            return Err(range("connect_timeout_secs", "must be at least 1"));
        }
        let log_level = self.log_level.unwrap_or(d.log_level);
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(range("log_level", "not a valid tracing filter"));
        }
        let http_enabled = self.http_enabled.unwrap_or(true);
        let quic = if self.quic_enabled.unwrap_or(true) {
            let dq = QuicConfig::default();
            let cert_and_key = match (self.quic_cert, self.quic_key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(range("quic_key", "required when quic_cert is set"));
                }
                (None, Some(_)) => {
                    return Err(range("quic_cert", "required when quic_key is set"));
                }
            };
            let max_streams = self.quic_max_streams.unwrap_or(dq.max_streams);
            if max_streams == 0 || max_streams > 1 << 16 {
                return Err(range("quic_max_streams", "must be between 1 and 65536"));
            }
            Some(QuicConfig {
                listen: self.quic_listen.unwrap_or(dq.listen),
                cert_and_key,
                idle_timeout: self
                    .quic_idle_timeout_secs
                    .map_or(dq.idle_timeout, Duration::from_secs),
                max_streams,
                zero_rtt: self.quic_zero_rtt.unwrap_or(dq.zero_rtt),
                retry: self.quic_retry.unwrap_or(dq.retry),
                multi_stream: self.quic_multi_stream.unwrap_or(dq.multi_stream),
                migration: self.quic_migration.unwrap_or(dq.migration),
            })
        } else {
            None
        };
        let require_certificate = self.tls_require_certificate.unwrap_or(false);
        if require_certificate && self.tls_cafile.is_none() {
            return Err(range(
                "tls_require_certificate",
                "needs `tls_cafile` (the CAs client certificates are checked against)",
            ));
        }
        let tls = match self.tls_listen {
            Some(listen) => Some(TlsConfig {
                listen,
                cert_and_key: match (self.tls_cert, self.tls_key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(range("tls_key", "required when tls_cert is set"));
                    }
                    (None, Some(_)) => {
                        return Err(range("tls_cert", "required when tls_key is set"));
                    }
                },
                cafile: self.tls_cafile,
                require_certificate,
                min_version: self.tls_min_version.unwrap_or(TlsVersion::V1_2),
            }),
            None if self.tls_cert.is_some()
                || self.tls_key.is_some()
                || self.tls_cafile.is_some() =>
            {
                return Err(range(
                    "tls_listen",
                    "required when tls_cert, tls_key or tls_cafile is set (the TLS listener is off without it)",
                ));
            }
            None => None,
        };
        Ok(Config {
            listen: self.listen.unwrap_or(d.listen),
            http_listen: if http_enabled {
                Some(self.http_listen.or(d.http_listen).unwrap_or(d.listen))
            } else {
                None
            },
            allow_anonymous: self.allow_anonymous.unwrap_or(d.allow_anonymous),
            storage: self.storage.unwrap_or(d.storage),
            durability: self.durability.unwrap_or(d.durability),
            commit_interval: match self.commit_interval_ms {
                Some(0) => return Err(range("commit_interval_ms", "must be at least 1")),
                Some(ms) => Duration::from_millis(ms),
                None => d.commit_interval,
            },
            log_format: self.log_format.unwrap_or(d.log_format),
            log_level,
            limits,
            sys_interval: match self.sys_interval_secs {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => d.sys_interval,
            },
            shutdown_grace: self
                .shutdown_grace_secs
                .map_or(d.shutdown_grace, Duration::from_secs),
            data_dir: self.data_dir.unwrap_or(d.data_dir),
            quic,
            tls,
            password_file: self.password_file,
            acl_file: self.acl_file,
            worker_threads: match self.worker_threads {
                Some(n) if n > 1024 => {
                    return Err(range("worker_threads", "must be between 0 and 1024"));
                }
                Some(n) => n,
                None => 0,
            },
        })
    }
}

/// The key named on a line (`key = value`), or the unknown field serde complained about.
fn key_on_line(text: &str, line: usize, message: &str) -> Option<String> {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return rest.split('`').next().map(str::to_owned);
    }
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty()).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::parse(text, Path::new("mqttd.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").and_then(Settings::resolve).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:1883");
        assert_eq!(c.allow_anonymous, Anonymous::Loopback);
    }

    #[test]
    fn file_values_and_flag_overrides() {
        let file =
            parse("listen = \"0.0.0.0:1999\"\nmax_connections = 5\nallow_anonymous = \"always\"\n")
                .expect("valid");
        let flags = Settings {
            max_connections: Some(7),
            ..Settings::default()
        };
        let c = file.overridden_by(flags).resolve().expect("valid");
        assert_eq!(c.listen.to_string(), "0.0.0.0:1999");
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.allow_anonymous, Anonymous::Always);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err =
            parse("listen = \"127.0.0.1:1\"\n\nmax_conections = 5\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            msg.starts_with("mqttd.toml:3: key `max_conections`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_value_is_named_with_its_line() {
        let err = parse("# comment\nmax_connections = \"lots\"\n").expect_err("bad type");
        let msg = err.to_string();
        assert!(
            msg.starts_with("mqttd.toml:2: key `max_connections`"),
            "{msg}"
        );
        let err = parse("listen = \"nowhere\"\n").expect_err("bad address");
        assert!(
            err.to_string().starts_with("mqttd.toml:1: key `listen`"),
            "{err}"
        );
        let err = parse("log_format = \"xml\"\n").expect_err("bad enum");
        assert!(
            err.to_string()
                .starts_with("mqttd.toml:1: key `log_format`"),
            "{err}"
        );
    }

    #[test]
    fn ranges_are_checked() {
        let err = parse("max_packet_size = 3")
            .and_then(Settings::resolve)
            .expect_err("too small");
        assert!(err.to_string().starts_with("max_packet_size:"), "{err}");
        let c = parse("sys_interval_secs = 0\nhttp_enabled = false")
            .and_then(Settings::resolve)
            .expect("valid");
        assert_eq!(c.sys_interval, None);
        assert_eq!(c.http_listen, None);
    }

    #[test]
    fn quic_listener_options() {
        let q = Config::default().quic.expect("QUIC on by default");
        assert!(
            q.migration && !q.zero_rtt,
            "migration on, 0-RTT off by default"
        );
        let c = parse("quic_migration = false\nquic_zero_rtt = true\n")
            .and_then(Settings::resolve)
            .expect("valid");
        let q = c.quic.expect("QUIC on");
        assert!(!q.migration && q.zero_rtt);
    }

    #[test]
    fn worker_threads_default_and_range() {
        assert_eq!(
            Config::default().worker_threads,
            0,
            "one per CPU by default"
        );
        let c = parse("worker_threads = 1\n")
            .and_then(Settings::resolve)
            .expect("valid");
        assert_eq!(c.worker_threads, 1);
        let err = parse("worker_threads = 5000\n")
            .and_then(Settings::resolve)
            .expect_err("too many");
        assert!(err.to_string().starts_with("worker_threads:"), "{err}");
    }

    #[test]
    fn tls_listener_options() {
        assert_eq!(Config::default().tls, None, "TLS is off by default");
        let c = parse("tls_listen = \"127.0.0.1:8883\"\ntls_min_version = \"1.3\"\n")
            .and_then(Settings::resolve)
            .expect("valid");
        let t = c.tls.expect("TLS on");
        assert_eq!(t.listen, SocketAddr::from(([127, 0, 0, 1], 8883)));
        assert_eq!(t.min_version, TlsVersion::V1_3);
        assert_eq!(
            (t.cert_and_key, t.cafile, t.require_certificate),
            (None, None, false)
        );
        for (text, key) in [
            ("tls_cert = \"c.pem\"\n", "tls_listen"),
            (
                "tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\n",
                "tls_key",
            ),
            (
                "tls_listen = \"127.0.0.1:8883\"\ntls_require_certificate = true\n",
                "tls_require_certificate",
            ),
        ] {
            let err = parse(text).and_then(Settings::resolve).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = parse("tls_min_version = \"1.1\"\n").expect_err("1.1 is not offered");
        assert!(err.to_string().contains("tls_min_version"), "{err}");
    }
}
