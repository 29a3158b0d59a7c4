//! `fill`: makes a database or a legacy JSON file of N valid records, for benchmarks.

use anyhow::Context;
use std::io::BufWriter;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use talos_kms_server::bench::{self, fill, fill::FillOptions};
use talos_kms_server::custody;
use talos_kms_server::sealing::ip_text;
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
    /// Bind every record to this client address (as the server sees it), so that `bench`
    /// calling from it can unseal them. Default: a 10.x.y.z address per record.
    #[arg(long, value_name = "IP")]
    ip: Option<IpAddr>,
    /// Write each record's node UUID, sealed blob and passphrase to this new file (mode 0600:
    /// it unlocks the records), for `bench --volumes-from FILE`.
    #[arg(long, value_name = "FILE", requires = "ip")]
    volumes: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let mut volumes = match &args.volumes {
        Some(path) => Some(BufWriter::new(bench::volumes::create(path).with_context(
            || format!("cannot create the volumes file {}", path.display()),
        )?)),
        None => None,
    };
    let options = FillOptions {
        ip: args.ip.map(|ip| ip_text(ip, 0)),
        volumes: volumes.as_mut().map(|out| out as &mut dyn std::io::Write),
    };
    if let Some(database) = &args.database {
        if database.exists() {
            // Its records are not wrapped: a wrapped database would refuse them.
            custody::check_data_keys(&SqliteStore::custody_values_of(database)?, None)
                .context("fill a database that has no key source")?;
        }
        let store = SqliteStore::open(database)?;
        let report = fill::fill_store_with(&store, args.records, options).await?;
        println!(
            "added {} records to {} in {:.1} s",
            report.imported,
            database.display(),
            start.elapsed().as_secs_f64()
        );
    } else if let Some(file) = &args.legacy_json {
        fill::write_legacy_json(file, args.records, options)?;
        println!(
            "wrote {} legacy records to {} in {:.1} s",
            args.records,
            file.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}
