//! The audit trail's file deleted, renamed or replaced under a running server: every call
//! answered with data has its line at the configured path (or in its rotated files), and
//! while nothing can be written there, calls are refused UNAVAILABLE.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use talos_kms_server::audit::{Action, AuditQuery, Outcome, read_trail};
use talos_kms_server::client::ClientError;
use tonic::Code;

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;
/// Health is asked of the store and the trail every 2 s.
const LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// `rm audit.jsonl`
    Delete,
    /// `mv audit.jsonl audit.old`
    Rename,
    /// `rm audit.jsonl; mkdir audit.jsonl`, later `rmdir`
    Directory,
    /// `ln -sf /dev/null audit.jsonl`, later `rm`
    DevNull,
}

impl Fault {
    fn apply(self, path: &Path) {
        match self {
            Fault::Delete => std::fs::remove_file(path).unwrap(),
            Fault::Rename => std::fs::rename(path, path.with_extension("old")).unwrap(),
            Fault::Directory => {
                std::fs::remove_file(path).unwrap();
                std::fs::create_dir(path).unwrap();
            }
            Fault::DevNull => {
                let link = path.with_extension("link");
                std::os::unix::fs::symlink("/dev/null", &link).unwrap();
                std::fs::rename(&link, path).unwrap();
            }
        }
    }

    /// Makes the path usable again, for the faults that leave it unusable.
    fn undo(self, path: &Path) {
        match self {
            Fault::Delete | Fault::Rename => {}
            Fault::Directory => std::fs::remove_dir(path).unwrap(),
            Fault::DevNull => std::fs::remove_file(path).unwrap(),
        }
    }

    fn leaves_path_unusable(self) -> bool {
        matches!(self, Fault::Directory | Fault::DevNull)
    }
}

fn code(error: ClientError) -> Code {
    match error {
        ClientError::Status(status) => status.code(),
        other => panic!("a failure other than a gRPC status: {other}"),
    }
}

/// The (action, node) of every line at `path` and its rotated files that says a call
/// was answered with data.
fn audited(path: &Path) -> Vec<(Action, String)> {
    let mut found = Vec::new();
    read_trail(path, &AuditQuery::default(), |event| {
        if let (Some(action), Some(Outcome::Ok), Some(node)) =
            (event.action, event.outcome, &event.node)
        {
            found.push((action, node.clone()));
        }
    })
    .unwrap();
    found
}

/// Seals and unseals before and after `fault`; `prefill` bytes of older lines are in the
/// trail at start.
async fn answered_calls_stay_audited(fault: Fault, extra: &str, prefill: usize) {
    let filler = "{\"time\":\"2026-01-01T00:00:00.000Z\",\"action\":\"admin\",\"outcome\":\"ok\",\
                  \"detail\":\"an older line\"}\n";
    let setup = Setup::with(|dir| {
        let trail = dir.join("audit.jsonl");
        write_private(&trail, &filler.repeat(prefill / filler.len()));
        format!("auditLog: {}\n{extra}", trail.display())
    });
    let trail = setup.dir.path().join("audit.jsonl");
    let running = setup.start();
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let client = client_for("127.0.0.1", port, &pki.ca, None);
    client.seal("before", &random_passphrase()).await.unwrap();

    fault.apply(&trail);
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    for round in 0..40 {
        if round == 20 {
            if fault.leaves_path_unusable() {
                let health = wait_for_health(port, &pki.ca, NOT_SERVING, LIMIT).await;
                assert_eq!(health, NOT_SERVING, "{fault:?}: health while unauditable");
            }
            fault.undo(&trail);
        }
        let node = format!("node-{round}");
        let passphrase = random_passphrase();
        match client.seal(&node, &passphrase).await.map_err(code) {
            Ok(sealed) => {
                answered.push((Action::Seal, node.clone()));
                match client.unseal(&node, &sealed).await.map_err(code) {
                    Ok(unsealed) => {
                        assert_eq!(unsealed, passphrase, "{fault:?}");
                        answered.push((Action::Unseal, node));
                    }
                    Err(status) => refused.push((round, status)),
                }
            }
            Err(status) => refused.push((round, status)),
        }
    }
    for (round, status) in &refused {
        assert_eq!(*status, Code::Unavailable, "{fault:?}: round {round}");
        assert!(
            *round < 20,
            "{fault:?}: refused after the path was usable again"
        );
    }
    if fault.leaves_path_unusable() {
        assert!(
            !refused.is_empty(),
            "{fault:?}: calls answered while unauditable"
        );
    } else {
        assert!(refused.is_empty(), "{fault:?}: {refused:?}");
    }

    // Lines written just before the fault was noticed are carried over within a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let missing = loop {
        let found = audited(&trail);
        let missing: Vec<_> = answered
            .iter()
            .filter(|call| !found.contains(call))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break format!("{missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        missing, "[]",
        "{fault:?}: answered calls without a line at the path"
    );
    let health = wait_for_health(port, &pki.ca, SERVING, LIMIT).await;
    assert_eq!(
        health, SERVING,
        "{fault:?}: health once the trail is writable"
    );

    let log: Vec<String> = server.log.try_iter().collect();
    let errors = log
        .iter()
        .filter(|line| line.contains("ERROR") && line.contains("audit trail"))
        .count();
    let expected = usize::from(fault.leaves_path_unusable());
    assert_eq!(errors, expected, "{fault:?}: {log:#?}");
}

#[tokio::test]
async fn calls_after_the_trail_is_deleted_are_audited_at_its_path() {
    answered_calls_stay_audited(Fault::Delete, "", 0).await;
}

#[tokio::test]
async fn calls_after_the_trail_is_renamed_away_are_audited_at_its_path() {
    answered_calls_stay_audited(Fault::Rename, "", 0).await;
}

#[tokio::test]
async fn a_directory_at_the_trail_s_path_refuses_calls_until_removed() {
    answered_calls_stay_audited(Fault::Directory, "", 0).await;
}

#[tokio::test]
async fn a_symlink_to_dev_null_at_the_trail_s_path_refuses_calls_until_removed() {
    answered_calls_stay_audited(Fault::DevNull, "", 0).await;
}

#[tokio::test]
async fn rotation_goes_on_after_the_trail_is_deleted() {
    // Near the 1 MiB limit: the calls after the deletion cross it.
    answered_calls_stay_audited(Fault::Delete, "auditLogMaxMiB: 1\n", (1 << 20) - 3000).await;
}

#[tokio::test]
async fn rotation_goes_on_after_a_directory_at_the_path_is_removed() {
    answered_calls_stay_audited(Fault::Directory, "auditLogMaxMiB: 1\n", (1 << 20) - 3000).await;
}
