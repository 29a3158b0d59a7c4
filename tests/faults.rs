//! Storage faults under a running server: the database file deleted, replaced, or moved away
//! with its directory while nodes seal and unseal. No acknowledged seal may be lost and no
//! existing record may be answered with a decoy.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use talos_kms_server::client::ClientError;
use tonic::Code;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `mv data moved`: the directory holding the database is renamed.
    RenameDirectory,
    /// `rm data/kms.db` (a hard link elsewhere keeps its content for the test to read).
    DeleteFile,
    /// `mv other.db data/kms.db`: another valid database put in its place.
    ReplaceFile,
}

/// One call as a node saw it.
struct Call {
    started: Instant,
    answer: Result<Vec<u8>, Code>,
}

struct Seal {
    call: Call,
    node: String,
    passphrase: [u8; 32],
}

fn code(error: ClientError) -> Code {
    match error {
        ClientError::Status(status) => status.code(),
        other => panic!("a failure other than a gRPC status: {other}"),
    }
}

fn hard_link_database(from: &Path, to: &Path) {
    std::fs::hard_link(from, to).unwrap();
    let wal = |path: &Path| PathBuf::from(format!("{}-wal", path.display()));
    if wal(from).exists() {
        std::fs::hard_link(wal(from), wal(to)).unwrap();
    }
}

/// Waits until `what` holds, at most 20 s.
async fn wait_until(what: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !what() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn nodes_keep_calling_while(fault: Fault) {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let pki = write_pki(root.path());
    let database = data.join("kms.db");
    let config = write_config(root.path(), &pki, "127.0.0.1", "");
    edit_config(
        &config,
        &root.path().join("kms.db").display().to_string(),
        &database.display().to_string(),
    );
    let mut server = ServerProcess::start(&config).unwrap();
    let client = Arc::new(client_for("127.0.0.1", server.addr.port(), &pki.ca, None));
    let known = random_passphrase();
    let known_sealed = client.seal(NODE, &known).await.unwrap();

    let seals = Arc::new(Mutex::new(Vec::<Seal>::new()));
    let unseals = Arc::new(Mutex::new(Vec::<Call>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (client, seals, stop) = (client.clone(), seals.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for call in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let (node, passphrase) = (format!("node-{worker}-{call}"), random_passphrase());
                let started = Instant::now();
                let answer = client.seal(&node, &passphrase).await.map_err(code);
                seals.lock().unwrap().push(Seal {
                    call: Call { started, answer },
                    node,
                    passphrase,
                });
            }
        }));
    }
    {
        let (client, unseals, stop) = (client.clone(), unseals.clone(), stop.clone());
        let sealed = known_sealed.clone();
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let started = Instant::now();
                let answer = client.unseal(NODE, &sealed).await.map_err(code);
                unseals.lock().unwrap().push(Call { started, answer });
            }
        }));
    }
    let acknowledged =
        |seals: &[Seal]| seals.iter().filter(|seal| seal.call.answer.is_ok()).count();
    wait_until(|| acknowledged(&seals.lock().unwrap()) >= 40).await;

    // Where the records acknowledged so far can still be read after the fault.
    let kept = match fault {
        Fault::RenameDirectory => {
            let moved = root.path().join("moved");
            std::fs::rename(&data, &moved).unwrap();
            moved.join("kms.db")
        }
        Fault::DeleteFile => {
            let kept = root.path().join("kept.db");
            hard_link_database(&database, &kept);
            std::fs::remove_file(&database).unwrap();
            kept
        }
        Fault::ReplaceFile => {
            let kept = root.path().join("kept.db");
            hard_link_database(&database, &kept);
            let other = data.join("other.db");
            drop(talos_kms_server::store::SqliteStore::open(&other).unwrap());
            std::fs::rename(&other, &database).unwrap();
            kept
        }
    };
    let fault_done = Instant::now();
    let refused_after_fault = |seals: &[Seal]| {
        seals
            .iter()
            .filter(|seal| seal.call.started > fault_done && seal.call.answer.is_err())
            .count()
    };
    wait_until(|| refused_after_fault(&seals.lock().unwrap()) >= 20).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let log: Vec<String> = log.try_iter().collect();
    let seals = std::mem::take(&mut *seals.lock().unwrap());
    let unseals = std::mem::take(&mut *unseals.lock().unwrap());

    assert!(
        refused_after_fault(&seals) >= 20,
        "{fault:?}: seals after the fault were refused"
    );
    for seal in &seals {
        match &seal.call.answer {
            Ok(_) => assert!(
                seal.call.started < fault_done,
                "{fault:?}: a seal sent after the fault was acknowledged"
            ),
            Err(code) => assert_eq!(*code, Code::Unavailable, "{fault:?}: refused seals"),
        }
    }
    let first_refusal = unseals
        .iter()
        .filter(|call| call.answer.is_err())
        .map(|call| call.started)
        .min();
    assert!(first_refusal.is_some(), "{fault:?}: unseals were refused");
    for call in &unseals {
        match &call.answer {
            Ok(bytes) => {
                assert_eq!(
                    bytes, &known,
                    "{fault:?}: a decoy answered an unseal of a record that exists"
                );
                assert!(
                    Some(call.started) < first_refusal,
                    "{fault:?}: an unseal was served after the store was found gone"
                );
            }
            Err(code) => assert_eq!(*code, Code::Unavailable, "{fault:?}: refused unseals"),
        }
    }

    let log = log.join("\n");
    let expected = match fault {
        // The test keeps a hard link to read the file afterwards: not deleted for the kernel.
        Fault::RenameDirectory | Fault::DeleteFile => "no longer at its path",
        Fault::ReplaceFile => "replaced",
    };
    assert!(
        log.lines().any(|line| line.contains("ERROR")
            && line.contains(&database.display().to_string())
            && line.contains(expected)),
        "{fault:?}: an ERROR names the path and what happened: {log}"
    );
    assert!(
        !status.success(),
        "{fault:?}: a server that lost its database does not exit 0"
    );

    // Every acknowledged seal is in the file that was at the configured path.
    let db = rusqlite::Connection::open(&kept).unwrap();
    let mut lookup = db
        .prepare("SELECT count(*) FROM records WHERE nonce = ?1")
        .unwrap();
    let mut checked = 0;
    for seal in &seals {
        if let Ok(sealed) = &seal.call.answer {
            let found: i64 = lookup.query_row([&sealed[..12]], |r| r.get(0)).unwrap();
            assert_eq!(
                found, 1,
                "{fault:?}: an acknowledged seal is not in the database"
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "{fault:?}: {checked} acknowledged seals");
    drop(lookup);
    drop(db);

    // Put back where it belongs, the database serves every acknowledged seal again.
    if let Fault::RenameDirectory = fault {
        std::fs::rename(root.path().join("moved"), &data).unwrap();
        let server = ServerProcess::start(&config).unwrap();
        let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
        let mut connection = client.connect().await.unwrap();
        for seal in &seals {
            if let Ok(sealed) = &seal.call.answer {
                let unsealed = connection.unseal(&seal.node, sealed).await.unwrap();
                assert_eq!(
                    unsealed, seal.passphrase,
                    "{fault:?}: {} unseals",
                    seal.node
                );
            }
        }
        assert_eq!(connection.unseal(NODE, &known_sealed).await.unwrap(), known);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_directory_renamed_while_serving() {
    nodes_keep_calling_while(Fault::RenameDirectory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_file_deleted_while_serving() {
    nodes_keep_calling_while(Fault::DeleteFile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_file_replaced_while_serving() {
    nodes_keep_calling_while(Fault::ReplaceFile).await;
}

#[test]
fn a_new_empty_database_is_announced_with_its_full_path() {
    let Running {
        dir,
        server,
        config,
        ..
    } = Running::start("");
    let database = dir.path().join("kms.db");
    assert!(
        server.startup_log.iter().any(|line| line.contains("WARN")
            && line.contains("new, empty database")
            && line.contains(&database.display().to_string())),
        "{:?}",
        server.startup_log
    );
    assert_eq!(server.terminate().code(), Some(0));
    let server = ServerProcess::start(&config).unwrap();
    assert!(
        !server
            .startup_log
            .iter()
            .any(|line| line.contains("new, empty database")),
        "an existing database is not announced as new: {:?}",
        server.startup_log
    );
}
