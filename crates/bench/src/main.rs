//! The `mqttd-bench` binary: parses arguments, runs the plan, prints the summary.

use std::process::ExitCode;

use clap::Parser;
use mqttd_bench::cli::ConnectOpts;
use mqttd_bench::cli::{Cli, TransportKind};
use mqttd_bench::run::{resolve, run_with};
use mqttd_bench::transport::{Quic, QuicOptions, Tcp, Trust, read_ca};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let mqttd_bench::cli::Command::Hol(args) = &cli.command {
        return hol(args);
    }
    let (plan, connect, output) = match cli.command.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mqttd-bench: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqttd-bench: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let subscribers = if cli.sub_threads > 0 {
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .worker_threads(cli.sub_threads)
            .thread_name("mqttd-bench-sub")
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("mqttd-bench: error: cannot start the subscribers' runtime: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let sub_handle = subscribers.as_ref().map(|r| r.handle().clone());
    let json = output.json;
    let result = runtime.block_on(async {
        match connect.transport {
            TransportKind::Tcp => run_with(Tcp, plan, connect, output, sub_handle).await,
            TransportKind::Quic => {
                let quic = quic_transport(&connect).await?;
                run_with(quic, plan, connect, output, sub_handle).await
            }
        }
    });
    // Outside any runtime: a runtime may not be dropped from within one.
    drop(subscribers);
    match result {
        Ok(summary) => {
            if json {
                println!("{}", summary.to_json());
            } else {
                print!("{}", summary.to_text());
            }
            if summary.errors > 0 {
                eprintln!(
                    "mqttd-bench: {} clients failed; first: {}",
                    summary.errors,
                    summary.first_error.as_deref().unwrap_or("")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqttd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The QUIC transport the connection options ask for.
async fn quic_transport(connect: &ConnectOpts) -> anyhow::Result<Quic> {
    let remote = resolve(connect).await?;
    let trust = match (&connect.cafile, connect.insecure) {
        (Some(path), _) => read_ca(path)?,
        (None, true) => Trust::Insecure,
        (None, false) => Trust::System,
    };
    // The QUIC idle timeout outlasts MQTT keep alive, which alone decides liveness.
    let idle = std::time::Duration::from_secs(u64::from(connect.keep_alive).max(30) * 2);
    Quic::new(
        QuicOptions {
            trust,
            server_name: connect
                .server_name
                .clone()
                .unwrap_or_else(|| connect.host.clone()),
            endpoints: usize::from(connect.quic_endpoints),
            full_handshake: connect.quic_full_handshake,
            idle_timeout: idle,
            qlog_dir: connect.quic_qlog.clone(),
        },
        remote,
    )
}

/// `mqttd-bench hol`: prints one JSON summary line.
fn hol(args: &mqttd_bench::cli::HolArgs) -> ExitCode {
    let result = args.options().and_then(|o| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(mqttd_bench::hol::run_hol(o))
    });
    match result.and_then(|s| Ok(serde_json::to_string(&s)?)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqttd-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
