//! `unseal-server`: gives one operator's key share to a sealed server (`keySource: shamir`)
//! through its local admin socket, and prints the server's answer.

use anyhow::bail;
use rustix::termios::{self, LocalModes, OptionalActions, Termios};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::config::Config;
use talos_kms_server::custody::{KeySourceConfig, admin_socket};
use zeroize::Zeroizing;

/// A share's line is about 110 bytes; a longer line is not one.
const MAX_SHARE: usize = 1024;

#[derive(clap::Args)]
pub struct Args {
    /// Config file of the server; `adminSocket` there names the socket.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Discard the shares given so far (one of them was from another set) instead of giving
    /// one.
    #[arg(long, conflicts_with = "status")]
    start_over: bool,
    /// Only say how many shares the server holds.
    #[arg(long)]
    status: bool,
}

pub fn run(args: Args, global: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let path = super::admin::config_path(args.config, global)?;
    let config = Config::read(&path)?;
    if !matches!(config.key_source, Some(KeySourceConfig::Shamir { .. })) {
        bail!(
            "{} has no `keySource: {{shamir: ...}}`: only a server whose root key is split into \
             operators' shares starts sealed",
            path.display()
        );
    }
    let request = if args.start_over {
        Zeroizing::new(b"start-over".to_vec())
    } else if args.status {
        Zeroizing::new(b"status".to_vec())
    } else {
        let share = read_share()?;
        let mut request = Zeroizing::new(Vec::with_capacity(6 + share.len()));
        request.extend_from_slice(b"share ");
        request.extend_from_slice(&share);
        request
    };
    let answer = admin_socket::ask(&config.admin_socket, &request).map_err(anyhow::Error::msg)?;
    println!("{answer}");
    Ok(if answer.starts_with("refused") {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One line from stdin, not echoed when it is a terminal, in memory zeroed when dropped.
fn read_share() -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let stdin = std::io::stdin();
    let _quiet = if stdin.is_terminal() {
        eprint!("Key share (not shown as you type): ");
        Some(EchoOff::new(&stdin)?)
    } else {
        None
    };
    let mut buffer = Zeroizing::new(vec![0u8; MAX_SHARE]);
    let mut filled = 0;
    // Read directly, not through std's buffered stdin, whose buffer is never zeroed.
    let end = loop {
        let read = rustix::io::read(&stdin, &mut buffer[filled..])?;
        filled += read;
        if let Some(end) = buffer[..filled].iter().position(|b| *b == b'\n') {
            break end;
        }
        if read == 0 {
            break filled;
        }
        if filled == MAX_SHARE {
            bail!("the input is longer than {MAX_SHARE} bytes: a share is one line of about 110");
        }
    };
    buffer.truncate(end);
    let start = buffer
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(buffer.len());
    if start == buffer.len() {
        bail!("no share given: type or paste your share, one line as `key-source init` printed it");
    }
    buffer.drain(..start);
    Ok(buffer)
}

/// The terminal without echo until dropped.
struct EchoOff<'a> {
    stdin: &'a std::io::Stdin,
    saved: Termios,
}

impl<'a> EchoOff<'a> {
    fn new(stdin: &'a std::io::Stdin) -> anyhow::Result<EchoOff<'a>> {
        let saved = termios::tcgetattr(stdin)?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        termios::tcsetattr(stdin, OptionalActions::Now, &quiet)?;
        Ok(EchoOff { stdin, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.stdin, OptionalActions::Now, &self.saved);
    }
}
