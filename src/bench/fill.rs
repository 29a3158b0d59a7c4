//! Fills a database or a legacy JSON file with valid records, to measure at scale. The
//! records are real seals (AES-256-GCM, unique nonces) whose keys are thrown away.

use super::{Volume, volumes};
use crate::sealing;
use crate::store::legacy_json;
use crate::store::{ImportBatch, ImportReport, NewRecord, Store, StoreError, now};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Records per transaction: large enough to amortise the commit, small enough for memory.
const CHUNK: usize = 50_000;

/// Record number `index`: node `fill-<index>` sealed from `ip`, or from a 10.x.y.z address
/// of its own; with the node's half, to unseal it later.
fn record(index: u64, ip: Option<&str>) -> Option<(NewRecord, Volume)> {
    let node_uuid = format!("fill-{index:012}");
    let ip = ip.map_or_else(
        || {
            format!(
                "10.{}.{}.{}",
                (index >> 16) & 0xff,
                (index >> 8) & 0xff,
                index & 0xff
            )
        },
        str::to_string,
    );
    let passphrase = crate::client::random_passphrase();
    // With a working RNG and AEAD this cannot fail; a failed seal is simply skipped.
    let sealed = sealing::seal(&node_uuid, &ip, &passphrase).ok()?;
    let volume = Volume {
        node_uuid: node_uuid.clone(),
        passphrase: passphrase.to_vec(),
        sealed: sealed.blob.to_vec(),
    };
    let record = NewRecord {
        nonce: sealed.nonce,
        node_uuid,
        ip,
        ciphertext: sealed.ciphertext,
        created_at: now(),
        last_access: None,
        custody: Default::default(),
    };
    Some((record, volume))
}

/// Where fill's records can be unsealed from, and where to write their volumes.
#[derive(Default)]
pub struct FillOptions<'a> {
    /// The address text every record is bound to (see [`crate::sealing::ip_text`]); a
    /// 10.x.y.z address per record by default, which no benchmark can unseal from.
    pub ip: Option<String>,
    /// A volumes file to write (see [`super::volumes`]), for `bench --volumes-from`.
    pub volumes: Option<&'a mut dyn std::io::Write>,
}

/// The records of `range`, their volumes written to `options.volumes`.
fn records(
    range: std::ops::Range<u64>,
    options: &mut FillOptions<'_>,
) -> std::io::Result<Vec<NewRecord>> {
    let mut records = Vec::with_capacity((range.end - range.start) as usize);
    for index in range {
        let Some((record, volume)) = record(index, options.ip.as_deref()) else {
            continue;
        };
        if let Some(out) = options.volumes.as_mut() {
            volumes::write(out, &volume)?;
        }
        records.push(record);
    }
    Ok(records)
}

/// Adds `count` records to the store; returns how many were new.
pub async fn fill_store(store: &dyn Store, count: u64) -> Result<ImportReport, FillError> {
    fill_store_with(store, count, FillOptions::default()).await
}

/// [`fill_store`], with the records bound to an address and their volumes written out.
pub async fn fill_store_with(
    store: &dyn Store,
    count: u64,
    mut options: FillOptions<'_>,
) -> Result<ImportReport, FillError> {
    let mut total = ImportReport::default();
    let mut next = 0u64;
    while next < count {
        let end = (next + CHUNK as u64).min(count);
        let records = records(next..end, &mut options)?;
        let report = store
            .import(ImportBatch {
                records,
                fingerprint: None,
            })
            .await?;
        total.imported += report.imported;
        total.skipped += report.skipped;
        next = end;
    }
    if let Some(out) = options.volumes.as_mut() {
        out.flush()?;
    }
    Ok(total)
}

/// Writes a legacy JSON database of `count` records.
pub fn write_legacy_json(
    path: &Path,
    count: u64,
    mut options: FillOptions<'_>,
) -> Result<(), FillError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut out = BufWriter::new(file);
    let records = records(0..count, &mut options)?;
    legacy_json::write_records(&mut out, &records)?;
    out.flush()?;
    if let Some(out) = options.volumes.as_mut() {
        out.flush()?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}
