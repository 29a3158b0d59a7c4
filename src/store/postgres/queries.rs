//! The [`Store`] queries, each on a pooled connection within the call deadline; seals and
//! unseal lookups go through the batching tasks (`writer.rs`, `lookups.rs`).

use super::PgStore;
use super::columns::{Columns, INSERT};
use super::migrations;
use super::writer::write_accesses;
use crate::locking::lock;
use crate::sealing::SealNonce;
use crate::store::sql::{
    self, APPROVAL_COLUMNS, ApprovalRow, Dialect, INFO_COLUMNS, RECORD_COLUMNS, Value,
    WINDOW_COLUMNS, approvals, conditions,
};
use crate::store::{
    Approval, ApprovalId, ApprovalState, Binding, BindingId, Custody, CustodyChange, Decision,
    Fingerprint, ImportBatch, ImportReport, Inserted, NewBinding, NewRecord, NodeLimits, Operation,
    Record, RecordFilter, RecordId, RecordInfo, Retag, Rewrapped, Store, StoreError, StoredRecord,
    TaggedTable, UnixTime, Window,
};
use async_trait::async_trait;
use std::time::Duration;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// Health checks ask often; a store that takes longer than this is not healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(3);

fn info_of(row: &Row) -> Result<RecordInfo, tokio_postgres::Error> {
    Ok(RecordInfo {
        id: row.try_get(0)?,
        node_uuid: row.try_get(1)?,
        ip: row.try_get(2)?,
        created_at: row.try_get(3)?,
        last_access: row.try_get(4)?,
        revoked_at: row.try_get(5)?,
    })
}

fn approval_row(row: &Row) -> Result<ApprovalRow, tokio_postgres::Error> {
    Ok(ApprovalRow {
        id: row.try_get(0)?,
        operation: row.try_get(1)?,
        node_uuid: row.try_get(2)?,
        ip: row.try_get(3)?,
        state: row.try_get(4)?,
        first_seen: row.try_get(5)?,
        last_seen: row.try_get(6)?,
        attempts: row.try_get(7)?,
        approved_until: row.try_get(8)?,
        decided_at: row.try_get(9)?,
        tag: row.try_get(10)?,
    })
}

/// The row of one approval, if any, decoded once the connection is back in the pool.
fn approval_of(row: Option<&Row>) -> Result<Option<ApprovalRow>, tokio_postgres::Error> {
    row.map(approval_row).transpose()
}

pub(super) fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| match value {
            Value::Integer(number) => number as &(dyn ToSql + Sync),
            Value::Text(text) => text,
        })
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
    async fn insert(&self, record: NewRecord, limits: NodeLimits) -> Result<Inserted, StoreError> {
        self.batched(&self.seals, (record, limits)).await
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
                    // Only the unique index decides, as for seals (`writer.rs`): a NOT EXISTS
                    // may be planned once as a scan of the whole table, and kept.
                    &format!("{INSERT} ON CONFLICT (nonce) DO NOTHING"),
                    &columns.params(),
                )
                .await? as usize;
            if let Some(fingerprint) = &fingerprint {
                tx.execute(
                    "INSERT INTO legacy_imports (fingerprint, imported_at, records)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (fingerprint) DO UPDATE
                     SET imported_at = excluded.imported_at, records = excluded.records",
                    &[fingerprint, &crate::store::now(), &(total as i64)],
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
        let (conditions, values) = conditions(filter, after, Dialect::Postgres);
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
            rows.iter().map(info_of).collect()
        })
        .await
    }

    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (conditions, values) = conditions(filter, after, Dialect::Postgres);
        self.with(|client| async move {
            let rows = client
                .query(
                    &format!(
                        "SELECT {INFO_COLUMNS}, {RECORD_COLUMNS} FROM records \
                         WHERE {conditions} ORDER BY id LIMIT {limit}"
                    ),
                    &params(&values),
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let nonce: &[u8] = row.try_get(6)?;
                    Ok(StoredRecord {
                        info: info_of(row)?,
                        // The schema's CHECK holds every nonce at 12 bytes.
                        nonce: SealNonce::try_from(nonce).unwrap_or_default(),
                        ciphertext: row.try_get(7)?,
                        custody: Custody {
                            key_version: sql::key_version(row.try_get(8)?),
                            tag: row.try_get(9)?,
                        },
                    })
                })
                .collect()
        })
        .await
    }

    async fn set_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        self.set_revoked_in("records", ids, revoked_at).await
    }

    async fn rewrap(&self, rows: &[Rewrapped]) -> Result<u64, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let ciphertexts: Vec<&[u8]> = rows.iter().map(|r| r.ciphertext.as_slice()).collect();
        let versions: Vec<i64> = rows.iter().map(|r| i64::from(r.key_version)).collect();
        let tags: Vec<&[u8]> = rows.iter().map(|r| r.tag.as_slice()).collect();
        let was: Vec<&[u8]> = rows.iter().map(|r| r.was.as_slice()).collect();
        let revoked: Vec<Option<i64>> = rows.iter().map(|r| r.revoked_at).collect();
        self.with(|client| async move {
            client
                .execute(
                    "UPDATE records SET ciphertext = new.ciphertext,
                         key_version = new.key_version, tag = new.tag
                     FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bytea[],
                                 $5::bytea[], $6::bigint[])
                          AS new (id, ciphertext, key_version, tag, was, revoked_at)
                     WHERE records.id = new.id AND records.ciphertext = new.was
                       AND records.revoked_at IS NOT DISTINCT FROM new.revoked_at",
                    &[&ids, &ciphertexts, &versions, &tags, &was, &revoked],
                )
                .await
        })
        .await
    }

    async fn key_versions(&self) -> Result<Vec<(Option<u32>, u64)>, StoreError> {
        self.with(|client| async move {
            let rows = client
                .query(
                    "SELECT key_version, count(*) FROM records GROUP BY key_version ORDER BY 1",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let count: i64 = row.try_get(1)?;
                    Ok((
                        sql::key_version(row.try_get(0)?),
                        u64::try_from(count).unwrap_or_default(),
                    ))
                })
                .collect()
        })
        .await
    }

    async fn retag(&self, table: TaggedTable, rows: &[Retag]) -> Result<(), StoreError> {
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let tags: Vec<Option<Vec<u8>>> = rows.iter().map(|(_, tag)| tag.clone()).collect();
        let table = table.name();
        self.with(|client| async move {
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET tag = new.tag
                         FROM unnest($1::bigint[], $2::bytea[]) AS new (id, tag)
                         WHERE {table}.id = new.id"
                    ),
                    &[&ids, &tags],
                )
                .await
                .map(drop)
        })
        .await
    }

    async fn custody_values(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|client| async move {
            let rows = client
                .query("SELECT name, value FROM custody ORDER BY name", &[])
                .await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect()
        })
        .await
    }

    async fn add_custody_values(&self, values: Vec<(String, Vec<u8>)>) -> Result<bool, StoreError> {
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            for (name, value) in &values {
                let added = tx
                    .execute(
                        "INSERT INTO custody (name, value) VALUES ($1, $2)
                         ON CONFLICT (name) DO NOTHING",
                        &[name, value],
                    )
                    .await?;
                if added == 0 {
                    // Dropped without a commit: rolled back, nothing added.
                    return Ok(false);
                }
            }
            tx.commit().await.map(|()| true)
        })
        .await
    }

    async fn set_custody_values(&self, changes: Vec<CustodyChange>) -> Result<(), StoreError> {
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            for (name, value) in &changes {
                match value {
                    Some(value) => {
                        tx.execute(
                            "INSERT INTO custody (name, value) VALUES ($1, $2)
                             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                            &[name, value],
                        )
                        .await?
                    }
                    None => {
                        tx.execute("DELETE FROM custody WHERE name = $1", &[name])
                            .await?
                    }
                };
            }
            tx.commit().await
        })
        .await
    }

    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let (conditions, values) = conditions(filter, 0, Dialect::Postgres);
        let ids_at = values.len() + 1;
        self.with(|client| async move {
            let mut bound = params(&values);
            bound.push(&ids);
            client
                .execute(
                    &format!("DELETE FROM records WHERE id = ANY(${ids_at}) AND {conditions}"),
                    &bound,
                )
                .await
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        write_accesses(&self.options, &self.pool, &self.accesses).await
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
        let rows = self
            .with(|client| async move {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {WINDOW_COLUMNS} FROM windows ORDER BY operation"
                    ))
                    .await?;
                client
                    .query(&statement, &[])
                    .await?
                    .iter()
                    .map(|row| {
                        Ok((
                            row.try_get::<_, String>(0)?,
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            })
            .await?;
        rows.into_iter()
            .map(|(operation, opened_at, closes_at, tag)| {
                sql::window(&operation, opened_at, closes_at, tag)
            })
            .collect()
    }

    async fn open_window(&self, window: Window) -> Result<(), StoreError> {
        self.with(|client| async move {
            client
                .execute(
                    "INSERT INTO windows (operation, opened_at, closes_at, tag)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (operation) DO UPDATE
                     SET opened_at = excluded.opened_at, closes_at = excluded.closes_at,
                         tag = excluded.tag",
                    &[
                        &window.operation.as_str(),
                        &window.opened_at,
                        &window.closes_at,
                        &window.tag,
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
            let row = client
                .query_opt(&statement, &[&operation.as_str(), &node_uuid, &ip])
                .await?;
            approval_of(row.as_ref())
        })
        .await?
        .map(ApprovalRow::decode)
        .transpose()
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
        self.with(|mut client| async move {
            let tx = client.transaction().await?;
            let key: [&(dyn ToSql + Sync); 4] = [&operation.as_str(), &node_uuid, &ip, &at];
            let touched = tx.query_opt(&approvals::touch(), &key).await?;
            if touched.is_some() {
                tx.commit().await?;
                return approval_of(touched.as_ref());
            }
            // New pending approvals are counted and added one replica at a time.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&(migrations::LOCK_KEY + 1)],
            )
            .await?;
            let pending: i64 = tx.query_one(approvals::COUNT_PENDING, &[]).await?.get(0);
            if !approvals::room_for_one_more(pending, max_pending) {
                return Ok(None);
            }
            let row = tx.query_one(&approvals::add_pending(), &key).await?;
            tx.commit().await?;
            approval_of(Some(&row))
        })
        .await?
        .map(ApprovalRow::decode)
        .transpose()
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        let state = state.map(ApprovalState::as_str);
        let rows = self
            .with(|client| async move {
                client
                    .query(
                        &format!(
                            "SELECT {APPROVAL_COLUMNS} FROM approvals
                             WHERE $1::text IS NULL OR state = $1 ORDER BY id"
                        ),
                        &[&state],
                    )
                    .await?
                    .iter()
                    .map(approval_row)
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        rows.into_iter().map(ApprovalRow::decode).collect()
    }

    async fn decide(
        &self,
        id: ApprovalId,
        decision: Decision,
        at: UnixTime,
        tag: Option<Vec<u8>>,
    ) -> Result<Option<Approval>, StoreError> {
        let (state, until) = approvals::decided(decision);
        self.with(|client| async move {
            let row = client
                .query_opt(&approvals::decide(), &[&id, &state, &until, &at, &tag])
                .await?;
            approval_of(row.as_ref())
        })
        .await?
        .map(ApprovalRow::decode)
        .transpose()
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
        let mut versions = Vec::with_capacity(records.len());
        let mut tags = Vec::with_capacity(records.len());
        for record in records {
            versions.push(record.custody.key_version.map(i64::from));
            tags.push(record.custody.tag.clone());
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
                    "INSERT INTO records (id, nonce, node_uuid, ip, ciphertext, created_at,
                                         last_access, revoked_at, key_version, tag)
                     SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::text[],
                                          $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[],
                                          $9::bigint[], $10::bytea[])
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
                        &versions,
                        &tags,
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
        ids: &[Retag],
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
                             last_seen, attempts, approved_until, decided_at, tag)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
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
                            &a.tag,
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

impl PgStore {
    /// Revokes (`Some`) or restores (`None`) rows of `records` or `foreign_bindings` by id;
    /// returns how many changed state.
    pub(super) async fn set_revoked_in(
        &self,
        table: &'static str,
        rows: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let tags: Vec<Option<Vec<u8>>> = rows.iter().map(|(_, tag)| tag.clone()).collect();
        let change = if revoked_at.is_some() {
            "revoked_at IS NULL"
        } else {
            "revoked_at IS NOT NULL"
        };
        self.with(|client| async move {
            client
                .execute(
                    &format!(
                        "UPDATE {table} SET revoked_at = $2, tag = new.tag
                         FROM unnest($1::bigint[], $3::bytea[]) AS new (id, tag)
                         WHERE {table}.id = new.id AND {table}.{change}"
                    ),
                    &[&ids, &revoked_at, &tags],
                )
                .await
        })
        .await
    }
}
