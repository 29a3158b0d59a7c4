//! Taking over from the reference server (siderolabs/kms-client) and gustinn/talos-kms: their
//! blobs unseal here with their keys, bound to their first caller, under the same policy as
//! this server's own records. The blobs are made by an independent implementation of each
//! scheme (RustCrypto's aes-gcm, from FACTS.md §4 and §4a), not by the server's code.

mod common;

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes192;
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm};
use common::*;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use talos_kms_server::client::{ClientError, KmsClient};
use tonic::Code;

const OTHER_NODE: &str = "313faf71-17a0-43d7-a88b-0afd96094178";
const LOOPBACK_1: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK_2: [u8; 4] = [127, 0, 0, 2];

/// AES-GCM as the Go servers use it: 12-byte nonce, 16-byte tag, key length picks AES-128,
/// -192 or -256.
fn encrypt(key: &[u8], nonce: &[u8], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    let nonce = nonce.into();
    match key.len() {
        16 => Aes128Gcm::new_from_slice(key)
            .unwrap()
            .encrypt(nonce, payload),
        24 => AesGcm::<Aes192, U12>::new_from_slice(key)
            .unwrap()
            .encrypt(nonce, payload),
        32 => Aes256Gcm::new_from_slice(key)
            .unwrap()
            .encrypt(nonce, payload),
        other => panic!("no AES key has {other} bytes"),
    }
    .unwrap()
}

fn fresh_nonce() -> Vec<u8> {
    random_passphrase()[..12].to_vec()
}

/// The reference server's Seal: nonce || AES-GCM(key, nonce, passphrase), no associated data.
fn reference_blob(key: &[u8], passphrase: &[u8]) -> Vec<u8> {
    let nonce = fresh_nonce();
    [nonce.clone(), encrypt(key, &nonce, passphrase, &[])].concat()
}

/// gustinn/talos-kms's Seal: 0x01 || len(id) || id || nonce || ciphertext, with
/// header || 0 || node UUID (|| 0 || the IP as 16 bytes, IPv4 mapped) as associated data.
fn gustinn_blob(
    key: &[u8],
    key_id: &str,
    node: &str,
    ip: Option<IpAddr>,
    passphrase: &[u8],
) -> Vec<u8> {
    let mut header = vec![1, key_id.len() as u8];
    header.extend_from_slice(key_id.as_bytes());
    let mut aad = [&header[..], &[0], node.as_bytes()].concat();
    if let Some(ip) = ip {
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        aad.push(0);
        aad.extend_from_slice(&octets);
    }
    let nonce = fresh_nonce();
    [
        header,
        nonce.clone(),
        encrypt(key, &nonce, passphrase, &aad),
    ]
    .concat()
}

fn key(len: usize) -> Vec<u8> {
    random_passphrase()[..len].to_vec()
}

struct Running {
    dir: tempfile::TempDir,
    config: PathBuf,
    _server: ServerProcess,
    port: u16,
    ca: PathBuf,
}

impl Running {
    /// A server whose config has `extra`; `files` writes key files into its directory first.
    fn start(extra: &str, files: impl FnOnce(&Path)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let pki = write_pki(dir.path());
        let config = write_config(dir.path(), &pki, "127.0.0.1", extra);
        let server = ServerProcess::start(&config).unwrap();
        Running {
            port: server.addr.port(),
            config,
            _server: server,
            ca: pki.ca,
            dir,
        }
    }

    /// A Talos-like client calling from `source`.
    fn from(&self, source: [u8; 4]) -> KmsClient {
        client_for("127.0.0.1", self.port, &self.ca, Some(IpAddr::from(source)))
    }

    async fn admin(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--config", self.config.to_str().unwrap()]);
        run_ok(&all).await
    }

    /// `keys list --output json`, one object per record and binding.
    async fn keys(&self) -> Vec<serde_json::Value> {
        self.admin(&["keys", "list", "--output", "json"])
            .await
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    async fn audit(&self, filters: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["audit", "--output", "json"];
        args.extend_from_slice(filters);
        self.admin(&args)
            .await
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

fn refused(answer: Result<Vec<u8>, ClientError>) -> tonic::Status {
    match answer {
        Err(ClientError::Status(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A decoy: OK with 32 bytes that are not the passphrase.
fn assert_decoy(answer: Result<Vec<u8>, ClientError>, passphrase: &[u8], what: &str) {
    let answer = answer.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(answer.len(), 32, "{what}");
    assert_ne!(answer, passphrase, "{what}");
}

fn binding_of<'a>(keys: &'a [serde_json::Value], node: &str, ip: &str) -> &'a serde_json::Value {
    keys.iter()
        .find(|k| k["scheme"] != "native" && k["node_uuid"] == node && k["ip"] == ip)
        .unwrap_or_else(|| panic!("no binding of {node} at {ip}: {keys:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_blobs_unseal_bound_to_their_first_caller() {
    let (key_16, key_32) = (key(16), key(32));
    let running = Running::start(
        "takeOver:\n  - {scheme: sidero-reference, keyFile: ref-16.key}\n  \
         - {scheme: sidero-reference, keyFile: ref-32.key}\n",
        |dir| {
            std::fs::write(dir.join("ref-16.key"), &key_16).unwrap();
            std::fs::write(dir.join("ref-32.key"), &key_32).unwrap();
        },
    );
    let (one, two) = (running.from(LOOPBACK_1), running.from(LOOPBACK_2));
    let (secret_16, secret_32) = (random_passphrase(), random_passphrase());
    let blob_16 = reference_blob(&key_16, &secret_16);
    let blob_32 = reference_blob(&key_32, &secret_32);
    assert_eq!(blob_16.len(), 60);

    assert_eq!(one.unseal(NODE, &blob_16).await.unwrap(), secret_16);
    assert_eq!(
        one.unseal(NODE, &blob_16).await.unwrap(),
        secret_16,
        "again, from its first caller"
    );
    assert_decoy(
        one.unseal(OTHER_NODE, &blob_16).await,
        &secret_16,
        "another node UUID",
    );
    assert_decoy(
        two.unseal(NODE, &blob_16).await,
        &secret_16,
        "another address",
    );
    assert_eq!(two.unseal(OTHER_NODE, &blob_32).await.unwrap(), secret_32);

    // A key the server does not have: random bytes, as the reference server answers, and
    // nothing is bound.
    let stranger = reference_blob(&key(32), &random_passphrase());
    assert_decoy(one.unseal(NODE, &stranger).await, &secret_16, "unknown key");
    // A length no configured scheme has: INVALID_ARGUMENT, as the reference server answers.
    let status = refused(one.unseal(NODE, &blob_16[..59]).await);
    assert_eq!(status.code(), Code::InvalidArgument);

    // Seal still makes this server's own records.
    let native_secret = random_passphrase();
    let native = one.seal(NODE, &native_secret).await.unwrap();
    assert_eq!(native.len(), 44);
    assert_eq!(one.unseal(NODE, &native).await.unwrap(), native_secret);

    let keys = running.keys().await;
    assert_eq!(keys.len(), 3, "two bindings and one record: {keys:?}");
    let bound_16 = binding_of(&keys, NODE, "127.0.0.1");
    assert_eq!(bound_16["scheme"], "sidero-reference");
    assert_eq!(
        binding_of(&keys, OTHER_NODE, "127.0.0.2")["scheme"],
        "sidero-reference"
    );
    let text = running.admin(&["keys", "list"]).await;
    assert!(
        text.contains("SCHEME") && text.contains("3 records"),
        "{text}"
    );

    // Revoked like a record: random bytes until restored.
    let id = bound_16["id"].as_str().unwrap().to_string();
    assert!(id.starts_with('b'), "{id}");
    running.admin(&["keys", "revoke", &id]).await;
    assert_decoy(one.unseal(NODE, &blob_16).await, &secret_16, "revoked");
    running.admin(&["keys", "restore", &id]).await;
    assert_eq!(one.unseal(NODE, &blob_16).await.unwrap(), secret_16);
    let shown = running.admin(&["keys", "show", &id]).await;
    assert!(shown.contains("sidero-reference"), "{shown}");

    // Every answer is audited, with the reason; the blob never is.
    let refused_lines = running
        .audit(&["--action", "unseal", "--outcome", "refused"])
        .await;
    let reasons: Vec<&str> = refused_lines
        .iter()
        .map(|line| line["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "wrong_key_or_binding",
            "wrong_key_or_binding",
            "wrong_key_or_binding",
            "invalid",
            "revoked"
        ],
        "{refused_lines:?}"
    );
    assert!(
        refused_lines[0]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("binding {id}")),
        "{refused_lines:?}"
    );
    let trail =
        std::fs::read_to_string(running.dir.path().join("talos-kms-server-audit.jsonl")).unwrap();
    assert_no_secret(
        &trail,
        "the audit trail",
        &[
            ("blob", &blob_16),
            ("passphrase", &secret_16),
            ("key", &key_16),
        ],
    );
}

/// A key directory as Kubernetes mounts a secret: `..data` links to a dated directory, and
/// each key is a link through it. Two key versions, with IP binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gustinn_key_directory_with_ip_binding() {
    let (v1, v2) = (key(32), key(24));
    let running = Running::start(
        "takeOver:\n  - {scheme: gustinn, keyDir: gustinn-keys, ipBinding: true}\n",
        |dir| {
            let keys = dir.join("gustinn-keys");
            let dated = keys.join("..2026_12_06_10_00_00.1234");
            std::fs::create_dir_all(&dated).unwrap();
            std::fs::write(dated.join("v1"), &v1).unwrap();
            std::fs::write(dated.join("v2"), &v2).unwrap();
            std::os::unix::fs::symlink("..2026_12_06_10_00_00.1234", keys.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/v1", keys.join("v1")).unwrap();
            std::os::unix::fs::symlink("..data/v2", keys.join("v2")).unwrap();
        },
    );
    let (one, two) = (running.from(LOOPBACK_1), running.from(LOOPBACK_2));
    let ip = |octets: [u8; 4]| Some(IpAddr::from(octets));
    let (secret_1, secret_2) = (random_passphrase(), random_passphrase());
    let blob_1 = gustinn_blob(&v1, "v1", NODE, ip(LOOPBACK_1), &secret_1);
    let blob_2 = gustinn_blob(&v2, "v2", OTHER_NODE, ip(LOOPBACK_2), &secret_2);
    assert_eq!(blob_1.len(), 62 + 2);

    // Sealed for 127.0.0.1: from 127.0.0.2 it does not open (the fork's own binding), and
    // that failed attempt binds nothing.
    assert_decoy(
        two.unseal(NODE, &blob_1).await,
        &secret_1,
        "IP bound elsewhere",
    );
    assert_eq!(one.unseal(NODE, &blob_1).await.unwrap(), secret_1);
    assert_eq!(two.unseal(OTHER_NODE, &blob_2).await.unwrap(), secret_2);
    assert_decoy(
        one.unseal(OTHER_NODE, &blob_1).await,
        &secret_1,
        "another node UUID",
    );

    // As the fork answers: an unknown key id gets random bytes (whatever its length), a
    // malformed header or a wrong length for a known key INVALID_ARGUMENT.
    let unknown_id = gustinn_blob(&v1, "v9", NODE, ip(LOOPBACK_1), &secret_1);
    assert_decoy(one.unseal(NODE, &unknown_id).await, &secret_1, "key id v9");
    assert_decoy(
        one.unseal(NODE, &unknown_id[..50]).await,
        &secret_1,
        "key id v9, short",
    );
    for malformed in [&[1u8, 0][..], &[1, 9, b'v'], &blob_1[..blob_1.len() - 1]] {
        let status = refused(one.unseal(NODE, malformed).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{malformed:?}");
    }
    let status = refused(one.unseal(NODE, &[9u8; 61]).await);
    assert_eq!(status.code(), Code::InvalidArgument, "an unknown format");

    let keys = running.keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(binding_of(&keys, NODE, "127.0.0.1")["scheme"], "gustinn");
    binding_of(&keys, OTHER_NODE, "127.0.0.2");
    let invalid: Vec<serde_json::Value> = running
        .audit(&["--action", "unseal", "--outcome", "refused"])
        .await
        .into_iter()
        .filter(|line| line["reason"] == "invalid")
        .collect();
    assert_eq!(invalid.len(), 4, "{invalid:?}");
    assert!(
        invalid[0]["detail"]
            .as_str()
            .unwrap()
            .contains("gustinn blob: the blob's header is malformed"),
        "{invalid:?}"
    );
}

/// One static key without IP binding: the fork bound only the UUID; here the first caller's
/// address is bound too, and `keys revoke --node` takes the binding with the node's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gustinn_static_key_without_ip_binding_is_bound_on_first_use() {
    let static_key = key(16);
    let running = Running::start(
        "takeOver:\n  - {scheme: gustinn, keyFile: gustinn.key, keyId: static, ipBinding: false}\n",
        |dir| std::fs::write(dir.join("gustinn.key"), &static_key).unwrap(),
    );
    let (one, two) = (running.from(LOOPBACK_1), running.from(LOOPBACK_2));
    let secret = random_passphrase();
    let blob = gustinn_blob(&static_key, "static", NODE, None, &secret);

    assert_eq!(two.unseal(NODE, &blob).await.unwrap(), secret);
    assert_decoy(
        one.unseal(NODE, &blob).await,
        &secret,
        "bound to 127.0.0.2 on first use",
    );
    assert_eq!(two.unseal(NODE, &blob).await.unwrap(), secret);
    let keys = running.keys().await;
    assert_eq!(binding_of(&keys, NODE, "127.0.0.2")["state"], "active");

    running.admin(&["keys", "revoke", "--node", NODE]).await;
    assert_decoy(two.unseal(NODE, &blob).await, &secret, "revoked by node");
    let keys = running.keys().await;
    assert_eq!(binding_of(&keys, NODE, "127.0.0.2")["state"], "revoked");
}

/// The policy comes first, exactly as for native records: a closed unseal window refuses a
/// foreign blob with the retryable error, and binds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_applies_to_foreign_blobs() {
    let reference_key = key(32);
    let running = Running::start(
        "unsealPolicy: window\ntakeOver:\n  - {scheme: sidero-reference, keyFile: ref.key}\n",
        |dir| std::fs::write(dir.join("ref.key"), &reference_key).unwrap(),
    );
    let one = running.from(LOOPBACK_1);
    let secret = random_passphrase();
    let blob = reference_blob(&reference_key, &secret);

    let status = refused(one.unseal(NODE, &blob).await);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = refused(one.unseal(NODE, &blob[..10]).await);
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the policy answers before the blob is looked at"
    );
    assert!(running.keys().await.is_empty(), "nothing bound");

    running
        .admin(&["window", "open", "unseal", "--for", "1h"])
        .await;
    assert_eq!(one.unseal(NODE, &blob).await.unwrap(), secret);
    assert_eq!(running.keys().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_is_taken_over_and_a_bad_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    std::fs::write(dir.path().join("ref.key"), key(32)).unwrap();
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        "takeOver:\n  - {scheme: sidero-reference, keyFile: ref.key}\n",
    );
    let output = run_binary_async(&["check", "--config", config.to_str().unwrap()]).await;
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("sidero-reference") && stdout.contains("ref.key (AES-256 key)"),
        "{stdout}"
    );

    std::fs::write(dir.path().join("ref.key"), b"0123456789abcdef0123456789\n").unwrap();
    let output = run_binary_async(&["check", "--config", config.to_str().unwrap()]).await;
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(!output.status.success(), "{all}");
    assert!(all.contains("ref.key holds 27 bytes"), "{all}");
    assert!(
        ServerProcess::start(&config).is_err(),
        "serve refuses it too"
    );
}
