//! Bindings of foreign blobs (`takeOver`) in SQLite; the `Store` impl delegates here.

use super::SqliteStore;
use super::queries::bound;
use crate::store::sql::{Dialect, conditions};
use crate::store::{
    Binding, BindingId, Fingerprint, NewBinding, RecordFilter, RecordInfo, Retag, StoreError,
    UnixTime,
};
use rusqlite::{OptionalExtension, params};

const COLUMNS: &str =
    "id, scheme, node_uuid, ip, created_at, last_access, revoked_at, fingerprint, tag";

fn binding_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Binding> {
    let fingerprint: Vec<u8> = row.get(7)?;
    Ok(Binding {
        // The schema's CHECK holds every fingerprint at 32 bytes.
        fingerprint: Fingerprint::try_from(fingerprint.as_slice()).unwrap_or_default(),
        tag: row.get(8)?,
        scheme: row.get(1)?,
        info: RecordInfo {
            id: row.get(0)?,
            node_uuid: row.get(2)?,
            ip: row.get(3)?,
            created_at: row.get(4)?,
            last_access: row.get(5)?,
            revoked_at: row.get(6)?,
        },
    })
}

impl SqliteStore {
    pub(super) fn binding_of(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Binding>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM foreign_bindings WHERE fingerprint = ?1"
            ))?
            .query_row([&fingerprint[..]], binding_of)
            .optional()
        })
    }

    pub(super) async fn bind_first(&self, binding: NewBinding) -> Result<Binding, StoreError> {
        let fingerprint = binding.fingerprint;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO foreign_bindings (fingerprint, scheme, node_uuid, ip, created_at, tag)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (fingerprint) DO NOTHING",
            )?
            .execute(params![
                &binding.fingerprint[..],
                binding.scheme,
                binding.node_uuid,
                binding.ip,
                binding.at,
                binding.tag
            ])
            .map(|added| added as u64)
        })
        .await?;
        self.binding_of(&fingerprint)?.ok_or_else(|| {
            StoreError::Write("a binding just written cannot be read back".to_string())
        })
    }

    pub(super) async fn note_binding_use(
        &self,
        id: BindingId,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached("UPDATE foreign_bindings SET last_access = ?2 WHERE id = ?1")?
                .execute(params![id, at])
                .map(|changed| changed as u64)
        })
        .await
        .map(drop)
    }

    pub(super) fn list_bindings(
        &self,
        filter: &RecordFilter,
        after: BindingId,
        limit: usize,
    ) -> Result<Vec<Binding>, StoreError> {
        let (condition, values) = conditions(filter, after, Dialect::Sqlite);
        self.read(|conn| {
            let mut statement = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM foreign_bindings WHERE {condition} ORDER BY id LIMIT {limit}"
            ))?;
            let rows = statement.query_map(
                rusqlite::params_from_iter(values.iter().map(bound)),
                binding_of,
            )?;
            rows.collect()
        })
    }

    pub(super) async fn revoke_bindings(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        self.set_revoked_in("foreign_bindings", ids, revoked_at)
            .await
    }
}
