//! `talos patch` and `talos lint`: the nodes' side of the setup.

use super::Output;
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::client::Endpoint;
use talos_kms_server::config::Config;
use talos_kms_server::talos::lint::{self, LintOptions, PUBLIC_ROOTS_SOURCE, Severity};
use talos_kms_server::talos::patch::{self, Fallback, PatchOptions, PatchVolume, ServerTrust};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Print the machine-config documents nodes need to use this server, for
    /// `talosctl patch mc --patch @FILE`.
    Patch(PatchArgs),
    /// Find what in Talos machine configs would stop a boot: KMS keys, slots, endpoints,
    /// certificates. Exit 0: clean; 2: warnings only; 1: errors.
    Lint(LintArgs),
}

#[derive(clap::Args)]
struct PatchArgs {
    /// The server's config: the endpoint comes from its certificate's first name and its
    /// port, and its CA is added when the chain does not lead to a public root.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The endpoint nodes use, https://HOST:PORT (instead of the certificate's name).
    #[arg(long, value_name = "URL")]
    endpoint: Option<Endpoint>,
    /// PEM CA certificate(s) nodes must trust, put in a TrustedRootsConfig (instead of the
    /// top of the server's chain).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A system volume to encrypt with the KMS; repeat for both. Without --volume and
    /// --user-volume: EPHEMERAL.
    #[arg(long = "volume", value_enum, value_name = "VOLUME")]
    volumes: Vec<SystemVolume>,
    /// A user volume (UserVolumeConfig) to encrypt with the KMS, by name; repeatable.
    #[arg(long = "user-volume", value_name = "NAME")]
    user_volumes: Vec<String>,
    /// LUKS2 slot of the KMS key.
    #[arg(long, default_value_t = 0, value_name = "N")]
    slot: u8,
    /// A second key in another slot, that opens the volumes while the KMS is out of reach.
    #[arg(long, value_enum)]
    fallback: Option<FallbackArg>,
    /// Slot of the --fallback key [default: the KMS slot + 1].
    #[arg(long, value_name = "N")]
    fallback_slot: Option<u8>,
    /// `yaml` for talosctl, `json` (endpoint, notes, documents) for tools.
    #[arg(long, value_enum, default_value_t = PatchOutput::Yaml)]
    output: PatchOutput,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SystemVolume {
    #[value(name = "STATE")]
    State,
    #[value(name = "EPHEMERAL")]
    Ephemeral,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FallbackArg {
    /// Sealed by the TPM (needs SecureBoot).
    Tpm,
    /// Derived from the node UUID: weak against physical access.
    #[value(name = "nodeID")]
    NodeId,
    /// A random passphrase in the patch, locked to STATE; not for STATE.
    Static,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PatchOutput {
    Yaml,
    Json,
}

#[derive(clap::Args)]
struct LintArgs {
    /// Machine configs (as `talosctl gen config` writes them) or patches, for the same nodes.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Read the files only: do not connect to the KMS endpoints they name.
    #[arg(long)]
    offline: bool,
    /// `text` for people, `json` (every finding and the counts) for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// `global_config`: a `--config` given before `talos`, as for the other commands.
pub async fn run(args: Args, global_config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    match args.action {
        Action::Patch(mut args) => {
            args.config = args.config.or(global_config);
            patch(args)
        }
        Action::Lint(args) => lint(args).await,
    }
}

fn patch(args: PatchArgs) -> anyhow::Result<ExitCode> {
    let ca = match &args.ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?,
        ),
        None => None,
    };
    let trust = match &args.config {
        Some(path) => {
            let config = Config::read(path)?;
            let chain = std::fs::read_to_string(&config.server_cert_file).with_context(|| {
                format!(
                    "cannot read serverCertFile {}",
                    config.server_cert_file.display()
                )
            })?;
            ServerTrust::from_chain(&chain, config.listen.port(), args.endpoint.clone()).map_err(
                |problem| anyhow::anyhow!("{}: {problem}", config.server_cert_file.display()),
            )?
        }
        None => ServerTrust {
            endpoint: args.endpoint.clone().context(
                "give --config FILE (the server's config, for its certificate and port) \
                     or --endpoint https://HOST:PORT",
            )?,
            private_ca: None,
        },
    };
    let private_ca = match ca {
        Some(pem) if patch::pem_blocks(&pem).is_empty() => bail!(
            "{}: no -----BEGIN CERTIFICATE----- block in it",
            args.ca
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        Some(pem) => Some(pem),
        None => trust.private_ca,
    };
    let mut volumes: Vec<PatchVolume> = args
        .volumes
        .iter()
        .map(|volume| match volume {
            SystemVolume::State => PatchVolume::State,
            SystemVolume::Ephemeral => PatchVolume::Ephemeral,
        })
        .chain(args.user_volumes.iter().cloned().map(PatchVolume::User))
        .collect();
    if volumes.is_empty() {
        volumes.push(PatchVolume::Ephemeral);
    }
    let options = PatchOptions {
        endpoint: trust.endpoint,
        volumes,
        slot: args.slot,
        fallback: args.fallback.map(|fallback| match fallback {
            FallbackArg::Tpm => Fallback::Tpm,
            FallbackArg::NodeId => Fallback::NodeId,
            FallbackArg::Static => Fallback::Static,
        }),
        fallback_slot: args.fallback_slot.unwrap_or(if args.slot == 31 {
            30
        } else {
            args.slot + 1
        }),
        private_ca,
        loopback_hint: "rerun with `--endpoint https://HOST:PORT`, HOST a name of the \
                        certificate that nodes resolve to this server (or serve with \
                        `bindAddress` and a certificate for that name)"
            .into(),
    };
    let patch = patch::build(&options).map_err(anyhow::Error::msg)?;
    match args.output {
        PatchOutput::Yaml => print!("{}", patch.yaml().map_err(anyhow::Error::msg)?),
        PatchOutput::Json => println!("{}", serde_json::to_string_pretty(&patch)?),
    }
    Ok(ExitCode::SUCCESS)
}

async fn lint(args: LintArgs) -> anyhow::Result<ExitCode> {
    let options = LintOptions {
        offline: args.offline,
        ..LintOptions::default()
    };
    let report = lint::lint(&args.files, &options).await;
    let (errors, warnings, notes) = (
        report.count(Severity::Error),
        report.count(Severity::Warning),
        report.count(Severity::Note),
    );
    match args.output {
        Output::Text => {
            for finding in &report.findings {
                let severity = match finding.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Note => "note",
                };
                let mut place = finding.file.clone();
                for part in [&finding.document, &finding.path].into_iter().flatten() {
                    place.push_str(": ");
                    place.push_str(part);
                }
                println!("{severity}[{}] {place}", finding.rule);
                println!("  {}", finding.problem);
                println!("  fix: {}", finding.fix);
            }
            if report.online {
                println!("public roots: {PUBLIC_ROOTS_SOURCE}");
            } else {
                println!("offline: endpoints were not looked at");
            }
            println!(
                "{errors} error{}, {warnings} warning{}, {notes} note{} in {} file{}",
                plural(errors),
                plural(warnings),
                plural(notes),
                args.files.len(),
                plural(args.files.len())
            );
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "findings": report.findings,
                "errors": errors,
                "warnings": warnings,
                "notes": notes,
                "online": report.online,
                "public_roots": report.online.then_some(PUBLIC_ROOTS_SOURCE),
                "exit_code": report.exit_code(),
            })
        ),
    }
    Ok(ExitCode::from(report.exit_code()))
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}
