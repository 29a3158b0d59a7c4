//! Moving every record and the policy state from one store to another (SQLite to
//! PostgreSQL and back), then proving the copy: same count, same checksum. Idempotent and
//! resumable: what the target already holds is skipped, so running it again finishes an
//! interrupted copy, and a finished one copies nothing.

use super::{RecordFilter, Store, StoreError, StoredRecord};
use crate::sealing::SealNonce;
use std::collections::HashMap;

/// Records per page read and per transaction written.
pub const PAGE: usize = 10_000;

#[derive(Debug, Default, serde::Serialize)]
pub struct MigrationReport {
    /// Records the source holds, all copied and verified.
    pub records: u64,
    /// Of those, added by this run (the others were there already).
    pub copied: u64,
    /// Records the target holds that the source does not (sealed there before).
    pub target_only: u64,
    /// Over every record but its last-access time, whatever the order: equal on both sides.
    pub checksum: String,
    pub approvals: u64,
    pub approvals_copied: u64,
    pub windows: u64,
    pub windows_copied: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the copy does not match: {missing} of the source's {records} records are missing from \
         the target and {different} differ (first: record {first}); the target holds other \
         records with the same ids, or the source changed meanwhile: stop the servers and run \
         it again, or migrate into an empty database"
    )]
    Mismatch {
        records: u64,
        missing: u64,
        different: u64,
        first: String,
    },
    #[error(
        "the target database holds other data keys ({name} differs): its records are wrapped \
         under another key source; migrate into an empty database"
    )]
    OtherKeys { name: String },
    #[error(
        "the target database's records are wrapped under a key source and the source's are \
         not: copied as they are, they would be refused there as forgeries. Migrate into an \
         empty database (a key source configured there wraps them while it serves), or import \
         them with `import-json --config` under the target's key source"
    )]
    UnwrappedIntoWrapped,
}

/// Copies key custody's values (wrapped data keys, markers) first: records wrapped under
/// them are worthless without them. A target with other values for the same names is refused.
async fn copy_custody(from: &dyn Store, to: &dyn Store) -> Result<(), MigrateError> {
    let there: HashMap<String, Vec<u8>> = to.custody_values().await?.into_iter().collect();
    let source = from.custody_values().await?;
    // Custody's values come with its first data key: a database with none has no custody.
    if !there.is_empty() && source.is_empty() && from.count().await? > 0 {
        return Err(MigrateError::UnwrappedIntoWrapped);
    }
    let mut missing = Vec::new();
    for (name, value) in source {
        match there.get(&name) {
            Some(held) if *held != value => return Err(MigrateError::OtherKeys { name }),
            Some(_) => {}
            None => missing.push((name, Some(value))),
        }
    }
    if !missing.is_empty() {
        to.set_custody_values(missing).await?;
    }
    Ok(())
}

/// A digest of what a record is, but for its last-access time (which unseals change).
fn digest(record: &StoredRecord) -> [u8; 32] {
    let info = &record.info;
    let mut bytes = Vec::with_capacity(96 + record.ciphertext.len());
    bytes.extend_from_slice(&info.id.to_be_bytes());
    bytes.extend_from_slice(&record.nonce);
    for text in [&info.node_uuid, &info.ip] {
        bytes.extend_from_slice(&(text.len() as u64).to_be_bytes());
        bytes.extend_from_slice(text.as_bytes());
    }
    bytes.extend_from_slice(&(record.ciphertext.len() as u64).to_be_bytes());
    bytes.extend_from_slice(&record.ciphertext);
    let custody = &record.custody;
    bytes.extend_from_slice(&custody.key_version.map_or(-1, i64::from).to_be_bytes());
    let tag = custody.tag.as_deref().unwrap_or_default();
    bytes.extend_from_slice(&(tag.len() as u64).to_be_bytes());
    bytes.extend_from_slice(tag);
    bytes.extend_from_slice(&info.created_at.to_be_bytes());
    bytes.extend_from_slice(&info.revoked_at.unwrap_or(i64::MIN).to_be_bytes());
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    let mut out = [0; 32];
    out.copy_from_slice(hash.as_ref());
    out
}

/// An order-independent sum of record digests.
#[derive(Default, PartialEq, Eq)]
struct Checksum([u64; 4]);

impl Checksum {
    fn add(&mut self, digest: &[u8; 32]) {
        for (lane, chunk) in self.0.iter_mut().zip(digest.chunks_exact(8)) {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            *lane = lane.wrapping_add(u64::from_be_bytes(word));
        }
    }

    fn hex(&self) -> String {
        self.0.iter().map(|lane| format!("{lane:016x}")).collect()
    }
}

/// Copies everything from `from` into `to`, then reads `to` back and compares. `progress`
/// sees (what, done, total) as pages go by.
pub async fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    progress: &mut dyn FnMut(&'static str, u64, u64),
) -> Result<MigrationReport, MigrateError> {
    let mut report = MigrationReport::default();
    copy_custody(from, to).await?;
    let total = from.count().await?;
    let all = RecordFilter::default();
    let mut source: HashMap<SealNonce, (i64, [u8; 32])> = HashMap::with_capacity(total as usize);
    let mut checksum = Checksum::default();
    let mut after = 0;
    loop {
        let page = from.export(&all, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.info.id;
        for record in &page {
            let digest = digest(record);
            checksum.add(&digest);
            source.insert(record.nonce, (record.info.id, digest));
        }
        report.copied += to.copy_records(&page).await?;
        report.records += page.len() as u64;
        progress("records copied", report.records, total.max(report.records));
        if page.len() < PAGE {
            break;
        }
    }

    let approvals = from.approvals(None).await?;
    report.approvals = approvals.len() as u64;
    report.approvals_copied = to.copy_approvals(&approvals).await?;
    let there = to.windows().await?;
    for window in from.windows().await? {
        report.windows += 1;
        if !there.iter().any(|w| w.operation == window.operation) {
            to.open_window(window).await?;
            report.windows_copied += 1;
        }
    }

    // Read the target back: every source record must be there, as it was.
    let (mut matched, mut different, mut first) = (0u64, 0u64, None);
    let mut target_checksum = Checksum::default();
    let mut read = 0;
    after = 0;
    loop {
        let page = to.export(&all, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.info.id;
        for record in &page {
            match source.remove(&record.nonce) {
                None => report.target_only += 1,
                Some((id, expected)) => {
                    let digest = digest(record);
                    if digest == expected {
                        matched += 1;
                        target_checksum.add(&digest);
                    } else {
                        different += 1;
                        first.get_or_insert_with(|| format!("{id} (target id {})", record.info.id));
                    }
                }
            }
        }
        read += page.len() as u64;
        progress("records verified", read, read.max(report.records));
        if page.len() < PAGE {
            break;
        }
    }
    if matched != report.records || target_checksum != checksum {
        // What is left of the source was not found in the target.
        let missing = source.len() as u64;
        let first = first.unwrap_or_else(|| {
            source
                .values()
                .map(|(id, _)| *id)
                .min()
                .map(|id| id.to_string())
                .unwrap_or_default()
        });
        return Err(MigrateError::Mismatch {
            records: report.records,
            missing,
            different,
            first,
        });
    }
    report.checksum = checksum.hex();
    Ok(report)
}
