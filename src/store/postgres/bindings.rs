//! Bindings of foreign blobs (`takeOver`) in PostgreSQL; the `Store` impl delegates here.

use super::PgStore;
use super::queries::params;
use crate::store::sql::{Dialect, conditions};
use crate::store::{
    Binding, BindingId, Fingerprint, NewBinding, RecordFilter, RecordInfo, Retag, StoreError,
    UnixTime,
};
use tokio_postgres::Row;

const COLUMNS: &str =
    "id, scheme, node_uuid, ip, created_at, last_access, revoked_at, fingerprint, tag";

fn binding_of(row: &Row) -> Binding {
    let fingerprint: &[u8] = row.get(7);
    Binding {
        // The schema's CHECK holds every fingerprint at 32 bytes.
        fingerprint: Fingerprint::try_from(fingerprint).unwrap_or_default(),
        tag: row.get(8),
        scheme: row.get(1),
        info: RecordInfo {
            id: row.get(0),
            node_uuid: row.get(2),
            ip: row.get(3),
            created_at: row.get(4),
            last_access: row.get(5),
            revoked_at: row.get(6),
        },
    }
}

impl PgStore {
    pub(super) async fn binding_of(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Binding>, StoreError> {
        let fingerprint = fingerprint.to_vec();
        self.with(|client| async move {
            let row = client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM foreign_bindings WHERE fingerprint = $1"),
                    &[&fingerprint],
                )
                .await?;
            Ok(row.as_ref().map(binding_of))
        })
        .await
    }

    pub(super) async fn bind_first(&self, binding: NewBinding) -> Result<Binding, StoreError> {
        self.with(|client| async move {
            // The no-op update makes RETURNING give the row that holds when one was there.
            let row = client
                .query_one(
                    &format!(
                        "INSERT INTO foreign_bindings (fingerprint, scheme, node_uuid, ip,
                             created_at, tag)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = excluded.fingerprint
                         RETURNING {COLUMNS}"
                    ),
                    &[
                        &binding.fingerprint.to_vec(),
                        &binding.scheme,
                        &binding.node_uuid,
                        &binding.ip,
                        &binding.at,
                        &binding.tag,
                    ],
                )
                .await?;
            Ok(binding_of(&row))
        })
        .await
    }

    pub(super) async fn note_binding_use(
        &self,
        id: BindingId,
        at: UnixTime,
    ) -> Result<(), StoreError> {
        self.with(|client| async move {
            client
                .execute(
                    "UPDATE foreign_bindings SET last_access = $2 WHERE id = $1",
                    &[&id, &at],
                )
                .await
        })
        .await
        .map(drop)
    }

    pub(super) async fn list_bindings(
        &self,
        filter: &RecordFilter,
        after: BindingId,
        limit: usize,
    ) -> Result<Vec<Binding>, StoreError> {
        let (conditions, values) = conditions(filter, after, Dialect::Postgres);
        self.with(|client| async move {
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM foreign_bindings WHERE {conditions} \
                         ORDER BY id LIMIT {limit}"
                    ),
                    &params(&values),
                )
                .await?;
            Ok(rows.iter().map(binding_of).collect())
        })
        .await
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
