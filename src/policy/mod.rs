//! Who may seal and unseal: every call passes here before any key material is touched.
//!
//! In order, cheapest first: the request's shape, the caller's network, the rate limits,
//! then the operation's mode (`open`, `window`, `approve`), and for a seal the quotas and
//! the node's pinned address. A refusal is always a gRPC error, never decoy bytes: a
//! booting node retries an error every 30 s until the operator acts, while decoy bytes
//! would make a node with another working key slot drop and re-seal its KMS slot
//! (docs/protocol.md). Which status each refusal gets:
//!
//! - `INVALID_ARGUMENT`: the request is malformed; retrying will not help.
//! - `PERMISSION_DENIED`: refused for good until the config or an operator changes it
//!   (address outside the allow-list, request denied, node pinned to another address).
//! - `RESOURCE_EXHAUSTED`: a rate limit or quota; the message says how long to wait.
//! - `UNAVAILABLE`: the node should wait: no window is open, or its request awaits
//!   approval. gRPC clients and people read it as "retry later", and nodes do.

pub mod networks;
pub mod rate;
mod refusal_log;

pub use networks::Networks;
pub use rate::RateLimit;

use crate::audit::Reason;
use crate::locking::lock;
use crate::proto;
use crate::sealing::SEALED_LEN;
use crate::store::{
    self, Approval, ApprovalState, NodeLimits, NodeSummary, Operation, Store, StoreError, UnixTime,
};
use rate::RateLimits;
use refusal_log::RefusalLog;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;

/// Longest accepted node UUID. SMBIOS UUIDs are 36 characters; the margin admits the
/// non-conformant ones some hardware reports.
pub const MAX_NODE_UUID_LEN: usize = 255;
/// Longest passphrase accepted by `Seal`. Talos seals 32 bytes; the margin admits other
/// clients that seal keys of up to 2048 bits.
pub const MAX_PASSPHRASE_LEN: usize = 256;
/// How often the hourly seal count is read again from the store; seals between reads are
/// counted here. Other replicas' seals are seen this late.
const HOURLY_RECOUNT: Duration = Duration::from_secs(1);

/// How an operation is allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Anyone who reaches the port and passes the limits: the legacy behaviour.
    #[default]
    Open,
    /// Only while an operator's window is open (`window open`).
    Window,
    /// Only for a (node, address) an operator approved (`pending approve`).
    Approve,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "open" => Some(Mode::Open),
            "window" => Some(Mode::Window),
            "approve" => Some(Mode::Approve),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Window => "window",
            Mode::Approve => "approve",
        }
    }
}

/// The policy an operator writes in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Who may seal; `None`: anyone.
    pub seal_networks: Option<Networks>,
    /// Who may unseal; `None`: anyone.
    pub unseal_networks: Option<Networks>,
    pub per_address: RateLimit,
    pub global: RateLimit,
    /// Records one node UUID may have, revoked ones included; 0: no limit.
    pub max_records_per_node: u64,
    /// Records created in the last hour, all nodes together; 0: no limit.
    pub max_new_records_per_hour: u64,
    pub seal: Mode,
    pub unseal: Mode,
    /// Refuse a seal from a node UUID whose active records are bound to another address.
    pub pin_node_ip: bool,
    /// Requests awaiting approval at most; more are refused without being recorded.
    pub max_pending: u64,
}

impl Default for Rules {
    /// Limits no normal boot, nor a reboot of a few thousand nodes at once, comes near;
    /// README.md ("Policy") gives the arithmetic.
    fn default() -> Self {
        Self {
            seal_networks: None,
            unseal_networks: None,
            per_address: RateLimit {
                per_second: 100,
                burst: 1000,
            },
            global: RateLimit {
                per_second: 5000,
                burst: 50_000,
            },
            max_records_per_node: 1000,
            max_new_records_per_hour: 20_000,
            seal: Mode::Open,
            unseal: Mode::Open,
            pin_node_ip: false,
            max_pending: 1000,
        }
    }
}

impl Rules {
    /// The networks a connection must come from to be served at all: `None` when either
    /// operation is open to anyone.
    pub fn connection_networks(&self) -> Option<Networks> {
        let mut union = self.seal_networks.clone()?;
        union.extend(self.unseal_networks.as_ref()?);
        Some(union)
    }

    fn networks(&self, operation: Operation) -> Option<&Networks> {
        match operation {
            Operation::Seal => self.seal_networks.as_ref(),
            Operation::Unseal => self.unseal_networks.as_ref(),
        }
    }

    fn mode(&self, operation: Operation) -> Mode {
        match operation {
            Operation::Seal => self.seal,
            Operation::Unseal => self.unseal,
        }
    }
}

/// A call the policy refused: the audit trail's reason and the caller's answer.
#[derive(Debug)]
pub struct Refusal {
    pub reason: Reason,
    pub status: Status,
}

impl Refusal {
    fn new(reason: Reason, status: Status) -> Self {
        Self { reason, status }
    }

    /// The store failed: the caller must retry, never be told anything else.
    pub fn store_unavailable(error: &StoreError) -> Self {
        if matches!(error, StoreError::Sealed) {
            // Said once, at start and by `unseal-server`; a node is to wait, and does.
            return Self::new(
                Reason::StoreUnavailable,
                Status::unavailable("sealed: waiting for key shares; retry later"),
            );
        }
        tracing::error!(%error, "key store failure");
        Self::new(
            Reason::StoreUnavailable,
            Status::unavailable("the key store is unavailable; nothing was changed, retry later"),
        )
    }
}

/// The checks of [`Rules`], with the state they need: rate-limit buckets here, windows and
/// approvals in the store.
pub struct Policy {
    rules: Rules,
    store: Arc<dyn Store>,
    rates: RateLimits,
    hourly: Mutex<HourlyCount>,
    refusals: RefusalLog,
}

struct HourlyCount {
    read_at: Option<Instant>,
    seals: u64,
}

impl Policy {
    pub fn new(rules: Rules, store: Arc<dyn Store>) -> Self {
        Self {
            rates: RateLimits::new(rules.per_address, rules.global),
            rules,
            store,
            hourly: Mutex::new(HourlyCount {
                read_at: None,
                seals: 0,
            }),
            refusals: RefusalLog::default(),
        }
    }

    /// Whether a seal of a passphrase of `passphrase_len` bytes for `node` from `ip` (bound
    /// into it as `ip_text`) may go on; the quota and pinning are checked where it is stored,
    /// under the limits this returns; [`Policy::over_limits`] words the store's refusal.
    pub async fn admit_seal(
        &self,
        node: &str,
        passphrase_len: usize,
        ip: IpAddr,
        ip_text: &str,
    ) -> Result<NodeLimits, Refusal> {
        check_seal_shape(node, passphrase_len)
            .map_err(|status| Refusal::new(Reason::Invalid, status))?;
        self.admit(Operation::Seal, node, ip, ip_text).await?;
        self.count_hourly_seal(ip).await?;
        Ok(NodeLimits {
            max_records: self.rules.max_records_per_node,
            one_address: self.rules.pin_node_ip,
        })
    }

    /// The refusal of a seal the store did not add: `summary` is over the limits of
    /// [`Policy::admit_seal`].
    pub fn over_limits(
        &self,
        node: &str,
        ip: IpAddr,
        ip_text: &str,
        summary: &NodeSummary,
    ) -> Refusal {
        // Not added after all: it takes no room in the hour's count.
        {
            let mut hourly = lock(&self.hourly);
            hourly.seals = hourly.seals.saturating_sub(1);
        }
        let max = self.rules.max_records_per_node;
        if max > 0 && summary.records >= max {
            if self.first_refusal(ip, Reason::OverQuota) {
                tracing::warn!(node = ?node, ip = ip_text, records = summary.records,
                    "seal refused: the node has reached maxRecordsPerNode");
            }
            return Refusal::new(
                Reason::OverQuota,
                Status::resource_exhausted(format!(
                    "this node has {} records, the most maxRecordsPerNode allows; an operator \
                     can free room with `talos-kms-server keys purge --node {node}`",
                    summary.records
                )),
            );
        }
        if self.first_refusal(ip, Reason::Pinned) {
            let known = summary.other_addresses.join(", ");
            tracing::warn!(node = ?node, ip = ip_text, %known,
                "seal refused: the node is pinned to another address (pinNodeIp)");
        }
        Refusal::new(
            Reason::Pinned,
            Status::permission_denied(format!(
                "this node UUID is known from another address and pinNodeIp is set; \
                 if the node really moved, an operator revokes its old records with \
                 `talos-kms-server keys revoke --node {node}`"
            )),
        )
    }

    /// What the audit trail notes about a seal the store added: a node known from another
    /// address (allowed without `pinNodeIp`).
    pub fn note_on_seal(&self, node: &str, ip_text: &str, summary: &NodeSummary) -> Option<String> {
        if summary.other_addresses.is_empty() {
            return None;
        }
        let known = summary.other_addresses.join(", ");
        tracing::warn!(node = ?node, ip = ip_text, %known,
            "a node UUID known from another address seals: moved, or someone else");
        Some(format!("node known from {known}"))
    }

    /// Whether an unseal from `ip` (bound into seals as `ip_text`) may go on. With
    /// `foreign_blobs` (`takeOver`), a blob of another length is left for the scheme that
    /// made it to judge, after the policy.
    pub async fn admit_unseal(
        &self,
        request: &proto::Request,
        ip: IpAddr,
        ip_text: &str,
        foreign_blobs: bool,
    ) -> Result<(), Refusal> {
        let shape = if foreign_blobs {
            check_node_uuid(&request.node_uuid)
        } else {
            check_unseal(request)
        };
        shape.map_err(|status| Refusal::new(Reason::Invalid, status))?;
        self.admit(Operation::Unseal, &request.node_uuid, ip, ip_text)
            .await
    }

    /// Forgets what is no longer needed (quiet addresses' buckets) and sums up the
    /// minute's refusals not logged one by one; called every minute.
    pub fn tidy(&self) {
        self.rates.forget_quiet();
        if let Some(summary) = self.refusals.summary() {
            tracing::warn!("{summary}");
        }
    }

    /// Notes a refused call; true when it should be logged on its own (the first of its
    /// address and reason this minute), the rest being summed up by [`Policy::tidy`].
    pub fn first_refusal(&self, ip: IpAddr, reason: Reason) -> bool {
        self.refusals.first(ip, reason)
    }

    async fn admit(
        &self,
        operation: Operation,
        node: &str,
        ip: IpAddr,
        ip_text: &str,
    ) -> Result<(), Refusal> {
        if let Some(networks) = self.rules.networks(operation)
            && !networks.contains(ip)
        {
            if self.first_refusal(ip, Reason::NetworkNotAllowed) {
                tracing::warn!(%operation, node = ?node, ip = ip_text,
                    "refused: the address is outside the {operation}AllowedNetworks");
            }
            return Err(Refusal::new(
                Reason::NetworkNotAllowed,
                Status::permission_denied(format!(
                    "{ip_text} may not {operation}: it is outside {operation}AllowedNetworks"
                )),
            ));
        }
        if let Err(exhausted) = self.rates.check(ip) {
            let (which, key, limit) = if exhausted.global {
                ("all callers together", "rateLimitGlobal", self.rules.global)
            } else {
                (
                    "this address",
                    "rateLimitPerAddress",
                    self.rules.per_address,
                )
            };
            // The wait for one token says nothing when a whole NAT'd cluster contends for
            // it; a node retries in whole seconds (Talos every 30 s) anyway.
            let wait = exhausted.retry_after.as_secs() + 1;
            let message = format!(
                "too many calls from {which}: {key} allows {limit}; retry in {wait} s or \
                 later. Many nodes behind one address (NAT, an HTTP proxy) share its limit: \
                 raise {key}, or have the load balancer pass each node's address (PROXY \
                 protocol, trustedProxies)"
            );
            if self.first_refusal(ip, Reason::RateLimited) {
                tracing::warn!(%operation, ip = ip_text, "refused: {message}");
            }
            return Err(Refusal::new(
                Reason::RateLimited,
                Status::resource_exhausted(message),
            ));
        }
        match self.rules.mode(operation) {
            Mode::Open => Ok(()),
            Mode::Window => self.in_window(operation).await,
            Mode::Approve => self.approved(operation, node, ip, ip_text).await,
        }
    }

    async fn in_window(&self, operation: Operation) -> Result<(), Refusal> {
        let now = store::now();
        let windows = self
            .store
            .windows()
            .await
            .map_err(|e| Refusal::store_unavailable(&e))?;
        if windows
            .iter()
            .any(|w| w.operation == operation && now < w.closes_at)
        {
            return Ok(());
        }
        tracing::info!(%operation, "refused: no {operation} window is open");
        Err(Refusal::new(
            Reason::WindowClosed,
            Status::unavailable(format!(
                "no {operation} window is open; nodes retry until an operator opens one with \
                 `talos-kms-server window open {operation} --for 30m`"
            )),
        ))
    }

    async fn approved(
        &self,
        operation: Operation,
        node: &str,
        address: IpAddr,
        ip: &str,
    ) -> Result<(), Refusal> {
        let now = store::now();
        let known = self
            .store
            .approval(operation, node, ip)
            .await
            .map_err(|e| Refusal::store_unavailable(&e))?;
        if let Some(approval) = &known {
            if approval.allows(now) {
                return Ok(());
            }
            if approval.state == ApprovalState::Denied {
                tracing::info!(%operation, node = ?node, ip, id = approval.id,
                    "refused: denied by an operator");
                return Err(denied(operation, approval));
            }
        }
        let noted = self
            .store
            .note_pending(operation, node, ip, now, self.rules.max_pending)
            .await
            .map_err(|e| Refusal::store_unavailable(&e))?;
        let Some(pending) = noted else {
            if self.first_refusal(address, Reason::PendingApproval) {
                tracing::warn!(%operation, node = ?node, ip,
                    "refused without recording: maxPendingApprovals requests are pending");
            }
            return Err(Refusal::new(
                Reason::PendingApproval,
                Status::unavailable(
                    "too many requests await approval; an operator must decide some first \
                     (`talos-kms-server pending list`)",
                ),
            ));
        };
        if pending.state == ApprovalState::Denied {
            return Err(denied(operation, &pending));
        }
        if pending.attempts == 1 {
            tracing::warn!(%operation, node = ?node, ip, id = pending.id,
                "awaiting approval: `talos-kms-server pending approve {}`", pending.id);
        }
        Err(Refusal::new(
            Reason::PendingApproval,
            Status::unavailable(format!(
                "{operation} awaits an operator's approval (request {id}); the node retries \
                 until `talos-kms-server pending approve {id}`",
                id = pending.id
            )),
        ))
    }

    /// Counts a seal against `maxNewRecordsPerHour`, reading the count from the store at
    /// most once a second.
    async fn count_hourly_seal(&self, ip: IpAddr) -> Result<(), Refusal> {
        let max = self.rules.max_new_records_per_hour;
        if max == 0 {
            return Ok(());
        }
        let stale = {
            let hourly = lock(&self.hourly);
            hourly
                .read_at
                .is_none_or(|at| at.elapsed() >= HOURLY_RECOUNT)
        };
        if stale {
            let since: UnixTime = store::now() - 3600;
            let seals = self
                .store
                .created_since(since)
                .await
                .map_err(|e| Refusal::store_unavailable(&e))?;
            let mut hourly = lock(&self.hourly);
            *hourly = HourlyCount {
                read_at: Some(Instant::now()),
                seals,
            };
        }
        let mut hourly = lock(&self.hourly);
        if hourly.seals >= max {
            if self.first_refusal(ip, Reason::OverQuota) {
                tracing::warn!(
                    seals = hourly.seals,
                    "seal refused: maxNewRecordsPerHour reached"
                );
            }
            return Err(Refusal::new(
                Reason::OverQuota,
                Status::resource_exhausted(format!(
                    "{} records were created in the last hour, the most maxNewRecordsPerHour \
                     allows; retry later",
                    hourly.seals
                )),
            ));
        }
        hourly.seals += 1;
        Ok(())
    }
}

fn denied(operation: Operation, approval: &Approval) -> Refusal {
    Refusal::new(
        Reason::Denied,
        Status::permission_denied(format!(
            "an operator denied this node's {operation} (request {})",
            approval.id
        )),
    )
}

/// The shape of a Seal request: what any policy requires.
pub fn check_seal(request: &proto::Request) -> Result<(), Status> {
    check_seal_shape(&request.node_uuid, request.data.len())
}

fn check_seal_shape(node_uuid: &str, passphrase_len: usize) -> Result<(), Status> {
    check_node_uuid(node_uuid)?;
    match passphrase_len {
        0 => Err(Status::invalid_argument(
            "data is empty: Seal takes the passphrase to seal (Talos sends 32 random bytes)",
        )),
        len if len > MAX_PASSPHRASE_LEN => Err(Status::invalid_argument(format!(
            "data is {len} bytes: Seal takes a passphrase of at most {MAX_PASSPHRASE_LEN} \
             bytes (Talos sends 32)"
        ))),
        _ => Ok(()),
    }
}

/// The shape of an Unseal request.
pub fn check_unseal(request: &proto::Request) -> Result<(), Status> {
    check_node_uuid(&request.node_uuid)?;
    match request.data.len() {
        SEALED_LEN => Ok(()),
        len => Err(Status::invalid_argument(format!(
            "data is {len} bytes: Unseal takes the {SEALED_LEN}-byte blob that Seal \
             returned (12-byte nonce, 32-byte key), as stored in the node's LUKS2 token"
        ))),
    }
}

fn check_node_uuid(node_uuid: &str) -> Result<(), Status> {
    match node_uuid.len() {
        0 => Err(Status::invalid_argument(
            "node_uuid is empty: send the node's SMBIOS system UUID as text",
        )),
        len if len > MAX_NODE_UUID_LEN => Err(Status::invalid_argument(format!(
            "node_uuid is {len} bytes: at most {MAX_NODE_UUID_LEN} are accepted"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(node_uuid: &str, len: usize) -> proto::Request {
        proto::Request {
            node_uuid: node_uuid.into(),
            data: vec![0; len],
        }
    }

    #[test]
    fn limits_are_enforced_with_invalid_argument() {
        assert!(check_seal(&request("n", 32)).is_ok());
        assert!(check_unseal(&request("n", SEALED_LEN)).is_ok());
        for bad in [
            check_seal(&request("", 32)),
            check_seal(&request("n", 0)),
            check_seal(&request("n", MAX_PASSPHRASE_LEN + 1)),
            check_seal(&request(&"u".repeat(MAX_NODE_UUID_LEN + 1), 32)),
            check_unseal(&request("n", SEALED_LEN - 1)),
            check_unseal(&request("n", 0)),
        ] {
            assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn connections_are_filtered_only_when_both_operations_have_lists() {
        let nets = |text: &str| Some(Networks::parse(&[text]).unwrap());
        let mut rules = Rules {
            seal_networks: nets("10.0.0.0/8"),
            ..Rules::default()
        };
        assert_eq!(rules.connection_networks(), None);
        rules.unseal_networks = nets("192.168.0.0/16");
        let union = rules.connection_networks().unwrap();
        assert!(union.contains("10.1.1.1".parse().unwrap()));
        assert!(union.contains("192.168.1.1".parse().unwrap()));
        assert!(!union.contains("172.16.0.1".parse().unwrap()));
    }
}
