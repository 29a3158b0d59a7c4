//! Authentication of the fields the policy trusts, under a key derived from a data key.

use super::CustodyError;
use super::secret::{KEY_LEN, SecretKey};
use aws_lc_rs::hmac;

pub const TAG_LEN: usize = 32;

/// An HMAC-SHA256 key, derived from one data key version.
#[derive(Debug)]
pub struct MacKey(pub(super) SecretKey);

impl MacKey {
    /// The tag over `fields`, in order; see [`encode_fields`] for why no two lists collide.
    pub fn mac_fields(&self, fields: &[&[u8]]) -> [u8; TAG_LEN] {
        let tag = hmac::sign(&self.key(), &encode_fields(fields));
        let mut out = [0; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time comparison of `tag` with the tag over `fields`.
    pub fn verify(&self, fields: &[&[u8]], tag: &[u8]) -> Result<(), CustodyError> {
        hmac::verify(&self.key(), &encode_fields(fields), tag)
            .map_err(|_| CustodyError::Forged("fields"))
    }

    fn key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0.expose()[..KEY_LEN])
    }
}

/// A count, then each field's length (u32, big-endian) before its bytes: ["ab", "c"] and
/// ["a", "bc"] encode differently, and so do a list and the same list with an empty field.
pub fn encode_fields(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + fields.iter().map(|f| 4 + f.len()).sum::<usize>());
    out.extend_from_slice(&len_u32(fields.len()).to_be_bytes());
    for field in fields {
        out.extend_from_slice(&len_u32(field.len()).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("a field under 4 GiB")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custody::DataKey;

    #[test]
    fn any_changed_field_fails_to_verify() {
        let key = DataKey::generate(1);
        let mac = key.mac_key();
        let tag = mac.mac_fields(&[b"node-uuid", b"10.0.0.1", b"revoked=0"]);
        mac.verify(&[b"node-uuid", b"10.0.0.1", b"revoked=0"], &tag)
            .unwrap();
        for altered in [
            &[&b"node-uuie"[..], b"10.0.0.1", b"revoked=0"][..],
            &[b"node-uuid", b"10.0.0.1", b"revoked=1"],
            &[b"node-uuid1", b"0.0.0.1", b"revoked=0"],
            &[b"node-uuid", b"10.0.0.1"],
            &[b"node-uuid", b"10.0.0.1", b"revoked=0", b""],
        ] {
            assert!(mac.verify(altered, &tag).is_err(), "{altered:?}");
        }
        let other = DataKey::generate(1);
        assert!(
            other
                .mac_key()
                .verify(&[b"node-uuid", b"10.0.0.1", b"revoked=0"], &tag)
                .is_err()
        );
    }

    #[test]
    fn the_encoding_is_unambiguous() {
        assert_ne!(encode_fields(&[b"ab", b"c"]), encode_fields(&[b"a", b"bc"]));
        assert_ne!(encode_fields(&[b"a"]), encode_fields(&[b"a", b""]));
        assert_ne!(encode_fields(&[]), encode_fields(&[b""]));
    }
}
