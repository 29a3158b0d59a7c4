//! The writes that are batched: seals, and the last-access times noted by unseals.
//!
//! Seals are written in batches: the seals that arrive while the previous batch commits go
//! together in one `INSERT ... SELECT FROM unnest(...)`, one statement and one commit for
//! all, and each is answered once that commit returned. One batch commits at a time: the
//! busier PostgreSQL is, the larger the batches grow. The nodes' quotas and pinning are read
//! for the whole batch in one query before it. (Measured with `bench`, durable seals
//! at c=32 on 2 cores shared with PostgreSQL: 0.86–0.90x SQLite's rate with one batch at a time,
//! 0.75–0.80x with four at once; PostgreSQL's CPU per seal is what limits it.)

use super::columns::{Columns, INSERT};
use super::connection::{CALL_DEADLINE, clone_error, deadline, describe, get};
use super::options::PgOptions;
use crate::locking::lock;
use crate::store::{Inserted, NewRecord, NodeLimits, NodeSummary, RecordId, StoreError, UnixTime};
use deadpool_postgres::{Client, Pool};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Seals in one statement at most.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Inserted, StoreError>>;
type Seal = ((NewRecord, NodeLimits), Reply);

/// Collects seals from `queue` and writes them, until every sender is gone.
pub async fn write_batches(
    options: PgOptions,
    pool: Pool,
    mut queue: mpsc::UnboundedReceiver<Seal>,
    limit: Duration,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        write(&options, &pool, std::mem::take(&mut batch), limit).await;
    }
}

async fn write(options: &PgOptions, pool: &Pool, batch: Vec<Seal>, limit: Duration) {
    // A call answered already (PostgreSQL hung past its deadline) gets no record: it would
    // never reach the node.
    let (seals, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .filter(|(_, reply)| !reply.is_closed())
        .unzip();
    if seals.is_empty() {
        return;
    }
    let result = deadline(options, limit, async {
        let client = get(options, pool, limit).await?;
        store_batch(&client, &seals)
            .await
            .map_err(|e| describe(options, &e))
    })
    .await;
    match result {
        Ok(answers) => {
            for (answer, reply) in answers.into_iter().zip(replies) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(clone_error(options, &error, "the seal batch")));
            }
        }
    }
}

/// Stores the seals their nodes' limits allow, in one statement; answers each, in order.
async fn store_batch(
    client: &Client,
    seals: &[(NewRecord, NodeLimits)],
) -> Result<Vec<Inserted>, tokio_postgres::Error> {
    let mut nodes = Nodes::read(client, seals).await?;
    let mut answers: Vec<Option<Inserted>> = Vec::with_capacity(seals.len());
    let mut admitted = Vec::with_capacity(seals.len());
    let mut nonces = HashSet::with_capacity(seals.len());
    for (index, (record, limits)) in seals.iter().enumerate() {
        // A nonce twice in one batch: the second is taken, as if it came later.
        if !nonces.insert(record.nonce) {
            answers.push(Some(Inserted::NonceTaken));
            continue;
        }
        let node = nodes.summary(record);
        if !limits.allow(&node) {
            answers.push(Some(Inserted::OverLimits(node)));
            continue;
        }
        nodes.add(record);
        answers.push(None);
        admitted.push((index, node));
    }
    if !admitted.is_empty() {
        let columns = Columns::of(admitted.iter().map(|(index, _)| &seals[*index].0));
        let statement = client
            .prepare_cached(
                // Only the unique index decides whether a nonce is taken (a taken one costs an
                // id, and nonces are random). A NOT EXISTS here was planned once, while the
                // table was small, as a scan of the whole table, and kept: every batch then
                // read every record until autovacuum's first ANALYZE.
                &format!("{INSERT} ON CONFLICT (nonce) DO NOTHING RETURNING id, nonce"),
            )
            .await?;
        let ids: HashMap<Vec<u8>, i64> = client
            .query(&statement, &columns.params())
            .await?
            .iter()
            .map(|row| (row.get::<_, Vec<u8>>(1), row.get::<_, i64>(0)))
            .collect();
        for (index, node) in admitted {
            answers[index] = Some(match ids.get(&seals[index].0.nonce[..]) {
                Some(id) => Inserted::Stored(*id, node),
                None => Inserted::NonceTaken,
            });
        }
    }
    Ok(answers
        .into_iter()
        .map(|answer| answer.unwrap_or(Inserted::NonceTaken))
        .collect())
}

/// The records of a batch's nodes, by node and address: (records, active records).
struct Nodes(HashMap<String, HashMap<String, (u64, u64)>>);

impl Nodes {
    async fn read(
        client: &Client,
        seals: &[(NewRecord, NodeLimits)],
    ) -> Result<Self, tokio_postgres::Error> {
        let names: Vec<&str> = seals
            .iter()
            .map(|(record, _)| record.node_uuid.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let statement = client
            .prepare_cached(
                "SELECT node_uuid, ip, count(*), count(*) FILTER (WHERE revoked_at IS NULL)
                 FROM records WHERE node_uuid = ANY($1) GROUP BY node_uuid, ip",
            )
            .await?;
        let mut nodes: HashMap<String, HashMap<String, (u64, u64)>> = HashMap::new();
        for row in client.query(&statement, &[&names]).await? {
            let (records, active): (i64, i64) = (row.get(2), row.get(3));
            nodes
                .entry(row.get(0))
                .or_default()
                .insert(row.get(1), (records as u64, active as u64));
        }
        Ok(Self(nodes))
    }

    fn summary(&self, record: &NewRecord) -> NodeSummary {
        let Some(addresses) = self.0.get(&record.node_uuid) else {
            return NodeSummary::default();
        };
        let mut other_addresses: Vec<String> = addresses
            .iter()
            .filter(|(ip, (_, active))| *active > 0 && **ip != record.ip)
            .map(|(ip, _)| ip.clone())
            .collect();
        other_addresses.sort();
        other_addresses.truncate(8);
        NodeSummary {
            records: addresses.values().map(|(records, _)| records).sum(),
            other_addresses,
        }
    }

    /// Counts a seal of the batch for the ones after it.
    fn add(&mut self, record: &NewRecord) {
        let counts = self
            .0
            .entry(record.node_uuid.clone())
            .or_default()
            .entry(record.ip.clone())
            .or_default();
        counts.0 += 1;
        counts.1 += 1;
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
