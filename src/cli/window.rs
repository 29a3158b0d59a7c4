//! `window`: open, close and show the unlock windows of `sealPolicy: window` and
//! `unsealPolicy: window`, while the server runs; the next request sees the change.

use super::Output;
use super::admin::{Admin, AdminArgs, OutputArg};
use super::time_text::{date, parse_age, rfc3339};
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::Event;
use talos_kms_server::policy::Mode;
use talos_kms_server::store::{self, Operation, Window};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Allow seals or unseals for a time, e.g. while nodes are installed or rebooted.
    Open {
        #[arg(value_enum)]
        operation: Which,
        /// How long (e.g. 30m, 2h); opening again moves the end.
        #[arg(long = "for", value_name = "TIME", value_parser = parse_age, default_value = "30m")]
        duration: i64,
    },
    /// Close windows now (both when no operation is named).
    Close {
        #[arg(value_enum)]
        operation: Option<Which>,
    },
    /// Show each operation's policy and window.
    Status {
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Seal,
    Unseal,
    Both,
}

impl Which {
    fn operations(self) -> &'static [Operation] {
        match self {
            Which::Seal => &[Operation::Seal],
            Which::Unseal => &[Operation::Unseal],
            Which::Both => &Operation::ALL,
        }
    }
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let admin = Admin::open(&args.admin.config_path(config)?).await?;
    match args.action {
        Action::Open {
            operation,
            duration,
        } => {
            let now = store::now();
            let mut opened = Vec::new();
            for &operation in operation.operations() {
                admin
                    .store
                    .open_window(Window {
                        operation,
                        opened_at: now,
                        closes_at: now + duration,
                        tag: None,
                    })
                    .await?;
                opened.push(operation.as_str());
                println!(
                    "{operation} window open until {} UTC",
                    date(Some(now + duration))
                );
                warn_unless_window_mode(&admin, operation);
            }
            admin.audit(Event::admin("window open", command_line).detail(format!(
                "{} window open until {}",
                opened.join(" and "),
                date(Some(now + duration))
            )))?;
        }
        Action::Close { operation } => {
            let mut closed = Vec::new();
            for &operation in operation.unwrap_or(Which::Both).operations() {
                if admin.store.close_window(operation).await? {
                    closed.push(operation.as_str());
                }
            }
            let detail = if closed.is_empty() {
                "no window was open".to_string()
            } else {
                format!("{} window closed", closed.join(" and "))
            };
            println!("{detail}");
            admin.audit(Event::admin("window close", command_line).detail(detail))?;
        }
        Action::Status {
            output: OutputArg { output },
        } => status(&admin, output).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(admin: &Admin, output: Output) -> anyhow::Result<()> {
    let now = store::now();
    let windows = admin.store.windows().await?;
    let mut rows = Vec::new();
    for operation in Operation::ALL {
        let mode = mode_of(admin, operation);
        let window = windows.iter().find(|w| w.operation == operation);
        let open = window.is_some_and(|w| now < w.closes_at);
        match output {
            Output::Json => rows.push(serde_json::json!({
                "operation": operation,
                "policy": mode.as_str(),
                "window_open": open,
                "opened_at": window.and_then(|w| rfc3339(Some(w.opened_at))),
                "closes_at": window.and_then(|w| rfc3339(Some(w.closes_at))),
            })),
            Output::Text => {
                let state = match window {
                    Some(w) if open => format!(
                        "open until {} UTC ({} min left)",
                        date(Some(w.closes_at)),
                        (w.closes_at - now + 59) / 60
                    ),
                    Some(w) => format!("closed since {} UTC", date(Some(w.closes_at))),
                    None => "closed".to_string(),
                };
                let effect = match mode {
                    Mode::Window if open => "calls allowed",
                    Mode::Window => "calls refused until a window opens",
                    Mode::Open => "window not used: open to anyone allowed by the limits",
                    Mode::Approve => "window not used: each node needs approval",
                };
                println!(
                    "{operation:<7} policy {:<8} window {state}; {effect}",
                    mode.as_str()
                );
            }
        }
    }
    if output == Output::Json {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}

fn mode_of(admin: &Admin, operation: Operation) -> Mode {
    match operation {
        Operation::Seal => admin.config.policy.seal,
        Operation::Unseal => admin.config.policy.unseal,
    }
}

fn warn_unless_window_mode(admin: &Admin, operation: Operation) {
    let mode = mode_of(admin, operation);
    if mode != Mode::Window {
        eprintln!(
            "note: {operation}Policy is {} in {}: the window has no effect until it is \
             `{operation}Policy: window` (and the server restarted)",
            mode.as_str(),
            admin.config.path.display()
        );
    }
}
