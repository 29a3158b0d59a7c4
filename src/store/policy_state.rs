//! The state that policy keeps (unlock windows, approvals) and the counts it asks for
//! (quotas, pinning). It lives in the store, not in a server's memory, so that an admin
//! command takes effect on the next request and every replica sharing a store obeys it.

use super::UnixTime;

/// The two calls a policy governs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Seal,
    Unseal,
}

impl Operation {
    pub const ALL: [Operation; 2] = [Operation::Seal, Operation::Unseal];

    /// As stored, printed and typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Seal => "seal",
            Operation::Unseal => "unseal",
        }
    }

    pub fn parse(text: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.as_str() == text)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unlock window an operator opened: calls of its operation are allowed until it closes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub operation: Operation,
    pub opened_at: UnixTime,
    pub closes_at: UnixTime,
    /// Custody's tag over the three fields above (see [`super::Custody`]).
    #[serde(skip)]
    pub tag: Option<Vec<u8>>,
}

pub type ApprovalId = i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    /// Refused until an operator decides.
    Pending,
    /// Allowed until `approved_until`; pending again after that.
    Approved,
    /// Refused for good.
    Denied,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
        }
    }

    pub fn parse(text: &str) -> Option<ApprovalState> {
        [
            ApprovalState::Pending,
            ApprovalState::Approved,
            ApprovalState::Denied,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// What an operator decided, or has still to decide, about one (operation, node, address).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Approval {
    pub id: ApprovalId,
    pub operation: Operation,
    pub node_uuid: String,
    /// Peer-address text, as bound into seals.
    pub ip: String,
    pub state: ApprovalState,
    pub first_seen: UnixTime,
    pub last_seen: UnixTime,
    /// Refused calls so far: a booting node retries every 30 s.
    pub attempts: u64,
    pub approved_until: Option<UnixTime>,
    pub decided_at: Option<UnixTime>,
    /// Custody's tag over what a decision grants (see [`super::Custody`]).
    #[serde(skip)]
    pub tag: Option<Vec<u8>>,
}

impl Approval {
    /// Whether a call may pass at `now`.
    pub fn allows(&self, now: UnixTime) -> bool {
        self.state == ApprovalState::Approved && self.approved_until.is_some_and(|t| now < t)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve { until: UnixTime },
    Deny,
}

/// What a seal from a node is weighed against: quota and pinning, as the store found the
/// node just before it added the seal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSummary {
    /// Every record of the node, revoked ones included (they take room too).
    pub records: u64,
    /// The distinct addresses other than the sealing one that its active records are bound
    /// to (at most a few are read; none in the usual case, which costs no second query).
    pub other_addresses: Vec<String>,
}

/// The limits a seal is stored under. The store checks them in the transaction that adds the
/// seal: the writer reads what it just wrote from its own warm cache (a reader's cache is
/// emptied by every commit), and two seals of one node in one batch are both counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLimits {
    /// Records a node may have, revoked ones included; 0 is no limit.
    pub max_records: u64,
    /// Refuse a node whose active records are bound to another address (`pinNodeIp`).
    pub one_address: bool,
}

impl NodeLimits {
    pub const NONE: NodeLimits = NodeLimits {
        max_records: 0,
        one_address: false,
    };

    /// Whether the node's records leave room for one more under these limits.
    pub fn allow(&self, node: &NodeSummary) -> bool {
        let room = self.max_records == 0 || node.records < self.max_records;
        let address_free = !self.one_address || node.other_addresses.is_empty();
        room && address_free
    }
}
