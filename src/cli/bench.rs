//! `bench`: measure a KMS endpoint the way Talos uses it.

use super::client::Target;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use talos_kms_server::bench::{self, BenchOptions, ConnectionMode, Mode};

#[derive(clap::Args)]
#[command(after_help = "\
Records: every seal adds a record to the target's database, for good. seal and mixed add
one per seal; unseal, mixed and storm first seal the volumes they unseal (--nodes, or
--nodes x --volumes for storm). Against a production server, unseal volumes made once:

  talos-kms-server fill --database DB --records 1000 --ip CLIENT_IP --volumes vols.jsonl
  talos-kms-server bench --endpoint URL --mode unseal --volumes-from vols.jsonl

fill adds its records (nodes fill-...) to the server's database file directly, once;
where it cannot, `client seal --output json >> vols.jsonl` makes volumes one at a time.")]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// What to measure (see Records below for what each mode adds to the database).
    #[arg(long, value_enum, default_value_t = Mode::Unseal)]
    mode: Mode,
    /// A new connection per call, as Talos does, or one connection for all calls.
    #[arg(long, value_enum, default_value_t = ConnectionMode::Fresh)]
    connection: ConnectionMode,
    /// Calls in flight (closed loop), or the cap on calls in flight (open loop).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: calls started per second, whatever the server's speed.
    #[arg(long, value_name = "CALLS_PER_S")]
    rate: Option<f64>,
    /// Seconds to run (default 10), unless --requests is given.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Number of calls to make.
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Distinct node UUIDs; for unseal, mixed and storm they are sealed before measuring.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    nodes: usize,
    /// Storm: volumes each node unseals.
    #[arg(long, value_name = "N", default_value_t = 2)]
    volumes: usize,
    /// Unseal and storm: unseal the volumes in FILE (lines of `fill --volumes` or `client
    /// seal --output json`) instead of sealing new ones: adds no record.
    #[arg(long, value_name = "FILE")]
    volumes_from: Option<PathBuf>,
    /// Server process to measure CPU time of (from /proc).
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// A table for people, or one JSON object for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    /// A table.
    Table,
    /// One JSON object on one line.
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
    let volumes = match &args.volumes_from {
        Some(path) => Some(bench::volumes::read(path)?),
        None => None,
    };
    // (report as text, as JSON, whether any call succeeded, the first error)
    let (text, json, succeeded, first_error) = if args.mode == Mode::Storm {
        let report =
            bench::storm(client, args.nodes, args.volumes, volumes, args.server_pid).await?;
        let succeeded = report.volumes_unsealed > 0;
        let first_error = report.first_error.clone();
        (
            report.to_string(),
            serde_json::to_string(&report)?,
            succeeded,
            first_error,
        )
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
            volumes,
        };
        let report = bench::run(client, &options).await?;
        let succeeded = report.calls_ok > 0;
        let first_error = report.first_error.clone();
        (
            report.to_string(),
            serde_json::to_string(&report)?,
            succeeded,
            first_error,
        )
    };
    match args.output {
        Output::Table => println!("{text}"),
        Output::Json => println!("{json}"),
    }
    if succeeded {
        return Ok(ExitCode::SUCCESS);
    }
    match first_error {
        // The table shows it already.
        Some(_) if matches!(args.output, Output::Table) => {
            eprintln!("error: no call succeeded: see the first error above")
        }
        Some(error) => eprintln!("error: no call succeeded; the first error: {error}"),
        None => eprintln!(
            "error: no call succeeded: every unseal answered other bytes than were sealed"
        ),
    }
    Ok(ExitCode::FAILURE)
}
