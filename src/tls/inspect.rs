//! Reading what an operator needs to know from certificates: who they name and when they
//! expire.

use rustls::pki_types::CertificateDer;
use std::time::{Duration, SystemTime};
use x509_cert::Certificate;
use x509_cert::der::Decode;

/// Warn this long before a certificate expires: two weeks leaves time to fix a renewal.
pub const RENEWAL_WARNING: Duration = Duration::from_secs(14 * 86_400);

pub struct CertificateFacts {
    pub subject: String,
    pub issuer: String,
    pub not_after: SystemTime,
}

impl CertificateFacts {
    pub fn read(der: &CertificateDer<'_>) -> Result<Self, String> {
        let cert = Certificate::from_der(der.as_ref())
            .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
        let tbs = cert.tbs_certificate();
        Ok(Self {
            subject: tbs.subject().to_string(),
            issuer: tbs.issuer().to_string(),
            not_after: tbs.validity().not_after.to_system_time(),
        })
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
}
