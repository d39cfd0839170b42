//! etcd snapshots: the keyspace as the bbolt database etcd would hold with its history,
//! and back.
//!
//! The buckets are etcd's (`alarm`, `auth`, `authRoles`, `authUsers`, `cluster`, `key`,
//! `lease`, `members`, `members_removed`, `meta`), in name order as bbolt keeps them:
//! - `key`: every retained revision in revision order, keyed by the 17-byte revision key
//!   (main and sub revision big-endian around `_`, `t` appended for a tombstone) and
//!   holding the `mvccpb.KeyValue` etcd stores (only the key for a tombstone): the same
//!   bytes HashKV covers;
//! - `lease`: every granted lease, keyed by its id (big-endian), holding `leasepb.Lease`
//!   {ID = 1, TTL = 2};
//! - `meta`: `consistent_index` (the revision), `finishedCompactRev` and
//!   `scheduledCompactRev` (revision keys) after a compaction, and `term`;
//! - the others empty: membership is not in it (a restore writes its own), and pgetcd
//!   has no auth or alarms to keep.
//!
//! [`walk`] lays these out from one consistent export of the store; `save` writes them to
//! a file and streams it (Maintenance.Snapshot), `hash` hashes them as etcd's backend
//! does (Maintenance.Hash), and `restore` reads a file made by etcd back into a store.

pub mod hash;
pub mod restore;
pub mod save;

use std::io;

use bytes::Bytes;
use pgetcd_engine::{revision_key, stored_value};
use pgetcd_storage::{Export, StoreError};

/// Receives a snapshot's buckets, in name order.
pub trait Buckets {
    /// One bucket, its entries in key order.
    fn bucket(
        &mut self,
        name: &[u8],
        entries: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> io::Result<()>;
}

/// The `meta` keys etcd 3.5's Hash leaves out (they differ between members holding the
/// same data).
pub const HASH_IGNORED_META: [&[u8]; 2] = [b"consistent_index", b"term"];

/// Appends a protobuf varint.
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.push(b);
            return;
        }
        buf.push(b | 0x80);
    }
}

/// etcd's `leasepb.Lease` { ID = 1, TTL = 2, RemainingTTL = 3 } (zero fields omitted).
pub fn lease_value(id: i64, ttl: i64) -> Vec<u8> {
    let mut v = Vec::new();
    for (field, value) in [(1u64, id), (2, ttl)] {
        if value != 0 {
            varint(&mut v, field << 3);
            varint(&mut v, value as u64);
        }
    }
    v
}

/// An export's error as the snapshot's I/O error.
fn export_error(e: StoreError) -> io::Error {
    io::Error::other(format!("reading the keyspace: {}", e.with_causes()))
}

/// The `key` bucket's entries from the export's stream, encoded as they come; the
/// first error ends them and is kept in `failed`. Blocking: reads the channel.
struct KeyEntries<'a> {
    export: &'a mut Export,
    chunk: std::vec::IntoIter<(Bytes, pgetcd_storage::Version)>,
    failed: &'a mut Option<io::Error>,
    last_revision: i64,
}

impl Iterator for KeyEntries<'_> {
    type Item = (Vec<u8>, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed.is_some() {
                return None;
            }
            if let Some((key, v)) = self.chunk.next() {
                let mut value = Vec::new();
                if let Err(e) = stored_value(&key, &v, &mut value) {
                    *self.failed = Some(io::Error::other(format!("encoding a revision: {e}")));
                    return None;
                }
                self.last_revision = v.mod_revision;
                return Some((revision_key(v.mod_revision, v.sub, v.is_tombstone()), value));
            }
            match self.export.versions.blocking_recv() {
                None => return None,
                Some(Ok(chunk)) => self.chunk = chunk.into_iter(),
                Some(Err(e)) => *self.failed = Some(export_error(e)),
            }
        }
    }
}

/// Lays the snapshot of `export` out into `out` (see the module doc), `term` going into
/// `meta`. Returns the snapshot's revision. Blocking: run it on a blocking thread.
pub fn walk(mut export: Export, term: u64, out: &mut dyn Buckets) -> io::Result<i64> {
    let revision = export.meta.revision;
    let compact = export.meta.compact_revision;
    let empty = || std::iter::empty::<(Vec<u8>, Vec<u8>)>();
    for name in ["alarm", "auth", "authRoles", "authUsers", "cluster"] {
        out.bucket(name.as_bytes(), &mut empty())?;
    }
    let mut failed = None;
    let mut keys = KeyEntries {
        export: &mut export,
        chunk: Vec::new().into_iter(),
        failed: &mut failed,
        last_revision: 0,
    };
    out.bucket(b"key", &mut keys)?;
    if keys.last_revision > revision {
        return Err(io::Error::other(format!(
            "the keyspace's export holds revision {} above its revision {revision}",
            keys.last_revision
        )));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let mut leases: Vec<(Vec<u8>, Vec<u8>)> = export
        .leases
        .iter()
        .map(|&(id, ttl)| ((id as u64).to_be_bytes().to_vec(), lease_value(id, ttl)))
        .collect();
    leases.sort();
    out.bucket(b"lease", &mut leases.into_iter())?;
    out.bucket(b"members", &mut empty())?;
    out.bucket(b"members_removed", &mut empty())?;
    let mut meta = vec![(
        b"consistent_index".to_vec(),
        (revision as u64).to_be_bytes().to_vec(),
    )];
    if compact > 0 {
        meta.push((
            b"finishedCompactRev".to_vec(),
            revision_key(compact, 0, false),
        ));
        meta.push((
            b"scheduledCompactRev".to_vec(),
            revision_key(compact, 0, false),
        ));
    }
    meta.push((b"term".to_vec(), term.to_be_bytes().to_vec()));
    out.bucket(b"meta", &mut meta.into_iter())?;
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_encode_as_etcds_leasepb() {
        // ID 1 = 0x08, TTL 2 = 0x10; 300 = ac 02.
        assert_eq!(lease_value(5, 300), vec![0x08, 5, 0x10, 0xac, 0x02]);
        // The compaction in meta is a revision key, as etcd writes it.
        assert_eq!(
            revision_key(2, 0, false),
            [0, 0, 0, 0, 0, 0, 0, 2, b'_', 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
