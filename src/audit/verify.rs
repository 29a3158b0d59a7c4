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
                    self.found.chain_begins.as_ref().map_or("", |(at, _)| at.as_str())
                ));
            }
            Some(Some(text)) => Some(decode_hash(text).ok_or_else(|| {
                format!("{place}: its \"prev\" is not a SHA-256 in base64: the line was edited")
            })?),
        };
        if let Some(prev) = prev {
            self.check_link(&place, number, prev, writer, fields.as_ref())?;
        }
        if let Some(checkpoint) = fields.as_ref().and_then(|fields| fields.checkpoint.as_ref()) {
            let time = fields.as_ref().and_then(|f| f.time.as_deref()).unwrap_or("");
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
