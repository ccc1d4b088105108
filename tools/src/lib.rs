//! dcvv-tools: the gateway's clients for people and scripts, kept out of the
//! gateway library so that the service carries no HTTP client. `call` sends one
//! HMAC-signed request to a running gateway and checks the response's signature;
//! `bench http` measures a running gateway's signed API end to end next to
//! engine-only figures on the same token.
//!
//! Both sign and verify with the gateway's own signature module
//! ([`dcvv_gateway::http::signature`]), so client and server cannot drift, and
//! `bench http`'s engine-only phase runs the gateway library's engine benchmark
//! ([`dcvv_gateway::cli::bench`]). Output on stdout is the commands' contract;
//! logs go to stderr. Every error is one line and a non-zero exit; nothing
//! printed or logged holds a client secret, a PIN or a code of a request.

mod bench_http;
mod call;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dcvv_gateway::cli::CliError;
use dcvv_gateway::config::Settings;
use dcvv_gateway::telemetry::{self, LogFormat};

/// dcvv-tools: a signed client and an end-to-end benchmark for a running dcvv-gateway.
#[derive(Debug, Parser)]
#[command(name = "dcvv-tools", version, about)]
pub struct Cli {
    /// Gateway configuration file (TOML): `bench http` opens the same token with it
    /// for its engine-only figures. `call` reads no configuration.
    #[arg(long, value_name = "FILE", default_value = "hsm-config/gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one HMAC-signed request to a running gateway and check the response's signature.
    Call(call::CallArgs),
    /// Benchmarks against a running gateway.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// End-to-end throughput and latency of a running gateway's signed API, next to
    /// engine-only figures for the same operations on the same token.
    Http(bench_http::HttpBenchArgs),
}

/// Parses arguments, runs the command, and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(LogFormat::Text, false);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        // `call` talks to a running gateway: no configuration file, no token.
        Command::Call(args) => call::run(args),
        Command::Bench(BenchCommand::Http(args)) => {
            let settings = Settings::load(&cli.config)?;
            bench_http::run(&settings, args)
        }
    }
}
