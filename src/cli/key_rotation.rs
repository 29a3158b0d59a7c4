//! `keys rotate-data-key`, `keys rotate-root` and `keys destroy-data-key`: key custody's
//! changes beside running servers, each audited.

use super::admin::{Admin, admin_event};
use anyhow::{Context, bail};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use talos_kms_server::config::Config;
use talos_kms_server::custody::{KeySourceConfig, Root, rotation};

fn root_of(admin: &Admin) -> anyhow::Result<Root> {
    let source = key_source(&admin.config)?;
    Ok(source.open()?)
}

fn key_source(config: &Config) -> anyhow::Result<&KeySourceConfig> {
    match &config.key_source {
        Some(KeySourceConfig::Shamir { .. }) => bail!(
            "with a shamir key source the root key exists only in the running server; this \
             build rotates keys of file, tpm2 and pkcs11 sources only"
        ),
        Some(source) => Ok(source),
        None => bail!(
            "the config has no `keySource`: there are no data keys to rotate (README, \"Key \
             custody\")"
        ),
    }
}

pub async fn rotate_data_key(admin: &Admin, command_line: &[String]) -> anyhow::Result<ExitCode> {
    let version = rotation::rotate_data_key(admin.store.as_ref(), &root_of(admin)?).await?;
    let summary = format!(
        "made data key v{version}: new seals use it within seconds, and servers re-wrap older \
         records in the background (`check` shows the records per version)"
    );
    admin.audit(admin_event(command_line).detail(&summary))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

pub async fn rotate_root(
    admin: &Admin,
    to_config: &Path,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let old = root_of(admin)?;
    let new_config = Config::read(to_config)
        .with_context(|| format!("the new key source's config {}", to_config.display()))?;
    let new_source = key_source(&new_config)?;
    if Some(new_source) == admin.config.key_source.as_ref() {
        bail!(
            "{} names the same key source as the current config: give a config with the new \
             one (`key-source init` makes its key)",
            to_config.display()
        );
    }
    let versions = rotation::rotate_root(admin.store.as_ref(), &old, &new_source.open()?).await?;
    let summary = format!(
        "re-wrapped data keys {versions:?} under {}; point every server's config at it and \
         restart them, then destroy the old root key",
        new_source.describe()
    );
    admin.audit(admin_event(command_line).detail(&summary))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

pub async fn destroy_data_key(
    admin: &Admin,
    version: u32,
    shred: bool,
    yes: bool,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let root = root_of(admin)?;
    if !yes && !confirmed(version)? {
        println!("nothing destroyed");
        return Ok(ExitCode::from(1));
    }
    let destroyed = rotation::destroy_data_key(admin.store.as_ref(), &root, version, shred).await?;
    let summary = format!(
        "destroyed data key v{version}; {} records wrapped under it are unreadable for good \
         (backups keep it wrapped under the root key: rotate the root and destroy the old one \
         to shred those too)",
        destroyed.records
    );
    admin.audit(admin_event(command_line).detail(&summary))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

/// Asks for the version typed again; without a terminal, refuses rather than guess.
fn confirmed(version: u32) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("not destroying data key v{version} without confirmation: add --yes");
    }
    print!("Destroy data key v{version} for good? Type v{version} to confirm: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == format!("v{version}"))
}
