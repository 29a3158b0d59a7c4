//! Keeps the secrets in a serving process's memory (sealed blobs, passphrases, the TLS
//! key) out of core dumps and out of other processes' reach.

/// No core dump, ever, and no attaching by other processes of the same user: a crash must
/// not write passphrases to disk, where `systemd-coredump` would keep them for weeks.
pub fn forbid_core_dumps() -> std::io::Result<()> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}
