//! The pool of connections to PostgreSQL, and what every store call does with it: take a
//! connection within a deadline, and put a PostgreSQL error in words an operator can act on.

use super::migrations;
use super::options::PgOptions;
use super::tls::SslMode;
use crate::store::StoreError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::future::Future;
use std::time::Duration;

/// How long a call waits for a free connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// The whole of one store call, connection included: a node's call has 10 s.
pub(super) const CALL_DEADLINE: Duration = Duration::from_secs(8);

pub(super) type Client = deadpool_postgres::Object;

pub(super) fn pool(options: &PgOptions) -> Result<Pool, StoreError> {
    let manager = Manager::from_config(
        options.client_config()?,
        options.tls()?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CALL_DEADLINE))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                // A seal is acknowledged once its INSERT returns: that must mean flushed.
                let setting: String = client
                    .query_one("SHOW synchronous_commit", &[])
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)?
                    .get(0);
                if setting == "off" {
                    client
                        .batch_execute("SET synchronous_commit = on")
                        .await
                        .map_err(deadpool_postgres::HookError::Backend)?;
                }
                Ok(())
            })
        }))
        .build()
        .map_err(|e| options.error(format!("cannot make the connection pool: {e}")))
}

pub(super) async fn get(
    options: &PgOptions,
    pool: &Pool,
    limit: Duration,
) -> Result<Client, StoreError> {
    use deadpool_postgres::PoolError;
    match tokio::time::timeout(limit, pool.get()).await {
        Err(_) => Err(options.error(format!(
            "no connection within {} s; is PostgreSQL up and reachable?",
            limit.as_secs()
        ))),
        Ok(Ok(client)) => Ok(client),
        Ok(Err(PoolError::Backend(e))) => Err(describe(options, &e)),
        Ok(Err(PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)))) => {
            Err(describe(options, &e))
        }
        Ok(Err(PoolError::Timeout(_))) => Err(options.error(format!(
            "every one of the {} pooled connections stayed busy; PostgreSQL is slow or \
             unreachable (raise pool_max_size if it is only busy)",
            options.pool_size
        ))),
        Ok(Err(e)) => Err(options.error(e.to_string())),
    }
}

pub(super) async fn deadline<T>(
    options: &PgOptions,
    limit: Duration,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(options.error(format!(
            "no answer within {} s; is PostgreSQL up and reachable?",
            limit.as_secs()
        ))),
    }
}

/// A PostgreSQL error in words, with the usual fixes; never the password.
pub(super) fn describe(options: &PgOptions, error: &tokio_postgres::Error) -> StoreError {
    use std::error::Error;
    if let Some(db) = error.as_db_error() {
        let fix = match db.code().code() {
            // invalid_password, invalid_authorization_specification
            "28P01" | "28000" => {
                "; check the user and its password (URL, passwordFile or PGPASSWORD) and \
                 pg_hba.conf"
            }
            // invalid_catalog_name
            "3D000" => "; create it first: CREATE DATABASE ... OWNER <the server's user>",
            // insufficient_privilege
            "42501" => "; the server's user must own the database (or its tables)",
            _ => "",
        };
        return options.error(format!("{}{fix}", db.message()));
    }
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.contains("invalid peer certificate") || text.contains("InvalidCertificate") {
        text.push_str(&format!(
            "; PostgreSQL's certificate is not trusted for sslmode={}: set sslrootcert= to the \
             CA that signed it (the public roots are used otherwise){}",
            options.sslmode.as_str(),
            if options.sslmode == SslMode::VerifyFull {
                ", and make sure it names the host in the URL"
            } else {
                ""
            }
        ));
    } else if text.contains("server does not support TLS") {
        text.push_str("; turn on ssl in postgresql.conf, or use sslmode=prefer or disable");
    }
    options.error(text)
}

/// The error of a batch, for each of its callers; `batch` names what failed ("the seal
/// batch", "the unseal lookup").
pub(super) fn clone_error(options: &PgOptions, error: &StoreError, batch: &str) -> StoreError {
    match error {
        StoreError::Postgres { database, problem } => StoreError::Postgres {
            database: database.clone(),
            problem: problem.clone(),
        },
        other => options.error(format!("{batch} failed: {other}")),
    }
}

/// What a look at a PostgreSQL database finds, for `check`.
pub struct PgInspection {
    /// `None`: none of our tables yet (the server creates them at start).
    pub schema_version: Option<usize>,
    pub current_version: usize,
    pub records: u64,
    pub server_version: String,
    pub tls: bool,
}

impl super::PgStore {
    /// Reads what an operator needs to know, changing nothing (no migration).
    pub async fn inspect(options: &PgOptions) -> Result<PgInspection, StoreError> {
        let pool = pool(options)?;
        let client = get(options, &pool, CALL_DEADLINE).await?;
        let read = async {
            let version = migrations::version(&client)
                .await
                .map_err(|refused| match refused {
                    migrations::Refused::Database(e) => describe(options, &e),
                    migrations::Refused::Problem(problem) => options.error(problem),
                })?;
            let server_version: String = client
                .query_one("SHOW server_version", &[])
                .await
                .map_err(|e| describe(options, &e))?
                .get(0);
            let tls: bool = client
                .query_one(
                    "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), \
                     false)",
                    &[],
                )
                .await
                .map_err(|e| describe(options, &e))?
                .get(0);
            let records = match version {
                Some(v) if v > 0 => client
                    .query_one("SELECT count(*) FROM records", &[])
                    .await
                    .map_err(|e| describe(options, &e))?
                    .get::<_, i64>(0) as u64,
                _ => 0,
            };
            Ok(PgInspection {
                schema_version: version,
                current_version: migrations::MIGRATIONS.len(),
                records,
                server_version,
                tls,
            })
        };
        deadline(options, CALL_DEADLINE, read).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_batch_error_says_which_batch_failed() {
        let options = PgOptions::parse("postgres://kms@127.0.0.1/kms", Path::new("/")).unwrap();
        let lookup = clone_error(&options, &StoreError::WriterStopped, "the unseal lookup");
        let text = lookup.to_string();
        assert!(text.contains("the unseal lookup failed"), "{text}");
        assert!(!text.contains("write failed"), "{text}");
    }
}
