//! `keySource: {tpm2: {...}}`: the root key sealed to a TPM 2.0 (tss-esapi over the system's
//! tpm2-tss), optionally to the SHA-256 values of some PCRs. The sealed object's public and
//! private parts live in a file (`sealedObject`); only that TPM can load it, and only while
//! the PCRs hold the values they held at `init`.
//!
//! The parent is the owner hierarchy's ECC P-256 storage key, re-derived at each start from
//! the TPM's seed, so nothing but the sealed object is stored.

use super::secret::{KEY_LEN, SecretKey, fill_random};
use super::{CustodyError, Initialised};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use tss_esapi::Context;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"TKMSTPM1";

pub fn init(tcti: &str, pcrs: &[u8], sealed_object: &Path) -> Result<Initialised, CustodyError> {
    if sealed_object.exists() {
        return Err(CustodyError::source(format!(
            "{} already exists; init never replaces the sealed root key (what it wrapped \
             would be lost). To start over, move it away yourself first",
            sealed_object.display()
        )));
    }
    let mut context = connect(tcti)?;
    let failed = |what: &str, e: tss_esapi::Error| {
        CustodyError::source(format!("the TPM at {tcti} failed to {what}: {e}"))
    };
    let parent = storage_key(&mut context, tcti)?;
    let policy = match pcr_selection(pcrs)? {
        None => None,
        Some(selection) => {
            let session = policy_session(&mut context, SessionType::Trial, tcti)?;
            context
                .policy_pcr(session, Digest::default(), selection)
                .map_err(|e| failed("compute the PCR policy", e))?;
            let digest = context
                .policy_get_digest(session)
                .map_err(|e| failed("compute the PCR policy", e))?;
            context
                .flush_context(tss_esapi::handles::SessionHandle::from(session).into())
                .map_err(|e| failed("close a session", e))?;
            Some(digest)
        }
    };
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        // With a PCR policy, the policy is the only way to unseal.
        .with_user_with_auth(policy.is_none())
        .build()
        .map_err(|e| failed("describe the sealed object", e))?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| failed("describe the sealed object", e))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    fill_random(key.as_mut());
    let sensitive = SensitiveData::try_from(key.to_vec()).map_err(|e| failed("take the key", e))?;
    let created = context
        .execute_with_nullauth_session(|ctx| {
            ctx.create(parent, public, None, Some(sensitive), None, None)
        })
        .map_err(|e| failed("seal the root key", e))?;
    let public = created
        .out_public
        .marshall()
        .map_err(|e| failed("encode the sealed object", e))?;
    let private = created.out_private.value();
    let mut bytes = Vec::with_capacity(16 + public.len() + private.len());
    bytes.extend_from_slice(MAGIC);
    for part in [&public[..], private] {
        bytes.extend_from_slice(&(part.len() as u32).to_be_bytes());
        bytes.extend_from_slice(part);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(sealed_object)
        .and_then(|mut file| file.write_all(&bytes).and_then(|()| file.sync_all()))
        .map_err(|e| {
            CustodyError::source(format!(
                "cannot write the sealed object {}: {e}",
                sealed_object.display()
            ))
        })?;
    Ok(Initialised {
        made: format!(
            "a root key sealed to the TPM at {tcti}{}, in {}; only this TPM can unseal it: \
             keep a second key source or a backup plan for a replaced board",
            if pcrs.is_empty() {
                String::new()
            } else {
                format!(" and PCRs {pcrs:?}")
            },
            sealed_object.display()
        ),
        shares: Vec::new(),
    })
}

pub fn unseal(tcti: &str, pcrs: &[u8], sealed_object: &Path) -> Result<SecretKey, CustodyError> {
    let bytes = std::fs::read(sealed_object).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CustodyError::source(format!(
            "no sealed root key at {}: `talos-kms-server key-source init --config FILE` makes \
             one (or restore it from your backup)",
            sealed_object.display()
        )),
        _ => CustodyError::source(format!(
            "cannot read the sealed root key {}: {e}",
            sealed_object.display()
        )),
    })?;
    let (public, private) = parse(&bytes).ok_or_else(|| {
        CustodyError::source(format!(
            "{} is not a sealed root key (damaged, or not written by `key-source init`)",
            sealed_object.display()
        ))
    })?;
    let mut context = connect(tcti)?;
    let parent = storage_key(&mut context, tcti)?;
    let object = context
        .execute_with_nullauth_session(|ctx| ctx.load(parent, private, public))
        .map_err(|e| {
            CustodyError::source(format!(
                "the TPM at {tcti} cannot load the sealed root key {}: it was sealed by \
                 another TPM, or this TPM was cleared since ({e}). Use the TPM it was made on",
                sealed_object.display()
            ))
        })?;
    let unsealed = match pcr_selection(pcrs)? {
        None => context.execute_with_nullauth_session(|ctx| ctx.unseal(object.into())),
        Some(selection) => {
            let session = policy_session(&mut context, SessionType::Policy, tcti)?;
            context
                .policy_pcr(session, Digest::default(), selection)
                .and_then(|()| {
                    context
                        .execute_with_session(Some(session.into()), |ctx| ctx.unseal(object.into()))
                })
        }
    }
    .map_err(|e| {
        CustodyError::source(format!(
            "the TPM at {tcti} refuses to unseal the root key{}: ({e})",
            if pcrs.is_empty() {
                String::new()
            } else {
                format!(
                    "; PCRs {pcrs:?} no longer hold the values it was sealed to (firmware, \
                     boot loader or kernel changed?), or `pcrs` differs from the one at init"
                )
            }
        ))
    })?;
    let secret = Zeroizing::new(unsealed.value().to_vec());
    SecretKey::from_slice(&secret).ok_or_else(|| {
        CustodyError::source(format!(
            "the TPM unsealed {} bytes from {}, not a 32-byte root key",
            secret.len(),
            sealed_object.display()
        ))
    })
}

fn parse(bytes: &[u8]) -> Option<(Public, Private)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let (public, rest) = take_part(rest)?;
    let (private, rest) = take_part(rest)?;
    if !rest.is_empty() {
        return None;
    }
    Some((
        Public::unmarshall(public).ok()?,
        Private::try_from(private.to_vec()).ok()?,
    ))
}

fn take_part(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = bytes.split_first_chunk::<4>()?;
    let length = u32::from_be_bytes(*length) as usize;
    (rest.len() >= length).then(|| rest.split_at(length))
}

fn connect(tcti: &str) -> Result<Context, CustodyError> {
    let name = TctiNameConf::from_str(tcti).map_err(|e| {
        CustodyError::source(format!(
            "tcti {tcti:?} is not a TCTI (e.g. device:/dev/tpmrm0, \
             swtpm:host=127.0.0.1,port=2321): {e}"
        ))
    })?;
    Context::new(name).map_err(|e| {
        CustodyError::source(format!(
            "cannot reach the TPM at {tcti}: {e}; is it there, and may this user open it \
             (group tss for /dev/tpmrm0)?"
        ))
    })
}

/// The owner hierarchy's storage key, the same on every start of the same TPM.
fn storage_key(context: &mut Context, tcti: &str) -> Result<KeyHandle, CustodyError> {
    let failed = |e: tss_esapi::Error| {
        CustodyError::source(format!(
            "the TPM at {tcti} cannot make its storage key: {e}"
        ))
    };
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(true)
        .with_restricted(true)
        .build()
        .map_err(failed)?;
    let parameters = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(failed)?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(failed)?;
    context
        .execute_with_nullauth_session(|ctx| {
            ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
        })
        .map(|created| created.key_handle)
        .map_err(failed)
}

fn pcr_selection(pcrs: &[u8]) -> Result<Option<PcrSelectionList>, CustodyError> {
    if pcrs.is_empty() {
        return Ok(None);
    }
    let slots = pcrs
        .iter()
        .map(|&pcr| {
            PcrSlot::try_from(1u32 << pcr)
                .map_err(|_| CustodyError::source(format!("PCR {pcr} does not exist (0 to 23)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map(Some)
        .map_err(|e| CustodyError::source(format!("PCRs {pcrs:?}: {e}")))
}

fn policy_session(
    context: &mut Context,
    kind: SessionType,
    tcti: &str,
) -> Result<PolicySession, CustodyError> {
    let failed = |e: String| {
        CustodyError::source(format!(
            "the TPM at {tcti} cannot start a policy session: {e}"
        ))
    };
    let session = context
        .start_auth_session(
            None,
            None,
            None,
            kind,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| failed(e.to_string()))?
        .ok_or_else(|| failed("no session".into()))?;
    PolicySession::try_from(session).map_err(|e| failed(e.to_string()))
}
