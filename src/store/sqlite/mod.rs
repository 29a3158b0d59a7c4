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

mod backup;
mod bindings;
mod connection;
mod migrations;
mod opened_file;
mod queries;
mod writer;

pub use connection::{ExclusiveUse, Inspection};

use super::sql::ApprovalRow;
use super::{Approval, RecordId, StoreError, UnixTime};
use crate::locking::lock;
use connection::{BUSY_TIMEOUT, configure, create_private_file, describe};
use migrations::migrate;
use opened_file::OpenedFile;
use rusqlite::{Connection, OpenFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use tokio::sync::oneshot;
use writer::{Job, write_loop};

const READERS: usize = 4;
/// Each reader's page cache, in KiB (SQLite's default is 2,048). A lookup reads the same
/// few interior pages and one random leaf per B-tree; past the interior pages a bigger
/// cache holds leaves unlikely to be read again, which the kernel's page cache serves
/// anyway. At a million records the default made ~7 MiB of a reboot storm's peak memory,
/// and lookups are as fast without it (BENCHMARKS.md, "Peak memory of the storm").
const READER_CACHE_KIB: i64 = 512;

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
                reader.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
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

impl Drop for SqliteStore {
    /// Closing the queue makes the writer flush buffered access times and stop.
    fn drop(&mut self) {
        self.close_connections();
    }
}

impl SqliteStore {
    /// Runs a step of the approval state machine in the writer.
    async fn write_approval(
        &self,
        step: impl FnOnce(&Connection) -> rusqlite::Result<Option<ApprovalRow>> + Send + 'static,
    ) -> Result<Option<Approval>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Approval(Box::new(step), reply))?;
        let written = answer.await.map_err(|_| StoreError::WriterStopped)??;
        written.map(ApprovalRow::decode).transpose()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ImportBatch, ImportReport, Inserted, NewRecord, NodeLimits, Store};
    use std::fs;

    fn record(nonce: u8) -> NewRecord {
        NewRecord {
            nonce: [nonce; 12],
            node_uuid: "n".into(),
            ip: "10.0.0.1".into(),
            ciphertext: vec![0; 48],
            created_at: 1,
            last_access: None,
            custody: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_deleted_file_is_named_and_refuses_everything_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.created());
        store.insert(record(1), NodeLimits::NONE).await.unwrap();
        fs::remove_file(&path).unwrap();
        let refused = store
            .insert(record(2), NodeLimits::NONE)
            .await
            .unwrap_err()
            .to_string();
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
            custody: Default::default(),
        };
        assert!(matches!(
            store
                .insert(record.clone(), NodeLimits::NONE)
                .await
                .unwrap(),
            Inserted::Stored(..)
        ));
        assert_eq!(
            store
                .insert(record.clone(), NodeLimits::NONE)
                .await
                .unwrap(),
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
