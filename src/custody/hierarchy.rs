//! The key hierarchy: a root key (from the key source) wraps versioned data keys, which are
//! stored wrapped; each data key yields a record-encryption key and a MAC key.
//!
//! A wrapped data key (69 bytes): `TKDK`, who wrapped it (1: AES-256-GCM under a root key in
//! memory; 2: AES-256-GCM inside a PKCS#11 token), the version (u32 BE), the nonce (12), then
//! the 32 encrypted bytes and the 16-byte tag. The version is the associated data.

use super::CustodyError;
use super::mac::{MacKey, encode_fields};
use super::pkcs11::HsmKey;
use super::secret::{KEY_LEN, SecretKey};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;

const MAGIC: &[u8; 4] = b"TKDK";
const BY_ROOT_KEY: u8 = 1;
const BY_HSM: u8 = 2;
pub const WRAPPED_LEN: usize = 4 + 1 + 4 + NONCE_LEN + KEY_LEN + 16;

/// One version of the data key, unwrapped, with the keys derived from it.
#[derive(Debug)]
pub struct DataKey {
    version: u32,
    secret: SecretKey,
    record: SecretKey,
    mac: MacKey,
}

impl DataKey {
    pub fn generate(version: u32) -> DataKey {
        DataKey::from_secret(version, SecretKey::random())
    }

    pub fn from_secret(version: u32, secret: SecretKey) -> DataKey {
        let record = derive(&secret, b"talos-kms-server record encryption v1");
        let mac = MacKey(derive(&secret, b"talos-kms-server policy mac v1"));
        DataKey {
            version,
            secret,
            record,
            mac,
        }
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn mac_key(&self) -> &MacKey {
        &self.mac
    }

    pub(super) fn record_key(&self) -> &SecretKey {
        &self.record
    }

    #[cfg(test)]
    pub(super) fn secret(&self) -> &SecretKey {
        &self.secret
    }
}

/// HKDF-SHA256 with no salt: the input is already a uniformly random key.
fn derive(secret: &SecretKey, label: &[u8]) -> SecretKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(secret.expose());
    let mut out = [0u8; KEY_LEN];
    prk.expand(&[label], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 yields 32 bytes");
    SecretKey::from_bytes(&mut out)
}

/// What wraps the data keys: a root key held in memory (file, tpm2, shamir), or a key that
/// never leaves an HSM (pkcs11).
#[derive(Debug)]
pub enum Root {
    Key(SecretKey),
    Hsm(HsmKey),
}

impl Root {
    pub fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, CustodyError> {
        let mut nonce = [0u8; NONCE_LEN];
        super::secret::fill_random(&mut nonce);
        let aad = wrap_associated_data(key.version);
        let (kind, sealed) = match self {
            Root::Key(root) => {
                let mut sealed = key.secret.expose().to_vec();
                aead(root)
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut sealed,
                    )
                    .map_err(|_| CustodyError::Malformed("data key could not be wrapped"))?;
                (BY_ROOT_KEY, sealed)
            }
            Root::Hsm(hsm) => (BY_HSM, hsm.encrypt(&nonce, &aad, key.secret.expose())?),
        };
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(MAGIC);
        out.push(kind);
        out.extend_from_slice(&key.version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, CustodyError> {
        let malformed = CustodyError::Malformed;
        if wrapped.len() != WRAPPED_LEN || &wrapped[..4] != MAGIC {
            return Err(malformed("not a wrapped data key"));
        }
        let kind = wrapped[4];
        let version = u32::from_be_bytes(wrapped[5..9].try_into().expect("4 bytes"));
        let nonce: [u8; NONCE_LEN] = wrapped[9..9 + NONCE_LEN].try_into().expect("12 bytes");
        let sealed = &wrapped[9 + NONCE_LEN..];
        let aad = wrap_associated_data(version);
        let plain = match (self, kind) {
            (Root::Key(root), BY_ROOT_KEY) => {
                let mut buffer = sealed.to_vec();
                let opened = aead(root)
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        &mut buffer,
                    )
                    .map_err(|_| CustodyError::WrongRoot { version })?;
                let key = SecretKey::from_slice(opened);
                zeroize::Zeroize::zeroize(&mut buffer);
                key.ok_or(malformed("wrapped data key has the wrong length"))?
            }
            (Root::Hsm(hsm), BY_HSM) => hsm.decrypt(&nonce, &aad, sealed, version)?,
            (Root::Key(_), BY_HSM) => {
                return Err(CustodyError::Source(format!(
                    "data key v{version} was wrapped by a PKCS#11 token, but the configured key \
                     source is not pkcs11; configure the token that wrapped it"
                )));
            }
            (Root::Hsm(_), BY_ROOT_KEY) => {
                return Err(CustodyError::Source(format!(
                    "data key v{version} was wrapped by a root key (file, tpm2 or shamir), but \
                     the configured key source is pkcs11; configure the source that wrapped it"
                )));
            }
            _ => return Err(malformed("wrapped data key of an unknown kind")),
        };
        Ok(DataKey::from_secret(version, plain))
    }
}

fn wrap_associated_data(version: u32) -> Vec<u8> {
    encode_fields(&[b"talos-kms-server data key v1", &version.to_be_bytes()])
}

fn aead(key: &SecretKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).expect("a 32-byte key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_data_key_unwraps_under_its_root_only() {
        let root = Root::Key(SecretKey::random());
        let key = DataKey::generate(7);
        let wrapped = root.wrap(&key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        let unwrapped = root.unwrap(&wrapped).unwrap();
        assert_eq!(unwrapped.version(), 7);
        assert_eq!(unwrapped.secret.expose(), key.secret.expose());
        assert!(matches!(
            Root::Key(SecretKey::random()).unwrap(&wrapped),
            Err(CustodyError::WrongRoot { version: 7 })
        ));
    }

    #[test]
    fn a_wrapped_data_key_keeps_its_version() {
        let root = Root::Key(SecretKey::random());
        let mut wrapped = root.wrap(&DataKey::generate(1)).unwrap();
        wrapped[8] = 2;
        assert!(root.unwrap(&wrapped).is_err());
    }

    #[test]
    fn derived_keys_differ_from_the_data_key_and_each_other() {
        let key = DataKey::generate(1);
        let (secret, record, mac) = (key.secret.expose(), key.record.expose(), key.mac.0.expose());
        assert!(secret != record && record != mac && secret != mac);
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted") && !shown.contains(&format!("{secret:?}")));
    }
}
