//! Blobs sealed by the servers this one takes over from (FACTS.md §4, §4a): the reference
//! server of the makers of Talos (`sidero-reference`) and its fork gustinn/talos-kms
//! (`gustinn`). Both keep one static AES-GCM key (16, 24 or 32 bytes) and put the whole
//! ciphertext in the node's token, so opening one needs only the key.
//!
//! A blob is told apart by its length and first byte, never by trying keys: this server's
//! own are [`super::SEALED_LEN`] bytes, the reference's [`REFERENCE_LEN`], the fork's start
//! with [`GUSTINN_VERSION`] and are 62 + len(key id) bytes. Every failure is answered the
//! way the server that made the blob answered it, so a node sees no change.
//!
//! Like the native scheme this knows nothing of gRPC or storage. Keys are zeroed when dropped.

use aws_lc_rs::aead::{
    AES_128_GCM, AES_192_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey,
};
use std::net::IpAddr;
use zeroize::Zeroizing;

use super::{DECOY_LEN, TAG_LEN};

/// nonce (12) || AES-GCM(32-byte passphrase) || tag (16).
pub const REFERENCE_LEN: usize = NONCE_LEN + DECOY_LEN + TAG_LEN;
/// The first byte of every gustinn blob: its format version.
pub const GUSTINN_VERSION: u8 = 1;
/// What follows a gustinn header: nonce, a 32-byte passphrase's ciphertext, tag.
const GUSTINN_BODY_LEN: usize = NONCE_LEN + DECOY_LEN + TAG_LEN;

/// A foreign server's sealing scheme, as the `takeOver` config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    SideroReference,
    Gustinn,
}

impl Scheme {
    pub const NAMES: [&'static str; 2] = ["sidero-reference", "gustinn"];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::SideroReference => "sidero-reference",
            Scheme::Gustinn => "gustinn",
        }
    }

    pub fn parse(text: &str) -> Option<Scheme> {
        match text {
            "sidero-reference" => Some(Scheme::SideroReference),
            "gustinn" => Some(Scheme::Gustinn),
            _ => None,
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Raw AES key bytes of a valid length; zeroed when dropped.
pub struct AesKey(Zeroizing<Vec<u8>>);

impl AesKey {
    /// `None` unless `bytes` is 16, 24 or 32 bytes long (AES-128, -192, -256).
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Option<AesKey> {
        matches!(bytes.len(), 16 | 24 | 32).then_some(AesKey(bytes))
    }

    /// 128, 192 or 256.
    pub fn bits(&self) -> usize {
        self.0.len() * 8
    }

    fn open(&self, nonce: &[u8], ciphertext: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let algorithm = match self.0.len() {
            16 => &AES_128_GCM,
            24 => &AES_192_GCM,
            _ => &AES_256_GCM,
        };
        let key = LessSafeKey::new(UnboundKey::new(algorithm, &self.0).ok()?);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = Zeroizing::new(ciphertext.to_vec());
        let len = key
            .open_in_place(nonce, Aad::from(aad), &mut in_out)
            .ok()?
            .len();
        in_out.truncate(len);
        Some(in_out)
    }
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AesKey(AES-{})", self.bits())
    }
}

/// One gustinn server's keys: every version it had, by key id, and whether it bound the
/// caller's address into its seals.
#[derive(Debug)]
pub struct GustinnKeys {
    pub keys: Vec<(String, AesKey)>,
    pub ip_binding: bool,
}

/// The keys of every server taken over; empty unless `takeOver` is configured.
#[derive(Debug, Default)]
pub struct TakeOver {
    pub reference: Vec<AesKey>,
    pub gustinn: Vec<GustinnKeys>,
}

/// What a foreign blob gave.
pub enum Opened {
    /// The passphrase it holds; zeroed when dropped.
    Passphrase(Scheme, Zeroizing<Vec<u8>>),
    /// Its server answered this with random bytes: no key of that id, or the blob did not
    /// open (wrong key, UUID or address).
    Decoy(Scheme, Failure),
    /// Its server answered this INVALID_ARGUMENT; `None` when no configured scheme has
    /// this format.
    Malformed(Option<Scheme>, Failure),
}

/// Why a foreign blob gave no passphrase: words for the log and the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    WrongLength,
    BadHeader,
    UnknownKeyId,
    WrongKeyOrBinding,
    UnknownFormat,
}

impl Failure {
    pub fn describe(self) -> &'static str {
        match self {
            Failure::WrongLength => "the blob's length does not fit its format",
            Failure::BadHeader => "the blob's header is malformed",
            Failure::UnknownKeyId => "no configured key has the blob's key id",
            Failure::WrongKeyOrBinding => "wrong key, node UUID or address",
            Failure::UnknownFormat => "the blob is in no known format",
        }
    }
}

impl TakeOver {
    pub fn is_empty(&self) -> bool {
        self.reference.is_empty() && self.gustinn.is_empty()
    }

    /// Opens a blob that is not this server's own, for `node_uuid` calling from `peer`.
    pub fn open(&self, blob: &[u8], node_uuid: &str, peer: IpAddr) -> Opened {
        if !self.reference.is_empty() && blob.len() == REFERENCE_LEN {
            return self.open_reference(blob);
        }
        if !self.gustinn.is_empty() && blob.first() == Some(&GUSTINN_VERSION) {
            return self.open_gustinn(blob, node_uuid, peer);
        }
        // The reference server insists on its length; the fork on its header; this server
        // on its own length: all of them answer INVALID_ARGUMENT.
        match (self.reference.is_empty(), self.gustinn.is_empty()) {
            (false, true) => Opened::Malformed(Some(Scheme::SideroReference), Failure::WrongLength),
            (true, false) => Opened::Malformed(Some(Scheme::Gustinn), Failure::BadHeader),
            _ => Opened::Malformed(None, Failure::UnknownFormat),
        }
    }

    fn open_reference(&self, blob: &[u8]) -> Opened {
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        // No associated data: the reference server binds nothing.
        for key in &self.reference {
            if let Some(passphrase) = key.open(nonce, ciphertext, &[]) {
                return Opened::Passphrase(Scheme::SideroReference, passphrase);
            }
        }
        Opened::Decoy(Scheme::SideroReference, Failure::WrongKeyOrBinding)
    }

    /// In the fork's order: header, then key id, then length, then the open.
    fn open_gustinn(&self, blob: &[u8], node_uuid: &str, peer: IpAddr) -> Opened {
        let Some(header) = GustinnHeader::parse(blob) else {
            return Opened::Malformed(Some(Scheme::Gustinn), Failure::BadHeader);
        };
        let mut known = self.gustinn.iter().flat_map(|server| {
            server
                .keys
                .iter()
                .filter(|(id, _)| id.as_bytes() == header.key_id)
                .map(move |(_, key)| (key, server.ip_binding))
        });
        let Some(first) = known.next() else {
            return Opened::Decoy(Scheme::Gustinn, Failure::UnknownKeyId);
        };
        let body = &blob[header.len..];
        if body.len() != GUSTINN_BODY_LEN {
            return Opened::Malformed(Some(Scheme::Gustinn), Failure::WrongLength);
        }
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        for (key, ip_binding) in std::iter::once(first).chain(known) {
            let aad = gustinn_aad(&blob[..header.len], node_uuid, ip_binding.then_some(peer));
            if let Some(passphrase) = key.open(nonce, ciphertext, &aad) {
                return Opened::Passphrase(Scheme::Gustinn, passphrase);
            }
        }
        Opened::Decoy(Scheme::Gustinn, Failure::WrongKeyOrBinding)
    }
}

/// `0x01 || len(keyID) || keyID` at the start of a gustinn blob.
pub struct GustinnHeader<'a> {
    pub key_id: &'a [u8],
    /// 2 + len(keyID): where the nonce begins.
    pub len: usize,
}

impl<'a> GustinnHeader<'a> {
    /// `None` where the fork answers "unknown blob format" or "truncated header".
    pub fn parse(blob: &'a [u8]) -> Option<Self> {
        let (&version, rest) = blob.split_first()?;
        let (&id_len, rest) = rest.split_first()?;
        if version != GUSTINN_VERSION || id_len == 0 {
            return None;
        }
        let key_id = rest.get(..usize::from(id_len))?;
        Some(GustinnHeader {
            key_id,
            len: 2 + key_id.len(),
        })
    }
}

/// header || 0x00 || node UUID, and with IP binding || 0x00 || the address as 16 bytes
/// (IPv4 mapped, so that 127.0.0.1 and ::ffff:127.0.0.1 bind alike).
fn gustinn_aad(header: &[u8], node_uuid: &str, peer: Option<IpAddr>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + node_uuid.len() + 18);
    aad.extend_from_slice(header);
    aad.push(0);
    aad.extend_from_slice(node_uuid.as_bytes());
    if let Some(peer) = peer {
        let octets = match peer {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        aad.push(0);
        aad.extend_from_slice(&octets);
    }
    aad
}

/// What binds a foreign blob to its first caller: SHA-256 of the whole blob. The blob holds
/// the passphrase under a key the operator has, so it is never stored itself.
pub fn fingerprint(blob: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, blob);
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.as_ref());
    fingerprint
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "213faf71-17a0-43d7-a88b-0afd96094178";

    fn key(byte: u8, len: usize) -> AesKey {
        AesKey::new(Zeroizing::new(vec![byte; len])).unwrap()
    }

    #[test]
    fn keys_of_other_lengths_are_refused() {
        for len in [0, 15, 17, 31, 33, 64] {
            assert!(AesKey::new(Zeroizing::new(vec![0; len])).is_none(), "{len}");
        }
    }

    #[test]
    fn formats_are_told_apart_by_length_and_first_byte() {
        let both = TakeOver {
            reference: vec![key(1, 32)],
            gustinn: vec![GustinnKeys {
                keys: vec![("v1".into(), key(2, 32))],
                ip_binding: false,
            }],
        };
        let peer = IpAddr::from([127, 0, 0, 1]);
        let reference = [7u8; REFERENCE_LEN];
        assert!(matches!(
            both.open(&reference, UUID, peer),
            Opened::Decoy(Scheme::SideroReference, Failure::WrongKeyOrBinding)
        ));
        let mut gustinn = vec![1, 2, b'v', b'1'];
        gustinn.extend_from_slice(&[0; GUSTINN_BODY_LEN]);
        assert!(matches!(
            both.open(&gustinn, UUID, peer),
            Opened::Decoy(Scheme::Gustinn, Failure::WrongKeyOrBinding)
        ));
        let unknown_id = [&[1, 2, b'v', b'9'][..], &[0; GUSTINN_BODY_LEN]].concat();
        assert!(matches!(
            both.open(&unknown_id, UUID, peer),
            Opened::Decoy(Scheme::Gustinn, Failure::UnknownKeyId)
        ));
        assert!(matches!(
            both.open(&gustinn[..gustinn.len() - 1], UUID, peer),
            Opened::Malformed(Some(Scheme::Gustinn), Failure::WrongLength)
        ));
        for header in [&[1u8][..], &[1, 0], &[1, 5, b'v']] {
            assert!(matches!(
                both.open(header, UUID, peer),
                Opened::Malformed(Some(Scheme::Gustinn), Failure::BadHeader)
            ));
        }
        assert!(matches!(
            both.open(&[9u8; 61], UUID, peer),
            Opened::Malformed(None, Failure::UnknownFormat)
        ));
    }
}
