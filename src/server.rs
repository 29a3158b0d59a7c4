//! Wires a listener, the service and a store into a running server, and stops it cleanly.

use crate::audit::{AuditError, AuditLog};
use crate::listener::{Listener, ListenerLimits, Serving, stopped};
use crate::metrics::Metrics;
use crate::os_error;
use crate::policy::{Policy, Rules};
use crate::proto::KMSServiceServer;
use crate::sealing::foreign::TakeOver;
use crate::service::KmsService;
use crate::store::{ApprovalState, Store, StoreError};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// How long shutdown waits for calls in flight: a Talos call's whole deadline.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the store's health is asked: a load balancer's check sees a change this soon.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const RECORD_COUNT_INTERVAL: Duration = Duration::from_secs(30);
/// How long an unseal's audit line may stay in the page cache only.
const AUDIT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
const POLICY_TIDY_INTERVAL: Duration = Duration::from_secs(60);
/// Deep accept queue: a reboot storm arrives all at once.
const ACCEPT_BACKLOG: i32 = 4096;

pub struct ServerOptions {
    pub tls: Arc<rustls::ServerConfig>,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// Where Prometheus scrapes the metrics, when the operator asked for it.
    pub metrics_port: Option<Port>,
    /// Who may seal and unseal; connections from outside both allow-lists are closed
    /// before TLS (and audited).
    pub rules: Rules,
    /// `maxConnections` is lowered at start when the open-file limit cannot hold it.
    pub limits: ListenerLimits,
    /// Keys of the servers taken over (`takeOver`), whose blobs Unseal also opens.
    pub take_over: Arc<TakeOver>,
}

pub struct RunningServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    listener: JoinHandle<()>,
    finished: mpsc::Receiver<()>,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The OS error is part of the sentence, so it is not chained as a source too.
    #[error("cannot listen on {addr} ({purpose}): {problem}")]
    Bind {
        addr: SocketAddr,
        purpose: Purpose,
        problem: String,
    },
}

/// What a port is for, so that a failure to listen names the config key to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `bindAddress` and `port`.
    Kms,
    /// `metricsAddress`.
    Metrics,
}

impl Purpose {
    /// The config keys that set the port and the address.
    fn keys(self) -> (&'static str, &'static str) {
        match self {
            Purpose::Kms => ("port", "bindAddress"),
            Purpose::Metrics => ("metricsAddress", "metricsAddress"),
        }
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Purpose::Kms => "the KMS port",
            Purpose::Metrics => "the metrics port, `metricsAddress`",
        })
    }
}

/// A bound port, not yet served: binding comes before anything is written to disk, so a
/// start that fails here leaves nothing behind.
pub struct Port {
    tcp: TcpListener,
    local_addr: SocketAddr,
}

/// Binds the listening socket.
pub fn bind(addr: SocketAddr, purpose: Purpose) -> Result<Port, ServerError> {
    let bind_error = |source: std::io::Error| ServerError::Bind {
        addr,
        purpose,
        problem: describe_bind_error(addr, purpose, &source),
    };
    let tcp = listen(addr).map_err(bind_error)?;
    let local_addr = tcp.local_addr().map_err(bind_error)?;
    Ok(Port { tcp, local_addr })
}

/// Binds and starts serving; returns once the port accepts connections.
pub fn start(bind_addr: SocketAddr, options: ServerOptions) -> Result<RunningServer, ServerError> {
    bind(bind_addr, Purpose::Kms)?.serve(options)
}

impl Port {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts serving on the port.
    pub fn serve(self, options: ServerOptions) -> Result<RunningServer, ServerError> {
        let addr = self.local_addr;
        let tcp = crate::listener::accepting(self.tcp).map_err(|error| ServerError::Bind {
            addr,
            purpose: Purpose::Kms,
            problem: os_error::plain(&error),
        })?;
        let (stop, shutdown) = watch::channel(false);
        let reporter = HealthReporter::new();
        let health = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        // Nothing is accepted until health is known: a sealed store is never SERVING, even
        // for the first milliseconds.
        let (health_known, known) = watch::channel(false);
        let after_health = |known: watch::Receiver<bool>| async move {
            let mut known = known;
            let _ = known.wait_for(|known| *known).await;
        };
        if let Some(port) = options.metrics_port {
            tracing::info!(
                address = %port.local_addr,
                "serving metrics at /metrics, and gRPC health checking without TLS"
            );
            let serve = crate::listener::metrics::serve(
                port.tcp,
                Arc::clone(&options.metrics),
                health.clone(),
                stop.subscribe(),
            );
            let known = after_health(known.clone());
            tokio::spawn(async move {
                known.await;
                serve.await
            });
        }
        tokio::spawn(watch_store(
            Arc::clone(&options.store),
            Arc::clone(&options.audit),
            reporter,
            Arc::clone(&options.metrics),
            stop.subscribe(),
            health_known,
        ));
        let (finished_sender, finished) = mpsc::channel(1);
        let limits = options.limits.fit_to_file_limit();
        let connection_networks = options.rules.connection_networks();
        let policy = Arc::new(Policy::new(options.rules, Arc::clone(&options.store)));
        tokio::spawn(tidy_policy(Arc::clone(&policy), stop.subscribe()));
        let serving = Serving {
            tls: tokio_rustls::TlsAcceptor::from(options.tls),
            service: Arc::new(KmsService::new(
                Arc::clone(&options.store),
                Arc::clone(&options.audit),
                Arc::clone(&options.metrics),
                policy,
                options.take_over,
            )),
            health,
            metrics: Arc::clone(&options.metrics),
            audit: Arc::clone(&options.audit),
            shutdown,
            finished: finished_sender,
        };
        let listener = Listener::new(tcp, limits, connection_networks, serving);
        tokio::spawn(sync_audit_trail(
            Arc::clone(&options.audit),
            stop.subscribe(),
        ));
        Ok(RunningServer {
            local_addr: addr,
            stop,
            listener: tokio::spawn({
                let known = after_health(known);
                async move {
                    known.await;
                    listener.run().await
                }
            }),
            finished,
            store: options.store,
            audit: options.audit,
        })
    }
}

/// The OS's words, and what to do about the usual causes.
pub fn describe_bind_error(addr: SocketAddr, purpose: Purpose, error: &std::io::Error) -> String {
    let (port_key, address_key) = purpose.keys();
    let fix = match error.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            " (another process listens there: is the server already running? \
             `ss -ltnp` shows who; or choose another port in `{port_key}`)"
        ),
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            " (ports below 1024 need the CAP_NET_BIND_SERVICE capability, e.g. \
             `AmbientCapabilities=CAP_NET_BIND_SERVICE` in the systemd unit; or choose a port \
             above 1023 in `{port_key}`)"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            " (no interface of this host has that address: check `{address_key}`, or use \
             0.0.0.0 or ::)"
        ),
        _ => String::new(),
    };
    format!("{}{fix}", os_error::plain(error))
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets calls in flight finish (bounded by a Talos call's deadline),
    /// then flushes the store and the audit trail.
    pub async fn shutdown(mut self) -> Result<(), ShutdownError> {
        let _ = self.stop.send(true);
        let _ = self.listener.await;
        if tokio::time::timeout(DRAIN_TIMEOUT, self.finished.recv())
            .await
            .is_err()
        {
            tracing::warn!("calls still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
        }
        self.store.close().await?;
        let audit = Arc::clone(&self.audit);
        tokio::task::spawn_blocking(move || audit.stop())
            .await
            .unwrap_or_else(|e| {
                Err(AuditError {
                    path: self.audit.path().display().to_string(),
                    problem: e.to_string(),
                })
            })?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// Reports the store's health through gRPC health checking and the metrics: SERVING while
/// it answers and the audit trail can be written, NOT_SERVING while calls would get
/// UNAVAILABLE, and NOT_SERVING at shutdown.
async fn watch_store(
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    reporter: HealthReporter,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    health_known: watch::Sender<bool>,
) {
    let mut ticks = tokio::time::interval(HEALTH_INTERVAL);
    let mut last_count = None::<tokio::time::Instant>;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped(&mut stop) => {
                set_health(&reporter, ServingStatus::NotServing).await;
                return;
            }
        }
        let up = store.health().await.is_ok();
        set_health(
            &reporter,
            if up && audit.writable() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        )
        .await;
        health_known.send_replace(true);
        // Counting a million records is a scan: not at every tick.
        let records = if up && last_count.is_none_or(|at| at.elapsed() >= RECORD_COUNT_INTERVAL) {
            last_count = Some(tokio::time::Instant::now());
            store.count().await.ok()
        } else {
            None
        };
        // A small table: the operator should learn at once that a node waits.
        let pending = if up {
            store
                .approvals(Some(ApprovalState::Pending))
                .await
                .ok()
                .map(|pending| pending.len())
        } else {
            None
        };
        metrics.store(up, records, pending);
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    // "" is the server as a whole, as health checkers ask by default.
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(<KMSServiceServer<KmsService> as NamedService>::NAME, status)
        .await;
}

/// Unseals only write their audit lines; this makes them durable within a second, and
/// covers them with a checkpoint within a minute.
async fn sync_audit_trail(audit: Arc<AuditLog>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(AUDIT_SYNC_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let due = Arc::clone(&audit);
                let _ = tokio::task::spawn_blocking(move || due.checkpoint_if_due()).await;
                let _ = audit.sync().await;
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Drops the policy's memory of quiet callers once a minute.
async fn tidy_policy(policy: Arc<Policy>, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(POLICY_TIDY_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => policy.tidy(),
            _ = stopped(&mut stop) => return,
        }
    }
}

/// A listening socket; `[::]` also accepts IPv4 (dual stack) whatever the system default.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    TcpListener::from_std(socket.into())
}
