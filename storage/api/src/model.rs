use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;

/// One version of a key: a put (`version >= 1`) or a tombstone (`version == 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Main revision of the change.
    pub mod_revision: i64,
    /// Sub-revision inside the main revision.
    pub sub: u32,
    /// Revision of the key's (re)creation; 0 for tombstones.
    pub create_revision: i64,
    /// 1 on create, +1 per put; 0 marks a tombstone.
    pub version: i64,
    /// Attached lease, 0 for none.
    pub lease: i64,
    /// The value, `None` when evicted from the cache (or a tombstone).
    pub value: Option<Bytes>,
}

impl Version {
    /// A tombstone; its revision is set when it is appended.
    pub fn tombstone() -> Version {
        Version {
            mod_revision: 0,
            sub: 0,
            create_revision: 0,
            version: 0,
            lease: 0,
            value: None,
        }
    }

    /// Whether this version deletes the key.
    pub fn is_tombstone(&self) -> bool {
        self.version == 0
    }

    /// Its (revision, sub).
    pub fn id(&self) -> VersionId {
        (self.mod_revision, self.sub)
    }
}

/// A version's place in history: (main revision, sub-revision).
pub type VersionId = (i64, u32);

/// One row change made by a write: the version appended for `key`.
#[derive(Debug, Clone)]
pub struct Change {
    /// The key.
    pub key: Bytes,
    /// The new version (a tombstone for deletes).
    pub version: Version,
    /// The key's live version just before this change (None: absent or deleted); its
    /// value may have been evicted. Saves the lease table and the watch feed a lookup.
    pub prev: Option<Version>,
}

/// The keyspace's auth state: opaque to the store, with the auth revision that every
/// change raises (etcd's `authRevision`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthRecord {
    /// The auth revision; 0 before the state was first written.
    pub revision: u64,
    /// The state, encoded by its owner.
    pub state: Bytes,
}

/// The keyspace's meta record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Random id of this keyspace, reported as etcd's cluster_id.
    pub cluster_id: u64,
    /// Random id reported as etcd's member_id.
    pub member_id: u64,
    /// Last committed revision.
    pub revision: i64,
    /// Compact revision (-1 before the first compaction, like etcd).
    pub compact_revision: i64,
    /// Fencing epoch of the instance that writes.
    pub leader_epoch: i64,
}

/// The writer's proof of ownership: the epoch it raised with [`crate::Store::fence`].
/// Every commit compares it (and the previous revision) with what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The fencing epoch.
    pub epoch: i64,
}

/// One lease row change, in the order the batch made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Granted (id, ttl).
    Grant(i64, i64),
    /// Revoked id, with the TTL it had (restored if the batch does not commit).
    Revoke {
        /// The lease.
        id: i64,
        /// Its TTL before the revoke.
        ttl: i64,
    },
}

/// Lease rows a batch writes.
#[derive(Debug, Default, Clone)]
pub struct LeaseOps {
    /// Grants and revokes in order (a lease revoked and granted again in one batch
    /// appears twice).
    pub ops: Vec<LeaseOp>,
}

impl LeaseOps {
    /// Whether the batch writes no lease row.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Revoked ids, in order.
    pub fn revokes(&self) -> impl Iterator<Item = i64> + '_ {
        self.ops.iter().filter_map(|op| match op {
            LeaseOp::Revoke { id, .. } => Some(*id),
            LeaseOp::Grant(..) => None,
        })
    }

    /// What the lease table must hold afterwards: per id, its last operation decides.
    /// Returns (ids to upsert, their TTLs, ids to delete).
    pub fn net(&self) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let mut last: HashMap<i64, Option<i64>> = HashMap::with_capacity(self.ops.len());
        for op in &self.ops {
            match *op {
                LeaseOp::Grant(id, ttl) => last.insert(id, Some(ttl)),
                LeaseOp::Revoke { id, .. } => last.insert(id, None),
            };
        }
        let (mut ids, mut ttls, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (id, ttl) in last {
            match ttl {
                Some(t) => {
                    ids.push(id);
                    ttls.push(t);
                }
                None => gone.push(id),
            }
        }
        (ids, ttls, gone)
    }
}

/// One group commit: every change of revisions `prev_revision + 1 ..= revision`, in
/// (revision, sub) order, and the lease rows.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The revision the batch was evaluated on (the store's revision before it).
    pub prev_revision: i64,
    /// The newest revision of the batch (equal to `prev_revision` when it only changes
    /// leases).
    pub revision: i64,
    /// The changes, in (revision, sub) order.
    pub changes: &'a [Change],
    /// Lease grants and revokes.
    pub leases: &'a LeaseOps,
}

impl Batch<'_> {
    /// Whether the batch writes lease rows only (it takes no revision).
    pub fn leases_only(&self) -> bool {
        self.revision == self.prev_revision
    }

    /// For a batch of lease rows only: whether `granted` (the store's leases with their
    /// TTLs, at least those the batch names) shows the batch applied. When the batch
    /// changes nothing the answer is yes, and either answer leaves the same state.
    pub fn leases_applied(&self, granted: &HashMap<i64, i64>) -> bool {
        let (ids, ttls, gone) = self.leases.net();
        ids.iter()
            .zip(&ttls)
            .all(|(id, ttl)| granted.get(id) == Some(ttl))
            && gone.iter().all(|id| !granted.contains_key(id))
    }
}

/// What [`crate::Store::resolve`] found out about a commit whose outcome was unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The batch is durable.
    Committed,
    /// The batch is not in the store and can no longer get there.
    NotCommitted,
}

/// What the store needs to hear from the engine's index prune of one compaction, and
/// what its data step will remove. Made by [`crate::Store::record_compaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionPlan {
    /// The compact revision.
    pub revision: i64,
    /// Versions removed by the prune are listed when their revision is below this.
    pub list_removed_below: i64,
    /// Surviving versions (each key's newest live version at or below the compact
    /// revision) are listed when their revision falls in this range.
    pub list_survivors: Range<i64>,
    /// Store-defined units the data step removes whole (Postgres: the history
    /// partitions starting at these revisions); for logs.
    pub segments: Vec<i64>,
}

/// What one compaction's index prune removed and kept, as asked by its plan.
#[derive(Debug, Default, Clone)]
pub struct Pruned {
    /// Removed versions with revision below the plan's `list_removed_below`.
    pub removed: Vec<VersionId>,
    /// Surviving versions in the plan's `list_survivors`.
    pub survivors: Vec<VersionId>,
    /// Keys removed from the index altogether.
    pub keys_removed: usize,
}

/// What [`crate::Store::load`] read besides the versions.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The meta record, from the same snapshot as the versions.
    pub meta: Meta,
    /// Granted leases: (id, ttl).
    pub leases: Vec<(i64, i64)>,
    /// Versions visited.
    pub versions: usize,
}

/// Versions with their keys, in (revision, sub) order, puts with their values: one
/// message of an [`Export`] or an [`Import`]. An `Err` ends the stream.
pub type VersionChunk = crate::error::Result<Vec<(Bytes, Version)>>;

/// How many versions an [`Export`] or [`Import`] message carries at most, and messages
/// in flight: together they bound the memory a stream takes.
pub const CHUNK_VERSIONS: usize = 1024;
/// Messages buffered between the two ends of an [`Export`] or [`Import`].
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// What [`crate::Store::export`] gives: the keyspace as one consistent snapshot of the
/// store, its meta record and leases at once, its versions streamed.
#[derive(Debug)]
pub struct Export {
    /// The meta record of the snapshot.
    pub meta: Meta,
    /// Granted leases (id, ttl), by id.
    pub leases: Vec<(i64, i64)>,
    /// Every retained version (what etcd's `key` bucket holds: all history above the
    /// compact revision, and each key's newest live version at or below it), in
    /// (revision, sub) order, in chunks of at most [`CHUNK_VERSIONS`]; the channel
    /// closes after the last one, or after an `Err`.
    pub versions: tokio::sync::mpsc::Receiver<VersionChunk>,
}

/// What [`crate::Store::import`] loads: a whole keyspace (from an etcd snapshot, say).
#[derive(Debug)]
pub struct Import {
    /// The keyspace's revision afterwards.
    pub revision: i64,
    /// Its compact revision afterwards (-1: never compacted).
    pub compact_revision: i64,
    /// Granted leases (id, ttl).
    pub leases: Vec<(i64, i64)>,
    /// The versions, in strictly increasing (revision, sub) order, none above
    /// `revision`; a sender that fails sends an `Err` (and the import writes nothing).
    pub versions: tokio::sync::mpsc::Receiver<VersionChunk>,
    /// Replace whatever the keyspace holds; without it, a keyspace holding any version
    /// or lease is refused ([`crate::StoreError::NotEmpty`]).
    pub replace: bool,
}

/// What [`crate::Store::import`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imported {
    /// Versions written.
    pub versions: u64,
    /// Keys live afterwards.
    pub keys: u64,
    /// Leases written.
    pub leases: u64,
}

/// What [`crate::Store::changes_after`] read: committed changes after a revision, and
/// the meta record of the same snapshot.
#[derive(Debug, Clone)]
pub struct Changes {
    /// The meta record as of the read. When its compact revision is above the revision
    /// asked for, history after it may be gone: `changes` is empty, and the reader must
    /// load the keyspace again.
    pub meta: Meta,
    /// Every change of the revisions read, in (revision, sub) order, puts with their
    /// values; whole revisions only.
    pub changes: Vec<(Bytes, Version)>,
}

/// One committed batch from the change feed.
#[derive(Debug, Clone)]
pub struct FeedCommit {
    /// Position to confirm once the changes are applied.
    pub position: u64,
    /// Its versions in (revision, sub) order, each with its key; puts carry their
    /// values.
    pub changes: Vec<(Bytes, Version)>,
}

/// State of the change feed found by [`crate::Store::prepare_feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedPrepared {
    /// It existed: it resumes after its last confirmed position.
    Existing,
    /// Created now: it carries commits from now on.
    Created,
    /// It had lost history it needed and was recreated: commits before now are not in
    /// it (the engine's index fills the gap when it can).
    Recreated,
}

/// What [`crate::Store::remove_member`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The instance and its change feed are gone.
    Removed,
    /// No instance of that name is registered.
    Unknown,
    /// It registered within the liveness window: it runs, and would register again.
    Live,
}

/// One instance of a keyspace, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its `--name`.
    pub name: String,
    /// Its etcd member id (kept across restarts; 0 when registering for the first time).
    pub member_id: u64,
    /// The client URLs it advertises.
    pub client_urls: Vec<String>,
    /// The peer URLs it reports.
    pub peer_urls: Vec<String>,
}

/// What a [`crate::Store::campaign`] for the writer role came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This instance writes now: its fence and the meta record as of the claim.
    Won {
        /// The raised epoch.
        fence: Fence,
        /// The meta record.
        meta: Meta,
    },
    /// Another instance holds the role.
    Lost {
        /// Its name.
        leader: String,
    },
}

/// Figures of a store's connection pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections open.
    pub open: usize,
    /// Of which idle.
    pub idle: usize,
    /// Most connections.
    pub max: usize,
    /// Tasks waiting for one.
    pub waiting: usize,
}

#[cfg(test)]
mod tests {
    use super::{LeaseOp, LeaseOps};

    #[test]
    fn the_last_operation_on_a_lease_decides_its_row() {
        let ops = LeaseOps {
            ops: vec![
                LeaseOp::Grant(1, 10),
                LeaseOp::Revoke { id: 1, ttl: 10 },
                LeaseOp::Revoke { id: 2, ttl: 20 },
                LeaseOp::Grant(2, 20),
                LeaseOp::Grant(3, 30),
            ],
        };
        let (mut ids, _, gone) = ops.net();
        ids.sort_unstable();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(gone, vec![1]);
        assert_eq!(ops.revokes().collect::<Vec<_>>(), vec![1, 2]);
    }
}
