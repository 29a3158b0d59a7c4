//! Seals written in batches: the seals that arrive while the previous batch commits go
//! together in one `INSERT ... SELECT FROM unnest(...)`, one statement and one commit for
//! all, and each is answered once that commit returned. One batch commits at a time: the
//! busier PostgreSQL is, the larger the batches grow. (Measured with `bench`, durable seals
//! at c=32 on 2 cores shared with PostgreSQL: 0.86x SQLite's rate with one batch at a time,
//! 0.75x with four at once; PostgreSQL's CPU per seal is what limits it.)

use super::{PgOptions, describe, get};
use crate::store::{Inserted, NewRecord, StoreError};
use deadpool_postgres::Pool;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Seals in one statement at most.
const MAX_BATCH: usize = 256;

pub type Reply = oneshot::Sender<Result<Inserted, StoreError>>;

/// Collects seals from `queue` and writes them, until every sender is gone.
pub async fn write_batches(
    options: PgOptions,
    pool: Pool,
    mut queue: mpsc::UnboundedReceiver<(NewRecord, Reply)>,
    deadline: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write(&options, &pool, std::mem::take(&mut batch), deadline).await;
    }
}

async fn write(
    options: &PgOptions,
    pool: &Pool,
    batch: Vec<(NewRecord, Reply)>,
    deadline: Duration,
) {
    // A nonce twice in one batch: the second is taken, as if it came later.
    let mut seen = HashSet::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for (record, reply) in batch {
        if seen.insert(record.nonce) {
            rows.push((record, reply));
        } else {
            let _ = reply.send(Ok(Inserted::NonceTaken));
        }
    }
    let records: Vec<&NewRecord> = rows.iter().map(|(record, _)| record).collect();
    let columns = super::Columns::of(records.into_iter());
    let result = super::deadline(options, deadline, async {
        let client = get(options, pool, deadline).await?;
        let statement = client
            .prepare_cached(
                // The NOT EXISTS spares an id for a taken nonce: ids stay without gaps.
                "INSERT INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access)
                 SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[],
                                      $5::bigint[], $6::bigint[])
                               AS new (nonce, node_uuid, ip, ciphertext, created_at, last_access)
                 WHERE NOT EXISTS (SELECT 1 FROM records WHERE records.nonce = new.nonce)
                 ON CONFLICT (nonce) DO NOTHING
                 RETURNING id, nonce",
            )
            .await
            .map_err(|e| describe(options, &e))?;
        client
            .query(
                &statement,
                &[
                    &columns.nonces,
                    &columns.nodes,
                    &columns.ips,
                    &columns.ciphertexts,
                    &columns.created,
                    &columns.accessed,
                ],
            )
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
                let _ = reply.send(Err(super::clone_error(&error)));
            }
        }
    }
}
