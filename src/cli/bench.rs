//! `bench`: measure a KMS endpoint the way Talos uses it.

use super::client::Target;
use anyhow::Context;
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
where it cannot, `client seal --output json >> vols.jsonl` makes volumes one at a time.

Storm: Talos nodes after a power cut, as Talos behaves (docs/protocol.md §2): every node
starts at once from its own source address (--sources; on loopback 127.1.0.0/16 by default,
which Linux routes to lo), unseals its volumes one after the other, each call on a fresh
connection with a 10 s deadline (sent as grpc-timeout), and tries a failed call again after
--retry-after (30 s, as Talos). The volumes are sealed first from the same addresses. It
reports the time until every volume is unsealed, calls past their deadline, retries, the
server's CPU time (--server-pid) and peak memory, and the share of that CPU spent on calls
that did not succeed (--metrics, the server's metricsAddress). Pin the server and the client
to a core each, e.g. `taskset -c 0 talos-kms-server ...` and `bench --cpu 1`.")]
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
    /// Server process to measure CPU time (and, for storm, peak memory) of, from /proc.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Storm: each node calls from an address of its own in this network (node n from its
    /// n+1-th address). Default against a loopback endpoint: 127.1.0.0/16; elsewhere, and
    /// with --volumes-from, every node calls from --source-ip or the default route's address.
    #[arg(long, value_name = "CIDR")]
    sources: Option<ipnet::IpNet>,
    /// Storm: how long a node waits before trying a failed call again (Talos: 30 s).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    retry_after: Option<Duration>,
    /// Storm: the server's metrics address (host:port of its metricsAddress), to report the
    /// share of its CPU spent on calls that did not succeed.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Storm: write the volumes unsealed over time to FILE, as CSV (seconds,unsealed, every
    /// 100 ms).
    #[arg(long, value_name = "FILE")]
    timeline: Option<PathBuf>,
    /// Pin this client to one CPU (e.g. the core the server is not pinned to).
    #[arg(long, value_name = "CPU")]
    cpu: Option<usize>,
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

/// Whether the endpoint's host is a loopback address (or `localhost`).
fn is_loopback(client: &talos_kms_server::client::KmsClient) -> bool {
    let host = &client.options().endpoint.host;
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() && ip.is_ipv4())
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds = text
        .trim_end_matches('s')
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// Where storm nodes call from when --sources is not given: addresses of their own on a
/// loopback endpoint, where Linux routes all of 127/8 to lo.
const LOOPBACK_SOURCES: &str = "127.1.0.0/16";
/// The resolution of --timeline.
const TIMELINE_STEP: Duration = Duration::from_millis(100);

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(cpu) = args.cpu {
        bench::pin_to(cpu).map_err(anyhow::Error::msg)?;
    }
    let client = args.target.client()?;
    let volumes = match &args.volumes_from {
        Some(path) => Some(bench::volumes::read(path)?),
        None => None,
    };
    // (report as text, as JSON, whether any call succeeded, the first error)
    let (text, json, succeeded, first_error) = if args.mode == Mode::Storm {
        let sources = match (args.sources, &volumes) {
            (Some(_), Some(_)) => anyhow::bail!(
                "--sources and --volumes-from do not go together: volumes from a file are \
                 bound to the one address they were sealed from (--source-ip)"
            ),
            (Some(sources), None) => Some(sources),
            (None, None) if client.options().source_ip.is_none() && is_loopback(&client) => {
                Some(LOOPBACK_SOURCES.parse()?)
            }
            (None, _) => None,
        };
        let options = bench::StormOptions {
            nodes: args.nodes,
            volumes: args.volumes,
            given: volumes,
            sources,
            retry_after: args.retry_after.unwrap_or(bench::TALOS_RETRY_AFTER),
            server_pid: args.server_pid,
            metrics: args.metrics.clone(),
        };
        let report = bench::storm(client, options).await?;
        if let Some(path) = &args.timeline {
            std::fs::write(path, report.timeline_csv(TIMELINE_STEP))
                .with_context(|| format!("cannot write the timeline {}", path.display()))?;
        }
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
