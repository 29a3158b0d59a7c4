//! gRPC request bodies as the service decodes them (prost), then the policy checks that run
//! before any key material is touched. Nothing may panic, and what the policy lets through
//! must be what the service relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use talos_kms_server::policy::{MAX_NODE_UUID_LEN, MAX_PASSPHRASE_LEN, check_seal, check_unseal};
use talos_kms_server::proto::Request;
use talos_kms_server::sealing::{SEALED_LEN, SealedBlob};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Request::decode(data) else {
        return;
    };
    let uuid_ok = (1..=MAX_NODE_UUID_LEN).contains(&request.node_uuid.len());
    let seal = check_seal(&request);
    assert_eq!(
        seal.is_ok(),
        uuid_ok && (1..=MAX_PASSPHRASE_LEN).contains(&request.data.len())
    );
    let unseal = check_unseal(&request);
    assert_eq!(unseal.is_ok(), uuid_ok && request.data.len() == SEALED_LEN);
    if unseal.is_ok() {
        assert!(SealedBlob::parse(&request.data).is_some());
    }
    // A malformed request gets INVALID_ARGUMENT and nothing else (README, Answers).
    for refusal in [seal.err(), unseal.err()].into_iter().flatten() {
        assert_eq!(refusal.code(), tonic::Code::InvalidArgument);
    }
    // What decodes encodes back to a message that decodes to the same request.
    let again = Request::decode(request.encode_to_vec().as_slice());
    assert_eq!(again.ok().as_ref(), Some(&request));
});
