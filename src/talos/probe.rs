//! Looking at a KMS endpoint as a Talos node meets it: the TCP port, the TLS handshake
//! (TLS 1.3, ALPN `h2`), and the certificate chain the server presents, which is judged
//! afterwards against the roots a node trusts.

use crate::client::Endpoint;
use crate::tls::{ALPN_H2, provider};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long one look at an endpoint may take: resolving, connecting and the handshake.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server showed in a completed TLS 1.3 handshake.
pub struct Observed {
    /// The server's certificate first, then the chain it sent.
    pub chain: Vec<CertificateDer<'static>>,
    /// The ALPN protocol it chose; grpc-go needs `h2`.
    pub alpn: Option<Vec<u8>>,
}

impl Observed {
    pub fn speaks_h2(&self) -> bool {
        self.alpn.as_deref() == Some(ALPN_H2)
    }
}

/// Why no handshake was observed.
#[derive(Debug)]
pub enum ProbeFailure {
    /// The host name does not resolve here.
    Resolve(String),
    /// Nothing accepted the TCP connection (closed port, filtered, unreachable).
    Connect(String),
    Timeout,
    /// TCP worked, TLS 1.3 did not.
    Tls(String),
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::Resolve(e) => write!(f, "the host name does not resolve: {e}"),
            ProbeFailure::Connect(e) => write!(f, "no TCP connection: {e}"),
            ProbeFailure::Timeout => write!(
                f,
                "no answer within {} s (filtered port, or a server that does not answer)",
                PROBE_TIMEOUT.as_secs()
            ),
            ProbeFailure::Tls(e) => write!(f, "the TLS 1.3 handshake failed: {e}"),
        }
    }
}

/// Opens a TCP connection, for plaintext endpoints.
pub async fn tcp(endpoint: &Endpoint) -> Result<(), ProbeFailure> {
    tokio::time::timeout(PROBE_TIMEOUT, connect(endpoint))
        .await
        .unwrap_or(Err(ProbeFailure::Timeout))
        .map(drop)
}

/// Completes a TLS 1.3 handshake offering `h2`, accepting any certificate so that it can be
/// judged afterwards, and closes without sending anything.
pub async fn tls(endpoint: &Endpoint) -> Result<Observed, ProbeFailure> {
    let look = async {
        let recorder = Arc::new(ChainRecorder::default());
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ProbeFailure::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(recorder.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
            ProbeFailure::Resolve(format!("{:?} is not a host name", endpoint.host))
        })?;
        let tcp = connect(endpoint).await?;
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| ProbeFailure::Tls(e.to_string()))?;
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let chain = recorder.chain.lock().map(|c| c.clone()).unwrap_or_default();
        Ok(Observed { chain, alpn })
    };
    tokio::time::timeout(PROBE_TIMEOUT, look)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout))
}

async fn connect(endpoint: &Endpoint) -> Result<TcpStream, ProbeFailure> {
    let addresses: Vec<_> = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| ProbeFailure::Resolve(e.to_string()))?
        .collect();
    let mut last = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(format!("{address}: {e}")),
        }
    }
    Err(ProbeFailure::Connect(
        last.unwrap_or_else(|| "the host name has no address".into()),
    ))
}

/// Verifies `chain` for `host` against `roots`, as a node's TLS client would.
pub fn verify(
    chain: &[CertificateDer<'static>],
    host: &str,
    roots: &RootCertStore,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|_| rustls::Error::General(format!("{host:?} is not a host name")))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots.clone()),
        provider(),
    )
    .build()
    .map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(drop)
}

/// The public roots Talos ships, as webpki-roots carries them (Mozilla's bundle, which
/// Talos's `ca-certificates.crt` is built from).
pub fn public_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// Accepts any chain (after checking the handshake signature) and keeps it for judging.
#[derive(Debug, Default)]
struct ChainRecorder {
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut chain) = self.chain.lock() {
            *chain = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|cert| cert.clone().into_owned())
                .collect();
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
