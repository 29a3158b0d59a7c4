//! TLS as Talos needs it: 1.3 only, ALPN h2, and every key format operators bring.

mod common;

use common::*;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use talos_kms_server::tls;
use tokio::net::TcpStream;

fn openssl(args: &[&str]) -> std::process::Output {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        text(&output.stderr)
    );
    output
}

/// A TLS 1.3-only client configuration with the project's crypto provider.
fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

async fn connect_with_alpn(
    port: u16,
    ca: &Path,
    alpn: &[&[u8]],
) -> std::io::Result<Option<Vec<u8>>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(roots, alpn)));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let stream = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    let (_, session) = stream.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    Ok(session.alpn_protocol().map(<[u8]>::to_vec))
}

#[tokio::test]
async fn alpn_h2_is_negotiated_and_other_protocols_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let negotiated = connect_with_alpn(server.port(), &server.pki.ca, &[b"h2"])
        .await
        .unwrap();
    assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
    assert!(
        connect_with_alpn(server.port(), &server.pki.ca, &[b"http/1.1"])
            .await
            .is_err()
    );
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_1_2_is_refused_and_1_3_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let connect = format!("127.0.0.1:{}", server.port());
    let ca = server.pki.ca.display().to_string();
    let probe = |version: &'static str| {
        let (connect, ca) = (connect.clone(), ca.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("openssl")
                .args([
                    "s_client", version, "-connect", &connect, "-CAfile", &ca, "-alpn", "h2",
                    "-brief",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl is installed")
        })
    };
    let v12 = probe("-tls1_2").await.unwrap();
    assert!(
        !v12.status.success(),
        "TLS 1.2 must fail: {}",
        text(&v12.stderr)
    );
    let v13 = probe("-tls1_3").await.unwrap();
    let out = text(&v13.stderr) + &text(&v13.stdout);
    assert!(out.contains("TLSv1.3"), "TLS 1.3 must succeed: {out}");
    server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn encrypted_pkcs8_key_serves_and_wrong_password_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let encrypted = dir.path().join("server.enc.key");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-passout",
        "pass:changeit",
        "-in",
        pki.key.to_str().unwrap(),
        "-out",
        encrypted.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read_to_string(&encrypted)
            .unwrap()
            .contains("ENCRYPTED PRIVATE KEY")
    );

    let error = tls::load_identity(&pki.cert, &encrypted, Some("wrong"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("serverKeyPassword") && error.contains("wrong password"),
        "{error}"
    );
    let error = tls::load_identity(&pki.cert, &encrypted, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("encrypted") && error.contains("serverKeyPassword"),
        "{error}"
    );

    // The binary, given the legacy config keys, serves with the encrypted key.
    std::fs::rename(&encrypted, &pki.key).unwrap();
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        "serverKeyPassword: \"changeit\"\n",
    );
    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.unwrap();
    assert_eq!(client.unseal(NODE, &sealed).await.unwrap(), passphrase);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn key_formats_and_types_load_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    // (name, command that writes the key)
    let keys: Vec<(&str, Vec<String>)> = vec![
        (
            "rsa-pkcs1",
            vec![
                "genrsa".into(),
                "-traditional".into(),
                "-out".into(),
                d("rsa-pkcs1"),
                "2048".into(),
            ],
        ),
        (
            "ec-sec1",
            vec![
                "ecparam".into(),
                "-genkey".into(),
                "-name".into(),
                "prime256v1".into(),
                "-out".into(),
                d("ec-sec1"),
            ],
        ),
        (
            "p384-pkcs8",
            vec![
                "genpkey".into(),
                "-algorithm".into(),
                "EC".into(),
                "-pkeyopt".into(),
                "ec_paramgen_curve:P-384".into(),
                "-out".into(),
                d("p384-pkcs8"),
            ],
        ),
        (
            "ed25519",
            vec![
                "genpkey".into(),
                "-algorithm".into(),
                "ed25519".into(),
                "-out".into(),
                d("ed25519"),
            ],
        ),
    ];
    for (name, command) in keys {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        openssl(&args);
        let cert = d(&format!("{name}.crt"));
        openssl(&[
            "req",
            "-new",
            "-x509",
            "-key",
            &d(name),
            "-subj",
            "/CN=127.0.0.1",
            "-days",
            "30",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-out",
            &cert,
        ]);
        let identity = tls::load_identity(Path::new(&cert), Path::new(&d(name)), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tls_config = tls::server_config(identity).unwrap();
        let store = Arc::new(
            talos_kms_server::store::SqliteStore::open(&dir.path().join(format!("{name}.db")))
                .unwrap(),
        );
        let running = talos_kms_server::server::start(
            "127.0.0.1:0".parse().unwrap(),
            talos_kms_server::server::ServerOptions {
                tls: tls_config,
                store,
                audit: Arc::new(
                    talos_kms_server::audit::AuditLog::open(&dir.path().join("audit.jsonl"), None)
                        .unwrap(),
                ),
                metrics: Default::default(),
                metrics_port: None,
                rules: Default::default(),
                limits: Default::default(),
                take_over: Default::default(),
            },
        )
        .unwrap();
        // The self-signed certificate is its own trust anchor here.
        let client = client_for(
            "127.0.0.1",
            running.local_addr().port(),
            Path::new(&cert),
            None,
        );
        let passphrase = random_passphrase();
        let sealed = client
            .seal(NODE, &passphrase)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            client.unseal(NODE, &sealed).await.unwrap(),
            passphrase,
            "{name}"
        );
        running.shutdown().await.unwrap();
    }
}

#[test]
fn mismatched_and_missing_files_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let other = tempfile::tempdir().unwrap();
    let other_pki = write_pki(other.path());

    let error = tls::load_identity(&pki.cert, &other_pki.key, None)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("does not match the certificate"), "{error}");
    let error = tls::load_identity(&dir.path().join("nope.crt"), &pki.key, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("serverCertFile") && error.contains("cannot read"),
        "{error}"
    );
    let error = tls::load_identity(&pki.key, &pki.key, None)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("no CERTIFICATE"), "{error}");
    let error = tls::load_identity(&pki.cert, &pki.cert, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("serverKeyFile") && error.contains("no private key"),
        "{error}"
    );
}

/// A ClientHello as a Talos node would send it, ready to write to a socket.
fn client_hello() -> Vec<u8> {
    let config = client_config(rustls::RootCertStore::empty(), &[b"h2"]);
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

/// What the server sends back to a raw TCP client that sent a ClientHello and, if
/// `then_leave`, closed its side, all before the server looked at the connection (the test
/// does not yield to the server's tasks until it reads).
async fn answer_to_hello(port: u16, then_leave: bool) -> Vec<u8> {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket.write_all(&client_hello()).unwrap();
    if then_leave {
        socket.shutdown(std::net::Shutdown::Write).unwrap();
    }
    socket.set_nonblocking(true).unwrap();
    let mut socket = TcpStream::from_std(socket).unwrap();
    let mut answer = vec![0u8; 16 * 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), socket.read(&mut answer))
        .await
        .expect("the server answers or closes within 10 s")
        .expect("the server closes cleanly, without a reset");
    answer.truncate(read);
    answer
}

#[tokio::test]
async fn a_client_gone_before_its_handshake_costs_no_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let waiting = answer_to_hello(server.port(), false).await;
    assert_eq!(
        waiting.first(),
        Some(&22),
        "a waiting client gets the server's handshake records"
    );
    let gone = answer_to_hello(server.port(), true).await;
    assert!(
        gone.is_empty(),
        "a client that closed after its ClientHello got {} bytes of handshake",
        gone.len()
    );
    server.running.shutdown().await.unwrap();
}
