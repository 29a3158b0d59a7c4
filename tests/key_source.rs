//! `keySource` and `key-source init` against the real things: key files (and systemd
//! credentials), Shamir shares, a SoftHSM2 token, and (with `--features tpm2`) swtpm.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use talos_kms_server::config::Config;
use talos_kms_server::custody::{self, DataKey, KeySourceConfig, Root};

/// The binary with extra environment, bounded to 60 s.
fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn config_with(dir: &Path, key_source: &str) -> PathBuf {
    let pki = write_pki(dir);
    write_config(
        dir,
        &pki,
        "127.0.0.1",
        &format!("keySource: {key_source}\n"),
    )
}

fn key_source_lines(output: &Output) -> String {
    text(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("key source"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn init(config: &Path, env: &[(&str, &Path)]) -> Output {
    run(
        &["key-source", "init", "--config", config.to_str().unwrap()],
        env,
    )
}

fn check(config: &Path, env: &[(&str, &Path)]) -> Output {
    run(&["check", "--config", config.to_str().unwrap()], env)
}

/// What a root wraps opens again under `other` (or not), judged by the data key's MAC.
fn same_root(root: &Root, other: &Root) -> bool {
    let key = DataKey::generate(1);
    let wrapped = root.wrap(&key).unwrap();
    match other.unwrap(&wrapped) {
        Ok(unwrapped) => {
            let tag = key.mac_key().mac_fields(&[b"probe"]);
            unwrapped.mac_key().verify(&[b"probe"], &tag).is_ok()
        }
        Err(_) => false,
    }
}

#[test]
fn file_key_source_is_made_once_checked_and_read_from_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "{file: root.key}");
    let key_file = dir.path().join("root.key");

    let before = check(&config, &[]);
    assert_eq!(before.status.code(), Some(1));
    let lines = key_source_lines(&before);
    assert!(
        lines.contains("no key file") && lines.contains("key-source init"),
        "{lines}"
    );

    let made = init(&config, &[]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read(&key_file).unwrap();

    let again = init(&config, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("never replaces"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        key,
        "the key was not replaced"
    );

    let after = check(&config, &[]);
    let lines = key_source_lines(&after);
    assert!(lines.contains("reachable"), "{lines}");
    assert!(
        lines.contains("makes the first data key at start"),
        "{lines}"
    );
    assert_eq!(after.status.code(), Some(0), "{lines}");
    assert!(
        !text(&after.stdout).contains(text(&key).trim()),
        "the key is never shown"
    );

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = check(&config, &[]);
    assert_eq!(open.status.code(), Some(1));
    assert!(
        key_source_lines(&open).contains("chmod 600"),
        "{}",
        key_source_lines(&open)
    );

    // A systemd credential of the same name is read in preference to the file beside the
    // config; the same key, so what it wrapped still opens.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::rename(&key_file, credentials.join("root.key")).unwrap();
    std::fs::set_permissions(
        credentials.join("root.key"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let from_credentials = check(&config, &[("CREDENTIALS_DIRECTORY", &credentials)]);
    assert!(
        key_source_lines(&from_credentials).contains("reachable"),
        "{}",
        key_source_lines(&from_credentials)
    );
    let missing = check(&config, &[]);
    assert!(key_source_lines(&missing).contains("no key file"));
}

#[test]
fn shamir_init_prints_shares_that_rebuild_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), "{shamir: {threshold: 3, shares: 5}}");
    let made = init(&config, &[]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let stdout = text(&made.stdout);
    let shares: Vec<&str> = stdout.lines().collect();
    assert_eq!(shares.len(), 5, "{stdout}");
    assert!(
        text(&made.stderr).contains("any 3 of which"),
        "{}",
        text(&made.stderr)
    );

    let first = custody::shamir::combine(3, &[shares[0], shares[2], shares[4]]).unwrap();
    let second = custody::shamir::combine(3, &[shares[3], shares[1], shares[0]]).unwrap();
    assert!(same_root(&Root::Key(first), &Root::Key(second)));
    let too_few = custody::shamir::combine(3, &[shares[0], shares[1]]).unwrap_err();
    assert!(
        too_few.to_string().contains("2 shares given, 3 needed"),
        "{too_few}"
    );

    // Another init makes other shares, which do not mix with these.
    let other = init(&config, &[]);
    let other = text(&other.stdout);
    let others: Vec<&str> = other.lines().collect();
    let mixed = custody::shamir::combine(3, &[shares[0], shares[1], others[2]]).unwrap_err();
    assert!(
        mixed.to_string().contains("share 3 does not belong"),
        "{mixed}"
    );

    let check = check(&config, &[]);
    assert!(
        key_source_lines(&check).contains("3 of 5"),
        "{}",
        key_source_lines(&check)
    );
}

/// A SoftHSM2 of the test's own: its config and token directory in `dir`.
struct SoftHsm {
    conf: PathBuf,
}

const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

impl SoftHsm {
    fn new(dir: &Path) -> SoftHsm {
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "SoftHSM2 is missing: install softhsm2 (scripts/test does)"
        );
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        SoftHsm { conf }
    }

    fn init_token(&self, label: &str, pin: &str) {
        let status = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                "87654321",
            ])
            .env("SOFTHSM2_CONF", &self.conf)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[test]
fn pkcs11_key_is_made_on_the_token_once_and_a_wrong_pin_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(dir.path());
    hsm.init_token("kms", "123456");
    hsm.init_token("other", "123456");
    let pin = dir.path().join("token-pin");
    let wrong_pin = dir.path().join("wrong-pin");
    write_private(&pin, "123456\n");
    write_private(&wrong_pin, "654321\n");
    // Each config in a directory of its own.
    let config_for = |name: &str, token: &str, pin_file: &Path| {
        let config_dir = dir.path().join(name);
        std::fs::create_dir(&config_dir).unwrap();
        config_with(
            &config_dir,
            &format!(
                "{{pkcs11: {{module: {SOFTHSM_MODULE}, tokenLabel: {token}, \
                 keyLabel: talos-kms-root, pinFile: {}}}}}",
                pin_file.display()
            ),
        )
    };
    let config = config_for("kms", "kms", &pin);
    let env = [("SOFTHSM2_CONF", hsm.conf.as_path())];

    let before = check(&config, &env);
    assert_eq!(before.status.code(), Some(1));
    assert!(
        key_source_lines(&before).contains("holds no key labelled"),
        "{}",
        key_source_lines(&before)
    );

    let made = init(&config, &env);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let again = init(&config, &env);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("already holds a key"),
        "{}",
        text(&again.stderr)
    );

    let after = check(&config, &env);
    assert!(
        key_source_lines(&after).contains("reachable"),
        "{}",
        key_source_lines(&after)
    );

    let wrong = config_for("wrong", "kms", &wrong_pin);
    let refused = check(&wrong, &env);
    assert_eq!(refused.status.code(), Some(1));
    let lines = key_source_lines(&refused);
    assert!(
        lines.contains("refused the PIN") && lines.contains("wrong-pin"),
        "{lines}"
    );
    assert!(
        !lines.contains("654321") && !lines.contains("123456"),
        "{lines}"
    );

    // In this process: data keys wrapped inside the token unwrap there, and not on another
    // token with a key of the same label.
    // SAFETY: set before this test opens anything; no other test in this binary reads
    // SOFTHSM2_CONF, and the module reads it only when it is loaded below.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &hsm.conf) };
    let open = |config: &Path| -> Root {
        let source = Config::read(config).unwrap().key_source.unwrap();
        assert!(matches!(source, KeySourceConfig::Pkcs11 { .. }));
        source.open().unwrap()
    };
    let root = open(&config);
    assert!(same_root(&root, &open(&config)));
    assert_never_extractable(&hsm, "kms");
    let other = config_for("other", "other", &pin);
    assert!(init(&other, &env).status.success());
    let other = open(&other);
    let wrapped = root.wrap(&DataKey::generate(4)).unwrap();
    let error = other.unwrap(&wrapped).unwrap_err().to_string();
    assert!(
        error.contains("v4 does not unwrap under this root key"),
        "{error}"
    );
}

/// The token says the key it made can never leave it, read through the module itself.
fn assert_never_extractable(hsm: &SoftHsm, token: &str) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    assert!(hsm.conf.exists());
    let pkcs11 = Pkcs11::new(SOFTHSM_MODULE).unwrap();
    let _ = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).unwrap().label() == token)
        .unwrap();
    let session = pkcs11.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&"123456".into()));
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"talos-kms-root".to_vec()),
        ])
        .unwrap();
    assert_eq!(keys.len(), 1);
    let attributes = session
        .get_attributes(
            keys[0],
            &[
                AttributeType::Extractable,
                AttributeType::Sensitive,
                AttributeType::NeverExtractable,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    for attribute in attributes {
        match attribute {
            Attribute::Extractable(value) => assert!(!value, "extractable"),
            Attribute::Sensitive(value) | Attribute::NeverExtractable(value) => assert!(value),
            Attribute::ValueLen(len) => assert_eq!(u64::from(len), 32),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn init_without_a_key_source_says_what_to_add() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let output = init(&config, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("no `keySource`") && stderr.contains("Key custody"),
        "{stderr}"
    );
    let checked = check(&config, &[]);
    assert!(
        key_source_lines(&checked)
            .contains("none: the records are protected by the split scheme alone")
    );
}

#[test]
fn check_says_when_keys_cannot_be_locked_in_memory() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = config_with(dir.path(), "{shamir: {threshold: 2, shares: 3}}");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let checked = |memlock: &str| {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--memlock={memlock}"))
            .args([BINARY, "check", "--config", config.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Root may lock memory past the limit: the limit is checked for another user.
        if rustix::process::geteuid().is_root() {
            command.uid(65534).gid(65534);
        }
        key_source_lines(&command.output().unwrap())
    };
    let low = checked("4096:4096");
    assert!(
        low.contains("cannot be locked out of swap (RLIMIT_MEMLOCK is 4096 bytes)")
            && low.contains("LimitMEMLOCK="),
        "{low}"
    );
    let enough = checked("8388608:8388608");
    assert!(!enough.contains("swap"), "{enough}");
}

/// The server itself on a SoftHSM2 token: data keys wrapped inside the token, records
/// sealed and unsealed across a restart, and a start refused (naming the PIN file, the
/// database untouched) with a wrong PIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_on_an_hsm_key_and_refuses_to_start_with_a_wrong_pin() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::new(dir.path());
    hsm.init_token("kms", "123456");
    let pin = dir.path().join("token-pin");
    write_private(&pin, "123456\n");
    let config = config_with(
        dir.path(),
        &format!(
            "{{pkcs11: {{module: {SOFTHSM_MODULE}, tokenLabel: kms, keyLabel: talos-kms-root, \
             pinFile: {}}}}}",
            pin.display()
        ),
    );
    let env = [("SOFTHSM2_CONF", hsm.conf.as_path())];
    assert!(init(&config, &env).status.success());
    let with_hsm = |command: &mut Command| {
        command.env("SOFTHSM2_CONF", &hsm.conf);
    };
    let ca = dir.path().join("ca.pem");
    let server = ServerProcess::start_with(&config, with_hsm).unwrap();
    let node = client_for("127.0.0.1", server.addr.port(), &ca, None);
    let passphrase = random_passphrase();
    let blob = node.seal(NODE, &passphrase).await.unwrap();
    assert!(server.terminate().success());

    let server = ServerProcess::start_with(&config, with_hsm).unwrap();
    let node = client_for("127.0.0.1", server.addr.port(), &ca, None);
    assert_eq!(node.unseal(NODE, &blob).await.unwrap(), passphrase);
    assert!(server.terminate().success());

    write_private(&pin, "654321\n");
    let refused = ServerProcess::start_with(&config, with_hsm)
        .err()
        .unwrap_or_default();
    assert!(
        refused.contains("refused the PIN") && refused.contains("token-pin"),
        "{refused}"
    );
    assert!(!refused.contains("654321"), "{refused}");
}
