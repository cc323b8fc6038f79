//! The `mqttd-bench` binary: parses arguments, runs the plan, prints the summary.

use std::process::ExitCode;

use clap::Parser;
use mqttd_bench::cli::{Cli, TransportKind};
use mqttd_bench::run::run;
use mqttd_bench::transport::Tcp;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let json = output.json;
    let result = runtime.block_on(async {
        match connect.transport {
            TransportKind::Tcp => run(Tcp, plan, connect, output).await,
        }
    });
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
