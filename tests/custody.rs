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
    let db =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
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
    setup.rewrite(
        "keySource: {file: root.key}\nmaxNewRecordsPerHour: 0\nmetricsAddress: 127.0.0.1:0\n",
    );
    let output = run_binary(&["key-source", "init", "--config", setup.config_str()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Waits (at most `limit`) for a log line containing `wanted`.
fn wait_for_line(server: &ServerProcess, wanted: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    if server.startup_log.iter().any(|line| line.contains(wanted)) {
        return server.startup_log.clone();
    }
    while Instant::now() < deadline {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(200)) {
            let found = line.contains(wanted);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }
    panic!(
        "no log line with {wanted:?} within {limit:?}: {}",
        seen.join("\n")
    );
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
    eprintln!(
        "killed with {} of {} records wrapped",
        after_kill.0, after_kill.1
    );

    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &setup.pki.ca, None);
    // Records unseal while they are being wrapped, and after.
    unseal_sample(&client, &all, 997).await;
    wait_for_line(&server, "every record is wrapped", Duration::from_secs(120));
    assert_eq!(wrapped(&database), (RECORDS as i64, RECORDS as i64));
    let metrics = scrape(&server.metrics_address(), None);
    for line in [
        format!("talos_kms_custody_records{{key_version=\"v1\"}} {RECORDS}"),
        "talos_kms_custody_rewrap_remaining 0".to_string(),
        "talos_kms_custody_sealed 0".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
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

/// A server stopped cleanly, its directory and certificates kept for the next start.
struct Stopped {
    dir: tempfile::TempDir,
    pki: Pki,
    config: std::path::PathBuf,
}

fn stop_server(running: Running) -> Stopped {
    let Running {
        dir,
        server,
        pki,
        config,
    } = running;
    assert!(server.terminate().success());
    Stopped { dir, pki, config }
}

impl Stopped {
    fn start(self, config: &Path) -> Running {
        Running {
            server: ServerProcess::start(config).unwrap(),
            pki: self.pki,
            config: config.to_path_buf(),
            dir: self.dir,
        }
    }
}

/// Records under data key `version` (SQLite's view).
fn under_version(database: &Path, version: i64) -> i64 {
    let db =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.query_row(
        "SELECT count(*) FROM records WHERE key_version = ?1",
        [version],
        |row| row.get(0),
    )
    .unwrap()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Clone)]
struct SealedVolume {
    node: String,
    source: String,
    passphrase: [u8; 32],
    blob: Vec<u8>,
}

/// Four nodes sealing and unsealing until `stop`; every volume they sealed, and how many
/// calls failed or answered a wrong passphrase.
async fn nodes_at_work(
    running: &Running,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<SealedVolume>, usize) {
    let mut tasks = Vec::new();
    for n in 0..4 {
        let source = format!("127.0.0.{}", 11 + n);
        let client = running.node(&source);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sealed, mut failed) = (Vec::new(), 0);
            for round in 0..10_000 {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let node = format!("rotation-node-{n}-{round}");
                let passphrase = random_passphrase();
                match client.seal(&node, &passphrase).await {
                    Ok(blob) => sealed.push(SealedVolume {
                        node,
                        source: source.clone(),
                        passphrase,
                        blob,
                    }),
                    Err(_) => failed += 1,
                }
                for volume in sealed.iter().rev().take(3) {
                    match client.unseal(&volume.node, &volume.blob).await {
                        Ok(p) if p == volume.passphrase => {}
                        _ => failed += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (sealed, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for task in tasks {
        let (sealed, f) = task.await.unwrap();
        all.extend(sealed);
        failed += f;
    }
    (all, failed)
}

/// `count` volumes of nodes `PREFIX-N`, sealed from `source`.
async fn seal_volumes(
    running: &Running,
    source: &str,
    prefix: &str,
    count: usize,
) -> Vec<SealedVolume> {
    let client = running.node(source);
    let mut sealed = Vec::new();
    for i in 0..count {
        let node = format!("{prefix}-{i}");
        let passphrase = random_passphrase();
        let blob = client.seal(&node, &passphrase).await.unwrap();
        sealed.push(SealedVolume {
            node,
            source: source.into(),
            passphrase,
            blob,
        });
    }
    sealed
}

async fn unseals_all(running: &Running, volumes: &[SealedVolume]) -> usize {
    let mut right = 0;
    for volume in volumes {
        let client = running.node(&volume.source);
        if client
            .unseal(&volume.node, &volume.blob)
            .await
            .ok()
            .as_deref()
            == Some(&volume.passphrase[..])
        {
            right += 1;
        }
    }
    right
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_key_and_root_rotate_under_load_with_no_failed_call_and_a_destroyed_key_shreds() {
    let setup = Setup::new("");
    with_key_file(&setup);
    let database = setup.dir.path().join("kms.db");
    let config_text = std::fs::read_to_string(&setup.config).unwrap();
    let new_config = setup.dir.path().join("new-root.yaml");
    std::fs::write(&new_config, config_text.replace("root.key", "new-root.key")).unwrap();
    let new_config = new_config.to_str().unwrap().to_string();
    run_ok(&["key-source", "init", "--config", &new_config]).await;

    let running = setup.start();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let running = &running;
        async move { nodes_at_work(running, stop).await }
    };
    let config = running.config_str().to_string();
    let operator = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let out = run_ok(&["keys", "rotate-data-key", "--config", &config]).await;
        assert!(out.contains("made data key v2"), "{out}");
        // The server picks v2 up and re-wraps every v1 record while the nodes work.
        let db = database.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("every record under v2", Duration::from_secs(60), || {
                under_version(&db, 1) == 0 && under_version(&db, 2) > 0
            })
        })
        .await
        .unwrap();
        let out = run_ok(&[
            "keys",
            "rotate-root",
            "--config",
            &config,
            "--to-config",
            &new_config,
        ])
        .await;
        assert!(out.contains("re-wrapped data keys [1, 2]"), "{out}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Release);
    };
    let ((volumes, failed), ()) = tokio::join!(load, operator);
    assert!(
        volumes.len() > 20,
        "the nodes sealed throughout: {}",
        volumes.len()
    );
    assert_eq!(failed, 0, "no call failed during the rotations");

    // The old root no longer opens the data keys; the new one opens every record.
    let stopped = stop_server(running);
    let config = stopped.config.clone();
    let refused = run_binary(&[
        "keys",
        "rotate-data-key",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("does not unwrap under this root key"),
        "{}",
        text(&refused.stderr)
    );
    std::fs::copy(&new_config, &config).unwrap();
    let running = stopped.start(&config);
    assert_eq!(unseals_all(&running, &volumes).await, volumes.len());
    let config = running.config_str().to_string();

    // v1 is unused: it goes. v2 is current: refused.
    let out = run_ok(&[
        "keys",
        "destroy-data-key",
        "1",
        "--yes",
        "--config",
        &config,
    ])
    .await;
    assert!(out.contains("0 records"), "{out}");
    let current = run_binary(&[
        "keys",
        "destroy-data-key",
        "2",
        "--yes",
        "--config",
        &config,
    ]);
    assert!(text(&current.stderr).contains("is the current data key"));

    // Crypto-shredding: with v3 made while no server re-wraps, v2's records are refused
    // until --shred, then unreadable for good.
    let stopped = stop_server(running);
    let config_path = stopped.config.clone();
    run_ok(&["keys", "rotate-data-key", "--config", &config]).await;
    let refused = run_binary(&[
        "keys",
        "destroy-data-key",
        "2",
        "--yes",
        "--config",
        &config,
    ]);
    assert!(
        text(&refused.stderr).contains("records are still wrapped under v2"),
        "{}",
        text(&refused.stderr)
    );
    let out = run_ok(&[
        "keys",
        "destroy-data-key",
        "2",
        "--shred",
        "--yes",
        "--config",
        &config,
    ])
    .await;
    assert!(out.contains(&format!("{} records", volumes.len())), "{out}");
    let running = stopped.start(&config_path);
    assert_eq!(
        unseals_all(&running, &volumes).await,
        0,
        "shredded for good"
    );
    let trail = running.admin(&["audit"]).await;
    for command in ["rotate-data-key", "rotate-root", "destroy-data-key"] {
        assert!(trail.contains(command), "{command} is audited: {trail}");
    }
}

/// Wrapped records and tagged policy rows move to PostgreSQL and back with their data keys;
/// a server on PostgreSQL with the same key source unseals them, and refuses them without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_migrate_keeps_the_wrapping_and_the_tags_both_ways() {
    let Some(pg) = common::postgres::PgCluster::start() else {
        return;
    };
    pg.create_database("kms");
    let url = pg.url("kms", "?sslmode=disable");
    let setup = Setup::new("");
    with_key_file(&setup);
    let sqlite = setup.dir.path().join("kms.db");
    let running = setup.start();
    let sealed = seal_volumes(&running, "127.0.0.21", "migrated", 10).await;
    running.admin(&["keys", "revoke", "1"]).await;
    running
        .admin(&["window", "open", "unseal", "--for", "1h"])
        .await;
    let stopped = stop_server(running);
    let config = stopped.config.clone();

    let out = run_ok(&[
        "db",
        "migrate",
        "--from",
        sqlite.to_str().unwrap(),
        "--to",
        &url,
    ])
    .await;
    assert!(out.contains("migrated 10 records"), "{out}");
    assert_eq!(
        pg.sql(
            "kms",
            "SELECT count(*) FROM records WHERE substr(ciphertext, 1, 4) = 'TKR1'"
        ),
        "10",
        "still wrapped on PostgreSQL"
    );
    assert_eq!(
        pg.sql(
            "kms",
            "SELECT count(*) FROM custody WHERE name LIKE 'data-key/%'"
        ),
        "1"
    );

    // A server on PostgreSQL with the same key source: everything but the revoked record.
    let config_text = std::fs::read_to_string(&config).unwrap();
    let sqlite_line = format!("database: {}", sqlite.display());
    let pg_config = stopped.dir.path().join("pg.yaml");
    std::fs::write(
        &pg_config,
        config_text.replace(
            &sqlite_line,
            &format!(
                "database: \"{url}\"\nauditLog: {}",
                stopped.dir.path().join("pg-audit.jsonl").display()
            ),
        ),
    )
    .unwrap();
    let running = stopped.start(&pg_config);
    let right = unseals_all(&running, &sealed).await;
    assert_eq!(right, sealed.len() - 1, "the revoked one stays revoked");
    let stopped = stop_server(running);

    // Without the key source the PostgreSQL database is refused, not served as empty.
    let keyless = stopped.dir.path().join("keyless.yaml");
    std::fs::write(
        &keyless,
        std::fs::read_to_string(&pg_config)
            .unwrap()
            .replace("keySource: {file: root.key}", ""),
    )
    .unwrap();
    let refused = ServerProcess::start(&keyless).err().unwrap_or_default();
    assert!(refused.contains("no `keySource`"), "{refused}");

    // And back to a new SQLite file, which the first config's key source opens.
    let back = stopped.dir.path().join("back.db");
    let out = run_ok(&[
        "db",
        "migrate",
        "--from",
        &url,
        "--to",
        back.to_str().unwrap(),
    ])
    .await;
    assert!(out.contains("migrated 10 records"), "{out}");
    std::fs::rename(&back, &sqlite).unwrap();
    let running = stopped.start(&config);
    assert_eq!(unseals_all(&running, &sealed).await, sealed.len() - 1);
}

/// Every record and custody value, as stored.
fn content(database: &Path) -> Vec<String> {
    let db =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut rows = Vec::new();
    for query in [
        "SELECT id || hex(nonce) || hex(ciphertext) || coalesce(hex(tag), '') FROM records",
        "SELECT name || hex(value) FROM custody",
    ] {
        let mut statement = db.prepare(query).unwrap();
        let found = statement
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap();
        rows.extend(found.map(Result::unwrap));
    }
    assert!(rows.len() >= 2, "{rows:?}");
    rows
}

/// A backup stays wrapped: restoring it is refused under a config whose key source cannot
/// open its data keys (another key file, or none), before the database is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_only_under_the_key_source_that_wrapped_it() {
    let setup = Setup::new("");
    with_key_file(&setup);
    let running = setup.start();
    let client = running.node("127.0.0.31");
    let passphrase = random_passphrase();
    let blob = client.seal("backed-up", &passphrase).await.unwrap();
    let backup = running.dir.path().join("backup.db");
    running
        .admin(&["db", "backup", backup.to_str().unwrap()])
        .await;
    let stopped = stop_server(running);
    let config = stopped.config.clone();
    let config_text = std::fs::read_to_string(&config).unwrap();
    let database = stopped.dir.path().join("kms.db");
    let before = content(&database);

    let other = stopped.dir.path().join("other.yaml");
    std::fs::write(&other, config_text.replace("root.key", "other.key")).unwrap();
    run_ok(&["key-source", "init", "--config", other.to_str().unwrap()]).await;
    let keyless = stopped.dir.path().join("keyless.yaml");
    std::fs::write(
        &keyless,
        config_text.replace("keySource: {file: root.key}", ""),
    )
    .unwrap();
    for (config, problem) in [
        (&other, "does not unwrap under this root key"),
        (&keyless, "no `keySource`"),
    ] {
        let refused = run_binary(&[
            "db",
            "restore",
            backup.to_str().unwrap(),
            "--force",
            "--config",
            config.to_str().unwrap(),
        ]);
        assert_eq!(refused.status.code(), Some(1));
        let stderr = text(&refused.stderr);
        assert!(
            stderr.contains(problem) && stderr.contains("cannot be restored"),
            "{stderr}"
        );
        assert!(content(&database) == before, "the database is untouched");
    }

    // A server given another key file refuses the database rather than start afresh.
    let refused = ServerProcess::start(&other).err().unwrap_or_default();
    assert!(
        refused.contains("does not unwrap under this root key"),
        "{refused}"
    );
    assert!(content(&database) == before, "the database is untouched");

    let out = run_ok(&[
        "db",
        "restore",
        backup.to_str().unwrap(),
        "--force",
        "--config",
        config.to_str().unwrap(),
    ])
    .await;
    assert!(out.contains("restored 1 records"), "{out}");
    let running = stopped.start(&config);
    assert_eq!(
        running
            .node("127.0.0.31")
            .unseal("backed-up", &blob)
            .await
            .unwrap(),
        passphrase
    );
}

/// `export-json` needs the key source and writes the legacy format as before: a keyless
/// server that imports the file unseals every record; without a config it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_json_opens_the_records_into_the_legacy_format() {
    let setup = Setup::new("");
    with_key_file(&setup);
    let running = setup.start();
    let sealed = seal_volumes(&running, "127.0.0.41", "exported", 3).await;
    let file = running.dir.path().join("export.json");
    let out = running
        .admin(&["export-json", file.to_str().unwrap()])
        .await;
    assert!(out.contains("exported 3 records"), "{out}");
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for record in exported.as_array().unwrap() {
        use base64::Engine;
        let ciphertext = base64::engine::general_purpose::STANDARD
            .decode(record["cipherTextB64"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            ciphertext.len(),
            48,
            "the legacy ciphertext, not an envelope"
        );
    }
    let database = running.dir.path().join("kms.db");
    let refused = run_binary(&[
        "export-json",
        running.dir.path().join("raw.json").to_str().unwrap(),
        "--database",
        database.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("export it with --config"),
        "{}",
        text(&refused.stderr)
    );

    let keyless = Setup::new("");
    let imported = run_ok(&[
        "import-json",
        file.to_str().unwrap(),
        "--config",
        keyless.config_str(),
    ])
    .await;
    assert!(imported.contains("imported 3 records"), "{imported}");
    let keyless = keyless.start();
    assert_eq!(unseals_all(&keyless, &sealed).await, sealed.len());
}

/// Records from outside enter a wrapped database only through the key source: `import-json
/// --config` wraps them (they unseal); `import-json --database` alone, `db migrate` of an
/// unwrapped database into it and `fill` are refused, the database untouched (copied as they were, they
/// would be refused as forgeries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrapped_records_enter_a_wrapped_database_only_through_the_key_source() {
    // A keyless server's records, exported as the legacy format, and its database.
    let keyless = Setup::new("").start();
    let sealed = seal_volumes(&keyless, "127.0.0.61", "imported", 3).await;
    let legacy = keyless.dir.path().join("legacy.json");
    keyless
        .admin(&["export-json", legacy.to_str().unwrap()])
        .await;
    let keyless = stop_server(keyless);
    let unwrapped = keyless.dir.path().join("kms.db");

    let setup = Setup::new("");
    with_key_file(&setup);
    let running = setup.start();
    let database = running.dir.path().join("kms.db");
    // The server's own first pass notes that nothing is left to adopt.
    wait_for_line(
        &running.server,
        "every record is wrapped",
        Duration::from_secs(30),
    );
    let before = content(&database);
    for refused in [
        run_binary(&[
            "import-json",
            legacy.to_str().unwrap(),
            "--database",
            database.to_str().unwrap(),
        ]),
        run_binary(&[
            "db",
            "migrate",
            "--from",
            unwrapped.to_str().unwrap(),
            "--to",
            database.to_str().unwrap(),
        ]),
        run_binary(&[
            "fill",
            "--database",
            database.to_str().unwrap(),
            "--records",
            "1",
        ]),
    ] {
        assert_eq!(refused.status.code(), Some(1));
        let stderr = text(&refused.stderr);
        assert!(stderr.contains("wrapped under a key source"), "{stderr}");
    }
    assert!(content(&database) == before, "the database is untouched");

    let out = running
        .admin(&["import-json", legacy.to_str().unwrap()])
        .await;
    assert!(out.contains("imported 3 records"), "{out}");
    assert_eq!(wrapped(&database), (3, 3), "imported records are wrapped");
    assert_eq!(unseals_all(&running, &sealed).await, sealed.len());
}
