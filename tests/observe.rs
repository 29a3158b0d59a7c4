//! What an operator's tools see: gRPC health checking, Prometheus metrics checked by
//! promtool, and systemd's notify protocol.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_until_the_database_is_gone_and_watch_says_so() {
    let running = Running::start("");
    let dir = &running.dir;
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    assert_eq!(grpc_health(port, &pki.ca).await, SERVING);

    // "sidero.kms.KMSService" as the service name: `\n` (field 1), length, text.
    let mut named = vec![0x0a, 21];
    named.extend_from_slice(b"sidero.kms.KMSService");
    let watch = raw_grpc(
        port,
        &pki.ca,
        "/grpc.health.v1.Health/Watch",
        "application/grpc",
        &named,
    )
    .await;
    let mut stream = watch.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(health_status(&first), SERVING);

    std::fs::remove_file(dir.path().join("kms.db")).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.frame())
        .await
        .expect("Watch reports the change within 10 s")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(health_status(&next), NOT_SERVING);
    assert_eq!(grpc_health(port, &pki.ca).await, NOT_SERVING);
}

/// The kubelet's gRPC probes cannot speak TLS: the metrics port answers health `Check` in
/// plain HTTP/2, with the same status as the KMS port, beside the scrapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_answers_health_checks_without_tls_as_the_kubelet_asks() {
    let running = Running::start("metricsAddress: 127.0.0.1:0\n");
    let dir = &running.dir;
    let server = &running.server;
    let pki = &running.pki;
    let address = server.metrics_address();
    let check = |address: String| async move {
        let response = plain_grpc(&address, "/grpc.health.v1.Health/Check", &[]).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        health_status(&body)
    };
    assert_eq!(check(address.clone()).await, SERVING);

    let watch = plain_grpc(&address, "/grpc.health.v1.Health/Watch", &[]).await;
    assert_eq!(
        watch.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"12"[..]),
        "Watch is UNIMPLEMENTED here: a stream would hold the port"
    );
    let scraped = {
        let address = address.clone();
        tokio::task::spawn_blocking(move || scrape(&address, None))
            .await
            .unwrap()
    };
    assert!(
        scraped.contains("talos_kms_store_up"),
        "HTTP/1 scrapes still work"
    );

    std::fs::remove_file(dir.path().join("kms.db")).unwrap();
    let started = Instant::now();
    let mut status = check(address.clone()).await;
    while status != NOT_SERVING && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = check(address.clone()).await;
    }
    assert_eq!(status, NOT_SERVING, "readiness sees the database gone");
    assert_eq!(grpc_health(server.addr.port(), &pki.ca).await, NOT_SERVING);
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Option<std::process::Output> {
    let mut child = match Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(_) => {
            eprintln!(
                "SKIPPED: promtool is not installed (scripts/test installs Debian's prometheus)"
            );
            return None;
        }
    };
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    Some(child.wait_with_output().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_and_failed_handshakes_and_pass_promtool() {
    let running = Running::start("metricsAddress: 127.0.0.1:0\n");
    let server = &running.server;
    let pki = &running.pki;
    let address = server.metrics_address();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let secret = random_passphrase();
    let sealed = client.seal(NODE, &secret).await.unwrap();
    client.unseal(NODE, &sealed).await.unwrap();
    client.unseal("someone-else", &sealed).await.unwrap();
    // A node that does not trust the certificate.
    let mut untrusting = talos_kms_server::client::ClientOptions::new(
        format!("https://127.0.0.1:{}", server.addr.port())
            .parse()
            .unwrap(),
    );
    untrusting.timeout = Duration::from_secs(5);
    let _ = talos_kms_server::client::KmsClient::new(untrusting)
        .unwrap()
        .handshake()
        .await;

    let expected = [
        r#"talos_kms_calls_total{action="seal",outcome="ok",reason=""} 1"#,
        r#"talos_kms_calls_total{action="unseal",outcome="ok",reason=""} 1"#,
        r#"talos_kms_calls_total{action="unseal",outcome="refused",reason="wrong_key_or_binding"} 1"#,
        r#"talos_kms_tls_handshake_failures_total{reason="alert UnknownCA"} 1"#,
        "talos_kms_call_duration_seconds_bucket",
        "talos_kms_certificate_expiry_timestamp_seconds",
        "talos_kms_build_info",
        "talos_kms_store_up 1",
    ];
    // The server reads the refusing client's alert after the client has gone, and reports
    // the store's health every 2 s: scrape until both have happened (10 s at most).
    let (body, openmetrics) = tokio::task::spawn_blocking(move || {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut body = scrape(&address, None);
        while !expected.iter().all(|line| body.contains(line))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
            body = scrape(&address, None);
        }
        (body, scrape(&address, Some(prometheus)))
    })
    .await
    .unwrap();
    assert!(
        openmetrics.ends_with("# EOF\n"),
        "OpenMetrics when asked for it"
    );
    for expected in expected {
        assert!(body.contains(expected), "{expected} missing from:\n{body}");
    }
    let Some(checked) = promtool(&["check", "metrics"], Some(&body)) else {
        return;
    };
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        text(&checked.stdout),
        text(&checked.stderr)
    );
}

#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/prometheus/alerts.yml"
    );
    let Some(checked) = promtool(&["check", "rules", rules], None) else {
        return;
    };
    assert!(
        checked.status.success(),
        "{}{}",
        text(&checked.stdout),
        text(&checked.stderr)
    );
    let stdout = text(&checked.stdout);
    let shipped = std::fs::read_to_string(rules)
        .unwrap()
        .matches("- alert:")
        .count();
    assert!(shipped >= 5, "the rules file lost alerts: {shipped}");
    assert!(
        stdout.contains(&format!("SUCCESS: {shipped} rules found")),
        "every rule is read: {stdout}"
    );
}

/// The messages a process sends to systemd's notify socket, as they arrive.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    (socket, path)
}

/// Reads messages until one contains `wanted` (at most 10 s); returns all read.
fn until_message(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(len) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..len]).into_owned();
            let done = message.contains(wanted);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
    panic!("no {wanted:?} within 10 s; got {seen:?}");
}

#[test]
fn systemd_hears_ready_reloading_stopping_and_watchdog_pings() {
    let setup = Setup::new("");
    let dir = &setup.dir;
    let config = &setup.config;
    let (socket, path) = notify_socket(dir.path());
    let mut child = Command::new(BINARY)
        .args(["--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let ready = until_message(&socket, "READY=1");
    assert!(
        ready.concat().contains("STATUS=serving on 127.0.0.1:"),
        "{ready:?}"
    );
    until_message(&socket, "WATCHDOG=1");

    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let reload = until_message(&socket, "RELOADING=1");
    let reloading = reload.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    until_message(&socket, "READY=1");

    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    until_message(&socket, "STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success());
}
