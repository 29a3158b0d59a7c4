//! `key-source init`: makes the root key of the configured `keySource`, never replacing one.

use anyhow::bail;
use std::process::ExitCode;
use talos_kms_server::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Make the root key for the configured `keySource` (a key file, a sealed TPM object, a
    /// key on the PKCS#11 token, or Shamir shares printed once). Refuses to replace one.
    Init(super::ConfigArg),
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Command::Init(args) = args.command;
    let config = Config::read(&args.config)?;
    let Some(source) = config.key_source else {
        bail!(
            "{} has no `keySource`; add one (README, \"Key custody\"), then run this again",
            args.config.display()
        );
    };
    let made = source.init()?;
    eprintln!("made {}", made.made);
    // The shares alone go to stdout, one per line, so that they can be piped apart.
    for share in &made.shares {
        println!("{share}");
    }
    Ok(ExitCode::SUCCESS)
}
