//! talos-kms-server: the network KMS that Talos Linux nodes ask to seal and unseal their
//! LUKS2 passphrases.
//!
//! A request flows one way through the modules: [`listener`] accepts the connection (only
//! the connection allow-list is applied there) and completes TLS, [`service`] answers the
//! gRPC call after asking [`policy`] whether it may proceed, [`sealing`] implements the
//! legacy server's scheme, and [`store`] keeps the records.
//! [`client`] behaves exactly like a Talos node and is shared by the tests, `bench` and the
//! operator's `client` command. [`talos`] writes and lints the nodes' machine configs.
//! [`custody`] holds the key sources and the key hierarchy (not yet wired to the stores).

// Allowed only where a SAFETY comment proves the block sound: registering the listening
// socket (`listener`) and locking key pages in memory (`custody::secret`).
#![deny(unsafe_code)]

pub mod audit;
pub mod bench;
pub mod check;
pub mod client;
pub mod config;
pub mod custody;
pub mod hardening;
pub mod listener;
mod locking;
pub mod logging;
pub mod metrics;
pub mod os_error;
pub mod policy;
pub mod proto;
pub mod recover;
pub mod sealing;
pub mod server;
pub mod service;
pub mod store;
pub mod talos;
pub mod tls;
