//! TLS to PostgreSQL, as libpq's `sslmode` means it: where a security reviewer looks for the
//! modes that skip checks. `disable`, `prefer` and `require` (without `sslrootcert`) take any
//! certificate ([`AnyCertificate`]); `verify-ca` takes one a trusted CA signed, whatever its
//! names ([`AnyName`]); `verify-full` checks both, as any TLS client does.

use super::PgOptions;
use crate::store::StoreError;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use std::sync::Arc;

fn webpki(
    roots: rustls::RootCertStore,
    provider: &Arc<CryptoProvider>,
    options: &PgOptions,
) -> Result<Arc<dyn ServerCertVerifier>, StoreError> {
    let verifier: Arc<dyn ServerCertVerifier> =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map_err(|e| options.error(format!("TLS setup: {e}")))?;
    Ok(verifier)
}

/// `prefer` and `require` without `sslrootcert`: encryption without authentication, as
/// libpq does; the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: a trusted chain, whatever names the certificate has.
#[derive(Debug)]
struct AnyName(pub Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// How a connection to PostgreSQL is protected, with libpq's names and meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without checking its certificate (libpq's default).
    Prefer,
    /// TLS, without checking the certificate (unless `sslrootcert` is set: then as
    /// `verify-ca`, as libpq does).
    Require,
    /// TLS with a certificate signed by a trusted CA, whatever its names.
    VerifyCa,
    /// TLS with a certificate signed by a trusted CA that names the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub(super) fn parse(text: &str) -> Option<SslMode> {
        [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .find(|mode| mode.as_str() == text)
    }
}

impl PgOptions {
    /// The TLS setup `sslmode` and `sslrootcert` ask for, with the server's own crypto
    /// provider (aws-lc-rs).
    pub fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        let provider = crate::tls::provider();
        let roots = || -> Result<rustls::RootCertStore, StoreError> {
            let mut roots = rustls::RootCertStore::empty();
            match &self.root_cert {
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                Some(file) => {
                    use rustls::pki_types::pem::PemObject;
                    let unreadable = |problem: String| {
                        self.error(format!(
                            "sslrootcert {}: {problem}; it must hold the PEM certificate of the \
                             CA that signed PostgreSQL's certificate",
                            file.display()
                        ))
                    };
                    let certs = rustls::pki_types::CertificateDer::pem_file_iter(file)
                        .map_err(|e| unreadable(e.to_string()))?;
                    for cert in certs {
                        let cert = cert.map_err(|e| unreadable(e.to_string()))?;
                        roots
                            .add(cert)
                            .map_err(|e| unreadable(format!("unusable certificate: {e}")))?;
                    }
                    if roots.is_empty() {
                        return Err(unreadable("holds no certificate".into()));
                    }
                }
            }
            Ok(roots)
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| self.error(format!("TLS setup: {e}")))?;
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match self.sslmode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require if self.root_cert.is_none() => {
                Arc::new(AnyCertificate(Arc::clone(&provider)))
            }
            SslMode::VerifyFull => webpki(roots()?, &provider, self)?,
            _ => Arc::new(AnyName(webpki(roots()?, &provider, self)?)),
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}
