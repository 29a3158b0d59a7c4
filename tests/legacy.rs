//! Taking over the legacy server's database. The legacy file is written here by an
//! independent implementation of its scheme (RustCrypto's AES-GCM, not the server's
//! aws-lc-rs), with peer addresses in Java's text form.

mod common;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use std::path::Path;

struct LegacySeal {
    node_uuid: String,
    ip_text: &'static str,
    passphrase: [u8; 32],
    /// What the legacy server returned to the node: N || K.
    blob: Vec<u8>,
    json: String,
}

/// The legacy server's Seal, as docs/protocol.md §4 describes it.
fn legacy_seal(node_uuid: &str, ip_text: &'static str) -> LegacySeal {
    let passphrase = random_passphrase();
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut key).unwrap();
    aws_lc_rs::rand::fill(&mut nonce).unwrap();
    let aad = [node_uuid.as_bytes(), ip_text.as_bytes()].concat();
    let ciphertext = Aes256Gcm::new_from_slice(&key)
        .unwrap()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &passphrase,
                aad: &aad,
            },
        )
        .unwrap();
    let json = format!(
        r#"{{
  "nodeUuid" : "{node_uuid}",
  "ipAddress" : "{ip_text}",
  "cipherTextB64" : "{}",
  "nonceB64" : "{}",
  "lastAccess" : "2025-10-11 20:22:24",
  "createdAt" : "2025-10-11 20:22:17"
}}"#,
        BASE64.encode(&ciphertext),
        BASE64.encode(nonce)
    );
    LegacySeal {
        node_uuid: node_uuid.to_string(),
        ip_text,
        passphrase,
        blob: [&nonce[..], &key[..]].concat(),
        json,
    }
}

fn write_legacy(path: &Path, seals: &[LegacySeal]) {
    let body: Vec<&str> = seals.iter().map(|s| s.json.as_str()).collect();
    std::fs::write(path, format!("[ {} ]", body.join(", "))).unwrap();
}

#[tokio::test]
async fn legacy_records_are_taken_over_and_keep_unsealing_over_ipv4_and_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let legacy_file = dir.path().join("nodeDbFile.json");
    let seals = vec![
        legacy_seal("11111111-17a0-43d7-a88b-0afd96094178", "127.0.0.1"),
        legacy_seal("22222222-17a0-43d7-a88b-0afd96094178", "0:0:0:0:0:0:0:1"),
        legacy_seal("33333333-17a0-43d7-a88b-0afd96094178", "127.0.0.1"),
    ];
    write_legacy(&legacy_file, &seals);
    let legacy_before = std::fs::read(&legacy_file).unwrap();

    let config = write_config(
        dir.path(),
        &pki,
        "::",
        &format!("nodeDbFile: {}\n", legacy_file.display()),
    );
    let server = ServerProcess::start(&config).unwrap();
    let port = server.addr.port();
    for seal in &seals {
        let host = if seal.ip_text == "127.0.0.1" {
            "127.0.0.1"
        } else {
            "::1"
        };
        let client = client_for(host, port, &pki.ca, None);
        let unsealed = client.unseal(&seal.node_uuid, &seal.blob).await.unwrap();
        assert_eq!(
            unsealed, seal.passphrase,
            "legacy record for {} from {host}",
            seal.ip_text
        );
        // The binding to the legacy address still holds.
        let other = if host == "::1" { "127.0.0.1" } else { "::1" };
        let refused = client_for(other, port, &pki.ca, None)
            .unseal(&seal.node_uuid, &seal.blob)
            .await
            .unwrap();
        assert_ne!(refused, seal.passphrase);
    }
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read(&legacy_file).unwrap(),
        legacy_before,
        "the legacy file is never modified"
    );

    // A second start imports nothing twice; the records are there exactly once.
    let server = ServerProcess::start(&config).unwrap();
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let count: i64 = db
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 3);
    let created: i64 = db
        .query_row("SELECT min(created_at) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        created, 1_760_214_137,
        "createdAt 2025-10-11 20:22:17 UTC is kept"
    );
}

#[test]
fn corrupt_legacy_file_stops_start_up_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let legacy_file = dir.path().join("nodeDbFile.json");
    let good = legacy_seal(NODE, "127.0.0.1");
    std::fs::write(&legacy_file, format!("[ {}, {{ \"nodeUuid\": ", good.json)).unwrap();
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!("nodeDbFile: {}\n", legacy_file.display()),
    );

    let output = run_binary(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&legacy_file.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("not a valid legacy database"), "{stderr}");
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let count: i64 = db
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 0, "nothing is half-imported");

    // A record with a bad field is named too.
    let bad_nonce = good
        .json
        .replace("\"nonceB64\" : \"", "\"nonceB64\" : \"AAAA");
    std::fs::write(&legacy_file, format!("[ {bad_nonce} ]")).unwrap();
    let output = run_binary(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("record #0") && stderr.contains("nonceB64"),
        "{stderr}"
    );
}

#[tokio::test]
async fn import_json_reports_imported_and_skipped_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let legacy_file = dir.path().join("nodeDbFile.json");
    let database = dir.path().join("kms.db");
    let first = vec![
        legacy_seal(NODE, "127.0.0.1"),
        legacy_seal("other", "127.0.0.1"),
    ];
    write_legacy(&legacy_file, &first);
    let args = [
        "import-json",
        legacy_file.to_str().unwrap(),
        "--database",
        database.to_str().unwrap(),
    ];

    let output = run_binary(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("imported 2 records, skipped 0"),
        "{}",
        text(&output.stdout)
    );
    let output = run_binary(&args);
    assert!(
        text(&output.stdout).contains("imported 0 records, skipped 2"),
        "{}",
        text(&output.stdout)
    );

    let mut grown = first;
    grown.push(legacy_seal("third", "127.0.0.1"));
    write_legacy(&legacy_file, &grown);
    let output = run_binary(&args);
    assert!(
        text(&output.stdout).contains("imported 1 records, skipped 2"),
        "{}",
        text(&output.stdout)
    );

    // The imported records unseal through a server on that database.
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    for seal in &grown {
        assert_eq!(
            client.unseal(&seal.node_uuid, &seal.blob).await.unwrap(),
            seal.passphrase
        );
    }
    server.running.shutdown().await.unwrap();
}
