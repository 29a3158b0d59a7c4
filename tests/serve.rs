//! Serving as an operator sees it: what the log says about failed handshakes, signals,
//! failed starts, and requests that are not gRPC.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;
use talos_kms_server::client::{ClientOptions, KmsClient};

/// Sends one Seal over HTTP/2 with the given content-type; returns the HTTP status.
async fn seal_with_content_type(server: &TestServer, content_type: &str) -> http::StatusCode {
    // A well-formed message: Request { node_uuid: "n", data: 32 bytes }.
    let mut message = vec![0x0a, 1, b'n', 0x12, 32];
    message.extend_from_slice(&random_passphrase());
    raw_grpc(
        server.port(),
        &server.pki.ca,
        "/sidero.kms.KMSService/Seal",
        content_type,
        &message,
    )
    .await
    .status()
}

fn records(database: &std::path::Path) -> i64 {
    rusqlite::Connection::open(database)
        .unwrap()
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_request_that_is_not_grpc_gets_415_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    for content_type in ["text/plain", "application/json", "application/grpc-web"] {
        assert_eq!(
            seal_with_content_type(&server, content_type).await,
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}"
        );
    }
    assert_eq!(records(&server.database), 0, "nothing was sealed");
    for content_type in ["application/grpc", "application/grpc+proto; charset=utf-8"] {
        assert_eq!(
            seal_with_content_type(&server, content_type).await,
            http::StatusCode::OK,
            "{content_type}"
        );
    }
    assert_eq!(records(&server.database), 2);
}

fn untrusting_client(port: u16, source: &str) -> KmsClient {
    // No --ca: the public roots, as a Talos node has, which do not hold the test CA.
    let mut options = ClientOptions::new(format!("https://127.0.0.1:{port}").parse().unwrap());
    options.source_ip = Some(source.parse().unwrap());
    KmsClient::new(options).unwrap()
}

#[tokio::test]
async fn failed_handshakes_are_logged_once_per_peer_and_reason() {
    let setup = Setup::new("");
    let pki = &setup.pki;
    let config = &setup.config;
    let mut server = ServerProcess::start(config).unwrap();
    let port = server.addr.port();
    for source in ["127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"] {
        let refused = untrusting_client(port, source).handshake().await;
        assert!(refused.is_err(), "the test CA is not a public root");
    }
    // A trusting client still gets through.
    client_for("127.0.0.1", port, &pki.ca, None)
        .handshake()
        .await
        .unwrap();
    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(200));
    let warnings: Vec<String> = log
        .try_iter()
        .filter(|line| line.contains("WARN") && line.contains("TLS handshake failed"))
        .collect();
    assert_eq!(warnings.len(), 2, "one per peer: {warnings:#?}");
    for (warning, peer) in warnings.iter().zip(["127.0.0.1", "127.0.0.2"]) {
        assert!(warning.contains(&format!("peer={peer}")), "{warning}");
        assert!(
            warning.contains("UnknownCA"),
            "the client's alert: {warning}"
        );
        assert!(warning.contains("does not trust the CA"), "{warning}");
    }
}

#[tokio::test]
async fn sighup_and_sigusr1_do_not_stop_the_server() {
    let running = Running::start("");
    let pid = running.server.child.id().to_string();
    for signal in ["-HUP", "-USR1", "-USR2"] {
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
    let client = running.client();
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    let server = running.server;
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_start_that_cannot_bind_leaves_nothing_behind_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let (_taken, port) = taken_port();
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    edit_config(&config, "port: 0", &format!("port: {port}"));

    let output = run_binary(&["--config", config.to_str().unwrap()]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "each cause once: {stderr}"
    );
    assert!(!stderr.contains("os error"), "{stderr}");
    assert!(
        stderr.contains("already running"),
        "the likely fix: {stderr}"
    );
    assert!(
        !dir.path().join("kms.db").exists(),
        "no database is created by a start that fails to bind"
    );
}

#[test]
fn a_serving_process_can_never_dump_core() {
    let running = Running::start("");
    let server = &running.server;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|line| line.starts_with("Max core file size"))
        .unwrap();
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "soft and hard limit: {core}");
}
