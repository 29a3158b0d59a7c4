//! Test fixtures: real servers on loopback with real TLS and real database files.
#![allow(dead_code)]

pub mod haproxy;
pub mod postgres;
pub mod store_contract;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use talos_kms_server::audit::AuditLog;
#[allow(unused_imports)] // not every test binary seals
pub use talos_kms_server::client::random_passphrase;
use talos_kms_server::client::{ClientOptions, KmsClient};
use talos_kms_server::policy::Rules;
use talos_kms_server::server::{self, RunningServer, ServerOptions};
use talos_kms_server::store::SqliteStore;
use talos_kms_server::tls::{self, throwaway};

pub const BINARY: &str = env!("CARGO_BIN_EXE_talos-kms-server");
pub const NODE: &str = "213faf71-17a0-43d7-a88b-0afd96094178";

/// Files of a throwaway PKI in a test directory.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn write_pki(dir: &Path) -> Pki {
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
    let pki = throwaway::generate(&names).expect("generate PKI");
    let files = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, pki.ca_pem).unwrap();
    std::fs::write(&files.cert, pki.chain_pem).unwrap();
    write_private(&files.key, &pki.key_pem);
    files
}

/// Writes a file only its owner may read, as keys and configs should be.
pub fn write_private(path: &Path, content: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(content.as_bytes()))
        .unwrap();
}

/// A server running inside the test process.
pub struct TestServer {
    pub running: RunningServer,
    pub pki: Pki,
    pub database: PathBuf,
}

impl TestServer {
    pub async fn start(dir: &Path, bind: &str) -> TestServer {
        Self::start_with(dir, bind, Rules::default()).await
    }

    /// A server with the policy `rules` instead of the defaults.
    pub async fn start_with(dir: &Path, bind: &str, rules: Rules) -> TestServer {
        let pki = if dir.join("ca.pem").exists() {
            Pki {
                ca: dir.join("ca.pem"),
                cert: dir.join("server.crt"),
                key: dir.join("server.key"),
            }
        } else {
            write_pki(dir)
        };
        let identity = tls::load_identity(&pki.cert, &pki.key, None).unwrap();
        let database = dir.join("kms.db");
        let store = Arc::new(SqliteStore::open(&database).unwrap());
        let running = server::start(
            bind.parse().unwrap(),
            ServerOptions {
                tls: tls::server_config(identity).unwrap(),
                store,
                audit: Arc::new(AuditLog::open(&dir.join("audit.jsonl"), None).unwrap()),
                metrics: Default::default(),
                metrics_port: None,
                rules,
                limits: Default::default(),
                take_over: Default::default(),
            },
        )
        .unwrap();
        TestServer {
            running,
            pki,
            database,
        }
    }

    pub fn port(&self) -> u16 {
        self.running.local_addr().port()
    }

    /// A Talos-like client connecting to `host` (an IP literal the certificate names).
    pub fn client(&self, host: &str, source: Option<IpAddr>) -> KmsClient {
        client_for(host, self.port(), &self.pki.ca, source)
    }
}

pub fn client_for(host: &str, port: u16, ca: &Path, source: Option<IpAddr>) -> KmsClient {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let mut options = ClientOptions::new(format!("https://{host}:{port}").parse().unwrap());
    options.ca_file = Some(ca.to_path_buf());
    options.source_ip = source;
    KmsClient::new(options).unwrap()
}

/// Writes a config file for the binary; `extra` is appended YAML.
pub fn write_config(dir: &Path, pki: &Pki, bind: &str, extra: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    write_private(
        &path,
        &format!(
            "database: {}\nserverCertFile: {}\nserverKeyFile: {}\nport: 0\nbindAddress: \"{bind}\"\nkmsLogLevel: INFO\nrootLogLevel: WARNING\n{extra}",
            dir.join("kms.db").display(),
            pki.cert.display(),
            pki.key.display(),
        ),
    );
    path
}

/// A test's own server on loopback, before it starts: a directory, its certificates and a
/// config with `extra` appended. Start it, or use only its config (`check`, a refused start).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub config: PathBuf,
    bind: String,
}

impl Setup {
    pub fn new(extra: &str) -> Setup {
        Self::on("127.0.0.1", |_| extra.to_string())
    }

    /// A config whose `extra` lines name paths in the test's directory.
    pub fn with(extra: impl FnOnce(&Path) -> String) -> Setup {
        Self::on("127.0.0.1", extra)
    }

    /// A server bound to `bind` (`::` for dual stack) instead of 127.0.0.1.
    pub fn on(bind: &str, extra: impl FnOnce(&Path) -> String) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_pki(dir.path());
        let config = write_config(dir.path(), &pki, bind, &extra(dir.path()));
        Setup {
            dir,
            pki,
            config,
            bind: bind.to_string(),
        }
    }

    /// Writes the config again, with other `extra` lines.
    pub fn rewrite(&self, extra: &str) {
        write_config(self.dir.path(), &self.pki, &self.bind, extra);
    }

    pub fn config_str(&self) -> &str {
        self.config.to_str().unwrap()
    }

    pub fn start(self) -> Running {
        self.start_with(|_| ())
    }

    /// [`Setup::start`] with the command adjusted first (limits, environment).
    pub fn start_with(self, adjust: impl FnOnce(&mut Command)) -> Running {
        let server = ServerProcess::start_with(&self.config, adjust).unwrap();
        Running {
            server,
            pki: self.pki,
            config: self.config,
            dir: self.dir,
        }
    }
}

/// A server process started from a [`Setup`]; dropping it stops the server, then removes its
/// directory. Taken apart, bind `dir` first (`let Running { dir: _dir, server, pki, .. }`): it
/// is then dropped last, and not at once as a field left to `..` would be.
pub struct Running {
    pub server: ServerProcess,
    pub pki: Pki,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Running {
    pub fn start(extra: &str) -> Running {
        Setup::new(extra).start()
    }

    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }

    /// A Talos-like client whose connections come from `source` (one of 127.0.0.0/8).
    pub fn node(&self, source: &str) -> KmsClient {
        let source: IpAddr = source.parse().unwrap();
        client_for("127.0.0.1", self.port(), &self.pki.ca, Some(source))
    }

    /// A Talos-like client connecting from wherever the system chooses.
    pub fn client(&self) -> KmsClient {
        client_for("127.0.0.1", self.port(), &self.pki.ca, None)
    }

    pub fn config_str(&self) -> &str {
        self.config.to_str().unwrap()
    }

    /// Runs an admin command with this server's config; its stdout.
    pub async fn admin(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--config", self.config_str()]);
        run_ok(&all).await
    }
}

/// Raises this test process's soft limit of open files to its hard limit: the attacks and
/// floods open hundreds of sockets, and a soft limit of 1,024 would make them fail here.
pub fn raise_own_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

/// One gRPC call made by hand over TLS and HTTP/2, for what the Talos-like client does not
/// do (other content-types, other services); the response body is left to read.
pub async fn raw_grpc(
    port: u16,
    ca: &Path,
    path: &str,
    content_type: &str,
    message: &[u8],
) -> http::Response<hyper::body::Incoming> {
    grpc_over(
        tls_connect(port, ca).await,
        port,
        path,
        content_type,
        message,
    )
    .await
}

/// [`raw_grpc`] over a TLS connection made by the caller (after a PROXY header, say).
pub async fn grpc_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    port: u16,
    path: &str,
    content_type: &str,
    message: &[u8],
) -> http::Response<hyper::body::Incoming> {
    let uri = format!("https://127.0.0.1:{port}{path}");
    http2_call(tls, &uri, content_type, message).await
}

/// One gRPC call on its own HTTP/2 connection over `io`.
async fn http2_call<IO>(
    io: IO,
    uri: &str,
    content_type: &str,
    message: &[u8],
) -> http::Response<hyper::body::Incoming>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let request = http::Request::post(uri)
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    sender.send_request(request).await.unwrap()
}

/// Replaces `from` with `to` in a config file; the file keeps its mode.
pub fn edit_config(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(
        text.contains(from),
        "{from:?} is not in {}",
        config.display()
    );
    write_private(config, &text.replace(from, to));
}

/// A loopback port that another socket holds, and that socket.
pub fn taken_port() -> (std::net::TcpListener, u16) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    (taken, port)
}

/// The server binary running as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// stderr up to and including the "serving" line.
    pub startup_log: Vec<String>,
    /// stderr lines after the "serving" line, as they arrive.
    pub log: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `talos-kms-server --config FILE` and waits (at most 30 s) until it serves.
    pub fn start(config: &Path) -> Result<ServerProcess, String> {
        Self::start_with(config, |_| ())
    }

    /// [`ServerProcess::start`] with the command adjusted first (limits, environment).
    pub fn start_with(
        config: &Path,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<ServerProcess, String> {
        let mut command = Command::new(BINARY);
        command
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("spawn server");
        let stderr = child.stderr.take().unwrap();
        let (lines, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        loop {
            match log.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(addr) = line
                        .split("address=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .filter(|_| line.contains("serving sidero.kms.KMSService"))
                    {
                        let addr = addr.parse().expect("address in the serving line");
                        seen.push(line);
                        return Ok(ServerProcess {
                            child,
                            addr,
                            startup_log: seen,
                            log,
                        });
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let status = child.wait().ok();
                    return Err(format!(
                        "server did not start ({status:?}): {}",
                        seen.join("\n")
                    ));
                }
            }
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (waits at most 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().unwrap();
        panic!("server did not stop within 30 s of SIGTERM");
    }
}

impl ServerProcess {
    /// Where it serves metrics (`metricsAddress`), as its start-up log says.
    pub fn metrics_address(&self) -> String {
        self.startup_log
            .iter()
            .find(|line| line.contains("serving metrics"))
            .and_then(|line| line.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the metrics address is logged")
            .to_string()
    }
}

/// GET /metrics; `accept` as Prometheus sends it, or none as curl does.
pub fn scrape(address: &str, accept: Option<&str>) -> String {
    let mut tcp = std::net::TcpStream::connect(address).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept.map_or(String::new(), |accept| format!("Accept: {accept}\r\n"));
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: kms\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion, killed after `limit`: a test that waits never hangs.
pub fn run_limited(command: &mut Command, limit: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let pid = child.id();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = done.send(());
    output
}

/// Runs the binary to completion with a 60 s limit.
pub fn run_binary(args: &[&str]) -> std::process::Output {
    run_limited(Command::new(BINARY).args(args), Duration::from_secs(60))
}

/// [`run_binary`] off the async runtime, so that a server in the test process keeps serving.
pub async fn run_binary_async(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&args)
    })
    .await
    .unwrap()
}

/// [`run_binary_async`] that must succeed; its stdout.
pub async fn run_ok(args: &[&str]) -> String {
    stdout_of_success(args, &run_binary_async(args).await)
}

/// The stdout of a command run with `args`, which must have succeeded.
pub fn stdout_of_success(args: &[&str], output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{args:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A Talos-like client's TLS: 1.3 only, offering `h2`, trusting the CAs in `ca`.
pub fn client_tls(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS 1.3 connection offering `h2`, trusting the CAs in `ca`, as `127.0.0.1`.
pub async fn tls_connect(
    port: u16,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_from(port, ca, None).await
}

/// [`tls_connect`] from the `source` address (one of 127.0.0.0/8).
pub async fn tls_connect_from(
    port: u16,
    ca: &Path,
    source: Option<IpAddr>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).unwrap();
    }
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(client_tls(ca))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails if any of the `secrets` appears in `text` as base64, hex or decimal bytes.
pub fn assert_no_secret(text: &str, where_: &str, secrets: &[(&str, &[u8])]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let decimal = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (what, secret) in secrets {
        for form in [b64.encode(secret), hex(secret), decimal(&secret[..8])] {
            assert!(
                !text.contains(&form),
                "the {what} appears in {where_} as {form}"
            );
        }
    }
}

/// The status a gRPC health `Check` answers for the server as a whole: 1 SERVING,
/// 2 NOT_SERVING.
pub async fn grpc_health(port: u16, ca: &Path) -> u8 {
    health_over(tls_connect(port, ca).await, port).await
}

/// [`grpc_health`] over a TLS connection made by the caller (after a PROXY header, say).
pub async fn health_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    port: u16,
) -> u8 {
    use http_body_util::BodyExt;
    let response = grpc_over(
        tls,
        port,
        "/grpc.health.v1.Health/Check",
        "application/grpc",
        &[],
    )
    .await;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    health_status(&body)
}

/// The answer to a gRPC call on `address` in plain HTTP/2 (prior knowledge, no TLS), as the
/// kubelet's gRPC probes make it.
pub async fn plain_grpc(
    address: &str,
    path: &str,
    message: &[u8],
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let uri = format!("http://{address}{path}");
    http2_call(tcp, &uri, "application/grpc", message).await
}

/// The status in a HealthCheckResponse frame: `[flag, len(4), 0x08, status]`.
pub fn health_status(frame: &[u8]) -> u8 {
    assert!(frame.len() >= 7 && frame[5] == 0x08, "{frame:?}");
    frame[6]
}

/// Asks health every 200 ms until it answers `wanted` or `limit` passes; the last answer.
pub async fn wait_for_health(port: u16, ca: &Path, wanted: u8, limit: Duration) -> u8 {
    let started = std::time::Instant::now();
    loop {
        let health = grpc_health(port, ca).await;
        if health == wanted || started.elapsed() >= limit {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
