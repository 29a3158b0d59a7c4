//! The encoding of the trail's tamper evidence: every line ends with `"prev"`, the
//! SHA-256 of the line before it (its bytes without the newline), and checkpoint lines
//! carry a MAC (or, without a key, a plain digest) over every byte since the checkpoint
//! before them.

use aws_lc_rs::{digest, hkdf, hmac};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The hash of a line; all zeros before the first line ever written.
pub type LineHash = [u8; 32];

pub const GENESIS: LineHash = [0; 32];

/// Base64 of 32 bytes.
const ENCODED_HASH: usize = 44;

pub fn hash_line(line: &[u8]) -> LineHash {
    let mut hash = GENESIS;
    hash.copy_from_slice(digest::digest(&digest::SHA256, line).as_ref());
    hash
}

/// Appends `"prev"` to a serialized JSON object (`{...}`): no allocation when `line` has
/// room for 54 more bytes.
pub fn append_prev(line: &mut Vec<u8>, prev: &LineHash) {
    debug_assert_eq!(line.last(), Some(&b'}'));
    line.pop();
    if line.len() > 1 {
        line.push(b',');
    }
    line.extend_from_slice(b"\"prev\":\"");
    let mut encoded = [0; ENCODED_HASH];
    let written = STANDARD
        .encode_slice(prev, &mut encoded)
        .unwrap_or_default();
    line.extend_from_slice(&encoded[..written]);
    line.extend_from_slice(b"\"}");
}

pub fn decode_hash(text: &str) -> Option<LineHash> {
    let mut hash = GENESIS;
    match STANDARD.decode_slice(text, &mut hash) {
        Ok(32) if text.len() == ENCODED_HASH => Some(hash),
        _ => None,
    }
}

/// Why a checkpoint was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Why {
    /// A minute (at most) after the checkpoint before, lines having been written since.
    Interval,
    /// The last line of a file about to be rotated.
    Rotation,
    /// The server stopped cleanly.
    Stop,
    /// The server started and found lines after the last checkpoint (a crash, or admin
    /// commands while it was stopped).
    Start,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::Interval => "interval",
            Why::Rotation => "rotation",
            Why::Stop => "stop",
            Why::Start => "start",
        }
    }
}

/// The `checkpoint` field of a checkpoint line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub why: Why,
    /// Lines since the checkpoint before (or the start of the file).
    pub lines: u64,
    pub keyed: bool,
    /// Base64 HMAC-SHA256 (keyed) or SHA-256 (not keyed) of [`mac_input`].
    pub mac: String,
}

/// A checkpoint line as stored.
#[derive(Deserialize)]
pub struct CheckpointLine {
    pub time: String,
    pub checkpoint: Checkpoint,
    pub prev: String,
}

/// Whether a line (with or without its newline) is a checkpoint line.
pub fn is_checkpoint(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.windows(14).any(|window| window == b"\"checkpoint\":{")
        && serde_json::from_slice::<CheckpointLine>(line).is_ok()
}

/// The key checkpoints are MAC'd with, derived from 32 secret bytes.
pub struct CheckpointKey(hmac::Key);

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointKey(<secret>)")
    }
}

/// The seam for a key source: any 32 secret bytes (today `auditKeyFile`, later the root
/// key) give the checkpoint key through HKDF-SHA256 with a label of its own, so the same
/// root key can feed other uses without the audit key revealing them.
pub fn checkpoint_key(secret: &[u8; 32]) -> CheckpointKey {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"").extract(secret);
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    let derived = prk
        .expand(&[b"talos-kms-server audit checkpoint v1"], Len)
        .and_then(|okm| okm.fill(&mut bytes[..]));
    // expand and fill fail only for a length over 255 hashes; 32 is one.
    debug_assert!(derived.is_ok());
    CheckpointKey(hmac::Key::new(hmac::HMAC_SHA256, &bytes[..]))
}

/// What a checkpoint's MAC covers: the bytes since the checkpoint before (whose own line is
/// chained to by the first of them), the line the checkpoint follows, and its own fields.
pub fn mac_input(covered: &LineHash, prev: &LineHash, time: &str, why: Why, lines: u64) -> Vec<u8> {
    let mut input = b"talos-kms-server audit checkpoint v1\n".to_vec();
    input.extend_from_slice(covered);
    input.extend_from_slice(prev);
    input.extend_from_slice(time.as_bytes());
    input.push(0);
    input.extend_from_slice(format!("{} {lines}", why.label()).as_bytes());
    input
}

pub fn seal_checkpoint(key: Option<&CheckpointKey>, input: &[u8]) -> String {
    match key {
        Some(CheckpointKey(key)) => STANDARD.encode(hmac::sign(key, input).as_ref()),
        None => STANDARD.encode(digest::digest(&digest::SHA256, input).as_ref()),
    }
}

/// Whether `mac` is the one `key` (or none) gives for `input`, in constant time.
pub fn checkpoint_matches(key: Option<&CheckpointKey>, input: &[u8], mac: &str) -> bool {
    let Ok(given) = STANDARD.decode(mac) else {
        return false;
    };
    match key {
        Some(CheckpointKey(key)) => hmac::verify(key, input, &given).is_ok(),
        None => digest::digest(&digest::SHA256, input).as_ref() == given.as_slice(),
    }
}

/// Reads an audit key file: 32 bytes, raw or base64 on one line, readable by its owner only.
pub fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<[u8; 32]>, String> {
    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|e| {
        format!(
            "cannot read the audit key file {shown} ({e}); create one with `talos-kms-server \
             audit init-key --config FILE`"
        )
    })?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "the audit key file {shown} can be read by others than its owner; `chmod 600 {shown}`"
        ));
    }
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("cannot read the audit key file {shown}: {e}"))?,
    );
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        key.copy_from_slice(&bytes);
        return Ok(key);
    }
    let text = std::str::from_utf8(&bytes).unwrap_or_default().trim();
    match STANDARD.decode_slice(text, &mut key[..]) {
        Ok(32) if text.len() == ENCODED_HASH => Ok(key),
        _ => Err(format!(
            "the audit key file {shown} holds neither 32 raw bytes nor 32 bytes in base64; \
             make a new one with `talos-kms-server audit init-key` (after moving it away)"
        )),
    }
}

/// Writes 32 random bytes, base64, to a new file of mode 0600; never replaces one.
pub fn create_key_file(path: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut key[..])
        .map_err(|_| "no random bytes from the system".to_string())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "the audit key file {} exists already; it is not replaced (checkpoints written \
                 with it could no longer be verified)",
                path.display()
            ),
            _ => format!("cannot create the audit key file {}: {e}", path.display()),
        })?;
    let text = zeroize::Zeroizing::new(format!("{}\n", STANDARD.encode(&key[..])));
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write the audit key file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prev_is_appended_as_the_last_field_and_reads_back() {
        let prev = hash_line(b"{\"time\":\"x\"}");
        let mut line = br#"{"time":"t","action":"seal"}"#.to_vec();
        line.reserve(64);
        let capacity = line.capacity();
        append_prev(&mut line, &prev);
        assert_eq!(
            line.capacity(),
            capacity,
            "no allocation with room reserved"
        );
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["action"], "seal");
        assert_eq!(decode_hash(value["prev"].as_str().unwrap()), Some(prev));
    }

    #[test]
    fn a_hash_that_is_not_32_bytes_of_base64_is_refused() {
        let good = STANDARD.encode([7u8; 32]);
        assert_eq!(decode_hash(&good), Some([7; 32]));
        assert_eq!(decode_hash(&good[..40]), None);
        assert_eq!(decode_hash(&STANDARD.encode([7u8; 31])), None);
        assert_eq!(
            decode_hash("not base64 at all, not at all, no no no ..."),
            None
        );
    }

    #[test]
    fn a_checkpoint_is_bound_to_its_key_its_lines_and_its_fields() {
        let key = checkpoint_key(&[1; 32]);
        let other = checkpoint_key(&[2; 32]);
        let input = mac_input(&[3; 32], &[4; 32], "2026-12-06T00:00:00.000Z", Why::Stop, 5);
        let mac = seal_checkpoint(Some(&key), &input);
        assert!(checkpoint_matches(Some(&key), &input, &mac));
        assert!(!checkpoint_matches(Some(&other), &input, &mac));
        assert!(!checkpoint_matches(None, &input, &mac));
        for changed in [
            mac_input(&[9; 32], &[4; 32], "2026-12-06T00:00:00.000Z", Why::Stop, 5),
            mac_input(&[3; 32], &[9; 32], "2026-12-06T00:00:00.000Z", Why::Stop, 5),
            mac_input(&[3; 32], &[4; 32], "2026-12-06T00:00:01.000Z", Why::Stop, 5),
            mac_input(
                &[3; 32],
                &[4; 32],
                "2026-12-06T00:00:00.000Z",
                Why::Start,
                5,
            ),
            mac_input(&[3; 32], &[4; 32], "2026-12-06T00:00:00.000Z", Why::Stop, 6),
        ] {
            assert!(!checkpoint_matches(Some(&key), &changed, &mac));
        }
        let digest = seal_checkpoint(None, &input);
        assert!(checkpoint_matches(None, &input, &digest));
        assert!(!checkpoint_matches(Some(&key), &input, &digest));
    }

    #[test]
    fn key_files_are_read_raw_or_base64_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        create_key_file(&path).unwrap();
        let key = read_key_file(&path).unwrap();
        let error = create_key_file(&path).unwrap_err();
        assert!(error.contains("exists already"), "{error}");
        assert_eq!(*read_key_file(&path).unwrap(), *key, "not replaced");
        let raw = dir.path().join("raw.key");
        std::fs::write(&raw, [5u8; 32]).unwrap();
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*read_key_file(&raw).unwrap(), [5; 32]);
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_key_file(&raw).unwrap_err().contains("chmod 600"));
        std::fs::write(&path, "short").unwrap();
        assert!(read_key_file(&path).unwrap_err().contains("neither"));
    }
}
