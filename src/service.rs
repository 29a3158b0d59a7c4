//! The `sidero.kms.KMSService` implementation: turns checked requests into sealing and store
//! operations, answers every unseal failure the same way, and writes each call's audit line
//! before its answer leaves.

mod foreign;

use crate::audit::{Action, AuditLog, Event, Reason};
use crate::metrics::Metrics;
use crate::policy::{Policy, Refusal};
use crate::proto::{self, KMSService};
use crate::sealing::foreign::TakeOver;
use crate::sealing::{self, SEALED_LEN, SealedBlob, peer_ip_text};
use crate::store::{self, Inserted, NewRecord, Store};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

/// The TCP peer of the connection a request arrived on; the listener attaches it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// A fresh 96-bit random nonce practically never collides; retrying bounds the odd case.
const SEAL_ATTEMPTS: usize = 3;

/// Every seal and unseal is answered within this, whatever the store does (hung, killed,
/// full): a node's call has 10 s from its dial, and a retryable UNAVAILABLE it receives
/// is worth more than a DEADLINE_EXCEEDED it produces itself. Leaves room for the
/// handshake and the way back.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(7);

pub struct KmsService {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    policy: Arc<Policy>,
    /// Keys of the servers taken over; empty unless `takeOver` is configured.
    take_over: Arc<TakeOver>,
}

impl KmsService {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        policy: Arc<Policy>,
        take_over: Arc<TakeOver>,
    ) -> Self {
        Self {
            store,
            audit,
            metrics,
            policy,
            take_over,
        }
    }

    /// Writes a refusal's line; the refusal stands whether or not the line could be written.
    fn refused(&self, event: Event, reason: Reason, status: Status) -> Status {
        let event = event.refused(reason);
        let _ = self.audit.write(&event);
        self.count(&event);
        status
    }

    fn refused_by_policy(&self, event: Event, refusal: Refusal) -> Status {
        self.refused(event, refusal.reason, refusal.status)
    }

    /// Writes the line of a call about to be answered with data: no line, no answer.
    fn audited(&self, event: &Event) -> Result<(), Status> {
        self.audit.write(event).map_err(|_| {
            self.count(&event.clone().refused(Reason::Failed));
            audit_unavailable()
        })?;
        self.count(event);
        Ok(())
    }

    fn count(&self, event: &Event) {
        self.metrics.call(
            event.action.map_or("", Action::label),
            event.outcome.map_or("", |outcome| outcome.label()),
            event.reason.map_or("", Reason::label),
            event.started.elapsed(),
        );
    }
}

fn peer_of<T>(request: &Request<T>) -> Result<SocketAddr, Status> {
    request
        .extensions()
        .get::<Peer>()
        .map(|peer| peer.0)
        .ok_or_else(|| Status::internal("the connection's peer address is unknown"))
}

fn audit_unavailable() -> Status {
    Status::unavailable("the audit trail cannot be written; nothing was changed, retry later")
}

fn answer(data: Vec<u8>) -> Response<proto::Response> {
    Response::new(proto::Response { data })
}

#[tonic::async_trait]
impl KMSService for KmsService {
    async fn seal(
        &self,
        request: Request<proto::Request>,
    ) -> Result<Response<proto::Response>, Status> {
        let peer = peer_of(&request)?;
        let mut request = request.into_inner();
        match answer_within(ANSWER_WITHIN, self.seal_now(peer, &mut request)).await {
            Some(answer) => answer,
            None => Err(self.too_slow(Action::Seal, &peer, &request.node_uuid)),
        }
    }

    async fn unseal(
        &self,
        request: Request<proto::Request>,
    ) -> Result<Response<proto::Response>, Status> {
        let peer = peer_of(&request)?;
        let request = request.into_inner();
        match answer_within(ANSWER_WITHIN, self.unseal_now(peer, &request)).await {
            Some(answer) => answer,
            None => Err(self.too_slow(Action::Unseal, &peer, &request.node_uuid)),
        }
    }
}

/// `work`'s output, or `None` when it takes longer than `limit`. The timer is armed only
/// when the work has to wait: a call answered in its first poll never touches it.
async fn answer_within<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    if let Poll::Ready(answer) = first {
        return Some(answer);
    }
    // The first poll took microseconds: the limit still counts from the call's start.
    tokio::time::timeout(limit, work).await.ok()
}

impl KmsService {
    /// The answer to a call that the store kept past [`ANSWER_WITHIN`]: a seal whose record
    /// is written after all is never given to the node, which seals again.
    fn too_slow(&self, action: Action, peer: &SocketAddr, node: &str) -> Status {
        if self
            .policy
            .first_refusal(peer.ip(), Reason::StoreUnavailable)
        {
            tracing::warn!(%action, node = ?node, ip = %peer.ip(),
                "call refused: the key store did not answer within {ANSWER_WITHIN:?}");
        }
        self.refused(
            Event::call(action, &peer_ip_text(peer), node),
            Reason::StoreUnavailable,
            Status::unavailable(format!(
                "the key store did not answer within {} s; retry later",
                ANSWER_WITHIN.as_secs()
            )),
        )
    }

    async fn seal_now(
        &self,
        peer: SocketAddr,
        request: &mut proto::Request,
    ) -> Result<Response<proto::Response>, Status> {
        // Zeroed on every way out, sealed or refused.
        let passphrase = Zeroizing::new(std::mem::take(&mut request.data));
        let ip = peer_ip_text(&peer);
        let mut event = Event::call(Action::Seal, &ip, &request.node_uuid);
        let limits = self
            .policy
            .admit_seal(&request.node_uuid, passphrase.len(), peer.ip(), &ip)
            .await
            .map_err(|refusal| self.refused_by_policy(event.clone(), refusal))?;
        for _ in 0..SEAL_ATTEMPTS {
            let sealed = sealing::seal(&request.node_uuid, &ip, &passphrase).map_err(|e| {
                tracing::error!(error = %e, "sealing failed");
                self.refused(
                    event.clone(),
                    Reason::Failed,
                    Status::internal("sealing failed"),
                )
            })?;
            let record = NewRecord {
                nonce: sealed.nonce,
                node_uuid: request.node_uuid.clone(),
                ip: ip.clone(),
                ciphertext: sealed.ciphertext,
                created_at: store::now(),
                last_access: None,
                custody: Default::default(),
            };
            let inserted = self.store.insert(record, limits).await.map_err(|e| {
                self.refused_by_policy(event.clone(), Refusal::store_unavailable(&e))
            })?;
            match inserted {
                Inserted::Stored(id, node) => {
                    event.detail = self.policy.note_on_seal(&request.node_uuid, &ip, &node);
                    self.audited(&event.clone().record(id))?;
                    tracing::info!(record = id, node = ?request.node_uuid, %ip, "sealed");
                    return Ok(answer(sealed.blob.to_vec()));
                }
                Inserted::NonceTaken => continue,
                Inserted::OverLimits(node) => {
                    let refusal =
                        self.policy
                            .over_limits(&request.node_uuid, peer.ip(), &ip, &node);
                    return Err(self.refused_by_policy(event, refusal));
                }
            }
        }
        tracing::error!("{SEAL_ATTEMPTS} random nonces in a row were taken; is the RNG broken?");
        Err(self.refused(
            event,
            Reason::Failed,
            Status::internal("could not allocate a nonce"),
        ))
    }

    async fn unseal_now(
        &self,
        peer: SocketAddr,
        request: &proto::Request,
    ) -> Result<Response<proto::Response>, Status> {
        let node = &request.node_uuid;
        let ip = peer_ip_text(&peer);
        let event = Event::call(Action::Unseal, &ip, node);
        let foreign_blobs = !self.take_over.is_empty();
        if let Err(refusal) = self
            .policy
            .admit_unseal(request, peer.ip(), &ip, foreign_blobs)
            .await
        {
            return Err(self.refused_by_policy(event, refusal));
        }
        // By length alone: this server's own blobs never reach the foreign path.
        if foreign_blobs && request.data.len() != SEALED_LEN {
            return self.unseal_foreign(peer, request, event).await;
        }
        let Some(blob) = SealedBlob::parse(&request.data) else {
            let status = Status::invalid_argument("malformed sealed blob");
            return Err(self.refused(event, Reason::Invalid, status));
        };
        let found =
            self.store.find_by_nonce(&blob.nonce).await.map_err(|e| {
                self.refused_by_policy(event.clone(), Refusal::store_unavailable(&e))
            })?;

        // Every failure below answers OK with random bytes in the time of a real attempt;
        // only the log and the audit trail tell why.
        let Some(record) = found else {
            sealing::unseal_nothing(&blob, node, &ip);
            self.audited(&event.refused(Reason::UnknownNonce))?;
            if self.policy.first_refusal(peer.ip(), Reason::UnknownNonce) {
                tracing::warn!(node = ?node, %ip, "unseal refused: no record has this nonce");
            }
            return Ok(answer(sealing::decoy_passphrase().to_vec()));
        };
        self.store.record_access(record.id, store::now());
        let event = event.record(record.id);
        let unsealed = sealing::unseal(&blob, &record.ciphertext, node, &ip);
        if record.revoked_at.is_some() {
            self.audited(&event.refused(Reason::Revoked))?;
            if self.policy.first_refusal(peer.ip(), Reason::Revoked) {
                tracing::warn!(record = record.id, node = ?node, %ip, "unseal refused: revoked");
            }
            return Ok(answer(sealing::decoy_passphrase().to_vec()));
        }
        match unsealed {
            Ok(passphrase) => {
                self.audited(&event)?;
                tracing::info!(record = record.id, node = ?node, %ip, "unsealed");
                Ok(answer(passphrase))
            }
            Err(sealing::WrongKeyOrBinding) => {
                self.audited(&event.refused(Reason::WrongKeyOrBinding))?;
                if self
                    .policy
                    .first_refusal(peer.ip(), Reason::WrongKeyOrBinding)
                {
                    let reason = if record.node_uuid != *node {
                        format!(
                            "node UUID differs from the sealing node's {:?}",
                            record.node_uuid
                        )
                    } else if record.ip != ip {
                        format!(
                            "source address differs from the sealing address {}",
                            record.ip
                        )
                    } else {
                        "wrong key for this record".to_string()
                    };
                    tracing::warn!(record = record.id, node = ?node, %ip, %reason,
                        "unseal refused");
                }
                Ok(answer(sealing::decoy_passphrase().to_vec()))
            }
        }
    }
}
