//! Every failed unseal must look the same to the caller — unknown nonce, wrong key, wrong
//! node UUID, wrong source address, revoked record: the same status, headers and body size,
//! and no difference in time beyond noise. A caller who could tell them apart would learn
//! which nonces exist, or which address a record is bound to.
//!
//! Alone in its file, so that no other test shares the machine's cores while it measures.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use prost::Message;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use talos_kms_server::policy::{RateLimit, Rules};
use talos_kms_server::proto;
use talos_kms_server::store::{SqliteStore, Store};

/// Rounds of one call of each kind, interleaved so that drift hits every kind alike.
const ROUNDS: usize = 300;

/// One HTTP/2 connection making raw gRPC calls, so that headers can be compared.
struct Caller {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

/// Everything of an answer a caller can observe, but its time.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    status: u16,
    headers: Vec<String>,
    trailers: Vec<String>,
    body_len: usize,
}

impl Caller {
    async fn connect(port: u16, ca: &std::path::Path, source: &str) -> Caller {
        let source: IpAddr = source.parse().unwrap();
        let tls = tls_connect_from(port, ca, Some(source)).await;
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        Caller { sender }
    }

    async fn unseal(&mut self, node_uuid: &str, data: &[u8]) -> (Observed, Duration) {
        let message = proto::Request {
            node_uuid: node_uuid.into(),
            data: data.to_vec(),
        }
        .encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        let request = http::Request::post("https://127.0.0.1/sidero.kms.KMSService/Unseal")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(frame)))
            .unwrap();
        let started = Instant::now();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = names_and_values(response.headers());
        let collected = response.into_body().collect().await.unwrap();
        let elapsed = started.elapsed();
        let trailers = collected
            .trailers()
            .map(names_and_values)
            .unwrap_or_default();
        let body_len = collected.to_bytes().len();
        (
            Observed {
                status,
                headers,
                trailers,
                body_len,
            },
            elapsed,
        )
    }
}

fn names_and_values(headers: &http::HeaderMap) -> Vec<String> {
    let mut all: Vec<String> = headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("?")))
        .collect();
    all.sort();
    all
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_unseal_looks_the_same_in_status_headers_size_and_time() {
    let dir = tempfile::tempdir().unwrap();
    // Thousands of calls from one address, far above a node's: no rate limit.
    let rules = Rules {
        per_address: RateLimit::OFF,
        global: RateLimit::OFF,
        ..Rules::default()
    };
    let server = TestServer::start_with(dir.path(), "127.0.0.1:0", rules).await;
    let node = server.client("127.0.0.1", None);
    let sealed = node.seal("node-a", &random_passphrase()).await.unwrap();
    let revoked = node.seal("node-r", &random_passphrase()).await.unwrap();
    {
        let store = SqliteStore::open_existing(&server.database).unwrap();
        let filter = Default::default();
        let records = store.list(&filter, 0, 10).await.unwrap();
        let id = records.iter().find(|r| r.node_uuid == "node-r").unwrap().id;
        assert_eq!(store.set_revoked(&[(id, None)], Some(1)).await.unwrap(), 1);
    }
    let mut wrong_key = sealed.clone();
    wrong_key[20] ^= 1;
    let mut unknown_nonce = sealed.clone();
    unknown_nonce[0] ^= 1;

    let ca = &server.pki.ca;
    let mut from_1 = Caller::connect(server.port(), ca, "127.0.0.1").await;
    let mut from_2 = Caller::connect(server.port(), ca, "127.0.0.2").await;
    // The baseline first: every other kind is compared with it, round by round.
    let kinds = [
        "unknown nonce",
        "wrong key",
        "wrong node UUID",
        "wrong address",
        "revoked",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); kinds.len()];
    let mut first: Option<Observed> = None;
    // Warm-up rounds are not measured: first calls fill caches.
    for round in 0..ROUNDS + 20 {
        for (kind, times) in times.iter_mut().enumerate() {
            let (observed, elapsed) = match kind {
                0 => from_1.unseal("node-a", &unknown_nonce).await,
                1 => from_1.unseal("node-a", &wrong_key).await,
                2 => from_1.unseal("node-b", &sealed).await,
                3 => from_2.unseal("node-a", &sealed).await,
                _ => from_1.unseal("node-r", &revoked).await,
            };
            match &first {
                None => first = Some(observed),
                Some(first) => assert_eq!(&observed, first, "{} differs", kinds[kind]),
            }
            if round >= 20 {
                times.push(elapsed.as_secs_f64() * 1e6);
            }
        }
    }
    let first = first.unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first.trailers.contains(&"grpc-status: 0".to_string()),
        "{first:?}"
    );

    // Paired differences against the baseline of the same round cancel the machine's drift;
    // their median is what a patient attacker would estimate.
    let mut baseline_times = times[0].clone();
    let baseline = median(&mut baseline_times);
    let allowed = (0.10 * baseline).max(30.0);
    let mut report = format!("baseline (unknown nonce) median {baseline:.0} µs; ");
    let mut worst: f64 = 0.0;
    for (kind, kind_times) in times.iter().enumerate().skip(1) {
        let mut differences: Vec<f64> = kind_times
            .iter()
            .zip(&times[0])
            .map(|(t, base)| t - base)
            .collect();
        let difference = median(&mut differences);
        report.push_str(&format!("{}: {difference:+.1} µs; ", kinds[kind]));
        worst = worst.max(difference.abs());
    }
    eprintln!("{report}allowed ±{allowed:.0} µs");
    assert!(worst <= allowed, "{report}allowed ±{allowed:.0} µs");
}
