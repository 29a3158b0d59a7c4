//! `audit verify`: follows the chain through the trail's files, oldest first, and checks
//! every checkpoint against the bytes it covers.
//!
//! The server chains its own lines; an admin command chains its line to the file's last
//! line when it writes. Both write at once, so a line may skip back over lines of the
//! other writer written in the meantime (a server line over admin lines, an admin line over
//! server lines), never over one of its own kind. Admin lines nothing chains to are
//! protected by the next checkpoint only.

use super::chain::{
    self, Checkpoint, CheckpointKey, GENESIS, LineHash, decode_hash, hash_line, mac_input,
};
use aws_lc_rs::digest;
use serde::Deserialize;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// How far back a line may chain over the other writer's lines.
const WINDOW: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    Server,
    Admin,
    /// Not a line that parses: never skipped over.
    Unknown,
}

/// The fields the chain needs; the rest of a line is covered by its hash.
#[derive(Deserialize)]
struct ChainFields {
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    prev: Option<String>,
    #[serde(default)]
    command: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    checkpoint: Option<Checkpoint>,
}

/// What verifying found, when no line was out of place.
#[derive(Debug, Default)]
pub struct Verified {
    pub lines: u64,
    pub checkpoints: u64,
    /// Lines with no chain field, written before the chain began.
    pub unchained: u64,
    /// Where the chain begins, and whether at the first line ever written.
    pub chain_begins: Option<(String, bool)>,
    pub last_checkpoint: Option<String>,
    /// Lines after the last checkpoint: protected by the chain only.
    pub unprotected: u64,
    /// Keyed checkpoints that could not be checked for want of the key.
    pub unchecked_keyed: u64,
    /// Unkeyed checkpoints (a trail without `auditKeyFile`).
    pub unkeyed: u64,
    /// Places of lines that are not audit lines but are chained to: torn by a crash.
    pub torn: Vec<String>,
}

/// Follows the chain line by line; [`Verifier::file`] for each file, oldest first.
pub struct Verifier<'k> {
    key: Option<&'k CheckpointKey>,
    window: VecDeque<(LineHash, Writer, u64)>,
    /// The bytes since the last checkpoint in the current file.
    covered: digest::Context,
    covered_lines: u64,
    keyed_seen: bool,
    /// Whether files before the first were rotated away by the server (or deleted).
    earlier_files_may_be_gone: bool,
    found: Verified,
    file_name: String,
}

impl<'k> Verifier<'k> {
    pub fn new(key: Option<&'k CheckpointKey>, earlier_files_may_be_gone: bool) -> Verifier<'k> {
        Verifier {
            key,
            window: VecDeque::with_capacity(WINDOW + 1),
            covered: digest::Context::new(&digest::SHA256),
            covered_lines: 0,
            keyed_seen: false,
            earlier_files_may_be_gone,
            found: Verified::default(),
            file_name: String::new(),
        }
    }

    /// Checks the lines of one file; an error names the first line out of place.
    pub fn file(&mut self, name: &str, bytes: &[u8], last_file: bool) -> Result<(), String> {
        self.file_name = name.to_string();
        self.covered = digest::Context::new(&digest::SHA256);
        self.covered_lines = 0;
        let mut rest = bytes;
        let mut number = 0u64;
        while !rest.is_empty() {
            number += 1;
            let (line, next) = match rest.iter().position(|&byte| byte == b'\n') {
                Some(end) => (&rest[..end], &rest[end + 1..]),
                None => {
                    let place = self.place(number);
                    if !last_file {
                        return Err(format!(
                            "{place} is cut short without a newline, and lines follow in a \
                             newer file: this file was cut"
                        ));
                    }
                    self.found.torn.push(format!(
                        "{place} (the last, cut short: torn by a crash or a full disk)"
                    ));
                    return Ok(());
                }
            };
            rest = next;
            self.line(number, line)?;
        }
        Ok(())
    }

    fn place(&self, number: u64) -> String {
        format!("{} line {number}", self.file_name)
    }

    fn line(&mut self, number: u64, line: &[u8]) -> Result<(), String> {
        let place = self.place(number);
        let hash = hash_line(line);
        let fields = serde_json::from_slice::<ChainFields>(line).ok();
        let writer = match &fields {
            Some(fields) if fields.command.is_some() => Writer::Admin,
            Some(_) => Writer::Server,
            None => Writer::Unknown,
        };
        let prev = match fields.as_ref().map(|fields| fields.prev.as_deref()) {
            // Not an audit line: whatever follows must chain to it, so a line torn by a
            // crash (ended by the next start) is told from one put there.
            None => {
                if self.found.chain_begins.is_some() {
                    self.found.torn.push(place.clone());
                } else {
                    self.found.unchained += 1;
                }
                None
            }
            Some(None) if self.found.chain_begins.is_none() => {
                self.found.unchained += 1;
                None
            }
            Some(None) => {
                return Err(format!(
                    "{place} has no chain field (\"prev\") although the chain began at {}: it \
                     was inserted, or edited",
                    self.found
                        .chain_begins
                        .as_ref()
                        .map_or("", |(at, _)| at.as_str())
                ));
            }
            Some(Some(text)) => Some(decode_hash(text).ok_or_else(|| {
                format!("{place}: its \"prev\" is not a SHA-256 in base64: the line was edited")
            })?),
        };
        if let Some(prev) = prev {
            self.check_link(&place, number, prev, writer, fields.as_ref())?;
        }
        if let Some(checkpoint) = fields
            .as_ref()
            .and_then(|fields| fields.checkpoint.as_ref())
        {
            let time = fields
                .as_ref()
                .and_then(|f| f.time.as_deref())
                .unwrap_or("");
            self.check_checkpoint(&place, checkpoint, time, prev.unwrap_or(GENESIS))?;
        } else {
            self.covered.update(line);
            self.covered.update(b"\n");
            self.covered_lines += 1;
            self.found.unprotected += 1;
        }
        self.found.lines += 1;
        self.window.push_back((hash, writer, number));
        if self.window.len() > WINDOW {
            self.window.pop_front();
        }
        Ok(())
    }

    fn check_link(
        &mut self,
        place: &str,
        number: u64,
        prev: LineHash,
        writer: Writer,
        fields: Option<&ChainFields>,
    ) -> Result<(), String> {
        if self.found.chain_begins.is_none() {
            let begins = match self.window.back() {
                None if prev == GENESIS => true,
                None if self.earlier_files_may_be_gone => false,
                None => {
                    return Err(format!(
                        "{place} chains to a line that is not in the trail, and no file before \
                         it has been rotated away: a rotated file, or the lines before this \
                         one, were deleted"
                    ));
                }
                Some((last, _, _)) if *last == prev => false,
                Some(_) => return Err(self.broken(place, number)),
            };
            self.found.chain_begins = Some((place.to_string(), begins));
            return Ok(());
        }
        let is_checkpoint = fields.is_some_and(|fields| fields.checkpoint.is_some());
        for (back, (hash, other, _)) in self.window.iter().rev().enumerate() {
            if *hash == prev {
                return Ok(());
            }
            // A checkpoint follows the line before it, read under the file lock.
            let skippable = !is_checkpoint
                && *other != writer
                && *other != Writer::Unknown
                && writer != Writer::Unknown;
            if !skippable || back + 1 == WINDOW {
                break;
            }
        }
        Err(self.broken(place, number))
    }

    fn broken(&self, place: &str, number: u64) -> String {
        let before = match self.window.back() {
            Some((_, _, n)) if number > 1 => format!("line {n}"),
            _ => "the last line of the file before".to_string(),
        };
        format!(
            "{place} does not chain to {before}: {before} was edited, or lines were removed, \
             reordered or inserted between them"
        )
    }

    fn check_checkpoint(
        &mut self,
        place: &str,
        checkpoint: &Checkpoint,
        time: &str,
        prev: LineHash,
    ) -> Result<(), String> {
        let covered =
            std::mem::replace(&mut self.covered, digest::Context::new(&digest::SHA256)).finish();
        let mut covered_hash = GENESIS;
        covered_hash.copy_from_slice(covered.as_ref());
        let lines = std::mem::take(&mut self.covered_lines);
        let since = match &self.found.last_checkpoint {
            Some(last) if last.starts_with(&self.file_name) => format!("since {last}"),
            _ => format!("since the start of {}", self.file_name),
        };
        if checkpoint.lines != lines {
            return Err(format!(
                "{place}: the checkpoint covers {} lines, but {lines} lines are there {since}: \
                 lines were removed or inserted (or the checkpoint was edited)",
                checkpoint.lines
            ));
        }
        let input = mac_input(&covered_hash, &prev, time, checkpoint.why, lines);
        if checkpoint.keyed {
            self.keyed_seen = true;
            match self.key {
                None => self.found.unchecked_keyed += 1,
                Some(key) if chain::checkpoint_matches(Some(key), &input, &checkpoint.mac) => {}
                Some(_) => {
                    return Err(format!(
                        "{place}: the checkpoint does not match the {lines} lines {since}: one \
                         was edited, removed or inserted, or the checkpoint was edited, or the \
                         key is not the one the server wrote it with"
                    ));
                }
            }
        } else {
            if self.keyed_seen {
                return Err(format!(
                    "{place}: an unkeyed checkpoint after keyed ones: forged"
                ));
            }
            self.found.unkeyed += 1;
            if !chain::checkpoint_matches(None, &input, &checkpoint.mac) {
                return Err(format!(
                    "{place}: the checkpoint does not match the {lines} lines {since}: one was \
                     edited, removed or inserted, or the checkpoint was edited"
                ));
            }
        }
        self.found.checkpoints += 1;
        self.found.unprotected = 0;
        self.found.last_checkpoint = Some(place.to_string());
        Ok(())
    }

    pub fn finish(self) -> Verified {
        self.found
    }
}

/// Verifies `files`, oldest first. `keep`: how many rotated files the server keeps, when
/// known: fewer than that means none was rotated away, so the oldest must begin the chain.
pub fn verify_files(
    files: &[PathBuf],
    key: Option<&CheckpointKey>,
    keep: Option<u32>,
) -> Result<Result<Verified, String>, String> {
    let rotated_away = keep.is_none_or(|keep| files.len() > keep as usize);
    let mut verifier = Verifier::new(key, rotated_away);
    for (n, file) in files.iter().enumerate() {
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && n + 1 == files.len() => {
                continue;
            }
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        if let Err(found) = verifier.file(&shown(file), &bytes, n + 1 == files.len()) {
            return Ok(Err(found));
        }
    }
    Ok(Ok(verifier.finish()))
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, Event, Rotation, checkpoint_key, trail_files};

    fn verify(path: &Path, key: Option<&CheckpointKey>) -> Result<Verified, String> {
        verify_files(&trail_files(path), key, Some(10)).unwrap()
    }

    /// A stopped server's trail of `calls` lines with an admin command's line in between.
    fn trail(dir: &Path, key: Option<CheckpointKey>, calls: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let server = AuditLog::open(&path, None)
            .unwrap()
            .checkpointed(key)
            .unwrap();
        let admin = AuditLog::open(&path, None).unwrap();
        for n in 0..calls {
            server
                .write(&Event::call(
                    crate::audit::Action::Seal,
                    "10.0.0.1",
                    &format!("node-{n}"),
                ))
                .unwrap();
            if n == calls / 2 {
                admin
                    .write(&Event::admin("keys", &["revoke".into()]))
                    .unwrap();
            }
        }
        server.stop().unwrap();
        path
    }

    fn edit(path: &Path, change: impl FnOnce(&mut Vec<String>)) {
        let mut lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        change(&mut lines);
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn an_untouched_trail_verifies_with_admin_lines_among_the_server_s() {
        let dir = tempfile::tempdir().unwrap();
        let key = checkpoint_key(&[1; 32]);
        let path = trail(dir.path(), Some(checkpoint_key(&[1; 32])), 10);
        let found = verify(&path, Some(&key)).unwrap();
        assert_eq!(
            found.lines, 12,
            "10 calls, an admin line, the stop checkpoint"
        );
        assert_eq!((found.checkpoints, found.unprotected), (1, 0));
        assert!(
            found.chain_begins.unwrap().1,
            "begins at the first line ever written"
        );
    }

    #[test]
    fn an_admin_line_written_between_server_lines_it_did_not_see_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let server = AuditLog::open(&path, None)
            .unwrap()
            .checkpointed(None)
            .unwrap();
        server
            .write(&Event::call(crate::audit::Action::Seal, "a", "1"))
            .unwrap();
        let admin = AuditLog::open(&path, None).unwrap();
        admin.write(&Event::admin("keys", &[])).unwrap();
        // The server chains to its own last line, over the admin line.
        server
            .write(&Event::call(crate::audit::Action::Seal, "a", "2"))
            .unwrap();
        server.stop().unwrap();
        let found = verify(&path, None).unwrap();
        assert_eq!((found.lines, found.unkeyed), (4, 1));
    }

    #[test]
    fn each_change_is_reported_at_the_first_line_out_of_place() {
        // Line 1 is node-0, the admin line is 7, the stop checkpoint 12.
        type Change = fn(&mut Vec<String>);
        let cases: [(&str, Change, &str); 6] = [
            (
                "edit",
                |l| l[2] = l[2].replace("node-2", "node-X"),
                "line 4 does not chain to line 3",
            ),
            (
                "delete",
                |l| drop(l.remove(2)),
                "line 3 does not chain to line 2",
            ),
            ("swap", |l| l.swap(2, 3), "line 3 does not chain to line 2"),
            (
                "insert",
                |l| l.insert(3, l[2].replace("node-2", "node-F")),
                "line 4 does not chain",
            ),
            (
                "delete the admin line",
                |l| drop(l.remove(6)),
                "line 11: the checkpoint covers 11",
            ),
            (
                "edit the checkpoint",
                |l| l[11] = l[11].replace("\"lines\":11", "\"lines\":10"),
                "line 12: the checkpoint covers 10",
            ),
        ];
        for (what, change, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = trail(dir.path(), None, 10);
            edit(&path, change);
            let error = verify(&path, None).unwrap_err();
            assert!(error.contains(expected), "{what}: {error}");
        }
    }

    #[test]
    fn a_wrong_key_fails_at_the_checkpoint_and_a_missing_one_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = trail(dir.path(), Some(checkpoint_key(&[1; 32])), 3);
        let error = verify(&path, Some(&checkpoint_key(&[2; 32]))).unwrap_err();
        assert!(
            error.contains("line 5: the checkpoint does not match"),
            "{error}"
        );
        assert!(error.contains("key"), "{error}");
        assert_eq!(verify(&path, None).unwrap().unchecked_keyed, 1);
    }

    #[test]
    fn a_trail_from_before_the_chain_says_where_the_chain_begins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(
            &path,
            "{\"time\":\"t\",\"action\":\"seal\",\"outcome\":\"ok\"}\n".repeat(3),
        )
        .unwrap();
        let server = AuditLog::open(&path, None)
            .unwrap()
            .checkpointed(None)
            .unwrap();
        server
            .write(&Event::call(crate::audit::Action::Seal, "a", "1"))
            .unwrap();
        server.stop().unwrap();
        let found = verify(&path, None).unwrap();
        let begins = found.chain_begins.unwrap();
        // The start checkpoint covers the old lines at line 4; the chain begins there.
        assert_eq!(begins, (format!("{} line 4", path.display()), false));
        assert_eq!(found.unchained, 3);
    }

    #[test]
    fn a_torn_last_line_is_reported_as_torn_and_the_next_start_chains_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = trail(dir.path(), None, 3);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"{\"time\":\"2026").unwrap();
        let found = verify(&path, None).unwrap();
        assert!(
            found.torn[0].contains("line 6 (the last, cut short"),
            "{:?}",
            found.torn
        );
        let server = AuditLog::open(&path, None)
            .unwrap()
            .checkpointed(None)
            .unwrap();
        server
            .write(&Event::call(crate::audit::Action::Seal, "a", "1"))
            .unwrap();
        server.stop().unwrap();
        let found = verify(&path, None).unwrap();
        assert_eq!(found.torn, [format!("{} line 6", path.display())]);
        assert_eq!(found.unprotected, 0);
    }

    #[test]
    fn rotation_ends_each_file_with_a_checkpoint_the_next_chains_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 1500,
            keep: 5,
        };
        let server = AuditLog::open(&path, Some(rotation))
            .unwrap()
            .checkpointed(None)
            .unwrap();
        for n in 0..30 {
            server
                .write(&Event::call(
                    crate::audit::Action::Unseal,
                    "a",
                    &n.to_string(),
                ))
                .unwrap();
        }
        server.stop().unwrap();
        let files = trail_files(&path);
        assert!(files.len() >= 3, "{files:?}");
        let found = verify(&path, None).unwrap();
        assert_eq!(
            found.checkpoints as usize,
            files.len(),
            "one per rotation, one at stop"
        );
        std::fs::remove_file(crate::audit::rotated(&path, 1)).unwrap();
        let remaining: Vec<PathBuf> = files.into_iter().filter(|f| f.exists()).collect();
        let error = verify_files(&remaining, None, Some(5))
            .unwrap()
            .unwrap_err();
        assert!(
            error.contains(&format!("{} line 1 does not chain", path.display())),
            "{error}"
        );
    }
}
