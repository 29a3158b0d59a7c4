//! `talos lint`: every KMS-related mistake in Talos machine configs that can be proven before
//! a node boots with them, each with its rule, where it is, why it fails at boot and the fix.
//!
//! Offline rules read the documents only. Online rules (unless `offline`) look at each KMS
//! endpoint as a node would: the port, TLS 1.3 with ALPN `h2`, the certificate's names, and
//! whether its chain leads to a public root (STATE needs one: a TrustedRootsConfig is stored
//! inside STATE, so it cannot help unlock it).

use super::machine_config::{
    self, Document, DocumentKind, Encryption, KEY_KINDS, KeyKind, SLOTS, Volume,
};
use super::probe::{self, Observed, ProbeFailure};
use crate::client::Endpoint;
use crate::tls::inspect::CertificateFacts;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Where the public roots come from, for the report.
pub const PUBLIC_ROOTS_SOURCE: &str = "webpki-roots (Mozilla's CA bundle, which the \
     ca-certificates.crt Talos ships is built from)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Note,
    Warning,
    Error,
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub severity: Severity,
    pub file: String,
    /// "document 2 (VolumeConfig STATE)"; none for a finding about the whole file.
    pub document: Option<String>,
    /// Key path inside the document, e.g. `encryption.keys[0].slot`.
    pub path: Option<String>,
    /// For reporting in the files' order: the file's place among those given, the document's
    /// number.
    #[serde(skip)]
    order: (usize, usize),
    /// What is wrong and why it fails at boot.
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Whether endpoints were looked at (not `--offline`).
    pub online: bool,
}

impl Report {
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// 0 clean (notes allowed), 2 warnings only, 1 errors.
    pub fn exit_code(&self) -> u8 {
        match self.findings.iter().map(|f| f.severity).max() {
            Some(Severity::Error) => 1,
            Some(Severity::Warning) => 2,
            _ => 0,
        }
    }
}

pub struct LintOptions {
    /// Skip every rule that needs the network.
    pub offline: bool,
    /// The roots a node trusts before STATE is open: [`probe::public_roots`].
    pub public_roots: RootCertStore,
}

impl Default for LintOptions {
    fn default() -> Self {
        Self {
            offline: false,
            public_roots: probe::public_roots(),
        }
    }
}

/// Where a finding is.
#[derive(Clone)]
struct At {
    file: String,
    document: Option<String>,
    path: Option<String>,
    document_number: usize,
}

impl At {
    fn file(file: &str) -> Self {
        Self {
            file: file.to_string(),
            document: None,
            path: None,
            document_number: 0,
        }
    }

    fn in_document(file: &str, document: &Document, path: impl Into<String>) -> Self {
        let path: String = path.into();
        Self {
            file: file.to_string(),
            document: Some(document.label()),
            path: (!path.is_empty()).then_some(path),
            document_number: document.number,
        }
    }
}

impl Report {
    fn add(
        &mut self,
        rule: &'static str,
        severity: Severity,
        at: &At,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.findings.push(Finding {
            rule,
            severity,
            file: at.file.clone(),
            document: at.document.clone(),
            path: at.path.clone(),
            problem: problem.into(),
            fix: fix.into(),
            order: (0, at.document_number),
        });
    }
}

/// A `kms` key whose endpoint is worth looking at.
struct KmsUse {
    at: At,
    volume: Volume,
    endpoint: Endpoint,
}

/// A TrustedRootsConfig and the certificates it holds.
struct TrustedRoots {
    at: At,
    roots: RootCertStore,
}

/// Lints `files` as machine configs (or patches) for the same nodes.
pub async fn lint(files: &[PathBuf], options: &LintOptions) -> Report {
    let mut report = Report {
        online: !options.offline,
        ..Report::default()
    };
    let loaded = load(&mut report, files);

    let mut uses = Vec::new();
    let mut trusted = Vec::new();
    for (file, documents) in &loaded {
        skipped_documents(&mut report, file, documents);
        let encryptions = machine_config::encryptions(documents);
        encrypted_twice(&mut report, file, &encryptions);
        for encryption in &encryptions {
            uses.extend(keys(&mut report, file, encryption));
        }
        for (document, pem) in machine_config::trusted_roots(documents) {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
            trusted.push(TrustedRoots {
                at: At::in_document(file, document, "certificates"),
                roots,
            });
        }
    }

    if options.offline {
        trusted_roots_offline(&mut report, &uses, &trusted);
    } else {
        endpoints(&mut report, &uses, &trusted, options).await;
    }
    for finding in &mut report.findings {
        finding.order.0 = files
            .iter()
            .position(|path| path.display().to_string() == finding.file)
            .unwrap_or(files.len());
    }
    report.findings.sort_by_key(|finding| finding.order);
    report
}

/// Reads and parses each file; one that cannot be read or parsed is a finding.
fn load(report: &mut Report, files: &[PathBuf]) -> Vec<(String, Vec<Document>)> {
    let mut loaded = Vec::new();
    for path in files {
        let file = path.display().to_string();
        let text = match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    report.add(
                        "file-not-yaml",
                        Severity::Error,
                        &At::file(&file),
                        "is not UTF-8 text, so not a machine config",
                        "give the YAML file `talosctl gen config` wrote, or a patch",
                    );
                    continue;
                }
            },
            Err(error) => {
                report.add(
                    "file-unreadable",
                    Severity::Error,
                    &At::file(&file),
                    format!("cannot be read: {error}"),
                    "check the path and its permissions",
                );
                continue;
            }
        };
        match machine_config::parse(&text) {
            Ok(documents) if documents.is_empty() => report.add(
                "file-not-yaml",
                Severity::Error,
                &At::file(&file),
                "holds no YAML document",
                "give the YAML file `talosctl gen config` wrote, or a patch",
            ),
            Ok(documents) => loaded.push((file, documents)),
            Err(error) => report.add(
                "file-not-yaml",
                Severity::Error,
                &At::file(&file),
                format!("is not valid YAML: {error}"),
                "fix the YAML at that line (`talosctl validate --config FILE --mode metal` \
                 shows it too)",
            ),
        }
    }
    loaded
}

fn skipped_documents(report: &mut Report, file: &str, documents: &[Document]) {
    for document in documents {
        let at = At::in_document(file, document, "");
        match document.kind() {
            DocumentKind::Unknown(kind) => report.add(
                "document-skipped",
                Severity::Note,
                &at,
                if kind.is_empty() {
                    "has neither `kind` nor `version: v1alpha1`: skipped".to_string()
                } else {
                    format!("kind {kind:?} is not one this lint knows: skipped")
                },
                "nothing, if it is meant to be there; a misspelt VolumeConfig, \
                 UserVolumeConfig or TrustedRootsConfig is not applied by Talos as intended: \
                 fix its `kind`",
            ),
            DocumentKind::NotMapping => report.add(
                "document-skipped",
                Severity::Note,
                &at,
                "is not a mapping (a JSON 6902 patch, a list of operations?): skipped",
                "lint the machine config the patch produces instead \
                 (`talosctl machineconfig patch FILE --patch @PATCH`)",
            ),
            _ => {}
        }
    }
}

fn encrypted_twice(report: &mut Report, file: &str, encryptions: &[Encryption]) {
    let mut by_volume: BTreeMap<String, Vec<&Encryption>> = BTreeMap::new();
    for encryption in encryptions {
        by_volume
            .entry(encryption.volume.to_string())
            .or_default()
            .push(encryption);
    }
    for (volume, places) in by_volume {
        if let [first, rest @ ..] = &places[..] {
            for again in rest {
                report.add(
                    "volume-encrypted-twice",
                    Severity::Error,
                    &At::in_document(file, again.document, &again.path),
                    format!(
                        "{volume} is encrypted here and in {} ({}): Talos refuses two \
                         documents of one kind and name, and of the two forms \
                         (VolumeConfig, machine.systemDiskEncryption) it applies one only, so \
                         one of these key lists is ignored",
                        first.document.label(),
                        first.path
                    ),
                    "keep one encryption block per volume (on Talos 1.11 and later, the \
                     VolumeConfig one; remove `machine.systemDiskEncryption`)",
                );
            }
        }
    }
}

/// The rules of one encryption block; returns its `kms` keys with parsable endpoints.
fn keys(report: &mut Report, file: &str, encryption: &Encryption) -> Vec<KmsUse> {
    let volume = &encryption.volume;
    let at = |path: &str| At::in_document(file, encryption.document, path);
    let Some(keys) = encryption.keys().filter(|keys| !keys.is_empty()) else {
        report.add(
            "encryption-no-keys",
            Severity::Error,
            &at(&format!("{}.keys", encryption.path)),
            format!("{volume} is to be encrypted, but no key is listed: Talos cannot format it"),
            "list at least one key with a slot, e.g. `- kms: {endpoint: https://HOST:PORT}` \
             and `slot: 0`",
        );
        return Vec::new();
    };

    let mut uses = Vec::new();
    let mut slots: HashMap<i64, &str> = HashMap::new();
    let mut kinds = Vec::new();
    for key in &keys {
        if !key.value.is_object() {
            report.add(
                "key-kind-unknown",
                Severity::Error,
                &at(&key.path),
                format!(
                    "{} is not a key: each entry is a mapping of a kind and a slot",
                    key.value
                ),
                "write it as `- nodeID: {}` with `slot: N` under it (or kms, tpm, static)",
            );
            continue;
        }
        let kind = match key.kind() {
            KeyKind::Known(kind) => Some(kind),
            KeyKind::Missing => {
                report.add(
                    "key-kind-unknown",
                    Severity::Error,
                    &at(&key.path),
                    "this key names no kind: Talos cannot make a passphrase for its slot",
                    format!("give it one of {}", KEY_KINDS.join(", ")),
                );
                None
            }
            KeyKind::Unknown(fields) => {
                report.add(
                    "key-kind-unknown",
                    Severity::Error,
                    &at(&key.path),
                    format!(
                        "unknown field{} {}: Talos refuses the config",
                        if fields.len() == 1 { "" } else { "s" },
                        fields.join(", ")
                    ),
                    format!(
                        "a key is one of {} (spelt so), with `slot` and optionally \
                         `lockToSTATE`{}",
                        KEY_KINDS.join(", "),
                        spelling_hint(&fields)
                    ),
                );
                None
            }
            KeyKind::Several(several) => {
                report.add(
                    "key-kind-unknown",
                    Severity::Error,
                    &at(&key.path),
                    format!(
                        "one key entry holds {}: each entry is one key of one kind",
                        several.join(" and ")
                    ),
                    "split them into entries of their own, each in its own slot",
                );
                None
            }
        };
        kinds.extend(kind);
        slot(report, &at, key, &mut slots);

        if kind == Some("static") && volume.is_state() {
            report.add(
                "state-static-key",
                Severity::Error,
                &at(&key.path),
                "a `static` key on STATE: Talos keeps STATE's encryption config, passphrase \
                 included, in clear in the META partition, so anyone with the disk opens it",
                "use `kms`, `tpm` (with SecureBoot) or `nodeID` for STATE; keep `static` for \
                 other volumes",
            );
        }
        if kind == Some("kms") {
            uses.extend(endpoint(
                report,
                &at(&format!("{}.kms.endpoint", key.path)),
                key.kms_endpoint(),
                volume,
            ));
        }
    }

    if !kinds.is_empty() && kinds.iter().all(|kind| *kind == "nodeID") {
        report.add(
            "nodeid-only",
            Severity::Warning,
            &at(&format!("{}.keys", encryption.path)),
            format!(
                "{volume} has only `nodeID` keys: the key is derived from the node's UUID, so \
                 anyone with the machine (or its UUID) opens the disk; it only protects a drive \
                 taken away from the machine"
            ),
            "add or use a `kms` or `tpm` key (in another slot)",
        );
    }
    if kinds.contains(&"kms") {
        let endpoints: Vec<Option<&str>> = keys
            .iter()
            .filter(|key| matches!(key.kind(), KeyKind::Known("kms")))
            .map(|key| key.kms_endpoint())
            .collect();
        let second_kms = endpoints.windows(2).any(|pair| pair[0] != pair[1]);
        let other_kind = kinds.iter().any(|kind| *kind != "kms");
        if !second_kms && !other_kind {
            report.add(
                "kms-no-fallback",
                Severity::Warning,
                &at(&format!("{}.keys", encryption.path)),
                format!(
                    "{volume} has a `kms` key and no second key in another slot: while the KMS \
                     is down or unreachable (a power cut, DNS, a firewall change) the node \
                     cannot open {volume} and waits, retrying every 30 s"
                ),
                fallback_fix(volume),
            );
        }
    }
    uses
}

/// What the seed guide offers as a second key, for this volume.
fn fallback_fix(volume: &Volume) -> String {
    if volume.is_state() {
        "add a second key in another slot: `tpm: {}` (strong, with SecureBoot), or \
         `nodeID: {}` (weak: protects only a drive taken away), or a second KMS; not `static`, \
         which STATE keeps in clear in META (`talos-kms-server talos patch --fallback tpm` \
         writes one)"
            .into()
    } else {
        format!(
            "add a second key in another slot: `tpm: {{}}` (with SecureBoot), `nodeID: {{}}` \
             (weak against physical access), a second KMS, or `static` with \
             `lockToSTATE: true` as the seed guide shows for {volume} \
             (`talos-kms-server talos patch --fallback tpm|nodeID|static` writes one)"
        )
    }
}

fn spelling_hint(fields: &[&str]) -> String {
    let hints: Vec<String> = fields
        .iter()
        .filter_map(|field| {
            KEY_KINDS
                .iter()
                .chain(["slot", "lockToSTATE"].iter())
                .find(|known| known.eq_ignore_ascii_case(field))
                .map(|known| format!("`{field}` is spelt `{known}`"))
        })
        .collect();
    if hints.is_empty() {
        String::new()
    } else {
        format!(": {}", hints.join(", "))
    }
}

fn slot<'a>(
    report: &mut Report,
    at: &dyn Fn(&str) -> At,
    key: &'a machine_config::Key<'_>,
    slots: &mut HashMap<i64, &'a str>,
) {
    let path = format!("{}.slot", key.path);
    match key.slot() {
        None => report.add(
            "slot-missing",
            Severity::Error,
            &at(&key.path),
            "this key has no `slot`: Talos requires one for every key",
            "add `slot: N` with a LUKS2 slot (0-31) no other key of this volume uses",
        ),
        Some(value) => match value.as_i64() {
            Some(number) if SLOTS.contains(&number) => {
                if let Some(first) = slots.insert(number, &key.path) {
                    report.add(
                        "slot-duplicate",
                        Severity::Error,
                        &at(&path),
                        format!(
                            "slot {number} is already used by {first}: LUKS2 holds one key per \
                             slot, so Talos cannot enrol both and the volume's keys never \
                             settle"
                        ),
                        "give each key of a volume its own slot",
                    );
                }
            }
            _ => report.add(
                "slot-out-of-range",
                Severity::Error,
                &at(&path),
                format!("slot {value} is not a LUKS2 slot: LUKS2 has slots 0 to 31"),
                "use a whole number from 0 to 31",
            ),
        },
    }
}

/// The endpoint rules a file can prove; a parsable endpoint comes back for the online look.
fn endpoint(report: &mut Report, at: &At, text: Option<&str>, volume: &Volume) -> Option<KmsUse> {
    let Some(text) = text else {
        report.add(
            "kms-endpoint-invalid",
            Severity::Error,
            at,
            "a `kms` key without `endpoint`: the node has no server to ask",
            "set `kms: {endpoint: https://HOST:PORT}`",
        );
        return None;
    };
    if let Some(rest) = text.strip_prefix("http://") {
        report.add(
            "kms-endpoint-http",
            Severity::Error,
            at,
            format!(
                "{text:?}: http:// is not a KMS scheme. Talos makes plaintext gRPC calls only \
                 for grpc:// (or no scheme) and TLS calls for any other scheme: this endpoint \
                 asks for TLS while saying plaintext, and a plaintext server fails every call"
            ),
            format!("write https://{rest} (TLS, the KMS's certificate checked)"),
        );
        return None;
    }
    let endpoint = match text.parse::<Endpoint>() {
        Ok(endpoint) => endpoint,
        Err(problem) => {
            report.add(
                "kms-endpoint-invalid",
                Severity::Error,
                at,
                format!("{problem}: the node cannot reach a KMS"),
                "write it as https://HOST:PORT",
            );
            return None;
        }
    };
    if !endpoint.tls {
        report.add(
            "kms-endpoint-plaintext",
            Severity::Warning,
            at,
            format!(
                "{text:?} is plaintext gRPC: every {volume} passphrase and sealed blob \
                 crosses the network in clear, readable and replayable by anyone on the path"
            ),
            format!(
                "serve TLS and write https://{}",
                Endpoint {
                    tls: true,
                    ..endpoint.clone()
                }
                .to_string()
                .trim_start_matches("https://")
            ),
        );
    }
    Some(KmsUse {
        at: at.clone(),
        volume: volume.clone(),
        endpoint,
    })
}

/// Without the network, a TrustedRootsConfig beside a KMS key on STATE can only be
/// suspected.
fn trusted_roots_offline(report: &mut Report, uses: &[KmsUse], trusted: &[TrustedRoots]) {
    let Some(state) = uses.iter().find(|u| u.volume.is_state() && u.endpoint.tls) else {
        return;
    };
    for roots in trusted {
        report.add(
            "trusted-roots-cannot-unlock-state",
            Severity::Note,
            &roots.at,
            format!(
                "STATE uses the KMS at {} ({}): if this TrustedRootsConfig holds that KMS's CA, \
                 it cannot help, because Talos reads it from STATE, after STATE is open; \
                 before, nodes trust only the public roots",
                state.endpoint, state.at.file
            ),
            "run without --offline to find out; STATE's KMS needs a certificate from a \
             public CA",
        );
    }
}

async fn endpoints(
    report: &mut Report,
    uses: &[KmsUse],
    trusted: &[TrustedRoots],
    options: &LintOptions,
) {
    let mut looked: HashMap<String, Result<Observed, ProbeFailure>> = HashMap::new();
    let mut blamed_roots = Vec::new();
    for kms in uses {
        let key = kms.endpoint.to_string();
        if !looked.contains_key(&key) {
            let seen = if kms.endpoint.tls {
                probe::tls(&kms.endpoint).await
            } else {
                probe::tcp(&kms.endpoint).await.map(|()| Observed {
                    chain: Vec::new(),
                    alpn: None,
                })
            };
            looked.insert(key.clone(), seen);
        }
        let Some(seen) = looked.get(&key) else {
            continue;
        };
        match seen {
            Err(failure) => unreachable_or_not_tls(report, kms, failure),
            Ok(_) if !kms.endpoint.tls => {}
            Ok(observed) => {
                judge(report, kms, observed, trusted, options, &mut blamed_roots);
            }
        }
    }
}

fn unreachable_or_not_tls(report: &mut Report, kms: &KmsUse, failure: &ProbeFailure) {
    let (rule, fix) = match failure {
        ProbeFailure::Tls(_) => (
            "kms-endpoint-tls",
            "serve TLS 1.3 with ALPN h2 there (talos-kms-server does), or fix the port",
        ),
        _ => (
            "kms-endpoint-unreachable",
            "check the host name and port, that the server runs and that firewalls let the \
             nodes in; if only this machine cannot reach it, lint from the nodes' network or \
             with --offline",
        ),
    };
    report.add(
        rule,
        Severity::Error,
        &kms.at,
        format!(
            "{}: {failure}. Nodes cannot use this key: the seal at first boot fails (Talos \
             retries it every 30 s), and at every boot this slot costs a failed try before the \
             next key; with no other key {} stays shut",
            kms.endpoint, kms.volume
        ),
        fix,
    );
}

/// The online rules for a completed handshake.
fn judge(
    report: &mut Report,
    kms: &KmsUse,
    observed: &Observed,
    trusted: &[TrustedRoots],
    options: &LintOptions,
    blamed_roots: &mut Vec<String>,
) {
    let endpoint = &kms.endpoint;
    if !observed.speaks_h2() {
        report.add(
            "kms-endpoint-tls",
            Severity::Error,
            &kms.at,
            format!(
                "{endpoint} completes TLS 1.3 but does not choose ALPN h2: it is not a gRPC \
                 server (or sits behind a proxy that ends TLS as HTTP/1), and grpc-go clients \
                 refuse such a server"
            ),
            "point the endpoint at the KMS itself, or make the proxy pass TLS through (TCP \
             mode) or offer h2",
        );
    }
    let Some(leaf) = observed
        .chain
        .first()
        .and_then(|der| CertificateFacts::read(der).ok())
    else {
        return;
    };
    let covered = leaf.covers(&endpoint.host);
    if !covered {
        report.add(
            "kms-endpoint-name",
            Severity::Error,
            &kms.at,
            format!(
                "the certificate at {endpoint} names {}, not {}: the node's TLS check fails on \
                 every call",
                leaf.names_text(),
                endpoint.host
            ),
            format!(
                "use one of the certificate's names in the endpoint, or reissue the \
                 certificate with {} in its subjectAltName",
                endpoint.host
            ),
        );
    }
    // Judge the chain under a name it is valid for, so that a wrong name is said once.
    let name = if covered {
        Some(endpoint.host.clone())
    } else {
        leaf.dns_names
            .iter()
            .map(|dns| dns.replace('*', "kms"))
            .chain(leaf.ip_addresses.iter().map(ToString::to_string))
            .next()
    };
    let Some(name) = name else {
        return;
    };
    match probe::verify(&observed.chain, &name, &options.public_roots) {
        Ok(()) => {}
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            let holders: Vec<&TrustedRoots> = trusted
                .iter()
                .filter(|roots| probe::verify(&observed.chain, &name, &roots.roots).is_ok())
                .collect();
            if kms.volume.is_state() {
                report.add(
                    "state-kms-private-ca",
                    Severity::Error,
                    &kms.at,
                    format!(
                        "STATE's KMS {endpoint} presents a certificate that does not chain to \
                         a public root ({PUBLIC_ROOTS_SOURCE}). Before STATE is open a node \
                         trusts only those: TrustedRootsConfig documents are stored inside \
                         STATE. The node refuses the certificate, so the seal at first boot fails \
                         (Talos retries it every 30 s) and no boot unseals with this key"
                    ),
                    "give the KMS a certificate from a public CA (e.g. Let's Encrypt; README, \
                     \"A certificate the nodes trust\"), or use another key kind for STATE",
                );
                for roots in holders {
                    let id = format!("{}|{:?}|{endpoint}", roots.at.file, roots.at.document);
                    if blamed_roots.contains(&id) {
                        continue;
                    }
                    blamed_roots.push(id);
                    report.add(
                        "trusted-roots-cannot-unlock-state",
                        Severity::Error,
                        &roots.at,
                        format!(
                            "this TrustedRootsConfig holds the CA of {endpoint}, which STATE \
                             uses ({}): it cannot help STATE, because Talos reads it from \
                             STATE, which is what the KMS must unlock first",
                            kms.at.file
                        ),
                        "it serves EPHEMERAL and user volumes; for STATE the KMS needs a \
                         certificate from a public CA",
                    );
                }
            } else if holders.is_empty() {
                report.add(
                    "kms-endpoint-untrusted",
                    Severity::Error,
                    &kms.at,
                    format!(
                        "the certificate at {endpoint} chains neither to a public root \
                         ({PUBLIC_ROOTS_SOURCE}) nor to a TrustedRootsConfig in the files \
                         linted: the node refuses it and cannot open {}",
                        kms.volume
                    ),
                    "add a TrustedRootsConfig with the KMS's CA (`talos-kms-server talos \
                     patch` prints one), or use a certificate from a public CA",
                );
            }
        }
        Err(error) => report.add(
            "kms-endpoint-certificate",
            Severity::Error,
            &kms.at,
            format!("the certificate at {endpoint} fails verification: {error}"),
            "renew or reissue it (`talos-kms-server check --config FILE` shows its dates and \
             names)",
        ),
    }
}
