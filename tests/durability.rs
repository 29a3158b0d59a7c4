//! Nothing acknowledged is ever lost: kill -9 mid-burst, graceful stop, file permissions.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_of_concurrent_seals_loses_no_acknowledged_seal() {
    let setup = Setup::new("");
    let dir = &setup.dir;
    let pki = &setup.pki;
    let config = &setup.config;
    let mut server = ServerProcess::start(config).unwrap();
    let client = Arc::new(client_for("127.0.0.1", server.addr.port(), &pki.ca, None));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));

    // 16 nodes seal in a loop (bounded: 2,000 calls or 20 s each) until the server dies.
    let mut workers = Vec::new();
    for worker in 0..16 {
        let (client, acknowledged) = (Arc::clone(&client), Arc::clone(&acknowledged));
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            for call in 0..2_000 {
                if Instant::now() > deadline {
                    break;
                }
                let node = format!("node-{worker}-{call}");
                let passphrase = random_passphrase();
                match client.seal(&node, &passphrase).await {
                    Ok(sealed) => acknowledged
                        .lock()
                        .unwrap()
                        .push((node, passphrase, sealed)),
                    Err(_) => break,
                }
            }
        }));
    }
    // Kill once a good number of seals are acknowledged (at most 20 s from now).
    let start = Instant::now();
    while acknowledged.lock().unwrap().len() < 200 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    for worker in workers {
        worker.await.unwrap();
    }
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert!(
        acknowledged.len() >= 50,
        "only {} seals before the kill",
        acknowledged.len()
    );

    let server = ServerProcess::start(config).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    drop(db);
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let mut connection = client.connect().await.unwrap();
    for (node, passphrase, sealed) in &acknowledged {
        let unsealed = connection.unseal(node, sealed).await.unwrap();
        assert_eq!(
            &unsealed, passphrase,
            "acknowledged seal for {node} was lost"
        );
    }
    drop(connection);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_stops_cleanly_with_exit_0_and_private_files() {
    let running = Running::start("");
    let dir = &running.dir;
    let client = running.client();
    let sealed = client.seal(NODE, &random_passphrase()).await.unwrap();
    client.unseal(NODE, &sealed).await.unwrap();

    for name in ["kms.db", "kms.db-wal"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} must be private");
    }
    let server = running.server;
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let last_access: Option<i64> = db
        .query_row("SELECT last_access FROM records", [], |r| r.get(0))
        .unwrap();
    assert!(
        last_access.is_some(),
        "access times are flushed at shutdown"
    );
}

#[test]
fn a_foreign_sqlite_file_is_refused_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("CREATE TABLE photos (id INTEGER)")
        .unwrap();
    drop(other);
    let error = talos_kms_server::store::SqliteStore::open(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("another program"), "{error}");
    let other = rusqlite::Connection::open(&path).unwrap();
    let tables: i64 = other
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 1, "the foreign file is left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log_even_at_trace_level() {
    let setup = Setup::new("");
    let pki = &setup.pki;
    let config = &setup.config;
    let text = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        text.replace("kmsLogLevel: INFO", "kmsLogLevel: TRACE")
            .replace("rootLogLevel: WARNING", "rootLogLevel: TRACE"),
    )
    .unwrap();
    let mut server = ServerProcess::start(config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    client.unseal(NODE, &sealed).await.unwrap();
    let mut wrong = sealed.clone();
    wrong[20] ^= 1;
    client.unseal(NODE, &wrong).await.unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
        let status = server.terminate();
        std::thread::sleep(std::time::Duration::from_millis(200));
        (status, log.try_iter().collect::<Vec<_>>().join("\n"))
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert!(status.success());
    assert!(
        log.contains("unsealed") && log.contains("unseal refused"),
        "the log is being captured: {log}"
    );

    assert_no_secret(
        &log,
        "the log",
        &[
            ("passphrase", &passphrase[..]),
            ("key", &sealed[12..]),
            ("blob", &sealed[..]),
        ],
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert!(
        !log.contains(&b64.encode(&sealed[..12])),
        "the nonce is part of the blob: not logged either"
    );
}
