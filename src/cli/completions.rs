//! `completions`: the shell completion script, from the same clap definitions the binary
//! parses with, so that it can never offer an option the binary lacks.

use anyhow::Context;
use clap::CommandFactory;
use std::io::Write;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut command = super::Cli::command();
    // Into memory first: the generator panics on a write error such as a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "talos-kms-server", &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("cannot print the completion script")?;
    Ok(ExitCode::SUCCESS)
}
