//! OS errors as sentences: Rust's `Address already in use (os error 98)` without the
//! number, which tells an operator nothing.

/// The OS's words for `error`, without ` (os error N)`.
pub fn plain(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}
