//! Changing keys beside running servers: a new data key version (servers pick it up within
//! seconds and re-wrap older records in the background), the data keys re-wrapped under a
//! new root, and a version destroyed for good (crypto-shredding).

use super::keyring::{self, Keyring};
use super::{CustodyError, Root};
use crate::store::Store;

/// Adds data key version v+1; returns it. New seals use it once servers reload their keys
/// (within seconds); their background pass then re-wraps every older record.
pub async fn rotate_data_key(store: &dyn Store, root: &Root) -> Result<u32, CustodyError> {
    let mut keyring = Keyring::unwrap_all(root, &store.custody_values().await?)?;
    if keyring.is_empty() {
        return Err(no_keys());
    }
    let (version, (name, value)) = keyring.add_version(root)?;
    let value = value.expect("a new data key has a value");
    if !store.add_custody_values(vec![(name, value)]).await? {
        return Err(CustodyError::Source(format!(
            "data key v{version} was made meanwhile by another rotation; nothing was changed"
        )));
    }
    Ok(version)
}

/// Re-wraps every data key under `new`, in one transaction; records are not touched.
/// Returns the versions re-wrapped.
pub async fn rotate_root(
    store: &dyn Store,
    old: &Root,
    new: &Root,
) -> Result<Vec<u32>, CustodyError> {
    let keyring = Keyring::unwrap_all(old, &store.custody_values().await?)?;
    if keyring.is_empty() {
        return Err(no_keys());
    }
    let values = keyring.rewrapped_under(new)?;
    // Proves the new root opens what it wrapped before anything is written.
    let written: Vec<(String, Vec<u8>)> = values
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), value.clone()?)))
        .collect();
    if Keyring::unwrap_all(new, &written)?.versions() != keyring.versions() {
        return Err(CustodyError::Source(
            "the new key source did not open what it wrapped; nothing was changed".into(),
        ));
    }
    store.set_custody_values(values).await?;
    Ok(keyring.versions())
}

/// What [`destroy_data_key`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Destroyed {
    /// Records wrapped under the version, unreadable from now on.
    pub records: u64,
}

/// Removes data key `version` for good. Refuses the current version, and a version records
/// still use unless `shred` (they are then unreadable for good).
pub async fn destroy_data_key(
    store: &dyn Store,
    root: &Root,
    version: u32,
    shred: bool,
) -> Result<Destroyed, CustodyError> {
    let keyring = Keyring::unwrap_all(root, &store.custody_values().await?)?;
    if keyring.get(version).is_none() {
        return Err(CustodyError::Source(format!(
            "there is no data key v{version}; `check` lists the versions there are"
        )));
    }
    if keyring.current().map(|key| key.version()) == Some(version) {
        return Err(CustodyError::Source(format!(
            "v{version} is the current data key, which new seals use: run `keys \
             rotate-data-key` first, and destroy v{version} once no record uses it"
        )));
    }
    let records = store
        .key_versions()
        .await?
        .into_iter()
        .find(|(v, _)| *v == Some(version))
        .map_or(0, |(_, count)| count);
    if records > 0 && !shred {
        return Err(CustodyError::Source(format!(
            "{records} records are still wrapped under v{version} (servers re-wrap them in \
             the background after a rotation: wait, or add --shred to make them unreadable \
             for good)"
        )));
    }
    store
        .set_custody_values(vec![
            (keyring::data_key_name(version), None),
            (keyring::destroyed_name(version), Some(Vec::new())),
        ])
        .await?;
    Ok(Destroyed { records })
}

fn no_keys() -> CustodyError {
    CustodyError::Source(
        "the database has no data key yet: start the server with this keySource once".into(),
    )
}
