//! A [`Store`] wrapper that fails on purpose, for the engine's model tests.
//!
//! Faults are queued with [`FaultyStore::inject`] and hit the next commit (or compaction
//! record, or revision bump), one fault per call:
//! - [`Fault::Determinate`]: nothing is written, the error says so.
//! - [`Fault::LostBeforeCommit`]: nothing is written, but the error is indeterminate
//!   (the connection dropped before the server got the batch).
//! - [`Fault::LostAfterCommit`]: the batch is written, and the error is indeterminate
//!   (the connection dropped while the answer was on its way).
//! - [`Fault::TakenOver`]: another writer raises the epoch first, so the call is fenced.
//!
//! [`FaultyStore::fail_resolves`] makes the next resolutions fail transiently, and
//! [`FaultyStore::fail_reads`] the next value reads.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{Result, StoreError};
use crate::model::{
    Batch, Campaign, Changes, CompactionPlan, Export, FeedPrepared, Fence, Import, Imported,
    Loaded, MemberInfo, Meta, PoolStatus, Pruned, Removal, Resolution, VersionId,
};
use crate::store::{ChangeFeed, LoadVisitor, Store};

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails, writing nothing, and says so.
    Determinate,
    /// Fails before writing, but the error is indeterminate.
    LostBeforeCommit,
    /// Writes, then fails with an indeterminate error.
    LostAfterCommit,
    /// Another writer takes the keyspace first: the call is fenced.
    TakenOver,
}

/// The injected error behind every fault.
#[derive(Debug, thiserror::Error)]
#[error("injected fault")]
pub struct Injected;

/// A store that fails on request.
#[derive(Clone)]
pub struct FaultyStore<S> {
    inner: S,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    failing_resolves: Arc<AtomicUsize>,
    failing_reads: Arc<AtomicUsize>,
}

impl<S: Store + Clone> FaultyStore<S> {
    /// Wraps `inner`, with no fault queued.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Arc::default(),
            failing_resolves: Arc::default(),
            failing_reads: Arc::default(),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Queues a fault for the next commit, compaction record or revision bump.
    pub fn inject(&self, fault: Fault) {
        self.faults.lock().push_back(fault);
    }

    /// Drops the faults not yet hit.
    pub fn clear(&self) {
        self.faults.lock().clear();
    }

    /// Faults queued and not yet hit.
    pub fn pending(&self) -> usize {
        self.faults.lock().len()
    }

    /// Makes the next `n` resolutions fail with a transient error.
    pub fn fail_resolves(&self, n: usize) {
        self.failing_resolves.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` value reads fail.
    pub fn fail_reads(&self, n: usize) {
        self.failing_reads.store(n, Ordering::SeqCst);
    }

    fn next_fault(&self) -> Option<Fault> {
        self.faults.lock().pop_front()
    }

    /// Runs `write` under the next fault, if any.
    async fn faulted<T>(
        &self,
        context: &'static str,
        write: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.next_fault() {
            None => write.await,
            Some(Fault::Determinate) => Err(StoreError::determinate(context, Injected)),
            Some(Fault::LostBeforeCommit) => Err(StoreError::indeterminate(context, Injected)),
            Some(Fault::LostAfterCommit) => {
                write.await?;
                Err(StoreError::indeterminate(context, Injected))
            }
            Some(Fault::TakenOver) => {
                self.inner.fence().await?;
                write.await
            }
        }
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl<S: Store + Clone> Store for FaultyStore<S> {
    fn keyspace(&self) -> &str {
        self.inner.keyspace()
    }

    async fn setup(&self) -> Result<Meta> {
        self.inner.setup().await
    }

    async fn fence(&self) -> Result<(Fence, Meta)> {
        self.inner.fence().await
    }

    async fn meta(&self) -> Result<Meta> {
        self.inner.meta().await
    }

    async fn register(&self, member: &MemberInfo) -> Result<u64> {
        self.inner.register(member).await
    }

    async fn members(&self, live: std::time::Duration) -> Result<Vec<MemberInfo>> {
        self.inner.members(live).await
    }

    async fn alarms(&self) -> Result<Vec<(u64, i32)>> {
        self.inner.alarms().await
    }

    async fn set_alarm(&self, member_id: u64, alarm: i32, on: bool) -> Result<bool> {
        self.inner.set_alarm(member_id, alarm, on).await
    }

    async fn auth(&self) -> Result<crate::AuthRecord> {
        self.inner.auth().await
    }

    async fn swap_auth(&self, expected: u64, record: &crate::AuthRecord) -> Result<bool> {
        self.inner.swap_auth(expected, record).await
    }

    async fn remove_member(
        &self,
        name: &str,
        feed: Option<&str>,
        live: std::time::Duration,
    ) -> Result<Removal> {
        self.inner.remove_member(name, feed, live).await
    }

    async fn campaign(&self, name: &str, ttl: std::time::Duration) -> Result<Campaign> {
        self.inner.campaign(name, ttl).await
    }

    async fn renew(&self, fence: &Fence, name: &str, ttl: std::time::Duration) -> Result<()> {
        self.inner.renew(fence, name, ttl).await
    }

    async fn hand_over(
        &self,
        fence: &Fence,
        name: &str,
        to: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<()> {
        self.inner.hand_over(fence, name, to, ttl).await
    }

    async fn leader(&self) -> Result<Option<String>> {
        self.inner.leader().await
    }

    async fn load(&self, visit: &mut LoadVisitor<'_>) -> Result<Loaded> {
        self.inner.load(visit).await
    }

    async fn export(&self) -> Result<Export> {
        self.inner.export().await
    }

    async fn import(&self, fence: &Fence, import: Import) -> Result<Imported> {
        self.inner.import(fence, import).await
    }

    async fn changes_after(&self, after: i64, revisions: i64) -> Result<Changes> {
        self.inner.changes_after(after, revisions).await
    }

    async fn commit(&self, fence: &Fence, batch: Batch<'_>) -> Result<()> {
        self.faulted("commit batch", self.inner.commit(fence, batch))
            .await
    }

    async fn resolve(&self, fence: &Fence, batch: Batch<'_>) -> Result<Resolution> {
        if take_one(&self.failing_resolves) {
            return Err(StoreError::indeterminate("resolve", Injected));
        }
        self.inner.resolve(fence, batch).await
    }

    async fn values(&self, ids: &[VersionId]) -> Result<HashMap<VersionId, Bytes>> {
        if take_one(&self.failing_reads) {
            return Err(StoreError::determinate("read values", Injected));
        }
        self.inner.values(ids).await
    }

    async fn record_compaction(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
    ) -> Result<CompactionPlan> {
        self.faulted(
            "record compaction",
            self.inner.record_compaction(fence, current, revision),
        )
        .await
    }

    async fn compact(&self, fence: &Fence, plan: &CompactionPlan, pruned: &Pruned) -> Result<()> {
        self.inner.compact(fence, plan, pruned).await
    }

    async fn size(&self) -> Result<i64> {
        self.inner.size().await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn defragment(&self) -> Result<()> {
        self.inner.defragment().await
    }

    fn pool_status(&self) -> PoolStatus {
        self.inner.pool_status()
    }

    async fn prepare_feed(&self) -> Result<FeedPrepared> {
        self.inner.prepare_feed().await
    }

    async fn open_feed(&self) -> Result<Box<dyn ChangeFeed>> {
        self.inner.open_feed().await
    }

    async fn feed_retained_bytes(&self) -> Result<Option<i64>> {
        self.inner.feed_retained_bytes().await
    }

    async fn bump_revision(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
        mark_compacted: bool,
    ) -> Result<Meta> {
        self.faulted(
            "bump revision",
            self.inner
                .bump_revision(fence, current, revision, mark_compacted),
        )
        .await
    }
}
