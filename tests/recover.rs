//! `recover` against real LUKS2 images made by cryptsetup, with a real server on loopback.

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use talos_kms_server::recover::find_cryptsetup;

fn cryptsetup() -> Option<PathBuf> {
    let found = find_cryptsetup();
    if found.is_none() {
        eprintln!("\n*** SKIPPED: cryptsetup is not installed (Debian: cryptsetup-bin) ***\n");
    }
    found
}

fn run_cryptsetup(cryptsetup: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(cryptsetup)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A 20 MiB LUKS2 image whose key slot 0 has `passphrase`; pbkdf2 at 1000 rounds keeps it fast.
fn luks_image(cryptsetup: &Path, dir: &Path, passphrase: &str) -> PathBuf {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let format = [
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        image.to_str().unwrap(),
        "--key-file",
        "-",
    ];
    let output = run_cryptsetup(cryptsetup, &format, passphrase);
    assert!(output.status.success(), "{}", text(&output.stderr));
    image
}

/// Adds key slot `slot` with `passphrase`, to an image whose slot 0 opens with `existing`.
fn add_key(cryptsetup: &Path, image: &Path, slot: u32, existing: &str, passphrase: &str) {
    let dir = image.parent().unwrap();
    let new_key = dir.join("new.key");
    std::fs::write(&new_key, passphrase).unwrap();
    let add = [
        "luksAddKey",
        "--batch-mode",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-slot",
        &slot.to_string(),
        "--key-file",
        "-",
        image.to_str().unwrap(),
        new_key.to_str().unwrap(),
    ];
    let output = run_cryptsetup(cryptsetup, &add, existing);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Imports a token as Talos writes it: type sideroKMS, its key slot, the sealed blob.
fn import_token(cryptsetup: &Path, image: &Path, id: u32, kind: &str, sealed_data: &str) {
    let json = serde_json::json!({
        "type": kind,
        "keyslots": [id.to_string()],
        "UserData": { "sealedData": sealed_data },
    });
    let file = image.with_extension(format!("token{id}.json"));
    std::fs::write(&file, json.to_string()).unwrap();
    let import = [
        "token",
        "import",
        image.to_str().unwrap(),
        "--token-id",
        &id.to_string(),
        "--json-file",
        file.to_str().unwrap(),
    ];
    let output = run_cryptsetup(cryptsetup, &import, "");
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// Seals a random passphrase for `node`; answers its base64 text (the key slot's passphrase)
/// and base64 of the sealed blob (the token's sealedData).
async fn seal(server: &TestServer, node: &str) -> (String, String) {
    let passphrase = random_passphrase();
    let sealed = server
        .client("127.0.0.1", None)
        .seal(node, &passphrase)
        .await
        .unwrap();
    (BASE64.encode(passphrase), BASE64.encode(sealed))
}

/// A server and an image whose key slot 0 was sealed by it for NODE, as Talos does it.
struct Sealed {
    server: TestServer,
    image: PathBuf,
    passphrase: String,
    cryptsetup: PathBuf,
}

async fn sealed_image(dir: &Path) -> Option<Sealed> {
    let cryptsetup = cryptsetup()?;
    let server = TestServer::start(dir, "127.0.0.1:0").await;
    let (passphrase, sealed) = seal(&server, NODE).await;
    let image = luks_image(&cryptsetup, dir, &passphrase);
    import_token(&cryptsetup, &image, 0, "sideroKMS", &sealed);
    Some(Sealed {
        server,
        image,
        passphrase,
        cryptsetup,
    })
}

/// `recover` for `image` against `server` (or a port nothing serves), plus `extra` options.
async fn recover(server: Option<&TestServer>, image: &Path, node: &str, extra: &[&str]) -> Output {
    let (port, ca) = match server {
        Some(server) => (server.port(), server.pki.ca.clone()),
        None => (1, PathBuf::from("/nonexistent-ca.pem")),
    };
    let mut args = vec![
        "recover".to_string(),
        "--device".into(),
        image.display().to_string(),
        "--node-uuid".into(),
        node.into(),
        "--endpoint".into(),
        format!("https://127.0.0.1:{port}"),
        "--ca".into(),
        ca.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_binary(&args)
    })
    .await
    .unwrap()
}

/// A failure said in one line that holds every word of `words`.
fn assert_one_line_error(output: &Output, words: &[&str]) -> String {
    assert!(
        !output.status.success(),
        "should fail: {}",
        text(&output.stdout)
    );
    let stderr = text(&output.stderr);
    let stderr = stderr.trim();
    assert!(
        stderr.starts_with("error: ") && !stderr.contains('\n'),
        "one line: {stderr}"
    );
    for word in words {
        assert!(stderr.contains(word), "{word:?} is not in: {stderr}");
    }
    stderr.to_string()
}

#[tokio::test]
async fn recovers_the_passphrase_into_a_key_file_and_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sealed) = sealed_image(dir.path()).await else {
        return;
    };
    let image = &sealed.image;
    let key = dir.path().join("out.key");
    let output = recover(
        Some(&sealed.server),
        image,
        NODE,
        &["--key-file", key.to_str().unwrap()],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("opens key slot 0"),
        "{}",
        text(&output.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        sealed.passphrase,
        "no newline"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let test = [
        "open",
        "--test-passphrase",
        image.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ];
    let opened = run_cryptsetup(&sealed.cryptsetup, &test, "");
    assert!(opened.status.success(), "{}", text(&opened.stderr));

    // Printed: the passphrase alone on stdout, notes on stderr, the secret nowhere else.
    let output = recover(Some(&sealed.server), image, NODE, &[]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), format!("{}\n", sealed.passphrase));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("opens key slot 0"), "{stderr}");
    assert!(!stderr.contains(&sealed.passphrase));
    sealed.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_damaged_primary_header_is_read_from_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sealed) = sealed_image(dir.path()).await else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&sealed.image)
        .unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0u8; 4096], 0).unwrap();
    drop(file);
    let output = recover(Some(&sealed.server), &sealed.image, NODE, &[]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), sealed.passphrase);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("primary LUKS2 header") && stderr.contains("secondary at offset 16384"),
        "{stderr}"
    );
    sealed.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_wrong_node_uuid_is_caught_by_cryptsetup_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sealed) = sealed_image(dir.path()).await else {
        return;
    };
    let key = dir.path().join("out.key");
    let other = "00000000-0000-4000-8000-000000000001";
    let key_arg = ["--key-file", key.to_str().unwrap()];
    let output = recover(Some(&sealed.server), &sealed.image, other, &key_arg).await;
    assert_one_line_error(
        &output,
        &["opens no key slot", "node UUID", other, "lockToSTATE"],
    );
    assert!(!key.exists(), "random bytes are not written");

    // --no-check hands them out (a lockToSTATE key needs its salt appended), and says so.
    let output = recover(Some(&sealed.server), &sealed.image, other, &["--no-check"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed = text(&output.stdout);
    assert_eq!(BASE64.decode(printed.trim()).unwrap().len(), 32);
    assert_ne!(printed.trim(), sealed.passphrase);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("unchecked") && stderr.contains("cryptsetup open --test-passphrase"),
        "{stderr}"
    );
    sealed.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_kms_tokens_are_listed_and_one_is_chosen_with_token() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sealed) = sealed_image(dir.path()).await else {
        return;
    };
    let (second, blob) = seal(&sealed.server, NODE).await;
    add_key(
        &sealed.cryptsetup,
        &sealed.image,
        1,
        &sealed.passphrase,
        &second,
    );
    import_token(&sealed.cryptsetup, &sealed.image, 1, "sideroKMS", &blob);

    let output = recover(Some(&sealed.server), &sealed.image, NODE, &[]).await;
    assert_one_line_error(
        &output,
        &[
            "several sideroKMS tokens",
            "0 for key slot 0, 1 for key slot 1",
            "--token",
        ],
    );
    let output = recover(Some(&sealed.server), &sealed.image, NODE, &["--token", "1"]).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), second);
    assert!(text(&output.stderr).contains("opens key slot 1"));
    let output = recover(Some(&sealed.server), &sealed.image, NODE, &["--token", "7"]).await;
    assert_one_line_error(
        &output,
        &["no token 7", "0 for key slot 0, 1 for key slot 1"],
    );
    sealed.server.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_image_without_a_kms_token_or_with_a_broken_blob_says_so() {
    let Some(cryptsetup) = cryptsetup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = luks_image(&cryptsetup, dir.path(), "a passphrase");
    // Nothing is asked of the server: it fails before, so no server runs.
    let output = recover(None, &image, NODE, &[]).await;
    assert_one_line_error(&output, &["has no sideroKMS token", "no tokens at all"]);
    import_token(&cryptsetup, &image, 0, "example-tpm", "x");
    let output = recover(None, &image, NODE, &[]).await;
    assert_one_line_error(&output, &["has no sideroKMS token", "0: example-tpm"]);

    add_key(&cryptsetup, &image, 1, "a passphrase", "another");
    import_token(&cryptsetup, &image, 1, "sideroKMS", "not base64!");
    let output = recover(None, &image, NODE, &[]).await;
    let error = assert_one_line_error(&output, &["token 1", "damaged", "not base64"]);
    assert!(
        !error.contains("Some(") && !error.contains("InvalidByte"),
        "{error}"
    );

    let remove = [
        "token",
        "remove",
        image.to_str().unwrap(),
        "--token-id",
        "1",
    ];
    assert!(run_cryptsetup(&cryptsetup, &remove, "").status.success());
    import_token(
        &cryptsetup,
        &image,
        1,
        "sideroKMS",
        &BASE64.encode([7u8; 43]),
    );
    let output = recover(None, &image, NODE, &[]).await;
    assert_one_line_error(&output, &["token 1", "damaged", "43 bytes, not the 44"]);
}

#[tokio::test]
async fn a_file_without_luks2_or_a_missing_device_is_one_clear_line() {
    // No LUKS header: nothing here needs cryptsetup or a server.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    let output = recover(None, &plain, NODE, &[]).await;
    assert_one_line_error(&output, &["has no LUKS2 header", "encrypted partition"]);

    let missing = dir.path().join("missing.img");
    let output = recover(None, &missing, NODE, &[]).await;
    assert_one_line_error(
        &output,
        &["cannot read", "No such file or directory", "check the path"],
    );

    let output = recover(None, dir.path(), NODE, &[]).await;
    assert_one_line_error(&output, &["cannot read", "Is a directory"]);
}
