//! `audit verify`: checks the trail's hash chain and checkpoints.

use anyhow::bail;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::{self, chain};
use talos_kms_server::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// Config file of the server: its `auditLog` (with the rotated files) and `auditKeyFile`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The key file the checkpoints were written with (instead of the config's).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The server stopped cleanly, so the trail must end with its checkpoint: lines after
    /// the last one mean the end was cut (or the server was killed).
    #[arg(long)]
    stopped: bool,
    /// Trail files, oldest first, instead of --config.
    #[arg(value_name = "FILE", conflicts_with = "config")]
    files: Vec<PathBuf>,
}

pub fn run(args: Args, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = match args.config.or(config) {
        Some(path) if args.files.is_empty() => Some(Config::read(&path)?),
        _ => None,
    };
    let (files, keep) = match &config {
        Some(config) => {
            let keep = config.audit_rotation.keep;
            let mut files = Vec::new();
            for n in (1..=keep).rev() {
                let file = audit::rotated(&config.audit_log, n);
                match (file.exists(), files.is_empty()) {
                    (true, _) => files.push(file),
                    (false, false) => {
                        println!(
                            "FAILED: {} is missing, but older rotated files are there: it was \
                             deleted",
                            file.display()
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                    (false, true) => {}
                }
            }
            files.push(config.audit_log.clone());
            (files, Some(keep))
        }
        None if !args.files.is_empty() => (args.files, None),
        None => bail!("give the server's --config FILE, or the trail's files oldest first"),
    };
    let key_file = args
        .key_file
        .or_else(|| config.as_ref().and_then(|c| c.audit_key_file.clone()));
    let key = match &key_file {
        Some(path) => Some(chain::checkpoint_key(
            &*chain::read_key_file(path).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let found = match audit::verify_files(&files, key.as_ref(), keep).map_err(anyhow::Error::msg)? {
        Ok(found) => found,
        Err(tampered) => {
            println!("FAILED: {tampered}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match &found.chain_begins {
        None if found.lines == 0 => println!("the trail is empty"),
        None => println!(
            "no line carries the chain: {} lines written before tamper evidence, unprotected",
            found.unchained
        ),
        Some((at, true)) => println!("the chain begins at {at}, the first line ever written"),
        Some((at, false)) if found.unchained > 0 => println!(
            "the chain begins at {at}; the {} lines before it were written before tamper \
             evidence and are protected only by the checkpoints after them",
            found.unchained
        ),
        Some((at, false)) => {
            println!("the chain begins at {at}; the files before it were rotated away")
        }
    }
    for place in &found.torn {
        println!("note: {place} is not an audit line: torn by a crash, and chained over since");
    }
    if found.unchecked_keyed > 0 {
        println!(
            "warning: {} keyed checkpoints not checked: give --key-file (or auditKeyFile)",
            found.unchecked_keyed
        );
    }
    if found.unkeyed > 0 {
        println!(
            "warning: {} checkpoints are unkeyed digests: whoever can write the trail can \
             recompute them; set auditKeyFile",
            found.unkeyed
        );
    }
    let last = found
        .last_checkpoint
        .as_deref()
        .map_or("no checkpoint".to_string(), |at| {
            format!("the last checkpoint, {at}")
        });
    println!(
        "{} lines, {} checkpoints; {} lines at the end are unprotected since {last}",
        found.lines, found.checkpoints, found.unprotected
    );
    if args.stopped && found.unprotected > 0 {
        println!(
            "FAILED: the server stopped cleanly, so the trail must end with its checkpoint; the \
             {} lines after {last} mean that lines after them were cut from the end (or the \
             server was killed)",
            found.unprotected
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("OK: the trail is untouched up to {last}");
    Ok(ExitCode::SUCCESS)
}
