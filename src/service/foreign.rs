//! Unseal of blobs sealed by a server taken over (`takeOver`): opened with its key, then
//! bound here to the first node UUID and address that unsealed it, as this server's own
//! records are bound by their seal.

use super::{KmsService, answer};
use crate::audit::{Event, Reason};
use crate::policy::Refusal;
use crate::proto;
use crate::sealing::foreign::{self, Opened};
use crate::sealing::{self, peer_ip_text};
use crate::store::{self, NewBinding};
use std::net::SocketAddr;
use tonic::{Response, Status};

/// A bound blob's last use is written at most this often (seconds): one write per boot of
/// a node is plenty to see who still uses an old scheme.
const USE_NOTED_EVERY: i64 = 60;

impl KmsService {
    /// Answers as the server that made the blob would, after the policy admitted the call.
    pub(super) async fn unseal_foreign(
        &self,
        peer: SocketAddr,
        request: &proto::Request,
        event: Event,
    ) -> Result<Response<proto::Response>, Status> {
        let node = &request.node_uuid;
        let ip = peer_ip_text(&peer);
        let (scheme, passphrase) = match self.take_over.open(&request.data, node, peer.ip()) {
            Opened::Passphrase(scheme, passphrase) => (scheme, passphrase),
            Opened::Decoy(scheme, failure) => {
                let why = format!("{scheme} blob: {}", failure.describe());
                self.audited(&event.refused(Reason::WrongKeyOrBinding).detail(&why))?;
                if self
                    .policy
                    .first_refusal(peer.ip(), Reason::WrongKeyOrBinding)
                {
                    tracing::warn!(node = ?node, %ip, reason = %why, "unseal refused");
                }
                return Ok(answer(sealing::decoy_passphrase().to_vec()));
            }
            Opened::Malformed(scheme, failure) => {
                let why = match scheme {
                    Some(scheme) => format!("{scheme} blob: {}", failure.describe()),
                    None => failure.describe().to_string(),
                };
                let status = Status::invalid_argument("malformed sealed blob");
                return Err(self.refused(event.detail(why), Reason::Invalid, status));
            }
        };

        let fingerprint = foreign::fingerprint(&request.data);
        let store_unavailable = |e: store::StoreError| {
            self.refused_by_policy(event.clone(), Refusal::store_unavailable(&e))
        };
        let now = store::now();
        let binding = match self
            .store
            .binding(&fingerprint)
            .await
            .map_err(store_unavailable)?
        {
            Some(binding) => binding,
            None => self
                .store
                .bind(NewBinding {
                    fingerprint,
                    scheme: scheme.as_str().to_string(),
                    node_uuid: node.clone(),
                    ip: ip.clone(),
                    at: now,
                    tag: None,
                })
                .await
                .map_err(store_unavailable)?,
        };
        let id = binding.info.id;
        let event = event.detail(format!("{scheme} blob, binding b{id}"));
        let refusal = if binding.info.revoked_at.is_some() {
            Some((Reason::Revoked, "revoked".to_string()))
        } else if binding.info.node_uuid != *node {
            Some((
                Reason::WrongKeyOrBinding,
                format!("first unsealed by node UUID {:?}", binding.info.node_uuid),
            ))
        } else if binding.info.ip != ip {
            Some((
                Reason::WrongKeyOrBinding,
                format!("first unsealed from address {}", binding.info.ip),
            ))
        } else {
            None
        };
        if let Some((reason, why)) = refusal {
            self.audited(&event.refused(reason))?;
            if self.policy.first_refusal(peer.ip(), reason) {
                tracing::warn!(binding = id, %scheme, node = ?node, %ip, reason = %why,
                    "unseal refused");
            }
            return Ok(answer(sealing::decoy_passphrase().to_vec()));
        }
        if binding.info.last_used() <= now - USE_NOTED_EVERY
            && let Err(e) = self.store.binding_used(id, now).await
        {
            tracing::warn!(binding = id, error = %e, "the last use of a binding was not noted");
        }
        self.audited(&event)?;
        tracing::info!(binding = id, %scheme, node = ?node, %ip, "unsealed");
        Ok(answer(passphrase.to_vec()))
    }
}
