//! A real HAProxy per test: Debian's `haproxy` (`scripts/test` installs it), in the
//! foreground, on loopback ports chosen here, running the README's example config
//! (docs/load-balancer/haproxy.cfg) with loopback addresses put in. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long HAProxy may take to listen; a loaded 2-core machine is slow.
const START_LIMIT: Duration = Duration::from_secs(30);
/// The example config, as documented.
pub const EXAMPLE: &str = include_str!("../../docs/load-balancer/haproxy.cfg");

pub struct HaProxy {
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
    /// The example's frontend, balancing over every backend.
    pub balanced: u16,
    /// One frontend per backend, in order, for tests that must pick the replica.
    pub to_each: Vec<u16>,
}

fn find() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = ["/usr/sbin", "/sbin", "/usr/local/sbin"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .map(|dir| dir.join("haproxy"))
        .find(|path| path.is_file())
}

/// Says loudly that HAProxy tests are skipped, or fails when CI must run them.
fn unavailable(why: &str) -> Option<HaProxy> {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("HAProxy cannot start here, and CI must run these tests: {why}");
    }
    eprintln!(
        "\n######## SKIPPED: HAProxy cannot start here ({why}); `scripts/test` installs \
         Debian's haproxy ########\n"
    );
    None
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// The example config for `backends` (loopback ports), connecting to them from `source`
/// (the proxy's address, which the replicas trust), with a frontend per backend added.
pub fn config(balanced: u16, backends: &[u16], to_each: &[u16], source: &str) -> String {
    let mut text = String::new();
    let mut servers = 0;
    for line in EXAMPLE.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("bind ") {
            text.push_str(&format!("    bind 127.0.0.1:{balanced}\n"));
        } else if trimmed.starts_with("server ") {
            // The example's server lines, one per backend, with their options kept.
            let options: Vec<&str> = trimmed.split_whitespace().skip(3).collect();
            for (i, port) in backends.iter().enumerate().skip(servers) {
                text.push_str(&format!(
                    "    server kms-{i} 127.0.0.1:{port} {}\n",
                    options.join(" ")
                ));
                servers = i + 1;
            }
        } else {
            text.push_str(line);
            text.push('\n');
        }
        if trimmed.starts_with("balance ") {
            text.push_str(&format!("    source {source}\n"));
        }
    }
    assert_eq!(servers, backends.len(), "the example has server lines");
    for (i, (front, back)) in to_each.iter().zip(backends).enumerate() {
        text.push_str(&format!(
            "\nfrontend only-{i}\n    bind 127.0.0.1:{front}\n    default_backend only-{i}\n\
             \nbackend only-{i}\n    source {source}\n    server kms-{i} 127.0.0.1:{back} send-proxy-v2\n"
        ));
    }
    text
}

impl HaProxy {
    /// HAProxy in front of the replicas on `backends`, connecting from `source`; `None`
    /// (after a loud message) when it cannot start here.
    pub fn start(backends: &[u16], source: &str) -> Option<HaProxy> {
        let Some(binary) = find() else {
            return unavailable("no haproxy binary found");
        };
        let dir = tempfile::Builder::new()
            .prefix("talos-kms-haproxy")
            .tempdir()
            .unwrap();
        let balanced = free_port();
        let to_each: Vec<u16> = backends.iter().map(|_| free_port()).collect();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config(balanced, backends, &to_each, source)).unwrap();
        let log = dir.path().join("haproxy.log");
        let check = Command::new(&binary)
            .args(["-c", "-f"])
            .arg(&cfg)
            .output()
            .unwrap();
        if !check.status.success() {
            // The config is ours: a refusal is a bug in it, not a missing HAProxy.
            panic!(
                "haproxy -c refused the config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let child = Command::new(&binary)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("haproxy.err")).unwrap())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) => return unavailable(&format!("cannot run {}: {error}", binary.display())),
        };
        let mut proxy = HaProxy {
            child,
            log,
            _dir: dir,
            balanced,
            to_each,
        };
        let started = Instant::now();
        let mut ports = vec![proxy.balanced];
        ports.extend(&proxy.to_each);
        loop {
            if ports
                .iter()
                .all(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
            {
                return Some(proxy);
            }
            if let Ok(Some(status)) = proxy.child.try_wait() {
                let why = format!("haproxy exited ({status}): {}", proxy.errors());
                return unavailable(&why);
            }
            if started.elapsed() > START_LIMIT {
                let why = format!(
                    "haproxy did not listen within {START_LIMIT:?}: {}",
                    proxy.errors()
                );
                return unavailable(&why);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What HAProxy said on stderr.
    pub fn errors(&self) -> String {
        let dir = self.log.parent().unwrap_or(Path::new("."));
        std::fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
