//! The tokens of a LUKS2 header's JSON metadata, as `recover` reads them: the input is the
//! JSON text, so mutations are not spent on the binary header and its checksum (see
//! luks2_header for those). Nothing may panic.
#![no_main]

#[path = "common/tokens.rs"]
mod tokens;

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use talos_kms_server::recover::Volume;
use talos_kms_server::recover::luks2::Header;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // The header reader hands on objects only.
    if !json.is_object() {
        return;
    }
    let volume = Volume {
        path: PathBuf::from("/dev/fuzz"),
        header: Header {
            offset: 0,
            seqid: 0,
            json,
        },
        primary_flaw: None,
    };
    tokens::check(&volume);
});
