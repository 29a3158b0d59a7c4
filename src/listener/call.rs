//! One call's way through a connection: the peer address attached, the connection marked
//! busy while the call is in flight, `callTimeout`, the bound on health Watches, and the
//! executor that answers a call in the poll that reads it.

use super::busy_time::Outcome;
use super::shedding::{self, AnswerTimes};
use super::slots::{Busy, Slot};
use super::write_batch::{Answering, Unanswered};
use super::{Grpc, Health};
use crate::audit::{self, Action, AuditLog, Event};
use crate::metrics::Metrics;
use crate::service::Peer;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::Service;

pub(super) const HEALTH_PATH: &str = "/grpc.health.v1.Health/";
pub(super) const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// Health `Watch` streams served at once, server-wide. Each holds its connection busy (never
/// closed for a node) while it lasts, so without a bound a few addresses could hold every
/// slot; monitoring needs a handful.
pub const MAX_WATCHES: usize = 64;

/// hyper's executor for request futures: polls each once at once, inside the connection's
/// poll, so that a call answered without waiting (every unseal) is written in the same
/// batch as the frames that carried it; only a future that must wait (a seal awaiting its
/// commit) becomes a task of its own.
#[derive(Clone, Copy)]
pub(super) struct InlineFirst;

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
pub(super) struct WithPeer {
    pub(super) inner: Grpc,
    pub(super) health: Health,
    pub(super) peer: Peer,
    pub(super) slot: Arc<Slot>,
    pub(super) unanswered: Unanswered,
    pub(super) watches: Arc<Semaphore>,
    pub(super) call_timeout: Duration,
    pub(super) cuts: Arc<Cuts>,
    pub(super) answer_times: Arc<AnswerTimes>,
    /// How this connection's calls went, for its CPU time's metric.
    pub(super) outcome: Arc<Outcome>,
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
            let given = shedding::grpc_timeout(request.headers());
            match (action, given) {
                (Some(action), Some(given))
                    if given <= self.answer_times.expected(action == Action::Seal) =>
                {
                    AnswerKind::Refused(Some(self.cuts.shed(action, given)))
                }
                _ => {
                    request.extensions_mut().insert(self.peer);
                    let deadline = Deadline {
                        after: self.call_timeout,
                        timer: None,
                        action,
                        cuts: Arc::clone(&self.cuts),
                    };
                    AnswerKind::Grpc(self.inner.call(request), deadline)
                }
            }
        };
        let timed = match &kind {
            AnswerKind::Grpc(_, Deadline { action, .. }) => action.map(|action| Timed {
                seal: action == Action::Seal,
                began: Instant::now(),
                times: Arc::clone(&self.answer_times),
            }),
            _ => None,
        };
        Answer {
            kind,
            slot: Arc::clone(&self.slot),
            in_flight,
            answering: Some(self.unanswered.call()),
            watch,
            timed,
            outcome: Arc::clone(&self.outcome),
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
    slot: Arc<Slot>,
    in_flight: Option<Busy>,
    answering: Option<Answering>,
    /// A Watch's place among [`MAX_WATCHES`], held while its stream lasts.
    watch: Option<OwnedSemaphorePermit>,
    /// A seal's or unseal's start, for [`AnswerTimes`].
    timed: Option<Timed>,
    outcome: Arc<Outcome>,
}

struct Timed {
    seal: bool,
    began: Instant,
    times: Arc<AnswerTimes>,
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

/// Where a connection's calls cut by `callTimeout` or shed for their deadline (and its
/// Watches over the limit) are counted and audited.
pub(super) struct Cuts {
    pub(super) audit: Arc<AuditLog>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) peer: SocketAddr,
}

impl Cuts {
    /// The answer to a call whose client's deadline (`given` by its `grpc-timeout`) passes
    /// before such a call is usually answered: it is not started. UNAVAILABLE, which a
    /// node retries, as every refusal it should wait out.
    fn shed(&self, action: Action, given: Duration) -> http::Response<tonic::body::Body> {
        let reason = audit::Reason::DeadlineTooShort;
        let event = Event::unread_call(action, &crate::sealing::peer_ip_text(&self.peer))
            .refused(reason)
            .detail(format!("grpc-timeout {given:?}"));
        // The answer stands whether or not the line could be written.
        let _ = self.audit.write(&event);
        self.metrics
            .call(action.label(), "refused", reason.label(), Duration::ZERO);
        tracing::debug!(peer = %self.peer, ?given, "call not started: its deadline leaves no time to answer it");
        tonic::Status::unavailable(
            "the call's deadline (grpc-timeout) passes before it could be answered; it was not \
             started: retry with a longer deadline",
        )
        .into_http()
    }
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
        if let Poll::Ready(Ok(response)) = &polled {
            match &this.kind {
                AnswerKind::Grpc(..) => this.outcome.answered(is_ok(response)),
                AnswerKind::Refused(_) => this.outcome.answered(false),
                AnswerKind::Health(_) => {}
            }
            if !matches!(this.kind, AnswerKind::Health(_)) {
                this.slot.answered();
            }
            if let Some(timed) = this.timed.take() {
                timed.times.took(timed.seal, timed.began.elapsed());
            }
        }
        if polled.is_ready() {
            this.in_flight = None;
            this.answering = None;
            this.watch = None;
        }
        polled
    }
}

/// Whether a gRPC answer is a success: an error is a trailers-only answer, its status in
/// the headers.
fn is_ok(response: &http::Response<tonic::body::Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_none_or(|status| status == "0")
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
