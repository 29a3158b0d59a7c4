//! Where requests enter: accepts TCP connections, bounds how many are served at once,
//! completes TLS (its costly step a few connections at a time, see [`handshake`]), and
//! serves gRPC over HTTP/2 on each with the peer address attached.
//!
//! Shaped like mini-redis: a [`Listener`] accepts and spawns one [`Handler`] per
//! connection; shutdown is a watch signal, and the listener knows all handlers are done when
//! every clone of its `finished` sender has been dropped.
//!
//! A Talos call is one request on a fresh connection, arriving with the client's TLS
//! Finished. The handler answers it within the poll that reads it ([`InlineFirst`]) and
//! sends everything that poll queued in one write ([`write_batch`]): the server's HTTP/2
//! SETTINGS, its acknowledgement of the client's, and the response leave together.

mod handshake_failures;
mod limits;
pub mod metrics;
mod write_batch;

pub use handshake_failures::HandshakeFailures;
pub use limits::ListenerLimits;

use crate::metrics::Metrics;
use crate::policy::Networks;
use crate::proto::KMSServiceServer;
use crate::service::{KmsService, Peer};
use handshake_failures::{Reason, SUMMARY_INTERVAL};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tonic::codegen::Service;

/// HTTP/2's initial flow-control window (RFC 9113 §6.9.2).
const SPEC_WINDOW_SIZE: u32 = 65_535;
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

type Grpc = KMSServiceServer<KmsService>;
/// Standard gRPC health checking, on the same port.
pub type Health =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

pub struct Listener {
    pub tcp: TcpListener,
    pub tls: TlsAcceptor,
    pub service: Arc<KmsService>,
    pub limit: Arc<Semaphore>,
    /// Handshakes computing their first flight at once; see [`handshake`].
    pub handshakes: Arc<Semaphore>,
    pub handshake_failures: Arc<HandshakeFailures>,
    pub limits: ListenerLimits,
    /// Where connections may come from at all; `None`: anywhere.
    pub connection_networks: Option<Networks>,
    pub health: Health,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    pub finished: mpsc::Sender<()>,
}

struct Handler {
    peer: SocketAddr,
    tls: TlsAcceptor,
    handshakes: Arc<Semaphore>,
    handshake_failures: Arc<HandshakeFailures>,
    limits: ListenerLimits,
    grpc: Grpc,
    health: Health,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    _finished: mpsc::Sender<()>,
}

impl Listener {
    /// Accepts connections until shutdown is signalled. Accept errors (out of file
    /// descriptors, say) are retried with a capped backoff: the server never gives up.
    pub async fn run(mut self) {
        let grpc = KMSServiceServer::from_arc(Arc::clone(&self.service))
            .max_decoding_message_size(self.limits.max_message_size);
        tokio::spawn(summarize_handshake_failures(
            Arc::clone(&self.handshake_failures),
            self.shutdown.clone(),
        ));
        let mut backoff = Duration::from_millis(10);
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stopped(&mut self.shutdown) => return,
            };
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                _ = stopped(&mut self.shutdown) => return,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(10);
                    accepted
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let handler = Handler {
                peer,
                tls: self.tls.clone(),
                handshakes: Arc::clone(&self.handshakes),
                handshake_failures: Arc::clone(&self.handshake_failures),
                limits: self.limits.clone(),
                grpc: grpc.clone(),
                health: self.health.clone(),
                metrics: Arc::clone(&self.metrics),
                shutdown: self.shutdown.clone(),
                _finished: self.finished.clone(),
            };
            let metrics = Arc::clone(&self.metrics);
            metrics.connection_opened();
            tokio::spawn(async move {
                handler.run(socket).await;
                metrics.connection_closed();
                drop(permit);
            });
        }
    }
}

impl Handler {
    async fn run(mut self, socket: TcpStream) {
        let handshaking = handshake(socket, &self.tls, &self.handshakes);
        let tls = tokio::select! {
            result = tokio::time::timeout(self.limits.handshake_timeout, handshaking) => match result {
                Ok(Ok(Some(tls))) => tls,
                Ok(Ok(None)) => {
                    tracing::debug!(peer = %self.peer, "client left before its handshake began");
                    return;
                }
                Ok(Err(error)) => {
                    self.handshake_failed(Reason::of(&error), &error);
                    return;
                }
                Err(timeout) => {
                    self.handshake_failed(Reason::timed_out(), &timeout);
                    return;
                }
            },
            _ = stopped(&mut self.shutdown) => return,
        };

        self.metrics.handshake();
        let service = WithPeer {
            inner: self.grpc,
            health: self.health,
            peer: Peer(self.peer),
        };
        let mut http2 = hyper::server::conn::http2::Builder::new(InlineFirst);
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.max_streams_per_connection)
            .max_header_list_size(self.limits.max_header_list_size)
            // Messages are tiny: the protocol's default windows need no WINDOW_UPDATE at
            // the start of every connection, and Talos has no use for a Date header.
            .initial_connection_window_size(SPEC_WINDOW_SIZE)
            .initial_stream_window_size(SPEC_WINDOW_SIZE)
            .auto_date_header(false);
        let (io, batch) = write_batch::batched(tls);
        let connection =
            http2.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let closing = tokio::select! {
            result = sending(connection.as_mut(), &batch) => {
                if let Err(error) = result {
                    tracing::debug!(peer = %self.peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut self.shutdown) => "server stopping",
            _ = tokio::time::sleep(self.limits.max_connection_age) => "connection too old",
        };
        // Finish the calls in flight, accept no new ones.
        tracing::debug!(peer = %self.peer, reason = closing, "closing connection");
        connection.as_mut().graceful_shutdown();
        let _ = sending(connection.as_mut(), &batch).await;
    }
}

impl Handler {
    fn handshake_failed(&self, reason: Reason, error: &dyn std::fmt::Display) {
        let peer = self.peer.ip();
        if reason.is_probe() {
            tracing::debug!(%peer, %error, "connection closed before its TLS handshake");
            return;
        }
        self.metrics.handshake_failed(&reason.kind);
        if self.handshake_failures.record(peer, &reason) {
            tracing::warn!(
            %peer,
            reason = %reason.kind,
            %error,
            "TLS handshake failed: {}; more failures of this peer and reason are summed up \
             once a minute",
            reason.hint
            );
        } else {
            tracing::debug!(%peer, reason = %reason.kind, %error, "TLS handshake failed");
        }
    }
}

/// Logs, once a minute, the handshake failures that were not logged one by one.
async fn summarize_handshake_failures(
    failures: Arc<HandshakeFailures>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(SUMMARY_INTERVAL);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Some(summary) = failures.summary() {
                    tracing::warn!("{summary}");
                }
            }
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Completes TLS, or returns `None` for a client that gave up waiting.
///
/// When a storm outruns the server, what must not happen is that every connection gets a
/// share of the CPU: all calls then slow down together and pass Talos's 10 s deadline
/// together, each after the server paid for its handshake. So the costly step (key share
/// and signature, computed when the ClientHello is accepted) runs for a few connections at
/// a time, in arrival order, and each call's remaining steps are cheap and prompt. A node
/// whose deadline passed while it waited has closed its socket and will retry on a new one;
/// its FIN is all that follows its ClientHello (a TLS 1.3 client sends nothing more before
/// the server's answer), and it is dropped without that work.
async fn handshake(
    socket: TcpStream,
    tls: &TlsAcceptor,
    handshakes: &Semaphore,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket).await?;
    let turn = handshakes
        .acquire()
        .await
        .map_err(|_| std::io::Error::other("the server is stopping"))?;
    if client_left(&hello.io) {
        return Ok(None);
    }
    let accept = hello.into_stream(Arc::clone(tls.config()));
    drop(turn);
    accept.await.map(Some)
}

/// Whether the peer has closed its side and sent nothing more: a peek that finds the end
/// of the stream (or a reset) now, without waiting. It asks the socket itself, because
/// tokio forgets a FIN that arrived with data once that data has been read.
fn client_left(socket: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(socket).peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Drives the connection, sending what each poll queued before the task sleeps.
async fn sending<C: Future, IO: tokio::io::AsyncWrite + Unpin>(
    mut connection: Pin<&mut C>,
    batch: &write_batch::WriteBatch<IO>,
) -> C::Output {
    std::future::poll_fn(|cx| {
        let polled = connection.as_mut().poll(cx);
        batch.send(cx);
        polled
    })
    .await
}

/// hyper's executor for request futures: polls each once at once, inside the connection's
/// poll, so that a call answered without waiting (every unseal) is written in the same
/// batch as the frames that carried it; only a future that must wait (a seal awaiting its
/// commit) becomes a task of its own.
#[derive(Clone, Copy)]
struct InlineFirst;

impl<F> hyper::rt::Executor<F> for InlineFirst
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let mut future = Box::pin(future);
        // A pending future must wake the waker of its latest poll. The spawned task is
        // polled again with its own waker, so nothing ever relies on this no-op one.
        if future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
        {
            tokio::spawn(future);
        }
    }
}

/// Attaches the connection's peer address to every request, for the AAD and the logs.
#[derive(Clone)]
struct WithPeer {
    inner: Grpc,
    health: Health,
    peer: Peer,
}

impl Service<http::Request<Incoming>> for WithPeer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Answer<
        <Grpc as Service<http::Request<Incoming>>>::Future,
        <Health as Service<http::Request<Incoming>>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<http::Request<Incoming>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<Incoming>) -> Self::Future {
        if !is_grpc(request.headers()) {
            // The gRPC spec's answer, so that no other HTTP/2 client mistakes a gRPC error
            // (status 200) for success; nothing is sealed or unsealed.
            let mut refused = http::Response::new(tonic::body::Body::empty());
            *refused.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Answer::Refused(Some(refused));
        }
        if request.uri().path().starts_with(HEALTH_PATH) {
            return Answer::Health(self.health.call(request));
        }
        request.extensions_mut().insert(self.peer);
        Answer::Grpc(self.inner.call(request))
    }
}

/// `application/grpc` or `application/grpc+proto`, with or without parameters.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let media_type = value.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/grpc")
        || media_type.eq_ignore_ascii_case("application/grpc+proto")
}

/// A call's answer from the KMS or the health service, or an HTTP refusal ready at once.
pub enum Answer<F, H> {
    Grpc(F),
    Health(H),
    Refused(Option<http::Response<tonic::body::Body>>),
}

impl<F, H> Future for Answer<F, H>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Unpin,
    H: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Grpc(call) => Pin::new(call).poll(cx),
            Answer::Health(call) => Pin::new(call).poll(cx),
            Answer::Refused(response) => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        }
    }
}

/// Resolves once shutdown is signalled (at once if it already was).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
