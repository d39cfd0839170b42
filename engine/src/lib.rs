//! pgetcd's MVCC engine: etcd's key-value semantics over Postgres.
//!
//! Owns the revision index (every key and its retained versions, in memory), the value
//! cache, txn evaluation, the single writer that group-commits batches to Postgres, and
//! compaction. It speaks etcd's request and response messages (`pgetcd-proto` without
//! its gRPC feature) but knows nothing of gRPC: it must not depend on tonic.
//!
//! Invariants:
//! - One writer per keyspace assigns revisions; a revision is visible to readers only
//!   after its batch committed in Postgres (read-your-writes, linearizable reads).
//! - Reads never touch Postgres except to fetch values evicted from the cache.
//! - A write whose COMMIT outcome is unknown is resolved by reading `meta` back, never
//!   guessed; until then its clients wait.

mod error;
mod events;
mod exec;
mod hash;
/// The in-memory revision index and value-cache bookkeeping.
pub mod index;
/// Leases and the keys attached to them.
pub mod lease;
/// Counters and histograms for `/metrics`.
pub mod metrics;
/// libpq's TLS parameters of the connection string, and the TLS connector they make.
mod pgtls;
mod store;
/// Request checks done before a request reaches the writer.
pub mod validate;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use parking_lot::RwLock;
use pgetcd_partitioning::Layout;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    TxnRequest, TxnResponse,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

pub use error::{Error, Result};
pub use events::{REPLAY_CHUNK_EVENTS, Replay, event_of, kv_of};
pub use exec::{Change, compare_kv, txn_has_put, txn_is_read_only};
pub use pgetcd_partitioning::DEFAULT_PARTITION_REVISIONS;
pub use pgtls::{PgConnect, PgTls, PgTlsConnect, PgTlsStream, PgUrlError, SslMode};
pub use store::{Meta, PgStore, WriterConn};

use exec::Exec;
use index::{Index, Visible};
use lease::{LeaseTable, MAX_LEASE_TTL, MIN_LEASE_TTL};
use metrics::EngineMetrics;
use writer::{Job, Op, Reply, Writer};

/// etcd's default `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;
/// etcd's default `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// Default value-cache budget.
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;
/// Default most requests per group commit.
pub const DEFAULT_MAX_BATCH: usize = 4096;
/// Bytes etcd adds around a request in its raft entry before comparing it with
/// `--max-request-bytes` (request header and field tags), approximated.
pub const REQUEST_ENVELOPE_BYTES: usize = 16;

/// How to run an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Postgres connection string (URL or libpq key=value form).
    pub postgres_url: String,
    /// Postgres schema of the keyspace.
    pub schema: String,
    /// Revisions per history partition.
    pub partition_revisions: i64,
    /// Value-cache budget in bytes.
    pub cache_bytes: usize,
    /// Largest write request accepted (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Most compares/ops per txn level (etcd's `--max-txn-ops`).
    pub max_txn_ops: usize,
    /// Most requests per group commit.
    pub max_batch: usize,
    /// Connections for value reads.
    pub read_pool_size: usize,
    /// Size of the keyspace in Postgres above which the NOSPACE alarm is raised and
    /// writes that add data fail; 0 = no quota.
    pub quota_backend_bytes: i64,
}

impl EngineConfig {
    /// Defaults for everything but the connection string.
    pub fn new(postgres_url: impl Into<String>) -> Self {
        Self {
            postgres_url: postgres_url.into(),
            schema: "pgetcd".into(),
            partition_revisions: pgetcd_partitioning::DEFAULT_PARTITION_REVISIONS,
            cache_bytes: DEFAULT_CACHE_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_batch: DEFAULT_MAX_BATCH,
            read_pool_size: 8,
            quota_backend_bytes: 0,
        }
    }
}

/// The index plus the revisions it is published at. Replaced whole when the writer
/// reloads from Postgres.
pub(crate) struct State {
    pub(crate) index: Index,
    published: AtomicI64,
    compact: AtomicI64,
    store: Arc<PgStore>,
    pub(crate) leases: Arc<LeaseTable>,
    metrics: Arc<EngineMetrics>,
}

impl State {
    pub(crate) fn published(&self) -> i64 {
        self.published.load(Ordering::Acquire)
    }

    pub(crate) fn compact(&self) -> i64 {
        self.compact.load(Ordering::SeqCst)
    }

    /// Fails a read at `at` if compaction passed it while the read ran.
    pub(crate) fn check_not_compacted(&self, at: i64) -> Result<()> {
        if at < self.compact() {
            Err(Error::Compacted)
        } else {
            Ok(())
        }
    }

    /// Whether a lease exists (granted, including by an earlier request of the batch
    /// being evaluated).
    pub(crate) fn lease_exists(&self, id: i64) -> bool {
        self.leases.exists(id)
    }

    /// Makes sure every entry of `kvs` has its value, reading misses from Postgres
    /// (tombstones have none to read).
    pub(crate) async fn fill_values(&self, kvs: &mut [Visible], at: i64) -> Result<()> {
        let missing: Vec<usize> = (0..kvs.len())
            .filter(|&i| kvs[i].version.value.is_none() && !kvs[i].version.is_tombstone())
            .collect();
        let hits = kvs.iter().filter(|kv| kv.version.value.is_some()).count();
        EngineMetrics::inc(&self.metrics.cache_hits, hits as u64);
        EngineMetrics::inc(&self.metrics.cache_misses, missing.len() as u64);
        if missing.is_empty() {
            return Ok(());
        }
        let ids: Vec<(i64, u32)> = missing
            .iter()
            .map(|&i| (kvs[i].version.mod_revision, kvs[i].version.sub))
            .collect();
        let got = self.store.fetch_values(&ids).await?;
        for (&i, id) in missing.iter().zip(ids.iter()) {
            match got.get(id) {
                Some(v) => {
                    self.index.fill(&kvs[i].key, id.0, id.1, v);
                    kvs[i].version.value = Some(v.clone());
                }
                None => {
                    self.check_not_compacted(at)?;
                    return Err(Error::MissingValue {
                        revision: id.0,
                        sub: id.1,
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the engine and its writer share.
pub(crate) struct Core {
    state: RwLock<Arc<State>>,
    store: Arc<PgStore>,
    cluster_id: u64,
    member_id: u64,
    raft_term: u64,
    config: EngineConfig,
    writer_failed: AtomicBool,
    leases: Arc<LeaseTable>,
    /// The NOSPACE alarm.
    nospace: AtomicBool,
    pub(crate) metrics: Arc<EngineMetrics>,
    /// (last revision, commit time) of recent batches, until the watch feed publishes
    /// them (for `publish_delay_seconds`).
    pub(crate) commit_times:
        parking_lot::Mutex<std::collections::VecDeque<(i64, std::time::Instant)>>,
    /// Where the writer hands committed batches to the watch feed, if subscribed.
    pub(crate) commits: parking_lot::Mutex<Option<mpsc::UnboundedSender<Committed>>>,
}

/// A batch the writer committed: its changes in revision order.
#[derive(Debug)]
pub struct Committed {
    /// The newest revision of the batch.
    pub last_revision: i64,
    /// Every change, in (revision, sub) order.
    pub changes: Vec<Change>,
}

impl Core {
    pub(crate) fn state(&self) -> Arc<State> {
        self.state.read().clone()
    }

    /// Loads a fresh state from Postgres: the index, and the leases (each with its full
    /// TTL from now) with their keys.
    pub(crate) async fn load_state(
        store: &Arc<PgStore>,
        client: &tokio_postgres::Client,
        cache_bytes: usize,
        leases: Arc<LeaseTable>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<State> {
        let meta = store.read_meta(client).await?;
        let index = Index::new(cache_bytes);
        let rows = store.load(client, &index, meta.compact_revision).await?;
        index.set_complete_upto(meta.revision);
        let granted = store.load_leases(client).await?;
        for id in leases.ids() {
            leases.remove(id);
        }
        for (id, ttl) in &granted {
            leases.insert(*id, *ttl);
        }
        leases.rebuild_keys(&index, meta.revision);
        info!(
            rows,
            keys = index.key_count(),
            revision = meta.revision,
            compact_revision = meta.compact_revision,
            "loaded index"
        );
        Ok(State {
            index,
            published: AtomicI64::new(meta.revision),
            compact: AtomicI64::new(meta.compact_revision),
            store: store.clone(),
            leases,
            metrics,
        })
    }
}

/// A running engine for one keyspace. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    core: Arc<Core>,
    jobs: mpsc::Sender<Job>,
}

/// Point-in-time figures for Status and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Current (published) revision.
    pub revision: i64,
    /// Compact revision (-1 before the first compaction).
    pub compact_revision: i64,
    /// Keys in the index (live or with retained history).
    pub index_keys: usize,
    /// Bytes of cached values.
    pub cached_bytes: usize,
}

impl Engine {
    /// Connects, creates or checks the keyspace schema, fences earlier writers, loads the
    /// index and starts the writer.
    pub async fn open(config: EngineConfig) -> Result<Engine> {
        let layout = Layout::new(&config.schema, config.partition_revisions)?;
        let store = Arc::new(PgStore::new(
            &config.postgres_url,
            layout,
            config.read_pool_size,
        )?);
        let mut client = store.connect().await?;
        let meta = store.setup(&mut client).await?;
        let leases = Arc::new(LeaseTable::default());
        let metrics = Arc::new(EngineMetrics::default());
        let state = Core::load_state(
            &store,
            &client,
            config.cache_bytes,
            leases.clone(),
            metrics.clone(),
        )
        .await?;
        let partitions = store.partitions(&client).await?;
        let conn = store.writer_conn(client).await?;
        let core = Arc::new(Core {
            state: RwLock::new(Arc::new(state)),
            store,
            cluster_id: meta.cluster_id,
            member_id: meta.member_id,
            raft_term: meta.leader_epoch as u64,
            config: config.clone(),
            writer_failed: AtomicBool::new(false),
            leases,
            nospace: AtomicBool::new(false),
            metrics,
            commit_times: parking_lot::Mutex::new(std::collections::VecDeque::new()),
            commits: parking_lot::Mutex::new(None),
        });
        let (jobs, rx) = mpsc::channel(config.max_batch * 4);
        let writer = Writer::new(core.clone(), rx, conn, meta.leader_epoch, partitions);
        tokio::spawn(writer.run());
        let engine = Engine { core, jobs };
        tokio::spawn(expire_leases(
            engine.core.leases.clone(),
            engine.jobs.downgrade(),
        ));
        if config.quota_backend_bytes > 0 {
            tokio::spawn(watch_quota(Arc::downgrade(&engine.core)));
        }
        Ok(engine)
    }

    /// Fills the header's ids and term (and revision when unset), like etcd's
    /// header filler.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(Default::default);
        h.cluster_id = self.core.cluster_id;
        h.member_id = self.core.member_id;
        h.raft_term = self.core.raft_term;
        if h.revision == 0 {
            h.revision = self.core.state().published();
        }
    }

    /// A header for responses that are not produced by the engine.
    pub fn header(&self) -> ResponseHeader {
        let mut h = None;
        self.fill_header(&mut h);
        h.unwrap_or_default()
    }

    /// etcd cluster id of this keyspace.
    pub fn cluster_id(&self) -> u64 {
        self.core.cluster_id
    }

    /// etcd member id of this server.
    pub fn member_id(&self) -> u64 {
        self.core.member_id
    }

    /// Raft term stand-in: the leader epoch of this instance.
    pub fn raft_term(&self) -> u64 {
        self.core.raft_term
    }

    /// Current figures.
    pub fn stats(&self) -> Stats {
        let st = self.core.state();
        Stats {
            revision: st.published(),
            compact_revision: st.compact(),
            index_keys: st.index.key_count(),
            cached_bytes: st.index.cached_bytes(),
        }
    }

    /// `--quota-backend-bytes` (0: none).
    pub fn quota_backend_bytes(&self) -> i64 {
        self.core.config.quota_backend_bytes
    }

    /// Committed batches from now on, straight from the writer (replaces an earlier
    /// subscriber). Batches that changed no revision are not sent.
    pub fn subscribe_commits(&self) -> mpsc::UnboundedReceiver<Committed> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.core.commits.lock() = Some(tx);
        rx
    }

    /// Records, for every batch committed up to `revision`, the delay until its events
    /// reached the watch bus (called by the watch feed after publishing).
    pub fn note_published(&self, revision: i64) {
        let now = std::time::Instant::now();
        let mut times = self.core.commit_times.lock();
        while let Some(&(rev, at)) = times.front() {
            if rev > revision {
                break;
            }
            times.pop_front();
            self.core
                .metrics
                .publish_delay_seconds
                .observe(now.duration_since(at).as_secs_f64());
        }
    }

    /// The engine's counters and histograms.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.core.metrics
    }

    /// Keys with a live version at the current revision (etcd's keys gauge); counts the
    /// index, so it costs O(keys).
    pub fn live_keys(&self) -> usize {
        let st = self.core.state();
        let all = index::KeyRange::Span {
            start: bytes::Bytes::from_static(b"\0"),
            end: None,
        };
        st.index.count(&all, st.published())
    }

    /// Whether the writer stopped for good (fenced by another instance).
    pub fn writer_failed(&self) -> bool {
        self.core.writer_failed.load(Ordering::Relaxed)
    }

    /// Whether the NOSPACE alarm is raised.
    pub fn nospace(&self) -> bool {
        self.core.nospace.load(Ordering::SeqCst)
    }

    /// Raises or clears the NOSPACE alarm (Alarm ACTIVATE / DEACTIVATE). A cleared
    /// alarm is raised again at the next check while the keyspace is over quota.
    pub fn set_nospace(&self, on: bool) {
        self.core.nospace.store(on, Ordering::SeqCst);
    }

    fn check_space(&self) -> Result<()> {
        if self.nospace() {
            Err(Error::NoSpace)
        } else {
            Ok(())
        }
    }

    /// Size on disk of the keyspace in Postgres.
    pub async fn db_size(&self) -> Result<i64> {
        self.core.store.db_size().await
    }

    /// Whether Postgres answers.
    pub async fn ping(&self) -> Result<()> {
        self.core.store.ping().await
    }

    /// etcd's HashKV at `revision` (0: current): (hash, current revision, compact
    /// revision), bit-for-bit what etcd computes for the same history (see `hash.rs`).
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let st = self.core.state();
        let current = st.published();
        let compact = st.compact();
        if revision > 0 && revision <= compact {
            return Err(Error::Compacted);
        }
        if revision > current {
            return Err(Error::FutureRevision);
        }
        let at = if revision == 0 { current } else { revision };
        let mut keys: Vec<(bytes::Bytes, Vec<index::Version>)> = Vec::new();
        st.index.for_each_key(|k, versions| {
            keys.push((bytes::Bytes::copy_from_slice(k), versions.to_vec()))
        });
        let mut items = hash::select(keys.iter().map(|(k, v)| (k, v.as_slice())), at, compact);
        drop(keys);
        const CHUNK: usize = 4096;
        let missing: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].version.value.is_none() && !items[i].version.is_tombstone())
            .collect();
        for chunk in missing.chunks(CHUNK) {
            let ids: Vec<(i64, u32)> = chunk
                .iter()
                .map(|&i| (items[i].version.mod_revision, items[i].version.sub))
                .collect();
            let got = self.core.store.fetch_values(&ids).await?;
            for (&i, id) in chunk.iter().zip(&ids) {
                match got.get(id) {
                    Some(v) => items[i].version.value = Some(v.clone()),
                    // Compaction removed it while the hash ran.
                    None => return Err(Error::Compacted),
                }
            }
        }
        Ok((hash::hash(&items)?, current, compact))
    }

    /// VACUUM of the keyspace's tables (Maintenance.Defragment).
    pub async fn vacuum(&self) -> Result<()> {
        self.core.store.vacuum().await
    }

    /// Read pool figures: (connections open, idle, maximum, tasks waiting).
    pub fn pool_status(&self) -> (usize, usize, usize, usize) {
        self.core.store.pool_status()
    }

    /// A connection of the read pool, for short queries beside the engine's own
    /// (metrics); it goes back to the pool when dropped.
    pub async fn pooled_connection(&self) -> Result<deadpool_postgres::Object> {
        self.core.store.pooled().await
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len + REQUEST_ENVELOPE_BYTES > self.core.config.max_request_bytes {
            Err(Error::RequestTooLarge)
        } else {
            Ok(())
        }
    }

    async fn submit(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Range: served from the index at the published revision.
    pub async fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        validate::check_range(r)?;
        EngineMetrics::inc(&self.core.metrics.ranges, 1);
        let st = self.core.state();
        let ex = Exec::new(&st, st.published(), st.compact());
        let mut resp = ex.range(r).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Put through the writer.
    pub async fn put(&self, r: PutRequest) -> Result<PutResponse> {
        validate::check_put(&r)?;
        self.check_space()?;
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Put(r)).await? {
            Reply::Put(mut resp) => {
                EngineMetrics::inc(&self.core.metrics.puts, 1);
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// DeleteRange through the writer.
    pub async fn delete_range(&self, r: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        validate::check_delete(&r)?;
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Delete(r)).await? {
            Reply::Delete(mut resp) => {
                EngineMetrics::inc(&self.core.metrics.deletes, 1);
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// Txn: read-only txns are served from the index; others go through the writer.
    pub async fn txn(&self, r: TxnRequest) -> Result<TxnResponse> {
        validate::check_txn(&r, self.core.config.max_txn_ops)?;
        let mut resp = if txn_is_read_only(&r) {
            let st = self.core.state();
            let mut ex = Exec::new(&st, st.published(), st.compact());
            ex.txn(&r).await?
        } else {
            if txn_has_put(&r) {
                self.check_space()?;
            }
            self.check_size(r.encoded_len())?;
            match self.submit(Op::Txn(r)).await? {
                Reply::Txn(resp) => resp,
                _ => return Err(Error::Stopped),
            }
        };
        self.count_txn_ops(&resp);
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Counts the operations a txn executed, as etcd counts them: each range, put and
    /// delete (nested txns included), and the txn itself when it ran more than one.
    fn count_txn_ops(&self, resp: &TxnResponse) {
        fn walk(resp: &TxnResponse, n: &mut [u64; 3]) {
            use pgetcd_proto::etcdserverpb::response_op::Response as R;
            for op in &resp.responses {
                match &op.response {
                    Some(R::ResponseRange(_)) => n[0] += 1,
                    Some(R::ResponsePut(_)) => n[1] += 1,
                    Some(R::ResponseDeleteRange(_)) => n[2] += 1,
                    Some(R::ResponseTxn(t)) => walk(t, n),
                    None => {}
                }
            }
        }
        let mut n = [0u64; 3];
        walk(resp, &mut n);
        let m = &self.core.metrics;
        EngineMetrics::inc(&m.ranges, n[0]);
        EngineMetrics::inc(&m.puts, n[1]);
        EngineMetrics::inc(&m.deletes, n[2]);
        if n.iter().sum::<u64>() > 1 {
            EngineMetrics::inc(&m.txns, 1);
        }
    }

    /// Compact through the writer; returns once history at or below the revision is
    /// gone from memory and Postgres (partitions dropped).
    pub async fn compact(&self, r: CompactionRequest) -> Result<CompactionResponse> {
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Compact(r)).await? {
            Reply::Compact(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }
}

/// How often the keyspace's size is compared with the quota.
pub const QUOTA_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Raises the NOSPACE alarm when the keyspace grows over its quota (it stays raised
/// until disarmed, as in etcd). Ends when the engine is dropped.
async fn watch_quota(core: std::sync::Weak<Core>) {
    let mut tick = tokio::time::interval(QUOTA_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        if let Ok(size) = core.store.db_size().await
            && size > core.config.quota_backend_bytes
            && !core.nospace.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                size,
                quota = core.config.quota_backend_bytes,
                "NOSPACE alarm raised"
            );
        }
    }
}

/// Every 500 ms, revokes leases past their expiry through the writer (one revision per
/// lease, all its keys deleted in it). Ends when the engine is dropped.
async fn expire_leases(leases: Arc<LeaseTable>, jobs: mpsc::WeakSender<Job>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Some(jobs) = jobs.upgrade() else { return };
        for id in leases.take_expired(tokio::time::Instant::now()) {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                op: Op::LeaseRevoke(LeaseRevokeRequest { id }),
                reply,
            };
            if jobs.send(job).await.is_err() {
                return;
            }
            let leases = leases.clone();
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(_)) | Ok(Err(Error::LeaseNotFound)) => {}
                    _ => leases.retry_expiry(id),
                }
            });
        }
    }
}

impl Engine {
    /// LeaseGrant: TTL raised to the minimum, an id picked when 0, durable once answered.
    pub async fn lease_grant(&self, r: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        self.check_space()?;
        let ttl = r.ttl.max(MIN_LEASE_TTL);
        let mut id = r.id;
        while id == 0 || (r.id == 0 && self.core.leases.exists(id)) {
            id = (rand::random::<u64>() >> 1) as i64;
        }
        match self.submit(Op::LeaseGrant { id, ttl }).await? {
            Reply::LeaseGrant(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// LeaseRevoke: deletes the lease's keys in one revision.
    pub async fn lease_revoke(&self, r: LeaseRevokeRequest) -> Result<LeaseRevokeResponse> {
        match self.submit(Op::LeaseRevoke(r)).await? {
            Reply::LeaseRevoke(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// One keepalive: the lease's TTL, or 0 when it does not exist.
    pub fn lease_keep_alive(&self, id: i64) -> LeaseKeepAliveResponse {
        LeaseKeepAliveResponse {
            header: Some(self.header()),
            id,
            ttl: self.core.leases.keep_alive(id),
        }
    }

    /// LeaseTimeToLive: TTL -1 for an unknown lease, as etcd.
    pub fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
        let header = Some(self.header());
        match self.core.leases.info(r.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: info.remaining,
                granted_ttl: info.granted,
                keys: if r.keys { info.keys } else { Vec::new() },
            },
            None => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        }
    }

    /// LeaseLeases: every granted lease.
    pub fn lease_leases(&self) -> LeaseLeasesResponse {
        LeaseLeasesResponse {
            header: Some(self.header()),
            leases: self
                .core
                .leases
                .ids()
                .into_iter()
                .map(|id| LeaseStatus { id })
                .collect(),
        }
    }
}
