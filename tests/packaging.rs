//! The packaging, checked with the real tools: the systemd unit (systemd-analyze), the
//! syscalls the server makes against the unit's filter (strace), the .deb (dpkg-deb) and its
//! install, fresh and over the legacy package, into a throwaway copy of this machine (dpkg in
//! a chroot on an overlay of /), and the arm64 .deb under qemu-user.
//!
//! The .debs are built by scripts/test (`cargo deb`), which passes their paths in
//! TALOS_KMS_DEB and TALOS_KMS_DEB_ARM64; tests that need one skip loudly without it.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const UNIT: &str = "talos-kms-server.service";

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn ok(command: &mut Command) -> String {
    let output = run_limited(command, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A throwaway root holding only the unit, for systemd-analyze's --root.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(packaging(UNIT), dir.join(UNIT)).unwrap();
    root
}

fn systemd_version() -> Option<u32> {
    let output = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .ok()?;
    text(&output.stdout).split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_unit_exposure_level_is_at_most_2() {
    // --offline arrived in systemd 250.
    let Some(version) = systemd_version().filter(|v| *v >= 250) else {
        return skip("systemd-analyze 250 or later is needed (scripts/test installs systemd)");
    };
    let root = unit_root();
    let output = ok(Command::new("systemd-analyze").args([
        "security",
        "--offline=true",
        &format!("--root={}", root.path().display()),
        "--no-pager",
        UNIT,
    ]));
    let level: f64 = output
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for talos-kms-server.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{output}"));
    eprintln!("systemd {version}: exposure level {level}");
    assert!(level <= 2.0, "exposure level {level} > 2.0:\n{output}");
}

#[test]
fn the_unit_verifies_on_this_systemd() {
    if systemd_version().is_none() {
        return skip("no systemd-analyze (scripts/test installs systemd)");
    }
    let root = unit_root();
    let output = run_limited(
        Command::new("systemd-analyze").args([
            "verify",
            "--no-pager",
            &root
                .path()
                .join("etc/systemd/system")
                .join(UNIT)
                .display()
                .to_string(),
        ]),
        Duration::from_secs(60),
    );
    // The binary is not installed on this machine; every other complaint (an unknown key or
    // value, such as Type=notify-reload before systemd 253) is a failure. The installed
    // package is verified with its binary in `the_deb_installs_enables_and_serves_as_talos_kms`.
    let complaints: Vec<String> = text(&output.stderr)
        .lines()
        .chain(text(&output.stdout).lines())
        .filter(|line| !line.contains("/usr/bin/talos-kms-server is not executable"))
        .filter(|line| !line.trim().is_empty())
        .map(String::from)
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );
}

#[test]
fn the_packaged_config_is_the_servers_commented_default() {
    let packaged = std::fs::read_to_string(packaging("config.yaml")).unwrap();
    assert!(
        packaged == talos_kms_server::config::DEFAULT_CONFIG,
        "packaging/config.yaml differs from DEFAULT_CONFIG in src/config.rs: copy it, e.g. \
         `rm packaging/config.yaml; target/debug/talos-kms-server --config packaging/config.yaml`"
    );
    assert!(packaged.contains("\ndatabase: \"/var/lib/talos-kms-server/talos-kms-server.db\"\n"));
    assert!(packaged.contains("\nserverCertFile: \"/etc/talos-kms-server/server.crt\"\n"));
    assert!(packaged.contains("\nserverKeyFile: \"/etc/talos-kms-server/server.key\"\n"));
}

/// Every syscall group of this systemd, fully expanded: `systemd-analyze syscall-filter`.
fn syscall_groups() -> BTreeMap<String, BTreeSet<String>> {
    let listing = ok(Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]));
    let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            direct.insert(line.trim().to_string(), Vec::new());
        } else if let Some(group) = &current {
            let entry = line.trim();
            if !entry.is_empty() && !entry.starts_with('#') {
                direct.get_mut(group).unwrap().push(entry.to_string());
            }
        }
    }
    fn expand(group: &str, direct: &BTreeMap<String, Vec<String>>, into: &mut BTreeSet<String>) {
        for entry in direct.get(group).into_iter().flatten() {
            if entry.starts_with('@') {
                expand(entry, direct, into);
            } else {
                into.insert(entry.clone());
            }
        }
    }
    direct
        .keys()
        .map(|group| {
            let mut calls = BTreeSet::new();
            expand(group, &direct, &mut calls);
            (group.clone(), calls)
        })
        .collect()
}

/// Reads stderr lines from `child` until the "serving" line; returns the port.
fn wait_serving(child: &mut Child) -> Result<(u16, mpsc::Receiver<String>), String> {
    let stderr = child.stderr.take().unwrap();
    let (lines, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while let Ok(line) = log.recv_timeout(Duration::from_secs(60)) {
        if line.contains("serving")
            && let Some(port) = line
                .split("address=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|port| port.parse().ok())
        {
            return Ok((port, log));
        }
        seen.push(line);
    }
    let _ = child.kill();
    let status = child.wait().ok();
    Err(format!("not serving ({status:?}):\n{}", seen.join("\n")))
}

fn signal(pid: u32, name: &str) {
    Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    for _ in 0..limit.as_millis() / 100 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("{child:?} did not exit within {limit:?}");
}

async fn round_trip(port: u16, ca: &Path) {
    let client = client_for("127.0.0.1", port, ca, None);
    let passphrase = random_passphrase();
    let sealed = client.seal(NODE, &passphrase).await.expect("seal");
    let unsealed = client.unseal(NODE, &sealed).await.expect("unseal");
    assert_eq!(unsealed, passphrase);
}

/// The unit kills nothing for a syscall (SystemCallErrorNumber=EPERM) but a refused one
/// would still fail the server: every syscall it makes while starting, sealing, unsealing,
/// reloading (SIGHUP, with NOTIFY_SOCKET set as systemd does) and stopping must be in
/// @system-service and outside ~@privileged @resources; no socket outside the unit's
/// RestrictAddressFamilies; no writable executable memory (MemoryDenyWriteExecute).
#[tokio::test]
async fn the_server_stays_inside_the_units_syscall_filter() {
    if !have("strace") || systemd_version().is_none() {
        return skip("strace and systemd-analyze are needed (scripts/test installs them)");
    }
    let groups = syscall_groups();
    let allowed: BTreeSet<&String> = groups["@system-service"]
        .iter()
        .filter(|call| !groups["@privileged"].contains(*call))
        .filter(|call| !groups["@resources"].contains(*call))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path());
    let config = write_config(dir.path(), &pki, "127.0.0.1", "");
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let trace = dir.path().join("trace");
    let mut strace = Command::new("strace");
    strace.args(["-f", "-qq", "-o"]).arg(&trace);
    // As root, SQLite fchown()s its journal to the database's owner (@chown, refused by the
    // unit): run as a plain user, as the unit does.
    if is_root() {
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        strace.args(["-u", "nobody"]);
    }
    let mut strace = strace
        .arg(BINARY)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "30000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (port, _log) = wait_serving(&mut strace).unwrap();
    round_trip(port, &pki.ca).await;

    // The server is strace's child: its pid starts the trace.
    let trace_text = || std::fs::read_to_string(&trace).unwrap();
    let server_pid: u32 = trace_text()
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("pid in the trace");
    signal(server_pid, "HUP");
    std::thread::sleep(Duration::from_secs(2));
    round_trip(port, &pki.ca).await;
    signal(server_pid, "TERM");
    let status = wait_exit(&mut strace, Duration::from_secs(30));
    assert!(status.success(), "server under strace: {status}");
    let mut messages = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buffer) {
        messages.push(text(&buffer[..n]).replace('\n', " "));
    }
    eprintln!("sd_notify messages: {messages:?}");

    let mut used = BTreeSet::new();
    let mut problems = BTreeSet::new();
    for line in trace_text().lines() {
        // "PID name(args) = result", "PID name(args <unfinished ...>"; resumptions and
        // signal lines are skipped.
        let Some((head, args)) = line.split_once('(') else {
            continue;
        };
        let Some(name) = head.split_whitespace().nth(1) else {
            continue;
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        used.insert(name.to_string());
        let exec = args.contains("PROT_EXEC");
        match name {
            "mmap" if exec && args.contains("PROT_WRITE") => {
                problems.insert(format!("writable executable memory: {line}"));
            }
            "mprotect" | "pkey_mprotect" if exec => {
                problems.insert(format!("MemoryDenyWriteExecute refuses: {line}"));
            }
            "socket" | "socketpair"
                if !["AF_INET,", "AF_INET6,", "AF_UNIX,"]
                    .iter()
                    .any(|family| args.starts_with(family)) =>
            {
                problems.insert(format!("RestrictAddressFamilies refuses: {line}"));
            }
            _ => {}
        }
    }
    for call in &used {
        if !allowed.contains(call) {
            problems.insert(format!(
                "syscall {call} is outside the unit's SystemCallFilter"
            ));
        }
    }
    eprintln!("{} distinct syscalls: {used:?}", used.len());
    assert!(used.contains("sendto") || used.contains("sendmsg"));
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Path of a .deb that scripts/test built, or None (and a loud skip).
fn deb(variable: &str) -> Option<PathBuf> {
    match std::env::var_os(variable).map(PathBuf::from) {
        Some(path) if path.is_file() => Some(path),
        Some(path) => panic!("{variable}={} does not exist", path.display()),
        None => {
            skip(&format!(
                "{variable} is not set: scripts/test builds the .deb with `cargo deb` and sets it"
            ));
            None
        }
    }
}

fn elf_machine(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// dpkg-deb's view of the package: fields, conffiles, files with modes, scripts.
fn check_deb(deb: &Path, arch: &str, machine: u16) {
    let field = |name: &str| ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name));
    assert_eq!(field("Package").trim(), "talos-kms-server");
    assert_eq!(field("Architecture").trim(), arch);
    let depends = field("Depends");
    assert!(depends.contains("libc6"), "Depends: {depends}");
    assert!(depends.contains("systemd | adduser"), "Depends: {depends}");

    let control = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/talos-kms-server/config.yaml");
    for script in ["postinst", "prerm", "postrm"] {
        let mode = std::fs::metadata(control.path().join(script))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
        let script_text = std::fs::read_to_string(control.path().join(script)).unwrap();
        let packaged = std::fs::read_to_string(packaging(&format!("debian/{script}"))).unwrap();
        assert_eq!(script_text, packaged, "{script}");
    }

    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(deb));
    let entry = |path: &str| {
        listing
            .lines()
            .find(|line| line.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
            .to_string()
    };
    // The group talos-kms does not exist when dpkg unpacks: postinst gives it the config.
    for (path, mode) in [
        ("/usr/bin/talos-kms-server", "-rwxr-xr-x"),
        ("/lib/systemd/system/talos-kms-server.service", "-rw-r--r--"),
        ("/etc/talos-kms-server/config.yaml", "-rw-r-----"),
        ("/usr/lib/sysusers.d/talos-kms-server.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/talos-kms-server.conf", "-rw-r--r--"),
        ("/opt/talos-kms-server/lib/acmeReload.sh", "-rwxr-xr-x"),
        ("/usr/share/talos-kms-server/alerts.yml", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/talos-kms-server",
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_talos-kms-server",
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/talos-kms-server.fish",
            "-rw-r--r--",
        ),
    ] {
        let line = entry(path);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], mode, "{line}");
        assert!(["0/0", "root/root"].contains(&fields[1]), "{line}");
    }

    let files = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(files.path()));
    let root = files.path();
    for (inside, source) in [
        ("lib/systemd/system/talos-kms-server.service", UNIT),
        ("etc/talos-kms-server/config.yaml", "config.yaml"),
        ("usr/lib/sysusers.d/talos-kms-server.conf", "sysusers.conf"),
        ("usr/lib/tmpfiles.d/talos-kms-server.conf", "tmpfiles.conf"),
    ] {
        assert_eq!(
            std::fs::read(root.join(inside)).unwrap(),
            std::fs::read(packaging(source)).unwrap(),
            "{inside}"
        );
    }
    assert_eq!(elf_machine(&root.join("usr/bin/talos-kms-server")), machine);
    assert_eq!(
        std::fs::read(root.join("usr/share/talos-kms-server/alerts.yml")).unwrap(),
        std::fs::read(packaging("prometheus/alerts.yml")).unwrap()
    );
    // The pages and completions know every command, the newest included.
    let bash = std::fs::read_to_string(
        root.join("usr/share/bash-completion/completions/talos-kms-server"),
    )
    .unwrap();
    assert!(bash.contains("pending") && bash.contains("--not-accessed-for"));
    let man = root.join("usr/share/man/man1");
    let pages = |name: &str| {
        std::fs::read_dir(&man)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .any(|file| file.starts_with(name) && file.contains(".1"))
    };
    for page in [
        "talos-kms-server.1",
        "talos-kms-server-keys-purge.1",
        "talos-kms-server-db-restore.1",
    ] {
        assert!(pages(page), "man page {page} is not in the package");
    }
    let copyright =
        std::fs::read_to_string(root.join("usr/share/doc/talos-kms-server/copyright")).unwrap();
    assert!(
        copyright.contains("Permission is hereby granted, free of charge"),
        "the copyright file carries the MIT licence text: {copyright}"
    );
}

#[test]
fn the_deb_holds_the_binary_unit_and_config_as_a_conffile() {
    let Some(deb) = deb("TALOS_KMS_DEB") else {
        return;
    };
    check_deb(&deb, "amd64", EM_X86_64);
}

/// A copy-on-write copy of this machine: an overlay of / in a private mount namespace, where
/// dpkg runs for real in a chroot. Everything it changes lands in `upper`, which the test
/// reads afterwards; this machine's own files and dpkg database are never touched.
struct ThrowawayRoot {
    dir: tempfile::TempDir,
}

impl ThrowawayRoot {
    fn new() -> Option<ThrowawayRoot> {
        if !is_root() || !have("unshare") || !have("dpkg") {
            skip("installing the .deb needs root, unshare and dpkg (an overlay of / and chroot)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        for sub in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Some(ThrowawayRoot { dir })
    }

    fn upper(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("upper")
            .join(path.trim_start_matches('/'))
    }

    /// Starts `script` (sh) in the overlay's namespace; `$M` is the merged root and `in_root`
    /// runs a command chrooted there. The script may end by exec'ing a long-running process.
    fn spawn(&self, script: &str) -> Child {
        let d = self.dir.path().display();
        let full = format!(
            "set -eu\n\
             M={d}/merged\n\
             mount -t overlay overlay -o lowerdir=/,upperdir={d}/upper,workdir={d}/work \"$M\"\n\
             for fs in proc sys dev; do mount --rbind /$fs \"$M/$fs\"; done\n\
             in_root() {{ chroot \"$M\" \"$@\"; }}\n\
             export DEBIAN_FRONTEND=noninteractive\n\
             {script}"
        );
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &full])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn run(&self, script: &str) -> String {
        let child = self.spawn(script);
        let pid = child.id();
        let (done, finished) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if finished.recv_timeout(Duration::from_secs(300)).is_err() {
                signal(pid, "KILL");
            }
        });
        let output = child.wait_with_output().unwrap();
        let _ = done.send(());
        let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(
            output.status.success(),
            "script failed ({}):\n{all}",
            output.status
        );
        all
    }
}

/// "MODE USER:GROUP" of paths inside the root, as the root's own passwd names them.
const STAT: &str = "in_root stat -c '%a %U:%G %n'";

/// Starts the packaged server as talos-kms in the root (umask and no_new_privs as the unit
/// has them) and waits until it serves; returns its port and process.
fn serve_in_root(root: &ThrowawayRoot, before: &str) -> (u16, Child) {
    let mut child = root.spawn(&format!(
        "{before}\n\
         umask 0077\n\
         exec chroot \"$M\" setpriv --reuid=talos-kms --regid=talos-kms --init-groups \
           --no-new-privs /usr/bin/talos-kms-server --config /etc/talos-kms-server/config.yaml"
    ));
    let (port, _log) = wait_serving(&mut child).unwrap();
    (port, child)
}

/// The packaged config, edited as an admin would: a free loopback port (the certificate and
/// key go where it names them).
fn configure(config: &str) -> String {
    let edited = config
        .replace("\nport: 50051", "\nport: 0")
        .replace("bindAddress: \"0.0.0.0\"", "bindAddress: \"127.0.0.1\"");
    assert!(edited.contains("\nport: 0") && edited.contains("127.0.0.1"));
    edited
}

#[tokio::test]
async fn the_deb_installs_enables_and_serves_as_talos_kms() {
    let Some(deb) = deb("TALOS_KMS_DEB") else {
        return;
    };
    let Some(root) = ThrowawayRoot::new() else {
        return;
    };
    let log = root.run(&format!(
        "in_root dpkg -i {deb}\n\
         {STAT} /etc/talos-kms-server /etc/talos-kms-server/config.yaml /var/lib/talos-kms-server\n\
         in_root getent passwd talos-kms\n\
         in_root systemd-analyze verify --no-pager /lib/systemd/system/{UNIT}\n\
         echo verified",
        deb = deb.display()
    ));
    eprintln!("{log}");
    assert!(
        log.contains("750 root:talos-kms /etc/talos-kms-server\n"),
        "{log}"
    );
    assert!(
        log.contains("640 root:talos-kms /etc/talos-kms-server/config.yaml\n"),
        "{log}"
    );
    assert!(
        log.contains("700 talos-kms:talos-kms /var/lib/talos-kms-server\n"),
        "{log}"
    );
    let passwd = log
        .lines()
        .find(|line| line.starts_with("talos-kms:"))
        .expect("talos-kms user");
    let fields: Vec<&str> = passwd.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {passwd}");
    assert_eq!(fields[5], "/var/lib/talos-kms-server");
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    // verify printed nothing between the passwd line and "verified".
    assert!(log.contains(&format!("{passwd}\nverified")), "{log}");
    assert!(log.contains("enabled but not started"), "{log}");
    let wants = root
        .upper("/etc/systemd/system/multi-user.target.wants")
        .join(UNIT);
    assert_eq!(
        std::fs::read_link(&wants).unwrap(),
        Path::new("/lib/systemd/system").join(UNIT)
    );
    assert_eq!(
        std::fs::read(root.upper("/etc/talos-kms-server/config.yaml")).unwrap(),
        std::fs::read(packaging("config.yaml")).unwrap()
    );

    // Configured as the README says: certificate and key beside the config, the key
    // readable by the service's group; then it serves, as talos-kms, from the state directory.
    let keys = tempfile::tempdir().unwrap();
    let pki = write_pki(keys.path());
    let edited = configure(talos_kms_server::config::DEFAULT_CONFIG);
    std::fs::write(keys.path().join("config.yaml"), &edited).unwrap();
    let k = keys.path().display();
    let (port, mut server) = serve_in_root(
        &root,
        &format!(
            "cp {k}/config.yaml {k}/server.crt {k}/server.key \"$M/etc/talos-kms-server/\"\n\
             in_root chgrp talos-kms /etc/talos-kms-server/server.key\n\
             in_root chmod 0640 /etc/talos-kms-server/server.key"
        ),
    );
    round_trip(port, &pki.ca).await;
    signal(server.id(), "TERM");
    let status = wait_exit(&mut server, Duration::from_secs(30));
    assert!(status.success(), "server: {status}");
    let database = root.upper("/var/lib/talos-kms-server/talos-kms-server.db");
    let meta = std::fs::metadata(&database).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));

    // Purge removes the package and its config, never the database.
    let log = root.run("in_root dpkg --purge talos-kms-server");
    eprintln!("{log}");
    assert!(database.exists(), "purge deleted the database");
    assert!(
        !root
            .upper("/etc/systemd/system/multi-user.target.wants")
            .join(UNIT)
            .exists()
    );
}

/// A stand-in for the legacy JVM package: same name, unit, user and conffile, binary in /opt.
fn legacy_deb(dir: &Path) -> PathBuf {
    let tree = dir.join("legacy");
    let write = |path: &str, content: &str, mode: u32| {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write(
        "DEBIAN/control",
        "Package: talos-kms-server\nVersion: 0.0.9\nArchitecture: all\n\
         Maintainer: legacy <legacy@localhost>\nDescription: legacy JVM KMS (test stand-in)\n",
        0o644,
    );
    write(
        "DEBIAN/conffiles",
        "/etc/talos-kms-server/config.yaml\n",
        0o644,
    );
    write(
        "DEBIAN/postinst",
        "#!/bin/sh\nset -e\ngetent passwd talos-kms >/dev/null || \
         adduser --system --group --quiet --no-create-home talos-kms\n\
         chown talos-kms:talos-kms /etc/talos-kms-server/config.yaml\n",
        0o755,
    );
    write(
        "etc/talos-kms-server/config.yaml",
        "nodeDbFile: \"/etc/talos-kms-server/nodeDbFile.json\"\n\
         serverCertFile: \"/etc/talos-kms-server/server.crt\"\n\
         serverKeyFile: \"/etc/talos-kms-server/server.key\"\n\
         serverKeyPassword: \"changeit\"\nport: 50051\nbindAddress: \"0.0.0.0\"\n\
         kmsLogLevel: \"INFO\"\nrootLogLevel: \"WARNING\"\n",
        0o644,
    );
    write(
        "opt/talos-kms-server/bin/talos-kms-server",
        "#!/bin/sh\nexit 1\n",
        0o755,
    );
    write(
        "lib/systemd/system/talos-kms-server.service",
        "[Service]\nUser=talos-kms\n\
         ExecStart=/opt/talos-kms-server/bin/talos-kms-server --config /etc/talos-kms-server/config.yaml\n\
         [Install]\nWantedBy=multi-user.target\n",
        0o644,
    );
    let deb = dir.join("legacy.deb");
    ok(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&tree)
        .arg(&deb));
    deb
}

/// Over the legacy package's layout — an edited config without `database`, the node records
/// in /etc/talos-kms-server/nodeDbFile.json, files owned by talos-kms — the config is kept
/// and a node sealed by the legacy server unseals from the upgraded one.
#[tokio::test]
async fn the_deb_upgrades_the_legacy_package_and_its_nodes_keep_unsealing() {
    let Some(deb) = deb("TALOS_KMS_DEB") else {
        return;
    };
    let Some(root) = ThrowawayRoot::new() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let legacy = legacy_deb(files.path());
    let pki = write_pki(files.path());
    // A record sealed the legacy way, bound to 127.0.0.1, and what the node keeps.
    let json = files.path().join("nodeDbFile.json");
    let volumes = files.path().join("volumes");
    let fill = run_binary(&[
        "fill",
        "--legacy-json",
        json.to_str().unwrap(),
        "--records",
        "1",
        "--ip",
        "127.0.0.1",
        "--volumes",
        volumes.to_str().unwrap(),
    ]);
    assert!(fill.status.success(), "fill: {}", text(&fill.stderr));
    let volume: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&volumes)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let edited = "# edited by the admin\n\
         nodeDbFile: \"/etc/talos-kms-server/nodeDbFile.json\"\n\
         serverCertFile: \"/etc/talos-kms-server/server.crt\"\n\
         serverKeyFile: \"/etc/talos-kms-server/server.key\"\n\
         port: 0\nbindAddress: \"127.0.0.1\"\n";
    std::fs::write(files.path().join("config.yaml"), edited).unwrap();

    let f = files.path().display();
    let log = root.run(&format!(
        "in_root dpkg -i {legacy}\n\
         cp {f}/config.yaml {f}/nodeDbFile.json {f}/server.crt {f}/server.key \"$M/etc/talos-kms-server/\"\n\
         in_root chown talos-kms:talos-kms /etc/talos-kms-server/config.yaml \
           /etc/talos-kms-server/nodeDbFile.json /etc/talos-kms-server/server.crt \
           /etc/talos-kms-server/server.key\n\
         in_root dpkg -i --force-confdef --force-confold {deb}\n\
         {STAT} /etc/talos-kms-server /etc/talos-kms-server/config.yaml\n\
         in_root dpkg-query -W -f '${{Version}}\\n' talos-kms-server\n\
         test ! -e \"$M/opt/talos-kms-server/bin/talos-kms-server\" && echo legacy binary removed",
        legacy = legacy.display(),
        deb = deb.display()
    ));
    eprintln!("{log}");
    assert_eq!(
        std::fs::read_to_string(root.upper("/etc/talos-kms-server/config.yaml")).unwrap(),
        edited,
        "the edited config was replaced"
    );
    assert_eq!(
        std::fs::read(root.upper("/etc/talos-kms-server/config.yaml.dpkg-dist")).unwrap(),
        std::fs::read(packaging("config.yaml")).unwrap()
    );
    assert!(
        log.contains("775 root:talos-kms /etc/talos-kms-server\n"),
        "{log}"
    );
    assert!(
        log.contains(&format!("\n{}-1\n", env!("CARGO_PKG_VERSION"))),
        "{log}"
    );
    assert!(log.contains("legacy binary removed"), "{log}");
    assert!(!log.contains("enabled but not started"), "{log}");

    let (port, mut server) = serve_in_root(&root, "");
    let client = client_for("127.0.0.1", port, &pki.ca, None);
    let decode = |field: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(volume[field].as_str().unwrap())
            .unwrap()
    };
    let unsealed = client
        .unseal(volume["node_uuid"].as_str().unwrap(), &decode("sealed"))
        .await
        .expect("unseal a legacy record after the upgrade");
    assert_eq!(unsealed, decode("passphrase"));
    signal(server.id(), "TERM");
    let status = wait_exit(&mut server, Duration::from_secs(30));
    assert!(status.success(), "server: {status}");
    assert!(
        root.upper("/etc/talos-kms-server/talos-kms-server.db")
            .exists()
    );
}

/// The arm64 .deb (cross-built by scripts/test where an aarch64 Rust standard library is
/// installed): its binary serves a round trip under qemu-user to this machine's client.
#[test]
fn the_arm64_deb_serves_under_qemu() {
    let Some(deb) = deb("TALOS_KMS_DEB_ARM64") else {
        return;
    };
    check_deb(&deb, "arm64", EM_AARCH64);
    let files = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(files.path()));
    let binary = files.path().join("usr/bin/talos-kms-server");
    let mut demo = Command::new("qemu-aarch64")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(&binary)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, out) = mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    // "#   PROGRAM client --endpoint URL --ca FILE roundtrip"
    let mut seen = Vec::new();
    let try_it = loop {
        let line = out
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the arm64 demo printed no client line: {seen:#?}"));
        if line.contains(" client --endpoint ") {
            break line;
        }
        seen.push(line);
    };
    let words: Vec<&str> = try_it.split_whitespace().collect();
    let after = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1];
    let output = run_limited(
        Command::new(BINARY).args([
            "client",
            "--endpoint",
            after("--endpoint"),
            "--ca",
            after("--ca"),
            "roundtrip",
        ]),
        Duration::from_secs(120),
    );
    signal(demo.id(), "TERM");
    let status = wait_exit(&mut demo, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "x86-64 client against the arm64 server: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    eprintln!("arm64 under qemu: {}", text(&output.stdout).trim());
    assert!(status.success(), "arm64 demo: {status}");
}

/// The release workflow cannot run here: it must at least parse, and build with the same
/// scripts/deb, cargo-deb and Containerfile as scripts/test and this folder.
#[test]
fn the_release_workflow_parses_and_matches_scripts_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workflow = root.join(".github/workflows/release.yml");
    let yaml = run_limited(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); \
             print(' '.join(sorted(d['jobs'])))",
            )
            .arg(&workflow),
        Duration::from_secs(60),
    );
    if text(&yaml.stderr).contains("No module named 'yaml'") {
        skip("PyYAML is not installed: the release workflow's YAML was not parsed");
    } else {
        assert!(yaml.status.success(), "{}", text(&yaml.stderr));
        assert_eq!(text(&yaml.stdout).trim(), "debs image release");
    }
    let workflow = std::fs::read_to_string(workflow).unwrap();
    let script = std::fs::read_to_string(root.join("scripts/deb")).unwrap();
    let install = "cargo install cargo-deb --locked --version 3.8.0";
    assert!(workflow.contains(install) && script.contains(install));
    let tests = std::fs::read_to_string(root.join("scripts/test")).unwrap();
    assert!(workflow.contains("run: scripts/deb ") && tests.contains("$(scripts/deb)"));
    assert!(workflow.contains("file: packaging/Containerfile"));
    assert!(packaging("Containerfile").is_file());
}

/// The legacy acme.sh hook shipped for existing renewals: a renewed plain key becomes the
/// encrypted PKCS#8 `serverKeyFile` that the config's password opens, and the server is
/// asked to reload.
#[test]
fn the_legacy_acme_hook_encrypts_the_renewed_key_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let pki = talos_kms_server::tls::throwaway::generate(&["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), &pki.chain_pem).unwrap();
    std::fs::write(dir.path().join("server.key.pem"), &pki.key_pem).unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "nodeDbFile: x.json\nserverCertFile: server.crt\nserverKeyFile: server.key\n\
         serverKeyPassword: \"s3cret pass\"   # the legacy default was changeit\n",
    )
    .unwrap();
    let reloaded = dir.path().join("reloaded");
    let status = Command::new(packaging("lib/acmeReload.sh"))
        .env("KMS_CONFIG_DIR", dir.path())
        .env(
            "KMS_RELOAD_COMMAND",
            format!("touch {}", reloaded.display()),
        )
        .status()
        .unwrap();
    assert!(status.success());
    assert!(reloaded.exists(), "the server is asked to reload");
    let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
    assert!(key.contains("ENCRYPTED PRIVATE KEY"), "{key}");
    assert!(!dir.path().join("server.key.new").exists());
    talos_kms_server::tls::load_identity(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
        Some("s3cret pass"),
    )
    .expect("the config's password opens the converted key");
}
