//! The legacy JSON database (`nodeDbFile`), which start-up and `import-json` read:
//! `legacy_json::parse` on any bytes. Nothing may panic, what it accepts satisfies what the
//! store relies on, and `export-json`'s writer gives back a file that parses to the same
//! records, so a migration can be undone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talos_kms_server::sealing::TAG_LEN;
use talos_kms_server::store::NewRecord;
use talos_kms_server::store::legacy_json;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = legacy_json::parse(data) else {
        return;
    };
    for record in &records {
        assert!(record.ciphertext.len() >= TAG_LEN);
    }
    let mut file = Vec::new();
    if let Err(e) = legacy_json::write_records(&mut file, &records) {
        panic!("writing to memory failed: {e}");
    }
    let again = match legacy_json::parse(&file) {
        Ok(again) => again,
        Err(e) => panic!(
            "an exported file does not parse: {e}\n{}",
            String::from_utf8_lossy(&file)
        ),
    };
    assert_eq!(again.len(), records.len());
    for (a, b) in records.iter().zip(&again) {
        assert_eq!(fields(a), fields(b));
    }
});

type Fields<'a> = (&'a [u8], &'a str, &'a str, &'a [u8], i64, Option<i64>);

fn fields(record: &NewRecord) -> Fields<'_> {
    (
        &record.nonce,
        &record.node_uuid,
        &record.ip,
        &record.ciphertext,
        record.created_at,
        record.last_access,
    )
}
