//! `check`: everything `serve` would use, examined without serving and without writing
//! anything, so that a mistake shows up before a node fails to boot.
//!
//! Each finding has a level: a problem is something that would fail (serve would not start,
//! or nodes would refuse the server); a warning is something that works today but is
//! risky or may fail for some clients.

mod certificate;
mod custody;
mod host;

use crate::config::{Config, ConfigError};
use crate::policy::Mode;
use crate::server::Purpose;
use crate::store::legacy_json;
use crate::store::{Database, PgStore, SqliteStore};
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
    host::listen(&mut report, config.listen, Purpose::Kms);
    if let Some(metrics) = config.metrics_address {
        host::listen(&mut report, metrics, Purpose::Metrics);
    }
    certificate::check(&mut report, &config, options).await;
    database(&mut report, &config).await;
    policy(&mut report, &config);
    for source in &config.take_over_sources {
        report.add(
            "takeOver",
            Level::Info,
            format!("unseals blobs of {source}"),
        );
    }
    custody::check(&mut report, &config).await;
    audit_key(&mut report, &config);
    report
}

/// Whether the audit trail's checkpoints are keyed: without a key, whoever can write the
/// trail can rewrite it and recompute every hash. Said, not a warning: a warning makes
/// every setup without a key exit 2.
fn audit_key(report: &mut Report, config: &Config) {
    match &config.audit_key_file {
        None => report.add(
            "audit",
            Level::Info,
            "the audit trail is not keyed: its hash chain shows careless edits, but whoever can \
             write it can recompute it; set auditKeyFile and run `talos-kms-server audit \
             init-key --config FILE`",
        ),
        Some(path) => match crate::audit::chain::read_key_file(path) {
            Ok(_) => report.add(
                "audit",
                Level::Ok,
                format!("checkpoints keyed with {}", path.display()),
            ),
            Err(problem) => report.add("audit", Level::Problem, problem),
        },
    }
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
            "rate limits: {} per address, {} in all; at most {} records per node and {} new \
             records an hour (0: no limit)",
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

async fn database(report: &mut Report, config: &Config) {
    let legacy = config
        .node_db_file
        .as_deref()
        .map(|path| (path, legacy_json::read(path)));
    let legacy_nonces: Vec<_> = match &legacy {
        Some((_, Ok(Some(batch)))) => batch.records.iter().map(|r| r.nonce).collect(),
        _ => Vec::new(),
    };
    let mut missing = Some(legacy_nonces.len());
    match &config.database {
        Database::Sqlite(path) => {
            if !host::database_location(report, path) {
                // Already reported: where it is cannot hold a database.
            } else if path.exists() {
                match SqliteStore::inspect(path, &legacy_nonces) {
                    Ok(found) => {
                        missing = Some(found.missing);
                        report.add(
                            "database",
                            Level::Ok,
                            format!(
                                "{}: {} records{}",
                                path.display(),
                                found.records,
                                upgrade_note(found.schema_version, found.current_version)
                            ),
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
        }
        Database::Postgres(options) => {
            postgres(report, config, options).await;
            // Legacy records are looked up only in an SQLite file.
            missing = None;
        }
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
            match missing {
                Some(missing) => format!(
                    "{}: {} legacy records, {missing} not yet in the database",
                    path.display(),
                    batch.records.len()
                ),
                None => format!(
                    "{}: {} legacy records; the server imports those not yet in the database",
                    path.display(),
                    batch.records.len()
                ),
            },
        ),
        Some((_, Err(error))) => report.add("nodeDbFile", Level::Problem, error.to_string()),
    }
}

fn upgrade_note(version: usize, current: usize) -> String {
    if version < current {
        format!("; `serve` upgrades its schema from version {version} to {current}")
    } else {
        String::new()
    }
}

/// A PostgreSQL database: reachable with the configured password and TLS, and which
/// schema it has. Nothing is written.
async fn postgres(report: &mut Report, config: &Config, options: &crate::store::PgOptions) {
    if options.url_has_password() {
        report.add(
            "database",
            Level::Warning,
            format!(
                "the URL in {} holds PostgreSQL's password; move it to `passwordFile` (mode \
                 0600) or PGPASSWORD",
                config.path.display()
            ),
        );
    }
    if let Some(file) = &options.password_file {
        host::readable_by_others(report, "database", file);
    }
    if matches!(
        options.sslmode,
        crate::store::postgres::SslMode::Disable | crate::store::postgres::SslMode::Prefer
    ) {
        report.add(
            "database",
            Level::Info,
            format!(
                "sslmode={}: the connection to PostgreSQL is not authenticated; use \
                 sslmode=verify-full (with sslrootcert= for a private CA)",
                options.sslmode.as_str()
            ),
        );
    }
    match PgStore::inspect(options).await {
        Ok(found) => {
            let tls = if found.tls { "TLS" } else { "no TLS" };
            let state = match found.schema_version {
                None => "no talos-kms-server tables yet; the server makes them at start".into(),
                Some(version) if version > found.current_version => format!(
                    "schema version {version}, newer than this build knows ({}); run a newer \
                     talos-kms-server",
                    found.current_version
                ),
                Some(version) => format!(
                    "{} records, schema version {version}{}",
                    found.records,
                    upgrade_note(version, found.current_version)
                ),
            };
            let level = match found.schema_version {
                Some(version) if version > found.current_version => Level::Problem,
                _ => Level::Ok,
            };
            report.add(
                "database",
                level,
                format!(
                    "{options}: reachable (PostgreSQL {}, {tls}); {state}",
                    found.server_version
                ),
            );
        }
        Err(error) => report.add("database", Level::Problem, error.to_string()),
    }
}
