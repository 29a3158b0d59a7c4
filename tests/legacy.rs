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
    let startup = server.startup_log.join("\n");
    assert!(
        startup.contains("created a new database to take over the legacy records into")
            && !startup.contains("restore the database from a backup"),
        "a take-over says what it does, not that a database may be missing: {startup}"
    );
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
        stderr.contains(&format!("record #1 (nodeUuid {NODE}): field `nonceB64`")),
        "{stderr}"
    );
}

#[test]
fn a_record_without_a_required_field_is_named_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let legacy_file = dir.path().join("nodeDbFile.json");
    let good = legacy_seal(NODE, "127.0.0.1");
    let other = "33333333-17a0-43d7-a88b-0afd96094178";
    let third = legacy_seal(other, "127.0.0.1");
    let nonce_line = third
        .json
        .lines()
        .find(|line| line.contains("nonceB64"))
        .unwrap()
        .to_string();
    let without_nonce = third.json.replace(&format!("{nonce_line}\n"), "");
    let second = legacy_seal("22222222-17a0-43d7-a88b-0afd96094178", "127.0.0.1");
    std::fs::write(
        &legacy_file,
        format!("[ {}, {}, {without_nonce} ]", good.json, second.json),
    )
    .unwrap();
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
        stderr.contains(&legacy_file.display().to_string())
            && stderr.contains(&format!(
                "record #3 (nodeUuid {other}): field `nonceB64` is missing"
            )),
        "{stderr}"
    );
}

/// Starts the server and returns its log up to the line saying it serves (at most 30 s).
fn start_and_read_log(config: &Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(BINARY)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut log = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = received.recv_timeout(left) else {
            break;
        };
        let serving = line.contains("serving");
        log.push(line);
        if serving {
            break;
        }
    }
    (child, log.join("\n"))
}

#[test]
fn an_empty_legacy_file_is_accepted_and_reported_as_empty() {
    for content in ["", " \n\t\n"] {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path());
        let legacy_file = dir.path().join("nodeDbFile.json");
        std::fs::write(&legacy_file, content).unwrap();
        let config = write_config(
            dir.path(),
            &pki,
            "127.0.0.1",
            &format!("nodeDbFile: {}\n", legacy_file.display()),
        );
        let (mut child, log) = start_and_read_log(&config);
        let _ = child.kill();
        let _ = child.wait();
        assert!(log.contains("serving"), "{content:?}: {log}");
        assert!(
            log.contains("legacy database is empty: nothing to take over")
                && log.contains(&legacy_file.display().to_string()),
            "{content:?}: {log}"
        );
        assert_eq!(std::fs::read(&legacy_file).unwrap(), content.as_bytes());
    }
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
