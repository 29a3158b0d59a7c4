//! `check` catches what would fail before a node does: certificates a client refuses, a
//! database that cannot live where it is put, a port that cannot be bound, secrets readable
//! by everyone. Exit 0: all good, 2: warnings only, 1: something that would fail.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use time::{Duration, OffsetDateTime};

/// A CA and a server certificate for `names`, with `edit` applied to the server's.
fn write_leaf(dir: &Path, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("server"),
    );
    edit(&mut params);
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &ca).unwrap();
    write_files(dir, &ca.pem(), &format!("{}{}", leaf.pem(), ca.pem()), &key)
}

fn write_files(dir: &Path, ca: &str, chain: &str, key: &KeyPair) -> Pki {
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca, ca).unwrap();
    std::fs::write(&pki.cert, chain).unwrap();
    write_private(&pki.key, &key.serialize_pem());
    pki
}

struct Checked {
    code: Option<i32>,
    stdout: String,
}

fn check(config: &Path, extra: &[&str]) -> Checked {
    let mut args = vec!["check", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = run_binary(&args);
    Checked {
        code: output.status.code(),
        stdout: text(&output.stdout),
    }
}

fn line_with<'a>(stdout: &'a str, words: &[&str]) -> Option<&'a str> {
    stdout
        .lines()
        .find(|line| words.iter().all(|word| line.contains(word)))
}

#[test]
fn a_sound_setup_exits_0() {
    let setup = Setup::new("");
    let config = &setup.config;
    let checked = check(config, &[]);
    assert_eq!(checked.code, Some(0), "{}", checked.stdout);
    assert_eq!(checked.stdout.lines().last(), Some("ok"));
}

#[test]
fn a_certificate_not_yet_valid_fails_check_and_serve_says_why_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_leaf(dir.path(), &["localhost", "127.0.0.1"], |params| {
        params.not_before = OffsetDateTime::now_utc() + Duration::days(2);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(300);
    });
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(
        line_with(&checked.stdout, &["PROBLEM", "NOT VALID YET", "clock"]).is_some(),
        "{}",
        checked.stdout
    );

    // Served anyway, with the reason in the log: a wrong clock here must not stop every node.
    let server = ServerProcess::start(&config).unwrap();
    assert!(
        server.startup_log.iter().any(|line| line.contains("ERROR")
            && line.contains("not valid yet")
            && line.contains("serving anyway")),
        "{:#?}",
        server.startup_log
    );
}

#[test]
fn an_expired_certificate_fails_and_one_expiring_soon_warns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_leaf(dir.path(), &["localhost", "127.0.0.1"], |params| {
        params.not_before = OffsetDateTime::now_utc() - Duration::days(100);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
    });
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(line_with(&checked.stdout, &["PROBLEM", "EXPIRED"]).is_some());

    let pki = write_leaf(dir.path(), &["localhost", "127.0.0.1"], |params| {
        params.not_before = OffsetDateTime::now_utc() - Duration::days(80);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(5);
    });
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    assert!(line_with(&checked.stdout, &["WARNING", "renew soon"]).is_some());
}

#[test]
fn a_ca_certificate_as_the_servers_warns_and_shows_how_to_make_a_leaf() {
    let dir = tempfile::tempdir().unwrap();
    // What `openssl req -x509` makes: self-signed, CA:TRUE.
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap().pem();
    let pki = write_files(dir.path(), &cert, &cert, &key);
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    let warning = line_with(&checked.stdout, &["WARNING", "CA certificate"]).unwrap();
    assert!(warning.contains("CaUsedAsEndEntity"), "{warning}");
    assert!(warning.contains("Go client may accept it"), "{warning}");
    assert!(
        warning.contains("basicConstraints=critical,CA:FALSE"),
        "{warning}"
    );
}

#[test]
fn names_that_nodes_do_not_use_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_leaf(dir.path(), &["kms.invalid"], |_| {});
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    let warning = line_with(&checked.stdout, &["WARNING", "names kms.invalid"]).unwrap();
    assert!(warning.contains("127.0.0.1"), "{warning}");

    let checked = check(&config, &["--endpoint", "https://kms.invalid:50051"]);
    assert_eq!(checked.code, Some(0), "{}", checked.stdout);
    let checked = check(&config, &["--endpoint", "https://other.invalid:50051"]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    assert!(line_with(&checked.stdout, &["WARNING", "other.invalid"]).is_some());
}

#[test]
fn a_private_chain_is_noted_as_unable_to_unlock_state() {
    let setup = Setup::new("");
    let config = &setup.config;
    let checked = check(config, &[]);
    assert_eq!(
        checked.code,
        Some(0),
        "information only: {}",
        checked.stdout
    );
    let note = line_with(&checked.stdout, &["note:", "public root"]).unwrap();
    assert!(
        note.contains("TrustedRootsConfig") && note.contains("STATE"),
        "{note}"
    );
}

#[test]
fn a_database_on_proc_is_a_problem() {
    let setup = Setup::new("");
    let dir = &setup.dir;
    let config = &setup.config;
    let database = dir.path().join("kms.db").display().to_string();
    edit_config(config, &database, "/proc/kms/kms.db");
    let checked = check(config, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(line_with(&checked.stdout, &["PROBLEM", "/proc/kms/kms.db", "kernel"]).is_some());
}

#[test]
fn a_port_in_use_warns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let (_taken, port) = taken_port();
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    edit_config(&config, "port: 0", &format!("port: {port}"));
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    assert!(line_with(&checked.stdout, &["WARNING", "in use"]).is_some());
}

/// A busy metrics port fails `serve`: `check` says so, and both name `metricsAddress`.
#[test]
fn a_metrics_port_in_use_warns_and_serve_names_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let (_taken, port) = taken_port();
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        &format!("metricsAddress: 127.0.0.1:{port}\n"),
    );
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(2), "{}", checked.stdout);
    assert!(
        line_with(
            &checked.stdout,
            &["WARNING", "metrics", "in use", "`metricsAddress`"]
        )
        .is_some(),
        "{}",
        checked.stdout
    );
    let served = run_binary(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(served.status.code(), Some(1));
    let said = text(&served.stderr);
    assert!(
        said.contains("metricsAddress") && !said.contains("`port`"),
        "{said}"
    );
}

/// `check` walks the path: a database under a regular file can never be created.
#[test]
fn a_database_under_a_file_is_a_problem_for_check_and_serve() {
    let setup = Setup::new("");
    let dir = &setup.dir;
    let pki = &setup.pki;
    let config = &setup.config;
    let database = dir.path().join("kms.db").display().to_string();
    let under_a_file = format!("{}/kms.db", pki.ca.display());
    edit_config(config, &database, &under_a_file);
    let checked = check(config, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(
        line_with(
            &checked.stdout,
            &["PROBLEM", "is a file, not a directory", "`database`"]
        )
        .is_some(),
        "{}",
        checked.stdout
    );
    assert!(
        !checked.stdout.contains("does not exist yet"),
        "{}",
        checked.stdout
    );
    let served = run_binary(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(served.status.code(), Some(1));
    let said = text(&served.stderr);
    assert!(said.contains("is a file, not a directory"), "{said}");
}

#[test]
fn a_key_or_config_readable_by_everyone_warns() {
    let setup = Setup::new("");
    let pki = &setup.pki;
    let config = &setup.config;
    for file in [&pki.key, config] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let checked = check(config, &[]);
        assert_eq!(checked.code, Some(2), "{}", checked.stdout);
        let warning = line_with(&checked.stdout, &["WARNING", "readable by every user"]).unwrap();
        assert!(warning.contains(&file.display().to_string()), "{warning}");
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn a_missing_config_is_reported_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/talos-kms-server/config.yaml");
    let checked = check(&config, &[]);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(
        checked.stdout.contains("does not exist"),
        "{}",
        checked.stdout
    );
    assert!(!dir.path().join("etc").exists(), "check writes nothing");
}

#[tokio::test]
async fn check_changes_nothing_in_an_existing_database_and_speaks_json() {
    let setup = Setup::new("");
    let dir = &setup.dir;
    let config = &setup.config;
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    server
        .client("127.0.0.1", None)
        .seal(NODE, &random_passphrase())
        .await
        .unwrap();
    server.running.shutdown().await.unwrap();
    let before = std::fs::read(dir.path().join("kms.db")).unwrap();

    let checked = check(config, &["--output", "json"]);
    let report: serde_json::Value = serde_json::from_str(&checked.stdout).unwrap();
    assert_eq!(report["exit_code"].as_i64(), checked.code.map(i64::from));
    let database = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["topic"] == "database" && f["level"] == "ok")
        .unwrap();
    assert!(database["message"].as_str().unwrap().contains("1 records"));
    assert_eq!(std::fs::read(dir.path().join("kms.db")).unwrap(), before);
}

/// Runs `check` as an unprivileged user: as `nobody` when the tests run as root (as in CI),
/// where root's permission to write anywhere would hide the problem.
fn check_unprivileged(config: &Path) -> Checked {
    let mut command = Command::new(BINARY);
    command
        .args(["check", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if rustix::process::geteuid().is_root() {
        command.uid(65534).gid(65534);
    }
    let output = command.output().unwrap();
    Checked {
        code: output.status.code(),
        stdout: text(&output.stdout),
    }
}

/// A test directory the unprivileged user may read, with a config and PKI in it.
fn readable_setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki = write_pki(dir.path());
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    for file in [&pki.key, &config] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    (dir, config)
}

#[test]
fn a_database_directory_the_server_cannot_write_is_a_problem() {
    let (dir, config) = readable_setup();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    let database = dir.path().join("kms.db").display().to_string();
    edit_config(
        &config,
        &database,
        &data.join("kms.db").display().to_string(),
    );
    let checked = check_unprivileged(&config);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    let problem = line_with(&checked.stdout, &["PROBLEM", "cannot write"]).unwrap();
    assert!(problem.contains(&data.display().to_string()), "{problem}");
}

#[test]
fn a_privileged_port_without_the_capability_is_a_problem() {
    let lowest_unprivileged: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1024);
    if lowest_unprivileged <= 1 {
        eprintln!("SKIPPED: this kernel lets every user bind every port");
        return;
    }
    let (_dir, config) = readable_setup();
    edit_config(&config, "port: 0", "port: 1");
    let checked = check_unprivileged(&config);
    assert_eq!(checked.code, Some(1), "{}", checked.stdout);
    assert!(
        line_with(&checked.stdout, &["PROBLEM", "CAP_NET_BIND_SERVICE"]).is_some(),
        "{}",
        checked.stdout
    );
}
