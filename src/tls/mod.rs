//! TLS for both ends: the server's configuration (TLS 1.3 only, ALPN `h2`), loading the
//! operator's certificate and key, and throwaway certificates for the demo and tests.
//!
//! One crypto provider, aws-lc-rs, serves TLS and the sealing AEAD: it is audited (FIPS
//! 140-3 validated in its FIPS build), fast on x86-64 and arm64, and it implements the
//! post-quantum hybrid group X25519MLKEM768 that Go 1.24+ clients (recent Talos) offer first.

mod identity;
pub mod inspect;
pub mod reload;
pub mod throwaway;

pub use identity::{IdentityError, load_identity};

use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use std::sync::Arc;

/// ALPN protocol of gRPC; grpc-go refuses a TLS server that does not negotiate it.
pub const ALPN_H2: &[u8] = b"h2";

/// aws-lc-rs with its TLS 1.3 suites, key exchange preferring X25519MLKEM768, then X25519
/// for older clients, then the NIST curves.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    Arc::new(CryptoProvider {
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// The server's TLS configuration. Talos opens a fresh connection per call and never
/// resumes, so session tickets and a session cache would only cost CPU per handshake.
pub fn server_config(
    identity: Arc<CertifiedKey>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    server_config_with(Arc::new(SingleCertAndKey::from(identity)))
}

/// [`server_config`] with the pair chosen per handshake, e.g. a [`reload::ReloadingIdentity`].
pub fn server_config_with(
    identity: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}
