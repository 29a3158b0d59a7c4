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
    key_versions: Vec<Option<i64>>,
    tags: Vec<Option<Vec<u8>>>,
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
            key_versions: Vec::new(),
            tags: Vec::new(),
        };
        for record in records {
            columns.nonces.push(record.nonce.to_vec());
            columns.nodes.push(record.node_uuid.clone());
            columns.ips.push(record.ip.clone());
            columns.ciphertexts.push(record.ciphertext.clone());
            columns.created.push(record.created_at);
            columns.accessed.push(record.last_access);
            columns
                .key_versions
                .push(record.custody.key_version.map(i64::from));
            columns.tags.push(record.custody.tag.clone());
        }
        columns
    }

    /// The statement's parameters `$1` to `$8`, in the order of [`INSERT`].
    pub fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.nonces,
            &self.nodes,
            &self.ips,
            &self.ciphertexts,
            &self.created,
            &self.accessed,
            &self.key_versions,
            &self.tags,
        ]
    }
}

/// Inserts the rows of [`Columns::params`]; a conflict clause may follow.
pub(super) const INSERT: &str =
    "INSERT INTO records (nonce, node_uuid, ip, ciphertext, created_at, last_access,
                          key_version, tag)
     SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[], $5::bigint[],
                          $6::bigint[], $7::bigint[], $8::bytea[])";

#[cfg(test)]
mod tests {
    #[test]
    fn the_insert_names_as_many_columns_as_it_binds() {
        let insert = super::INSERT;
        let named = &insert[insert.find('(').unwrap()..insert.find(')').unwrap()];
        assert_eq!(named.split(',').count(), 8, "{insert}");
        assert_eq!(insert.matches("[]").count(), 8, "{insert}");
    }
}
