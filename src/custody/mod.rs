//! Key custody: where the root key comes from (a key source: a file, a TPM, an HSM or
//! operators' shares) and the key hierarchy below it — versioned data keys wrapped by the
//! root, records sealed in an envelope under a data key, and MACs over the fields the policy
//! trusts.
//!
//! The [`Custodian`] stands between the service and the store: records are wrapped and rows
//! authenticated where they enter and leave it, so that neither store knows a key source
//! exists (README, "Key custody").

pub mod admin_socket;
mod custodian;
mod envelope;
mod file;
mod hierarchy;
mod keyring;
mod mac;
mod pkcs11;
pub mod rotation;
mod secret;
pub mod shamir;
#[cfg(feature = "tpm2")]
mod tpm2;
mod unsealing;

pub use custodian::Custodian;
pub use envelope::{Envelope, MAX_RECORD_LEN, RecordBinding, open_record, seal_record};
pub use hierarchy::{DataKey, Root, WRAPPED_LEN};
pub use keyring::DATA_KEY_PREFIX;
pub use mac::{MacKey, TAG_LEN, encode_fields};
pub use secret::{KEY_LEN, SecretKey, memory_lock_shortfall};
pub use unsealing::{Answer, BeforeServing, Unsealing};

use std::path::{Path, PathBuf};

/// The config's `keySource`, validated; paths resolved against the config's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySourceConfig {
    /// 32 bytes, raw or base64 on one line.
    File(Credential),
    /// The root key sealed to a TPM 2.0, its public and private parts in `sealed_object`.
    Tpm2 {
        tcti: String,
        pcrs: Vec<u8>,
        sealed_object: PathBuf,
    },
    /// A non-extractable AES-256 key inside a PKCS#11 token.
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        key_label: String,
        pin_file: Credential,
    },
    /// The root key split among operators: `threshold` of `shares` rebuild it.
    Shamir { threshold: u8, shares: u8 },
}

pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The sealed TPM object's file name, beside the config, when `sealedObject` is not set.
pub const DEFAULT_SEALED_OBJECT: &str = "root-key.tpm2";

/// A secret file named in the config. A bare name (no `/`) is looked up first in
/// `$CREDENTIALS_DIRECTORY`, where systemd's `LoadCredential=`/`LoadCredentialEncrypted=`
/// put credentials, then beside the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub name: Option<String>,
    pub path: PathBuf,
}

impl Credential {
    pub fn new(written: &Path, base: &Path) -> Credential {
        let text = written.to_string_lossy();
        let name = (!text.contains('/') && !text.is_empty()).then(|| text.into_owned());
        let path = if written.is_relative() {
            base.join(written)
        } else {
            written.to_path_buf()
        };
        Credential { name, path }
    }

    /// Where to read it now: the systemd credential when there is one by this name.
    pub fn locate(&self) -> PathBuf {
        if let (Some(name), Some(directory)) =
            (&self.name, std::env::var_os("CREDENTIALS_DIRECTORY"))
        {
            let credential = Path::new(&directory).join(name);
            if credential.exists() {
                return credential;
            }
        }
        self.path.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Malformed(&'static str),
    #[error("{0} failed authentication: altered in the store, or written under another key")]
    Forged(&'static str),
    #[error("the record's data key v{0} was destroyed (`keys destroy-data-key`)")]
    Shredded(u32),
    #[error("record is sealed under data key v{found}, not v{given}")]
    WrongVersion { found: u32, given: u32 },
    #[error(
        "data key v{version} does not unwrap under this root key: the key source is not the \
         one that wrapped it (another key file, TPM, token or set of shares), or the wrapped key \
         was altered"
    )]
    WrongRoot { version: u32 },
}

impl CustodyError {
    fn source(message: impl Into<String>) -> CustodyError {
        CustodyError::Source(message.into())
    }
}

impl KeySourceConfig {
    /// One line for `check` and logs: which source, and where.
    pub fn describe(&self) -> String {
        match self {
            KeySourceConfig::File(file) => match &file.name {
                Some(name) => format!(
                    "file {name} (systemd credential, else {})",
                    file.path.display()
                ),
                None => format!("file {}", file.path.display()),
            },
            KeySourceConfig::Tpm2 {
                tcti,
                pcrs,
                sealed_object,
            } => format!(
                "tpm2 at {tcti}, sealed object {}{}",
                sealed_object.display(),
                if pcrs.is_empty() {
                    String::new()
                } else {
                    format!(", bound to PCRs {pcrs:?} (sha256)")
                }
            ),
            KeySourceConfig::Pkcs11 {
                module,
                token_label,
                key_label,
                ..
            } => format!(
                "pkcs11 key {key_label:?} on token {token_label:?} through {}",
                module.display()
            ),
            KeySourceConfig::Shamir { threshold, shares } => {
                format!("shamir: {threshold} of {shares} operators' shares")
            }
        }
    }

    /// Makes the root key (or the HSM key) for this source. Refuses to replace one.
    pub fn init(&self) -> Result<Initialised, CustodyError> {
        match self {
            KeySourceConfig::File(file) => file::init(&file.path),
            KeySourceConfig::Tpm2 {
                tcti,
                pcrs,
                sealed_object,
            } => {
                #[cfg(feature = "tpm2")]
                return tpm2::init(tcti, pcrs, sealed_object);
                #[cfg(not(feature = "tpm2"))]
                return Err(no_tpm2_support(tcti, pcrs, sealed_object));
            }
            KeySourceConfig::Pkcs11 {
                module,
                token_label,
                key_label,
                pin_file,
            } => pkcs11::init(module, token_label, key_label, pin_file),
            KeySourceConfig::Shamir { threshold, shares } => shamir::init(*threshold, *shares),
        }
    }

    /// Reaches the source and yields what wraps the data keys. Shamir has nothing to reach:
    /// its root key comes from [`shamir::combine`].
    pub fn open(&self) -> Result<Root, CustodyError> {
        match self {
            KeySourceConfig::File(file) => file::open(file).map(Root::Key),
            KeySourceConfig::Tpm2 {
                tcti,
                pcrs,
                sealed_object,
            } => {
                #[cfg(feature = "tpm2")]
                return tpm2::unseal(tcti, pcrs, sealed_object).map(Root::Key);
                #[cfg(not(feature = "tpm2"))]
                return Err(no_tpm2_support(tcti, pcrs, sealed_object));
            }
            KeySourceConfig::Pkcs11 {
                module,
                token_label,
                key_label,
                pin_file,
            } => pkcs11::open(module, token_label, key_label, pin_file).map(Root::Hsm),
            KeySourceConfig::Shamir { threshold, .. } => Err(CustodyError::source(format!(
                "a shamir key source opens only with {threshold} operators' shares"
            ))),
        }
    }
}

#[cfg(not(feature = "tpm2"))]
fn no_tpm2_support(_: &str, _: &[u8], _: &Path) -> CustodyError {
    CustodyError::source(
        "this build has no TPM 2.0 support: build it with `--features tpm2` (Debian: \
         libtss2-dev), or choose another keySource",
    )
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialised {
    /// Where the key now is, in words.
    pub made: String,
    /// Shamir only: the shares, to hand out once, one per operator.
    pub shares: Vec<String>,
}

/// Whether the configured key source opens the data keys among `values` (a backup's, a
/// database's): the versions it opens. Without a key source, data keys are refused (their
/// records would be unreadable); a shamir source cannot be checked without its shares.
pub fn check_data_keys(
    values: &[(String, Vec<u8>)],
    source: Option<&KeySourceConfig>,
) -> Result<Vec<u32>, CustodyError> {
    let wrapped = values
        .iter()
        .any(|(name, _)| name.starts_with(keyring::DATA_KEY_PREFIX));
    match source {
        None if wrapped => Err(CustodyError::Source(
            "its records are wrapped under a key source, but the config has no `keySource`: \
             configure the key source that wrapped them"
                .into(),
        )),
        None | Some(KeySourceConfig::Shamir { .. }) => Ok(Vec::new()),
        Some(source) => Ok(keyring::Keyring::unwrap_all(&source.open()?, values)?.versions()),
    }
}

/// The store to serve or administer, and its custodian when a key source is configured.
pub struct Guarded {
    pub store: std::sync::Arc<dyn crate::store::Store>,
    pub custodian: Option<std::sync::Arc<Custodian>>,
}

/// Puts `store` under the configured key source: opened (file, tpm2, pkcs11) or sealed
/// until operators' shares come (shamir). Without a key source, a database whose records
/// were wrapped is refused rather than served as if it held nothing.
pub async fn guard(
    store: std::sync::Arc<dyn crate::store::Store>,
    source: Option<&KeySourceConfig>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<Guarded, CustodyError> {
    let Some(source) = source else {
        let values = store.custody_values().await?;
        if values
            .iter()
            .any(|(name, _)| name.starts_with(keyring::DATA_KEY_PREFIX))
        {
            return Err(CustodyError::Source(
                "the database's records are wrapped under a key source, but the config has no \
                 `keySource`: configure the key source that wrapped them (README, \"Key \
                 custody\")"
                    .into(),
            ));
        }
        return Ok(Guarded {
            store,
            custodian: None,
        });
    };
    let custodian = match source {
        KeySourceConfig::Shamir { .. } => Custodian::sealed(store, metrics),
        _ => Custodian::open(store, source.open()?, metrics).await?,
    };
    Ok(Guarded {
        store: custodian.clone(),
        custodian: Some(custodian),
    })
}
