//! Bindings of foreign blobs (`takeOver`): the first node UUID and address that unsealed a
//! blob of another server's scheme, so that the blob opens for nobody else after. Stored by
//! the blob's fingerprint, never the blob.

use super::{RecordInfo, UnixTime};

pub type BindingId = i64;
/// SHA-256 of the blob ([`crate::sealing::foreign::fingerprint`]).
pub type Fingerprint = [u8; 32];

/// The first successful unseal of a foreign blob.
#[derive(Clone, Debug)]
pub struct NewBinding {
    pub fingerprint: Fingerprint,
    /// The scheme's config name (`sidero-reference`, `gustinn`).
    pub scheme: String,
    pub node_uuid: String,
    /// Peer-address text, as native records note it.
    pub ip: String,
    pub at: UnixTime,
    /// Custody's tag (see [`super::Custody`]).
    pub tag: Option<Vec<u8>>,
}

/// A stored binding, shown to operators like a record of its scheme: `info.id` is the
/// binding's own id, `info.created_at` its first unseal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub fingerprint: Fingerprint,
    pub scheme: String,
    pub info: RecordInfo,
    pub tag: Option<Vec<u8>>,
}
