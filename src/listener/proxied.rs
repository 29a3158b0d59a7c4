//! Connections through a TCP load balancer: the PROXY protocol header a trusted proxy sends
//! before TLS, read without reading past it, and what the server does with the address it
//! carries. Only in play when `trustedProxies` is set; without it no byte is read here.
//!
//! - From a trusted proxy, every connection must begin with a header (version 1 or 2); the
//!   client address it carries is then the connection's peer for everything: the seal
//!   binding, the allow-lists (checked here, before TLS), the per-address cap (the
//!   connection moves to the client's share: the proxy's own address, shared by every node
//!   behind it, is never capped), rate limits, quotas, pinning, logs and the audit trail.
//!   A LOCAL header (version 2, a load balancer's health check) or `UNKNOWN` (version 1)
//!   carries no client: as the specification says, the proxy's own address is used, and
//!   must be in the allow-lists for the connection to be served. A connection that begins
//!   otherwise, or with a malformed header, is reset.
//! - From anyone else, a connection that begins like a PROXY header is reset before TLS,
//!   and said so in the log: one peek of the first bytes, only while `trustedProxies` is set.

use super::accept::{address_of, allowed};
use super::connection::reset_stream;
use super::proxy_protocol::{self, Header, Invalid, MAX_HEADER, Parsed};
use super::refusals::{Kind, Refusals, closed_early};
use super::slots::{Room, SlotHandle};
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::policy::Networks;
use std::net::{IpAddr, SocketAddr};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub struct Proxies {
    pub trusted: Networks,
    pub connection_networks: Option<Networks>,
    pub refusals: std::sync::Arc<Refusals>,
    pub audit: std::sync::Arc<AuditLog>,
    pub metrics: std::sync::Arc<Metrics>,
}

/// What began a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Preamble {
    /// Not from a trusted proxy, and not a PROXY header: TLS, or whatever TLS will refuse.
    Direct,
    /// A trusted proxy's header: the client's address, or `None` for LOCAL and `UNKNOWN`.
    Proxied(Option<SocketAddr>),
    /// The client closed before sending a byte (a plain TCP health check).
    Left,
}

/// Why a connection is closed at its first bytes.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("a PROXY header from an address that is not a trusted proxy")]
    Untrusted,
    #[error("{0}")]
    Invalid(Invalid),
    #[error("the proxy closed the connection inside its PROXY header")]
    Truncated,
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads what begins a connection from `peer`: from a trusted proxy, its PROXY header, and
/// not a byte more; from anyone else, a peek at the first bytes.
pub async fn preamble(
    socket: &mut TcpStream,
    peer: SocketAddr,
    trusted: bool,
) -> Result<Preamble, Refused> {
    let mut bytes = [0u8; MAX_HEADER];
    if !trusted {
        let peeked = socket.peek(&mut bytes[..16]).await?;
        return if peeked == 0 {
            Ok(Preamble::Left)
        } else if proxy_protocol::looks_like_header(&bytes[..peeked]) {
            Err(Refused::Untrusted)
        } else {
            Ok(Preamble::Direct)
        };
    }
    let mut read = 0;
    // Each round reads at least one byte of the header, which is at most MAX_HEADER long.
    loop {
        let peeked = socket.peek(&mut bytes[read..]).await?;
        if peeked == 0 {
            return if read == 0 {
                Ok(Preamble::Left)
            } else {
                Err(Refused::Truncated)
            };
        }
        let available = read + peeked;
        match proxy_protocol::parse(&bytes[..available]).map_err(Refused::Invalid)? {
            Parsed::Header { header, len } => {
                // The header's bytes only; the client's that follow are left to TLS.
                socket.read_exact(&mut bytes[read..len]).await?;
                let client = match header {
                    Header::Proxy(client) => Some(client),
                    Header::Local => None,
                };
                tracing::trace!(proxy = %peer, ?client, "PROXY header read");
                return Ok(Preamble::Proxied(client));
            }
            // Every byte peeked belongs to the header: take them, and wait for more.
            Parsed::Incomplete => {
                socket.read_exact(&mut bytes[read..available]).await?;
                read = available;
            }
        }
    }
}

impl Proxies {
    /// Acts on what began a connection from `peer`: the client address to serve it as, or
    /// `None` when it is closed (said in the log and the metrics, and for an address outside
    /// the allow-lists in the audit trail).
    pub fn admit(
        &self,
        read: Result<Result<Preamble, Refused>, tokio::time::error::Elapsed>,
        socket: &TcpStream,
        peer: SocketAddr,
        slot: &SlotHandle,
    ) -> Option<SocketAddr> {
        let proxy = address_of(peer);
        let refused = |kind: Kind, problem: &dyn std::fmt::Display| {
            reset_stream(socket);
            self.metrics.connection_refused(kind.label());
            if self.refusals.record(proxy, kind) {
                tracing::warn!(peer = %proxy, %problem, "{}", kind.message());
            } else {
                tracing::debug!(peer = %proxy, %problem, "connection closed");
            }
            None
        };
        let client = match read {
            Err(elapsed) => {
                return refused(
                    Kind::ProxyInvalid,
                    &format!("no whole PROXY header: {elapsed}"),
                );
            }
            Ok(Err(Refused::Untrusted)) => {
                let problem = format!(
                    "PROXY header from {proxy}, which is not in trustedProxies: add it, or stop \
                     sending PROXY headers"
                );
                return refused(Kind::ProxyUntrusted, &problem);
            }
            Ok(Err(Refused::Io(error))) => {
                tracing::debug!(peer = %proxy, %error, "connection failed before TLS");
                return None;
            }
            Ok(Err(problem)) => return refused(Kind::ProxyInvalid, &problem),
            Ok(Ok(Preamble::Left)) => {
                tracing::debug!(peer = %proxy, "client left before sending a byte");
                return None;
            }
            Ok(Ok(Preamble::Direct)) => return Some(peer),
            Ok(Ok(Preamble::Proxied(carried))) => carried,
        };
        let local = client.is_none();
        let client = client.unwrap_or(peer);
        let ip: IpAddr = address_of(client);
        let via = Some(proxy);
        if !allowed(self.connection_networks.as_ref(), ip) {
            reset_stream(socket);
            self.metrics.connection_refused("network");
            closed_early(&self.refusals, &self.audit, ip, Kind::Network, via);
            return None;
        }
        if local {
            // LOCAL or UNKNOWN: the proxy's own connection, not capped per address.
            return Some(client);
        }
        match slot.move_to(ip) {
            Room::Free => {}
            Room::EvictedOwn => {
                self.metrics.connection_dropped("per_address");
                closed_early(&self.refusals, &self.audit, ip, Kind::PerAddress, via);
            }
            Room::None => {
                reset_stream(socket);
                self.metrics.connection_refused("per_address");
                closed_early(&self.refusals, &self.audit, ip, Kind::PerAddress, via);
                return None;
            }
        }
        Some(client)
    }
}
