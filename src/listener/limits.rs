//! The listener's limits, from the config file; the defaults are the values the server
//! was measured and tested with.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once; more wait in the kernel's accept queue. Bounds memory and
    /// keeps a handshake storm from starving calls already past their handshake.
    pub max_connections: usize,
    /// Connections one address may hold at once, so that one client cannot take every slot.
    pub max_connections_per_address: usize,
    /// Handshakes computing their first flight at once (see `handshake`); `None`: two per
    /// core, enough to keep every core busy and no more: beyond that, more only slow each
    /// other down.
    pub max_handshakes_at_once: Option<usize>,
    /// Talos gives each call 10 s; a handshake that takes longer serves no one.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open with no call in flight. A Talos call arrives
    /// right after its handshake, so a connection silent for longer is holding a slot.
    pub idle_timeout: Duration,
    /// A connection still open after this is asked to close (HTTP/2 GOAWAY; calls in flight
    /// finish), whatever it does.
    pub max_connection_age: Duration,
    /// Talos makes one call per connection; clients that share one (`bench`, tools) get
    /// room for concurrency, as grpc-go servers give them.
    pub max_streams_per_connection: u32,
    /// Bytes of HTTP/2 headers one request may carry; a gRPC call needs a few hundred.
    pub max_header_list_size: u32,
    /// The gRPC message limit: far above any valid request, far below tonic's 4 MiB default.
    pub max_message_size: usize,
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
            max_streams_per_connection: 128,
            max_header_list_size: 16 * 1024,
            max_message_size: 4096,
        }
    }
}

impl ListenerLimits {
    pub fn handshakes_at_once(&self) -> usize {
        self.max_handshakes_at_once.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, |cores| 2 * cores.get())
        })
    }
}
