//! The parsers of foreign blobs (`takeOver`): any bytes, for any node UUID and address, are
//! sorted into a format and answered as the server that made them would. Nothing may
//! panic, and nothing but a real seal opens: a GCM tag is out of a fuzzer's reach.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use talos_kms_server::sealing::foreign::{
    AesKey, Failure, GUSTINN_VERSION, GustinnHeader, GustinnKeys, Opened, REFERENCE_LEN, Scheme,
    TakeOver,
};
use zeroize::Zeroizing;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    blob: &'a [u8],
    node_uuid: &'a str,
    peer: [u8; 16],
    reference: bool,
    gustinn: bool,
    key_id: &'a str,
    ip_binding: bool,
    key: [u8; 32],
    /// 16, 24 or 32 bytes of `key`.
    key_len: u8,
}

fuzz_target!(|input: Input| {
    let key = || {
        let len = [16, 24, 32][usize::from(input.key_len % 3)];
        AesKey::new(Zeroizing::new(input.key[..len].to_vec())).expect("a valid length")
    };
    let take_over = TakeOver {
        reference: if input.reference { vec![key()] } else { vec![] },
        gustinn: if input.gustinn {
            vec![GustinnKeys {
                keys: vec![(input.key_id.to_string(), key())],
                ip_binding: input.ip_binding,
            }]
        } else {
            vec![]
        },
    };
    let peer = IpAddr::from(input.peer);
    let header = GustinnHeader::parse(input.blob);
    if let Some(header) = &header {
        assert_eq!(input.blob[0], GUSTINN_VERSION);
        assert_eq!(header.len, 2 + usize::from(input.blob[1]));
        assert_eq!(header.key_id, &input.blob[2..header.len]);
    }
    if take_over.is_empty() {
        return;
    }
    match take_over.open(input.blob, input.node_uuid, peer) {
        Opened::Passphrase(..) => panic!("fuzzed bytes opened"),
        Opened::Decoy(Scheme::SideroReference, _) => {
            assert!(input.reference && input.blob.len() == REFERENCE_LEN)
        }
        Opened::Decoy(Scheme::Gustinn, failure) => {
            assert!(input.gustinn && header.is_some());
            if failure == Failure::WrongKeyOrBinding {
                assert_eq!(input.blob.len(), 62 + input.key_id.len());
            }
        }
        Opened::Malformed(scheme, _) => {
            assert!(!(input.reference && input.blob.len() == REFERENCE_LEN));
            if scheme == Some(Scheme::Gustinn) && input.blob.len() != REFERENCE_LEN {
                // A well-formed header with a known key id and the right length opens or
                // is a decoy, never malformed.
                let known = header.is_some_and(|h| h.key_id == input.key_id.as_bytes());
                assert!(!known || input.blob.len() != 62 + input.key_id.len());
            }
        }
    }
});
