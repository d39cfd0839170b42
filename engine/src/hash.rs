//! HashKV: etcd's consistency hash of the key-value history, computed bit-for-bit as
//! etcd computes it over its bolt `key` bucket, so a hash taken from pgetcd can be
//! compared with one taken from etcd holding the same history (e.g. after a migration).
//!
//! etcd hashes, with CRC-32C, the bucket name `key` and then, in revision order, every
//! stored revision up to the requested one: the 17-byte revision key (main and sub as
//! big-endian u64 around `_`, plus `t` for a tombstone) followed by the protobuf
//! `mvccpb.KeyValue` stored for it (a tombstone stores only the key). Revisions at or
//! below the compact revision are included only when they are what a compaction at the
//! requested revision would keep (each key's newest non-tombstone version), unless no
//! key would keep anything. pgetcd's index holds exactly the revisions etcd's bolt
//! holds after a compaction, so the same walk over it gives the same hash.

use bytes::Bytes;
use pgetcd_proto::mvccpb::KeyValue;
use prost::Message;

use crate::error::{Error, Result};
use crate::index::Version;

/// Reflected CRC-32C (Castagnoli) polynomial.
const CASTAGNOLI: u32 = 0x82F6_3B78;

/// The byte-at-a-time table (`[0]`) and seven more, `[k][b]` being the CRC of byte `b`
/// followed by `k` zero bytes: "slicing by 8" folds eight input bytes per step with
/// eight independent lookups instead of a chain of eight dependent ones.
const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CASTAGNOLI
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// A running CRC-32C (Castagnoli), the checksum of etcd's HashKV and Hash.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// The checksum of nothing yet.
    pub fn new() -> Self {
        Self(!0)
    }

    /// Adds `data`.
    pub fn write(&mut self, data: &[u8]) {
        let t = &CRC_TABLES;
        let mut c = self.0;
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let lo = c ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in words.remainder() {
            c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The checksum of everything written.
    pub fn sum(self) -> u32 {
        !self.0
    }
}

/// etcd's bolt key of a revision.
pub fn revision_key(main: i64, sub: u32, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&(main as u64).to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&u64::from(sub).to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// One stored revision the hash covers.
pub(crate) struct Item {
    pub(crate) key: Bytes,
    pub(crate) version: Version,
}

/// Picks, from every key's retained versions, those etcd's hash at `rev` covers, given
/// the compact revision `compact`. Returned in revision order.
pub(crate) fn select<'a>(
    keys: impl Iterator<Item = (&'a Bytes, &'a [Version])>,
    rev: i64,
    compact: i64,
) -> Vec<Item> {
    let lower = compact + 1;
    // (item, below the compact revision, is the key's kept version at `rev`)
    let mut all: Vec<(Item, bool, bool)> = Vec::new();
    let mut any_kept = false;
    for (key, versions) in keys {
        let upto = versions.partition_point(|v| v.mod_revision <= rev);
        if upto == 0 {
            continue;
        }
        let kept = (!versions[upto - 1].is_tombstone()).then_some(upto - 1);
        any_kept |= kept.is_some();
        for (i, v) in versions[..upto].iter().enumerate() {
            all.push((
                Item {
                    key: key.clone(),
                    version: v.clone(),
                },
                v.mod_revision < lower,
                kept == Some(i),
            ));
        }
    }
    let mut items: Vec<Item> = all
        .into_iter()
        .filter(|(_, below, kept)| !*below || !any_kept || *kept)
        .map(|(item, _, _)| item)
        .collect();
    items.sort_unstable_by_key(|i| (i.version.mod_revision, i.version.sub));
    items
}

/// The hash of `items` (values filled).
pub(crate) fn hash(items: &[Item]) -> Result<u32> {
    let mut h = Crc32c::new();
    h.write(b"key");
    let mut buf = Vec::new();
    for it in items {
        h.write(&revision_key(
            it.version.mod_revision,
            it.version.sub,
            it.version.is_tombstone(),
        ));
        buf.clear();
        stored_value(&it.key, &it.version, &mut buf)?;
        h.write(&buf);
    }
    Ok(h.sum())
}

/// What etcd's `key` bucket stores for a version of `key` (value filled): the protobuf
/// `mvccpb.KeyValue`, only the key for a tombstone; appended to `buf`.
pub fn stored_value(key: &Bytes, v: &Version, buf: &mut Vec<u8>) -> Result<()> {
    let kv = if v.is_tombstone() {
        KeyValue {
            key: key.clone(),
            ..Default::default()
        }
    } else {
        if v.value.is_none() {
            return Err(Error::MissingValue {
                revision: v.mod_revision,
                sub: v.sub,
            });
        }
        crate::events::kv_of(key, v)
    };
    kv.encode(buf).map_err(|_| Error::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::{put, tomb};

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        let mut h = Crc32c::new();
        h.write(b"123456789");
        assert_eq!(h.sum(), 0xE306_9283);
    }

    #[test]
    fn crc32c_eight_bytes_at_a_time_is_the_bitwise_crc() {
        fn bitwise(data: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ CASTAGNOLI
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 5) as u8).collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 300] {
            let mut h = Crc32c::new();
            h.write(&data[..len]);
            assert_eq!(h.sum(), bitwise(&data[..len]), "length {len}");
            // Written in pieces that split the 8-byte steps anywhere.
            for cut in [1, 3, 8, 13] {
                let mut h = Crc32c::new();
                for piece in data[..len].chunks(cut) {
                    h.write(piece);
                }
                assert_eq!(
                    h.sum(),
                    bitwise(&data[..len]),
                    "length {len} in pieces of {cut}"
                );
            }
        }
    }

    #[test]
    fn selection_follows_etcds_keep_rule() {
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        let c = Bytes::from_static(b"c");
        // Compacted at 6: a keeps 5 (newer 8 exists), b keeps 3, c deleted at 7.
        let va = [put(5, 2, 2, "v"), put(8, 2, 3, "v")];
        let vb = [put(3, 3, 1, "v")];
        let vc = [put(4, 4, 1, "v"), tomb(7)];
        let keys = [(&a, &va[..]), (&b, &vb[..]), (&c, &vc[..])];
        let revs = |items: Vec<Item>| -> Vec<i64> {
            items.iter().map(|i| i.version.mod_revision).collect()
        };
        // At 8: a's kept version is 8, so 5 is skipped; b's 3 is kept; c's 4 (below
        // lower, not kept: c is deleted) skipped; 7 and 8 above lower.
        assert_eq!(revs(select(keys.into_iter(), 8, 6)), vec![3, 7, 8]);
        // At 6 (== compact): everything is at or below lower-1; kept: a@5, b@3, c@4.
        assert_eq!(revs(select(keys.into_iter(), 6, 6)), vec![3, 4, 5]);
        // Nothing kept anywhere: every stored revision counts.
        let vd = [put(2, 2, 1, "v"), tomb(3)];
        let d = Bytes::from_static(b"d");
        assert_eq!(revs(select([(&d, &vd[..])].into_iter(), 3, 2)), vec![2, 3]);
    }
}
