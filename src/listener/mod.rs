//! Where requests enter: accepts TCP connections, bounds how many are served at once,
//! completes TLS (its costly step a few connections at a time, see [`handshake`]), and
//! serves gRPC over HTTP/2 on each with the peer address attached.
//!
//! Shaped like mini-redis: a [`Listener`] accepts and spawns one [`Handler`] per
//! connection; shutdown is a watch signal, and the listener knows all handlers are done when
//! every clone of its `finished` sender has been dropped.
//!
//! No one may lock nodes out by holding connections ([`slots`]): a connection from outside
//! the allow-lists is closed before any TLS byte, an address holds at most its share, a
//! connection waiting on its client for the idle timeout is closed, and when every slot is
//! taken the one that waited longest is closed to admit the new one.
//!
//! A Talos call is one request on a fresh connection, arriving with the client's TLS
//! Finished. The handler answers it within the poll that reads it ([`InlineFirst`]) and
//! sends everything that poll queued in one write ([`write_batch`]): the server's HTTP/2
//! SETTINGS, its acknowledgement of the client's, and the response leave together. A call
//! that must wait (a seal's commit, a PostgreSQL round trip) holds that write back until
//! its answer joins it.

mod handshake_failures;
mod limits;
pub mod metrics;
mod proxied;
pub mod proxy_protocol;
mod refusals;
pub mod slots;
mod write_batch;

pub use handshake_failures::HandshakeFailures;
pub use limits::ListenerLimits;
pub use refusals::Refusals;
pub use slots::Slots;

use crate::audit::{self, Action, AuditLog, Event};
use crate::metrics::Metrics;
use crate::policy::Networks;
use crate::proto::KMSServiceServer;
use crate::service::{KmsService, Peer};
use handshake_failures::{Reason, SUMMARY_INTERVAL};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use refusals::Kind;
use slots::{Busy, Closed, Eviction, Registered, Room, Slot, SlotHandle};
use std::convert::Infallible;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tonic::codegen::Service;
use write_batch::{Answering, Hold, Unanswered};

/// HTTP/2's initial flow-control window (RFC 9113 §6.9.2).
const SPEC_WINDOW_SIZE: u32 = 65_535;
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How often a listener waiting for a slot looks again for a connection to close: one that
/// was busy may be waiting on its client by now.
const EVICTION_RETRY: Duration = Duration::from_millis(100);
/// How long a closing connection is kept after its last call is answered, for the answer
/// to be written out (a call is counted in flight until its answer is ready, not sent).
const FLUSH_GRACE: Duration = Duration::from_millis(100);

type Grpc = KMSServiceServer<KmsService>;
/// Standard gRPC health checking, on the same port.
pub type Health =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";
const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// Health `Watch` streams served at once, server-wide. Each holds its connection busy (never
/// closed for a node) while it lasts, so without a bound a few addresses could hold every
/// slot; monitoring needs a handful.
pub const MAX_WATCHES: usize = 64;

pub struct Listener {
    /// The listening socket, accepted from directly: see [`accept`].
    pub tcp: AsyncFd<std::net::TcpListener>,
    pub tls: TlsAcceptor,
    pub service: Arc<KmsService>,
    pub limit: Arc<Semaphore>,
    /// Who holds the slots `limit` counts, and which may be taken back.
    pub slots: Arc<Slots>,
    /// Handshakes computing their first flight at once; see [`handshake`].
    pub handshakes: Arc<Semaphore>,
    pub handshake_failures: Arc<HandshakeFailures>,
    pub refusals: Arc<Refusals>,
    pub limits: ListenerLimits,
    /// Where connections may come from at all; `None`: anywhere.
    pub connection_networks: Option<Networks>,
    /// `trustedProxies`: load balancers whose connections begin with a PROXY header
    /// carrying the client's address. Empty: no header is ever read.
    pub trusted_proxies: Networks,
    pub health: Health,
    pub metrics: Arc<Metrics>,
    /// For connections refused by the allow-list.
    pub audit: Arc<AuditLog>,
    pub shutdown: watch::Receiver<bool>,
    pub finished: mpsc::Sender<()>,
}

struct Handler {
    /// The client: the TCP peer, or the address a trusted proxy's PROXY header carried.
    peer: SocketAddr,
    slot: SlotHandle,
    /// Set when `trustedProxies` is, with whether this connection comes from one.
    proxies: Option<(Arc<proxied::Proxies>, bool)>,
    tls: TlsAcceptor,
    handshakes: Arc<Semaphore>,
    handshake_failures: Arc<HandshakeFailures>,
    limits: ListenerLimits,
    grpc: Grpc,
    health: Health,
    watches: Arc<Semaphore>,
    audit: Arc<AuditLog>,
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
        let watches = Arc::new(Semaphore::new(MAX_WATCHES));
        tokio::spawn(summarize(
            Arc::clone(&self.handshake_failures),
            Arc::clone(&self.refusals),
            Arc::clone(&self.audit),
            self.shutdown.clone(),
        ));
        let proxies = (!self.trusted_proxies.is_empty()).then(|| {
            Arc::new(proxied::Proxies {
                trusted: std::mem::take(&mut self.trusted_proxies),
                connection_networks: self.connection_networks.clone(),
                refusals: Arc::clone(&self.refusals),
                audit: Arc::clone(&self.audit),
                metrics: Arc::clone(&self.metrics),
            })
        });
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                accepted = accept(&self.tcp) => accepted,
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
            let ip = address_of(peer);
            // A trusted proxy's connections are filtered and counted by the address their
            // header carries, once it is read; its own address is not capped per address.
            let from_proxy = proxies.as_ref().is_some_and(|p| p.trusted.contains(ip));
            if !from_proxy && !allowed(self.connection_networks.as_ref(), ip) {
                // Closed before a byte is read or written: no handshake, nothing learned.
                reset(socket);
                self.metrics.connection_refused("network");
                self.closed_early(ip, Kind::Network);
                continue;
            }
            match if from_proxy {
                Room::Free
            } else {
                self.slots.make_room_for(ip)
            } {
                Room::Free => {}
                Room::EvictedOwn => {
                    self.metrics.connection_dropped("per_address");
                    self.closed_early(ip, Kind::PerAddress);
                }
                Room::None => {
                    reset(socket);
                    self.metrics.connection_refused("per_address");
                    self.closed_early(ip, Kind::PerAddress);
                    continue;
                }
            }
            let Some(permit) = self.free_slot().await else {
                return;
            };
            let socket = match socket
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(socket))
            {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(%error, %peer, "cannot serve an accepted connection");
                    continue;
                }
            };
            let Registered { slot, first_look } = self.slots.register(ip);
            let _ = socket.set_nodelay(true);
            let handler = Handler {
                peer,
                slot,
                proxies: proxies.as_ref().map(|p| (Arc::clone(p), from_proxy)),
                tls: self.tls.clone(),
                handshakes: Arc::clone(&self.handshakes),
                handshake_failures: Arc::clone(&self.handshake_failures),
                limits: self.limits.clone(),
                grpc: grpc.clone(),
                health: self.health.clone(),
                watches: Arc::clone(&watches),
                audit: Arc::clone(&self.audit),
                metrics: Arc::clone(&self.metrics),
                shutdown: self.shutdown.clone(),
                _finished: self.finished.clone(),
            };
            let metrics = Arc::clone(&self.metrics);
            metrics.connection_opened();
            tokio::spawn(async move {
                handler.run(socket, first_look).await;
                metrics.connection_closed();
                drop(permit);
            });
        }
    }

    /// A slot for a new connection: a free one, or the one of the connection that waited
    /// longest on its client, closed for it. When every connection is busy, waits for one to
    /// end (new connections wait in the kernel's accept queue meanwhile). `None`: stopping.
    async fn free_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() {
                return Some(permit);
            }
            if let Eviction::Evicted(ip) = self.slots.evict_oldest() {
                self.metrics.connection_dropped("evicted");
                self.closed_early(ip, Kind::Full);
            }
            tokio::select! {
                permit = Arc::clone(&self.limit).acquire_owned() => return permit.ok(),
                _ = tokio::time::sleep(EVICTION_RETRY) => {}
                _ = stopped(&mut self.shutdown) => return None,
            }
        }
    }

    /// Logs (the first of each address and kind a minute) and, for the allow-list, audits
    /// a connection closed by the listener; the caller counted it.
    fn closed_early(&self, ip: IpAddr, kind: Kind) {
        closed_early(&self.refusals, &self.audit, ip, kind, None);
    }
}

/// Logs (the first of each address and kind a minute) and, for the allow-list, audits a
/// connection closed by the listener; the caller counted it. `via`: the trusted proxy whose
/// PROXY header carried `ip`.
fn closed_early(
    refusals: &Refusals,
    audit: &AuditLog,
    ip: IpAddr,
    kind: Kind,
    via: Option<IpAddr>,
) {
    if !refusals.record(ip, kind) {
        tracing::debug!(peer = %ip, reason = kind.label(), "connection closed");
        return;
    }
    match via {
        Some(proxy) => {
            tracing::warn!(peer = %ip, %proxy, reason = kind.label(), "{}", kind.message())
        }
        None => tracing::warn!(peer = %ip, reason = kind.label(), "{}", kind.message()),
    }
    if kind == Kind::Network {
        let carried = via.map_or(String::new(), |proxy| {
            format!(" (the address a PROXY header from the trusted proxy {proxy} carried)")
        });
        let line = refusals::refused_connection(
            Some(ip),
            format!(
                "closed before TLS: the address{carried} is outside sealAllowedNetworks and \
                 unsealAllowedNetworks; more from it are counted in one line a minute"
            ),
        );
        // Refusing needs no audit line; a failing trail is reported by the audit log.
        let _ = audit.write(&line);
    }
}

impl Handler {
    async fn run(mut self, mut socket: TcpStream, first_look: Busy) {
        let idle = self.limits.idle_timeout;
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        let first_look = match self.proxies.take() {
            None => first_look,
            Some((proxies, trusted)) => {
                let reading = busy_until_waiting(
                    proxied::preamble(&mut socket, self.peer, trusted),
                    first_look,
                );
                let read = tokio::select! {
                    read = tokio::time::timeout_at(deadline, reading) => read,
                    closed = self.slot.until_closed(idle) => {
                        closed_waiting(&self.metrics, self.peer, closed, "before its PROXY header");
                        return;
                    }
                    _ = stopped(&mut self.shutdown) => return,
                };
                match proxies.admit(read, &socket, self.peer, &self.slot) {
                    Some(client) => self.peer = client,
                    None => return,
                }
                self.slot.busy()
            }
        };
        let handshaking = handshake(socket, &self.tls, &self.handshakes, &self.slot, first_look);
        let tls = tokio::select! {
            result = tokio::time::timeout_at(deadline, handshaking) => match result {
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
            closed = self.slot.until_closed(idle) => {
                closed_waiting(&self.metrics, self.peer, closed, "before its handshake completed");
                return;
            }
            _ = stopped(&mut self.shutdown) => return,
        };

        self.metrics.handshake();
        let unanswered = Unanswered::default();
        let service = WithPeer {
            inner: self.grpc,
            health: self.health,
            peer: Peer(self.peer),
            slot: Arc::clone(&self.slot),
            unanswered: unanswered.clone(),
            watches: self.watches,
            call_timeout: self.limits.call_timeout,
            cuts: Arc::new(Cuts {
                audit: self.audit,
                metrics: Arc::clone(&self.metrics),
                peer: self.peer,
            }),
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
            result = sending(connection.as_mut(), &batch, &unanswered) => {
                if let Err(error) = result {
                    tracing::debug!(peer = %self.peer, %error, "connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut self.shutdown) => Err("server stopping"),
            _ = tokio::time::sleep(self.limits.max_connection_age) => Err("connection too old"),
            closed = self.slot.until_closed(idle) => Ok(closed),
        };
        connection.as_mut().graceful_shutdown();
        match closing {
            Ok(closed) => {
                // Nothing was in flight: the GOAWAY leaves, and the connection closes without
                // waiting for an answer that a client holding a slot would never send.
                closed_waiting(&self.metrics, self.peer, closed, "after its handshake");
                let mut sent = pin!(sending(connection.as_mut(), &batch, &unanswered));
                let finished =
                    std::future::poll_fn(|cx| Poll::Ready(sent.as_mut().poll(cx).is_ready())).await;
                if !finished && self.slot.is_busy() {
                    // A call arrived as the connection was being closed: it is answered first.
                    let from = tokio::time::Instant::now();
                    tokio::select! {
                        biased;
                        _ = sent => {}
                        _ = self.slot.idle_for(FLUSH_GRACE, from) => {}
                    }
                }
            }
            Err(reason) => {
                // Finish the calls in flight, accept no new ones; a client that does not
                // answer the GOAWAY is dropped once nothing is in flight for the idle timeout.
                tracing::debug!(peer = %self.peer, reason, "closing connection");
                let from = tokio::time::Instant::now();
                tokio::select! {
                    biased;
                    _ = sending(connection.as_mut(), &batch, &unanswered) => {}
                    _ = self.slot.idle_for(idle, from) => {}
                }
            }
        }
    }
}

/// A connection the server closes while it waits on its client; evictions were counted by
/// the listener that made them.
fn closed_waiting(metrics: &Metrics, peer: SocketAddr, closed: Closed, when: &'static str) {
    if closed == Closed::Idle {
        metrics.connection_dropped("idle");
    }
    tracing::debug!(%peer, ?closed, when, "closing a connection waiting on its client");
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

/// Once a minute: logs the handshake failures and the closed connections that were not
/// logged one by one, and audits the allow-list's refusals with their counts.
async fn summarize(
    failures: Arc<HandshakeFailures>,
    refusals: Arc<Refusals>,
    audit: Arc<AuditLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(SUMMARY_INTERVAL);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        if let Some(summary) = failures.summary() {
            tracing::warn!("{summary}");
        }
        let summary = refusals.summary();
        if let Some(log) = summary.log {
            tracing::warn!("{log}");
        }
        for line in &summary.audit {
            let _ = audit.write(line);
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
///
/// The slot is busy while the server owes work (reading what arrived, queueing for and
/// computing its flight) and waiting on the client otherwise; see [`slots`].
async fn handshake(
    socket: TcpStream,
    tls: &TlsAcceptor,
    handshakes: &Semaphore,
    slot: &Arc<Slot>,
    first_look: Busy,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let hello = busy_until_waiting(
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket),
        first_look,
    )
    .await?;
    let computing = slot.busy();
    let turn = handshakes
        .acquire()
        .await
        .map_err(|_| std::io::Error::other("the server is stopping"))?;
    if client_left(&hello.io) {
        return Ok(None);
    }
    let accept = hello.into_stream(Arc::clone(tls.config()));
    drop(turn);
    busy_until_waiting(accept, computing).await.map(Some)
}

/// Drives `future`, keeping the slot busy until it first waits (on the client's bytes): a
/// connection whose bytes arrived but were not read yet is not waiting on its client.
async fn busy_until_waiting<F: Future>(future: F, busy: Busy) -> F::Output {
    let mut busy = Some(busy);
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        let polled = future.as_mut().poll(cx);
        if polled.is_pending() {
            busy = None;
        }
        polled
    })
    .await
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

/// Drives the connection, sending what each poll queued before the task sleeps, unless it
/// waits for an answer being computed (see [`write_batch`]).
async fn sending<C: Future, IO: tokio::io::AsyncWrite + Unpin>(
    mut connection: Pin<&mut C>,
    batch: &write_batch::WriteBatch<IO>,
    unanswered: &Unanswered,
) -> C::Output {
    let mut hold = Hold::new(unanswered);
    std::future::poll_fn(|cx| {
        let polled = connection.as_mut().poll(cx);
        if polled.is_pending() && hold.poll_wait(cx, batch) {
            return Poll::Pending;
        }
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

/// Attaches the connection's peer address to every request, for the AAD and the logs, and
/// marks the connection busy while a call is in flight.
#[derive(Clone)]
struct WithPeer {
    inner: Grpc,
    health: Health,
    peer: Peer,
    slot: Arc<Slot>,
    unanswered: Unanswered,
    watches: Arc<Semaphore>,
    call_timeout: Duration,
    cuts: Arc<Cuts>,
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
        let in_flight = Some(self.slot.busy());
        let mut watch = None;
        let kind = if !is_grpc(request.headers()) {
            // The gRPC spec's answer, so that no other HTTP/2 client mistakes a gRPC error
            // (status 200) for success; nothing is sealed or unsealed.
            let mut refused = http::Response::new(tonic::body::Body::empty());
            *refused.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            AnswerKind::Refused(Some(refused))
        } else if request.uri().path() == WATCH_PATH {
            match Arc::clone(&self.watches).try_acquire_owned() {
                Ok(permit) => {
                    watch = Some(permit);
                    AnswerKind::Health(self.health.call(request))
                }
                Err(_) => {
                    self.cuts.metrics.watch_refused();
                    AnswerKind::Refused(Some(
                        tonic::Status::resource_exhausted(format!(
                            "{MAX_WATCHES} health Watch streams are open already; use Check, or \
                         close a Watch"
                        ))
                        .into_http(),
                    ))
                }
            }
        } else if request.uri().path().starts_with(HEALTH_PATH) {
            AnswerKind::Health(self.health.call(request))
        } else {
            let action = match request.uri().path() {
                crate::proto::SEAL_PATH => Some(Action::Seal),
                crate::proto::UNSEAL_PATH => Some(Action::Unseal),
                _ => None,
            };
            request.extensions_mut().insert(self.peer);
            let deadline = Deadline {
                after: self.call_timeout,
                timer: None,
                action,
                cuts: Arc::clone(&self.cuts),
            };
            AnswerKind::Grpc(self.inner.call(request), deadline)
        };
        Answer {
            kind,
            in_flight,
            answering: Some(self.unanswered.call()),
            watch,
        }
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

/// A call's answer, with the connection marked busy until it is ready: a unary answer is
/// whole then; a health `Watch` stays busy while its stream lasts.
pub struct Answer<F, H> {
    kind: AnswerKind<F, H>,
    in_flight: Option<Busy>,
    answering: Option<Answering>,
    /// A Watch's place among [`MAX_WATCHES`], held while its stream lasts.
    watch: Option<OwnedSemaphorePermit>,
}

/// The KMS's or the health service's answer, or a refusal ready at once.
enum AnswerKind<F, H> {
    Grpc(F, Deadline),
    Health(H),
    Refused(Option<http::Response<tonic::body::Body>>),
}

/// `callTimeout` for one call, armed only once the call has to wait: an unseal answered in
/// its first poll never touches the timer.
struct Deadline {
    after: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Seal or unseal, by the request's path; `None` for a method the service lacks.
    action: Option<Action>,
    cuts: Arc<Cuts>,
}

impl Deadline {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let after = self.after;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    /// The answer to a call cut at its deadline, counted and audited like any refusal.
    fn cut(&self) -> http::Response<tonic::body::Body> {
        if let Some(action) = self.action {
            let event = Event::unread_call(action, &crate::sealing::peer_ip_text(&self.cuts.peer))
                .refused(audit::Reason::CallTimeout);
            // The answer stands whether or not the line could be written.
            let _ = self.cuts.audit.write(&event);
            self.cuts.metrics.call(
                action.label(),
                "refused",
                audit::Reason::CallTimeout.label(),
                self.after,
            );
        }
        tracing::debug!(peer = %self.cuts.peer, "call cut: its request did not finish within callTimeout");
        tonic::Status::deadline_exceeded(format!(
            "the call did not finish within {} (callTimeout)",
            humantime::format_duration(self.after)
        ))
        .into_http()
    }
}

/// Where a connection's calls cut by `callTimeout` (and its Watches over the limit) are
/// counted and audited.
struct Cuts {
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
}

impl<F, H> Future for Answer<F, H>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Unpin,
    H: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            AnswerKind::Grpc(call, deadline) => match Pin::new(call).poll(cx) {
                // A request that never ends would hold its slot, busy and never evicted.
                Poll::Pending if deadline.poll_expired(cx) => Poll::Ready(Ok(deadline.cut())),
                polled => polled,
            },
            AnswerKind::Health(call) => match Pin::new(call).poll(cx) {
                Poll::Ready(Ok(response)) => {
                    let busy = this.in_flight.take();
                    let watch = this.watch.take();
                    Poll::Ready(Ok(response.map(|body| {
                        tonic::body::Body::new(BusyBody {
                            body,
                            _busy: busy,
                            _watch: watch,
                        })
                    })))
                }
                other => other,
            },
            AnswerKind::Refused(response) => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
        };
        if polled.is_ready() {
            this.in_flight = None;
            this.answering = None;
            this.watch = None;
        }
        polled
    }
}

/// A streamed answer's body, keeping its connection busy (and a Watch its place) until it
/// ends.
struct BusyBody {
    body: tonic::body::Body,
    _busy: Option<Busy>,
    _watch: Option<OwnedSemaphorePermit>,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Accepts a connection without registering it with the runtime yet: one refused at once
/// costs the server an `accept4` and a `close`, not an epoll registration as well.
async fn accept(
    tcp: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = tcp.readable().await?;
        if let Ok(accepted) = ready.try_io(|tcp| tcp.get_ref().accept()) {
            return accepted;
        }
    }
}

/// Closes a connection refused at accept with a reset rather than a FIN: the socket is freed
/// at once, and a flood leaves no TIME_WAIT behind.
fn reset(socket: std::net::TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
}

/// Makes closing a served connection reset it, as [`reset`] does for a refused one.
fn reset_stream(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// The listening socket as [`Listener`] accepts from it.
#[allow(unsafe_code)]
pub fn accepting(tcp: tokio::net::TcpListener) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    let tcp = tcp.into_std()?;
    // SAFETY: the std listener owns its descriptor, and the AsyncFd owns the listener: the
    // descriptor stays open, and is not replaced, for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(tcp, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// The address a connection is filtered and counted by: an IPv4 peer of a dual-stack socket
/// (`::ffff:a.b.c.d`) is the IPv4 address it is, so that it has one share, not two.
fn address_of(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// Whether a connection from `ip` may be served at all; `None`: from anywhere.
fn allowed(networks: Option<&Networks>, ip: IpAddr) -> bool {
    networks.is_none_or(|networks| networks.contains(ip))
}

/// Resolves once shutdown is signalled (at once if it already was).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_peers_of_a_dual_stack_socket_are_filtered_and_counted_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        let plain: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(address_of(mapped), address_of(plain));
        assert_eq!(address_of(mapped).to_string(), "127.0.0.1");
        let loopback = Networks::parse(&["127.0.0.1/32"]).unwrap();
        assert!(allowed(Some(&loopback), address_of(mapped)));
        let outsider: SocketAddr = "[::ffff:127.0.0.2]:40002".parse().unwrap();
        assert!(!allowed(Some(&loopback), address_of(outsider)));
        let v6 = Networks::parse(&["::ffff:127.0.0.0/104"]).unwrap();
        assert!(
            !allowed(Some(&v6), address_of(mapped)),
            "a mapped address is matched as IPv4, by IPv4 networks"
        );
        assert!(allowed(None, address_of(outsider)), "no allow-list: anyone");
    }
}
