//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header a TCP
//! load balancer sends before the client's bytes, carrying the client's address.
//!
//! A strict parser of a byte prefix, with no allocation: [`parse`] says whether the bytes
//! begin with a whole header (and how long it is), need more bytes, or are not a valid
//! header. The listener reads at most [`MAX_HEADER`] bytes for it, and never past its end:
//! what follows belongs to TLS. Only what the server uses is kept: the source address.
//! TLVs of version 2 are skipped, unread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1 begins with this.
const V1_PREFIX: &[u8] = b"PROXY ";
/// A version 1 header's longest form, CRLF included (the specification's limit).
pub const MAX_V1: usize = 107;
/// The longest header read: 16 bytes and 520 of addresses and TLVs (216 for the largest
/// addresses, the rest for TLVs such as HAProxy's unique ID or SSL details). Longer ones are
/// refused rather than read without bound.
pub const MAX_HEADER: usize = 536;

/// What a whole header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied TCP connection from this client address.
    Proxy(SocketAddr),
    /// No client address: version 2's LOCAL command (a load balancer's own health check),
    /// an `AF_UNSPEC` family, or version 1's `UNKNOWN`. The specification says to use the
    /// connection's own endpoints: the load balancer's address.
    Local,
}

/// What a byte prefix holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes; the bytes after it are the client's.
    Header { header: Header, len: usize },
    /// Every byte so far belongs to a header that has not ended yet.
    Incomplete,
}

/// Why bytes are not a PROXY header the server accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("no PROXY protocol header: the connection began with other bytes")]
    NotProxy,
    #[error("the PROXY v2 header has version {0}, not 2")]
    Version(u8),
    #[error("the PROXY v2 header has command {0}, neither LOCAL (0) nor PROXY (1)")]
    Command(u8),
    #[error("the PROXY v2 header is {0} bytes long, more than the {MAX_HEADER} read")]
    TooLong(usize),
    #[error("the PROXY header carries a transport other than TCP (UDP or unknown)")]
    NotTcp,
    #[error("the PROXY v2 header carries a UNIX socket address, not an IP address")]
    Unix,
    #[error("the PROXY v2 header's address family {0} is unknown")]
    Family(u8),
    #[error("the PROXY v2 header is shorter than its addresses")]
    Short,
    #[error("the PROXY v1 header has no CRLF within {MAX_V1} bytes")]
    V1TooLong,
    #[error("the PROXY v1 header is malformed: {0}")]
    V1(&'static str),
}

/// Parses the header at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Parsed, Invalid> {
    if let Some(first) = bytes.first()
        && *first == V2_SIGNATURE[0]
    {
        parse_v2(bytes)
    } else {
        parse_v1(bytes)
    }
}

/// Whether `bytes` (at least one) begin like a PROXY header of either version: for telling
/// a header from an untrusted address apart from other bytes that are not TLS.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    let prefix_of = |signature: &[u8]| {
        let n = bytes.len().min(signature.len());
        n > 0 && bytes[..n] == signature[..n]
    };
    prefix_of(&V2_SIGNATURE) || prefix_of(V1_PREFIX)
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, Invalid> {
    let n = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..n] != V2_SIGNATURE[..n] {
        return Err(Invalid::NotProxy);
    }
    let Some(fixed) = bytes.get(..16) else {
        return Ok(Parsed::Incomplete);
    };
    let version = fixed[12] >> 4;
    let command = fixed[12] & 0x0f;
    if version != 2 {
        return Err(Invalid::Version(version));
    }
    if command > 1 {
        return Err(Invalid::Command(command));
    }
    let len = 16 + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_HEADER {
        return Err(Invalid::TooLong(len));
    }
    let Some(body) = bytes.get(16..len) else {
        return Ok(Parsed::Incomplete);
    };
    if command == 0 {
        // LOCAL: whatever follows is to be ignored.
        return Ok(Parsed::Header {
            header: Header::Local,
            len,
        });
    }
    let family = fixed[13] >> 4;
    let transport = fixed[13] & 0x0f;
    if family == 0 {
        return Ok(Parsed::Header {
            header: Header::Local,
            len,
        });
    }
    if transport != 1 {
        return Err(Invalid::NotTcp);
    }
    let source = match family {
        1 => {
            let a = body.get(..12).ok_or(Invalid::Short)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]]))
        }
        2 => {
            let a = body.get(..36).ok_or(Invalid::Short)?;
            let mut octets = [0; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([a[32], a[33]]))
        }
        3 => return Err(Invalid::Unix),
        other => return Err(Invalid::Family(other)),
    };
    Ok(Parsed::Header {
        header: Header::Proxy(source),
        len,
    })
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, Invalid> {
    let n = bytes.len().min(V1_PREFIX.len());
    if bytes[..n] != V1_PREFIX[..n] {
        return Err(Invalid::NotProxy);
    }
    // A v1 header holds one LF, its last byte: all bytes before it are the header's.
    let Some(lf) = bytes.iter().take(MAX_V1).position(|b| *b == b'\n') else {
        return if bytes.len() >= MAX_V1 {
            Err(Invalid::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = lf + 1;
    let line = bytes[..lf]
        .strip_suffix(b"\r")
        .ok_or(Invalid::V1("LF without CR"))?;
    let line = std::str::from_utf8(&line[V1_PREFIX.len().min(line.len())..])
        .map_err(|_| Invalid::V1("not ASCII"))?;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        // The rest of an UNKNOWN line is to be ignored.
        return Ok(Parsed::Header {
            header: Header::Local,
            len,
        });
    }
    let mut fields = line.split(' ');
    let (Some(family), Some(source), Some(_destination), Some(port), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Invalid::V1(
            "not `PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT`",
        ));
    };
    let source: IpAddr = match family {
        "TCP4" => source
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| Invalid::V1("bad TCP4 source address"))?,
        "TCP6" => source
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| Invalid::V1("bad TCP6 source address"))?,
        _ => {
            return Err(Invalid::V1(
                "the protocol is neither TCP4, TCP6 nor UNKNOWN",
            ));
        }
    };
    let port = v1_port(port).ok_or(Invalid::V1("bad source port"))?;
    v1_port(dport).ok_or(Invalid::V1("bad destination port"))?;
    Ok(Parsed::Header {
        header: Header::Proxy(SocketAddr::new(source, port)),
        len,
    })
}

/// A decimal port, 0 to 65535, without sign or leading zero.
fn v1_port(text: &str) -> Option<u16> {
    let digits = text.bytes().all(|b| b.is_ascii_digit());
    if !digits || text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

/// A version 2 PROXY header for a TCP connection from `source` to `destination` (both of
/// one family; a mixed pair is sent as IPv6, IPv4 mapped), or LOCAL when `source` is
/// `None`: what a load balancer sends, for `bench --proxy-v2` and the tests.
pub fn v2_header(source: Option<SocketAddr>, destination: SocketAddr) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    let Some(source) = source else {
        header.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return header;
    };
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            header.extend_from_slice(&[0x21, 0x11, 0, 12]);
            header.extend_from_slice(&s.ip().octets());
            header.extend_from_slice(&d.ip().octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            header.extend_from_slice(&[0x21, 0x21, 0, 36]);
            header.extend_from_slice(&v6(source.ip()).octets());
            header.extend_from_slice(&v6(destination.ip()).octets());
        }
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn whole(bytes: &[u8]) -> (Header, usize) {
        match parse(bytes) {
            Ok(Parsed::Header { header, len }) => (header, len),
            other => panic!("{other:?} for {bytes:?}"),
        }
    }

    #[test]
    fn v2_headers_of_both_families_and_local_are_read_to_their_end() {
        let v4 = v2_header(Some(addr("10.1.2.3:40000")), addr("10.0.0.1:50051"));
        assert_eq!(v4.len(), 28);
        let mut with_tls = v4.clone();
        with_tls.extend_from_slice(&[0x16, 3, 1]);
        assert_eq!(
            whole(&with_tls),
            (Header::Proxy(addr("10.1.2.3:40000")), 28),
            "the TLS bytes after it are not the header's"
        );
        let v6 = v2_header(Some(addr("[fd00::7]:1")), addr("[fd00::1]:50051"));
        assert_eq!(whole(&v6), (Header::Proxy(addr("[fd00::7]:1")), 52));
        let local = v2_header(None, addr("10.0.0.1:50051"));
        assert_eq!(whole(&local), (Header::Local, 16));
        // TLVs are skipped: a NOOP of 3 bytes.
        let mut tlv = v4.clone();
        tlv[15] += 6;
        tlv.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]);
        assert_eq!(whole(&tlv), (Header::Proxy(addr("10.1.2.3:40000")), 34));
        // AF_UNSPEC with PROXY: no address.
        let mut unspec = local.clone();
        unspec[12] = 0x21;
        assert_eq!(whole(&unspec), (Header::Local, 16));
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v2 = v2_header(Some(addr("10.1.2.3:40000")), addr("10.0.0.1:50051"));
        let v1 = b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 50051\r\n".to_vec();
        for header in [v2, v1] {
            for end in 1..header.len() {
                assert_eq!(parse(&header[..end]), Ok(Parsed::Incomplete), "{end}");
            }
            assert_eq!(whole(&header).1, header.len());
        }
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v1_headers_are_read_strictly() {
        assert_eq!(
            whole(b"PROXY TCP4 127.0.0.2 127.0.0.1 5 50051\r\n\x16\x03"),
            (Header::Proxy(addr("127.0.0.2:5")), 40)
        );
        assert_eq!(
            whole(b"PROXY TCP6 fd00::7 fd00::1 65535 50051\r\n"),
            (Header::Proxy(addr("[fd00::7]:65535")), 40)
        );
        assert_eq!(whole(b"PROXY UNKNOWN\r\n"), (Header::Local, 15));
        assert_eq!(
            whole(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n"),
            (Header::Local, 33)
        );
        for bad in [
            &b"PROXY TCP4 127.0.0.2 127.0.0.1 5 50051\n"[..],
            b"PROXY TCP4 127.0.0.2  127.0.0.1 5 50051\r\n",
            b"PROXY TCP4 127.0.0.02 127.0.0.1 5 50051\r\n",
            b"PROXY TCP4 fd00::7 127.0.0.1 5 50051\r\n",
            b"PROXY TCP6 127.0.0.2 127.0.0.1 5 50051\r\n",
            b"PROXY TCP4 127.0.0.2 127.0.0.1 05 50051\r\n",
            b"PROXY TCP4 127.0.0.2 127.0.0.1 65536 50051\r\n",
            b"PROXY TCP4 127.0.0.2 127.0.0.1 +5 50051\r\n",
            b"PROXY TCP4 127.0.0.2 127.0.0.1 5\r\n",
            b"PROXY TCP4 127.0.0.2 127.0.0.1 5 50051 6\r\n",
            b"PROXY UDP4 127.0.0.2 127.0.0.1 5 50051\r\n",
            b"PROXY \xff\r\n",
            b"PROXY\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(Invalid::V1TooLong));
        assert_eq!(parse(&long[..MAX_V1 - 1]), Ok(Parsed::Incomplete));
    }

    #[test]
    fn other_bytes_and_bad_v2_headers_are_refused() {
        assert_eq!(parse(&[0x16, 3, 1, 0, 200]), Err(Invalid::NotProxy));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Invalid::NotProxy));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(Invalid::NotProxy));
        let good = v2_header(Some(addr("10.1.2.3:40000")), addr("10.0.0.1:50051"));
        let with = |at: usize, byte: u8| {
            let mut bytes = good.clone();
            bytes[at] = byte;
            parse(&bytes)
        };
        assert_eq!(with(12, 0x11), Err(Invalid::Version(1)));
        assert_eq!(with(12, 0x22), Err(Invalid::Command(2)));
        assert_eq!(with(13, 0x12), Err(Invalid::NotTcp));
        assert_eq!(with(13, 0x31), Err(Invalid::Unix));
        assert_eq!(with(13, 0x41), Err(Invalid::Family(4)));
        assert_eq!(with(15, 4), Err(Invalid::Short));
        assert_eq!(with(14, 2), Err(Invalid::TooLong(16 + 512 + 12)));
        assert_eq!(with(13, 0x21), Err(Invalid::Short), "IPv6 in 12 bytes");
    }

    #[test]
    fn headers_are_told_from_other_bytes_by_their_first() {
        assert!(looks_like_header(b"P"));
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"\r\n\r\n"));
        assert!(!looks_like_header(b"POST /"));
        assert!(!looks_like_header(&[0x16, 3, 1]));
        assert!(!looks_like_header(b""));
    }
}
