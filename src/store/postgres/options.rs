//! What `database: postgres://...` says: where the server is, how to reach it (TLS, the
//! pool) and where its password comes from. The password never appears in anything this
//! module prints.

use super::tls::SslMode;
use crate::store::StoreError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Connections in the pool unless `pool_max_size` says otherwise.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// How long a new connection may take (TCP, TLS, authentication) unless `connect_timeout`
/// says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL database as the config names it.
#[derive(Clone)]
pub struct PgOptions {
    /// The URL without its password, for messages.
    pub(super) shown: String,
    config: tokio_postgres::Config,
    pub sslmode: SslMode,
    /// CA certificates (PEM) to verify the server with, instead of the public roots.
    pub root_cert: Option<PathBuf>,
    /// Where the password is, when the URL has none (`passwordFile`).
    pub password_file: Option<PathBuf>,
    pub pool_size: usize,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Whether `text` names a PostgreSQL database rather than an SQLite file.
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

impl PgOptions {
    /// Parses a `postgres://` or `postgresql://` URL. Besides what libpq's URLs say, it
    /// takes `sslmode` (all five of libpq's modes), `sslrootcert` and `pool_max_size`.
    /// Relative paths (`sslrootcert`) are taken relative to `base`.
    pub fn parse(url: &str, base: &Path) -> Result<PgOptions, String> {
        let shown = redact(url);
        if !is_postgres_url(url) {
            return Err(format!(
                "{shown} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)"
            ));
        }
        let (location, query) = match url.split_once('?') {
            Some((location, query)) => (location, query),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        let mut sslmode = SslMode::Prefer;
        let mut root_cert = None;
        let mut pool_size = DEFAULT_POOL_SIZE;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "sslmode" => {
                    sslmode = SslMode::parse(&value).ok_or_else(|| {
                        format!(
                            "{shown}: sslmode {value:?} is not one of disable, prefer, require, \
                             verify-ca, verify-full"
                        )
                    })?
                }
                "sslrootcert" if value == "system" => root_cert = None,
                "sslrootcert" => {
                    let path = PathBuf::from(value);
                    root_cert = Some(if path.is_relative() {
                        base.join(path)
                    } else {
                        path
                    });
                }
                "pool_max_size" => {
                    pool_size = value
                        .parse()
                        .ok()
                        .filter(|size| (1..=1000).contains(size))
                        .ok_or_else(|| {
                            format!(
                                "{shown}: pool_max_size {value:?} is not a number from 1 to 1000"
                            )
                        })?
                }
                "password" => {
                    return Err(format!(
                        "{shown}: put the password in `passwordFile` or PGPASSWORD, not in a \
                         URL parameter"
                    ));
                }
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            location.to_string()
        } else {
            format!("{location}?{}", kept.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rebuilt)
            .map_err(|e| format!("{shown} is not a valid PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err(format!("{shown} names no host"));
        }
        if config.get_user().is_none() {
            return Err(format!(
                "{shown} names no user: write it as postgres://USER@HOST/DATABASE"
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("talos-kms-server");
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.ssl_mode(match sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(PgOptions {
            shown,
            config,
            sslmode,
            root_cert,
            password_file: None,
            pool_size,
        })
    }

    /// Whether the URL itself holds a password (the config file then holds a secret).
    pub fn url_has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// The database named in the URL (the user's name when it names none).
    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or_default()
    }

    /// The client config, with its password from the URL, `passwordFile` or `PGPASSWORD`,
    /// in that order.
    pub fn client_config(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config = self.config.clone();
        if config.get_password().is_some() {
            return Ok(config);
        }
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                self.error(format!(
                    "cannot read the password file {} (passwordFile): {}; it must be readable by \
                 the service user",
                    file.display(),
                    crate::os_error::plain(&e)
                ))
            })?;
            let password = text.lines().next().unwrap_or_default();
            if password.is_empty() {
                return Err(self.error(format!(
                    "the password file {} (passwordFile) is empty",
                    file.display()
                )));
            }
            config.password(password);
        } else if let Some(password) = std::env::var_os("PGPASSWORD") {
            config.password(password.as_encoded_bytes());
        }
        Ok(config)
    }

    pub fn error(&self, problem: String) -> StoreError {
        StoreError::Postgres {
            database: self.shown.clone(),
            problem,
        }
    }
}

/// The URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    // A `password=` parameter is refused, but must not be shown either.
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| {
                    if pair.starts_with("password=") {
                        "password=***".to_string()
                    } else {
                        pair.to_string()
                    }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        let options = PgOptions::parse(
            "postgres://kms:s3cret@db.example.com:5433/kms?sslmode=verify-full",
            Path::new("/etc"),
        )
        .unwrap();
        assert_eq!(
            options.to_string(),
            "postgres://kms:***@db.example.com:5433/kms?sslmode=verify-full"
        );
        assert!(options.url_has_password());
        assert_eq!(options.sslmode, SslMode::VerifyFull);
        let error = PgOptions::parse("postgres://kms:s3cret@h/kms?sslmode=maybe", Path::new("/"))
            .err()
            .unwrap();
        assert!(!error.contains("s3cret"), "{error}");
        assert!(error.contains("sslmode"), "{error}");
        let error = PgOptions::parse("postgres://kms:s3cret@h:port/kms", Path::new("/"))
            .err()
            .unwrap();
        assert!(!error.contains("s3cret"), "{error}");
        let error = PgOptions::parse("postgres://kms@h/kms?password=s3cret", Path::new("/"))
            .err()
            .unwrap();
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn defaults_and_own_parameters() {
        let options = PgOptions::parse(
            "postgresql://kms@127.0.0.1/kms?pool_max_size=4&sslrootcert=ca.pem&application_name=x",
            Path::new("/etc/kms"),
        )
        .unwrap();
        assert_eq!(options.sslmode, SslMode::Prefer);
        assert_eq!(options.pool_size, 4);
        assert_eq!(
            options.root_cert.as_deref(),
            Some(Path::new("/etc/kms/ca.pem"))
        );
        assert_eq!(options.dbname(), "kms");
        assert!(!options.url_has_password());
        assert!(PgOptions::parse("postgres:///kms", Path::new("/")).is_err());
        assert!(PgOptions::parse("postgres://kms@h/kms?pool_max_size=0", Path::new("/")).is_err());
    }
}
