//! The audit trail: one JSON line per seal, unseal and admin action, apart from the debug
//! log, for an operator to answer "who unsealed what, and when" years later.
//!
//! A call's line is written (one `write`, into the page cache) before its answer leaves, so
//! it survives `kill -9`. Lines reach the disk with one `fdatasync` a second and at
//! shutdown, not one per call: a seal that waited for its line's flush cost 30 % more CPU
//! (BENCHMARKS.md). When a line cannot be written, the call is refused: nothing is served
//! unaudited. Lines never hold key material, passphrases or sealed blobs.
//!
//! Tamper evidence (see [`chain`]): each line ends with the hash of the line before it, and
//! the server writes a checkpoint line over every byte since the checkpoint before at least
//! once a minute, before rotating and at a clean stop. The chain costs one SHA-256 of the
//! line under the lock a line is written with: no syscall and no allocation more.

pub mod chain;
mod read;
mod verify;

pub use chain::{CheckpointKey, Why, checkpoint_key};
pub use read::{AuditQuery, Line, ReadReport, read_lines, read_trail, trail_files};
pub use verify::{Verified, Verifier, verify_files};

use crate::locking::lock;
use chain::{GENESIS, LineHash, append_prev, hash_line};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Node UUIDs in lines are cut to this: an invalid request may carry kilobytes.
const MAX_TEXT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Seal,
    Unseal,
    Admin,
    /// A connection closed before its TLS handshake (outside every allow-list).
    Connect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Refused,
}

/// Why a call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownNonce,
    WrongKeyOrBinding,
    Revoked,
    Invalid,
    StoreUnavailable,
    Failed,
    /// The address is outside the operation's allow-list.
    NetworkNotAllowed,
    RateLimited,
    OverQuota,
    WindowClosed,
    PendingApproval,
    Denied,
    /// The node UUID's records are bound to another address and `pinNodeIp` is set.
    Pinned,
    /// The request never finished arriving within `callTimeout`.
    CallTimeout,
    /// The call's `grpc-timeout` passed before such a call is answered: not started.
    DeadlineTooShort,
}

impl Action {
    /// As stored in the trail and used as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Action::Seal => "seal",
            Action::Unseal => "unseal",
            Action::Admin => "admin",
            Action::Connect => "connect",
        }
    }
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::UnknownNonce => "unknown_nonce",
            Reason::WrongKeyOrBinding => "wrong_key_or_binding",
            Reason::Revoked => "revoked",
            Reason::Invalid => "invalid",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::Failed => "failed",
            Reason::NetworkNotAllowed => "network_not_allowed",
            Reason::RateLimited => "rate_limited",
            Reason::OverQuota => "over_quota",
            Reason::WindowClosed => "window_closed",
            Reason::PendingApproval => "pending_approval",
            Reason::Denied => "denied",
            Reason::Pinned => "pinned",
            Reason::CallTimeout => "call_timeout",
            Reason::DeadlineTooShort => "deadline_too_short",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::UnknownNonce => "unknown nonce",
            Reason::WrongKeyOrBinding => "wrong key or binding",
            Reason::Revoked => "revoked",
            Reason::Invalid => "invalid",
            Reason::StoreUnavailable => "store unavailable",
            Reason::Failed => "failed",
            Reason::NetworkNotAllowed => "network not allowed",
            Reason::RateLimited => "rate limited",
            Reason::OverQuota => "over quota",
            Reason::WindowClosed => "window closed",
            Reason::PendingApproval => "pending approval",
            Reason::Denied => "denied",
            Reason::Pinned => "pinned to another address",
            Reason::CallTimeout => "call timeout",
            Reason::DeadlineTooShort => "deadline too short",
        })
    }
}

/// One line of the trail.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub action: Option<Action>,
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<i64>,
    /// Admin actions: the command, its arguments and who ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// What an admin action did, e.g. "revoked 3 records".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the call arrived, for its latency; not part of the line.
    #[serde(skip, default = "Instant::now")]
    pub started: Instant,
}

impl Event {
    /// A seal or unseal call from `peer` (the address text bound into seals) for `node`.
    pub fn call(action: Action, peer: &str, node: &str) -> Event {
        Event {
            peer: Some(peer.to_string()),
            node: Some(cut(node)),
            ..Event::new(action)
        }
    }

    /// A call from `peer` whose request never arrived whole: no node is known.
    pub fn unread_call(action: Action, peer: &str) -> Event {
        Event {
            peer: Some(peer.to_string()),
            ..Event::new(action)
        }
    }

    fn new(action: Action) -> Event {
        Event {
            time: now(),
            action: Some(action),
            outcome: Some(Outcome::Ok),
            reason: None,
            peer: None,
            node: None,
            record: None,
            command: None,
            args: None,
            user: None,
            detail: None,
            started: Instant::now(),
        }
    }

    /// Something that happened to the trail itself, written into it.
    fn notice(detail: String) -> Event {
        Event {
            action: None,
            outcome: None,
            detail: Some(detail),
            ..Event::new(Action::Admin)
        }
    }

    /// An admin command, with its arguments (which never hold secrets).
    pub fn admin(command: &str, args: &[String]) -> Event {
        Event {
            command: Some(command.to_string()),
            args: Some(args.to_vec()),
            user: std::env::var("SUDO_USER")
                .or_else(|_| std::env::var("USER"))
                .ok()
                .map(|user| cut(&user)),
            ..Event::new(Action::Admin)
        }
    }

    pub fn refused(mut self, reason: Reason) -> Event {
        self.outcome = Some(Outcome::Refused);
        self.reason = Some(reason);
        self
    }

    pub fn record(mut self, id: i64) -> Event {
        self.record = Some(id);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = Some(detail.into());
        self
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[derive(Debug, thiserror::Error)]
#[error("the audit trail {path} cannot be written ({problem}); calls are refused until it can")]
pub struct AuditError {
    pub path: String,
    pub problem: String,
}

/// When the file is rotated.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    /// Past this size the file is renamed to `.1` (and `.1` to `.2`…) and a new one begun.
    pub max_bytes: u64,
    /// How many rotated files are kept.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 100 << 20,
            keep: 10,
        }
    }
}

/// How often the configured path is compared with the open file (see [`AuditLog::write`]).
const PATH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Lines are covered by a checkpoint at most this long after they were written.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Room for `,"prev":"<44 characters>"` and the newline, reserved before serializing.
const PREV_FIELD: usize = 55;

/// An append-only audit file shared by every call.
pub struct AuditLog {
    path: PathBuf,
    rotation: Option<Rotation>,
    current: Mutex<Current>,
    /// Lines written, and lines known to be on disk: a sync covers every line before it.
    written: AtomicU64,
    synced: AtomicU64,
    /// Whether the last write failed, to log the change of state once.
    failing: AtomicBool,
    /// The server's: it alone writes checkpoints, and chains its lines in memory. Admin
    /// commands (None) chain each line to the file's last line, read under a file lock.
    checkpoints: Option<Checkpoints>,
}

struct Checkpoints {
    key: Option<CheckpointKey>,
}

struct Current {
    file: Arc<File>,
    size: u64,
    /// The open file's identity, to tell whether the path still leads to it.
    device: u64,
    inode: u64,
    /// Bytes of the file known to be reachable at the path: the lines after it are copied
    /// to the file found there if the path turns out to lead elsewhere.
    verified: u64,
    checked_at: Instant,
    /// The hash of the last line written (by this process, for the server).
    prev: LineHash,
    /// Where the bytes not yet covered by a checkpoint begin in the open file.
    checkpointed: u64,
    checkpointed_at: Instant,
}

/// What the configured path leads to, compared with the open file.
enum AtPath {
    TheOpenFile,
    /// Nothing there, or another regular file: the trail goes on there.
    Elsewhere(String),
    /// A directory, a device, a FIFO, or an error: nothing can be written there.
    Unusable(String),
}

impl AuditLog {
    /// Opens (creating it, mode 0600) the trail at `path`. `rotation` is for the server;
    /// admin commands only append.
    pub fn open(path: &Path, rotation: Option<Rotation>) -> Result<AuditLog, AuditError> {
        let current = Current::open(path).map_err(|e| error(path, &e))?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            rotation,
            current: Mutex::new(current),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            checkpoints: None,
        })
    }

    /// Makes this the server's trail: lines chained in memory, and checkpoints (keyed with
    /// `key` when there is one). Lines left after the last checkpoint (by a crash, or by
    /// admin commands while the server was stopped) get one at once.
    pub fn checkpointed(mut self, key: Option<CheckpointKey>) -> Result<AuditLog, AuditError> {
        self.checkpoints = Some(Checkpoints { key });
        {
            let mut current = lock(&self.current);
            current.checkpointed = last_checkpoint_end(&current.file, current.size)
                .map_err(|e| error(&self.path, &e))?;
            self.write_checkpoint(&mut current, Why::Start, None)
                .map_err(|e| error(&self.path, &e))?;
        }
        Ok(self)
    }

    /// Writes a checkpoint when lines were written since the last one, a minute or more ago.
    pub fn checkpoint_if_due(&self) -> Result<(), AuditError> {
        let (file, from) = {
            let current = lock(&self.current);
            if current.checkpointed_at.elapsed() < CHECKPOINT_INTERVAL {
                return Ok(());
            }
            (Arc::clone(&current.file), current.checkpointed)
        };
        // Most of a minute's lines are read and hashed here, outside the lock calls take.
        let mut early = Covered::new(from);
        file.metadata()
            .and_then(|metadata| early.read(&file, metadata.len(), false))
            .map_err(|e| error(&self.path, &e))?;
        let mut current = lock(&self.current);
        let same_file = Arc::ptr_eq(&file, &current.file) && current.checkpointed == from;
        current.checkpointed_at = Instant::now();
        self.write_checkpoint(&mut current, Why::Interval, same_file.then_some(early))
            .map_err(|e| error(&self.path, &e))
    }

    /// The checkpoint of a clean stop, then everything made durable.
    pub fn stop(&self) -> Result<(), AuditError> {
        {
            let mut current = lock(&self.current);
            self.follow_path(&mut current)
                .and_then(|()| self.write_checkpoint(&mut current, Why::Stop, None))
                .map_err(|e| error(&self.path, &e))?;
        }
        self.sync_blocking()
    }

    /// Covers every byte of the open file since the last checkpoint, its own lines and any
    /// admin command's, with a checkpoint line; nothing when there are none. Under the file
    /// lock, so that no admin line lands between the bytes read and the checkpoint.
    fn write_checkpoint(
        &self,
        current: &mut Current,
        why: Why,
        early: Option<Covered>,
    ) -> std::io::Result<()> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let _locked = FileLock::exclusive(&current.file)?;
        let end = current.file.metadata()?.len();
        let mut covered = early.unwrap_or_else(|| Covered::new(current.checkpointed));
        let torn = covered.read(&current.file, end, true)?;
        let (Some(prev), lines) = (covered.last, covered.lines) else {
            return Ok(());
        };
        let mut line = Vec::with_capacity(256);
        // A line torn by a crash is ended, so that the checkpoint is a line of its own.
        if torn {
            line.push(b'\n');
        }
        let mut covered_hash = GENESIS;
        covered_hash.copy_from_slice(covered.digest.finish().as_ref());
        let time = now();
        let input = chain::mac_input(&covered_hash, &prev, &time, why, lines);
        let checkpoint = chain::Checkpoint {
            why,
            lines,
            keyed: checkpoints.key.is_some(),
            mac: chain::seal_checkpoint(checkpoints.key.as_ref(), &input),
        };
        let start = line.len();
        #[derive(Serialize)]
        struct Written<'a> {
            time: &'a str,
            checkpoint: &'a chain::Checkpoint,
        }
        let written = Written {
            time: &time,
            checkpoint: &checkpoint,
        };
        serde_json::to_writer(&mut line, &written).map_err(std::io::Error::other)?;
        append_prev(&mut line, &prev);
        let hash = hash_line(&line[start..]);
        line.push(b'\n');
        (&*current.file).write_all(&line)?;
        current.size = end + line.len() as u64;
        current.prev = hash;
        current.checkpointed = current.size;
        current.checkpointed_at = Instant::now();
        self.written.fetch_add(1, Ordering::Release);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one line (into the page cache: it survives the process, not a power cut,
    /// until [`AuditLog::sync`]).
    ///
    /// Whether the path still leads to the open file is checked at most every
    /// [`PATH_CHECK_INTERVAL`] (and at every write while failing), not per line: when it
    /// no longer does (the file deleted, renamed or replaced), the trail goes on in a file
    /// at the path, and the lines written since the last check are copied there first, so
    /// that every answered call's line ends up at the path. While the path leads to
    /// something unusable (a directory, `/dev/null`), writes fail and calls are refused.
    pub fn write(&self, event: &Event) -> Result<(), AuditError> {
        let mut line = Vec::with_capacity(256);
        serde_json::to_writer(&mut line, event).map_err(|e| error(&self.path, &e))?;
        line.reserve(PREV_FIELD);
        let mut current = lock(&self.current);
        let added = (line.len() + PREV_FIELD) as u64;
        let due = self.failing.load(Ordering::Relaxed)
            || current.checked_at.elapsed() >= PATH_CHECK_INTERVAL;
        let result = (if due {
            self.follow_path(&mut current)
        } else {
            Ok(())
        })
        .and_then(|()| self.make_room(&mut current, added))
        .and_then(|()| self.append_chained(&mut current, &mut line));
        drop(current);
        match result {
            Ok(()) => {
                self.written.fetch_add(1, Ordering::Release);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(path = %self.path.display(), "the audit trail is writable again");
                }
                Ok(())
            }
            Err(e) => {
                let failure = error(&self.path, &e);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!("{failure}");
                }
                Err(failure)
            }
        }
    }

    /// Ends `line` with the hash of the line before it and appends it. The server knows
    /// its last line; an admin command reads the file's, under the file lock that keeps
    /// other commands and the server's checkpoints from coming in between.
    fn append_chained(&self, current: &mut Current, line: &mut Vec<u8>) -> std::io::Result<()> {
        let _locked = match self.checkpoints {
            Some(_) => None,
            None => {
                let locked = FileLock::exclusive(&current.file)?;
                current.size = current.file.metadata()?.len();
                current.prev = last_line_hash(&current.file, current.size, &self.path)?;
                Some(locked)
            }
        };
        append_prev(line, &current.prev);
        let hash = hash_line(line);
        line.push(b'\n');
        (&*current.file).write_all(line)?;
        current.size += line.len() as u64;
        current.prev = hash;
        Ok(())
    }

    /// Whether lines can be written, for health checks: false while the last write failed
    /// and the path still leads to nothing usable. Checks the path again then, so that a
    /// server taken out of a load balancer's rotation (no calls, no writes) comes back by
    /// itself once the path is usable.
    pub fn writable(&self) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return true;
        }
        self.follow_path(&mut lock(&self.current)).is_ok()
    }

    /// Makes every line written so far durable, off the async workers; nothing to do when
    /// nothing was written since the last time. Checks the path first, so that lines written
    /// just before the file was deleted reach the path within a second even when no more
    /// calls come.
    pub async fn sync(&self) -> Result<(), AuditError> {
        let covered = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= covered {
            return Ok(());
        }
        let file = {
            let mut current = lock(&self.current);
            self.follow_path(&mut current)
                .map_err(|e| error(&self.path, &e))?;
            Arc::clone(&current.file)
        };
        let synced = tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        synced.map_err(|e| error(&self.path, &e))?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Writes a line and makes it durable at once: for admin commands, one line each.
    pub fn write_durably(&self, event: &Event) -> Result<(), AuditError> {
        self.write(event)?;
        self.sync_blocking()
    }

    /// [`AuditLog::sync`] for threads outside the runtime (shutdown, admin commands).
    pub fn sync_blocking(&self) -> Result<(), AuditError> {
        let covered = self.written.load(Ordering::Acquire);
        let file = {
            let mut current = lock(&self.current);
            self.follow_path(&mut current)
                .map_err(|e| error(&self.path, &e))?;
            Arc::clone(&current.file)
        };
        file.sync_data().map_err(|e| error(&self.path, &e))?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Makes sure the path leads to the open file: when it leads nowhere or to another
    /// regular file, the trail moves there, with a line saying what happened and the lines
    /// not known to be at the path yet.
    fn follow_path(&self, current: &mut Current) -> std::io::Result<()> {
        let what = match current.at_path(&self.path) {
            AtPath::TheOpenFile => {
                current.verified = current.size;
                current.checked_at = Instant::now();
                return Ok(());
            }
            AtPath::Unusable(problem) => return Err(std::io::Error::other(problem)),
            AtPath::Elsewhere(what) => what,
        };
        let unverified = current.unverified()?;
        // Lines in the old file must be durable before it stops being the one synced.
        current.file.sync_data()?;
        let mut next = Current::open(&self.path)?;
        let lines = unverified.iter().filter(|&&byte| byte == b'\n').count();
        let mut notice = serde_json::to_vec(&Event::notice(format!(
            "the audit trail {what}; continued in a new file here, beginning with the {lines} \
             lines written since it was last seen at this path"
        )))
        .map_err(std::io::Error::other)?;
        // The lines carried over chain to lines that are gone: `audit verify` reports the
        // break, which is what happened.
        append_prev(&mut notice, &current.prev);
        notice.push(b'\n');
        notice.extend_from_slice(&unverified);
        (&*next.file).write_all(&notice)?;
        next.size += notice.len() as u64;
        next.verified = next.size;
        next.prev = current.prev;
        next.checkpointed = 0;
        *current = next;
        tracing::warn!(
            path = %self.path.display(),
            carried_over = lines,
            "the audit trail {what}; continuing in a new file at its path"
        );
        sync_directory(&self.path)
    }

    /// Rotates the file first when `added` bytes would take it past its size limit.
    fn make_room(&self, current: &mut Current, added: u64) -> std::io::Result<()> {
        let Some(rotation) = self.rotation else {
            return Ok(());
        };
        if current.size == 0 || current.size + added <= rotation.max_bytes {
            return Ok(());
        }
        // Renaming the path must rename the open file, not whatever took its place.
        self.follow_path(current)?;
        if current.size == 0 || current.size + added <= rotation.max_bytes {
            return Ok(());
        }
        // The old file ends with a checkpoint that the new file's first line chains to.
        self.write_checkpoint(current, Why::Rotation, None)?;
        // Lines in the old file must be durable before it stops being the one synced.
        current.file.sync_data()?;
        for n in (1..rotation.keep).rev() {
            let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
        }
        if rotation.keep > 0 {
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        let prev = current.prev;
        *current = Current::open(&self.path)?;
        current.prev = prev;
        sync_directory(&self.path)
    }
}

impl Current {
    /// Opens the file at `path` for appending, refusing anything but a regular file.
    fn open(path: &Path) -> std::io::Result<Current> {
        let file = open_append(path)?;
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file; the trail must be one",
                path.display()
            )));
        }
        let mut size = metadata.len();
        let prev = last_line_hash(&file, size, path)?;
        if size > 0 && !ends_with_newline(&file, size)? {
            // A line torn by a crash: ended, so that the next line does not run into it.
            (&file).write_all(b"\n")?;
            size += 1;
        }
        Ok(Current {
            file: Arc::new(file),
            size,
            device: metadata.dev(),
            inode: metadata.ino(),
            verified: size,
            checked_at: Instant::now(),
            prev,
            checkpointed: 0,
            checkpointed_at: Instant::now(),
        })
    }

    fn at_path(&self, path: &Path) -> AtPath {
        let deleted = || self.file.metadata().is_ok_and(|m| m.nlink() == 0);
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == self.device && now.ino() == self.inode => AtPath::TheOpenFile,
            Ok(now) if now.is_dir() => {
                AtPath::Unusable("is a directory now; remove it so that the trail can go on".into())
            }
            Ok(now) if !now.is_file() => AtPath::Unusable(
                "leads to something other than a regular file now (a device such as /dev/null, \
                 a FIFO); put a regular file or nothing there so that the trail can go on"
                    .into(),
            ),
            Ok(_) if deleted() => {
                AtPath::Elsewhere("was deleted and another file put in its place".into())
            }
            Ok(_) => AtPath::Elsewhere("was replaced by another file".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && deleted() => {
                AtPath::Elsewhere("was deleted".into())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                AtPath::Elsewhere("was renamed away".into())
            }
            Err(e) => AtPath::Unusable(format!("can no longer be reached at its path ({e})")),
        }
    }

    /// The lines written since the path was last seen leading to this file.
    fn unverified(&self) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0; usize::try_from(self.size - self.verified).unwrap_or(0)];
        self.file.read_exact_at(&mut bytes, self.verified)?;
        Ok(bytes)
    }
}

/// The bytes of the open file since its last checkpoint, hashed as they are read.
struct Covered {
    /// The next byte to read.
    upto: u64,
    digest: aws_lc_rs::digest::Context,
    lines: u64,
    /// The hash of the last line read.
    last: Option<LineHash>,
}

impl Covered {
    fn new(from: u64) -> Covered {
        Covered {
            upto: from,
            digest: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            lines: 0,
            last: None,
        }
    }

    /// Reads on to `end`: up to the last whole line, or (`to_the_end`) all of it, a torn
    /// last line counted as ended; whether it was torn.
    fn read(&mut self, file: &File, end: u64, to_the_end: bool) -> std::io::Result<bool> {
        let mut bytes = vec![0; usize::try_from(end.saturating_sub(self.upto)).unwrap_or(0)];
        file.read_exact_at(&mut bytes, self.upto)?;
        let torn = to_the_end && bytes.last().is_some_and(|&byte| byte != b'\n');
        if torn {
            bytes.push(b'\n');
        } else if !to_the_end {
            let whole = bytes
                .iter()
                .rposition(|&byte| byte == b'\n')
                .map_or(0, |at| at + 1);
            bytes.truncate(whole);
        }
        if let Some(without_newline) = bytes.strip_suffix(b"\n") {
            let last = without_newline.rsplit(|&byte| byte == b'\n').next();
            self.last = last.map(hash_line);
            self.lines += bytes.iter().filter(|&&byte| byte == b'\n').count() as u64;
            self.digest.update(&bytes);
            self.upto += bytes.len() as u64;
        }
        Ok(torn)
    }
}

/// Holds an exclusive `flock` on the trail until dropped.
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a File) -> std::io::Result<FileLock<'a>> {
        rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, rustix::fs::FlockOperation::Unlock);
    }
}

/// Lines are far shorter; a longer tail without a newline is hashed as it is.
const TAIL: u64 = 64 << 10;

fn ends_with_newline(file: &File, size: u64) -> std::io::Result<bool> {
    let mut last = [0];
    file.read_exact_at(&mut last, size - 1)?;
    Ok(last[0] == b'\n')
}

/// The hash of the last line of `file` (`size` bytes long), torn or not; of the newest
/// rotated file's when it is empty; [`GENESIS`] when there is none.
fn last_line_hash(file: &File, size: u64, path: &Path) -> std::io::Result<LineHash> {
    if size == 0 {
        return match File::open(rotated(path, 1)) {
            Ok(older) => {
                let size = older.metadata()?.len();
                if size == 0 {
                    Ok(GENESIS)
                } else {
                    last_line_hash(&older, size, path)
                }
            }
            Err(_) => Ok(GENESIS),
        };
    }
    let start = size.saturating_sub(TAIL);
    let mut tail = vec![0; (size - start) as usize];
    file.read_exact_at(&mut tail, start)?;
    if tail.last() == Some(&b'\n') {
        tail.pop();
    }
    let line = tail
        .rsplit(|&byte| byte == b'\n')
        .next()
        .unwrap_or_default();
    Ok(hash_line(line))
}

/// Where the bytes after the file's last checkpoint line begin (0 when it has none),
/// reading back from the end a chunk at a time.
fn last_checkpoint_end(file: &File, size: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut end = size;
    // The bytes from `end` on that begin a line not yet complete in what was read.
    let mut carried: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut bytes = vec![0; (end - start) as usize];
        file.read_exact_at(&mut bytes, start)?;
        bytes.extend_from_slice(&carried);
        let mut line_end = bytes.len();
        while let Some(newline) = bytes[..line_end.saturating_sub(1)]
            .iter()
            .rposition(|&byte| byte == b'\n')
        {
            if chain::is_checkpoint(&bytes[newline + 1..line_end]) {
                return Ok(start + line_end as u64);
            }
            line_end = newline + 1;
        }
        if start == 0 {
            return Ok(if chain::is_checkpoint(&bytes[..line_end]) {
                line_end as u64
            } else {
                0
            });
        }
        carried = bytes[..line_end].to_vec();
        end = start;
    }
    Ok(0)
}

/// The name of the `n`th rotated file: `audit.jsonl.1` is the newest.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Readable too, to copy lines out of a file that lost its path; non-blocking, so that a
/// FIFO put at the path fails instead of waiting for a reader.
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
}

fn sync_directory(path: &Path) -> std::io::Result<()> {
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(directory.unwrap_or(Path::new(".")))?.sync_all()
}

fn error(path: &Path, problem: &dyn std::fmt::Display) -> AuditError {
    AuditError {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_rotate_past_the_size_limit_and_old_files_are_kept_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 400,
            keep: 2,
        };
        let log = AuditLog::open(&path, Some(rotation)).unwrap();
        for n in 0..40 {
            log.write(&Event::admin("test", &[n.to_string()])).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 400);
        assert!(rotated(&path, 1).exists() && rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists(), "only `keep` rotated files");
        let newest: Vec<Event> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(newest.last().unwrap().args.as_ref().unwrap()[0], "39");
    }

    fn checkpoints(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|line| chain::is_checkpoint(line.as_bytes()))
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_checkpoint_is_written_a_minute_after_the_last_only_when_lines_came() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, None)
            .unwrap()
            .checkpointed(None)
            .unwrap();
        let a_minute_ago = || Instant::now().checked_sub(CHECKPOINT_INTERVAL).unwrap();
        log.write(&Event::admin("test", &["1".into()])).unwrap();
        log.checkpoint_if_due().unwrap();
        assert!(checkpoints(&path).is_empty(), "not yet due");
        lock(&log.current).checkpointed_at = a_minute_ago();
        log.checkpoint_if_due().unwrap();
        let written = checkpoints(&path);
        assert_eq!(written.len(), 1);
        assert!(
            written[0].contains("\"why\":\"interval\",\"lines\":1"),
            "{written:?}"
        );
        lock(&log.current).checkpointed_at = a_minute_ago();
        log.checkpoint_if_due().unwrap();
        assert_eq!(checkpoints(&path).len(), 1, "no lines since: no checkpoint");
        log.write(&Event::admin("test", &["2".into()])).unwrap();
        lock(&log.current).checkpointed_at = a_minute_ago();
        log.checkpoint_if_due().unwrap();
        log.stop().unwrap();
        let found = verify_files(&trail_files(&path), None, Some(10))
            .unwrap()
            .unwrap();
        assert_eq!((found.checkpoints, found.lines), (2, 4));
    }

    #[test]
    fn a_trail_that_is_not_a_regular_file_is_refused_naming_it() {
        let error = AuditLog::open(Path::new("/dev/full"), None).err().unwrap();
        assert!(error.to_string().contains("/dev/full"), "{error}");
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    fn lines(path: &Path) -> Vec<Event> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn numbers(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .filter_map(|event| event.args.as_ref().map(|args| args[0].clone()))
            .collect()
    }

    #[test]
    fn lines_written_before_a_deletion_was_noticed_reach_the_new_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, None).unwrap();
        log.write(&Event::admin("test", &["0".into()])).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Within the check interval: these go to the deleted file first.
        log.write(&Event::admin("test", &["1".into()])).unwrap();
        log.write(&Event::admin("test", &["2".into()])).unwrap();
        log.sync_blocking().unwrap();
        let events = lines(&path);
        assert!(events[0].detail.as_ref().unwrap().contains("was deleted"));
        // "0" too: it was written since the path was last checked.
        assert_eq!(numbers(&events), ["0", "1", "2"]);
    }

    #[test]
    fn a_directory_at_the_path_refuses_writes_until_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, None).unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write(&Event::admin("test", &["1".into()])).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::thread::sleep(PATH_CHECK_INTERVAL);
        let error = log.write(&Event::admin("test", &["2".into()])).unwrap_err();
        assert!(error.to_string().contains("directory"), "{error}");
        std::fs::remove_dir(&path).unwrap();
        log.write(&Event::admin("test", &["3".into()])).unwrap();
        assert_eq!(numbers(&lines(&path)), ["1", "3"]);
    }

    #[test]
    fn rotation_goes_on_after_the_file_was_renamed_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 400,
            keep: 2,
        };
        let log = AuditLog::open(&path, Some(rotation)).unwrap();
        log.write(&Event::admin("test", &["0".into()])).unwrap();
        std::fs::rename(&path, dir.path().join("elsewhere")).unwrap();
        for n in 1..40 {
            log.write(&Event::admin("test", &[n.to_string()])).unwrap();
        }
        let mut all = Vec::new();
        read_trail(&path, &AuditQuery::default(), |event| {
            all.push(event.clone())
        })
        .unwrap();
        let expected: Vec<String> = (1..40).map(|n| n.to_string()).collect();
        let found = numbers(&all);
        assert!(
            found.ends_with(&expected[expected.len() - 5..]),
            "{found:?}"
        );
    }
}
