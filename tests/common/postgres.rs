//! A real PostgreSQL server per test: `initdb` and `postgres` from the machine's
//! PostgreSQL (Debian's `postgresql` package: `scripts/test` installs it), in a temporary
//! directory, listening on 127.0.0.1 only, at a port chosen here. As root it runs as
//! `nobody` (initdb refuses root). Every wait is bounded.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to start; a loaded 2-core machine is slow.
const START_LIMIT: Duration = Duration::from_secs(60);

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The user the server runs as, when the test runs as root.
    owner: Option<(u32, u32)>,
    child: Option<Child>,
    pub port: u16,
    /// The login role `kms` and its password.
    pub password: String,
    args: Vec<String>,
}

/// How a cluster should be set up.
#[derive(Default)]
pub struct ClusterOptions {
    /// ssl=on with this certificate and key (PEM), from `write_pki`.
    pub tls: Option<(PathBuf, PathBuf)>,
}

fn find_bin() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
}

fn id_of(flag: &str) -> Option<u32> {
    let output = Command::new("id").args([flag, "nobody"]).output().ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// Says loudly that PostgreSQL tests are skipped, or fails when CI must run them.
fn unavailable(why: &str) -> Option<PgCluster> {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("PostgreSQL cannot start here, and CI must run these tests: {why}");
    }
    eprintln!(
        "\n######## SKIPPED: PostgreSQL cannot start here ({why}); `scripts/test` installs \
         Debian's postgresql ########\n"
    );
    None
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

impl PgCluster {
    /// A running cluster with role `kms` (password authentication over TCP), or `None`
    /// (after a loud message) when PostgreSQL is not installed.
    pub fn start() -> Option<PgCluster> {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(options: ClusterOptions) -> Option<PgCluster> {
        let Some(bin) = find_bin() else {
            return unavailable("no initdb and postgres binaries found");
        };
        let owner = if rustix::process::geteuid().is_root() {
            match (id_of("-u"), id_of("-g")) {
                (Some(uid), Some(gid)) => Some((uid, gid)),
                _ => return unavailable("running as root, and there is no user `nobody`"),
            }
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("talos-kms-pg")
            .tempdir()
            .unwrap();
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        let mut args = vec![
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "max_connections=100".into(),
            "-c".into(),
            "shared_buffers=32MB".into(),
        ];
        if let Some((cert, key)) = &options.tls {
            let cert_copy = dir.path().join("pg.crt");
            let key_copy = dir.path().join("pg.key");
            std::fs::copy(cert, &cert_copy).unwrap();
            std::fs::copy(key, &key_copy).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_copy, std::fs::Permissions::from_mode(0o600)).unwrap();
            args.extend([
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", cert_copy.display()),
                "-c".into(),
                format!("ssl_key_file={}", key_copy.display()),
            ]);
        }
        if let Some((uid, gid)) = owner {
            for entry in walk(dir.path()) {
                std::os::unix::fs::chown(&entry, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut cluster = PgCluster {
            dir,
            bin,
            owner,
            child: None,
            port: free_port(),
            password,
            args,
        };
        let initdb = cluster
            .command("initdb")
            .args(["-D"])
            .arg(cluster.data())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match initdb {
            Ok(output) if output.status.success() => {}
            Ok(output) => {
                return unavailable(&format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            Err(e) => return unavailable(&format!("initdb cannot run: {e}")),
        }
        if let Err(why) = cluster.start_server() {
            return unavailable(&why);
        }
        cluster.sql(
            "postgres",
            &format!("CREATE ROLE kms LOGIN PASSWORD '{}'", cluster.password),
        );
        Some(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command.env("LC_ALL", "C").current_dir(self.dir.path());
        command
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_server(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.dir.path().join("postgres.log"), Some(uid), Some(gid))
                .unwrap();
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres cannot run: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < START_LIMIT {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("postgres exited ({status}): {}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ready() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "postgres did not accept connections within {START_LIMIT:?}: {}",
            self.log()
        ))
    }

    fn ready(&self) -> bool {
        self.command("pg_isready")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser, over the Unix socket.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let output = self
            .command("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// A new database owned by `kms`.
    pub fn create_database(&self, name: &str) {
        self.sql("postgres", &format!("CREATE DATABASE {name} OWNER kms"));
    }

    /// The URL of `database` with the password in it.
    pub fn url(&self, database: &str, query: &str) -> String {
        format!(
            "postgres://kms:{}@127.0.0.1:{}/{database}{query}",
            self.password, self.port
        )
    }

    /// The URL of `database` without a password.
    pub fn url_without_password(&self, database: &str, query: &str) -> String {
        format!("postgres://kms@127.0.0.1:{}/{database}{query}", self.port)
    }

    /// Stops the server the way a crash would (SIGQUIT: immediate shutdown, recovery from
    /// the WAL at the next start), and waits for it to exit.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, rustix::process::Signal::QUIT);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        if let Err(why) = self.start_server() {
            panic!("PostgreSQL did not start again: {why}");
        }
    }
}

/// PostgreSQL hung, as by a stalled disk or a frozen VM: the postmaster and every backend
/// stopped (SIGSTOP) until this is dropped.
pub struct Frozen {
    pids: Vec<rustix::process::Pid>,
}

impl PgCluster {
    pub fn freeze(&self) -> Frozen {
        let stop = |pid| {
            let pid = rustix::process::Pid::from_raw(pid)?;
            rustix::process::kill_process(pid, rustix::process::Signal::STOP).ok()?;
            Some(pid)
        };
        let postmaster = self.child.as_ref().expect("PostgreSQL runs").id() as i32;
        // The postmaster first, so that it starts no backend that escapes the freeze.
        let mut pids: Vec<_> = stop(postmaster).into_iter().collect();
        std::thread::sleep(Duration::from_millis(50));
        pids.extend(children_of(postmaster).into_iter().filter_map(stop));
        Frozen { pids }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = rustix::process::kill_process(*pid, rustix::process::Signal::CONT);
        }
    }
}

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<i32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                all.extend(walk(&path));
            } else {
                all.push(path);
            }
        }
    }
    all
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fast shutdown: no recovery needed, and the directory goes away next.
            signal(&child, rustix::process::Signal::INT);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
