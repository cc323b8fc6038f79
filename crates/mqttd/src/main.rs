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
}

fn resolve(cli: &Cli) -> Result<Config, mqttd::config::ConfigError> {
    let file = match &cli.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    file.overridden_by(cli.settings.clone()).resolve()
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

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let running = match mqttd::server::start(config.clone()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Tests and scripts read these lines to find the ports.
        println!(
            "mqttd {} listening on mqtt://{}",
            env!("CARGO_PKG_VERSION"),
            running.mqtt_addr
        );
        if let Some(http) = running.http_addr {
            println!("mqttd metrics on http://{http}/metrics, health on http://{http}/health");
        }
        let quic = match &config.quic {
            Some(q) => {
                let shutdown = running.shutdown_handle().subscribe();
                match mqttd::quic::start(q, &config.data_dir, running.context(), shutdown).await {
                    Ok(l) => {
                        println!(
                            "mqttd MQTT over QUIC on quic://{} (certificate {}, sha256 {})",
                            l.local_addr,
                            l.cert_path.display(),
                            l.fingerprint
                        );
                        Some(l)
                    }
                    Err(e) => {
                        eprintln!("error: cannot start: {e}");
                        running.shutdown().await;
                        return ExitCode::FAILURE;
                    }
                }
            }
            None => None,
        };
        tracing::info!(mqtt = %running.mqtt_addr, http = ?running.http_addr, "listening");
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        running.shutdown().await;
        if let Some(q) = quic {
            q.wait().await;
        }
        ExitCode::SUCCESS
    })
}
