//! `keySource: {pkcs11: {...}}`: a non-extractable AES-256 key inside an HSM (any PKCS#11
//! token) wraps and unwraps the data keys with AES-256-GCM; the root key never leaves it.

use super::secret::SecretKey;
use super::{Credential, CustodyError, Initialised};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// An open, logged-in session with the wrapping key's handle.
pub struct HsmKey {
    session: Mutex<Session>,
    key: ObjectHandle,
    describe: String,
}

impl fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HsmKey({})", self.describe)
    }
}

impl HsmKey {
    pub(super) fn encrypt(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, CustodyError> {
        let mut iv = *nonce;
        let params =
            GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| self.failed("wrap", e))?;
        self.session()?
            .encrypt(&Mechanism::AesGcm(params), self.key, plain)
            .map_err(|e| self.failed("wrap a data key with", e))
    }

    pub(super) fn decrypt(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
        version: u32,
    ) -> Result<SecretKey, CustodyError> {
        let mut iv = *nonce;
        let params =
            GcmParams::new(&mut iv, aad, 128.into()).map_err(|e| self.failed("unwrap", e))?;
        let plain = Zeroizing::new(
            self.session()?
                .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
                .map_err(|e| match e {
                    // SoftHSM2 answers a GCM tag that does not match with CKR_GENERAL_ERROR.
                    Pkcs11Error::Pkcs11(
                        RvError::EncryptedDataInvalid | RvError::GeneralError,
                        _,
                    ) => CustodyError::WrongRoot { version },
                    e => self.failed("unwrap a data key with", e),
                })?,
        );
        SecretKey::from_slice(&plain).ok_or(CustodyError::WrongRoot { version })
    }

    fn session(&self) -> Result<std::sync::MutexGuard<'_, Session>, CustodyError> {
        self.session
            .lock()
            .map_err(|_| CustodyError::source("the HSM session was poisoned by a panic"))
    }

    fn failed(&self, what: &str, error: Pkcs11Error) -> CustodyError {
        CustodyError::source(format!("cannot {what} {}: {error}", self.describe))
    }
}

pub fn init(
    module: &Path,
    token_label: &str,
    key_label: &str,
    pin_file: &Credential,
) -> Result<Initialised, CustodyError> {
    let session = log_in(module, token_label, pin_file)?;
    if !find_keys(&session, key_label, token_label)?.is_empty() {
        return Err(CustodyError::source(format!(
            "token {token_label:?} already holds a key labelled {key_label:?}; init never \
             replaces it (what it wrapped would be lost). Use it as it is, or choose another \
             keyLabel"
        )));
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Label(key_label.as_bytes().to_vec()),
    ];
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(|e| {
            CustodyError::source(format!(
                "token {token_label:?} could not make an AES-256 key: {e}"
            ))
        })?;
    Ok(Initialised {
        made: format!(
            "a non-extractable AES-256 key {key_label:?} on token {token_label:?}; back up the \
             token as its vendor says"
        ),
        shares: Vec::new(),
    })
}

pub fn open(
    module: &Path,
    token_label: &str,
    key_label: &str,
    pin_file: &Credential,
) -> Result<HsmKey, CustodyError> {
    let session = log_in(module, token_label, pin_file)?;
    let key = match find_keys(&session, key_label, token_label)?.as_slice() {
        [key] => *key,
        [] => {
            return Err(CustodyError::source(format!(
                "token {token_label:?} holds no key labelled {key_label:?}: `talos-kms-server \
                 key-source init --config FILE` makes one"
            )));
        }
        _ => {
            return Err(CustodyError::source(format!(
                "token {token_label:?} holds several keys labelled {key_label:?}; keep one, or \
                 name another keyLabel"
            )));
        }
    };
    Ok(HsmKey {
        session: Mutex::new(session),
        key,
        describe: format!("key {key_label:?} on token {token_label:?}"),
    })
}

fn log_in(
    module: &Path,
    token_label: &str,
    pin_file: &Credential,
) -> Result<Session, CustodyError> {
    let pin_path = pin_file.locate();
    let pin = Zeroizing::new(std::fs::read_to_string(&pin_path).map_err(|e| {
        CustodyError::source(format!(
            "cannot read the token's PIN from {}: {e}",
            pin_path.display()
        ))
    })?);
    let pin = pin.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(CustodyError::source(format!(
            "the PIN file {} is empty; write the token's user PIN in it (mode 0600)",
            pin_path.display()
        )));
    }
    let pkcs11 = Pkcs11::new(module).map_err(|e| {
        CustodyError::source(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(CustodyError::source(format!(
                "the PKCS#11 module {} failed to start: {e}",
                module.display()
            )));
        }
    }
    let unreachable = |e: Pkcs11Error| {
        CustodyError::source(format!(
            "cannot reach the tokens of {}: {e}",
            module.display()
        ))
    };
    let mut labels = Vec::new();
    let mut found = None;
    for slot in pkcs11.get_slots_with_token().map_err(unreachable)? {
        let label = pkcs11
            .get_token_info(slot)
            .map_err(unreachable)?
            .label()
            .to_string();
        if label == token_label {
            found = Some(slot);
            break;
        }
        labels.push(label);
    }
    let slot = found.ok_or_else(|| {
        CustodyError::source(format!(
            "no token labelled {token_label:?} through {} (tokens: {labels:?}); check \
             tokenLabel, or initialise the token",
            module.display()
        ))
    })?;
    let session = pkcs11.open_rw_session(slot).map_err(unreachable)?;
    // The login is the application's, not the session's: a second key source in the same
    // process finds the token logged in already.
    let login = match session.login(UserType::User, Some(&AuthPin::from(pin))) {
        Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        other => other,
    };
    login.map_err(|e| match e {
        Pkcs11Error::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _) => {
            CustodyError::source(format!(
                "token {token_label:?} refused the PIN from {}: it is wrong; write the \
                     user PIN there (too many tries lock the token)",
                pin_path.display()
            ))
        }
        Pkcs11Error::Pkcs11(RvError::PinLocked, _) => CustodyError::source(format!(
            "token {token_label:?} is locked after too many wrong PINs; unlock it with the \
                 security officer's PIN"
        )),
        e => CustodyError::source(format!("cannot log in to token {token_label:?}: {e}")),
    })?;
    Ok(session)
}

fn find_keys(
    session: &Session,
    key_label: &str,
    token_label: &str,
) -> Result<Vec<ObjectHandle>, CustodyError> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| CustodyError::source(format!("cannot search token {token_label:?}: {e}")))
}
