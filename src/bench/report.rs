//! What a bench run measured, as a table for people and one JSON line for scripts.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Serialize, Default)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Latency {
    /// Percentiles of latencies in microseconds (sorted in place).
    pub fn of(samples: &mut [u64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |percent: usize| samples[(samples.len() - 1) * percent / 100];
        Latency {
            p50_us: at(50),
            p90_us: at(90),
            p99_us: at(99),
            max_us: at(100),
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub mode: String,
    pub connection: String,
    pub key_exchange: String,
    pub concurrency: usize,
    /// Calls started per second in open loop; absent in closed loop.
    pub offered_rate: Option<f64>,
    pub duration_s: f64,
    pub calls_ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// What the first failed call said.
    pub first_error: Option<String>,
    /// Unseals that answered other bytes than were sealed.
    pub mismatches: u64,
    /// Open loop: calls due while `concurrency` calls were already in flight.
    pub not_started: u64,
    pub calls_per_s: f64,
    pub latency: Latency,
    pub server_cpu_us_per_call: Option<f64>,
    pub client_cpu_us_per_call: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = self
            .offered_rate
            .map_or_else(|| "closed loop".into(), |r| format!("open loop {r}/s"));
        writeln!(
            f,
            "{} on {} connections, {}, concurrency {}, {} ({:.1} s)",
            self.mode, self.connection, self.key_exchange, self.concurrency, rate, self.duration_s
        )?;
        writeln!(f, "  calls ok        {}", self.calls_ok)?;
        let errors: u64 = self.errors.values().sum();
        write!(f, "  errors          {errors}")?;
        for (kind, count) in &self.errors {
            write!(f, "  {kind}: {count}")?;
        }
        writeln!(f)?;
        if let Some(error) = &self.first_error {
            writeln!(f, "  first error     {error}")?;
        }
        writeln!(f, "  mismatches      {}", self.mismatches)?;
        if self.offered_rate.is_some() {
            writeln!(f, "  not started     {}", self.not_started)?;
        }
        writeln!(f, "  calls/s         {:.0}", self.calls_per_s)?;
        let l = &self.latency;
        writeln!(
            f,
            "  latency         p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.max_us)
        )?;
        writeln!(
            f,
            "  server CPU/call {}",
            server_cpu(self.server_cpu_us_per_call)
        )?;
        write!(f, "  client CPU/call {:.1} µs", self.client_cpu_us_per_call)
    }
}

fn server_cpu(per_call_us: Option<f64>) -> String {
    per_call_us.map_or_else(
        || "(give --server-pid)".into(),
        |cpu| format!("{cpu:.1} µs"),
    )
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Serialize)]
pub struct StormReport {
    pub mode: &'static str,
    pub nodes: usize,
    /// Volumes per node (the most of any node, with --volumes-from).
    pub volumes: usize,
    /// The network the nodes' source addresses were taken from; `None`: one address.
    pub sources: Option<String>,
    pub retry_after_s: f64,
    /// From the moment every node starts until the last volume is unsealed.
    pub time_to_all_unsealed_s: f64,
    pub calls: u64,
    /// Calls past their 10 s deadline.
    pub timeouts: u64,
    pub other_errors: u64,
    /// Failed calls by kind, timeouts included.
    pub errors: BTreeMap<String, u64>,
    /// What the first failed call said.
    pub first_error: Option<String>,
    pub retries: u64,
    pub mismatches: u64,
    /// Volumes that opened.
    pub volumes_unsealed: u64,
    /// Volumes still locked when the storm's time limit ran out.
    pub volumes_left_locked: u64,
    pub latency: Latency,
    /// The server's CPU time during the storm (all threads, from /proc).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_call: Option<f64>,
    /// Time the server spent working on its connections during the storm, by outcome (its
    /// `connection_busy_seconds` metric: their CPU time).
    pub connection_busy_s: Option<BTreeMap<String, f64>>,
    /// Share of the server's work on connections spent on those whose calls did not succeed
    /// (outcomes refused and no_call, of all of `connection_busy_s`).
    pub failed_cpu_share: Option<f64>,
    /// The server's peak resident memory (VmHWM) since it started.
    pub server_peak_rss_mib: Option<f64>,
    /// The most memory the server allocated itself during the storm (RssAnon, read every
    /// 100 ms): its peak RSS without the pages of its executable, which the kernel maps.
    pub server_peak_anonymous_mib: Option<f64>,
    pub client_cpu_s: f64,
    /// When each volume opened, in µs from the start, in order: for `--timeline`.
    #[serde(skip)]
    pub opened_us: Vec<u64>,
}

impl StormReport {
    /// Volumes unsealed by the end of each `step` of the storm, as CSV.
    pub fn timeline_csv(&self, step: std::time::Duration) -> String {
        let step_us = step.as_micros().max(1) as u64;
        let end = self.opened_us.last().copied().unwrap_or(0);
        let mut csv = String::from("seconds,unsealed\n");
        let mut opened = self.opened_us.iter().peekable();
        let mut count = 0u64;
        let mut at = 0u64;
        loop {
            while opened.next_if(|&&t| t <= at).is_some() {
                count += 1;
            }
            csv.push_str(&format!("{:.3},{count}\n", at as f64 / 1e6));
            if at >= end {
                return csv;
            }
            at += step_us;
        }
    }
}

impl fmt::Display for StormReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sources = self.sources.as_deref().map_or_else(
            || "one source address".into(),
            |s| format!("nodes from {s}"),
        );
        writeln!(
            f,
            "storm: {} nodes x {} volumes, {sources}, fresh connections, 10 s deadline per \
             call, retry after {} s",
            self.nodes, self.volumes, self.retry_after_s
        )?;
        writeln!(
            f,
            "  all unsealed in   {:.2} s ({} of {} volumes)",
            self.time_to_all_unsealed_s,
            self.volumes_unsealed,
            self.volumes_unsealed + self.volumes_left_locked
        )?;
        writeln!(
            f,
            "  calls             {} ({} retries)",
            self.calls, self.retries
        )?;
        writeln!(f, "  past deadline     {}", self.timeouts)?;
        write!(f, "  other errors      {}", self.other_errors)?;
        for (kind, count) in self.errors.iter().filter(|(kind, _)| *kind != "timeout") {
            write!(f, "  {kind}: {count}")?;
        }
        writeln!(f)?;
        if let Some(error) = &self.first_error {
            writeln!(f, "  first error       {error}")?;
        }
        writeln!(f, "  mismatches        {}", self.mismatches)?;
        writeln!(f, "  left locked       {}", self.volumes_left_locked)?;
        let l = &self.latency;
        writeln!(
            f,
            "  latency           p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.max_us)
        )?;
        match self.server_cpu_s {
            Some(cpu) => writeln!(
                f,
                "  server CPU        {cpu:.2} s, {}/call",
                server_cpu(self.server_cpu_us_per_call)
            )?,
            None => writeln!(f, "  server CPU        (give --server-pid)")?,
        }
        match (&self.connection_busy_s, self.failed_cpu_share) {
            (Some(by_outcome), Some(share)) => {
                write!(f, "  on failed calls   {:.1} % (", share * 100.0)?;
                let parts: Vec<String> = by_outcome
                    .iter()
                    .map(|(outcome, s)| format!("{outcome} {s:.2} s"))
                    .collect();
                writeln!(f, "{})", parts.join(", "))?;
            }
            (Some(_), None) => writeln!(
                f,
                "  on failed calls   (the server exports no talos_kms_connection_busy_seconds)"
            )?,
            (None, _) => writeln!(
                f,
                "  on failed calls   (give --metrics, the server's metricsAddress)"
            )?,
        }
        if let Some(rss) = self.server_peak_rss_mib {
            writeln!(f, "  server peak RSS   {rss:.1} MiB")?;
        }
        if let Some(anonymous) = self.server_peak_anonymous_mib {
            writeln!(
                f,
                "  of which allocated {anonymous:.1} MiB at most (the rest: mapped files)"
            )?;
        }
        write!(f, "  client CPU        {:.2} s", self.client_cpu_s)
    }
}
