//! `check`: everything `serve` would use, examined without serving and without writing
//! anything, so that a mistake shows up before a node fails to boot.
//!
//! Each finding has a level: a problem is something that would fail (serve would not start,
//! or nodes would refuse the server); a warning is something that works today but is
//! risky or may fail for some clients.

mod certificate;
mod host;

use crate::config::{Config, ConfigError};
use crate::policy::Mode;
use crate::store::SqliteStore;
use crate::store::legacy_json;
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warning,
    Problem,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    /// What was examined: `config`, `listen`, `key`, `certificate`, `database`…
    pub topic: &'static str,
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

pub struct CheckOptions {
    /// The host nodes put in their endpoint, when the operator names it.
    pub endpoint_host: Option<String>,
}

impl Report {
    fn add(&mut self, topic: &'static str, level: Level, message: impl Into<String>) {
        self.findings.push(Finding {
            topic,
            level,
            message: message.into(),
        });
    }

    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }

    /// 0 all good, 2 warnings only, 1 something that would fail.
    pub fn exit_code(&self) -> u8 {
        match self.worst() {
            Level::Ok | Level::Info => 0,
            Level::Warning => 2,
            Level::Problem => 1,
        }
    }

    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }
}

/// Examines the config at `config_path` and everything it names.
pub async fn run(config_path: &Path, options: &CheckOptions) -> Report {
    let mut report = Report::default();
    let config = match Config::read(config_path) {
        Ok(config) => config,
        Err(ConfigError::Missing(path)) => {
            report.add(
                "config",
                Level::Problem,
                format!(
                    "{} does not exist; `talos-kms-server serve --config {}` writes a \
                     commented default there to edit",
                    path.display(),
                    path.display()
                ),
            );
            return report;
        }
        Err(error) => {
            report.add("config", Level::Problem, error.to_string());
            return report;
        }
    };
    report.add(
        "config",
        Level::Ok,
        format!("{}: valid", config.path.display()),
    );
    host::readable_by_others(&mut report, "config", &config.path);
    host::listen(&mut report, config.listen);
    certificate::check(&mut report, &config, options).await;
    database(&mut report, &config);
    policy(&mut report, &config);
    report
}

/// Says who may seal and unseal, so that an operator sees the policy the server will apply.
fn policy(report: &mut Report, config: &Config) {
    let rules = &config.policy;
    for (operation, networks, mode) in [
        ("seal", &rules.seal_networks, rules.seal),
        ("unseal", &rules.unseal_networks, rules.unseal),
    ] {
        let from = networks
            .as_ref()
            .map_or_else(|| "any address".to_string(), |n| n.to_string());
        let how = match mode {
            Mode::Open => "open",
            Mode::Window => "only while a window is open (`window open`)",
            Mode::Approve => "only for approved nodes (`pending approve`)",
        };
        report.add(
            "policy",
            Level::Info,
            format!("{operation}: {how}, from {from}"),
        );
    }
    report.add(
        "policy",
        Level::Info,
        format!(
            "rate limits: {} per address, {} in all; at most {} records per node and {} new              records an hour (0: no limit)",
            rules.per_address,
            rules.global,
            rules.max_records_per_node,
            rules.max_new_records_per_hour
        ),
    );
    let unlimited = rules.per_address.per_second == 0
        && rules.global.per_second == 0
        && rules.max_new_records_per_hour == 0
        && rules.seal == Mode::Open
        && rules.seal_networks.is_none();
    if unlimited {
        report.add(
            "policy",
            Level::Warning,
            "nothing limits seals: anyone who reaches the port can fill the database; set \
             sealAllowedNetworks, a rate limit or maxNewRecordsPerHour",
        );
    }
}

fn database(report: &mut Report, config: &Config) {
    let legacy = config
        .node_db_file
        .as_deref()
        .map(|path| (path, legacy_json::read(path)));
    let legacy_nonces: Vec<_> = match &legacy {
        Some((_, Ok(Some(batch)))) => batch.records.iter().map(|r| r.nonce).collect(),
        _ => Vec::new(),
    };
    let path = &config.database;
    let mut missing = legacy_nonces.len();
    if !host::database_location(report, path) {
        // Already reported: where it is cannot hold a database.
    } else if path.exists() {
        match SqliteStore::inspect(path, &legacy_nonces) {
            Ok(found) => {
                missing = found.missing;
                let upgrade = if found.schema_version < found.current_version {
                    format!(
                        "; `serve` upgrades its schema from version {} to {}",
                        found.schema_version, found.current_version
                    )
                } else {
                    String::new()
                };
                report.add(
                    "database",
                    Level::Ok,
                    format!("{}: {} records{upgrade}", path.display(), found.records),
                );
            }
            Err(error) => report.add("database", Level::Problem, error.to_string()),
        }
    } else {
        report.add(
            "database",
            Level::Ok,
            format!(
                "{}: does not exist yet; the server creates it at start",
                path.display()
            ),
        );
    }

    host::note_if_checked_as_root(report);

    match legacy {
        None => {}
        Some((path, Ok(None))) => report.add(
            "nodeDbFile",
            Level::Ok,
            format!("{}: absent, nothing to take over", path.display()),
        ),
        Some((path, Ok(Some(batch)))) => report.add(
            "nodeDbFile",
            Level::Ok,
            format!(
                "{}: {} legacy records, {missing} not yet in the database",
                path.display(),
                batch.records.len()
            ),
        ),
        Some((_, Err(error))) => report.add("nodeDbFile", Level::Problem, error.to_string()),
    }
}
