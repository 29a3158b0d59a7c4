//! The writes that are batched: seals, and the last-access times noted by unseals.
//!
//! Seals are written in batches: the seals that arrive while the previous batch commits go
//! together in one `INSERT ... SELECT FROM unnest(...)`, one statement and one commit for
//! all, and each is answered once that commit returned. One batch commits at a time: the
//! busier PostgreSQL is, the larger the batches grow. (Measured with `bench`, durable seals
//! at c=32 on 2 cores shared with PostgreSQL: 0.86–0.90x SQLite's rate with one batch at a time,
//! 0.75–0.80x with four at once; PostgreSQL's CPU per seal is what limits it.)

use super::columns::{Columns, INSERT};
use super::connection::{CALL_DEADLINE, clone_error, deadline, describe, get};
use super::options::PgOptions;
use crate::locking::lock;
use crate::store::{Inserted, NewRecord, RecordId, StoreError, UnixTime};
use deadpool_postgres::Pool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Seals in one statement at most.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

/// Collects seals from `queue` and writes them, until every sender is gone.
pub async fn write_batches(
    options: PgOptions,
    pool: Pool,
    mut queue: mpsc::UnboundedReceiver<(NewRecord, Reply)>,
    limit: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write(&options, &pool, std::mem::take(&mut batch), limit).await;
    }
}

async fn write(options: &PgOptions, pool: &Pool, batch: Vec<(NewRecord, Reply)>, limit: Duration) {
    // A nonce twice in one batch: the second is taken, as if it came later.
    let mut seen = HashSet::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for (record, reply) in batch {
        if reply.is_closed() {
            // Its call was answered already (PostgreSQL hung past its deadline): a record
            // written now would never reach the node.
            continue;
        }
        if seen.insert(record.nonce) {
            rows.push((record, reply));
        } else {
            let _ = reply.send(Ok(Inserted::NonceTaken));
        }
    }
    if rows.is_empty() {
        return;
    }
    let records: Vec<&NewRecord> = rows.iter().map(|(record, _)| record).collect();
    let columns = Columns::of(records.into_iter());
    let result = deadline(options, limit, async {
        let client = get(options, pool, limit).await?;
        let statement = client
            .prepare_cached(
                // Only the unique index decides whether a nonce is taken (a taken one costs an
                // id, and nonces are random). A NOT EXISTS here was planned once, while the
                // table was small, as a scan of the whole table, and kept: every batch then
                // read every record until autovacuum's first ANALYZE.
                &format!("{INSERT} ON CONFLICT (nonce) DO NOTHING RETURNING id, nonce"),
            )
            .await
            .map_err(|e| describe(options, &e))?;
        client
            .query(&statement, &columns.params())
            .await
            .map_err(|e| describe(options, &e))
    })
    .await;
    match result {
        Ok(stored) => {
            let ids: std::collections::HashMap<Vec<u8>, i64> = stored
                .iter()
                .map(|row| (row.get::<_, Vec<u8>>(1), row.get::<_, i64>(0)))
                .collect();
            for (record, reply) in rows {
                let answer = match ids.get(&record.nonce[..]) {
                    Some(id) => Inserted::Stored(*id),
                    None => Inserted::NonceTaken,
                };
                let _ = reply.send(Ok(answer));
            }
        }
        Err(error) => {
            for (_, reply) in rows {
                let _ = reply.send(Err(clone_error(options, &error, "the seal batch")));
            }
        }
    }
}

/// Writes the buffered access times every 2 s, for as long as the store lives.
pub(super) async fn flush_accesses_every(
    options: PgOptions,
    pool: Pool,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
) {
    let mut ticks = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(error) = write_accesses(&options, &pool, &accesses).await {
            tracing::warn!(%error, "last-access times not written yet; retrying");
        }
    }
}

pub(super) async fn write_accesses(
    options: &PgOptions,
    pool: &Pool,
    accesses: &Mutex<HashMap<RecordId, UnixTime>>,
) -> Result<(), StoreError> {
    let pending = std::mem::take(&mut *lock(accesses));
    if pending.is_empty() {
        return Ok(());
    }
    let (ids, times): (Vec<i64>, Vec<i64>) = pending.iter().map(|(id, at)| (*id, *at)).unzip();
    let written = deadline(options, CALL_DEADLINE, async {
        let client = get(options, pool, CALL_DEADLINE).await?;
        client
            .execute(
                "UPDATE records SET last_access = greatest(coalesce(records.last_access, 0), a.at)
                 FROM unnest($1::bigint[], $2::bigint[]) AS a(id, at) WHERE records.id = a.id",
                &[&ids, &times],
            )
            .await
            .map_err(|e| describe(options, &e))
    })
    .await;
    if written.is_err() {
        // Kept for the next attempt, unless newer ones arrived meanwhile.
        let mut current = lock(accesses);
        for (id, at) in pending {
            current.entry(id).or_insert(at);
        }
    }
    written.map(drop)
}
