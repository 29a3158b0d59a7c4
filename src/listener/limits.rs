//! The listener's limits, from the config file; the defaults are the values the server
//! was measured and tested with.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once. Bounds memory and file descriptors, and keeps a handshake
    /// storm from starving calls already past their handshake. When all are taken, one
    /// waiting on its client is closed to admit a new one (see `slots`); if every one is
    /// busy, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections one address may hold at once, so that one client cannot take every slot;
    /// beyond it the address's own longest-waiting connection is closed (see `slots`).
    pub max_connections_per_address: usize,
    /// Handshakes computing their first flight at once (see `handshake`); `None`: two per
    /// core, enough to keep every core busy and no more: beyond that, more only slow each
    /// other down.
    pub max_handshakes_at_once: Option<usize>,
    /// Talos gives each call 10 s; a handshake that takes longer serves no one.
    pub handshake_timeout: Duration,
    /// How long a connection may wait on its client with no call in flight: for its
    /// ClientHello, for the rest of its handshake, for a request. A Talos call arrives right
    /// after its handshake, so a connection silent for longer is holding a slot.
    pub idle_timeout: Duration,
    /// A connection still open after this is asked to close (HTTP/2 GOAWAY; calls in flight
    /// finish), whatever it does.
    pub max_connection_age: Duration,
    /// A seal or unseal still unanswered after this is answered DEADLINE_EXCEEDED: a node
    /// gives up sooner and the store answers within 10 s, so only a request its client never
    /// finishes sending takes longer, holding a slot no one may take back.
    pub call_timeout: Duration,
    /// Talos makes one call per connection; clients that share one (`bench`, tools) get
    /// room for concurrency, as grpc-go servers give them.
    pub max_streams_per_connection: u32,
    /// Bytes of HTTP/2 headers one request may carry; a gRPC call needs a few hundred.
    pub max_header_list_size: u32,
    /// The gRPC message limit: far above any valid request, far below tonic's 4 MiB default.
    pub max_message_size: usize,
    /// `trustedProxies`: load balancers whose connections begin with a PROXY protocol
    /// header carrying the client's address (see `proxied`). Empty: no header is read.
    pub trusted_proxies: crate::policy::Networks,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_address: 128,
            max_handshakes_at_once: None,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(300),
            call_timeout: Duration::from_secs(30),
            max_streams_per_connection: 128,
            max_header_list_size: 16 * 1024,
            max_message_size: 4096,
            trusted_proxies: crate::policy::Networks::default(),
        }
    }
}

/// File descriptors kept for everything but KMS connections: the listening sockets, the
/// database and its WAL, the audit trail, the runtime's own, and the metrics listener's
/// connections.
pub const FILE_RESERVE: u64 = 64 + super::metrics::MAX_CONNECTIONS as u64;

impl ListenerLimits {
    pub fn handshakes_at_once(&self) -> usize {
        self.max_handshakes_at_once.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, |cores| 2 * cores.get())
        })
    }

    /// Raises this process's open-file limit to its hard limit, and serves fewer connections
    /// than `maxConnections` when even that cannot hold them: a server out of descriptors
    /// cannot accept at all, and a few hundred silent sockets would lock every node out.
    pub fn fit_to_file_limit(mut self) -> Self {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let mut files = limit.current;
        if limit.current != limit.maximum {
            let raised = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => files = limit.maximum,
                Err(error) => tracing::debug!(%error, "cannot raise the open-file limit"),
            }
        }
        let Some(files) = files else {
            return self;
        };
        let fitting = connections_within(files);
        if fitting < self.max_connections {
            tracing::warn!(
                max_connections = self.max_connections,
                open_files = files,
                serving = fitting,
                "maxConnections needs more open files than this process may have: serving at \
                 most {fitting} connections at once; raise the limit (LimitNOFILE= in the \
                 systemd unit, `ulimit -n` elsewhere) to at least {}, or lower maxConnections",
                self.max_connections as u64 + FILE_RESERVE
            );
            self.max_connections = fitting;
        }
        self
    }
}

/// Connections that fit in `files` open files, the reserve kept.
fn connections_within(files: u64) -> usize {
    usize::try_from(files.saturating_sub(FILE_RESERVE).max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_a_reserve_of_files() {
        assert_eq!(connections_within(1024), 944);
        assert_eq!(connections_within(16384), 16304);
        assert_eq!(connections_within(10), 1, "one connection at least");
    }

    #[test]
    fn the_file_limit_is_raised_and_enough_connections_are_left_alone() {
        let limits = ListenerLimits {
            max_connections: 16,
            ..ListenerLimits::default()
        }
        .fit_to_file_limit();
        assert_eq!(limits.max_connections, 16);
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(limit.current, limit.maximum, "soft raised to hard");
    }
}
