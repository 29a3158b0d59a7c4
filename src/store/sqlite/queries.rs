//! The [`Store`] queries: reads run inline on a pooled reader, writes go to the writer.

use super::SqliteStore;
use super::writer::Job;
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
use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, record: NewRecord, limits: NodeLimits) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Insert(record, limits, reply))?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn find_by_nonce(&self, nonce: &SealNonce) -> Result<Option<Record>, StoreError> {
        let found = self.read(|conn| {
            conn.prepare_cached(
                "SELECT id, node_uuid, ip, ciphertext, created_at, last_access, revoked_at,
                        key_version, tag
                 FROM records WHERE nonce = ?1",
            )?
            .query_row([&nonce[..]], |row| {
                Ok(Record {
                    id: row.get(0)?,
                    node_uuid: row.get(1)?,
                    ip: row.get(2)?,
                    ciphertext: row.get(3)?,
                    created_at: row.get(4)?,
                    last_access: row.get(5)?,
                    revoked_at: row.get(6)?,
                    custody: Custody {
                        key_version: sql::key_version(row.get(7)?),
                        tag: row.get(8)?,
                    },
                })
            })
            .optional()
        })?;
        // "Nothing found" in a file that is no longer the configured one proves nothing.
        if found.is_none() {
            self.file.verify()?;
        }
        Ok(found)
    }

    fn record_access(&self, id: RecordId, at: UnixTime) {
        lock(&self.accesses).insert(id, at);
    }

    async fn import(&self, batch: ImportBatch) -> Result<ImportReport, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Import(batch, reply))?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn has_imported(&self, fingerprint: &str) -> Result<bool, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT 1 FROM legacy_imports WHERE fingerprint = ?1")?
                .exists([fingerprint])
        })
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.file.verify()?;
        self.read(|conn| {
            conn.query_row("SELECT 1 FROM records LIMIT 1", [], |_| Ok(()))
                .optional()
        })?;
        Ok(())
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.read(|conn| conn.query_row("SELECT count(*) FROM records", [], |row| row.get(0)))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Flush(reply))?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.flush().await?;
        // Blocks while the writer checkpoints: once, at the very end.
        self.close_connections();
        Ok(())
    }

    async fn list(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, StoreError> {
        let (conditions, values) = conditions(filter, after, Dialect::Sqlite);
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {INFO_COLUMNS} FROM records WHERE {conditions} ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(
                rusqlite::params_from_iter(values.iter().map(bound)),
                info_of,
            )?;
            rows.collect()
        })
    }

    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (conditions, values) = conditions(filter, after, Dialect::Sqlite);
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {INFO_COLUMNS}, {RECORD_COLUMNS} FROM records WHERE {conditions} \
                 ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(
                rusqlite::params_from_iter(values.iter().map(bound)),
                |row| {
                    let nonce: Vec<u8> = row.get(6)?;
                    Ok(StoredRecord {
                        info: info_of(row)?,
                        // The schema's CHECK holds every nonce at 12 bytes.
                        nonce: SealNonce::try_from(nonce.as_slice()).unwrap_or_default(),
                        ciphertext: row.get(7)?,
                        custody: Custody {
                            key_version: sql::key_version(row.get(8)?),
                            tag: row.get(9)?,
                        },
                    })
                },
            )?;
            rows.collect()
        })
    }

    async fn set_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        self.set_revoked_in("records", ids, revoked_at).await
    }

    async fn rewrap(&self, rows: &[Rewrapped]) -> Result<u64, StoreError> {
        let rows = rows.to_vec();
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(
                "UPDATE records SET ciphertext = ?2, key_version = ?3, tag = ?4
                 WHERE id = ?1 AND ciphertext = ?5 AND revoked_at IS ?6",
            )?;
            let mut written = 0;
            for row in &rows {
                written += statement.execute(params![
                    row.id,
                    row.ciphertext,
                    row.key_version,
                    row.tag,
                    row.was,
                    row.revoked_at
                ])? as u64;
            }
            Ok(written)
        })
        .await
    }

    async fn key_versions(&self) -> Result<Vec<(Option<u32>, u64)>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT key_version, count(*) FROM records GROUP BY key_version ORDER BY 1",
            )?;
            let rows =
                statement.query_map([], |row| Ok((sql::key_version(row.get(0)?), row.get(1)?)))?;
            rows.collect()
        })
    }

    async fn retag(&self, table: TaggedTable, rows: &[Retag]) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "UPDATE {} SET tag = ?2 WHERE id = ?1",
                table.name()
            ))?;
            for (id, tag) in &rows {
                statement.execute(params![id, tag])?;
            }
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn custody_values(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT name, value FROM custody ORDER BY name")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    async fn add_custody_values(&self, values: Vec<(String, Vec<u8>)>) -> Result<bool, StoreError> {
        // The one writer runs this whole: nothing comes between the check and the inserts.
        self.write(move |conn| {
            let mut taken = conn.prepare_cached("SELECT 1 FROM custody WHERE name = ?1")?;
            for (name, _) in &values {
                if taken.exists([name])? {
                    return Ok(0);
                }
            }
            let mut insert =
                conn.prepare_cached("INSERT INTO custody (name, value) VALUES (?1, ?2)")?;
            for (name, value) in &values {
                insert.execute(params![name, value])?;
            }
            Ok(1)
        })
        .await
        .map(|added| added == 1)
    }

    async fn set_custody_values(&self, changes: Vec<CustodyChange>) -> Result<(), StoreError> {
        self.write(move |conn| {
            for (name, value) in &changes {
                match value {
                    Some(value) => conn
                        .prepare_cached(
                            "INSERT INTO custody (name, value) VALUES (?1, ?2)
                             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        )?
                        .execute(params![name, value])?,
                    None => conn
                        .prepare_cached("DELETE FROM custody WHERE name = ?1")?
                        .execute([name])?,
                };
            }
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn created_since(&self, since: UnixTime) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT count(*) FROM records WHERE created_at >= ?1")?
                .query_row([since], |row| row.get(0))
        })
    }

    async fn windows(&self) -> Result<Vec<Window>, StoreError> {
        let rows = self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {WINDOW_COLUMNS} FROM windows ORDER BY operation"
            ))?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter()
            .map(|(operation, opened_at, closes_at, tag)| {
                sql::window(&operation, opened_at, closes_at, tag)
            })
            .collect()
    }

    async fn open_window(&self, window: Window) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO windows (operation, opened_at, closes_at, tag) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (operation) DO UPDATE
                 SET opened_at = excluded.opened_at, closes_at = excluded.closes_at,
                     tag = excluded.tag",
            )?
            .execute(params![
                window.operation.as_str(),
                window.opened_at,
                window.closes_at,
                window.tag
            ])
            .map(|changed| changed as u64)
        })
        .await
        .map(drop)
    }

    async fn close_window(&self, operation: Operation) -> Result<bool, StoreError> {
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM windows WHERE operation = ?1")?
                .execute([operation.as_str()])
                .map(|changed| changed as u64)
        })
        .await
        .map(|changed| changed > 0)
    }

    async fn approval(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
    ) -> Result<Option<Approval>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals
                 WHERE operation = ?1 AND node_uuid = ?2 AND ip = ?3"
            ))?
            .query_row(params![operation.as_str(), node_uuid, ip], approval_row)
            .optional()
        })?
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
        self.write_approval(move |conn| {
            let key = params![operation.as_str(), node_uuid, ip, at];
            let touched = conn
                .prepare_cached(&Dialect::Sqlite.sql(&approvals::touch()))?
                .query_row(key, approval_row)
                .optional()?;
            if touched.is_some() {
                return Ok(touched);
            }
            let pending: i64 = conn
                .prepare_cached(approvals::COUNT_PENDING)?
                .query_row([], |row| row.get(0))?;
            if !approvals::room_for_one_more(pending, max_pending) {
                return Ok(None);
            }
            conn.prepare_cached(&Dialect::Sqlite.sql(&approvals::add_pending()))?
                .query_row(key, approval_row)
                .map(Some)
        })
        .await
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        let rows = self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals
                 WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
            ))?;
            let rows = statement.query_map([state.map(ApprovalState::as_str)], approval_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
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
        self.write_approval(move |conn| {
            conn.prepare_cached(&Dialect::Sqlite.sql(&approvals::decide()))?
                .query_row(params![id, state, until, at, tag], approval_row)
                .optional()
        })
        .await
    }

    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let (conditions, values) = conditions(filter, 0, Dialect::Sqlite);
        self.write(move |conn| {
            let mut statement = conn.prepare(&format!(
                "DELETE FROM records WHERE id = ?{} AND {conditions}",
                values.len() + 1
            ))?;
            let mut deleted = 0;
            for id in ids {
                let mut bound_values: Vec<rusqlite::types::Value> =
                    values.iter().map(bound).collect();
                bound_values.push(id.into());
                deleted += statement.execute(rusqlite::params_from_iter(bound_values))? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    async fn copy_records(&self, records: &[StoredRecord]) -> Result<u64, StoreError> {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.info.id,
                    r.nonce,
                    r.info.node_uuid.clone(),
                    r.info.ip.clone(),
                    r.ciphertext.clone(),
                    r.info.created_at,
                    r.info.last_access,
                    r.info.revoked_at,
                    r.custody.clone(),
                )
            })
            .collect();
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(
                "INSERT OR IGNORE INTO records (id, nonce, node_uuid, ip, ciphertext, created_at,
                                                last_access, revoked_at, key_version, tag)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let mut added = 0;
            for (id, nonce, node, ip, ciphertext, created, accessed, revoked, custody) in &rows {
                added += statement.execute(params![
                    id,
                    &nonce[..],
                    node,
                    ip,
                    ciphertext,
                    created,
                    accessed,
                    revoked,
                    custody.key_version,
                    custody.tag
                ])? as u64;
            }
            Ok(added)
        })
        .await
    }

    async fn binding(&self, fingerprint: &Fingerprint) -> Result<Option<Binding>, StoreError> {
        self.binding_of(fingerprint)
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
        self.list_bindings(filter, after, limit)
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
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "INSERT OR IGNORE INTO approvals ({APPROVAL_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?;
            let mut added = 0;
            for a in &approvals {
                added += statement.execute(params![
                    a.id,
                    a.operation.as_str(),
                    a.node_uuid,
                    a.ip,
                    a.state.as_str(),
                    a.first_seen,
                    a.last_seen,
                    i64::try_from(a.attempts).unwrap_or(i64::MAX),
                    a.approved_until,
                    a.decided_at,
                    a.tag
                ])? as u64;
            }
            Ok(added)
        })
        .await
    }
}

fn approval_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApprovalRow> {
    Ok(ApprovalRow {
        id: row.get(0)?,
        operation: row.get(1)?,
        node_uuid: row.get(2)?,
        ip: row.get(3)?,
        state: row.get(4)?,
        first_seen: row.get(5)?,
        last_seen: row.get(6)?,
        attempts: row.get(7)?,
        approved_until: row.get(8)?,
        decided_at: row.get(9)?,
        tag: row.get(10)?,
    })
}

fn info_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordInfo> {
    Ok(RecordInfo {
        id: row.get(0)?,
        node_uuid: row.get(1)?,
        ip: row.get(2)?,
        created_at: row.get(3)?,
        last_access: row.get(4)?,
        revoked_at: row.get(5)?,
    })
}

pub(super) fn bound(value: &Value) -> rusqlite::types::Value {
    match value {
        Value::Integer(number) => (*number).into(),
        Value::Text(text) => text.clone().into(),
    }
}

impl SqliteStore {
    /// Revokes (`Some`) or restores (`None`) rows of `records` or `foreign_bindings` by id;
    /// returns how many changed state.
    pub(super) async fn set_revoked_in(
        &self,
        table: &'static str,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        self.write(move |conn| {
            let change = if revoked_at.is_some() {
                "revoked_at IS NULL"
            } else {
                "revoked_at IS NOT NULL"
            };
            let mut statement = conn.prepare_cached(&format!(
                "UPDATE {table} SET revoked_at = ?2, tag = ?3 WHERE id = ?1 AND {change}"
            ))?;
            let mut changed = 0;
            for (id, tag) in ids {
                changed += statement.execute(params![id, revoked_at, tag])? as u64;
            }
            Ok(changed)
        })
        .await
    }
}
