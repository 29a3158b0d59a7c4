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
}

pub async fn storm(
    client: KmsClient,
    nodes: usize,
    volumes: usize,
    server_pid: Option<u32>,
) -> Result<StormReport, BenchError> {
    if nodes == 0 || volumes == 0 {
        return Err(BenchError::Setup(
            "--nodes and --volumes must be at least 1".into(),
        ));
    }
    let client = Arc::new(client);
    let sealed = preseal(&client, nodes, volumes).await?;
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(nodes * volumes)));
    let server_cpu = server_meter(server_pid)?;

    let start = Instant::now();
    let mut boots = JoinSet::new();
    for node in sealed.chunks(volumes) {
        let (client, counters, latencies) = (
            Arc::clone(&client),
            Arc::clone(&counters),
            Arc::clone(&latencies),
        );
        let node: Vec<Volume> = node.to_vec();
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
        retries: counters.retries.load(Ordering::Relaxed),
        mismatches: counters.mismatches.load(Ordering::Relaxed),
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
            Err(ClientError::Timeout(_)) => counters.timeouts.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.other_errors.fetch_add(1, Ordering::Relaxed),
        };
        if storm_start.elapsed() + RETRY_PAUSE > STORM_LIMIT {
            counters.left_locked.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
