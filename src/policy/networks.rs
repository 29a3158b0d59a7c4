//! Network allow-lists: which source addresses may call at all.

use ipnet::IpNet;
use std::net::IpAddr;

/// A list of networks; `None` in the config means anyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    /// Parses CIDR texts; a bare address stands for itself alone.
    pub fn parse<S: AsRef<str>>(texts: &[S]) -> Result<Networks, String> {
        texts
            .iter()
            .map(|text| {
                let text = text.as_ref().trim();
                text.parse::<IpNet>()
                    .map(|net| net.trunc())
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "{text:?} is not a network (e.g. 10.0.0.0/8, 192.168.1.20, \
                             fd00::/8)"
                        )
                    })
            })
            .collect::<Result<_, _>>()
            .map(Networks)
    }

    /// Whether `ip` is in one of the networks. An IPv4 peer of a dual-stack socket arrives
    /// as `::ffff:a.b.c.d` and is matched as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: &Networks) {
        for net in &other.0 {
            if !self.0.contains(net) {
                self.0.push(*net);
            }
        }
    }
}

impl std::fmt::Display for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let texts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&texts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_v4_v6_and_mapped_addresses() {
        let nets =
            Networks::parse(&["10.0.0.0/8", "192.168.1.20", "fd00::/8", "10.1.2.3/8"]).unwrap();
        for ip in ["10.2.3.4", "192.168.1.20", "fd12::1", "::ffff:10.9.9.9"] {
            assert!(nets.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "11.0.0.1",
            "192.168.1.21",
            "fe80::1",
            "::ffff:11.0.0.1",
            "::a00:1",
        ] {
            assert!(!nets.contains(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn bad_networks_are_named() {
        let error = Networks::parse(&["10.0.0.0/8", "10.0.0.0/33"]).unwrap_err();
        assert!(error.contains("10.0.0.0/33"), "{error}");
        assert!(Networks::parse(&["example.com"]).is_err());
    }
}
