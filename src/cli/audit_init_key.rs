//! `audit init-key`: creates the `auditKeyFile` the config names.

use anyhow::bail;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::chain;
use talos_kms_server::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Config file of the server: the key goes where its `auditKeyFile` says.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(args: Args, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let Some(config) = args.config.or(config) else {
        bail!("give the server's --config FILE; its auditKeyFile says where the key goes");
    };
    let config = Config::read(&config)?;
    let Some(path) = config.audit_key_file else {
        bail!(
            "{} sets no auditKeyFile; add e.g. `auditKeyFile: /etc/talos-kms-server/audit.key` \
             and run this again",
            config.path.display()
        );
    };
    chain::create_key_file(&path).map_err(anyhow::Error::msg)?;
    println!(
        "wrote {} (32 random bytes, mode 0600); copy it somewhere safe off this host: \
         `audit verify` needs it to check the checkpoints",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
