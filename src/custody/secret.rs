//! Key bytes in memory: zeroed when dropped, locked out of swap where the limit allows, and
//! never printed.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroize;

pub const KEY_LEN: usize = 32;

/// One page of its own per key, so that unlocking one key never unlocks another's page.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Set once an `mlock` was refused (RLIMIT_MEMLOCK too low, or not permitted).
static LOCK_REFUSED: AtomicBool = AtomicBool::new(false);

/// A 256-bit key.
pub struct SecretKey {
    page: Box<Page>,
    locked: bool,
}

impl SecretKey {
    /// Moves `bytes` into a locked page and zeroes the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> SecretKey {
        let mut page = Box::new(Page([0; 4096]));
        let locked = lock(&mut page);
        page.0[..KEY_LEN].copy_from_slice(bytes);
        bytes.zeroize();
        SecretKey { page, locked }
    }

    /// 32 bytes from the system's random generator.
    pub fn random() -> SecretKey {
        let mut bytes = [0u8; KEY_LEN];
        fill_random(&mut bytes);
        SecretKey::from_bytes(&mut bytes)
    }

    /// Takes a slice that must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<SecretKey> {
        let mut array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(SecretKey::from_bytes(&mut array))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.page.0[..KEY_LEN]
            .try_into()
            .expect("a page holds a key")
    }
}

impl Drop for SecretKey {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        self.page.0.zeroize();
        if self.locked {
            let range = self.page.0.as_mut_ptr_range();
            // SAFETY: the range is exactly this key's page, which this key alone owns, and is
            // still allocated here; munlock only changes residency, never the memory's contents.
            let _ = unsafe { rustix::mm::munlock(range.start.cast(), 4096) };
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

#[allow(unsafe_code)]
fn lock(page: &mut Page) -> bool {
    let start = page.0.as_mut_ptr();
    // SAFETY: `page` is one page-aligned, page-sized allocation that lives as long as the key
    // (munlock'ed in Drop before it is freed); mlock only pins it, never reads or writes it.
    let locked = unsafe { rustix::mm::mlock(start.cast(), 4096) }.is_ok();
    if !locked && !LOCK_REFUSED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "keys cannot be locked in memory (mlock refused: raise LimitMEMLOCK=); they may \
             reach swap"
        );
    }
    locked
}

/// Why keys may reach swap, when they may: the RLIMIT_MEMLOCK soft limit is below what a few
/// keys need, or an `mlock` was refused. `None` when keys can be locked.
pub fn memory_lock_shortfall() -> Option<String> {
    const NEEDED: u64 = 64 * 4096;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    match limit.current {
        Some(bytes) if bytes < NEEDED && !rustix::process::geteuid().is_root() => {
            Some(format!("RLIMIT_MEMLOCK is {bytes} bytes"))
        }
        _ if LOCK_REFUSED.load(Ordering::Relaxed) => Some("mlock was refused".into()),
        _ => None,
    }
}

pub fn fill_random(bytes: &mut [u8]) {
    aws_lc_rs::rand::fill(bytes).expect("the system random generator failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let mut bytes = [0xab; KEY_LEN];
        let key = SecretKey::from_bytes(&mut bytes);
        assert_eq!(bytes, [0; KEY_LEN], "the caller's copy is zeroed");
        let shown = format!("{key:?} {key:#?}");
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
        assert_eq!(key.expose(), &[0xab; KEY_LEN]);
    }

    #[test]
    fn random_keys_differ() {
        assert_ne!(SecretKey::random().expose(), SecretKey::random().expose());
    }
}
