//! What the server refuses at once rather than serve too late for its client: a call whose
//! `grpc-timeout` has run out, and a handshake that would queue past its deadline.

mod common;

use common::*;
use std::time::Duration;
use talos_kms_server::client::ClientError;
use tokio::task::JoinSet;

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

fn count_records(running: &Running) -> i64 {
    let db = rusqlite::Connection::open(running.dir.path().join("kms.db")).unwrap();
    db.query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

fn unavailable(result: Result<Vec<u8>, ClientError>) -> String {
    match result {
        Err(ClientError::Status(status)) if status.code() == tonic::Code::Unavailable => {
            status.message().to_string()
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_call_whose_deadline_has_run_out_is_not_started_and_answered_unavailable() {
    let running = Running::start("metricsAddress: 127.0.0.1:0\n");
    let client = running.client();
    let node = "d6b5a0c4-1c7e-4b8e-9a51-2f0c7f1e0b11";
    let sealed = client.seal(node, &[7; 32]).await.unwrap();
    assert_eq!(count_records(&running), 1);

    // One connection, its calls telling the server their deadline is now (grpc-timeout 0).
    let mut connection = client.connect().await.unwrap();
    connection.set_deadline(tokio::time::Instant::now());
    let message = unavailable(connection.seal(node, &[8; 32]).await);
    assert!(message.contains("grpc-timeout"), "{message}");
    unavailable(connection.unseal(node, &sealed).await);
    assert_eq!(
        count_records(&running),
        1,
        "the refused seal stored nothing"
    );

    // A call with time left is served as ever, on a fresh connection as Talos makes.
    assert_eq!(client.unseal(node, &sealed).await.unwrap(), vec![7; 32]);

    // Counted and audited like the other refusals.
    let metrics = scrape(&running.server.metrics_address(), None);
    for action in ["seal", "unseal"] {
        let name = format!(
            r#"talos_kms_calls_total{{action="{action}",outcome="refused",reason="deadline_too_short"}}"#
        );
        assert_eq!(counter(&metrics, &name), 1, "{action}: {metrics}");
    }
    let trail =
        std::fs::read_to_string(running.dir.path().join("talos-kms-server-audit.jsonl")).unwrap();
    let refused: Vec<&str> = trail
        .lines()
        .filter(|line| line.contains(r#""reason":"deadline_too_short""#))
        .collect();
    assert_eq!(refused.len(), 2, "{trail}");
    assert!(
        refused
            .iter()
            .all(|line| line.contains(r#""peer":"127.0.0.1""#)),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_would_queue_past_its_deadline_is_refused_at_once() {
    raise_own_file_limit();
    // One handshake at a time and 200 ms of patience. A first burst tells the server how
    // long a place in its handshake queue lasts; in a second one, five times larger, the
    // later connections would wait far longer than 200 ms (a debug build's handshake takes
    // about half a millisecond).
    let running = Running::start(
        "maxHandshakesAtOnce: 1\nhandshakeTimeout: 200ms\nmaxConnectionsPerAddress: 2000\n\
         metricsAddress: 127.0.0.1:0\n",
    );
    let client = std::sync::Arc::new(running.client());
    let mut failed = 0;
    for burst_size in [200, 1000] {
        let mut burst = JoinSet::new();
        for _ in 0..burst_size {
            let client = std::sync::Arc::clone(&client);
            burst.spawn(async move { client.handshake().await });
        }
        while let Some(done) = burst.join_next().await {
            if done.unwrap().is_err() {
                failed += 1;
            }
        }
    }
    let metrics = scrape(&running.server.metrics_address(), None);
    let shed = counter(
        &metrics,
        r#"talos_kms_connections_refused_total{reason="handshake_queue"}"#,
    );
    assert!(shed > 0, "{metrics}");
    assert!(failed >= shed, "{failed} handshakes failed, {shed} shed");
    let warned =
        std::iter::from_fn(|| running.server.log.recv_timeout(Duration::from_secs(5)).ok())
            .take(10_000)
            .any(|line| line.contains("handshakes queued ahead of it would take longer"));
    assert!(warned, "the refusal is logged");

    // The burst over, a node is served.
    let node = "7f0e2a55-3d1b-4c9f-8e2a-55aa01b2c3d4";
    let sealed = client.seal(node, &[1; 32]).await.unwrap();
    assert_eq!(client.unseal(node, &sealed).await.unwrap(), vec![1; 32]);
}
