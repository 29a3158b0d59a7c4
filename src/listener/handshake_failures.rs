//! Failed TLS handshakes, the commonest operator problem (nodes that do not trust the
//! certificate), told in the log without flooding it: the first failure of each peer and
//! reason at WARN, the rest counted and summed up once a minute.

use rustls::AlertDescription;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// How often suppressed failures are summed up.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Distinct (peer, reason) pairs remembered; beyond this a flood of addresses is only counted.
const REMEMBERED: usize = 4096;
const CLOSED: &str = "closed";

/// Why a handshake failed, in words an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason {
    /// Short and stable, for counting: `alert UnknownCA`, `not TLS`, `timed out`…
    pub kind: String,
    /// What it usually means and what to do.
    pub hint: &'static str,
}

impl Reason {
    /// Classifies a handshake's I/O error (rustls reports its errors inside io::Error).
    pub fn of(error: &std::io::Error) -> Reason {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::AlertReceived(alert)) => Self::alert(*alert),
            Some(rustls::Error::NoApplicationProtocol) => Reason {
                kind: "no ALPN h2".into(),
                hint: "the client did not offer HTTP/2 (ALPN h2): it is not a gRPC client",
            },
            Some(rustls::Error::PeerIncompatible(_)) => Reason {
                kind: "incompatible client".into(),
                hint: "the client offers no TLS 1.3 or no common key exchange or signature; \
                       Talos always speaks TLS 1.3",
            },
            Some(rustls::Error::InvalidMessage(_)) => Reason {
                kind: "not TLS".into(),
                hint: "the client did not speak TLS: a node whose endpoint says grpc:// (or \
                       has no scheme) must use https://",
            },
            Some(_) => Reason {
                kind: "TLS error".into(),
                hint: "see the error for details",
            },
            None if error.kind() == std::io::ErrorKind::UnexpectedEof => Reason {
                kind: CLOSED.into(),
                hint: "the client closed the connection during the handshake",
            },
            None => Reason {
                kind: "connection error".into(),
                hint: "the connection failed during the handshake",
            },
        }
    }

    /// A connection closed before its handshake: port scans and the TCP health checks of
    /// load balancers do that all day; not an operator's problem.
    pub fn is_probe(&self) -> bool {
        self.kind == CLOSED
    }

    pub fn timed_out() -> Reason {
        Reason {
            kind: "timed out".into(),
            hint: "the handshake did not complete within 10 s: a slow or stalled client, or a \
                   server too loaded to answer",
        }
    }

    fn alert(alert: AlertDescription) -> Reason {
        let hint = match alert {
            AlertDescription::UnknownCA => {
                "the client does not trust the CA that issued the certificate: nodes need a \
                 certificate from a public CA for STATE, or the CA in a TrustedRootsConfig \
                 for other volumes"
            }
            AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                "the client refused the certificate: an untrusted CA, a name that is not the \
                 endpoint's host, or a CA certificate used as the server's; \
                 `talos-kms-server check` shows the chain and names"
            }
            AlertDescription::CertificateExpired => {
                "the client finds the certificate expired or not yet valid: renew it, or check \
                 the clocks of the node and this host"
            }
            AlertDescription::ProtocolVersion
            | AlertDescription::HandshakeFailure
            | AlertDescription::InsufficientSecurity => {
                "no common TLS parameters: the client needs TLS 1.3"
            }
            _ => "the client ended the handshake with this alert",
        };
        Reason {
            kind: format!("alert {alert:?}"),
            hint,
        }
    }
}

#[derive(Default)]
pub struct HandshakeFailures {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<(IpAddr, Reason)>,
    /// Failures not logged one by one since the last summary, by reason.
    suppressed: BTreeMap<Reason, Suppressed>,
}

#[derive(Default)]
struct Suppressed {
    count: u64,
    peers: HashSet<IpAddr>,
}

impl HandshakeFailures {
    /// Notes a failure; true when it is the first of its peer and reason and should be
    /// logged on its own.
    pub fn record(&self, peer: IpAddr, reason: &Reason) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.seen.len() < REMEMBERED && state.seen.insert((peer, reason.clone())) {
            return true;
        }
        let entry = state.suppressed.entry(reason.clone()).or_default();
        entry.count += 1;
        if entry.peers.len() < REMEMBERED {
            entry.peers.insert(peer);
        }
        false
    }

    /// One line for the failures not logged since the last call, if there were any.
    pub fn summary(&self) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.suppressed.is_empty() {
            return None;
        }
        let total: u64 = state.suppressed.values().map(|s| s.count).sum();
        let parts: Vec<String> = std::mem::take(&mut state.suppressed)
            .into_iter()
            .map(|(reason, s)| {
                format!(
                    "{} x {} from {} address{}",
                    s.count,
                    reason.kind,
                    s.peers.len(),
                    if s.peers.len() == 1 { "" } else { "es" }
                )
            })
            .collect();
        Some(format!(
            "{total} more TLS handshakes failed since the last report: {}",
            parts.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown_ca() -> Reason {
        Reason::alert(AlertDescription::UnknownCA)
    }

    #[test]
    fn the_first_failure_of_each_peer_and_reason_is_logged_the_rest_summed_up() {
        let failures = HandshakeFailures::default();
        let (a, b) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        assert!(failures.record(a, &unknown_ca()));
        assert!(!failures.record(a, &unknown_ca()));
        assert!(!failures.record(a, &unknown_ca()));
        assert!(failures.record(b, &unknown_ca()));
        assert!(failures.record(a, &Reason::timed_out()));
        assert!(!failures.record(b, &unknown_ca()));
        assert_eq!(
            failures.summary().as_deref(),
            Some(
                "3 more TLS handshakes failed since the last report: \
                 3 x alert UnknownCA from 2 addresses"
            )
        );
        assert_eq!(failures.summary(), None, "each failure is summed up once");
        assert!(
            !failures.record(a, &unknown_ca()),
            "a known peer stays quiet"
        );
    }

    #[test]
    fn a_flood_of_addresses_is_counted_without_growing_without_bound() {
        let failures = HandshakeFailures::default();
        let logged = (0..REMEMBERED as u32 + 100)
            .filter(|i| failures.record(IpAddr::from(i.to_be_bytes()), &unknown_ca()))
            .count();
        assert_eq!(logged, REMEMBERED);
        assert!(failures.summary().unwrap().starts_with("100 more"));
    }

    #[test]
    fn alerts_and_plaintext_clients_are_named() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
        );
        assert_eq!(Reason::of(&alert).kind, "alert UnknownCA");
        let plaintext = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert!(Reason::of(&plaintext).hint.contains("https://"));
    }
}
