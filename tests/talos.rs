//! `talos patch` and `talos lint` as an operator uses them: machine configs written the way
//! `talosctl gen config` and the seed guide write them (tests/fixtures/talos/), and live TLS
//! servers on loopback for the online rules.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use talos_kms_server::talos::lint::{self, LintOptions, Severity};
use talos_kms_server::tls::{self, throwaway};
use tokio::net::TcpListener;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/talos")
        .join(name)
        .display()
        .to_string()
}

/// Runs `talos lint --output json ARGS`; its exit code and its findings.
async fn lint_json(args: &[&str]) -> (i32, Vec<Value>) {
    let mut all = vec!["talos", "lint", "--output", "json"];
    all.extend_from_slice(args);
    let output = run_binary_async(&all).await;
    let stdout = text(&output.stdout);
    let json: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", text(&output.stderr)));
    assert_eq!(
        json["exit_code"].as_i64(),
        output.status.code().map(i64::from),
        "{stdout}"
    );
    (
        output.status.code().unwrap(),
        json["findings"].as_array().unwrap().clone(),
    )
}

/// (rule, severity, document, path) of each finding, for comparing.
fn places(findings: &[Value]) -> Vec<(String, String, String, String)> {
    let field = |f: &Value, key: &str| f[key].as_str().unwrap_or("").to_string();
    findings
        .iter()
        .map(|f| {
            (
                field(f, "rule"),
                field(f, "severity"),
                field(f, "document"),
                field(f, "path"),
            )
        })
        .collect()
}

fn has(findings: &[Value], rule: &str, document: &str, path: &str) -> bool {
    places(findings)
        .iter()
        .any(|(r, _, d, p)| r == rule && d == document && p == path)
}

#[tokio::test]
async fn every_offline_mistake_is_reported_with_its_place_why_and_fix() {
    let (code, findings) = lint_json(&["--offline", &fixture("every-mistake.yaml")]).await;
    assert_eq!(code, 1, "errors: exit 1");
    let numbers: Vec<&str> = findings
        .iter()
        .map(|f| f["document"].as_str().unwrap().split(' ').nth(1).unwrap())
        .collect();
    assert!(numbers.is_sorted(), "in the file's order: {numbers:?}");
    let state = "document 1 (VolumeConfig STATE)";
    let ephemeral = "document 2 (VolumeConfig EPHEMERAL)";
    let expected = [
        ("state-static-key", "error", state, "encryption.keys[0]"),
        (
            "kms-endpoint-http",
            "error",
            state,
            "encryption.keys[1].kms.endpoint",
        ),
        ("slot-duplicate", "error", state, "encryption.keys[1].slot"),
        (
            "kms-endpoint-plaintext",
            "warning",
            ephemeral,
            "encryption.keys[0].kms.endpoint",
        ),
        (
            "slot-out-of-range",
            "error",
            ephemeral,
            "encryption.keys[0].slot",
        ),
        ("key-kind-unknown", "error", ephemeral, "encryption.keys[1]"),
        ("slot-missing", "error", ephemeral, "encryption.keys[2]"),
        ("key-kind-unknown", "error", ephemeral, "encryption.keys[3]"),
        (
            "nodeid-only",
            "warning",
            "document 3 (UserVolumeConfig data)",
            "encryption.keys",
        ),
        (
            "volume-encrypted-twice",
            "error",
            "document 4 (UserVolumeConfig data)",
            "encryption",
        ),
        (
            "kms-no-fallback",
            "warning",
            "document 4 (UserVolumeConfig data)",
            "encryption.keys",
        ),
        (
            "document-skipped",
            "note",
            "document 5 (VolumeConfg EPHEMERAL)",
            "",
        ),
    ];
    let mut got = places(&findings);
    got.sort();
    let mut want: Vec<_> = expected
        .iter()
        .map(|(r, s, d, p)| (r.to_string(), s.to_string(), d.to_string(), p.to_string()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    for finding in &findings {
        assert!(
            finding["file"]
                .as_str()
                .unwrap()
                .ends_with("every-mistake.yaml")
                && !finding["problem"].as_str().unwrap().is_empty()
                && !finding["fix"].as_str().unwrap().is_empty(),
            "{finding}"
        );
    }
    let unknown = findings
        .iter()
        .find(|f| f["rule"] == "key-kind-unknown")
        .unwrap();
    assert!(
        unknown["fix"]
            .as_str()
            .unwrap()
            .contains("`nodeid` is spelt `nodeID`"),
        "{unknown}"
    );
    let twice = findings
        .iter()
        .find(|f| f["rule"] == "volume-encrypted-twice")
        .unwrap();
    assert!(
        twice["problem"].as_str().unwrap().contains("document 3"),
        "names the other place: {twice}"
    );
}

#[tokio::test]
async fn a_gen_config_file_and_a_patch_as_the_guide_writes_it_are_clean() {
    let (code, findings) = lint_json(&[
        "--offline",
        &fixture("controlplane.yaml"),
        &fixture("encrypted-well.yaml"),
    ])
    .await;
    assert_eq!((code, findings.len()), (0, 0), "{findings:#?}");

    // The text report says the same, and that nothing was looked at online.
    let output =
        run_binary_async(&["talos", "lint", "--offline", &fixture("controlplane.yaml")]).await;
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("0 errors, 0 warnings, 0 notes in 1 file"),
        "{stdout}"
    );
    assert!(stdout.contains("offline"), "{stdout}");
}

#[tokio::test]
async fn the_older_system_disk_encryption_form_is_linted_too() {
    let (code, findings) =
        lint_json(&["--offline", &fixture("legacy-system-disk-encryption.yaml")]).await;
    assert_eq!(code, 1);
    let main = "document 1 (v1alpha1)";
    assert!(
        has(
            &findings,
            "state-static-key",
            main,
            "machine.systemDiskEncryption.state.keys[0]"
        ),
        "{findings:#?}"
    );
    assert!(
        has(
            &findings,
            "kms-no-fallback",
            main,
            "machine.systemDiskEncryption.ephemeral.keys"
        ),
        "{findings:#?}"
    );
    assert!(
        has(
            &findings,
            "volume-encrypted-twice",
            "document 2 (VolumeConfig EPHEMERAL)",
            "encryption"
        ),
        "both forms for EPHEMERAL: {findings:#?}"
    );
}

#[tokio::test]
async fn warnings_only_exit_2_and_the_text_report_names_place_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ephemeral.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1alpha1\nkind: VolumeConfig\nname: EPHEMERAL\nencryption:\n  keys:\n    \
         - kms:\n        endpoint: https://kms.example.com:50051\n      slot: 0\n",
    )
    .unwrap();
    let output = run_binary_async(&["talos", "lint", "--offline", file.to_str().unwrap()]).await;
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "warning[kms-no-fallback] {}: document 1 (VolumeConfig EPHEMERAL): encryption.keys",
            file.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("fix: add a second key in another slot"),
        "{stdout}"
    );
    assert!(
        stdout.contains("lockToSTATE"),
        "names the guide's fallback: {stdout}"
    );
}

#[tokio::test]
async fn bad_files_are_named_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let missing = dir.path().join("missing.yaml");
    let json_patch = dir.path().join("json6902.yaml");
    std::fs::write(
        &json_patch,
        "- op: add\n  path: /machine/network/hostname\n  value: worker1\n",
    )
    .unwrap();
    let duplicate = dir.path().join("duplicate.yaml");
    std::fs::write(
        &duplicate,
        "kind: VolumeConfig\nname: STATE\nencryption:\n  keys:\n    - tpm: {}\n      slot: 0\n      \
         slot: 1\n",
    )
    .unwrap();
    let not_yaml = fixture("not-yaml.yaml");
    let (code, findings) = lint_json(&[
        "--offline",
        &not_yaml,
        missing.to_str().unwrap(),
        binary.to_str().unwrap(),
        empty.to_str().unwrap(),
        json_patch.to_str().unwrap(),
        duplicate.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1);
    let of = |file: &str| {
        findings
            .iter()
            .find(|f| f["file"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("nothing about {file}: {findings:#?}"))
    };
    let yaml = of("not-yaml.yaml");
    assert_eq!(yaml["rule"], "file-not-yaml");
    assert!(
        yaml["problem"].as_str().unwrap().contains("line 3"),
        "{yaml}"
    );
    assert_eq!(of("missing.yaml")["rule"], "file-unreadable");
    assert!(
        of("missing.yaml")["problem"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{findings:#?}"
    );
    assert_eq!(of("binary.yaml")["rule"], "file-not-yaml");
    let duplicate = of("duplicate.yaml")["problem"].as_str().unwrap();
    assert!(
        duplicate.contains("duplicate mapping key: slot")
            && duplicate.contains("line 7")
            && !duplicate.contains("Options"),
        "{duplicate}"
    );
    assert_eq!(of("empty.yaml")["rule"], "file-not-yaml");
    let patch = of("json6902.yaml");
    assert_eq!(
        (patch["rule"].as_str(), patch["severity"].as_str()),
        (Some("document-skipped"), Some("note"))
    );
}

/// A loopback TLS server that completes handshakes with `config` and then closes.
async fn tls_server(config: rustls::ServerConfig) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
            });
        }
    });
    port
}

/// A TLS 1.3 server config for a throwaway certificate naming `names`; its CA's PEM.
fn server_config(names: &[&str], alpn_h2: bool) -> (rustls::ServerConfig, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let pki = throwaway::generate(&names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    std::fs::write(&cert, &pki.chain_pem).unwrap();
    write_private(&key, &pki.key_pem);
    let identity = tls::load_identity(&cert, &key, None).unwrap();
    let mut config = Arc::unwrap_or_clone(tls::server_config(identity).unwrap());
    if !alpn_h2 {
        config.alpn_protocols.clear();
    }
    (config, pki.ca_pem)
}

fn volume(name: &str, endpoint: &str) -> String {
    format!(
        "---\napiVersion: v1alpha1\nkind: VolumeConfig\nname: {name}\nencryption:\n  provider: \
         luks2\n  keys:\n    - kms:\n        endpoint: {endpoint}\n      slot: 0\n    - tpm: \
         {{}}\n      slot: 1\n"
    )
}

fn trusted_roots(ca_pem: &str) -> String {
    let mut text =
        "---\napiVersion: v1alpha1\nkind: TrustedRootsConfig\nname: kms-ca\ncertificates: |\n"
            .to_string();
    for line in ca_pem.lines() {
        text.push_str("  ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn state_on_a_private_ca_is_an_error_and_its_trusted_roots_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let endpoint = format!("https://127.0.0.1:{}", server.port());
    let ca = std::fs::read_to_string(&server.pki.ca).unwrap();
    let config = write(
        dir.path(),
        "patch.yaml",
        &format!(
            "{}{}{}",
            trusted_roots(&ca),
            volume("STATE", &endpoint),
            volume("EPHEMERAL", &endpoint)
        ),
    );
    let (code, findings) = lint_json(&[config.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    let mut got = places(&findings);
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "state-kms-private-ca".into(),
                "error".into(),
                "document 2 (VolumeConfig STATE)".into(),
                "encryption.keys[0].kms.endpoint".into()
            ),
            (
                "trusted-roots-cannot-unlock-state".into(),
                "error".into(),
                "document 1 (TrustedRootsConfig kms-ca)".into(),
                "certificates".into()
            ),
        ],
        "EPHEMERAL is fine through the TrustedRootsConfig: {findings:#?}"
    );
    let state = &findings
        .iter()
        .find(|f| f["rule"] == "state-kms-private-ca")
        .unwrap()["problem"];
    assert!(
        state.as_str().unwrap().contains("webpki-roots"),
        "says which public bundle: {state}"
    );

    // Offline, the TrustedRootsConfig beside STATE's KMS is only suspected: a note.
    let (code, findings) = lint_json(&["--offline", config.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{findings:#?}");
    assert_eq!(
        places(&findings),
        vec![(
            "trusted-roots-cannot-unlock-state".into(),
            "note".into(),
            "document 1 (TrustedRootsConfig kms-ca)".into(),
            "certificates".into()
        )]
    );

    // Without the TrustedRootsConfig, EPHEMERAL cannot verify the server at all.
    let ephemeral = write(
        dir.path(),
        "ephemeral.yaml",
        &volume("EPHEMERAL", &endpoint),
    );
    let (code, findings) = lint_json(&[ephemeral.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(
        has(
            &findings,
            "kms-endpoint-untrusted",
            "document 1 (VolumeConfig EPHEMERAL)",
            "encryption.keys[0].kms.endpoint"
        ),
        "{findings:#?}"
    );
}

#[tokio::test]
async fn a_chain_to_a_root_nodes_ship_passes_every_online_rule() {
    // The lint's public bundle replaced by the test CA: the same checks a public
    // certificate meets, made against this product's own server.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_file_iter(
            &server.pki.ca,
        )
        .unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = write(
        dir.path(),
        "state.yaml",
        &volume("STATE", &format!("https://localhost:{}", server.port())),
    );
    let options = LintOptions {
        offline: false,
        public_roots: roots,
    };
    let report = lint::lint(&[config], &options).await;
    assert_eq!(report.exit_code(), 0, "{:#?}", report.findings);
    assert!(report.findings.is_empty(), "{:#?}", report.findings);

    // The same file with the real public bundle is refused: the test CA is not public.
    let config = dir.path().join("state.yaml");
    let report = lint::lint(&[config], &LintOptions::default()).await;
    assert_eq!(report.count(Severity::Error), 1, "{:#?}", report.findings);
    assert_eq!(report.findings[0].rule, "state-kms-private-ca");
}

#[tokio::test]
async fn a_wrong_name_a_closed_port_no_h2_and_no_tls_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (wrong_name, ca) = server_config(&["kms.wrong.test"], true);
    let wrong_name = tls_server(wrong_name).await;
    let (no_h2, no_h2_ca) = server_config(&["127.0.0.1"], false);
    let no_h2 = tls_server(no_h2).await;
    let closed = {
        let (listener, port) = taken_port();
        drop(listener);
        port
    };
    // A plaintext service (HTTP/1) where TLS is expected.
    let plaintext = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plaintext_port = plaintext.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut tcp, _)) = plaintext.accept().await {
            let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let user_volume = |name: &str, endpoint: String| {
        format!(
            "---\napiVersion: v1alpha1\nkind: UserVolumeConfig\nname: {name}\nencryption:\n  \
             keys:\n    - kms:\n        endpoint: {endpoint}\n      slot: 0\n    - nodeID: {{}}\n      \
             slot: 1\n"
        )
    };
    let config = write(
        dir.path(),
        "volumes.yaml",
        &[
            trusted_roots(&ca),
            trusted_roots(&no_h2_ca),
            user_volume("wrong-name", format!("https://127.0.0.1:{wrong_name}")),
            user_volume("closed", format!("https://127.0.0.1:{closed}")),
            user_volume("no-h2", format!("https://127.0.0.1:{no_h2}")),
            user_volume("no-tls", format!("https://127.0.0.1:{plaintext_port}")),
            user_volume("plain-closed", format!("grpc://127.0.0.1:{closed}")),
        ]
        .concat(),
    );
    let (code, findings) = lint_json(&[config.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    let path = "encryption.keys[0].kms.endpoint";
    let mut got = places(&findings);
    got.sort();
    let mut want = vec![
        (
            "kms-endpoint-name",
            "document 3 (UserVolumeConfig wrong-name)",
        ),
        (
            "kms-endpoint-unreachable",
            "document 4 (UserVolumeConfig closed)",
        ),
        ("kms-endpoint-tls", "document 5 (UserVolumeConfig no-h2)"),
        ("kms-endpoint-tls", "document 6 (UserVolumeConfig no-tls)"),
        (
            "kms-endpoint-plaintext",
            "document 7 (UserVolumeConfig plain-closed)",
        ),
        (
            "kms-endpoint-unreachable",
            "document 7 (UserVolumeConfig plain-closed)",
        ),
    ]
    .into_iter()
    .map(|(rule, document)| {
        let severity = if rule == "kms-endpoint-plaintext" {
            "warning"
        } else {
            "error"
        };
        (rule.into(), severity.into(), document.into(), path.into())
    })
    .collect::<Vec<(String, String, String, String)>>();
    want.sort();
    assert_eq!(got, want, "{findings:#?}");
    let name = findings
        .iter()
        .find(|f| f["rule"] == "kms-endpoint-name")
        .unwrap();
    assert!(
        name["problem"].as_str().unwrap().contains("kms.wrong.test"),
        "names the certificate's names: {name}"
    );
    let no_h2 = findings
        .iter()
        .find(|f| f["document"] == "document 5 (UserVolumeConfig no-h2)")
        .unwrap();
    assert!(no_h2["problem"].as_str().unwrap().contains("h2"), "{no_h2}");
}

/// `talos patch` for a server config; stdout.
async fn patch_ok(args: &[&str]) -> String {
    let mut all = vec!["talos", "patch"];
    all.extend_from_slice(args);
    run_ok(&all).await
}

#[tokio::test]
async fn the_patch_for_a_private_ca_server_passes_the_lint_against_that_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let config = write_config(dir.path(), &server.pki, "127.0.0.1", "");
    edit_config(&config, "port: 0", &format!("port: {}", server.port()));
    let config = config.to_str().unwrap();

    // `--config` before `talos`, as the other commands take it, works too.
    let yaml = run_ok(&[
        "--config",
        config,
        "talos",
        "patch",
        "--volume",
        "EPHEMERAL",
        "--user-volume",
        "data",
        "--fallback",
        "nodeID",
    ])
    .await;
    // The certificate's first name and the listen port; the loopback warning for 21.9.
    let endpoint = format!("https://localhost:{}", server.port());
    assert!(yaml.contains(&format!("endpoint: {endpoint}")), "{yaml}");
    assert!(yaml.contains("would call ITSELF"), "{yaml}");
    assert!(yaml.contains("--endpoint https://HOST:PORT"), "{yaml}");
    assert!(yaml.contains("CANNOT UNLOCK STATE"), "{yaml}");

    let documents: Vec<Value> = serde_saphyr::from_str_multiple(&yaml).unwrap();
    assert_eq!(documents.len(), 3, "{yaml}");
    assert_eq!(documents[0]["kind"], "TrustedRootsConfig");
    assert_eq!(
        documents[0]["certificates"].as_str().unwrap().trim(),
        std::fs::read_to_string(&server.pki.ca).unwrap().trim(),
        "the CA at the top of the server's chain"
    );
    assert_eq!(
        (&documents[1]["kind"], &documents[1]["name"]),
        (&Value::from("VolumeConfig"), &Value::from("EPHEMERAL"))
    );
    assert_eq!(
        (&documents[2]["kind"], &documents[2]["name"]),
        (&Value::from("UserVolumeConfig"), &Value::from("data"))
    );
    for document in &documents[1..] {
        let keys = &document["encryption"]["keys"];
        assert_eq!(
            keys[0]["kms"]["endpoint"],
            Value::from(endpoint.clone()),
            "{yaml}"
        );
        assert_eq!(keys[0]["slot"], 0);
        assert!(keys[1]["nodeID"].is_object(), "{yaml}");
        assert_eq!(keys[1]["slot"], 1);
        assert_eq!(document["encryption"]["provider"], "luks2");
    }

    // What the patch says, the lint confirms, online against the server itself.
    let file = write(dir.path(), "patch.yaml", &yaml);
    let (code, findings) = lint_json(&[file.to_str().unwrap()]).await;
    assert_eq!((code, findings.len()), (0, 0), "{yaml}\n{findings:#?}");

    // STATE cannot work with this certificate: refused, saying why and what to do.
    let output =
        run_binary_async(&["talos", "patch", "--config", config, "--volume", "STATE"]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("public CA") && stderr.contains("--volume EPHEMERAL"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no half a patch");
}

#[tokio::test]
async fn the_patch_as_json_with_a_tpm_fallback_for_state_and_ephemeral() {
    let json = patch_ok(&[
        "--endpoint",
        "https://kms.example.com:50051",
        "--volume",
        "STATE",
        "--volume",
        "EPHEMERAL",
        "--slot",
        "2",
        "--fallback",
        "tpm",
        "--output",
        "json",
    ])
    .await;
    let patch: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(patch["endpoint"], "https://kms.example.com:50051");
    let documents = patch["documents"].as_array().unwrap();
    assert_eq!(
        documents.len(),
        2,
        "no TrustedRootsConfig without a private CA: {json}"
    );
    for (document, name) in documents.iter().zip(["STATE", "EPHEMERAL"]) {
        assert_eq!(document["name"], name);
        let keys = &document["encryption"]["keys"];
        assert_eq!(keys[0]["kms"]["endpoint"], "https://kms.example.com:50051");
        assert_eq!(keys[0]["slot"], 2);
        assert!(keys[1]["tpm"].is_object(), "{json}");
        assert_eq!(keys[1]["slot"], 3);
    }
    assert!(
        !json.contains("ITSELF"),
        "no loopback warning for a real name: {json}"
    );

    // A CA of the operator's goes into a TrustedRootsConfig, as written.
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let with_ca = patch_ok(&[
        "--endpoint",
        "https://kms.example.com:50051",
        "--ca",
        pki.ca.to_str().unwrap(),
        "--output",
        "json",
    ])
    .await;
    let with_ca: Value = serde_json::from_str(&with_ca).unwrap();
    assert_eq!(with_ca["documents"][0]["kind"], "TrustedRootsConfig");
    assert_eq!(
        with_ca["documents"][0]["certificates"]
            .as_str()
            .unwrap()
            .trim(),
        ca.trim()
    );
    assert_eq!(
        with_ca["documents"][1]["name"], "EPHEMERAL",
        "EPHEMERAL by default"
    );

    // The YAML form of the same patch lints clean offline.
    let yaml = patch_ok(&[
        "--endpoint",
        "https://kms.example.com:50051",
        "--volume",
        "STATE",
        "--volume",
        "EPHEMERAL",
        "--fallback",
        "tpm",
    ])
    .await;
    let file = write(dir.path(), "patch.yaml", &yaml);
    let (code, findings) = lint_json(&["--offline", file.to_str().unwrap()]).await;
    assert_eq!((code, findings.len()), (0, 0), "{yaml}\n{findings:#?}");
}

#[tokio::test]
async fn a_static_fallback_is_random_per_volume_and_refused_for_state() {
    let yaml = patch_ok(&[
        "--endpoint",
        "https://kms.example.com:50051",
        "--user-volume",
        "a",
        "--user-volume",
        "b",
        "--fallback",
        "static",
    ])
    .await;
    let documents: Vec<Value> = serde_saphyr::from_str_multiple(&yaml).unwrap();
    let passphrase = |i: usize| {
        let key = &documents[i]["encryption"]["keys"][1];
        assert_eq!(key["lockToSTATE"], true, "{yaml}");
        key["static"]["passphrase"].as_str().unwrap().to_string()
    };
    assert_ne!(passphrase(0), passphrase(1));
    assert_eq!(passphrase(0).len(), 44, "base64 of 32 random bytes");

    let output = run_binary_async(&[
        "talos",
        "patch",
        "--endpoint",
        "https://kms.example.com:50051",
        "--volume",
        "STATE",
        "--fallback",
        "static",
    ])
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("META"),
        "{}",
        text(&output.stderr)
    );

    let output = run_binary_async(&["talos", "patch", "--volume", "EPHEMERAL"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("give --config FILE"),
        "{}",
        text(&output.stderr)
    );

    for (args, says) in [
        (vec!["--slot", "32"], "0 to 31"),
        (
            vec!["--fallback", "tpm", "--fallback-slot", "0"],
            "its own slot",
        ),
        (vec!["--user-volume", "no spaces"], "1 to 34"),
    ] {
        let mut all = vec!["talos", "patch", "--endpoint", "https://kms.example.com"];
        all.extend(args);
        let output = run_binary_async(&all).await;
        assert_eq!(output.status.code(), Some(1), "{all:?}");
        assert!(
            text(&output.stderr).contains(says),
            "{all:?}: {}",
            text(&output.stderr)
        );
    }
}
