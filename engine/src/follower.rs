//! Following a keyspace that another instance writes: the index and value cache are
//! kept up to date from the store's change feed, so reads and watches can be served
//! here; writes are forwarded to the writer by the server.
//!
//! Protocol:
//! - Open: `setup`, then `prepare_feed` (this instance's own feed, so every commit
//!   after the next step is in it), then `load` (one snapshot at revision R).
//! - Apply, in one task, in feed order: changes at or below the published revision are
//!   skipped (the feed repeats what was not confirmed, and what the snapshot had); the
//!   next change must be at published + 1. Each commit's versions go into the index,
//!   then the revision is published and the batch handed to the watch feed, as the
//!   writer does. A reader task owns the feed and confirms the position of what was
//!   applied before it asks for more.
//! - Catching up: when the feed has a gap (it was recreated after its slot was dropped
//!   or lost, or Postgres failed over to a replica without the slot) and each time the
//!   feed is opened (commits may have been missed with none following yet), the apply
//!   task reads what it misses from the store's history ([`Store::changes_after`]) and
//!   applies it in order, so watchers see every revision. Only when that history was
//!   compacted away (or cannot be read) does it load the keyspace again; the watch feed
//!   then cancels the watchers it cannot serve as compacted.
//! - Compaction: the writer records it in the store's meta; the apply task polls meta
//!   every [`COMPACTION_POLL`] and prunes its index once it has applied up to the
//!   compact revision (the writer's data step removes the rows).
//! - A store ahead of what was applied while the feed said nothing for a whole poll
//!   (revisions with no changes, [`Store::bump_revision`]; or a stuck feed): the apply
//!   task catches up as above, which loads the keyspace again when a bump marked the
//!   revisions compacted.
//! - Reads: serializable reads answer from the index at once; linearizable reads first
//!   learn the newest committed revision from the store (the read index) and wait until
//!   it is applied ([`Engine::sync`]).
//! - Writes are refused with [`Error::NotWriter`] (etcd's "not leader").

use std::sync::{Arc, Weak};
use std::time::Duration;

use pgetcd_storage::{Change, ChangeFeed, CompactionPlan, FeedCommit, FeedPrepared, Pruned, Store};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::Engine;
use crate::error::{Error, Result};
use crate::state::Core;
use crate::writer::Job;

/// How often a follower reads the store's meta for compactions.
pub const COMPACTION_POLL: Duration = Duration::from_secs(1);

/// Keys pruned per slice of a follower's compaction (yielding between slices).
const PRUNE_SLICE_KEYS: usize = 16 * 1024;

/// What a linearizable read on a follower waits for: the store's newest committed
/// revision and its compact revision, as of a read that started after the reader came.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadIndex {
    pub(crate) revision: i64,
    pub(crate) compact_revision: i64,
}

/// How long [`Engine::sync`] waits for the read index to be applied.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

impl Engine {
    /// Opens `store`'s keyspace as a follower of the instance that writes it (see the
    /// module doc). `store` must be a handle with a change feed of its own.
    pub async fn follow(config: crate::EngineConfig, store: Arc<dyn Store>) -> Result<Engine> {
        let meta = store.setup().await?;
        let prepared = store.prepare_feed().await?;
        let (engine, jobs) = Engine::with_state(config, store, meta, None).await?;
        info!(
            ?prepared,
            revision = engine.stats().revision,
            "following the keyspace's writer"
        );
        tokio::spawn(refuse_writes(jobs));
        let (tx, rx) = mpsc::channel::<FromFeed>(64);
        let (applied, applied_rx) = watch::channel(0u64);
        tokio::spawn(read_feed(engine.core.store.clone(), tx, applied_rx));
        tokio::spawn(apply_feed(Arc::downgrade(&engine.core), rx, applied));
        Ok(engine)
    }

    /// Stops following (the apply and feed tasks end, the feed's connection closes) even
    /// while clones of this engine are still held; reads go on answering from the index
    /// as it was.
    pub fn retire(&self) {
        self.core.retired.notify_one();
    }

    /// Whether this engine follows another instance instead of writing.
    pub fn is_follower(&self) -> bool {
        self.core.follower
    }

    /// The writer's claim on its role surely holds until `until` (the role keeper sets
    /// it after each renewal, from the time the renewal was sent).
    pub fn claim_until(&self, until: std::time::Instant) {
        *self.core.claim_until.lock() = Some(until);
    }

    /// Before a linearizable read. A follower waits until everything committed in the
    /// store when this was called is applied here (its read index). The writer answers
    /// at once while its claim on the role holds, and refuses with `leader changed` once
    /// it may have lapsed (a writer paused or cut off cannot know whether another
    /// instance writes now).
    pub async fn sync(&self) -> Result<()> {
        if !self.core.follower {
            return match *self.core.claim_until.lock() {
                Some(until) if std::time::Instant::now() >= until => Err(Error::LeaderChanged),
                _ => Ok(()),
            };
        }
        let target = self.read_index().await?;
        self.wait_applied(target.revision, SYNC_TIMEOUT).await?;
        // A compaction recorded before the read is followed before answering, so that
        // reads below it are refused here as on the writer.
        if target.compact_revision > self.core.state().compact() {
            self.follow_compaction(target.compact_revision).await?;
        }
        Ok(())
    }

    /// The newest revision committed in the store, read once for every caller that
    /// arrived before the read started: callers queue behind the one read in flight, and
    /// take the result of a read that started after they arrived (it saw every commit
    /// acknowledged before they asked), so one round trip serves a crowd.
    async fn read_index(&self) -> Result<ReadIndex> {
        let arrived = tokio::time::Instant::now();
        let _one_at_a_time = self.core.read_index.lock().await;
        if let Some((started, rev)) = *self.core.read_index_last.lock()
            && started >= arrived
        {
            return Ok(rev);
        }
        let started = tokio::time::Instant::now();
        let meta = self.core.store.meta().await?;
        let rev = ReadIndex {
            revision: meta.revision,
            compact_revision: meta.compact_revision,
        };
        *self.core.read_index_last.lock() = Some((started, rev));
        Ok(rev)
    }

    /// After a compaction at `rev` forwarded to the writer: follows it here at once (so
    /// that reads below `rev` are refused from now on, as on the writer), waiting at most
    /// [`SYNC_TIMEOUT`].
    pub async fn follow_compaction(&self, rev: i64) -> Result<()> {
        if !self.core.follower {
            return Ok(());
        }
        let wait = async {
            loop {
                let applied = self.core.applied.notified();
                if self.core.state().compact() >= rev {
                    return;
                }
                self.core.compact_now.notify_one();
                applied.await;
            }
        };
        tokio::time::timeout(SYNC_TIMEOUT, wait)
            .await
            .map_err(|_| Error::Timeout)
    }

    /// Waits until revision `rev` is applied (published) here.
    pub async fn wait_applied(&self, rev: i64, timeout: Duration) -> Result<()> {
        let wait = async {
            loop {
                let applied = self.core.applied.notified();
                if self.core.state().published() >= rev {
                    return;
                }
                applied.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout)
    }
}

/// A follower's write queue: every request is refused.
async fn refuse_writes(mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let _ = job.reply.send(Err(Error::NotWriter));
    }
}

/// What the feed task hands the apply task.
enum FromFeed {
    /// The next committed batch.
    Commit(FeedCommit),
    /// The feed was (re)opened: it may start after commits this follower never applied
    /// (it was recreated, or the store failed over), and none may follow for a while, so
    /// the apply task catches up from the store's history.
    Opened,
}

/// Owns the change feed: confirms what was applied, then reads the next commit;
/// reopens the feed after an error, recreating it when it is gone (a dropped slot, a
/// Postgres that failed over to a replica without it). Ends when the apply task is gone.
async fn read_feed(
    store: Arc<dyn Store>,
    commits: mpsc::Sender<FromFeed>,
    applied: watch::Receiver<u64>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.open_feed().await {
            Ok(mut feed) => {
                backoff = Duration::from_millis(50);
                if commits.send(FromFeed::Opened).await.is_err()
                    || !pump(feed.as_mut(), &commits, &applied).await
                {
                    return;
                }
            }
            Err(e) => warn!(error = %e.with_causes(), "follower: opening the change feed"),
        }
        if commits.is_closed() {
            return;
        }
        // The feed may be gone (a missing slot shows only once streaming starts).
        match store.prepare_feed().await {
            Ok(FeedPrepared::Existing) => {}
            Ok(prepared) => info!(?prepared, "follower: change feed recreated"),
            Err(e) => warn!(error = %e.with_causes(), "follower: preparing the change feed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Reads one feed until it fails (true) or nobody applies any more (false).
async fn pump(
    feed: &mut dyn ChangeFeed,
    commits: &mpsc::Sender<FromFeed>,
    applied: &watch::Receiver<u64>,
) -> bool {
    loop {
        let position = *applied.borrow();
        if position > 0 {
            feed.confirm(position);
        }
        let next = tokio::select! {
            next = feed.next() => next,
            // The apply task is gone (the engine was dropped or retired): let the feed go.
            _ = commits.closed() => return false,
        };
        match next {
            Ok(commit) => {
                if commits.send(FromFeed::Commit(commit)).await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                warn!(error = %e.with_causes(), "follower: change feed failed; reopening");
                return true;
            }
        }
    }
}

/// Applies commits in order and follows compactions; ends when the engine is dropped.
async fn apply_feed(
    core: Weak<Core>,
    mut commits: mpsc::Receiver<FromFeed>,
    applied: watch::Sender<u64>,
) {
    let mut tick = tokio::time::interval(COMPACTION_POLL);
    let Some(retired) = core.upgrade().map(|c| c.retired.clone()) else {
        return;
    };
    let Some(compacted) = core.upgrade().map(|c| c.compact_now.clone()) else {
        return;
    };
    // Whether the feed has said nothing since the last poll.
    let mut quiet = false;
    loop {
        tokio::select! {
            _ = retired.notified() => return,
            _ = compacted.notified() => {
                let Some(core) = core.upgrade() else { return };
                follow_compaction(&core).await;
                core.applied.notify_waiters();
            }
            from = commits.recv() => {
                let Some(from) = from else { return };
                let Some(core) = core.upgrade() else { return };
                quiet = false;
                match from {
                    FromFeed::Opened => catch_up(&core).await,
                    FromFeed::Commit(commit) => {
                        if !apply(&core, &commit.changes) {
                            catch_up(&core).await;
                            if !apply(&core, &commit.changes) {
                                reload(&core, "follower: gap in the change feed").await;
                            }
                        }
                        let _ = applied.send(commit.position);
                    }
                }
            }
            _ = tick.tick() => {
                let Some(core) = core.upgrade() else { return };
                let store_revision = follow_compaction(&core).await;
                // The store is ahead while the feed said nothing for a whole poll: those
                // revisions may have no changes to stream (a revision bump), or the
                // feed is stuck. History says which.
                if quiet && store_revision.is_some_and(|r| r > core.state().published()) {
                    catch_up(&core).await;
                }
                quiet = true;
            }
        }
    }
}

/// Revisions read per round trip while catching up from the store's history.
const CATCH_UP_REVISIONS: i64 = 1024;

/// Attempts at reading history before a follower loads the keyspace again instead.
const CATCH_UP_ATTEMPTS: u32 = 5;

/// Applies what the store committed after the published revision, from its history
/// (see [`Store::changes_after`]), until it has applied the store's revision as of the
/// last read. Loads the keyspace again when that history was compacted away (watchers
/// behind it are then cancelled as compacted by the watch feed) or cannot be read.
async fn catch_up(core: &Core) {
    let mut failures = 0;
    let mut backoff = Duration::from_millis(50);
    let mut caught_up = 0i64;
    loop {
        let published = core.state().published();
        let read = core
            .store
            .changes_after(published, CATCH_UP_REVISIONS)
            .await;
        let changes = match read {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                warn!(error = %e.with_causes(), published, "follower: reading history to catch up");
                if failures >= CATCH_UP_ATTEMPTS {
                    return reload(core, "follower: history to catch up on cannot be read").await;
                }
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                continue;
            }
        };
        if changes.meta.revision < published {
            // Acknowledged writes are gone: a replica that had not received them was
            // promoted (asynchronous replication). Serve what the store has.
            tracing::error!(
                published,
                store_revision = changes.meta.revision,
                "follower: the store is behind what this instance applied; \
                 acknowledged writes were lost by the store (use synchronous replication)"
            );
            return reload(core, "follower: the store went back in time").await;
        }
        if changes.meta.compact_revision > published {
            return reload(core, "follower: the history it missed was compacted").await;
        }
        if changes.changes.is_empty() {
            if changes.meta.revision > published {
                // Revisions the store counts but whose rows it does not have: nothing to
                // apply them from.
                return reload(core, "follower: history to catch up on is missing").await;
            }
            if caught_up > 0 {
                info!(
                    revisions = caught_up,
                    published, "follower: caught up from history"
                );
            }
            return;
        }
        let last = changes
            .changes
            .last()
            .map_or(published, |(_, v)| v.mod_revision);
        if !apply(core, &changes.changes) {
            return reload(core, "follower: history to catch up on has a gap").await;
        }
        caught_up += last - published;
    }
}

/// Loads the keyspace again and tells the watch feed up to where (it fills the gap
/// from the new index, or cancels the watchers it cannot serve as compacted).
async fn reload(core: &Core, why: &'static str) {
    core.reload(why).await;
    let published = core.state().published();
    core.hand_off(published, &[]);
}

/// Applies one commit's changes above the published revision; false on a gap.
fn apply(core: &Core, changes: &[(bytes::Bytes, pgetcd_storage::Version)]) -> bool {
    let st = core.state();
    let published = st.published();
    let changes: Vec<_> = changes
        .iter()
        .filter(|(_, v)| v.mod_revision > published)
        .cloned()
        .collect();
    let Some(first) = changes.first().map(|(_, v)| v.mod_revision) else {
        return true;
    };
    if first != published + 1 {
        warn!(
            published,
            first, "follower: gap in the change feed; reloading"
        );
        return false;
    }
    let mut applied = Vec::with_capacity(changes.len());
    for (key, version) in changes {
        let prev = st.index.get(&key, i64::MAX).map(|v| v.version);
        st.index.append(&key, version.clone());
        applied.push(Change { key, version, prev });
    }
    let last = applied.last().map_or(published, |c| c.version.mod_revision);
    st.leases.apply(&applied, std::iter::empty());
    st.index
        .note_committed(applied.iter().map(|c| (&c.key, &c.version)));
    st.published
        .store(last, std::sync::atomic::Ordering::Release);
    core.applied.notify_waiters();
    core.hand_off(last, &applied);
    st.index.note_cached(applied.iter().filter_map(|c| {
        c.version.value.as_ref().map(|v| {
            (
                c.key.clone(),
                c.version.mod_revision,
                c.version.sub,
                v.len(),
            )
        })
    }));
    true
}

/// Prunes the index to the store's compact revision once it is applied; returns the
/// store's revision as read (None when meta could not be read).
async fn follow_compaction(core: &Core) -> Option<i64> {
    let meta = match core.store.meta().await {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "follower: reading meta");
            return None;
        }
    };
    let st = core.state();
    let rev = meta.compact_revision;
    if rev <= st.compact() || rev > st.published() {
        return Some(meta.revision);
    }
    st.compact.store(rev, std::sync::atomic::Ordering::SeqCst);
    let plan = CompactionPlan {
        revision: rev,
        list_removed_below: i64::MIN,
        list_survivors: 0..0,
        segments: Vec::new(),
    };
    let mut pruned = Pruned::default();
    let mut from = None;
    loop {
        from = st
            .index
            .compact_slice(&plan, from.as_deref(), PRUNE_SLICE_KEYS, &mut pruned);
        if from.is_none() {
            break;
        }
        tokio::task::yield_now().await;
    }
    info!(
        compact_revision = rev,
        keys_removed = pruned.keys_removed,
        "follower: compacted the index"
    );
    Some(meta.revision)
}
