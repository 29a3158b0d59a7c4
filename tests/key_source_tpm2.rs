//! `keySource: {tpm2: ...}` against swtpm (Debian swtpm, swtpm-tools, tpm2-tools), started
//! here on loopback: init, unseal, restart with the TPM's saved state, and refusals with
//! another TPM and with a changed PCR. Built with `--features tpm2` only.
#![cfg(feature = "tpm2")]

mod common;

use common::*;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use talos_kms_server::custody::{DataKey, KeySourceConfig, Root};

/// A software TPM serving on 127.0.0.1:PORT (commands) and PORT+1 (control), its state in
/// `state`.
struct Swtpm {
    child: Child,
    port: u16,
}

impl Swtpm {
    fn start(state: &Path) -> Swtpm {
        std::fs::create_dir_all(state).unwrap();
        for _ in 0..20 {
            let port = free_pair();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm is missing: install swtpm and swtpm-tools (scripts/test does)");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(_exited) = child.try_wait().unwrap() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Swtpm { child, port };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start on loopback in 20 tries");
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn extend_pcr(&self, pcr: u8) {
        let status = Command::new("tpm2_pcrextend")
            .arg(format!("{pcr}:sha256={}", "ab".repeat(32)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .status()
            .expect("tpm2_pcrextend is missing: install tpm2-tools (scripts/test does)");
        assert!(status.success());
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port P with P+1 free too, as the swtpm TCTI wants them.
fn free_pair() -> u16 {
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < u16::MAX
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
        {
            return port;
        }
    }
    panic!("no two free neighbouring ports on loopback");
}

fn source(tpm: &Swtpm, pcrs: &[u8], sealed_object: &Path) -> KeySourceConfig {
    KeySourceConfig::Tpm2 {
        tcti: tpm.tcti(),
        pcrs: pcrs.to_vec(),
        sealed_object: sealed_object.to_path_buf(),
    }
}

fn unwraps(root: &Root, wrapped: &[u8], key: &DataKey) -> bool {
    let tag = key.mac_key().mac_fields(&[b"probe"]);
    root.unwrap(wrapped)
        .is_ok_and(|unwrapped| unwrapped.mac_key().verify(&[b"probe"], &tag).is_ok())
}

#[test]
fn the_root_key_unseals_on_its_tpm_only_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let sealed: PathBuf = dir.path().join("root-key.tpm2");
    let tpm = Swtpm::start(&state);
    let config = source(&tpm, &[], &sealed);
    config.init().unwrap();
    let error = config.init().unwrap_err().to_string();
    assert!(error.contains("never replaces"), "{error}");

    let root = config.open().unwrap();
    let key = DataKey::generate(1);
    let wrapped = root.wrap(&key).unwrap();
    assert!(unwraps(&config.open().unwrap(), &wrapped, &key));

    // The same TPM after a restart, from its saved state.
    tpm.stop();
    let tpm = Swtpm::start(&state);
    let config = source(&tpm, &[], &sealed);
    assert!(unwraps(&config.open().unwrap(), &wrapped, &key));
    tpm.stop();

    // Another TPM: a fresh state.
    let other = Swtpm::start(&dir.path().join("other-tpm"));
    let error = source(&other, &[], &sealed).open().unwrap_err().to_string();
    assert!(error.contains("sealed by another TPM"), "{error}");
}

#[test]
fn a_changed_pcr_refuses_to_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = dir.path().join("root-key.tpm2");
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let config = source(&tpm, &[7, 16], &sealed);
    config.init().unwrap();
    let key = DataKey::generate(2);
    let wrapped = config.open().unwrap().wrap(&key).unwrap();
    assert!(unwraps(&config.open().unwrap(), &wrapped, &key));

    tpm.extend_pcr(16);
    let error = config.open().unwrap_err().to_string();
    assert!(
        error.contains("PCRs [7, 16] no longer hold the values"),
        "{error}"
    );
}

#[test]
fn key_source_init_and_check_reach_the_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&dir.path().join("tpm"));
    let pki = write_pki(dir.path());
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!("keySource: {{tpm2: {{tcti: \"{}\"}}}}\n", tpm.tcti()),
    );
    let config = config.to_str().unwrap();
    let made = run_binary(&["key-source", "init", "--config", config]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(
        dir.path().join("root-key.tpm2").exists(),
        "the default: beside the config"
    );
    let checked = run_binary(&["check", "--config", config]);
    let stdout = text(&checked.stdout);
    assert!(
        stdout.contains("tpm2 at swtpm:") && stdout.contains("reachable"),
        "{stdout}"
    );
    let again = run_binary(&["key-source", "init", "--config", config]);
    assert_eq!(again.status.code(), Some(1));
}

/// The server itself on a TPM-sealed root: it seals and unseals, serves again after the TPM
/// restarts from its saved state, and refuses to start (saying why, the database untouched)
/// once a bound PCR changed, or on another TPM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_on_its_tpm_and_refuses_to_start_on_a_changed_pcr_or_another_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("tpm");
    let tpm = Swtpm::start(&state);
    let pki = write_pki(dir.path());
    let write = |tcti: &str| {
        write_config(
            dir.path(),
            &pki,
            "127.0.0.1",
            &format!("keySource: {{tpm2: {{tcti: \"{tcti}\", pcrs: [16]}}}}\n"),
        )
    };
    let config = write(&tpm.tcti());
    run_ok(&["key-source", "init", "--config", config.to_str().unwrap()]).await;
    let server = ServerProcess::start(&config).unwrap();
    let node = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let passphrase = random_passphrase();
    let blob = node.seal(NODE, &passphrase).await.unwrap();
    server.terminate();

    // The same TPM after a restart, from its saved state.
    tpm.stop();
    let tpm = Swtpm::start(&state);
    let config = write(&tpm.tcti());
    let server = ServerProcess::start(&config).unwrap();
    let node = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    assert_eq!(node.unseal(NODE, &blob).await.unwrap(), passphrase);
    server.terminate();

    tpm.extend_pcr(16);
    let refused = ServerProcess::start(&config).err().unwrap_or_default();
    assert!(
        refused.contains("PCRs [16] no longer hold the values"),
        "{refused}"
    );
    tpm.stop();

    let other = Swtpm::start(&dir.path().join("other-tpm"));
    let refused = ServerProcess::start(&write(&other.tcti()))
        .err()
        .unwrap_or_default();
    assert!(refused.contains("sealed by another TPM"), "{refused}");
}
