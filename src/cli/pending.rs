//! `pending`: the requests `sealPolicy: approve` / `unsealPolicy: approve` refused, and the
//! operator's answer to them. An approved node gets through on its next retry (a booting
//! node retries every 30 s); the change takes effect while the server runs.

use super::Output;
use super::admin::{Admin, AdminArgs, OutputArg};
use super::time_text::{date, parse_age, rfc3339};
use anyhow::bail;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::Event;
use talos_kms_server::store::{self, Approval, ApprovalId, ApprovalState, Decision};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Requests awaiting a decision (with --all: approved and denied ones too).
    List {
        /// Approved and denied requests too, not only those awaiting a decision.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Let these requests through for a time; the node's next retry succeeds.
    Approve {
        /// Request ids, as `pending list` shows them.
        #[arg(required = true)]
        ids: Vec<ApprovalId>,
        /// How long the approval holds (e.g. 15m, 2h): every volume of a boot fits in it.
        /// After it, the node's next call is pending again.
        #[arg(long = "for", value_name = "TIME", value_parser = parse_age, default_value = "15m")]
        duration: i64,
    },
    /// Refuse these requests for good (PERMISSION_DENIED); `approve` can still undo it.
    Deny {
        /// Request ids, as `pending list` shows them.
        #[arg(required = true)]
        ids: Vec<ApprovalId>,
    },
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let admin = Admin::open(&args.admin.config_path(config)?).await?;
    let (ids, decision, verb) = match args.action {
        Action::List {
            all,
            output: OutputArg { output },
        } => {
            let state = (!all).then_some(ApprovalState::Pending);
            list(&admin.store.approvals(state).await?, output);
            return Ok(ExitCode::SUCCESS);
        }
        Action::Approve { ids, duration } => (
            ids,
            Decision::Approve {
                until: store::now() + duration,
            },
            "approved",
        ),
        Action::Deny { ids } => (ids, Decision::Deny, "denied"),
    };
    let mut unknown = Vec::new();
    for id in ids {
        match admin.store.decide(id, decision, store::now(), None).await? {
            Some(approval) => {
                let until = match approval.approved_until {
                    Some(until) if decision != Decision::Deny => {
                        format!(" until {} UTC", date(Some(until)))
                    }
                    _ => String::new(),
                };
                let detail = format!(
                    "{verb} {} of node {:?} from {}{until} (request {id})",
                    approval.operation, approval.node_uuid, approval.ip
                );
                println!("{detail}");
                admin.audit(
                    Event::admin(
                        &format!("pending {}", &verb[..verb.len() - 1]),
                        command_line,
                    )
                    .detail(detail),
                )?;
            }
            None => unknown.push(id.to_string()),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "no request has id {}; `talos-kms-server pending list --all` shows them",
            unknown.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list(approvals: &[Approval], output: Output) {
    match output {
        Output::Json => {
            for approval in approvals {
                println!("{}", json(approval));
            }
        }
        Output::Text => {
            if approvals.is_empty() {
                println!("no request awaits a decision");
                return;
            }
            println!(
                "{:>6}  {:<7} {:<38} {:<40} {:<9} {:>8}  {:<19}  until",
                "id", "call", "node", "address", "state", "attempts", "last seen"
            );
            for a in approvals {
                println!(
                    "{:>6}  {:<7} {:<38} {:<40} {:<9} {:>8}  {:<19}  {}",
                    a.id,
                    a.operation.as_str(),
                    a.node_uuid,
                    a.ip,
                    a.state.as_str(),
                    a.attempts,
                    date(Some(a.last_seen)),
                    a.approved_until
                        .map_or_else(|| "-".to_string(), |t| date(Some(t)))
                );
            }
        }
    }
}

fn json(approval: &Approval) -> serde_json::Value {
    serde_json::json!({
        "id": approval.id,
        "operation": approval.operation,
        "node": approval.node_uuid,
        "ip": approval.ip,
        "state": approval.state,
        "attempts": approval.attempts,
        "first_seen": rfc3339(Some(approval.first_seen)),
        "last_seen": rfc3339(Some(approval.last_seen)),
        "approved_until": rfc3339(approval.approved_until),
        "decided_at": rfc3339(approval.decided_at),
    })
}
