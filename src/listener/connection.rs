//! One connection's life: its PROXY header when from a trusted proxy, the TLS handshake
//! (its costly step a few connections at a time), then HTTP/2 until it closes.

use super::busy_time::Outcome;
use super::call::{Cuts, InlineFirst, WithPeer};
use super::handshake_failures::Reason;
use super::refusals::{self, Kind};
use super::shedding::{AnswerTimes, HandshakeQueue};
use super::slots::{Busy, Closed, Slot, SlotHandle};
use super::write_batch::{self, Hold, Unanswered};
use super::{Grpc, HandshakeFailures, Health, ListenerLimits, Refusals, proxied, stopped};
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::service::Peer;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

/// HTTP/2's initial flow-control window (RFC 9113 §6.9.2).
const SPEC_WINDOW_SIZE: u32 = 65_535;
/// How long a closing connection is kept after its last call is answered, for the answer
/// to be written out (a call is counted in flight until its answer is ready, not sent).
const FLUSH_GRACE: Duration = Duration::from_millis(100);

pub(super) struct Handler {
    /// The client: the TCP peer, or the address a trusted proxy's PROXY header carried.
    pub(super) peer: SocketAddr,
    pub(super) slot: SlotHandle,
    /// Set when `trustedProxies` is, with whether this connection comes from one.
    pub(super) proxies: Option<(Arc<proxied::Proxies>, bool)>,
    pub(super) tls: TlsAcceptor,
    pub(super) handshakes: Arc<Semaphore>,
    pub(super) handshake_queue: Arc<HandshakeQueue>,
    pub(super) answer_times: Arc<AnswerTimes>,
    pub(super) outcome: Arc<Outcome>,
    pub(super) refusals: Arc<Refusals>,
    pub(super) handshake_failures: Arc<HandshakeFailures>,
    pub(super) limits: ListenerLimits,
    pub(super) grpc: Grpc,
    pub(super) health: Health,
    pub(super) watches: Arc<Semaphore>,
    pub(super) audit: Arc<AuditLog>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) _finished: mpsc::Sender<()>,
}

impl Handler {
    pub(super) async fn run(mut self, mut socket: TcpStream, first_look: Busy) {
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
        let queue = Queue {
            turns: &self.handshakes,
            places: &self.handshake_queue,
            deadline,
        };
        let handshaking = handshake(socket, &self.tls, queue, &self.slot, first_look);
        let tls = tokio::select! {
            result = tokio::time::timeout_at(deadline, handshaking) => match result {
                Ok(Ok(Handshake::Done(tls))) => tls,
                Ok(Ok(Handshake::ClientLeft)) => {
                    tracing::debug!(peer = %self.peer, "client left before its handshake began");
                    return;
                }
                Ok(Ok(Handshake::Shed)) => {
                    self.metrics.connection_refused(Kind::Queue.label());
                    refusals::closed_early(&self.refusals, &self.audit, self.peer.ip(), Kind::Queue, None);
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
            answer_times: self.answer_times,
            outcome: self.outcome,
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
/// A connection that would wait in that queue past its deadline (its client's patience,
/// `handshakeTimeout` from its accept) is refused at once with a reset, before the costly
/// step: its node retries sooner than if it had waited out its own deadline, and the
/// turn goes to one that can still succeed.
///
/// The slot is busy while the server owes work (reading what arrived, queueing for and
/// computing its flight) and waiting on the client otherwise; see [`slots`].
async fn handshake(
    socket: TcpStream,
    tls: &TlsAcceptor,
    queue: Queue<'_>,
    slot: &Arc<Slot>,
    first_look: Busy,
) -> std::io::Result<Handshake> {
    let hello = busy_until_waiting(
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), socket),
        first_look,
    )
    .await?;
    let computing = slot.busy();
    if tokio::time::Instant::now() + queue.places.expected_wait() > queue.deadline {
        reset_stream(&hello.io);
        return Ok(Handshake::Shed);
    }
    let place = queue.places.join();
    let turn = queue
        .turns
        .acquire()
        .await
        .map_err(|_| std::io::Error::other("the server is stopping"))?;
    place.served();
    if client_left(&hello.io) {
        return Ok(Handshake::ClientLeft);
    }
    let accept = hello.into_stream(Arc::clone(tls.config()));
    drop(turn);
    slot.paid();
    busy_until_waiting(accept, computing)
        .await
        .map(Handshake::Done)
}

/// The turns at the costly step of a handshake, and the connection's deadline.
struct Queue<'a> {
    turns: &'a Semaphore,
    places: &'a HandshakeQueue,
    deadline: tokio::time::Instant,
}

// Made once per connection and taken apart at once: boxing the stream would cost an
// allocation per connection for nothing.
#[allow(clippy::large_enum_variant)]
enum Handshake {
    Done(TlsStream<TcpStream>),
    /// The client closed its connection while it waited.
    ClientLeft,
    /// Refused: it would have waited past its deadline.
    Shed,
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

/// Makes closing a served connection reset it, as [`reset`] does for a refused one.
pub(super) fn reset_stream(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}
