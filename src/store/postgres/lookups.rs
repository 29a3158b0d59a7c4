//! Unseal lookups in batches, as seals are written: the lookups that arrive while the
//! previous batch is answered go together in one `SELECT ... WHERE nonce = ANY($1)`. At
//! high load PostgreSQL's fixed cost per statement, and the server's per round trip, is
//! shared; a lone lookup is still one statement.

use super::connection::{clone_error, deadline, describe, get};
use super::options::PgOptions;
use crate::sealing::SealNonce;
use crate::store::sql;
use crate::store::{Custody, Record, StoreError};
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;

/// Lookups in one statement at most.
const MAX_BATCH: usize = 128;

type Reply = oneshot::Sender<Result<Option<Record>, StoreError>>;

const FIND_BY_NONCES: &str = "SELECT id, node_uuid, ip, ciphertext, created_at, last_access, \
                              revoked_at, nonce, key_version, tag \
                              FROM records WHERE nonce = ANY($1)";

/// Collects lookups from `queue` and answers them, until every sender is gone.
pub async fn answer_batches(
    options: PgOptions,
    pool: Pool,
    mut queue: mpsc::UnboundedReceiver<(SealNonce, Reply)>,
    limit: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        answer(&options, &pool, std::mem::take(&mut batch), limit).await;
    }
}

async fn answer(
    options: &PgOptions,
    pool: &Pool,
    mut batch: Vec<(SealNonce, Reply)>,
    limit: Duration,
) {
    // Callers answered already (their call's deadline passed while PostgreSQL hung).
    batch.retain(|(_, reply)| !reply.is_closed());
    if batch.is_empty() {
        return;
    }
    let nonces: Vec<&[u8]> = batch.iter().map(|(nonce, _)| &nonce[..]).collect();
    let rows = deadline(options, limit, async {
        let client = get(options, pool, limit).await?;
        let statement = client
            .prepare_cached(FIND_BY_NONCES)
            .await
            .map_err(|e| describe(options, &e))?;
        client
            .query(&statement, &[&nonces])
            .await
            .map_err(|e| describe(options, &e))
    })
    .await;
    match rows {
        Ok(rows) => {
            // By row, not by record: the same blob may be unsealed twice in one batch.
            let found: HashMap<&[u8], &Row> = rows
                .iter()
                .map(|row| (row.get::<_, &[u8]>(7), row))
                .collect();
            for (nonce, reply) in batch {
                let _ = reply.send(Ok(found.get(&nonce[..]).map(|row| record_of(row))));
            }
        }
        Err(error) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(clone_error(options, &error, "the unseal lookup")));
            }
        }
    }
}

/// A record from the columns of [`FIND_BY_NONCES`].
fn record_of(row: &Row) -> Record {
    Record {
        id: row.get(0),
        node_uuid: row.get(1),
        ip: row.get(2),
        ciphertext: row.get(3),
        created_at: row.get(4),
        last_access: row.get(5),
        revoked_at: row.get(6),
        custody: Custody {
            key_version: sql::key_version(row.get(8)),
            tag: row.get(9),
        },
    }
}
