//! Recovering a dead node's disk: read the `sideroKMS` token Talos keeps in a volume's LUKS2
//! header (docs/protocol.md §2), so that its blob can be unsealed as the node would, and check
//! the answer with cryptsetup, since a refused unseal answers random bytes by design.

mod cryptsetup;
pub mod luks2;

pub use cryptsetup::{Check, check_passphrase, find_cryptsetup};

use crate::os_error;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::fs::File;
use std::path::{Path, PathBuf};

/// The token type Talos gives its KMS tokens.
pub const TOKEN_TYPE: &str = "sideroKMS";
/// Nonce (12) and key (32): what this server's Seal answers.
pub const SEALED_LEN: usize = 44;

/// What stops a recovery, as one sentence with the fix. Never holds the passphrase.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("cannot read {path}: {problem}")]
    Read { path: PathBuf, problem: String },
    #[error("{0}")]
    NoHeader(String),
    #[error(
        "{path} has no sideroKMS token ({others}): none of its key slots was sealed by a KMS \
         (Talos writes one such token per KMS key), so this command cannot recover it"
    )]
    NoKmsToken { path: PathBuf, others: String },
    #[error("{path} has several sideroKMS tokens ({list}): choose one with --token ID")]
    SeveralTokens { path: PathBuf, list: String },
    #[error(
        "{path} has no token {id}: its sideroKMS tokens are {list}; choose one with --token ID"
    )]
    NoSuchToken {
        path: PathBuf,
        id: u32,
        list: String,
    },
    #[error(
        "token {id} of {path} is of type {kind}, not sideroKMS: choose a sideroKMS token ({list})"
    )]
    NotKmsToken {
        path: PathBuf,
        id: u32,
        kind: String,
        list: String,
    },
    #[error(
        "token {id} of {path} is damaged: {problem}; this key slot cannot be recovered through \
         the KMS, try the volume's other keys"
    )]
    BrokenBlob {
        path: PathBuf,
        id: u32,
        problem: String,
    },
    #[error("cannot write the key file {path}: {problem}")]
    KeyFile { path: PathBuf, problem: String },
}

/// A LUKS2 volume whose metadata could be read.
#[derive(Debug)]
pub struct Volume {
    pub path: PathBuf,
    pub header: luks2::Header,
    /// Why the primary header was not used, when the secondary was read instead.
    pub primary_flaw: Option<luks2::Flaw>,
}

/// A KMS token: its id (Talos uses the key slot's number), the key slots it names and the
/// sealed blob.
#[derive(Debug)]
pub struct KmsToken {
    pub id: u32,
    pub keyslots: Vec<String>,
    pub sealed: Vec<u8>,
}

/// Reads the LUKS2 metadata of a device or image, from whichever header copy is usable.
pub fn open(path: &Path) -> Result<Volume, RecoverError> {
    let read_error = |error: std::io::Error| {
        let fix = match error.kind() {
            std::io::ErrorKind::NotFound => {
                ": check the path (a partition such as /dev/sda6, or an image file)"
            }
            std::io::ErrorKind::PermissionDenied => {
                ": run as root (disks are readable by root and the disk group only)"
            }
            _ => "",
        };
        RecoverError::Read {
            path: path.to_path_buf(),
            problem: format!("{}{fix}", os_error::plain(&error)),
        }
    };
    let file = File::open(path).map_err(read_error)?;
    match luks2::read(&file).map_err(read_error)? {
        Ok(found) => Ok(Volume {
            path: path.to_path_buf(),
            header: found.header,
            primary_flaw: found.primary_flaw,
        }),
        Err(none) => Err(RecoverError::NoHeader(no_header(path, &none))),
    }
}

fn no_header(path: &Path, none: &luks2::NoHeader) -> String {
    use luks2::Flaw;
    let path = path.display();
    match (&none.primary, &none.secondary) {
        (Flaw::NoMagic, None) => format!(
            "{path} has no LUKS2 header (no LUKS magic at offset 0, nor a secondary header at \
             any offset LUKS2 allows): point --device at the encrypted partition itself (`lsblk \
             -f` shows it as crypto_LUKS), not at the whole disk"
        ),
        (Flaw::Version(1), None) => format!(
            "{path} is a LUKS1 volume: Talos encrypts with LUKS2 only, so no Talos KMS key can \
             be in it"
        ),
        (primary, secondary) => format!(
            "{path} has no usable LUKS2 header (primary at offset 0: {primary}; secondary: {}): \
             restore a header backup with `cryptsetup luksHeaderRestore`: without one, \
             cryptsetup cannot open this volume either",
            match secondary {
                Some(flaw) => flaw.to_string(),
                None => "none at any offset LUKS2 allows".into(),
            }
        ),
    }
}

impl Volume {
    /// Every token, `(id, type)`, by id.
    pub fn tokens(&self) -> Vec<(u32, String)> {
        let mut tokens: Vec<(u32, String)> = self
            .header
            .json
            .get("tokens")
            .and_then(|t| t.as_object())
            .into_iter()
            .flatten()
            .filter_map(|(id, token)| {
                let kind = token.get("type").and_then(|t| t.as_str()).unwrap_or("?");
                // Only the canonical text: "01" would be taken for token 1.
                let number: u32 = id.parse().ok().filter(|n: &u32| n.to_string() == *id)?;
                Some((number, kind.to_string()))
            })
            .collect();
        tokens.sort();
        tokens
    }

    /// The KMS token `choice`, or the only one when there is one.
    pub fn kms_token(&self, choice: Option<u32>) -> Result<KmsToken, RecoverError> {
        let tokens = self.tokens();
        let kms: Vec<u32> = tokens
            .iter()
            .filter(|(_, kind)| kind == TOKEN_TYPE)
            .map(|(id, _)| *id)
            .collect();
        let path = self.path.clone();
        let id = match (choice, kms.as_slice()) {
            (_, []) => {
                let others = if tokens.is_empty() {
                    "no tokens at all".to_string()
                } else {
                    let list: Vec<String> = tokens
                        .iter()
                        .map(|(id, kind)| format!("{id}: {kind}"))
                        .collect();
                    format!("its tokens: {}", list.join(", "))
                };
                return Err(RecoverError::NoKmsToken { path, others });
            }
            (None, [only]) => *only,
            (None, _) => {
                return Err(RecoverError::SeveralTokens {
                    path,
                    list: self.describe(&kms),
                });
            }
            (Some(id), _) => match tokens.iter().find(|(t, _)| *t == id) {
                None => {
                    return Err(RecoverError::NoSuchToken {
                        path,
                        id,
                        list: self.describe(&kms),
                    });
                }
                Some((_, kind)) if kind != TOKEN_TYPE => {
                    return Err(RecoverError::NotKmsToken {
                        path,
                        id,
                        kind: kind.clone(),
                        list: self.describe(&kms),
                    });
                }
                Some(_) => id,
            },
        };
        let token = &self.header.json["tokens"][id.to_string()];
        let broken = |problem: String| RecoverError::BrokenBlob {
            path: self.path.clone(),
            id,
            problem,
        };
        let text = token
            .get("UserData")
            .and_then(|u| u.get("sealedData"))
            .and_then(|s| s.as_str())
            .ok_or_else(|| broken("it has no UserData.sealedData text".into()))?;
        let sealed = BASE64
            .decode(text)
            .map_err(|e| broken(format!("its sealedData is not base64 ({e})")))?;
        if sealed.len() != SEALED_LEN {
            return Err(broken(format!(
                "its sealedData holds {} bytes, not the {SEALED_LEN} of a sealed blob (nonce 12, \
                 key 32)",
                sealed.len()
            )));
        }
        Ok(KmsToken {
            id,
            keyslots: keyslots(token),
            sealed,
        })
    }

    /// "0 for key slot 0, 1 for key slot 1": the key slots a token names say which is which.
    fn describe(&self, ids: &[u32]) -> String {
        let list: Vec<String> = ids
            .iter()
            .map(|id| {
                let slots = keyslots(&self.header.json["tokens"][id.to_string()]);
                match slots.as_slice() {
                    [] => format!("{id}"),
                    [slot] => format!("{id} for key slot {slot}"),
                    _ => format!("{id} for key slots {}", slots.join(" and ")),
                }
            })
            .collect();
        list.join(", ")
    }
}

fn keyslots(token: &serde_json::Value) -> Vec<String> {
    token
        .get("keyslots")
        .and_then(|k| k.as_array())
        .into_iter()
        .flatten()
        .filter_map(|slot| slot.as_str().map(String::from))
        .collect()
}

/// Writes the passphrase for `cryptsetup open --key-file`: mode 0600, no newline (cryptsetup
/// would take a newline as part of the passphrase).
pub fn write_key_file(path: &Path, passphrase: &str) -> Result<(), RecoverError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // An existing file keeps its mode on open: narrow it before the secret goes in.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(passphrase.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|error| RecoverError::KeyFile {
        path: path.to_path_buf(),
        problem: os_error::plain(&error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Caught by the luks2_token fuzz target: the blob of token "1" (not a KMS token) was
    /// returned for the KMS token "01".
    #[test]
    fn a_token_id_is_its_canonical_text() {
        let sealed = BASE64.encode([7u8; SEALED_LEN]);
        let user_data = serde_json::json!({ "sealedData": sealed });
        let volume = Volume {
            path: PathBuf::from("/dev/x"),
            header: luks2::Header {
                offset: 0,
                seqid: 0,
                json: serde_json::json!({ "tokens": {
                    "1": { "type": "luks2-keyring", "UserData": user_data },
                    "01": { "type": TOKEN_TYPE, "UserData": user_data },
                }}),
            },
            primary_flaw: None,
        };
        assert_eq!(volume.tokens(), [(1, "luks2-keyring".to_string())]);
        assert!(volume.kms_token(None).is_err());
    }
}
