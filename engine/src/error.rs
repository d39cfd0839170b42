//! The engine's errors. Each etcd-visible error carries etcd's exact meaning; the gRPC
//! layer maps them to etcd's codes and messages (see `pgetcd-server`'s status table).

use thiserror::Error;

/// An error of an engine operation.
#[derive(Debug, Error)]
pub enum Error {
    /// A request or compare without a key.
    #[error("key is not provided")]
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// `ignore_value` together with a value.
    #[error("value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("lease is provided")]
    LeaseProvided,
    /// More compares or ops in a txn than `--max-txn-ops`.
    #[error("too many operations in txn request")]
    TooManyOps,
    /// Two writes of one key in one txn.
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    /// Sort order or target outside the enum.
    #[error("invalid sort option")]
    InvalidSortOption,
    /// A revision at or below the compact revision was asked for.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// A revision above the current one was asked for.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// The lease named by a request does not exist.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// The keyspace is over `--quota-backend-bytes` (NOSPACE alarm raised).
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A CORRUPT alarm is raised: every write is refused.
    #[error("corrupt cluster")]
    Corrupt,
    /// LeaseGrant with an id in use.
    #[error("lease already exists")]
    LeaseExists,
    /// LeaseGrant with a TTL above the maximum.
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    /// The encoded request is larger than `--max-request-bytes`.
    #[error("request is too large")]
    RequestTooLarge,
    /// The outcome of the write is unknown or it failed for a transient reason; the
    /// client may retry (etcd's "request timed out").
    #[error("request timed out")]
    Timeout,
    /// A committed version's value is in neither the cache nor Postgres.
    #[error("value of revision {revision}.{sub} is missing from postgres")]
    MissingValue {
        /// Main revision.
        revision: i64,
        /// Sub-revision.
        sub: u32,
    },
    /// The engine is shutting down or its writer stopped.
    #[error("server stopped")]
    Stopped,
    /// Another pgetcd instance took over this keyspace (fencing epoch moved).
    #[error("keyspace {schema:?} was taken over by another pgetcd instance (leader epoch moved)")]
    Fenced {
        /// The keyspace.
        schema: String,
    },
    /// This instance's claim on the writer role may have lapsed: it cannot tell whether
    /// another instance writes now, so it serves no linearizable read.
    #[error("leader changed")]
    LeaderChanged,
    /// This instance follows the keyspace's writer and does not write itself.
    #[error("this instance follows the keyspace's writer")]
    NotWriter,
    /// The store failed (Postgres unreachable, misconfigured, schema too new, ...).
    #[error(transparent)]
    Storage(#[from] pgetcd_storage::StoreError),
}

/// Result of an engine operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
