//! `bench`: measure a KMS endpoint the way Talos uses it.

use super::client::Target;
use std::process::ExitCode;
use std::time::Duration;
use talos_kms_server::bench::{self, BenchOptions, ConnectionMode, Mode};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    #[arg(long, value_enum, default_value_t = Mode::Unseal)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = ConnectionMode::Fresh)]
    connection: ConnectionMode,
    /// Calls in flight (closed loop), or the cap on calls in flight (open loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: calls started per second, whatever the server's speed.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to run (default 10), unless --requests is given.
    #[arg(long, value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Number of calls to make.
    #[arg(long)]
    requests: Option<u64>,
    /// Distinct node UUIDs; for unseal and mixed they are sealed before measuring.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Storm: volumes each node unseals.
    #[arg(long, default_value_t = 2)]
    volumes: usize,
    /// Server process to measure CPU time of (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds = text
        .trim_end_matches('s')
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let (text, json) = if args.mode == Mode::Storm {
        let report = bench::storm(client, args.nodes, args.volumes, args.server_pid).await?;
        (report.to_string(), serde_json::to_string(&report)?)
    } else {
        let options = BenchOptions {
            mode: args.mode,
            connection: args.connection,
            concurrency: args.concurrency,
            rate: args.rate,
            duration: args.duration,
            requests: args.requests,
            nodes: args.nodes,
            server_pid: args.server_pid,
        };
        let report = bench::run(client, &options).await?;
        (report.to_string(), serde_json::to_string(&report)?)
    };
    match args.output {
        Output::Table => println!("{text}"),
        Output::Json => println!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
}
