//! `import-json`: takes a legacy nodeDbFile.json into the database, as start-up does, and
//! says what it did. Safe while the server runs and safe to repeat.

use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::config::Config;
use talos_kms_server::store::legacy_json;
use talos_kms_server::store::{SqliteStore, Store};

#[derive(clap::Args)]
pub struct Args {
    /// The legacy JSON database to import; it is only read.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The embedded database to import into, instead of the one the config names.
    #[arg(long, value_name = "PATH")]
    database: Option<PathBuf>,
    /// Config file whose `database` to import into.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub async fn run(args: Args, global_config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let database = match (args.database, args.config.or(global_config)) {
        (Some(database), _) => database,
        (None, Some(config)) => Config::load(&config)?.database,
        (None, None) => anyhow::bail!("say where to import: --config FILE or --database PATH"),
    };
    let file = legacy_json::read(&args.file)?
        .with_context(|| format!("legacy database {}: no such file", args.file.display()))?;
    let store = SqliteStore::open(&database)?;
    let report = store.import(file).await?;
    println!(
        "imported {} records, skipped {} already present, from {} into {}",
        report.imported,
        report.skipped,
        args.file.display(),
        database.display()
    );
    Ok(ExitCode::SUCCESS)
}
