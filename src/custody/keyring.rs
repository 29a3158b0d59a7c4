//! The data keys of a database, unwrapped, and what they say about rows: the envelope of a
//! record and the tags over what the policy trusts. A tag names the data key version that
//! made it (4 bytes, big-endian) before the 32-byte MAC, so rotation can re-tag in passing.

use super::mac::TAG_LEN;
use super::{CustodyError, DataKey, RecordBinding, Root, WRAPPED_LEN, open_record, seal_record};
use crate::store::{Approval, ApprovalState, Binding, CustodyChange, UnixTime, Window};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a wrapped data key is kept among the store's custody values.
pub const DATA_KEY_PREFIX: &str = "data-key/v";
/// Marks a version destroyed (`keys destroy-data-key`): its records are shredded, not forged.
pub const DESTROYED_PREFIX: &str = "destroyed/v";
/// Set once every record was wrapped: from then on an unwrapped record is a forgery.
pub const ALL_WRAPPED: &str = "all-records-wrapped";

pub const STORED_TAG_LEN: usize = 4 + TAG_LEN;

pub struct Keyring {
    keys: BTreeMap<u32, Arc<DataKey>>,
    destroyed: std::collections::BTreeSet<u32>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Unwraps every data key among `values` under `root`; refuses the first that does not
    /// unwrap or that is kept under another version's name.
    pub fn unwrap_all(root: &Root, values: &[(String, Vec<u8>)]) -> Result<Keyring, CustodyError> {
        let mut keys = BTreeMap::new();
        let destroyed = values
            .iter()
            .filter_map(|(name, _)| name.strip_prefix(DESTROYED_PREFIX)?.parse().ok())
            .collect();
        for (name, value) in values {
            let Some(version) = name.strip_prefix(DATA_KEY_PREFIX) else {
                continue;
            };
            let key = root.unwrap(value)?;
            if version.parse::<u32>().ok() != Some(key.version()) {
                return Err(CustodyError::Forged(
                    "data key (kept under another version)",
                ));
            }
            keys.insert(key.version(), Arc::new(key));
        }
        Ok(Keyring { keys, destroyed })
    }

    pub fn destroyed_count(&self) -> usize {
        self.destroyed.len()
    }

    /// Whether `version` was destroyed on purpose.
    pub fn is_destroyed(&self, version: u32) -> bool {
        self.destroyed.contains(&version)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The newest version: what new records are wrapped under.
    pub fn current(&self) -> Option<&Arc<DataKey>> {
        self.keys.values().next_back()
    }

    pub fn get(&self, version: u32) -> Option<&Arc<DataKey>> {
        self.keys.get(&version)
    }

    /// A new version above every one there is, and the custody value that keeps it.
    pub fn add_version(&mut self, root: &Root) -> Result<(u32, CustodyChange), CustodyError> {
        let version = self.keys.keys().next_back().map_or(1, |v| v + 1);
        let key = DataKey::generate(version);
        let wrapped = root.wrap(&key)?;
        debug_assert_eq!(wrapped.len(), WRAPPED_LEN);
        self.keys.insert(version, Arc::new(key));
        Ok((version, (data_key_name(version), Some(wrapped))))
    }

    /// Every data key wrapped anew under `root` (root rotation), as custody values.
    pub fn rewrapped_under(&self, root: &Root) -> Result<Vec<CustodyChange>, CustodyError> {
        self.keys
            .iter()
            .map(|(version, key)| Ok((data_key_name(*version), Some(root.wrap(key)?))))
            .collect()
    }

    /// A tag over `fields` under the current key.
    pub fn tag(&self, fields: &[&[u8]]) -> Vec<u8> {
        let key = self.current().expect("a keyring in use holds a key");
        let mut tag = Vec::with_capacity(STORED_TAG_LEN);
        tag.extend_from_slice(&key.version().to_be_bytes());
        tag.extend_from_slice(&key.mac_key().mac_fields(fields));
        tag
    }

    /// Whether `tag` was made over `fields` by one of these keys.
    pub fn verify(&self, fields: &[&[u8]], tag: Option<&[u8]>) -> Result<(), CustodyError> {
        let tag = tag.ok_or(CustodyError::Forged("row (it carries no tag)"))?;
        let (version, mac) = tag
            .split_first_chunk::<4>()
            .ok_or(CustodyError::Forged("row (its tag is truncated)"))?;
        let key = self
            .get(u32::from_be_bytes(*version))
            .ok_or(CustodyError::Forged("row (tagged by an unknown data key)"))?;
        key.mac_key().verify(fields, mac)
    }

    /// The record's ciphertext wrapped under the current key, and the key's version.
    pub fn wrap_record(
        &self,
        binding: &RecordBinding,
        ciphertext: &[u8],
    ) -> Result<(u32, Vec<u8>), CustodyError> {
        let key = self.current().expect("a keyring in use holds a key");
        Ok((key.version(), seal_record(key, binding, ciphertext)?))
    }

    pub fn open_record(
        &self,
        binding: &RecordBinding,
        envelope: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        let parsed = super::Envelope::parse(envelope)?;
        if self.is_destroyed(parsed.version) {
            return Err(CustodyError::Shredded(parsed.version));
        }
        let key = self.get(parsed.version).ok_or(CustodyError::Forged(
            "record (wrapped under an unknown data key)",
        ))?;
        open_record(key, binding, envelope)
    }
}

pub fn data_key_name(version: u32) -> String {
    format!("{DATA_KEY_PREFIX}{version}")
}

pub fn destroyed_name(version: u32) -> String {
    format!("{DESTROYED_PREFIX}{version}")
}

/// Whether stored bytes are a record envelope rather than a record from before custody.
pub fn is_wrapped(ciphertext: &[u8]) -> bool {
    ciphertext.starts_with(super::envelope::MAGIC)
}

fn time(at: Option<UnixTime>) -> Vec<u8> {
    at.map(|t| t.to_be_bytes().to_vec()).unwrap_or_default()
}

/// What a record's tag covers: what it is, who may open it, and whether it is revoked.
pub fn record_fields<T>(
    nonce: &[u8],
    node_uuid: &str,
    ip: &str,
    revoked_at: Option<UnixTime>,
    key_version: Option<u32>,
    with: impl FnOnce(&[&[u8]]) -> T,
) -> T {
    let version = key_version
        .map(|v| v.to_be_bytes().to_vec())
        .unwrap_or_default();
    with(&[
        b"record v1",
        nonce,
        node_uuid.as_bytes(),
        ip.as_bytes(),
        &time(revoked_at),
        &version,
    ])
}

/// What an approval's tag covers: what a decision grants or refuses, to whom.
pub fn approval_fields<T>(approval: &Approval, with: impl FnOnce(&[&[u8]]) -> T) -> T {
    with(&[
        b"approval v1",
        &approval.id.to_be_bytes(),
        approval.operation.as_str().as_bytes(),
        approval.node_uuid.as_bytes(),
        approval.ip.as_bytes(),
        approval.state.as_str().as_bytes(),
        &time(approval.approved_until),
    ])
}

/// Whether an approval's state needs a tag: a pending one grants and refuses nothing yet.
pub fn approval_is_decided(approval: &Approval) -> bool {
    approval.state != ApprovalState::Pending
}

pub fn window_fields<T>(window: &Window, with: impl FnOnce(&[&[u8]]) -> T) -> T {
    with(&[
        b"window v1",
        window.operation.as_str().as_bytes(),
        &window.opened_at.to_be_bytes(),
        &window.closes_at.to_be_bytes(),
    ])
}

pub fn binding_fields<T>(binding: &Binding, with: impl FnOnce(&[&[u8]]) -> T) -> T {
    with(&[
        b"binding v1",
        &binding.fingerprint,
        binding.scheme.as_bytes(),
        binding.info.node_uuid.as_bytes(),
        binding.info.ip.as_bytes(),
        &time(binding.info.revoked_at),
    ])
}
