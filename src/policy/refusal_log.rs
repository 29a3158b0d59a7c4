//! Refused calls told in the log without letting a caller set its volume: the first of each
//! address and reason in a minute is logged on its own (at WARN), the rest counted and
//! summed up once a minute, as failed handshakes are. The audit trail still has every one.

use crate::audit::Reason;
use crate::locking::lock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Mutex;

/// Addresses remembered per minute; beyond this a flood of addresses is only counted.
const REMEMBERED: usize = 4096;
/// Addresses named in a summary, the busiest first.
const NAMED: usize = 5;

#[derive(Default)]
pub struct RefusalLog {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (address, reason) already logged this minute.
    seen: HashSet<(IpAddr, Reason)>,
    /// Not logged one by one this minute, by reason.
    suppressed: BTreeMap<&'static str, Suppressed>,
}

#[derive(Default)]
struct Suppressed {
    count: u64,
    /// By address, as far as remembered.
    peers: HashMap<IpAddr, u64>,
}

impl RefusalLog {
    /// Notes a refused call; true when it is the first of its address and reason this
    /// minute and should be logged on its own.
    pub fn first(&self, ip: IpAddr, reason: Reason) -> bool {
        let ip = ip.to_canonical();
        let mut state = lock(&self.state);
        if state.seen.len() < REMEMBERED && state.seen.insert((ip, reason)) {
            return true;
        }
        let suppressed = state.suppressed.entry(reason.label()).or_default();
        suppressed.count += 1;
        if let Some(count) = suppressed.peers.get_mut(&ip) {
            *count += 1;
        } else if suppressed.peers.len() < REMEMBERED {
            suppressed.peers.insert(ip, 1);
        }
        false
    }

    /// The minute's summary of the refusals not logged one by one, if any, and a new
    /// minute begun.
    pub fn summary(&self) -> Option<String> {
        let state = std::mem::take(&mut *lock(&self.state));
        if state.suppressed.is_empty() {
            return None;
        }
        let total: u64 = state.suppressed.values().map(|s| s.count).sum();
        let mut text = format!("{total} more refused calls in the last minute:");
        for (reason, suppressed) in &state.suppressed {
            let mut peers: Vec<_> = suppressed.peers.iter().collect();
            peers.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let named: Vec<String> = peers
                .iter()
                .take(NAMED)
                .map(|(ip, count)| format!("{ip} {count}"))
                .collect();
            let _ = write!(
                text,
                " {reason} {} from {} addresses ({}{});",
                suppressed.count,
                suppressed.peers.len(),
                named.join(", "),
                if peers.len() > NAMED { ", ..." } else { "" }
            );
        }
        text.pop();
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hundred_refusals_from_one_address_are_one_line_and_a_count() {
        let log = RefusalLog::default();
        let attacker: IpAddr = "10.0.0.9".parse().unwrap();
        let logged = (0..100)
            .filter(|_| log.first(attacker, Reason::UnknownNonce))
            .count();
        assert_eq!(logged, 1);
        assert!(log.first("10.0.0.8".parse().unwrap(), Reason::UnknownNonce));
        assert!(log.first(attacker, Reason::RateLimited), "another reason");
        let summary = log.summary().unwrap();
        assert!(
            summary.contains("unknown_nonce 99 from 1 addresses (10.0.0.9 99)"),
            "{summary}"
        );
        assert!(log.summary().is_none(), "a new minute");
        assert!(log.first(attacker, Reason::UnknownNonce), "logged again");
    }
}
