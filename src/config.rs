//! The config file: YAML with the legacy server's camelCase keys, all honoured, plus
//! `database`. Relative paths are taken relative to the config file's directory.

use crate::audit::Rotation;
use crate::custody::{self, Credential, KeySourceConfig};
use crate::listener::ListenerLimits;
use crate::logging::LogLevel;
use crate::policy::{Mode, Networks, RateLimit, Rules};
use crate::sealing::foreign::{AesKey, GustinnKeys, Scheme, TakeOver};
pub use crate::store::Database;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

pub const DEFAULT_PORT: u16 = 50051;
/// The embedded database's file name when `database` is not set: beside `nodeDbFile`, where
/// the legacy package already lets the service write.
pub const DEFAULT_DATABASE_NAME: &str = "talos-kms-server.db";
/// The audit trail's file name when `auditLog` is not set: beside the database.
pub const DEFAULT_AUDIT_LOG_NAME: &str = "talos-kms-server-audit.jsonl";
/// Where the audit trail goes when the database is PostgreSQL and neither `auditLog` nor
/// `nodeDbFile` says: the packaged unit's state directory.
pub const DEFAULT_STATE_DIRECTORY: &str = "/var/lib/talos-kms-server";
/// The admin socket's file name when `adminSocket` is not set: beside the database.
pub const DEFAULT_ADMIN_SOCKET_NAME: &str = "talos-kms-server-admin.sock";

/// Written where `--config` points when no file is there, as the legacy server did.
pub const DEFAULT_CONFIG: &str = r#"# talos-kms-server configuration. Edit it, then start the server again.
# Relative paths are taken relative to this file's directory.

# The legacy server's JSON database. When it exists, its records are imported into
# `database` at start-up (only those not present yet); the file itself is never modified.
nodeDbFile: "/etc/talos-kms-server/nodeDbFile.json"

# The embedded SQLite database holding every sealed record. Back it up: losing it means
# losing every disk that only has a KMS key. Without this key it is talos-kms-server.db
# beside nodeDbFile, as a legacy config (which has no `database`) expects.
database: "/var/lib/talos-kms-server/talos-kms-server.db"
# Or a PostgreSQL database that several replicas share (README, "PostgreSQL"). Create the
# database first, owned by the server's user; the server makes its tables. sslmode is one
# of disable, prefer (the default), require, verify-ca, verify-full; sslrootcert names the
# CA's PEM file (the public roots otherwise); pool_max_size bounds the connections (16).
# The password comes from passwordFile (keep it 0600), else PGPASSWORD: not from this file.
# database: "postgres://kms@db.example.com:5432/kms?sslmode=verify-full"
# passwordFile: "/etc/talos-kms-server/postgres-password"

# The audit trail: one JSON line per seal, unseal and admin action (`talos-kms-server audit`
# reads it). Calls are refused while it cannot be written. Default: beside the database.
# auditLog: "/var/lib/talos-kms-server/talos-kms-server-audit.jsonl"
# auditLogMaxMiB: 100   # past this size it is renamed to .1 (.1 to .2...) and a new one begun
# auditLogKeep: 10      # rotated files kept
# auditKeyFile: "/etc/talos-kms-server/audit.key"  # keys the trail's checkpoints
#                        # (`talos-kms-server audit init-key` makes it); `audit verify` checks

# Prometheus metrics at http://ADDRESS/metrics; off unless set. Keep it off the nodes'
# network (e.g. loopback, scraped through a local agent).
# metricsAddress: "127.0.0.1:9650"

# PEM certificate, followed by its chain. Talos nodes must trust it with their built-in
# public CA bundle to unlock STATE (a TrustedRootsConfig lives inside STATE itself).
serverCertFile: "/etc/talos-kms-server/server.crt"
# PEM private key: PKCS#8 (encrypted with serverKeyPassword, or plain), PKCS#1 RSA or SEC1 EC.
serverKeyFile: "/etc/talos-kms-server/server.key"
# Password of an encrypted PKCS#8 key; leave empty for a plain key.
serverKeyPassword: ""

# Where to listen. "::" listens on IPv6 and IPv4.
port: 50051
bindAddress: "0.0.0.0"

# Who may seal and unseal (README, "Policy"). Anyone, by default; with both lists set, a
# connection from outside them is closed before TLS.
# sealAllowedNetworks: ["10.0.0.0/24", "fd00:10::/64"]
# unsealAllowedNetworks: ["10.0.0.0/24", "fd00:10::/64"]
# rateLimitPerAddress: {perSecond: 100, burst: 1000}   # perSecond: 0 turns a bucket off
# rateLimitGlobal: {perSecond: 5000, burst: 50000}
# maxRecordsPerNode: 1000        # 0: no limit
# maxNewRecordsPerHour: 20000    # 0: no limit
# sealPolicy: open     # open, window (`window open seal --for 30m`) or approve (`pending approve ID`)
# unsealPolicy: open
# pinNodeIp: false     # true: refuse a seal from a node UUID known from another address
# maxPendingApprovals: 1000

# Connections (README: "Connections and lockout"). A Talos call is one request on a fresh
# connection, so a connection that holds a slot without a call is closed for someone else.
# maxConnections: 1024          # at once; when all are taken, the one waiting longest on its
#                               # client is closed for a new one. Needs as many open files plus 64:
#                               # lowered, with a warning, when LimitNOFILE= is lower
# maxConnectionsPerAddress: 128 # one address's share (nodes behind a NAT share one)
# idleTimeout: 5s               # closed after waiting this long on the client, before or
#                               # after TLS; a call in flight is never cut
# handshakeTimeout: 10s         # Talos gives each call 10 s
# maxConnectionAge: 5m          # then asked to close (GOAWAY); calls in flight finish
# callTimeout: 30s              # a seal or unseal unanswered this long (its request never
#                               # finished) is answered DEADLINE_EXCEEDED; nodes give up sooner
# maxHandshakesAtOnce: 4        # TLS computations at once; default two per core
# maxStreamsPerConnection: 128  # calls at once on one connection (Talos makes one)
# maxHeaderListSize: 16384      # bytes of request headers; a gRPC call needs a few hundred
# maxMessageSize: 4096          # bytes of a request; a Seal needs under 300

# Behind a TCP load balancer (README: "Behind a load balancer"). The client's address is
# bound into every seal, so the balancer must pass it on in a PROXY protocol header (v1 or
# v2; HAProxy: `send-proxy-v2`). Only these addresses may send one, and every connection
# from them must begin with one; from anyone else a header closes the connection. The
# address it carries is then used for everything: seals, allow-lists, limits, the audit.
# trustedProxies: ["10.0.0.5/32"]   # none by default: no header is ever read

# Taking over from the reference KMS server of the makers of Talos (siderolabs/kms-client)
# or its fork gustinn/talos-kms (README, "Taking over from the reference server or
# gustinn/talos-kms"): Unseal also opens their blobs with their keys (raw 16, 24 or 32-byte
# AES key files, read at start); Seal always makes this server's own records. Each of their
# blobs is bound to the first node UUID and address that unseals it here.
# takeOver:
#   - {scheme: sidero-reference, keyFile: "/etc/talos-kms-server/reference.key"}
#   - {scheme: gustinn, keyDir: "/etc/talos-kms-server/gustinn-keys", ipBinding: false}
#   - {scheme: gustinn, keyFile: "/etc/talos-kms-server/gustinn.key", keyId: "v1", ipBinding: true}

# Key custody (README, "Key custody"): a root key outside the database wraps the records
# and authenticates the policy's state, so a copy of the database is worthless and an edit
# behind the server's back is refused. `talos-kms-server key-source init --config FILE`
# makes the key; an existing database is wrapped in the background while it serves.
# Relative paths are taken beside this file; a bare file name is looked up first in
# $CREDENTIALS_DIRECTORY (systemd LoadCredentialEncrypted=).
# keySource: {file: "root.key"}   # 32 random bytes, raw or base64 on one line, mode 0600
# keySource: {tpm2: {tcti: "device:/dev/tpmrm0", pcrs: [], sealedObject: "root-key.tpm2"}}
# keySource: {pkcs11: {module: "/usr/lib/softhsm/libsofthsm2.so", tokenLabel: "kms", keyLabel: "talos-kms-root", pinFile: "token-pin"}}
# keySource: {shamir: {threshold: 3, shares: 5}}   # starts sealed: see adminSocket
# With shamir the server starts sealed until operators give their shares with
# `talos-kms-server unseal-server --config FILE`, through this local socket (the service
# user and root only; never the network). Default: beside the database.
# adminSocket: "/var/lib/talos-kms-server/talos-kms-server-admin.sock"

# OFF, ERROR, WARN, INFO, DEBUG, TRACE (SEVERE, WARNING, FINE, FINER, FINEST also accepted).
kmsLogLevel: "INFO"   # this server's own messages
rootLogLevel: "WARNING" # everything else (TLS, HTTP/2 libraries)
"#;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    node_db_file: Option<PathBuf>,
    database: Option<String>,
    password_file: Option<PathBuf>,
    server_cert_file: Option<PathBuf>,
    server_key_file: Option<PathBuf>,
    server_key_password: Option<String>,
    port: Option<u16>,
    bind_address: Option<String>,
    kms_log_level: Option<String>,
    root_log_level: Option<String>,
    metrics_address: Option<String>,
    audit_log: Option<PathBuf>,
    #[serde(rename = "auditLogMaxMiB")]
    audit_log_max_mib: Option<u64>,
    audit_log_keep: Option<u32>,
    audit_key_file: Option<PathBuf>,
    // Policy: who may seal and unseal.
    seal_allowed_networks: Option<Vec<String>>,
    unseal_allowed_networks: Option<Vec<String>>,
    rate_limit_per_address: Option<RawRateLimit>,
    rate_limit_global: Option<RawRateLimit>,
    max_records_per_node: Option<u64>,
    max_new_records_per_hour: Option<u64>,
    seal_policy: Option<String>,
    unseal_policy: Option<String>,
    pin_node_ip: Option<bool>,
    max_pending_approvals: Option<u64>,
    // The listener's limits.
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_handshakes_at_once: Option<usize>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connection_age: Option<String>,
    call_timeout: Option<String>,
    max_streams_per_connection: Option<u32>,
    max_header_list_size: Option<u32>,
    max_message_size: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    take_over: Option<Vec<RawTakeOver>>,
    key_source: Option<serde_json::Value>,
    admin_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRateLimit {
    per_second: u32,
    burst: Option<u32>,
}

/// One `takeOver` entry, as written.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTakeOver {
    scheme: String,
    key_file: Option<PathBuf>,
    key_dir: Option<PathBuf>,
    key_id: Option<String>,
    ip_binding: Option<bool>,
}

/// A validated configuration.
pub struct Config {
    pub path: PathBuf,
    pub node_db_file: Option<PathBuf>,
    /// An SQLite file, or a PostgreSQL database (with its `passwordFile`).
    pub database: Database,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub server_key_password: Option<String>,
    pub listen: SocketAddr,
    pub kms_log_level: LogLevel,
    pub root_log_level: LogLevel,
    /// Where Prometheus metrics are served; none unless `metricsAddress` is set.
    pub metrics_address: Option<SocketAddr>,
    /// The audit trail: beside the database unless `auditLog` says otherwise.
    pub audit_log: PathBuf,
    pub audit_rotation: Rotation,
    /// The secret the audit trail's checkpoints are keyed with; unkeyed digests without it.
    pub audit_key_file: Option<PathBuf>,
    /// Who may seal and unseal.
    pub policy: Rules,
    pub limits: ListenerLimits,
    /// Keys of the servers taken over (`takeOver`), read at start.
    pub take_over: Arc<TakeOver>,
    /// What `check` says of each `takeOver` entry: scheme, file and key ids, never a key.
    pub take_over_sources: Vec<String>,
    /// Where the root key comes from; none: the split scheme alone protects the records.
    pub key_source: Option<KeySourceConfig>,
    /// The local socket `unseal-server` reaches a sealed server through: `adminSocket`, else
    /// beside the database (PostgreSQL: where the audit trail would go by default).
    pub admin_socket: PathBuf,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("node_db_file", &self.node_db_file)
            .field("database", &self.database)
            .field("server_cert_file", &self.server_cert_file)
            .field("server_key_file", &self.server_key_file)
            .field(
                "server_key_password",
                &self.server_key_password.as_ref().map(|_| "<redacted>"),
            )
            .field("listen", &self.listen)
            .field("audit_log", &self.audit_log)
            .field("key_source", &self.key_source)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no config file at {0}; a commented default was written there: edit it (certificate, \
         key, database) and start again"
    )]
    WroteDefault(PathBuf),
    #[error(
        "no config file at {0}; `talos-kms-server serve --config {0}` writes a commented \
         default there"
    )]
    Missing(PathBuf),
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl Config {
    /// Loads `path` for serving. A missing file gets the commented default written in its
    /// place and an error, like the legacy server.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match Self::read(path) {
            Err(ConfigError::Missing(_)) => {
                write_default(path).map_err(|e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problem: format!("does not exist, and writing a default there failed: {e}"),
                })?;
                Err(ConfigError::WroteDefault(path.to_path_buf()))
            }
            other => other,
        }
    }

    /// Loads `path`, writing nothing: for `check` and the other commands that only look.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Missing(path.to_path_buf()));
            }
            Err(e) => return Err(invalid(format!("cannot read it: {e}"))),
        };
        Self::parse(path, &text).map_err(invalid)
    }

    /// Parses config text; `path` locates relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, String> {
        Self::parse_text(path, text).map_err(|error| redact_password(&error, text))
    }

    fn parse_text(path: &Path, text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Err("is empty; see the commented default in the README".into());
        }
        let raw = parse_raw(text)?;
        let mut problems = Problems::default();
        let config = Self::validate(path, raw, &mut problems);
        match (config, problems.0.as_slice()) {
            (Some(config), []) => Ok(config),
            (_, [one]) => Err(one.clone()),
            (_, many) => Err(format!(
                "{} problems:\n  - {}",
                many.len(),
                many.join("\n  - ")
            )),
        }
    }

    /// Every check runs, so that one start names every problem of the file.
    fn validate(path: &Path, raw: RawConfig, problems: &mut Problems) -> Option<Config> {
        let policy = policy_rules(&raw, problems);
        let limits = listener_limits(&raw, problems);
        let base = path.parent().unwrap_or(Path::new("."));
        let key_source = problems.check(match &raw.key_source {
            None => Ok(None),
            Some(value) => key_source(value, base).map(Some),
        });
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let node_db_file = raw.node_db_file.map(resolve);
        let database = match (raw.database, &node_db_file) {
            (Some(database), _) => problems.check(Database::parse(&database, base)),
            (None, Some(legacy)) => Some(Database::Sqlite(
                legacy
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(DEFAULT_DATABASE_NAME),
            )),
            (None, None) => problems.check(Err(
                "set `database` (path of the embedded database, or a postgres:// URL) or \
                 `nodeDbFile`"
                    .into(),
            )),
        };
        let database = match (database, raw.password_file) {
            (Some(Database::Postgres(mut options)), Some(file)) => {
                if options.url_has_password() {
                    problems.check::<()>(Err(
                        "`database` holds a password and `passwordFile` is set too; keep only \
                         `passwordFile` (a config should not hold the password)"
                            .into(),
                    ));
                }
                options.password_file = Some(resolve(file));
                Some(Database::Postgres(options))
            }
            (Some(Database::Sqlite(_)), Some(_)) => problems.check(Err(
                "`passwordFile` is for a PostgreSQL `database` (postgres://...); an SQLite \
                 file has no password"
                    .into(),
            )),
            (database, _) => database,
        };
        if let (Some(Database::Sqlite(path)), Some(legacy)) = (&database, &node_db_file)
            && path == legacy
        {
            problems.check::<()>(Err(
                "`database` and `nodeDbFile` name the same file; the legacy JSON file is only \
                 read, so give the embedded database its own path"
                    .into(),
            ));
        }
        let mut required = |value: Option<PathBuf>, key: &str| {
            problems.check(value.map(resolve).ok_or_else(|| {
                format!(
                    "`{key}` is missing; it names the server's PEM {}",
                    if key == "serverCertFile" {
                        "certificate chain"
                    } else {
                        "private key"
                    }
                )
            }))
        };
        let server_cert_file = required(raw.server_cert_file, "serverCertFile");
        let server_key_file = required(raw.server_key_file, "serverKeyFile");
        let bind_address = raw.bind_address.unwrap_or_else(|| "0.0.0.0".into());
        let ip = problems.check(
            bind_address
                .trim_matches(['[', ']'])
                .parse::<IpAddr>()
                .map_err(|_| {
                    format!(
                        "bindAddress {bind_address:?} is not an IP address (e.g. 0.0.0.0, ::, \
                     127.0.0.1)"
                    )
                }),
        );
        let mut level = |value: Option<String>, key: &str, default: LogLevel| {
            problems.check(match value {
                None => Ok(default),
                Some(text) => text.parse().map_err(|e| format!("{key}: {e}")),
            })
        };
        let kms_log_level = level(raw.kms_log_level, "kmsLogLevel", LogLevel::Info);
        let root_log_level = level(raw.root_log_level, "rootLogLevel", LogLevel::Warn);
        let audit_log = match (raw.audit_log, &database, &node_db_file) {
            (Some(audit_log), _, _) => Some(resolve(audit_log)),
            (None, Some(Database::Sqlite(path)), _) => Some(
                path.parent()
                    .unwrap_or(Path::new("."))
                    .join(DEFAULT_AUDIT_LOG_NAME),
            ),
            (None, Some(Database::Postgres(_)), Some(legacy)) => Some(
                legacy
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(DEFAULT_AUDIT_LOG_NAME),
            ),
            (None, Some(Database::Postgres(_)), None) => {
                Some(Path::new(DEFAULT_STATE_DIRECTORY).join(DEFAULT_AUDIT_LOG_NAME))
            }
            (None, None, _) => None,
        };
        let beside = |file: &Path| file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let admin_socket = match (raw.admin_socket, &database, &node_db_file) {
            (Some(socket), _, _) => Some(resolve(socket)),
            (None, Some(Database::Sqlite(path)), _) => {
                Some(beside(path).join(DEFAULT_ADMIN_SOCKET_NAME))
            }
            (None, Some(Database::Postgres(_)), Some(legacy)) => {
                Some(beside(legacy).join(DEFAULT_ADMIN_SOCKET_NAME))
            }
            (None, Some(Database::Postgres(_)), None) => {
                Some(Path::new(DEFAULT_STATE_DIRECTORY).join(DEFAULT_ADMIN_SOCKET_NAME))
            }
            (None, None, _) => None,
        };
        let defaults = Rotation::default();
        let max_bytes = problems.check(match raw.audit_log_max_mib {
            Some(0) => Err("auditLogMaxMiB must be at least 1".into()),
            Some(mib) => Ok(mib.saturating_mul(1 << 20)),
            None => Ok(defaults.max_bytes),
        });
        let (take_over, take_over_sources) =
            take_over(raw.take_over.unwrap_or_default(), &resolve, problems);
        let metrics_address = problems.check(match raw.metrics_address {
            None => Ok(None),
            Some(text) => text.parse::<SocketAddr>().map(Some).map_err(|_| {
                format!(
                    "metricsAddress {text:?} is not an address and port (e.g. 127.0.0.1:9650, \
                     [::1]:9650)"
                )
            }),
        });
        Some(Config {
            path: path.to_path_buf(),
            policy: policy?,
            limits: limits?,
            key_source: key_source?,
            metrics_address: metrics_address?,
            audit_log: audit_log?,
            audit_key_file: raw.audit_key_file.map(resolve),
            audit_rotation: Rotation {
                max_bytes: max_bytes?,
                keep: raw.audit_log_keep.unwrap_or(defaults.keep),
            },
            server_cert_file: server_cert_file?,
            server_key_file: server_key_file?,
            server_key_password: raw.server_key_password.filter(|p| !p.is_empty()),
            node_db_file,
            database: database?,
            listen: SocketAddr::new(ip?, raw.port.unwrap_or(DEFAULT_PORT)),
            kms_log_level: kms_log_level?,
            root_log_level: root_log_level?,
            take_over: Arc::new(take_over),
            take_over_sources,
            admin_socket: admin_socket?,
        })
    }
}

/// Reads the keys of every `takeOver` entry; each problem names the entry, the file and the
/// fix, and the next entry is still read.
fn take_over(
    entries: Vec<RawTakeOver>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    problems: &mut Problems,
) -> (TakeOver, Vec<String>) {
    let mut take_over = TakeOver::default();
    let mut sources = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let name = format!("takeOver entry {}", index + 1);
        let Some(scheme) = Scheme::parse(&entry.scheme) else {
            problems.check::<()>(Err(format!(
                "{name}: scheme {:?} is not one of {}",
                entry.scheme,
                Scheme::NAMES.join(", ")
            )));
            continue;
        };
        let name = format!("{name} ({scheme})");
        match scheme {
            Scheme::SideroReference => {
                if entry.key_dir.is_some() || entry.key_id.is_some() || entry.ip_binding.is_some() {
                    problems.check::<()>(Err(format!(
                        "{name}: takes only keyFile (the reference server has one key and \
                         binds no address); remove keyDir, keyId and ipBinding"
                    )));
                    continue;
                }
                let Some(file) = entry.key_file.map(resolve) else {
                    problems.check::<()>(Err(format!(
                        "{name}: keyFile is missing; it names the file the reference server \
                         read its key from (its --key-file)"
                    )));
                    continue;
                };
                if let Some(key) = problems.check(read_key(&name, &file)) {
                    sources.push(format!(
                        "{scheme}: {} (AES-{} key)",
                        file.display(),
                        key.bits()
                    ));
                    take_over.reference.push(key);
                }
            }
            Scheme::Gustinn => {
                let Some(ip_binding) = entry.ip_binding else {
                    problems.check::<()>(Err(format!(
                        "{name}: ipBinding is missing; set it to true when that server ran \
                         with client IP binding, false otherwise (a wrong value opens none \
                         of its blobs)"
                    )));
                    continue;
                };
                let keys = match (entry.key_file, entry.key_dir, entry.key_id) {
                    (Some(file), None, Some(id)) => {
                        let file = resolve(file);
                        problems
                            .check(key_id(&name, &id))
                            .and_then(|()| problems.check(read_key(&name, &file)))
                            .map(|key| (file.display().to_string(), vec![(id, key)]))
                    }
                    (None, Some(dir), None) => {
                        let dir = resolve(dir);
                        problems
                            .check(read_key_dir(&name, &dir))
                            .map(|keys| (dir.display().to_string(), keys))
                    }
                    (Some(_), None, None) => problems.check(Err(format!(
                        "{name}: keyFile needs keyId, the key id that server was started with \
                         (it is written into every blob)"
                    ))),
                    (None, Some(_), Some(_)) => problems.check(Err(format!(
                        "{name}: keyDir takes no keyId: every file in it is a key and its name \
                         the key id; remove keyId"
                    ))),
                    _ => problems.check(Err(format!(
                        "{name}: give either keyDir (a directory of key files, one per key id) \
                         or keyFile with keyId"
                    ))),
                };
                if let Some((source, keys)) = keys {
                    let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
                    sources.push(format!(
                        "{scheme}: {source} (key ids {}; IP binding {})",
                        ids.join(", "),
                        if ip_binding { "on" } else { "off" }
                    ));
                    take_over.gustinn.push(GustinnKeys { keys, ip_binding });
                }
            }
        }
    }
    (take_over, sources)
}

/// A raw AES key file: 16, 24 or 32 bytes, as the servers taken over read them.
fn read_key(name: &str, file: &Path) -> Result<AesKey, String> {
    use std::io::Read;
    // A byte more than the longest key says "too long" without reading a huge file whole;
    // a fixed buffer, so that no copy of the key is left behind by a growing one.
    let mut buffer = Zeroizing::new([0u8; 33]);
    let mut len = 0;
    let cannot_read =
        |e: std::io::Error| format!("{name}: cannot read key file {}: {e}", file.display());
    let mut opened = std::fs::File::open(file).map_err(cannot_read)?;
    while len < buffer.len() {
        match opened.read(&mut buffer[len..]) {
            Ok(0) => break,
            Ok(read) => len += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(cannot_read(e)),
        }
    }
    let bytes = Zeroizing::new(buffer[..len].to_vec());
    let len = match bytes.len() {
        33 => "more than 32".to_string(),
        len => len.to_string(),
    };
    AesKey::new(bytes).ok_or_else(|| {
        format!(
            "{name}: key file {} holds {len} bytes; an AES key file holds exactly 16, 24 or 32 \
             raw bytes (the same file that server read: copy it unchanged, not as base64 or \
             hex, and without a newline added)",
            file.display()
        )
    })
}

/// A gustinn key id: 1 to 255 bytes, written into every blob.
fn key_id(name: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 255 {
        return Err(format!(
            "{name}: keyId {id:?} must be 1 to 255 bytes long, as that server required"
        ));
    }
    Ok(())
}

/// Every key of a gustinn key directory, named by file; dotfiles and directories (the
/// `..data` of a Kubernetes secret mount) are skipped, as that server skips them.
fn read_key_dir(name: &str, dir: &Path) -> Result<Vec<(String, AesKey)>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("{name}: cannot read key directory {}: {e}", dir.display()))?;
    let mut keys = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| format!("{name}: cannot read key directory {}: {e}", dir.display()))?;
        let path = entry.path();
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            return Err(format!(
                "{name}: {} is not a UTF-8 name, so it cannot be a key id; move it out of {}",
                path.display(),
                dir.display()
            ));
        };
        // Followed through symbolic links: Kubernetes mounts each key as a link.
        if id.starts_with('.') || path.is_dir() {
            continue;
        }
        keys.push((id, read_key(name, &path)?));
    }
    if keys.is_empty() {
        return Err(format!(
            "{name}: key directory {} holds no key file (dotfiles and directories are \
             skipped); copy that server's key files there, one per key id",
            dir.display()
        ));
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// `keySource`: one of `{file: PATH}`, `{tpm2: {...}}`, `{pkcs11: {...}}`, `{shamir: {...}}`.
fn key_source(value: &serde_json::Value, base: &Path) -> Result<KeySourceConfig, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    enum Raw {
        File(PathBuf),
        Tpm2(RawTpm2),
        Pkcs11(RawPkcs11),
        Shamir(RawShamir),
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct RawTpm2 {
        tcti: Option<String>,
        #[serde(default)]
        pcrs: Vec<u8>,
        sealed_object: Option<PathBuf>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct RawPkcs11 {
        module: PathBuf,
        token_label: String,
        key_label: String,
        pin_file: PathBuf,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawShamir {
        threshold: u8,
        shares: u8,
    }
    let forms = "keySource takes one of {file: PATH}, {tpm2: {tcti: TCTI, pcrs: [7], \
                 sealedObject: PATH}}, {pkcs11: {module: PATH, tokenLabel: L, keyLabel: K, \
                 pinFile: PATH}} or {shamir: {threshold: M, shares: N}}";
    let raw: Raw = serde_json::from_value(value.clone())
        .map_err(|e| format!("{forms}; here: {}", e.to_string().replace('`', "")))?;
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    Ok(match raw {
        Raw::File(path) => KeySourceConfig::File(Credential::new(&path, base)),
        Raw::Tpm2(tpm2) => {
            if let Some(pcr) = tpm2.pcrs.iter().find(|pcr| **pcr > 23) {
                return Err(format!(
                    "keySource tpm2: PCR {pcr} does not exist (0 to 23)"
                ));
            }
            KeySourceConfig::Tpm2 {
                tcti: tpm2.tcti.unwrap_or_else(|| custody::DEFAULT_TCTI.into()),
                pcrs: tpm2.pcrs,
                sealed_object: resolve(
                    tpm2.sealed_object
                        .unwrap_or_else(|| custody::DEFAULT_SEALED_OBJECT.into()),
                ),
            }
        }
        Raw::Pkcs11(pkcs11) => KeySourceConfig::Pkcs11 {
            module: resolve(pkcs11.module),
            token_label: pkcs11.token_label,
            key_label: pkcs11.key_label,
            pin_file: Credential::new(&pkcs11.pin_file, base),
        },
        Raw::Shamir(RawShamir { threshold, shares }) => {
            if threshold < 2 || threshold > shares {
                return Err(format!(
                    "keySource shamir: threshold {threshold} of {shares} shares: the threshold \
                     must be at least 2 and at most the number of shares (e.g. 3 of 5)"
                ));
            }
            KeySourceConfig::Shamir { threshold, shares }
        }
    })
}

/// Problems found so far; each check adds its own and the next check still runs.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, result: Result<T, String>) -> Option<T> {
        result.map_err(|problem| self.0.push(problem)).ok()
    }
}

/// The file as typed keys. When a value has the wrong type, every key is tried on its own,
/// so that all of them are named at once, each with what it takes.
fn parse_raw(text: &str) -> Result<RawConfig, String> {
    // Without the source snippet: it would quote neighbouring lines, such as the password.
    let whole = match serde_saphyr::from_str::<RawConfig>(text) {
        Ok(raw) => return Ok(raw),
        Err(e) => e.without_snippet().to_string(),
    };
    let Ok(keys) = serde_saphyr::from_str::<serde_json::Map<String, serde_json::Value>>(text)
    else {
        return Err(whole);
    };
    let problems: Vec<String> = keys
        .into_iter()
        .filter_map(|(key, value)| {
            let mut alone = serde_json::Map::new();
            alone.insert(key.clone(), value.clone());
            let error =
                serde_json::from_value::<RawConfig>(serde_json::Value::Object(alone)).err()?;
            Some(explain_type_error(&key, &value, &error.to_string()))
        })
        .collect();
    match problems.as_slice() {
        [] => Err(whole),
        [one] => Err(one.clone()),
        many => Err(format!(
            "{} problems:\n  - {}",
            many.len(),
            many.join("\n  - ")
        )),
    }
}

/// What a key takes, in words, from serde's account of what it expected.
fn explain_type_error(key: &str, value: &serde_json::Value, error: &str) -> String {
    if error.starts_with("unknown field") {
        return format!(
            "`{key}` is not a config key; the commented default (`serve --config NEW_FILE` \
             writes one) lists them all"
        );
    }
    let wanted = if key == "port" {
        "a port number from 1 to 65535 (0: any free port)".to_string()
    } else if error.contains("expected u16") {
        "a whole number from 0 to 65535".to_string()
    } else if error.contains("expected u32") {
        "a whole number from 0 to 4294967295".to_string()
    } else if error.contains("expected u64") || error.contains("expected usize") {
        "a whole number, 0 or more".to_string()
    } else if error.contains("expected a boolean") {
        "true or false".to_string()
    } else if error.contains("expected a string") {
        "text".to_string()
    } else if error.contains("expected a sequence") {
        "a list, e.g. [\"10.0.0.0/24\"]".to_string()
    } else {
        return format!("`{key}`: {error}");
    };
    // The value itself is not quoted for the password's key.
    let shown = if key == "serverKeyPassword" {
        "this value".to_string()
    } else {
        value.to_string()
    };
    format!("`{key}`: {shown} is not {wanted}")
}

/// An error may quote any value, and a broken quote can make the password part of another
/// value: every word of the `serverKeyPassword` line is taken out.
fn redact_password(error: &str, text: &str) -> String {
    let mut lines = text.lines();
    let mut redacted = error.to_string();
    while let Some(line) = lines.next() {
        let Some((_, value)) = line.trim_start().split_once("serverKeyPassword") else {
            continue;
        };
        let value = value.trim_start_matches([':', ' ', '\t']);
        let value = if value.trim().is_empty() {
            lines.next().unwrap_or_default()
        } else {
            value
        };
        for word in value
            .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .filter(|word| word.len() >= 3)
        {
            redacted = redacted.replace(word, "<redacted>");
        }
    }
    redacted
}

fn policy_rules(raw: &RawConfig, problems: &mut Problems) -> Option<Rules> {
    let defaults = Rules::default();
    let networks = |list: &Option<Vec<String>>, key: &str| match list {
        None => Ok(None),
        Some(list) if list.is_empty() => Err(format!(
            "{key} is empty, which would refuse everyone; remove the key to allow any address"
        )),
        Some(list) => Networks::parse(list)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
    };
    let rate = |raw: &Option<RawRateLimit>, default: RateLimit, key: &str| match raw {
        None => Ok(default),
        Some(RawRateLimit { per_second, burst }) => {
            let burst = burst.unwrap_or(*per_second);
            if *per_second > 0 && burst < *per_second {
                return Err(format!(
                    "{key}: burst {burst} is below perSecond {per_second}; a burst holds at \
                     least one second of calls"
                ));
            }
            Ok(RateLimit {
                per_second: *per_second,
                burst,
            })
        }
    };
    let mode = |raw: &Option<String>, key: &str| match raw {
        None => Ok(Mode::Open),
        Some(text) => Mode::parse(text)
            .ok_or_else(|| format!("{key} {text:?} is not a policy: use open, window or approve")),
    };
    let seal_networks = problems.check(networks(&raw.seal_allowed_networks, "sealAllowedNetworks"));
    let unseal_networks = problems.check(networks(
        &raw.unseal_allowed_networks,
        "unsealAllowedNetworks",
    ));
    let per_address = problems.check(rate(
        &raw.rate_limit_per_address,
        defaults.per_address,
        "rateLimitPerAddress",
    ));
    let global = problems.check(rate(
        &raw.rate_limit_global,
        defaults.global,
        "rateLimitGlobal",
    ));
    let seal = problems.check(mode(&raw.seal_policy, "sealPolicy"));
    let unseal = problems.check(mode(&raw.unseal_policy, "unsealPolicy"));
    let max_pending = problems.check(match raw.max_pending_approvals {
        Some(0) => Err("maxPendingApprovals must be at least 1".into()),
        Some(max) => Ok(max),
        None => Ok(defaults.max_pending),
    });
    Some(Rules {
        seal_networks: seal_networks?,
        unseal_networks: unseal_networks?,
        per_address: per_address?,
        global: global?,
        max_records_per_node: raw
            .max_records_per_node
            .unwrap_or(defaults.max_records_per_node),
        max_new_records_per_hour: raw
            .max_new_records_per_hour
            .unwrap_or(defaults.max_new_records_per_hour),
        seal: seal?,
        unseal: unseal?,
        pin_node_ip: raw.pin_node_ip.unwrap_or(defaults.pin_node_ip),
        max_pending: max_pending?,
    })
}

fn listener_limits(raw: &RawConfig, problems: &mut Problems) -> Option<ListenerLimits> {
    let defaults = ListenerLimits::default();
    let duration = |text: &Option<String>, key: &str, default: Duration| match text {
        None => Ok(default),
        Some(text) => match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            _ => Err(format!(
                "{key} {text:?} is not a duration above zero (e.g. 500ms, 10s, 5m)"
            )),
        },
    };
    let at_least_one = |value: Option<usize>, key: &str, default: usize| match value {
        Some(0) => Err(format!("{key} must be at least 1")),
        Some(value) => Ok(value),
        None => Ok(default),
    };
    let max_message_size = problems.check(
        at_least_one(
            raw.max_message_size,
            "maxMessageSize",
            defaults.max_message_size,
        )
        .and_then(|size| {
            if size < 1024 {
                Err(format!(
                    "maxMessageSize {size} is too small for a Seal of a 256-byte passphrase; \
                     use at least 1024"
                ))
            } else {
                Ok(size)
            }
        }),
    );
    let max_connections = problems.check(at_least_one(
        raw.max_connections,
        "maxConnections",
        defaults.max_connections,
    ));
    let max_connections_per_address = problems.check(at_least_one(
        raw.max_connections_per_address,
        "maxConnectionsPerAddress",
        defaults.max_connections_per_address,
    ));
    let max_handshakes_at_once = problems.check(match raw.max_handshakes_at_once {
        Some(0) => Err("maxHandshakesAtOnce must be at least 1".into()),
        other => Ok(other),
    });
    let handshake_timeout = problems.check(duration(
        &raw.handshake_timeout,
        "handshakeTimeout",
        defaults.handshake_timeout,
    ));
    let idle_timeout = problems.check(duration(
        &raw.idle_timeout,
        "idleTimeout",
        defaults.idle_timeout,
    ));
    let max_connection_age = problems.check(duration(
        &raw.max_connection_age,
        "maxConnectionAge",
        defaults.max_connection_age,
    ));
    let call_timeout = problems.check(duration(
        &raw.call_timeout,
        "callTimeout",
        defaults.call_timeout,
    ));
    let max_streams_per_connection = problems.check(match raw.max_streams_per_connection {
        Some(0) => Err("maxStreamsPerConnection must be at least 1".into()),
        Some(streams) => Ok(streams),
        None => Ok(defaults.max_streams_per_connection),
    });
    let max_header_list_size = problems.check(match raw.max_header_list_size {
        Some(size) if size < 1024 => Err(format!(
            "maxHeaderListSize {size} is too small for a gRPC call's headers; use at least 1024"
        )),
        Some(size) => Ok(size),
        None => Ok(defaults.max_header_list_size),
    });
    let trusted_proxies = problems.check(match &raw.trusted_proxies {
        None => Ok(Networks::default()),
        Some(list) => Networks::parse(list).map_err(|e| format!("trustedProxies: {e}")),
    });
    Some(ListenerLimits {
        max_connections: max_connections?,
        max_connections_per_address: max_connections_per_address?,
        max_handshakes_at_once: max_handshakes_at_once?,
        handshake_timeout: handshake_timeout?,
        idle_timeout: idle_timeout?,
        max_connection_age: max_connection_age?,
        call_timeout: call_timeout?,
        max_streams_per_connection: max_streams_per_connection?,
        max_header_list_size: max_header_list_size?,
        max_message_size: max_message_size?,
        trusted_proxies: trusted_proxies?,
    })
}

fn write_default(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    // create_new: never overwrite a file that appeared meanwhile. 0600: it will hold the
    // key's password.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(DEFAULT_CONFIG.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/talos-kms-server/config.yaml"), text)
    }

    #[test]
    fn the_default_config_is_valid() {
        let config = parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(
            config.database.sqlite_path(),
            Some(Path::new("/var/lib/talos-kms-server/talos-kms-server.db"))
        );
        assert_eq!(config.server_key_password, None);
        assert_eq!(config.root_log_level, LogLevel::Warn);
    }

    #[test]
    fn the_commented_policy_values_are_the_defaults() {
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|line| {
                let keys = [
                    "rateLimit",
                    "maxRecords",
                    "maxNew",
                    "sealPolicy",
                    "unsealPolicy",
                    "pinNodeIp",
                    "maxPending",
                ];
                match line.strip_prefix("# ") {
                    Some(rest) if keys.iter().any(|key| rest.starts_with(key)) => rest,
                    _ => line,
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(uncommented.contains("\nrateLimitGlobal"));
        assert_eq!(parse(&uncommented).unwrap().policy, Rules::default());
    }

    #[test]
    fn the_admin_socket_is_beside_the_database_unless_set() {
        let commented = DEFAULT_CONFIG
            .lines()
            .find_map(|line| line.strip_prefix("# adminSocket: "))
            .unwrap();
        let default = parse(DEFAULT_CONFIG).unwrap().admin_socket;
        assert_eq!(default, Path::new(commented.trim_matches('"')));
        let postgres = parse(&DEFAULT_CONFIG.replace(
            "database: \"/var/lib/talos-kms-server/talos-kms-server.db\"",
            "database: \"postgres://kms@db/kms\"",
        ))
        .unwrap();
        assert_eq!(
            postgres.admin_socket,
            Path::new("/etc/talos-kms-server").join(DEFAULT_ADMIN_SOCKET_NAME)
        );
        let set = parse(&format!("{DEFAULT_CONFIG}\nadminSocket: run/admin.sock\n")).unwrap();
        assert_eq!(
            set.admin_socket,
            Path::new("/etc/talos-kms-server/run/admin.sock")
        );
    }

    #[test]
    fn each_commented_key_source_parses_and_the_tpm2_one_shows_the_defaults() {
        let examples: Vec<&str> = DEFAULT_CONFIG
            .lines()
            .filter_map(|line| line.strip_prefix("# keySource: "))
            .collect();
        assert_eq!(examples.len(), 4, "{examples:?}");
        let parsed: Vec<KeySourceConfig> = examples
            .iter()
            .map(|example| {
                let text = format!("{DEFAULT_CONFIG}\nkeySource: {example}\n");
                parse(&text).unwrap().key_source.unwrap()
            })
            .collect();
        let base = Path::new("/etc/talos-kms-server");
        assert_eq!(
            parsed[0],
            KeySourceConfig::File(Credential::new(Path::new("root.key"), base))
        );
        let defaults = parse(&format!("{DEFAULT_CONFIG}\nkeySource: {{tpm2: {{}}}}\n"))
            .unwrap()
            .key_source
            .unwrap();
        assert_eq!(parsed[1], defaults);
        assert!(matches!(parsed[2], KeySourceConfig::Pkcs11 { .. }));
        assert_eq!(
            parsed[3],
            KeySourceConfig::Shamir {
                threshold: 3,
                shares: 5
            }
        );
        assert!(parse(DEFAULT_CONFIG).unwrap().key_source.is_none());
    }

    #[test]
    fn bad_key_sources_are_explained() {
        for (value, expected) in [
            ("{vault: x}", "keySource takes one of"),
            ("{file: a, tpm2: {}}", "keySource takes one of"),
            ("{tpm2: {pcr: [7]}}", "keySource takes one of"),
            ("{tpm2: {pcrs: [24]}}", "PCR 24 does not exist"),
            ("{shamir: {threshold: 1, shares: 3}}", "at least 2"),
            (
                "{shamir: {threshold: 4, shares: 3}}",
                "at most the number of shares",
            ),
            (
                "{pkcs11: {module: m, tokenLabel: t, keyLabel: k}}",
                "pinFile",
            ),
        ] {
            let error = parse(&format!("{DEFAULT_CONFIG}\nkeySource: {value}\n")).unwrap_err();
            assert!(error.contains(expected), "{value}: {error}");
        }
    }

    #[test]
    fn the_commented_listener_limits_are_the_defaults() {
        let uncommented: String = DEFAULT_CONFIG
            .lines()
            .map(|line| {
                let key = line.trim_start_matches("# ");
                let listed = [
                    "maxConnections",
                    "maxConnectionsPerAddress",
                    "idleTimeout",
                    "handshakeTimeout",
                    "maxConnectionAge",
                    "callTimeout",
                    "maxHandshakesAtOnce",
                    "maxStreamsPerConnection",
                    "maxHeaderListSize",
                    "maxMessageSize",
                ]
                .iter()
                .any(|name| key.starts_with(&format!("{name}:")));
                format!("{}\n", if listed { key } else { line })
            })
            .collect();
        let limits = parse(&uncommented).unwrap().limits;
        assert_eq!(
            limits,
            ListenerLimits {
                max_handshakes_at_once: Some(4),
                ..ListenerLimits::default()
            }
        );
    }

    #[test]
    fn legacy_example_is_accepted() {
        let legacy = r#"
nodeDbFile: "/etc/talos-kms-server/nodeDbFile.json"
serverCertFile: "/etc/talos-kms-server/server.crt" #Must be a PEM encoded certificate
serverKeyFile: "/etc/talos-kms-server/server.key" #Must be a pkcs8 key
serverKeyPassword: "changeit"
port: 50051
bindAddress: "0.0.0.0"
kmsLogLevel: "INFO"
rootLogLevel: "WARNING"
"#;
        let config = parse(legacy).unwrap();
        assert_eq!(
            config.node_db_file.unwrap(),
            Path::new("/etc/talos-kms-server/nodeDbFile.json")
        );
        assert_eq!(
            config.database.sqlite_path(),
            Some(Path::new("/etc/talos-kms-server/talos-kms-server.db")),
            "without `database`, beside nodeDbFile where the legacy package lets it write"
        );
        assert_eq!(config.kms_log_level, LogLevel::Info);
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = parse(&format!("{DEFAULT_CONFIG}\nbindAdress: \"::\"\n"))
            .err()
            .unwrap();
        assert!(error.contains("bindAdress"), "{error}");
    }

    #[test]
    fn errors_never_quote_the_key_password() {
        for text in [
            // A broken quote above makes the password part of another value.
            "database: x\nserverCertFile: a\nserverKeyFile: b\nbindAddress: \"0.0.0\nserverKeyPassword: s3cret\"\n",
            "serverKeyPassword: \"s3cret\"\nbindAdress: 1\n",
            "database: x\nserverKeyPassword: \"s3cret\nport: [1\n",
            "database: x\nserverKeyPassword: s3cret\nport: 70000\n",
        ] {
            let error = parse(text).err().unwrap();
            assert!(!error.contains("s3cret"), "{error}");
        }
        let config =
            parse("database: x\nserverCertFile: a\nserverKeyFile: b\nserverKeyPassword: s3cret\n")
                .unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let config =
            parse("database: data/kms.db\nserverCertFile: a.crt\nserverKeyFile: /k\n").unwrap();
        assert_eq!(
            config.database.sqlite_path(),
            Some(Path::new("/etc/talos-kms-server/data/kms.db"))
        );
        assert_eq!(
            config.server_cert_file,
            Path::new("/etc/talos-kms-server/a.crt")
        );
    }

    #[test]
    fn a_postgres_database_takes_a_password_file_and_never_shows_a_password() {
        let config = parse(
            "database: \"postgres://kms@db:5432/kms?sslmode=verify-full\"\n\
             passwordFile: pg-password\nserverCertFile: a\nserverKeyFile: b\n",
        )
        .unwrap();
        match &config.database {
            Database::Postgres(options) => assert_eq!(
                options.password_file.as_deref(),
                Some(Path::new("/etc/talos-kms-server/pg-password"))
            ),
            other => panic!("{other}"),
        }
        assert_eq!(
            config.audit_log,
            Path::new("/var/lib/talos-kms-server/talos-kms-server-audit.jsonl")
        );
        let error = parse(
            "database: \"postgres://kms:s3cret@db/kms\"\npasswordFile: f\n\
             serverCertFile: a\nserverKeyFile: b\n",
        )
        .err()
        .unwrap();
        assert!(error.contains("passwordFile"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        let config = parse(
            "database: \"postgres://kms:s3cret@db/kms\"\nserverCertFile: a\nserverKeyFile: b\n",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
        assert!(!config.database.to_string().contains("s3cret"));
        let error = parse("database: x.db\npasswordFile: f\nserverCertFile: a\nserverKeyFile: b\n")
            .err()
            .unwrap();
        assert!(error.contains("passwordFile"), "{error}");
        let error =
            parse("database: \"mysql://kms@db/kms\"\nserverCertFile: a\nserverKeyFile: b\n")
                .err()
                .unwrap();
        assert!(error.contains("postgres://"), "{error}");
    }

    #[test]
    fn a_port_out_of_range_says_the_range() {
        let error = parse("database: x\nserverCertFile: a\nserverKeyFile: b\nport: 70000\n")
            .err()
            .unwrap();
        assert_eq!(
            error,
            "`port`: 70000 is not a port number from 1 to 65535 (0: any free port)"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        // Wrong types and unknown keys: each key is named.
        let error = parse(
            "database: x\nserverCertFile: a\nserverKeyFile: b\nport: 70000\n\
             pinNodeIp: maybe\nmaxConnections: -1\nsealPolicy: [open]\nprot: 1\n",
        )
        .err()
        .unwrap();
        assert!(error.starts_with("5 problems:"), "{error}");
        for named in [
            "`port`",
            "`pinNodeIp`",
            "`maxConnections`",
            "`sealPolicy`",
            "`prot`",
        ] {
            assert!(error.contains(named), "{named}: {error}");
        }
        // Values of the right type that do not make sense: each is named too.
        let error = parse(
            "serverKeyFile: b\nbindAddress: everywhere\nkmsLogLevel: LOUD\n\
             sealPolicy: sometimes\nidleTimeout: soon\nmaxMessageSize: 10\n",
        )
        .err()
        .unwrap();
        assert!(error.starts_with("7 problems:"), "{error}");
        for named in [
            "`database`",
            "serverCertFile",
            "bindAddress",
            "kmsLogLevel",
            "sealPolicy",
            "idleTimeout",
            "maxMessageSize",
        ] {
            assert!(error.contains(named), "{named}: {error}");
        }
    }

    /// A config naming `takeOver` entries in `dir`, with the required keys.
    fn take_over_config(dir: &Path, entries: &str) -> Result<Config, String> {
        Config::parse(
            &dir.join("config.yaml"),
            &format!("database: x\nserverCertFile: a\nserverKeyFile: b\ntakeOver:\n{entries}"),
        )
    }

    #[test]
    fn the_commented_take_over_example_is_valid_once_its_key_files_exist() {
        let dir = tempfile::tempdir().unwrap();
        let example: String = DEFAULT_CONFIG
            .lines()
            .filter(|line| line.starts_with("# takeOver:") || line.starts_with("#   - {scheme"))
            .map(|line| format!("{}\n", &line[2..]))
            .collect();
        assert_eq!(example.lines().count(), 4, "{example}");
        let example = example.replace("/etc/talos-kms-server/", "");
        std::fs::write(dir.path().join("reference.key"), [1u8; 32]).unwrap();
        std::fs::write(dir.path().join("gustinn.key"), [2u8; 16]).unwrap();
        std::fs::create_dir(dir.path().join("gustinn-keys")).unwrap();
        std::fs::write(dir.path().join("gustinn-keys/v2"), [3u8; 24]).unwrap();
        let text = format!("database: x\nserverCertFile: a\nserverKeyFile: b\n{example}");
        let config = Config::parse(&dir.path().join("config.yaml"), &text).unwrap();
        assert_eq!(config.take_over.reference.len(), 1);
        assert_eq!(config.take_over.gustinn.len(), 2);
        assert_eq!(config.take_over_sources.len(), 3);
        assert!(config.take_over_sources[1].contains("key ids v2; IP binding off"));
    }

    #[test]
    fn take_over_key_problems_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        // A base64 text of a 32-byte key, as an operator might copy it.
        std::fs::write(path("b64.key"), format!("{}\n", "QUJD".repeat(11))).unwrap();
        let error = take_over_config(
            dir.path(),
            "  - {scheme: sidero-reference, keyFile: b64.key}\n",
        )
        .err()
        .unwrap();
        assert!(
            error.contains("b64.key holds more than 32 bytes"),
            "{error}"
        );
        assert!(error.contains("16, 24 or 32 raw bytes"), "{error}");

        // A key directory with junk: a dotfile and a subdirectory are skipped as gustinn
        // skips them; a file of the wrong length is named.
        std::fs::create_dir_all(path("keys/..2026_12_06/sub")).unwrap();
        std::fs::write(path("keys/..2026_12_06/v1"), [1u8; 32]).unwrap();
        std::os::unix::fs::symlink("..2026_12_06", path("keys/..data")).unwrap();
        std::os::unix::fs::symlink("..data/v1", path("keys/v1")).unwrap();
        std::fs::write(path("keys/.hidden"), b"not a key").unwrap();
        std::fs::create_dir(path("keys/subdir")).unwrap();
        let config = take_over_config(
            dir.path(),
            "  - {scheme: gustinn, keyDir: keys, ipBinding: true}\n",
        )
        .unwrap();
        let ids: Vec<&str> = config.take_over.gustinn[0]
            .keys
            .iter()
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(ids, ["v1"]);
        std::fs::write(path("keys/README"), b"rotate monthly").unwrap();
        let error = take_over_config(
            dir.path(),
            "  - {scheme: gustinn, keyDir: keys, ipBinding: true}\n",
        )
        .err()
        .unwrap();
        assert!(error.contains("README holds 14 bytes"), "{error}");

        std::fs::create_dir(path("empty")).unwrap();
        let error = take_over_config(
            dir.path(),
            "- {scheme: gustinn, keyDir: empty, ipBinding: false}\n\
               - {scheme: gustinn, keyFile: b64.key, ipBinding: false}\n\
               - {scheme: gustinn, keyDir: keys}\n\
               - {scheme: omni, keyFile: x}\n\
               - {scheme: sidero-reference, keyFile: missing.key}\n\
               - {scheme: sidero-reference, keyFile: b64.key, ipBinding: true}\n",
        )
        .err()
        .unwrap();
        assert!(error.starts_with("6 problems:"), "{error}");
        for named in [
            "takeOver entry 1 (gustinn): key directory",
            "holds no key file",
            "takeOver entry 2 (gustinn): keyFile needs keyId",
            "takeOver entry 3 (gustinn): ipBinding is missing",
            "takeOver entry 4: scheme \"omni\" is not one of sidero-reference, gustinn",
            "takeOver entry 5 (sidero-reference): cannot read key file",
            "takeOver entry 6 (sidero-reference): takes only keyFile",
        ] {
            assert!(error.contains(named), "{named}: {error}");
        }
    }

    #[test]
    fn bad_values_are_explained() {
        let error =
            parse("database: x\nserverCertFile: a\nserverKeyFile: b\nbindAddress: everywhere\n")
                .err()
                .unwrap();
        assert!(error.contains("bindAddress"), "{error}");
        let error = parse("database: x\nserverCertFile: a\nserverKeyFile: b\nkmsLogLevel: LOUD\n")
            .err()
            .unwrap();
        assert!(error.contains("kmsLogLevel"), "{error}");
        let error = parse("database: x\nserverKeyFile: b\n").err().unwrap();
        assert!(error.contains("serverCertFile"), "{error}");
    }
}
