//! `export-json`: writes the records as the legacy server's nodeDbFile.json, so that a
//! migration can be undone. Safe while the server runs.

use super::Output;
use super::admin::{Admin, admin_event, config_path, print, refuse_existing};
use super::progress::Progress;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use talos_kms_server::custody;
use talos_kms_server::store::legacy_json::LegacyExport;
use talos_kms_server::store::{self, Database, RecordFilter, SqliteStore, Store};

/// Records read per query: bounds memory for exports of millions.
const PAGE: usize = 10_000;

#[derive(clap::Args)]
pub struct Args {
    /// The legacy JSON file to write (mode 0600).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Config file of the server (YAML, legacy keys); the database is found there, and the
    /// export goes to its audit trail.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The database to export (an SQLite path or a postgres:// URL), instead of the one a
    /// config names; nothing is audited then.
    #[arg(long, value_name = "PATH|URL", conflicts_with = "config")]
    database: Option<String>,
    /// Export revoked records too. The legacy format cannot say a record is revoked: they
    /// unseal again wherever the file is imported.
    #[arg(long)]
    include_revoked: bool,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// `text` for people; `json` prints the summary as one JSON object, for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    refuse_existing(&args.file, args.force)?;
    let (database, store, admin) = match args.database {
        Some(database) => {
            let database = Database::parse(&database, Path::new("."))
                .map_err(|problem| anyhow::anyhow!("--database: {problem}"))?;
            let store = store::open_existing(&database).await?;
            // Wrapped records open only under their key source, which a config names.
            let metrics = Arc::new(talos_kms_server::metrics::Metrics::new());
            let store = custody::guard(store, None, metrics)
                .await
                .context("export it with --config, whose keySource opens them")?
                .store;
            (database, store, None)
        }
        None => {
            let admin = Admin::open(&config_path(args.config, config)?).await?;
            let store: Arc<dyn Store> = Arc::clone(&admin.store);
            (admin.config.database.clone(), store, Some(admin))
        }
    };
    if let Some(database) = database.sqlite_path()
        && SqliteStore::is_part_of(database, &args.file)
    {
        anyhow::bail!(
            "{} is the database itself (or one of its files); export to another file",
            args.file.display()
        );
    }
    let total = store.count().await?;
    let mut out = LegacyExport::create(&args.file, args.force)?;
    let mut progress = Progress::new("records exported", Some(total));
    let (mut after, mut read, mut exported, mut revoked) = (0, 0, 0, 0);
    loop {
        let page = store.export(&RecordFilter::default(), after, PAGE).await?;
        for record in &page {
            if record.info.revoked_at.is_some() {
                revoked += 1;
                if !args.include_revoked {
                    continue;
                }
            }
            out.write(record)?;
            exported += 1;
        }
        read += page.len() as u64;
        progress.update(read);
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.info.id,
            _ => break,
        }
    }
    progress.finish();
    let bytes = out.finish()?;
    let revoked_note = if args.include_revoked {
        format!("{revoked} revoked included")
    } else {
        format!("{revoked} revoked left out")
    };
    let summary = format!(
        "exported {exported} records ({revoked_note}) to {}",
        args.file.display()
    );
    if let Some(admin) = admin {
        admin.audit(admin_event(command_line).detail(&summary))?;
    }
    print(
        args.output,
        &summary,
        serde_json::json!({
            "file": args.file.display().to_string(),
            "records": exported,
            "revoked": revoked,
            "revoked_included": args.include_revoked,
            "bytes": bytes,
        }),
    );
    Ok(ExitCode::SUCCESS)
}
