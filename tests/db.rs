//! Backups and moving data, against running servers and real files: `db backup` under seal
//! load, `db verify` on damaged copies, `db restore` and its refusals, and `export-json`
//! read back by an independent implementation of the legacy scheme.

mod common;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `args`, expects exit 1, returns stdout and stderr together.
async fn kms_fails(args: &[&str]) -> String {
    let output = run_binary_async(args).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    format!("{}{}", text(&output.stdout), text(&output.stderr))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[derive(Clone)]
struct Sealed {
    node: String,
    passphrase: [u8; 32],
    blob: Vec<u8>,
}

/// A server process on loopback with its own directory, config and database.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    ca: PathBuf,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path());
        let config = write_config(dir.path(), &pki, "127.0.0.1", "");
        Site {
            ca: pki.ca,
            dir,
            config,
        }
    }

    fn database(&self) -> PathBuf {
        self.dir.path().join("kms.db")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&self) -> ServerProcess {
        ServerProcess::start(&self.config).unwrap()
    }
}

fn client(server: &ServerProcess, ca: &Path) -> talos_kms_server::client::KmsClient {
    client_for("127.0.0.1", server.addr.port(), ca, None)
}

async fn seal(client: &talos_kms_server::client::KmsClient, node: &str) -> Sealed {
    let passphrase = random_passphrase();
    let blob = client.seal(node, &passphrase).await.unwrap();
    Sealed {
        node: node.to_string(),
        passphrase,
        blob,
    }
}

async fn stop(server: ServerProcess) {
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_seal_load_restores_every_seal_acknowledged_before_it() {
    let site = Site::new();
    // 50,000 records created now are over the hourly quota of new records.
    let config = std::fs::read_to_string(&site.config).unwrap();
    write_private(&site.config, &format!("{config}maxNewRecordsPerHour: 0\n"));
    // Enough records for the copy to take several steps while seals commit between them.
    run_ok(&[
        "fill",
        "--database",
        s(&site.database()),
        "--records",
        "50000",
    ])
    .await;
    let server = site.serve();
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let stopping = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for task in 0..4 {
        let client = client(&server, &site.ca);
        let (acknowledged, stopping) = (Arc::clone(&acknowledged), Arc::clone(&stopping));
        load.push(tokio::spawn(async move {
            for i in 0..300 {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let sealed = seal(&client, &format!("node-{task}-{i}")).await;
                acknowledged.lock().unwrap().push(sealed);
            }
        }));
    }
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "no seal load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<Sealed> = acknowledged.lock().unwrap().clone();
    let backup = site.file("kms-backup.db");
    let summary = run_ok(&[
        "db",
        "backup",
        s(&backup),
        "--config",
        s(&site.config),
        "--output",
        "json",
    ])
    .await;
    let during = acknowledged.lock().unwrap().len();
    assert!(
        during > before.len(),
        "no seal was acknowledged while the backup ran"
    );
    // The server kept sealing after the backup, too.
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < during + 4 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sealing stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stopping.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    let records = summary["records"].as_u64().unwrap();
    assert!(
        records >= 50_000 + before.len() as u64,
        "{summary}: {} seals acknowledged before the backup",
        before.len()
    );
    assert_eq!(mode(&backup), 0o600);
    assert!(
        !site.file("kms-backup.db-wal").exists() && !site.file("kms-backup.db-journal").exists(),
        "a backup is one file"
    );
    let verified = run_ok(&["db", "verify", s(&backup)]).await;
    assert!(
        verified.contains(&format!("sound, {records} records")),
        "{verified}"
    );
    let again = kms_fails(&["db", "backup", s(&backup), "--config", s(&site.config)]).await;
    assert!(
        again.contains("exists") && again.contains("--force"),
        "{again}"
    );

    // Restored into a new server's database, which does not exist yet.
    let other = Site::new();
    let restored = run_ok(&["db", "restore", s(&backup), "--config", s(&other.config)]).await;
    assert!(
        restored.contains(&format!("restored {records} records")),
        "{restored}"
    );
    let server2 = other.serve();
    let client2 = client(&server2, &other.ca);
    for sealed in &before {
        assert_eq!(
            client2.unseal(&sealed.node, &sealed.blob).await.unwrap(),
            sealed.passphrase,
            "{} was acknowledged before the backup",
            sealed.node
        );
    }
    stop(server2).await;
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_cut_file_a_flipped_bit_and_malformed_records() {
    let site = Site::new();
    run_ok(&[
        "fill",
        "--database",
        s(&site.database()),
        "--records",
        "2000",
    ])
    .await;
    let good = site.file("good.db");
    run_ok(&["db", "backup", s(&good), "--config", s(&site.config)]).await;
    let verified = run_ok(&["db", "verify", s(&good)]).await;
    assert!(verified.contains("sound, 2000 records"), "{verified}");
    let bytes = std::fs::read(&good).unwrap();

    let cut = site.file("cut.db");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let found = kms_fails(&["db", "verify", s(&cut)]).await;
    assert!(found.contains("cut short"), "{found}");

    // SQLite keeps no checksums: a flip in a page's free space or inside a ciphertext is
    // invisible to any reader without the node's key. A flip in a record's nonce is not:
    // the row no longer matches its index entry.
    let nonce: Vec<u8> = rusqlite::Connection::open(&good)
        .unwrap()
        .query_row("SELECT nonce FROM records WHERE id = 1000", [], |r| {
            r.get(0)
        })
        .unwrap();
    // The row itself, not its copy in the nonce index: in the row the node UUID follows.
    let row: Vec<u8> = [nonce.as_slice(), b"fill-"].concat();
    let at = bytes
        .windows(row.len())
        .position(|window| window == row.as_slice())
        .unwrap();
    let mut flipped_bytes = bytes.clone();
    flipped_bytes[at + 5] ^= 0x10;
    let flipped = site.file("flipped.db");
    std::fs::write(&flipped, &flipped_bytes).unwrap();
    let found = kms_fails(&["db", "verify", s(&flipped)]).await;
    assert!(
        found.contains("integrity check") && found.contains("row 1000"),
        "{found}"
    );
    let json = kms_fails(&["db", "verify", s(&flipped), "--output", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(json["sound"], false);
    assert!(!json["problems"].as_array().unwrap().is_empty());

    // Records that SQLite finds sound but that no node could unseal are named by id and field.
    let malformed = site.file("malformed.db");
    std::fs::write(&malformed, &bytes).unwrap();
    rusqlite::Connection::open(&malformed)
        .unwrap()
        .execute_batch(
            "UPDATE records SET ip = '' WHERE id = 7;
             UPDATE records SET ciphertext = x'00' WHERE id = 8;
             UPDATE records SET created_at = -1 WHERE id = 9;",
        )
        .unwrap();
    let found = kms_fails(&["db", "verify", s(&malformed)]).await;
    for problem in [
        "record 7: ip is empty",
        "record 8: ciphertext is 1 bytes, shorter than the 16-byte GCM tag",
        "record 9: created_at is -1",
    ] {
        assert!(found.contains(problem), "{problem}: {found}");
    }
    assert!(found.contains("3 problems found"), "{found}");

    let restore = kms_fails(&["db", "restore", s(&flipped), "--config", s(&site.config)]).await;
    assert!(
        restore.contains("not a sound backup") && restore.contains("row 1000"),
        "{restore}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_waits_for_a_stopped_server_asks_for_force_and_keeps_what_it_replaces() {
    let site = Site::new();
    let config = s(&site.config);
    let server = site.serve();
    let client1 = client(&server, &site.ca);
    let kept = seal(&client1, "node-kept").await;
    let backup = site.file("backup.db");
    run_ok(&["db", "backup", s(&backup), "--config", config]).await;
    let later = seal(&client1, "node-later").await;

    let refused = kms_fails(&["db", "restore", s(&backup), "--config", config, "--force"]).await;
    assert!(
        refused.contains("in use") && refused.contains("stop the server"),
        "{refused}"
    );
    stop(server).await;

    let refused = kms_fails(&["db", "restore", s(&backup), "--config", config]).await;
    assert!(
        refused.contains("holds 2 records") && refused.contains("--force"),
        "{refused}"
    );

    let inode = std::fs::metadata(site.database()).unwrap().ino();
    let restored = run_ok(&["db", "restore", s(&backup), "--config", config, "--force"]).await;
    assert!(
        restored.contains("restored 1 records") && restored.contains(".replaced-"),
        "{restored}"
    );
    assert_eq!(
        std::fs::metadata(site.database()).unwrap().ino(),
        inode,
        "restored in place"
    );
    let replaced: Vec<PathBuf> = std::fs::read_dir(site.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("kms.db.replaced-")
        })
        .collect();
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_eq!(mode(&replaced[0]), 0o600);
    let verified = run_ok(&["db", "verify", s(&replaced[0])]).await;
    assert!(verified.contains("sound, 2 records"), "{verified}");

    let server = site.serve();
    let client2 = client(&server, &site.ca);
    assert_eq!(
        client2.unseal(&kept.node, &kept.blob).await.unwrap(),
        kept.passphrase
    );
    assert_ne!(
        client2.unseal(&later.node, &later.blob).await.unwrap(),
        later.passphrase,
        "sealed after the backup: gone from the restored database"
    );
    stop(server).await;

    let audit = std::fs::read_to_string(site.file("talos-kms-server-audit.jsonl")).unwrap();
    let restore_line = audit
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|event| event["command"] == "db" && event["args"][0] == "restore")
        .unwrap_or_else(|| panic!("no audit line for the restore: {audit}"));
    assert!(
        restore_line["detail"]
            .as_str()
            .unwrap()
            .contains(".replaced-"),
        "{restore_line}"
    );
    for secret in [&kept.blob[..12], &later.blob[..12]] {
        assert!(
            !audit.contains(&BASE64.encode(secret)),
            "a nonce in {audit}"
        );
    }
}

/// The legacy server's Unseal of an exported record, as docs/protocol.md §4 describes it,
/// with RustCrypto's AES-GCM rather than the server's aws-lc-rs.
fn legacy_unseal(record: &serde_json::Value, blob: &[u8]) -> Vec<u8> {
    let field = |name: &str| record[name].as_str().unwrap().to_string();
    let nonce = BASE64.decode(field("nonceB64")).unwrap();
    assert_eq!(nonce, &blob[..12], "the record of this blob");
    let aad = [field("nodeUuid").as_bytes(), field("ipAddress").as_bytes()].concat();
    Aes256Gcm::new_from_slice(&blob[12..44])
        .unwrap()
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &BASE64.decode(field("cipherTextB64")).unwrap(),
                aad: &aad,
            },
        )
        .unwrap()
}

fn exported(path: &Path) -> Vec<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_json_is_the_legacy_format_and_imports_back() {
    let site = Site::new();
    let config = s(&site.config);
    let server = site.serve();
    let client1 = client(&server, &site.ca);
    let mut seals = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        seals.push(seal(&client1, node).await);
    }
    let listed = run_ok(&["keys", "list", "--config", config, "--output", "json"]).await;
    let revoked_id = listed
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|record| record["node_uuid"] == "node-b")
        .unwrap()["id"]
        .to_string();
    run_ok(&["keys", "revoke", &revoked_id, "--config", config]).await;

    let file = site.file("nodeDbFile.json");
    let said = run_ok(&["export-json", s(&file), "--config", config]).await;
    assert!(
        said.contains("exported 2 records (1 revoked left out)"),
        "{said}"
    );
    assert_eq!(mode(&file), 0o600);
    let records = exported(&file);
    assert_eq!(records.len(), 2);
    for record in &records {
        let sealed = seals
            .iter()
            .find(|sealed| record["nodeUuid"] == sealed.node.as_str())
            .unwrap();
        assert_ne!(sealed.node, "node-b", "revoked: left out");
        assert_eq!(legacy_unseal(record, &sealed.blob), sealed.passphrase);
        assert_eq!(record["ipAddress"], "127.0.0.1");
        let created = record["createdAt"].as_str().unwrap();
        assert!(
            time::PrimitiveDateTime::parse(
                created,
                time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]")
            )
            .is_ok(),
            "{created}"
        );
        // Never unsealed: the legacy server wrote the seal time there.
        assert_eq!(record["lastAccess"], record["createdAt"]);
    }

    let again = kms_fails(&["export-json", s(&file), "--config", config]).await;
    assert!(
        again.contains("exists") && again.contains("--force"),
        "{again}"
    );
    let said = run_ok(&[
        "export-json",
        s(&file),
        "--config",
        config,
        "--include-revoked",
        "--force",
    ])
    .await;
    assert!(
        said.contains("exported 3 records (1 revoked included)"),
        "{said}"
    );
    let records = exported(&file);
    assert_eq!(records.len(), 3);
    for sealed in &seals {
        let record = records
            .iter()
            .find(|record| record["nodeUuid"] == sealed.node.as_str())
            .unwrap();
        assert_eq!(legacy_unseal(record, &sealed.blob), sealed.passphrase);
        assert!(!said.contains(record["nonceB64"].as_str().unwrap()));
    }
    stop(server).await;

    // The export taken over by a fresh database: the same blobs unseal through a server.
    let other = Site::new();
    let imported = run_ok(&["import-json", s(&file), "--config", s(&other.config)]).await;
    assert!(imported.contains("imported 3 records"), "{imported}");
    let server2 = other.serve();
    let client2 = client(&server2, &other.ca);
    for sealed in &seals {
        assert_eq!(
            client2.unseal(&sealed.node, &sealed.blob).await.unwrap(),
            sealed.passphrase,
            "{} after the round trip",
            sealed.node
        );
    }
    stop(server2).await;
}

/// The journal files SQLite keeps beside a database while it is open.
fn journal_beside(database: &Path) -> Vec<String> {
    ["-wal", "-shm"]
        .iter()
        .map(|suffix| format!("{}{suffix}", database.display()))
        .filter(|file| Path::new(file).exists())
        .collect()
}

/// The most common backup there is: stop the service, copy the `.db` file. A clean stop
/// leaves every record in that file, with no journal beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_stop_a_copy_of_the_database_file_alone_unseals_every_record() {
    let site = Site::new();
    let server = site.serve();
    let original = client(&server, &site.ca);
    let mut sealed = Vec::new();
    for n in 0..20 {
        sealed.push(seal(&original, &format!("node-{n}")).await);
    }
    original
        .unseal(&sealed[0].node, &sealed[0].blob)
        .await
        .unwrap();
    assert!(
        !journal_beside(&site.database()).is_empty(),
        "a serving database has its journal beside it"
    );
    let verified = run_ok(&["db", "verify", s(&site.database())]).await;
    assert!(
        verified.contains("warning: ") && verified.contains("-wal is beside it"),
        "{verified}"
    );
    stop(server).await;
    assert_eq!(journal_beside(&site.database()), Vec::<String>::new());

    let copy = Site::new();
    std::fs::copy(site.database(), copy.database()).unwrap();
    let verified = run_ok(&["db", "verify", s(&copy.database())]).await;
    assert!(verified.contains("sound, 20 records"), "{verified}");
    assert!(!verified.contains("warning"), "{verified}");
    let server = copy.serve();
    let from_copy = client(&server, &copy.ca);
    for record in &sealed {
        let passphrase = from_copy.unseal(&record.node, &record.blob).await.unwrap();
        assert_eq!(
            passphrase, record.passphrase,
            "{} from the copy",
            record.node
        );
    }
    stop(server).await;
}

/// Every command that writes a database leaves it whole, with no journal to forget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_write_a_database_leave_no_journal_beside_it() {
    let site = Site::new();
    let filled = site.file("filled.db");
    run_ok(&["fill", "--database", s(&filled), "--records", "300"]).await;
    assert_eq!(journal_beside(&filled), Vec::<String>::new(), "fill");

    // Without a config, as import-json takes one.
    let export = site.file("exported.json");
    run_ok(&["export-json", "--database", s(&filled), s(&export)]).await;
    assert_eq!(exported(&export).len(), 300);

    let legacy = site.file("nodeDbFile.json");
    run_ok(&["fill", "--legacy-json", s(&legacy), "--records", "300"]).await;
    let imported = site.file("imported.db");
    run_ok(&["import-json", "--database", s(&imported), s(&legacy)]).await;
    assert_eq!(
        journal_beside(&imported),
        Vec::<String>::new(),
        "import-json"
    );

    let migrated = site.file("migrated.db");
    run_ok(&["db", "migrate", "--from", s(&filled), "--to", s(&migrated)]).await;
    assert_eq!(
        journal_beside(&migrated),
        Vec::<String>::new(),
        "db migrate"
    );
    assert_eq!(
        journal_beside(&filled),
        Vec::<String>::new(),
        "db migrate's source"
    );

    let config = s(&site.config);
    run_ok(&["db", "restore", "--config", config, s(&imported)]).await;
    assert_eq!(
        journal_beside(&site.database()),
        Vec::<String>::new(),
        "db restore"
    );
    let verified = run_ok(&["db", "verify", s(&site.database())]).await;
    assert!(verified.contains("sound, 300 records"), "{verified}");
    assert!(!verified.contains("warning"), "{verified}");
}
