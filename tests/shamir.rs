//! `keySource: shamir` end to end: the server starts sealed (health NOT_SERVING, Seal and
//! Unseal UNAVAILABLE), operators give shares with `unseal-server` through the local admin
//! socket, bad shares are named and change nothing, and the threshold's worth unseals.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use talos_kms_server::client::{ClientError, KmsClient};
use talos_kms_server::config::Config;

const SHAMIR: &str = "keySource: {shamir: {threshold: 2, shares: 3}}\n";
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

fn init_shares(config: &str) -> Vec<String> {
    let made = run_binary(&["key-source", "init", "--config", config]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let shares: Vec<String> = text(&made.stdout).lines().map(String::from).collect();
    assert_eq!(shares.len(), 3, "one share per line: {shares:?}");
    assert!(shares.iter().all(|share| share.starts_with("tkms1-2-")));
    shares
}

/// `unseal-server` with `input` on its stdin (a pipe, as from a script), bounded to 60 s.
fn unseal_server(
    config: &str,
    args: &[&str],
    input: &str,
    adjust: impl FnOnce(&mut Command),
) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(["unseal-server", "--config", config])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    adjust(&mut command);
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// Gives `share` and returns the answer line; `ok` says whether the command must succeed.
async fn give(config: &Path, share: &str, ok: bool) -> String {
    let config = config.to_str().unwrap().to_string();
    let input = format!("{share}\n");
    let output = tokio::task::spawn_blocking(move || unseal_server(&config, &[], &input, |_| ()))
        .await
        .unwrap();
    assert_eq!(
        output.status.success(),
        ok,
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout).trim().to_string()
}

async fn status(config: &Path) -> String {
    let config = config.to_str().unwrap().to_string();
    let output =
        tokio::task::spawn_blocking(move || unseal_server(&config, &["--status"], "", |_| ()))
            .await
            .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout).trim().to_string()
}

/// A call a sealed server must refuse with a retryable UNAVAILABLE that says why.
fn assert_sealed_refusal<T: std::fmt::Debug>(result: Result<T, ClientError>, call: &str) {
    match result {
        Err(ClientError::Status(status)) => {
            assert_eq!(
                status.code(),
                tonic::Code::Unavailable,
                "{call}: {status:?}"
            );
            assert!(status.message().contains("sealed"), "{call}: {status:?}");
        }
        other => panic!("{call} on a sealed server: {other:?}"),
    }
}

async fn assert_sealed(running_port: u16, ca: &Path, node: &KmsClient, blob: &[u8]) {
    assert_eq!(grpc_health(running_port, ca).await, NOT_SERVING);
    assert_sealed_refusal(node.seal(NODE, &random_passphrase()).await, "Seal");
    assert_sealed_refusal(node.unseal(NODE, blob).await, "Unseal");
}

async fn metrics_health(address: &str) -> u8 {
    use http_body_util::BodyExt;
    let response = plain_grpc(address, "/grpc.health.v1.Health/Check", &[]).await;
    health_status(&response.into_body().collect().await.unwrap().to_bytes())
}

fn admin_socket(config: &Path) -> PathBuf {
    Config::read(config).unwrap().admin_socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shamir_server_starts_sealed_and_serves_once_the_threshold_of_shares_came() {
    let setup = Setup::new(&format!("{SHAMIR}metricsAddress: 127.0.0.1:0\n"));
    let shares = init_shares(setup.config_str());
    let others = init_shares(setup.config_str());
    let running = setup.start();
    let config = running.config.clone();
    let startup = running.server.startup_log.join("\n");
    let socket = admin_socket(&config);
    assert!(
        startup.contains("sealed: every seal and unseal is answered UNAVAILABLE")
            && startup.contains(&socket.display().to_string()),
        "{startup}"
    );
    let metadata = std::fs::metadata(&socket).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    assert_eq!(metadata.uid(), rustix::process::geteuid().as_raw());

    let port = running.port();
    let ca = running.pki.ca.clone();
    let node = running.node("127.0.0.7");
    let metrics = running.server.metrics_address();
    let never_sealed = [7u8; 44];
    assert_sealed(port, &ca, &node, &never_sealed).await;
    assert_eq!(metrics_health(&metrics).await, NOT_SERVING);
    let scrape_sealed = |metrics: String| async move {
        tokio::task::spawn_blocking(move || scrape(&metrics, None))
            .await
            .unwrap()
            .lines()
            .find(|line| line.starts_with("talos_kms_custody_sealed "))
            .map(String::from)
    };
    assert_eq!(
        scrape_sealed(metrics.clone()).await.as_deref(),
        Some("talos_kms_custody_sealed 1")
    );

    // Bad shares are named; each leaves the server sealed and the good share kept.
    assert!(
        give(&config, "hello", false)
            .await
            .starts_with("refused: this share is not a share"),
    );
    let mistyped = shares[0].replacen("tkms1-2-1-", "tkms1-2-2-", 1);
    let answer = give(&config, &mistyped, false).await;
    assert!(answer.contains("this share is mistyped"), "{answer}");
    assert_eq!(
        give(&config, &shares[0], true).await,
        "accepted: share number 1; 1 of 2 shares given so far, 1 more needed"
    );
    let answer = give(&config, &shares[0], false).await;
    assert!(
        answer.contains("share number 1 was given already")
            && answer.ends_with("nothing changed: 1 of 2 shares given so far"),
        "{answer}"
    );
    let answer = give(&config, &others[1], false).await;
    assert!(
        answer.contains("another set (another `key-source init`)")
            && answer.contains("--start-over"),
        "{answer}"
    );
    assert_eq!(
        status(&config).await,
        "sealed: waiting for key shares: 1 of 2 given so far"
    );
    assert_sealed(port, &ca, &node, &never_sealed).await;

    let answer = give(&config, &shares[2], true).await;
    assert!(
        answer.starts_with("unsealed: the server serves now"),
        "{answer}"
    );
    assert_eq!(
        wait_for_health(port, &ca, SERVING, Duration::from_secs(10)).await,
        SERVING
    );
    assert_eq!(metrics_health(&metrics).await, SERVING);
    assert_eq!(
        scrape_sealed(metrics.clone()).await.as_deref(),
        Some("talos_kms_custody_sealed 0")
    );
    let passphrase = random_passphrase();
    let blob = node.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(node.unseal(NODE, &blob).await.unwrap(), passphrase);
    assert_eq!(
        give(&config, &shares[1], true).await,
        "unsealed: already unsealed; nothing to do"
    );

    let Running {
        dir,
        mut server,
        pki,
        ..
    } = running;
    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    let stopped = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(stopped.success());
    assert!(!socket.exists(), "the admin socket is removed at stop");
    // Neither the log nor the audit trail holds a share (the audit names each answer).
    let log: Vec<String> = log
        .try_iter()
        .chain(startup.lines().map(String::from))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let audit = std::fs::read_to_string(Config::read(&config).unwrap().audit_log).unwrap();
    assert!(
        audit.contains("unseal-server") && audit.contains("accepted: share number 1"),
        "{audit}"
    );
    for share in shares.iter().chain(&others) {
        let secret_part = share.rsplit('-').nth(1).unwrap();
        for (what, text) in [("log", log.join("\n")), ("audit trail", audit.clone())] {
            assert!(!text.contains(secret_part), "a share in the {what}");
        }
    }

    // A restart is sealed again; another set's shares rebuild a key that does not unwrap
    // this database's data keys: said, and the server stays sealed.
    let server = ServerProcess::start(&config).unwrap();
    let port = server.addr.port();
    let node = client_for(
        "127.0.0.1",
        port,
        &pki.ca,
        Some("127.0.0.7".parse().unwrap()),
    );
    assert_sealed(port, &pki.ca, &node, &blob).await;
    give(&config, &others[0], true).await;
    let answer = give(&config, &others[2], false).await;
    assert!(
        answer.contains("not the one this database's data keys are wrapped under")
            && answer.contains("give 2 shares again"),
        "{answer}"
    );
    assert_sealed(port, &pki.ca, &node, &blob).await;
    give(&config, &shares[1], true).await;
    give(&config, &shares[0], true).await;
    assert_eq!(node.unseal(NODE, &blob).await.unwrap(), passphrase);
    drop(server);
    drop(dir);
}

/// The legacy file is taken over once the shares came and before a node is answered: a node
/// whose record is only in the legacy file never gets a decoy for want of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_take_over_waits_for_the_shares_and_comes_before_any_answer() {
    let setup = Setup::with(|dir| {
        format!(
            "{SHAMIR}nodeDbFile: {}\n",
            dir.join("nodeDbFile.json").display()
        )
    });
    let legacy = setup.dir.path().join("nodeDbFile.json");
    let volumes_file = setup.dir.path().join("volumes.jsonl");
    run_ok(&[
        "fill",
        "--legacy-json",
        legacy.to_str().unwrap(),
        "--records",
        "3",
        "--ip",
        "127.0.0.7",
        "--volumes",
        volumes_file.to_str().unwrap(),
    ])
    .await;
    let volumes = talos_kms_server::bench::volumes::read(&volumes_file).unwrap();
    let shares = init_shares(setup.config_str());
    let running = setup.start();
    let startup = running.server.startup_log.join("\n");
    assert!(!startup.contains("took over"), "{startup}");
    let node = running.node("127.0.0.7");
    assert_sealed(running.port(), &running.pki.ca, &node, &volumes[0].sealed).await;

    give(&running.config, &shares[2], true).await;
    let answer = give(&running.config, &shares[1], true).await;
    assert!(answer.starts_with("unsealed:"), "{answer}");
    for volume in &volumes {
        let unsealed = node
            .unseal(&volume.node_uuid, &volume.sealed)
            .await
            .unwrap();
        assert_eq!(
            unsealed, volume.passphrase,
            "the legacy record unseals at once"
        );
    }
    // Taken over through the custodian: wrapped under the first data key.
    let db = rusqlite::Connection::open(running.dir.path().join("kms.db")).unwrap();
    let wrapped: i64 = db
        .query_row(
            "SELECT count(*) FROM records WHERE key_version IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(wrapped, 3);
}

/// The socket is the server's alone: a second server with the same socket refuses to start,
/// and a socket left by a killed server is replaced.
#[test]
fn the_admin_socket_belongs_to_one_running_server() {
    let setup = Setup::new(SHAMIR);
    let config = setup.config.clone();
    let mut running = setup.start();
    let second = run_binary(&["serve", "--config", running.config_str()]);
    assert_eq!(second.status.code(), Some(1));
    let error = text(&second.stderr);
    assert!(
        error.contains("admin socket") && error.contains("another server answers on it"),
        "{error}"
    );
    assert!(
        admin_socket(&config).exists(),
        "the running server's socket is left alone"
    );

    running.server.kill9();
    assert!(admin_socket(&config).exists(), "left behind by kill -9");
    let restarted = ServerProcess::start(&config).unwrap();
    let answer = unseal_server(config.to_str().unwrap(), &["--status"], "", |_| ());
    assert_eq!(
        text(&answer.stdout).trim(),
        "sealed: waiting for key shares: 0 of 2 given so far"
    );
    drop(restarted);

    std::fs::remove_file(admin_socket(&config)).unwrap();
    std::fs::write(admin_socket(&config), "not a socket").unwrap();
    let blocked = run_binary(&["serve", "--config", running.config_str()]);
    assert_eq!(blocked.status.code(), Some(1));
    assert!(
        text(&blocked.stderr).contains("something other than a socket is there"),
        "{}",
        text(&blocked.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(admin_socket(&config)).unwrap(),
        "not a socket",
        "never removed"
    );
}

/// Only the server's user and root reach the socket: its mode keeps others out, and its
/// peer-credential check refuses them even where the mode would not (tested as root, which
/// can run the client as another user; skipped otherwise).
#[test]
fn another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run the client as another user");
        return;
    }
    use std::os::unix::process::CommandExt;
    // A directory another user may enter, holding the socket and a readable config.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = open.path().join("admin.sock");
    let setup = Setup::new(&format!("{SHAMIR}adminSocket: {}\n", socket.display()));
    let shares = init_shares(setup.config_str());
    let readable = open.path().join("config.yaml");
    std::fs::copy(&setup.config, &readable).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let running = setup.start();
    let as_nobody = |share: &str| {
        unseal_server(
            readable.to_str().unwrap(),
            &[],
            &format!("{share}\n"),
            |command| {
                command.uid(65534).gid(65534);
            },
        )
    };

    let denied = as_nobody(&shares[0]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        text(&denied.stderr).contains("permission denied: run this as the server's user"),
        "{}",
        text(&denied.stderr)
    );

    // Were the mode widened by mistake, the credentials still refuse.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = as_nobody(&shares[0]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        text(&refused.stdout).trim(),
        "refused: only the server's user (uid 0) and root may use this socket; you are uid 65534"
    );
    let answer = unseal_server(running.config_str(), &["--status"], "", |_| ());
    assert_eq!(
        text(&answer.stdout).trim(),
        "sealed: waiting for key shares: 0 of 2 given so far",
        "the refused share was not taken"
    );
}

/// With a shamir source the root exists only in the running server: `keys rotate-data-key`,
/// `rotate-root` (new shares, printed once, never logged or audited) and `destroy-data-key`
/// are asked of it over the admin socket. After a restart the old shares open nothing and
/// the new ones open every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_through_the_running_server_and_new_shares_replace_the_old() {
    let setup = Setup::new(SHAMIR);
    let old = init_shares(setup.config_str());
    let running = setup.start();
    let config = running.config.clone();
    // Sealed: nothing to rotate with.
    let sealed = run_binary(&["keys", "rotate-data-key", "--config", running.config_str()]);
    assert_eq!(sealed.status.code(), Some(1));
    assert!(text(&sealed.stderr).contains("give the key shares first"));
    give(&config, &old[0], true).await;
    give(&config, &old[2], true).await;
    let node = running.node("127.0.0.51");
    let passphrase = random_passphrase();
    let blob = node.seal(NODE, &passphrase).await.unwrap();

    // A change that needs the keys cannot be made from a separate command.
    let revoke = run_binary(&["keys", "revoke", "1", "--config", running.config_str()]);
    assert_eq!(revoke.status.code(), Some(1));
    assert!(
        text(&revoke.stderr).contains("only the running server holds"),
        "{}",
        text(&revoke.stderr)
    );
    let out = running.admin(&["keys", "rotate-data-key"]).await;
    assert!(out.contains("made data key v2"), "{out}");
    let out = running.admin(&["keys", "rotate-root"]).await;
    let new: Vec<String> = out
        .lines()
        .filter(|line| line.starts_with("tkms1-2-"))
        .map(String::from)
        .collect();
    assert_eq!(new.len(), 3, "{out}");
    assert!(new.iter().all(|share| !old.contains(share)));
    // v1 goes once the background pass re-wrapped its one record under v2.
    let destroy = [
        "keys",
        "destroy-data-key",
        "1",
        "--yes",
        "--config",
        running.config_str(),
    ];
    let mut out = run_binary(&destroy);
    for _ in 0..100 {
        if out.status.success() {
            break;
        }
        assert!(
            text(&out.stderr).contains("still wrapped under v1"),
            "{}",
            text(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = run_binary(&destroy);
    }
    assert!(
        text(&out.stdout).contains("destroyed data key v1"),
        "{}",
        text(&out.stderr)
    );
    // The shares went to the operator only.
    let trail = running.admin(&["audit"]).await;
    assert!(trail.contains("rotate-root"), "{trail}");
    for share in &new {
        assert!(
            !trail.contains(share.as_str()),
            "a share in the audit trail"
        );
    }

    let Running {
        dir: _dir,
        mut server,
        pki,
        config,
    } = running;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut log = Vec::new();
    while let Ok(line) = server.log.try_recv() {
        log.push(line);
    }
    for share in &new {
        assert!(
            !log.iter().any(|line| line.contains(share.as_str())),
            "a share in the log"
        );
    }
    let running = Running {
        server: ServerProcess::start(&config).unwrap(),
        pki,
        config,
        dir: _dir,
    };
    give(&running.config, &old[0], true).await;
    let refused = give(&running.config, &old[1], false).await;
    assert!(
        refused.contains("not the one this database's data keys"),
        "{refused}"
    );
    give(&running.config, &new[1], true).await;
    let unsealed = give(&running.config, &new[2], true).await;
    assert!(unsealed.starts_with("unsealed"), "{unsealed}");
    assert_eq!(
        running
            .node("127.0.0.51")
            .unseal(NODE, &blob)
            .await
            .unwrap(),
        passphrase
    );
}
