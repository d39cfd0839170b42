use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;

use crate::AuthRecord;
use crate::error::Result;
use crate::model::{
    Batch, Campaign, Changes, CompactionPlan, Export, FeedCommit, FeedPrepared, Fence, Import,
    Imported, Loaded, MemberInfo, Meta, PoolStatus, Pruned, Removal, Resolution, Version,
    VersionId,
};

/// Called by [`Store::load`] for every retained version: its key, the version (with
/// `value` unset) and, for puts, the value's bytes (the engine decides what to cache).
pub type LoadVisitor<'a> = dyn FnMut(Bytes, Version, Option<&[u8]>) + Send + 'a;

/// The durable copy of one keyspace.
///
/// Calls come from the engine's writer (set-up, fence, commit, resolve, compaction:
/// one at a time) and from readers (values, size, feed: concurrently). Implementations
/// keep their own connections and reconnect by themselves; an error says what it
/// proves about a write (see [`crate::StoreError::outcome`]).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The keyspace's name (for errors and logs).
    fn keyspace(&self) -> &str;

    /// Checks the server's settings, creates the keyspace when missing, migrates an
    /// older schema and refuses a newer one. Idempotent; returns the meta record.
    async fn setup(&self) -> Result<Meta>;

    /// Takes the keyspace for writing: raises the fencing epoch by compare-and-swap, so
    /// every earlier writer's next commit fails as fenced. Returns the fence and the
    /// meta record as of the raise.
    async fn fence(&self) -> Result<(Fence, Meta)>;

    /// Registers this instance or refreshes its registration (a heartbeat); returns its
    /// member id, kept across restarts (the keyspace's first instance gets the member id
    /// of the keyspace's meta record, so a single instance keeps the one it always had).
    async fn register(&self, member: &MemberInfo) -> Result<u64>;

    /// The instances that registered within `live`, by name.
    async fn members(&self, live: std::time::Duration) -> Result<Vec<MemberInfo>>;

    /// The keyspace's alarms, as (member id, alarm type), ordered.
    async fn alarms(&self) -> Result<Vec<(u64, i32)>>;

    /// Raises (`on`) or clears alarm `alarm` of member `member_id`; returns whether it
    /// was raised before.
    async fn set_alarm(&self, member_id: u64, alarm: i32, on: bool) -> Result<bool>;

    /// The keyspace's auth state (etcd's users, roles and auth flag) as the server
    /// encoded it; revision 0 and an empty state when it was never written.
    async fn auth(&self) -> Result<AuthRecord>;

    /// Replaces the auth state with `record` if its revision is still `expected`
    /// (compare-and-swap: any instance may write it); false when another change landed
    /// first, and nothing was written.
    async fn swap_auth(&self, expected: u64, record: &AuthRecord) -> Result<bool>;

    /// Forgets the instance `name` unless it registered within `live`, and drops the
    /// change feed of its consumer `feed` (None: the keyspace's default one), so the
    /// store stops keeping history for an instance that is gone for good (etcd's
    /// MemberRemove).
    async fn remove_member(
        &self,
        name: &str,
        feed: Option<&str>,
        live: std::time::Duration,
    ) -> Result<Removal>;
    /// Claims the writer role for `ttl` if nobody holds it, its holder's claim lapsed, or
    /// `name` holds it already (a restart): raises the fencing epoch in the same
    /// compare-and-swap, so every earlier writer's commits fail from then on.
    async fn campaign(&self, name: &str, ttl: std::time::Duration) -> Result<Campaign>;

    /// Extends `name`'s claim by `ttl` (measured on the store's clock from now); fenced
    /// when the claim was lost (another instance's epoch).
    async fn renew(&self, fence: &Fence, name: &str, ttl: std::time::Duration) -> Result<()>;

    /// Gives the writer role away while `name` holds it at `fence`'s epoch: to `to`, with
    /// a claim of `ttl` that `to` takes over at its next campaign (raising the epoch), or
    /// to whoever campaigns first (`None`). Fenced when the claim was lost already. The
    /// giver must stop writing: its commits still pass until the taker raises the epoch.
    async fn hand_over(
        &self,
        fence: &Fence,
        name: &str,
        to: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<()>;
    /// The holder of the writer role, if its claim has not lapsed.
    async fn leader(&self) -> Result<Option<String>>;

    /// The meta record as stored now: a follower's read index (the newest committed
    /// revision) and how it learns of compactions.
    async fn meta(&self) -> Result<Meta>;

    /// Visits every retained version (all history above the compact revision, plus
    /// each key's newest live version at or below it) and returns the meta record and
    /// the leases of the same snapshot.
    async fn load(&self, visit: &mut LoadVisitor<'_>) -> Result<Loaded>;

    /// The changes committed after revision `after`, up to `revisions` revisions of them
    /// (fewer when the store has fewer), in one snapshot with the meta record: how a
    /// follower catches up on what its change feed cannot give it (a feed recreated
    /// after its slot was dropped or lost, or a Postgres that failed over). Nothing is
    /// read when `after` is below the compact revision (see [`Changes::meta`]).
    async fn changes_after(&self, after: i64, revisions: i64) -> Result<Changes>;
    /// The keyspace as one consistent snapshot of the store, streamed in revision
    /// order with bounded memory (see [`Export`]): what an etcd snapshot of it holds.
    /// Reads only; writes go on meanwhile.
    async fn export(&self) -> Result<Export>;

    /// Loads a whole keyspace in one transaction (see [`Import`]): afterwards the store
    /// holds exactly the imported versions, leases, revision and compact revision, or,
    /// after any error (a failed sender included), what it held before. Fenced like a
    /// commit: the importer must hold the writer role, and instances that read the
    /// keyspace before must load it again.
    async fn import(&self, fence: &Fence, import: Import) -> Result<Imported>;

    /// Writes one batch atomically, only if the store still holds `fence`'s epoch and
    /// `batch.prev_revision` as its revision (else [`crate::StoreError::Fenced`]).
    async fn commit(&self, fence: &Fence, batch: Batch<'_>) -> Result<()>;

    /// After a commit of `batch` failed with an indeterminate error: makes sure that
    /// attempt can no longer commit (Postgres: terminates its backend and waits until it
    /// is gone), then reads whether the batch is durable: by the revision, or for a batch
    /// of lease rows only, by the rows. Fenced when the epoch moved or the revision is
    /// neither the previous nor the batch's. Errors here are transient: call again.
    async fn resolve(&self, fence: &Fence, batch: Batch<'_>) -> Result<Resolution>;

    /// Values of the given versions; versions compacted away are missing from the map.
    async fn values(&self, ids: &[VersionId]) -> Result<HashMap<VersionId, Bytes>>;

    /// Records `revision` as the compact revision (fenced like a commit, with the
    /// store's revision expected to be `current`); from then on reads below it are
    /// refused. Returns the plan for the index prune and the data step.
    async fn record_compaction(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
    ) -> Result<CompactionPlan>;

    /// Compaction's data step: afterwards the store holds, at or below the plan's
    /// revision, only each key's newest live version. `pruned` lists what the engine's
    /// index removed and kept, but the store must not rely on it alone: an index loaded
    /// after a compaction whose data step never ran does not know the versions that
    /// compaction left behind. Idempotent: a failed attempt is simply made again.
    /// Fenced when the epoch moved.
    async fn compact(&self, fence: &Fence, plan: &CompactionPlan, pruned: &Pruned) -> Result<()>;

    /// Bytes the keyspace takes in the store.
    async fn size(&self) -> Result<i64>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<()>;

    /// Makes space freed by deletes and compaction reusable (etcd's Defragment).
    async fn defragment(&self) -> Result<()>;

    /// Figures of the read connection pool.
    fn pool_status(&self) -> PoolStatus;

    /// Makes sure this handle's change feed exists (recreating it if it lost history);
    /// call before serving writes, so none is missing from it. Each consumer (each
    /// instance of a keyspace) has a feed of its own, with its own confirmed position.
    async fn prepare_feed(&self) -> Result<FeedPrepared>;

    /// Opens the change feed after its last confirmed position.
    async fn open_feed(&self) -> Result<Box<dyn ChangeFeed>>;

    /// Bytes of history the store keeps for the feed's unconfirmed part, when known.
    async fn feed_retained_bytes(&self) -> Result<Option<i64>>;

    /// Raises the keyspace's revision from `current` to `revision` without writing any
    /// change (etcd's `--bump-revision`): the next commit follows `revision`, and the
    /// revisions in between have no changes. With `mark_compacted` the compact revision
    /// becomes `revision` in the same write (etcd's `--mark-compacted`): reads and
    /// watches below it are refused as compacted, and the next compaction's data step
    /// removes what it shadows. Fenced like a commit (the store must still hold `fence`'s
    /// epoch and `current` as its revision); refused unless `revision > current`.
    /// Returns the meta record as written; instances that loaded the keyspace before
    /// must load it again (a follower does once it finds the compact revision above
    /// what it applied).
    async fn bump_revision(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
        mark_compacted: bool,
    ) -> Result<Meta>;
}

/// Committed batches in commit order, at least once after the last confirmed position.
#[async_trait]
pub trait ChangeFeed: Send {
    /// The next committed batch (waits for one).
    async fn next(&mut self) -> Result<FeedCommit>;

    /// Everything up to `position` was applied: the store may forget it, and a feed
    /// opened later starts after it.
    fn confirm(&mut self, position: u64);
}
