//! Backups of the SQLite database: a consistent snapshot taken while the server seals, a
//! read-only verification of any copy, and a restore into the database file in place.
//!
//! All copying goes through SQLite's online backup API, never a file copy: a copy of the
//! `.db` file alone misses the commits still in its `-wal`, and a copy taken mid-write is
//! torn.

use super::SqliteStore;
use super::connection::{BUSY_TIMEOUT, configure, describe};
use super::migrations::{APPLICATION_ID, MIGRATIONS, schema_state};
use crate::os_error::plain;
use crate::sealing::{NONCE_LEN, TAG_LEN};
use crate::store::StoreError;
use crate::store::UnixTime;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Pages per backup step: about 4 MiB, so that progress moves and a step stays short.
const PAGES_PER_STEP: i32 = 1024;
/// How long a step may keep finding the database locked before the copy gives up.
const LOCKED_FOR: Duration = Duration::from_secs(10);
const LOCKED_PAUSE: Duration = Duration::from_millis(50);
/// Problems kept word for word; beyond this they are only counted, so that a file damaged
/// throughout cannot exhaust memory.
const MAX_PROBLEMS: usize = 1000;
/// The times a record may hold: what the legacy format can write (four-digit years). The
/// range is wide on purpose: a server on a host without a real-time clock seals with a
/// time near 1970, and its records are sound.
const LATEST: UnixTime = 253_402_300_799; // 9999-12-31 23:59:59 UTC

/// Called as work advances: what is counted ("pages copied"), done so far, and the total.
pub type ProgressFn<'a> = &'a mut dyn FnMut(&'static str, u64, u64);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A backup file (not the database) could not be read or written.
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file to restore failed verification; nothing was changed.
    #[error("{} is not a sound backup, nothing was restored: {}", .0.file.display(), .0.problem_list())]
    Unsound(Verification),
    /// A restore would replace these records, and replacing was not asked for.
    #[error(
        "database {path} holds {records} records, which a restore would replace; nothing was \
         restored: add --force to replace them (they are first kept in \
         {path}.replaced-<time>)"
    )]
    NotEmpty { path: String, records: u64 },
}

/// What a backup wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupReport {
    pub records: u64,
    pub bytes: u64,
}

/// What a read-only look at a backup (or a database) found.
#[derive(Debug, Clone)]
pub struct Verification {
    pub file: PathBuf,
    /// `None` when the file could not be read as a database of this server.
    pub schema_version: Option<usize>,
    pub records: u64,
    /// Every problem, naming the record and field where there is one.
    pub problems: Vec<String>,
    /// Problems found beyond the ones listed.
    pub more_problems: u64,
    /// What does not make the file unsound but matters to whoever copies it.
    pub warnings: Vec<String>,
}

impl Verification {
    fn new(file: &Path) -> Verification {
        Verification {
            file: file.to_path_buf(),
            schema_version: None,
            records: 0,
            problems: Vec::new(),
            more_problems: 0,
            warnings: Vec::new(),
        }
    }

    pub fn is_sound(&self) -> bool {
        self.problems.is_empty() && self.more_problems == 0
    }

    fn problem(&mut self, problem: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem.into());
        } else {
            self.more_problems += 1;
        }
    }

    /// The problems in one sentence, at most a few of them.
    pub fn problem_list(&self) -> String {
        const SHOWN: usize = 5;
        let mut text = self
            .problems
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let rest = self.problems.len().saturating_sub(SHOWN) as u64 + self.more_problems;
        if rest > 0 {
            text.push_str(&format!(
                "; and {rest} more (`db verify {}` lists them)",
                self.file.display()
            ));
        }
        text
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Records in the database after the restore.
    pub records: u64,
    /// The database did not exist and was created for the restore.
    pub created: bool,
    /// Where the records the database held before were kept, and how many.
    pub replaced: Option<(PathBuf, u64)>,
}

impl SqliteStore {
    /// Writes a consistent snapshot of the database to `to` (mode 0600) while the server
    /// keeps serving: under a temporary name beside it, flushed, then renamed. Refuses an
    /// existing `to` unless `replace`.
    pub fn backup(
        &self,
        to: &Path,
        replace: bool,
        progress: ProgressFn<'_>,
    ) -> Result<BackupReport, BackupError> {
        self.file.not_lost()?;
        let database = &self.file.path;
        if is_part_of(database, to) {
            return Err(file_error(
                to,
                "is the database itself (or one of its files); back up to another file",
            ));
        }
        let source = open_read_only(database, false).map_err(|problem| StoreError::Open {
            path: database.display().to_string(),
            problem,
        })?;
        // One read transaction for the whole copy: in WAL mode the server keeps committing
        // beside it, and the copy is the database as of this first read, never restarted
        // (a copy without it starts over after every commit and may never finish).
        let records = (|| -> rusqlite::Result<u64> {
            source.execute_batch("BEGIN")?;
            source.query_row("SELECT count(*) FROM records", [], |row| row.get(0))
        })()
        .map_err(StoreError::from)?;
        let bytes = write_snapshot(&source, to, replace, "pages copied", progress)?;
        Ok(BackupReport { records, bytes })
    }

    /// Key custody's values in a backup (or a database), read without changing it; none in
    /// a file from before custody.
    pub fn custody_values_of(file: &Path) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let open_error = |problem: String| StoreError::Open {
            path: file.display().to_string(),
            problem,
        };
        let conn = open_read_only(file, true).map_err(open_error)?;
        let has_table: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'custody'",
            [],
            |row| row.get(0),
        )?;
        if !has_table {
            return Ok(Vec::new());
        }
        let mut statement = conn.prepare("SELECT name, value FROM custody ORDER BY name")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Checks a backup (or a database) without changing it: SQLite's integrity check, the
    /// application id and schema version, and every record's fields.
    pub fn verify(file: &Path, progress: ProgressFn<'_>) -> Verification {
        let mut verification = Verification::new(file);
        if with_suffix(file, "-wal").exists() {
            verification.warnings.push(format!(
                "{} is beside it: recent records may be only in that journal, so a copy of \
                 this file alone is not a backup; use `db backup`, or stop the server (a clean \
                 stop folds the journal into the file) before copying",
                with_suffix(file, "-wal").display()
            ));
        }
        match open_read_only(file, true) {
            Ok(conn) => {
                // One snapshot for every check, even while a server writes beside it.
                match conn.execute_batch("BEGIN") {
                    Ok(()) => check(&conn, &mut verification, progress),
                    Err(e) => verification.problem(format!("cannot be read: {}", describe(&e))),
                }
            }
            Err(problem) => verification.problem(problem),
        }
        verification
    }

    /// Replaces the content of the database at `database` with the backup `file`, in place
    /// (same file, so its `-wal` and `-shm` stay consistent), after verifying the backup.
    /// Creates the database when it does not exist. Takes the database for exclusive use, so it
    /// is refused while a server or another command uses it. When the database holds records,
    /// refuses unless `replace`, and then first saves them to `<database>.replaced-<time>`.
    pub fn restore(
        file: &Path,
        database: &Path,
        replace: bool,
        progress: ProgressFn<'_>,
    ) -> Result<RestoreReport, BackupError> {
        let mut verification = Verification::new(file);
        if is_part_of(database, file) {
            return Err(file_error(
                file,
                "is the database itself (or one of its files); restore from a backup file",
            ));
        }
        let source = match open_read_only(file, true) {
            Ok(source) => source,
            Err(problem) => {
                verification.problem(problem);
                return Err(BackupError::Unsound(verification));
            }
        };
        // The copy restores exactly the snapshot that was verified.
        if let Err(e) = source.execute_batch("BEGIN") {
            verification.problem(format!("cannot be read: {}", describe(&e)));
        } else {
            check(&source, &mut verification, progress);
        }
        if !verification.is_sound() {
            return Err(BackupError::Unsound(verification));
        }

        let created = !database.exists();
        if created {
            // Created the way the server creates it: modes, WAL, schema.
            drop(SqliteStore::open(database)?);
        }
        let _exclusive = SqliteStore::exclusive_use(database)?;
        let open_error = |e: rusqlite::Error| StoreError::Open {
            path: database.display().to_string(),
            problem: describe(&e),
        };
        let mut live = Connection::open_with_flags(
            database,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error)?;
        configure(&live).map_err(open_error)?;
        let version = schema_state(&live).map_err(|e| in_database(e, database))?;
        let page_size = |conn: &Connection| -> rusqlite::Result<u64> {
            conn.pragma_query_value(None, "page_size", |row| row.get(0))
        };
        let (from_size, to_size) = (
            page_size(&source).map_err(StoreError::from)?,
            page_size(&live).map_err(open_error)?,
        );
        if from_size != to_size {
            // A database in WAL mode cannot change its page size.
            return Err(file_error(
                file,
                &format!(
                    "has pages of {from_size} bytes and the database {} of {to_size} bytes, \
                     which SQLite cannot restore into; restore a backup that `db backup` made \
                     of a database with {to_size}-byte pages",
                    database.display()
                ),
            ));
        }
        let held = if version == 0 {
            0
        } else {
            count(&live).map_err(|e| StoreError::Open {
                path: database.display().to_string(),
                problem: format!(
                    "cannot be read ({}), so what it holds cannot be kept before a restore; \
                     move it away and restore again",
                    describe(&e)
                ),
            })?
        };

        let replaced = if held > 0 {
            if !replace {
                return Err(BackupError::NotEmpty {
                    path: database.display().to_string(),
                    records: held,
                });
            }
            // Nothing else has the database open: the copy cannot change under it.
            let kept = replaced_name(database);
            write_snapshot(&live, &kept, false, "pages saved", progress)?;
            Some((kept, held))
        } else {
            None
        };

        // One write transaction on the database: a failure leaves it as it was.
        copy(
            &source,
            &mut live,
            PAGES_PER_STEP,
            "pages restored",
            progress,
        )
        .map_err(|e| StoreError::Open {
            path: database.display().to_string(),
            problem: format!(
                "the restore failed and nothing was changed: {}",
                describe(&e)
            ),
        })?;
        // Into the main file, so that the restored content does not wait in the -wal.
        live.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(open_error)?;
        let records = count(&live).map_err(open_error)?;
        Ok(RestoreReport {
            records,
            created,
            replaced,
        })
    }

    /// Whether `file` is the database at `database` or one of SQLite's files beside it:
    /// what no backup or export may be written over.
    pub fn is_part_of(database: &Path, file: &Path) -> bool {
        is_part_of(database, file)
    }
}

/// Copies what `from` has open, inside the read transaction it holds, into a new file at
/// `to`: under a temporary name beside it (mode 0600), made self-contained (rollback
/// journal, so there is no -wal to forget and reading it creates no files), flushed, and
/// renamed into place. Returns its size.
fn write_snapshot(
    from: &Connection,
    to: &Path,
    replace: bool,
    what: &'static str,
    progress: ProgressFn<'_>,
) -> Result<u64, BackupError> {
    let dir = directory_of(to);
    let name = to.file_name().map(|n| n.to_string_lossy().into_owned());
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.unwrap_or_default()))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| {
            file_error(
                to,
                &format!("cannot create a file beside it: {}", plain(&e)),
            )
        })?;
    let sqlite_error = |e: rusqlite::Error| file_error(to, &describe(&e));
    let mut copy_to = Connection::open_with_flags(
        temp.path(),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error)?;
    copy(from, &mut copy_to, PAGES_PER_STEP, what, progress).map_err(sqlite_error)?;
    let mode: String = copy_to
        .pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0))
        .map_err(sqlite_error)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(file_error(
            to,
            &format!("its journal mode stayed {mode}; it must be a single file"),
        ));
    }
    copy_to.close().map_err(|(_, e)| sqlite_error(e))?;
    let written = temp
        .as_file()
        .sync_all()
        .and_then(|()| temp.as_file().metadata());
    let bytes = written
        .map_err(|e| file_error(to, &format!("cannot flush it to disk: {}", plain(&e))))?
        .len();
    let placed = if replace {
        temp.persist(to)
    } else {
        temp.persist_noclobber(to)
    };
    placed.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => file_error(
            to,
            "appeared while the copy was written; nothing was replaced, choose another name",
        ),
        _ => file_error(to, &format!("cannot put it in place: {}", plain(&e.error))),
    })?;
    // The rename must survive a power cut too.
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| {
            file_error(
                to,
                &format!("cannot flush its directory to disk: {}", plain(&e)),
            )
        })?;
    Ok(bytes)
}

/// Runs a backup from `from` to `to` to the end, reporting progress in pages.
fn copy(
    from: &Connection,
    to: &mut Connection,
    pages_per_step: i32,
    what: &'static str,
    progress: ProgressFn<'_>,
) -> rusqlite::Result<()> {
    let backup = Backup::new(from, to)?;
    let mut locked = Duration::ZERO;
    loop {
        let step = backup.step(pages_per_step)?;
        let done = backup.progress();
        let total = u64::try_from(done.pagecount).unwrap_or(0);
        let left = u64::try_from(done.remaining).unwrap_or(0);
        progress(what, total.saturating_sub(left), total);
        match step {
            StepResult::Done => return Ok(()),
            StepResult::More => locked = Duration::ZERO,
            _ => {
                if locked >= LOCKED_FOR {
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some(format!(
                            "the database stayed locked for {} s",
                            LOCKED_FOR.as_secs()
                        )),
                    ));
                }
                std::thread::sleep(LOCKED_PAUSE);
                locked += LOCKED_PAUSE;
            }
        }
    }
}

/// Every check of [`verify`], on a connection inside a read transaction.
fn check(conn: &Connection, verification: &mut Verification, progress: ProgressFn<'_>) {
    let Some(version) = check_schema(conn, verification) else {
        return;
    };
    verification.schema_version = Some(version);
    match integrity_check(conn) {
        Ok(findings) => {
            for finding in findings.into_iter().filter(|f| f != "ok") {
                verification.problem(format!("integrity check: {finding}"));
            }
        }
        Err(e) => verification.problem(format!(
            "the integrity check could not finish: {}",
            describe(&e)
        )),
    }
    match count(conn) {
        Ok(records) => verification.records = records,
        Err(e) => {
            verification.problem(format!("its records cannot be counted: {}", describe(&e)));
            return;
        }
    }
    if let Err((after, e)) = check_records(conn, version, verification, progress) {
        let place = match after {
            Some(id) => format!(" after record {id}"),
            None => String::new(),
        };
        verification.problem(format!(
            "its records cannot all be read{place}: {}",
            describe(&e)
        ));
    }
}

/// The schema version, when the file is a database of this server that this build can
/// read; otherwise the problem is noted.
fn check_schema(conn: &Connection, verification: &mut Verification) -> Option<usize> {
    let read = || -> rusqlite::Result<(i64, usize, bool)> {
        let application_id = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
        let version = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let has_records = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'records'",
            [],
            |r| r.get(0),
        )?;
        Ok((application_id, version, has_records))
    };
    let problem = match read() {
        Err(e) => format!("cannot be read as a database: {}", describe(&e)),
        Ok((0, 0, false)) => "holds no talos-kms-server database (an empty SQLite file)".into(),
        Ok((id, _, _)) if id != APPLICATION_ID => format!(
            "is another program's SQLite file (application id {id:#x}, talos-kms-server's is \
             {APPLICATION_ID:#x})"
        ),
        Ok((_, version, _)) if version > MIGRATIONS.len() => format!(
            "has schema version {version}, newer than this build knows ({}); verify it with a \
             newer talos-kms-server",
            MIGRATIONS.len()
        ),
        Ok((_, version, false)) => {
            format!("has schema version {version} but no records table")
        }
        Ok((_, version, true)) => return Some(version),
    };
    verification.problem(problem);
    None
}

fn integrity_check(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare("PRAGMA integrity_check")?;
    let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
    rows.collect()
}

fn count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT count(*) FROM records", [], |row| row.get(0))
}

/// Checks every record's fields; on a read error, returns the last record read.
fn check_records(
    conn: &Connection,
    version: usize,
    verification: &mut Verification,
    progress: ProgressFn<'_>,
) -> Result<(), (Option<i64>, rusqlite::Error)> {
    // Revocation came with schema version 2.
    let revoked_at = if version >= 2 { "revoked_at" } else { "NULL" };
    let total = verification.records;
    let mut last = None;
    let mut statement = conn
        .prepare(&format!(
            "SELECT id, nonce, ciphertext, node_uuid, ip, created_at, last_access, {revoked_at}
             FROM records ORDER BY id"
        ))
        .map_err(|e| (None, e))?;
    let mut rows = statement.query([]).map_err(|e| (None, e))?;
    let mut done = 0;
    while let Some(row) = rows.next().map_err(|e| (last, e))? {
        let id: i64 = row.get(0).map_err(|e| (last, e))?;
        for (column, name) in [
            (1, "nonce"),
            (2, "ciphertext"),
            (3, "node_uuid"),
            (4, "ip"),
            (5, "created_at"),
            (6, "last_access"),
            (7, "revoked_at"),
        ] {
            let value = row.get_ref(column).map_err(|e| (last, e))?;
            if let Some(problem) = field_problem(name, value) {
                verification.problem(format!("record {id}: {name} {problem}"));
            }
        }
        last = Some(id);
        done += 1;
        progress("records checked", done, total);
    }
    Ok(())
}

/// What is wrong with one field of a record, if anything.
fn field_problem(name: &str, value: ValueRef<'_>) -> Option<String> {
    let kind = |value: ValueRef<'_>| match value {
        ValueRef::Null => "null",
        ValueRef::Integer(_) => "an integer",
        ValueRef::Real(_) => "a real number",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "a blob",
    };
    match (name, value) {
        ("nonce", ValueRef::Blob(nonce)) if nonce.len() != NONCE_LEN => {
            Some(format!("is {} bytes, expected {NONCE_LEN}", nonce.len()))
        }
        ("ciphertext", ValueRef::Blob(ciphertext)) if ciphertext.len() < TAG_LEN => Some(format!(
            "is {} bytes, shorter than the {TAG_LEN}-byte GCM tag",
            ciphertext.len()
        )),
        ("nonce" | "ciphertext", ValueRef::Blob(_)) => None,
        ("nonce" | "ciphertext", other) => Some(format!("is {}, expected a blob", kind(other))),
        ("node_uuid" | "ip", ValueRef::Text([])) => Some("is empty".into()),
        ("node_uuid" | "ip", ValueRef::Text(text)) => std::str::from_utf8(text)
            .err()
            .map(|_| "is not valid UTF-8".into()),
        ("node_uuid" | "ip", other) => Some(format!("is {}, expected text", kind(other))),
        ("last_access" | "revoked_at", ValueRef::Null) => None,
        (_, ValueRef::Integer(at)) if (0..=LATEST).contains(&at) => None,
        (_, ValueRef::Integer(at)) => Some(format!(
            "is {at}, not a time between 1970 and 9999 (seconds since 1970, UTC)"
        )),
        (_, other) => Some(format!("is {}, expected a time in seconds", kind(other))),
    }
}

/// Opens a file for reading only. A file `at_rest` (a backup, not the live database) is
/// first checked for being cut short, and when no `-wal` or `-journal` is beside it (nothing
/// to replay, no writer) opened immutable: a read-only open of a file in WAL mode would
/// otherwise leave a `-wal` and `-shm` beside it.
fn open_read_only(path: &Path, at_rest: bool) -> Result<Connection, String> {
    match fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => {}
        Ok(_) => return Err("is not a file".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("does not exist".into()),
        Err(e) => return Err(format!("cannot be read: {}", plain(&e))),
    }
    if let Some(problem) = cut_short(path).filter(|_| at_rest) {
        return Err(problem);
    }
    let busy = ["-wal", "-journal"]
        .iter()
        .any(|suffix| with_suffix(path, suffix).exists());
    let mut uri = format!("file:{}?mode=ro", uri_path(path));
    if at_rest && !busy {
        uri.push_str("&immutable=1");
    }
    let conn = Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot be opened: {}", describe(&e)))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| format!("cannot be opened: {}", describe(&e)))?;
    Ok(conn)
}

/// Whether the file is shorter than its SQLite header says: cut short by a copy that
/// failed or a full disk (SQLite itself would only call it malformed). Not judged while a
/// `-wal` beside it may hold the rest.
fn cut_short(path: &Path) -> Option<String> {
    use std::io::Read;
    if with_suffix(path, "-wal").exists() {
        return None;
    }
    let mut header = [0u8; 100];
    let mut file = fs::File::open(path).ok()?;
    file.read_exact(&mut header).ok()?;
    let length = file.metadata().ok()?.len();
    let word = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        size => u64::from(size),
    };
    // The page count in the header is only valid while these two counters agree.
    let pages = u64::from(word(28));
    if !header.starts_with(b"SQLite format 3\0") || word(24) != word(92) || pages == 0 {
        return None;
    }
    let expected = pages * page_size;
    (length < expected).then(|| {
        format!(
            "is {length} bytes but its header says {pages} pages of {page_size} bytes \
             ({expected} bytes): it was cut short"
        )
    })
}

/// A path as the path part of an SQLite `file:` URI: what is not plainly safe is
/// percent-encoded (`?` and `#` would end it, `%` would start an escape).
fn uri_path(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut text = String::new();
    for &byte in absolute.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            text.push(char::from(byte));
        } else {
            text.push_str(&format!("%{byte:02X}"));
        }
    }
    text
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `<database>.replaced-<UTC time>`: where a restore keeps what it replaced.
fn replaced_name(database: &Path) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    with_suffix(database, &format!(".replaced-{stamp}"))
}

fn is_part_of(database: &Path, file: &Path) -> bool {
    let (Some(database), Some(file)) = (resolved(database), resolved(file)) else {
        return false;
    };
    if ["", "-wal", "-shm", "-journal"]
        .iter()
        .any(|suffix| with_suffix(&database, suffix) == file)
    {
        return true;
    }
    // The same file under another name (a hard link).
    matches!(
        (fs::metadata(&database), fs::metadata(&file)),
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino()
    )
}

/// The path with its directory's symbolic links and `..` resolved.
fn resolved(path: &Path) -> Option<PathBuf> {
    let directory = fs::canonicalize(directory_of(path)).ok()?;
    Some(directory.join(path.file_name()?))
}

fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_error(path: &Path, problem: &str) -> BackupError {
    BackupError::File {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// A [`StoreError::Open`] from a check that leaves its path out, with the path put in.
fn in_database(error: StoreError, database: &Path) -> StoreError {
    match error {
        StoreError::Open { problem, .. } => StoreError::Open {
            path: database.display().to_string(),
            problem,
        },
        StoreError::Sqlite(e) => StoreError::Open {
            path: database.display().to_string(),
            problem: describe(&e),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &str = "INSERT INTO records (nonce, node_uuid, ip, ciphertext, created_at)
                       VALUES (randomblob(12), 'node', '10.0.0.1', randomblob(48), 1700000000)";

    #[test]
    fn a_copy_is_the_snapshot_it_began_with_and_never_restarts_under_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).unwrap());
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000)
                 {} SELECT randomblob(12), 'node', '10.0.0.1', randomblob(48), 1700000000
                 FROM n",
                &ADD[..ADD.find("VALUES").unwrap()]
            ))
            .unwrap();
        let source = open_read_only(&path, false).unwrap();
        source.execute_batch("BEGIN").unwrap();
        let snapshot = count(&source).unwrap();
        let pages: u64 = source
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        let mut target = Connection::open(dir.path().join("copy.db")).unwrap();
        let mut steps = 0;
        // A commit from another connection between every two steps, as a server makes;
        // a copy that restarted after each would never end.
        copy(&source, &mut target, 10, "pages copied", &mut |_, _, _| {
            steps += 1;
            assert!(steps <= pages / 10 + 1, "the copy restarted");
            writer.execute(ADD, []).unwrap();
        })
        .unwrap();
        assert_eq!(count(&target).unwrap(), snapshot);
        assert_eq!(count(&writer).unwrap(), snapshot + steps);
    }
}
