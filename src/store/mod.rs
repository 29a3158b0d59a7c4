//! Where records live. The request path sees only the [`Store`] trait; SQLite is the
//! embedded backend, and a shared PostgreSQL backend for replicas fits behind the same trait.

mod bindings;
pub mod legacy_json;
pub mod migrate;
mod policy_state;
pub mod postgres;
mod sql;
mod sqlite;

pub use bindings::{Binding, BindingId, Fingerprint, NewBinding};
pub use policy_state::{
    Approval, ApprovalId, ApprovalState, Decision, NodeLimits, NodeSummary, Operation, Window,
};
pub use postgres::{PgOptions, PgStore};
pub use sqlite::{ExclusiveUse, Inspection, SqliteStore};

use crate::sealing::SealNonce;
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the records live: an SQLite file (embedded, the default) or a PostgreSQL database
/// shared by replicas.
#[derive(Clone, Debug)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(Box<PgOptions>),
}

impl std::fmt::Display for Database {
    /// The path, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "{}", path.display()),
            Database::Postgres(options) => write!(f, "{options}"),
        }
    }
}

impl Database {
    /// A path, or a `postgres://` URL; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &std::path::Path) -> Result<Database, String> {
        if postgres::is_postgres_url(text) {
            return PgOptions::parse(text, base)
                .map(|options| Database::Postgres(Box::new(options)));
        }
        if text.contains("://") {
            return Err(format!(
                "{} is neither a file path nor a postgres:// URL",
                postgres::redact(text)
            ));
        }
        let path = PathBuf::from(text);
        Ok(Database::Sqlite(if path.is_relative() {
            base.join(path)
        } else {
            path
        }))
    }

    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        match self {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        }
    }
}

/// A store ready to serve, and whether it was empty of our schema when opened.
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub created: bool,
}

/// Opens the database for serving: an SQLite file is created when missing; a PostgreSQL
/// database must exist, and gets its tables.
pub async fn open(database: &Database) -> Result<Opened, StoreError> {
    match database {
        Database::Sqlite(path) => {
            let store = SqliteStore::open(path)?;
            let created = store.created();
            Ok(Opened {
                store: Arc::new(store),
                created,
            })
        }
        Database::Postgres(options) => {
            let store = PgStore::open(options).await?;
            let created = store.created();
            Ok(Opened {
                store: Arc::new(store),
                created,
            })
        }
    }
}

/// Opens a database that must already exist, for admin commands beside a running server.
pub async fn open_existing(database: &Database) -> Result<Arc<dyn Store>, StoreError> {
    match database {
        Database::Sqlite(path) => Ok(Arc::new(SqliteStore::open_existing(path)?)),
        Database::Postgres(options) => Ok(Arc::new(PgStore::open(options).await?)),
    }
}

/// Seconds since the Unix epoch, UTC.
pub type UnixTime = i64;
pub type RecordId = i64;

pub fn now() -> UnixTime {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A record as written by a seal or an import.
#[derive(Clone)]
pub struct NewRecord {
    pub nonce: SealNonce,
    pub node_uuid: String,
    /// Peer-address text bound into the seal (informational: the binding is in the AAD).
    pub ip: String,
    /// AES-GCM ciphertext with its tag.
    pub ciphertext: Vec<u8>,
    pub created_at: UnixTime,
    pub last_access: Option<UnixTime>,
    /// Custody's part, filled in by [`crate::custody::Custodian`] where a key source is
    /// configured; `None` above it and without one.
    pub custody: Custody,
}

/// What key custody adds to a row, opaque to the store: the data key version a record's
/// ciphertext is wrapped under, and a tag over the fields the policy trusts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Custody {
    pub key_version: Option<u32>,
    pub tag: Option<Vec<u8>>,
}

/// A custody value to set (`Some`) or remove (`None`), by name.
pub type CustodyChange = (String, Option<Vec<u8>>);

/// A row's id and the tag of its new state (see [`Custody`]).
pub type Retag = (i64, Option<Vec<u8>>);

/// The tables whose rows carry a [`Custody`] tag beside records and windows.
#[derive(Clone, Copy, Debug)]
pub enum TaggedTable {
    Approvals,
    ForeignBindings,
}

impl TaggedTable {
    pub fn name(self) -> &'static str {
        match self {
            TaggedTable::Approvals => "approvals",
            TaggedTable::ForeignBindings => "foreign_bindings",
        }
    }
}

/// A record's ciphertext wrapped again (custody's background re-encryption); written only
/// while the row still holds `was` and `revoked_at`, so a concurrent revoke or delete wins.
#[derive(Clone, Debug)]
pub struct Rewrapped {
    pub id: RecordId,
    pub was: Vec<u8>,
    pub revoked_at: Option<UnixTime>,
    pub ciphertext: Vec<u8>,
    pub key_version: u32,
    pub tag: Vec<u8>,
}

/// A stored record, as found by its nonce.
pub struct Record {
    pub id: RecordId,
    pub node_uuid: String,
    pub ip: String,
    pub ciphertext: Vec<u8>,
    pub created_at: UnixTime,
    pub last_access: Option<UnixTime>,
    /// Set while the record is revoked: its unseals are answered like a wrong key's.
    pub revoked_at: Option<UnixTime>,
    pub custody: Custody,
}

/// What an operator sees of a record: everything but its ciphertext and nonce.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RecordInfo {
    pub id: RecordId,
    pub node_uuid: String,
    pub ip: String,
    pub created_at: UnixTime,
    pub last_access: Option<UnixTime>,
    pub revoked_at: Option<UnixTime>,
}

impl RecordInfo {
    pub fn state(&self) -> RecordState {
        if self.revoked_at.is_some() {
            RecordState::Revoked
        } else {
            RecordState::Active
        }
    }

    /// When it was last unsealed, or created if never.
    pub fn last_used(&self) -> UnixTime {
        self.last_access.unwrap_or(self.created_at)
    }
}

/// A whole record, nonce included, for moving records elsewhere (export, migration).
pub struct StoredRecord {
    pub info: RecordInfo,
    pub nonce: SealNonce,
    pub ciphertext: Vec<u8>,
    pub custody: Custody,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    Active,
    Revoked,
}

/// Which records an admin command means; every condition set must hold.
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    pub ids: Option<Vec<RecordId>>,
    pub node_uuid: Option<String>,
    pub ip: Option<String>,
    pub state: Option<RecordState>,
    /// Neither unsealed nor created since then.
    pub not_used_since: Option<UnixTime>,
    pub created_before: Option<UnixTime>,
    /// Not wrapped under this data key version (unwrapped ones included).
    pub key_version_other_than: Option<u32>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Durable on disk; with the node as it was before this record.
    Stored(RecordId, NodeSummary),
    /// Another record already has this nonce; seal again with a fresh one.
    NonceTaken,
    /// Nothing written: the node is over the [`NodeLimits`] it was sealed under.
    OverLimits(NodeSummary),
}

/// Records to add unless their nonce is already stored.
pub struct ImportBatch {
    pub records: Vec<NewRecord>,
    /// Identifies a legacy file's content, so that an unchanged file is not parsed again.
    pub fingerprint: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub imported: usize,
    /// Already present (same nonce): an import is idempotent.
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {problem}")]
    Open { path: String, problem: String },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL could not be reached or refused; `database` is the URL without password.
    #[error("PostgreSQL database {database}: {problem}")]
    Postgres { database: String, problem: String },
    #[error("database write failed, nothing was stored: {0}")]
    Write(String),
    #[error("the database writer has stopped")]
    WriterStopped,
    #[error("the database was closed")]
    Closed,
    /// Key custody waits for operators' shares: nothing can be read or written until then.
    #[error("sealed: waiting for key shares (`talos-kms-server unseal-server`)")]
    Sealed,
    /// An admin command beside a shamir server: the data keys exist only in that server.
    #[error(
        "this needs the data keys, which with a shamir key source only the running server \
         holds: it cannot be done from a separate command in this build (README, \"Key \
         custody\")"
    )]
    KeysInServer,
    /// The file at the configured path is no longer the one the server has open; nothing is
    /// read from or written to it until a restart.
    #[error("database {path} {problem}; refusing every call until the server is restarted")]
    Lost { path: String, problem: String },
    /// A row holds what this build does not know (written by hand, or by a newer version).
    #[error(
        "the database's {table} table holds a row this server cannot read ({problem}); run \
         the talos-kms-server version that wrote it, or correct the row"
    )]
    Unreadable {
        table: &'static str,
        problem: String,
    },
}

/// The storage interface of the server. Implementations must make [`Store::insert`] durable
/// before it returns: a seal is acknowledged only after that.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Adds a sealed record unless its node is over `limits`; returns once it is durable.
    async fn insert(&self, record: NewRecord, limits: NodeLimits) -> Result<Inserted, StoreError>;

    async fn find_by_nonce(&self, nonce: &SealNonce) -> Result<Option<Record>, StoreError>;

    /// Notes an unseal attempt on a record. Buffered: written within seconds and on
    /// [`Store::flush`], never with a flush per unseal.
    fn record_access(&self, id: RecordId, at: UnixTime);

    /// Adds the records whose nonce is not stored yet, durably, and remembers the batch's
    /// fingerprint if it has one.
    async fn import(&self, batch: ImportBatch) -> Result<ImportReport, StoreError>;

    /// Whether a batch with this fingerprint was imported before.
    async fn has_imported(&self, fingerprint: &str) -> Result<bool, StoreError>;

    async fn count(&self) -> Result<u64, StoreError>;

    /// Whether the store answers now: what health checks report.
    async fn health(&self) -> Result<(), StoreError>;

    /// Up to `limit` records matching `filter` with ids above `after`, in id order: a page
    /// of a listing that may hold millions.
    async fn list(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, StoreError>;

    /// Like [`Store::list`], with nonces and ciphertexts.
    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError>;

    /// Revokes (`Some(time)`) or restores (`None`) the records with these ids, durably,
    /// each with its new tag; returns how many changed state.
    async fn set_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError>;

    /// Writes re-wrapped ciphertexts of records that still hold what they held when read,
    /// durably; returns how many were written.
    async fn rewrap(&self, rows: &[Rewrapped]) -> Result<u64, StoreError>;

    /// How many records are wrapped under each data key version (`None`: not wrapped).
    async fn key_versions(&self) -> Result<Vec<(Option<u32>, u64)>, StoreError>;

    /// Sets the tags of rows custody adopts (written before it was configured), durably.
    async fn retag(&self, table: TaggedTable, rows: &[Retag]) -> Result<(), StoreError>;

    /// Custody's named values (wrapped data keys, markers), opaque to the store.
    async fn custody_values(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Adds custody values, all in one transaction, unless one of their names exists
    /// (then nothing is added), durably; whether they were added. Two replicas making a
    /// data key at once: one wins, and both use its key.
    async fn add_custody_values(&self, values: Vec<(String, Vec<u8>)>) -> Result<bool, StoreError>;

    /// Sets (`Some`) or removes (`None`) custody values, all in one transaction, durably.
    async fn set_custody_values(&self, changes: Vec<CustodyChange>) -> Result<(), StoreError>;

    /// Deletes the records with these ids that still match `filter` when the deletion runs
    /// (a record restored meanwhile is kept), durably; returns how many were deleted.
    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError>;

    /// Writes everything buffered (access times).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Flushes and closes: an SQLite file is left whole with no journal beside it, so that
    /// a copy of the file alone holds every record. Nothing may be asked of the store after.
    async fn close(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    /// How many records were created at or after `since`.
    async fn created_since(&self, since: UnixTime) -> Result<u64, StoreError>;

    /// The unlock windows opened, seal first, closed ones included until they are replaced
    /// or removed.
    async fn windows(&self) -> Result<Vec<Window>, StoreError>;

    /// Opens (or moves the end of) the window of `window.operation`, durably.
    async fn open_window(&self, window: Window) -> Result<(), StoreError>;

    /// Closes the window of `operation`, durably; returns whether one was there.
    async fn close_window(&self, operation: Operation) -> Result<bool, StoreError>;

    /// The decision about this (operation, node, address), if one was ever asked for.
    async fn approval(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
    ) -> Result<Option<Approval>, StoreError>;

    /// Notes a call refused for want of approval, durably: a new one is added as pending
    /// (unless `max_pending` are pending already: then `None`, nothing added), a known one
    /// counts another attempt, and an approval whose time ran out becomes pending again.
    async fn note_pending(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
        at: UnixTime,
        max_pending: u64,
    ) -> Result<Option<Approval>, StoreError>;

    /// Every approval in the given state (all when `None`), oldest first.
    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError>;

    /// Records an operator's decision, durably; `None` when no approval has this id.
    async fn decide(
        &self,
        id: ApprovalId,
        decision: Decision,
        at: UnixTime,
        tag: Option<Vec<u8>>,
    ) -> Result<Option<Approval>, StoreError>;

    /// Adds records exactly as another store holds them (ids, times, revocation), skipping
    /// each whose id or nonce is already stored, durably; returns how many were added. For
    /// moving a database between backends (`db migrate`).
    async fn copy_records(&self, records: &[StoredRecord]) -> Result<u64, StoreError>;

    /// Adds approvals exactly as another store holds them, skipping each whose id or
    /// (operation, node, address) is already there, durably; returns how many were added.
    async fn copy_approvals(&self, approvals: &[Approval]) -> Result<u64, StoreError>;

    /// The binding of the foreign blob with this fingerprint, if it was ever unsealed.
    async fn binding(&self, fingerprint: &Fingerprint) -> Result<Option<Binding>, StoreError>;

    /// Binds a foreign blob to its first caller, durably; when it is bound already (two
    /// first unseals at once), nothing changes and the binding that holds is returned.
    async fn bind(&self, binding: NewBinding) -> Result<Binding, StoreError>;

    /// Notes an unseal of a bound blob, durably.
    async fn binding_used(&self, id: BindingId, at: UnixTime) -> Result<(), StoreError>;

    /// Up to `limit` bindings matching `filter` with ids above `after`, in id order.
    async fn bindings(
        &self,
        filter: &RecordFilter,
        after: BindingId,
        limit: usize,
    ) -> Result<Vec<Binding>, StoreError>;

    /// Revokes (`Some(time)`) or restores (`None`) the bindings with these ids, durably;
    /// returns how many changed state.
    async fn set_bindings_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError>;
}
