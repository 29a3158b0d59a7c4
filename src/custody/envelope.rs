//! The record envelope: a record's stored ciphertext encrypted again under a data key, with
//! the record's id, node UUID, address and the key's version as associated data, so that a
//! row copied under another node, address or id does not open.
//!
//! Layout (version 1): `TKR1`, data key version (u32 BE), nonce (12), length of what follows
//! the length (u32 BE), then the AES-256-GCM ciphertext and its 16-byte tag.

use super::mac::encode_fields;
use super::{CustodyError, DataKey};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

pub(super) const MAGIC: &[u8; 4] = b"TKR1";
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 4 + 4 + NONCE_LEN + 4;
/// Far above any record (a sealed record is under 100 bytes), to bound what a parser accepts.
pub const MAX_RECORD_LEN: usize = 64 * 1024;

/// What a record is bound to, besides its data key's version.
#[derive(Clone, Copy, Debug)]
pub struct RecordBinding<'a> {
    /// The record's id or nonce, as the store keys it.
    pub record_id: &'a [u8],
    pub node_uuid: &'a str,
    pub ip: &'a str,
}

/// A parsed envelope, not yet opened.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub version: u32,
    nonce: [u8; NONCE_LEN],
    sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Checks the layout and every length; opens nothing.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, CustodyError> {
        let malformed = CustodyError::Malformed;
        if bytes.len() > HEADER_LEN + MAX_RECORD_LEN + TAG_LEN {
            return Err(malformed("record envelope is longer than any record"));
        }
        let (magic, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or(malformed("record envelope is truncated"))?;
        if magic != MAGIC {
            return Err(malformed("not a record envelope (or a newer format)"));
        }
        let (version, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(malformed("record envelope is truncated"))?;
        let (nonce, rest) = rest
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(malformed("record envelope is truncated"))?;
        let (length, sealed) = rest
            .split_first_chunk::<4>()
            .ok_or(malformed("record envelope is truncated"))?;
        let length = u32::from_be_bytes(*length) as usize;
        if length < TAG_LEN || length != sealed.len() {
            return Err(malformed(
                "record envelope's length does not match its contents",
            ));
        }
        Ok(Envelope {
            version: u32::from_be_bytes(*version),
            nonce: *nonce,
            sealed,
        })
    }

    pub fn open(&self, key: &DataKey, binding: &RecordBinding) -> Result<Vec<u8>, CustodyError> {
        if key.version() != self.version {
            return Err(CustodyError::WrongVersion {
                found: self.version,
                given: key.version(),
            });
        }
        let mut buffer = self.sealed.to_vec();
        let plain = aead_key(key)
            .open_in_place(
                Nonce::assume_unique_for_key(self.nonce),
                Aad::from(associated_data(self.version, binding)),
                &mut buffer,
            )
            .map_err(|_| CustodyError::Forged("record"))?;
        let len = plain.len();
        buffer.truncate(len);
        Ok(buffer)
    }
}

/// Encrypts a record's stored ciphertext under the data key, bound to `binding`.
pub fn seal_record(
    key: &DataKey,
    binding: &RecordBinding,
    ciphertext: &[u8],
) -> Result<Vec<u8>, CustodyError> {
    if ciphertext.len() > MAX_RECORD_LEN {
        return Err(CustodyError::Malformed("record is longer than any record"));
    }
    let mut nonce = [0u8; NONCE_LEN];
    super::secret::fill_random(&mut nonce);
    let mut sealed = ciphertext.to_vec();
    aead_key(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(key.version(), binding)),
            &mut sealed,
        )
        .map_err(|_| CustodyError::Malformed("record could not be encrypted"))?;
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.version().to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Parses and opens in one step, for a caller that already holds the right version.
pub fn open_record(
    key: &DataKey,
    binding: &RecordBinding,
    envelope: &[u8],
) -> Result<Vec<u8>, CustodyError> {
    Envelope::parse(envelope)?.open(key, binding)
}

fn associated_data(version: u32, binding: &RecordBinding) -> Vec<u8> {
    encode_fields(&[
        b"talos-kms-server record v1",
        &version.to_be_bytes(),
        binding.record_id,
        binding.node_uuid.as_bytes(),
        binding.ip.as_bytes(),
    ])
}

fn aead_key(key: &DataKey) -> LessSafeKey {
    LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key.record_key().expose()).expect("a 32-byte key"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custody::SecretKey;

    const ID: &[u8] = b"\x01\x02\x03\x04\x05\x06\x07\x08";
    const BINDING: RecordBinding = RecordBinding {
        record_id: ID,
        node_uuid: "8a1f0e52-7e45-4bd3-9d3b-0f3c6a2b9e11",
        ip: "10.0.0.7",
    };

    #[test]
    fn a_sealed_record_opens_with_its_binding() {
        let key = DataKey::generate(3);
        let envelope = seal_record(&key, &BINDING, b"stored ciphertext").unwrap();
        assert_eq!(Envelope::parse(&envelope).unwrap().version, 3);
        assert_eq!(
            open_record(&key, &BINDING, &envelope).unwrap(),
            b"stored ciphertext"
        );
    }

    #[test]
    fn tampering_with_any_bound_field_fails_to_open() {
        let key = DataKey::generate(1);
        let envelope = seal_record(&key, &BINDING, b"stored ciphertext").unwrap();
        for binding in [
            RecordBinding {
                record_id: b"\x01\x02\x03\x04\x05\x06\x07\x09",
                ..BINDING
            },
            RecordBinding {
                node_uuid: "8a1f0e52-7e45-4bd3-9d3b-0f3c6a2b9e12",
                ..BINDING
            },
            RecordBinding {
                ip: "10.0.0.8",
                ..BINDING
            },
        ] {
            assert!(matches!(
                open_record(&key, &binding, &envelope),
                Err(CustodyError::Forged(_))
            ));
        }
        for index in HEADER_LEN..envelope.len() {
            let mut altered = envelope.clone();
            altered[index] ^= 1;
            assert!(
                open_record(&key, &BINDING, &altered).is_err(),
                "byte {index}"
            );
        }
    }

    #[test]
    fn a_wrong_version_or_key_fails_to_open() {
        let key = DataKey::generate(1);
        let envelope = seal_record(&key, &BINDING, b"stored ciphertext").unwrap();
        assert!(matches!(
            open_record(&DataKey::generate(2), &BINDING, &envelope),
            Err(CustodyError::WrongVersion { found: 1, given: 2 })
        ));
        // The version in the header is bound too: relabelling it does not help.
        let mut relabelled = envelope.clone();
        relabelled[7] = 2;
        let v2 = DataKey::from_secret(2, SecretKey::from_slice(key.secret().expose()).unwrap());
        assert!(matches!(
            open_record(&v2, &BINDING, &relabelled),
            Err(CustodyError::Forged(_))
        ));
        assert!(open_record(&DataKey::generate(1), &BINDING, &envelope).is_err());
    }

    #[test]
    fn malformed_envelopes_are_named() {
        let key = DataKey::generate(1);
        let envelope = seal_record(&key, &BINDING, b"x").unwrap();
        for bad in [
            &b""[..],
            b"TKR1",
            b"TKR9\0\0\0\x01",
            &envelope[..envelope.len() - 1],
            &[envelope.as_slice(), b"trailing"].concat(),
        ] {
            assert!(
                matches!(Envelope::parse(bad), Err(CustodyError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
