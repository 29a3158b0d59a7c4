//! A KMS client that behaves exactly like a Talos node (docs/protocol.md §2): a new connection for
//! every call, TLS 1.3 with ALPN `h2` and no resumption, one call with a 10 s deadline, then
//! close. Tests, `bench` and the operator's `client` command all use it.

mod endpoint;
mod errors;

pub use endpoint::Endpoint;
pub use errors::ClientError;

use crate::proto::{self, KMSServiceClient};
use crate::tls::ALPN_H2;
use errors::{describe_connect, describe_hyper, describe_tls, rustls_error};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// The deadline Talos gives each call.
pub const TALOS_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Key-exchange groups the client offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyExchange {
    /// X25519MLKEM768 first with an X25519 share beside it, like Go 1.24+ (recent Talos).
    #[default]
    Go124,
    /// X25519 only, like older Talos releases.
    X25519,
    /// The hybrid post-quantum group only.
    X25519mlkem768,
    /// NIST P-256 only.
    P256,
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub endpoint: Endpoint,
    /// PEM CA certificates to trust instead of the public roots Talos ships.
    pub ca_file: Option<PathBuf>,
    /// Source address to bind, to act as a given node (e.g. 127.0.0.2).
    pub source_ip: Option<IpAddr>,
    pub key_exchange: KeyExchange,
    pub timeout: Duration,
    /// Begin each connection with a PROXY protocol v2 header, as a load balancer does: for
    /// testing and measuring a server's `trustedProxies` (the client's address must be one).
    pub proxy_v2: Option<ProxyV2>,
}

/// What the PROXY v2 header of [`ClientOptions::proxy_v2`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyV2 {
    /// The connection's own source address and port.
    OwnAddress,
    /// This client address (with the connection's own source port).
    Carrying(IpAddr),
    /// The LOCAL command: no client address, as a load balancer's health check.
    Local,
}

impl ClientOptions {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            ca_file: None,
            source_ip: None,
            key_exchange: KeyExchange::default(),
            timeout: TALOS_CALL_TIMEOUT,
            proxy_v2: None,
        }
    }
}

#[derive(Clone)]
pub struct KmsClient {
    options: ClientOptions,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    origin: http::Uri,
}

/// One open connection, for several calls (the `bench` shared-connection mode).
#[derive(Clone)]
pub struct Connection {
    grpc: KMSServiceClient<H2>,
    sender: SendRequest<tonic::body::Body>,
    endpoint: Arc<str>,
    /// The deadline each call's `grpc-timeout` tells the server, as grpc-go sends its
    /// context's: a fresh call's is its dial plus the client's timeout. `None`: no header.
    deadline: Option<tokio::time::Instant>,
}

impl KmsClient {
    pub fn new(options: ClientOptions) -> Result<Self, ClientError> {
        let endpoint = &options.endpoint;
        let tls = if endpoint.tls {
            let config = client_config(options.ca_file.as_deref(), options.key_exchange)?;
            let name = ServerName::try_from(endpoint.host.clone()).map_err(|_| {
                ClientError::Setup(format!(
                    "`{}` is not a valid host name or IP address: fix the endpoint's host",
                    endpoint.host
                ))
            })?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        let scheme = if endpoint.tls { "https" } else { "http" };
        let authority = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.port)
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        let origin = format!("{scheme}://{authority}")
            .parse()
            .map_err(|e| ClientError::Setup(format!("bad endpoint {endpoint}: {e}")))?;
        Ok(Self {
            options,
            tls,
            origin,
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// Seals `passphrase` on a fresh connection, like a Talos node at first boot.
    pub async fn seal(&self, node_uuid: &str, passphrase: &[u8]) -> Result<Vec<u8>, ClientError> {
        let result = self
            .deadline(async {
                self.connect_fresh()
                    .await?
                    .seal(node_uuid, passphrase)
                    .await
            })
            .await;
        self.explain(result).await
    }

    /// Unseals `sealed` on a fresh connection, like a Talos node at boot.
    pub async fn unseal(&self, node_uuid: &str, sealed: &[u8]) -> Result<Vec<u8>, ClientError> {
        let result = self
            .deadline(async { self.connect_fresh().await?.unseal(node_uuid, sealed).await })
            .await;
        self.explain(result).await
    }

    /// Opens a connection for several calls.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let result = self.deadline(self.connect_now()).await;
        self.explain(result).await
    }

    /// A plaintext call to a TLS server fails in HTTP/2 or times out, which says nothing of
    /// the cause: ask the port with a TLS handshake and, if it answers, say so.
    async fn explain<T>(&self, result: Result<T, ClientError>) -> Result<T, ClientError> {
        match result {
            Err(error)
                if self.tls.is_none()
                    && error.may_be_plaintext_to_tls()
                    && self.speaks_tls().await =>
            {
                let endpoint = &self.options.endpoint;
                let https = Endpoint {
                    tls: true,
                    ..endpoint.clone()
                };
                Err(ClientError::SpeaksTls {
                    endpoint: endpoint.to_string(),
                    https: https.to_string(),
                })
            }
            other => other,
        }
    }

    /// Whether the endpoint completes a TLS handshake, or fails one for a reason only a TLS
    /// server gives (its certificate, an alert). Nothing is sent after the handshake.
    async fn speaks_tls(&self) -> bool {
        const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
        let Ok(config) = client_config(None, self.options.key_exchange) else {
            return false;
        };
        let name = ServerName::try_from(self.options.endpoint.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("kms.invalid").expect("a valid DNS name"));
        let probe = async {
            let tcp = self.tcp().await.ok()?;
            Some(TlsConnector::from(config).connect(name, tcp).await)
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Some(Ok(_))) => true,
            Ok(Some(Err(error))) => match rustls_error(&error) {
                Some(
                    rustls::Error::InvalidMessage(_)
                    | rustls::Error::InappropriateMessage { .. }
                    | rustls::Error::InappropriateHandshakeMessage { .. },
                ) => false,
                Some(_) => true,
                None => false,
            },
            _ => false,
        }
    }

    /// Completes TCP and the TLS handshake (ALPN `h2`), then closes: the cost every Talos
    /// call pays before any gRPC.
    pub async fn handshake(&self) -> Result<(), ClientError> {
        self.deadline(async {
            let tcp = self.tcp().await?;
            if let Some((connector, name)) = &self.tls {
                self.tls_handshake(connector, name, tcp).await?;
            }
            Ok(())
        })
        .await
    }

    /// Opens a TCP connection, sends nothing, and waits until the server closes it: what a
    /// connection refused before TLS (outside the allow-lists) costs. A server that sends a
    /// byte instead did not refuse it: an error.
    pub async fn connect_only(&self) -> Result<(), ClientError> {
        use tokio::io::AsyncReadExt;
        self.deadline(async {
            let mut tcp = match self.try_tcp().await {
                Ok(tcp) => tcp,
                // Refused so fast that the reset came with the connection.
                Err(TcpFailure::Connect(error))
                    if error.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    return Ok(());
                }
                Err(failure) => return Err(self.tcp_error(failure)),
            };
            let mut byte = [0u8; 1];
            match tcp.read(&mut byte).await {
                Ok(0) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                Ok(_) => Err(ClientError::Connect {
                    endpoint: self.options.endpoint.to_string(),
                    problem: "the server sent data instead of closing the connection: this \
                              address is not refused by its allow-lists"
                        .into(),
                }),
                Err(error) => Err(ClientError::Connect {
                    endpoint: self.options.endpoint.to_string(),
                    problem: error.to_string(),
                }),
            }
        })
        .await
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.options.timeout, call)
            .await
            .unwrap_or(Err(ClientError::Timeout(self.options.timeout)))
    }

    /// A connection for one call, whose deadline counts from now, as a node's does.
    async fn connect_fresh(&self) -> Result<Connection, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.timeout;
        let mut connection = self.connect_now().await?;
        connection.deadline = Some(deadline);
        Ok(connection)
    }

    /// This client, calling from `source` instead (a node of its own in a storm).
    pub fn from_source(&self, source: IpAddr) -> KmsClient {
        KmsClient {
            options: ClientOptions {
                source_ip: Some(source),
                ..self.options.clone()
            },
            tls: self.tls.clone(),
            origin: self.origin.clone(),
        }
    }

    async fn connect_now(&self) -> Result<Connection, ClientError> {
        let tcp = self.tcp().await?;
        let sender = match &self.tls {
            Some((connector, name)) => {
                let tls = self.tls_handshake(connector, name, tcp).await?;
                self.http2(tls).await?
            }
            None => self.http2(tcp).await?,
        };
        Ok(Connection {
            grpc: KMSServiceClient::with_origin(H2(sender.clone()), self.origin.clone()),
            sender,
            endpoint: self.options.endpoint.to_string().into(),
            deadline: None,
        })
    }

    async fn tls_handshake(
        &self,
        connector: &TlsConnector,
        name: &ServerName<'static>,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|error| ClientError::Tls {
                endpoint: self.options.endpoint.to_string(),
                problem: describe_tls(&error, name, self.options.ca_file.as_deref()),
            })
    }

    async fn http2<IO>(&self, io: IO) -> Result<SendRequest<tonic::body::Body>, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| ClientError::Http2 {
                endpoint: self.options.endpoint.to_string(),
                problem: describe_hyper(&error),
            })?;
        // Ends when the last sender is dropped: that closes the connection, as Talos does.
        tokio::spawn(connection);
        Ok(sender)
    }

    async fn tcp(&self) -> Result<TcpStream, ClientError> {
        self.try_tcp()
            .await
            .map_err(|failure| self.tcp_error(failure))
    }

    fn tcp_error(&self, failure: TcpFailure) -> ClientError {
        let endpoint = &self.options.endpoint;
        ClientError::Connect {
            endpoint: endpoint.to_string(),
            problem: match failure {
                TcpFailure::Resolve(e) => format!("cannot resolve {}: {e}", endpoint.host),
                TcpFailure::Connect(error) => describe_connect(&error, self.options.source_ip),
                TcpFailure::NoAddress => format!(
                    "no address of {} is of the family of --source-ip (IPv4 or IPv6): use a \
                     source address of the same family",
                    endpoint.host
                ),
            },
        }
    }

    async fn try_tcp(&self) -> Result<TcpStream, TcpFailure> {
        let endpoint = &self.options.endpoint;
        let addresses = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(TcpFailure::Resolve)?;
        let mut last_error = None;
        for address in addresses {
            if let Some(source) = self.options.source_ip
                && source.is_ipv4() != address.is_ipv4()
            {
                continue;
            }
            match self.connect_to(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.map_or(TcpFailure::NoAddress, TcpFailure::Connect))
    }

    async fn connect_to(&self, address: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = self.options.source_ip {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        let mut stream = socket.connect(address).await?;
        stream.set_nodelay(true)?;
        if let Some(proxy) = self.options.proxy_v2 {
            use tokio::io::AsyncWriteExt;
            let own = stream.local_addr()?;
            let source = match proxy {
                ProxyV2::OwnAddress => Some(own),
                ProxyV2::Carrying(ip) => Some(SocketAddr::new(ip, own.port())),
                ProxyV2::Local => None,
            };
            let header = crate::listener::proxy_protocol::v2_header(source, address);
            stream.write_all(&header).await?;
        }
        Ok(stream)
    }
}

/// Why no TCP connection was made.
enum TcpFailure {
    Resolve(std::io::Error),
    Connect(std::io::Error),
    /// No address of the endpoint is of the source address's family.
    NoAddress,
}

impl Connection {
    pub async fn seal(
        &mut self,
        node_uuid: &str,
        passphrase: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        self.ready().await?;
        let request = self.request(node_uuid, passphrase);
        let response = self
            .grpc
            .seal(request)
            .await
            .map_err(|status| self.status_error(status))?;
        Ok(std::mem::take(&mut response.into_inner().data))
    }

    pub async fn unseal(&mut self, node_uuid: &str, sealed: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.ready().await?;
        let request = self.request(node_uuid, sealed);
        let response = self
            .grpc
            .unseal(request)
            .await
            .map_err(|status| self.status_error(status))?;
        Ok(std::mem::take(&mut response.into_inner().data))
    }

    /// Sets the deadline the next calls tell the server (`grpc-timeout`).
    pub fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        self.deadline = Some(deadline);
    }

    fn request(&self, node_uuid: &str, data: &[u8]) -> tonic::Request<proto::Request> {
        let mut request = tonic::Request::new(proto::Request {
            node_uuid: node_uuid.to_string(),
            data: data.to_vec(),
        });
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        }
        request
    }

    /// Waits until the connection can take a call. The generated client would turn a broken
    /// connection here into a status with no cause, indistinguishable from the server's.
    async fn ready(&mut self) -> Result<(), ClientError> {
        self.sender
            .ready()
            .await
            .map_err(|error| ClientError::Http2 {
                endpoint: self.endpoint.to_string(),
                problem: describe_hyper(&error),
            })
    }

    /// tonic reports a broken connection as a status too; only a status the server sent is
    /// the server's answer.
    fn status_error(&self, status: tonic::Status) -> ClientError {
        use std::error::Error;
        match status
            .source()
            .and_then(|e| e.downcast_ref::<hyper::Error>())
        {
            Some(error) => ClientError::Http2 {
                endpoint: self.endpoint.to_string(),
                problem: describe_hyper(error),
            },
            None => ClientError::Status(status),
        }
    }
}

/// 32 random bytes, as a Talos node makes for every new LUKS2 key slot.
pub fn random_passphrase() -> [u8; 32] {
    let mut passphrase = [0u8; 32];
    // A failed RNG leaves zeros: still a passphrase that seals and checks.
    let _ = aws_lc_rs::rand::fill(&mut passphrase);
    passphrase
}

/// A random RFC 4122 version-4 UUID, as text: a node UUID for tests and benchmarks.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn client_config(
    ca_file: Option<&Path>,
    key_exchange: KeyExchange,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    ClientError::Setup(match e {
                        rustls::pki_types::pem::Error::Io(e) => {
                            format!("cannot read the CA file {}: {e}", path.display())
                        }
                        _ => format!(
                            "the CA file {} is not PEM: give a file of -----BEGIN CERTIFICATE----- blocks",
                            path.display()
                        ),
                    })
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ClientError::Setup(format!(
                    "CA file {}: no usable PEM CERTIFICATE in it",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let kx_groups = match key_exchange {
        KeyExchange::Go124 => vec![kx_group::X25519MLKEM768, kx_group::X25519],
        KeyExchange::X25519 => vec![kx_group::X25519],
        KeyExchange::X25519mlkem768 => vec![kx_group::X25519MLKEM768],
        KeyExchange::P256 => vec![kx_group::SECP256R1],
    };
    // Go's TLS 1.3 preference on CPUs with AES instructions, so that measurements see the
    // suite Talos negotiates.
    let cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites,
        kx_groups,
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// An HTTP/2 connection as the transport of the generated gRPC client: one connection, no
/// pooling, no reconnects, exactly like a Talos call.
#[derive(Clone)]
struct H2(SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}
