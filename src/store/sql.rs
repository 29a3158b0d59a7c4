//! What the two SQL stores say alike, written once: the conditions of a listing, the
//! columns of a row and what they may hold, and the pending-approval state machine. The
//! statements use PostgreSQL's `$N` placeholders; [`Dialect::sql`] gives SQLite its `?N`.
//!
//! A row that does not decode (an operation or state this build does not know, a negative
//! count) is an error: a store that cannot read its own row says so, and never guesses.

use super::{
    Approval, ApprovalState, Decision, Operation, RecordFilter, RecordId, RecordState, StoreError,
    UnixTime, Window,
};

#[derive(Clone, Copy)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sql`, written with `$N` placeholders, in this dialect.
    pub fn sql(self, sql: &str) -> String {
        match self {
            Dialect::Postgres => sql.to_string(),
            Dialect::Sqlite => sql.replace('$', "?"),
        }
    }
}

/// A value bound to a placeholder of [`conditions`].
pub enum Value {
    Integer(i64),
    Text(String),
}

pub const INFO_COLUMNS: &str = "id, node_uuid, ip, created_at, last_access, revoked_at";
/// After [`INFO_COLUMNS`] in a whole record.
pub const RECORD_COLUMNS: &str = "nonce, ciphertext, key_version, tag";

/// A stored key version; one that is not a version (edited by hand) reads as unwrapped,
/// which custody then refuses as it would any unwrapped record once all are wrapped.
pub fn key_version(version: Option<i64>) -> Option<u32> {
    version.and_then(|v| u32::try_from(v).ok())
}

/// The filter as an SQL condition over `records`, with its values in order.
pub fn conditions(
    filter: &RecordFilter,
    after: RecordId,
    dialect: Dialect,
) -> (String, Vec<Value>) {
    let mut sql = vec!["id > $1".to_string()];
    let mut values = vec![Value::Integer(after)];
    let mut bind = |condition: &str, value: Value| {
        values.push(value);
        sql.push(condition.replace('?', &format!("${}", values.len())));
    };
    if let Some(node) = &filter.node_uuid {
        bind("node_uuid = ?", Value::Text(node.clone()));
    }
    if let Some(ip) = &filter.ip {
        bind("ip = ?", Value::Text(ip.clone()));
    }
    if let Some(before) = filter.not_used_since {
        bind(
            "coalesce(last_access, created_at) < ?",
            Value::Integer(before),
        );
    }
    if let Some(before) = filter.created_before {
        bind("created_at < ?", Value::Integer(before));
    }
    if let Some(version) = filter.key_version_other_than {
        bind(
            "(key_version IS NULL OR key_version <> ?)",
            Value::Integer(version.into()),
        );
    }
    match filter.state {
        Some(RecordState::Active) => sql.push("revoked_at IS NULL".into()),
        Some(RecordState::Revoked) => sql.push("revoked_at IS NOT NULL".into()),
        None => {}
    }
    if let Some(ids) = &filter.ids {
        // Ids are integers: written out, they need no binding and no limit on variables.
        let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
        sql.push(format!("id IN ({})", list.join(",")));
    }
    (dialect.sql(&sql.join(" AND ")), values)
}

pub const APPROVAL_COLUMNS: &str = "id, operation, node_uuid, ip, state, first_seen, last_seen, \
                                    attempts, approved_until, decided_at, tag";

/// The columns of [`APPROVAL_COLUMNS`] as read, before they are trusted.
pub struct ApprovalRow {
    pub id: i64,
    pub operation: String,
    pub node_uuid: String,
    pub ip: String,
    pub state: String,
    pub first_seen: UnixTime,
    pub last_seen: UnixTime,
    pub attempts: i64,
    pub approved_until: Option<UnixTime>,
    pub decided_at: Option<UnixTime>,
    pub tag: Option<Vec<u8>>,
}

impl ApprovalRow {
    pub fn decode(self) -> Result<Approval, StoreError> {
        let id = self.id;
        let unreadable = |problem: String| StoreError::Unreadable {
            table: "approvals",
            problem: format!("id {id}: {problem}"),
        };
        Ok(Approval {
            id: self.id,
            operation: operation(&self.operation).map_err(unreadable)?,
            state: ApprovalState::parse(&self.state)
                .ok_or_else(|| unreadable(format!("unknown state {:?}", self.state)))?,
            attempts: u64::try_from(self.attempts)
                .map_err(|_| unreadable(format!("attempts is {}", self.attempts)))?,
            node_uuid: self.node_uuid,
            ip: self.ip,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            approved_until: self.approved_until,
            decided_at: self.decided_at,
            tag: self.tag,
        })
    }
}

pub const WINDOW_COLUMNS: &str = "operation, opened_at, closes_at, tag";

pub fn window(
    operation_text: &str,
    opened_at: UnixTime,
    closes_at: UnixTime,
    tag: Option<Vec<u8>>,
) -> Result<Window, StoreError> {
    Ok(Window {
        operation: operation(operation_text).map_err(|problem| StoreError::Unreadable {
            table: "windows",
            problem,
        })?,
        opened_at,
        closes_at,
        tag,
    })
}

fn operation(text: &str) -> Result<Operation, String> {
    Operation::parse(text).ok_or_else(|| format!("unknown operation {text:?}"))
}

/// The pending-approval state machine. A refused call of a known (operation, node, address)
/// counts one more attempt, and an approval that ran out is pending again; an unknown one
/// becomes pending while fewer than the limit are; an operator's decision approves (until a
/// time) or denies.
pub mod approvals {
    use super::{APPROVAL_COLUMNS, ApprovalState, Decision, UnixTime};

    /// `$1` operation, `$2` node, `$3` address, `$4` now.
    pub fn touch() -> String {
        format!(
            "UPDATE approvals SET last_seen = $4, attempts = attempts + 1,
                 state = CASE WHEN state = 'approved' AND approved_until <= $4
                              THEN 'pending' ELSE state END
             WHERE operation = $1 AND node_uuid = $2 AND ip = $3
             RETURNING {APPROVAL_COLUMNS}"
        )
    }

    pub const COUNT_PENDING: &str = "SELECT count(*) FROM approvals WHERE state = 'pending'";

    /// Whether another request may become pending.
    pub fn room_for_one_more(pending: i64, max_pending: u64) -> bool {
        u64::try_from(pending).is_ok_and(|pending| pending < max_pending)
    }

    /// `$1` operation, `$2` node, `$3` address, `$4` now. Another replica may have added the
    /// same request meanwhile: then it is one more attempt of that one.
    pub fn add_pending() -> String {
        format!(
            "INSERT INTO approvals
             (operation, node_uuid, ip, state, first_seen, last_seen, attempts)
             VALUES ($1, $2, $3, 'pending', $4, $4, 1)
             ON CONFLICT (operation, node_uuid, ip) DO UPDATE
             SET last_seen = excluded.last_seen, attempts = approvals.attempts + 1
             RETURNING {APPROVAL_COLUMNS}"
        )
    }

    /// `$1` id, `$2` state, `$3` approved until, `$4` now, `$5` tag; bound from [`decided`].
    pub fn decide() -> String {
        format!(
            "UPDATE approvals SET state = $2, approved_until = $3, decided_at = $4, tag = $5
             WHERE id = $1 RETURNING {APPROVAL_COLUMNS}"
        )
    }

    /// The state and expiry a decision writes.
    pub fn decided(decision: Decision) -> (&'static str, Option<UnixTime>) {
        match decision {
            Decision::Approve { until } => (ApprovalState::Approved.as_str(), Some(until)),
            Decision::Deny => (ApprovalState::Denied.as_str(), None),
        }
    }
}
