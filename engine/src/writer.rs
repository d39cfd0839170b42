//! The single writer of a keyspace: drains queued write requests into a batch,
//! evaluates them in order against the index (each sees the effects of the ones before
//! it), commits the whole batch to the store in one fenced call, then publishes the new
//! revision and answers every client.
//!
//! Failure protocol (the store classifies every error, see [`pgetcd_storage::Outcome`]):
//! - Determinate: the batch's versions are removed from the index, the lease table is
//!   restored, and every client of the batch gets `Timeout` (etcd's "request timed out").
//! - Indeterminate: [`Store::resolve`](pgetcd_storage::Store::resolve) first makes sure
//!   the attempt can no longer commit, then reads the outcome, retried with backoff until
//!   it answers. Committed: publish and answer normally. Not committed: roll back and
//!   answer `Timeout`. Nobody is answered before that.
//! - Fenced (the epoch or the previous revision moved): roll back, answer `Fenced`, and
//!   stop; later requests get `Fenced`.
//! - Compaction: the compact revision is recorded first (fenced like a commit); if that
//!   fails the index is reloaded from the store, which holds whatever is true. The index
//!   is pruned only after the record is durable, a slice between batches, and the data
//!   step runs on its own task ([`run_physical`]).
//!
//! Bounds: the job queue holds `4 × max_batch` requests (senders wait); at most
//! [`PHYSICAL_QUEUE`] compactions wait for their data step (a further compaction waits
//! for room, holding the writer); the hand-off to the watch feed never makes the writer
//! wait (see [`crate::Engine::subscribe_commits`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
    TxnRequest, TxnResponse,
};
use pgetcd_storage::{
    Batch, CompactionPlan, Fence, LeaseOp, LeaseOps, Outcome as ErrorOutcome, Pruned, Resolution,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::exec::{Change, Exec, header};
use crate::metrics::EngineMetrics;
use crate::state::{Core, State};

/// Compactions whose data step may wait at once.
pub(crate) const PHYSICAL_QUEUE: usize = 4;

/// Keys pruned per slice of a compaction's index prune (about 1 ms per slice measured
/// at 1.2M keys).
const PRUNE_SLICE_KEYS: usize = 16 * 1024;

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

type Answer = (oneshot::Sender<Result<Reply>>, Result<Reply>);

pub(crate) struct Writer {
    core: Arc<Core>,
    rx: mpsc::Receiver<Job>,
    fence: Fence,
    stash: Option<Job>,
    /// The data steps of compactions, done in order by [`run_physical`].
    physical: mpsc::Sender<PhysicalJob>,
    /// The index prune of the last recorded compaction, while it is going on.
    prune: Option<Prune>,
}

/// A compaction's index prune, done a slice of [`PRUNE_SLICE_KEYS`] keys at a time
/// between batches, so writes never wait for a walk over the whole index (200 ms at
/// 1.26M keys). Reads are unaffected: revisions below the compact revision are refused
/// from the moment it is recorded, and pruning only removes versions no other revision
/// can see. Its data step goes to [`run_physical`] once the whole index is done.
struct Prune {
    /// The index being pruned (the state current when the compaction was recorded).
    state: Arc<State>,
    /// Where the next slice starts (None: at the first key).
    from: Option<Box<[u8]>>,
    job: PhysicalJob,
    /// Room in the data step's queue, taken before the compaction was recorded.
    permit: mpsc::OwnedPermit<PhysicalJob>,
}

/// The data step of one compaction (see [`Writer::compact`]).
struct PhysicalJob {
    fence: Fence,
    plan: CompactionPlan,
    pruned: Pruned,
    started: Instant,
    index_time: Duration,
    /// Answered once the data is pruned (`physical: true`), with the header revision.
    reply: Option<(oneshot::Sender<Result<Reply>>, i64)>,
}

/// Runs compactions' data steps one after the other, so writes go on meanwhile. A
/// failed attempt is retried (the step is idempotent) before any later compaction's:
/// their plans assume the earlier ones happened. Stops when fenced.
async fn run_physical(core: Arc<Core>, mut jobs: mpsc::Receiver<PhysicalJob>) {
    while let Some(job) = jobs.recv().await {
        let mut backoff = Duration::from_millis(50);
        loop {
            match core.store.compact(&job.fence, &job.plan, &job.pruned).await {
                Ok(()) => {
                    compacted(&core, job);
                    break;
                }
                Err(e) if e.outcome() == ErrorOutcome::Fenced => {
                    if let Some((reply, _)) = job.reply {
                        let _ = reply.send(Err(core.fenced()));
                    }
                    warn!(error = %e, "compaction stopped: this keyspace is now written by another instance");
                    return;
                }
                Err(e) => {
                    EngineMetrics::inc(&core.metrics.compaction_retries, 1);
                    warn!(error = %e.with_causes(), revision = job.plan.revision, "compaction: the data step failed, will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Counts, logs and answers a finished compaction.
fn compacted(core: &Core, job: PhysicalJob) {
    let m = &core.metrics;
    m.compaction_seconds
        .observe(job.started.elapsed().as_secs_f64());
    EngineMetrics::inc(&m.compactions, 1);
    m.compactions_pending.fetch_sub(1, Ordering::Relaxed);
    info!(
        compact_revision = job.plan.revision,
        dropped_segments = job.plan.segments.len(),
        survivors_listed = job.pruned.survivors.len(),
        removed_listed = job.pruned.removed.len(),
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
}

/// What a batch's commit came to.
enum Outcome {
    Committed,
    NotCommitted(Error),
    Fenced,
}

/// A batch evaluated against the index, before its commit.
struct Evaluated {
    /// The revision it was evaluated on.
    published: i64,
    /// Its newest revision.
    rev: i64,
    changes: Vec<Change>,
    lease_ops: LeaseOps,
    answers: Vec<Answer>,
}

impl Evaluated {
    fn batch(&self) -> Batch<'_> {
        Batch {
            prev_revision: self.published,
            revision: self.rev,
            changes: &self.changes,
            leases: &self.lease_ops,
        }
    }
}

/// Evaluates the jobs in order, each on top of the ones before: their versions go into
/// the index above the published revision (invisible to readers), grants and revokes
/// into the lease table. A failed request's own effects are rolled back at once.
async fn evaluate(st: &State, jobs: Vec<Job>) -> Evaluated {
    let published = st.published();
    let compact = st.compact();
    let mut ev = Evaluated {
        published,
        rev: published,
        changes: Vec::new(),
        lease_ops: LeaseOps::default(),
        answers: Vec::with_capacity(jobs.len()),
    };
    for job in jobs {
        let mut ex = Exec::new(st, ev.rev, compact);
        let res = match &job.op {
            Op::Put(p) => ex.put(p).await.map(Reply::Put),
            Op::Delete(d) => ex.delete_range(d).await.map(Reply::Delete),
            Op::Txn(t) => ex.txn(t).await.map(Reply::Txn),
            Op::Compact(_) => Err(Error::Stopped),
            Op::LeaseGrant { id, ttl } => grant(st, &mut ev, *id, *ttl),
            Op::LeaseRevoke(r) => revoke(st, &mut ev, &mut ex, r.id),
        };
        match res {
            Ok(reply) => {
                let mine = ex.into_changes();
                if !mine.is_empty() {
                    ev.rev += 1;
                    ev.changes.extend(mine);
                }
                ev.answers.push((job.reply, Ok(reply)));
            }
            Err(e) => {
                ex.rollback();
                ev.answers.push((job.reply, Err(e)));
            }
        }
    }
    ev
}

fn grant(st: &State, ev: &mut Evaluated, id: i64, ttl: i64) -> Result<Reply> {
    if st.leases.exists(id) {
        return Err(Error::LeaseExists);
    }
    st.leases.insert(id, ttl);
    ev.lease_ops.ops.push(LeaseOp::Grant(id, ttl));
    Ok(Reply::LeaseGrant(LeaseGrantResponse {
        header: header(ev.rev),
        id,
        ttl,
        error: String::new(),
    }))
}

fn revoke(st: &State, ev: &mut Evaluated, ex: &mut Exec<'_>, id: i64) -> Result<Reply> {
    let ttl = st.leases.remove(id).ok_or(Error::LeaseNotFound)?;
    ev.lease_ops.ops.push(LeaseOp::Revoke { id, ttl });
    // Attached keys, plus keys attached earlier in this batch (the attachments are
    // updated only after commit).
    let mut keys = st.leases.keys_of(id);
    keys.extend(
        ev.changes
            .iter()
            .filter(|c| c.version.lease == id)
            .map(|c| c.key.clone()),
    );
    keys.sort();
    keys.dedup();
    Ok(Reply::LeaseRevoke(LeaseRevokeResponse {
        header: header(ex.delete_leased_keys(&keys, id)),
    }))
}

impl Writer {
    pub(crate) fn new(core: Arc<Core>, rx: mpsc::Receiver<Job>, fence: Fence) -> Self {
        let (physical, jobs) = mpsc::channel(PHYSICAL_QUEUE);
        tokio::spawn(run_physical(core.clone(), jobs));
        Self {
            core,
            rx,
            fence,
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
                let batch = self.gather(first);
                self.batch(batch).await
            };
            if !keep_going {
                self.stop_fenced().await;
                return;
            }
        }
        self.finish_prune();
        info!("writer finished");
    }

    /// `first` and whatever else is queued, up to `max_batch` jobs; a compaction ends
    /// the batch (it runs alone, next).
    fn gather(&mut self, first: Job) -> Vec<Job> {
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
        batch
    }

    /// Fenced: answers every queued and later request with `Fenced`.
    async fn stop_fenced(&mut self) {
        self.core.writer_failed.store(true, Ordering::Relaxed);
        error!("writer stopped: this keyspace is now written by another instance");
        self.rx.close();
        if let Some(job) = self.stash.take() {
            let _ = job.reply.send(Err(self.core.fenced()));
        }
        while let Some(job) = self.rx.recv().await {
            let _ = job.reply.send(Err(self.core.fenced()));
        }
    }

    /// Prunes the next slice of keys of the compaction in progress; once the index is
    /// done, hands the compaction's data step to [`run_physical`].
    fn prune_slice(&mut self) {
        let Some(p) = self.prune.as_mut() else {
            return;
        };
        let started = Instant::now();
        p.from = p.state.index.compact_slice(
            &p.job.plan,
            p.from.as_deref(),
            PRUNE_SLICE_KEYS,
            &mut p.job.pruned,
        );
        p.job.index_time += started.elapsed();
        if p.from.is_none()
            && let Some(p) = self.prune.take()
        {
            p.permit.send(p.job);
        }
    }

    /// Prunes what is left of the compaction in progress at once (before the next
    /// compaction, whose data step must follow this one's, and before a reload).
    fn finish_prune(&mut self) {
        while self.prune.is_some() {
            self.prune_slice();
        }
    }

    /// Evaluates, commits and answers one batch. Returns false when fenced.
    async fn batch(&mut self, jobs: Vec<Job>) -> bool {
        let st = self.core.state();
        let ev = evaluate(&st, jobs).await;
        if ev.changes.is_empty() && ev.lease_ops.is_empty() {
            for (reply, res) in ev.answers {
                let _ = reply.send(res);
            }
            return true;
        }
        let started = Instant::now();
        let outcome = self.commit(&ev).await;
        let m = &self.core.metrics;
        let took = started.elapsed();
        m.commit_seconds.observe(took.as_secs_f64());
        m.batch_size.observe(ev.answers.len() as f64);
        if took > crate::metrics::SLOW_COMMIT {
            EngineMetrics::inc(&m.slow_commits, 1);
        }
        if !matches!(outcome, Outcome::Committed) {
            EngineMetrics::inc(&m.failed_requests, ev.answers.len() as u64);
        }
        match outcome {
            Outcome::Committed => {
                self.publish(&st, ev);
                true
            }
            Outcome::NotCommitted(e) => {
                EngineMetrics::inc(&m.commit_failures, 1);
                warn!(error = %e, revision = ev.rev, "batch not committed");
                undo(&st, ev, || Error::Timeout);
                true
            }
            Outcome::Fenced => {
                EngineMetrics::inc(&m.commit_failures, 1);
                let core = self.core.clone();
                undo(&st, ev, || core.fenced());
                false
            }
        }
    }

    /// Commits a batch, resolving an unknown outcome.
    async fn commit(&mut self, ev: &Evaluated) -> Outcome {
        let err = match self.core.store.commit(&self.fence, ev.batch()).await {
            Ok(()) => return Outcome::Committed,
            Err(e) => e,
        };
        match err.outcome() {
            ErrorOutcome::Determinate => Outcome::NotCommitted(err.into()),
            ErrorOutcome::Fenced => {
                warn!(error = %err, revision = ev.rev, "commit fenced");
                Outcome::Fenced
            }
            ErrorOutcome::Indeterminate => {
                warn!(error = %err.with_causes(), revision = ev.rev, "commit outcome unknown, resolving");
                self.resolve(ev).await
            }
        }
    }

    /// Asks the store until it tells whether the batch committed.
    async fn resolve(&mut self, ev: &Evaluated) -> Outcome {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.core.store.resolve(&self.fence, ev.batch()).await {
                Ok(Resolution::Committed) => return Outcome::Committed,
                Ok(Resolution::NotCommitted) => return Outcome::NotCommitted(Error::Timeout),
                Err(e) if e.outcome() == ErrorOutcome::Fenced => {
                    error!(error = %e, revision = ev.rev, "resolving the commit: fenced");
                    return Outcome::Fenced;
                }
                Err(e) => warn!(error = %e.with_causes(), "resolving the commit outcome"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// A committed batch: attaches leases, marks versions committed, publishes the
    /// revision, hands the batch to the watch feed and answers everyone.
    fn publish(&self, st: &State, ev: Evaluated) {
        st.leases.apply(&ev.changes, ev.lease_ops.revokes());
        st.index
            .note_committed(ev.changes.iter().map(|c| (&c.key, &c.version)));
        st.published.store(ev.rev, Ordering::Release);
        self.core.applied.notify_waiters();
        if ev.rev > ev.published {
            self.core.hand_off(ev.rev, &ev.changes);
        }
        st.index.note_cached(ev.changes.iter().filter_map(|c| {
            c.version.value.as_ref().map(|v| {
                (
                    c.key.clone(),
                    c.version.mod_revision,
                    c.version.sub,
                    v.len(),
                )
            })
        }));
        for (reply, res) in ev.answers {
            let _ = reply.send(res);
        }
    }

    /// Compaction: validate, record the compact revision in the store (fenced), then
    /// prune the index a slice at a time between batches ([`Prune`]), and hand the data
    /// step to the compaction task. Returns false when fenced.
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
        // Room for the data step first: the queue is bounded.
        let Ok(permit) = self.physical.clone().reserve_owned().await else {
            let _ = reply.send(Err(Error::Stopped));
            return true;
        };
        st.compact.store(rev, Ordering::SeqCst);
        let started = Instant::now();
        match self
            .core
            .store
            .record_compaction(&self.fence, cur, rev)
            .await
        {
            Ok(plan) => {
                // The compact revision is durable: answer (unless the client asked to
                // wait for the data), prune the index between the next batches, and
                // leave the data step to the compaction task, off the write path.
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
                    from: None,
                    job: PhysicalJob {
                        fence: self.fence,
                        plan,
                        pruned: Pruned::default(),
                        started,
                        index_time: Duration::ZERO,
                        reply,
                    },
                    permit,
                });
                true
            }
            Err(e) if e.outcome() == ErrorOutcome::Fenced => {
                let _ = reply.send(Err(self.core.fenced()));
                false
            }
            Err(e) => {
                warn!(error = %e.with_causes(), "compaction failed; reloading the index from the store");
                let _ = reply.send(Err(Error::Timeout));
                self.reload().await;
                true
            }
        }
    }

    /// Replaces the in-memory state with what the store holds, retrying until it works.
    async fn reload(&mut self) {
        self.finish_prune();
        self.core.reload("compaction record failed").await;
    }
}

/// A batch that did not commit: removes its versions from the index, restores the lease
/// table (newest change first, so a lease revoked and granted again ends with its old
/// TTL), and answers every client with `failure()`.
fn undo(st: &State, ev: Evaluated, failure: impl Fn() -> Error) {
    let keys: Vec<Bytes> = ev.changes.into_iter().map(|c| c.key).collect();
    st.index.rollback(&keys, ev.published);
    for op in ev.lease_ops.ops.iter().rev() {
        match *op {
            LeaseOp::Grant(id, _) => {
                st.leases.remove(id);
            }
            LeaseOp::Revoke { id, ttl } => st.leases.insert(id, ttl),
        }
    }
    for (reply, _) in ev.answers {
        let _ = reply.send(Err(failure()));
    }
}
