//! The engine's handle: opening a keyspace, response headers, figures, alarms and
//! maintenance. Requests are in `kv.rs` and `lease_requests.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use pgetcd_proto::etcdserverpb::ResponseHeader;
use pgetcd_storage::{Fence, Meta, PoolStatus, Store};
use tokio::sync::{mpsc, oneshot};

use crate::config::{EngineConfig, REQUEST_ENVELOPE_BYTES};
use crate::error::{Error, Result};
use crate::lease::LeaseTable;
use crate::metrics::EngineMetrics;
use crate::state::{ALARM_CORRUPT, ALARM_NOSPACE};
use crate::state::{Committed, Core};
use crate::writer::{Job, Op, Reply, Writer};
use crate::{hash, index, tasks};

/// A running engine for one keyspace. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) core: Arc<Core>,
    pub(crate) jobs: mpsc::Sender<Job>,
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
    /// Sets up the keyspace in `store` (creating or checking its schema), takes it for
    /// writing (raising the fencing epoch, so any earlier writer is fenced), loads the
    /// index and starts the writer and the engine's background tasks.
    pub async fn open(config: EngineConfig, store: Arc<dyn Store>) -> Result<Engine> {
        store.setup().await?;
        let (fence, meta) = store.fence().await?;
        Engine::open_fenced(config, store, fence, meta).await
    }

    /// Loads the index and starts the writer with a fence already taken (by
    /// [`Store::fence`] or a won [`Store::campaign`]).
    pub async fn open_fenced(
        config: EngineConfig,
        store: Arc<dyn Store>,
        fence: Fence,
        meta: Meta,
    ) -> Result<Engine> {
        let (engine, rx) = Engine::with_state(config, store, meta, Some(fence)).await?;
        let writer = Writer::new(engine.core.clone(), rx, fence);
        tokio::spawn(writer.run());
        tokio::spawn(tasks::expire_leases(
            engine.core.leases.clone(),
            engine.jobs.downgrade(),
        ));
        Ok(engine)
    }

    /// An engine over the store's current state (loaded now), with its write queue;
    /// `fence` is the writer's, None for a follower.
    pub(crate) async fn with_state(
        config: EngineConfig,
        store: Arc<dyn Store>,
        meta: Meta,
        fence: Option<Fence>,
    ) -> Result<(Engine, mpsc::Receiver<Job>)> {
        let leases = Arc::new(LeaseTable::default());
        let metrics = Arc::new(EngineMetrics::default());
        let state =
            Core::load_state(&store, config.cache_bytes, leases.clone(), metrics.clone()).await?;
        let alarms = store.alarms().await?;
        let (jobs, rx) = mpsc::channel(config.max_batch * 4);
        let core = Arc::new(Core {
            state: RwLock::new(Arc::new(state)),
            store,
            cluster_id: meta.cluster_id,
            member_id: config.member_id.unwrap_or(meta.member_id),
            raft_term: fence.map_or(meta.leader_epoch, |f| f.epoch) as u64,
            follower: fence.is_none(),
            config,
            writer_failed: AtomicBool::new(false),
            leases,
            alarms: parking_lot::RwLock::new(alarms),
            alarms_refresh: tokio::sync::Mutex::new(()),
            metrics,
            commit_times: Mutex::new(VecDeque::new()),
            commits: Mutex::new(None),
            handoff_skipped: AtomicU64::new(0),
            applied: tokio::sync::Notify::new(),
            retired: Arc::new(tokio::sync::Notify::new()),
            compact_now: Arc::new(tokio::sync::Notify::new()),
            claim_until: Mutex::new(None),
            read_index: tokio::sync::Mutex::new(()),
            read_index_last: Mutex::new(None),
        });
        tokio::spawn(tasks::watch_alarms(Arc::downgrade(&core)));
        Ok((Engine { core, jobs }, rx))
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

    /// The newest revision committed and published here.
    pub fn revision(&self) -> i64 {
        self.core.state().published()
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
    ///
    /// The queue holds `commit_handoff` batches. The writer never waits for it: a batch
    /// that finds it full is not handed over (counted by [`Engine::handoff_skipped`]), so
    /// the subscriber sees a gap before the next batch it gets and must fill it from the
    /// index ([`Engine::events_between`]) or the store's change feed.
    pub fn subscribe_commits(&self) -> mpsc::Receiver<Committed> {
        let (tx, rx) = mpsc::channel(self.core.config.commit_handoff.max(1));
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
        self.core.has_alarm(ALARM_NOSPACE)
    }

    /// Write requests waiting for the writer (etcd's pending proposals).
    pub fn pending_writes(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// The keyspace's alarms (as last read from the store): (member id, type), ordered.
    pub fn alarms(&self) -> Vec<(u64, i32)> {
        self.core.alarms.read().clone()
    }

    /// Reads the keyspace's alarms from the store (another instance may have changed
    /// them) and returns them.
    pub async fn refresh_alarms(&self) -> Result<Vec<(u64, i32)>> {
        self.core.refresh_alarms().await
    }

    /// Raises (`on`) or clears alarm `alarm` of member `member_id` in the store (every
    /// instance of the keyspace sees it within a second); returns whether it was
    /// raised before.
    pub async fn set_alarm(&self, member_id: u64, alarm: i32, on: bool) -> Result<bool> {
        let was = self.core.store.set_alarm(member_id, alarm, on).await?;
        self.core.refresh_alarms().await?;
        Ok(was)
    }

    pub(crate) fn check_space(&self) -> Result<()> {
        if self.nospace() {
            Err(Error::NoSpace)
        } else {
            Ok(())
        }
    }

    /// etcd refuses every write while a CORRUPT alarm is raised.
    pub(crate) fn check_corrupt(&self) -> Result<()> {
        if self.core.has_alarm(ALARM_CORRUPT) {
            Err(Error::Corrupt)
        } else {
            Ok(())
        }
    }

    /// Committed batches not handed to the watch feed because its queue was full.
    pub fn handoff_skipped(&self) -> u64 {
        self.core.handoff_skipped.load(Ordering::Relaxed)
    }

    /// Size of the keyspace in its store.
    pub async fn db_size(&self) -> Result<i64> {
        Ok(self.core.store.size().await?)
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<()> {
        Ok(self.core.store.ping().await?)
    }

    /// etcd's HashKV at `revision` (0: current): (hash, current revision, compact
    /// revision), bit-for-bit what etcd computes for the same history (see `hash.rs`).
    pub async fn hash_kv(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let (items, current, compact) = self.hashed_revisions(revision).await?;
        Ok((hash::hash(&items)?, current, compact))
    }

    /// The keyspace as one consistent snapshot of its store, streamed in revision order
    /// (what an etcd snapshot of it holds: Maintenance.Snapshot and Hash).
    pub async fn export(&self) -> Result<pgetcd_storage::Export> {
        Ok(self.core.store.export().await?)
    }

    /// The revisions of etcd's `key` bucket that HashKV at `revision` (0: current)
    /// covers (`hash::select`; the index keeps what etcd's bolt keeps), in revision order
    /// with their values, and the current and compact revisions.
    async fn hashed_revisions(&self, revision: i64) -> Result<(Vec<hash::Item>, i64, i64)> {
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
            let got = self.core.store.values(&ids).await?;
            for (&i, id) in chunk.iter().zip(&ids) {
                match got.get(id) {
                    Some(v) => items[i].version.value = Some(v.clone()),
                    // Compaction removed it meanwhile.
                    None => return Err(Error::Compacted),
                }
            }
        }
        Ok((items, current, compact))
    }

    /// Makes freed space reusable (Maintenance.Defragment; VACUUM on Postgres).
    pub async fn defragment(&self) -> Result<()> {
        Ok(self.core.store.defragment().await?)
    }

    /// The store's read pool figures.
    pub fn pool_status(&self) -> PoolStatus {
        self.core.store.pool_status()
    }

    pub(crate) fn check_size(&self, len: usize) -> Result<()> {
        if len + REQUEST_ENVELOPE_BYTES > self.core.config.max_request_bytes {
            Err(Error::RequestTooLarge)
        } else {
            Ok(())
        }
    }

    pub(crate) async fn submit(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}
