//! The PROXY protocol header parser, which reads the first bytes of every connection from a
//! trusted proxy: any bytes, read as the listener reads them (whole, and every prefix, as a
//! header split across segments arrives). Nothing may panic; a whole header is never longer
//! than the bytes or the cap; a prefix of a whole header is incomplete, never an error; and
//! bytes after a header never change what it says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use talos_kms_server::listener::proxy_protocol::{MAX_HEADER, Parsed, parse};

fuzz_target!(|bytes: &[u8]| {
    let bytes = &bytes[..bytes.len().min(MAX_HEADER + 64)];
    match parse(bytes) {
        Ok(Parsed::Header { header, len }) => {
            assert!(len <= bytes.len() && len <= MAX_HEADER);
            assert_eq!(parse(&bytes[..len]), Ok(Parsed::Header { header, len }));
            for end in 0..len {
                assert_eq!(parse(&bytes[..end]), Ok(Parsed::Incomplete), "{end} of {len}");
            }
        }
        Ok(Parsed::Incomplete) => assert!(bytes.len() < MAX_HEADER),
        Err(error) => drop(error.to_string()),
    }
});
