//! The local admin socket of a sealed server (`keySource: shamir`), through which
//! `unseal-server` gives operators' shares: a Unix domain socket, never TCP, mode 0600 and
//! owned by the service user; a peer of another uid than the server's (or root) is refused
//! by its credentials too. One line in, one line out: `share TEXT`, `start-over`,
//! `rotate-data-key`, `rotate-root`, `destroy-data-key VERSION [shred]` or
//! `status`, answered as [`Answer::line`].

use super::CustodyError;
use super::unsealing::{Answer, Unsealing};
use crate::audit::{AuditLog, Event, Reason};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroizing;

/// A share's line is about 110 bytes.
const MAX_LINE: usize = 1024;
/// `unseal-server` reads the share before it connects: a request arrives at once.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The last share's answer waits for the data keys and the legacy take-over.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

pub struct AdminSocket {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket's file, removed when the server stops (unless another has replaced it).
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the socket at `path`, replacing only a socket that nothing listens on.
pub fn bind(path: &Path) -> Result<AdminSocket, CustodyError> {
    let fail = |problem: String| {
        CustodyError::Source(format!(
            "admin socket {} (`adminSocket`): {problem}",
            path.display()
        ))
    };
    remove_stale(path).map_err(fail)?;
    let address = socket2::SockAddr::unix(path).map_err(|_| {
        fail(format!(
            "{} bytes is too long for a Unix socket's path (at most 107): choose a shorter one",
            path.as_os_str().len()
        ))
    })?;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(|e| fail(crate::os_error::plain(&e)))?;
    socket.bind(&address).map_err(|e| {
        fail(format!(
            "cannot create it: {} (choose a directory the service user may write)",
            crate::os_error::plain(&e)
        ))
    })?;
    let metadata = std::fs::symlink_metadata(path).map_err(|e| fail(e.to_string()))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id: (metadata.dev(), metadata.ino()),
    };
    // Before listen: until then a connection is refused, so none comes through wider modes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(format!("cannot make it 0600: {e}")))?;
    socket
        .listen(16)
        .and_then(|()| socket.set_nonblocking(true))
        .map_err(|e| fail(crate::os_error::plain(&e)))?;
    let listener = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
    let listener = UnixListener::from_std(listener).map_err(|e| fail(e.to_string()))?;
    Ok(AdminSocket { listener, file })
}

/// A socket left by a server that was killed is removed; anything else is left alone.
fn remove_stale(path: &Path) -> Result<(), String> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(
            "something other than a socket is there: move it away, or set \
                    `adminSocket` to another path"
                .into(),
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err("another server answers on it: is this one running already?".into()),
        Err(_) => std::fs::remove_file(path)
            .map_err(|e| format!("a stale socket is there and cannot be removed: {e}")),
    }
}

impl AdminSocket {
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Answers requests until the returned handle is dropped.
    pub fn serve(self, unsealing: Arc<Unsealing>, audit: Arc<AuditLog>) -> Serving {
        let listener = self.listener;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(answer(stream, Arc::clone(&unsealing), Arc::clone(&audit)));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "admin socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Serving {
            task,
            _file: self.file,
        }
    }
}

/// The admin socket being served; dropping it stops serving and removes the socket.
pub struct Serving {
    task: tokio::task::JoinHandle<()>,
    _file: SocketFile,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: UnixStream, unsealing: Arc<Unsealing>, audit: Arc<AuditLog>) {
    let uid = match stream.peer_cred() {
        Ok(credentials) => credentials.uid(),
        Err(error) => {
            tracing::warn!(%error, "admin socket: the peer's credentials cannot be read");
            return;
        }
    };
    let own = rustix::process::geteuid().as_raw();
    // Read before any answer, so that a refused client is not cut off while it writes.
    let request_line = read_line(&mut stream).await;
    let (request, answer) = if uid != own && uid != 0 {
        (
            "",
            Answer::Refused(format!(
                "only the server's user (uid {own}) and root may use this socket; you are uid \
                 {uid}"
            )),
        )
    } else {
        match request_line {
            Ok(line) => match std::str::from_utf8(&line) {
                Ok(text) => request(&unsealing, text).await,
                Err(_) => ("", Answer::Refused("the request is not text".into())),
            },
            Err(problem) => ("", Answer::Refused(problem)),
        }
    };
    let line = answer.line();
    if request != "status" {
        let line = answer.public_line();
        tracing::info!(uid, answer = %line, "unseal-server");
        let args: Vec<String> = [request]
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| r.to_string())
            .collect();
        let mut event = Event::admin("unseal-server", &args).detail(&line);
        event.user = Some(format!("uid {uid}"));
        if matches!(answer, Answer::Refused(_)) {
            event = event.refused(Reason::Invalid);
        }
        if let Err(error) = audit.write(&event) {
            tracing::error!(%error, "the unseal-server request's audit line was not written");
        }
    }
    let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
}

/// The request's kind (for the log and the audit trail: never the share) and its answer.
async fn request(unsealing: &Unsealing, text: &str) -> (&'static str, Answer) {
    if let Some(share) = text.strip_prefix("share ") {
        ("share", unsealing.give(share).await)
    } else if text == "start-over" {
        ("start-over", unsealing.start_over().await)
    } else if text == "status" {
        ("status", unsealing.status().await)
    } else if text == "rotate-data-key" {
        ("rotate-data-key", unsealing.rotate_data_key().await)
    } else if text == "rotate-root" {
        ("rotate-root", unsealing.rotate_root().await)
    } else if let Some(args) = text.strip_prefix("destroy-data-key ") {
        let (version, shred) = match args.split_once(' ') {
            Some((version, "shred")) => (version, true),
            _ => (args, false),
        };
        match version.parse() {
            Ok(version) => (
                "destroy-data-key",
                unsealing.destroy_data_key(version, shred).await,
            ),
            Err(_) => ("", Answer::Refused("not a data key version".into())),
        }
    } else {
        (
            "",
            Answer::Refused(
                "not a request of this socket: `talos-kms-server unseal-server` speaks to it"
                    .into(),
            ),
        )
    }
}

/// One line, without its newline, in memory that is zeroed when dropped.
async fn read_line(stream: &mut UnixStream) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut buffer = Zeroizing::new(vec![0u8; MAX_LINE]);
    let mut filled = 0;
    let reading = async {
        loop {
            let read = stream
                .read(&mut buffer[filled..])
                .await
                .map_err(|e| e.to_string())?;
            filled += read;
            if let Some(end) = buffer[..filled].iter().position(|b| *b == b'\n') {
                return Ok(end);
            }
            if read == 0 {
                return Ok(filled);
            }
            if filled == MAX_LINE {
                return Err(format!("the request is longer than {MAX_LINE} bytes"));
            }
        }
    };
    let end = tokio::time::timeout(REQUEST_TIMEOUT, reading)
        .await
        .map_err(|_| format!("no request within {} s", REQUEST_TIMEOUT.as_secs()))??;
    buffer.truncate(end);
    Ok(buffer)
}

/// The client's side: sends one request line and returns the answer line.
pub fn ask(path: &Path, request: &[u8]) -> Result<String, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => {
                "it does not exist: is the server running with this config, and sealed \
                 (`systemctl status talos-kms-server`)?"
                    .to_string()
            }
            std::io::ErrorKind::ConnectionRefused => {
                "nothing listens on it: the server that made it has stopped".to_string()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied: run this as the server's user (e.g. `sudo -u talos-kms \
                 talos-kms-server unseal-server ...`) or as root"
                    .to_string()
            }
            _ => crate::os_error::plain(&e),
        };
        format!(
            "cannot reach the server's admin socket {}: {why}",
            path.display()
        )
    })?;
    let mut line = Zeroizing::new(Vec::with_capacity(request.len() + 1));
    line.extend_from_slice(request);
    line.push(b'\n');
    let mut answer = String::new();
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.write_all(&line))
        .and_then(|()| {
            (&stream)
                .take(MAX_LINE as u64)
                .read_to_string(&mut answer)
                .map(|_| ())
        })
        .map_err(|e| format!("the server's admin socket {}: {e}", path.display()))?;
    match answer.lines().next() {
        Some(first) if !first.is_empty() => Ok(first.to_string()),
        _ => Err(format!(
            "the server closed its admin socket {} without an answer",
            path.display()
        )),
    }
}
