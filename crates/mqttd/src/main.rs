//! The `mqttd` binary: parses flags and the config file, starts the broker, stops it on
//! SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mqttd::config::{Config, LogFormat, Settings};

/// mqttd: an MQTT 3.1.1 and 5.0 broker.
///
/// Every key of the config file is also a flag; flags win over the file.
#[derive(Debug, Parser)]
#[command(name = "mqttd", version, about)]
struct Cli {
    /// Config file (TOML). Without it the built-in defaults apply.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a config file and exits: 0 if valid, else names the bad key and line.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Adds or changes a user's password in a password file (Argon2id), or deletes the user,
    /// like mosquitto_passwd. The password is read from standard input (one line) unless `-b`.
    Passwd {
        /// Create the file, replacing an existing one (mosquitto_passwd's `-c`; `-c` here is
        /// the global `--config`).
        #[arg(long)]
        create: bool,
        /// Delete the user instead.
        #[arg(short = 'D', conflicts_with_all = ["batch", "create"])]
        delete: bool,
        /// Batch mode: the password is the third argument.
        #[arg(short = 'b', requires = "password")]
        batch: bool,
        /// The password file.
        file: PathBuf,
        /// The username.
        username: String,
        /// The password (with `-b`).
        password: Option<String>,
    },
    /// Publishes a message, like mosquitto_pub, over TCP or MQTT over QUIC (`--quic`).
    Pub {
        #[command(flatten)]
        conn: ConnArgs,
        /// Topic to publish to.
        #[arg(short = 't', long)]
        topic: String,
        /// The message (UTF-8 text).
        #[arg(short = 'm', long, conflicts_with_all = ["file", "null_message"])]
        message: Option<String>,
        /// Send the contents of a file as the message.
        #[arg(short = 'f', long, conflicts_with = "null_message")]
        file: Option<PathBuf>,
        /// Send an empty message.
        #[arg(short = 'n', long)]
        null_message: bool,
        /// Quality of service: 0, 1 or 2.
        #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Retain the message.
        #[arg(short = 'r', long)]
        retain: bool,
    },
    /// Subscribes and prints messages, like mosquitto_sub, over TCP or MQTT over QUIC (`--quic`).
    Sub {
        #[command(flatten)]
        conn: ConnArgs,
        /// Topic filter(s) to subscribe to.
        #[arg(short = 't', long = "topic", required = true)]
        topics: Vec<String>,
        /// Maximum QoS: 0, 1 or 2.
        #[arg(short = 'q', long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Exit after this many messages.
        #[arg(short = 'C', long)]
        count: Option<u64>,
        /// Print "topic payload" instead of the payload alone.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Exit after this many seconds without a message.
        #[arg(short = 'W', long)]
        timeout_secs: Option<u64>,
    },
}

/// MQTT protocol version of `pub`/`sub`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "311")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5")]
    V5,
}

/// Connection flags shared by `pub` and `sub`.
#[derive(Debug, clap::Args)]
struct ConnArgs {
    /// Broker host.
    #[arg(short = 'H', long, default_value = "localhost")]
    host: String,
    /// Broker port [default: 1883, 8883 with --tls, 14567 with --quic].
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// MQTT over QUIC (UDP, ALPN "mqtt") instead of TCP.
    #[arg(long, conflicts_with = "tls")]
    quic: bool,
    /// MQTT over TLS (TCP) instead of plain TCP.
    #[arg(long)]
    tls: bool,
    /// TLS and QUIC: accept any server certificate (encrypted but not authenticated).
    #[arg(long, conflicts_with = "cafile")]
    insecure: bool,
    /// TLS and QUIC: trust the certificates in this PEM file (e.g. the broker's generated
    /// `mqttd-data/quic-cert.pem`) instead of the system roots.
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// Username (with `-P`, checked against the broker's password file).
    #[arg(short = 'u', long, requires = "password")]
    username: Option<String>,
    /// Password of `-u`.
    #[arg(short = 'P', long, requires = "username")]
    password: Option<String>,
    /// Client identifier [default: generated].
    #[arg(short = 'i', long, default_value = "")]
    id: String,
    /// MQTT version.
    #[arg(long, value_enum, default_value = "311")]
    protocol_version: MqttVersion,
    /// Keep alive in seconds.
    #[arg(short = 'k', long, default_value_t = 60)]
    keep_alive: u16,
    /// Keep the session (clean session 0 / clean start 0).
    #[arg(long)]
    no_clean: bool,
}

fn resolve(cli: &Cli) -> Result<Config, mqttd::config::ConfigError> {
    let file = match &cli.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    file.overridden_by(cli.settings.clone()).resolve()
}

/// `mqttd passwd`: edits `file` (created with `create`), replacing it atomically with a file
/// only its owner can read.
fn passwd(
    file: &std::path::Path,
    username: &str,
    password: Option<&str>,
    create: bool,
) -> Result<(), mqttd::auth::AuthError> {
    use mqttd::auth::AuthError;
    let io = |source| AuthError::Io {
        path: file.to_owned(),
        source,
    };
    if password.is_some_and(str::is_empty) {
        return Err(AuthError::Invalid("the password is empty".into()));
    }
    let old = if create {
        String::new()
    } else {
        std::fs::read_to_string(file).map_err(io)?
    };
    // The existing file must be usable before it is rewritten.
    mqttd::auth::PasswordFile::parse(&old, file)?;
    let new = mqttd::auth::edit_file(&old, username, password.map(str::as_bytes))?;
    let tmp = file.with_extension("mqttd-tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    {
        use std::io::Write;
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(new.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, file).map_err(io)
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Takes over SIGINT and SIGTERM now and returns what waits for one of them. Called before the
/// listeners start: a signal that comes as soon as a client could connect (tests, scripts)
/// must shut down gracefully, not kill the process with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let streams = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        if let (Ok(mut int), Ok(mut term)) = streams {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn client_options(c: &ConnArgs) -> mqttd::client::ClientOptions {
    mqttd::client::ClientOptions {
        host: c.host.clone(),
        port: c.port,
        quic: c.quic,
        tls: c.tls,
        insecure: c.insecure,
        cafile: c.cafile.clone(),
        credentials: c.username.clone().zip(c.password.clone()),
        client_id: c.id.clone(),
        version: match c.protocol_version {
            MqttVersion::V311 => mqttd_codec::ProtocolVersion::V3_1_1,
            MqttVersion::V5 => mqttd_codec::ProtocolVersion::V5,
        },
        keep_alive: c.keep_alive,
        clean: !c.no_clean,
    }
}

fn qos(q: u8) -> mqttd_codec::QoS {
    mqttd_codec::QoS::from_u8(q).unwrap_or(mqttd_codec::QoS::AtMostOnce)
}

/// `mqttd pub` and `mqttd sub`: a client run to completion; errors are one line on stderr.
fn client_command(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        use mqttd::client::{Client, ClientError};
        match cli.command {
            Some(Command::Pub {
                conn,
                topic,
                message,
                file,
                null_message: _,
                qos: q,
                retain,
            }) => {
                let payload = match (message, file) {
                    (Some(m), _) => bytes::Bytes::from(m),
                    (None, Some(f)) => bytes::Bytes::from(std::fs::read(&f).map_err(|e| {
                        ClientError::Io(std::io::Error::new(
                            e.kind(),
                            format!("{}: {e}", f.display()),
                        ))
                    })?),
                    (None, None) => bytes::Bytes::new(),
                };
                let mut client = Client::connect(&client_options(&conn)).await?;
                client.publish(&topic, payload, qos(q), retain).await?;
                client.disconnect().await
            }
            Some(Command::Sub {
                conn,
                topics,
                qos: q,
                count,
                verbose,
                timeout_secs,
            }) => {
                let mut client = Client::connect(&client_options(&conn)).await?;
                client.subscribe(&topics, qos(q)).await?;
                let mut received = 0u64;
                while count.is_none_or(|c| received < c) {
                    let message = match timeout_secs {
                        Some(s) => match tokio::time::timeout(
                            std::time::Duration::from_secs(s),
                            client.next_message(),
                        )
                        .await
                        {
                            Ok(m) => m?,
                            Err(_) => return Err(ClientError::Timeout("a message")),
                        },
                        None => client.next_message().await?,
                    };
                    received += 1;
                    let payload = String::from_utf8_lossy(&message.payload);
                    if verbose {
                        println!("{} {payload}", message.topic.as_str());
                    } else {
                        println!("{payload}");
                    }
                }
                client.disconnect().await
            }
            _ => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Pub { .. } | Command::Sub { .. }) = &cli.command {
        return client_command(cli);
    }
    if let Some(Command::Passwd {
        create,
        delete,
        batch,
        file,
        username,
        password,
    }) = &cli.command
    {
        let password = if *delete {
            None
        } else if *batch {
            password.clone()
        } else {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("error: cannot read the password from standard input: {e}");
                return ExitCode::FAILURE;
            }
            Some(line.trim_end_matches(['\n', '\r']).to_owned())
        };
        return match passwd(file, username, password.as_deref(), *create) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return match Settings::load(file).and_then(Settings::resolve) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match resolve(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logs(&config);
    let mut builder = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if config.worker_threads > 1 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let signal = shutdown_signal();
        // Taken over before the listeners start, like SIGINT/SIGTERM: SIGHUP's default action
        // would end the process.
        #[cfg(unix)]
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let running = match mqttd::server::start(config.clone()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        // SIGHUP reloads the password and ACL files, as with mosquitto.
        #[cfg(unix)]
        match hangups {
            Ok(mut hup) => {
                let reloader = running.reloader();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        // Failures are logged and the rules in force are kept.
                        let _ = reloader.reload().await;
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP: reloading is off"),
        }
        // Tests and scripts read these lines to find the ports.
        println!(
            "mqttd {} listening on mqtt://{}",
            env!("CARGO_PKG_VERSION"),
            running.mqtt_addr
        );
        if let Some(http) = running.http_addr {
            println!("mqttd metrics on http://{http}/metrics, health on http://{http}/health");
        }
        // Tests and scripts read these lines too.
        let announce = |what: &str, url: String, cert: &std::path::Path, sha256: &str| {
            println!(
                "mqttd MQTT over {what} on {url} (certificate {}, sha256 {sha256})",
                cert.display()
            );
        };
        let quic = match &config.quic {
            Some(q) => {
                let shutdown = running.shutdown_handle().subscribe();
                mqttd::quic::start(q, &config.data_dir, running.context(), shutdown)
                    .await
                    .map(|l| {
                        let url = format!("quic://{}", l.local_addr);
                        announce("QUIC", url, &l.cert_path, &l.fingerprint);
                        Some(l)
                    })
                    .map_err(|e| e.to_string())
            }
            None => Ok(None),
        };
        let tls = match (&quic, &config.tls) {
            (Ok(_), Some(t)) => {
                let shutdown = running.shutdown_handle().subscribe();
                mqttd::tls_listener::start(t, &config.data_dir, running.context(), shutdown)
                    .await
                    .map(|l| {
                        let url = format!("mqtts://{}", l.local_addr);
                        announce("TLS", url, &l.cert_path, &l.fingerprint);
                        Some(l)
                    })
                    .map_err(|e| e.to_string())
            }
            _ => Ok(None),
        };
        let (quic, tls) = match (quic, tls) {
            (Ok(quic), Ok(tls)) => (quic, tls),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("error: cannot start: {e}");
                running.shutdown().await;
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(mqtt = %running.mqtt_addr, http = ?running.http_addr, "listening");
        signal.await;
        tracing::info!("signal received, shutting down");
        running.shutdown().await;
        if let Some(q) = quic {
            q.wait().await;
        }
        if let Some(t) = tls {
            t.wait().await;
        }
        ExitCode::SUCCESS
    })
}
