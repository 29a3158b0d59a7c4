//! The vanished-file guard: SQLite keeps working on a file it has open after that file is
//! deleted, renamed or replaced, so the store checks that the configured path still leads to
//! the file it opened before trusting a commit or a lookup that found nothing.

use crate::store::StoreError;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The database file as opened, and the path the operator knows it by. A commit to a file
/// that was deleted, or moved where the next start will not look, would be lost on restart.
pub(super) struct OpenedFile {
    pub(super) path: PathBuf,
    /// Held open to ask the kernel about the very file SQLite opened.
    handle: fs::File,
    device: u64,
    inode: u64,
    /// What happened to the file, once it was found gone; never cleared.
    lost: OnceLock<String>,
}

impl OpenedFile {
    pub(super) fn open(path: &Path) -> std::io::Result<Self> {
        let handle = fs::File::open(path)?;
        // Shared by every user of the database; `db restore` needs it exclusively.
        rustix::fs::flock(&handle, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(
            |_| {
                std::io::Error::other(
                    "is being restored (`db restore` holds it); wait for it to finish",
                )
            },
        )?;
        let metadata = handle.metadata()?;
        Ok(Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            handle,
            device: metadata.dev(),
            inode: metadata.ino(),
            lost: OnceLock::new(),
        })
    }

    /// A flag check only: for reads, whose file cannot lose what they find.
    pub(super) fn not_lost(&self) -> Result<(), StoreError> {
        match self.lost.get() {
            Some(_) => Err(self.lost_error()),
            None => Ok(()),
        }
    }

    /// Whether the configured path still leads to the opened file; the first time it does
    /// not, the store is marked lost and the reason logged.
    pub(super) fn verify(&self) -> Result<(), StoreError> {
        self.not_lost()?;
        let Some(problem) = self.problem() else {
            return Ok(());
        };
        if self.lost.set(problem).is_ok() {
            tracing::error!(
                "{}; restore the file to its path (or restore a backup), then restart the server",
                self.lost_error()
            );
        }
        Err(self.lost_error())
    }

    pub(super) fn problem(&self) -> Option<String> {
        let deleted = self.handle.metadata().is_ok_and(|m| m.nlink() == 0);
        match fs::metadata(&self.path) {
            Ok(now) if now.dev() == self.device && now.ino() == self.inode => None,
            Ok(_) if deleted => Some("was deleted and another file put in its place".into()),
            Ok(_) => Some("was replaced by another file".into()),
            Err(_) if deleted => Some("was deleted".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(
                "is no longer at its path (deleted, or it or a directory above it renamed)".into(),
            ),
            Err(e) => Some(format!("can no longer be reached at its path ({e})")),
        }
    }

    pub(super) fn lost_error(&self) -> StoreError {
        StoreError::Lost {
            path: self.path.display().to_string(),
            problem: self.lost.get().cloned().unwrap_or_default(),
        }
    }
}
