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
    assert!(!written.contains("changeit"), "no well-known password");
    assert!(written.contains("database: \"/var/lib/talos-kms-server/"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "it will hold the key's password");

    // Running again does not overwrite it: it now fails on the missing certificate.
    std::fs::write(
        &config,
        written.replace("serverKeyPassword: \"\"", "serverKeyPassword: \"mine\""),
    )
    .unwrap();
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
    let setup = Setup::new("bindAdress: \"::\"\n");
    let config = &setup.config;
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
    let received = line_reader(demo.stdout.take().unwrap());
    let printed = lines_until(&received, "slot: 0");
    assert!(printed.contains("kind: TrustedRootsConfig"), "{printed}");
    // Issue 21.9: a loopback endpoint would make a node call itself.
    assert!(
        printed.contains("would call ITSELF") && printed.contains("`--listen ADDR --name HOST`"),
        "{printed}"
    );
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
    assert!(
        !printed.contains("ITSELF"),
        "nodes reach kms.test: {printed}"
    );
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

    // SIGHUP (a closed terminal) stops the demo and removes its files, as Ctrl-C does.
    let pid = demo.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..300 {
            if let Some(status) = demo.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = demo.kill();
        panic!("demo did not stop within 30 s of SIGHUP");
    })
    .await
    .unwrap();
    assert!(status.success());
    assert!(!dir.exists(), "the throwaway key and database are removed");
}

#[tokio::test]
async fn a_plaintext_endpoint_against_a_tls_server_says_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let port = server.port();
    for endpoint in [
        format!("grpc://127.0.0.1:{port}"),
        format!("127.0.0.1:{port}"),
    ] {
        let output = run_binary_async(&["client", "--endpoint", &endpoint, "roundtrip"]).await;
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("speaks TLS") && stderr.contains(&format!("https://127.0.0.1:{port}")),
            "{endpoint}: {stderr}"
        );
    }
    server.running.shutdown().await.unwrap();
}

#[test]
fn a_refused_connection_is_said_once_with_its_cause() {
    let (taken, port) = taken_port();
    drop(taken);
    let output = run_binary(&[
        "client",
        "--endpoint",
        &format!("https://127.0.0.1:{port}"),
        "roundtrip",
    ]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.to_lowercase().matches("connection refused").count(),
        1,
        "each cause once: {stderr}"
    );
}

#[tokio::test]
async fn seal_output_raw_feeds_unseal_and_json_has_the_three_values() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let endpoint = format!("https://127.0.0.1:{}", server.port());
    let ca = server.pki.ca.to_str().unwrap().to_string();
    let passphrase = "c2VjcmV0IHBhc3NwaHJhc2UgZm9yIHRoZSB0ZXN0IQ==";
    let target = ["client", "--endpoint", &endpoint, "--ca", &ca];

    let seal = [
        &target[..],
        &[
            "seal",
            "--node-uuid",
            NODE,
            "--passphrase",
            passphrase,
            "--output",
            "raw",
        ],
    ]
    .concat();
    let output = run_binary_async(&seal).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let sealed = text(&output.stdout).trim().to_string();
    assert!(
        !sealed.contains(' ') && !sealed.contains('\n'),
        "raw is the blob alone: {sealed}"
    );

    let unseal = [
        &target[..],
        &["unseal", "--node-uuid", NODE, "--sealed", &sealed],
    ]
    .concat();
    let output = run_binary_async(&unseal).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), passphrase);

    let seal = [
        &target[..],
        &[
            "seal",
            "--node-uuid",
            NODE,
            "--passphrase",
            passphrase,
            "--output",
            "json",
        ],
    ]
    .concat();
    let output = run_binary_async(&seal).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["node_uuid"], NODE);
    assert_eq!(json["passphrase"], passphrase);
    let sealed = json["sealed"].as_str().unwrap();
    let unseal = [
        &target[..],
        &["unseal", "--node-uuid", NODE, "--sealed", sealed],
    ]
    .concat();
    let output = run_binary_async(&unseal).await;
    assert_eq!(text(&output.stdout).trim(), passphrase);
    server.running.shutdown().await.unwrap();
}

/// Options in clap's help that have no description, in its short (`-h`) and long (`--help`)
/// layouts: text after the option on its line, or on the next, more indented line.
fn options_without_help(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut bare = Vec::new();
    let mut in_options = false;
    for (i, line) in lines.iter().enumerate() {
        // Sections start at a line without indentation, such as "Options:".
        if !line.starts_with(' ') && !line.is_empty() {
            in_options = ["Options:", "Arguments:"].contains(&line.trim_end());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let argument = ['-', '<', '[']
            .iter()
            .any(|c| line.trim_start().starts_with(*c));
        if !in_options || !argument || indent > 6 {
            continue;
        }
        // The option and its value name end where two spaces begin the description.
        let same_line = line
            .trim()
            .split_once("  ")
            .is_some_and(|(_, rest)| !rest.trim().is_empty());
        let next_line = lines.get(i + 1).is_some_and(|next| {
            let next_indent = next.len() - next.trim_start().len();
            next_indent > indent
                && !next.trim().is_empty()
                && !['-', '<', '[']
                    .iter()
                    .any(|c| next.trim_start().starts_with(*c))
        });
        if !same_line && !next_line {
            bare.push(line.trim().to_string());
        }
    }
    bare
}

#[test]
fn every_option_of_client_and_bench_has_a_help_line() {
    for command in [
        &["client", "--help"][..],
        &["client", "-h"],
        &["client", "seal", "--help"],
        &["client", "unseal", "--help"],
        &["client", "roundtrip", "--help"],
        &["bench", "--help"],
        &["bench", "-h"],
        &["fill", "--help"],
    ] {
        let output = run_binary(command);
        assert!(output.status.success(), "{command:?}");
        let help = text(&output.stdout);
        assert!(help.contains("--"), "{command:?}: {help}");
        let bare = options_without_help(&help);
        assert!(
            bare.is_empty(),
            "{command:?}: options without help: {bare:?}\n{help}"
        );
    }
    let help = text(&run_binary(&["bench", "--help"]).stdout);
    assert!(
        help.contains("adds a record") && help.contains("--volumes-from"),
        "{help}"
    );
}

/// Every command's path, found by reading the "Commands:" section of each help.
fn all_commands(path: Vec<String>) -> Vec<Vec<String>> {
    let mut args = path.clone();
    args.push("--help".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let help = text(&run_binary(&args).stdout);
    let mut found = vec![path.clone()];
    let mut in_commands = false;
    for line in help.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        let Some(name) = line.split_whitespace().next().filter(|_| in_commands) else {
            continue;
        };
        if name != "help" {
            let mut deeper = path.clone();
            deeper.push(name.to_string());
            found.extend(all_commands(deeper));
        }
    }
    found
}

/// What a newcomer met: help that names the wrong values, a selector usage that names one of
/// two, an argument without a description.
#[test]
fn every_command_describes_every_argument_and_option() {
    let commands = all_commands(Vec::new());
    assert!(commands.len() > 30, "{commands:?}");
    for path in &commands {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = run_binary(&args);
        assert!(output.status.success(), "{args:?}");
        let help = text(&output.stdout);
        let bare = options_without_help(&help);
        assert!(bare.is_empty(), "{args:?}: without help: {bare:?}\n{help}");
        assert!(
            !help.contains("`table`"),
            "{args:?}: there is no table output\n{help}"
        );
    }
    let purge = run_binary(&["keys", "purge", "--config", "x.yaml"]);
    let said = text(&purge.stderr);
    assert!(
        said.contains("--revoked") && said.contains("--not-accessed-for"),
        "both selectors are named: {said}"
    );
    let serve = text(&run_binary(&["serve", "--help"]).stdout);
    assert!(serve.contains("SIGHUP"), "{serve}");
    let roundtrip = text(&run_binary(&["client", "roundtrip", "--help"]).stdout);
    assert!(roundtrip.contains("adds a record"), "{roundtrip}");
}

/// `--version` says which commit and when, without git at run time.
#[test]
fn the_version_names_its_commit_and_build_day() {
    let version = text(&run_binary(&["--version"]).stdout);
    let words: Vec<&str> = version.split_whitespace().collect();
    assert_eq!(
        words[..3],
        ["talos-kms-server", env!("CARGO_PKG_VERSION"), "(commit"],
        "{version}"
    );
    assert!(words[3].len() >= 12 && words[4] == "built", "{version}");
    assert!(
        time::Date::parse(
            words[5].trim_end_matches(')'),
            time::macros::format_description!("[year]-[month]-[day]")
        )
        .is_ok(),
        "{version}"
    );
}

/// Completions and manual pages come from the same definitions as the parser.
#[test]
fn completions_and_man_pages_know_every_command() {
    let bash = text(&run_binary(&["completions", "bash"]).stdout);
    for command in [
        "keys",
        "pending",
        "window",
        "export-json",
        "--not-accessed-for",
    ] {
        assert!(bash.contains(command), "bash completion lacks {command}");
    }
    let zsh = run_binary(&["completions", "zsh"]);
    assert!(text(&zsh.stdout).starts_with("#compdef talos-kms-server"));
    let dir = tempfile::tempdir().unwrap();
    let out = run_binary(&["man", "--out", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("talos-kms-server-keys-purge.1")).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
    assert!(page.contains("not\\-accessed\\-for"), "{page}");
}

/// Client options may come after the command too, and a node UUID that no Talos node would
/// send is warned about (not refused: the server takes any string, as the seed did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_options_go_anywhere_and_a_non_uuid_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.1:0").await;
    let endpoint = format!("https://127.0.0.1:{}", server.port());
    let ca = server.pki.ca.to_str().unwrap().to_string();
    let output = run_binary_async(&[
        "client",
        "--endpoint",
        &endpoint,
        "seal",
        "--ca",
        &ca,
        "--node-uuid",
        NODE,
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        !text(&output.stderr).contains("warning"),
        "{}",
        text(&output.stderr)
    );
    let output = run_binary_async(&[
        "client",
        "seal",
        "--endpoint",
        &endpoint,
        "--ca",
        &ca,
        "--node-uuid",
        "not-a-uuid",
    ])
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let said = text(&output.stderr);
    assert!(
        said.contains("warning") && said.contains("not a UUID"),
        "{said}"
    );
    let output = run_binary_async(&["client", "seal", "--node-uuid", NODE]).await;
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("--endpoint URL is required"));
    server.running.shutdown().await.unwrap();
}

/// Rust Debug output of library errors, which an operator cannot act on.
fn assert_no_debug_text(message: &str) {
    for debug in [
        "Other(",
        "OtherError",
        "DnsName(",
        "InvalidCertificate(",
        "IpAddress(",
        "Custom {",
        "kind:",
    ] {
        assert!(
            !message.contains(debug),
            "Debug text {debug:?} in: {message}"
        );
    }
}

#[tokio::test]
async fn tls_failures_say_what_is_wrong_and_the_fix_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "127.0.0.2:0").await;
    let port = server.port();
    let ca = server.pki.ca.to_str().unwrap().to_string();

    // No --ca: the public roots do not know the throwaway CA.
    let endpoint = format!("https://127.0.0.2:{port}");
    let output = run_binary_async(&["client", "--endpoint", &endpoint, "roundtrip"]).await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert_no_debug_text(&stderr);
    assert!(
        stderr.contains("not trusted") && stderr.contains("--ca FILE"),
        "{stderr}"
    );

    // The CA is given, but the certificate does not name the host.
    let output =
        run_binary_async(&["client", "--endpoint", &endpoint, "--ca", &ca, "roundtrip"]).await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert_no_debug_text(&stderr);
    assert!(
        stderr.contains("not valid for 127.0.0.2")
            && stderr.contains("localhost, 127.0.0.1, ::1")
            && stderr.contains("add 127.0.0.2 to the certificate"),
        "{stderr}"
    );
    server.running.shutdown().await.unwrap();
}
