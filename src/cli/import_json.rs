//! `import-json`: takes a legacy nodeDbFile.json into the database, as start-up does, and
//! says what it did. Safe while the server runs and safe to repeat.

use super::Output;
use super::progress::Progress;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talos_kms_server::audit::{AuditLog, Event};
use talos_kms_server::config::Config;
use talos_kms_server::custody;
use talos_kms_server::store::legacy_json;
use talos_kms_server::store::{self, Database, ImportBatch, ImportReport};

/// Records per transaction: progress to show, and no single huge commit.
const CHUNK: usize = 10_000;

#[derive(clap::Args)]
pub struct Args {
    /// The legacy JSON database to import; it is only read.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The database to import into (an SQLite path or a postgres:// URL), instead of the
    /// one the config names.
    #[arg(long, value_name = "PATH|URL")]
    database: Option<String>,
    /// Config file whose `database` to import into (the import goes to its audit trail).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// `text` for people, `json` for scripts: the summary as one object.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub async fn run(
    args: Args,
    global_config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let (database, audit, key_source) = match (args.database, args.config.or(global_config)) {
        (Some(database), _) => (
            Database::parse(&database, Path::new("."))
                .map_err(|problem| anyhow::anyhow!("--database: {problem}"))?,
            None,
            None,
        ),
        (None, Some(config)) => {
            let config = Config::read(&config)?;
            let audit = AuditLog::open(&config.audit_log, None)?;
            (config.database, Some(audit), config.key_source)
        }
        (None, None) => anyhow::bail!("say where to import: --config FILE or --database PATH"),
    };
    let file = legacy_json::read(&args.file)?
        .with_context(|| format!("legacy database {}: no such file", args.file.display()))?;
    let store = store::open(&database).await?.store;
    // Under the config's key source the records are wrapped as they come in; without a
    // config, a database whose records are wrapped is refused (they would be forgeries there).
    let metrics = std::sync::Arc::new(talos_kms_server::metrics::Metrics::new());
    let store = custody::guard(store, key_source.as_ref(), metrics)
        .await
        .context("import with --config, whose keySource wraps them")?
        .store;
    let total = file.records.len();
    let mut progress = Progress::new("imported", Some(total as u64));
    let mut report = ImportReport::default();
    let mut chunks = file.records.chunks(CHUNK).peekable();
    while let Some(chunk) = chunks.next() {
        // The fingerprint with the last chunk: an interrupted import is not taken as done.
        let last = chunks.peek().is_none();
        let done = store
            .import(ImportBatch {
                records: chunk.to_vec(),
                fingerprint: file.fingerprint.clone().filter(|_| last),
            })
            .await?;
        report.imported += done.imported;
        report.skipped += done.skipped;
        progress.update((report.imported + report.skipped) as u64);
    }
    progress.finish();
    let summary = format!(
        "imported {} records, skipped {} already present, from {} into {}",
        report.imported,
        report.skipped,
        args.file.display(),
        database
    );
    if let Some(audit) = audit {
        audit
            .write_durably(&Event::admin(&command_line[0], &command_line[1..]).detail(&summary))
            .context("the records were imported, but the audit line could not be written")?;
    }
    match args.output {
        Output::Text => println!("{summary}"),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "imported": report.imported,
                "skipped": report.skipped,
                "file": args.file,
                "database": database.to_string(),
            })
        ),
    }
    Ok(ExitCode::SUCCESS)
}
