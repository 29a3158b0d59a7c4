//! Volumes files: one JSON object per line, `{"node_uuid","sealed","passphrase"}` with the
//! two secrets in base64, as `client seal --output json` prints and `fill --volumes` writes.
//! `bench --volumes-from` unseals them, so that a measurement adds no record to the server.

use super::{BenchError, Volume};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::io::Write;
use std::path::Path;

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    node_uuid: String,
    sealed: String,
    passphrase: String,
}

/// Reads a volumes file; errors name the file, the line and the field.
pub fn read(path: &Path) -> Result<Vec<Volume>, BenchError> {
    let at = |line: usize, problem: String| {
        BenchError::Setup(format!(
            "volumes file {} line {line}: {problem}; each line must be {{\"node_uuid\", \
             \"sealed\", \"passphrase\"}} as `client seal --output json` prints",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        BenchError::Setup(format!(
            "cannot read the volumes file {}: {e}",
            path.display()
        ))
    })?;
    let mut volumes = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // serde_json's message names the field and never quotes the secret values.
        let parsed: Line = serde_json::from_str(line).map_err(|e| at(index + 1, e.to_string()))?;
        let decode = |field: &str, value: &str| {
            BASE64
                .decode(value.trim())
                .map_err(|_| at(index + 1, format!("`{field}` is not base64")))
        };
        volumes.push(Volume {
            sealed: decode("sealed", &parsed.sealed)?,
            passphrase: decode("passphrase", &parsed.passphrase)?,
            node_uuid: parsed.node_uuid,
        });
    }
    if volumes.is_empty() {
        return Err(BenchError::Setup(format!(
            "the volumes file {} holds no volume: make one with `fill --volumes FILE` or \
             `client seal --output json >> FILE`",
            path.display()
        )));
    }
    Ok(volumes)
}

/// Writes one volume as a line.
pub fn write(out: &mut impl Write, volume: &Volume) -> std::io::Result<()> {
    let line = Line {
        node_uuid: volume.node_uuid.clone(),
        sealed: BASE64.encode(&volume.sealed),
        passphrase: BASE64.encode(&volume.passphrase),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

/// Creates a new volumes file readable by its owner only: it holds passphrases.
pub fn create(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}
