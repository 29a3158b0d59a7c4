//! The command line as an operator uses it.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_missing_config_gets_a_commented_default_and_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/config.yaml");
    let output = run_binary(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("a commented default was written"),
        "{}",
        text(&output.stderr)
    );
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("serverKeyPassword") && written.contains("# "));

    // Running again does not overwrite it: it now fails on the missing certificate.
    std::fs::write(&config, written.replace("changeit", "mine")).unwrap();
    let output = run_binary(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("serverCertFile"),
        "{}",
        text(&output.stderr)
    );
    assert!(std::fs::read_to_string(&config).unwrap().contains("mine"));
}

#[test]
fn an_unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let config = write_config(dir.path(), &pki, "127.0.0.1", "bindAdress: \"::\"\n");
    let output = run_binary(&["--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("bindAdress"),
        "{}",
        text(&output.stderr)
    );
}

#[tokio::test]
async fn check_reports_certificate_database_and_legacy_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let legacy = dir.path().join("nodeDbFile.json");
    std::fs::write(&legacy, "[]").unwrap();
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!("nodeDbFile: {}\n", legacy.display()),
    );
    let config_arg = config.to_str().unwrap();

    let output = run_binary(&["check", "--config", config_arg]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("matches the certificate"), "{stdout}");
    assert!(stdout.contains("days left"), "{stdout}");
    assert!(stdout.contains("does not exist yet"), "{stdout}");
    assert!(!dir.path().join("kms.db").exists(), "check creates nothing");

    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    server
        .client("127.0.0.1", None)
        .seal(NODE, &random_passphrase())
        .await
        .unwrap();
    server.running.shutdown().await.unwrap();
    let output = run_binary(&["check", "--config", config_arg]);
    assert!(
        text(&output.stdout).contains(": 1 records"),
        "{}",
        text(&output.stdout)
    );

    // A key that does not match fails the check.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(write_pki(other.path()).key, &pki.key).unwrap();
    let output = run_binary(&["check", "--config", config_arg]);
    assert!(!output.status.success());
    assert!(
        text(&output.stdout).contains("does not match"),
        "{}",
        text(&output.stdout)
    );
}

#[tokio::test]
async fn demo_serves_and_prints_a_talos_patch_that_works() {
    let mut demo = Command::new(BINARY)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut printed = Vec::new();
    while let Ok(line) = received.recv_timeout(Duration::from_secs(30)) {
        let done = line.contains("slot: 0");
        printed.push(line);
        if done {
            break;
        }
    }
    let printed = printed.join("\n");
    assert!(printed.contains("kind: TrustedRootsConfig"), "{printed}");
    assert!(
        printed.contains("kind: VolumeConfig") && printed.contains("kms:"),
        "{printed}"
    );
    let endpoint = printed
        .split_whitespace()
        .find(|word| word.starts_with("https://127.0.0.1:"))
        .expect("endpoint printed");
    let ca = printed
        .split_whitespace()
        .find(|word| word.ends_with("/ca.pem"))
        .expect("CA path printed");

    let output = tokio::task::spawn_blocking({
        let (endpoint, ca) = (endpoint.to_string(), ca.to_string());
        move || run_binary(&["client", "--endpoint", &endpoint, "--ca", &ca, "roundtrip"])
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(text(&output.stdout).starts_with("ok:"));

    let pid = demo.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || demo.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let dir = std::path::Path::new(ca).parent().unwrap();
    assert!(!dir.exists(), "the demo's throwaway files are removed");
}

/// Reads lines from a child's pipe on a thread; `lines_until` takes them with a time bound.
fn line_reader(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    received
}

/// Lines up to and including the first that contains `last`, waiting at most 30 s in all.
fn lines_until(received: &std::sync::mpsc::Receiver<String>, last: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut printed = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = received.recv_timeout(left) else {
            break;
        };
        let done = line.contains(last);
        printed.push(line);
        if done {
            break;
        }
    }
    printed.join("\n")
}

#[tokio::test]
async fn demo_prints_the_name_nodes_use_with_the_real_port_and_keeps_its_key_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut demo = Command::new(BINARY)
        .args(["demo", "--listen", "127.0.0.1:0", "--name", "kms.test"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let received = line_reader(demo.stdout.take().unwrap());
    let printed = lines_until(&received, "slot: 0");
    let endpoint_line = printed
        .lines()
        .find(|line| line.trim_start().starts_with("endpoint:"))
        .unwrap_or_else(|| panic!("no endpoint in the patch: {printed}"));
    let port: u16 = endpoint_line
        .trim()
        .strip_prefix("endpoint: https://kms.test:")
        .unwrap_or_else(|| panic!("the patch does not use --name: {endpoint_line}"))
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    let ca = printed
        .split_whitespace()
        .find(|word| word.ends_with("/ca.pem"))
        .expect("CA path printed")
        .to_string();

    // The printed port is the one served: a node's call on it works.
    let output = tokio::task::spawn_blocking({
        let (endpoint, ca) = (format!("https://127.0.0.1:{port}"), ca.clone());
        move || run_binary(&["client", "--endpoint", &endpoint, "--ca", &ca, "roundtrip"])
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));

    let dir = std::path::Path::new(&ca).parent().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("server.key")), 0o600, "the private key");
    assert_eq!(mode(dir), 0o700, "the directory of the private key");

    let pid = demo.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            if let Some(status) = demo.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = demo.kill();
        panic!("demo did not stop within 30 s of SIGTERM");
    })
    .await
    .unwrap();
    assert!(status.success());
}
