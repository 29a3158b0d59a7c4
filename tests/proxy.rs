//! Behind a load balancer: PROXY protocol headers from `trustedProxies`, with the real parts:
//! Debian's HAProxy (`send-proxy-v2`, the README's example config) in front of two replicas
//! sharing a real PostgreSQL, real TLS, the Talos-like client. The proxy's address is
//! 127.0.0.9; nodes are 127.0.0.1 and 127.0.0.2; 127.0.0.3 is an untrusted sender of
//! headers. Loopback only; every wait is bounded; nothing is timed but generous bounds on how
//! long the server may take to close a connection.

mod common;

use common::haproxy::HaProxy;
use common::postgres::PgCluster;
use common::*;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use talos_kms_server::client::{ClientOptions, KmsClient, ProxyV2};
use talos_kms_server::listener::proxy_protocol::v2_header;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const PROXY: &str = "127.0.0.9";
const UNTRUSTED: &str = "127.0.0.3";
/// How long the server may take to close a connection it refuses or finds idle: far beyond
/// the 1 s idle timeout.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A Talos-like client from `source` to `port`, prefixing connections as `proxy` says.
fn node(port: u16, ca: &Path, source: &str, proxy: Option<ProxyV2>) -> KmsClient {
    let mut options = ClientOptions::new(format!("https://127.0.0.1:{port}").parse().unwrap());
    options.ca_file = Some(ca.to_path_buf());
    options.source_ip = Some(ip(source));
    options.proxy_v2 = proxy;
    KmsClient::new(options).unwrap()
}

/// The audit trail's lines.
fn audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn has_line(lines: &[serde_json::Value], action: &str, outcome: &str, peer: &str) -> bool {
    lines
        .iter()
        .any(|l| l["action"] == action && l["outcome"] == outcome && l["peer"] == peer)
}

/// Waits (at most 30 s) for a log line containing `needle`.
fn logged(server: &ServerProcess, needle: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match server.log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_the_binding_follows_the_real_client_across_replicas() {
    let Some(pg) = PgCluster::start() else { return };
    pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let url = pg.url("kms", "?sslmode=disable");
    let trusted = format!("trustedProxies: [\"{PROXY}/32\"]\n");
    let replica = |name: &str| {
        let dir = dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        write_private(
            &config,
            &format!(
                "database: \"{url}\"\nauditLog: {}\nserverCertFile: {}\nserverKeyFile: {}\n\
                 port: 0\nbindAddress: \"127.0.0.1\"\nkmsLogLevel: INFO\n{trusted}",
                dir.join("audit.jsonl").display(),
                pki.cert.display(),
                pki.key.display(),
            ),
        );
        (
            ServerProcess::start(&config).unwrap(),
            dir.join("audit.jsonl"),
        )
    };
    let (a, audit_a) = replica("a");
    let (b, audit_b) = replica("b");
    let Some(haproxy) = HaProxy::start(&[a.addr.port(), b.addr.port()], PROXY) else {
        return;
    };
    let (via_a, via_b) = (haproxy.to_each[0], haproxy.to_each[1]);

    let secret = random_passphrase();
    let sealed = node(via_a, &pki.ca, "127.0.0.1", None)
        .seal(NODE, &secret)
        .await
        .expect("a seal from 127.0.0.1 through HAProxy to replica A");
    assert!(has_line(&audit(&audit_a), "seal", "ok", "127.0.0.1"));

    let unsealed = node(via_b, &pki.ca, "127.0.0.1", None)
        .unseal(NODE, &sealed)
        .await
        .unwrap();
    assert_eq!(
        unsealed, secret,
        "through HAProxy to replica B, from 127.0.0.1"
    );
    let direct = node(b.addr.port(), &pki.ca, "127.0.0.1", None)
        .unseal(NODE, &sealed)
        .await
        .unwrap();
    assert_eq!(direct, secret, "directly to replica B, from 127.0.0.1");
    for _ in 0..4 {
        let balanced = node(haproxy.balanced, &pki.ca, "127.0.0.1", None)
            .unseal(NODE, &sealed)
            .await
            .unwrap();
        assert_eq!(
            balanced, secret,
            "through the example's round-robin frontend"
        );
    }

    let other = node(via_b, &pki.ca, "127.0.0.2", None)
        .unseal(NODE, &sealed)
        .await
        .expect("another address gets an answer, not an error");
    assert_eq!(other.len(), 32);
    assert_ne!(other, secret, "127.0.0.2 through HAProxy gets decoy bytes");
    let lines = audit(&audit_b);
    assert!(has_line(&lines, "unseal", "ok", "127.0.0.1"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "unseal" && l["peer"] == "127.0.0.2"),
        "the audit trail names the carried address: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l["peer"] == PROXY),
        "never the proxy's own address for a call: {lines:?}"
    );
    drop(haproxy);
}

/// A server on loopback trusting 127.0.0.9, idle timeout 1 s; `extra` config. With the
/// path of its audit trail.
fn proxied_server(extra: &str) -> (Running, PathBuf) {
    let running = Setup::with(|dir| {
        format!(
            "auditLog: {}\ntrustedProxies: [\"{PROXY}\"]\nidleTimeout: 1s\n{extra}",
            dir.join("audit.jsonl").display()
        )
    })
    .start();
    let audit_file = running.dir.path().join("audit.jsonl");
    (running, audit_file)
}

async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(source), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::new(ip("127.0.0.1"), port))
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Whether the server closes the connection within [`CLOSED_WITHIN`] without sending a
/// byte (no TLS answer).
async fn closed_silently<S: AsyncRead + Unpin>(mut stream: S) -> bool {
    let mut buffer = [0u8; 1024];
    match tokio::time::timeout(CLOSED_WITHIN, stream.read(&mut buffer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// `prefix` sent from `source` in pieces of `piece` bytes, a separate segment each; then TLS
/// and a gRPC health check on the same connection. Its status (1: SERVING).
async fn health_after(port: u16, ca: &Path, source: &str, prefix: &[u8], piece: usize) -> u8 {
    let mut tcp = connect_from(source, port).await;
    for chunk in prefix.chunks(piece) {
        tcp.write_all(chunk).await.unwrap();
        tcp.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tls = tokio_rustls::TlsConnector::from(client_tls(ca))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .expect("TLS after the PROXY header");
    health_over(tls, port).await
}

fn v2_carrying(client: &str, port: u16) -> Vec<u8> {
    v2_header(
        Some(SocketAddr::new(ip(client), 40000)),
        SocketAddr::new(ip("127.0.0.1"), port),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_read_only_from_trusted_proxies_and_only_when_whole_and_valid() {
    let (running, audit_file) = proxied_server("");
    let (server, pki) = (&running.server, &running.pki);
    let port = server.addr.port();

    // From an untrusted address, a header closes the connection, and the log says why.
    let spoofing = node(
        port,
        &pki.ca,
        UNTRUSTED,
        Some(ProxyV2::Carrying(ip("127.0.0.1"))),
    );
    assert!(spoofing.seal(NODE, &random_passphrase()).await.is_err());
    let line = logged(server, "which is not in trustedProxies")
        .expect("the refusal is logged, naming trustedProxies");
    assert!(
        line.contains(&format!("PROXY header from {UNTRUSTED}")),
        "{line}"
    );
    let mut v1 = connect_from(UNTRUSTED, port).await;
    v1.write_all(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 50051\r\n")
        .await
        .unwrap();
    assert!(closed_silently(v1).await, "a v1 header from 127.0.0.3");
    // The same address without a header is served as itself.
    let plain = node(port, &pki.ca, UNTRUSTED, None);
    let sealed = plain.seal(NODE, b"untrusted but direct").await.unwrap();
    assert_eq!(
        plain.unseal(NODE, &sealed).await.unwrap(),
        b"untrusted but direct"
    );

    // From the trusted proxy: malformed headers, and none at all, close the connection.
    let mut bad_version = v2_carrying("127.0.0.1", port);
    bad_version[12] = 0x11;
    for malformed in [
        bad_version,
        b"PROXY TCP4 127.0.0.1\r\n".to_vec(),
        b"PROXY TCP4 127.0.0.01 127.0.0.1 40000 50051\r\n".to_vec(),
        b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 50051\n".to_vec(),
        vec![0x16, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3],
    ] {
        let mut tcp = connect_from(PROXY, port).await;
        tcp.write_all(&malformed).await.unwrap();
        assert!(closed_silently(tcp).await, "{malformed:?}");
    }
    let headerless = node(port, &pki.ca, PROXY, None);
    assert!(headerless.seal(NODE, b"x").await.is_err());
    logged(server, "send-proxy-v2").expect("the log says how to fix a proxy without headers");

    // A header split across segments, byte by byte or in two, still parses; the client's
    // TLS bytes after it are intact.
    let v2 = v2_carrying("127.0.0.1", port);
    let v1 = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 50051\r\n";
    for (header, piece) in [(&v2[..], 1), (&v2[..], 14), (&v1[..], 1), (&v1[..], 20)] {
        assert_eq!(health_after(port, &pki.ca, PROXY, header, piece).await, 1);
    }

    // A trusted proxy that sends nothing, or half a header, is closed after the idle timeout.
    let silent = connect_from(PROXY, port).await;
    assert!(closed_silently(silent).await, "a silent proxy connection");
    let mut half = connect_from(PROXY, port).await;
    half.write_all(&v2[..20]).await.unwrap();
    assert!(closed_silently(half).await, "half a header");

    // LOCAL (v2) and UNKNOWN (v1) carry no client: the proxy's own address is used.
    let local = node(port, &pki.ca, PROXY, Some(ProxyV2::Local));
    let secret = random_passphrase();
    let sealed = local.seal(NODE, &secret).await.unwrap();
    assert_eq!(local.unseal(NODE, &sealed).await.unwrap(), secret);
    let carried = node(
        port,
        &pki.ca,
        PROXY,
        Some(ProxyV2::Carrying(ip("127.0.0.1"))),
    );
    assert_ne!(
        carried.unseal(NODE, &sealed).await.unwrap(),
        secret,
        "sealed as the proxy's own address, not the node's"
    );
    assert_eq!(
        health_after(port, &pki.ca, PROXY, b"PROXY UNKNOWN\r\n", 64).await,
        1
    );
    let lines = audit(&audit_file);
    assert!(has_line(&lines, "seal", "ok", PROXY), "{lines:?}");
    assert!(
        has_line(&lines, "unseal", "refused", "127.0.0.1"),
        "the carried node's unseal of the proxy's seal is a mismatch: {lines:?}"
    );
    assert!(has_line(&lines, "seal", "ok", UNTRUSTED), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_lists_apply_to_the_address_the_header_carries() {
    let (running, audit_file) = proxied_server(
        "sealAllowedNetworks: [\"127.0.0.1/32\"]\nunsealAllowedNetworks: [\"127.0.0.1/32\"]\n",
    );
    let (server, pki) = (&running.server, &running.pki);
    let port = server.addr.port();

    // The proxy's own address is outside the allow-lists, yet it is admitted to read its
    // header: the node it carries is inside them.
    let inside = node(
        port,
        &pki.ca,
        PROXY,
        Some(ProxyV2::Carrying(ip("127.0.0.1"))),
    );
    let secret = random_passphrase();
    let sealed = inside.seal(NODE, &secret).await.unwrap();
    assert_eq!(inside.unseal(NODE, &sealed).await.unwrap(), secret);
    let direct = node(port, &pki.ca, "127.0.0.1", None);
    assert_eq!(direct.unseal(NODE, &sealed).await.unwrap(), secret);

    // A carried address outside them is refused after the header, before TLS.
    let mut outside = connect_from(PROXY, port).await;
    outside
        .write_all(&v2_carrying(UNTRUSTED, port))
        .await
        .unwrap();
    assert!(closed_silently(outside).await);
    let outsider = node(port, &pki.ca, PROXY, Some(ProxyV2::Carrying(ip(UNTRUSTED))));
    assert!(outsider.seal(NODE, b"x").await.is_err());
    // So is LOCAL here: the proxy's own address is outside them.
    let local = node(port, &pki.ca, PROXY, Some(ProxyV2::Local));
    assert!(local.seal(NODE, b"x").await.is_err());

    logged(server, "outside sealAllowedNetworks").expect("the refusal is logged");
    let lines = audit(&audit_file);
    let refused = lines
        .iter()
        .find(|l| l["action"] == "connect" && l["peer"] == UNTRUSTED)
        .unwrap_or_else(|| panic!("the audit trail names the carried address: {lines:?}"));
    assert_eq!(refused["reason"], "network_not_allowed");
    assert!(
        refused["detail"].as_str().unwrap().contains(PROXY),
        "and the proxy that carried it: {refused}"
    );
    assert!(has_line(&lines, "seal", "ok", "127.0.0.1"), "{lines:?}");
    assert!(
        !lines
            .iter()
            .any(|l| l["peer"] == PROXY && l["action"] != "connect"),
        "{lines:?}"
    );
}

#[test]
fn the_readme_example_configs_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/load-balancer");
    for (name, trusts) in [
        ("kms-behind-haproxy.yaml", true),
        ("kms-dns-round-robin.yaml", false),
        ("kms-independent.yaml", false),
    ] {
        let path = examples.join(name);
        let config =
            talos_kms_server::config::Config::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            config.limits.trusted_proxies.is_empty(),
            !trusts,
            "{name}: trustedProxies only behind a proxy"
        );
    }
    // The Talos patch: each volume has two KMS keys, in different slots.
    let patch = std::fs::read_to_string(examples.join("talos-two-kms-keys.yaml")).unwrap();
    for document in patch.split("\n---\n") {
        let slots: Vec<&str> = document
            .lines()
            .filter_map(|line| line.trim().strip_prefix("slot: "))
            .collect();
        let endpoints = document.matches("endpoint: https://").count();
        assert_eq!(
            (slots.as_slice(), endpoints),
            (&["0", "1"][..], 2),
            "{document}"
        );
    }
    // HAProxy's own check of the example is in HaProxy::start (`haproxy -c`).
    assert!(common::haproxy::EXAMPLE.contains("send-proxy-v2"));
}
