//! What can go wrong for a client, in sentences an operator can act on: rustls and hyper
//! describe their errors with Debug text, so each is put into words where it is caught.

use rustls::pki_types::ServerName;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// What went wrong, as a sentence an operator can act on. No variant keeps a library error
/// as its source: those print Debug text, so each is turned into words where it is caught.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot connect to {endpoint}: {problem}")]
    Connect { endpoint: String, problem: String },
    #[error("TLS handshake with {endpoint} failed: {problem}")]
    Tls { endpoint: String, problem: String },
    #[error(
        "{endpoint} speaks TLS, but the endpoint asks for plaintext gRPC: use {https} as the endpoint"
    )]
    SpeaksTls { endpoint: String, https: String },
    #[error("HTTP/2 with {endpoint} failed: {problem}")]
    Http2 { endpoint: String, problem: String },
    #[error("the server refused the call with {}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error(
        "no answer within {} s: the server is overloaded, or a firewall drops the packets",
        .0.as_secs_f64()
    )]
    Timeout(Duration),
}

impl ClientError {
    /// A short name for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Setup(_) => "setup",
            ClientError::Connect { .. } => "connect",
            ClientError::Tls { .. } => "tls",
            ClientError::SpeaksTls { .. } => "plaintext_to_tls",
            ClientError::Http2 { .. } => "http2",
            ClientError::Status(_) => "status",
            ClientError::Timeout(_) => "timeout",
        }
    }

    /// Whether a plaintext call could have failed because the server expects TLS.
    pub(super) fn may_be_plaintext_to_tls(&self) -> bool {
        matches!(self, ClientError::Http2 { .. } | ClientError::Timeout(_))
    }
}

/// The TLS error inside an I/O error from tokio-rustls, if that is what it is.
pub(super) fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A failed handshake in words, with what to do about it. rustls's own messages print its
/// enums with Debug, which an operator cannot act on.
pub(super) fn describe_tls(
    error: &std::io::Error,
    name: &ServerName<'_>,
    ca_file: Option<&Path>,
) -> String {
    use rustls::CertificateError as Cert;
    let Some(tls) = rustls_error(error) else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "the server closed the connection during the handshake: check that the port \
                 serves TLS, and the server's log for why it refused this client"
                    .into()
            }
            _ => error.to_string(),
        };
    };
    let untrusted = match ca_file {
        Some(ca) => format!(
            "the server's certificate is not issued by a CA in {} (unknown issuer): pass the \
             CA that issued it with --ca",
            ca.display()
        ),
        None => "the server's certificate is not trusted (issued by an unknown CA): pass --ca \
                 FILE with the CA that issued it, or use a certificate from a public CA"
            .into(),
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => untrusted,
            Cert::NotValidForNameContext { presented, .. } => {
                let names: Vec<String> = presented.iter().filter_map(|n| host_name(n)).collect();
                if names.is_empty() {
                    format!(
                        "the server's certificate is not valid for {}: it names no host (no DNS \
                         or IP subjectAltName); issue one that names the endpoint's host",
                        name.to_str()
                    )
                } else {
                    format!(
                        "the server's certificate is not valid for {}: its names are {}; use \
                         one of them in the endpoint, or add {} to the certificate",
                        name.to_str(),
                        names.join(", "),
                        name.to_str()
                    )
                }
            }
            Cert::NotValidForName => format!(
                "the server's certificate is not valid for {}: use a name it holds in the \
                 endpoint, or add this one to the certificate",
                name.to_str()
            ),
            Cert::ExpiredContext { not_after, .. } => format!(
                "the server's certificate expired on {}: renew it",
                utc(not_after.as_secs())
            ),
            Cert::Expired => "the server's certificate has expired: renew it".into(),
            Cert::NotValidYetContext { not_before, .. } => format!(
                "the server's certificate is not valid before {}: check the clocks of this \
                 machine and of the issuer",
                utc(not_before.as_secs())
            ),
            Cert::NotValidYet => "the server's certificate is not valid yet: check the clocks \
                                  of this machine and of the issuer"
                .into(),
            Cert::Revoked => {
                "the server's certificate is revoked: give the server a new one".into()
            }
            Cert::BadSignature => "a signature in the server's certificate chain does not \
                                   verify: the server sends a broken chain, or someone is in \
                                   the middle"
                .into(),
            Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. } => {
                "the server's certificate is not for TLS servers (its extended key usage lacks \
                 serverAuth): issue one for server authentication"
                    .into()
            }
            Cert::UnsupportedSignatureAlgorithmContext { .. }
            | Cert::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                "the server's certificate chain uses a signature algorithm this client does not \
                 accept: use ECDSA (P-256, P-384), RSA (2048+) or Ed25519"
                    .into()
            }
            _ => format!(
                "the server's certificate chain does not verify against the trusted CAs: check \
                 that the server sends its full chain; {}",
                if ca_file.is_some() {
                    "and that --ca holds the CA that issued it"
                } else {
                    "pass --ca FILE with the CA that issued it if it is private"
                }
            ),
        },
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as Alert;
            let hint = match alert {
                Alert::HandshakeFailure | Alert::ProtocolVersion | Alert::InsufficientSecurity => {
                    ": it may not support TLS 1.3 or the key exchange chosen with --kx (try --kx x25519)"
                }
                Alert::NoApplicationProtocol => {
                    ": it does not offer HTTP/2 (ALPN h2), which gRPC needs; is this a KMS port?"
                }
                Alert::UnrecognisedName => {
                    ": it does not serve this host name; check the endpoint's host"
                }
                _ => "; its log may say why",
            };
            format!(
                "the server refused the handshake ({} alert){hint}",
                words(&format!("{alert:?}"))
            )
        }
        rustls::Error::PeerIncompatible(_) => {
            "the server and this client have no TLS 1.3 parameters in common: the server may not \
             support TLS 1.3 or the key exchange chosen with --kx (try --kx x25519)"
                .into()
        }
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => {
            "the server did not answer with TLS: if it serves plaintext gRPC, use grpc:// in the \
             endpoint"
                .into()
        }
        rustls::Error::NoCertificatesPresented => {
            "the server sent no certificate: configure one on the server".into()
        }
        other => format!(
            "{}: check the server's TLS setup and its log",
            words(&format!("{other:?}"))
        ),
    }
}

/// A host name from webpki's Debug text of a subjectAltName entry (`DnsName("a.example")`,
/// `IpAddress(10.0.0.1)`), which is all rustls gives; `None` for entries that name no host.
fn host_name(presented: &str) -> Option<String> {
    if let Some(dns) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
    {
        return Some(dns.to_string());
    }
    let ip = presented
        .strip_prefix("IpAddress(")
        .and_then(|rest| rest.strip_suffix(')'))?;
    // Reparsed so that IPv6 reads as usual (webpki writes `0::1`).
    Some(
        ip.parse::<IpAddr>()
            .map_or_else(|_| ip.to_string(), |ip| ip.to_string()),
    )
}

/// A gRPC status code as the gRPC specification writes it, e.g. `INVALID_ARGUMENT`.
fn code_name(code: tonic::Code) -> String {
    words(&format!("{code:?}")).to_uppercase().replace(' ', "_")
}

/// `PeerMisbehaved(IllegalMiddleboxChangeCipherSpec)` as "peer misbehaved: illegal middlebox
/// change cipher spec", for errors with no better sentence.
fn words(debug: &str) -> String {
    let mut parts = Vec::new();
    for token in debug.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !token.starts_with(|c: char| c.is_ascii_uppercase()) {
            continue;
        }
        let mut part = String::new();
        for c in token.chars() {
            if c.is_ascii_uppercase() && !part.is_empty() {
                part.push(' ');
            }
            part.push(c.to_ascii_lowercase());
        }
        parts.push(part);
    }
    if parts.is_empty() {
        "TLS error".into()
    } else {
        parts.join(": ")
    }
}

fn utc(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{seconds} s after 1970"))
}

/// A failed connect in words, with the likely fix.
pub(super) fn describe_connect(error: &std::io::Error, source_ip: Option<IpAddr>) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused: check that the server runs and that the endpoint's port is the \
             one it listens on"
                .into()
        }
        std::io::ErrorKind::AddrNotAvailable if source_ip.is_some() => {
            format!(
                "{}: --source-ip must be an address of this machine",
                crate::os_error::plain(error)
            )
        }
        _ => crate::os_error::plain(error),
    }
}

/// hyper's message and the HTTP/2 reason under it (hyper alone says only "http2 error").
pub(super) fn describe_hyper(error: &hyper::Error) -> String {
    use std::error::Error;
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}
