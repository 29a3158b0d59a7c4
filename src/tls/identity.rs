//! Loading the server's certificate chain and private key from the files the legacy config
//! names, with errors that say which file is wrong and what to do about it.
//!
//! Keys may be PKCS#8 (plain, or encrypted with `serverKeyPassword` as `openssl pkcs8 -topk8`
//! writes it: PBES2 with PBKDF2 and AES-CBC), PKCS#1 RSA or SEC1 EC. The encrypted form is
//! decrypted with aws-lc-rs, the same provider that does everything else.

use super::provider;
use aws_lc_rs::cipher::{
    AES_128, AES_192, AES_256, DecryptionContext, PaddedBlockDecryptingKey, UnboundCipherKey,
};
use aws_lc_rs::pbkdf2;
use pkcs8::der::Decode;
use pkcs8::pkcs5::pbes2::{self, Pbkdf2Prf};
use pkcs8::{EncryptedPrivateKeyInfoRef, pkcs5};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

/// A certificate chain or key is a few KiB; 1 MiB is plenty for any chain.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

const ENCRYPTED_BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_END: &str = "-----END ENCRYPTED PRIVATE KEY-----";
const REENCRYPT_HINT: &str = "re-encrypt it with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in \
                              plain.key -out server.key`, or store it unencrypted (mode 0600)";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(String);

/// Loads and checks the certificate chain and key: the key must be usable and must match
/// the first certificate.
pub fn load_identity(
    cert_file: &Path,
    key_file: &Path,
    key_password: Option<&str>,
) -> Result<Arc<CertifiedKey>, IdentityError> {
    let cert_pem = read_bounded(cert_file).map_err(|e| {
        IdentityError(format!(
            "serverCertFile {}: cannot read it ({e}); check the path and that this user may read it",
            cert_file.display()
        ))
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            IdentityError(format!(
                "serverCertFile {}: not valid PEM ({e}); it must hold the server certificate \
                 followed by its chain, PEM-encoded",
                cert_file.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(IdentityError(format!(
            "serverCertFile {}: no CERTIFICATE found; it must hold the server certificate \
             followed by its chain, PEM-encoded",
            cert_file.display()
        )));
    }
    let key = load_private_key(key_file, key_password)?;
    let provider = provider();
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        IdentityError(format!(
            "serverKeyFile {}: unusable key ({e}); use an RSA (2048 bits or more), ECDSA \
             P-256/P-384 or Ed25519 key",
            key_file.display()
        ))
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(IdentityError(format!(
                "serverKeyFile {} does not match the certificate in serverCertFile {}; install \
                 the key the certificate was issued for",
                key_file.display(),
                cert_file.display()
            )));
        }
        Err(e) => {
            return Err(IdentityError(format!(
                "serverCertFile {}: the first certificate is unusable ({e}); it must be the \
                 server's own certificate, followed by its chain",
                cert_file.display()
            )));
        }
    }
    Ok(Arc::new(certified))
}

fn load_private_key(
    key_file: &Path,
    password: Option<&str>,
) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let fail =
        |problem: String| IdentityError(format!("serverKeyFile {}: {problem}", key_file.display()));
    let pem = read_bounded(key_file)
        .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
        .map_err(|e| {
            fail(format!(
                "cannot read it ({e}); check the path and that this user may read it"
            ))
        })?;
    if let Some(start) = pem.find(ENCRYPTED_BEGIN) {
        let end = pem[start..]
            .find(ENCRYPTED_END)
            .map(|end| start + end + ENCRYPTED_END.len())
            .ok_or_else(|| fail("the ENCRYPTED PRIVATE KEY block has no END line".into()))?;
        let password = password.filter(|p| !p.is_empty()).ok_or_else(|| {
            fail("the key is encrypted; set serverKeyPassword to its password".into())
        })?;
        return decrypt_pkcs8(&pem[start..end], password).map_err(fail);
    }
    if pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(fail(format!(
            "the key uses OpenSSL's legacy PEM encryption; {REENCRYPT_HINT}"
        )));
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        fail(format!(
            "no private key found ({e}); expected a PEM PRIVATE KEY, ENCRYPTED PRIVATE KEY, \
             RSA PRIVATE KEY or EC PRIVATE KEY block"
        ))
    })
}

/// Reads a certificate or key file if it is a regular file (after following links) of at
/// most [`MAX_FILE_SIZE`]: a FIFO put in its place would block the reader, and a link to
/// `/dev/zero` would fill memory.
pub fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO must not wait for a writer.
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a FIFO, a device or a directory); it must be a PEM file",
        ));
    }
    let too_big = || {
        std::io::Error::other(format!(
            "larger than {} MiB, far more than a certificate chain or key needs",
            MAX_FILE_SIZE >> 20
        ))
    };
    if metadata.len() > MAX_FILE_SIZE {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    // The file may grow while it is read.
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Decrypts a PEM `ENCRYPTED PRIVATE KEY` (PKCS#8 with PBES2: PBKDF2 + AES-CBC).
fn decrypt_pkcs8(pem: &str, password: &str) -> Result<PrivateKeyDer<'static>, String> {
    let (_, der) = pkcs8::der::pem::decode_vec(pem.as_bytes())
        .map_err(|e| format!("the ENCRYPTED PRIVATE KEY block is not valid PEM ({e})"))?;
    let info = EncryptedPrivateKeyInfoRef::from_der(&der)
        .map_err(|e| format!("the ENCRYPTED PRIVATE KEY is malformed ({e})"))?;
    let params = match &info.encryption_algorithm {
        pkcs5::EncryptionScheme::Pbes2(params) => params,
        _ => {
            return Err(format!(
                "the key is encrypted with an obsolete PBES1 scheme; {REENCRYPT_HINT}"
            ));
        }
    };
    let pbkdf2_params = params.kdf.pbkdf2().ok_or_else(|| {
        format!(
            "the key's password is stretched with scrypt, which is not supported; {REENCRYPT_HINT}"
        )
    })?;
    let prf = match pbkdf2_params.prf {
        Pbkdf2Prf::HmacWithSha1 => pbkdf2::PBKDF2_HMAC_SHA1,
        Pbkdf2Prf::HmacWithSha256 => pbkdf2::PBKDF2_HMAC_SHA256,
        Pbkdf2Prf::HmacWithSha384 => pbkdf2::PBKDF2_HMAC_SHA384,
        Pbkdf2Prf::HmacWithSha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        other => {
            return Err(format!(
                "unsupported PBKDF2 hash {other:?}; {REENCRYPT_HINT}"
            ));
        }
    };
    let (cipher, key_len, iv) = match params.encryption {
        pbes2::EncryptionScheme::Aes128Cbc { iv } => (&AES_128, 16, iv),
        pbes2::EncryptionScheme::Aes192Cbc { iv } => (&AES_192, 24, iv),
        pbes2::EncryptionScheme::Aes256Cbc { iv } => (&AES_256, 32, iv),
        other => {
            return Err(format!(
                "unsupported cipher {:?}; {REENCRYPT_HINT}",
                other.oid()
            ));
        }
    };
    let iterations = NonZeroU32::new(pbkdf2_params.iteration_count)
        .ok_or("the key's PBKDF2 iteration count is zero")?;
    let mut key = vec![0u8; key_len];
    pbkdf2::derive(
        prf,
        iterations,
        pbkdf2_params.salt.as_bytes(),
        password.as_bytes(),
        &mut key,
    );
    let wrong_password =
        || "serverKeyPassword does not decrypt the key (wrong password?)".to_string();
    let decrypting = UnboundCipherKey::new(cipher, &key)
        .and_then(PaddedBlockDecryptingKey::cbc_pkcs7)
        .map_err(|_| "cannot set up AES-CBC for the key".to_string())?;
    let mut buffer = info.encrypted_data.as_bytes().to_vec();
    let plain_len = decrypting
        .decrypt(&mut buffer, DecryptionContext::Iv128(iv.into()))
        .map_err(|_| wrong_password())?
        .len();
    buffer.truncate(plain_len);
    // A wrong password can still produce valid padding by chance; the PKCS#8 structure cannot.
    pkcs8::PrivateKeyInfoRef::from_der(&buffer).map_err(|_| wrong_password())?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(buffer)))
}
