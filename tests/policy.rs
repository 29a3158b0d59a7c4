//! Who may seal and unseal, against a running server, from real clients bound to 127.0.0.1
//! and 127.0.0.2: allow-lists, rate limits, quotas, windows, approvals and pinning. Every
//! refusal must be a gRPC error with its reason in the audit trail, never decoy bytes.

mod common;

use common::*;
use std::time::{Duration, Instant};
use talos_kms_server::client::{ClientError, KmsClient, random_passphrase};
use tonic::Code;

const NODE_1: &str = "127.0.0.1";
const NODE_2: &str = "127.0.0.2";

/// A server logging at `level` (this server's messages and the libraries').
fn start_logging(extra_config: &str, level: &str) -> Running {
    let setup = Setup::new(extra_config);
    edit_config(
        &setup.config,
        "kmsLogLevel: INFO",
        &format!("kmsLogLevel: {level}"),
    );
    edit_config(
        &setup.config,
        "rootLogLevel: WARNING",
        &format!("rootLogLevel: {level}"),
    );
    setup.start()
}

impl Running {
    /// The audit trail's call lines, oldest first.
    async fn audit(&self) -> Vec<serde_json::Value> {
        self.admin(&["audit", "--output", "json"])
            .await
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Whether the audit trail has a refusal with this reason.
    async fn audited_refusal(&self, reason: &str) -> bool {
        self.audit()
            .await
            .iter()
            .any(|line| line["outcome"] == "refused" && line["reason"] == reason)
    }
}

/// The gRPC status of a refused call; panics on success or on a failure that is no status.
fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>) -> tonic::Status {
    match result {
        Err(ClientError::Status(status)) => status,
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_are_per_operation() {
    let running = Running::start(
        "sealAllowedNetworks: [\"127.0.0.1/32\"]\n\
         unsealAllowedNetworks: [\"127.0.0.0/30\", \"::1\"]\n",
    );
    let (node_1, node_2) = (running.node(NODE_1), running.node(NODE_2));
    let secret = random_passphrase();
    let sealed = node_1.seal("node-a", &secret).await.unwrap();
    assert_eq!(node_1.unseal("node-a", &sealed).await.unwrap(), secret);

    let status = refused(node_2.seal("node-b", &random_passphrase()).await);
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("sealAllowedNetworks") && status.message().contains(NODE_2),
        "{status:?}"
    );
    // 127.0.0.2 may unseal: the call is served (its own seals would unseal).
    let other = node_1.seal("node-c", &secret).await.unwrap();
    assert!(node_2.unseal("node-c", &other).await.is_ok());
    assert!(running.audited_refusal("network_not_allowed").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_refuses_with_resource_exhausted_and_recovers() {
    let running = Running::start("rateLimitPerAddress: {perSecond: 1, burst: 5}\n");
    let (node_1, node_2) = (running.node(NODE_1), running.node(NODE_2));
    let secret = random_passphrase();
    let sealed = node_1.seal("node-a", &secret).await.unwrap();
    // Calls faster than one a second run the bucket dry; each call takes far less than a
    // second, but a loaded machine may refill a token or two meanwhile.
    let mut served = 1;
    let status = loop {
        assert!(served < 40, "never refused after {served} calls");
        match node_1.unseal("node-a", &sealed).await {
            Ok(passphrase) => {
                assert_eq!(passphrase, secret);
                served += 1;
            }
            Err(error) => break refused::<()>(Err(error)),
        }
    };
    assert!(served >= 5, "the burst of 5 was not served: {served}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    // The limit, a wait in seconds, and what helps a cluster behind one address.
    let message = status.message();
    assert!(
        message.contains("rateLimitPerAddress allows 1/s, burst 5")
            && message.contains("retry in")
            && !message.contains(" ms")
            && message.contains("trustedProxies"),
        "{status:?}"
    );
    // Another address has its own bucket.
    assert!(node_2.seal("node-b", &secret).await.is_ok());
    // A token comes back within a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(node_1.unseal("node-a", &sealed).await.unwrap(), secret);
    assert!(running.audited_refusal("rate_limited").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_rate_limit_counts_every_address() {
    let running = Running::start(
        "rateLimitGlobal: {perSecond: 1, burst: 4}\nrateLimitPerAddress: {perSecond: 0}\n",
    );
    let nodes = [running.node(NODE_1), running.node(NODE_2)];
    let mut served = 0;
    let status = loop {
        assert!(served < 40, "never refused after {served} calls");
        let node = &nodes[served % 2];
        match node
            .seal(&format!("node-{served}"), &random_passphrase())
            .await
        {
            Ok(_) => served += 1,
            Err(error) => break refused::<()>(Err(error)),
        }
    };
    assert!(served >= 4, "{served}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("rateLimitGlobal"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_stop_a_node_and_the_hour_from_filling_the_database() {
    let running = Running::start("maxRecordsPerNode: 2\nmaxNewRecordsPerHour: 4\n");
    let node = running.node(NODE_1);
    for _ in 0..2 {
        node.seal("node-a", &random_passphrase()).await.unwrap();
    }
    let status = refused(node.seal("node-a", &random_passphrase()).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("maxRecordsPerNode") && status.message().contains("keys purge"),
        "{status:?}"
    );
    node.seal("node-b", &random_passphrase()).await.unwrap();
    node.seal("node-c", &random_passphrase()).await.unwrap();
    let status = refused(node.seal("node-d", &random_passphrase()).await);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("maxNewRecordsPerHour"),
        "{status:?}"
    );
    assert_eq!(
        running
            .admin(&["keys", "list", "--output", "json"])
            .await
            .lines()
            .count(),
        4,
        "a refused seal stores nothing"
    );
    assert!(running.audited_refusal("over_quota").await);
}

/// The quota holds for seals of one node arriving together (a node's volumes, or a cloned
/// node UUID): it is checked in the transaction that stores each seal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_arriving_together_stay_within_the_node_quota() {
    let running = Running::start("maxRecordsPerNode: 3\n");
    let node = std::sync::Arc::new(running.node(NODE_1));
    let mut seals = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let node = std::sync::Arc::clone(&node);
        seals.spawn(async move { node.seal("node-q", &random_passphrase()).await });
    }
    let (mut stored, mut over_quota) = (0, 0);
    while let Some(sealed) = seals.join_next().await {
        match sealed.unwrap() {
            Ok(_) => stored += 1,
            Err(ClientError::Status(status)) if status.code() == Code::ResourceExhausted => {
                over_quota += 1
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((stored, over_quota), (3, 5));
    let listed = running
        .admin(&["keys", "list", "--node", "node-q", "--output", "json"])
        .await;
    assert_eq!(listed.lines().count(), 3, "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_allow_calls_only_while_open() {
    let running = Running::start("sealPolicy: window\nunsealPolicy: window\n");
    let node = running.node(NODE_1);
    let secret = random_passphrase();

    let status = refused(node.seal("node-a", &secret).await);
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a node waits a closed window out"
    );
    assert!(
        status.message().contains("window open seal"),
        "the message says how to open one: {status:?}"
    );

    running
        .admin(&["window", "open", "both", "--for", "1h"])
        .await;
    let status_text = running.admin(&["window", "status"]).await;
    assert!(status_text.contains("open until"), "{status_text}");
    let sealed = node.seal("node-a", &secret).await.unwrap();
    assert_eq!(node.unseal("node-a", &sealed).await.unwrap(), secret);

    running.admin(&["window", "close", "unseal"]).await;
    let status = refused(node.unseal("node-a", &sealed).await);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        node.seal("node-b", &secret).await.is_ok(),
        "seal window still open"
    );

    // A window runs out by itself.
    running
        .admin(&["window", "open", "unseal", "--for", "2s"])
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = refused(node.unseal("node-a", &sealed).await);
    assert_eq!(status.code(), Code::Unavailable);

    let status = running
        .admin(&["window", "status", "--output", "json"])
        .await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status[0]["operation"], "seal");
    assert_eq!(status[0]["window_open"], true);
    assert_eq!(status[1]["window_open"], false);
    assert!(running.audited_refusal("window_closed").await);
    let admin_lines = running.audit().await;
    assert!(
        admin_lines.iter().any(|l| l["command"] == "window open"),
        "window changes are audited"
    );
}

/// Unseals every `interval`, like a booting node that retries every 30 s, until it gets
/// the passphrase or `limit` passes; returns it and the refusals seen meanwhile.
async fn unseal_until_served(
    node: &KmsClient,
    node_uuid: &str,
    sealed: &[u8],
    limit: Duration,
) -> (Option<Vec<u8>>, Vec<tonic::Status>) {
    let deadline = Instant::now() + limit;
    let mut refusals = Vec::new();
    while Instant::now() < deadline {
        match node.unseal(node_uuid, sealed).await {
            Ok(passphrase) => return (Some(passphrase), refusals),
            Err(error) => refusals.push(refused::<()>(Err(error))),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (None, refusals)
}

async fn pending(running: &Running, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["pending", "list", "--output", "json"];
    if all {
        args.push("--all");
    }
    running
        .admin(&args)
        .await
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_approves_a_waiting_node_and_denies_another() {
    let running = Running::start("unsealPolicy: approve\nmetricsAddress: 127.0.0.1:0\n");
    let (node_1, node_2) = (running.node(NODE_1), running.node(NODE_2));
    let secret = random_passphrase();
    let sealed = node_1.seal("node-a", &secret).await.unwrap();

    // The node boots and waits: each attempt is refused with a retryable error.
    let status = refused(node_1.unseal("node-a", &sealed).await);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("pending approve"), "{status:?}");
    let waiting = pending(&running, false).await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["node"], "node-a");
    assert_eq!(waiting[0]["ip"], NODE_1);
    assert_eq!(waiting[0]["operation"], "unseal");
    let id = waiting[0]["id"].to_string();
    assert!(
        status.message().contains(&format!("request {id}")),
        "{status:?}"
    );

    // The operator approves while the node keeps retrying; its next retry is served.
    let booting = {
        let node = running.node(NODE_1);
        let sealed = sealed.clone();
        tokio::spawn(async move {
            unseal_until_served(&node, "node-a", &sealed, Duration::from_secs(30)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    running
        .admin(&["pending", "approve", &id, "--for", "15m"])
        .await;
    let (passphrase, refusals) = booting.await.unwrap();
    assert_eq!(passphrase.as_deref(), Some(&secret[..]), "{refusals:?}");
    assert!(
        refusals.iter().all(|s| s.code() == Code::Unavailable),
        "{refusals:?}"
    );
    assert!(pending(&running, false).await.is_empty());

    // The same UUID from another address is another request; denied, it stays refused.
    let status = refused(node_2.unseal("node-a", &sealed).await);
    assert_eq!(status.code(), Code::Unavailable);
    let waiting = pending(&running, false).await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["ip"], NODE_2);
    let denied_id = waiting[0]["id"].to_string();
    running.admin(&["pending", "deny", &denied_id]).await;
    for _ in 0..2 {
        let status = refused(node_2.unseal("node-a", &sealed).await);
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let all = pending(&running, true).await;
    let states: Vec<_> = all.iter().map(|a| a["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["approved", "denied"]);

    // An approval runs out: the next boot waits again.
    running
        .admin(&["pending", "approve", &id, "--for", "1s"])
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = refused(node_1.unseal("node-a", &sealed).await);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(pending(&running, false).await[0]["id"].to_string(), id);

    for reason in ["pending_approval", "denied"] {
        assert!(running.audited_refusal(reason).await, "{reason}");
    }
    let unknown = run_binary_async(&[
        "pending",
        "approve",
        "999",
        "--config",
        running.config_str(),
    ])
    .await;
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("no request has id 999"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sealing_from_a_new_address_is_flagged_or_refused_when_pinned() {
    let flagged = Running::start("");
    let (node_1, node_2) = (flagged.node(NODE_1), flagged.node(NODE_2));
    node_1.seal("node-a", &random_passphrase()).await.unwrap();
    node_2.seal("node-a", &random_passphrase()).await.unwrap();
    let lines = flagged.audit().await;
    assert!(
        lines.iter().any(|l| l["action"] == "seal"
            && l["outcome"] == "ok"
            && l["peer"] == NODE_2
            && l["detail"].as_str().unwrap_or("").contains(NODE_1)),
        "{lines:?}"
    );

    let pinned = Running::start("pinNodeIp: true\n");
    let (node_1, node_2) = (pinned.node(NODE_1), pinned.node(NODE_2));
    node_1.seal("node-a", &random_passphrase()).await.unwrap();
    let status = refused(node_2.seal("node-a", &random_passphrase()).await);
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("keys revoke --node node-a"),
        "{status:?}"
    );
    assert!(pinned.audited_refusal("pinned").await);
    // The operator confirms the move: old records revoked, the new address may seal.
    pinned.admin(&["keys", "revoke", "--node", "node-a"]).await;
    node_2.seal("node-a", &random_passphrase()).await.unwrap();
}

#[test]
fn bad_policy_config_is_explained() {
    let setup = Setup::new("");
    for (extra, named) in [
        ("sealAllowedNetworks: [\"10.0.0.0/33\"]\n", "10.0.0.0/33"),
        (
            "unsealAllowedNetworks: []\n",
            "unsealAllowedNetworks is empty",
        ),
        ("sealPolicy: sometimes\n", "open, window or approve"),
        ("rateLimitPerAddress: {perSecond: 10, burst: 2}\n", "burst"),
        ("idleTimeout: soon\n", "idleTimeout"),
    ] {
        setup.rewrite(extra);
        let output = run_binary(&["check", "--config", setup.config_str()]);
        let stderr = text(&output.stderr) + &text(&output.stdout);
        assert!(!output.status.success(), "{extra}");
        assert!(stderr.contains(named), "{extra}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_state_survives_a_restart_and_no_output_holds_a_secret() {
    let mut running = start_logging("sealPolicy: approve\nunsealPolicy: window\n", "TRACE");
    let node = running.node(NODE_1);
    let secret = random_passphrase();
    let mut refusals = Vec::new();
    refusals.push(refused(node.seal("node-a", &secret).await));
    let id = pending(&running, false).await[0]["id"].to_string();
    running.admin(&["pending", "approve", &id]).await;
    running
        .admin(&["window", "open", "unseal", "--for", "1h"])
        .await;

    // Both decisions hold across a restart of the server.
    let server = std::mem::replace(
        &mut running.server,
        ServerProcess::start(&running.config).unwrap(),
    );
    let first_log = tokio::task::spawn_blocking(move || drain_log(server))
        .await
        .unwrap();
    let node = running.node(NODE_1);
    let sealed = node.seal("node-a", &secret).await.unwrap();
    assert_eq!(node.unseal("node-a", &sealed).await.unwrap(), secret);
    running.admin(&["window", "close"]).await;
    refusals.push(refused(node.unseal("node-a", &sealed).await));

    let mut outputs = vec![
        first_log,
        format!("{refusals:?}"),
        running.admin(&["pending", "list", "--all"]).await,
        running
            .admin(&["pending", "list", "--all", "--output", "json"])
            .await,
        running.admin(&["window", "status"]).await,
        running.admin(&["audit"]).await,
        std::fs::read_to_string(
            running
                .config
                .with_file_name("talos-kms-server-audit.jsonl"),
        )
        .unwrap(),
    ];
    let server = std::mem::replace(
        &mut running.server,
        ServerProcess::start(&running.config).unwrap(),
    );
    outputs.push(
        tokio::task::spawn_blocking(move || drain_log(server))
            .await
            .unwrap(),
    );
    assert!(
        outputs[0].contains("awaiting approval"),
        "log captured: {}",
        outputs[0]
    );
    for output in &outputs {
        assert_no_secret(
            output,
            "an output",
            &[
                ("passphrase", &secret[..]),
                ("key", &sealed[12..]),
                ("blob", &sealed[..]),
            ],
        );
    }
}

/// Stops the server and returns everything it logged.
fn drain_log(mut server: ServerProcess) -> String {
    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    let mut lines = server.startup_log.clone();
    assert!(server.terminate().success());
    std::thread::sleep(Duration::from_millis(200));
    lines.extend(log.try_iter());
    lines.join("\n")
}

#[test]
fn check_shows_the_policy_and_warns_when_nothing_limits_seals() {
    let setup = Setup::new(
        "sealPolicy: window\nunsealPolicy: approve\nunsealAllowedNetworks: [\"10.0.0.0/24\"]\n",
    );
    let output = run_binary(&["check", "--config", setup.config_str()]);
    let report = text(&output.stdout);
    assert!(
        report.contains("seal: only while a window is open")
            && report.contains("unseal: only for approved nodes")
            && report.contains("from 10.0.0.0/24"),
        "{report}"
    );
    assert!(!report.contains("nothing limits seals"), "{report}");

    setup.rewrite(
        "rateLimitPerAddress: {perSecond: 0}\nrateLimitGlobal: {perSecond: 0}\n\
         maxNewRecordsPerHour: 0\n",
    );
    let output = run_binary(&["check", "--config", setup.config_str()]);
    assert!(text(&output.stdout).contains("nothing limits seals"));
    assert_eq!(output.status.code(), Some(2), "a warning");
}
