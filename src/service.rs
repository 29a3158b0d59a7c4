//! The `sidero.kms.KMSService` implementation: turns checked requests into sealing and store
//! operations, and answers every unseal failure the same way.

use crate::policy::Policy;
use crate::proto::{self, KMSService};
use crate::sealing::{self, SealedBlob, peer_ip_text};
use crate::store::{self, Inserted, NewRecord, Store};
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The TCP peer of the connection a request arrived on; the listener attaches it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// A fresh 96-bit random nonce practically never collides; retrying bounds the odd case.
const SEAL_ATTEMPTS: usize = 3;

pub struct KmsService {
    store: Arc<dyn Store>,
    policy: Policy,
}

impl KmsService {
    pub fn new(store: Arc<dyn Store>, policy: Policy) -> Self {
        Self { store, policy }
    }
}

fn peer_of<T>(request: &Request<T>) -> Result<SocketAddr, Status> {
    request
        .extensions()
        .get::<Peer>()
        .map(|peer| peer.0)
        .ok_or_else(|| Status::internal("the connection's peer address is unknown"))
}

fn store_unavailable(error: store::StoreError) -> Status {
    tracing::error!(%error, "key store failure");
    Status::unavailable("the key store is unavailable; nothing was changed, retry later")
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
        let request = request.into_inner();
        self.policy.check_seal(&request)?;
        let ip = peer_ip_text(&peer);
        for _ in 0..SEAL_ATTEMPTS {
            let sealed = sealing::seal(&request.node_uuid, &ip, &request.data).map_err(|e| {
                tracing::error!(error = %e, "sealing failed");
                Status::internal("sealing failed")
            })?;
            let record = NewRecord {
                nonce: sealed.nonce,
                node_uuid: request.node_uuid.clone(),
                ip: ip.clone(),
                ciphertext: sealed.ciphertext,
                created_at: store::now(),
                last_access: None,
            };
            match self.store.insert(record).await.map_err(store_unavailable)? {
                Inserted::Stored(id) => {
                    tracing::info!(record = id, node = ?request.node_uuid, %ip, "sealed");
                    return Ok(answer(sealed.blob.to_vec()));
                }
                Inserted::NonceTaken => continue,
            }
        }
        tracing::error!("{SEAL_ATTEMPTS} random nonces in a row were taken; is the RNG broken?");
        Err(Status::internal("could not allocate a nonce"))
    }

    async fn unseal(
        &self,
        request: Request<proto::Request>,
    ) -> Result<Response<proto::Response>, Status> {
        let peer = peer_of(&request)?;
        let request = request.into_inner();
        self.policy.check_unseal(&request)?;
        let blob = SealedBlob::parse(&request.data)
            .ok_or_else(|| Status::invalid_argument("malformed sealed blob"))?;
        let node = &request.node_uuid;
        let ip = peer_ip_text(&peer);
        let found = self
            .store
            .find_by_nonce(&blob.nonce)
            .await
            .map_err(store_unavailable)?;

        // Every failure below answers OK with random bytes in the time of a real attempt;
        // only the log tells why.
        let Some(record) = found else {
            sealing::unseal_nothing(&blob, node, &ip);
            tracing::warn!(node = ?node, %ip, "unseal refused: no record has this nonce");
            return Ok(answer(sealing::decoy_passphrase().to_vec()));
        };
        self.store.record_access(record.id, store::now());
        match sealing::unseal(&blob, &record.ciphertext, node, &ip) {
            Ok(passphrase) => {
                tracing::info!(record = record.id, node = ?node, %ip, "unsealed");
                Ok(answer(passphrase))
            }
            Err(sealing::WrongKeyOrBinding) => {
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
                tracing::warn!(record = record.id, node = ?node, %ip, %reason, "unseal refused");
                Ok(answer(sealing::decoy_passphrase().to_vec()))
            }
        }
    }
}
