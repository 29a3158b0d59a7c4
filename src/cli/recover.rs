//! `recover`: unseal a dead node's LUKS2 passphrase from its disk, as the node would.

use super::client::Target;
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use talos_kms_server::recover::{self, Check};

/// Unseal a volume's LUKS2 passphrase from its disk, as its node would, to open it elsewhere.
#[derive(clap::Args)]
#[command(long_about = "\
Reads the sideroKMS token Talos keeps in a volume's LUKS2 header (a partition such as \
/dev/sda6, or a disk image of one), unseals its blob with the KMS as the node would, and prints \
the key slot's passphrase (base64 of the unsealed 32 bytes) or writes it to --key-file for \
`cryptsetup open --key-file`.

The KMS binds each blob to the node's UUID and source address, and answers random bytes when \
either is wrong: only LUKS2 can tell whether the passphrase is right. When cryptsetup is \
installed, it is asked (`cryptsetup open --test-passphrase`), and a passphrase that opens no key \
slot is refused rather than printed; otherwise check it yourself with that command.

With `lockToSTATE: true` Talos appends a salt kept in the STATE partition to the base64 text; \
this command cannot know it, so the check fails: use --no-check and append the salt.")]
pub struct Args {
    /// The encrypted partition or image: where Talos wrote its LUKS2 header.
    #[arg(long, value_name = "PATH")]
    device: PathBuf,
    /// The node's SMBIOS UUID (`talosctl get systeminformation`; the KMS log names it, and
    /// the node's address, at every unseal).
    #[arg(long, value_name = "UUID")]
    node_uuid: String,
    #[command(flatten)]
    target: Target,
    /// Which sideroKMS token to use when there are several (Talos numbers it as its key slot).
    #[arg(long, value_name = "ID")]
    token: Option<u32>,
    /// Write the passphrase here (mode 0600, no newline) instead of printing it.
    #[arg(long, value_name = "OUT")]
    key_file: Option<PathBuf>,
    /// Do not ask cryptsetup whether the passphrase opens a key slot (for lockToSTATE keys).
    #[arg(long)]
    no_check: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = shell_word(&args.device);
    let volume = recover::open(&args.device)?;
    if let Some(flaw) = &volume.primary_flaw {
        eprintln!(
            "note: the primary LUKS2 header of {device} is unusable ({flaw}); read the secondary \
             at offset {} (cryptsetup repairs the primary from it when it opens the volume)",
            volume.header.offset
        );
    }
    let token = volume.kms_token(args.token)?;
    let client = args.target.client()?;
    let source = match client.options().source_ip {
        Some(ip) => ip.to_string(),
        None => "this host's own, as no --source-ip was given".into(),
    };
    let answer = client
        .unseal(&args.node_uuid, &token.sealed)
        .await
        .with_context(|| format!("cannot unseal token {} of {device}", token.id))?;
    let passphrase = BASE64.encode(answer);

    let check = match (args.no_check, recover::find_cryptsetup()) {
        (true, _) => None,
        (false, None) => Some(Check::Failed("cryptsetup is not installed".into())),
        (false, Some(cryptsetup)) => {
            let (path, text) = (args.device.clone(), passphrase.clone());
            let check = tokio::task::spawn_blocking(move || {
                recover::check_passphrase(&cryptsetup, &path, &text)
            });
            Some(check.await.context("the cryptsetup check did not finish")?)
        }
    };
    if check == Some(Check::OpensNone) {
        anyhow::bail!(
            "the unsealed passphrase opens no key slot of {device} (cryptsetup \
             --test-passphrase), so it was not written: the KMS answers random bytes when the \
             node UUID ({}) or the source address ({source}) is not the one the blob was sealed \
             for, or when it does not know the blob; if this key uses lockToSTATE, the salt in \
             STATE is missing: run again with --no-check and append it",
            args.node_uuid
        );
    }

    // Without --key-file, stdout carries the passphrase alone, for a pipe; notes go to stderr.
    let (to_check, to_open) = match &args.key_file {
        Some(out) => {
            recover::write_key_file(out, &passphrase)?;
            println!(
                "wrote the passphrase of token {} to {}",
                token.id,
                out.display()
            );
            let out = shell_word(out);
            (
                format!("cryptsetup open --test-passphrase {device} --key-file {out}"),
                format!("cryptsetup open {device} NAME --key-file {out}"),
            )
        }
        None => {
            println!("{passphrase}");
            (
                format!("cryptsetup open --test-passphrase {device} (type it at the prompt)"),
                format!("cryptsetup open {device} NAME (type it at the prompt)"),
            )
        }
    };
    let say = |line: String| match args.key_file {
        Some(_) => println!("{line}"),
        None => eprintln!("{line}"),
    };
    match check {
        Some(Check::Opens(slot)) => {
            let slot = slot.map_or("a key slot".into(), |s| format!("key slot {s}"));
            say(format!(
                "ok: it opens {slot} of {device} (checked with cryptsetup)"
            ));
            say(format!("open the volume with: {to_open}"));
        }
        Some(Check::Failed(why)) => say(format!(
            "unchecked: {why}, so whether it is right cannot be told here (the KMS answers \
             random bytes to a wrong node UUID or source address); check it with: {to_check}"
        )),
        None => say(format!(
            "unchecked (--no-check): only LUKS2 can tell whether it is right; with lockToSTATE, \
             append the salt from STATE; check it with: {to_check}"
        )),
        Some(Check::OpensNone) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// A path as a shell word, for the commands shown to copy.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@,=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}
