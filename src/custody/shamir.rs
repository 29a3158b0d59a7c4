//! `keySource: {shamir: {threshold: M, shares: N}}`: the root key is split among N operators
//! (Shamir's scheme over GF(256), the blahaj crate); any M shares rebuild it, fewer reveal
//! nothing.
//!
//! A share is one line: `tkms1-M-INDEX-SET-Y-CHECK`. M is the threshold; INDEX the share's x
//! (1..=255); SET 8 bytes (hex) of an HMAC of the root key, the same in every share of one
//! `init`, which the rebuilt key must reproduce; Y the share's 32 bytes (hex); CHECK the first
//! 4 bytes (hex) of SHA-256 over everything before it, so that a mistyped share is named.

use super::secret::{KEY_LEN, SecretKey};
use super::{CustodyError, Initialised};
use aws_lc_rs::{digest, hmac};
use blahaj::{Share as Point, Sharks};
use std::fmt::Write;
use zeroize::Zeroizing;

const PREFIX: &str = "tkms1";
const SET_LEN: usize = 8;

/// One parsed share.
#[derive(Debug, PartialEq, Eq)]
pub struct Share {
    pub threshold: u8,
    pub index: u8,
    pub set: [u8; SET_LEN],
    y: Zeroizing<Vec<u8>>,
}

pub fn init(threshold: u8, shares: u8) -> Result<Initialised, CustodyError> {
    let key = SecretKey::random();
    let lines = split(&key, threshold, shares);
    Ok(Initialised {
        made: format!(
            "a root key split into {shares} shares, any {threshold} of which rebuild it. It is \
             stored nowhere: give each share to one operator now; they are not shown again"
        ),
        shares: lines,
    })
}

/// A new root key and its shares, for `keys rotate-root` on a running server.
pub fn new_root(threshold: u8, shares: u8) -> (SecretKey, Vec<String>) {
    let key = SecretKey::random();
    let lines = split(&key, threshold, shares);
    (key, lines)
}

fn split(key: &SecretKey, threshold: u8, shares: u8) -> Vec<String> {
    let set = set_of(key);
    Sharks(threshold)
        .dealer(key.expose())
        .take(shares.into())
        .map(|point| {
            let bytes = Zeroizing::new(Vec::from(&point));
            let mut line = format!("{PREFIX}-{threshold}-{}-{}-", bytes[0], hex(&set));
            line.push_str(&hex(&bytes[1..]));
            let check = checksum(&line);
            line.push('-');
            line.push_str(&hex(&check));
            line
        })
        .collect()
}

/// Parses one share's line, checking its form and checksum.
pub fn parse_share(text: &str) -> Result<Share, String> {
    let text = text.trim();
    let form =
        "is not a share (tkms1-M-INDEX-SET-Y-CHECK, one line as `key-source init` printed it)";
    let (body, check) = text.rsplit_once('-').ok_or(form)?;
    let mut parts = body.split('-');
    let (Some(PREFIX), Some(threshold), Some(index), Some(set), Some(y), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(form.into());
    };
    let check = unhex(check).filter(|c| c.len() == 4).ok_or(form)?;
    if check != checksum(body) {
        return Err(
            "is mistyped: its checksum does not match; compare it with the copy you were given"
                .into(),
        );
    }
    let threshold: u8 = threshold.parse().ok().filter(|m| *m >= 2).ok_or(form)?;
    let index: u8 = index.parse().ok().filter(|x| *x >= 1).ok_or(form)?;
    let set: [u8; SET_LEN] = unhex(set).and_then(|s| s.try_into().ok()).ok_or(form)?;
    let y = Zeroizing::new(unhex(y).filter(|y| y.len() == KEY_LEN).ok_or(form)?);
    Ok(Share {
        threshold,
        index,
        set,
        y,
    })
}

/// Rebuilds the root key from shares, each as typed. Every error names the share (by its
/// place in `shares`, from 1) and says what to do.
pub fn combine(threshold: u8, shares: &[&str]) -> Result<SecretKey, CustodyError> {
    let mut parsed: Vec<Share> = Vec::with_capacity(shares.len());
    for (place, text) in shares.iter().enumerate() {
        let share = parse_share(text)
            .map_err(|problem| CustodyError::source(format!("share {} {problem}", place + 1)))?;
        if share.threshold != threshold {
            return Err(CustodyError::source(format!(
                "share {} was made for a threshold of {}, but the config says {threshold}: it \
                 belongs to another set of shares (or the config changed)",
                place + 1,
                share.threshold
            )));
        }
        if let Some(first) = parsed.first()
            && first.set != share.set
        {
            return Err(CustodyError::source(format!(
                "share {} does not belong with share 1: they come from different `key-source \
                 init` runs",
                place + 1
            )));
        }
        if let Some(earlier) = parsed.iter().position(|s| s.index == share.index) {
            return Err(CustodyError::source(format!(
                "share {} repeats share {} (both are share number {}); each operator gives a \
                 different share",
                place + 1,
                earlier + 1,
                share.index
            )));
        }
        parsed.push(share);
    }
    if parsed.len() < threshold.into() {
        return Err(CustodyError::source(format!(
            "{} share{} given, {threshold} needed",
            parsed.len(),
            if parsed.len() == 1 { "" } else { "s" }
        )));
    }
    let points: Vec<Point> = parsed
        .iter()
        .map(|share| {
            let mut bytes = Zeroizing::new(Vec::with_capacity(1 + KEY_LEN));
            bytes.push(share.index);
            bytes.extend_from_slice(&share.y);
            Point::try_from(bytes.as_slice()).map_err(CustodyError::source)
        })
        .collect::<Result<_, _>>()?;
    let secret = Zeroizing::new(
        Sharks(threshold)
            .recover(&points)
            .map_err(CustodyError::source)?,
    );
    let key = SecretKey::from_slice(&secret)
        .ok_or_else(|| CustodyError::source("the shares do not hold a 32-byte key"))?;
    if set_of(&key) != parsed[0].set {
        return Err(CustodyError::source(
            "the shares do not rebuild the key they were made from: one of them was altered \
             (its checksum recomputed); try another operator's share in place of each in turn",
        ));
    }
    Ok(key)
}

fn set_of(key: &SecretKey) -> [u8; SET_LEN] {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key.expose()),
        b"talos-kms-server shamir set v1",
    );
    tag.as_ref()[..SET_LEN].try_into().expect("8 of 32 bytes")
}

fn checksum(text: &str) -> [u8; 4] {
    digest::digest(&digest::SHA256, text.as_bytes()).as_ref()[..4]
        .try_into()
        .expect("4 of 32 bytes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(threshold: u8, count: u8) -> (SecretKey, Vec<String>) {
        let key = SecretKey::random();
        let lines = split(&key, threshold, count);
        (key, lines)
    }

    #[test]
    fn any_threshold_of_the_shares_rebuilds_the_key() {
        let (key, lines) = shares(3, 5);
        assert_eq!(lines.len(), 5);
        for picked in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let given: Vec<&str> = picked.iter().map(|&i| lines[i].as_str()).collect();
            assert_eq!(combine(3, &given).unwrap().expose(), key.expose());
        }
        let all: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(combine(3, &all).unwrap().expose(), key.expose());
    }

    #[test]
    fn bad_shares_are_named() {
        let (_, lines) = shares(2, 3);
        let (_, others) = shares(2, 3);
        let error = |given: &[&str]| combine(2, given).unwrap_err().to_string();

        let too_few = error(&[&lines[0]]);
        assert!(too_few.contains("1 share given, 2 needed"), "{too_few}");

        let repeated = error(&[&lines[1], &lines[1]]);
        assert!(repeated.contains("share 2 repeats share 1"), "{repeated}");

        let foreign = error(&[&lines[0], &others[1]]);
        assert!(foreign.contains("share 2 does not belong"), "{foreign}");

        // One character mistyped: the checksum names the share.
        let mut typo = lines[1].clone().into_bytes();
        let at = typo.len() - 20;
        typo[at] = if typo[at] == b'0' { b'1' } else { b'0' };
        let typo = String::from_utf8(typo).unwrap();
        let mistyped = error(&[&lines[0], &typo]);
        assert!(mistyped.contains("share 2 is mistyped"), "{mistyped}");

        // Altered with a recomputed checksum: the rebuilt key does not match the set.
        let (body, _) = typo.rsplit_once('-').unwrap();
        let forged = format!("{body}-{}", hex(&checksum(body)));
        let altered = error(&[&lines[0], &forged]);
        assert!(altered.contains("one of them was altered"), "{altered}");

        let garbage = error(&["hello", &lines[0]]);
        assert!(garbage.contains("share 1 is not a share"), "{garbage}");

        let threshold = combine(3, &[&lines[0], &lines[1], &lines[2]])
            .unwrap_err()
            .to_string();
        assert!(threshold.contains("threshold of 2"), "{threshold}");
    }

    #[test]
    fn a_share_survives_surrounding_whitespace() {
        let (key, lines) = shares(2, 2);
        let padded = format!("  {}\n", lines[0]);
        assert_eq!(
            combine(2, &[&padded, &lines[1]]).unwrap().expose(),
            key.expose()
        );
    }
}
