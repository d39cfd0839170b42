//! Maintenance.Hash: etcd's hash of its whole backend, over the snapshot pgetcd would
//! serve now. etcd walks its bbolt file bucket by bucket in name order and feeds a
//! CRC-32C with each bucket's name and then each of its keys and values, leaving out
//! `meta`'s `consistent_index` and `term`. The same walk over the buckets of `snapshot`
//! gives the hash of the file `Maintenance.Snapshot` would send at this moment.
//!
//! What it covers: every retained revision with its value (the `key` bucket), the
//! leases, the compaction; the other buckets are empty. Two instances of one keyspace
//! agree at the same revision. An etcd restored from pgetcd's snapshot agrees once its
//! membership buckets (`members`, `cluster`, written by the restore) are left out.

use std::io;

use pgetcd_engine::Crc32c;
use pgetcd_storage::Export;

use super::{Buckets, HASH_IGNORED_META};

/// etcd's backend hash, fed bucket by bucket.
#[derive(Debug, Default)]
pub struct BackendHash {
    crc: Crc32c,
}

impl BackendHash {
    /// The hash so far.
    pub fn sum(&self) -> u32 {
        self.crc.sum()
    }
}

impl BackendHash {
    /// etcd's Hash of a bbolt database (an etcd snapshot or data file): its top-level
    /// buckets in name order, each with its entries (a nested bucket contributes its
    /// key only, as in etcd).
    pub fn of_database(db: &pgetcd_bbolt::Db<'_>) -> Result<u32, pgetcd_bbolt::Error> {
        let mut h = BackendHash::default();
        for name in db.bucket_names()? {
            h.crc.write(&name);
            let Some(bucket) = db.bucket(&name)? else {
                continue;
            };
            bucket.for_each(&mut |k, v| {
                if name == b"meta" && HASH_IGNORED_META.contains(&k) {
                    return Ok(());
                }
                h.crc.write(k);
                if let pgetcd_bbolt::Value::Data(v) = v {
                    h.crc.write(v);
                }
                Ok(())
            })?;
        }
        Ok(h.sum())
    }
}

impl Buckets for BackendHash {
    fn bucket(
        &mut self,
        name: &[u8],
        entries: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> io::Result<()> {
        self.crc.write(name);
        for (k, v) in entries {
            if name == b"meta" && HASH_IGNORED_META.contains(&k.as_slice()) {
                continue;
            }
            self.crc.write(&k);
            self.crc.write(&v);
        }
        Ok(())
    }
}

/// The hash of the snapshot of `export` and its revision. Blocking: run it on a
/// blocking thread.
pub fn hash(export: Export) -> io::Result<(u32, i64)> {
    let mut h = BackendHash::default();
    // The term is left out of the hash.
    let revision = super::walk(export, 0, &mut h)?;
    Ok((h.sum(), revision))
}
