//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! All writes go through one writer thread that commits whatever has queued up while the
//! previous commit was flushing (group commit): every seal is durable before it is answered,
//! yet a burst of seals shares its fsyncs. Reads use a small pool of connections and run
//! inline: a point lookup served from the page cache takes microseconds, less than handing
//! it to another thread would.
//!
//! SQLite keeps working on a file it has open after that file is deleted, renamed or
//! replaced, so each commit and each lookup that finds nothing first makes sure the
//! configured path still leads to the opened file ([`OpenedFile`]); once it does not, the
//! store refuses everything until a restart.

use super::{
    Approval, ApprovalId, ApprovalState, Binding, BindingId, Decision, Fingerprint, ImportBatch,
    ImportReport, Inserted, NewBinding, NewRecord, NodeSummary, Operation, Record, RecordFilter,
    RecordId, RecordInfo, RecordState, Store, StoreError, StoredRecord, UnixTime, Window,
};
use crate::locking::lock;
use crate::sealing::SealNonce;
use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

mod backup;
mod bindings;

/// Marks the file as ours ("TKMS"), so that a foreign SQLite file is never migrated.
const APPLICATION_ID: i64 = 0x544B_4D53;

/// Schema migrations; `PRAGMA user_version` is the number applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE records (
        id          INTEGER PRIMARY KEY,
        nonce       BLOB    NOT NULL UNIQUE CHECK (length(nonce) = 12),
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        ciphertext  BLOB    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER
    );
    CREATE TABLE legacy_imports (
        fingerprint TEXT    PRIMARY KEY,
        imported_at INTEGER NOT NULL,
        records     INTEGER NOT NULL
    );
",
    // Revocation, and the index `keys revoke --node` and `keys list --node` use.
    "
    ALTER TABLE records ADD COLUMN revoked_at INTEGER;
    CREATE INDEX records_by_node ON records (node_uuid);
",
    // Policy state, and the index the hourly quota counts with.
    "
    CREATE INDEX records_by_creation ON records (created_at);
    CREATE TABLE windows (
        operation   TEXT    PRIMARY KEY CHECK (operation IN ('seal', 'unseal')),
        opened_at   INTEGER NOT NULL,
        closes_at   INTEGER NOT NULL
    );
    CREATE TABLE approvals (
        id             INTEGER PRIMARY KEY,
        operation      TEXT    NOT NULL CHECK (operation IN ('seal', 'unseal')),
        node_uuid      TEXT    NOT NULL,
        ip             TEXT    NOT NULL,
        state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        approved_until INTEGER,
        decided_at     INTEGER,
        UNIQUE (operation, node_uuid, ip)
    );
",
    // Ids never come back after a purge: an old audit line's id must not name another
    // node's record (or approval). SQLite can only add AUTOINCREMENT by rebuilding a table.
    "
    CREATE TABLE records_autoincrement (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        nonce       BLOB    NOT NULL UNIQUE CHECK (length(nonce) = 12),
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        ciphertext  BLOB    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER,
        revoked_at  INTEGER
    );
    INSERT INTO records_autoincrement
        SELECT id, nonce, node_uuid, ip, ciphertext, created_at, last_access, revoked_at
        FROM records;
    DROP TABLE records;
    ALTER TABLE records_autoincrement RENAME TO records;
    CREATE INDEX records_by_node ON records (node_uuid);
    CREATE INDEX records_by_creation ON records (created_at);
    CREATE TABLE approvals_autoincrement (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        operation      TEXT    NOT NULL CHECK (operation IN ('seal', 'unseal')),
        node_uuid      TEXT    NOT NULL,
        ip             TEXT    NOT NULL,
        state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        approved_until INTEGER,
        decided_at     INTEGER,
        UNIQUE (operation, node_uuid, ip)
    );
    INSERT INTO approvals_autoincrement
        SELECT id, operation, node_uuid, ip, state, first_seen, last_seen, attempts,
               approved_until, decided_at
        FROM approvals;
    DROP TABLE approvals;
    ALTER TABLE approvals_autoincrement RENAME TO approvals;
",
    // Foreign blobs (`takeOver`) bound to their first caller, by fingerprint.
    "
    CREATE TABLE foreign_bindings (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint BLOB    NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
        scheme      TEXT    NOT NULL,
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER,
        revoked_at  INTEGER
    );
    CREATE INDEX foreign_bindings_by_node ON foreign_bindings (node_uuid);
",
];

const READERS: usize = 4;
const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Caps one group commit, so that one transaction never holds a huge backlog hostage.
const MAX_BATCH: usize = 1024;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    file: Arc<OpenedFile>,
    /// Whether [`SqliteStore::open`] created the file: an empty database should never be a
    /// surprise.
    created: bool,
    /// `None` once closed.
    readers: Box<[Mutex<Option<Connection>>]>,
    next_reader: AtomicUsize,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

enum Job {
    Insert(NewRecord, oneshot::Sender<Result<Inserted, StoreError>>),
    Import(
        ImportBatch,
        oneshot::Sender<Result<ImportReport, StoreError>>,
    ),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// An admin change; answers how many records it changed.
    Write(WriteFn, oneshot::Sender<Result<u64, StoreError>>),
}

type WriteFn = Box<dyn FnOnce(&Connection) -> rusqlite::Result<u64> + Send>;

impl SqliteStore {
    /// Opens the database at `path`, creating it (mode 0600, parent directory 0700) when it
    /// does not exist, and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let created = create_private_file(path)?;
        let mut store = Self::open_existing(path)?;
        store.created = created;
        Ok(store)
    }

    /// Opens an existing database; never creates one.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        let open_error = |problem: String| StoreError::Open {
            path: path.display().to_string(),
            problem,
        };
        let file = match OpenedFile::open(path) {
            Ok(file) => Arc::new(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(open_error("does not exist".into()));
            }
            Err(e) => return Err(open_error(e.to_string())),
        };
        let mut writer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(e.to_string()))?;
        configure(&writer).map_err(|e| open_error(describe(&e)))?;
        migrate(&mut writer).map_err(|e| match e {
            StoreError::Open { problem, .. } => open_error(problem),
            other => open_error(other.to_string()),
        })?;

        let readers = (0..READERS)
            .map(|_| {
                let reader = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                reader.busy_timeout(BUSY_TIMEOUT)?;
                Ok(Mutex::new(Some(reader)))
            })
            .collect::<Result<Vec<_>, rusqlite::Error>>()
            .map_err(|e| open_error(e.to_string()))?;

        // The file SQLite opened is the one `file` holds, unless the path changed meanwhile.
        file.verify()?;

        let accesses = Arc::new(Mutex::new(HashMap::new()));
        let (jobs, queue) = mpsc::channel();
        let writer_accesses = Arc::clone(&accesses);
        let writer_file = Arc::clone(&file);
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(writer, queue, writer_accesses, &writer_file))
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;

        Ok(Self {
            file,
            created: false,
            readers: readers.into_boxed_slice(),
            next_reader: AtomicUsize::new(0),
            jobs: Mutex::new(Some(jobs)),
            accesses,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Whether this store created its database file when it was opened.
    pub fn created(&self) -> bool {
        self.created
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let jobs = lock(&self.jobs);
        let sender = jobs.as_ref().ok_or(StoreError::WriterStopped)?;
        sender.send(job).map_err(|_| StoreError::WriterStopped)
    }

    fn read<T>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.file.not_lost()?;
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let count = self.readers.len();
        for i in 0..count {
            if let Ok(reader) = self.readers[(start + i) % count].try_lock() {
                return Ok(query(reader.as_ref().ok_or(StoreError::Closed)?)?);
            }
        }
        let reader = lock(&self.readers[start % count]);
        Ok(query(reader.as_ref().ok_or(StoreError::Closed)?)?)
    }

    /// Closes the readers first and the writer last: only the last connection to close
    /// checkpoints the journal into the file and removes it, and a read-only one cannot.
    fn close_connections(&self) {
        for reader in &self.readers {
            lock(reader).take();
        }
        lock(&self.jobs).take();
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
    }

    /// The journal files beside the database. After the last user closed it cleanly there
    /// are none, so that a copy of the database file alone holds every record.
    pub fn journal_files(path: &Path) -> Vec<PathBuf> {
        ["-wal", "-shm"]
            .iter()
            .map(|suffix| {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                PathBuf::from(name)
            })
            .filter(|file| file.exists())
            .collect()
    }
}

/// Proof that nothing else has the database open: no server, no admin command.
pub struct ExclusiveUse {
    _handle: fs::File,
}

impl SqliteStore {
    /// Takes the database at `path` for a change no one may see half done (a restore);
    /// refused while a server or another command uses it.
    pub fn exclusive_use(path: &Path) -> Result<ExclusiveUse, StoreError> {
        let open_error = |problem: String| StoreError::Open {
            path: path.display().to_string(),
            problem,
        };
        let handle = fs::File::open(path).map_err(|e| open_error(e.to_string()))?;
        rustix::fs::flock(
            &handle,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .map_err(|_| {
            open_error(
                "is in use by a running server or another command; stop the server first".into(),
            )
        })?;
        Ok(ExclusiveUse { _handle: handle })
    }
}

/// What a read-only look at a database file finds; see [`SqliteStore::inspect`].
pub struct Inspection {
    /// Applied schema migrations; `serve` brings it up to [`Inspection::current_version`].
    pub schema_version: usize,
    pub current_version: usize,
    pub records: u64,
    /// How many of the nonces asked about have no record.
    pub missing: usize,
}

impl SqliteStore {
    /// Reads what an operator needs to know of a database without changing it: no
    /// migration, no journal-mode change, no write. For `check`, beside a running server.
    pub fn inspect(path: &Path, nonces: &[SealNonce]) -> Result<Inspection, StoreError> {
        let open_error = |problem: String| StoreError::Open {
            path: path.display().to_string(),
            problem,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(describe(&e)))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_error(describe(&e)))?;
        let read = || -> Result<Inspection, StoreError> {
            let version = schema_state(&conn)?;
            let mut inspection = Inspection {
                schema_version: version,
                current_version: MIGRATIONS.len(),
                records: 0,
                missing: nonces.len(),
            };
            if version == 0 {
                return Ok(inspection);
            }
            inspection.records =
                conn.query_row("SELECT count(*) FROM records", [], |row| row.get(0))?;
            let mut lookup = conn.prepare("SELECT 1 FROM records WHERE nonce = ?1")?;
            let mut missing = 0;
            for nonce in nonces {
                if !lookup.exists([&nonce[..]])? {
                    missing += 1;
                }
            }
            inspection.missing = missing;
            Ok(inspection)
        };
        read().map_err(|e| match e {
            StoreError::Open { problem, .. } => open_error(problem),
            StoreError::Sqlite(e) => open_error(describe(&e)),
            other => open_error(other.to_string()),
        })
    }
}

/// The applied schema version, after making sure the file is ours (or empty) and not newer
/// than this build knows.
fn schema_state(conn: &Connection) -> Result<usize, StoreError> {
    let application_id: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table'",
        [],
        |r| r.get(0),
    )?;
    let problem = |problem: String| StoreError::Open {
        path: String::new(),
        problem,
    };
    if application_id != APPLICATION_ID && (application_id != 0 || has_tables) {
        return Err(problem(
            "is an SQLite file of another program; point `database` at a new file or at a \
             talos-kms-server database"
                .into(),
        ));
    }
    if version > MIGRATIONS.len() {
        return Err(problem(format!(
            "has schema version {version}, newer than this server knows ({}); run a newer \
             talos-kms-server",
            MIGRATIONS.len()
        )));
    }
    Ok(version)
}

impl Drop for SqliteStore {
    /// Closing the queue makes the writer flush buffered access times and stop.
    fn drop(&mut self) {
        self.close_connections();
    }
}

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
        ids: &[BindingId],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        self.revoke_bindings(ids, revoked_at).await
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

const APPROVAL_COLUMNS: &str = "id, operation, node_uuid, ip, state, first_seen, last_seen, \
                                attempts, approved_until, decided_at";

fn approval_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
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

impl SqliteStore {
    fn approval_by_id(&self, id: ApprovalId) -> Result<Option<Approval>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"
            ))?
            .query_row([id], approval_of)
            .optional()
        })
    }

    async fn write(
        &self,
        change: impl FnOnce(&Connection) -> rusqlite::Result<u64> + Send + 'static,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Write(Box::new(change), reply))?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }
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

/// Creates the file with mode 0600 before SQLite sees it; SQLite gives its -wal and -shm
/// files the same mode.
fn create_private_file(path: &Path) -> Result<bool, StoreError> {
    let io_error = |e: std::io::Error| StoreError::Open {
        path: path.display().to_string(),
        problem: match e.kind() {
            std::io::ErrorKind::NotADirectory => "a part of its path is a file, not a \
                directory, so it cannot be created; set `database` to a path in a directory"
                .into(),
            _ => e.to_string(),
        },
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error)?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {
            // The new file's directory entry must survive a power cut too.
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            fs::File::open(parent.unwrap_or(Path::new(".")))
                .and_then(|dir| dir.sync_all())
                .map_err(io_error)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error(e)),
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, WAL is required"
        )));
    }
    // FULL: a commit is on disk when it returns, power loss included.
    conn.pragma_update(None, "synchronous", "FULL")
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = schema_state(&tx)?;
    for migration in &MIGRATIONS[version..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}

fn write_loop(
    mut conn: Connection,
    queue: mpsc::Receiver<Job>,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
    file: &OpenedFile,
) {
    let mut last_access_flush = Instant::now();
    loop {
        let mut batch = Vec::new();
        match queue.recv_timeout(ACCESS_FLUSH_INTERVAL) {
            Ok(job) => batch.push(job),
            // Idle: notice a vanished file before a node's call would.
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = file.verify();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                commit_batch(&mut conn, Vec::new(), &accesses, true, file);
                checkpoint(&conn, file);
                return;
            }
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let flush_accesses = last_access_flush.elapsed() >= ACCESS_FLUSH_INTERVAL
            || batch.iter().any(|job| matches!(job, Job::Flush(_)));
        if flush_accesses {
            last_access_flush = Instant::now();
        }
        if !batch.is_empty() || flush_accesses {
            commit_batch(&mut conn, batch, &accesses, flush_accesses, file);
        }
    }
}

/// Moves every committed page from the journal into the database file before the writer's
/// connection, the last one, closes (which then removes the journal files).
fn checkpoint(conn: &Connection, file: &OpenedFile) {
    if file.not_lost().is_err() {
        return;
    }
    let result = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    match result {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            "the database journal could not be moved into {} at close: a reader still had \
             it open",
            file.path.display()
        ),
        Err(e) => tracing::error!(
            problem = %describe(&e),
            "the database journal could not be moved into {} at close",
            file.path.display()
        ),
    }
}

/// Runs every queued job in one transaction, commits once, then answers each job; nothing
/// is acknowledged unless the commit reached the file at the configured path.
fn commit_batch(
    conn: &mut Connection,
    batch: Vec<Job>,
    accesses: &Mutex<HashMap<RecordId, UnixTime>>,
    flush_accesses: bool,
    file: &OpenedFile,
) {
    if file.not_lost().is_err() {
        for job in batch {
            match job {
                Job::Insert(_, reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Import(_, reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Flush(reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Write(_, reply) => drop(reply.send(Err(file.lost_error()))),
            }
        }
        return;
    }
    let pending = if flush_accesses {
        std::mem::take(&mut *lock(accesses))
    } else {
        HashMap::new()
    };
    if batch.is_empty() && pending.is_empty() {
        return;
    }
    let mut done = Vec::with_capacity(batch.len());
    let committed = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for job in batch {
            done.push(match job {
                Job::Insert(record, reply) => Done::Insert(insert(&tx, &record), reply),
                Job::Import(batch, reply) => {
                    Done::Import(all_or_nothing(&tx, |tx| import(tx, &batch)), reply)
                }
                Job::Flush(reply) => Done::Flush(reply),
                Job::Write(change, reply) => Done::Write(all_or_nothing(&tx, change), reply),
            });
        }
        let mut touch = tx.prepare_cached(
            "UPDATE records SET last_access = max(coalesce(last_access, 0), ?2) WHERE id = ?1",
        )?;
        for (id, at) in &pending {
            touch.execute(params![id, at])?;
        }
        drop(touch);
        tx.commit()
    })();

    let failure = if file.verify().is_err() {
        Some(Failure::Lost)
    } else {
        committed
            .as_ref()
            .err()
            .map(|e| Failure::Commit(describe(e)))
    };
    if let Some(Failure::Commit(problem)) = &failure {
        tracing::error!(%problem, "database commit failed; the requests in it were refused");
    }
    if failure.is_some() {
        // Keep the access times for the next attempt, unless newer ones arrived meanwhile.
        let mut current = lock(accesses);
        for (id, at) in pending {
            current.entry(id).or_insert(at);
        }
    }
    // Nothing is acknowledged unless the whole transaction committed.
    for finished in done {
        match finished {
            Done::Insert(result, reply) => {
                let _ = reply.send(settle(&failure, result, file));
            }
            Done::Import(result, reply) => {
                let _ = reply.send(settle(&failure, result, file));
            }
            Done::Flush(reply) => {
                let _ = reply.send(settle(&failure, Ok(()), file));
            }
            Done::Write(result, reply) => {
                let _ = reply.send(settle(&failure, result, file));
            }
        }
    }
}

/// Runs a job of several statements inside the group's transaction so that a failure
/// undoes all of the job and none of its neighbours.
fn all_or_nothing<T>(
    tx: &Connection,
    job: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    tx.execute_batch("SAVEPOINT job")?;
    match job(tx) {
        Ok(value) => {
            tx.execute_batch("RELEASE job")?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO job; RELEASE job");
            Err(e)
        }
    }
}

/// Why a whole group commit was refused.
enum Failure {
    Commit(String),
    Lost,
}

fn settle<T>(
    failure: &Option<Failure>,
    result: rusqlite::Result<T>,
    file: &OpenedFile,
) -> Result<T, StoreError> {
    match (failure, result) {
        (Some(Failure::Lost), _) => Err(file.lost_error()),
        (Some(Failure::Commit(problem)), _) => Err(StoreError::Write(problem.clone())),
        (None, Ok(value)) => Ok(value),
        (None, Err(e)) => Err(StoreError::Write(describe(&e))),
    }
}

/// The database file as opened, and the path the operator knows it by. A commit to a file
/// that was deleted, or moved where the next start will not look, would be lost on restart.
struct OpenedFile {
    path: PathBuf,
    /// Held open to ask the kernel about the very file SQLite opened.
    handle: fs::File,
    device: u64,
    inode: u64,
    /// What happened to the file, once it was found gone; never cleared.
    lost: OnceLock<String>,
}

impl OpenedFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let handle = fs::File::open(path)?;
        // Shared by every user of the database; `db restore` needs it exclusively.
        rustix::fs::flock(&handle, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(
            |_| {
                std::io::Error::other(
                    "is being restored (`db restore` holds it); wait for it to finish",
                )
            },
        )?;
        let metadata = handle.metadata()?;
        Ok(Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            handle,
            device: metadata.dev(),
            inode: metadata.ino(),
            lost: OnceLock::new(),
        })
    }

    /// A flag check only: for reads, whose file cannot lose what they find.
    fn not_lost(&self) -> Result<(), StoreError> {
        match self.lost.get() {
            Some(_) => Err(self.lost_error()),
            None => Ok(()),
        }
    }

    /// Whether the configured path still leads to the opened file; the first time it does
    /// not, the store is marked lost and the reason logged.
    fn verify(&self) -> Result<(), StoreError> {
        self.not_lost()?;
        let Some(problem) = self.problem() else {
            return Ok(());
        };
        if self.lost.set(problem).is_ok() {
            tracing::error!(
                "{}; restore the file to its path (or restore a backup), then restart the server",
                self.lost_error()
            );
        }
        Err(self.lost_error())
    }

    fn problem(&self) -> Option<String> {
        let deleted = self.handle.metadata().is_ok_and(|m| m.nlink() == 0);
        match fs::metadata(&self.path) {
            Ok(now) if now.dev() == self.device && now.ino() == self.inode => None,
            Ok(_) if deleted => Some("was deleted and another file put in its place".into()),
            Ok(_) => Some("was replaced by another file".into()),
            Err(_) if deleted => Some("was deleted".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(
                "is no longer at its path (deleted, or it or a directory above it renamed)".into(),
            ),
            Err(e) => Some(format!("can no longer be reached at its path ({e})")),
        }
    }

    fn lost_error(&self) -> StoreError {
        StoreError::Lost {
            path: self.path.display().to_string(),
            problem: self.lost.get().cloned().unwrap_or_default(),
        }
    }
}

/// A job that ran inside the transaction, waiting for the commit to be answered.
enum Done {
    Insert(
        rusqlite::Result<Inserted>,
        oneshot::Sender<Result<Inserted, StoreError>>,
    ),
    Import(
        rusqlite::Result<ImportReport>,
        oneshot::Sender<Result<ImportReport, StoreError>>,
    ),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    Write(
        rusqlite::Result<u64>,
        oneshot::Sender<Result<u64, StoreError>>,
    ),
}

/// Binds a record to the six columns of an `INSERT ... VALUES (?1, ..., ?6)` and runs it.
fn execute_insert(
    statement: &mut rusqlite::Statement<'_>,
    record: &NewRecord,
) -> rusqlite::Result<usize> {
    statement.execute(params![
        &record.nonce[..],
        record.node_uuid,
        record.ip,
        record.ciphertext,
        record.created_at,
        record.last_access,
    ])
}

fn insert(tx: &Connection, record: &NewRecord) -> rusqlite::Result<Inserted> {
    let mut statement = tx.prepare_cached(
        "INSERT INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    match execute_insert(&mut statement, record) {
        Ok(_) => Ok(Inserted::Stored(tx.last_insert_rowid())),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Ok(Inserted::NonceTaken)
        }
        Err(e) => Err(e),
    }
}

fn import(tx: &Connection, batch: &ImportBatch) -> rusqlite::Result<ImportReport> {
    let mut statement = tx.prepare_cached(
        "INSERT OR IGNORE INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut report = ImportReport::default();
    for record in &batch.records {
        let added = execute_insert(&mut statement, record)?;
        if added == 1 {
            report.imported += 1;
        } else {
            report.skipped += 1;
        }
    }
    if let Some(fingerprint) = &batch.fingerprint {
        tx.execute(
            "INSERT OR REPLACE INTO legacy_imports (fingerprint, imported_at, records)
             VALUES (?1, ?2, ?3)",
            params![fingerprint, super::now(), batch.records.len()],
        )?;
    }
    Ok(report)
}

fn describe(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_flushed_to_disk_before_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        configure(&conn).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            synchronous, 2,
            "synchronous=FULL: a seal survives a power cut once answered"
        );
    }

    fn record(nonce: u8) -> NewRecord {
        NewRecord {
            nonce: [nonce; 12],
            node_uuid: "n".into(),
            ip: "10.0.0.1".into(),
            ciphertext: vec![0; 48],
            created_at: 1,
            last_access: None,
        }
    }

    #[tokio::test]
    async fn a_deleted_file_is_named_and_refuses_everything_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.created());
        store.insert(record(1)).await.unwrap();
        fs::remove_file(&path).unwrap();
        let refused = store.insert(record(2)).await.unwrap_err().to_string();
        assert!(refused.contains("was deleted"), "{refused}");
        assert!(refused.contains(&path.display().to_string()), "{refused}");
        // Not even a record the open file still holds is served from a lost store.
        assert!(matches!(
            store.find_by_nonce(&[1; 12]).await,
            Err(StoreError::Lost { .. })
        ));
        assert!(matches!(store.flush().await, Err(StoreError::Lost { .. })));
    }

    #[tokio::test]
    async fn a_nonce_can_be_stored_once_and_an_import_skips_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let record = NewRecord {
            nonce: [9; 12],
            node_uuid: "n".into(),
            ip: "10.0.0.1".into(),
            ciphertext: vec![0; 48],
            created_at: 1,
            last_access: None,
        };
        assert!(matches!(
            store.insert(record.clone()).await.unwrap(),
            Inserted::Stored(_)
        ));
        assert_eq!(
            store.insert(record.clone()).await.unwrap(),
            Inserted::NonceTaken
        );
        let report = store
            .import(ImportBatch {
                records: vec![record],
                fingerprint: Some("f".into()),
            })
            .await
            .unwrap();
        assert_eq!(
            report,
            ImportReport {
                imported: 0,
                skipped: 1
            }
        );
        assert!(store.has_imported("f").await.unwrap());
        assert_eq!(store.count().await.unwrap(), 1);
    }
}
