//! The SQLite schema, as numbered migrations that mirror PostgreSQL's, and the check that a
//! file is ours and not newer than this build before any of them is applied.

use crate::store::StoreError;
use rusqlite::{Connection, TransactionBehavior};

/// Marks the file as ours ("TKMS"), so that a foreign SQLite file is never migrated.
pub(super) const APPLICATION_ID: i64 = 0x544B_4D53;

/// Schema migrations; `PRAGMA user_version` is the number applied. Append, never edit.
pub(super) const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE records (
        id          INTEGER PRIMARY KEY,
        nonce       BLOB    NOT NULL UNIQUE CHECK (length(nonce) = 12),
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        ciphertext  BLOB    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER
    );
    CREATE TABLE legacy_imports (
        fingerprint TEXT    PRIMARY KEY,
        imported_at INTEGER NOT NULL,
        records     INTEGER NOT NULL
    );
",
    // Revocation, and the index `keys revoke --node` and `keys list --node` use.
    "
    ALTER TABLE records ADD COLUMN revoked_at INTEGER;
    CREATE INDEX records_by_node ON records (node_uuid);
",
    // Policy state, and the index the hourly quota counts with.
    "
    CREATE INDEX records_by_creation ON records (created_at);
    CREATE TABLE windows (
        operation   TEXT    PRIMARY KEY CHECK (operation IN ('seal', 'unseal')),
        opened_at   INTEGER NOT NULL,
        closes_at   INTEGER NOT NULL
    );
    CREATE TABLE approvals (
        id             INTEGER PRIMARY KEY,
        operation      TEXT    NOT NULL CHECK (operation IN ('seal', 'unseal')),
        node_uuid      TEXT    NOT NULL,
        ip             TEXT    NOT NULL,
        state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        approved_until INTEGER,
        decided_at     INTEGER,
        UNIQUE (operation, node_uuid, ip)
    );
",
    // Ids never come back after a purge: an old audit line's id must not name another
    // node's record (or approval). SQLite can only add AUTOINCREMENT by rebuilding a table.
    "
    CREATE TABLE records_autoincrement (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        nonce       BLOB    NOT NULL UNIQUE CHECK (length(nonce) = 12),
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        ciphertext  BLOB    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER,
        revoked_at  INTEGER
    );
    INSERT INTO records_autoincrement
        SELECT id, nonce, node_uuid, ip, ciphertext, created_at, last_access, revoked_at
        FROM records;
    DROP TABLE records;
    ALTER TABLE records_autoincrement RENAME TO records;
    CREATE INDEX records_by_node ON records (node_uuid);
    CREATE INDEX records_by_creation ON records (created_at);
    CREATE TABLE approvals_autoincrement (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        operation      TEXT    NOT NULL CHECK (operation IN ('seal', 'unseal')),
        node_uuid      TEXT    NOT NULL,
        ip             TEXT    NOT NULL,
        state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
        first_seen     INTEGER NOT NULL,
        last_seen      INTEGER NOT NULL,
        attempts       INTEGER NOT NULL,
        approved_until INTEGER,
        decided_at     INTEGER,
        UNIQUE (operation, node_uuid, ip)
    );
    INSERT INTO approvals_autoincrement
        SELECT id, operation, node_uuid, ip, state, first_seen, last_seen, attempts,
               approved_until, decided_at
        FROM approvals;
    DROP TABLE approvals;
    ALTER TABLE approvals_autoincrement RENAME TO approvals;
",
    // Foreign blobs (`takeOver`) bound to their first caller, by fingerprint.
    "
    CREATE TABLE foreign_bindings (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint BLOB    NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
        scheme      TEXT    NOT NULL,
        node_uuid   TEXT    NOT NULL,
        ip          TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        last_access INTEGER,
        revoked_at  INTEGER
    );
    CREATE INDEX foreign_bindings_by_node ON foreign_bindings (node_uuid);
",
    // Key custody: the data key version a record is wrapped under, tags over what the
    // policy trusts, and custody's own values (wrapped data keys), all opaque here.
    "
    ALTER TABLE records ADD COLUMN key_version INTEGER;
    ALTER TABLE records ADD COLUMN tag BLOB;
    ALTER TABLE approvals ADD COLUMN tag BLOB;
    ALTER TABLE windows ADD COLUMN tag BLOB;
    ALTER TABLE foreign_bindings ADD COLUMN tag BLOB;
    CREATE TABLE custody (
        name        TEXT    PRIMARY KEY,
        value       BLOB    NOT NULL
    );
",
];

/// The applied schema version, after making sure the file is ours (or empty) and not newer
/// than this build knows.
pub(super) fn schema_state(conn: &Connection) -> Result<usize, StoreError> {
    let application_id: i64 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table'",
        [],
        |r| r.get(0),
    )?;
    let problem = |problem: String| StoreError::Open {
        path: String::new(),
        problem,
    };
    if application_id != APPLICATION_ID && (application_id != 0 || has_tables) {
        return Err(problem(
            "is an SQLite file of another program; point `database` at a new file or at a \
             talos-kms-server database"
                .into(),
        ));
    }
    if version > MIGRATIONS.len() {
        return Err(problem(format!(
            "has schema version {version}, newer than this server knows ({}); run a newer \
             talos-kms-server",
            MIGRATIONS.len()
        )));
    }
    Ok(version)
}

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = schema_state(&tx)?;
    for migration in &MIGRATIONS[version..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}
