//! `bench`: drives any endpoint that speaks the protocol the way Talos nodes do, and measures
//! what it costs the server. It uses the same [`KmsClient`] as the tests and the `client`
//! command, so what it measures is what a node experiences.

mod cpu;
pub mod fill;
mod report;
mod storm;
pub mod volumes;

pub use cpu::{CpuMeter, pin_to};
pub use report::{Latency, Report, StormReport};
pub use storm::{StormOptions, TALOS_RETRY_AFTER, storm};

use crate::client::{ClientError, Connection, KmsClient, random_passphrase, random_uuid};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

/// What to measure. Every seal adds a record to the target's database for good: seal and
/// mixed add one per seal, unseal and storm add the volumes they seal before measuring,
/// unless they take them from `--volumes-from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Seal a fresh random passphrase per call; adds a record per call.
    Seal,
    /// Unseal volumes, checking every answer: --nodes volumes sealed first (adds --nodes
    /// records), or those of --volumes-from (adds none).
    Unseal,
    /// Alternate seals and checked unseals; adds a record per seal, and --nodes first.
    Mixed,
    /// TLS 1.3 handshake with ALPN h2, then close: the floor every call pays; adds nothing.
    Handshake,
    /// TCP connection that sends nothing, until the server closes it: against a server whose
    /// allow-lists exclude --source-ip, what a refused connection costs; adds nothing.
    Connect,
    /// --nodes nodes booting at once as Talos nodes do (each from its own address, volumes
    /// one after the other, 10 s per call, a retry --retry-after a failure); adds nodes x
    /// volumes records first, none with --volumes-from.
    Storm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectionMode {
    /// A new connection per call, as Talos does.
    Fresh,
    /// One connection for all calls.
    Shared,
}

pub struct BenchOptions {
    pub mode: Mode,
    pub connection: ConnectionMode,
    /// Calls in flight at most (closed loop: exactly).
    pub concurrency: usize,
    /// Open loop: calls started per second.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    /// Distinct node UUIDs (pre-sealed for unseal and mixed).
    pub nodes: usize,
    pub server_pid: Option<u32>,
    /// Volumes to unseal instead of sealing some first (unseal mode only).
    pub volumes: Option<Vec<Volume>>,
}

/// Something sealed before the measured phase, to unseal during it.
#[derive(Clone)]
pub struct Volume {
    pub node_uuid: String,
    pub passphrase: Vec<u8>,
    pub sealed: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Setup(String),
}

enum Failure {
    Error(ClientError),
    Mismatch,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// The text of the first error and when it came, for the operator to act on.
    first_error: Option<(Instant, String)>,
    mismatches: u64,
}

impl Tally {
    fn record(&mut self, result: Result<(), Failure>, latency: Duration) {
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latencies_us.push(latency.as_micros() as u64);
            }
            Err(Failure::Mismatch) => self.mismatches += 1,
            Err(Failure::Error(error)) => {
                let kind = match &error {
                    ClientError::Status(status) => format!("status_{:?}", status.code()),
                    other => other.kind().to_string(),
                };
                *self.errors.entry(kind).or_default() += 1;
                if self.first_error.is_none() {
                    self.first_error = Some((Instant::now(), error.to_string()));
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        self.mismatches += other.mismatches;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        if let Some(theirs) = other.first_error
            && self
                .first_error
                .as_ref()
                .is_none_or(|ours| theirs.0 < ours.0)
        {
            self.first_error = Some(theirs);
        }
    }
}

struct Workload {
    client: Arc<KmsClient>,
    shared: Option<Connection>,
    mode: Mode,
    volumes: Vec<Volume>,
    node_uuids: Vec<String>,
}

impl Workload {
    async fn call(&self, index: u64) -> Result<(), Failure> {
        let seal = match self.mode {
            Mode::Handshake => return self.client.handshake().await.map_err(Failure::Error),
            Mode::Connect => return self.client.connect_only().await.map_err(Failure::Error),
            Mode::Seal => true,
            Mode::Mixed => index.is_multiple_of(2),
            Mode::Unseal | Mode::Storm => false,
        };
        if seal {
            let node = &self.node_uuids[index as usize % self.node_uuids.len()];
            let passphrase = random_passphrase();
            let sealed = match &self.shared {
                Some(connection) => connection.clone().seal(node, &passphrase).await,
                None => self.client.seal(node, &passphrase).await,
            }
            .map_err(Failure::Error)?;
            return if sealed.len() == crate::sealing::SEALED_LEN {
                Ok(())
            } else {
                Err(Failure::Mismatch)
            };
        }
        let volume = &self.volumes[index as usize % self.volumes.len()];
        let unsealed = match &self.shared {
            Some(connection) => {
                connection
                    .clone()
                    .unseal(&volume.node_uuid, &volume.sealed)
                    .await
            }
            None => self.client.unseal(&volume.node_uuid, &volume.sealed).await,
        }
        .map_err(Failure::Error)?;
        if unsealed == volume.passphrase {
            Ok(())
        } else {
            Err(Failure::Mismatch)
        }
    }
}

/// Seals one volume per (node, volume) pair on one shared connection; not measured.
pub async fn preseal(
    client: &KmsClient,
    nodes: usize,
    volumes_per_node: usize,
) -> Result<Vec<Volume>, BenchError> {
    let connection = client.connect().await.map_err(|e| {
        BenchError::Setup(format!(
            "sealing volumes to unseal, before measuring, failed: {e}"
        ))
    })?;
    let uuids: Vec<String> = (0..nodes).map(|_| random_uuid()).collect();
    let next = Arc::new(AtomicU64::new(0));
    let total = (nodes * volumes_per_node) as u64;
    let sealed = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let uuids = Arc::new(uuids);
    let mut workers = JoinSet::new();
    for _ in 0..32 {
        let (mut connection, next, sealed, uuids) = (
            connection.clone(),
            Arc::clone(&next),
            Arc::clone(&sealed),
            Arc::clone(&uuids),
        );
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total {
                    return Ok::<(), ClientError>(());
                }
                let node_uuid = uuids[index as usize / volumes_per_node].clone();
                let passphrase = random_passphrase().to_vec();
                let blob = connection.seal(&node_uuid, &passphrase).await?;
                sealed.lock().await.push((
                    index,
                    Volume {
                        node_uuid,
                        passphrase,
                        sealed: blob,
                    },
                ));
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.map_err(|e| BenchError::Setup(e.to_string()))?
            .map_err(|e| {
                BenchError::Setup(format!(
                    "sealing the {total} volumes to unseal, before measuring, failed: {e}"
                ))
            })?;
    }
    let mut sealed = std::mem::take(&mut *sealed.lock().await);
    sealed.sort_by_key(|(index, _)| *index);
    Ok(sealed.into_iter().map(|(_, volume)| volume).collect())
}

const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Runs one measured phase (any mode but storm).
pub async fn run(client: KmsClient, options: &BenchOptions) -> Result<Report, BenchError> {
    if options.concurrency == 0 || options.nodes == 0 {
        return Err(BenchError::Setup(
            "--concurrency and --nodes must be at least 1".into(),
        ));
    }
    let client = Arc::new(client);
    let volumes = match (options.mode, &options.volumes) {
        (Mode::Unseal, Some(volumes)) => volumes.clone(),
        (_, Some(_)) => {
            return Err(BenchError::Setup(
                "--volumes-from is for --mode unseal or storm; seal and mixed add records \
                 whatever the volumes"
                    .into(),
            ));
        }
        (Mode::Unseal | Mode::Mixed, None) => preseal(&client, options.nodes, 1).await?,
        _ => Vec::new(),
    };
    let node_uuids = (0..options.nodes).map(|_| random_uuid()).collect();
    let shared = match options.connection {
        ConnectionMode::Shared if !matches!(options.mode, Mode::Handshake | Mode::Connect) => {
            Some(client.connect().await?)
        }
        _ => None,
    };
    let workload = Arc::new(Workload {
        client: Arc::clone(&client),
        shared,
        mode: options.mode,
        volumes,
        node_uuids,
    });

    let server_cpu = server_meter(options.server_pid)?;
    let client_cpu = CpuMeter::start("self").map_err(BenchError::Setup)?;
    let start = Instant::now();
    let (mut tally, not_started) = match options.rate {
        Some(rate) => open_loop(&workload, options, rate, start).await,
        None => (closed_loop(&workload, options, start).await, 0),
    };
    let elapsed = start.elapsed();
    let calls = tally.ok + tally.mismatches + tally.errors.values().sum::<u64>();
    let server_cpu_us_per_call = per_call_us(server_cpu.as_ref(), calls)?;
    let client_cpu_us_per_call = client_cpu.per_call_us(calls).map_err(BenchError::Setup)?;
    Ok(Report {
        mode: format!("{:?}", options.mode).to_lowercase(),
        connection: format!("{:?}", options.connection).to_lowercase(),
        key_exchange: format!("{:?}", client.options().key_exchange).to_lowercase(),
        concurrency: options.concurrency,
        offered_rate: options.rate,
        duration_s: elapsed.as_secs_f64(),
        calls_ok: tally.ok,
        errors: std::mem::take(&mut tally.errors),
        first_error: tally.first_error.take().map(|(_, text)| text),
        mismatches: tally.mismatches,
        not_started,
        calls_per_s: tally.ok as f64 / elapsed.as_secs_f64(),
        latency: Latency::of(&mut tally.latencies_us),
        server_cpu_us_per_call,
        client_cpu_us_per_call,
    })
}

/// Starts measuring the server's CPU, when its process id is known.
fn server_meter(pid: Option<u32>) -> Result<Option<CpuMeter>, BenchError> {
    pid.map(|pid| CpuMeter::start(&pid.to_string()))
        .transpose()
        .map_err(BenchError::Setup)
}

fn per_call_us(meter: Option<&CpuMeter>, calls: u64) -> Result<Option<f64>, BenchError> {
    meter
        .map(|meter| meter.per_call_us(calls))
        .transpose()
        .map_err(BenchError::Setup)
}

/// When a run ends: after a number of calls, or once calls are due past a duration.
#[derive(Clone, Copy)]
struct Stop {
    requests: Option<u64>,
    duration: Duration,
    start: Instant,
}

impl Stop {
    fn new(options: &BenchOptions, start: Instant) -> Self {
        Self {
            requests: options.requests,
            duration: options.duration.unwrap_or(DEFAULT_DURATION),
            start,
        }
    }

    /// Whether call number `index`, due at `due`, is part of the run.
    fn includes(&self, index: u64, due: Instant) -> bool {
        match self.requests {
            Some(requests) => index < requests,
            None => due.duration_since(self.start) < self.duration,
        }
    }
}

async fn closed_loop(workload: &Arc<Workload>, options: &BenchOptions, start: Instant) -> Tally {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..options.concurrency {
        let (workload, next) = (Arc::clone(workload), Arc::clone(&next));
        let stop = Stop::new(options, start);
        workers.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                if !stop.includes(index, began) {
                    return tally;
                }
                let result = workload.call(index).await;
                tally.record(result, began.elapsed());
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(Ok(worker)) = workers.join_next().await {
        tally.merge(worker);
    }
    tally
}

/// Starts calls on a fixed schedule whatever the server's speed; latency counts from each
/// call's scheduled start, so queueing cannot hide.
async fn open_loop(
    workload: &Arc<Workload>,
    options: &BenchOptions,
    rate: f64,
    start: Instant,
) -> (Tally, u64) {
    let in_flight = Arc::new(Semaphore::new(options.concurrency));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut calls = JoinSet::new();
    let mut not_started = 0;
    let mut index = 0u64;
    let stop = Stop::new(options, start);
    loop {
        let due = start + interval.mul_f64(index as f64);
        if !stop.includes(index, due) {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        match Arc::clone(&in_flight).try_acquire_owned() {
            Ok(permit) => {
                let (workload, tally) = (Arc::clone(workload), Arc::clone(&tally));
                calls.spawn(async move {
                    let result = workload.call(index).await;
                    let latency = due.elapsed();
                    drop(permit);
                    tally
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(result, latency);
                });
            }
            Err(_) => not_started += 1,
        }
        index += 1;
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    (tally, not_started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientOptions;
    use crate::server::{ServerOptions, start};
    use crate::store::SqliteStore;
    use crate::tls::{self, throwaway};

    #[tokio::test]
    async fn a_wrong_unseal_answer_counts_as_a_mismatch_never_a_success() {
        let dir = tempfile::tempdir().unwrap();
        let pki = throwaway::generate(&["127.0.0.1".to_string()]).unwrap();
        let (cert, key, ca) = (
            dir.path().join("c"),
            dir.path().join("k"),
            dir.path().join("ca"),
        );
        std::fs::write(&cert, pki.chain_pem).unwrap();
        std::fs::write(&key, pki.key_pem).unwrap();
        std::fs::write(&ca, pki.ca_pem).unwrap();
        let server = start(
            "127.0.0.1:0".parse().unwrap(),
            ServerOptions {
                tls: tls::server_config(tls::load_identity(&cert, &key, None).unwrap()).unwrap(),
                store: Arc::new(SqliteStore::open(&dir.path().join("db")).unwrap()),
                audit: Arc::new(
                    crate::audit::AuditLog::open(&dir.path().join("audit"), None).unwrap(),
                ),
                metrics: Default::default(),
                metrics_port: None,
                rules: Default::default(),
                limits: Default::default(),
                take_over: Default::default(),
            },
        )
        .unwrap();
        let endpoint = format!("https://127.0.0.1:{}", server.local_addr().port());
        let mut options = ClientOptions::new(endpoint.parse().unwrap());
        options.ca_file = Some(ca);
        let client = Arc::new(KmsClient::new(options).unwrap());

        let mut volumes = preseal(&client, 2, 1).await.unwrap();
        volumes[1].passphrase[0] ^= 1;
        let workload = Workload {
            client,
            shared: None,
            mode: Mode::Unseal,
            volumes,
            node_uuids: Vec::new(),
        };
        assert!(workload.call(0).await.is_ok());
        assert!(matches!(workload.call(1).await, Err(Failure::Mismatch)));
        server.shutdown().await.unwrap();
    }
}
