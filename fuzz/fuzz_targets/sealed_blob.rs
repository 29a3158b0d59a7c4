//! The pure part of Unseal: the blob a node sends, split by `SealedBlob::parse`, then opened
//! against a stored ciphertext for a node UUID and an address text. Nothing may panic, and a
//! blob only opens for the binding (UUID then address, concatenated) it was sealed with.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use talos_kms_server::sealing::{self, SEALED_LEN, SealedBlob};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    blob: &'a [u8],
    ciphertext: &'a [u8],
    node_uuid: &'a str,
    peer_ip: &'a str,
    /// Sealed for real, to check the round trip with the fuzzed binding.
    passphrase: &'a [u8],
    other_uuid: &'a str,
    other_ip: &'a str,
}

fuzz_target!(|input: Input| {
    match SealedBlob::parse(input.blob) {
        None => assert_ne!(input.blob.len(), SEALED_LEN),
        Some(blob) => {
            assert_eq!(blob.nonce, input.blob[..blob.nonce.len()]);
            // Random ciphertexts must fail cleanly: forging a GCM tag is out of reach.
            let opened = sealing::unseal(&blob, input.ciphertext, input.node_uuid, input.peer_ip);
            assert!(opened.is_err());
            sealing::unseal_nothing(&blob, input.node_uuid, input.peer_ip);
        }
    }

    let Ok(sealed) = sealing::seal(input.node_uuid, input.peer_ip, input.passphrase) else {
        return;
    };
    let Some(blob) = SealedBlob::parse(&sealed.blob[..]) else {
        panic!("a blob from seal does not parse");
    };
    let opened = sealing::unseal(&blob, &sealed.ciphertext, input.node_uuid, input.peer_ip);
    assert_eq!(opened.as_deref(), Ok(input.passphrase));
    // The AAD is the plain concatenation, as in the legacy server: another split of the same
    // text opens too, any other text does not.
    let same_binding =
        [input.node_uuid, input.peer_ip].concat() == [input.other_uuid, input.other_ip].concat();
    let other = sealing::unseal(&blob, &sealed.ciphertext, input.other_uuid, input.other_ip);
    assert_eq!(other.is_ok(), same_binding);
});
