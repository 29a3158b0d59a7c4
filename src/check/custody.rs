//! `check`'s view of key custody: the key source, whether it opens, the database's data
//! keys, how many records each wraps and how many are not wrapped yet. Nothing is written:
//! a database is opened only when its schema is already this build's.

use super::{Level, Report};
use crate::config::Config;
use crate::custody::{self, DATA_KEY_PREFIX, KeySourceConfig};
use crate::store::{self, Database, PgStore, SqliteStore, Store};
use std::sync::Arc;

const TOPIC: &str = "key source";

pub(super) async fn check(report: &mut Report, config: &Config) {
    let Some(source) = &config.key_source else {
        report.add(
            TOPIC,
            Level::Info,
            "none: the records are protected by the split scheme alone (README, \"Key \
             custody\")",
        );
        return;
    };
    let opens = match source {
        KeySourceConfig::Shamir { .. } => {
            report.add(
                TOPIC,
                Level::Ok,
                format!("{}: operators hold the shares", source.describe()),
            );
            false
        }
        _ => match source.open() {
            Ok(_) => {
                report.add(
                    TOPIC,
                    Level::Ok,
                    format!("{}: reachable, the root key opens", source.describe()),
                );
                true
            }
            Err(error) => {
                report.add(
                    TOPIC,
                    Level::Problem,
                    format!("{}: {error}", source.describe()),
                );
                false
            }
        },
    };
    if let Some(why) = custody::memory_lock_shortfall() {
        report.add(
            TOPIC,
            Level::Warning,
            format!(
                "keys cannot be locked out of swap ({why}): raise LimitMEMLOCK= in the unit \
                 (e.g. 1M)"
            ),
        );
    }
    match open_current(&config.database).await {
        Ok(Some(store)) => {
            data_keys(report, source, opens, &store).await;
            let _ = store.close().await;
        }
        Ok(None) => report.add(
            TOPIC,
            Level::Ok,
            "the database has no records of this build's schema yet: the server makes the \
             first data key at start, and wraps every record from then on",
        ),
        // `database` says what is wrong with it.
        Err(_) => {}
    }
}

/// The database, when it exists with this build's schema (opening it changes nothing).
async fn open_current(database: &Database) -> Result<Option<Arc<dyn Store>>, store::StoreError> {
    let current = match database {
        Database::Sqlite(path) => {
            path.exists() && {
                let found = SqliteStore::inspect(path, &[])?;
                found.schema_version == found.current_version
            }
        }
        Database::Postgres(options) => {
            let found = PgStore::inspect(options).await?;
            found.schema_version == Some(found.current_version)
        }
    };
    if !current {
        return Ok(None);
    }
    store::open_existing(database).await.map(Some)
}

/// The data keys stored, whether the key source unwraps them, and records per version.
async fn data_keys(
    report: &mut Report,
    source: &KeySourceConfig,
    opens: bool,
    store: &Arc<dyn Store>,
) {
    let (values, counts) = match (store.custody_values().await, store.key_versions().await) {
        (Ok(values), Ok(counts)) => (values, counts),
        (Err(error), _) | (_, Err(error)) => {
            report.add(
                TOPIC,
                Level::Problem,
                format!("cannot read the data keys: {error}"),
            );
            return;
        }
    };
    let mut versions: Vec<u32> = values
        .iter()
        .filter_map(|(name, _)| name.strip_prefix(DATA_KEY_PREFIX)?.parse().ok())
        .collect();
    versions.sort_unstable();
    let unwrapped: u64 = counts
        .iter()
        .filter(|(version, _)| version.is_none())
        .map(|(_, count)| count)
        .sum();
    if versions.is_empty() {
        report.add(
            TOPIC,
            Level::Ok,
            "no data key yet: the server makes the first at start",
        );
    } else {
        let per_version: Vec<String> = versions
            .iter()
            .map(|version| {
                let records = counts
                    .iter()
                    .find(|(v, _)| *v == Some(*version))
                    .map_or(0, |(_, count)| *count);
                format!("v{version} wraps {records} records")
            })
            .collect();
        let unwraps = if !opens {
            String::new()
        } else {
            let metrics = Arc::new(crate::metrics::Metrics::new());
            match custody::guard(Arc::clone(store), Some(source), metrics).await {
                Ok(_) => "; the key source unwraps them".to_string(),
                Err(error) => {
                    report.add(TOPIC, Level::Problem, error.to_string());
                    String::new()
                }
            }
        };
        report.add(
            TOPIC,
            Level::Ok,
            format!("data keys: {}{unwraps}", per_version.join(", ")),
        );
    }
    if unwrapped > 0 {
        report.add(
            TOPIC,
            Level::Warning,
            format!(
                "{unwrapped} records are not yet wrapped: a database copy plus their nodes' \
                 disks still yields their passphrases; the server wraps them in the background \
                 while it serves (metric talos_kms_custody_rewrap_remaining)"
            ),
        );
    } else {
        report.add(TOPIC, Level::Ok, "every record is wrapped");
    }
}
