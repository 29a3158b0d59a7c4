//! Where requests enter: accepts TCP connections, bounds how many are served at once,
//! completes TLS (its costly step a few connections at a time, see `connection.rs`), and
//! serves gRPC over HTTP/2 on each with the peer address attached.
//!
//! Shaped like mini-redis: a [`Listener`] accepts (`accept.rs`) and spawns one `Handler` per
//! connection (`connection.rs`), whose calls each pass one wrapper (`call.rs`); shutdown is a watch signal, and the listener knows all handlers are done when
//! every clone of its `finished` sender has been dropped.
//!
//! No one may lock nodes out by holding connections ([`slots`]): a connection from outside
//! the allow-lists is closed before any TLS byte, an address holds at most its share, a
//! connection waiting on its client for the idle timeout is closed, and when every slot is
//! taken one waiting on its client is closed to admit the new one.
//!
//! A Talos call is one request on a fresh connection, arriving with the client's TLS
//! Finished. The handler answers it within the poll that reads it (`call.rs`) and
//! sends everything that poll queued in one write ([`write_batch`]): the server's HTTP/2
//! SETTINGS, its acknowledgement of the client's, and the response leave together. A call
//! that must wait (a seal's commit, a PostgreSQL round trip) holds that write back until
//! its answer joins it.

mod accept;
mod busy_time;
mod call;
mod connection;
mod handshake_failures;
mod limits;
pub mod metrics;
mod proxied;
pub mod proxy_protocol;
mod refusals;
mod shedding;
pub mod slots;
mod write_batch;

pub use accept::{Listener, Serving, accepting};
pub use call::MAX_WATCHES;
pub use handshake_failures::HandshakeFailures;
pub use limits::ListenerLimits;
pub use refusals::Refusals;
pub use slots::Slots;

use crate::proto::KMSServiceServer;
use crate::service::KmsService;
use tokio::sync::watch;

type Grpc = KMSServiceServer<KmsService>;
/// Standard gRPC health checking, on the same port.
pub type Health =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

/// Resolves once shutdown is signalled (at once if it already was).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
