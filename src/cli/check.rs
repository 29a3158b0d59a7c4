//! `check`: validates everything `serve` would use, without serving or changing anything.

use super::Output;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::check::{self, CheckOptions, Level};
use talos_kms_server::client::Endpoint;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (YAML, legacy keys). Never written: a missing file is reported.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The endpoint nodes use (https://HOST:PORT), to check that the certificate names HOST.
    #[arg(long, value_name = "URL")]
    endpoint: Option<Endpoint>,
    /// `text` for people, `json` (one object with every finding and the result) for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = CheckOptions {
        endpoint_host: args.endpoint.map(|endpoint| endpoint.host),
    };
    let report = check::run(&args.config, &options).await;
    let (problems, warnings) = (report.count(Level::Problem), report.count(Level::Warning));
    let verdict = match report.worst() {
        Level::Problem => format!(
            "{problems} problem{} found: `serve` would fail or nodes would refuse the server",
            plural(problems)
        ),
        Level::Warning => format!("ok, with {warnings} warning{}", plural(warnings)),
        Level::Ok | Level::Info => "ok".into(),
    };
    match args.output {
        Output::Text => {
            for finding in &report.findings {
                let mark = match finding.level {
                    Level::Ok => "",
                    Level::Info => "note: ",
                    Level::Warning => "WARNING: ",
                    Level::Problem => "PROBLEM: ",
                };
                println!("{:<12} {mark}{}", finding.topic, finding.message);
            }
            println!("{verdict}");
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "findings": report.findings,
                "result": verdict,
                "exit_code": report.exit_code(),
            })
        ),
    }
    Ok(ExitCode::from(report.exit_code()))
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}
