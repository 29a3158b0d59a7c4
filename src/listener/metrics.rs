//! The optional metrics listener, on an address of its own (`metricsAddress`) so that it can
//! stay off the nodes' network: `GET /metrics` for Prometheus, and gRPC health `Check` in
//! plain HTTP/2 for probes that cannot speak TLS (the kubelet's). Bounded like the KMS
//! listener, so that no one who reaches it can starve the KMS port or fill the memory.

use super::call::{HEALTH_PATH, WATCH_PATH};
use super::{Health, stopped};
use crate::locking::lock;
use crate::metrics::Metrics;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tonic::codegen::Service;

/// Connections served at once: a scraper needs one or two, a few Prometheus replicas a
/// handful. Counted in the file descriptors the KMS listener leaves free
/// ([`FILE_RESERVE`](super::limits::FILE_RESERVE)), so metrics can never starve it.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections one address may hold at once, so that one client cannot take them all.
const MAX_CONNECTIONS_PER_ADDRESS: usize = 4;
/// A scrape's request head is a few hundred bytes.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// A scraper sends its request at once.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A scrape or a health check is one small request; a client that holds the connection
/// longer gets dropped.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves scrapes and health checks until shutdown.
pub async fn serve(
    tcp: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    // HTTP/1 for scrapes, HTTP/2 without TLS (prior knowledge) for gRPC health checks.
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    http.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONNECTIONS_PER_ADDRESS as u32);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        // Over a cap, the connection is closed at once (dropped), so that it holds nothing.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let Some(held) = AddressHold::take(&per_address, peer.ip().to_canonical()) else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let health = health.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let path = request.uri().path();
                let (watch, check) = (path == WATCH_PATH, path.starts_with(HEALTH_PATH));
                if watch {
                    // A stream would outlive SCRAPE_TIMEOUT; the KMS port serves it.
                    Answer::Ready(Some(
                        tonic::Status::unimplemented(
                            "only health Check is served here; Watch is on the KMS port",
                        )
                        .into_http(),
                    ))
                } else if check {
                    Answer::Health(health.clone().call(request))
                } else {
                    Answer::Ready(Some(answer(&metrics, &request).map(tonic::body::Body::new)))
                }
            });
            let connection = http.serve_connection(TokioIo::new(socket), service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, connection).await;
            drop((slot, held));
        });
    }
}

/// The health service's answer, or one ready at once.
enum Answer {
    Health(<Health as Service<http::Request<Incoming>>>::Future),
    Ready(Option<http::Response<tonic::body::Body>>),
}

impl Future for Answer {
    type Output = Result<http::Response<tonic::body::Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Health(future) => future.as_mut().poll(cx),
            Answer::Ready(response) => Poll::Ready(Ok(response
                .take()
                .expect("an answer is polled once it is ready"))),
        }
    }
}

/// One of an address's [`MAX_CONNECTIONS_PER_ADDRESS`], given back when dropped.
struct AddressHold {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressHold {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<AddressHold> {
        let mut held = lock(counts);
        let count = held.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(AddressHold {
            counts: Arc::clone(counts),
            ip,
        })
    }
}

impl Drop for AddressHold {
    fn drop(&mut self) {
        let mut held = lock(&self.counts);
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

fn answer(metrics: &Metrics, request: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        let mut response =
            http::Response::new(Full::new(Bytes::from_static(b"only GET and HEAD\n")));
        *response.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    if request.uri().path() != "/metrics" {
        let mut response =
            http::Response::new(Full::new(Bytes::from_static(b"metrics are at /metrics\n")));
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        return response;
    }
    let openmetrics = request
        .headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (
            metrics.encode_openmetrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            metrics.encode_prometheus_text(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
