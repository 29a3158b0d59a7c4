//! Command-line interface. `talos-kms-server --config FILE` serves, exactly like the legacy
//! server; everything else is a subcommand.

mod admin;
mod audit;
mod audit_init_key;
mod audit_verify;
mod bench;
mod check;
mod client;
mod completions;
mod db;
mod demo;
mod export_json;
mod fill;
mod import_json;
mod key_rotation;
mod key_source;
mod keys;
mod man;
mod pending;
mod progress;
mod recover;
mod serve;
mod talos;
mod time_text;
mod unseal_server;
mod window;

use clap::{Parser, Subcommand};

/// The version with the commit and the day it was built from (set by build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TALOS_KMS_COMMIT"),
    ", built ",
    env!("TALOS_KMS_BUILD_DATE"),
    ")"
);
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "talos-kms-server", version = VERSION, about, long_about = None)]
pub struct Cli {
    /// Config file (YAML, legacy keys). With no command: serve with it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Seal and Unseal until SIGTERM or SIGINT. SIGHUP (`systemctl reload`) reloads
    /// the certificate and key; the files are also watched and reloaded when they change.
    Serve(ConfigArg),
    /// Validate config, certificate, key, port and database without serving or writing.
    /// Exit 0: all good; 2: warnings only; 1: something that would fail.
    Check(check::Args),
    /// Import a legacy nodeDbFile.json into the database (idempotent).
    ImportJson(import_json::Args),
    /// Try it: serve on loopback with a throwaway CA and database, print the Talos patch.
    Demo(demo::Args),
    /// Act as a Talos node: seal, unseal or round-trip against an endpoint.
    Client(client::Args),
    /// Measure an endpoint the way Talos nodes use it (see BENCHMARKS.md).
    Bench(bench::Args),
    /// Fill a database or a legacy JSON file with N valid records, for benchmarks.
    Fill(fill::Args),
    /// List, show, revoke, restore and purge records, while the server runs.
    Keys(keys::Args),
    /// Read and filter the audit trail of seals, unseals and admin actions.
    Audit(audit::Args),
    /// Unseal a dead node's LUKS2 passphrase from its disk, as the node would.
    Recover(recover::Args),
    /// Back up the database while the server serves, verify a backup, restore one.
    Db(db::Args),
    /// Write the records as a legacy nodeDbFile.json, to undo a migration.
    ExportJson(export_json::Args),
    /// Open and close the unlock windows of `sealPolicy`/`unsealPolicy: window`.
    Window(window::Args),
    /// Approve or deny the nodes `sealPolicy`/`unsealPolicy: approve` keeps waiting.
    Pending(pending::Args),
    /// The nodes' side: print the machine-config patch for this server, lint machine configs.
    Talos(talos::Args),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::Args),
    /// Write the manual pages.
    Man(man::Args),
    /// Make the root key of the configured `keySource` (README, "Key custody").
    KeySource(key_source::Args),
    /// Give your key share to a sealed server (`keySource: shamir`), read from the terminal
    /// (not echoed) or stdin, through its local admin socket.
    UnsealServer(unseal_server::Args),
}

/// How a command prints its results.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// The command and its arguments as typed, for the audit trail (they hold no secrets).
fn command_line() -> Vec<String> {
    std::env::args().skip(1).collect()
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (YAML, legacy keys).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match (cli.command, cli.config) {
        (Some(Command::Serve(args)), _) => serve::run(&args.config).await,
        (None, Some(config)) => serve::run(&config).await,
        (Some(Command::Check(args)), _) => check::run(args).await,
        (Some(Command::ImportJson(args)), config) => {
            import_json::run(args, config, &command_line()).await
        }
        (Some(Command::Demo(args)), _) => demo::run(args).await,
        (Some(Command::Client(args)), _) => client::run(args).await,
        (Some(Command::Bench(args)), _) => bench::run(args).await,
        (Some(Command::Fill(args)), _) => fill::run(args).await,
        (Some(Command::Keys(args)), config) => keys::run(args, config, &command_line()).await,
        (Some(Command::Audit(args)), config) => audit::run(args, config),
        (Some(Command::Recover(args)), _) => recover::run(args).await,
        (Some(Command::Db(args)), config) => db::run(args, config, &command_line()).await,
        (Some(Command::ExportJson(args)), config) => {
            export_json::run(args, config, &command_line()).await
        }
        (Some(Command::Window(args)), config) => window::run(args, config, &command_line()).await,
        (Some(Command::Pending(args)), config) => pending::run(args, config, &command_line()).await,
        (Some(Command::Talos(args)), config) => talos::run(args, config).await,
        (Some(Command::Completions(args)), _) => completions::run(args),
        (Some(Command::Man(args)), _) => man::run(args),
        (Some(Command::KeySource(args)), _) => key_source::run(args),
        (Some(Command::UnsealServer(args)), config) => unseal_server::run(args, config),
        (None, None) => {
            anyhow::bail!(
                "nothing to do: start the server with `talos-kms-server --config FILE`, try it \
                 with `talos-kms-server demo`, or see `talos-kms-server --help`"
            )
        }
    }
}
