//! What may be asked of the service: the checks every request passes before any key
//! material is touched.
//!
//! Today this is the legacy server's `open` policy (anyone who reaches the port may seal and
//! unseal) plus the structural limits below. Network allow-lists, rate limits, enrollment
//! windows and operator approval belong here too, in front of the service.

use crate::proto;
use crate::sealing::SEALED_LEN;
use tonic::Status;

/// Longest accepted node UUID. SMBIOS UUIDs are 36 characters; the margin admits the
/// non-conformant ones some hardware reports.
pub const MAX_NODE_UUID_LEN: usize = 255;
/// Longest passphrase accepted by `Seal`. Talos seals 32 bytes; the margin admits other
/// clients that seal keys of up to 2048 bits.
pub const MAX_PASSPHRASE_LEN: usize = 256;
/// The gRPC message limit: far above any valid request, far below tonic's 4 MiB default.
pub const MAX_MESSAGE_LEN: usize = 4096;

#[derive(Clone, Default)]
pub struct Policy {}

impl Policy {
    pub fn check_seal(&self, request: &proto::Request) -> Result<(), Status> {
        check_node_uuid(&request.node_uuid)?;
        match request.data.len() {
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

    pub fn check_unseal(&self, request: &proto::Request) -> Result<(), Status> {
        check_node_uuid(&request.node_uuid)?;
        match request.data.len() {
            SEALED_LEN => Ok(()),
            len => Err(Status::invalid_argument(format!(
                "data is {len} bytes: Unseal takes the {SEALED_LEN}-byte blob that Seal \
                 returned (12-byte nonce, 32-byte key), as stored in the node's LUKS2 token"
            ))),
        }
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
        let policy = Policy::default();
        assert!(policy.check_seal(&request("n", 32)).is_ok());
        assert!(policy.check_unseal(&request("n", SEALED_LEN)).is_ok());
        for bad in [
            policy.check_seal(&request("", 32)),
            policy.check_seal(&request("n", 0)),
            policy.check_seal(&request("n", MAX_PASSPHRASE_LEN + 1)),
            policy.check_seal(&request(&"u".repeat(MAX_NODE_UUID_LEN + 1), 32)),
            policy.check_unseal(&request("n", SEALED_LEN - 1)),
            policy.check_unseal(&request("n", 0)),
        ] {
            assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }
}
