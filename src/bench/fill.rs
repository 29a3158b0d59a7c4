//! Fills a database or a legacy JSON file with valid records, to measure at scale. The
//! records are real seals (AES-256-GCM, unique nonces) whose keys are thrown away.

use crate::sealing;
use crate::store::legacy_json;
use crate::store::{ImportBatch, ImportReport, NewRecord, Store, StoreError, now};
use std::io::BufWriter;
use std::path::Path;

/// Records per transaction: large enough to amortise the commit, small enough for memory.
const CHUNK: usize = 50_000;

/// Record number `index`: node `fill-<index>` sealed from a 10.x.y.z address.
fn record(index: u64) -> NewRecord {
    let node_uuid = format!("fill-{index:012}");
    let ip = format!(
        "10.{}.{}.{}",
        (index >> 16) & 0xff,
        (index >> 8) & 0xff,
        index & 0xff
    );
    let passphrase = crate::client::random_passphrase();
    // With a working RNG and AEAD this cannot fail; a failed seal is simply skipped.
    let sealed = sealing::seal(&node_uuid, &ip, &passphrase);
    let (nonce, ciphertext) = match sealed {
        Ok(sealed) => (sealed.nonce, sealed.ciphertext),
        Err(_) => ([0u8; sealing::NONCE_LEN], Vec::new()),
    };
    NewRecord {
        nonce,
        node_uuid,
        ip,
        ciphertext,
        created_at: now(),
        last_access: None,
    }
}

/// Adds `count` records to the store; returns how many were new.
pub async fn fill_store(store: &dyn Store, count: u64) -> Result<ImportReport, StoreError> {
    let mut total = ImportReport::default();
    let mut next = 0u64;
    while next < count {
        let end = (next + CHUNK as u64).min(count);
        let records = (next..end)
            .map(record)
            .filter(|r| !r.ciphertext.is_empty())
            .collect();
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
    Ok(total)
}

/// Writes a legacy JSON database of `count` records.
pub fn write_legacy_json(path: &Path, count: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut out = BufWriter::new(file);
    let records: Vec<NewRecord> = (0..count).map(record).collect();
    legacy_json::write_records(&mut out, &records)?;
    std::io::Write::flush(&mut out)
}
