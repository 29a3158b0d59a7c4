//! No one may lock nodes out by holding connections: each attack runs against the server
//! binary with small limits, from 127.0.0.3, while a normal node on 127.0.0.1 seals then
//! unseals, each call within Talos's 10 s deadline. Loopback only; every loop is bounded in
//! count and time; nothing is timed but the node's deadline and generous bounds on how long
//! the server may take to close an attacker's connection.

mod common;

use bytes::Bytes;
use common::*;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const ATTACKER: &str = "127.0.0.3";
/// How long the server may take to close an attacker's connection: far beyond the 1 s idle
/// timeout, far below what holds a connection without the defence (the handshake timeout
/// of 60 s, the connection age of 5 minutes).
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The server binary with `extra` config; connections are served from loopback.
fn start_server(extra: &str) -> Running {
    raise_own_file_limit();
    Running::start(extra)
}

/// The normal node: a seal, then its unseal, each on a fresh connection with Talos's 10 s
/// deadline (the client's default).
async fn node_seals_and_unseals(port: u16, ca: &Path) {
    let node = client_for("127.0.0.1", port, ca, Some(ip("127.0.0.1")));
    let secret = random_passphrase();
    let sealed = node
        .seal(NODE, &secret)
        .await
        .expect("the node seals within its 10 s deadline despite the attack");
    let unsealed = node
        .unseal(NODE, &sealed)
        .await
        .expect("the node unseals within its 10 s deadline despite the attack");
    assert_eq!(unsealed, secret);
}

/// A TCP connection from `source`.
async fn connect_from(source: &str, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip(source), 0))?;
    socket.connect(SocketAddr::new(ip("127.0.0.1"), port)).await
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A completed TLS handshake from `source`; `None` if the server closed it first.
async fn tls_from(source: &str, port: u16, config: &Arc<rustls::ClientConfig>) -> Option<Tls> {
    let tcp = connect_from(source, port).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp);
    tokio::time::timeout(CLOSED_WITHIN, handshake)
        .await
        .ok()?
        .ok()
}

/// The bytes of a real ClientHello, as a node's first flight.
fn client_hello(config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::clone(config), name).unwrap();
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).unwrap();
    hello
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// An HTTP/2 PING: a valid frame that is not a call.
const H2_PING: &[u8] = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00slowlori";

/// Reads (and ignores) what the server sends until it closes the connection; whether it
/// did within [`CLOSED_WITHIN`].
async fn closed_by_server<S: AsyncRead + Unpin>(mut stream: S) -> bool {
    let mut buffer = [0u8; 4096];
    let reading = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(CLOSED_WITHIN, reading).await.is_ok()
}

/// Sends `head` then `body` over and over, a byte every 200 ms, as a slowloris does, until the
/// server closes the connection (true) or [`CLOSED_WITHIN`] passes (false).
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    head: &[u8],
    body: &[u8],
) -> bool {
    let deadline = tokio::time::Instant::now() + CLOSED_WITHIN;
    let mut buffer = [0u8; 4096];
    let mut next = head.iter().chain(body.iter().cycle());
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(&byte) = next.next()
                    && (stream.write_all(&[byte]).await.is_err() || stream.flush().await.is_err())
                {
                    return true;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

/// A counter's value in a scrape, 0 when absent.
fn counter(metrics: &str, sample: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(sample))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_silent_after_their_handshake_are_closed_and_do_not_lock_out_a_node() {
    let running =
        start_server("maxConnections: 64\nmaxConnectionsPerAddress: 1000\nidleTimeout: 1s\n");
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let config = client_tls(&pki.ca);
    // More completed TLS + HTTP/2 connections than there are slots, that never send a request.
    let mut attack = JoinSet::new();
    for _ in 0..80 {
        let config = Arc::clone(&config);
        attack.spawn(async move {
            let mut tls = tls_from(ATTACKER, port, &config).await?;
            tls.write_all(H2_PREFACE).await.ok()?;
            tls.flush().await.ok()?;
            Some(tls)
        });
    }
    let mut held = Vec::new();
    while let Some(done) = attack.join_next().await {
        held.extend(done.unwrap());
    }
    assert!(!held.is_empty());

    node_seals_and_unseals(port, &pki.ca).await;

    let mut closing = JoinSet::new();
    for tls in held {
        closing.spawn(closed_by_server(tls));
    }
    while let Some(closed) = closing.join_next().await {
        assert!(
            closed.unwrap(),
            "the server closes a silent connection (idleTimeout 1s)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_do_not_lock_out_a_node() {
    // Without the idle timeout, a trickling handshake would hold its slot for 60 s.
    let running = start_server(
        "maxConnections: 64\nmaxConnectionsPerAddress: 1000\nidleTimeout: 1s\n\
         handshakeTimeout: 60s\n",
    );
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let config = client_tls(&pki.ca);
    let hello = Arc::new(client_hello(&config));
    let mut attack = JoinSet::new();
    for n in 0..80 {
        let (config, hello) = (Arc::clone(&config), Arc::clone(&hello));
        attack.spawn(async move {
            if n % 2 == 0 {
                // A ClientHello, a byte every 200 ms: it takes minutes.
                let tcp = connect_from(ATTACKER, port).await.ok()?;
                Some(trickle(tcp, &hello, &[]).await)
            } else {
                // A completed handshake, then the HTTP/2 preface and PINGs, never a call.
                let tls = tls_from(ATTACKER, port, &config).await?;
                Some(trickle(tls, H2_PREFACE, H2_PING).await)
            }
        });
    }
    // The node calls while the slowloris connections trickle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node_seals_and_unseals(port, &pki.ca).await;

    let mut closed = 0;
    while let Some(done) = attack.join_next().await {
        if let Some(by_server) = done.unwrap() {
            assert!(
                by_server,
                "the server closes a trickling connection (idleTimeout 1s)"
            );
            closed += 1;
        }
    }
    assert!(closed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_silent_sockets_than_slots_do_not_lock_out_a_node() {
    // Without eviction, 1,000 sockets would be let in 64 every idle timeout: 30 s.
    let running = start_server(
        "maxConnections: 64\nmaxConnectionsPerAddress: 100000\nidleTimeout: 2s\n\
         metricsAddress: 127.0.0.1:0\n",
    );
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    // Plain TCP connections that never send a byte; the kernel completes them all at once.
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        sockets.push(connect_from(ATTACKER, port).await.unwrap());
    }

    node_seals_and_unseals(port, &pki.ca).await;

    let metrics = scrape(&running.server.metrics_address(), None);
    assert!(
        counter(
            &metrics,
            r#"talos_kms_connections_dropped_total{reason="evicted"}"#
        ) > 0,
        "{metrics}"
    );
    drop(sockets);
}

/// A call to `path` from `source` on a connection of its own; `None` when the connection
/// was refused or no answer came.
async fn call_from<B>(
    source: &str,
    port: u16,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    body: B,
) -> Option<http::Response<hyper::body::Incoming>>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_from(source, port, config).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .ok()?;
    tokio::spawn(connection);
    let request = http::Request::post(format!("https://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    tokio::time::timeout(CLOSED_WITHIN, sender.send_request(request))
        .await
        .ok()?
        .ok()
}

/// A health `Watch` from `source`: a call the server keeps in flight while it lasts.
async fn watch_from(
    source: &str,
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Option<http::Response<hyper::body::Incoming>> {
    // An empty HealthCheckRequest: the server as a whole.
    let request = http_body_util::Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]));
    call_from(
        source,
        port,
        config,
        "/grpc.health.v1.Health/Watch",
        request,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_with_calls_in_flight_holds_only_its_share() {
    let running = start_server(
        "maxConnections: 64\nmaxConnectionsPerAddress: 16\nidleTimeout: 1s\n\
         metricsAddress: 127.0.0.1:0\n",
    );
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let config = client_tls(&pki.ca);
    // As many long calls as there are slots: none idle, none evictable.
    let mut attack = JoinSet::new();
    for _ in 0..64 {
        let config = Arc::clone(&config);
        attack.spawn(async move { watch_from(ATTACKER, port, &config).await });
    }
    let mut watches = Vec::new();
    while let Some(done) = attack.join_next().await {
        watches.extend(done.unwrap());
    }
    assert!(
        watches.len() <= 16,
        "{} calls in flight from one address",
        watches.len()
    );

    node_seals_and_unseals(port, &pki.ca).await;

    let metrics = scrape(&running.server.metrics_address(), None);
    let turned_away = counter(
        &metrics,
        r#"talos_kms_connections_refused_total{reason="per_address"}"#,
    ) + counter(
        &metrics,
        r#"talos_kms_connections_dropped_total{reason="per_address"}"#,
    );
    assert!(turned_away >= 48, "{metrics}");
    drop(watches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_from_outside_the_allow_lists_is_closed_before_any_tls_byte() {
    // Dual stack: IPv4 peers arrive as ::ffff:a.b.c.d and are matched as IPv4.
    let running = Setup::on("::", |_| {
        "sealAllowedNetworks: [127.0.0.1/32]\nunsealAllowedNetworks: [127.0.0.1/32]\n\
         metricsAddress: 127.0.0.1:0\n"
            .into()
    })
    .start();
    let dir = &running.dir;
    let pki = &running.pki;
    let port = running.port();
    let hello = client_hello(&client_tls(&pki.ca));
    for _ in 0..5 {
        // The reset may come before the connection is even reported made.
        let mut tcp = match connect_from("127.0.0.2", port).await {
            Ok(tcp) => tcp,
            Err(error) => {
                assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
                continue;
            }
        };
        // The ClientHello may meet a closed socket already.
        let _ = tcp.write_all(&hello).await;
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut received))
            .await
            .expect("the server closes the connection at once");
        match read {
            Ok(_) => {}
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
        }
        assert!(received.is_empty(), "no ServerHello, no byte: {received:?}");
    }

    node_seals_and_unseals(port, &pki.ca).await;
    // What the bench measures the cost of (scripts/bench_suite.py --only-refused).
    let endpoint = format!("https://127.0.0.1:{port}");
    let report = run_ok(&[
        "bench",
        "--endpoint",
        &endpoint,
        "--mode",
        "connect",
        "--source-ip",
        "127.0.0.2",
        "--requests",
        "20",
        "--output",
        "json",
    ])
    .await;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["calls_ok"], 20, "{report}");

    let metrics = scrape(&running.server.metrics_address(), None);
    assert_eq!(
        counter(
            &metrics,
            r#"talos_kms_connections_refused_total{reason="network"}"#
        ),
        25,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "talos_kms_tls_handshakes_total"),
        2,
        "the refused connections cost no handshake"
    );
    let trail = std::fs::read_to_string(dir.path().join("talos-kms-server-audit.jsonl")).unwrap();
    let refused: Vec<serde_json::Value> = trail
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|event: &serde_json::Value| event["action"] == "connect")
        .collect();
    assert_eq!(refused.len(), 1, "one line a minute per address: {trail}");
    assert_eq!(refused[0]["outcome"], "refused");
    assert_eq!(refused[0]["reason"], "network_not_allowed");
    assert_eq!(refused[0]["peer"], "127.0.0.2");

    let mut server = running.server;
    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
    let warnings: Vec<String> = log
        .try_iter()
        .filter(|line| line.contains("WARN") && line.contains("refused before TLS"))
        .collect();
    assert_eq!(warnings.len(), 1, "one per address a minute: {warnings:#?}");
    assert!(warnings[0].contains("peer=127.0.0.2"), "{}", warnings[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_file_limit_lowers_max_connections_instead_of_locking_out_nodes() {
    use std::os::unix::process::CommandExt;
    raise_own_file_limit();
    // One address may take every slot here: what is tested is the file limit alone.
    let setup = Setup::new("idleTimeout: 5s\nmaxConnectionsPerAddress: 100000\n");
    let running = setup.start_with(|command| {
        // SAFETY: setrlimit is async-signal-safe, and the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let limit = rustix::process::Rlimit {
                    current: Some(256),
                    maximum: Some(256),
                };
                rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                    .map_err(std::io::Error::from)
            });
        }
    });
    let server = &running.server;
    let pki = &running.pki;
    let warning = server
        .startup_log
        .iter()
        .find(|line| line.contains("WARN") && line.contains("maxConnections"))
        .expect("a warning names maxConnections");
    assert!(warning.contains("LimitNOFILE="), "{warning}");
    assert!(warning.contains("serving=176"), "{warning}");
    let port = server.addr.port();
    // Four times what the file limit holds; without the defence, accept fails for want of
    // descriptors and sockets are let in a few hundred every idle timeout.
    let mut sockets = Vec::new();
    for _ in 0..1000 {
        sockets.push(connect_from(ATTACKER, port).await.unwrap());
    }

    node_seals_and_unseals(port, &pki.ca).await;
    drop(sockets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_is_never_cut_by_the_idle_timeout() {
    use http_body_util::BodyExt;
    let running = start_server("idleTimeout: 1s\n");
    let dir = &running.dir;
    let server = &running.server;
    let pki = &running.pki;
    let config = client_tls(&pki.ca);
    let watch = watch_from("127.0.0.1", server.addr.port(), &config)
        .await
        .expect("a Watch from an address with room");
    let mut stream = watch.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first.as_ref(), [0, 0, 0, 0, 2, 0x08, 1], "SERVING");
    // Three idle timeouts with the stream open and nothing sent by the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    std::fs::remove_file(dir.path().join("kms.db")).unwrap();
    let not_serving = async {
        loop {
            let frame = stream
                .frame()
                .await
                .expect("the stream was not cut")
                .unwrap()
                .into_data()
                .unwrap();
            if frame.as_ref() == [0, 0, 0, 0, 2, 0x08, 2] {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), not_serving)
        .await
        .expect("the Watch reports NOT_SERVING within 10 s");
}

/// A request body that sends its first bytes and then never ends.
struct Unfinished(Option<Bytes>);

impl hyper::body::Body for Unfinished {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(bytes) => std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// A seal from `source` whose request never ends: a gRPC frame header announcing 100
/// bytes, and then nothing more.
async fn unfinished_call_from(
    source: &str,
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> Option<http::Response<hyper::body::Incoming>> {
    let body = Unfinished(Some(Bytes::from_static(&[0, 0, 0, 0, 100])));
    call_from(
        source,
        port,
        config,
        talos_kms_server::proto::SEAL_PATH,
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_requests_never_end_are_cut_and_do_not_lock_out_a_node() {
    // Without the call timeout, every slot would stay busy for as long as the attacker likes.
    let running = start_server(
        "maxConnections: 64\nmaxConnectionsPerAddress: 1000\nidleTimeout: 1s\ncallTimeout: 2s\n\
         metricsAddress: 127.0.0.1:0\n",
    );
    let dir = &running.dir;
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let config = client_tls(&pki.ca);
    let mut attack = JoinSet::new();
    for _ in 0..64 {
        let config = Arc::clone(&config);
        attack.spawn(async move { unfinished_call_from(ATTACKER, port, &config).await });
    }

    node_seals_and_unseals(port, &pki.ca).await;

    let mut cut = 0u64;
    while let Some(done) = attack.join_next().await {
        if let Some(response) = done.unwrap() {
            let status = response
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
            cut += 1;
        }
    }
    assert!(cut > 0, "no attacker call was answered");
    // Counted and audited like any refusal.
    let metrics = scrape(&running.server.metrics_address(), None);
    assert!(
        counter(
            &metrics,
            r#"talos_kms_calls_total{action="seal",outcome="refused",reason="call_timeout"}"#
        ) >= cut,
        "{metrics}"
    );
    let trail = std::fs::read_to_string(dir.path().join("talos-kms-server-audit.jsonl")).unwrap();
    let lines = trail
        .lines()
        .filter(|line| line.contains(r#""reason":"call_timeout""#) && line.contains(ATTACKER))
        .count();
    assert!(
        lines >= cut as usize,
        "{lines} audit lines for {cut} cut calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_streams_are_bounded_server_wide() {
    let running = start_server("maxConnectionsPerAddress: 1000\nmetricsAddress: 127.0.0.1:0\n");
    let server = &running.server;
    let pki = &running.pki;
    let port = server.addr.port();
    let config = client_tls(&pki.ca);
    let max = talos_kms_server::listener::MAX_WATCHES;
    let mut watches = Vec::new();
    for _ in 0..max {
        let watch = watch_from("127.0.0.1", port, &config)
            .await
            .expect("a Watch within the bound");
        assert_eq!(
            watch.headers().get("grpc-status"),
            None,
            "the Watch streams"
        );
        watches.push(watch);
    }
    let refused = watch_from("127.0.0.1", port, &config)
        .await
        .expect("an answer");
    assert_eq!(
        refused.headers().get("grpc-status").unwrap(),
        "8",
        "RESOURCE_EXHAUSTED beyond {max} Watches"
    );
    let metrics = scrape(&running.server.metrics_address(), None);
    assert_eq!(
        counter(
            &metrics,
            r#"talos_kms_calls_total{action="health_watch",outcome="refused",reason="watch_limit"}"#
        ),
        1,
        "{metrics}"
    );
    // A Watch that ends gives its place back.
    drop(watches.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let watch = watch_from("127.0.0.1", port, &config).await.unwrap();
        if watch.headers().get("grpc-status").is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place of a closed Watch was not given back within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node_seals_and_unseals(port, &pki.ca).await;
}
