//! A throwaway CA and server certificate, for the demo and the tests. Never for production:
//! the CA key lives only in memory and is gone when the process exits.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

pub struct ThrowawayPki {
    pub ca_pem: String,
    /// Server certificate followed by the CA, as `serverCertFile` expects.
    pub chain_pem: String,
    /// PKCS#8 PEM of the server key.
    pub key_pem: String,
}

/// A fresh ECDSA P-256 CA and a server certificate valid for `names` (DNS names or IP
/// addresses) and signed by it.
pub fn generate(names: &[String]) -> Result<ThrowawayPki, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "talos-kms-server throwaway CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut server_params = CertificateParams::new(names.to_vec())?;
    server_params.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("localhost", String::as_str),
    );
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &ca)?;

    Ok(ThrowawayPki {
        ca_pem: ca.pem(),
        chain_pem: format!("{}{}", server.pem(), ca.pem()),
        key_pem: server_key.serialize_pem(),
    })
}
