//! Certificates renewed without a restart: the files are watched (a plain rename and the
//! symlink swap of Kubernetes secret volumes and cert-manager both change their content)
//! and re-read on SIGHUP. Each new handshake takes the pair current at that
//! moment; connections already open keep theirs. A new pair that cannot be used is refused
//! and the old one keeps serving.

use super::identity::{load_identity, read_bounded};
use super::inspect::{CertificateFacts, Validity};
use notify::{RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the files are compared: a renewal lands days before expiry, and reading two
/// small files costs nothing worth saving.
const POLL: Duration = Duration::from_secs(2);
/// Writers replace the certificate and the key one after the other: wait for both.
const SETTLE: Duration = Duration::from_millis(500);

/// The files a pair is read from, as the config names them.
#[derive(Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub password: Option<String>,
}

/// What a reload did.
pub enum Reload {
    /// The files hold what was last read.
    Unchanged,
    Reloaded(CertificateFacts),
    /// The new pair cannot be used; the old one still serves.
    Refused(String),
}

/// The server's certificate and key, replaceable while serving.
pub struct ReloadingIdentity {
    files: IdentityFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// A digest of the files' content last read, good or not, so that a broken pair is
    /// reported once per change rather than once per file event.
    last_read: Mutex<Option<[u8; 32]>>,
    /// A digest of the files the pair in use was read from: a SIGHUP that finds the same
    /// content again reloads nothing new, and says so.
    served: Mutex<Option<[u8; 32]>>,
}

impl std::fmt::Debug for ReloadingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingIdentity")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl ReloadingIdentity {
    pub fn new(files: IdentityFiles, first: Arc<CertifiedKey>) -> Self {
        let digest = digest_of(&files);
        Self {
            files,
            current: RwLock::new(first),
            last_read: Mutex::new(digest),
            served: Mutex::new(digest),
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the files again. `always` (SIGHUP) tries even when they look unchanged.
    pub fn reload(&self, always: bool) -> Reload {
        let digest = digest_of(&self.files);
        {
            let mut last = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
            if !always && digest.is_some() && *last == digest {
                return Reload::Unchanged;
            }
            *last = digest;
        }
        let files = &self.files;
        let pair = match load_identity(&files.cert, &files.key, files.password.as_deref()) {
            Ok(pair) => pair,
            Err(problem) => return Reload::Refused(problem.to_string()),
        };
        let facts = match CertificateFacts::read(&pair.cert[0]) {
            Ok(facts) => facts,
            Err(problem) => return Reload::Refused(problem),
        };
        match facts.validity() {
            Validity::Expired => {
                return Reload::Refused(format!(
                    "the new certificate expired on {}",
                    facts.not_after_text()
                ));
            }
            Validity::NotYetValid => {
                return Reload::Refused(format!(
                    "the new certificate is not valid before {}",
                    facts.not_before_text()
                ));
            }
            Validity::Valid => {}
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = pair;
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if digest.is_some() && *served == digest {
            return Reload::Unchanged;
        }
        *served = digest;
        Reload::Reloaded(facts)
    }
}

impl ResolvesServerCert for ReloadingIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// SHA-256 of both files' content (through symlinks), or `None` while one is unreadable
/// (or not a regular file of at most 1 MiB).
fn digest_of(files: &IdentityFiles) -> Option<[u8; 32]> {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for file in [&files.cert, &files.key] {
        context.update(&read_bounded(file).ok()?);
    }
    context.finish().as_ref().try_into().ok()
}

/// Watches the files: their content is compared every [`POLL`], through symlinks, so a
/// rename into place and a Kubernetes `..data` swap are both seen. Polling, not inotify: the
/// directory may also hold the database and the audit trail (a legacy layout keeps them
/// beside `nodeDbFile` in /etc/talos-kms-server), and an inotify event for every call's
/// audit line cost 16 % of an unseal's CPU (BENCHMARKS.md). Each change, once settled, is
/// sent on the returned channel; the watcher stops when dropped.
pub fn watch(
    identity: &ReloadingIdentity,
) -> notify::Result<(notify::PollWatcher, mpsc::Receiver<()>)> {
    let (changed, changes) = mpsc::channel(1);
    let (events, mut raw) = mpsc::unbounded_channel();
    let config = notify::Config::default()
        .with_poll_interval(POLL)
        .with_compare_contents(true);
    let mut watcher = notify::PollWatcher::new(
        move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = events.send(());
            }
        },
        config,
    )?;
    for file in [&identity.files.cert, &identity.files.key] {
        watcher.watch(file, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        while raw.recv().await.is_some() {
            // Let the other file's change arrive, then report both once.
            tokio::time::sleep(SETTLE).await;
            while raw.try_recv().is_ok() {}
            if changed.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, changes))
}
