//! pgetcd's MVCC engine: etcd's key-value semantics over a durable [`Store`].
//!
//! Owns the revision index (every key and its retained versions, in memory), the value
//! cache, txn evaluation, the single writer that group-commits batches to the store,
//! leases, and compaction's index prune. It speaks etcd's request and response messages
//! (`pgetcd-proto` without its gRPC feature).
//!
//! Invariants:
//! - One writer per keyspace assigns revisions; a revision is visible to readers only
//!   after its batch is durable in the store (read-your-writes, linearizable reads).
//! - Every commit carries the writer's [`pgetcd_storage::Fence`]; the store refuses it
//!   unless the epoch and the previous revision are unchanged.
//! - Reads never touch the store except to fetch values evicted from the cache.
//! - A write whose commit outcome is unknown is resolved by the store
//!   ([`Store::resolve`]), never guessed; until then its clients wait.
//!
//! Must not depend on tonic, on a database driver (tokio-postgres), or on the server.

/// How to run an engine, and etcd's defaults.
mod config;
/// The engine's handle: open, headers, figures, alarms, maintenance.
mod engine;
mod error;
/// Watch events from the index (replays, `prev_kv`), and the store's change feed.
mod events;
/// etcd's request semantics evaluated over the index.
mod exec;
/// Following a keyspace another instance writes: the change feed applied to the index,
/// the read index.
mod follower;
/// The request fuzz target's core (also run by ordinary tests).
#[doc(hidden)]
pub mod fuzzing;
/// etcd's HashKV over the index.
mod hash;
/// The in-memory revision index and value-cache bookkeeping.
pub mod index;
/// KV requests.
mod kv;
/// Leases and the keys attached to them.
pub mod lease;
/// Lease requests.
mod lease_requests;
/// Counters and histograms for `/metrics`.
pub mod metrics;
/// State shared by the request paths and the writer.
mod state;
/// Background tasks: lease expiry, quota checks.
mod tasks;
/// Request checks done before a request reaches the writer.
pub mod validate;
/// The single writer: batches, commits, in-doubt resolution, compaction.
mod writer;

pub use config::{
    DEFAULT_CACHE_BYTES, DEFAULT_COMMIT_HANDOFF, DEFAULT_MAX_BATCH, DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TXN_OPS, EngineConfig, REQUEST_ENVELOPE_BYTES,
};
pub use engine::{Engine, Stats};
pub use error::{Error, Result};
pub use events::{REPLAY_CHUNK_EVENTS, Replay, event_of, kv_of};
pub use exec::{Change, compare_kv, txn_has_put, txn_is_read_only};
pub use follower::{COMPACTION_POLL, SYNC_TIMEOUT};
pub use hash::{Crc32c, revision_key, stored_value};
pub use pgetcd_storage::{ChangeFeed, FeedCommit, FeedPrepared, PoolStatus, Store, StoreError};
pub use state::Committed;
pub use state::{ALARM_CORRUPT, ALARM_NOSPACE};
pub use tasks::ALARM_CHECK_INTERVAL;
