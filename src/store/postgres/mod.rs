//! The shared store: PostgreSQL, for several replicas serving the same records.
//!
//! Every call takes a connection from a bounded pool (tokio-postgres, deadpool) and gives
//! it back. Seals that arrive together are written by one `INSERT` in autocommit
//! (`writer.rs`): PostgreSQL answers it only once its commit is flushed
//! (`synchronous_commit` is turned back on for our sessions when the server has it off),
//! and each seal is answered after that. Unseal lookups that arrive together are one
//! `SELECT` (`lookups.rs`). Last-access times are kept in memory and written every 2
//! seconds, as with SQLite.
//!
//! Nothing is kept between calls but the pool: a connection that broke (PostgreSQL
//! restarted, a failover) is dropped when it is next taken and a new one made, so the
//! server reconnects by itself. Every call has a deadline; meanwhile calls fail with
//! [`StoreError::Postgres`] (`UNAVAILABLE` to nodes) and health checks report it.

mod bindings;
mod columns;
mod connection;
mod lookups;
mod migrations;
mod options;
mod queries;
mod tls;
mod writer;

pub use connection::PgInspection;
pub use options::{PgOptions, is_postgres_url, redact};
pub use tls::SslMode;

use super::{Inserted, NewRecord, NodeLimits, Record, RecordId, StoreError, UnixTime};
use crate::sealing::SealNonce;
use connection::{CALL_DEADLINE, Client, deadline, describe, get, pool};
use deadpool_postgres::Pool;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct PgStore {
    options: PgOptions,
    pool: Pool,
    /// Whether [`PgStore::open`] found a database this server had never used.
    created: bool,
    accesses: Arc<Mutex<HashMap<RecordId, UnixTime>>>,
    flusher: tokio::task::JoinHandle<()>,
    seals: Batches<(NewRecord, NodeLimits), Inserted>,
    sealer: tokio::task::JoinHandle<()>,
    lookups: Batches<SealNonce, Option<Record>>,
    finder: tokio::task::JoinHandle<()>,
}

impl PgStore {
    /// Connects (waiting at most the connect timeout), brings the schema up to date and
    /// starts writing buffered access times. Never creates the database itself: an
    /// operator does, with the owner the server logs in as.
    pub async fn open(options: &PgOptions) -> Result<PgStore, StoreError> {
        let pool = pool(options)?;
        let mut client = get(options, &pool, CALL_DEADLINE).await?;
        let migrated = migrations::migrate(&mut client)
            .await
            .map_err(|refused| match refused {
                migrations::Refused::Database(e) => describe(options, &e),
                migrations::Refused::Problem(problem) => options.error(problem),
            })?;
        drop(client);
        let accesses = Arc::new(Mutex::new(HashMap::new()));
        let flusher = tokio::spawn(writer::flush_accesses_every(
            options.clone(),
            pool.clone(),
            Arc::clone(&accesses),
        ));
        let (seals, queue) = tokio::sync::mpsc::unbounded_channel();
        let sealer = tokio::spawn(writer::write_batches(
            options.clone(),
            pool.clone(),
            queue,
            CALL_DEADLINE,
        ));
        let (lookups, queue) = tokio::sync::mpsc::unbounded_channel();
        let finder = tokio::spawn(lookups::answer_batches(
            options.clone(),
            pool.clone(),
            queue,
            CALL_DEADLINE,
        ));
        Ok(PgStore {
            options: options.clone(),
            pool,
            created: migrated.from == 0,
            accesses,
            flusher,
            seals,
            sealer,
            lookups,
            finder,
        })
    }

    /// Whether this store found a database without any of our tables.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Runs `work` with a pooled connection, within the call deadline.
    async fn with<T, F>(&self, work: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.within(CALL_DEADLINE, work).await
    }

    async fn within<T, F>(
        &self,
        limit: Duration,
        work: impl FnOnce(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let options = &self.options;
        deadline(options, limit, async {
            let client = get(options, &self.pool, limit).await?;
            work(client).await.map_err(|e| describe(options, &e))
        })
        .await
    }

    /// Hands `item` to a batching task (`writer.rs`, `lookups.rs`) and waits for its answer.
    async fn batched<T, A>(&self, queue: &Batches<T, A>, item: T) -> Result<A, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        queue
            .send((item, reply))
            .map_err(|_| StoreError::WriterStopped)?;
        // The batch has its own deadline; this one only guards against a stuck task.
        match tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(2), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::WriterStopped),
            Err(_) => Err(self.options.error(format!(
                "no answer within {} s; is PostgreSQL up and reachable?",
                CALL_DEADLINE.as_secs()
            ))),
        }
    }
}

/// The queue of a batching task: each item with where its answer goes.
type Batches<T, A> =
    tokio::sync::mpsc::UnboundedSender<(T, tokio::sync::oneshot::Sender<Result<A, StoreError>>)>;

impl Drop for PgStore {
    fn drop(&mut self) {
        self.flusher.abort();
        self.sealer.abort();
        self.finder.abort();
    }
}
