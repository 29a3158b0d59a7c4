//! The LUKS2 header reader of `recover`, which reads the disks of dead nodes: the input is a
//! whole device image, opened by `recover::open` (both header copies, checksums, JSON area),
//! then its tokens are read as `recover` does. Nothing may panic.
//!
//! Headers start at 16 KiB, so this target needs `-max_len` well above libFuzzer's default
//! 4096 (scripts/fuzz gives it 65536); a header whose checksum algorithm is not one
//! cryptsetup writes is not verified, which lets mutations reach the JSON area.
#![no_main]

#[path = "common/tokens.rs"]
mod tokens;

use libfuzzer_sys::fuzz_target;
use rustix::fs::{MemfdFlags, memfd_create};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use talos_kms_server::recover::{self, luks2};

fuzz_target!(|image: &[u8]| {
    // An in-memory file: recover opens a path, and this costs no disk.
    let mut device = match memfd_create("luks2-image", MemfdFlags::CLOEXEC) {
        Ok(fd) => File::from(fd),
        Err(e) => panic!("memfd_create: {e}"),
    };
    if let Err(e) = device.write_all(image) {
        panic!("writing the image to memory: {e}");
    }
    let path = PathBuf::from(format!("/proc/self/fd/{}", device.as_raw_fd()));
    match recover::open(&path) {
        Err(error) => drop(error.to_string()),
        Ok(volume) => {
            let offset = volume.header.offset;
            assert!(offset == 0 || luks2::SECONDARY_OFFSETS.contains(&offset));
            assert!(volume.header.json.is_object());
            tokens::check(&volume);
        }
    }
});
