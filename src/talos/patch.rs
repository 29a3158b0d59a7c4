//! `talos patch`: the machine-config documents a node needs to use this server, ready for
//! `talosctl patch mc --patch @FILE`: a `VolumeConfig` or `UserVolumeConfig` per volume with
//! a `kms` key (and a second key in another slot, as the seed guide shows), and a
//! `TrustedRootsConfig` when the server's chain does not lead to a public root.

use super::probe;
use crate::client::Endpoint;
use crate::tls::inspect::CertificateFacts;
use base64::Engine;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use std::net::IpAddr;

/// A volume the patch encrypts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchVolume {
    State,
    Ephemeral,
    /// A `UserVolumeConfig` by name.
    User(String),
}

/// The second key, in another slot, that opens the volume while the KMS is out of reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Tpm,
    NodeId,
    Static,
}

pub struct PatchOptions {
    pub endpoint: Endpoint,
    pub volumes: Vec<PatchVolume>,
    pub slot: u8,
    pub fallback: Option<Fallback>,
    pub fallback_slot: u8,
    /// PEM of the CA nodes must trust: set when the chain does not lead to a public root.
    pub private_ca: Option<String>,
    /// How to get a patch for real nodes when the endpoint is loopback, e.g. "rerun with
    /// `--listen ADDR --name HOST`".
    pub loopback_hint: String,
}

/// Documents and the notes that go with them (YAML comments above the documents).
#[derive(Serialize)]
pub struct Patch {
    pub endpoint: String,
    pub notes: Vec<String>,
    pub documents: Vec<Document>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Document {
    TrustedRoots(TrustedRootsConfig),
    Volume(VolumeDocument),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustedRootsConfig {
    api_version: &'static str,
    kind: &'static str,
    name: &'static str,
    certificates: serde_saphyr::LitString,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeDocument {
    api_version: &'static str,
    kind: &'static str,
    name: String,
    encryption: EncryptionSpec,
}

#[derive(Serialize)]
pub struct EncryptionSpec {
    provider: &'static str,
    keys: Vec<KeySpec>,
}

#[derive(Serialize)]
pub struct KeySpec {
    #[serde(flatten)]
    kind: KeyKind,
    slot: u8,
    #[serde(rename = "lockToSTATE", skip_serializing_if = "std::ops::Not::not")]
    lock_to_state: bool,
}

#[derive(Serialize)]
pub enum KeyKind {
    #[serde(rename = "kms")]
    Kms { endpoint: String },
    #[serde(rename = "tpm")]
    Tpm {},
    #[serde(rename = "nodeID")]
    NodeId {},
    #[serde(rename = "static")]
    Static { passphrase: String },
}

/// The documents for `options`, or why they would not work.
pub fn build(options: &PatchOptions) -> Result<Patch, String> {
    let endpoint = &options.endpoint;
    if !endpoint.tls {
        return Err(format!(
            "{endpoint} is plaintext gRPC, and this server speaks TLS only: give \
             --endpoint https://HOST:PORT"
        ));
    }
    for (slot, what) in [
        (options.slot, "--slot"),
        (options.fallback_slot, "--fallback-slot"),
    ] {
        if slot > 31 {
            return Err(format!("{what} {slot}: LUKS2 has slots 0 to 31"));
        }
    }
    if options.fallback.is_some() && options.fallback_slot == options.slot {
        return Err(format!(
            "--fallback-slot {} is the KMS key's slot too: give each key its own slot",
            options.slot
        ));
    }
    if options.volumes.is_empty() {
        return Err(
            "no volume: give --volume STATE, --volume EPHEMERAL or --user-volume NAME".into(),
        );
    }
    let state = options.volumes.contains(&PatchVolume::State);
    if state && options.private_ca.is_some() {
        return Err(format!(
            "STATE cannot use {endpoint}: its certificate does not chain to a public root, and \
             before STATE is open a node trusts only public roots (a TrustedRootsConfig is \
             stored inside STATE). Give the server a certificate from a public CA, or leave \
             STATE out (--volume EPHEMERAL, --user-volume NAME)"
        ));
    }
    if state && options.fallback == Some(Fallback::Static) {
        return Err(
            "--fallback static cannot serve STATE: Talos keeps STATE's keys in clear in the META \
             partition. Use --fallback tpm or --fallback nodeID, or leave STATE out"
                .into(),
        );
    }
    for volume in &options.volumes {
        if let PatchVolume::User(name) = volume
            && !valid_user_volume_name(name)
        {
            return Err(format!(
                "--user-volume {name:?}: Talos takes 1 to 34 ASCII letters, digits and hyphens"
            ));
        }
    }

    let mut notes = Vec::new();
    if is_loopback(&endpoint.host) {
        notes.push(format!(
            "NOTE: {endpoint} is loopback: a node given this patch would call ITSELF, not this \
             server. For real nodes, {}.",
            options.loopback_hint
        ));
    }
    let mut documents = Vec::new();
    if let Some(ca) = &options.private_ca {
        notes.push(
            "WARNING: the server's certificate does not chain to a public root, so nodes trust \
             its CA through the TrustedRootsConfig below. Talos stores that document in STATE: \
             it serves EPHEMERAL and user volumes, and it CANNOT UNLOCK STATE. A KMS key on \
             STATE needs a certificate from a public CA."
                .into(),
        );
        documents.push(Document::TrustedRoots(TrustedRootsConfig {
            api_version: "v1alpha1",
            kind: "TrustedRootsConfig",
            name: "talos-kms-server-ca",
            certificates: serde_saphyr::LitString(ca.trim_end().to_string() + "\n"),
        }));
    }
    match options.fallback {
        None => notes.push(
            "No second key: while this KMS is out of reach (a power cut, DNS, a firewall) the \
             nodes cannot open these volumes and wait. Add one with --fallback tpm|nodeID|static."
                .into(),
        ),
        Some(Fallback::Tpm) => notes.push(format!(
            "The `tpm` key in slot {} needs SecureBoot and a TPM 2.0; Talos enrols it after the \
             first boot.",
            options.fallback_slot
        )),
        Some(Fallback::NodeId) => notes.push(format!(
            "The `nodeID` key in slot {} is derived from the node's UUID: it protects a drive \
             taken away from the machine, not against someone holding the machine.",
            options.fallback_slot
        )),
        Some(Fallback::Static) => notes.push(format!(
            "The `static` keys in slot {} hold random passphrases written below: keep this \
             patch as secret as the machine config. They are locked to STATE (lockToSTATE).",
            options.fallback_slot
        )),
    }
    for volume in &options.volumes {
        let mut keys = vec![KeySpec {
            kind: KeyKind::Kms {
                endpoint: endpoint.to_string(),
            },
            slot: options.slot,
            lock_to_state: false,
        }];
        if let Some(fallback) = options.fallback {
            let (kind, lock_to_state) = match fallback {
                Fallback::Tpm => (KeyKind::Tpm {}, false),
                Fallback::NodeId => (KeyKind::NodeId {}, false),
                Fallback::Static => (
                    KeyKind::Static {
                        passphrase: base64::engine::general_purpose::STANDARD
                            .encode(crate::client::random_passphrase()),
                    },
                    true,
                ),
            };
            keys.push(KeySpec {
                kind,
                slot: options.fallback_slot,
                lock_to_state,
            });
        }
        keys.sort_by_key(|key| key.slot);
        let (kind, name) = match volume {
            PatchVolume::State => ("VolumeConfig", "STATE".to_string()),
            PatchVolume::Ephemeral => ("VolumeConfig", "EPHEMERAL".to_string()),
            PatchVolume::User(name) => ("UserVolumeConfig", name.clone()),
        };
        if documents
            .iter()
            .any(|d| matches!(d, Document::Volume(v) if v.name == name && v.kind == kind))
        {
            continue;
        }
        documents.push(Document::Volume(VolumeDocument {
            api_version: "v1alpha1",
            kind,
            name,
            encryption: EncryptionSpec {
                provider: "luks2",
                keys,
            },
        }));
    }
    Ok(Patch {
        endpoint: endpoint.to_string(),
        notes,
        documents,
    })
}

impl Patch {
    /// The notes as YAML comments, then each document after `---`.
    pub fn yaml(&self) -> Result<String, String> {
        let mut text = String::new();
        for note in &self.notes {
            for line in wrap(note, 92) {
                text.push_str("# ");
                text.push_str(&line);
                text.push('\n');
            }
        }
        for document in &self.documents {
            text.push_str("---\n");
            // Lists indented under their key, as the Talos documentation writes them.
            let options = serde_saphyr::ser_options! { compact_list_indent: false };
            text.push_str(
                &serde_saphyr::to_string_with_options(document, options)
                    .map_err(|e| format!("cannot write the patch as YAML: {e}"))?,
            );
        }
        Ok(text)
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

fn valid_user_volume_name(name: &str) -> bool {
    (1..=34).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Whether nodes would reach themselves at `host`.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The endpoint and CA nodes need for a server with this certificate chain (PEM, as in
/// `serverCertFile`) listening on `port`.
pub struct ServerTrust {
    pub endpoint: Endpoint,
    /// The top certificate of the chain, when the chain does not lead to a public root.
    pub private_ca: Option<String>,
}

impl ServerTrust {
    /// `endpoint` overrides the one made from the certificate's first name and `port`.
    pub fn from_chain(
        chain_pem: &str,
        port: u16,
        endpoint: Option<Endpoint>,
    ) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
        let leaf = chain
            .first()
            .ok_or("the certificate file holds no CERTIFICATE block")?;
        let facts = CertificateFacts::read(leaf)?;
        // Its first usable name: what nodes connect to and what the chain is judged under.
        let name = facts
            .dns_names
            .iter()
            .find(|dns| !dns.starts_with('*'))
            .cloned()
            .or_else(|| facts.ip_addresses.first().map(IpAddr::to_string));
        let endpoint = match endpoint {
            Some(endpoint) => endpoint,
            None => {
                let host = name.clone().ok_or_else(|| {
                    format!(
                        "the certificate names no host nodes can use ({}): give --endpoint \
                         https://HOST:PORT",
                        facts.names_text()
                    )
                })?;
                Endpoint {
                    host,
                    port,
                    tls: true,
                }
            }
        };
        let judged_as = if facts.covers(&endpoint.host) {
            Some(endpoint.host.clone())
        } else {
            name
        };
        let private_ca = match judged_as {
            None => None,
            Some(host) => match probe::verify(&chain, &host, &probe::public_roots()) {
                Ok(()) => None,
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                    pem_blocks(chain_pem).pop()
                }
                Err(error) => {
                    return Err(format!(
                        "the certificate fails verification: {error}; `talos-kms-server check` \
                         says more"
                    ));
                }
            },
        };
        Ok(Self {
            endpoint,
            private_ca,
        })
    }
}

/// The CERTIFICATE blocks of a PEM text, each as written.
pub fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(length) = rest[start..].find(END) else {
            break;
        };
        let end = start + length + END.len();
        blocks.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "kms.localhost",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.5", "kms.example.com", "::2"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
