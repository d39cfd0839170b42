//! The storage boundary of pgetcd: what the MVCC engine needs from durable storage,
//! and nothing about how a backend provides it.
//!
//! The engine (`pgetcd-engine`) owns etcd's semantics: the revision index, txn
//! evaluation, the single writer and compaction's index prune. A [`Store`] owns the
//! durable copy of one keyspace: schema set-up and version check, the fence that makes
//! one writer at a time, the start-up load, the fenced commit of a batch, resolution of
//! a commit whose outcome is unknown, value reads on cache misses, compaction's data
//! step, size figures, and a [`ChangeFeed`] of committed batches with confirmable
//! positions (for watches and, later, followers).
//!
//! Invariants every implementation keeps:
//! - A commit is all or nothing, and is refused ([`StoreError::Fenced`]) unless the
//!   fencing epoch *and* the previous revision are still the ones the writer holds
//!   (compare-and-swap), so a deposed writer or a batch built on a stale view can never
//!   land.
//! - Errors are classified conservatively ([`StoreError::outcome`]): `Determinate`
//!   only when it is certain nothing was written; everything else that may have
//!   written is `Indeterminate`, and the writer must call [`Store::resolve`], which
//!   first makes sure the attempt can no longer commit, before it answers anyone.
//! - The change feed delivers every committed batch, in revision order, at least once
//!   after the last position confirmed; callers skip revisions they already have.
//!
//! Must not depend on the engine, gRPC, or any database driver: backends live in
//! crates of their own (`pgetcd-storage-postgres`) and depend on this one.

mod error;
/// The data a store reads and writes: versions, changes, batches, leases, meta.
mod model;
/// The [`Store`] and [`ChangeFeed`] traits.
mod store;

/// A store wrapper that injects determinate, indeterminate and fenced failures.
pub mod faulty;
/// An in-memory store: the reference implementation of the traits, for tests.
pub mod memory;

pub use error::{BoxError, Outcome, Result, StoreError};
pub use model::{
    AuthRecord, Batch, CHUNK_VERSIONS, CHUNKS_IN_FLIGHT, Campaign, Change, Changes, CompactionPlan,
    Export, FeedCommit, FeedPrepared, Fence, Import, Imported, LeaseOp, LeaseOps, Loaded,
    MemberInfo, Meta, PoolStatus, Pruned, Removal, Resolution, Version, VersionChunk, VersionId,
};
pub use store::{ChangeFeed, LoadVisitor, Store};
