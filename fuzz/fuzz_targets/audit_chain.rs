//! The audit chain reader (`audit verify`) on any bytes, as one file or split in two at the
//! first 0xFF byte (a rotated file and the current one), with and without a key. Nothing may
//! panic, and what it accepts adds up: every line counted is a line of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talos_kms_server::audit::{Verifier, checkpoint_key};

fuzz_target!(|data: &[u8]| {
    let files: Vec<&[u8]> = match data.iter().position(|&byte| byte == 0xFF) {
        Some(split) => vec![&data[..split], &data[split + 1..]],
        None => vec![data],
    };
    let key = checkpoint_key(&[7; 32]);
    for key in [None, Some(&key)] {
        for earlier_files_gone in [false, true] {
            let mut verifier = Verifier::new(key, earlier_files_gone);
            let mut accepted = true;
            for (n, file) in files.iter().enumerate() {
                if verifier.file("f", file, n + 1 == files.len()).is_err() {
                    accepted = false;
                    break;
                }
            }
            if !accepted {
                continue;
            }
            let found = verifier.finish();
            let newlines = data.iter().filter(|&&byte| byte == b'\n').count() as u64;
            assert!(
                found.lines <= newlines,
                "{} lines from {newlines} newlines",
                found.lines
            );
            assert!(found.unprotected <= found.lines);
            assert!(found.unchained <= found.lines + found.torn.len() as u64);
        }
    }
});
