//! The metrics listener (`metricsAddress`) against abuse: floods of connections and of
//! unfinished headers are capped and closed, a normal scrape and the nodes' calls go on,
//! and only GET and HEAD are answered.

mod common;

use common::*;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP connection from `source` to `address`.
async fn connect_from(source: &str, address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip(source), 0))?;
    socket.connect(address).await
}

/// Sends `request` from `source` and reads the whole answer (at most 10 s).
async fn ask(address: SocketAddr, source: &str, request: &str) -> String {
    let mut tcp = connect_from(source, address).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answered within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn start(file_limit: Option<u64>) -> (Running, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let running = Setup::new("metricsAddress: 127.0.0.1:0\n").start_with(|command| {
        if let Some(files) = file_limit {
            // SAFETY: setrlimit is async-signal-safe, and the closure allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    let limit = rustix::process::Rlimit {
                        current: Some(files),
                        maximum: Some(files),
                    };
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
    });
    let metrics = running.server.metrics_address().parse().unwrap();
    (running, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_and_head_are_answered() {
    let (_running, metrics) = start(None);
    for method in ["POST", "PUT", "DELETE", "TRACE", "PATCH"] {
        let answer = ask(
            metrics,
            "127.0.0.1",
            &format!("{method} /metrics HTTP/1.1\r\nHost: kms\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("allow: get, head"),
            "{method}: {answer}"
        );
        assert!(!answer.contains("kms_"), "{method}: no metrics in {answer}");
    }
    let head = ask(
        metrics,
        "127.0.0.1",
        "HEAD /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head}");
    let get = ask(
        metrics,
        "127.0.0.1",
        "GET /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(get.starts_with("HTTP/1.1 200"), "{get}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_metrics_connections_is_capped_and_starves_neither_scrapes_nor_nodes() {
    raise_own_file_limit();
    // Few descriptors: without caps, the flood below takes them all and KMS accepts fail.
    let (running, metrics) = start(Some(256));
    let server = &running.server;
    let pki = &running.pki;
    let rss_before = rss_kib(server.child.id());

    // Slowloris: a request begun and never finished, on connections an address may hold.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut tcp = connect_from("127.0.0.4", metrics).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        slow.push(tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink))
                .await
                .is_ok()
        }));
    }

    // 400 connections from one address, each sending 32 KiB of a header that never ends.
    let mut flood = Vec::new();
    let unfinished = format!(
        "GET /metrics HTTP/1.1\r\nHost: kms\r\nX-Pad: {}",
        "a".repeat(32 * 1024)
    );
    for _ in 0..400 {
        let mut tcp = connect_from("127.0.0.3", metrics).await.unwrap();
        let unfinished = unfinished.clone();
        flood.push(tokio::spawn(async move {
            let started = Instant::now();
            // The server may close before all of it is sent.
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                tcp.write_all(unfinished.as_bytes()),
            )
            .await;
            let mut sink = [0u8; 1024];
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match tcp.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            closed.ok().map(|()| started.elapsed())
        }));
    }

    // Meanwhile another address scrapes, and a node seals and unseals.
    let scrape = ask(
        metrics,
        "127.0.0.2",
        "GET /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let node = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let secret = random_passphrase();
    let sealed = node.seal(NODE, &secret).await.expect("the node seals");
    assert_eq!(
        node.unseal(NODE, &sealed).await.expect("and unseals"),
        secret
    );
    let rss_during = rss_kib(server.child.id());

    let mut closed_at_once = 0;
    for connection in flood {
        let closed = connection.await.unwrap();
        let took = closed.expect("every flooding connection is closed by the server");
        // The four an address may hold wait out the header timeout; the rest are refused.
        if took < Duration::from_secs(2) {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 380,
        "only {closed_at_once} refused at once"
    );
    for connection in slow {
        assert!(
            connection.await.unwrap(),
            "an unfinished request is closed after the header timeout"
        );
    }
    assert!(
        rss_during < rss_before + 16 * 1024,
        "the server grew from {rss_before} KiB to {rss_during} KiB"
    );
}
