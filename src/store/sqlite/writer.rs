//! The one writer thread: whatever queued up while the previous commit was flushing (and,
//! when seals arrive together, for a moment more) is committed together (group commit), and
//! each job is answered only once that commit reached the file at the configured path.

use super::connection::describe;
use super::opened_file::OpenedFile;
use crate::locking::lock;
use crate::store::sql::ApprovalRow;
use crate::store::{
    ImportBatch, ImportReport, Inserted, NewRecord, NodeLimits, NodeSummary, RecordId, StoreError,
    UnixTime,
};
use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Caps one group commit, so that one transaction never holds a huge backlog hostage.
const MAX_BATCH: usize = 1024;
/// How long a commit waits for more jobs when the last one had company and ended moments
/// ago (seals arriving together): each commit's write and flush cost the writer about
/// 100 µs of CPU, so a disk that flushes in under a millisecond would otherwise commit
/// seals nearly one by one (1.8 per commit at 32 seals in flight; BENCHMARKS.md, "Seals at
/// the cost of unseals"). A lone caller never waits.
const GATHER: Duration = Duration::from_millis(2);

pub(super) enum Job {
    Insert(
        NewRecord,
        NodeLimits,
        oneshot::Sender<Result<Inserted, StoreError>>,
    ),
    Import(
        ImportBatch,
        oneshot::Sender<Result<ImportReport, StoreError>>,
    ),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// An admin change; answers how many records it changed.
    Write(WriteFn, oneshot::Sender<Result<u64, StoreError>>),
    /// A step of the approval state machine; answers the approval as written.
    Approval(
        ApprovalFn,
        oneshot::Sender<Result<Option<ApprovalRow>, StoreError>>,
    ),
}

type WriteFn = Box<dyn FnOnce(&Connection) -> rusqlite::Result<u64> + Send>;
type ApprovalFn = Box<dyn FnOnce(&Connection) -> rusqlite::Result<Option<ApprovalRow>> + Send>;

pub(super) fn write_loop(
    mut conn: Connection,
    queue: mpsc::Receiver<Job>,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
    file: &OpenedFile,
) {
    let mut last_access_flush = Instant::now();
    let mut last_commit: Option<(Instant, usize)> = None;
    loop {
        let mut batch = Vec::new();
        match queue.recv_timeout(ACCESS_FLUSH_INTERVAL) {
            Ok(job) => {
                batch.push(job);
                if last_commit.is_some_and(|(at, jobs)| jobs > 1 && at.elapsed() < GATHER) {
                    std::thread::sleep(GATHER);
                }
            }
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
            let jobs = batch.len();
            commit_batch(&mut conn, batch, &accesses, flush_accesses, file);
            last_commit = Some((Instant::now(), jobs));
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
                Job::Insert(_, _, reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Import(_, reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Flush(reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Write(_, reply) => drop(reply.send(Err(file.lost_error()))),
                Job::Approval(_, reply) => drop(reply.send(Err(file.lost_error()))),
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
                Job::Insert(record, limits, reply) => {
                    Done::Insert(insert(&tx, &record, limits), reply)
                }
                Job::Import(batch, reply) => {
                    Done::Import(all_or_nothing(&tx, |tx| import(tx, &batch)), reply)
                }
                Job::Flush(reply) => Done::Flush(reply),
                Job::Write(change, reply) => Done::Write(all_or_nothing(&tx, change), reply),
                Job::Approval(step, reply) => Done::Approval(all_or_nothing(&tx, step), reply),
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
            Done::Approval(result, reply) => {
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
    Approval(
        rusqlite::Result<Option<ApprovalRow>>,
        oneshot::Sender<Result<Option<ApprovalRow>, StoreError>>,
    ),
}

/// Binds a record to the columns of [`INSERT`] and runs it.
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
        record.custody.key_version,
        record.custody.tag,
    ])
}

const INSERT: &str = "INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access,
                                    key_version, tag)
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

fn insert(tx: &Connection, record: &NewRecord, limits: NodeLimits) -> rusqlite::Result<Inserted> {
    let node = node_summary(tx, &record.node_uuid, &record.ip)?;
    if !limits.allow(&node) {
        return Ok(Inserted::OverLimits(node));
    }
    let mut statement = tx.prepare_cached(&format!("INSERT {INSERT}"))?;
    match execute_insert(&mut statement, record) {
        Ok(_) => Ok(Inserted::Stored(tx.last_insert_rowid(), node)),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            Ok(Inserted::NonceTaken)
        }
        Err(e) => Err(e),
    }
}

/// The node's records and the other addresses its active ones are bound to: one indexed
/// query when there are none, the usual case.
fn node_summary(tx: &Connection, node_uuid: &str, ip: &str) -> rusqlite::Result<NodeSummary> {
    let (records, elsewhere): (u64, u64) = tx
        .prepare_cached(
            "SELECT count(*), coalesce(sum(revoked_at IS NULL AND ip != ?2), 0)
             FROM records WHERE node_uuid = ?1",
        )?
        .query_row(params![node_uuid, ip], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let other_addresses = if elsewhere == 0 {
        Vec::new()
    } else {
        tx.prepare_cached(
            "SELECT DISTINCT ip FROM records
             WHERE node_uuid = ?1 AND revoked_at IS NULL AND ip != ?2 ORDER BY ip LIMIT 8",
        )?
        .query_map(params![node_uuid, ip], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?
    };
    Ok(NodeSummary {
        records,
        other_addresses,
    })
}

fn import(tx: &Connection, batch: &ImportBatch) -> rusqlite::Result<ImportReport> {
    let mut statement = tx.prepare_cached(&format!("INSERT OR IGNORE {INSERT}"))?;
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
            params![fingerprint, crate::store::now(), batch.records.len()],
        )?;
    }
    Ok(report)
}
