//! Progress of long operations: a line redrawn on a terminal, nothing in scripts.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often: a million records must not mean a million writes.
const REDRAW: Duration = Duration::from_millis(200);

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    shown: bool,
    last: Option<Instant>,
    on_terminal: bool,
}

impl Progress {
    /// `what` names the work ("exported", "verified"…); `total` when it is known.
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        Progress {
            what,
            total,
            shown: false,
            last: None,
            on_terminal: std::io::stderr().is_terminal(),
        }
    }

    pub fn update(&mut self, done: u64) {
        if !self.on_terminal || self.last.is_some_and(|last| last.elapsed() < REDRAW) {
            return;
        }
        self.last = Some(Instant::now());
        self.shown = true;
        let line = match self.total {
            Some(total) if total > 0 => {
                format!("{} {done} of {total} ({}%)", self.what, done * 100 / total)
            }
            _ => format!("{} {done}", self.what),
        };
        let mut stderr = std::io::stderr();
        let _ = write!(stderr, "\r\x1b[2K{line}");
        let _ = stderr.flush();
    }

    /// Clears the line, leaving the terminal for the summary.
    pub fn finish(self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
