//! Connections closed by the listener on its own accord, told in the log and the audit trail
//! without letting a flood fill either: the first of each address and kind in a minute is
//! logged (and, for the allow-list, audited) on its own, the rest counted and summed up
//! once a minute, like failed handshakes.

use crate::audit::{Action, AuditLog, Event, Reason};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

/// Addresses remembered per minute; beyond this a flood of addresses is only counted.
const REMEMBERED: usize = 4096;

/// Why the listener closed a connection that had made no call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Outside every allow-list: closed before TLS.
    Network,
    /// Over `maxConnectionsPerAddress`: the new one refused, or the address's own waiting
    /// connection closed to admit it.
    PerAddress,
    /// Every slot taken: a connection waiting on its client was closed.
    Full,
    /// A PROXY protocol header from an address outside `trustedProxies`.
    ProxyUntrusted,
    /// A trusted proxy's connection without a valid PROXY header.
    ProxyInvalid,
    /// Its place in the handshake queue would have outlasted its client's patience.
    Queue,
}

impl Kind {
    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Network => "network",
            Kind::PerAddress => "per_address",
            Kind::Full => "evicted",
            Kind::ProxyUntrusted => "proxy_untrusted",
            Kind::ProxyInvalid => "proxy_invalid",
            Kind::Queue => "handshake_queue",
        }
    }

    /// The log line for the first of a minute.
    pub fn message(self) -> &'static str {
        match self {
            Kind::Network => {
                "connection refused before TLS: the address is outside sealAllowedNetworks \
                 and unsealAllowedNetworks; more from this address are summed up once a minute"
            }
            Kind::PerAddress => {
                "an address holds maxConnectionsPerAddress connections: its longest-waiting one \
                 was closed, or the new one refused if all had calls in flight (nodes behind \
                 one NAT share an address: raise maxConnectionsPerAddress for them); more are \
                 summed up once a minute"
            }
            Kind::Full => {
                "every connection slot was taken: closed a connection waiting on its client \
                 to admit a new one (raise maxConnections if this happens without an attack); \
                 more are summed up once a minute"
            }
            Kind::ProxyUntrusted => {
                "PROXY protocol header from an address that is not in trustedProxies: \
                 connection closed; add the load balancer's address to trustedProxies, or \
                 stop sending PROXY headers to this server; more from this address are \
                 summed up once a minute"
            }
            Kind::ProxyInvalid => {
                "a trusted proxy's connection did not begin with a valid PROXY protocol \
                 header: connection closed; make the load balancer send one on every \
                 connection (HAProxy: `send-proxy-v2` on the server line), or remove its \
                 address from trustedProxies; more from this address are summed up once a \
                 minute"
            }
            Kind::Queue => {
                "connection closed before its TLS handshake: the handshakes queued ahead of \
                 it would take longer than its client waits (handshakeTimeout); the server \
                 cannot keep up with this many new connections, and the node will retry; \
                 more are summed up once a minute"
            }
        }
    }

    fn summary_text(self) -> &'static str {
        match self {
            Kind::Network => "refused (network)",
            Kind::PerAddress => "over maxConnectionsPerAddress",
            Kind::Full => "evicted (all slots taken)",
            Kind::ProxyUntrusted => "PROXY header from an untrusted address",
            Kind::ProxyInvalid => "no valid PROXY header from a trusted proxy",
            Kind::Queue => "refused (handshake queue longer than the client waits)",
        }
    }
}

#[derive(Default)]
pub struct Refusals {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (address, kind) already logged this minute.
    seen: HashSet<(IpAddr, Kind)>,
    /// Not logged one by one this minute, by kind.
    suppressed: BTreeMap<Kind, Suppressed>,
}

#[derive(Default)]
struct Suppressed {
    count: u64,
    /// By address, as far as remembered; the rest in `others`.
    peers: HashMap<IpAddr, u64>,
    others: u64,
}

/// What a minute's summary says: a log line, and the audit lines of the allow-list's
/// suppressed refusals (one per address).
pub struct Summary {
    pub log: Option<String>,
    pub audit: Vec<Event>,
}

impl Refusals {
    /// Notes a closed connection; true when it is the first of its address and kind this
    /// minute and should be logged (and audited) on its own.
    pub fn record(&self, ip: IpAddr, kind: Kind) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.seen.len() < REMEMBERED && state.seen.insert((ip, kind)) {
            return true;
        }
        let entry = state.suppressed.entry(kind).or_default();
        entry.count += 1;
        if let Some(count) = entry.peers.get_mut(&ip) {
            *count += 1;
        } else if entry.peers.len() < REMEMBERED {
            entry.peers.insert(ip, 1);
        } else {
            entry.others += 1;
        }
        false
    }

    /// Sums up the minute and begins a new one, in which every address is logged afresh.
    pub fn summary(&self) -> Summary {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seen.clear();
        let suppressed = std::mem::take(&mut state.suppressed);
        drop(state);
        if suppressed.is_empty() {
            return Summary {
                log: None,
                audit: Vec::new(),
            };
        }
        let total: u64 = suppressed.values().map(|s| s.count).sum();
        let parts: Vec<String> = suppressed
            .iter()
            .map(|(kind, s)| {
                let addresses = s.peers.len();
                format!(
                    "{} x {} from {}{addresses} address{}",
                    s.count,
                    kind.summary_text(),
                    if s.others > 0 { "more than " } else { "" },
                    if addresses == 1 { "" } else { "es" }
                )
            })
            .collect();
        let log = Some(format!(
            "{total} more connections closed since the last report: {}",
            parts.join("; ")
        ));
        let mut audit = Vec::new();
        if let Some(network) = suppressed.get(&Kind::Network) {
            let mut peers: Vec<_> = network.peers.iter().collect();
            peers.sort();
            for (ip, count) in peers {
                audit.push(refused_connection(
                    Some(*ip),
                    format!("{count} more connections refused since the last line"),
                ));
            }
            if network.others > 0 {
                audit.push(refused_connection(
                    None,
                    format!(
                        "{} more connections refused from addresses beyond the first \
                         {REMEMBERED} of the minute",
                        network.others
                    ),
                ));
            }
        }
        Summary { log, audit }
    }
}

/// The audit line of connections refused for their address (`None`: many addresses).
pub fn refused_connection(ip: Option<IpAddr>, detail: String) -> Event {
    let mut event = Event::call(Action::Connect, "", "").refused(Reason::NetworkNotAllowed);
    event.peer = ip.map(|ip| ip.to_string());
    event.node = None;
    event.detail(detail)
}

/// Logs (the first of each address and kind a minute) and, for the allow-list, audits a
/// connection closed by the listener; the caller counted it. `via`: the trusted proxy whose
/// PROXY header carried `ip`.
pub(super) fn closed_early(
    refusals: &Refusals,
    audit: &AuditLog,
    ip: IpAddr,
    kind: Kind,
    via: Option<IpAddr>,
) {
    if !refusals.record(ip, kind) {
        tracing::debug!(peer = %ip, reason = kind.label(), "connection closed");
        return;
    }
    match via {
        Some(proxy) => {
            tracing::warn!(peer = %ip, %proxy, reason = kind.label(), "{}", kind.message())
        }
        None => tracing::warn!(peer = %ip, reason = kind.label(), "{}", kind.message()),
    }
    if kind == Kind::Network {
        let carried = via.map_or(String::new(), |proxy| {
            format!(" (the address a PROXY header from the trusted proxy {proxy} carried)")
        });
        let line = refused_connection(
            Some(ip),
            format!(
                "closed before TLS: the address{carried} is outside sealAllowedNetworks and \
                 unsealAllowedNetworks; more from it are counted in one line a minute"
            ),
        );
        // Refusing needs no audit line; a failing trail is reported by the audit log.
        let _ = audit.write(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_first_of_each_address_and_kind_a_minute_is_told_the_rest_summed_up() {
        let refusals = Refusals::default();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(refusals.record(a, Kind::Network));
        assert!(!refusals.record(a, Kind::Network));
        assert!(!refusals.record(a, Kind::Network));
        assert!(refusals.record(b, Kind::Network));
        assert!(refusals.record(a, Kind::PerAddress));
        assert!(!refusals.record(a, Kind::PerAddress));
        let summary = refusals.summary();
        assert_eq!(
            summary.log.as_deref(),
            Some(
                "3 more connections closed since the last report: 2 x refused (network) from \
                 1 address; 1 x over maxConnectionsPerAddress from 1 address"
            )
        );
        assert_eq!(
            summary.audit.len(),
            1,
            "one line per address, with its count"
        );
        let line = &summary.audit[0];
        assert_eq!(line.peer.as_deref(), Some("10.0.0.1"));
        assert_eq!(line.action, Some(Action::Connect));
        assert_eq!(line.reason, Some(Reason::NetworkNotAllowed));
        assert!(line.detail.as_deref().unwrap().starts_with("2 more"));
        assert!(line.node.is_none());

        let quiet = refusals.summary();
        assert!(quiet.log.is_none() && quiet.audit.is_empty());
        assert!(
            refusals.record(a, Kind::Network),
            "a new minute: each address is told afresh"
        );
    }

    #[test]
    fn a_flood_of_addresses_is_counted_without_growing_without_bound() {
        let refusals = Refusals::default();
        let flood = 2 * REMEMBERED as u32 + 10;
        let told = (0..flood)
            .filter(|i| refusals.record(IpAddr::from(i.to_be_bytes()), Kind::Network))
            .count();
        assert_eq!(told, REMEMBERED);
        let summary = refusals.summary();
        assert_eq!(summary.audit.len(), REMEMBERED + 1, "bounded lines");
        let last = summary.audit.last().unwrap();
        assert!(last.peer.is_none());
        assert!(last.detail.as_deref().unwrap().starts_with("10 more"));
    }
}
