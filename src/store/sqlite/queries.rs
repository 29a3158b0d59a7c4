//! The [`Store`] queries: reads run inline on a pooled reader, writes go to the writer.

use super::SqliteStore;
use super::writer::Job;
use crate::locking::lock;
use crate::sealing::SealNonce;
use crate::store::{
    Approval, ApprovalId, ApprovalState, Decision, ImportBatch, ImportReport, Inserted, NewRecord,
    NodeSummary, Operation, Record, RecordFilter, RecordId, RecordInfo, RecordState, Store,
    StoreError, StoredRecord, UnixTime, Window,
};
use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

#[async_trait]
impl Store for SqliteStore {
    async fn insert(&self, record: NewRecord) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Insert(record, reply))?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn find_by_nonce(&self, nonce: &SealNonce) -> Result<Option<Record>, StoreError> {
        let found = self.read(|conn| {
            conn.prepare_cached(
                "SELECT id, node_uuid, ip, ciphertext, created_at, last_access, revoked_at
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
        let (conditions, values) = conditions(filter, after);
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {INFO_COLUMNS} FROM records WHERE {conditions} ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), info_of)?;
            rows.collect()
        })
    }

    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let (conditions, values) = conditions(filter, after);
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {INFO_COLUMNS}, nonce, ciphertext FROM records WHERE {conditions} \
                 ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
                let nonce: Vec<u8> = row.get(6)?;
                Ok(StoredRecord {
                    info: info_of(row)?,
                    // The schema's CHECK holds every nonce at 12 bytes.
                    nonce: SealNonce::try_from(nonce.as_slice()).unwrap_or_default(),
                    ciphertext: row.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    async fn set_revoked(
        &self,
        ids: &[RecordId],
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
                "UPDATE records SET revoked_at = ?2 WHERE id = ?1 AND {change}"
            ))?;
            let mut changed = 0;
            for id in ids {
                changed += statement.execute(params![id, revoked_at])? as u64;
            }
            Ok(changed)
        })
        .await
    }

    async fn node_summary(&self, node_uuid: &str, ip: &str) -> Result<NodeSummary, StoreError> {
        self.read(|conn| {
            let (records, elsewhere): (u64, u64) = conn
                .prepare_cached(
                    "SELECT count(*), coalesce(sum(revoked_at IS NULL AND ip != ?2), 0)
                     FROM records WHERE node_uuid = ?1",
                )?
                .query_row(params![node_uuid, ip], |row| Ok((row.get(0)?, row.get(1)?)))?;
            let other_addresses = if elsewhere == 0 {
                Vec::new()
            } else {
                conn.prepare_cached(
                    "SELECT DISTINCT ip FROM records
                     WHERE node_uuid = ?1 AND revoked_at IS NULL AND ip != ?2 LIMIT 8",
                )?
                .query_map(params![node_uuid, ip], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?
            };
            Ok(NodeSummary {
                records,
                other_addresses,
            })
        })
    }

    async fn created_since(&self, since: UnixTime) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT count(*) FROM records WHERE created_at >= ?1")?
                .query_row([since], |row| row.get(0))
        })
    }

    async fn windows(&self) -> Result<Vec<Window>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT operation, opened_at, closes_at FROM windows ORDER BY operation",
            )?;
            let rows = statement.query_map([], |row| {
                let operation: String = row.get(0)?;
                Ok((operation, row.get(1)?, row.get(2)?))
            })?;
            let mut windows = Vec::new();
            for row in rows {
                let (operation, opened_at, closes_at) = row?;
                if let Some(operation) = Operation::parse(&operation) {
                    windows.push(Window {
                        operation,
                        opened_at,
                        closes_at,
                    });
                }
            }
            Ok(windows)
        })
    }

    async fn open_window(&self, window: Window) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO windows (operation, opened_at, closes_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (operation) DO UPDATE
                 SET opened_at = excluded.opened_at, closes_at = excluded.closes_at",
            )?
            .execute(params![
                window.operation.as_str(),
                window.opened_at,
                window.closes_at
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
            .query_row(params![operation.as_str(), node_uuid, ip], approval_of)
            .optional()
        })
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
        let id = self
            .write(move |conn| {
                let known: Option<i64> = conn
                    .prepare_cached(
                        "UPDATE approvals SET last_seen = ?4, attempts = attempts + 1,
                             state = CASE WHEN state = 'approved' AND approved_until <= ?4
                                          THEN 'pending' ELSE state END
                         WHERE operation = ?1 AND node_uuid = ?2 AND ip = ?3 RETURNING id",
                    )?
                    .query_row(params![operation.as_str(), node_uuid, ip, at], |row| {
                        row.get(0)
                    })
                    .optional()?;
                if let Some(id) = known {
                    return Ok(id as u64);
                }
                let pending: u64 = conn
                    .prepare_cached("SELECT count(*) FROM approvals WHERE state = 'pending'")?
                    .query_row([], |row| row.get(0))?;
                if pending >= max_pending {
                    return Ok(0);
                }
                conn.prepare_cached(
                    "INSERT INTO approvals
                     (operation, node_uuid, ip, state, first_seen, last_seen, attempts)
                     VALUES (?1, ?2, ?3, 'pending', ?4, ?4, 1) RETURNING id",
                )?
                .query_row(params![operation.as_str(), node_uuid, ip, at], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|id| id as u64)
            })
            .await?;
        match id {
            0 => Ok(None),
            id => self.approval_by_id(id as ApprovalId),
        }
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals
                 WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
            ))?;
            let rows = statement.query_map([state.map(ApprovalState::as_str)], approval_of)?;
            rows.collect()
        })
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
        let changed = self
            .write(move |conn| {
                conn.prepare_cached(
                    "UPDATE approvals SET state = ?2, approved_until = ?3, decided_at = ?4
                     WHERE id = ?1",
                )?
                .execute(params![id, state.as_str(), until, at])
                .map(|changed| changed as u64)
            })
            .await?;
        if changed == 0 {
            return Ok(None);
        }
        self.approval_by_id(id)
    }

    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        let (conditions, values) = conditions(filter, 0);
        self.write(move |conn| {
            let mut statement = conn.prepare(&format!(
                "DELETE FROM records WHERE id = ?{} AND {conditions}",
                values.len() + 1
            ))?;
            let mut deleted = 0;
            for id in ids {
                let mut bound = values.clone();
                bound.push(id.into());
                deleted += statement.execute(rusqlite::params_from_iter(bound))? as u64;
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
                )
            })
            .collect();
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(
                "INSERT OR IGNORE INTO records
                 (id, nonce, node_uuid, ip, ciphertext, created_at, last_access, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut added = 0;
            for (id, nonce, node, ip, ciphertext, created, accessed, revoked) in &rows {
                added += statement.execute(params![
                    id,
                    &nonce[..],
                    node,
                    ip,
                    ciphertext,
                    created,
                    accessed,
                    revoked
                ])? as u64;
            }
            Ok(added)
        })
        .await
    }

    async fn copy_approvals(&self, approvals: &[Approval]) -> Result<u64, StoreError> {
        let approvals = approvals.to_vec();
        self.write(move |conn| {
            let mut statement = conn.prepare_cached(&format!(
                "INSERT OR IGNORE INTO approvals ({APPROVAL_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
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
                    a.decided_at
                ])? as u64;
            }
            Ok(added)
        })
        .await
    }
}

pub(super) const APPROVAL_COLUMNS: &str = "id, operation, node_uuid, ip, state, first_seen, last_seen, \
                                attempts, approved_until, decided_at";

pub(super) fn approval_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    let text = |index: usize| -> rusqlite::Result<String> { row.get(index) };
    let invalid = |index: usize, value: String| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("unknown value {value:?}").into(),
        )
    };
    let operation = text(1)?;
    let state = text(4)?;
    Ok(Approval {
        id: row.get(0)?,
        operation: Operation::parse(&operation).ok_or_else(|| invalid(1, operation.clone()))?,
        node_uuid: row.get(2)?,
        ip: row.get(3)?,
        state: ApprovalState::parse(&state).ok_or_else(|| invalid(4, state.clone()))?,
        first_seen: row.get(5)?,
        last_seen: row.get(6)?,
        attempts: row.get(7)?,
        approved_until: row.get(8)?,
        decided_at: row.get(9)?,
    })
}

const INFO_COLUMNS: &str = "id, node_uuid, ip, created_at, last_access, revoked_at";

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

/// The filter as an SQL condition over `records`, with its values in order.
fn conditions(filter: &RecordFilter, after: RecordId) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = vec!["id > ?1".to_string()];
    let mut values = vec![Value::from(after)];
    let mut bind = |condition: &str, value: Value| {
        values.push(value);
        sql.push(condition.replace('?', &format!("?{}", values.len())));
    };
    if let Some(node) = &filter.node_uuid {
        bind("node_uuid = ?", node.clone().into());
    }
    if let Some(ip) = &filter.ip {
        bind("ip = ?", ip.clone().into());
    }
    if let Some(before) = filter.not_used_since {
        bind("coalesce(last_access, created_at) < ?", before.into());
    }
    if let Some(before) = filter.created_before {
        bind("created_at < ?", before.into());
    }
    match filter.state {
        Some(RecordState::Active) => sql.push("revoked_at IS NULL".into()),
        Some(RecordState::Revoked) => sql.push("revoked_at IS NOT NULL".into()),
        None => {}
    }
    if let Some(ids) = &filter.ids {
        // Ids are integers: written out, they need no binding and no limit on variables.
        let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
        sql.push(format!("id IN ({})", list.join(",")));
    }
    (sql.join(" AND "), values)
}
