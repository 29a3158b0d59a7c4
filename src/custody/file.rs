//! `keySource: {file: PATH}`: the root key is 32 random bytes in a file only the service
//! user can read, raw or base64 on one line.

use super::secret::{KEY_LEN, SecretKey, fill_random};
use super::{Credential, CustodyError, Initialised};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

pub fn init(path: &Path) -> Result<Initialised, CustodyError> {
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    fill_random(bytes.as_mut());
    let line = Zeroizing::new(format!("{}\n", STANDARD.encode(bytes.as_ref())));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => CustodyError::source(format!(
                "{} already exists; init never replaces a root key (what it wrapped would be \
                 lost). To start over, move it away yourself first",
                path.display()
            )),
            _ => CustodyError::source(format!(
                "cannot create the key file {}: {e}",
                path.display()
            )),
        })?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| {
            CustodyError::source(format!("cannot write the key file {}: {e}", path.display()))
        })?;
    Ok(Initialised {
        made: format!(
            "a root key in {} (mode 0600); back it up apart from the database",
            path.display()
        ),
        shares: Vec::new(),
    })
}

pub fn open(credential: &Credential) -> Result<SecretKey, CustodyError> {
    let path = credential.locate();
    let metadata = std::fs::metadata(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CustodyError::source(format!(
            "no key file at {}: `talos-kms-server key-source init --config FILE` makes one \
             (or restore it from your backup)",
            path.display()
        )),
        _ => CustodyError::source(format!("cannot read the key file {}: {e}", path.display())),
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CustodyError::source(format!(
            "the key file {} can be read by others (mode {mode:04o}): `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let content = Zeroizing::new(std::fs::read(&path).map_err(|e| {
        CustodyError::source(format!("cannot read the key file {}: {e}", path.display()))
    })?);
    parse(&content).ok_or_else(|| {
        CustodyError::source(format!(
            "the key file {} does not hold a key: it takes 32 random bytes, raw or base64 on \
             one line (`key-source init` writes one)",
            path.display()
        ))
    })
}

fn parse(content: &[u8]) -> Option<SecretKey> {
    if content.len() == KEY_LEN {
        return SecretKey::from_slice(content);
    }
    let text = std::str::from_utf8(content).ok()?.trim_ascii();
    let decoded = Zeroizing::new(STANDARD.decode(text).ok()?);
    SecretKey::from_slice(&decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn credential(path: &Path) -> Credential {
        Credential::new(path, Path::new("/"))
    }

    #[test]
    fn init_writes_a_key_that_opens_and_refuses_to_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        init(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = open(&credential(&path)).unwrap();
        let before = std::fs::read(&path).unwrap();
        let error = init(&path).unwrap_err().to_string();
        assert!(
            error.contains("already exists") && error.contains("never replaces"),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(open(&credential(&path)).unwrap().expose(), key.expose());
    }

    #[test]
    fn raw_and_base64_keys_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let base64 = dir.path().join("base64");
        for (path, content) in [
            (&raw, [7u8; 32].to_vec()),
            (
                &base64,
                format!("{}\n", STANDARD.encode([7u8; 32])).into_bytes(),
            ),
        ] {
            std::fs::write(path, content).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(open(&credential(path)).unwrap().expose(), &[7; 32]);
        }
    }

    #[test]
    fn bad_key_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let error = open(&credential(&path)).unwrap_err().to_string();
        assert!(
            error.contains("no key file") && error.contains("key-source init"),
            "{error}"
        );
        std::fs::write(&path, "short\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = open(&credential(&path)).unwrap_err().to_string();
        assert!(
            error.contains("does not hold a key") && error.contains("32"),
            "{error}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let error = open(&credential(&path)).unwrap_err().to_string();
        assert!(
            error.contains("mode 0640") && error.contains("chmod 600"),
            "{error}"
        );
    }
}
