//! Reading the trail back: the rotated files oldest first, then the current one, filtered.

use super::{Action, Event, Outcome, chain, rotated};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Which lines to keep; every condition set must hold.
#[derive(Debug, Default)]
pub struct AuditQuery {
    pub node: Option<String>,
    pub peer: Option<String>,
    pub record: Option<i64>,
    pub action: Option<Action>,
    pub outcome: Option<Outcome>,
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    /// Checkpoint lines too (they match no other condition).
    pub checkpoints: bool,
}

impl AuditQuery {
    fn matches(&self, event: &Event) -> bool {
        let same = |wanted: &Option<String>, have: &Option<String>| {
            wanted.is_none() || wanted.as_deref() == have.as_deref()
        };
        same(&self.node, &event.node)
            && same(&self.peer, &event.peer)
            && (self.record.is_none() || self.record == event.record)
            && (self.action.is_none() || self.action == event.action)
            && (self.outcome.is_none() || self.outcome == event.outcome)
            && self.within_times(&event.time)
    }

    /// A line whose time cannot be read is outside every range: its place in time is unknown.
    fn within_times(&self, time: &str) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(at) =
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        else {
            return false;
        };
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until)
    }
}

/// Calls `each` with every matching event of the trail at `path`, oldest first. A line that
/// is not an event (a torn last line after a crash) is reported, not fatal.
pub fn read_trail(
    path: &Path,
    query: &AuditQuery,
    mut each: impl FnMut(&Event),
) -> Result<ReadReport, String> {
    read_lines(path, query, |line| {
        if let Line::Event(event) = line {
            each(event)
        }
    })
}

/// [`read_trail`], with checkpoint lines too when the query asks for them.
pub fn read_lines(
    path: &Path,
    query: &AuditQuery,
    mut each: impl FnMut(Line<'_>),
) -> Result<ReadReport, String> {
    let mut report = ReadReport::default();
    for file in trail_files(path) {
        let opened = match std::fs::File::open(&file) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(format!(
                    "cannot read the audit trail {}: {e}",
                    file.display()
                ));
            }
        };
        for (number, line) in BufReader::new(opened).lines().enumerate() {
            let line =
                line.map_err(|e| format!("cannot read the audit trail {}: {e}", file.display()))?;
            if chain::is_checkpoint(line.as_bytes()) {
                report.checkpoints += 1;
                if query.checkpoints {
                    each(Line::Checkpoint(&line));
                }
                continue;
            }
            match serde_json::from_str::<Event>(&line) {
                Ok(event) => {
                    report.lines += 1;
                    if query.matches(&event) {
                        report.matched += 1;
                        each(Line::Event(&event));
                    }
                }
                Err(_) => report
                    .unreadable
                    .push(format!("{} line {}", file.display(), number + 1)),
            }
        }
    }
    Ok(report)
}

/// The trail's files, oldest first: the rotated ones up to the first missing, then `path`.
pub fn trail_files(path: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = (1..)
        .map(|n| rotated(path, n))
        .take_while(|file| file.exists())
        .collect();
    files.reverse();
    files.push(path.to_path_buf());
    files
}

/// A line as read: an event, or a checkpoint (as stored) when asked for.
pub enum Line<'a> {
    Event(&'a Event),
    Checkpoint(&'a str),
}

#[derive(Debug, Default)]
pub struct ReadReport {
    /// Event lines; checkpoints are counted apart.
    pub lines: u64,
    pub checkpoints: u64,
    pub matched: u64,
    /// Where lines could not be read as events.
    pub unreadable: Vec<String>,
}
