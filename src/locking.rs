//! The one way this crate takes a mutex.

use std::sync::{Mutex, MutexGuard};

/// Takes the lock even when a panic poisoned it: every mutex here guards plain data (maps of
/// timestamps, queue handles, a connection, counters) that a panic mid-update leaves usable,
/// and one panicked task must not stop every later call.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
