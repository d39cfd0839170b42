//! The single writer of a keyspace: drains queued write requests into a batch,
//! evaluates them in order against the index (each sees the effects of the ones before
//! it), commits the whole batch in one Postgres transaction, then publishes the new
//! revision and answers every client.
//!
//! Failure protocol:
//! - Determinate commit failure: the batch's versions are removed from the index and
//!   every client of the batch gets `Timeout` (etcd's "request timed out").
//! - Indeterminate (connection lost around COMMIT): the writer reconnects and reads
//!   `meta.revision` until it can tell. Committed: publish and answer normally. Not
//!   committed: roll back and answer `Timeout`. Nobody is answered before that.
//! - Fenced (another instance raised the leader epoch): roll back, answer `Fenced`,
//!   and stop; later requests get `Stopped`.
//! - Compaction failure (recording the compact revision failed): the index is
//!   reloaded from Postgres, which still holds the uncompacted state. The index is
//!   pruned only after the compact revision is durable, a slice between batches.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
    TxnRequest, TxnResponse,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::exec::{Change, Exec, header};
use crate::metrics::EngineMetrics;
use crate::{Core, State};

/// Commit times kept for the watch feed's delay histogram.
const COMMIT_TIMES: usize = 4096;
use crate::index::Pruned;
use crate::store::{CommitError, LeaseOp, LeaseOps, WriterConn};

/// A write request.
pub(crate) enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    LeaseGrant { id: i64, ttl: i64 },
    LeaseRevoke(LeaseRevokeRequest),
}

/// Its response.
pub(crate) enum Reply {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
}

/// A queued request and where its answer goes.
pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Reply>>,
}

pub(crate) struct Writer {
    core: Arc<Core>,
    rx: mpsc::Receiver<Job>,
    conn: Option<WriterConn>,
    epoch: i64,
    partitions: Vec<i64>,
    stash: Option<Job>,
    /// The data halves of compactions, done in order by [`run_physical`].
    physical: mpsc::UnboundedSender<PhysicalJob>,
    /// The index prune of the last recorded compaction, while it is going on.
    prune: Option<Prune>,
}

/// Keys pruned per slice of a compaction's index prune (about 1 ms per slice measured
/// at 1.2M keys).
const PRUNE_SLICE_KEYS: usize = 16 * 1024;

/// A compaction's index prune, done a slice of [`PRUNE_SLICE_KEYS`] keys at a time
/// between batches, so writes never wait for a walk over the whole index (200 ms at
/// 1.26M keys). Reads are unaffected: revisions below the compact revision are refused
/// from the moment it is recorded, and pruning only removes versions no other revision
/// can see. Its data work goes to [`run_physical`] once the whole index is done.
struct Prune {
    /// The index being pruned (the state current when the compaction was recorded).
    state: Arc<State>,
    retained_below: i64,
    drop_below: i64,
    /// Where the next slice starts (None: at the first key).
    from: Option<Box<[u8]>>,
    job: PhysicalJob,
}

/// The Postgres data work of one compaction (see [`Writer::compact`]).
struct PhysicalJob {
    epoch: i64,
    rev: i64,
    pruned: Pruned,
    drop: Vec<i64>,
    started: std::time::Instant,
    index_time: Duration,
    /// Answered once the data is pruned (`physical: true`), with the header revision.
    reply: Option<(oneshot::Sender<Result<Reply>>, i64)>,
}

/// Runs compactions' data work one after the other on its own connection, so writes go
/// on meanwhile. A failed attempt is retried (the work is idempotent) before any later
/// compaction's: their versions-to-copy lists assume the earlier drops happened. Stops
/// when fenced.
async fn run_physical(core: Arc<Core>, mut jobs: mpsc::UnboundedReceiver<PhysicalJob>) {
    let mut conn: Option<tokio_postgres::Client> = None;
    while let Some(job) = jobs.recv().await {
        let mut backoff = Duration::from_millis(50);
        loop {
            let ready = match conn.take().filter(|c| !c.is_closed()) {
                Some(c) => Ok(c),
                None => core.store.connect().await,
            };
            let result = match ready {
                Ok(mut c) => {
                    let r = core
                        .store
                        .physical_compaction(&mut c, job.epoch, &job.pruned, &job.drop)
                        .await;
                    conn = Some(c);
                    r
                }
                Err(e) => Err(CommitError::Determinate(e)),
            };
            match result {
                Ok(()) => {
                    let m = &core.metrics;
                    m.compaction_seconds
                        .observe(job.started.elapsed().as_secs_f64());
                    EngineMetrics::inc(&m.compactions, 1);
                    m.compactions_pending.fetch_sub(1, Ordering::Relaxed);
                    info!(
                        compact_revision = job.rev,
                        dropped_partitions = job.drop.len(),
                        retained = job.pruned.to_retain.len(),
                        keys_removed = job.pruned.keys_removed,
                        index_ms = job.index_time.as_millis() as u64,
                        total_ms = job.started.elapsed().as_millis() as u64,
                        "compacted"
                    );
                    if let Some((reply, rev)) = job.reply {
                        let _ = reply.send(Ok(Reply::Compact(CompactionResponse {
                            header: header(rev),
                        })));
                    }
                    break;
                }
                Err(CommitError::Fenced) => {
                    if let Some((reply, _)) = job.reply {
                        let _ = reply.send(Err(Error::Fenced {
                            schema: core.config.schema.clone(),
                        }));
                    }
                    warn!("compaction stopped: this keyspace is now written by another instance");
                    return;
                }
                Err(CommitError::Determinate(e) | CommitError::Indeterminate(e)) => {
                    EngineMetrics::inc(&core.metrics.compaction_retries, 1);
                    warn!(error = %e, revision = job.rev, "compaction: pruning postgres failed, will retry");
                    conn = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

enum Outcome {
    Committed,
    NotCommitted(Error),
    Fenced,
}

impl Writer {
    pub(crate) fn new(
        core: Arc<Core>,
        rx: mpsc::Receiver<Job>,
        conn: WriterConn,
        epoch: i64,
        partitions: Vec<i64>,
    ) -> Self {
        let (physical, jobs) = mpsc::unbounded_channel();
        tokio::spawn(run_physical(core.clone(), jobs));
        Self {
            core,
            rx,
            conn: Some(conn),
            epoch,
            partitions,
            stash: None,
            physical,
            prune: None,
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            self.prune_slice();
            let first = match self.stash.take() {
                Some(job) => job,
                None if self.prune.is_some() => match self.rx.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // Nothing queued: prune on, letting other tasks run between slices.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                },
                None => match self.rx.recv().await {
                    Some(job) => job,
                    None => break,
                },
            };
            let keep_going = if let Op::Compact(req) = first.op {
                self.finish_prune();
                self.compact(req, first.reply).await
            } else {
                let mut batch = vec![first];
                while batch.len() < self.core.config.max_batch {
                    match self.rx.try_recv() {
                        Ok(job) if matches!(job.op, Op::Compact(_)) => {
                            self.stash = Some(job);
                            break;
                        }
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                self.batch(batch).await
            };
            if !keep_going {
                self.core.writer_failed.store(true, Ordering::Relaxed);
                error!("writer stopped: this keyspace is now written by another instance");
                self.rx.close();
                while let Some(job) = self.rx.recv().await {
                    let _ = job.reply.send(Err(Error::Fenced {
                        schema: self.core.config.schema.clone(),
                    }));
                }
                return;
            }
        }
        self.finish_prune();
        info!("writer finished");
    }

    /// Prunes the next slice of keys of the compaction in progress; once the index is
    /// done, hands the compaction's data work to [`run_physical`].
    fn prune_slice(&mut self) {
        let Some(p) = self.prune.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        p.from = p.state.index.compact_slice(
            p.job.rev,
            p.retained_below,
            p.drop_below,
            p.from.as_deref(),
            PRUNE_SLICE_KEYS,
            &mut p.job.pruned,
        );
        p.job.index_time += started.elapsed();
        if p.from.is_none()
            && let Some(p) = self.prune.take()
        {
            let _ = self.physical.send(p.job);
        }
    }

    /// Prunes what is left of the compaction in progress at once (before the next
    /// compaction, whose data work must follow this one's, and before a reload).
    fn finish_prune(&mut self) {
        while self.prune.is_some() {
            self.prune_slice();
        }
    }

    /// The writer's connection, reconnected (and statements prepared) when lost.
    async fn conn(&mut self) -> Result<&mut WriterConn> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = None;
            let client = self.core.store.connect().await?;
            self.conn = Some(self.core.store.writer_conn(client).await?);
        }
        self.conn.as_mut().ok_or(Error::Stopped)
    }

    fn fenced(&self) -> Error {
        Error::Fenced {
            schema: self.core.config.schema.clone(),
        }
    }

    /// Evaluates, commits and answers one batch. Returns false when fenced.
    async fn batch(&mut self, jobs: Vec<Job>) -> bool {
        let st = self.core.state();
        let published = st.published();
        let compact = st.compact();
        let mut rev = published;
        let mut changes: Vec<Change> = Vec::new();
        let mut lease_ops = LeaseOps::default();
        let mut results: Vec<(oneshot::Sender<Result<Reply>>, Result<Reply>)> =
            Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut ex = Exec::new(&st, rev, compact);
            let res = match &job.op {
                Op::Put(p) => ex.put(p).await.map(Reply::Put),
                Op::Delete(d) => ex.delete_range(d).await.map(Reply::Delete),
                Op::Txn(t) => ex.txn(t).await.map(Reply::Txn),
                Op::Compact(_) => Err(Error::Stopped),
                Op::LeaseGrant { id, ttl } => {
                    if st.leases.exists(*id) {
                        Err(Error::LeaseExists)
                    } else {
                        st.leases.insert(*id, *ttl);
                        lease_ops.ops.push(LeaseOp::Grant(*id, *ttl));
                        Ok(Reply::LeaseGrant(LeaseGrantResponse {
                            header: header(rev),
                            id: *id,
                            ttl: *ttl,
                            error: String::new(),
                        }))
                    }
                }
                Op::LeaseRevoke(r) => match st.leases.remove(r.id) {
                    None => Err(Error::LeaseNotFound),
                    Some(ttl) => {
                        lease_ops.ops.push(LeaseOp::Revoke { id: r.id, ttl });
                        // Attached keys, plus keys attached earlier in this batch (the
                        // attachments are updated only after commit).
                        let mut keys = st.leases.keys_of(r.id);
                        keys.extend(
                            changes
                                .iter()
                                .filter(|c| c.version.lease == r.id)
                                .map(|c| c.key.clone()),
                        );
                        keys.sort();
                        keys.dedup();
                        Ok(Reply::LeaseRevoke(LeaseRevokeResponse {
                            header: header(ex.delete_leased_keys(&keys, r.id)),
                        }))
                    }
                },
            };
            match res {
                Ok(reply) => {
                    let mine = ex.into_changes();
                    if !mine.is_empty() {
                        rev += 1;
                        changes.extend(mine);
                    }
                    results.push((job.reply, Ok(reply)));
                }
                Err(e) => {
                    ex.rollback();
                    results.push((job.reply, Err(e)));
                }
            }
        }
        if changes.is_empty() && lease_ops.is_empty() {
            for (reply, res) in results {
                let _ = reply.send(res);
            }
            return true;
        }
        let started = std::time::Instant::now();
        let outcome = self.commit(published, rev, &changes, &lease_ops).await;
        let m = &self.core.metrics;
        m.commit_seconds.observe(started.elapsed().as_secs_f64());
        m.batch_size.observe(results.len() as f64);
        if !matches!(outcome, Outcome::Committed) {
            EngineMetrics::inc(&m.commit_failures, 1);
        }
        let failure = match outcome {
            Outcome::Committed => {
                st.leases.apply(&changes, lease_ops.revokes());
                st.index
                    .note_committed(changes.iter().map(|c| (&c.key, &c.version)));
                st.published.store(rev, Ordering::Release);
                if rev > published {
                    let mut times = self.core.commit_times.lock();
                    if times.len() >= COMMIT_TIMES {
                        times.pop_front();
                    }
                    times.push_back((rev, std::time::Instant::now()));
                    drop(times);
                    if let Some(tx) = self.core.commits.lock().as_ref() {
                        let _ = tx.send(crate::Committed {
                            last_revision: rev,
                            changes: changes.clone(),
                        });
                    }
                }
                st.index.note_cached(changes.iter().filter_map(|c| {
                    c.version.value.as_ref().map(|v| {
                        (
                            c.key.clone(),
                            c.version.mod_revision,
                            c.version.sub,
                            v.len(),
                        )
                    })
                }));
                for (reply, res) in results {
                    let _ = reply.send(res);
                }
                return true;
            }
            Outcome::NotCommitted(e) => {
                warn!(error = %e, revision = rev, "batch not committed");
                Error::Timeout
            }
            Outcome::Fenced => self.fenced(),
        };
        let keys: Vec<Bytes> = changes.into_iter().map(|c| c.key).collect();
        st.index.rollback(&keys, published);
        // Undo the lease table's changes newest first (a lease revoked and granted
        // again in this batch ends with its old TTL).
        for op in lease_ops.ops.iter().rev() {
            match *op {
                LeaseOp::Grant(id, _) => {
                    st.leases.remove(id);
                }
                LeaseOp::Revoke { id, ttl } => st.leases.insert(id, ttl),
            }
        }
        let fenced = matches!(failure, Error::Fenced { .. });
        for (reply, _) in results {
            let _ = reply.send(Err(match &failure {
                Error::Fenced { schema } => Error::Fenced {
                    schema: schema.clone(),
                },
                _ => Error::Timeout,
            }));
        }
        !fenced
    }

    async fn commit(
        &mut self,
        published: i64,
        rev: i64,
        changes: &[Change],
        leases: &LeaseOps,
    ) -> Outcome {
        let epoch = self.epoch;
        let store = self.core.store.clone();
        let created_upto = self
            .partitions
            .last()
            .map(|s| s + store.layout().partition_revisions())
            .unwrap_or(0);
        let want = store.layout().partitions_to_create(created_upto, rev);
        let conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => return Outcome::NotCommitted(e),
        };
        if !want.is_empty() {
            if let Err(e) = store.create_partitions(&conn.client, &want).await {
                return Outcome::NotCommitted(e);
            }
            self.partitions.extend(want);
            self.partitions.sort_unstable();
            self.partitions.dedup();
        }
        let conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => return Outcome::NotCommitted(e),
        };
        match store.commit(conn, epoch, rev, changes, leases).await {
            Ok(()) => Outcome::Committed,
            Err(CommitError::Determinate(e)) => Outcome::NotCommitted(e),
            Err(CommitError::Fenced) => Outcome::Fenced,
            Err(CommitError::Indeterminate(e)) => {
                warn!(error = %e, revision = rev, "commit outcome unknown, resolving from meta");
                self.resolve(published, rev).await
            }
        }
    }

    /// Reads `meta` back until it tells whether the batch ending at `rev` committed.
    async fn resolve(&mut self, published: i64, rev: i64) -> Outcome {
        let mut backoff = Duration::from_millis(50);
        loop {
            self.conn = None;
            let store = self.core.store.clone();
            match self.conn().await {
                Ok(conn) => match store.read_revision(&conn.client).await {
                    Ok((found, epoch)) => {
                        if epoch != self.epoch {
                            return Outcome::Fenced;
                        }
                        if found == rev {
                            info!(revision = rev, "commit outcome resolved: committed");
                            return Outcome::Committed;
                        }
                        if found == published {
                            info!(revision = rev, "commit outcome resolved: not committed");
                            return Outcome::NotCommitted(Error::Timeout);
                        }
                        error!(found, published, rev, "meta revision moved unexpectedly");
                        return Outcome::Fenced;
                    }
                    Err(e) => warn!(error = %e, "resolving commit outcome"),
                },
                Err(e) => warn!(error = %e, "reconnecting to resolve commit outcome"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Compaction: validate, record the compact revision in `meta` (one statement),
    /// then prune the index a slice at a time between batches ([`Prune`]), and hand the
    /// data work (keep what is still visible, drop whole partitions) to the compaction
    /// task. Returns false when fenced.
    async fn compact(
        &mut self,
        req: CompactionRequest,
        reply: oneshot::Sender<Result<Reply>>,
    ) -> bool {
        let st = self.core.state();
        let cur = st.published();
        let rev = req.revision;
        if rev <= st.compact() {
            let _ = reply.send(Err(Error::Compacted));
            return true;
        }
        if rev > cur {
            let _ = reply.send(Err(Error::FutureRevision));
            return true;
        }
        st.compact.store(rev, Ordering::SeqCst);
        let layout = self.core.store.layout().clone();
        let floor = self
            .partitions
            .first()
            .copied()
            .unwrap_or_else(|| layout.partition_start(cur));
        let drop = layout.droppable_partitions(&self.partitions, rev);
        let drop_below = drop
            .last()
            .map(|s| s + layout.partition_revisions())
            .unwrap_or(floor)
            .max(floor);
        let started = std::time::Instant::now();
        let epoch = self.epoch;
        let store = self.core.store.clone();
        let result = match self.conn().await {
            Ok(conn) => store.record_compaction(&conn.client, epoch, rev).await,
            Err(e) => Err(CommitError::Determinate(e)),
        };
        match result {
            Ok(()) => {
                // The compact revision is durable: answer (unless the client asked to
                // wait for the data), prune the index between the next batches, and
                // leave copying and dropping to the compaction task, off the write path.
                self.partitions.retain(|s| !drop.contains(s));
                let reply = if req.physical {
                    Some((reply, cur))
                } else {
                    let _ = reply.send(Ok(Reply::Compact(CompactionResponse {
                        header: header(cur),
                    })));
                    None
                };
                EngineMetrics::inc(&self.core.metrics.compactions_pending, 1);
                self.prune = Some(Prune {
                    state: st,
                    retained_below: floor,
                    drop_below,
                    from: None,
                    job: PhysicalJob {
                        epoch,
                        rev,
                        pruned: Pruned::default(),
                        drop,
                        started,
                        index_time: Duration::ZERO,
                        reply,
                    },
                });
                true
            }
            Err(CommitError::Fenced) => {
                let _ = reply.send(Err(self.fenced()));
                false
            }
            Err(CommitError::Determinate(e) | CommitError::Indeterminate(e)) => {
                warn!(error = %e, "compaction failed; reloading the index from postgres");
                let _ = reply.send(Err(Error::Timeout));
                self.reload().await;
                true
            }
        }
    }

    /// Replaces the in-memory state with what Postgres holds, retrying until it works.
    async fn reload(&mut self) {
        self.finish_prune();
        let mut backoff = Duration::from_millis(50);
        loop {
            self.conn = None;
            let store = self.core.store.clone();
            let cache = self.core.config.cache_bytes;
            let leases = self.core.leases.clone();
            let metrics = self.core.metrics.clone();
            let loaded = match self.conn().await {
                Ok(conn) => {
                    match Core::load_state(&store, &conn.client, cache, leases, metrics).await {
                        Ok(state) => store.partitions(&conn.client).await.map(|p| (state, p)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match loaded {
                Ok((state, partitions)) => {
                    *self.core.state.write() = Arc::new(state);
                    self.partitions = partitions;
                    return;
                }
                Err(e) => warn!(error = %e, "reloading index"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}
