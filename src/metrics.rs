//! Prometheus metrics, served on the optional `metricsAddress` listener: what an operator
//! alerts on (certificate expiry, reload failures, unseal failures, the store) and what
//! they graph (calls, latency, handshakes, connections).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    action: &'static str,
    outcome: &'static str,
    /// Empty when answered.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StaticReason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyVersionLabel {
    /// `v1`, `v2`...; `none` for records not wrapped yet.
    key_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<ActionLabel, Histogram>,
    handshakes: Counter,
    handshake_failures: Family<ReasonLabel, Counter>,
    connections_open: Gauge,
    connections_refused: Family<StaticReason, Counter>,
    connections_dropped: Family<StaticReason, Counter>,
    connections_ended: Family<OutcomeLabel, Counter>,
    connection_busy: Family<OutcomeLabel, Counter<f64, AtomicU64>>,
    records: Gauge,
    pending_approvals: Gauge,
    store_up: Gauge,
    certificate_expiry: Gauge<f64, AtomicU64>,
    reloads: Counter,
    reload_failures: Counter,
    custody: CustodyMetrics,
}

/// Key custody's figures (README, "Key custody").
#[derive(Default)]
struct CustodyMetrics {
    sealed: Gauge,
    forged_rows: Family<TableLabel, Counter>,
    records: Family<KeyVersionLabel, Gauge>,
    rewrap_remaining: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("talos_kms");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Seal and Unseal calls, by outcome and the reason of a refusal; health Watch \
             streams refused over the limit of 64 (action health_watch, reason watch_limit)",
            calls.clone(),
        );
        // 0.1 ms to ~3 s: an unseal takes well under a millisecond, a seal a disk flush.
        let latency = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
        });
        registry.register(
            "call_duration_seconds",
            "Time from a call's arrival to its answer, TLS handshake excluded",
            latency.clone(),
        );
        let handshakes = Counter::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed",
            handshakes.clone(),
        );
        let handshake_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (the client's alert, timeout, not TLS...)",
            handshake_failures.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections accepted and not yet closed",
            connections_open.clone(),
        );
        let connections_refused = Family::<StaticReason, Counter>::default();
        registry.register(
            "connections_refused",
            "New connections closed at once, before TLS: outside the allow-lists (network), or \
             over maxConnectionsPerAddress with nothing of the address's to close (per_address)",
            connections_refused.clone(),
        );
        let connections_dropped = Family::<StaticReason, Counter>::default();
        registry.register(
            "connections_dropped",
            "Connections closed while they waited on their client: idle for idleTimeout (idle), \
             or to admit a new one when every slot (evicted) or the address's share \
             (per_address) was taken",
            connections_dropped.clone(),
        );
        let connections_ended = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "connections_ended",
            "Connections closed, by how their calls went: a Seal or Unseal answered OK \
             (answered, decoys included), only refused ones (refused), or none (no_call: \
             refused or failed handshakes, clients that left, health checks)",
            connections_ended.clone(),
        );
        let connection_busy = Family::<OutcomeLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "connection_busy_seconds",
            "Time the server's threads spent working on connections (every poll of their \
             tasks: TLS handshake, HTTP/2, calls answered without waiting; polls never wait, \
             so this is their CPU time), by outcome as in connections_ended; in a storm, \
             refused and no_call are the work spent on calls that did not succeed",
            connection_busy.clone(),
        );
        let records = Gauge::default();
        registry.register(
            "records",
            "Records in the store (revoked included), as last counted",
            records.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register(
            "pending_approvals",
            "Calls refused until an operator approves them (`pending list`)",
            pending_approvals.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 while the store answers, 0 while calls are refused with UNAVAILABLE",
            store_up.clone(),
        );
        let certificate_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the served certificate expires (Unix time)",
            certificate_expiry.clone(),
        );
        let reloads = Counter::default();
        registry.register(
            "certificate_reloads",
            "New certificate and key pairs taken into use",
            reloads.clone(),
        );
        let reload_failures = Counter::default();
        registry.register(
            "certificate_reload_failures",
            "Changed certificate or key files that could not be used (the old pair kept serving)",
            reload_failures.clone(),
        );
        let custody = CustodyMetrics::default();
        registry.register(
            "custody_sealed",
            "1 while the server waits for operators' key shares (`unseal-server`)",
            custody.sealed.clone(),
        );
        registry.register(
            "custody_forged_rows",
            "Rows that failed their authentication (changed behind the server's back), by table",
            custody.forged_rows.clone(),
        );
        registry.register(
            "custody_records",
            "Records by the data key version they are wrapped under (`none`: not yet)",
            custody.records.clone(),
        );
        registry.register(
            "custody_rewrap_remaining",
            "Records still to be wrapped under the current data key",
            custody.rewrap_remaining.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version", build);
        Metrics {
            registry,
            calls,
            latency,
            handshakes,
            handshake_failures,
            connections_open,
            connections_refused,
            connections_dropped,
            connections_ended,
            connection_busy,
            records,
            pending_approvals,
            store_up,
            certificate_expiry,
            reloads,
            reload_failures,
            custody,
        }
    }

    pub fn call(
        &self,
        action: &'static str,
        outcome: &'static str,
        reason: &'static str,
        took: Duration,
    ) {
        self.calls
            .get_or_create(&CallLabels {
                action,
                outcome,
                reason,
            })
            .inc();
        self.latency
            .get_or_create(&ActionLabel { action })
            .observe(took.as_secs_f64());
    }

    /// A health Watch refused because the limit of streams was open already.
    pub fn watch_refused(&self) {
        self.calls
            .get_or_create(&CallLabels {
                action: "health_watch",
                outcome: "refused",
                reason: "watch_limit",
            })
            .inc();
    }

    pub fn handshake(&self) {
        self.handshakes.inc();
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    /// A new connection closed at once; `reason` as in the metric's help.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&StaticReason { reason })
            .inc();
    }

    /// A waiting connection closed by the server; `reason` as in the metric's help.
    pub fn connection_dropped(&self, reason: &'static str) {
        self.connections_dropped
            .get_or_create(&StaticReason { reason })
            .inc();
    }

    /// A connection ended; `outcome` as in the metric's help.
    pub fn connection_ended(&self, outcome: &'static str, busy: Duration) {
        let label = OutcomeLabel { outcome };
        self.connections_ended.get_or_create(&label).inc();
        self.connection_busy
            .get_or_create(&label)
            .inc_by(busy.as_secs_f64());
    }

    pub fn store(&self, up: bool, records: Option<u64>, pending_approvals: Option<usize>) {
        self.store_up.set(i64::from(up));
        if let Some(records) = records {
            self.records.set(i64::try_from(records).unwrap_or(i64::MAX));
        }
        if let Some(pending) = pending_approvals {
            self.pending_approvals
                .set(i64::try_from(pending).unwrap_or(i64::MAX));
        }
    }

    pub fn certificate(&self, expires: std::time::SystemTime) {
        let seconds = expires
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        self.certificate_expiry.set(seconds);
    }

    pub fn custody_sealed(&self, sealed: bool) {
        self.custody.sealed.set(i64::from(sealed));
    }

    pub fn custody_forged_row(&self, table: &'static str) {
        self.custody
            .forged_rows
            .get_or_create(&TableLabel { table })
            .inc();
    }

    /// Records per data key version (`None`: not wrapped), and how many await re-wrapping.
    pub fn custody_records(&self, versions: &[(Option<u32>, u64)], remaining: u64) {
        self.custody.records.clear();
        for (version, count) in versions {
            let key_version = version.map_or_else(|| "none".to_string(), |v| format!("v{v}"));
            self.custody
                .records
                .get_or_create(&KeyVersionLabel { key_version })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        self.custody
            .rewrap_remaining
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    pub fn reloaded(&self) {
        self.reloads.inc();
    }

    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    /// OpenMetrics text, which Prometheus asks for first.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The older Prometheus text format (0.0.4), for scrapers and tools that know only it
    /// (promtool among them): the same samples, counter families named with `_total`.
    pub fn encode_prometheus_text(&self) -> String {
        prometheus_text(&self.encode_openmetrics())
    }
}

/// OpenMetrics names a counter family without `_total` and its samples with it; the 0.0.4
/// format names both with it, and has no `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_older_format() {
        let metrics = Metrics::new();
        metrics.handshake();
        let text = metrics.encode_prometheus_text();
        assert!(text.contains("# HELP talos_kms_tls_handshakes_total TLS handshakes completed"));
        assert!(text.contains("# TYPE talos_kms_tls_handshakes_total counter"));
        assert!(text.contains("talos_kms_tls_handshakes_total 1"));
        assert!(!text.contains("# EOF"));
        assert!(metrics.encode_openmetrics().ends_with("# EOF\n"));
    }
}
