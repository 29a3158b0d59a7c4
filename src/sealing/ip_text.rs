//! The peer-address text that is bound into every seal.
//!
//! It must be byte-for-byte what the legacy JVM server produced with
//! `InetAddress.getHostAddress()`, or records it sealed would never unseal again:
//! IPv4 as a dotted quad (also for IPv4 clients seen through a dual-stack socket as
//! `::ffff:a.b.c.d`), IPv6 as eight lowercase hex groups without zero compression or leading
//! zeros, with `%scope` appended when the address carries a scope id.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

/// The canonical text of a connection's peer address.
pub fn peer_ip_text(peer: &SocketAddr) -> String {
    let scope_id = match peer {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    ip_text(peer.ip(), scope_id)
}

/// The canonical text of an address with an optional (non-zero) IPv6 scope id.
pub fn ip_text(ip: IpAddr, scope_id: u32) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4.to_string();
            }
            let mut text = String::with_capacity(40);
            for (i, group) in v6.segments().iter().enumerate() {
                if i > 0 {
                    text.push(':');
                }
                // Writing to a String cannot fail.
                let _ = write!(text, "{group:x}");
            }
            if scope_id != 0 {
                let _ = write!(text, "%{scope_id}");
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    #[test]
    fn ipv4_is_a_dotted_quad() {
        assert_eq!(
            ip_text(Ipv4Addr::new(10, 0, 0, 201).into(), 0),
            "10.0.0.201"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_text() {
        let mapped: Ipv6Addr = "::ffff:10.0.0.201".parse().unwrap();
        assert_eq!(ip_text(mapped.into(), 0), "10.0.0.201");
    }

    #[test]
    fn ipv6_is_uncompressed_like_java() {
        assert_eq!(ip_text(Ipv6Addr::LOCALHOST.into(), 0), "0:0:0:0:0:0:0:1");
        let addr: Ipv6Addr = "fe80::1c2:3ff:fe4:5".parse().unwrap();
        assert_eq!(ip_text(addr.into(), 0), "fe80:0:0:0:1c2:3ff:fe4:5");
        let addr: Ipv6Addr = "2001:DB8:0:0:0:0:ABCD:12".parse().unwrap();
        assert_eq!(ip_text(addr.into(), 0), "2001:db8:0:0:0:0:abcd:12");
    }

    #[test]
    fn ipv6_scope_is_appended() {
        let addr: Ipv6Addr = "fe80::1c2:3ff:fe4:5".parse().unwrap();
        let peer = SocketAddr::V6(SocketAddrV6::new(addr, 4050, 0, 3));
        assert_eq!(peer_ip_text(&peer), "fe80:0:0:0:1c2:3ff:fe4:5%3");
    }

    #[test]
    fn ipv4_compatible_ipv6_stays_ipv6() {
        // Java maps only ::ffff:0:0/96 to IPv4; the deprecated ::a.b.c.d form stays IPv6.
        let addr: Ipv6Addr = "::1.2.3.4".parse().unwrap();
        assert_eq!(ip_text(addr.into(), 0), "0:0:0:0:0:0:102:304");
    }
}
