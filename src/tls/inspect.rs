//! Reading what an operator needs to know from certificates: who they name, for which
//! names they are valid, whether they are a CA, and when they are valid.

use rustls::pki_types::CertificateDer;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, SubjectAltName};

/// Warn this long before a certificate expires: two weeks leaves time to fix a renewal.
pub const RENEWAL_WARNING: Duration = Duration::from_secs(14 * 86_400);

pub struct CertificateFacts {
    pub subject: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// basicConstraints CA:TRUE: rustls-based clients refuse it as a server's certificate.
    pub is_ca: bool,
    /// DNS names of the subjectAltName extension, as written (wildcards included).
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    NotYetValid,
    Valid,
    Expired,
}

impl CertificateFacts {
    pub fn read(der: &CertificateDer<'_>) -> Result<Self, String> {
        let cert = Certificate::from_der(der.as_ref())
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let tbs = cert.tbs_certificate();
        let is_ca = matches!(
            tbs.get_extension::<BasicConstraints>(),
            Ok(Some((_, constraints))) if constraints.ca
        );
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some((_, SubjectAltName(names)))) = tbs.get_extension::<SubjectAltName>() {
            for name in names {
                match name {
                    GeneralName::DnsName(dns) => dns_names.push(dns.to_string()),
                    GeneralName::IpAddress(octets) => match octets.as_bytes().len() {
                        4 => ip_addresses
                            .extend(<[u8; 4]>::try_from(octets.as_bytes()).map(IpAddr::from)),
                        16 => ip_addresses
                            .extend(<[u8; 16]>::try_from(octets.as_bytes()).map(IpAddr::from)),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: tbs.subject().to_string(),
            issuer: tbs.issuer().to_string(),
            not_before: tbs.validity().not_before.to_system_time(),
            not_after: tbs.validity().not_after.to_system_time(),
            is_ca,
            dns_names,
            ip_addresses,
        })
    }

    pub fn validity(&self) -> Validity {
        let now = SystemTime::now();
        if now < self.not_before {
            Validity::NotYetValid
        } else if now > self.not_after {
            Validity::Expired
        } else {
            Validity::Valid
        }
    }

    /// Whole days until expiry; negative once expired.
    pub fn days_left(&self) -> i64 {
        match self.not_after.duration_since(SystemTime::now()) {
            Ok(left) => (left.as_secs() / 86_400) as i64,
            Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
        }
    }

    pub fn expires_within(&self, window: Duration) -> bool {
        self.not_after < SystemTime::now() + window
    }

    pub fn not_before_text(&self) -> String {
        utc_text(self.not_before)
    }

    pub fn not_after_text(&self) -> String {
        utc_text(self.not_after)
    }

    /// The subjectAltName entries, for messages: "kms.example.com, 10.0.0.5".
    pub fn names_text(&self) -> String {
        let names: Vec<String> = self
            .dns_names
            .iter()
            .cloned()
            .chain(self.ip_addresses.iter().map(IpAddr::to_string))
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// Whether a client connecting to `host` (a DNS name or an IP literal) accepts the
    /// certificate's names, as TLS clients match them (RFC 6125: one left-most wildcard
    /// label; IP addresses only against IP entries).
    pub fn covers(&self, host: &str) -> bool {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return self.ip_addresses.contains(&ip);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.dns_names.iter().any(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => name == host,
            }
        })
    }
}

fn utc_text(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.format(time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
    ))
    .unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dns: &[&str], ips: &[&str]) -> CertificateFacts {
        CertificateFacts {
            subject: String::new(),
            issuer: String::new(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            is_ca: false,
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn names_are_matched_as_tls_clients_match_them() {
        let cert = facts(
            &["kms.example.com", "*.nodes.example.com"],
            &["10.0.0.5", "::1"],
        );
        assert!(cert.covers("kms.example.com"));
        assert!(cert.covers("KMS.example.com."));
        assert!(cert.covers("a.nodes.example.com"));
        assert!(
            !cert.covers("a.b.nodes.example.com"),
            "a wildcard spans one label"
        );
        assert!(!cert.covers("nodes.example.com"));
        assert!(cert.covers("10.0.0.5"));
        assert!(cert.covers("[::1]"));
        assert!(!cert.covers("10.0.0.6"));
        assert!(
            !facts(&["10.0.0.5"], &[]).covers("10.0.0.5"),
            "an IP needs an IP entry"
        );
    }
}
