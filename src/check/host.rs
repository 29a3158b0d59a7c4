//! What `check` asks of the host: file modes, the port, and whether the database can live
//! where the config puts it.

use super::{Level, Report};
use crate::os_error;
use crate::server::{Purpose, describe_bind_error};
use std::fs::Metadata;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The system user the README and the package create to run the server.
const SERVICE_USER: &str = "talos-kms";

/// Warns when every user of the host may read a file that holds a secret or names one.
pub fn readable_by_others(report: &mut Report, topic: &'static str, path: &Path) {
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o004 != 0
    {
        report.add(
            topic,
            Level::Warning,
            format!(
                "{} is readable by every user of this host (mode {:o}); `chmod 600` it, or \
                 640 with the service user's group",
                path.display(),
                metadata.permissions().mode() & 0o777
            ),
        );
    }
}

/// Binds the port for a moment, as `serve` would, to learn whether it can.
pub fn listen(report: &mut Report, addr: SocketAddr, purpose: Purpose) {
    let topic = match purpose {
        Purpose::Kms => "listen",
        Purpose::Metrics => "metrics",
    };
    if addr.port() == 0 {
        report.add(topic, Level::Ok, format!("{addr}: any free port"));
        return;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => {
            report.add(topic, Level::Ok, format!("{addr}: free"));
            if addr.port() < 1024 && rustix::process::geteuid().is_root() {
                report.add(
                    topic,
                    Level::Info,
                    "checked as root: a service user needs the CAP_NET_BIND_SERVICE \
                     capability for a port below 1024",
                );
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => report.add(
            topic,
            Level::Warning,
            format!(
                "{addr}: in use; if that is this server running, fine; otherwise `serve` \
                 fails: {}",
                describe_bind_error(addr, purpose, &error)
            ),
        ),
        Err(error) => report.add(
            topic,
            Level::Problem,
            format!(
                "{addr}: `serve` cannot listen there: {}",
                describe_bind_error(addr, purpose, &error)
            ),
        ),
    }
}

/// Reports whether the database can live at `path`: a real file system, and a directory the
/// server's user may write (SQLite writes `-wal` and `-shm` files beside the database).
/// False when it cannot.
pub fn database_location(report: &mut Report, path: &Path) -> bool {
    if let Some(file) = file_above(path) {
        report.add(
            "database",
            Level::Problem,
            format!(
                "{}: {} is a file, not a directory, so nothing can be created under it; set \
                 `database` to a path in a directory",
                path.display(),
                file.display()
            ),
        );
        return false;
    }
    let Some(existing) = nearest_existing(path) else {
        report.add(
            "database",
            Level::Problem,
            format!("{}: no directory of this path exists", path.display()),
        );
        return false;
    };
    if let Some(kind) = pseudo_file_system(&existing) {
        report.add(
            "database",
            Level::Problem,
            format!(
                "{} is on {kind}, where no file can be created; set `database` to a path such \
                 as /var/lib/talos-kms-server/talos-kms-server.db",
                path.display()
            ),
        );
        return false;
    }
    if is_tmpfs(&existing) {
        report.add(
            "database",
            Level::Warning,
            format!(
                "{} is on a tmpfs (memory): every record is lost at the next reboot, and with \
                 it every disk that only has a KMS key",
                path.display()
            ),
        );
    }
    let user = ServiceUser::find();
    let mut writable = true;
    for target in [Some(existing.as_path()), path.exists().then_some(path)]
        .into_iter()
        .flatten()
    {
        if let Some(why) = user.cannot_write(target) {
            writable = false;
            report.add(
                "database",
                Level::Problem,
                format!(
                    "{}: {} cannot write {} ({why}); `serve` would fail to {}",
                    path.display(),
                    user.name,
                    target.display(),
                    if path.exists() {
                        "write it"
                    } else {
                        "create it"
                    }
                ),
            );
        }
    }
    writable
}

/// Root may write anywhere: its findings say nothing of the service user's permissions.
pub fn note_if_checked_as_root(report: &mut Report) {
    if ServiceUser::find().is_root {
        report.add(
            "database",
            Level::Info,
            "checked as root, who may write anywhere: run `check` as the user the service runs \
             as to check its permissions",
        );
    }
}

/// A file (not a directory) where the path needs a directory.
pub fn file_above(path: &Path) -> Option<&Path> {
    path.ancestors()
        .skip(1)
        .filter(|p| !p.as_os_str().is_empty())
        .find(|p| p.metadata().is_ok_and(|m| !m.is_dir()))
}

fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty());
    let mut at = Some(directory.unwrap_or(Path::new(".")));
    while let Some(candidate) = at {
        if candidate.is_dir() {
            return Some(candidate.to_path_buf());
        }
        at = candidate.parent();
    }
    None
}

fn pseudo_file_system(path: &Path) -> Option<&'static str> {
    use rustix::fs::{FsWord, PROC_SUPER_MAGIC};
    const SYSFS_MAGIC: FsWord = 0x6265_6572;
    const CGROUP2_MAGIC: FsWord = 0x6367_7270;
    const DEVPTS_MAGIC: FsWord = 0x1cd1;
    match rustix::fs::statfs(path).ok()?.f_type {
        PROC_SUPER_MAGIC => Some("/proc (a kernel file system)"),
        SYSFS_MAGIC => Some("/sys (a kernel file system)"),
        CGROUP2_MAGIC => Some("a cgroup file system"),
        DEVPTS_MAGIC => Some("a devpts file system"),
        _ => None,
    }
}

fn is_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: rustix::fs::FsWord = 0x0102_1994;
    rustix::fs::statfs(path).is_ok_and(|fs| fs.f_type == TMPFS_MAGIC)
}

/// Who `serve` will run as: this user, unless `check` runs as root on a host where the
/// service user exists.
struct ServiceUser {
    name: String,
    uid: u32,
    gid: u32,
    is_root: bool,
}

impl ServiceUser {
    fn find() -> Self {
        let euid = rustix::process::geteuid();
        if euid.is_root()
            && let Some((uid, gid)) = passwd_entry(SERVICE_USER)
        {
            return Self {
                name: format!("the service user {SERVICE_USER}"),
                uid,
                gid,
                is_root: false,
            };
        }
        Self {
            name: if euid.is_root() {
                "root".into()
            } else {
                "this user".into()
            },
            uid: euid.as_raw(),
            gid: rustix::process::getegid().as_raw(),
            is_root: euid.is_root(),
        }
    }

    /// Why the user cannot write `path`, if it cannot.
    fn cannot_write(&self, path: &Path) -> Option<String> {
        use rustix::fs::{StatVfsMountFlags, statvfs};
        if statvfs(path).is_ok_and(|fs| fs.f_flag.contains(StatVfsMountFlags::RDONLY)) {
            return Some("a read-only file system".into());
        }
        let own_user = self.uid == rustix::process::geteuid().as_raw();
        if own_user {
            // The kernel's own answer, ACLs and supplementary groups included.
            return rustix::fs::access(path, rustix::fs::Access::WRITE_OK)
                .err()
                .map(|e| os_error::plain(&e.into()));
        }
        let metadata = std::fs::metadata(path).ok()?;
        (!mode_allows_writing(&metadata, self.uid, self.gid)).then(|| {
            format!(
                "owner {}:{}, mode {:o}",
                metadata.uid(),
                metadata.gid(),
                metadata.mode() & 0o777
            )
        })
    }
}

fn mode_allows_writing(metadata: &Metadata, uid: u32, gid: u32) -> bool {
    let mode = metadata.mode();
    if metadata.uid() == uid {
        mode & 0o200 != 0
    } else if metadata.gid() == gid {
        mode & 0o020 != 0
    } else {
        mode & 0o002 != 0
    }
}

/// uid and gid of `name` in /etc/passwd.
fn passwd_entry(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        let uid = fields.nth(1)?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}
