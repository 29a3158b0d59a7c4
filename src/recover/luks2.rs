//! The LUKS2 on-disk header, read-only: enough to find the JSON metadata (and its tokens) in
//! either copy. Layout from the LUKS2 on-disk format specification: a 4096-byte binary header
//! followed by the JSON area, the whole `hdr_size` bytes long and checksummed; a second copy
//! follows at offset `hdr_size`.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;

const BINARY_SIZE: usize = 4096;
const PRIMARY_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SECONDARY_MAGIC: &[u8; 6] = b"SKUL\xba\xbe";
/// Where a secondary header may start: the sizes a LUKS2 header may have (16 KiB to 4 MiB).
pub const SECONDARY_OFFSETS: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
const CSUM_ALG_AT: usize = 72;
const CSUM_AT: usize = 448;
const CSUM_LEN: usize = 64;

/// A header copy that checked out: where it was and its JSON metadata.
#[derive(Debug)]
pub struct Header {
    pub offset: u64,
    pub seqid: u64,
    pub json: serde_json::Value,
}

/// Why one header copy cannot be used, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flaw {
    /// No LUKS magic at all: not a LUKS volume (or this copy was wiped).
    NoMagic,
    /// LUKS, but another version (1 has no JSON metadata and is not what Talos writes).
    Version(u16),
    Damaged(String),
}

impl fmt::Display for Flaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flaw::NoMagic => write!(f, "no LUKS2 magic"),
            Flaw::Version(version) => write!(f, "LUKS version {version}"),
            Flaw::Damaged(why) => write!(f, "{why}"),
        }
    }
}

/// What was found: the copy to use, and why the other was not used (when it was not).
#[derive(Debug)]
pub struct Found {
    pub header: Header,
    /// Set when the primary copy is unusable and the secondary was read instead.
    pub primary_flaw: Option<Flaw>,
}

/// Neither copy is usable.
#[derive(Debug)]
pub struct NoHeader {
    pub primary: Flaw,
    /// `None` when no secondary magic was found at any offset LUKS2 allows.
    pub secondary: Option<Flaw>,
}

/// Reads both header copies and picks the usable one with the higher sequence id, as
/// cryptsetup does. I/O errors other than a short device are returned as they are.
pub fn read(device: &File) -> std::io::Result<Result<Found, NoHeader>> {
    let primary = read_copy(device, 0, PRIMARY_MAGIC)?;
    // The primary's size says where the secondary is; when the primary is unusable, every
    // offset LUKS2 allows is tried, as cryptsetup does.
    let offsets = match &primary {
        Ok(p) => vec![p.size],
        Err(_) => SECONDARY_OFFSETS.to_vec(),
    };
    let mut secondary: Option<Result<Copy, Flaw>> = None;
    for offset in offsets {
        match read_copy(device, offset, SECONDARY_MAGIC)? {
            Err(Flaw::NoMagic) => {}
            Ok(copy) => {
                secondary = Some(Ok(copy));
                break;
            }
            Err(flaw) => {
                secondary.get_or_insert(Err(flaw));
            }
        }
    }
    Ok(match (primary, secondary) {
        (Ok(p), Some(Ok(s))) if s.header.seqid > p.header.seqid => Ok(Found {
            header: s.header,
            primary_flaw: None,
        }),
        (Ok(p), _) => Ok(Found {
            header: p.header,
            primary_flaw: None,
        }),
        (Err(flaw), Some(Ok(s))) => Ok(Found {
            header: s.header,
            primary_flaw: Some(flaw),
        }),
        (Err(primary), secondary) => Err(NoHeader {
            primary,
            secondary: secondary.and_then(Result::err),
        }),
    })
}

struct Copy {
    size: u64,
    header: Header,
}

fn read_copy(device: &File, offset: u64, magic: &[u8; 6]) -> std::io::Result<Result<Copy, Flaw>> {
    let mut binary = vec![0u8; BINARY_SIZE];
    if !read_exact_or_short(device, &mut binary, offset)? {
        return Ok(Err(Flaw::NoMagic));
    }
    let size = match check_binary(&binary, offset, magic) {
        Ok(size) => size,
        Err(flaw) => return Ok(Err(flaw)),
    };
    let Ok(len) = usize::try_from(size) else {
        return Ok(Err(Flaw::Damaged(format!(
            "header size {size} is not valid"
        ))));
    };
    let mut whole = binary;
    whole.resize(len, 0);
    if !read_exact_or_short(
        device,
        &mut whole[BINARY_SIZE..],
        offset + BINARY_SIZE as u64,
    )? {
        return Ok(Err(Flaw::Damaged(
            "the device ends inside the header's JSON area".into(),
        )));
    }
    Ok(parse_copy(&whole, offset).map(|header| Copy { size, header }))
}

/// Checks the binary header; answers its `hdr_size`.
fn check_binary(binary: &[u8], offset: u64, magic: &[u8; 6]) -> Result<u64, Flaw> {
    if &binary[..6] != magic {
        return Err(Flaw::NoMagic);
    }
    let version = u16::from_be_bytes([binary[6], binary[7]]);
    if version != 2 {
        return Err(Flaw::Version(version));
    }
    let size = be_u64(binary, 8);
    if !SECONDARY_OFFSETS.contains(&size) {
        return Err(Flaw::Damaged(format!(
            "header size {size} is not one LUKS2 allows"
        )));
    }
    let hdr_offset = be_u64(binary, 256);
    if hdr_offset != offset {
        return Err(Flaw::Damaged(format!(
            "the header at offset {offset} says it is at offset {hdr_offset}"
        )));
    }
    Ok(size)
}

/// Verifies the checksum of a whole header copy and parses its JSON area.
fn parse_copy(whole: &[u8], offset: u64) -> Result<Header, Flaw> {
    verify_checksum(whole)?;
    let area = &whole[BINARY_SIZE..];
    // The JSON text is NUL-terminated; the rest of the area is padding.
    let text = &area[..area.iter().position(|&b| b == 0).unwrap_or(area.len())];
    let json: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Flaw::Damaged(format!("its JSON metadata does not parse ({e})")))?;
    if !json.is_object() {
        return Err(Flaw::Damaged("its JSON metadata is not an object".into()));
    }
    Ok(Header {
        offset,
        seqid: be_u64(whole, 16),
        json,
    })
}

fn verify_checksum(whole: &[u8]) -> Result<(), Flaw> {
    use aws_lc_rs::digest;
    let name = &whole[CSUM_ALG_AT..CSUM_ALG_AT + 32];
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    let algorithm = match name {
        b"sha256" => &digest::SHA256,
        b"sha512" => &digest::SHA512,
        b"sha384" => &digest::SHA384,
        b"sha1" => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        // Not one cryptsetup writes by default: the JSON must still parse.
        _ => return Ok(()),
    };
    let mut context = digest::Context::new(algorithm);
    context.update(&whole[..CSUM_AT]);
    context.update(&[0u8; CSUM_LEN]);
    context.update(&whole[CSUM_AT + CSUM_LEN..]);
    let digest = context.finish();
    if whole[CSUM_AT..CSUM_AT + digest.as_ref().len()] == *digest.as_ref() {
        Ok(())
    } else {
        Err(Flaw::Damaged("checksum mismatch".into()))
    }
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Fills `buffer` from `offset`; `false` when the device ends before.
fn read_exact_or_short(device: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<bool> {
    match device.read_exact_at(buffer, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A header copy as cryptsetup lays it out, with a valid sha256 checksum.
    fn copy(magic: &[u8; 6], offset: u64, seqid: u64, json: &str) -> Vec<u8> {
        let size = 0x4000usize;
        let mut h = vec![0u8; size];
        h[..6].copy_from_slice(magic);
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&(size as u64).to_be_bytes());
        h[16..24].copy_from_slice(&seqid.to_be_bytes());
        h[CSUM_ALG_AT..CSUM_ALG_AT + 6].copy_from_slice(b"sha256");
        h[256..264].copy_from_slice(&offset.to_be_bytes());
        h[BINARY_SIZE..BINARY_SIZE + json.len()].copy_from_slice(json.as_bytes());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &h);
        h[CSUM_AT..CSUM_AT + 32].copy_from_slice(digest.as_ref());
        h
    }

    fn device(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn the_newer_copy_wins_and_a_damaged_primary_falls_back() {
        let mut image = copy(PRIMARY_MAGIC, 0, 3, r#"{"n":"old"}"#);
        image.extend(copy(SECONDARY_MAGIC, 0x4000, 4, r#"{"n":"new"}"#));
        let found = read(&device(&image)).unwrap().unwrap();
        assert_eq!(
            (found.header.offset, found.header.json["n"].as_str()),
            (0x4000, Some("new"))
        );
        assert!(found.primary_flaw.is_none());

        image[BINARY_SIZE] ^= 1; // the primary's JSON no longer matches its checksum
        let found = read(&device(&image)).unwrap().unwrap();
        assert_eq!(found.header.offset, 0x4000);
        assert_eq!(
            found.primary_flaw,
            Some(Flaw::Damaged("checksum mismatch".into()))
        );
    }

    #[test]
    fn luks1_and_plain_files_say_what_they_are() {
        let mut luks1 = vec![0u8; 8192];
        luks1[..6].copy_from_slice(PRIMARY_MAGIC);
        luks1[7] = 1;
        let none = read(&device(&luks1)).unwrap().unwrap_err();
        assert_eq!((none.primary, none.secondary), (Flaw::Version(1), None));

        let none = read(&device(b"hello")).unwrap().unwrap_err();
        assert_eq!((none.primary, none.secondary), (Flaw::NoMagic, None));
    }
}
