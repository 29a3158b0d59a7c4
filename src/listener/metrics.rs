//! The optional metrics listener, on an address of its own (`metricsAddress`) so that it can
//! stay off the nodes' network: `GET /metrics` for Prometheus, and gRPC health `Check` in
//! plain HTTP/2 for probes that cannot speak TLS (the kubelet's).

use super::{HEALTH_PATH, Health, WATCH_PATH, stopped};
use crate::metrics::Metrics;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codegen::Service;

/// A scrape or a health check is one small request; a client that holds the connection
/// longer gets dropped.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves scrapes and health checks until shutdown.
pub async fn serve(
    tcp: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (socket, _) = tokio::select! {
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
        let metrics = Arc::clone(&metrics);
        let health = health.clone();
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
            // HTTP/1 for scrapes, HTTP/2 without TLS (prior knowledge) for gRPC.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, connection).await;
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

fn answer(metrics: &Metrics, request: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
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
