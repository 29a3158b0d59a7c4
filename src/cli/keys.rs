//! `keys`: list, show, revoke, restore and purge records, while the server runs; every
//! change takes effect on the server's next request and goes to the audit trail.
//!
//! Bindings of foreign blobs (`takeOver`) are shown and revoked like records of their
//! scheme, with ids `b1`, `b2`...

use super::Output;
use super::admin::{Admin, AdminArgs, OutputArg};
use super::key_rotation;
use super::progress::Progress;
use super::time_text::{date, parse_age, parse_date, rfc3339};
use anyhow::bail;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use talos_kms_server::audit::Event;
use talos_kms_server::store::{
    self, Binding, BindingId, RecordFilter, RecordId, RecordInfo, RecordState, UnixTime,
};

/// Records read per query: bounds memory for listings of millions.
const PAGE: usize = 10_000;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// One row per record: id, node UUID, address, created, last access, state, scheme
    /// (`native`, or that of a server taken over: its bindings have ids `b1`, `b2`...).
    List {
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Everything known of one record (never its key or ciphertext).
    Show {
        /// Record id, as `keys list` shows it.
        #[arg(value_parser = parse_key)]
        id: Key,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Revoke records: their unseals get random bytes, like a wrong key. Reversible.
    Revoke {
        /// Record ids, as `keys list` shows them.
        #[arg(required_unless_present = "node", conflicts_with = "node", value_parser = parse_key)]
        ids: Vec<Key>,
        /// Every record (and binding) of this node UUID instead.
        #[arg(long, value_name = "UUID")]
        node: Option<String>,
    },
    /// Undo a revocation: the records unseal again.
    Restore {
        /// Record ids, as `keys list --state revoked` shows them.
        #[arg(required = true, value_parser = parse_key)]
        ids: Vec<Key>,
    },
    /// Delete records for good: revoked ones, or those not used for a time (give one or
    /// both). Shows them and asks first.
    #[command(group(clap::ArgGroup::new("selector")
        .args(["revoked", "not_accessed_for"])
        .required(true)
        .multiple(true)))]
    Purge {
        /// Revoked records.
        #[arg(long)]
        revoked: bool,
        /// Records neither unsealed nor created within this time (e.g. 90d, 12w, 36h).
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        not_accessed_for: Option<i64>,
        /// Delete without asking (for scripts).
        #[arg(long)]
        yes: bool,
        /// Show what would be deleted, delete nothing.
        #[arg(long, conflicts_with = "yes")]
        dry_run: bool,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Make data key version v+1 (`keySource` configured): new seals use it within seconds,
    /// and servers re-wrap older records in the background while they serve.
    RotateDataKey,
    /// Re-wrap the data keys under the key source of another config (a new key file, TPM
    /// object or HSM key), or with `shamir` under a new root split into new shares (printed
    /// once); records are not touched. Then point the servers at it.
    RotateRoot {
        /// The config whose `keySource` is the new one (`key-source init` it first); not
        /// with `shamir`, where the running server makes the new root and its shares.
        #[arg(long, value_name = "FILE")]
        to_config: Option<PathBuf>,
    },
    /// Destroy a data key version for good (crypto-shredding): the kill switch for the
    /// records it wraps. Refused for the current version, and while records use it unless
    /// --shred.
    DestroyDataKey {
        /// The version, as `check` lists them (e.g. 1 for v1).
        version: u32,
        /// Destroy it even though records use it: they become unreadable for good.
        #[arg(long)]
        shred: bool,
        /// Do it without asking (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args)]
struct Filter {
    /// Only records of this node UUID.
    #[arg(long, value_name = "UUID")]
    node: Option<String>,
    /// Only records sealed from this address (as listed, e.g. 10.0.0.201).
    #[arg(long, value_name = "IP")]
    ip: Option<String>,
    /// Only active or only revoked records.
    #[arg(long, value_enum)]
    state: Option<State>,
    /// Only records neither unsealed nor created within this time (e.g. 90d, 12w, 36h).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    not_accessed_for: Option<i64>,
    /// Only records created before this day (YYYY-MM-DD, UTC) or time (RFC 3339).
    #[arg(long, value_name = "DATE", value_parser = parse_date)]
    created_before: Option<UnixTime>,
}

/// A record id as `keys list` shows it: a number for this server's own records, `b` and a
/// number for a binding of a foreign blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Record(RecordId),
    Binding(BindingId),
}

fn parse_key(text: &str) -> Result<Key, String> {
    let (binding, number) = match text.strip_prefix('b') {
        Some(number) => (true, number),
        None => (false, text),
    };
    let id = number.parse().map_err(|_| {
        format!("{text:?} is not a record id: a number, or b and a number for a binding")
    })?;
    Ok(if binding {
        Key::Binding(id)
    } else {
        Key::Record(id)
    })
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Record(id) => write!(f, "{id}"),
            Key::Binding(id) => write!(f, "b{id}"),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum State {
    Active,
    Revoked,
}

pub async fn run(
    args: Args,
    config: Option<PathBuf>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let config = args.admin.config_path(config)?;
    let admin = Admin::open(&config).await?;
    match args.action {
        Action::List {
            filter,
            output: OutputArg { output },
        } => list(&admin, filter.into(), output).await,
        Action::Show {
            id,
            output: OutputArg { output },
        } => show(&admin, id, output).await,
        Action::RotateDataKey => key_rotation::rotate_data_key(&admin, command_line).await,
        Action::RotateRoot { to_config } => {
            key_rotation::rotate_root(&admin, to_config.as_deref(), command_line).await
        }
        Action::DestroyDataKey {
            version,
            shred,
            yes,
        } => key_rotation::destroy_data_key(&admin, version, shred, yes, command_line).await,
        Action::Revoke { ids, node } => {
            let ids = match node {
                Some(node) => {
                    let filter = RecordFilter {
                        node_uuid: Some(node.clone()),
                        ..RecordFilter::default()
                    };
                    let mut ids: Vec<Key> = ids_of(&admin, &filter)
                        .await?
                        .into_iter()
                        .map(Key::Record)
                        .collect();
                    for_each_binding(&admin, &filter, |binding| {
                        ids.push(Key::Binding(binding.info.id));
                    })
                    .await?;
                    if ids.is_empty() {
                        bail!("no record has node UUID {node:?}; `keys list` shows the records");
                    }
                    ids
                }
                None => ids,
            };
            change(&admin, &ids, Some(store::now()), command_line).await
        }
        Action::Restore { ids } => change(&admin, &ids, None, command_line).await,
        Action::Purge {
            revoked,
            not_accessed_for,
            yes,
            dry_run,
            output: OutputArg { output },
        } => {
            let filter = RecordFilter {
                state: revoked.then_some(RecordState::Revoked),
                not_used_since: not_accessed_for.map(|age| store::now() - age),
                ..RecordFilter::default()
            };
            purge(&admin, filter, yes, dry_run, output, command_line).await
        }
    }
}

impl From<Filter> for RecordFilter {
    fn from(filter: Filter) -> Self {
        RecordFilter {
            node_uuid: filter.node,
            ip: filter.ip,
            state: filter.state.map(|state| match state {
                State::Active => RecordState::Active,
                State::Revoked => RecordState::Revoked,
            }),
            not_used_since: filter.not_accessed_for.map(|age| store::now() - age),
            created_before: filter.created_before,
            ids: None,
            key_version_other_than: None,
        }
    }
}

/// Calls `each` with every record matching `filter`, a page at a time.
async fn for_each(
    admin: &Admin,
    filter: &RecordFilter,
    mut each: impl FnMut(&RecordInfo),
) -> anyhow::Result<u64> {
    let (mut after, mut count) = (0, 0);
    loop {
        let page = admin.store.list(filter, after, PAGE).await?;
        for record in &page {
            each(record);
        }
        count += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.id,
            _ => return Ok(count),
        }
    }
}

/// Calls `each` with every binding of a foreign blob matching `filter`, a page at a time.
async fn for_each_binding(
    admin: &Admin,
    filter: &RecordFilter,
    mut each: impl FnMut(&Binding),
) -> anyhow::Result<u64> {
    let (mut after, mut count) = (0, 0);
    loop {
        let page = admin.store.bindings(filter, after, PAGE).await?;
        for binding in &page {
            each(binding);
        }
        count += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.info.id,
            _ => return Ok(count),
        }
    }
}

async fn ids_of(admin: &Admin, filter: &RecordFilter) -> anyhow::Result<Vec<RecordId>> {
    let mut ids = Vec::new();
    for_each(admin, filter, |record| ids.push(record.id)).await?;
    Ok(ids)
}

async fn list(admin: &Admin, filter: RecordFilter, output: Output) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    if output == Output::Text {
        writeln!(stdout, "{}", header())?;
    }
    let mut failed = None;
    let mut print = |key: Key, scheme: &str, record: &RecordInfo| {
        let line = match output {
            Output::Text => row(key, scheme, record),
            Output::Json => json(key, scheme, record).to_string(),
        };
        if let Err(e) = writeln!(stdout, "{line}") {
            failed.get_or_insert(e);
        }
    };
    let mut count = for_each(admin, &filter, |record| {
        print(Key::Record(record.id), NATIVE, record);
    })
    .await?;
    count += for_each_binding(admin, &filter, |binding| {
        print(
            Key::Binding(binding.info.id),
            &binding.scheme,
            &binding.info,
        );
    })
    .await?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if output == Output::Text {
        writeln!(stdout, "{count} records")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(admin: &Admin, key: Key, output: Output) -> anyhow::Result<ExitCode> {
    let (id, found) = match key {
        Key::Record(id) => (
            id,
            admin
                .store
                .list(&only(id), 0, 1)
                .await?
                .pop()
                .map(|r| (NATIVE.to_string(), r)),
        ),
        Key::Binding(id) => (
            id,
            admin
                .store
                .bindings(&only(id), 0, 1)
                .await?
                .pop()
                .map(|b| (b.scheme, b.info)),
        ),
    };
    let Some((scheme, record)) = found.filter(|(_, record)| record.id == id) else {
        bail!("no record has id {key}; `keys list` shows the records");
    };
    match output {
        Output::Json => println!("{}", json(key, &scheme, &record)),
        Output::Text => {
            println!("id           {key}");
            println!("scheme       {scheme}");
            println!("node UUID    {}", record.node_uuid);
            println!("address      {}", record.ip);
            println!("created      {}", date(Some(record.created_at)));
            println!("last access  {}", date(record.last_access));
            match record.revoked_at {
                Some(at) => println!("state        revoked since {}", date(Some(at))),
                None => println!("state        active"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn only(id: i64) -> RecordFilter {
    RecordFilter {
        ids: Some(vec![id]),
        ..RecordFilter::default()
    }
}

/// Revokes (`Some`) or restores (`None`) records and bindings by id.
async fn change(
    admin: &Admin,
    keys: &[Key],
    revoked_at: Option<UnixTime>,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let (mut records, mut bindings) = (Vec::new(), Vec::new());
    for key in keys {
        match *key {
            Key::Record(id) => records.push(id),
            Key::Binding(id) => bindings.push(id),
        }
    }
    let mut known: Vec<Key> = Vec::new();
    if !records.is_empty() {
        let filter = RecordFilter {
            ids: Some(records),
            ..RecordFilter::default()
        };
        known.extend(ids_of(admin, &filter).await?.into_iter().map(Key::Record));
    }
    if !bindings.is_empty() {
        let filter = RecordFilter {
            ids: Some(bindings),
            ..RecordFilter::default()
        };
        for_each_binding(admin, &filter, |binding| {
            known.push(Key::Binding(binding.info.id));
        })
        .await?;
    }
    let unknown: Vec<String> = keys
        .iter()
        .filter(|key| !known.contains(key))
        .map(ToString::to_string)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "no record has id {}; nothing was changed (`keys list` shows the records)",
            unknown.join(", ")
        );
    }
    let (records, bindings): (Vec<Key>, Vec<Key>) =
        known.iter().partition(|key| matches!(key, Key::Record(_)));
    // Custody, where configured, tags each row's new state.
    let ids = |keys: Vec<Key>| -> Vec<(i64, Option<Vec<u8>>)> {
        keys.into_iter()
            .map(|key| match key {
                Key::Record(id) | Key::Binding(id) => (id, None),
            })
            .collect()
    };
    let mut changed = 0;
    if !records.is_empty() {
        changed += admin.store.set_revoked(&ids(records), revoked_at).await?;
    }
    if !bindings.is_empty() {
        changed += admin
            .store
            .set_bindings_revoked(&ids(bindings), revoked_at)
            .await?;
    }
    let (verb, already) = match revoked_at {
        Some(_) => ("revoked", "already revoked"),
        None => ("restored", "already active"),
    };
    let summary = format!(
        "{verb} {changed} of {} records ({} {already})",
        known.len(),
        known.len() as u64 - changed
    );
    admin.audit(Event::admin(&command_line[0], &command_line[1..]).detail(&summary))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

async fn purge(
    admin: &Admin,
    filter: RecordFilter,
    yes: bool,
    dry_run: bool,
    output: Output,
    command_line: &[String],
) -> anyhow::Result<ExitCode> {
    let mut doomed = Vec::new();
    if output == Output::Text {
        println!("{}", header());
    }
    for_each(admin, &filter, |record| {
        let key = Key::Record(record.id);
        match output {
            Output::Text => println!("{}", row(key, NATIVE, record)),
            Output::Json => println!("{}", json(key, NATIVE, record)),
        }
        doomed.push(record.id);
    })
    .await?;
    let listed = doomed.len();
    let say = |deleted: u64, summary: &str| match output {
        Output::Text => println!("{summary}"),
        Output::Json => println!(
            "{}",
            serde_json::json!({"listed": listed, "deleted": deleted, "summary": summary})
        ),
    };
    if doomed.is_empty() {
        say(0, "no record to purge");
        return Ok(ExitCode::SUCCESS);
    }
    if dry_run {
        say(
            0,
            &format!("would delete {listed} records (--dry-run: nothing deleted)"),
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !yes && !confirmed(listed)? {
        say(0, "nothing deleted");
        return Ok(ExitCode::FAILURE);
    }
    let mut progress = Progress::new("deleted", Some(listed as u64));
    let mut deleted = 0;
    for chunk in doomed.chunks(PAGE) {
        // The filter again: a record restored or unsealed since it was listed is kept.
        deleted += admin.store.delete(chunk, &filter).await?;
        progress.update(deleted);
    }
    progress.finish();
    let summary = format!(
        "deleted {deleted} of {listed} records listed ({} changed since and were kept)",
        listed as u64 - deleted
    );
    admin.audit(Event::admin(&command_line[0], &command_line[1..]).detail(&summary))?;
    say(deleted, &summary);
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; without one, refuses rather than guess.
fn confirmed(count: usize) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "not deleting {count} records without confirmation: run it on a terminal, or add \
             --yes (--dry-run shows what would go)"
        );
    }
    print!(
        "Delete these {count} records for good? A node whose only key is one of them can no \
         longer open its disk. [y/N] "
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES"))
}

/// The scheme column of this server's own records.
const NATIVE: &str = "native";

fn header() -> String {
    format!(
        "{:>8}  {:<36}  {:<15}  {:<19}  {:<19}  {:<7}  SCHEME",
        "ID", "NODE UUID", "ADDRESS", "CREATED", "LAST ACCESS", "STATE"
    )
}

fn row(key: Key, scheme: &str, record: &RecordInfo) -> String {
    format!(
        "{:>8}  {:<36}  {:<15}  {:<19}  {:<19}  {:<7}  {scheme}",
        key.to_string(),
        record.node_uuid,
        record.ip,
        date(Some(record.created_at)),
        date(record.last_access),
        state_name(record.state())
    )
}

/// A record's id is its number, a binding's the text `keys revoke` takes (`b3`).
fn json(key: Key, scheme: &str, record: &RecordInfo) -> serde_json::Value {
    let id = match key {
        Key::Record(id) => serde_json::json!(id),
        Key::Binding(_) => serde_json::json!(key.to_string()),
    };
    serde_json::json!({
        "id": id,
        "scheme": scheme,
        "node_uuid": record.node_uuid,
        "ip": record.ip,
        "created": rfc3339(Some(record.created_at)),
        "last_access": rfc3339(record.last_access),
        "state": state_name(record.state()),
        "revoked_at": rfc3339(record.revoked_at),
    })
}

fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::Active => "active",
        RecordState::Revoked => "revoked",
    }
}
