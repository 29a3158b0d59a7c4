//! `keys rotate-data-key`, `keys rotate-root` and `keys destroy-data-key`: key custody's
//! changes beside running servers, each audited.

use super::admin::{Admin, admin_event};
use anyhow::{Context, bail};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use talos_kms_server::config::Config;
use talos_kms_server::custody::{KeySourceConfig, Root, admin_socket, rotation};
use zeroize::Zeroizing;

fn root_of(admin: &Admin) -> anyhow::Result<Root> {
    let source = key_source(&admin.config)?;
    Ok(source.open()?)
}

fn key_source(config: &Config) -> anyhow::Result<&KeySourceConfig> {
    match &config.key_source {
        Some(source) => Ok(source),
        None => bail!(
            "the config has no `keySource`: there are no data keys to rotate (README, \"Key \
             custody\")"
        ),
    }
}

/// With a shamir source the root exists only in the running server: the change is asked of
/// it over its admin socket. Its answer, but for the new shares it may hold.
fn ask_server(admin: &Admin, request: &str) -> anyhow::Result<Option<(String, Vec<String>)>> {
    if !matches!(
        admin.config.key_source,
        Some(KeySourceConfig::Shamir { .. })
    ) {
        return Ok(None);
    }
    let answer = Zeroizing::new(
        admin_socket::ask(&admin.config.admin_socket, request.as_bytes())
            .map_err(anyhow::Error::msg)?,
    );
    let Some(done) = answer.strip_prefix("rotated: ") else {
        bail!("the server answered: {}", answer.as_str());
    };
    let mut parts = done.split(" share ");
    let said = parts.next().unwrap_or_default().to_string();
    Ok(Some((said, parts.map(str::to_string).collect())))
}

pub async fn rotate_data_key(admin: &Admin, command_line: &[String]) -> anyhow::Result<ExitCode> {
    let summary = match ask_server(admin, "rotate-data-key")? {
        Some((said, _)) => said,
        None => {
            let version = rotation::rotate_data_key(admin.store.as_ref(), &root_of(admin)?).await?;
            format!(
                "made data key v{version}: new seals use it within seconds, and servers \
                 re-wrap older records in the background (`check` shows the records per \
                 version)"
            )
        }
    };
    admin.audit(admin_event(command_line).detail(&summary))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

pub async fn rotate_root(
    admin: &Admin,
    to_config: Option<&Path>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    if let Some((said, shares)) = ask_server(admin, "rotate-root")? {
        admin.audit(admin_event(command_line).detail(&said))?;
        println!("{said}");
        println!(
            "The new shares, shown this once: give each to one operator now. The old ones \
             open nothing from now on."
        );
        for share in shares {
            println!("{share}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(to_config) = to_config else {
        bail!(
            "--to-config FILE is required: the config whose keySource is the new one \
             (`key-source init` makes its key)"
        );
    };
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
    if !yes && !confirmed(version)? {
        println!("nothing destroyed");
        return Ok(ExitCode::from(1));
    }
    let request = format!(
        "destroy-data-key {version}{}",
        if shred { " shred" } else { "" }
    );
    let destroyed = match ask_server(admin, &request)? {
        Some((said, _)) => said,
        None => {
            let root = root_of(admin)?;
            let destroyed =
                rotation::destroy_data_key(admin.store.as_ref(), &root, version, shred).await?;
            format!(
                "destroyed data key v{version}; {} records wrapped under it are unreadable \
                 for good",
                destroyed.records
            )
        }
    };
    let summary = format!(
        "{destroyed} (backups keep it wrapped under the root key: rotate the root and destroy \
         the old one to shred those too)"
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
