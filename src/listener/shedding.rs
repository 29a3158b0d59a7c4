//! What the server refuses at once rather than serve too late for its client: a connection
//! whose place in the handshake queue would outlast its client's patience, and a call
//! whose `grpc-timeout` leaves no time to answer it. Work done for a client that has given
//! up is work taken from one that has not; a prompt refusal is retried by the node (Talos:
//! 30 s later), a late answer only after its own deadline has passed as well.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Weight of a new sample in the running averages: 1/8, a few dozen calls of memory.
const SHIFT: u32 = 3;

/// An average of durations in nanoseconds, updated without a lock.
#[derive(Default)]
struct Average(AtomicU64);

impl Average {
    fn add(&self, sample: Duration) {
        let sample = u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    old - (old >> SHIFT) + (sample >> SHIFT)
                })
            });
    }

    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// The queue of connections waiting for a turn to compute their handshake flight, and how
/// long a place in it has recently lasted.
#[derive(Default)]
pub struct HandshakeQueue {
    waiting: AtomicUsize,
    per_place: Average,
}

/// A connection's place in the [`HandshakeQueue`], from when it joined.
pub struct Place<'a> {
    queue: &'a HandshakeQueue,
    ahead: usize,
    joined: Instant,
}

impl HandshakeQueue {
    /// How long a connection joining now would wait for its turn, by how long each place
    /// ahead of it lasted lately.
    pub fn expected_wait(&self) -> Duration {
        let ahead = self.waiting.load(Ordering::Relaxed);
        self.per_place
            .get()
            .saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX))
    }

    pub fn join(&self) -> Place<'_> {
        let ahead = self.waiting.fetch_add(1, Ordering::Relaxed);
        Place {
            queue: self,
            ahead,
            joined: Instant::now(),
        }
    }
}

impl Place<'_> {
    /// Its turn came: the wait is shared out over the places it moved through.
    pub fn served(self) {
        let places = u32::try_from(self.ahead + 1).unwrap_or(u32::MAX);
        self.queue.per_place.add(self.joined.elapsed() / places);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a call of each kind recently took to answer, from its request's headers.
#[derive(Default)]
pub struct AnswerTimes {
    seal: Average,
    unseal: Average,
}

impl AnswerTimes {
    pub fn expected(&self, seal: bool) -> Duration {
        self.of(seal).get()
    }

    pub fn took(&self, seal: bool, took: Duration) {
        self.of(seal).add(took);
    }

    fn of(&self, seal: bool) -> &Average {
        if seal { &self.seal } else { &self.unseal }
    }
}

/// The time a call's `grpc-timeout` header gives it (gRPC over HTTP/2: at most 8 digits and
/// a unit, H M S m u n). `None` when absent or malformed: such a call has no deadline the
/// server can see, and is served.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        for (text, expected) in [
            ("9999m", Duration::from_millis(9999)),
            ("10S", Duration::from_secs(10)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("250u", Duration::from_micros(250)),
            ("0n", Duration::ZERO),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(grpc_timeout(&headers(text)), Some(expected), "{text}");
        }
        for text in ["", "m", "10", "10s", "123456789S", "-1S", "1.5S", " 1S"] {
            let mut map = http::HeaderMap::new();
            if let Ok(value) = text.parse() {
                map.insert("grpc-timeout", value);
            }
            assert_eq!(grpc_timeout(&map), None, "{text:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn a_place_lasts_what_the_places_before_it_lasted() {
        let queue = HandshakeQueue::default();
        assert_eq!(
            queue.expected_wait(),
            Duration::ZERO,
            "empty and unmeasured"
        );
        let first = queue.join();
        let second = queue.join();
        assert_eq!(second.ahead, 1);
        std::thread::sleep(Duration::from_millis(20));
        first.served();
        second.served();
        let per_place = queue.per_place.get();
        assert!(per_place >= Duration::from_millis(10), "{per_place:?}");
        assert_eq!(queue.expected_wait(), Duration::ZERO, "no one waits now");
        let _waiting: Vec<_> = (0..4).map(|_| queue.join()).collect();
        assert_eq!(queue.expected_wait(), per_place * 4);
    }
}
