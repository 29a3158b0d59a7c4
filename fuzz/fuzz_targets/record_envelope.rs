//! The record envelope a store hands back: `Envelope::parse` on any bytes, then opening. Nothing
//! may panic; what parses opens only under its key and binding; a real envelope round-trips.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use talos_kms_server::custody::{DataKey, Envelope, RecordBinding, seal_record};

static KEY: LazyLock<DataKey> = LazyLock::new(|| DataKey::generate(1));

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    bytes: &'a [u8],
    record_id: &'a [u8],
    node_uuid: &'a str,
    ip: &'a str,
    ciphertext: &'a [u8],
    other_ip: &'a str,
}

fuzz_target!(|input: Input| {
    let binding = RecordBinding {
        record_id: input.record_id,
        node_uuid: input.node_uuid,
        ip: input.ip,
    };
    if let Ok(envelope) = Envelope::parse(input.bytes) {
        assert_eq!(envelope.version.to_be_bytes(), input.bytes[4..8]);
        // Forging a GCM tag is out of reach.
        assert!(envelope.open(&KEY, &binding).is_err());
    }
    let Ok(sealed) = seal_record(&KEY, &binding, input.ciphertext) else {
        return;
    };
    let envelope = Envelope::parse(&sealed).expect("a sealed record parses");
    assert_eq!(envelope.open(&KEY, &binding).ok().as_deref(), Some(input.ciphertext));
    let other = RecordBinding {
        ip: input.other_ip,
        ..binding
    };
    assert_eq!(envelope.open(&KEY, &other).is_ok(), input.ip == input.other_ip);
});
