//! The certificate and key as nodes will meet them: dates, names, CA flag, and whether the
//! chain leads to a public root (which unlocking STATE needs).

use super::host::readable_by_others;
use super::{CheckOptions, Level, Report};
use crate::config::Config;
use crate::tls::inspect::{CertificateFacts, RENEWAL_WARNING, Validity};
use crate::tls::{self, provider};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// How a proper server certificate is made when all that is at hand is openssl.
const LEAF_COMMAND: &str = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
     -nodes -days 365 -keyout server.key -out server.crt -subj /CN=kms.example.com -addext \
     subjectAltName=DNS:kms.example.com -addext basicConstraints=critical,CA:FALSE -addext \
     extendedKeyUsage=serverAuth";

pub async fn check(report: &mut Report, config: &Config, options: &CheckOptions) {
    let identity = match tls::load_identity(
        &config.server_cert_file,
        &config.server_key_file,
        config.server_key_password.as_deref(),
    ) {
        Ok(identity) => identity,
        Err(error) => {
            report.add("certificate", Level::Problem, error.to_string());
            return;
        }
    };
    report.add(
        "key",
        Level::Ok,
        format!(
            "{}: matches the certificate",
            config.server_key_file.display()
        ),
    );
    readable_by_others(report, "key", &config.server_key_file);

    for (index, der) in identity.cert.iter().enumerate() {
        let topic = if index == 0 { "certificate" } else { "  chain" };
        match CertificateFacts::read(der) {
            Ok(facts) => dates(report, topic, &facts),
            Err(problem) => report.add(topic, Level::Problem, format!("#{index}: {problem}")),
        }
    }
    if let Ok(leaf) = CertificateFacts::read(&identity.cert[0]) {
        names(report, &leaf, config, options).await;
        if leaf.is_ca {
            report.add(
                "certificate",
                Level::Warning,
                format!(
                    "is a CA certificate (basicConstraints CA:TRUE, what `openssl req -x509` \
                     makes by default) used as the server's own: rustls-based clients, \
                     `talos-kms-server client` and `bench` among them, refuse it \
                     (CaUsedAsEndEntity), while Talos's Go client may accept it. Make a \
                     server certificate, e.g. `{LEAF_COMMAND}`"
                ),
            );
        }
        public_root(report, &leaf, &identity.cert);
    }
    if let Err(error) = tls::server_config(identity) {
        report.add(
            "tls",
            Level::Problem,
            format!("cannot build the TLS configuration: {error}"),
        );
    }
}

fn dates(report: &mut Report, topic: &'static str, facts: &CertificateFacts) {
    let who = format!("{} (issued by {})", facts.subject, facts.issuer);
    match facts.validity() {
        Validity::NotYetValid => report.add(
            topic,
            Level::Problem,
            format!(
                "{who}: NOT VALID YET, only from {}: nodes refuse it until then; if that time \
                 has passed, this host's clock is wrong (see `timedatectl`)",
                facts.not_before_text()
            ),
        ),
        Validity::Expired => report.add(
            topic,
            Level::Problem,
            format!(
                "{who}: EXPIRED on {}: nodes refuse it; renew it",
                facts.not_after_text()
            ),
        ),
        Validity::Valid if facts.expires_within(RENEWAL_WARNING) => report.add(
            topic,
            Level::Warning,
            format!(
                "{who}: renew soon, {} days left (expires {})",
                facts.days_left(),
                facts.not_after_text()
            ),
        ),
        Validity::Valid => report.add(
            topic,
            Level::Ok,
            format!("{who}: valid, {} days left", facts.days_left()),
        ),
    }
}

async fn names(
    report: &mut Report,
    leaf: &CertificateFacts,
    config: &Config,
    options: &CheckOptions,
) {
    let names = leaf.names_text();
    if leaf.dns_names.is_empty() && leaf.ip_addresses.is_empty() {
        report.add(
            "certificate",
            Level::Problem,
            "has no subjectAltName: Talos's Go client and rustls clients ignore the subject's \
             CN and refuse it; reissue it with the name nodes use in their endpoint",
        );
        return;
    }
    if let Some(host) = &options.endpoint_host {
        if leaf.covers(host) {
            report.add(
                "certificate",
                Level::Ok,
                format!("names {names}: cover {host}"),
            );
        } else {
            report.add(
                "certificate",
                Level::Warning,
                format!(
                    "names {names}, not {host}: nodes whose endpoint is https://{host} refuse \
                     it; use one of these names in the endpoint, or a certificate for {host}"
                ),
            );
        }
        return;
    }
    let bind = config.listen.ip();
    if bind.is_unspecified() {
        report.add(
            "certificate",
            Level::Ok,
            format!("names {names}: nodes must use one of them in their endpoint"),
        );
    } else if leaf.covers(&bind.to_string()) || resolves_to(&leaf.dns_names, bind).await {
        report.add(
            "certificate",
            Level::Ok,
            format!("names {names}: cover bindAddress {bind}"),
        );
    } else {
        report.add(
            "certificate",
            Level::Warning,
            format!(
                "names {names}: none is {bind} (bindAddress) nor resolves to it here; nodes \
                 reaching the server by that address refuse it. Give `check --endpoint URL` \
                 the endpoint nodes use to check that name instead"
            ),
        );
    }
}

/// Whether one of the names resolves to `ip` on this host (within a few seconds).
async fn resolves_to(names: &[String], ip: IpAddr) -> bool {
    let lookups = async {
        for name in names.iter().filter(|name| !name.starts_with('*')).take(8) {
            if let Ok(mut addresses) = tokio::net::lookup_host((name.as_str(), 0)).await
                && addresses.any(|address| address.ip() == ip)
            {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(3), lookups)
        .await
        .unwrap_or(false)
}

/// Talos verifies `https://` endpoints against public roots only, and a TrustedRootsConfig
/// lives inside STATE: STATE can only be unlocked through a publicly trusted chain.
fn public_root(report: &mut Report, leaf: &CertificateFacts, chain: &[CertificateDer<'static>]) {
    let Some(name) = leaf
        .dns_names
        .first()
        .map(|dns| dns.replace('*', "kms"))
        .or_else(|| leaf.ip_addresses.first().map(IpAddr::to_string))
        .and_then(|name| ServerName::try_from(name).ok())
    else {
        return;
    };
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Ok(verifier) =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
    else {
        return;
    };
    match verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()) {
        Ok(_) => report.add(
            "certificate",
            Level::Ok,
            "chain leads to a public root CA: nodes can use it for every volume, STATE included",
        ),
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => report
            .add(
                "certificate",
                Level::Info,
                "chain does not lead to a public root CA that Talos trusts by default: nodes \
                 can use it for EPHEMERAL and user volumes with the CA in a TrustedRootsConfig, \
                 but not to unlock STATE (a TrustedRootsConfig is stored inside STATE)",
            ),
        // Dates, names and the CA flag are reported on their own.
        Err(_) => {}
    }
}
