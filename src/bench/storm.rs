//! `bench --mode storm`: a data centre back from a power cut. Every node starts at once and
//! unseals its volumes one after the other, each call on a fresh connection with Talos's
//! 10 s deadline, retrying after a failure.

use super::{BenchError, Latency, StormReport, Volume, per_call_us, preseal, server_meter};
use crate::client::{ClientError, KmsClient};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Pause before a retry; Talos retries failed KMS calls at boot after a short back-off.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A storm that has not finished by then has failed; stop rather than hang.
const STORM_LIMIT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    timeouts: AtomicU64,
    other_errors: AtomicU64,
    retries: AtomicU64,
    mismatches: AtomicU64,
    left_locked: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, error: &ClientError) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

/// Volumes grouped by node UUID, nodes in the order they first appear.
fn by_node(volumes: Vec<Volume>) -> Vec<Vec<Volume>> {
    let mut index = std::collections::HashMap::new();
    let mut nodes: Vec<Vec<Volume>> = Vec::new();
    for volume in volumes {
        let at = *index.entry(volume.node_uuid.clone()).or_insert_with(|| {
            nodes.push(Vec::new());
            nodes.len() - 1
        });
        nodes[at].push(volume);
    }
    nodes
}

/// Runs a storm of `nodes` x `volumes` volumes sealed first, or of `given` volumes (grouped
/// by node UUID), which adds no record to the server.
pub async fn storm(
    client: KmsClient,
    nodes: usize,
    volumes: usize,
    given: Option<Vec<Volume>>,
    server_pid: Option<u32>,
) -> Result<StormReport, BenchError> {
    if nodes == 0 || volumes == 0 {
        return Err(BenchError::Setup(
            "--nodes and --volumes must be at least 1".into(),
        ));
    }
    let client = Arc::new(client);
    let boots_of: Vec<Vec<Volume>> = match given {
        Some(given) => by_node(given),
        None => preseal(&client, nodes, volumes)
            .await?
            .chunks(volumes)
            .map(<[Volume]>::to_vec)
            .collect(),
    };
    let nodes = boots_of.len();
    let volumes = boots_of.iter().map(Vec::len).max().unwrap_or(0);
    let total: usize = boots_of.iter().map(Vec::len).sum();
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
    let server_cpu = server_meter(server_pid)?;

    let start = Instant::now();
    let mut boots = JoinSet::new();
    for node in boots_of {
        let (client, counters, latencies) = (
            Arc::clone(&client),
            Arc::clone(&counters),
            Arc::clone(&latencies),
        );
        boots.spawn(async move {
            for volume in node {
                unlock(&client, &volume, &counters, &latencies, start).await;
            }
        });
    }
    while boots.join_next().await.is_some() {}
    let elapsed = start.elapsed();

    let calls = counters.calls.load(Ordering::Relaxed);
    let server_cpu_us_per_call = per_call_us(server_cpu.as_ref(), calls)?;
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(StormReport {
        mode: "storm",
        nodes,
        volumes,
        time_to_all_unsealed_s: elapsed.as_secs_f64(),
        calls,
        timeouts: counters.timeouts.load(Ordering::Relaxed),
        other_errors: counters.other_errors.load(Ordering::Relaxed),
        first_error: counters
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(),
        retries: counters.retries.load(Ordering::Relaxed),
        mismatches: counters.mismatches.load(Ordering::Relaxed),
        volumes_unsealed: latencies.len() as u64,
        volumes_left_locked: counters.left_locked.load(Ordering::Relaxed),
        latency: Latency::of(&mut latencies),
        server_cpu_us_per_call,
    })
}

/// Unseals one volume, retrying like a booting node until it opens or the storm's limit.
async fn unlock(
    client: &KmsClient,
    volume: &Volume,
    counters: &Counters,
    latencies: &std::sync::Mutex<Vec<u64>>,
    storm_start: Instant,
) {
    loop {
        counters.calls.fetch_add(1, Ordering::Relaxed);
        let began = Instant::now();
        match client.unseal(&volume.node_uuid, &volume.sealed).await {
            Ok(passphrase) if passphrase == volume.passphrase => {
                let latency = began.elapsed().as_micros() as u64;
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(latency);
                return;
            }
            Ok(_) => {
                // A wrong answer is not retried by Talos either: the slot stays locked.
                counters.mismatches.fetch_add(1, Ordering::Relaxed);
                counters.left_locked.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(error) => {
                counters.error(&error);
                match error {
                    ClientError::Timeout(_) => &counters.timeouts,
                    _ => &counters.other_errors,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }
        if storm_start.elapsed() + RETRY_PAUSE > STORM_LIMIT {
            counters.left_locked.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
