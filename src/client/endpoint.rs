//! A KMS endpoint as Talos writes it in a machine config: `https://host[:port]`, or
//! `grpc://host:port` (or a bare `host:port`) for plaintext.

use std::str::FromStr;

/// A KMS endpoint as written in a Talos machine config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl FromStr for Endpoint {
    type Err = String;

    /// `https://host[:port]` is TLS (port 443 by default); `grpc://host:port` or a bare
    /// `host:port` is plaintext gRPC, as in Talos.
    fn from_str(text: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("grpc://") {
            (false, rest)
        } else if text.contains("://") {
            return Err(format!("{text:?}: the scheme must be https:// or grpc://"));
        } else {
            (false, text)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port))
                if !port.contains(']') && (!host.contains(':') || host.ends_with(']')) =>
            {
                let port = port
                    .parse()
                    .map_err(|_| format!("{text:?}: {port:?} is not a port number"))?;
                (host, Some(port))
            }
            _ => (rest, None),
        };
        let port = match (port, tls) {
            (Some(port), _) => port,
            (None, true) => 443,
            (None, false) => return Err(format!("{text:?}: a grpc:// endpoint needs a port")),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "grpc" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Endpoint {
        text.parse().unwrap()
    }

    #[test]
    fn endpoints_parse_like_talos() {
        assert_eq!(
            parse("https://kms.example.com:50051"),
            Endpoint {
                host: "kms.example.com".into(),
                port: 50051,
                tls: true
            }
        );
        assert_eq!(parse("https://kms.example.com").port, 443);
        assert_eq!(
            parse("grpc://10.0.0.1:4050"),
            Endpoint {
                host: "10.0.0.1".into(),
                port: 4050,
                tls: false
            }
        );
        assert!(!parse("10.0.0.1:4050").tls);
        assert_eq!(
            parse("https://[::1]:50051"),
            Endpoint {
                host: "::1".into(),
                port: 50051,
                tls: true
            }
        );
        assert_eq!(parse("https://[::1]").port, 443);
        assert!("ftp://x:1".parse::<Endpoint>().is_err());
        assert!("grpc://host".parse::<Endpoint>().is_err());
        assert!("https://host:port".parse::<Endpoint>().is_err());
    }
}
