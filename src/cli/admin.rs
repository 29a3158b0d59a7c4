//! What every admin command opens: the config (never written), the database it names
//! (never created), and the audit trail its actions go to.

use super::Output;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use talos_kms_server::audit::{AuditLog, Event};
use talos_kms_server::config::Config;
use talos_kms_server::custody::{self, KeySourceConfig};
use talos_kms_server::store::{self, Store};

pub struct Admin {
    pub config: Config,
    pub store: Arc<dyn Store>,
    audit: AuditLog,
}

/// The arguments every admin command (`keys`, `window`, `pending`) takes.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Config file of the server (YAML, legacy keys); the database is found there.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
}

impl AdminArgs {
    /// The config file given as the command's own `--config` or before the command.
    pub fn given(self, global: Option<PathBuf>) -> Option<PathBuf> {
        self.config.or(global)
    }

    pub fn config_path(self, global: Option<PathBuf>) -> anyhow::Result<PathBuf> {
        config_path(self.config, global)
    }
}

/// The config an admin command was given, as its own `--config` or before the command.
pub fn config_path(own: Option<PathBuf>, global: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    own.or(global)
        .context("--config FILE is required: the server's config names the database")
}

/// `--output` of an admin command that prints what it found or did.
#[derive(clap::Args, Clone, Copy)]
pub struct OutputArg {
    /// `text` for people; `json` for scripts (a listing prints one object per line).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

impl Admin {
    /// Opens the database beside running servers (SQLite allows it, PostgreSQL is made for
    /// it: changes are seen by every server's next request).
    pub async fn open(config_path: &Path) -> anyhow::Result<Admin> {
        let config = Config::read(config_path)?;
        let store = store::open_existing(&config.database).await?;
        // Its own metrics: an admin command serves none.
        let metrics = Arc::new(talos_kms_server::metrics::Metrics::new());
        let guarded = custody::guard(store, config.key_source.as_ref(), metrics).await?;
        if let (Some(KeySourceConfig::Shamir { .. }), Some(custodian)) =
            (&config.key_source, &guarded.custodian)
        {
            custodian.keys_in_server();
        }
        let store = guarded.store;
        let audit = AuditLog::open(&config.audit_log, None)?;
        Ok(Admin {
            config,
            store,
            audit,
        })
    }

    /// Writes the action's audit line and makes it durable: an admin change that cannot be
    /// audited is reported as a failure, though it took effect.
    pub fn audit(&self, event: Event) -> anyhow::Result<()> {
        self.audit
            .write_durably(&event)
            .context("the change took effect, but its audit line could not be written")
    }
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
