//! Looking after records while the server runs: revoke, restore, purge, and the audit trail
//! that says who unsealed what.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use talos_kms_server::client::ClientError;

/// Records as `keys list --output json` prints them.
async fn records(config: &Path) -> Vec<serde_json::Value> {
    run_ok(&[
        "keys",
        "list",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ])
    .await
    .lines()
    .map(|line| serde_json::from_str(line).unwrap())
    .collect()
}

fn id_of(records: &[serde_json::Value], node: &str) -> String {
    records
        .iter()
        .find(|r| r["node_uuid"] == node)
        .unwrap_or_else(|| panic!("no record of {node}: {records:?}"))["id"]
        .to_string()
}

/// Audit lines as `audit --output json` prints them, with `filters`.
async fn audit_lines(config: &Path, filters: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "audit",
        "--config",
        config.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(filters);
    run_ok(&args)
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_record_unseals_to_random_bytes_until_restored() {
    let running = Running::start("");
    let config = running.config.to_str().unwrap();
    let (node_a, node_b) = ("node-a", "node-b");
    let (secret_a, secret_b) = (random_passphrase(), random_passphrase());
    let sealed_a = running.client().seal(node_a, &secret_a).await.unwrap();
    let sealed_a2 = running
        .client()
        .seal(node_a, &random_passphrase())
        .await
        .unwrap();
    let sealed_b = running.client().seal(node_b, &secret_b).await.unwrap();
    let listed = records(&running.config).await;
    assert_eq!(listed.len(), 3);
    let id_b = id_of(&listed, node_b);

    run_ok(&["keys", "revoke", &id_b, "--config", config]).await;
    let answer = running.client().unseal(node_b, &sealed_b).await.unwrap();
    assert_eq!(answer.len(), 32, "answered like a wrong key");
    assert_ne!(answer, secret_b, "a revoked record does not unseal");
    assert_eq!(
        running.client().unseal(node_a, &sealed_a).await.unwrap(),
        secret_a
    );
    let refused = audit_lines(
        &running.config,
        &[
            "--action",
            "unseal",
            "--outcome",
            "refused",
            "--record",
            &id_b,
        ],
    )
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["reason"], "revoked");

    run_ok(&["keys", "restore", &id_b, "--config", config]).await;
    assert_eq!(
        running.client().unseal(node_b, &sealed_b).await.unwrap(),
        secret_b
    );

    // Every record of a node at once.
    run_ok(&["keys", "revoke", "--node", node_a, "--config", config]).await;
    let revoked = run_ok(&["keys", "list", "--state", "revoked", "--config", config]).await;
    assert!(revoked.contains("2 records"), "{revoked}");
    assert_ne!(
        running.client().unseal(node_a, &sealed_a).await.unwrap(),
        secret_a
    );
    assert_ne!(
        running
            .client()
            .unseal(node_a, &sealed_a2)
            .await
            .unwrap()
            .len(),
        0
    );
    let admin = audit_lines(&running.config, &["--action", "admin"]).await;
    assert_eq!(admin.len(), 3, "revoke, restore, revoke --node: {admin:?}");
    assert_eq!(admin[2]["args"][1], "--node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_only_when_told_to() {
    let running = Running::start("");
    let config = running.config.to_str().unwrap();
    let secret = random_passphrase();
    let sealed = running.client().seal("keep", &secret).await.unwrap();
    let doomed = running
        .client()
        .seal("doomed", &random_passphrase())
        .await
        .unwrap();
    let id = id_of(&records(&running.config).await, "doomed");
    run_ok(&["keys", "revoke", &id, "--config", config]).await;

    // Without a terminal and without --yes: refused, nothing deleted.
    let refused = run_binary_async(&["keys", "purge", "--revoked", "--config", config]).await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
    let dry = run_ok(&[
        "keys",
        "purge",
        "--revoked",
        "--dry-run",
        "--config",
        config,
    ])
    .await;
    assert!(
        dry.contains("doomed") && dry.contains("would delete 1"),
        "{dry}"
    );
    assert_eq!(
        records(&running.config).await.len(),
        2,
        "nothing deleted yet"
    );

    let done = run_ok(&["keys", "purge", "--revoked", "--yes", "--config", config]).await;
    assert!(done.contains("deleted 1"), "{done}");
    let left = records(&running.config).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["node_uuid"], "keep");
    assert_eq!(
        running.client().unseal("keep", &sealed).await.unwrap(),
        secret
    );
    running.client().unseal("doomed", &doomed).await.unwrap();
    let gone = audit_lines(
        &running.config,
        &["--action", "unseal", "--outcome", "refused"],
    )
    .await;
    assert_eq!(gone.last().unwrap()["reason"], "unknown_nonce");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_audited_survives_kill_9_and_holds_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail/audit.jsonl");
    std::fs::create_dir(trail.parent().unwrap()).unwrap();
    let mut running = Running::start(&format!("auditLog: {}\n", trail.display()));
    let config = running.config.clone();
    let client = running.client();

    let secret = random_passphrase();
    let sealed = client.seal(NODE, &secret).await.unwrap();
    client.unseal(NODE, &sealed).await.unwrap();
    client.unseal("another-node", &sealed).await.unwrap();
    let mut unknown = sealed.clone();
    unknown[0] ^= 1;
    client.unseal(NODE, &unknown).await.unwrap();
    let invalid = client.unseal(NODE, &sealed[..10]).await.unwrap_err();
    assert!(matches!(invalid, ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument));
    let revoked = client
        .seal("revoked-node", &random_passphrase())
        .await
        .unwrap();
    let id = id_of(&records(&config).await, "revoked-node");
    run_ok(&["keys", "revoke", &id, "--config", config.to_str().unwrap()]).await;
    client.unseal("revoked-node", &revoked).await.unwrap();
    // The database gone: the store refuses, and says so in the trail.
    std::fs::remove_file(dir_of(&config).join("kms.db")).unwrap();
    let unavailable = client.unseal(NODE, &unknown).await.unwrap_err();
    assert!(matches!(unavailable, ClientError::Status(s) if s.code() == tonic::Code::Unavailable));
    running.server.kill9();

    let lines = audit_lines(&config, &[]).await;
    let outcome = |action: &str, reason: Option<&str>| {
        lines.iter().any(|line| {
            line["action"] == action
                && match reason {
                    None => line["outcome"] == "ok",
                    Some(reason) => line["outcome"] == "refused" && line["reason"] == reason,
                }
        })
    };
    for (action, reason) in [
        ("seal", None),
        ("unseal", None),
        ("unseal", Some("wrong_key_or_binding")),
        ("unseal", Some("unknown_nonce")),
        ("unseal", Some("invalid")),
        ("unseal", Some("revoked")),
        ("unseal", Some("store_unavailable")),
        ("admin", None),
    ] {
        assert!(
            outcome(action, reason),
            "no line for {action} {reason:?}: {lines:#?}"
        );
    }
    let ok_unseal = lines
        .iter()
        .find(|l| l["action"] == "unseal" && l["outcome"] == "ok")
        .unwrap();
    assert_eq!(ok_unseal["peer"], "127.0.0.1");
    assert_eq!(ok_unseal["node"], NODE);
    assert!(ok_unseal["record"].is_i64());

    let raw = std::fs::read_to_string(&trail).unwrap();
    assert_no_secret(
        &raw,
        "the audit trail",
        &[
            ("passphrase", &secret[..]),
            ("key", &sealed[12..]),
            ("blob", &sealed[..]),
            ("nonce", &sealed[..12]),
        ],
    );
}

fn dir_of(config: &Path) -> &Path {
    config.parent().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_refused_while_the_audit_trail_cannot_be_written() {
    // A device cannot hold the trail: refused at start, naming the path.
    let setup = Setup::new("auditLog: /dev/full\n");
    let refused = ServerProcess::start(&setup.config)
        .err()
        .expect("refused at start");
    assert!(
        refused.contains("/dev/full") && refused.contains("not a regular file"),
        "{refused}"
    );

    // Put there while serving: every write fails, so calls are refused.
    let mut running = Running::start("");
    let trail = running
        .config
        .parent()
        .unwrap()
        .join("talos-kms-server-audit.jsonl");
    running
        .client()
        .seal(NODE, &random_passphrase())
        .await
        .unwrap();
    let link = trail.with_extension("link");
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    std::fs::rename(&link, &trail).unwrap();
    // The path is checked every 100 ms, not per line.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let seal = running.client().seal(NODE, &random_passphrase()).await;
    assert!(
        matches!(&seal, Err(ClientError::Status(s)) if s.code() == tonic::Code::Unavailable),
        "{seal:?}"
    );
    let unseal = running.client().unseal(NODE, &[7; 44]).await;
    assert!(
        matches!(&unseal, Err(ClientError::Status(s)) if s.code() == tonic::Code::Unavailable),
        "{unseal:?}"
    );
    let log = std::mem::replace(&mut running.server.log, std::sync::mpsc::channel().1);
    running.server.kill9();
    let log: Vec<String> = log.try_iter().collect();
    let named = format!("audit trail {}", trail.display());
    assert!(
        log.iter()
            .any(|line| line.contains("ERROR") && line.contains(&named)),
        "{log:#?}"
    );
}

#[test]
fn admin_commands_never_create_a_database() {
    let setup = Setup::new("");
    let output = Command::new(BINARY)
        .args(["keys", "list", "--config", setup.config_str()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("does not exist"),
        "{}",
        text(&output.stderr)
    );
    assert!(!setup.dir.path().join("kms.db").exists());
}

/// `--since`/`--until` are times, not text: ages, days, UTC times and offsets all compare
/// in time order, and what is not a time is refused with the forms that are.
#[test]
fn audit_since_and_until_compare_times_and_refuse_what_is_not_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("audit.jsonl");
    let now = time::OffsetDateTime::now_utc();
    let stamp = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let line = |node: &str, at: String| {
        format!(
            "{{\"time\":\"{at}\",\"action\":\"unseal\",\"outcome\":\"ok\",\"peer\":\"10.0.0.1\",\
             \"node\":\"{node}\"}}\n"
        )
    };
    let lines = [
        line("old", "2020-06-01T10:00:00.000Z".into()),
        line("offset", "2020-06-01T12:30:00.000+02:00".into()),
        line("hours-ago", stamp(now - time::Duration::hours(3))),
        line("recent", stamp(now - time::Duration::minutes(5))),
    ];
    std::fs::write(&trail, lines.concat()).unwrap();
    let nodes = |filters: &[&str]| -> Vec<String> {
        let mut args = vec![
            "audit",
            "--file",
            trail.to_str().unwrap(),
            "--output",
            "json",
        ];
        args.extend_from_slice(filters);
        let output = run_binary(&args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        text(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["node"].to_string())
            .map(|n| n.trim_matches('"').to_string())
            .collect()
    };
    assert_eq!(nodes(&["--since", "1h"]), ["recent"]);
    assert_eq!(nodes(&["--since", "1d"]), ["hours-ago", "recent"]);
    assert_eq!(nodes(&["--until", "1h"]), ["old", "offset", "hours-ago"]);
    // 12:30+02:00 is 10:30 UTC: after 10:15 UTC, before 10:45 UTC.
    assert_eq!(
        nodes(&["--since", "2020-06-01T10:15"]),
        ["offset", "hours-ago", "recent"]
    );
    assert_eq!(
        nodes(&["--since", "2020-06-01", "--until", "2020-06-01T10:45:00Z"]),
        ["old", "offset"]
    );
    assert_eq!(nodes(&["--until", "2020-06-01T12:15:00+02:00"]), ["old"]);

    for garbage in ["garbage", "1x", "2020-13-01", "yesterday"] {
        let output = run_binary(&[
            "audit",
            "--file",
            trail.to_str().unwrap(),
            "--since",
            garbage,
        ]);
        assert!(!output.status.success(), "--since {garbage} was accepted");
        let said = text(&output.stderr);
        assert!(
            said.contains("is not a time")
                && said.contains("7d")
                && said.contains("2026-12-01T10:30"),
            "--since {garbage}: {said}"
        );
    }
}
