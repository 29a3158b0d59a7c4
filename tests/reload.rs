//! Certificates renewed while nodes call: a plain rename, the Kubernetes `..data` symlink
//! swap, a broken pair that must not replace a good one, and SIGHUP.

mod common;

use common::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use talos_kms_server::tls::throwaway;

struct Pair {
    chain: String,
    key: String,
    ca: String,
}

fn pair() -> Pair {
    let pki = throwaway::generate(&["localhost", "127.0.0.1"].map(String::from)).unwrap();
    Pair {
        chain: pki.chain_pem,
        key: pki.key_pem,
        ca: pki.ca_pem,
    }
}

fn leaf_of(pair: &Pair) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pair.chain.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// The leaf certificate a new connection is given.
async fn presented(port: u16, ca_bundle: &Path) -> Vec<u8> {
    let stream = tls_connect(port, ca_bundle).await;
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Waits (at most 10 s) until new connections get `pair`'s certificate.
async fn until_presented(port: u16, ca_bundle: &Path, pair: &Pair) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if presented(port, ca_bundle).await == leaf_of(pair) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Writes `content` beside `path` and renames it into place, as renewal tools do.
fn replace(path: &Path, content: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, content).unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// A node unsealing in a loop (bounded: 2,000 calls or 60 s) until told to stop; returns
/// the calls made and the failures.
fn keep_unsealing(
    port: u16,
    ca_bundle: PathBuf,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let client = client_for("127.0.0.1", port, &ca_bundle, None);
        let secret = random_passphrase();
        let sealed = client.seal(NODE, &secret).await.unwrap();
        let (mut calls, mut failures) = (0, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && calls < 2_000 && Instant::now() < deadline {
            calls += 1;
            match client.unseal(NODE, &sealed).await {
                Ok(answer) if answer == secret => {}
                Ok(_) => failures.push("wrong passphrase".into()),
                Err(error) => failures.push(error.to_string()),
            }
        }
        (calls, failures)
    })
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    ca_bundle: PathBuf,
    pairs: Vec<Pair>,
}

/// A config whose certificate and key are `cert` and `key` under the test directory, the
/// first of `count` pairs written there by `install`, and a CA bundle trusting them all.
fn setup(count: usize, install: impl Fn(&Path, &Pair)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pairs: Vec<Pair> = (0..count).map(|_| pair()).collect();
    let ca_bundle = dir.path().join("cas.pem");
    std::fs::write(
        &ca_bundle,
        pairs.iter().map(|p| p.ca.as_str()).collect::<String>(),
    )
    .unwrap();
    install(dir.path(), &pairs[0]);
    let pki = Pki {
        ca: ca_bundle.clone(),
        cert: dir.path().join("certs/tls.crt"),
        key: dir.path().join("certs/tls.key"),
    };
    // Several nodes unsealing without pause, all from 127.0.0.1: far above one address's
    // rate limit, which is not what these tests are about.
    let config = write_config(
        dir.path(),
        &pki,
        "127.0.0.1",
        "rateLimitPerAddress: {perSecond: 0}\n",
    );
    Setup {
        _dir: dir,
        config,
        ca_bundle,
        pairs,
    }
}

fn install_plain(dir: &Path, pair: &Pair) {
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("certs/tls.crt"), &pair.chain).unwrap();
    write_private(&dir.join("certs/tls.key"), &pair.key);
}

/// What a Kubernetes secret volume looks like: files behind `..data`, a symlink to a
/// timestamped directory, swapped atomically on update.
fn install_kubernetes(dir: &Path, pair: &Pair, generation: u32) {
    let certs = dir.join("certs");
    let version = certs.join(format!("..2026_12_01_{generation}"));
    std::fs::create_dir_all(&version).unwrap();
    std::fs::write(version.join("tls.crt"), &pair.chain).unwrap();
    write_private(&version.join("tls.key"), &pair.key);
    let staged = certs.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(version.file_name().unwrap(), &staged).unwrap();
    std::fs::rename(&staged, certs.join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let link = certs.join(file);
        if !link.exists() {
            std::os::unix::fs::symlink(format!("..data/{file}"), link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_files_are_served_without_a_failed_call_and_a_broken_pair_is_refused() {
    let setup = setup(3, install_plain);
    let mut server = ServerProcess::start(&setup.config).unwrap();
    let port = server.addr.port();
    let stop = Arc::new(AtomicBool::new(false));
    // A small storm: several nodes unsealing at once while the pair changes.
    let nodes: Vec<_> = (0..4)
        .map(|_| keep_unsealing(port, setup.ca_bundle.clone(), stop.clone()))
        .collect();
    let certs = setup.config.parent().unwrap().join("certs");

    replace(&certs.join("tls.key"), &setup.pairs[1].key);
    replace(&certs.join("tls.crt"), &setup.pairs[1].chain);
    assert!(
        until_presented(port, &setup.ca_bundle, &setup.pairs[1]).await,
        "new connections get the renewed certificate"
    );

    // A key that does not match: refused, the working pair keeps serving.
    replace(&certs.join("tls.key"), &setup.pairs[2].key);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        presented(port, &setup.ca_bundle).await,
        leaf_of(&setup.pairs[1])
    );
    stop.store(true, Ordering::Relaxed);
    for node in nodes {
        let (calls, failures) = node.await.unwrap();
        assert!(calls > 0);
        assert!(
            failures.is_empty(),
            "{} of {calls} failed: {failures:?}",
            failures.len()
        );
    }

    let log = std::mem::replace(&mut server.log, std::sync::mpsc::channel().1);
    server.kill9();
    let refusals: Vec<String> = log
        .try_iter()
        .filter(|line| line.contains("ERROR") && line.contains("cannot be used"))
        .collect();
    assert_eq!(refusals.len(), 1, "logged once per change: {refusals:#?}");
    assert!(refusals[0].contains("does not match"), "{}", refusals[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_symlink_swap_is_followed_and_sighup_reloads() {
    let setup = setup(2, |dir, pair| install_kubernetes(dir, pair, 0));
    let server = ServerProcess::start(&setup.config).unwrap();
    let port = server.addr.port();
    let stop = Arc::new(AtomicBool::new(false));
    let node = keep_unsealing(port, setup.ca_bundle.clone(), stop.clone());

    install_kubernetes(setup.config.parent().unwrap(), &setup.pairs[1], 1);
    assert!(until_presented(port, &setup.ca_bundle, &setup.pairs[1]).await);
    stop.store(true, Ordering::Relaxed);
    let (calls, failures) = node.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {calls} failed: {failures:?}",
        failures.len()
    );

    let pid = server.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reloaded = None;
    while Instant::now() < deadline && reloaded.is_none() {
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(200))
            && (line.contains("trigger=\"SIGHUP\"") || line.contains("trigger=SIGHUP"))
        {
            reloaded = Some(line);
        }
    }
    let reloaded = reloaded.expect("SIGHUP reloads the certificate");
    // The files hold the pair already in use: nothing new is claimed.
    assert!(
        reloaded.contains("unchanged") && !reloaded.contains("new certificate in use"),
        "{reloaded}"
    );
    assert_eq!(
        presented(port, &setup.ca_bundle).await,
        leaf_of(&setup.pairs[1]),
        "still serving after SIGHUP"
    );
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn send(server: &ServerProcess, signal: &str) {
    std::process::Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .unwrap();
}

/// Waits (at most 10 s) for a log line holding every one of `words`, and returns it; the
/// server's memory must stay under 200 MiB meanwhile.
fn until_logged(server: &ServerProcess, words: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let rss = rss_kib(server.child.id());
        assert!(rss < 200 << 10, "the server grew to {rss} KiB");
        if let Ok(line) = server.log.recv_timeout(Duration::from_millis(50))
            && words.iter().all(|word| line.contains(word))
        {
            return Some(line);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_as_the_certificate_is_refused_and_signals_keep_working() {
    let setup = setup(1, install_plain);
    let mut server = ServerProcess::start(&setup.config).unwrap();
    let cert = setup.config.parent().unwrap().join("certs/tls.crt");
    let kept = cert.with_extension("kept");
    std::fs::rename(&cert, &kept).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&cert)
        .status()
        .unwrap();
    assert!(made.success());

    send(&server, "-HUP");
    let refused = until_logged(&server, &["ERROR", "cannot be used", "SIGHUP"]);
    assert!(
        refused
            .as_ref()
            .is_some_and(|line| line.contains("not a regular file")),
        "{refused:?}"
    );
    std::fs::remove_file(&cert).unwrap();
    std::fs::rename(&kept, &cert).unwrap();
    send(&server, "-HUP");
    assert!(
        until_logged(&server, &["SIGHUP", "INFO"]).is_some(),
        "a later SIGHUP still works"
    );
    assert_eq!(
        presented(server.addr.port(), &setup.ca_bundle).await,
        leaf_of(&setup.pairs[0])
    );

    let stopping = Instant::now();
    send(&server, "-TERM");
    let deadline = stopping + Duration::from_secs(10);
    while server.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = server.child.try_wait().unwrap();
    if status.is_none() {
        server.kill9();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops it: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_to_dev_zero_as_the_certificate_is_refused_without_filling_memory() {
    let setup = setup(1, install_plain);
    let server = ServerProcess::start(&setup.config).unwrap();
    let cert = setup.config.parent().unwrap().join("certs/tls.crt");
    let link = cert.with_extension("link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    std::fs::rename(&link, &cert).unwrap();

    send(&server, "-HUP");
    let refused = until_logged(&server, &["ERROR", "cannot be used", "SIGHUP"]);
    assert!(
        refused
            .as_ref()
            .is_some_and(|line| line.contains("not a regular file")),
        "{refused:?}"
    );
    assert_eq!(
        presented(server.addr.port(), &setup.ca_bundle).await,
        leaf_of(&setup.pairs[0]),
        "the old pair keeps serving"
    );
    let client = client_for("127.0.0.1", server.addr.port(), &setup.ca_bundle, None);
    client.seal(NODE, &random_passphrase()).await.unwrap();
}
