//! The legacy server's database: one JSON array rewritten on every request (docs/protocol.md §5).
//!
//! The configured file is only ever read. Its records are taken over into the store, so that
//! nodes sealed by the legacy server keep booting; `export-json` writes a new file in the same
//! format, so that a migration can be undone.

use super::{ImportBatch, ImportReport, NewRecord, Store, StoreError, StoredRecord, UnixTime};
use crate::os_error::plain;
use crate::sealing::{NONCE_LEN, TAG_LEN};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use time::PrimitiveDateTime;
use time::macros::format_description;

/// `yyyy-MM-dd HH:mm:ss`, UTC.
const TIMESTAMP: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

#[derive(Debug, thiserror::Error)]
#[error("legacy database {path}: {problem}")]
pub struct LegacyError {
    pub path: String,
    pub problem: String,
}

/// A record as read, before its fields are decoded.
struct LegacyRecord {
    node_uuid: String,
    ip_address: String,
    cipher_text_b64: String,
    nonce_b64: String,
    last_access: Option<String>,
    created_at: Option<String>,
}

/// A record as the legacy server wrote it, fields in its order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LegacyRecordOut<'a> {
    node_uuid: &'a str,
    ip_address: &'a str,
    cipher_text_b64: String,
    nonce_b64: String,
    last_access: Option<String>,
    created_at: String,
}

/// What a take-over did.
#[derive(Debug, PartialEq, Eq)]
pub enum TakeOver {
    /// No file, or one without records (logged here): nothing to take over.
    NoFile,
    /// This exact content was imported before; it was not parsed again.
    Unchanged,
    Imported(ImportReport),
}

/// Reads a legacy file into an import batch. `Ok(None)` when it does not exist; an empty
/// file has no records.
pub fn read(path: &Path) -> Result<Option<ImportBatch>, LegacyError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(path, format!("cannot read it: {e}"))),
    };
    let records = parse(&bytes).map_err(|problem| error(path, problem))?;
    Ok(Some(ImportBatch {
        records,
        fingerprint: Some(fingerprint(&bytes)),
    }))
}

/// Imports the legacy file at `path` unless this exact content was imported before or it
/// holds no records. The file is never modified.
pub async fn take_over(store: &dyn Store, path: &Path) -> Result<TakeOver, TakeOverError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TakeOver::NoFile),
        Err(e) => return Err(error(path, format!("cannot read it: {e}")).into()),
    };
    if is_empty(&bytes) {
        // The legacy server starts with an empty file; say so rather than stay silent.
        tracing::info!(
            file = %path.display(),
            "legacy database is empty: nothing to take over"
        );
        return Ok(TakeOver::NoFile);
    }
    let fingerprint = fingerprint(&bytes);
    if store.has_imported(&fingerprint).await? {
        return Ok(TakeOver::Unchanged);
    }
    let records = parse(&bytes).map_err(|problem| error(path, problem))?;
    let report = store
        .import(ImportBatch {
            records,
            fingerprint: Some(fingerprint),
        })
        .await?;
    Ok(TakeOver::Imported(report))
}

#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error(transparent)]
    Legacy(#[from] LegacyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses the content of a legacy file. Errors name the record (numbered from 1, with its
/// node UUID when it has one) and the field at fault.
pub fn parse(bytes: &[u8]) -> Result<Vec<NewRecord>, String> {
    if is_empty(bytes) {
        return Ok(Vec::new());
    }
    // A generic value first, so that a bad record is named rather than the whole array.
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a valid legacy database ({e}); restore it from a backup, or remove \
             `nodeDbFile` from the config if there is nothing to take over"
        )
    })?;
    let Value::Array(elements) = value else {
        return Err(
            "not a valid legacy database (expected a JSON array of records); restore \
                    it from a backup, or remove `nodeDbFile` from the config if there is \
                    nothing to take over"
                .into(),
        );
    };
    elements
        .iter()
        .enumerate()
        .map(|(index, element)| {
            let number = index + 1;
            let name = match element.get("nodeUuid").and_then(Value::as_str) {
                Some(uuid) => format!("record #{number} (nodeUuid {uuid})"),
                None => format!("record #{number}"),
            };
            fields(element)
                .and_then(convert)
                .map_err(|problem| format!("{name}: {problem}"))
        })
        .collect()
}

/// Whether a file holds no records at all: 0 bytes, whitespace, or an empty array.
fn is_empty(bytes: &[u8]) -> bool {
    let text = bytes.trim_ascii();
    text.is_empty()
        || (text.first() == Some(&b'[')
            && text.last() == Some(&b']')
            && text[1..text.len() - 1].trim_ascii().is_empty())
}

fn fields(element: &Value) -> Result<LegacyRecord, String> {
    let Value::Object(object) = element else {
        return Err("not a JSON object; each record must be {\"nodeUuid\": ..., ...}".into());
    };
    let required = |name: &str| match object.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        None | Some(Value::Null) => Err(format!("field `{name}` is missing")),
        Some(_) => Err(format!("field `{name}` is not a string")),
    };
    let optional = |name: &str| match object.get(name) {
        Some(Value::String(text)) => Ok(Some(text.clone())),
        None | Some(Value::Null) => Ok(None),
        Some(_) => Err(format!("field `{name}` is not a string")),
    };
    Ok(LegacyRecord {
        node_uuid: required("nodeUuid")?,
        ip_address: required("ipAddress")?,
        cipher_text_b64: required("cipherTextB64")?,
        nonce_b64: required("nonceB64")?,
        last_access: optional("lastAccess")?,
        created_at: optional("createdAt")?,
    })
}

fn convert(record: LegacyRecord) -> Result<NewRecord, String> {
    let nonce = BASE64
        .decode(&record.nonce_b64)
        .map_err(|e| format!("field `nonceB64` is not base64 ({e})"))?;
    let nonce = <[u8; NONCE_LEN]>::try_from(nonce.as_slice()).map_err(|_| {
        format!(
            "field `nonceB64` holds {} bytes, expected {NONCE_LEN}",
            nonce.len()
        )
    })?;
    let ciphertext = BASE64
        .decode(&record.cipher_text_b64)
        .map_err(|e| format!("field `cipherTextB64` is not base64 ({e})"))?;
    if ciphertext.len() < TAG_LEN {
        return Err(format!(
            "field `cipherTextB64` holds {} bytes, shorter than the {TAG_LEN}-byte GCM tag",
            ciphertext.len()
        ));
    }
    let created_at = match &record.created_at {
        Some(text) => parse_timestamp(text).map_err(|e| format!("field `createdAt`: {e}"))?,
        None => super::now(),
    };
    let last_access = record
        .last_access
        .as_deref()
        .map(parse_timestamp)
        .transpose()
        .map_err(|e| format!("field `lastAccess`: {e}"))?;
    Ok(NewRecord {
        nonce,
        node_uuid: record.node_uuid,
        ip: record.ip_address,
        ciphertext,
        created_at,
        last_access,
        custody: Default::default(),
    })
}

/// Writes records in the legacy server's format, so that its JSON can be produced again.
pub fn write_records<'a>(
    out: &mut impl Write,
    records: impl IntoIterator<Item = &'a NewRecord>,
) -> std::io::Result<()> {
    let mut first = true;
    out.write_all(b"[")?;
    for record in records {
        let entry = LegacyRecordOut {
            node_uuid: &record.node_uuid,
            ip_address: &record.ip,
            cipher_text_b64: BASE64.encode(&record.ciphertext),
            nonce_b64: BASE64.encode(record.nonce),
            last_access: record.last_access.map(format_timestamp),
            created_at: format_timestamp(record.created_at),
        };
        write_entry(out, first, &entry)?;
        first = false;
    }
    out.write_all(b" ]\n")
}

fn write_entry(out: &mut impl Write, first: bool, entry: &LegacyRecordOut) -> std::io::Result<()> {
    out.write_all(if first { b" " } else { b", " })?;
    serde_json::to_writer_pretty(&mut *out, entry)?;
    Ok(())
}

/// A legacy file being exported: written under a temporary name beside its path (mode
/// 0600), and renamed into place by [`LegacyExport::finish`] once complete and on disk, so
/// that no reader ever sees half a file under its name.
pub struct LegacyExport {
    path: PathBuf,
    replace: bool,
    out: BufWriter<tempfile::NamedTempFile>,
    first: bool,
}

impl LegacyExport {
    /// Starts the file; an existing one is replaced at the end only with `replace`.
    pub fn create(path: &Path, replace: bool) -> Result<LegacyExport, LegacyError> {
        let directory = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.unwrap_or_default()))
            .suffix(".partial")
            .tempfile_in(directory)
            .map_err(|e| {
                error(
                    path,
                    format!("cannot create a file beside it: {}", plain(&e)),
                )
            })?;
        let mut out = BufWriter::new(temp);
        out.write_all(b"[")
            .map_err(|e| error(path, format!("cannot write it: {}", plain(&e))))?;
        Ok(LegacyExport {
            path: path.to_path_buf(),
            replace,
            out,
            first: true,
        })
    }

    /// Adds a record as the legacy server wrote it. A record never unsealed gets its
    /// creation time as `lastAccess`, as the legacy server wrote at seal time.
    pub fn write(&mut self, record: &StoredRecord) -> Result<(), LegacyError> {
        let info = &record.info;
        let entry = LegacyRecordOut {
            node_uuid: &info.node_uuid,
            ip_address: &info.ip,
            cipher_text_b64: BASE64.encode(&record.ciphertext),
            nonce_b64: BASE64.encode(record.nonce),
            last_access: Some(format_timestamp(info.last_used())),
            created_at: format_timestamp(info.created_at),
        };
        write_entry(&mut self.out, self.first, &entry)
            .map_err(|e| error(&self.path, format!("cannot write it: {}", plain(&e))))?;
        self.first = false;
        Ok(())
    }

    /// Ends the array, flushes the file to disk and renames it into place; returns its size.
    pub fn finish(mut self) -> Result<u64, LegacyError> {
        let path = self.path;
        let io_error =
            |what: &str, e: std::io::Error| error(&path, format!("{what}: {}", plain(&e)));
        self.out
            .write_all(if self.first { b"]\n" } else { b" ]\n" })
            .map_err(|e| io_error("cannot write it", e))?;
        let temp = self
            .out
            .into_inner()
            .map_err(|e| io_error("cannot write it", e.into_error()))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| io_error("cannot flush it to disk", e))?;
        let bytes = temp
            .as_file()
            .metadata()
            .map_err(|e| io_error("cannot flush it to disk", e))?
            .len();
        let placed = if self.replace {
            temp.persist(&path)
        } else {
            temp.persist_noclobber(&path)
        };
        placed.map_err(|e| match e.error.kind() {
            std::io::ErrorKind::AlreadyExists => error(
                &path,
                "appeared while the export was written; nothing was replaced, choose another \
                 name"
                    .into(),
            ),
            _ => io_error("cannot put it in place", e.error),
        })?;
        // The rename must survive a power cut too.
        let directory = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(directory)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("cannot flush its directory to disk", e))?;
        Ok(bytes)
    }
}

pub fn parse_timestamp(text: &str) -> Result<UnixTime, String> {
    PrimitiveDateTime::parse(text, TIMESTAMP)
        .map(|t| t.assume_utc().unix_timestamp())
        .map_err(|e| format!("{text:?} is not yyyy-MM-dd HH:mm:ss ({e})"))
}

pub fn format_timestamp(at: UnixTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| t.format(TIMESTAMP).ok())
        .unwrap_or_default()
}

fn fingerprint(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn error(path: &Path, problem: String) -> LegacyError {
    LegacyError {
        path: path.display().to_string(),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"[ {
      "nodeUuid" : "213faf71-17a0-43d7-a88b-0afd96094178",
      "ipAddress" : "10.0.0.201",
      "cipherTextB64" : "CZVlmwwkZcUjNd0JBcqWqR6BxGh3iGerVwYg6B6gYPpIDQvoIpxHj0nnHiEA0X8n",
      "nonceB64" : "Lh1oTReoyx4mI3Y8",
      "lastAccess" : "2025-10-11 20:22:24",
      "createdAt" : "2025-10-11 20:22:17"
    } ]"#;

    #[test]
    fn parses_the_legacy_example() {
        let records = parse(RECORD.as_bytes()).unwrap();
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.node_uuid, "213faf71-17a0-43d7-a88b-0afd96094178");
        assert_eq!(record.ip, "10.0.0.201");
        assert_eq!(record.ciphertext.len(), 48);
        assert_eq!(format_timestamp(record.created_at), "2025-10-11 20:22:17");
        assert_eq!(
            record.last_access.map(format_timestamp).unwrap(),
            "2025-10-11 20:22:24"
        );
    }

    #[test]
    fn written_records_parse_back() {
        let records = parse(RECORD.as_bytes()).unwrap();
        let mut out = Vec::new();
        write_records(&mut out, &records).unwrap();
        let again = parse(&out).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].nonce, records[0].nonce);
        assert_eq!(again[0].ciphertext, records[0].ciphertext);
        assert_eq!(again[0].created_at, records[0].created_at);
        assert_eq!(again[0].last_access, records[0].last_access);
    }

    #[test]
    fn an_export_parses_back_with_the_seal_time_as_last_access_when_never_unsealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.json");
        let record = |id, last_access| StoredRecord {
            info: crate::store::RecordInfo {
                id,
                node_uuid: format!("node-{id}"),
                ip: "10.0.0.1".into(),
                created_at: 1_760_214_137,
                last_access,
                revoked_at: None,
            },
            nonce: [id as u8; NONCE_LEN],
            ciphertext: vec![id as u8; 48],
            custody: Default::default(),
        };
        let mut export = LegacyExport::create(&path, false).unwrap();
        export.write(&record(1, None)).unwrap();
        export.write(&record(2, Some(1_760_214_144))).unwrap();
        export.finish().unwrap();
        let again = parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].last_access, Some(1_760_214_137));
        assert_eq!(again[1].last_access, Some(1_760_214_144));
        assert_eq!(again[1].nonce, [2; NONCE_LEN]);
        assert_eq!(again[1].ciphertext, vec![2; 48]);
        assert!(
            LegacyExport::create(&path, false)
                .unwrap()
                .finish()
                .is_err()
        );
        let empty = dir.path().join("empty.json");
        LegacyExport::create(&empty, false)
            .unwrap()
            .finish()
            .unwrap();
        assert!(parse(&std::fs::read(&empty).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn empty_file_has_no_records() {
        assert!(parse(b"").unwrap().is_empty());
        assert!(parse(b" \n").unwrap().is_empty());
        assert!(parse(b"[]").unwrap().is_empty());
        assert!(parse(b" [ \n ] ").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_record_and_field() {
        let bad = RECORD.replace("Lh1oTReoyx4mI3Y8", "AAAA");
        let problem = parse(bad.as_bytes()).err().unwrap();
        assert!(
            problem.contains("record #1 (nodeUuid 213faf71-17a0-43d7-a88b-0afd96094178)")
                && problem.contains("field `nonceB64`"),
            "{problem}"
        );
        let bad = RECORD.replace("2025-10-11 20:22:17", "yesterday");
        let problem = parse(bad.as_bytes()).err().unwrap();
        assert!(problem.contains("createdAt"), "{problem}");
        let problem = parse(b"[{").err().unwrap();
        assert!(problem.contains("not a valid legacy database"), "{problem}");
        let problem = parse(b"{}").err().unwrap();
        assert!(problem.contains("expected a JSON array"), "{problem}");
    }

    #[test]
    fn a_missing_or_mistyped_field_names_its_record() {
        let two = format!(
            "[ {}, {} ]",
            &RECORD[1..RECORD.len() - 1],
            r#"{ "nodeUuid": 7 }"#
        );
        let problem = parse(two.as_bytes()).err().unwrap();
        assert_eq!(problem, "record #2: field `nodeUuid` is not a string");
        let missing = RECORD.replace(r#""nonceB64" : "Lh1oTReoyx4mI3Y8","#, "");
        let problem = parse(missing.as_bytes()).err().unwrap();
        assert_eq!(
            problem,
            "record #1 (nodeUuid 213faf71-17a0-43d7-a88b-0afd96094178): field `nonceB64` is missing"
        );
        let problem = parse(b"[ 3 ]").err().unwrap();
        assert!(
            problem.starts_with("record #1: not a JSON object"),
            "{problem}"
        );
    }
}
