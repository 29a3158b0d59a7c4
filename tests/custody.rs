//! Key custody over a database that already holds records: configuring a key source wraps
//! them while the server serves, a kill -9 halfway loses nothing, and every record still
//! unseals for its node afterwards; data key rotation and shredding with nodes at work.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use talos_kms_server::bench::{Volume, volumes};

const RECORDS: u64 = 20_000;

fn fill(database: &Path, volumes: &Path, records: u64) {
    let output = run_binary(&[
        "fill",
        "--database",
        database.to_str().unwrap(),
        "--records",
        &records.to_string(),
        "--ip",
        "127.0.0.1",
        "--volumes",
        volumes.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Records wrapped (any data key version), and all of them.
fn wrapped(database: &Path) -> (i64, i64) {
    let db = rusqlite::Connection::open_with_flags(
        database,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.query_row(
        "SELECT count(*) FILTER (WHERE hex(substr(ciphertext, 1, 4)) = '544B5231'), count(*)
         FROM records",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .unwrap()
}

fn with_key_file(setup: &Setup) {
    setup.rewrite("keySource: {file: root.key}\nmaxNewRecordsPerHour: 0\n");
    let output = run_binary(&["key-source", "init", "--config", setup.config_str()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Waits (at most `limit`) for a log line containing `wanted`.
fn wait_for_line(server: &ServerProcess, wanted: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(200)) {
            let found = line.contains(wanted);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }
    panic!("no log line with {wanted:?} within {limit:?}: {}", seen.join("\n"));
}

/// Every `step`-th volume unseals to its passphrase.
async fn unseal_sample(client: &talos_kms_server::client::KmsClient, all: &[Volume], step: usize) {
    for volume in all.iter().step_by(step) {
        let passphrase = client
            .unseal(&volume.node_uuid, &volume.sealed)
            .await
            .unwrap();
        assert_eq!(passphrase, volume.passphrase, "{}", volume.node_uuid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_database_is_wrapped_while_serving_and_a_kill_9_halfway_loses_nothing() {
    let setup = Setup::new("");
    let database = setup.dir.path().join("kms.db");
    let volumes_file = setup.dir.path().join("volumes.jsonl");
    fill(&database, &volumes_file, RECORDS);
    let all = volumes::read(&volumes_file).unwrap();
    with_key_file(&setup);

    let config = setup.config.clone();
    let mut server = ServerProcess::start(&config).unwrap();
    // Killed as soon as some, not all, records are wrapped.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut partial = (0, 0);
    while Instant::now() < deadline {
        partial = wrapped(&database);
        if partial.0 > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    server.kill9();
    let after_kill = wrapped(&database);
    assert!(partial.0 > 0, "wrapping never started");
    assert_eq!(after_kill.1, RECORDS as i64, "no record lost to the kill");
    eprintln!("killed with {} of {} records wrapped", after_kill.0, after_kill.1);

    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &setup.pki.ca, None);
    // Records unseal while they are being wrapped, and after.
    unseal_sample(&client, &all, 997).await;
    wait_for_line(&server, "every record is wrapped", Duration::from_secs(120));
    assert_eq!(wrapped(&database), (RECORDS as i64, RECORDS as i64));
    unseal_sample(&client, &all, 401).await;

    // A new seal is wrapped at once, and unseals.
    let passphrase = random_passphrase();
    let blob = client.seal("custody-node", &passphrase).await.unwrap();
    assert_eq!(blob.len(), 44, "the blob nodes keep does not change");
    assert_eq!(wrapped(&database), (RECORDS as i64 + 1, RECORDS as i64 + 1));
    assert_eq!(
        client.unseal("custody-node", &blob).await.unwrap(),
        passphrase
    );
    assert!(server.terminate().success());
}
