//! Records as column arrays, for one `INSERT ... SELECT FROM unnest(...)` of many.

use crate::store::NewRecord;
use tokio_postgres::types::ToSql;

/// Column arrays of records, for one `INSERT ... SELECT FROM unnest(...)`.
pub(super) struct Columns {
    nonces: Vec<Vec<u8>>,
    nodes: Vec<String>,
    ips: Vec<String>,
    ciphertexts: Vec<Vec<u8>>,
    created: Vec<i64>,
    accessed: Vec<Option<i64>>,
}

impl Columns {
    pub fn of<'a>(records: impl Iterator<Item = &'a NewRecord>) -> Columns {
        let mut columns = Columns {
            nonces: Vec::new(),
            nodes: Vec::new(),
            ips: Vec::new(),
            ciphertexts: Vec::new(),
            created: Vec::new(),
            accessed: Vec::new(),
        };
        for record in records {
            columns.nonces.push(record.nonce.to_vec());
            columns.nodes.push(record.node_uuid.clone());
            columns.ips.push(record.ip.clone());
            columns.ciphertexts.push(record.ciphertext.clone());
            columns.created.push(record.created_at);
            columns.accessed.push(record.last_access);
        }
        columns
    }

    /// The statement's parameters `$1` to `$6`: nonce, node, address, ciphertext, created
    /// and last access.
    pub fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.nonces,
            &self.nodes,
            &self.ips,
            &self.ciphertexts,
            &self.created,
            &self.accessed,
        ]
    }
}
