//! Asking cryptsetup whether a passphrase opens a key slot: the only way to tell a real
//! unseal from the random bytes a refused one answers.

use crate::os_error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A slow key slot (argon2id at 1 GiB, on a slow machine) takes seconds; many, minutes.
const CHECK_TIMEOUT: Duration = Duration::from_secs(300);

/// What cryptsetup said about a passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// It opens a key slot (its number, when cryptsetup said it).
    Opens(Option<u32>),
    /// It opens no key slot.
    OpensNone,
    /// cryptsetup could not tell, for this reason.
    Failed(String),
}

/// cryptsetup on `PATH`, or in the sbin directories a non-root `PATH` lacks.
pub fn find_cryptsetup() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("cryptsetup"))
        .find(|file| {
            file.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `cryptsetup open --test-passphrase DEVICE --key-file -` with the passphrase on its
/// stdin, so it appears in no command line. Blocks, at most [`CHECK_TIMEOUT`].
pub fn check_passphrase(cryptsetup: &Path, device: &Path, passphrase: &str) -> Check {
    let mut child = match Command::new(cryptsetup)
        .args(["open", "--test-passphrase", "--verbose", "--key-file", "-"])
        .arg(device)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            return Check::Failed(format!(
                "{} did not start: {}",
                cryptsetup.display(),
                os_error::plain(&error)
            ));
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // cryptsetup may exit before reading (a device it refuses): its status says why.
        let _ = stdin.write_all(passphrase.as_bytes());
    }
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < CHECK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Check::Failed(format!(
                    "cryptsetup did not finish within {} s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(error) => return Check::Failed(os_error::plain(&error)),
        }
    };
    // Its output is a few lines: the pipes cannot fill before it exits.
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(error) => return Check::Failed(os_error::plain(&error)),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    match status.code() {
        Some(0) => Check::Opens(stdout.lines().find_map(|line| {
            line.strip_prefix("Key slot ")?
                .strip_suffix(" unlocked.")?
                .parse()
                .ok()
        })),
        // cryptsetup's status for "No key available with this passphrase".
        Some(2) => Check::OpensNone,
        code => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let said = stderr
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("no message");
            Check::Failed(format!(
                "cryptsetup failed ({}): {said}",
                code.map_or("killed by a signal".into(), |c| format!("status {c}"))
            ))
        }
    }
}
