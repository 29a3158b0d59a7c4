//! `bench --mode storm`: a site back from a power cut, as Talos nodes boot (docs/protocol.md
//! §2). Every node starts at once, each from its own source address, and unseals its
//! volumes one after the other; each call on a fresh connection with Talos's 10 s deadline;
//! a call that fails is tried again after `retry_after` (Talos: 30 s). What counts is how
//! soon every volume is open, and how much of the server's work went to calls that failed.

use super::cpu::{CpuMeter, anonymous_rss, peak_rss};
use super::{BenchError, Latency, StormReport, Volume, server_meter};
use crate::client::{ClientError, KmsClient, random_passphrase, random_uuid};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Talos tries a failed volume again after this.
pub const TALOS_RETRY_AFTER: Duration = Duration::from_secs(30);
/// A storm that has not finished by then has failed; stop rather than hang.
const STORM_LIMIT: Duration = Duration::from_secs(600);
/// Nodes sealing their volumes at once before the storm.
const PRESEAL_WORKERS: usize = 32;

pub struct StormOptions {
    pub nodes: usize,
    pub volumes: usize,
    /// Volumes to unseal (grouped by node UUID) instead of sealing some first; they are
    /// unsealed from the client's own source address, which they must be bound to.
    pub given: Option<Vec<Volume>>,
    /// Node n calls from the (n+1)-th address of this network; `None`: every node from the
    /// client's source address.
    pub sources: Option<IpNet>,
    pub retry_after: Duration,
    pub server_pid: Option<u32>,
    /// The server's metrics address (host:port), for the time it spent on its connections
    /// by outcome.
    pub metrics: Option<String>,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    timeouts: AtomicU64,
    other_errors: AtomicU64,
    retries: AtomicU64,
    mismatches: AtomicU64,
    left_locked: AtomicU64,
    /// Failed calls by kind (a status by its code).
    errors: Mutex<BTreeMap<String, u64>>,
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, error: &ClientError) {
        let kind = match error {
            ClientError::Status(status) => format!("status_{:?}", status.code()),
            other => other.kind().to_string(),
        };
        *lock(&self.errors).entry(kind).or_default() += 1;
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One booting node: its client (from its own address) and its volumes.
struct Node {
    client: KmsClient,
    volumes: Vec<Volume>,
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

/// The source address of node `index`: the network's (index+1)-th address.
pub fn node_address(network: &IpNet, index: usize) -> Option<IpAddr> {
    let offset = u128::try_from(index).ok()?.checked_add(1)?;
    let address = match network.network() {
        IpAddr::V4(base) => IpAddr::V4(
            u32::try_from(u128::from(u32::from(base)) + offset)
                .ok()?
                .into(),
        ),
        IpAddr::V6(base) => IpAddr::V6(u128::from(base).checked_add(offset)?.into()),
    };
    network.contains(&address).then_some(address)
}

/// Runs a storm; see [`StormOptions`].
pub async fn storm(client: KmsClient, options: StormOptions) -> Result<StormReport, BenchError> {
    if options.nodes == 0 || options.volumes == 0 {
        return Err(BenchError::Setup(
            "--nodes and --volumes must be at least 1".into(),
        ));
    }
    let nodes: Vec<Node> = match options.given {
        Some(given) => by_node(given)
            .into_iter()
            .map(|volumes| Node {
                client: client.clone(),
                volumes,
            })
            .collect(),
        None => preseal(&client, &options).await?,
    };
    let node_count = nodes.len();
    let volumes = nodes.iter().map(|n| n.volumes.len()).max().unwrap_or(0);
    let total: usize = nodes.iter().map(|n| n.volumes.len()).sum();
    let counters = Arc::new(Counters::default());
    // When each volume opened, in µs since the start, and each call's latency.
    let opened = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let scrape_before = match &options.metrics {
        Some(address) => Some(scrape(address).await?),
        None => None,
    };
    let server_cpu = server_meter(options.server_pid)?;
    let client_cpu = CpuMeter::start("self").map_err(BenchError::Setup)?;
    let anonymous = options.server_pid.map(AnonymousPeak::watch).transpose()?;
    let retry_after = options.retry_after;

    let start = Instant::now();
    let mut boots = JoinSet::new();
    for node in nodes {
        let (counters, opened, latencies) = (
            Arc::clone(&counters),
            Arc::clone(&opened),
            Arc::clone(&latencies),
        );
        boots.spawn(async move {
            for volume in &node.volumes {
                let storm = Storm {
                    counters: &counters,
                    opened: &opened,
                    latencies: &latencies,
                    start,
                    retry_after,
                };
                storm.unlock(&node.client, volume).await;
            }
        });
    }
    while boots.join_next().await.is_some() {}
    let elapsed = start.elapsed();

    let server_cpu_s = server_cpu
        .as_ref()
        .map(|meter| meter.used().map(|used| used.as_secs_f64()))
        .transpose()
        .map_err(BenchError::Setup)?;
    let client_cpu_s = client_cpu.used().map_err(BenchError::Setup)?.as_secs_f64();
    let connection_busy_s = match (&options.metrics, scrape_before) {
        (Some(address), Some(before)) => {
            let after = scrape(address).await?;
            Some(
                after
                    .into_iter()
                    .map(|(outcome, seconds)| {
                        let was = before.get(&outcome).copied().unwrap_or(0.0);
                        (outcome, seconds - was)
                    })
                    .collect::<BTreeMap<_, _>>(),
            )
        }
        _ => None,
    };
    let calls = counters.calls.load(Ordering::Relaxed);
    let mut opened = std::mem::take(&mut *lock(&opened));
    opened.sort_unstable();
    let mut latencies = std::mem::take(&mut *lock(&latencies));
    // A server without the metric (an older build) tells nothing of where its CPU went.
    let failed_cpu_share = connection_busy_s
        .as_ref()
        .filter(|by_outcome| !by_outcome.is_empty())
        .map(|by_outcome| {
            // A share of one measure: the threads' time on connections, which preemption
            // (a shared machine) stretches alike for every outcome.
            let failed = by_outcome
                .iter()
                .filter(|(outcome, _)| *outcome != "answered")
                .fold(0.0, |sum, (_, seconds)| sum + seconds);
            let total = by_outcome.values().fold(0.0, |sum, seconds| sum + seconds);
            if total > 0.0 { failed / total } else { 0.0 }
        });
    Ok(StormReport {
        mode: "storm",
        nodes: node_count,
        volumes,
        sources: options.sources.map(|network| network.to_string()),
        retry_after_s: retry_after.as_secs_f64(),
        time_to_all_unsealed_s: elapsed.as_secs_f64(),
        calls,
        timeouts: counters.timeouts.load(Ordering::Relaxed),
        other_errors: counters.other_errors.load(Ordering::Relaxed),
        errors: std::mem::take(&mut *lock(&counters.errors)),
        first_error: lock(&counters.first_error).take(),
        retries: counters.retries.load(Ordering::Relaxed),
        mismatches: counters.mismatches.load(Ordering::Relaxed),
        volumes_unsealed: opened.len() as u64,
        volumes_left_locked: counters.left_locked.load(Ordering::Relaxed),
        latency: Latency::of(&mut latencies),
        server_cpu_s,
        server_cpu_us_per_call: server_cpu_s.map(|s| s * 1e6 / calls.max(1) as f64),
        connection_busy_s,
        failed_cpu_share,
        server_peak_rss_mib: options
            .server_pid
            .map(|pid| peak_rss(&pid.to_string()))
            .transpose()
            .map_err(BenchError::Setup)?
            .map(mib),
        server_peak_anonymous_mib: anonymous.map(|peak| mib(peak.stop())),
        client_cpu_s,
        opened_us: opened,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The most the server allocated at once, read every 100 ms: /proc keeps a peak of
/// resident memory (VmHWM) but none of the anonymous part alone.
struct AnonymousPeak {
    pid: String,
    peak: Arc<AtomicU64>,
    reading: tokio::task::JoinHandle<()>,
}

impl AnonymousPeak {
    fn watch(pid: u32) -> Result<Self, BenchError> {
        let pid = pid.to_string();
        let peak = Arc::new(AtomicU64::new(
            anonymous_rss(&pid).map_err(BenchError::Setup)?,
        ));
        let reading = tokio::spawn({
            let (pid, peak) = (pid.clone(), Arc::clone(&peak));
            async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                // Ends when the server does, or when the storm stops it.
                while let Ok(bytes) = anonymous_rss(&pid) {
                    peak.fetch_max(bytes, Ordering::Relaxed);
                    every.tick().await;
                }
            }
        });
        Ok(Self { pid, peak, reading })
    }

    fn stop(self) -> u64 {
        self.reading.abort();
        let last = anonymous_rss(&self.pid).unwrap_or(0);
        self.peak.fetch_max(last, Ordering::Relaxed).max(last)
    }
}

/// What every node's boot shares.
struct Storm<'a> {
    counters: &'a Counters,
    opened: &'a Mutex<Vec<u64>>,
    latencies: &'a Mutex<Vec<u64>>,
    start: Instant,
    retry_after: Duration,
}

impl Storm<'_> {
    /// Unseals one volume, trying again after every failure like a booting node, until it
    /// opens or the storm's limit.
    async fn unlock(&self, client: &KmsClient, volume: &Volume) {
        let counters = self.counters;
        loop {
            counters.calls.fetch_add(1, Ordering::Relaxed);
            let began = Instant::now();
            match client.unseal(&volume.node_uuid, &volume.sealed).await {
                Ok(passphrase) if passphrase == volume.passphrase => {
                    lock(self.latencies).push(began.elapsed().as_micros() as u64);
                    lock(self.opened).push(self.start.elapsed().as_micros() as u64);
                    return;
                }
                Ok(_) => {
                    // A wrong answer is a defect to see, not to retry into hiding.
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
            if self.start.elapsed() + self.retry_after > STORM_LIMIT {
                counters.left_locked.fetch_add(1, Ordering::Relaxed);
                return;
            }
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.retry_after).await;
        }
    }
}

/// Seals every node's volumes from the node's own address (records are bound to it), one
/// connection per node; not measured.
async fn preseal(client: &KmsClient, options: &StormOptions) -> Result<Vec<Node>, BenchError> {
    let sources: Vec<Option<IpAddr>> = match &options.sources {
        Some(network) => (0..options.nodes)
            .map(|index| {
                node_address(network, index).map(Some).ok_or_else(|| {
                    BenchError::Setup(format!(
                        "{} nodes do not fit in --sources {network}: give a larger network",
                        options.nodes
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        None => vec![None; options.nodes],
    };
    let clients: Vec<KmsClient> = sources
        .into_iter()
        .map(|source| match source {
            Some(source) => client.from_source(source),
            None => client.clone(),
        })
        .collect();
    let clients = Arc::new(clients);
    let next = Arc::new(AtomicU64::new(0));
    let sealed = Arc::new(Mutex::new(Vec::with_capacity(options.nodes)));
    let per_node = options.volumes;
    let mut workers = JoinSet::new();
    for _ in 0..PRESEAL_WORKERS {
        let (clients, next, sealed) =
            (Arc::clone(&clients), Arc::clone(&next), Arc::clone(&sealed));
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(client) = clients.get(index) else {
                    return Ok::<(), ClientError>(());
                };
                let node_uuid = random_uuid();
                let mut connection = client.connect().await?;
                let mut volumes = Vec::with_capacity(per_node);
                for _ in 0..per_node {
                    let passphrase = random_passphrase().to_vec();
                    let blob = connection.seal(&node_uuid, &passphrase).await?;
                    volumes.push(Volume {
                        node_uuid: node_uuid.clone(),
                        passphrase,
                        sealed: blob,
                    });
                }
                lock(&sealed).push((index, volumes));
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.map_err(|e| BenchError::Setup(e.to_string()))?
            .map_err(|e| {
                BenchError::Setup(format!(
                    "sealing the {} x {per_node} volumes to unseal, before the storm, failed: {e}",
                    options.nodes
                ))
            })?;
    }
    let mut sealed = std::mem::take(&mut *lock(&sealed));
    sealed.sort_by_key(|(index, _)| *index);
    let clients = Arc::try_unwrap(clients).unwrap_or_else(|shared| shared.to_vec());
    Ok(clients
        .into_iter()
        .zip(sealed)
        .map(|(client, (_, volumes))| Node { client, volumes })
        .collect())
}

/// The time the server spent on its connections, by outcome, from its metrics endpoint.
async fn scrape(address: &str) -> Result<BTreeMap<String, f64>, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |problem: String| {
        BenchError::Setup(format!(
            "cannot read the server's metrics at {address} (--metrics, the server's \
             metricsAddress): {problem}"
        ))
    };
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok::<String, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| failed("no answer within 10 s".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let prefix = "talos_kms_connection_busy_seconds_total{outcome=\"";
    let by_outcome: BTreeMap<String, f64> = text
        .lines()
        .filter_map(|line| {
            let (outcome, rest) = line.strip_prefix(prefix)?.split_once("\"}")?;
            Some((outcome.to_string(), rest.trim().parse().ok()?))
        })
        .collect();
    if !text.starts_with("HTTP/1.1 200") {
        return Err(failed(
            text.lines().next().unwrap_or("an empty answer").to_string(),
        ));
    }
    Ok(by_outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_has_an_address_of_its_own_within_the_network() {
        let network: IpNet = "127.1.0.0/16".parse().unwrap();
        assert_eq!(
            node_address(&network, 0),
            Some("127.1.0.1".parse().unwrap())
        );
        assert_eq!(
            node_address(&network, 255),
            Some("127.1.1.0".parse().unwrap())
        );
        assert_eq!(
            node_address(&network, 65_534),
            Some("127.1.255.255".parse().unwrap())
        );
        assert_eq!(node_address(&network, 65_535), None, "past the network");
        let v6: IpNet = "fd00::/120".parse().unwrap();
        assert_eq!(node_address(&v6, 9), Some("fd00::a".parse().unwrap()));
        assert_eq!(node_address(&v6, 255), None);
    }
}
