//! The time the server's threads spend working on each connection (its handshake, HTTP/2
//! and calls: every poll of its task), by how its calls went, so that an operator sees what
//! share of a storm went to calls that did not succeed. A poll never waits, so its duration
//! is CPU time (plus any preemption meanwhile). It is read from the monotonic clock, ~40 ns
//! a read (vDSO): the thread's CPU clock is a system call, ~1.5 µs a read on a KVM guest,
//! which at two reads a poll would have cost ~5 % of a call. A seal's wait for its commit
//! runs in a task of its own and the commit in the store's thread; they are not counted.

use crate::metrics::Metrics;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const NO_CALL: u8 = 0;
const REFUSED: u8 = 1;
const ANSWERED: u8 = 2;

/// How a connection's calls went: no Seal or Unseal, one refused (an error status), or one
/// answered OK (decoys included: the server cannot tell them apart on the wire either).
#[derive(Default)]
pub struct Outcome(AtomicU8);

impl Outcome {
    pub fn answered(&self, ok: bool) {
        self.0
            .fetch_max(if ok { ANSWERED } else { REFUSED }, Ordering::Relaxed);
    }

    /// The metric's `outcome` label.
    pub fn label(&self) -> &'static str {
        match self.0.load(Ordering::Relaxed) {
            NO_CALL => "no_call",
            REFUSED => "refused",
            _ => "answered",
        }
    }
}

/// Runs `task`, then counts the time its polls took under the outcome it left. The task
/// comes pinned where its caller made it: taken by value, it would be stored twice in this
/// future (the argument and the pinned copy), a connection's whole state over again.
pub async fn measured<F: Future<Output = ()>>(
    task: Pin<&mut F>,
    outcome: &Outcome,
    metrics: &Metrics,
) {
    let mut spent = Duration::ZERO;
    Timed {
        task,
        spent: &mut spent,
    }
    .await;
    metrics.connection_ended(outcome.label(), spent);
}

struct Timed<'a, F> {
    task: Pin<&'a mut F>,
    spent: &'a mut Duration,
}

impl<F: Future<Output = ()>> Future for Timed<'_, F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let start = Instant::now();
        let polled = self.task.as_mut().poll(cx);
        *self.spent += start.elapsed();
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_s_busy_time_is_counted_under_its_best_outcome() {
        let metrics = Metrics::new();
        let outcome = Outcome::default();
        assert_eq!(outcome.label(), "no_call");
        let busy = async {
            outcome.answered(false);
            outcome.answered(true);
            outcome.answered(false);
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(20) {
                std::hint::black_box(0u64);
            }
            tokio::task::yield_now().await;
        };
        measured(std::pin::pin!(busy), &outcome, &metrics).await;
        assert_eq!(outcome.label(), "answered");
        let text = metrics.encode_openmetrics();
        let line = text
            .lines()
            .find(|line| {
                line.starts_with("talos_kms_connection_busy_seconds_total{outcome=\"answered\"}")
            })
            .unwrap_or_else(|| panic!("{text}"));
        let seconds: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((0.01..1.0).contains(&seconds), "{line}");
    }
}
