//! The shared store: PostgreSQL, for several replicas serving the same records.
//!
//! Every call takes a connection from a bounded pool (tokio-postgres, deadpool) and gives
//! it back. Seals that arrive together are written by one `INSERT` in autocommit
//! (`seals.rs`): PostgreSQL answers it only once its commit is flushed
//! (`synchronous_commit` is turned back on for our sessions when the server has it off),
//! and each seal is answered after that. Unseal lookups that arrive together are one
//! `SELECT` (`lookups.rs`). Last-access times are kept in memory and written every 2
//! seconds, as with SQLite.
//!
//! Nothing is kept between calls but the pool: a connection that broke (PostgreSQL
//! restarted, a failover) is dropped when it is next taken and a new one made, so the
//! server reconnects by itself. Every call has a deadline; meanwhile calls fail with
//! [`StoreError::Postgres`] (`UNAVAILABLE` to nodes) and health checks report it.

mod bindings;
mod columns;
mod connection;
mod lookups;
mod migrations;
mod options;
mod seals;

pub use options::{PgOptions, SslMode, is_postgres_url, redact};

use super::{
    Approval, ApprovalId, ApprovalState, Binding, BindingId, Decision, Fingerprint, ImportBatch,
    ImportReport, Inserted, NewBinding, NewRecord, NodeSummary, Operation, Record, RecordFilter,
    RecordId, RecordInfo, RecordState, Store, StoreError, StoredRecord, UnixTime, Window,
};
use crate::locking::lock;
use crate::sealing::SealNonce;
use async_trait::async_trait;
use columns::Columns;
use connection::{CALL_DEADLINE, Client, deadline, describe, get, pool};
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Health checks ask often; a store that takes longer than this is not healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(3);

pub struct PgStore {
    options: PgOptions,
    pool: Pool,
    /// Whether [`PgStore::open`] found a database this server had never used.
    created: bool,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
    flusher: tokio::task::JoinHandle<()>,
    seals: Batches<NewRecord, Inserted>,
    sealer: tokio::task::JoinHandle<()>,
    lookups: Batches<SealNonce, Option<Record>>,
    finder: tokio::task::JoinHandle<()>,
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

impl PgStore {
    /// Connects (waiting at most the connect timeout), brings the schema up to date and
    /// starts writing buffered access times. Never creates the database itself: an
    /// operator does, with the owner the server logs in as.
    pub async fn open(options: &PgOptions) -> Result<PgStore, StoreError> {
        let pool = pool(options)?;
        let mut client = get(options, &pool, CALL_DEADLINE).await?;
        let migrated = migrations::migrate(&mut client)
            .await
            .map_err(|refused| match refused {
                migrations::Refused::Database(e) => describe(options, &e),
                migrations::Refused::Problem(problem) => options.error(problem),
            })?;
        drop(client);
        let accesses = Arc::new(Mutex::new(HashMap::new()));
        let flusher = tokio::spawn(flush_accesses_every(
            options.clone(),
            pool.clone(),
            Arc::clone(&accesses),
        ));
        let (seals, queue) = tokio::sync::mpsc::unbounded_channel();
        let sealer = tokio::spawn(seals::write_batches(
            options.clone(),
            pool.clone(),
            queue,
            CALL_DEADLINE,
        ));
        let (lookups, queue) = tokio::sync::mpsc::unbounded_channel();
        let finder = tokio::spawn(lookups::answer_batches(
            options.clone(),
            pool.clone(),
            queue,
            CALL_DEADLINE,
        ));
        Ok(PgStore {
            options: options.clone(),
            pool,
            created: migrated.from == 0,
            accesses,
            flusher,
            seals,
            sealer,
            lookups,
            finder,
        })
    }

    /// Whether this store found a database without any of our tables.
    pub fn created(&self) -> bool {
        self.created
    }

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

    /// Runs `work` with a pooled connection, within the call deadline.
    async fn with<T, F>(&self, work: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.within(CALL_DEADLINE, work).await
    }

    async fn within<T, F>(
        &self,
        limit: Duration,
        work: impl FnOnce(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let options = &self.options;
        deadline(options, limit, async {
            let client = get(options, &self.pool, limit).await?;
            work(client).await.map_err(|e| describe(options, &e))
        })
        .await
    }

    /// Hands `item` to a batching task (`seals.rs`, `lookups.rs`) and waits for its answer.
    async fn batched<T, A>(&self, queue: &Batches<T, A>, item: T) -> Result<A, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue
            .send((item, reply))
            .map_err(|_| StoreError::WriterStopped)?;
        // The batch has its own deadline; this one only guards against a stuck task.
        match tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(2), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::WriterStopped),
            Err(_) => Err(self.options.error(format!(
                "no answer within {} s; is PostgreSQL up and reachable?",
                CALL_DEADLINE.as_secs()
            ))),
        }
    }
}

/// The queue of a batching task: each item with where its answer goes.
type Batches<T, A> =
    tokio::sync::mpsc::UnboundedSender<(T, tokio::sync::oneshot::Sender<Result<A, StoreError>>)>;

impl Drop for PgStore {
    fn drop(&mut self) {
        self.flusher.abort();
        self.sealer.abort();
        self.finder.abort();
    }
}

/// Writes the buffered access times every 2 s, for as long as the store lives.
async fn flush_accesses_every(
    options: PgOptions,
    pool: Pool,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
) {
    let mut ticks = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = write_accesses(&options, &pool, &accesses).await {
            tracing::warn!(%error, "last-access times not written yet; retrying");
        }
    }
}

async fn write_accesses(
    options: &PgOptions,
    pool: &Pool,
    accesses: &Mutex<HashMap<RecordId, UnixTime>>,
) -> Result<(), StoreError> {
    let pending = std::mem::take(&mut *lock(accesses));
    if pending.is_empty() {
        return Ok(());
    }
    let (ids, times): (Vec<i64>, Vec<i64>) = pending.iter().map(|(id, at)| (*id, *at)).unzip();
    let written = deadline(options, CALL_DEADLINE, async {
        let client = get(options, pool, CALL_DEADLINE).await?;
        client
            .execute(
                "UPDATE records SET last_access = greatest(coalesce(records.last_access, 0), a.at)
                 FROM unnest($1::bigint[], $2::bigint[]) AS a(id, at) WHERE records.id = a.id",
                &[&ids, &times],
            )
            .await
            .map_err(|e| describe(options, &e))
    })
    .await;
    if written.is_err() {
        // Kept for the next attempt, unless newer ones arrived meanwhile.
        let mut current = lock(accesses);
        for (id, at) in pending {
            current.entry(id).or_insert(at);
        }
    }
    written.map(drop)
}

const INFO_COLUMNS: &str = "id, node_uuid, ip, created_at, last_access, revoked_at";
const APPROVAL_COLUMNS: &str = "id, operation, node_uuid, ip, state, first_seen, last_seen, \
                                attempts, approved_until, decided_at";

fn info_of(row: &Row) -> RecordInfo {
    RecordInfo {
        id: row.get(0),
        node_uuid: row.get(1),
        ip: row.get(2),
        created_at: row.get(3),
        last_access: row.get(4),
        revoked_at: row.get(5),
    }
}

fn approval_of(row: &Row) -> Option<Approval> {
    Some(Approval {
        id: row.get(0),
        operation: Operation::parse(row.get(1))?,
        node_uuid: row.get(2),
        ip: row.get(3),
        state: ApprovalState::parse(row.get(4))?,
        first_seen: row.get(5),
        last_seen: row.get(6),
        attempts: row.get::<_, i64>(7).max(0) as u64,
        approved_until: row.get(8),
        decided_at: row.get(9),
    })
}

type Param = Box<dyn ToSql + Sync + Send>;

/// The filter as an SQL condition over `records`, with its values in order.
fn conditions(filter: &RecordFilter, after: RecordId) -> (String, Vec<Param>) {
    let mut sql = vec!["id > $1".to_string()];
    let mut values: Vec<Param> = vec![Box::new(after)];
    let mut bind = |condition: &str, value: Param| {
        values.push(value);
        sql.push(condition.replace('?', &format!("${}", values.len())));
    };
    if let Some(node) = &filter.node_uuid {
        bind("node_uuid = ?", Box::new(node.clone()));
    }
    if let Some(ip) = &filter.ip {
        bind("ip = ?", Box::new(ip.clone()));
    }
    if let Some(before) = filter.not_used_since {
        bind("coalesce(last_access, created_at) < ?", Box::new(before));
    }
    if let Some(before) = filter.created_before {
        bind("created_at < ?", Box::new(before));
    }
    if let Some(ids) = &filter.ids {
        bind("id = ANY(?)", Box::new(ids.clone()));
    }
    match filter.state {
        Some(RecordState::Active) => sql.push("revoked_at IS NULL".into()),
        Some(RecordState::Revoked) => sql.push("revoked_at IS NOT NULL".into()),
        None => {}
    }
    (sql.join(" AND "), values)
}

fn params(values: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// Moves the identity sequence of `table` past its highest id, after rows were added with
/// ids of their own.
async fn advance_identity(
    client: &impl deadpool_postgres::GenericClient,
    table: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                 greatest((SELECT max(id) FROM {table}), 1), \
                 (SELECT max(id) FROM {table}) IS NOT NULL)"
            ),
            &[],
        )
        .await
        .map(drop)
}

#[async_trait]
impl Store for PgStore {
    async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        self.batched(&self.seals, record).await
    }

    async fn find_by_nonce(&self, nonce: &SealNonce) -> Result<Option<Record>, StoreError> {
        self.batched(&self.lookups, *nonce).await
    }

    fn record_access(&self, id: RecordId, at: UnixTime) {
        lock(&self.accesses).insert(id, at);
    }

    async fn import(&self, batch: ImportBatch) -> Result<ImportReport, StoreError> {
        let columns = Columns::of(batch.records.iter());
        let total = batch.records.len();
        let fingerprint = batch.fingerprint;
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            let imported = tx
                .execute(
                    "INSERT INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access)
                     SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[],
                                          $5::bigint[], $6::bigint[])
                                   AS new (nonce, node_uuid, ip, ciphertext, created_at, last_access)
                     WHERE NOT EXISTS (SELECT 1 FROM records WHERE records.nonce = new.nonce)
                     ON CONFLICT (nonce) DO NOTHING",
                    &columns.params(),
                )
                .await? as usize;
            if let Some(fingerprint) = &fingerprint {
                tx.execute(
                    "INSERT INTO legacy_imports (fingerprint, imported_at, records)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (fingerprint) DO UPDATE
                     SET imported_at = excluded.imported_at, records = excluded.records",
                    &[fingerprint, &super::now(), &(total as i64)],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(ImportReport {
                imported,
                skipped: total - imported.min(total),
            })
        })
        .await
    }

    async fn has_imported(&self, fingerprint: &str) -> Result<bool, StoreError> {
        let fingerprint = fingerprint.to_string();
        self.with(|client| async move {
            Ok(client
                .query_opt(
                    "SELECT 1 FROM legacy_imports WHERE fingerprint = $1",
                    &[&fingerprint],
                )
                .await?
                .is_some())
        })
        .await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.with(|client| async move {
            let count: i64 = client
                .query_one("SELECT count(*) FROM records", &[])
                .await?
                .get(0);
            Ok(count as u64)
        })
        .await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.within(HEALTH_DEADLINE, |client| async move {
            client.simple_query("SELECT 1").await.map(drop)
        })
        .await
    }

    async fn list(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, StoreError> {
        let (conditions, values) = conditions(filter, after);
        self.with(|client| async move {
            let rows = client
                .query(
                    &format!(
                        "SELECT {INFO_COLUMNS} FROM records WHERE {conditions} \
                         ORDER BY id LIMIT {limit}"
                    ),
                    &params(&values),
                )
                .await?;
            Ok(rows.iter().map(info_of).collect())
        })
        .await
    }

    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (conditions, values) = conditions(filter, after);
        self.with(|client| async move {
            let rows = client
                .query(
                    &format!(
                        "SELECT {INFO_COLUMNS}, nonce, ciphertext FROM records \
                         WHERE {conditions} ORDER BY id LIMIT {limit}"
                    ),
                    &params(&values),
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let nonce: &[u8] = row.get(6);
                    StoredRecord {
                        info: info_of(row),
                        // The schema's CHECK holds every nonce at 12 bytes.
                        nonce: SealNonce::try_from(nonce).unwrap_or_default(),
                        ciphertext: row.get(7),
                    }
                })
                .collect())
        })
        .await
    }

    async fn set_revoked(
        &self,
        ids: &[RecordId],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let change = if revoked_at.is_some() {
            "revoked_at IS NULL"
        } else {
            "revoked_at IS NOT NULL"
        };
        self.with(|client| async move {
            client
                .execute(
                    &format!("UPDATE records SET revoked_at = $2 WHERE id = ANY($1) AND {change}"),
                    &[&ids, &revoked_at],
                )
                .await
        })
        .await
    }

    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let (conditions, mut values) = conditions(filter, 0);
        let ids_at = values.len() + 1;
        values.push(Box::new(ids));
        self.with(|client| async move {
            client
                .execute(
                    &format!("DELETE FROM records WHERE id = ANY(${ids_at}) AND {conditions}"),
                    &params(&values),
                )
                .await
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        write_accesses(&self.options, &self.pool, &self.accesses).await
    }

    async fn node_summary(&self, node_uuid: &str, ip: &str) -> Result<NodeSummary, StoreError> {
        let (node_uuid, ip) = (node_uuid.to_string(), ip.to_string());
        self.with(|client| async move {
            // One statement: every seal asks it, and a round trip costs more than either.
            let statement = client
                .prepare_cached(
                    "SELECT (SELECT count(*) FROM records WHERE node_uuid = $1),
                            ARRAY(SELECT DISTINCT ip FROM records
                                  WHERE node_uuid = $1 AND revoked_at IS NULL AND ip <> $2
                                  LIMIT 8)",
                )
                .await?;
            let row = client.query_one(&statement, &[&node_uuid, &ip]).await?;
            let records: i64 = row.get(0);
            Ok(NodeSummary {
                records: records as u64,
                other_addresses: row.get(1),
            })
        })
        .await
    }

    async fn created_since(&self, since: UnixTime) -> Result<u64, StoreError> {
        self.with(|client| async move {
            let statement = client
                .prepare_cached("SELECT count(*) FROM records WHERE created_at >= $1")
                .await?;
            let count: i64 = client.query_one(&statement, &[&since]).await?.get(0);
            Ok(count as u64)
        })
        .await
    }

    async fn windows(&self) -> Result<Vec<Window>, StoreError> {
        self.with(|client| async move {
            let statement = client
                .prepare_cached(
                    "SELECT operation, opened_at, closes_at FROM windows ORDER BY operation",
                )
                .await?;
            Ok(client
                .query(&statement, &[])
                .await?
                .iter()
                .filter_map(|row| {
                    Some(Window {
                        operation: Operation::parse(row.get(0))?,
                        opened_at: row.get(1),
                        closes_at: row.get(2),
                    })
                })
                .collect())
        })
        .await
    }

    async fn open_window(&self, window: Window) -> Result<(), StoreError> {
        self.with(|client| async move {
            client
                .execute(
                    "INSERT INTO windows (operation, opened_at, closes_at) VALUES ($1, $2, $3)
                     ON CONFLICT (operation) DO UPDATE
                     SET opened_at = excluded.opened_at, closes_at = excluded.closes_at",
                    &[
                        &window.operation.as_str(),
                        &window.opened_at,
                        &window.closes_at,
                    ],
                )
                .await
                .map(drop)
        })
        .await
    }

    async fn close_window(&self, operation: Operation) -> Result<bool, StoreError> {
        self.with(|client| async move {
            client
                .execute(
                    "DELETE FROM windows WHERE operation = $1",
                    &[&operation.as_str()],
                )
                .await
                .map(|changed| changed > 0)
        })
        .await
    }

    async fn approval(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
    ) -> Result<Option<Approval>, StoreError> {
        let (node_uuid, ip) = (node_uuid.to_string(), ip.to_string());
        self.with(|client| async move {
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals
                     WHERE operation = $1 AND node_uuid = $2 AND ip = $3"
                ))
                .await?;
            Ok(client
                .query_opt(&statement, &[&operation.as_str(), &node_uuid, &ip])
                .await?
                .as_ref()
                .and_then(approval_of))
        })
        .await
    }

    async fn note_pending(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
        at: UnixTime,
        max_pending: u64,
    ) -> Result<Option<Approval>, StoreError> {
        let (node_uuid, ip) = (node_uuid.to_string(), ip.to_string());
        let max_pending = i64::try_from(max_pending).unwrap_or(i64::MAX);
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            let known = tx
                .query_opt(
                    &format!(
                        "UPDATE approvals SET last_seen = $4, attempts = attempts + 1,
                             state = CASE WHEN state = 'approved' AND approved_until <= $4
                                          THEN 'pending' ELSE state END
                         WHERE operation = $1 AND node_uuid = $2 AND ip = $3
                         RETURNING {APPROVAL_COLUMNS}"
                    ),
                    &[&operation.as_str(), &node_uuid, &ip, &at],
                )
                .await?;
            if let Some(row) = known {
                tx.commit().await?;
                return Ok(approval_of(&row));
            }
            // New pending approvals are counted and added one replica at a time.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&(migrations::LOCK_KEY + 1)],
            )
            .await?;
            let pending: i64 = tx
                .query_one(
                    "SELECT count(*) FROM approvals WHERE state = 'pending'",
                    &[],
                )
                .await?
                .get(0);
            if pending >= max_pending {
                return Ok(None);
            }
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO approvals
                         (operation, node_uuid, ip, state, first_seen, last_seen, attempts)
                         VALUES ($1, $2, $3, 'pending', $4, $4, 1)
                         ON CONFLICT (operation, node_uuid, ip) DO UPDATE
                         SET last_seen = excluded.last_seen, attempts = approvals.attempts + 1
                         RETURNING {APPROVAL_COLUMNS}"
                    ),
                    &[&operation.as_str(), &node_uuid, &ip, &at],
                )
                .await?;
            tx.commit().await?;
            Ok(approval_of(&row))
        })
        .await
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        let state = state.map(ApprovalState::as_str);
        self.with(|client| async move {
            Ok(client
                .query(
                    &format!(
                        "SELECT {APPROVAL_COLUMNS} FROM approvals
                         WHERE $1::text IS NULL OR state = $1 ORDER BY id"
                    ),
                    &[&state],
                )
                .await?
                .iter()
                .filter_map(approval_of)
                .collect())
        })
        .await
    }

    async fn decide(
        &self,
        id: ApprovalId,
        decision: Decision,
        at: UnixTime,
    ) -> Result<Option<Approval>, StoreError> {
        let (state, until) = match decision {
            Decision::Approve { until } => (ApprovalState::Approved, Some(until)),
            Decision::Deny => (ApprovalState::Denied, None),
        };
        self.with(|client| async move {
            Ok(client
                .query_opt(
                    &format!(
                        "UPDATE approvals SET state = $2, approved_until = $3, decided_at = $4
                         WHERE id = $1 RETURNING {APPROVAL_COLUMNS}"
                    ),
                    &[&id, &state.as_str(), &until, &at],
                )
                .await?
                .as_ref()
                .and_then(approval_of))
        })
        .await
    }

    async fn copy_records(&self, records: &[StoredRecord]) -> Result<u64, StoreError> {
        let mut ids = Vec::with_capacity(records.len());
        let mut revoked = Vec::with_capacity(records.len());
        let mut nonces = Vec::with_capacity(records.len());
        let mut nodes = Vec::with_capacity(records.len());
        let mut ips = Vec::with_capacity(records.len());
        let mut ciphertexts = Vec::with_capacity(records.len());
        let mut created = Vec::with_capacity(records.len());
        let mut accessed = Vec::with_capacity(records.len());
        for record in records {
            nonces.push(record.nonce.to_vec());
            nodes.push(record.info.node_uuid.clone());
            ips.push(record.info.ip.clone());
            ciphertexts.push(record.ciphertext.clone());
            created.push(record.info.created_at);
            accessed.push(record.info.last_access);
            ids.push(record.info.id);
            revoked.push(record.info.revoked_at);
        }
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            let added = tx
                .execute(
                    "INSERT INTO records
                     (id, nonce, node_uuid, ip, ciphertext, created_at, last_access, revoked_at)
                     SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::text[],
                                          $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[])
                     ON CONFLICT DO NOTHING",
                    &[
                        &ids,
                        &nonces,
                        &nodes,
                        &ips,
                        &ciphertexts,
                        &created,
                        &accessed,
                        &revoked,
                    ],
                )
                .await?;
            advance_identity(&tx, "records").await?;
            tx.commit().await?;
            Ok(added)
        })
        .await
    }

    async fn binding(&self, fingerprint: &Fingerprint) -> Result<Option<Binding>, StoreError> {
        self.binding_of(fingerprint).await
    }

    async fn bind(&self, binding: NewBinding) -> Result<Binding, StoreError> {
        self.bind_first(binding).await
    }

    async fn binding_used(&self, id: BindingId, at: UnixTime) -> Result<(), StoreError> {
        self.note_binding_use(id, at).await
    }

    async fn bindings(
        &self,
        filter: &RecordFilter,
        after: BindingId,
        limit: usize,
    ) -> Result<Vec<Binding>, StoreError> {
        self.list_bindings(filter, after, limit).await
    }

    async fn set_bindings_revoked(
        &self,
        ids: &[BindingId],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        self.revoke_bindings(ids, revoked_at).await
    }

    async fn copy_approvals(&self, approvals: &[Approval]) -> Result<u64, StoreError> {
        let approvals = approvals.to_vec();
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            let mut added = 0;
            for a in &approvals {
                added += tx
                    .execute(
                        "INSERT INTO approvals (id, operation, node_uuid, ip, state, first_seen,
                             last_seen, attempts, approved_until, decided_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT DO NOTHING",
                        &[
                            &a.id,
                            &a.operation.as_str(),
                            &a.node_uuid,
                            &a.ip,
                            &a.state.as_str(),
                            &a.first_seen,
                            &a.last_seen,
                            &i64::try_from(a.attempts).unwrap_or(i64::MAX),
                            &a.approved_until,
                            &a.decided_at,
                        ],
                    )
                    .await?;
            }
            advance_identity(&tx, "approvals").await?;
            tx.commit().await?;
            Ok(added)
        })
        .await
    }
}
