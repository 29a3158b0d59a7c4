//! `audit`: reads the audit trail (rotated files included, oldest first) and filters it.

use super::Output;
use super::time_text::parse_point;
use anyhow::{Context, bail};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::{self, Action, AuditQuery, Event, Outcome};
use talos_kms_server::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Config file of the server: the trail is where its `auditLog` says.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The trail itself, instead of --config.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    file: Option<PathBuf>,
    /// Only lines about this node UUID.
    #[arg(long, value_name = "UUID")]
    node: Option<String>,
    /// Only calls from this address (as written in the trail, e.g. 10.0.0.201).
    #[arg(long, value_name = "IP")]
    peer: Option<String>,
    /// Only lines about this record id.
    #[arg(long, value_name = "ID")]
    record: Option<i64>,
    /// Only seals, unseals or admin actions.
    #[arg(long, value_enum)]
    action: Option<Action>,
    /// Only calls answered (ok) or refused.
    #[arg(long, value_enum)]
    outcome: Option<Outcome>,
    /// From this time on: an age before now (30m, 1h, 7d), a day (2026-12-01, UTC), a UTC
    /// time (2026-12-01T10:30) or an RFC 3339 time with its offset.
    #[arg(long, value_name = "TIME", value_parser = parse_point)]
    since: Option<time::OffsetDateTime>,
    /// Before this time, written like --since.
    #[arg(long, value_name = "TIME", value_parser = parse_point)]
    until: Option<time::OffsetDateTime>,
    /// `text` for people; `json` prints the matching lines as they are stored.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub fn run(args: Args, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let path = match (args.file, args.config.or(config)) {
        (Some(file), _) => file,
        (None, Some(config)) => Config::read(&config)?.audit_log,
        (None, None) => bail!("give the server's --config FILE, or the trail's --file PATH"),
    };
    let query = AuditQuery {
        node: args.node,
        peer: args.peer,
        record: args.record,
        action: args.action,
        outcome: args.outcome,
        since: args.since,
        until: args.until,
    };
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let report = audit::read_trail(&path, &query, |event| {
        let line = match args.output {
            Output::Json => serde_json::to_string(event).unwrap_or_default(),
            Output::Text => text(event),
        };
        if let Err(e) = writeln!(stdout, "{line}") {
            failed.get_or_insert(e);
        }
    })
    .map_err(anyhow::Error::msg)?;
    if let Some(e) = failed {
        return Err(e).context("cannot print the trail");
    }
    for place in &report.unreadable {
        eprintln!("warning: {place} is not an audit line (torn by a crash?); skipped");
    }
    if args.output == Output::Text {
        eprintln!(
            "{} of {} lines in {} and its rotated files",
            report.matched,
            report.lines,
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn text(event: &Event) -> String {
    let shown = |value: Option<&dyn std::fmt::Display>| value.map_or("?".into(), |v| v.to_string());
    let mut parts = vec![
        event.time.clone(),
        shown(event.action.as_ref().map(|a| a as _)),
        shown(event.outcome.as_ref().map(|o| o as _)),
    ];
    if let Some(reason) = &event.reason {
        parts.push(format!("({reason})"));
    }
    let command = event.command.as_ref().map(|command| {
        let args = event.args.as_deref().unwrap_or_default().join(" ");
        format!("{command} {args}").trim_end().to_string()
    });
    let fields = [
        ("peer", event.peer.clone()),
        ("node", event.node.clone()),
        ("record", event.record.map(|id| id.to_string())),
        ("user", event.user.clone()),
        ("command", command),
        ("detail", event.detail.clone()),
    ];
    for (key, value) in fields {
        if let Some(value) = value {
            parts.push(format!("{key}={value}"));
        }
    }
    parts.join(" ")
}
