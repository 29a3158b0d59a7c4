//! `db`: back up the database while the server serves, verify a backup, and restore one
//! while the server is stopped. Every copy goes through SQLite's online backup API.

use super::Output;
use super::admin::{Admin, config_path};
use super::progress::Progress;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talos_kms_server::audit::{AuditLog, Event};
use talos_kms_server::config::Config;
use talos_kms_server::store::SqliteStore;

#[derive(clap::Args)]
pub struct Args {
    /// Config file of the server (YAML, legacy keys); the database is found there.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
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
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Check a backup, or without FILE the database, changing nothing: integrity, schema and
    /// every record. Exit 1 on any problem.
    Verify {
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Replace the database's content with a verified backup. The server must be stopped;
    /// records the database held are first kept in `<database>.replaced-<time>`.
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Replace a database that holds records.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let config = args.config.or(config);
    let required = || config_path(config.clone(), None);
    match args.action {
        Action::Backup { file, force } => {
            backup(&required()?, &file, force, args.output, command_line)
        }
        Action::Verify { file } => {
            let file = match file {
                Some(file) => file,
                None => Config::read(&required()?)?.database,
            };
            verify(&file, args.output)
        }
        Action::Restore { file, force } => {
            restore(&required()?, &file, force, args.output, command_line)
        }
    }
}

fn backup(
    config: &Path,
    file: &Path,
    force: bool,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    refuse_existing(file, force)?;
    let admin = Admin::open(config)?;
    let mut progress = Phases::default();
    let report = admin.store.backup(file, force, &mut |what, done, total| {
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

fn verify(file: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let mut progress = Phases::default();
    let verification = SqliteStore::verify(file, &mut |what, done, total| {
        progress.update(what, done, total)
    });
    progress.finish();
    let sound = verification.is_sound();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(),
                "sound": sound,
                "records": verification.records,
                "schema_version": verification.schema_version,
                "problems": verification.problems,
                "more_problems": verification.more_problems,
            })
        ),
        Output::Text => {
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
    }
    Ok(if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn restore(
    config_path: &Path,
    file: &Path,
    force: bool,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let config = Config::read(config_path)?;
    let database = &config.database;
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

/// Refuses early, before any work, to overwrite a file without `--force`.
pub(super) fn refuse_existing(file: &Path, force: bool) -> anyhow::Result<()> {
    if !force && file.symlink_metadata().is_ok() {
        anyhow::bail!(
            "{} exists; choose another name, or add --force to replace it",
            file.display()
        );
    }
    Ok(())
}

/// The admin command as typed, for the audit trail (its arguments hold no secrets).
pub(super) fn admin_event(command_line: &[String]) -> Event {
    match command_line.split_first() {
        Some((command, args)) => Event::admin(command, args),
        None => Event::admin("", &[]),
    }
}

/// The summary line, or the same facts as one JSON object.
pub(super) fn print(output: Output, summary: &str, json: serde_json::Value) {
    match output {
        Output::Text => println!("{summary}"),
        Output::Json => println!("{json}"),
    }
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
