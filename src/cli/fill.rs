//! `fill`: makes a database or a legacy JSON file of N valid records, for benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use talos_kms_server::bench::fill;
use talos_kms_server::store::SqliteStore;

#[derive(clap::Args)]
pub struct Args {
    /// Embedded database to add the records to (created if missing).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "legacy_json",
        conflicts_with = "legacy_json"
    )]
    database: Option<PathBuf>,
    /// Legacy JSON file to write (must not exist).
    #[arg(long, value_name = "FILE")]
    legacy_json: Option<PathBuf>,
    /// How many records.
    #[arg(long)]
    records: u64,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    if let Some(database) = &args.database {
        let store = SqliteStore::open(database)?;
        let report = fill::fill_store(&store, args.records).await?;
        println!(
            "added {} records to {} in {:.1} s",
            report.imported,
            database.display(),
            start.elapsed().as_secs_f64()
        );
    }
    if let Some(file) = &args.legacy_json {
        fill::write_legacy_json(file, args.records)?;
        println!(
            "wrote {} legacy records to {} in {:.1} s",
            args.records,
            file.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
