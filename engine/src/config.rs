//! How to run an engine, with etcd's defaults where etcd has the same setting.

/// etcd's default `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// Default value-cache budget.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;
/// Default most requests per group commit.
pub const DEFAULT_MAX_BATCH: usize = 4096;
/// Committed batches the writer hands to the watch feed that may wait for it; when the
/// feed is this far behind, the writer does not wait: it stops handing batches over
/// until there is room, and the feed fills the gap from the index (see
/// [`crate::Engine::subscribe_commits`]).
pub const DEFAULT_COMMIT_HANDOFF: usize = 1024;
/// Bytes etcd adds around a request in its raft entry before comparing it with
/// `--max-request-bytes` (request header and field tags), approximated.
pub const REQUEST_ENVELOPE_BYTES: usize = 16;

/// How to run an engine (where the data lives is the store's business).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Value-cache budget in bytes.
    pub cache_bytes: usize,
    /// Largest write request accepted (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most compares/ops per txn level (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// Size of the keyspace in the store above which the NOSPACE alarm is raised and
    /// writes that add data fail; 0 = no quota.
    pub quota_backend_bytes: i64,
    /// Committed batches queued for the watch feed at most.
    pub commit_handoff: usize,
    /// This instance's member id (None: the keyspace's, as a single instance has).
    pub member_id: Option<u64>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache_bytes: DEFAULT_CACHE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_batch: DEFAULT_MAX_BATCH,
            quota_backend_bytes: 0,
            commit_handoff: DEFAULT_COMMIT_HANDOFF,
            member_id: None,
        }
    }
}
