//! The accept loop: who is let in, and a slot for each connection it spawns a handler for.

use super::busy_time::{self, Outcome};
use super::call::MAX_WATCHES;
use super::connection::Handler;
use super::handshake_failures::SUMMARY_INTERVAL;
use super::refusals::{self, Kind};
use super::shedding::{AnswerTimes, HandshakeQueue};
use super::slots::{Eviction, Registered, Room};
use super::{HandshakeFailures, Health, ListenerLimits, Refusals, Slots, proxied, stopped};
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::policy::Networks;
use crate::proto::KMSServiceServer;
use crate::service::KmsService;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;

const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// How often a listener waiting for a slot looks again for a connection to close: one that
/// was busy may be waiting on its client by now.
const EVICTION_RETRY: Duration = Duration::from_millis(100);

pub struct Listener {
    /// The listening socket, accepted from directly: see [`accept`].
    tcp: AsyncFd<std::net::TcpListener>,
    tls: TlsAcceptor,
    service: Arc<KmsService>,
    limit: Arc<Semaphore>,
    /// Who holds the slots `limit` counts, and which may be taken back.
    slots: Arc<Slots>,
    /// Handshakes computing their first flight at once; see `connection.rs`.
    handshakes: Arc<Semaphore>,
    /// Who waits for `handshakes`, and how long a place in that queue lasts.
    handshake_queue: Arc<HandshakeQueue>,
    answer_times: Arc<AnswerTimes>,
    handshake_failures: Arc<HandshakeFailures>,
    refusals: Arc<Refusals>,
    limits: ListenerLimits,
    /// Where connections may come from at all; `None`: anywhere.
    connection_networks: Option<Networks>,
    /// `trustedProxies`: load balancers whose connections begin with a PROXY header
    /// carrying the client's address. Empty: no header is ever read.
    trusted_proxies: Networks,
    health: Health,
    metrics: Arc<Metrics>,
    /// For connections refused by the allow-list.
    audit: Arc<AuditLog>,
    shutdown: watch::Receiver<bool>,
    finished: mpsc::Sender<()>,
}

/// What the server gives a listener to serve with.
pub struct Serving {
    pub tls: TlsAcceptor,
    pub service: Arc<KmsService>,
    pub health: Health,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub shutdown: watch::Receiver<bool>,
    /// Dropped by the listener and every handler once done: the server waits for that.
    pub finished: mpsc::Sender<()>,
}

impl Listener {
    /// A listener on `tcp`, within `limits`, for connections from `connection_networks`
    /// (`None`: from anywhere).
    pub fn new(
        tcp: AsyncFd<std::net::TcpListener>,
        mut limits: ListenerLimits,
        connection_networks: Option<Networks>,
        serving: Serving,
    ) -> Listener {
        // Kept by the listener, not copied into every connection's limits.
        let trusted_proxies = std::mem::take(&mut limits.trusted_proxies);
        Listener {
            tcp,
            tls: serving.tls,
            service: serving.service,
            limit: Arc::new(Semaphore::new(limits.max_connections)),
            slots: Arc::new(Slots::new(
                limits.max_connections_per_address,
                limits.idle_timeout,
            )),
            handshakes: Arc::new(Semaphore::new(limits.handshakes_at_once())),
            handshake_queue: Arc::default(),
            answer_times: Arc::default(),
            handshake_failures: Arc::default(),
            refusals: Arc::default(),
            limits,
            connection_networks,
            trusted_proxies,
            health: serving.health,
            metrics: serving.metrics,
            audit: serving.audit,
            shutdown: serving.shutdown,
            finished: serving.finished,
        }
    }
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
            let outcome = Arc::new(Outcome::default());
            let handler = Handler {
                peer,
                slot,
                proxies: proxies.as_ref().map(|p| (Arc::clone(p), from_proxy)),
                tls: self.tls.clone(),
                handshakes: Arc::clone(&self.handshakes),
                handshake_queue: Arc::clone(&self.handshake_queue),
                answer_times: Arc::clone(&self.answer_times),
                outcome: Arc::clone(&outcome),
                refusals: Arc::clone(&self.refusals),
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
                let run = std::pin::pin!(handler.run(socket, first_look));
                busy_time::measured(run, &outcome, &metrics).await;
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
        refusals::closed_early(&self.refusals, &self.audit, ip, kind, None);
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
pub(super) fn address_of(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// Whether a connection from `ip` may be served at all; `None`: from anywhere.
pub(super) fn allowed(networks: Option<&Networks>, ip: IpAddr) -> bool {
    networks.is_none_or(|networks| networks.contains(ip))
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
