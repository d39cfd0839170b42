//! The reference [`Store`]: everything in a few maps behind one mutex. Each call is
//! atomic, so a commit is all or nothing; the fence is the same compare-and-swap of
//! epoch and previous revision the Postgres store does. The change feed keeps the
//! commits not yet confirmed (bounded by what the consumer has not applied).
//!
//! Used by the engine's model tests, directly or under [`crate::faulty::FaultyStore`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Result, StoreError};
use crate::model::{
    Batch, CHUNK_VERSIONS, CHUNKS_IN_FLIGHT, Campaign, Changes, CompactionPlan, Export, FeedCommit,
    FeedPrepared, Fence, Import, Imported, Loaded, MemberInfo, Meta, PoolStatus, Pruned, Removal,
    Resolution, Version, VersionId,
};
use crate::store::{ChangeFeed, LoadVisitor, Store};

#[derive(Debug)]
struct Inner {
    meta: Option<Meta>,
    /// Every retained version with its key.
    history: BTreeMap<VersionId, (Bytes, Version)>,
    leases: BTreeMap<i64, i64>,
    /// Commits some consumer has not confirmed, oldest first.
    feed: VecDeque<FeedCommit>,
    /// Position of the last commit appended to the feed.
    feed_head: u64,
    /// Each consumer's last confirmed position (consumers appear with
    /// `prepare_feed`, as a slot does).
    consumers: BTreeMap<String, u64>,
    /// Registered instances and when each was last seen.
    members: BTreeMap<String, (MemberInfo, Instant)>,
    /// The writer role's holder and until when.
    leader: Option<(String, Instant)>,
    /// Alarms: (member id, type).
    alarms: std::collections::BTreeSet<(u64, i32)>,
    auth: crate::AuthRecord,
}

impl Inner {
    /// The meta record, the leases and every retained version (all history above the
    /// compact revision, plus each key's newest live version at or below it), in
    /// (revision, sub) order.
    #[allow(clippy::type_complexity)]
    fn retained(&self) -> Result<(Meta, Vec<(i64, i64)>, Vec<(Bytes, Version)>)> {
        let meta = self.meta.ok_or_else(not_set_up)?;
        let compact = meta.compact_revision;
        let mut newest_at_or_below: HashMap<&Bytes, &Version> = HashMap::new();
        let mut rows = Vec::new();
        for (key, v) in self.history.values() {
            if v.mod_revision > compact {
                rows.push((key.clone(), v.clone()));
            } else {
                newest_at_or_below.insert(key, v);
            }
        }
        rows.extend(
            newest_at_or_below
                .into_iter()
                .filter(|(_, v)| !v.is_tombstone())
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        rows.sort_unstable_by_key(|(_, v)| v.id());
        let leases = self.leases.iter().map(|(&id, &ttl)| (id, ttl)).collect();
        Ok((meta, leases, rows))
    }

    /// Forgets the commits every consumer confirmed.
    fn trim_feed(&mut self) {
        let floor = self
            .consumers
            .values()
            .copied()
            .min()
            .unwrap_or(self.feed_head);
        while self.feed.front().is_some_and(|c| c.position <= floor) {
            self.feed.pop_front();
        }
    }
}

/// An in-memory keyspace. Cheap to clone (clones share the data and the consumer).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    name: String,
    /// This handle's change feed consumer.
    consumer: String,
    inner: Arc<Mutex<Inner>>,
    feed_grew: Arc<Notify>,
}

impl MemoryStore {
    /// An empty, not yet set up keyspace.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            consumer: String::new(),
            inner: Arc::new(Mutex::new(Inner {
                meta: None,
                history: BTreeMap::new(),
                leases: BTreeMap::new(),
                feed: VecDeque::new(),
                feed_head: 0,
                consumers: BTreeMap::new(),
                members: BTreeMap::new(),
                alarms: Default::default(),
                auth: Default::default(),
                leader: None,
            })),
            feed_grew: Arc::new(Notify::new()),
        }
    }

    /// The same keyspace, seen by another change feed consumer (another instance).
    pub fn consumer(&self, name: &str) -> MemoryStore {
        MemoryStore {
            consumer: name.to_owned(),
            ..self.clone()
        }
    }

    /// The meta record (None before set-up).
    pub fn stored_meta(&self) -> Option<Meta> {
        self.inner.lock().meta
    }

    /// Every retained version, in (revision, sub) order.
    pub fn history(&self) -> Vec<(Bytes, Version)> {
        self.inner.lock().history.values().cloned().collect()
    }

    /// Granted leases.
    pub fn leases(&self) -> BTreeMap<i64, i64> {
        self.inner.lock().leases.clone()
    }

    /// Commits in the feed not yet confirmed.
    pub fn feed_backlog(&self) -> usize {
        self.inner.lock().feed.len()
    }
}

fn not_set_up() -> StoreError {
    StoreError::Misconfigured("keyspace not set up".into())
}

fn check(meta: &Meta, fence: &Fence, prev: i64) -> Result<()> {
    if meta.leader_epoch != fence.epoch {
        return Err(StoreError::Fenced(format!(
            "leader epoch is {}, the writer holds {}",
            meta.leader_epoch, fence.epoch
        )));
    }
    if meta.revision != prev {
        return Err(StoreError::Fenced(format!(
            "revision is {}, the writer expected {prev}",
            meta.revision
        )));
    }
    Ok(())
}

#[async_trait]
impl Store for MemoryStore {
    fn keyspace(&self) -> &str {
        &self.name
    }

    async fn setup(&self) -> Result<Meta> {
        let mut g = self.inner.lock();
        let meta = g.meta.get_or_insert_with(|| Meta {
            cluster_id: rand::random::<u64>() | 1,
            member_id: rand::random::<u64>() | 1,
            revision: 1,
            compact_revision: -1,
            leader_epoch: 0,
        });
        Ok(*meta)
    }

    async fn fence(&self) -> Result<(Fence, Meta)> {
        let mut g = self.inner.lock();
        let meta = g.meta.as_mut().ok_or_else(not_set_up)?;
        meta.leader_epoch += 1;
        Ok((
            Fence {
                epoch: meta.leader_epoch,
            },
            *meta,
        ))
    }

    async fn meta(&self) -> Result<Meta> {
        self.inner.lock().meta.ok_or_else(not_set_up)
    }

    async fn register(&self, member: &MemberInfo) -> Result<u64> {
        let mut g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        let id = match g.members.get(&member.name) {
            Some((m, _)) => m.member_id,
            None if g.members.is_empty() => meta.member_id,
            None => rand::random::<u64>() | 1,
        };
        let info = MemberInfo {
            member_id: id,
            ..member.clone()
        };
        g.members
            .insert(member.name.clone(), (info, Instant::now()));
        Ok(id)
    }

    async fn members(&self, live: std::time::Duration) -> Result<Vec<MemberInfo>> {
        let g = self.inner.lock();
        Ok(g.members
            .values()
            .filter(|(_, seen)| seen.elapsed() <= live)
            .map(|(m, _)| m.clone())
            .collect())
    }

    async fn alarms(&self) -> Result<Vec<(u64, i32)>> {
        Ok(self.inner.lock().alarms.iter().copied().collect())
    }

    async fn set_alarm(&self, member_id: u64, alarm: i32, on: bool) -> Result<bool> {
        let mut g = self.inner.lock();
        Ok(if on {
            !g.alarms.insert((member_id, alarm))
        } else {
            g.alarms.remove(&(member_id, alarm))
        })
    }

    async fn auth(&self) -> Result<crate::AuthRecord> {
        Ok(self.inner.lock().auth.clone())
    }

    async fn swap_auth(&self, expected: u64, record: &crate::AuthRecord) -> Result<bool> {
        let mut g = self.inner.lock();
        if g.auth.revision != expected {
            return Ok(false);
        }
        g.auth = record.clone();
        Ok(true)
    }

    async fn remove_member(
        &self,
        name: &str,
        feed: Option<&str>,
        live: std::time::Duration,
    ) -> Result<Removal> {
        let mut g = self.inner.lock();
        match g.members.get(name) {
            None => return Ok(Removal::Unknown),
            Some((_, seen)) if seen.elapsed() <= live => return Ok(Removal::Live),
            Some(_) => {}
        }
        g.members.remove(name);
        g.consumers.remove(feed.unwrap_or(""));
        g.trim_feed();
        Ok(Removal::Removed)
    }

    async fn campaign(&self, name: &str, ttl: std::time::Duration) -> Result<Campaign> {
        let mut g = self.inner.lock();
        let now = Instant::now();
        if let Some((holder, until)) = &g.leader
            && holder != name
            && *until > now
        {
            return Ok(Campaign::Lost {
                leader: holder.clone(),
            });
        }
        g.leader = Some((name.to_owned(), now + ttl));
        let meta = g.meta.as_mut().ok_or_else(not_set_up)?;
        meta.leader_epoch += 1;
        Ok(Campaign::Won {
            fence: Fence {
                epoch: meta.leader_epoch,
            },
            meta: *meta,
        })
    }

    async fn renew(&self, fence: &Fence, name: &str, ttl: std::time::Duration) -> Result<()> {
        let mut g = self.inner.lock();
        let epoch = g.meta.ok_or_else(not_set_up)?.leader_epoch;
        match &mut g.leader {
            Some((holder, until)) if holder == name && epoch == fence.epoch => {
                *until = Instant::now() + ttl;
                Ok(())
            }
            _ => Err(StoreError::Fenced("the writer role was lost".into())),
        }
    }

    async fn hand_over(
        &self,
        fence: &Fence,
        name: &str,
        to: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let mut g = self.inner.lock();
        let epoch = g.meta.ok_or_else(not_set_up)?.leader_epoch;
        match &g.leader {
            Some((holder, _)) if holder == name && epoch == fence.epoch => {
                g.leader = to.map(|t| (t.to_owned(), Instant::now() + ttl));
                Ok(())
            }
            _ => Err(StoreError::Fenced("the writer role was lost".into())),
        }
    }

    async fn leader(&self) -> Result<Option<String>> {
        let g = self.inner.lock();
        Ok(g.leader
            .as_ref()
            .filter(|(_, until)| *until > Instant::now())
            .map(|(h, _)| h.clone()))
    }

    async fn changes_after(&self, after: i64, revisions: i64) -> Result<Changes> {
        let g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        if after < meta.compact_revision {
            return Ok(Changes {
                meta,
                changes: Vec::new(),
            });
        }
        let upto = after.saturating_add(revisions.max(1));
        let changes = g
            .history
            .range((after + 1, 0)..=(upto, u32::MAX))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Changes { meta, changes })
    }

    async fn load(&self, visit: &mut LoadVisitor<'_>) -> Result<Loaded> {
        let (meta, leases, rows) = self.inner.lock().retained()?;
        let versions = rows.len();
        for (key, mut v) in rows {
            let value = v.value.take();
            visit(key, v, value.as_deref());
        }
        Ok(Loaded {
            meta,
            leases,
            versions,
        })
    }

    async fn export(&self) -> Result<Export> {
        let (meta, leases, rows) = self.inner.lock().retained()?;
        let (tx, versions) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
        tokio::spawn(async move {
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                let chunk: Vec<_> = rows.by_ref().take(CHUNK_VERSIONS).collect();
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Export {
            meta,
            leases,
            versions,
        })
    }

    async fn import(&self, fence: &Fence, mut import: Import) -> Result<Imported> {
        // Everything is read first, so a failed sender leaves the keyspace untouched.
        let mut rows: Vec<(Bytes, Version)> = Vec::new();
        while let Some(chunk) = import.versions.recv().await {
            rows.extend(chunk?);
        }
        if let Some(w) = rows.windows(2).find(|w| w[0].1.id() >= w[1].1.id()) {
            return Err(StoreError::Misconfigured(format!(
                "import: version {:?} does not follow {:?}",
                w[1].1.id(),
                w[0].1.id()
            )));
        }
        if let Some((_, v)) = rows
            .last()
            .filter(|(_, v)| v.mod_revision > import.revision)
        {
            return Err(StoreError::Misconfigured(format!(
                "import: version {:?} is above the revision {}",
                v.id(),
                import.revision
            )));
        }
        let mut g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        check(&meta, fence, meta.revision)?;
        if !import.replace && (!g.history.is_empty() || !g.leases.is_empty()) {
            return Err(StoreError::NotEmpty(format!(
                "keyspace {:?} is not empty",
                self.name
            )));
        }
        let mut live: HashMap<&Bytes, bool> = HashMap::new();
        for (key, v) in &rows {
            live.insert(key, !v.is_tombstone());
        }
        let imported = Imported {
            versions: rows.len() as u64,
            keys: live.values().filter(|&&l| l).count() as u64,
            leases: import.leases.len() as u64,
        };
        g.history = rows.into_iter().map(|(k, v)| (v.id(), (k, v))).collect();
        g.leases = import.leases.into_iter().collect();
        if let Some(m) = g.meta.as_mut() {
            m.revision = import.revision;
            m.compact_revision = import.compact_revision;
        }
        Ok(imported)
    }

    async fn commit(&self, fence: &Fence, batch: Batch<'_>) -> Result<()> {
        let mut g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        check(&meta, fence, batch.prev_revision)?;
        if let Some(c) = batch
            .changes
            .iter()
            .find(|c| g.history.contains_key(&c.version.id()))
        {
            return Err(StoreError::Misconfigured(format!(
                "version {:?} written twice",
                c.version.id()
            )));
        }
        if let Some(m) = g.meta.as_mut() {
            m.revision = batch.revision;
        }
        for c in batch.changes {
            g.history
                .insert(c.version.id(), (c.key.clone(), c.version.clone()));
        }
        let (ids, ttls, gone) = batch.leases.net();
        for (id, ttl) in ids.into_iter().zip(ttls) {
            g.leases.insert(id, ttl);
        }
        for id in gone {
            g.leases.remove(&id);
        }
        if !batch.changes.is_empty() {
            g.feed_head += 1;
            let position = g.feed_head;
            g.feed.push_back(FeedCommit {
                position,
                changes: batch
                    .changes
                    .iter()
                    .map(|c| (c.key.clone(), c.version.clone()))
                    .collect(),
            });
            // Kept only while some consumer has not confirmed it.
            g.trim_feed();
            drop(g);
            self.feed_grew.notify_waiters();
        }
        Ok(())
    }

    async fn resolve(&self, fence: &Fence, batch: Batch<'_>) -> Result<Resolution> {
        let g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        let (prev, revision) = (batch.prev_revision, batch.revision);
        if meta.leader_epoch != fence.epoch {
            return Err(StoreError::Fenced("leader epoch moved".into()));
        }
        if batch.leases_only() && meta.revision == revision {
            let granted: HashMap<i64, i64> = g.leases.iter().map(|(&k, &v)| (k, v)).collect();
            return Ok(if batch.leases_applied(&granted) {
                Resolution::Committed
            } else {
                Resolution::NotCommitted
            });
        }
        if meta.revision == revision {
            Ok(Resolution::Committed)
        } else if meta.revision == prev {
            Ok(Resolution::NotCommitted)
        } else {
            Err(StoreError::Fenced(format!(
                "revision is {}, neither {prev} nor {revision}",
                meta.revision
            )))
        }
    }

    async fn values(&self, ids: &[VersionId]) -> Result<HashMap<VersionId, Bytes>> {
        let g = self.inner.lock();
        Ok(ids
            .iter()
            .filter_map(|id| {
                let (_, v) = g.history.get(id)?;
                Some((*id, v.value.clone()?))
            })
            .collect())
    }

    async fn record_compaction(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
    ) -> Result<CompactionPlan> {
        let mut g = self.inner.lock();
        let meta = g.meta.as_mut().ok_or_else(not_set_up)?;
        check(meta, fence, current)?;
        meta.compact_revision = revision;
        Ok(CompactionPlan {
            revision,
            list_removed_below: i64::MAX,
            list_survivors: 0..0,
            segments: Vec::new(),
        })
    }

    async fn compact(&self, fence: &Fence, plan: &CompactionPlan, pruned: &Pruned) -> Result<()> {
        let mut g = self.inner.lock();
        let meta = g.meta.ok_or_else(not_set_up)?;
        if meta.leader_epoch != fence.epoch {
            return Err(StoreError::Fenced("leader epoch moved".into()));
        }
        // Everything at or below the compact revision but each key's newest live
        // version, whether or not the index listed it (an index loaded after a compaction
        // whose data step never ran does not know the older versions).
        let _ = pruned;
        let mut newest: BTreeMap<Bytes, VersionId> = BTreeMap::new();
        for (id, (key, _)) in g.history.range(..=(plan.revision, u32::MAX)) {
            newest.insert(key.clone(), *id);
        }
        g.history.retain(|id, (key, v)| {
            id.0 > plan.revision || (newest.get(key) == Some(id) && !v.is_tombstone())
        });
        Ok(())
    }

    async fn size(&self) -> Result<i64> {
        let g = self.inner.lock();
        Ok(g.history
            .values()
            .map(|(k, v)| k.len() + v.value.as_ref().map_or(0, |b| b.len()) + 40)
            .sum::<usize>() as i64)
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn defragment(&self) -> Result<()> {
        Ok(())
    }

    fn pool_status(&self) -> PoolStatus {
        PoolStatus::default()
    }

    async fn prepare_feed(&self) -> Result<FeedPrepared> {
        let mut g = self.inner.lock();
        let head = g.feed_head;
        Ok(match g.consumers.entry(self.consumer.clone()) {
            std::collections::btree_map::Entry::Occupied(_) => FeedPrepared::Existing,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(head);
                FeedPrepared::Created
            }
        })
    }

    async fn open_feed(&self) -> Result<Box<dyn ChangeFeed>> {
        let g = self.inner.lock();
        let Some(&confirmed) = g.consumers.get(&self.consumer) else {
            return Err(StoreError::Misconfigured(format!(
                "no change feed for consumer {:?}: prepare it first",
                self.consumer
            )));
        };
        Ok(Box::new(MemoryFeed {
            store: self.clone(),
            next: confirmed + 1,
        }))
    }

    async fn feed_retained_bytes(&self) -> Result<Option<i64>> {
        let g = self.inner.lock();
        let confirmed = g.consumers.get(&self.consumer).copied();
        Ok(confirmed.map(|c| g.feed.iter().filter(|f| f.position > c).count() as i64))
    }

    async fn bump_revision(
        &self,
        fence: &Fence,
        current: i64,
        revision: i64,
        mark_compacted: bool,
    ) -> Result<Meta> {
        if revision <= current {
            return Err(StoreError::Misconfigured(format!(
                "bump: revision {revision} is not above {current}"
            )));
        }
        let mut g = self.inner.lock();
        let meta = g.meta.as_mut().ok_or_else(not_set_up)?;
        check(meta, fence, current)?;
        meta.revision = revision;
        if mark_compacted {
            meta.compact_revision = revision;
        }
        Ok(*meta)
    }
}

/// A reader of the in-memory feed.
struct MemoryFeed {
    store: MemoryStore,
    next: u64,
}

#[async_trait]
impl ChangeFeed for MemoryFeed {
    async fn next(&mut self) -> Result<FeedCommit> {
        loop {
            let grew = self.store.feed_grew.notified();
            {
                let g = self.store.inner.lock();
                if let Some(c) = g.feed.iter().find(|c| c.position >= self.next) {
                    self.next = c.position + 1;
                    return Ok(c.clone());
                }
            }
            grew.await;
        }
    }

    fn confirm(&mut self, position: u64) {
        let mut g = self.store.inner.lock();
        let consumer = self.store.consumer.clone();
        let c = g.consumers.entry(consumer).or_insert(0);
        *c = (*c).max(position);
        g.trim_feed();
    }
}
