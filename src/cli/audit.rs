//! `audit`: reads the audit trail (rotated files included, oldest first) and filters it.

use super::Output;
use super::time_text::parse_point;
use anyhow::{Context, bail};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::{self, Action, AuditQuery, Event, Line, Outcome};
use talos_kms_server::config::Config;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<AuditCommand>,
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
    /// Show the checkpoint lines too (see `audit verify`).
    #[arg(long)]
    checkpoints: bool,
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Check the trail's hash chain and checkpoints: exit 0 when untouched, 1 naming the
    /// first line edited, removed, reordered or inserted.
    Verify(super::audit_verify::Args),
    /// Create the `auditKeyFile` the config names: 32 random bytes, mode 0600. Never
    /// replaces one.
    InitKey(super::audit_init_key::Args),
}

pub fn run(args: Args, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(AuditCommand::Verify(verify)) => return super::audit_verify::run(verify, config),
        Some(AuditCommand::InitKey(init)) => return super::audit_init_key::run(init, config),
        None => {}
    }
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
        checkpoints: args.checkpoints,
    };
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let report = audit::read_lines(&path, &query, |line| {
        let line = match (line, args.output) {
            (Line::Event(event), Output::Json) => serde_json::to_string(event).unwrap_or_default(),
            (Line::Event(event), Output::Text) => text(event),
            (Line::Checkpoint(stored), Output::Json) => stored.to_string(),
            (Line::Checkpoint(stored), Output::Text) => checkpoint_text(stored),
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

fn checkpoint_text(stored: &str) -> String {
    match serde_json::from_str::<audit::chain::CheckpointLine>(stored) {
        Ok(line) => format!(
            "{} checkpoint ({}) lines={}{}",
            line.time,
            line.checkpoint.why.label(),
            line.checkpoint.lines,
            if line.checkpoint.keyed { " keyed" } else { "" }
        ),
        Err(_) => stored.to_string(),
    }
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
