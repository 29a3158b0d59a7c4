//! The PostgreSQL store with the real parts: a PostgreSQL server of the machine's own
//! (started per test on loopback), the server binary as replicas sharing it, the CLI.
//! Seal on one replica and unseal on another; revocations, windows and approvals obeyed by
//! all; a seal storm through a replica's kill -9 and a PostgreSQL crash; SQLite to
//! PostgreSQL and back; passwords; TLS to PostgreSQL.

mod common;

use common::postgres::{ClusterOptions, PgCluster};
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use talos_kms_server::client::{ClientError, KmsClient};
use talos_kms_server::store::{
    self, ApprovalState, Database, Decision, ImportBatch, Inserted, NewRecord, NodeLimits,
    Operation, PgOptions, PgStore, RecordFilter, RecordState, SqliteStore, Store, Window,
};

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A config for a replica in `dir`, on `database`, with its own audit trail.
fn replica_config(dir: &Path, pki: &Pki, database: &str, extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.yaml");
    write_private(
        &path,
        &format!(
            "database: \"{database}\"\nauditLog: {}\nserverCertFile: {}\nserverKeyFile: {}\n\
             port: 0\nbindAddress: \"127.0.0.1\"\nkmsLogLevel: INFO\nrootLogLevel: WARNING\n\
             {extra}",
            dir.join("audit.jsonl").display(),
            pki.cert.display(),
            pki.key.display(),
        ),
    );
    path
}

fn client(server: &ServerProcess, pki: &Pki) -> KmsClient {
    client_for("127.0.0.1", server.addr.port(), &pki.ca, None)
}

fn pg_options(url: &str) -> PgOptions {
    PgOptions::parse(url, Path::new("/")).unwrap()
}

/// A refusal by the server with this gRPC code, and its message.
fn refused_with(result: &Result<Vec<u8>, ClientError>, code: tonic::Code) -> Option<String> {
    match result {
        Err(ClientError::Status(status)) if status.code() == code => {
            Some(status.message().to_string())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_on_one_replica_unseals_on_another_and_a_cli_revocation_binds_both() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let url = pg.url("kms", "?sslmode=disable");
    let a = ServerProcess::start(&replica_config(&dir.path().join("a"), &pki, &url, "")).unwrap();
    let b = ServerProcess::start(&replica_config(&dir.path().join("b"), &pki, &url, "")).unwrap();
    let (ca, cb) = (client(&a, &pki), client(&b, &pki));

    let passphrase = random_passphrase();
    let sealed = ca.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(cb.unseal(NODE, &sealed).await.unwrap(), passphrase);
    let other = random_passphrase();
    let sealed_b = cb.seal(NODE, &other).await.unwrap();
    assert_eq!(ca.unseal(NODE, &sealed_b).await.unwrap(), other);

    // The CLI, with the same config, revokes for every replica at once.
    let config = dir.path().join("a/config.yaml");
    run_ok(&["keys", "revoke", "--node", NODE, "--config", s(&config)]).await;
    for client in [&ca, &cb] {
        for (blob, secret) in [(&sealed, passphrase), (&sealed_b, other)] {
            let answer = client.unseal(NODE, blob).await.unwrap();
            assert_eq!(answer.len(), 32);
            assert_ne!(
                answer, secret,
                "a revoked record must not unseal on any replica"
            );
        }
    }
    let listed = run_ok(&["keys", "list", "--config", s(&config)]).await;
    assert!(listed.contains("revoked"), "{listed}");
    let ids: Vec<String> = listed
        .lines()
        .filter(|line| line.contains(NODE))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|id| id.parse::<i64>().is_ok())
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    let mut restore = vec!["keys", "restore"];
    restore.extend(ids.iter().map(String::as_str));
    restore.extend(["--config", s(&config)]);
    run_ok(&restore).await;
    assert_eq!(cb.unseal(NODE, &sealed).await.unwrap(), passphrase);
    assert_eq!(ca.unseal(NODE, &sealed_b).await.unwrap(), other);

    // Unseals on both were noted: access times reach the shared database.
    a.terminate();
    b.terminate();
    let accessed = pg.sql(
        "kms",
        "SELECT count(*) FROM records WHERE last_access IS NOT NULL",
    );
    assert_eq!(accessed, "2");
    assert!(
        std::fs::read_to_string(dir.path().join("a/audit.jsonl"))
            .unwrap()
            .contains("\"seal\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_and_approvals_set_through_one_are_obeyed_by_every_replica() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let url = pg.url("kms", "");
    let policy = "sealPolicy: window\nunsealPolicy: approve\n";
    let a =
        ServerProcess::start(&replica_config(&dir.path().join("a"), &pki, &url, policy)).unwrap();
    let b =
        ServerProcess::start(&replica_config(&dir.path().join("b"), &pki, &url, policy)).unwrap();
    let (ca, cb) = (client(&a, &pki), client(&b, &pki));
    // What the `window` and `pending` commands change: the shared store.
    let admin = PgStore::open(&pg_options(&url)).await.unwrap();

    let passphrase = random_passphrase();
    let closed = ca.seal(NODE, &passphrase).await;
    let message = refused_with(&closed, tonic::Code::Unavailable).expect("refused");
    assert!(message.contains("no seal window"), "{message}");
    let now = store::now();
    admin
        .open_window(Window {
            operation: Operation::Seal,
            opened_at: now,
            closes_at: now + 600,
            tag: None,
        })
        .await
        .unwrap();
    let sealed = cb.seal(NODE, &passphrase).await.unwrap();
    ca.seal(NODE, &random_passphrase()).await.unwrap();
    assert!(admin.close_window(Operation::Seal).await.unwrap());
    assert!(refused_with(&cb.seal(NODE, &passphrase).await, tonic::Code::Unavailable).is_some());
    assert!(refused_with(&ca.seal(NODE, &passphrase).await, tonic::Code::Unavailable).is_some());

    // An unseal asked through A waits for approval; approved once, B lets it through.
    let waiting = ca.unseal(NODE, &sealed).await;
    let message = refused_with(&waiting, tonic::Code::Unavailable).expect("refused");
    assert!(message.contains("approval"), "{message}");
    let pending = admin.approvals(Some(ApprovalState::Pending)).await.unwrap();
    assert_eq!(pending.len(), 1);
    let waiting = cb.unseal(NODE, &sealed).await;
    assert!(refused_with(&waiting, tonic::Code::Unavailable).is_some());
    let noted = admin.approvals(None).await.unwrap();
    assert_eq!(noted.len(), 1, "both replicas noted the same request");
    assert_eq!(noted[0].attempts, 2);
    admin
        .decide(
            pending[0].id,
            Decision::Approve {
                until: store::now() + 600,
            },
            store::now(),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cb.unseal(NODE, &sealed).await.unwrap(), passphrase);
    assert_eq!(ca.unseal(NODE, &sealed).await.unwrap(), passphrase);
    admin
        .decide(pending[0].id, Decision::Deny, store::now(), None)
        .await
        .unwrap();
    let denied = ca.unseal(NODE, &sealed).await;
    assert!(
        denied.is_err(),
        "a denied unseal is refused by every replica"
    );
    assert!(cb.unseal(NODE, &sealed).await.is_err());
}

/// One acknowledged seal: which node, what passphrase, the blob the node keeps.
#[derive(Clone)]
struct Acked {
    node: String,
    passphrase: [u8; 32],
    blob: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seal_storm_survives_a_replica_killed_and_postgres_crashing() {
    let Some(mut pg) = PgCluster::start() else {
        return;
    };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let url = pg.url("kms", "?sslmode=disable&pool_max_size=4");
    let config_a = replica_config(&dir.path().join("a"), &pki, &url, "");
    let config_b = replica_config(&dir.path().join("b"), &pki, &url, "");
    let mut a = ServerProcess::start(&config_a).unwrap();
    let b = ServerProcess::start(&config_b).unwrap();
    let ports = [a.addr.port(), b.addr.port()];
    assert_eq!(grpc_health(ports[1], &pki.ca).await, SERVING);

    // Sealers: each alternates between the replicas until told to stop (at most 3,000 calls).
    let stop = Arc::new(AtomicBool::new(false));
    let b_killed = Arc::new(AtomicBool::new(false));
    let mut sealers = Vec::new();
    for worker in 0..6 {
        let (stop, a_killed, ca) = (Arc::clone(&stop), Arc::clone(&b_killed), pki.ca.clone());
        sealers.push(tokio::spawn(async move {
            let clients: Vec<KmsClient> = ports
                .iter()
                .map(|port| client_for("127.0.0.1", *port, &ca, None))
                .collect();
            let (mut acked, mut unavailable, mut wrong) = (Vec::new(), 0u64, Vec::new());
            for call in 0..500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let which = (worker + call) % 2;
                let node = format!("node-{worker}-{call}");
                let passphrase = random_passphrase();
                match clients[which].seal(&node, &passphrase).await {
                    Ok(blob) => acked.push(Acked {
                        node,
                        passphrase,
                        blob,
                    }),
                    Err(ClientError::Status(status))
                        if status.code() == tonic::Code::Unavailable =>
                    {
                        unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // A killed replica stops answering: its connections fail.
                    Err(_) if which == 0 && a_killed.load(Ordering::Relaxed) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => wrong.push(format!("replica {which}: {error}")),
                }
            }
            (acked, unavailable, wrong)
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    b_killed.store(true, Ordering::Relaxed);
    a.kill9();
    // Seal one now, to unseal during the outage.
    let cb = client_for("127.0.0.1", ports[1], &pki.ca, None);
    let known_passphrase = random_passphrase();
    let known = cb.seal(NODE, &known_passphrase).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    pg.crash();
    let outage = Instant::now();
    // Calls fail with UNAVAILABLE, never with data, and health says NOT_SERVING.
    let during = cb.unseal(NODE, &known).await;
    assert!(
        refused_with(&during, tonic::Code::Unavailable).is_some(),
        "an unseal while PostgreSQL is down must be UNAVAILABLE, got {:?}",
        during.map(|data| data.len())
    );
    let sealed_during = cb.seal(NODE, &random_passphrase()).await;
    assert!(
        refused_with(&sealed_during, tonic::Code::Unavailable).is_some(),
        "{:?}",
        sealed_during.map(|data| data.len())
    );
    let limit = Duration::from_secs(20).saturating_sub(outage.elapsed());
    let health = wait_for_health(ports[1], &pki.ca, NOT_SERVING, limit).await;
    assert_eq!(health, NOT_SERVING, "health during the outage");
    tokio::time::sleep(Duration::from_secs(1)).await;

    pg.restart();
    let health = wait_for_health(ports[1], &pki.ca, SERVING, Duration::from_secs(30)).await;
    assert_eq!(health, SERVING, "health once PostgreSQL is back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    let mut unavailable = 0;
    for sealer in sealers {
        let (mine, refused, wrong) = sealer.await.unwrap();
        assert!(wrong.is_empty(), "unexpected failures: {wrong:?}");
        acked.extend(mine);
        unavailable += refused;
    }
    assert!(
        unavailable > 0,
        "the storm must have met the outage ({} seals acknowledged)",
        acked.len()
    );
    assert!(acked.len() > 20, "only {} seals acknowledged", acked.len());

    // Every acknowledged seal unseals, on the survivor and on the killed replica restarted.
    let a = ServerProcess::start(&config_a).unwrap();
    let ca = client(&a, &pki);
    assert_eq!(cb.unseal(NODE, &known).await.unwrap(), known_passphrase);
    for (i, seal) in acked.iter().enumerate() {
        let client = if i % 2 == 0 { &ca } else { &cb };
        assert_eq!(
            client.unseal(&seal.node, &seal.blob).await.unwrap(),
            seal.passphrase,
            "acknowledged seal {i} of node {} was lost",
            seal.node
        );
    }
    eprintln!(
        "storm: {} seals acknowledged, {unavailable} answered UNAVAILABLE during the outage",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_move_from_sqlite_to_postgres_and_back_and_still_unseal() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let sqlite_config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let sqlite = dir.path().join("kms.db");
    let url = pg.url("kms", "?sslmode=disable");

    // Seal on SQLite; revoke one.
    let server = ServerProcess::start(&sqlite_config).unwrap();
    let c = client(&server, &pki);
    let mut sealed = Vec::new();
    for i in 0..20 {
        let node = format!("node-{i}");
        let passphrase = random_passphrase();
        let blob = c.seal(&node, &passphrase).await.unwrap();
        sealed.push(Acked {
            node,
            passphrase,
            blob,
        });
    }
    run_ok(&[
        "keys",
        "revoke",
        "--node",
        "node-3",
        "--config",
        s(&sqlite_config),
    ])
    .await;
    assert!(server.terminate().success());
    let window_store = SqliteStore::open(&sqlite).unwrap();
    window_store
        .open_window(Window {
            operation: Operation::Unseal,
            opened_at: 1,
            closes_at: 2_000_000_000,
            tag: None,
        })
        .await
        .unwrap();
    drop(window_store);

    let out = run_ok(&["db", "migrate", "--from", s(&sqlite), "--to", &url]).await;
    assert!(out.contains("migrated 20 records"), "{out}");
    assert!(out.contains("20 copied now"), "{out}");
    assert!(
        !out.contains(&pg.password),
        "the password is never shown: {out}"
    );
    // Idempotent: nothing more to copy.
    let again = run_ok(&["db", "migrate", "--from", s(&sqlite), "--to", &url]).await;
    assert!(again.contains("0 copied now"), "{again}");
    // Resumable: what is missing from the target is copied again.
    pg.sql("kms", "DELETE FROM records WHERE id > 15");
    let resumed = run_ok(&[
        "db",
        "migrate",
        "--from",
        s(&sqlite),
        "--to",
        &url,
        "--output",
        "json",
    ])
    .await;
    let report: serde_json::Value = serde_json::from_str(resumed.trim()).unwrap();
    assert_eq!(report["copied"], 5, "{resumed}");
    assert_eq!(report["records"], 20, "{resumed}");
    assert_eq!(report["windows"], 1, "{resumed}");
    assert_eq!(pg.sql("kms", "SELECT count(*) FROM windows"), "1");

    // Served from PostgreSQL: everything unseals, the revoked record still does not.
    let pg_dir = dir.path().join("pg");
    let pg_config = replica_config(&pg_dir, &pki, &url, "");
    let server = ServerProcess::start(&pg_config).unwrap();
    let c = client(&server, &pki);
    for seal in &sealed {
        let answer = c.unseal(&seal.node, &seal.blob).await.unwrap();
        assert_eq!(
            answer == seal.passphrase,
            seal.node != "node-3",
            "{}",
            seal.node
        );
    }
    for i in 20..25 {
        let node = format!("node-{i}");
        let passphrase = random_passphrase();
        let blob = c.seal(&node, &passphrase).await.unwrap();
        sealed.push(Acked {
            node,
            passphrase,
            blob,
        });
    }
    let listed = run_ok(&["keys", "list", "--config", s(&pg_config)]).await;
    assert!(listed.contains("node-24"), "{listed}");
    assert!(server.terminate().success());

    // And back to a new SQLite file.
    let back = dir.path().join("back.db");
    let out = run_ok(&["db", "migrate", "--from", &url, "--to", s(&back)]).await;
    assert!(out.contains("migrated 25 records"), "{out}");
    let back_dir = dir.path().join("back");
    std::fs::create_dir_all(&back_dir).unwrap();
    let back_config = back_dir.join("config.yaml");
    write_private(
        &back_config,
        &format!(
            "database: {}\nserverCertFile: {}\nserverKeyFile: {}\nport: 0\n\
             bindAddress: \"127.0.0.1\"\n",
            back.display(),
            pki.cert.display(),
            pki.key.display()
        ),
    );
    let server = ServerProcess::start(&back_config).unwrap();
    let c = client(&server, &pki);
    for seal in &sealed {
        let answer = c.unseal(&seal.node, &seal.blob).await.unwrap();
        assert_eq!(
            answer == seal.passphrase,
            seal.node != "node-3",
            "{}",
            seal.node
        );
    }
    // The ids came along: new seals do not reuse them.
    let fresh = c.seal("node-new", &random_passphrase()).await;
    assert!(fresh.is_ok());
    let listed = run_ok(&[
        "keys",
        "list",
        "--node",
        "node-new",
        "--config",
        s(&back_config),
    ])
    .await;
    assert!(
        listed.contains("\n26 ") || listed.contains("26 "),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_at_once_on_an_empty_database_make_the_schema_once() {
    let Some(pg) = PgCluster::start() else { return };
    for round in 0..3 {
        let name = format!("empty{round}");
        pg.create_database(&name);
        let options = pg_options(&pg.url(&name, "?sslmode=disable"));
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let options = options.clone();
                tokio::spawn(async move { PgStore::open(&options).await.map(|s| s.created()) })
            })
            .collect();
        let mut created = 0;
        for open in opens {
            if open.await.unwrap().unwrap() {
                created += 1;
            }
        }
        assert_eq!(created, 1, "exactly one replica made the schema");
        assert_eq!(
            pg.sql(
                &name,
                "SELECT string_agg(version::text, ',' ORDER BY version) FROM talos_kms_schema"
            ),
            "1,2,3,4,5,6"
        );
    }
}

/// Every call of the Store trait, on both backends: the answers must be the same.
async fn transcript(store: &dyn Store) -> Vec<String> {
    let mut log = Vec::new();
    let record = |nonce: u8, node: &str, ip: &str, created: i64| NewRecord {
        nonce: [nonce; 12],
        node_uuid: node.into(),
        ip: ip.into(),
        ciphertext: vec![nonce; 48],
        created_at: created,
        last_access: None,
        custody: Default::default(),
    };
    for (nonce, node, ip, created) in [
        (1, "n1", "10.0.0.1", 100),
        (2, "n1", "10.0.0.2", 200),
        (3, "n2", "10.0.0.3", 300),
        (4, "n2", "10.0.0.3", 400),
    ] {
        let inserted = store
            .insert(record(nonce, node, ip, created), NodeLimits::NONE)
            .await
            .unwrap();
        log.push(format!("insert {nonce}: {inserted:?}"));
    }
    let found = store.find_by_nonce(&[2; 12]).await.unwrap().unwrap();
    log.push(format!(
        "found {} {} {} {:?} {} {:?} {:?}",
        found.id,
        found.node_uuid,
        found.ip,
        found.ciphertext.len(),
        found.created_at,
        found.last_access,
        found.revoked_at
    ));
    assert!(store.find_by_nonce(&[9; 12]).await.unwrap().is_none());
    store.record_access(found.id, 500);
    store.record_access(found.id, 450);
    store.flush().await.unwrap();
    let report = store
        .import(ImportBatch {
            records: vec![record(4, "n2", "z", 1), record(5, "n3", "10.0.0.5", 50)],
            fingerprint: Some("fp".into()),
        })
        .await
        .unwrap();
    log.push(format!(
        "import {report:?} {}",
        store.has_imported("fp").await.unwrap()
    ));
    log.push(format!(
        "imported other {}",
        store.has_imported("no").await.unwrap()
    ));
    log.push(format!("count {}", store.count().await.unwrap()));
    store.health().await.unwrap();
    log.push(format!(
        "revoked {}",
        store
            .set_revoked(&[(1, None), (3, None), (99, None)], Some(600))
            .await
            .unwrap()
    ));
    log.push(format!(
        "revoked again {}",
        store.set_revoked(&[(1, None)], Some(700)).await.unwrap()
    ));
    log.push(format!(
        "restored {}",
        store.set_revoked(&[(3, None)], None).await.unwrap()
    ));
    for filter in [
        RecordFilter::default(),
        RecordFilter {
            node_uuid: Some("n1".into()),
            ..Default::default()
        },
        RecordFilter {
            state: Some(RecordState::Revoked),
            ..Default::default()
        },
        RecordFilter {
            state: Some(RecordState::Active),
            ip: Some("10.0.0.3".into()),
            ..Default::default()
        },
        RecordFilter {
            not_used_since: Some(450),
            created_before: Some(350),
            ..Default::default()
        },
        RecordFilter {
            ids: Some(vec![2, 4, 77]),
            ..Default::default()
        },
    ] {
        log.push(format!(
            "list {filter:?}: {:?}",
            store.list(&filter, 0, 10).await.unwrap()
        ));
        log.push(format!(
            "page {:?}",
            store.list(&filter, 1, 2).await.unwrap()
        ));
        let exported = store.export(&filter, 0, 10).await.unwrap();
        log.push(format!(
            "export {:?}",
            exported
                .iter()
                .map(|r| (r.info.id, r.nonce, r.ciphertext.clone()))
                .collect::<Vec<_>>()
        ));
    }
    // Refused, so that the ids below stay the same on both stores.
    let pinned = NodeLimits {
        max_records: 0,
        one_address: true,
    };
    for node in ["n2", "n1"] {
        log.push(format!(
            "refused {:?}",
            store
                .insert(record(9, node, "10.0.0.1", 500), pinned)
                .await
                .unwrap()
        ));
    }
    log.push(format!("since {}", store.created_since(200).await.unwrap()));
    let revoked = RecordFilter {
        state: Some(RecordState::Revoked),
        ..Default::default()
    };
    log.push(format!(
        "deleted {}",
        store.delete(&[1, 2], &revoked).await.unwrap()
    ));
    log.push(format!("count {}", store.count().await.unwrap()));

    for window in [
        Window {
            operation: Operation::Unseal,
            opened_at: 10,
            closes_at: 20,
            tag: None,
        },
        Window {
            operation: Operation::Seal,
            opened_at: 11,
            closes_at: 21,
            tag: None,
        },
        Window {
            operation: Operation::Unseal,
            opened_at: 12,
            closes_at: 22,
            tag: None,
        },
    ] {
        store.open_window(window).await.unwrap();
    }
    log.push(format!("windows {:?}", store.windows().await.unwrap()));
    log.push(format!(
        "closed {}",
        store.close_window(Operation::Seal).await.unwrap()
    ));
    log.push(format!(
        "closed {}",
        store.close_window(Operation::Seal).await.unwrap()
    ));
    log.push(format!("windows {:?}", store.windows().await.unwrap()));

    for (op, node, ip, at) in [
        (Operation::Unseal, "n1", "a", 100),
        (Operation::Unseal, "n1", "a", 130),
        (Operation::Seal, "n2", "b", 140),
        (Operation::Seal, "n3", "c", 150),
    ] {
        let noted = store.note_pending(op, node, ip, at, 2).await.unwrap();
        log.push(format!("pending {noted:?}"));
    }
    let decided = store
        .decide(1, Decision::Approve { until: 200 }, 160, None)
        .await
        .unwrap();
    log.push(format!("decided {decided:?}"));
    log.push(format!(
        "decided {:?}",
        store.decide(99, Decision::Deny, 1, None).await.unwrap()
    ));
    log.push(format!(
        "approval {:?}",
        store.approval(Operation::Unseal, "n1", "a").await.unwrap()
    ));
    // Past its time, an approval is pending again at the next refused call.
    let again = store
        .note_pending(Operation::Unseal, "n1", "a", 250, 2)
        .await
        .unwrap();
    log.push(format!("pending again {again:?}"));
    store.decide(2, Decision::Deny, 260, None).await.unwrap();
    for state in [
        None,
        Some(ApprovalState::Pending),
        Some(ApprovalState::Approved),
        Some(ApprovalState::Denied),
    ] {
        log.push(format!(
            "approvals {state:?}: {:?}",
            store.approvals(state).await.unwrap()
        ));
    }
    // Last: on PostgreSQL a taken nonce costs an id (ids are unique and increasing, not
    // gap-free), so the ids listed above would differ after it.
    let taken = store
        .insert(record(2, "x", "y", 1), NodeLimits::NONE)
        .await
        .unwrap();
    assert_eq!(taken, Inserted::NonceTaken);

    // Copies keep ids and state and skip what is there.
    let all = store
        .export(&RecordFilter::default(), 0, 100)
        .await
        .unwrap();
    log.push(format!(
        "copied {}",
        store.copy_records(&all).await.unwrap()
    ));
    let approvals = store.approvals(None).await.unwrap();
    log.push(format!(
        "copied approvals {}",
        store.copy_approvals(&approvals).await.unwrap()
    ));
    log
}

/// Copies `from`'s records and approvals into `to`, then asks the same of both.
async fn copied_transcript(from: &dyn Store, to: &dyn Store) -> Vec<String> {
    let all = from.export(&RecordFilter::default(), 0, 100).await.unwrap();
    let mut log = vec![format!("copied {}", to.copy_records(&all).await.unwrap())];
    let approvals = from.approvals(None).await.unwrap();
    log.push(format!(
        "approvals {}",
        to.copy_approvals(&approvals).await.unwrap()
    ));
    let new = to
        .insert(
            NewRecord {
                nonce: [42; 12],
                node_uuid: "n9".into(),
                ip: "10.9.9.9".into(),
                ciphertext: vec![1; 48],
                created_at: 1,
                last_access: None,
                custody: Default::default(),
            },
            NodeLimits::NONE,
        )
        .await
        .unwrap();
    log.push(format!("next id {new:?}"));
    let noted = to
        .note_pending(Operation::Seal, "n9", "z", 1, 100)
        .await
        .unwrap()
        .map(|a| a.id);
    log.push(format!("next approval {noted:?}"));
    log.push(format!(
        "{:?}",
        to.list(&RecordFilter::default(), 0, 100).await.unwrap()
    ));
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stores_answer_every_call_alike() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("contract");
    pg.create_database("copy");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("contract.db")).unwrap();
    let postgres = PgStore::open(&pg_options(&pg.url("contract", "")))
        .await
        .unwrap();
    let expected = transcript(&sqlite).await;
    let got = transcript(&postgres).await;
    for (sqlite_line, pg_line) in expected.iter().zip(&got) {
        assert_eq!(sqlite_line, pg_line, "SQLite, then PostgreSQL");
    }
    assert_eq!(expected.len(), got.len());

    // Copies between the backends, then what comes next: ids continue after the copies.
    let sqlite_copy = SqliteStore::open(&dir.path().join("copy.db")).unwrap();
    let pg_copy = PgStore::open(&pg_options(&pg.url("copy", "")))
        .await
        .unwrap();
    let into_sqlite = copied_transcript(&postgres, &sqlite_copy).await;
    let into_pg = copied_transcript(&sqlite, &pg_copy).await;
    assert_eq!(into_sqlite, into_pg);
    // After the highest copied id (6: the import's skipped record took 5 on both stores).
    assert!(into_pg[2].contains("Stored(7,"), "{into_pg:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_holds_on_postgres() {
    let Some(pg) = PgCluster::start() else { return };
    for name in [
        "lookups",
        "summaries",
        "quota",
        "windows",
        "approvals",
        "ids",
        "unreadable",
        "bindings",
    ] {
        pg.create_database(name);
    }
    let options = |name: &str| pg_options(&pg.url(name, ""));
    let store = PgStore::open(&options("lookups")).await.unwrap();
    store_contract::lookups_at_once_each_find_their_own(&store).await;
    let store = PgStore::open(&options("summaries")).await.unwrap();
    store_contract::node_limits_and_hourly_counts(&store).await;
    let store = PgStore::open(&options("quota")).await.unwrap();
    store_contract::seals_at_once_stay_within_the_quota(&store).await;
    let store = PgStore::open(&options("windows")).await.unwrap();
    store_contract::windows_open_move_and_close(&store).await;
    let store = PgStore::open(&options("approvals")).await.unwrap();
    store_contract::approvals_wait_pass_expire_and_deny(&store).await;
    let store = PgStore::open(&options("ids")).await.unwrap();
    store_contract::record_ids_are_never_reused(&store).await;
    let store = PgStore::open(&options("unreadable")).await.unwrap();
    store_contract::an_unreadable_approval_is_an_error(&store, |id| {
        // The schema's CHECK would refuse the state; a newer version may have changed it.
        pg.sql(
            "unreadable",
            &format!(
                "ALTER TABLE approvals DROP CONSTRAINT approvals_state_check;
                 UPDATE approvals SET state = 'expired' WHERE id = {id}"
            ),
        );
        std::future::ready(())
    })
    .await;
    let store = PgStore::open(&options("bindings")).await.unwrap();
    store_contract::foreign_blobs_are_bound_once(&store).await;
}

/// Runs the binary with `env` set, to completion (60 s at most).
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(BINARY);
    command.args(args).env_remove("PGPASSWORD");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_password_file_or_pgpassword_and_is_never_shown() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let url = pg.url_without_password("kms", "?sslmode=disable");
    let password_file = dir.path().join("pg-password");
    write_private(&password_file, &format!("{}\n", pg.password));
    let with_file = replica_config(
        &dir.path().join("file"),
        &pki,
        &url,
        &format!("passwordFile: {}\n", password_file.display()),
    );
    let out = tokio::task::spawn_blocking({
        let with_file = with_file.clone();
        move || run_with_env(&["check", "--config", s(&with_file)], &[])
    })
    .await
    .unwrap();
    let checked = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(checked.contains("reachable"), "{checked}");
    assert!(
        checked.contains("no talos-kms-server tables yet"),
        "{checked}"
    );
    assert!(!checked.contains(&pg.password), "{checked}");

    // The server itself, with the file.
    let server = ServerProcess::start(&with_file).unwrap();
    let passphrase = random_passphrase();
    let sealed = client(&server, &pki).seal(NODE, &passphrase).await.unwrap();
    assert!(server.terminate().success());

    // PGPASSWORD, for a config without any password.
    let bare = replica_config(&dir.path().join("env"), &pki, &url, "");
    let with_env = tokio::task::spawn_blocking({
        let (bare, password) = (bare.clone(), pg.password.clone());
        move || {
            run_with_env(
                &["keys", "list", "--config", s(&bare)],
                &[("PGPASSWORD", &password)],
            )
        }
    })
    .await
    .unwrap();
    assert!(with_env.status.success(), "{}", text(&with_env.stderr));
    assert!(text(&with_env.stdout).contains(NODE));

    // Without one, or with a wrong one: a clear error that names the fix, never the password.
    let wrong_password = "not-the-password-4711";
    write_private(&password_file, wrong_password);
    for (config, env) in [
        (bare.clone(), vec![]),
        (with_file.clone(), vec![]),
        (bare.clone(), vec![("PGPASSWORD", wrong_password)]),
    ] {
        let out = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.clone();
            run_with_env(&["keys", "list", "--config", s(&config)], &env)
        })
        .await
        .unwrap();
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(said.contains("password"), "{said}");
        assert!(!said.contains(wrong_password), "{said}");
        assert!(!said.contains(&pg.password), "{said}");
    }

    // A server started with a password it cannot read names the file.
    std::fs::remove_file(&password_file).unwrap();
    let refused = ServerProcess::start(&with_file).err().unwrap();
    assert!(refused.contains("pg-password"), "{refused}");

    // The record sealed with the file is there for a server using PGPASSWORD.
    let store = PgStore::open(&pg_options(&pg.url("kms", "")))
        .await
        .unwrap();
    assert_eq!(store.count().await.unwrap(), 1);
    let _ = sealed;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_required_and_verified_as_sslmode_says() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let Some(pg) = PgCluster::start_with(ClusterOptions {
        tls: Some((pki.cert.clone(), pki.key.clone())),
    }) else {
        return;
    };
    pg.create_database("kms");
    let check = |query: String| {
        let pki_cert = pki.cert.clone();
        let pki_key = pki.key.clone();
        let dir = dir.path().join(format!("c{}", query.len()));
        let url = pg.url("kms", &query);
        async move {
            let pki = Pki {
                ca: PathBuf::new(),
                cert: pki_cert,
                key: pki_key,
            };
            let config = replica_config(&dir, &pki, &url, "");
            let output = run_binary_async(&["check", "--config", s(&config)]).await;
            format!("{}{}", text(&output.stdout), text(&output.stderr))
        }
    };
    let required = check("?sslmode=require".into()).await;
    assert!(
        required.contains("reachable") && required.contains(", TLS)"),
        "{required}"
    );
    let verified = check(format!(
        "?sslmode=verify-full&sslrootcert={}",
        pki.ca.display()
    ))
    .await;
    assert!(verified.contains(", TLS)"), "{verified}");

    // The public roots do not trust a private CA: refused, with what to do.
    let untrusted = check("?sslmode=verify-full".into()).await;
    assert!(!untrusted.contains("reachable"), "{untrusted}");
    assert!(untrusted.contains("not trusted"), "{untrusted}");
    assert!(untrusted.contains("sslrootcert"), "{untrusted}");
    assert!(!untrusted.contains(&pg.password), "{untrusted}");

    // The server on verify-full seals and unseals.
    let url = pg.url(
        "kms",
        &format!("?sslmode=verify-full&sslrootcert={}", pki.ca.display()),
    );
    let server =
        ServerProcess::start(&replica_config(&dir.path().join("srv"), &pki, &url, "")).unwrap();
    let c = client(&server, &pki);
    let passphrase = random_passphrase();
    let sealed = c.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(c.unseal(NODE, &sealed).await.unwrap(), passphrase);
    let tls_sessions = pg.sql(
        "postgres",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE ssl AND application_name = 'talos-kms-server'",
    );
    assert_ne!(tls_sessions, "0");
    let _ = Database::parse("x", Path::new("/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_hung_postgres_are_refused_unavailable_within_eight_seconds() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    pg.create_database("hung");
    let root = tempfile::tempdir().unwrap();
    let pki = write_pki(root.path());
    let config = replica_config(root.path(), &pki, &pg.url("hung", ""), "");
    let server = ServerProcess::start(&config).unwrap();
    let client = Arc::new(client(&server, &pki));
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();

    let frozen = pg.freeze();
    // Staggered, so that later calls queue behind a batch already waiting on PostgreSQL.
    let mut calls = Vec::new();
    for n in 0..6u64 {
        let (client, sealed) = (Arc::clone(&client), sealed.clone());
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700 * n)).await;
            let started = Instant::now();
            let result = if n % 2 == 0 {
                client.unseal(NODE, &sealed).await
            } else {
                client
                    .seal(&format!("node-{n}"), &random_passphrase())
                    .await
            };
            (n, started.elapsed(), result)
        }));
    }
    for call in calls {
        let (n, took, result) = call.await.unwrap();
        assert!(
            refused_with(&result, tonic::Code::Unavailable).is_some(),
            "call {n}: {result:?} after {took:?}"
        );
        // Talos gives a call 10 s from its dial; the server answers by 7 s.
        assert!(
            took < Duration::from_secs(8),
            "call {n} answered after {took:?}"
        );
    }
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(30);
    let unsealed = loop {
        match client.unseal(NODE, &sealed).await {
            Ok(unsealed) => break unsealed,
            Err(error) if Instant::now() > deadline => panic!("still refused: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(unsealed, passphrase, "answered again once PostgreSQL runs");
}
