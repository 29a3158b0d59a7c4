//! Wires a listener, the service and a store into a running server, and stops it cleanly.

use crate::listener::{Listener, MAX_CONNECTIONS};
use crate::policy::Policy;
use crate::service::KmsService;
use crate::store::{Store, StoreError};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

/// How long shutdown waits for calls in flight: a Talos call's whole deadline.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Deep accept queue: a reboot storm arrives all at once.
const ACCEPT_BACKLOG: i32 = 4096;

pub struct ServerOptions {
    pub bind: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub store: Arc<dyn Store>,
    pub policy: Policy,
}

pub struct RunningServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    listener: JoinHandle<()>,
    finished: mpsc::Receiver<()>,
    store: Arc<dyn Store>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds and starts serving; returns once the port accepts connections.
pub fn start(options: ServerOptions) -> Result<RunningServer, ServerError> {
    let bind_error = |source| ServerError::Bind {
        addr: options.bind,
        source,
    };
    let tcp = bind(options.bind).map_err(bind_error)?;
    let local_addr = tcp.local_addr().map_err(bind_error)?;
    let (stop, shutdown) = watch::channel(false);
    let (finished_sender, finished) = mpsc::channel(1);
    let listener = Listener {
        tcp,
        tls: tokio_rustls::TlsAcceptor::from(options.tls),
        service: Arc::new(KmsService::new(Arc::clone(&options.store), options.policy)),
        limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        handshakes: Arc::new(Semaphore::new(handshakes_at_once())),
        shutdown,
        finished: finished_sender,
    };
    Ok(RunningServer {
        local_addr,
        stop,
        listener: tokio::spawn(listener.run()),
        finished,
        store: options.store,
    })
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets calls in flight finish (bounded by a Talos call's deadline),
    /// then flushes the store.
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        let _ = self.stop.send(true);
        let _ = self.listener.await;
        if tokio::time::timeout(DRAIN_TIMEOUT, self.finished.recv())
            .await
            .is_err()
        {
            tracing::warn!("calls still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
        }
        self.store.flush().await
    }
}

/// Enough first flights computed at once to keep every core busy, and no more: beyond that,
/// more only slows each other down (see `listener::handshake`).
fn handshakes_at_once() -> usize {
    std::thread::available_parallelism().map_or(2, |cores| 2 * cores.get())
}

/// A listening socket; `[::]` also accepts IPv4 (dual stack) whatever the system default.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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
