//! The audit trail's tamper evidence, end to end: a real server writes the trail through
//! seals, unseals and admin commands, then `talos-kms-server audit verify` passes on it
//! untouched and fails, naming the first line out of place, on each kind of change.

mod common;

use common::*;
use std::path::PathBuf;
use talos_kms_server::audit::{self, AuditLog, Event};

struct Trail {
    _dir: tempfile::TempDir,
    config: PathBuf,
    path: PathBuf,
}

impl Trail {
    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn rewrite(&self, lines: &[String]) {
        std::fs::write(&self.path, lines.join("\n") + "\n").unwrap();
    }

    /// `audit verify --config FILE --stopped` (and `extra`): exit code and stdout.
    fn verify(&self, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["audit", "verify", "--config", self.config(), "--stopped"];
        args.extend_from_slice(extra);
        let output = run_binary(&args);
        (
            output.status.code().unwrap_or(-1),
            text(&output.stdout) + &text(&output.stderr),
        )
    }

    /// The 1-based number of the first line holding `needle`.
    fn line_of(&self, needle: &str) -> usize {
        1 + self
            .lines()
            .iter()
            .position(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}"))
    }
}

/// A config with a keyed trail; `extra` config lines after it.
fn configured(extra: &str) -> (tempfile::TempDir, Pki, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let path = dir.path().join("audit.jsonl");
    let key = dir.path().join("audit.key");
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!(
            "auditLog: {}\nauditKeyFile: {}\n{extra}",
            path.display(),
            key.display()
        ),
    );
    (dir, pki, config, path)
}

/// Seals and unseals three nodes, revokes one with an admin command while serving, seals
/// once more, and stops the server cleanly.
async fn written_trail() -> Trail {
    let (dir, pki, config, path) = configured("");
    let config_text = config.to_str().unwrap();
    let created = run_ok(&["audit", "init-key", "--config", config_text]).await;
    assert!(created.contains("audit.key"), "{created}");
    let again = run_binary_async(&["audit", "init-key", "--config", config_text]).await;
    assert_eq!(
        again.status.code(),
        Some(1),
        "an existing key is not replaced"
    );
    assert!(text(&again.stderr).contains("exists already"));

    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let mut sealed = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        sealed.push((node, client.seal(node, &random_passphrase()).await.unwrap()));
    }
    for (node, blob) in &sealed {
        client.unseal(node, blob).await.unwrap();
    }
    run_ok(&[
        "keys",
        "revoke",
        "--node",
        "node-c",
        "--config",
        config_text,
    ])
    .await;
    client.seal("node-d", &random_passphrase()).await.unwrap();
    assert!(server.terminate().success());
    Trail {
        _dir: dir,
        config,
        path,
    }
}

#[tokio::test]
async fn an_untouched_trail_verifies_and_the_reader_shows_no_checkpoint() {
    let trail = written_trail().await;
    let (code, out) = trail.verify(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the first line ever written"), "{out}");
    assert!(out.contains("0 lines at the end are unprotected"), "{out}");
    assert!(
        !out.contains("warning"),
        "keyed, and checked with the key: {out}"
    );

    let read = run_ok(&["audit", "--config", trail.config()]).await;
    assert!(!read.contains("checkpoint"), "{read}");
    assert!(read.contains("node=node-d"), "{read}");
    let with = run_ok(&["audit", "--config", trail.config(), "--checkpoints"]).await;
    assert!(with.contains("checkpoint (stop)"), "{with}");
}

/// A change made to the trail's lines behind the server's back.
type Change = dyn Fn(&mut Vec<String>);

#[tokio::test]
async fn each_change_to_the_trail_is_named_at_its_first_line() {
    let trail = written_trail().await;
    let original = trail.lines();
    // Three seal lines, then three unseal lines: all the server's.
    let unseal = trail.line_of("\"action\":\"unseal\"");
    let last = original.len();
    let checkpoint = trail.line_of("\"why\":\"stop\"");
    assert_eq!(
        checkpoint, last,
        "a clean stop ends the trail with a checkpoint"
    );
    let at = |n: usize| format!("{} line {n}", trail.path.display());
    let cases: Vec<(&str, Box<Change>, String)> = vec![
        (
            "a field edited",
            Box::new(move |lines| {
                lines[unseal - 1] = lines[unseal - 1].replace("node-a", "node-z")
            }),
            format!("{} does not chain to line {unseal}", at(unseal + 1)),
        ),
        (
            "a line deleted",
            Box::new(move |lines| drop(lines.remove(unseal - 1))),
            format!("{} does not chain to line {}", at(unseal), unseal - 1),
        ),
        (
            "two lines swapped",
            Box::new(move |lines| lines.swap(unseal - 1, unseal)),
            format!("{} does not chain to line {}", at(unseal), unseal - 1),
        ),
        (
            "a forged line inserted",
            Box::new(move |lines| {
                let forged = lines[unseal - 1].replace("node-a", "node-x");
                lines.insert(unseal, forged)
            }),
            format!("{} does not chain to line {unseal}", at(unseal + 1)),
        ),
        (
            "the last lines cut",
            Box::new(move |lines| lines.truncate(lines.len() - 3)),
            "cut from the end".to_string(),
        ),
        (
            "the checkpoint edited",
            Box::new(move |lines| {
                let edited = lines[last - 1].replace("\"why\":\"stop\"", "\"why\":\"interval\"");
                lines[last - 1] = edited
            }),
            format!("{}: the checkpoint does not match", at(last)),
        ),
    ];
    for (what, change, expected) in cases {
        let mut lines = original.clone();
        change(&mut lines);
        trail.rewrite(&lines);
        let (code, out) = trail.verify(&[]);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            out.contains(&expected),
            "{what}: wanted {expected:?} in {out}"
        );
    }
    trail.rewrite(&original);
    assert_eq!(trail.verify(&[]).0, 0, "restored");
}

#[tokio::test]
async fn a_wrong_key_file_fails_at_the_first_checkpoint() {
    let trail = written_trail().await;
    let other = trail.path.with_file_name("other.key");
    audit::chain::create_key_file(&other).unwrap();
    let (code, out) = trail.verify(&["--key-file", other.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let checkpoint = trail.line_of("\"checkpoint\"");
    assert!(
        out.contains(&format!(
            "{} line {checkpoint}: the checkpoint does not match",
            trail.path.display()
        )),
        "{out}"
    );
}

#[tokio::test]
async fn rotation_keeps_the_chain_across_files_and_a_deleted_one_is_found() {
    let (dir, pki, config, path) = configured("auditLogMaxMiB: 1\nauditLogKeep: 5\n");
    let config_text = config.to_str().unwrap();
    run_ok(&["audit", "init-key", "--config", config_text]).await;
    let key_bytes = audit::chain::read_key_file(&dir.path().join("audit.key")).unwrap();
    // Two rotated files and a current one nearly full, written as the server writes, so
    // that the server's own calls rotate it once more.
    {
        let rotation = audit::Rotation {
            max_bytes: 1 << 20,
            keep: 5,
        };
        let earlier = AuditLog::open(&path, Some(rotation))
            .unwrap()
            .checkpointed(Some(audit::checkpoint_key(&key_bytes)))
            .unwrap();
        let filler = "f".repeat(200);
        let mut n = 0;
        while !audit::rotated(&path, 2).exists()
            || std::fs::metadata(&path).unwrap().len() < (1 << 20) - 4000
        {
            earlier
                .write(&Event::admin("filler", &[n.to_string(), filler.clone()]))
                .unwrap();
            n += 1;
        }
        earlier.stop().unwrap();
    }
    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    let long_node = "n".repeat(250);
    for _ in 0..20 {
        client.seal(&long_node, &random_passphrase()).await.unwrap();
    }
    assert!(server.terminate().success());
    assert!(
        audit::rotated(&path, 3).exists(),
        "the server rotated the trail"
    );

    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify", "--config", config_text];
        args.extend_from_slice(extra);
        let output = run_binary(&args);
        (output.status.code(), text(&output.stdout))
    };
    let (code, out) = verify(&["--stopped"]);
    assert_eq!(code, Some(0), "{out}");
    let rotated = |n| audit::rotated(&path, n).display().to_string();
    // Each rotated file ends with a checkpoint the next begins after.
    for n in 1..=3 {
        let text = std::fs::read_to_string(rotated(n)).unwrap();
        assert!(
            text.lines()
                .last()
                .unwrap()
                .contains("\"why\":\"rotation\""),
            "{}",
            rotated(n)
        );
    }
    // The files named one by one, oldest first, verify too.
    let files = [
        rotated(3),
        rotated(2),
        rotated(1),
        path.display().to_string(),
    ];
    let mut args = vec!["audit", "verify", "--key-file"];
    let key = dir.path().join("audit.key");
    args.push(key.to_str().unwrap());
    args.extend(files.iter().map(String::as_str));
    let output = run_binary(&args);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stdout));

    std::fs::remove_file(rotated(2)).unwrap();
    let (code, out) = verify(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{} is missing", rotated(2))), "{out}");
    std::fs::remove_file(rotated(3)).unwrap();
    let (code, out) = verify(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{} line 1 chains to a line that is not in the trail",
            rotated(1)
        )),
        "{out}"
    );
}

#[tokio::test]
async fn a_trail_without_a_key_is_chained_and_check_warns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let path = dir.path().join("audit.jsonl");
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!("auditLog: {}\n", path.display()),
    );
    let server = ServerProcess::start(&config).unwrap();
    let client = client_for("127.0.0.1", server.addr.port(), &pki.ca, None);
    client.seal("node-a", &random_passphrase()).await.unwrap();
    assert!(server.terminate().success());
    let config_text = config.to_str().unwrap();
    let output = run_binary(&["audit", "verify", "--config", config_text]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        text(&output.stdout).contains("unkeyed"),
        "{}",
        text(&output.stdout)
    );
    let check = run_binary(&["check", "--config", config_text]);
    assert!(
        text(&check.stdout).contains("auditKeyFile"),
        "{}",
        text(&check.stdout)
    );
}
