//! `db`: back up the database while the server serves, verify a backup, and restore one
//! while the server is stopped (every copy goes through SQLite's online backup API; a
//! PostgreSQL database is backed up with pg_dump); move the records between SQLite and
//! PostgreSQL (`migrate`).

use super::Output;
use super::admin::{Admin, AdminArgs, admin_event, config_path, print, refuse_existing};
use super::progress::Progress;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talos_kms_server::audit::AuditLog;
use talos_kms_server::config::Config;
use talos_kms_server::custody::{self, DATA_KEY_PREFIX, KeySourceConfig};
use talos_kms_server::store::migrate::{self, MigrationReport};
use talos_kms_server::store::{self, Database, PgOptions, PgStore, SqliteStore};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    /// `text` for people; `json` prints the summary as one JSON object, for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Write a consistent copy of the database to FILE (mode 0600) while the server serves.
    Backup {
        /// Where to write the copy: a new file (see --force), not beside the database.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Check a backup, or without FILE the database, changing nothing: integrity, schema and
    /// every record; with a `keySource`, that it unwraps the data keys and that every row
    /// verifies (a PostgreSQL database: that alone). Exit 1 on any problem.
    Verify {
        /// The backup (or database file) to check; the config's database without it.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Replace the database's content with a verified backup. The server must be stopped;
    /// records the database held are first kept in `<database>.replaced-<time>`.
    Restore {
        /// The backup to restore, as `db backup` wrote it.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace a database that holds records.
        #[arg(long)]
        force: bool,
    },
    /// Copy every record, approval and window from one database to another (SQLite file
    /// or postgres:// URL), then check count and checksum. Idempotent and resumable: run it
    /// again after an interruption. Stop the servers first, or seals made meanwhile are
    /// left behind (a second run copies them).
    Migrate {
        /// Where the records are: an SQLite file or a postgres:// URL.
        #[arg(long, value_name = "PATH|URL")]
        from: String,
        /// Where they go: an SQLite file (created when missing) or a postgres:// URL (the
        /// database must exist; its tables are made).
        #[arg(long, value_name = "PATH|URL")]
        to: String,
        /// Password of the source PostgreSQL database, when its URL and PGPASSWORD lack it.
        #[arg(long, value_name = "FILE")]
        from_password_file: Option<PathBuf>,
        /// Password of the target PostgreSQL database, when its URL and PGPASSWORD lack it.
        #[arg(long, value_name = "FILE")]
        to_password_file: Option<PathBuf>,
    },
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let config = args.admin.given(config);
    let required = || config_path(config.clone(), None);
    match args.action {
        Action::Backup { file, force } => {
            backup(&required()?, &file, force, args.output, command_line).await
        }
        Action::Verify { file } => {
            let config = match (&file, &config) {
                (Some(_), None) => None,
                _ => Some(Config::read(&required()?)?),
            };
            let key_source = config.as_ref().and_then(|c| c.key_source.clone());
            let database = match (file, config) {
                (Some(file), _) => Database::Sqlite(file),
                (None, Some(config)) => config.database,
                (None, None) => unreachable!("a config is read when no FILE is given"),
            };
            let file = match (&database, &key_source) {
                (Database::Postgres(_), Some(_)) => None,
                _ => Some(sqlite_only(database.clone(), "verify")?),
            };
            let integrity = file
                .as_deref()
                .map(|file| verify_integrity(file, args.output));
            let custody = match key_source {
                Some(source) if integrity.as_ref().is_none_or(|i| i.sound) => {
                    Some(verify_custody(&database, &source).await?)
                }
                _ => None,
            };
            Ok(report_verification(
                integrity.as_ref(),
                custody.as_ref(),
                args.output,
            ))
        }
        Action::Restore { file, force } => {
            restore(&required()?, &file, force, args.output, command_line)
        }
        Action::Migrate {
            from,
            to,
            from_password_file,
            to_password_file,
        } => {
            let from = database_argument("--from", &from, from_password_file)?;
            let to = database_argument("--to", &to, to_password_file)?;
            migrate(&from, &to, config.as_deref(), args.output, command_line).await
        }
    }
}

/// Backups, verification and restores are SQLite's; PostgreSQL has its own tools.
fn sqlite_only(database: Database, action: &str) -> anyhow::Result<PathBuf> {
    match database {
        Database::Sqlite(path) => Ok(path),
        Database::Postgres(options) => anyhow::bail!(
            "`db {action}` works on SQLite files; the database is PostgreSQL ({options}): back \
             it up with pg_dump (e.g. `pg_dump -Fc -f kms.dump DBNAME`) or your PostgreSQL \
             backups, and restore with pg_restore; `db migrate --from URL --to FILE` copies it \
             into an SQLite file that `db verify` checks"
        ),
    }
}

fn database_argument(
    flag: &str,
    text: &str,
    password_file: Option<PathBuf>,
) -> anyhow::Result<Database> {
    let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    match Database::parse(text, &base).map_err(|problem| anyhow::anyhow!("{flag}: {problem}"))? {
        Database::Postgres(mut options) => {
            options.password_file = password_file;
            Ok(Database::Postgres(options))
        }
        Database::Sqlite(_) if password_file.is_some() => {
            anyhow::bail!("{flag}-password-file is for a postgres:// URL, not an SQLite file")
        }
        sqlite => Ok(sqlite),
    }
}

fn same_database(a: &Database, b: &Database) -> bool {
    match (a, b) {
        (Database::Sqlite(a), Database::Sqlite(b)) => {
            a == b
                || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)),
                            (Ok(a), Ok(b)) if a == b)
        }
        (Database::Postgres(a), Database::Postgres(b)) => same_postgres(a, b),
        _ => false,
    }
}

fn same_postgres(a: &PgOptions, b: &PgOptions) -> bool {
    a.to_string() == b.to_string()
}

async fn migrate(
    from: &Database,
    to: &Database,
    config: Option<&Path>,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    if same_database(from, to) {
        anyhow::bail!("--from and --to name the same database ({from})");
    }
    let audit = match config {
        Some(config) => Some(AuditLog::open(&Config::read(config)?.audit_log, None)?),
        None => None,
    };
    let source = store::open_existing(from)
        .await
        .with_context(|| format!("cannot open the source {from}"))?;
    let target = store::open(to)
        .await
        .with_context(|| format!("cannot open the target {to}"))?
        .store;
    let started = std::time::Instant::now();
    let mut progress = Phases::default();
    let report = migrate::migrate(
        source.as_ref(),
        target.as_ref(),
        &mut |what, done, total| progress.update(what, done, total),
    )
    .await;
    progress.finish();
    let report: MigrationReport = report?;
    let mut summary = format!(
        "migrated {} records from {from} to {to} ({} copied now, {} were there already) in \
         {:.1} s; count and checksum {} match",
        report.records,
        report.copied,
        report.records - report.copied,
        started.elapsed().as_secs_f64(),
        &report.checksum[..16],
    );
    summary.push_str(&format!(
        "; {} approvals ({} copied), {} windows ({} copied)",
        report.approvals, report.approvals_copied, report.windows, report.windows_copied
    ));
    if report.target_only > 0 {
        summary.push_str(&format!(
            "; the target also holds {} records the source does not",
            report.target_only
        ));
    }
    if let Some(audit) = audit {
        audit
            .write_durably(&admin_event(command_line).detail(&summary))
            .context("the migration is done, but its audit line could not be written")?;
    }
    print(
        output,
        &summary,
        serde_json::json!({
            "from": from.to_string(),
            "to": to.to_string(),
            "records": report.records,
            "copied": report.copied,
            "target_only": report.target_only,
            "checksum": report.checksum,
            "approvals": report.approvals,
            "approvals_copied": report.approvals_copied,
            "windows": report.windows,
            "windows_copied": report.windows_copied,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
    Ok(ExitCode::SUCCESS)
}

async fn backup(
    config: &Path,
    file: &Path,
    force: bool,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    sqlite_only(Config::read(config)?.database, "backup")?;
    refuse_existing(file, force)?;
    let admin = Admin::open(config).await?;
    let database = sqlite_only(admin.config.database.clone(), "backup")?;
    let store = SqliteStore::open_existing(&database)?;
    let mut progress = Phases::default();
    let report = store.backup(file, force, &mut |what, done, total| {
        progress.update(what, done, total)
    })?;
    progress.finish();
    let summary = format!(
        "backed up {} records to {} ({:.1} MiB)",
        report.records,
        file.display(),
        report.bytes as f64 / (1024.0 * 1024.0)
    );
    admin.audit(admin_event(command_line).detail(&summary))?;
    print(
        output,
        &summary,
        serde_json::json!({
            "file": file.display().to_string(),
            "records": report.records,
            "bytes": report.bytes,
        }),
    );
    Ok(ExitCode::SUCCESS)
}

/// The integrity check of an SQLite file, told as it is found (text) or kept for the one
/// JSON object.
struct Integrity {
    sound: bool,
    json: serde_json::Value,
}

fn verify_integrity(file: &Path, output: Output) -> Integrity {
    let mut progress = Phases::default();
    let verification = SqliteStore::verify(file, &mut |what, done, total| {
        progress.update(what, done, total)
    });
    progress.finish();
    let sound = verification.is_sound();
    if let Output::Text = output {
        for warning in &verification.warnings {
            println!("warning: {warning}");
        }
        for problem in &verification.problems {
            println!("problem: {problem}");
        }
        if verification.more_problems > 0 {
            println!("problem: {} more, not listed", verification.more_problems);
        }
        let found = verification.problems.len() as u64 + verification.more_problems;
        if sound {
            println!(
                "{}: sound, {} records, schema version {}",
                file.display(),
                verification.records,
                verification.schema_version.unwrap_or_default()
            );
        } else {
            let problems = if found == 1 { "problem" } else { "problems" };
            println!(
                "{}: {found} {problems} found; do not rely on it (restore refuses it)",
                file.display()
            );
        }
    }
    Integrity {
        sound,
        json: serde_json::json!({
            "file": file.display().to_string(),
            "sound": sound,
            "records": verification.records,
            "schema_version": verification.schema_version,
            "problems": verification.problems,
            "more_problems": verification.more_problems,
            "warnings": verification.warnings,
        }),
    }
}

/// What the key source says of a database: the data keys it unwraps, and the rows that fail
/// their authentication.
struct CustodyCheck {
    data_keys: Vec<u32>,
    /// (table, id, why)
    forged: Vec<(&'static str, i64, String)>,
    /// Why the rows were not checked, when they were not.
    not_checked: Option<String>,
}

/// Opens the database's data keys with the key source and checks every row, writing
/// nothing: a database without data keys (or with an older schema) is only described.
async fn verify_custody(
    database: &Database,
    source: &KeySourceConfig,
) -> anyhow::Result<CustodyCheck> {
    let not_checked = |why: String| CustodyCheck {
        data_keys: Vec::new(),
        forged: Vec::new(),
        not_checked: Some(why),
    };
    // Opening a store brings its schema up to date: only one that is already is opened.
    let (schema, current) = match database {
        Database::Sqlite(path) => {
            let found = SqliteStore::inspect(path, &[])?;
            (Some(found.schema_version), found.current_version)
        }
        Database::Postgres(options) => {
            let found = PgStore::inspect(options).await?;
            (found.schema_version, found.current_version)
        }
    };
    if schema.is_none_or(|version| version < current) {
        return Ok(not_checked(
            "its schema is older than this build's, so nothing in it is wrapped yet (the \
             server wraps the records after upgrading it)"
                .into(),
        ));
    }
    if matches!(source, KeySourceConfig::Shamir { .. }) {
        return Ok(not_checked(
            "a shamir key source opens only in the running server, with operators' shares".into(),
        ));
    }
    let store = store::open_existing(database)
        .await
        .with_context(|| format!("cannot open {database}"))?;
    let values = store.custody_values().await?;
    if !values
        .iter()
        .any(|(name, _)| name.starts_with(DATA_KEY_PREFIX))
    {
        store.close().await?;
        return Ok(not_checked(
            "it holds no data key yet: nothing is wrapped (the server makes the first data \
             key at start and wraps the records while it serves)"
                .into(),
        ));
    }
    let metrics = std::sync::Arc::new(talos_kms_server::metrics::Metrics::new());
    let guarded = custody::guard(std::sync::Arc::clone(&store), Some(source), metrics)
        .await
        .with_context(|| {
            format!(
                "{}: cannot open the data keys of {database}",
                source.describe()
            )
        })?;
    let custodian = guarded
        .custodian
        .context("a configured key source always has a custodian")?;
    let forged = custodian.verify_all().await?;
    let data_keys = custodian.versions();
    store.close().await?;
    Ok(CustodyCheck {
        data_keys,
        forged,
        not_checked: None,
    })
}

/// A forged row as the operator finds it: `records 12`, `windows` (one per operation).
fn row_name(table: &str, id: i64) -> String {
    if table == "windows" {
        table.to_string()
    } else {
        format!("{table} {id}")
    }
}

fn report_verification(
    integrity: Option<&Integrity>,
    custody: Option<&CustodyCheck>,
    output: Output,
) -> ExitCode {
    let sound = integrity.is_none_or(|i| i.sound) && custody.is_none_or(|c| c.forged.is_empty());
    match output {
        Output::Json => {
            let mut json = integrity.map_or_else(|| serde_json::json!({}), |i| i.json.clone());
            json["sound"] = sound.into();
            if let Some(custody) = custody {
                json["custody"] = serde_json::json!({
                    "data_keys": custody.data_keys,
                    "not_checked": custody.not_checked,
                    "forged": custody.forged.iter().map(|(table, id, problem)| {
                        serde_json::json!({"table": table, "id": id, "problem": problem})
                    }).collect::<Vec<_>>(),
                });
            }
            println!("{json}");
        }
        Output::Text => {
            if let Some(custody) = custody {
                print_custody(custody);
            }
        }
    }
    if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_custody(custody: &CustodyCheck) {
    if let Some(why) = &custody.not_checked {
        println!("authentication: not checked: {why}");
        return;
    }
    for (table, id, why) in &custody.forged {
        println!("problem: {}: {why}", row_name(table, *id));
    }
    let versions: Vec<String> = custody.data_keys.iter().map(|v| format!("v{v}")).collect();
    match custody.forged.len() {
        0 => println!(
            "authentication: the key source unwraps data keys {}, and every row verifies",
            versions.join(", ")
        ),
        forged => println!(
            "authentication: {forged} {} failed (changed behind the server's back, or written \
             under another key): the server answers each as an unknown record, a revoked \
             binding, a pending request or a closed window. Find out who wrote to the \
             database; an approval or a window is made whole by deciding it again (`pending`, \
             `window`), a record or binding by restoring a backup",
            if forged == 1 { "row" } else { "rows" }
        ),
    }
}

fn restore(
    config_path: &Path,
    file: &Path,
    force: bool,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let config = Config::read(config_path)?;
    let database = &sqlite_only(config.database.clone(), "restore")?;
    // A backup whose records the configured key source cannot open is refused before the
    // database is touched.
    custody::check_data_keys(
        &SqliteStore::custody_values_of(file)?,
        config.key_source.as_ref(),
    )
    .with_context(|| format!("{} cannot be restored under this config", file.display()))?;
    let mut progress = Phases::default();
    let report = SqliteStore::restore(file, database, force, &mut |what, done, total| {
        progress.update(what, done, total)
    })?;
    progress.finish();
    let mut summary = format!(
        "restored {} records from {} into {}",
        report.records,
        file.display(),
        database.display()
    );
    match &report.replaced {
        Some((kept, records)) => summary.push_str(&format!(
            "; the {records} records it held before are kept in {}",
            kept.display()
        )),
        None if report.created => summary.push_str(" (a new database)"),
        None => {}
    }
    AuditLog::open(&config.audit_log, None)
        .and_then(|audit| audit.write_durably(&admin_event(command_line).detail(&summary)))
        .context("the restore took effect, but its audit line could not be written")?;
    print(
        output,
        &summary,
        serde_json::json!({
            "file": file.display().to_string(),
            "database": database.display().to_string(),
            "records": report.records,
            "created": report.created,
            "replaced": report.replaced.as_ref().map(|(kept, records)| serde_json::json!({
                "file": kept.display().to_string(),
                "records": records,
            })),
        }),
    );
    Ok(ExitCode::SUCCESS)
}

/// One progress line per kind of work ("records checked", then "pages restored").
#[derive(Default)]
struct Phases {
    current: Option<(&'static str, Progress)>,
}

impl Phases {
    fn update(&mut self, what: &'static str, done: u64, total: u64) {
        if self
            .current
            .as_ref()
            .is_none_or(|(shown, _)| *shown != what)
        {
            self.finish();
            self.current = Some((what, Progress::new(what, Some(total))));
        }
        if let Some((_, progress)) = &mut self.current {
            progress.update(done);
        }
    }

    fn finish(&mut self) {
        if let Some((_, progress)) = self.current.take() {
            progress.finish();
        }
    }
}
