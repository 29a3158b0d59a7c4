//! The protocol as a Talos node sees it: real server, real TLS, real gRPC client.

mod common;

use common::*;
use std::net::IpAddr;
use std::sync::Arc;
use talos_kms_server::client::ClientError;
use tonic::Code;

const LOCAL2: &str = "127.0.0.2";

#[tokio::test]
async fn seal_then_unseal_on_fresh_connections_returns_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();

    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(sealed.len(), 44, "Talos stores nonce (12) + key (32)");
    assert!(
        !sealed.windows(32).any(|w| w == passphrase),
        "the blob must not contain the passphrase"
    );
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    // And again: unseal is repeatable at every boot.
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_database_alone_does_not_hold_the_passphrase_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    server.running.shutdown().await.unwrap();

    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", dir.path().join("kms.db").display());
        bytes.extend(std::fs::read(path).unwrap_or_default());
    }
    assert!(
        bytes.windows(12).any(|w| w == &sealed[..12]),
        "the nonce is stored"
    );
    assert!(
        !bytes.windows(32).any(|w| w == &sealed[12..]),
        "the key must not be stored"
    );
    assert!(
        !bytes.windows(32).any(|w| w == passphrase),
        "the passphrase must not be stored"
    );
}

/// A failed unseal answers OK with 32 bytes that are not the passphrase, and differ
/// from one failure to the next.
async fn assert_refused(result: Result<Vec<u8>, ClientError>, passphrase: &[u8]) -> Vec<u8> {
    let answer = result.expect("a refused unseal still answers OK");
    assert_eq!(answer.len(), 32);
    assert_ne!(answer, passphrase);
    answer
}

#[tokio::test]
async fn wrong_node_uuid_gets_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();

    let other = "313faf71-17a0-43d7-a88b-0afd96094178";
    let first = assert_refused(client.unseal(other, &sealed).await, &passphrase).await;
    let second = assert_refused(client.unseal(other, &sealed).await, &passphrase).await;
    assert_ne!(first, second, "decoys are random, not a fixed marker");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_source_address_gets_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let node_a = server.client("127.0.0.1", Some("127.0.0.1".parse().unwrap()));
    let node_b = server.client("127.0.0.1", Some(LOCAL2.parse().unwrap()));
    let passphrase = random_passphrase();

    let sealed = node_a.seal(NODE, &passphrase).await.unwrap();
    assert_refused(node_b.unseal(NODE, &sealed).await, &passphrase).await;
    assert_eq!(node_a.unseal(NODE, &sealed).await.unwrap(), passphrase);

    // And the other way round: sealed from .2, only .2 unseals.
    let sealed = node_b.seal(NODE, &passphrase).await.unwrap();
    assert_refused(node_a.unseal(NODE, &sealed).await, &passphrase).await;
    assert_eq!(node_b.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_nonce_and_tampered_blobs_are_answered_like_wrong_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();

    let mut unknown_nonce = sealed.clone();
    unknown_nonce[0] ^= 0x01;
    let mut tampered_key = sealed.clone();
    tampered_key[43] ^= 0x80;
    let all_zero = vec![0u8; 44];
    for blob in [unknown_nonce, tampered_key, all_zero] {
        assert_refused(client.unseal(NODE, &blob).await, &passphrase).await;
    }
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let sealed = client.seal(NODE, &random_passphrase()).await.unwrap();

    let cases: Vec<(Result<Vec<u8>, ClientError>, &str)> = vec![
        (client.unseal(NODE, &sealed[..43]).await, "44-byte"),
        (
            client
                .unseal(NODE, &[sealed.clone(), vec![0]].concat())
                .await,
            "44-byte",
        ),
        (client.unseal(NODE, &[]).await, "44-byte"),
        (client.unseal("", &sealed).await, "node_uuid is empty"),
        (client.seal(NODE, &[]).await, "data is empty"),
        (client.seal(NODE, &[1u8; 257]).await, "at most 256"),
        (
            client.seal(&"u".repeat(256), &[1u8; 32]).await,
            "node_uuid is 256 bytes",
        ),
    ];
    for (result, reason) in cases {
        match result {
            Err(ClientError::Status(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(
                    status.message().contains(reason),
                    "{:?} lacks {reason:?}",
                    status.message()
                );
            }
            other => panic!("expected INVALID_ARGUMENT ({reason}), got {other:?}"),
        }
    }
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ipv4_clients_bind_the_same_address_text_on_a_dual_stack_listener() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase = random_passphrase();

    // Seal through a dual-stack listener: the peer appears as ::ffff:127.0.0.1.
    let dual = TestServer::start(dir.path(), "[::]:0").await;
    let sealed = dual
        .client("127.0.0.1", None)
        .seal(NODE, &passphrase)
        .await
        .unwrap();
    dual.running.shutdown().await.unwrap();

    // Unseal through an IPv4-only listener on the same database.
    let v4 = TestServer::start(dir.path(), "127.0.0.1:0").await;
    assert_eq!(
        v4.client("127.0.0.1", None)
            .unseal(NODE, &sealed)
            .await
            .unwrap(),
        passphrase
    );
    v4.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn records_survive_a_restart_and_access_times_are_flushed_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase = random_passphrase();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();

    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let (uuid, ip, last_access): (String, String, Option<i64>) = db
        .query_row("SELECT node_uuid, ip, last_access FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((uuid.as_str(), ip.as_str()), (NODE, "127.0.0.1"));
    assert!(
        last_access.is_some(),
        "the unseal's access time is written at shutdown"
    );
    drop(db);

    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_seals_all_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = Arc::new(server.client("127.0.0.1", None));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let client = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{i}");
            let passphrase = random_passphrase();
            let sealed = client.seal(&node, &passphrase).await.unwrap();
            (node, passphrase, sealed)
        }));
    }
    for task in tasks {
        let (node, passphrase, sealed) = task.await.unwrap();
        assert_eq!(client.unseal(&node, &sealed).await.unwrap(), passphrase);
    }
    server.running.shutdown().await.unwrap();
}

/// On one connection, unseals are answered within the poll that reads them while seals wait
/// for their commit in tasks of their own: every answer must still reach its own call.
#[tokio::test]
async fn interleaved_seals_and_unseals_on_one_connection_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let client = server.client("127.0.0.1", None);
    let connection = client.connect().await.unwrap();
    let mut sealed_before = Vec::new();
    for i in 0..32 {
        let node = format!("earlier-{i}");
        let passphrase = random_passphrase();
        let sealed = connection.clone().seal(&node, &passphrase).await.unwrap();
        sealed_before.push((node, passphrase, sealed));
    }
    let mut calls = tokio::task::JoinSet::new();
    for (i, (node, passphrase, sealed)) in sealed_before.into_iter().enumerate() {
        let mut unsealing = connection.clone();
        calls.spawn(async move {
            let answer = unsealing.unseal(&node, &sealed).await.unwrap();
            assert_eq!(
                answer, passphrase,
                "unseal of {node} got another call's answer"
            );
        });
        let mut sealing = connection.clone();
        calls.spawn(async move {
            let node = format!("later-{i}");
            let passphrase = random_passphrase();
            let sealed = sealing.seal(&node, &passphrase).await.unwrap();
            let answer = sealing.unseal(&node, &sealed).await.unwrap();
            assert_eq!(answer, passphrase, "seal then unseal of {node}");
        });
    }
    let mut finished = 0;
    while let Some(call) =
        tokio::time::timeout(std::time::Duration::from_secs(30), calls.join_next())
            .await
            .expect("every call is answered within 30 s")
    {
        call.unwrap();
        finished += 1;
    }
    assert_eq!(finished, 64);
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ipv6_clients_are_bound_to_their_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "[::]:0").await;
    let v6 = server.client("::1", None);
    let v4 = server.client("127.0.0.1", None);
    let passphrase = random_passphrase();
    let sealed = v6.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(v6.unseal(NODE, &sealed).await.unwrap(), passphrase);
    assert_refused(v4.unseal(NODE, &sealed).await, &passphrase).await;
    server.running.shutdown().await.unwrap();

    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let ip: String = db
        .query_row("SELECT ip FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        ip, "0:0:0:0:0:0:0:1",
        "IPv6 in the legacy server's (Java's) text form"
    );
}

#[tokio::test]
async fn a_seal_from_127_0_0_2_is_recorded_with_that_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let source: IpAddr = LOCAL2.parse().unwrap();
    server
        .client("127.0.0.1", Some(source))
        .seal(NODE, &random_passphrase())
        .await
        .unwrap();
    server.running.shutdown().await.unwrap();
    let db = rusqlite::Connection::open(dir.path().join("kms.db")).unwrap();
    let ip: String = db
        .query_row("SELECT ip FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ip, LOCAL2);
}
