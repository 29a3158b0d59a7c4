//! The sealing scheme of the legacy server (docs/protocol.md §4), bit-compatible with it.
//!
//! Every seal gets its own random AES-256-GCM key K and nonce N. The passphrase is encrypted
//! with K and N, with the node UUID followed by the peer-address text as associated data. The
//! server keeps the ciphertext and N; the node gets N || K. Neither the database alone nor the
//! node's disk alone reveals a passphrase, and a blob only opens for the node UUID and the
//! source address that sealed it.
//!
//! This module knows nothing of gRPC or storage: it turns bytes into bytes. The keys it
//! holds are zeroed when dropped (aws-lc-rs cleanses its own key schedules); a passphrase
//! handed back goes into the gRPC reply, which zeroes it once encoded (`proto.rs`).

pub mod foreign;
mod ip_text;

pub use ip_text::{ip_text, peer_ip_text};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::{Zeroize, Zeroizing};

pub const NONCE_LEN: usize = 12;
pub const KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
/// What a node stores in its LUKS2 token: N || K.
pub const SEALED_LEN: usize = NONCE_LEN + KEY_LEN;
/// Length of the answer to a failed unseal, and of every Talos passphrase.
pub const DECOY_LEN: usize = 32;

pub type SealNonce = [u8; NONCE_LEN];

/// The result of sealing: what the server stores and what the node receives.
pub struct Sealed {
    pub nonce: SealNonce,
    /// Ciphertext with the 16-byte tag appended, as the legacy server stored it.
    pub ciphertext: Vec<u8>,
    /// N || K, returned to the node. Secret: never log it; zeroed when dropped.
    pub blob: Zeroizing<[u8; SEALED_LEN]>,
}

/// The node's half, split into the lookup nonce and the secret key.
pub struct SealedBlob {
    pub nonce: SealNonce,
    key: [u8; KEY_LEN],
}

impl Drop for SealedBlob {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl SealedBlob {
    /// Splits N || K; `None` unless `data` is exactly [`SEALED_LEN`] bytes.
    pub fn parse(data: &[u8]) -> Option<Self> {
        if data.len() != SEALED_LEN {
            return None;
        }
        let (nonce, key) = data.split_at(NONCE_LEN);
        Some(Self {
            nonce: nonce.try_into().ok()?,
            key: key.try_into().ok()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    #[error("the system random number generator failed")]
    Random,
    #[error("AES-256-GCM encryption failed")]
    Encrypt,
}

/// Why a blob did not open. Deliberately coarse: GCM cannot tell a wrong key from a wrong
/// UUID or address, and callers must answer all of them the same way.
#[derive(Debug, PartialEq, Eq)]
pub struct WrongKeyOrBinding;

/// Seals `passphrase` for `node_uuid` connecting from `peer_ip` (text of [`peer_ip_text`]).
pub fn seal(node_uuid: &str, peer_ip: &str, passphrase: &[u8]) -> Result<Sealed, SealingError> {
    let mut blob = Zeroizing::new([0u8; SEALED_LEN]);
    aws_lc_rs::rand::fill(&mut blob[..]).map_err(|_| SealingError::Random)?;
    let (nonce, key) = blob.split_at(NONCE_LEN);
    let nonce: SealNonce = nonce.try_into().map_err(|_| SealingError::Encrypt)?;
    let key = aead_key(key).ok_or(SealingError::Encrypt)?;

    let mut ciphertext = Vec::with_capacity(passphrase.len() + TAG_LEN);
    ciphertext.extend_from_slice(passphrase);
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(binding(node_uuid, peer_ip)),
        &mut ciphertext,
    )
    .map_err(|_| {
        // Still the passphrase when encryption failed.
        ciphertext.zeroize();
        SealingError::Encrypt
    })?;
    Ok(Sealed {
        nonce,
        ciphertext,
        blob,
    })
}

/// Opens a stored ciphertext with the node's key, for `node_uuid` connecting from `peer_ip`.
pub fn unseal(
    blob: &SealedBlob,
    ciphertext: &[u8],
    node_uuid: &str,
    peer_ip: &str,
) -> Result<Vec<u8>, WrongKeyOrBinding> {
    let key = aead_key(&blob.key).ok_or(WrongKeyOrBinding)?;
    let mut in_out = ciphertext.to_vec();
    let plaintext = key
        .open_in_place(
            Nonce::assume_unique_for_key(blob.nonce),
            Aad::from(binding(node_uuid, peer_ip)),
            &mut in_out,
        )
        .map_err(|_| WrongKeyOrBinding)?;
    let len = plaintext.len();
    in_out.truncate(len);
    Ok(in_out)
}

/// Spends the time of a real unseal when no record matches the nonce, so that an unknown
/// nonce cannot be told from a wrong key by timing.
pub fn unseal_nothing(blob: &SealedBlob, node_uuid: &str, peer_ip: &str) {
    let stand_in = [0u8; DECOY_LEN + TAG_LEN];
    let _ = unseal(blob, &stand_in, node_uuid, peer_ip);
}

/// The answer to every failed unseal: random bytes of a passphrase's length, so the caller
/// learns nothing and simply fails to open its LUKS2 slot.
pub fn decoy_passphrase() -> [u8; DECOY_LEN] {
    let mut decoy = [0u8; DECOY_LEN];
    // If the RNG fails the zeros still open nothing; there is no better answer to give.
    let _ = aws_lc_rs::rand::fill(&mut decoy);
    decoy
}

fn aead_key(key: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .ok()
        .map(LessSafeKey::new)
}

/// AAD = UTF-8(node UUID) followed directly by UTF-8(peer address text).
fn binding(node_uuid: &str, peer_ip: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(node_uuid.len() + peer_ip.len());
    aad.extend_from_slice(node_uuid.as_bytes());
    aad.extend_from_slice(peer_ip.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "213faf71-17a0-43d7-a88b-0afd96094178";

    #[test]
    fn round_trip_returns_the_passphrase() {
        let passphrase = [7u8; 32];
        let sealed = seal(UUID, "10.0.0.201", &passphrase).unwrap();
        assert_eq!(sealed.ciphertext.len(), 32 + TAG_LEN);
        assert_eq!(&sealed.blob[..NONCE_LEN], &sealed.nonce);
        let blob = SealedBlob::parse(&sealed.blob[..]).unwrap();
        let opened = unseal(&blob, &sealed.ciphertext, UUID, "10.0.0.201").unwrap();
        assert_eq!(opened, passphrase);
    }

    #[test]
    fn binding_to_uuid_and_address_is_enforced() {
        let sealed = seal(UUID, "10.0.0.201", &[1u8; 32]).unwrap();
        let blob = SealedBlob::parse(&sealed.blob[..]).unwrap();
        assert!(unseal(&blob, &sealed.ciphertext, UUID, "10.0.0.202").is_err());
        let other = "313faf71-17a0-43d7-a88b-0afd96094178";
        assert!(unseal(&blob, &sealed.ciphertext, other, "10.0.0.201").is_err());
        // The AAD is a plain concatenation, exactly like the legacy server's.
        assert!(unseal(&blob, &sealed.ciphertext, "", &format!("{UUID}10.0.0.201")).is_ok());
    }

    #[test]
    fn every_seal_uses_a_fresh_key_and_nonce() {
        let a = seal(UUID, "10.0.0.201", &[1u8; 32]).unwrap();
        let b = seal(UUID, "10.0.0.201", &[1u8; 32]).unwrap();
        assert_ne!(a.blob[..], b.blob[..]);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn blob_must_be_exactly_nonce_and_key() {
        assert!(SealedBlob::parse(&[0u8; SEALED_LEN - 1]).is_none());
        assert!(SealedBlob::parse(&[0u8; SEALED_LEN + 1]).is_none());
        assert!(SealedBlob::parse(&[0u8; SEALED_LEN]).is_some());
    }

    #[test]
    fn decoys_are_random() {
        assert_ne!(decoy_passphrase(), decoy_passphrase());
    }
}
