//! Opening a database file: created private, configured for durability, taken exclusively
//! for a restore, or only looked at for `check`; and SQLite's errors in words.

use super::SqliteStore;
use super::migrations::{MIGRATIONS, schema_state};
use crate::sealing::SealNonce;
use crate::store::StoreError;
use rusqlite::{Connection, OpenFlags};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Creates the file with mode 0600 before SQLite sees it; SQLite gives its -wal and -shm
/// files the same mode.
pub(super) fn create_private_file(path: &Path) -> Result<bool, StoreError> {
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

pub(super) fn configure(conn: &Connection) -> rusqlite::Result<()> {
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

pub(super) fn describe(e: &rusqlite::Error) -> String {
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
}
