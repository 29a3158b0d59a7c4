//! Talos machine configs as `talosctl gen config` writes them and as patches carry them: the
//! documents that encrypt volumes, the keys they list, and the extra roots nodes trust.
//!
//! Two forms name a volume's encryption: since Talos 1.11 a `VolumeConfig` (STATE,
//! EPHEMERAL) or `UserVolumeConfig` document with an `encryption` block; up to Talos 1.10 the
//! v1alpha1 document's `machine.systemDiskEncryption.state` / `.ephemeral`. Both hold the
//! same `provider` and `keys` list.

use serde_json::Value;
use std::fmt;

/// Slot numbers LUKS2 has.
pub const SLOTS: std::ops::RangeInclusive<i64> = 0..=31;

/// Key kinds Talos knows, as written in a key entry.
pub const KEY_KINDS: [&str; 4] = ["kms", "tpm", "nodeID", "static"];

/// Fields of a key entry beside its kind.
const KEY_FIELDS: [&str; 2] = ["slot", "lockToSTATE"];

/// Document kinds of Talos's multi-document config that carry no KMS setting: skipped
/// silently. Any other kind is skipped with a note, in case it is a misspelling.
const OTHER_KINDS: &[&str] = &[
    "ExistingVolumeConfig",
    "SwapVolumeConfig",
    "ZswapConfig",
    "KmsgLogConfig",
    "EventSinkConfig",
    "WatchdogTimerConfig",
    "NetworkDefaultActionConfig",
    "NetworkRuleConfig",
    "SideroLinkConfig",
    "EthernetConfig",
    "HostnameConfig",
    "StaticHostConfig",
    "ResolverConfig",
    "TimeSyncConfig",
    "KubeSpanEndpointsConfig",
    "Layer2VIPConfig",
    "HCloudVIPConfig",
    "LinkConfig",
    "BondConfig",
    "BridgeConfig",
    "VLANConfig",
    "DummyLinkConfig",
    "LinkAliasConfig",
    "DHCPv4Config",
    "DHCPv6Config",
    "RouteConfig",
    "RuleConfig",
    "WireguardConfig",
    "UserNamespaceConfig",
    "ImageVerificationConfig",
    "OOMConfig",
    "PCIDriverRebindConfig",
    "EnvironmentConfig",
    "ProbeConfig",
];

/// One YAML document of a machine-config file.
pub struct Document {
    /// 1 for the first non-empty document of the file.
    pub number: usize,
    pub value: Value,
}

/// What a document is, as far as KMS settings go.
pub enum DocumentKind<'a> {
    /// The v1alpha1 document (`version: v1alpha1`, `machine:`, `cluster:`).
    Main,
    VolumeConfig,
    /// `UserVolumeConfig` or `RawVolumeConfig`: a volume of the operator's, by name.
    UserVolume,
    TrustedRoots,
    /// A kind with nothing to lint.
    Other,
    Unknown(&'a str),
    /// Not a mapping: a JSON 6902 patch (a list of operations) or a stray scalar.
    NotMapping,
}

impl Document {
    pub fn kind(&self) -> DocumentKind<'_> {
        let Some(map) = self.value.as_object() else {
            return DocumentKind::NotMapping;
        };
        match map.get("kind").and_then(Value::as_str) {
            None if map.contains_key("machine") || map.contains_key("version") => {
                DocumentKind::Main
            }
            None => DocumentKind::Unknown(""),
            Some("VolumeConfig") => DocumentKind::VolumeConfig,
            Some("UserVolumeConfig" | "RawVolumeConfig") => DocumentKind::UserVolume,
            Some("TrustedRootsConfig") => DocumentKind::TrustedRoots,
            Some(kind) if OTHER_KINDS.contains(&kind) => DocumentKind::Other,
            Some(kind) => DocumentKind::Unknown(kind),
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.value.get("name").and_then(Value::as_str)
    }

    /// "document 2 (VolumeConfig STATE)", for messages.
    pub fn label(&self) -> String {
        let kind = self.value.get("kind").and_then(Value::as_str);
        match (kind, self.name(), self.kind()) {
            (_, _, DocumentKind::Main) => format!("document {} (v1alpha1)", self.number),
            (Some(kind), Some(name), _) => format!("document {} ({kind} {name})", self.number),
            (Some(kind), None, _) => format!("document {} ({kind})", self.number),
            _ => format!("document {}", self.number),
        }
    }
}

/// Splits a file's text into its documents. Empty documents (a leading `---`) are skipped.
pub fn parse(text: &str) -> Result<Vec<Document>, String> {
    let values: Vec<Value> = serde_saphyr::from_str_multiple(text).map_err(|error| {
        // The parser's advice is for programs that embed it, not for the config's author.
        error
            .without_snippet()
            .to_string()
            .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
    })?;
    Ok(values
        .into_iter()
        .filter(|value| !value.is_null())
        .enumerate()
        .map(|(index, value)| Document {
            number: index + 1,
            value,
        })
        .collect())
}

/// A volume Talos encrypts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Volume {
    /// STATE, EPHEMERAL or another system volume, by its label.
    System(String),
    /// A `UserVolumeConfig` (or `RawVolumeConfig`) by name.
    User(String),
}

impl Volume {
    pub fn is_state(&self) -> bool {
        matches!(self, Volume::System(name) if name == "STATE")
    }
}

impl fmt::Display for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Volume::System(name) => f.write_str(name),
            Volume::User(name) => write!(f, "user volume {name}"),
        }
    }
}

/// Where one volume's encryption is configured.
pub struct Encryption<'a> {
    pub volume: Volume,
    pub document: &'a Document,
    /// Key path of the block: `encryption` or `machine.systemDiskEncryption.state`.
    pub path: String,
    pub block: &'a Value,
}

impl Encryption<'_> {
    /// The `keys` list, each with its key path; `None` when it is missing or not a list.
    pub fn keys(&self) -> Option<Vec<Key<'_>>> {
        let keys = self.block.get("keys")?.as_array()?;
        Some(
            keys.iter()
                .enumerate()
                .map(|(index, value)| Key {
                    path: format!("{}.keys[{index}]", self.path),
                    value,
                })
                .collect(),
        )
    }
}

/// One entry of a `keys` list.
pub struct Key<'a> {
    pub path: String,
    pub value: &'a Value,
}

/// What a key entry's fields say its kind is.
pub enum KeyKind<'a> {
    /// Exactly one known kind.
    Known(&'a str),
    /// No kind at all.
    Missing,
    /// Fields that are neither a kind nor `slot`/`lockToSTATE`.
    Unknown(Vec<&'a str>),
    /// More than one known kind in one entry.
    Several(Vec<&'a str>),
}

impl<'a> Key<'a> {
    pub fn kind(&self) -> KeyKind<'a> {
        let Some(map) = self.value.as_object() else {
            return KeyKind::Missing;
        };
        let unknown: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|field| !KEY_KINDS.contains(field) && !KEY_FIELDS.contains(field))
            .collect();
        if !unknown.is_empty() {
            return KeyKind::Unknown(unknown);
        }
        let kinds: Vec<&str> = KEY_KINDS
            .into_iter()
            .filter(|kind| map.contains_key(*kind))
            .collect();
        match kinds[..] {
            [] => KeyKind::Missing,
            [kind] => KeyKind::Known(kind),
            _ => KeyKind::Several(kinds),
        }
    }

    pub fn slot(&self) -> Option<&'a Value> {
        self.value.get("slot")
    }

    /// The `kms.endpoint` text, when the entry is a KMS key that has one.
    pub fn kms_endpoint(&self) -> Option<&'a str> {
        self.value.get("kms")?.get("endpoint")?.as_str()
    }
}

/// Every encryption block of a file's documents, in both forms.
pub fn encryptions(documents: &[Document]) -> Vec<Encryption<'_>> {
    let mut found = Vec::new();
    for document in documents {
        match document.kind() {
            DocumentKind::VolumeConfig | DocumentKind::UserVolume => {
                let (Some(block), Some(name)) = (document.value.get("encryption"), document.name())
                else {
                    continue;
                };
                let volume = match document.kind() {
                    DocumentKind::VolumeConfig => Volume::System(name.to_string()),
                    _ => Volume::User(name.to_string()),
                };
                found.push(Encryption {
                    volume,
                    document,
                    path: "encryption".into(),
                    block,
                });
            }
            DocumentKind::Main => {
                let Some(legacy) = document
                    .value
                    .pointer("/machine/systemDiskEncryption")
                    .and_then(Value::as_object)
                else {
                    continue;
                };
                for (field, label) in [("state", "STATE"), ("ephemeral", "EPHEMERAL")] {
                    if let Some(block) = legacy.get(field) {
                        found.push(Encryption {
                            volume: Volume::System(label.into()),
                            document,
                            path: format!("machine.systemDiskEncryption.{field}"),
                            block,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// The `certificates` PEM text of every TrustedRootsConfig.
pub fn trusted_roots(documents: &[Document]) -> Vec<(&Document, &str)> {
    documents
        .iter()
        .filter(|document| matches!(document.kind(), DocumentKind::TrustedRoots))
        .filter_map(|document| {
            let pem = document.value.get("certificates")?.as_str()?;
            Some((document, pem))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_of_encryption_are_found_with_their_key_paths() {
        let text = "---\nversion: v1alpha1\nmachine:\n  systemDiskEncryption:\n    state:\n      \
                    provider: luks2\n      keys:\n        - nodeID: {}\n          slot: 0\n\
                    ---\napiVersion: v1alpha1\nkind: UserVolumeConfig\nname: data\nencryption:\n  \
                    keys:\n    - kms:\n        endpoint: https://kms.example.com\n      slot: 1\n";
        let documents = parse(text).unwrap();
        assert_eq!(
            documents.len(),
            2,
            "the empty document before the first --- is skipped"
        );
        let found = encryptions(&documents);
        assert_eq!(found.len(), 2);
        assert!(found[0].volume.is_state());
        assert_eq!(
            found[0].keys().unwrap()[0].path,
            "machine.systemDiskEncryption.state.keys[0]"
        );
        assert_eq!(found[1].volume, Volume::User("data".into()));
        let keys = found[1].keys().unwrap();
        assert!(matches!(keys[0].kind(), KeyKind::Known("kms")));
        assert_eq!(keys[0].kms_endpoint(), Some("https://kms.example.com"));
        assert_eq!(documents[1].label(), "document 2 (UserVolumeConfig data)");
    }
}
