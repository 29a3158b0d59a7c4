//! Refused calls cannot set the log's volume: a hundred refused unseals from one address
//! are one WARN line on their own, then one summary line with their count.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_refused_unseals_are_one_warning_and_a_summary() {
    let running = Running::start("rateLimitPerAddress: {perSecond: 0}\n");
    let server = &running.server;
    let pki = &running.pki;
    let node = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let mut blob = [7u8; 44];
    for n in 0..100u8 {
        // No record has these nonces: decoy bytes, a refusal in the log and the trail.
        blob[0] = n;
        node.unseal(NODE, &blob).await.unwrap();
    }
    let mut warnings = Vec::new();
    let mut summary = None;
    // Summed up once a minute, counted from the server's start.
    let deadline = Instant::now() + Duration::from_secs(75);
    while summary.is_none() && Instant::now() < deadline {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(200)) {
            if line.contains("refused calls in the last minute") {
                summary = Some(line);
            } else if line.contains("WARN") {
                warnings.push(line);
            }
        }
    }
    let refused: Vec<_> = warnings
        .iter()
        .filter(|line| line.contains("unseal refused"))
        .collect();
    assert_eq!(refused.len(), 1, "{warnings:#?}");
    let summary = summary.expect("a summary within a minute");
    assert!(
        summary.contains("unknown_nonce 99 from 1 addresses (127.0.0.1 99)"),
        "{summary}"
    );
}
