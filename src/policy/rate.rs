//! Token buckets per source address and for the whole server (governor's GCRA: one atomic
//! compare-and-swap per call, no lock).

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// A token bucket: `per_second` calls refill it, `burst` fit in it. `per_second: 0` is no
/// limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    pub const OFF: RateLimit = RateLimit {
        per_second: 0,
        burst: 0,
    };

    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second))?;
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per_second {
            0 => f.write_str("off"),
            n => write!(f, "{n}/s, burst {}", self.burst.max(n)),
        }
    }
}

/// Which bucket ran dry, and when it holds a token again.
pub struct Exhausted {
    pub global: bool,
    pub retry_after: Duration,
}

pub struct RateLimits {
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    global: Option<DefaultDirectRateLimiter>,
}

impl RateLimits {
    pub fn new(per_address: RateLimit, global: RateLimit) -> Self {
        Self {
            per_address: per_address.quota().map(RateLimiter::keyed),
            global: global.quota().map(RateLimiter::direct),
        }
    }

    /// Takes a token for a call from `ip`, from its own bucket and then the global one.
    pub fn check(&self, ip: IpAddr) -> Result<(), Exhausted> {
        let retry_after = |not_until: governor::NotUntil<_>| {
            not_until.wait_time_from(DefaultClock::default().now())
        };
        if let Some(limiter) = &self.per_address {
            limiter
                .check_key(&ip.to_canonical())
                .map_err(|e| Exhausted {
                    global: false,
                    retry_after: retry_after(e),
                })?;
        }
        if let Some(limiter) = &self.global {
            limiter.check().map_err(|e| Exhausted {
                global: true,
                retry_after: retry_after(e),
            })?;
        }
        Ok(())
    }

    /// Forgets the buckets of addresses that have been quiet long enough to be full again,
    /// so that a scan from many addresses does not grow the map for good.
    pub fn forget_quiet(&self) {
        if let Some(limiter) = &self.per_address {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_calls_are_refused_per_address() {
        let limits = RateLimits::new(
            RateLimit {
                per_second: 1,
                burst: 3,
            },
            RateLimit::OFF,
        );
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.check(a).is_ok());
        }
        let refused = limits.check(a).err().unwrap();
        assert!(!refused.global);
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert!(
            limits.check(b).is_ok(),
            "another address has its own bucket"
        );
        assert!(limits.check("10.0.0.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_global_bucket_is_shared() {
        let limits = RateLimits::new(
            RateLimit::OFF,
            RateLimit {
                per_second: 1,
                burst: 2,
            },
        );
        assert!(limits.check("10.0.0.1".parse().unwrap()).is_ok());
        assert!(limits.check("10.0.0.2".parse().unwrap()).is_ok());
        assert!(
            limits
                .check("10.0.0.3".parse().unwrap())
                .err()
                .unwrap()
                .global
        );
    }

    #[test]
    fn off_never_refuses() {
        let limits = RateLimits::new(RateLimit::OFF, RateLimit::OFF);
        for _ in 0..10_000 {
            assert!(limits.check("10.0.0.1".parse().unwrap()).is_ok());
        }
    }
}
