//! The in-memory revision index: every key with its retained versions, ordered by key.
//!
//! Concurrency protocol:
//! - One writer (the engine's writer task) appends versions, rolls back unpublished
//!   ones and prunes compacted ones. Many readers read concurrently without a global
//!   lock: the key map is a lock-free skip list; each key's version list sits behind its
//!   own small `RwLock`, held only to copy out one version.
//! - Readers always read *at a revision* and ignore versions above it. The writer
//!   appends versions of revisions above the published revision, so readers at a
//!   published revision see a consistent snapshot while a batch is being evaluated;
//!   the writer itself reads "at latest" (`i64::MAX`) to see its own pending effects.
//! - Compaction first raises the compact revision, then prunes. A reader that read at
//!   revision `r` re-checks the compact revision afterwards and reports `Compacted` if
//!   it moved above `r` (see `Engine`), so pruning never yields a silently wrong read.
//! - Values live in the versions as `Option<Bytes>`; `None` means "evicted from the
//!   value cache, read it from Postgres by (revision, sub)". Tombstones have version 0.

use std::collections::{HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use pgetcd_storage::CompactionPlan;
pub use pgetcd_storage::{Pruned, Version};

/// A key's value as visible at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    /// The key.
    pub key: Bytes,
    /// Its live version at the read revision.
    pub version: Version,
}

/// Which keys a request names, decoded from etcd's `key`/`range_end` convention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly `key`.
    Single(Bytes),
    /// `[start, end)`; `end == None` is unbounded (`range_end == "\0"`).
    Span {
        /// First key.
        start: Bytes,
        /// End (exclusive), `None` for no end.
        end: Option<Bytes>,
    },
}

impl KeyRange {
    /// etcd's reading of `key` and `range_end`.
    pub fn new(key: &Bytes, range_end: &Bytes) -> Self {
        if range_end.is_empty() {
            KeyRange::Single(key.clone())
        } else if range_end.as_ref() == [0] {
            KeyRange::Span {
                start: key.clone(),
                end: None,
            }
        } else {
            KeyRange::Span {
                start: key.clone(),
                end: Some(range_end.clone()),
            }
        }
    }

    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_ref() == key,
            KeyRange::Span { start, end } => {
                key >= start.as_ref() && end.as_ref().is_none_or(|e| key < e.as_ref())
            }
        }
    }
}

/// A key's retained versions, oldest first. Most keys have one: it lives inline in the
/// skip-list node, with no allocation of its own.
type Versions = SmallVec<[Version; 1]>;

struct KeyEntry {
    versions: RwLock<Versions>,
}

impl KeyEntry {
    fn new() -> Self {
        Self {
            versions: RwLock::new(Versions::new()),
        }
    }
}

/// Visible version of a list at revision `at`: the last version at or below it, unless
/// it is a tombstone.
fn visible_at(versions: &[Version], at: i64) -> Option<&Version> {
    let idx = versions.partition_point(|v| v.mod_revision <= at);
    let v = versions[..idx].last()?;
    (!v.is_tombstone()).then_some(v)
}

/// Keys and versions collected by a range read. The keys are copied into one buffer
/// and handed out as slices of it: one allocation per read, not one per key.
#[derive(Default)]
struct Found {
    keys: Vec<u8>,
    ends: Vec<usize>,
    versions: Vec<Version>,
}

impl Found {
    fn push(&mut self, key: &[u8], version: &Version) {
        self.keys.extend_from_slice(key);
        self.ends.push(self.keys.len());
        self.versions.push(version.clone());
    }

    fn finish(self) -> Vec<Visible> {
        let keys = Bytes::from(self.keys);
        let mut start = 0;
        self.ends
            .into_iter()
            .zip(self.versions)
            .map(|(end, version)| {
                let key = keys.slice(start..end);
                start = end;
                Visible { key, version }
            })
            .collect()
    }
}

/// One cached value's bookkeeping, in insertion order.
struct CacheEntry {
    key: Bytes,
    mod_revision: i64,
    sub: u32,
    len: usize,
}

/// Counts of key ranges at fixed revisions, remembered for the next page of a
/// paginated list (see [`Index::page_total`]). Bounded: the oldest entries go first.
const PAGE_COUNTS: usize = 1024;

/// (range start, range end (None = to the end), revision) → keys visible there.
type PageCountKey = (Bytes, Option<Bytes>, i64);

/// Committed changes remembered for incremental counts (see [`Index::count`]).
const COUNT_LOG: usize = 1 << 16;
/// Ranges whose last count is remembered.
const COUNT_MEMO: usize = 1024;

/// Recent committed changes, each with what it did to the number of live keys: +1 for
/// a create (version 1), -1 for a delete, 0 for an update. In revision order.
#[derive(Default)]
struct CountLog {
    changes: VecDeque<(i64, Bytes, i8)>,
    /// Changes at or below this revision were dropped from the log.
    dropped_upto: i64,
    /// The log holds every committed change up to this revision (the published one).
    /// Reads above it (a write txn reading its own pending changes) are not memoized:
    /// their revision may yet be rolled back and reused.
    complete_upto: i64,
}

/// A range as a map key: (start, end (None = to the end)).
type RangeKey = (Bytes, Option<Bytes>);

/// A bounded map that forgets its oldest entries first.
struct Memo<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Copy> Memo<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).copied()
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The ordered map of keys to versions plus the value-cache bookkeeping.
pub struct Index {
    /// Keys are boxed slices, not `Bytes`: 16 bytes in the node and no shared header;
    /// readers get copies.
    map: SkipMap<Box<[u8]>, KeyEntry>,
    cache_budget: usize,
    cache_bytes: AtomicUsize,
    cache_fifo: Mutex<VecDeque<CacheEntry>>,
    page_counts: Mutex<Memo<PageCountKey, usize>>,
    count_log: RwLock<CountLog>,
    /// range (start, end) → (revision, live keys in the range at that revision).
    count_memo: Mutex<Memo<RangeKey, (i64, usize)>>,
}

impl Index {
    /// An empty index whose cached values may use up to `cache_budget` bytes.
    pub fn new(cache_budget: usize) -> Self {
        Self {
            map: SkipMap::new(),
            cache_budget,
            cache_bytes: AtomicUsize::new(0),
            cache_fifo: Mutex::new(VecDeque::new()),
            page_counts: Mutex::new(Memo::new(PAGE_COUNTS)),
            count_log: RwLock::new(CountLog::default()),
            count_memo: Mutex::new(Memo::new(COUNT_MEMO)),
        }
    }

    /// Records a committed batch for incremental counts. The writer calls it before it
    /// publishes the batch's revision, so a reader at any published revision finds
    /// every change up to it here (or finds the log truncated past its memo and counts
    /// afresh).
    pub fn note_committed<'a>(&self, changes: impl IntoIterator<Item = (&'a Bytes, &'a Version)>) {
        let mut log = self.count_log.write();
        for (key, v) in changes {
            log.complete_upto = log.complete_upto.max(v.mod_revision);
            let delta = if v.is_tombstone() {
                -1
            } else if v.version == 1 {
                1
            } else {
                0
            };
            log.changes.push_back((v.mod_revision, key.clone(), delta));
        }
        while log.changes.len() > COUNT_LOG {
            if let Some((rev, _, _)) = log.changes.pop_front() {
                log.dropped_upto = log.dropped_upto.max(rev);
            }
        }
    }

    /// Marks the index as holding everything committed up to `revision` (after a load
    /// from Postgres): counts and page totals at or below it may be memoized.
    pub fn set_complete_upto(&self, revision: i64) {
        let mut log = self.count_log.write();
        log.complete_upto = log.complete_upto.max(revision);
        log.dropped_upto = log.dropped_upto.max(revision);
    }

    /// Whether a read at `at` sees only committed history (memoizable).
    fn committed_at(&self, at: i64) -> bool {
        at <= self.count_log.read().complete_upto
    }

    /// Number of keys with at least one retained version (live or not).
    pub fn key_count(&self) -> usize {
        self.map.len()
    }

    /// The cache budget in bytes.
    pub fn cache_budget(&self) -> usize {
        self.cache_budget
    }

    /// Bytes of values counted in the cache.
    pub fn cached_bytes(&self) -> usize {
        self.cache_bytes.load(Ordering::Relaxed)
    }

    /// The version of `key` visible at `at`.
    pub fn get(&self, key: &[u8], at: i64) -> Option<Visible> {
        let entry = self.map.get(key)?;
        let versions = entry.value().versions.read();
        visible_at(&versions, at).map(|v| Visible {
            key: Bytes::copy_from_slice(entry.key()),
            version: v.clone(),
        })
    }

    /// Calls `f` for each key entry in `range` (live or not), in key order, until it
    /// returns false.
    fn entries(&self, range: &KeyRange, mut f: impl FnMut(&[u8], &KeyEntry) -> bool) {
        match range {
            KeyRange::Single(key) => {
                if let Some(entry) = self.map.get(key.as_ref()) {
                    f(entry.key(), entry.value());
                }
            }
            KeyRange::Span { start, end } => {
                if let Some(e) = end
                    && e.as_ref() <= start.as_ref()
                {
                    return;
                }
                let upper = match end {
                    Some(e) => Bound::Excluded(e.as_ref()),
                    None => Bound::Unbounded,
                };
                let bounds: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(start.as_ref()), upper);
                for entry in self.map.range::<[u8], _>(bounds) {
                    if !f(entry.key(), entry.value()) {
                        return;
                    }
                }
            }
        }
    }

    /// Calls `f` for each key in `range` visible at `at`, in key order, until it returns
    /// false.
    pub fn scan(&self, range: &KeyRange, at: i64, mut f: impl FnMut(&[u8], &Version) -> bool) {
        self.entries(range, |key, entry| {
            let versions = entry.versions.read();
            match visible_at(&versions, at) {
                Some(v) => f(key, v),
                None => true,
            }
        });
    }

    /// Calls `f(key, version, previous)` for every version with a revision in
    /// `[from, to]` of every key in `range` (deleted keys included), where `previous` is
    /// the key's version just before it. Order: by key, then revision.
    pub fn versions_between(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        mut f: impl FnMut(&[u8], &Version, Option<&Version>),
    ) {
        self.entries(range, |key, entry| {
            let versions = entry.versions.read();
            let start = versions.partition_point(|v| v.mod_revision < from);
            for i in start..versions.len() {
                let v = &versions[i];
                if v.mod_revision > to {
                    break;
                }
                f(key, v, i.checked_sub(1).map(|p| &versions[p]));
            }
            true
        });
    }

    /// Calls `f` with every key and all its retained versions (tombstones included),
    /// in key order.
    pub fn for_each_key(&self, mut f: impl FnMut(&[u8], &[Version])) {
        for entry in self.map.iter() {
            f(entry.key(), &entry.value().versions.read());
        }
    }

    /// Keys in `range` visible at `at`: up to `limit` of them (0 = all) and the total.
    pub fn range(&self, range: &KeyRange, at: i64, limit: usize) -> (Vec<Visible>, usize) {
        let mut found = Found::default();
        let mut total = 0usize;
        self.scan(range, at, |k, v| {
            total += 1;
            if limit == 0 || found.versions.len() < limit {
                found.push(k, v);
            }
            true
        });
        (found.finish(), total)
    }

    /// The first `limit` (> 0) keys of `range` visible at `at`; stops scanning there.
    pub fn range_first(&self, range: &KeyRange, at: i64, limit: usize) -> Vec<Visible> {
        let mut found = Found::default();
        self.scan(range, at, |k, v| {
            found.push(k, v);
            found.versions.len() < limit
        });
        found.finish()
    }

    /// Total keys of `range` visible at `at` for a page of a list that returns its
    /// first `page` keys, the last being `last`, and has more after them.
    ///
    /// A paginated list (kube-apiserver's: limit 500, the next page starting at the
    /// last key + `\0`, every page at the first page's revision) needs the count of
    /// the remaining range with each page, like etcd computes it; counting it afresh
    /// makes a whole list quadratic in its length. The count of a range at a fixed
    /// revision never changes (history at or above the compact revision is immutable),
    /// and the next page's count is this one minus the `page` keys returned, so it is
    /// remembered for the range starting right after `last`.
    pub fn page_total(&self, range: &KeyRange, at: i64, page: usize, last: &Bytes) -> usize {
        let KeyRange::Span { start, end } = range else {
            return self.count(range, at);
        };
        if !self.committed_at(at) {
            return self.count_scan(range, at);
        }
        let key = (start.clone(), end.clone(), at);
        let known = self.page_counts.lock().get(&key);
        let total = match known {
            Some(n) => n,
            None => self.count(range, at),
        };
        let mut next_start = Vec::with_capacity(last.len() + 1);
        next_start.extend_from_slice(last);
        next_start.push(0);
        let next = (Bytes::from(next_start), end.clone(), at);
        self.page_counts
            .lock()
            .insert(next, total.saturating_sub(page));
        total
    }

    /// Number of keys in `range` visible at `at`.
    ///
    /// Counting scans the range, O(keys). A range counted before at revision `r0` is
    /// instead counted as that count plus the live-key deltas of the changes committed
    /// in `(r0, at]` inside the range (from the log of recent changes), O(changes since
    /// then): kube-apiserver counts every resource prefix over and over.
    pub fn count(&self, range: &KeyRange, at: i64) -> usize {
        let KeyRange::Span { start, end } = range else {
            return self.count_scan(range, at);
        };
        if !self.committed_at(at) {
            return self.count_scan(range, at);
        }
        let key = (start.clone(), end.clone());
        let memo = self.count_memo.lock().get(&key);
        if let Some((r0, c0)) = memo
            && r0 <= at
        {
            let log = self.count_log.read();
            if log.dropped_upto <= r0 {
                let from = log.changes.partition_point(|c| c.0 <= r0);
                let mut n = c0 as i64;
                for (rev, k, delta) in log.changes.range(from..) {
                    if *rev > at {
                        break;
                    }
                    if *delta != 0 && range.contains(k) {
                        n += i64::from(*delta);
                    }
                }
                drop(log);
                let n = usize::try_from(n).unwrap_or(0);
                self.count_memo.lock().insert(key, (at, n));
                return n;
            }
        }
        let n = self.count_scan(range, at);
        if memo.is_none_or(|(r0, _)| r0 <= at) {
            self.count_memo.lock().insert(key, (at, n));
        }
        n
    }

    /// Number of keys in `range` visible at `at`, by scanning.
    pub fn count_scan(&self, range: &KeyRange, at: i64) -> usize {
        let mut total = 0usize;
        self.scan(range, at, |_, _| {
            total += 1;
            true
        });
        total
    }

    /// Appends a version (writer only). Its revision must exceed the key's last one.
    ///
    /// A new key is stored as its own copy: keys decoded from gRPC share the request's
    /// receive buffer (kilobytes), which the index must not keep alive. Returns the key
    /// as the index holds it, for callers that keep it longer than the request.
    pub fn append(&self, key: &Bytes, version: Version) -> Bytes {
        self.append_from(key, |_| version).0
    }

    /// Appends the version `make` builds from the key's live version (writer only), in
    /// one lookup. Returns the key as the index holds it and that previous live
    /// version (`None` when the key is absent or deleted).
    pub fn append_from(
        &self,
        key: &Bytes,
        make: impl FnOnce(Option<&Version>) -> Version,
    ) -> (Bytes, Option<Version>) {
        let entry = match self.map.get(key.as_ref()) {
            Some(e) => e,
            None => self
                .map
                .get_or_insert_with(Box::from(key.as_ref()), KeyEntry::new),
        };
        let mut versions = entry.value().versions.write();
        let prev = versions.last().filter(|v| !v.is_tombstone()).cloned();
        let version = make(prev.as_ref());
        debug_assert!(
            versions
                .last()
                .is_none_or(|l| (l.mod_revision, l.sub) < (version.mod_revision, version.sub)),
            "versions must be appended in revision order"
        );
        versions.push(version);
        (Bytes::copy_from_slice(entry.key()), prev)
    }

    /// Loads a version during start-up, in any order.
    pub fn load(&self, key: Bytes, version: Version) {
        let entry = self
            .map
            .get_or_insert_with(Box::from(key.as_ref()), KeyEntry::new);
        let mut versions = entry.value().versions.write();
        let pos = versions
            .partition_point(|v| (v.mod_revision, v.sub) < (version.mod_revision, version.sub));
        versions.insert(pos, version);
    }

    /// Removes every version above `published` of `keys` (writer only): undoes a batch
    /// that did not commit.
    pub fn rollback(&self, keys: &[Bytes], published: i64) {
        for key in keys {
            if let Some(entry) = self.map.get(key.as_ref()) {
                let empty = {
                    let mut versions = entry.value().versions.write();
                    let keep = versions.partition_point(|v| v.mod_revision <= published);
                    versions.truncate(keep);
                    versions.is_empty()
                };
                if empty {
                    entry.remove();
                }
            }
        }
    }

    /// Records that the values of these committed versions are now cached, evicting the
    /// oldest cached values while over budget.
    pub fn note_cached(&self, entries: impl IntoIterator<Item = (Bytes, i64, u32, usize)>) {
        {
            let mut fifo = self.cache_fifo.lock();
            for (key, mod_revision, sub, len) in entries {
                self.cache_bytes.fetch_add(len, Ordering::Relaxed);
                fifo.push_back(CacheEntry {
                    key,
                    mod_revision,
                    sub,
                    len,
                });
            }
        }
        self.evict();
    }

    fn evict(&self) {
        while self.cache_bytes.load(Ordering::Relaxed) > self.cache_budget {
            let Some(victim) = self.cache_fifo.lock().pop_front() else {
                return;
            };
            if let Some(entry) = self.map.get(victim.key.as_ref()) {
                let mut versions = entry.value().versions.write();
                if let Some(v) = versions
                    .iter_mut()
                    .find(|v| v.mod_revision == victim.mod_revision && v.sub == victim.sub)
                {
                    v.value = None;
                }
            }
            self.cache_bytes.fetch_sub(victim.len, Ordering::Relaxed);
        }
    }

    /// Puts a value read from Postgres back into its version, if the version still
    /// exists and has none.
    pub fn fill(&self, key: &Bytes, mod_revision: i64, sub: u32, value: &Bytes) {
        let filled = match self.map.get(key.as_ref()) {
            Some(entry) => {
                let mut versions = entry.value().versions.write();
                match versions
                    .iter_mut()
                    .find(|v| v.mod_revision == mod_revision && v.sub == sub)
                {
                    Some(v) if v.value.is_none() => {
                        v.value = Some(value.clone());
                        true
                    }
                    _ => false,
                }
            }
            None => false,
        };
        if filled {
            self.note_cached([(key.clone(), mod_revision, sub, value.len())]);
        }
    }

    /// Drops versions made unreachable by compacting at the plan's revision: every
    /// version at or below it except each key's newest one, and that one too when it is
    /// a tombstone. Lists what the store asked for in `plan`: removed versions below
    /// `list_removed_below`, survivors in `list_survivors`. Does at most `max_keys` keys,
    /// from key `from` (None: the first key) on, adding to `pruned`, and returns the key
    /// to go on from, or None when the index is done. Keys written between slices need
    /// nothing: their new versions are above the compact revision (writer only, between
    /// batches).
    pub fn compact_slice(
        &self,
        plan: &CompactionPlan,
        from: Option<&[u8]>,
        max_keys: usize,
        pruned: &mut Pruned,
    ) -> Option<Box<[u8]>> {
        let compact = plan.revision;
        let lower = from.map_or(Bound::Unbounded, Bound::Included);
        let keys = self.map.range::<[u8], _>((lower, Bound::Unbounded));
        for (done, entry) in keys.enumerate() {
            if done == max_keys {
                return Some(entry.key().clone());
            }
            let empty = {
                let mut versions = entry.value().versions.write();
                let upto = versions.partition_point(|v| v.mod_revision <= compact);
                if upto == 0 {
                    continue;
                }
                let newest = &versions[upto - 1];
                let cut = if newest.is_tombstone() {
                    upto
                } else {
                    upto - 1
                };
                for v in &versions[..cut] {
                    if v.mod_revision < plan.list_removed_below {
                        pruned.removed.push((v.mod_revision, v.sub));
                    }
                }
                if cut < upto {
                    let kept = &versions[upto - 1];
                    if plan.list_survivors.contains(&kept.mod_revision) {
                        pruned.survivors.push((kept.mod_revision, kept.sub));
                    }
                }
                versions.drain(..cut);
                versions.is_empty()
            };
            if empty {
                pruned.keys_removed += 1;
                entry.remove();
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn put(rev: i64, create: i64, ver: i64, value: &'static str) -> Version {
        Version {
            mod_revision: rev,
            sub: 0,
            create_revision: create,
            version: ver,
            lease: 0,
            value: Some(Bytes::from_static(value.as_bytes())),
        }
    }

    pub(crate) fn tomb(rev: i64) -> Version {
        Version {
            mod_revision: rev,
            ..Version::tombstone()
        }
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn reads_at_revision() {
        let ix = Index::new(usize::MAX);
        ix.append(&b("a"), put(2, 2, 1, "x"));
        ix.append(&b("a"), put(4, 2, 2, "y"));
        ix.append(&b("a"), tomb(5));
        ix.append(&b("a"), put(7, 7, 1, "z"));
        assert!(ix.get(b"a", 1).is_none());
        assert_eq!(ix.get(b"a", 3).unwrap().version.value, Some(b("x")));
        assert_eq!(ix.get(b"a", 4).unwrap().version.version, 2);
        assert!(ix.get(b"a", 6).is_none());
        assert_eq!(ix.get(b"a", 7).unwrap().version.create_revision, 7);
    }

    #[test]
    fn ranges_count_and_limit() {
        let ix = Index::new(usize::MAX);
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            ix.append(
                &Bytes::from_static(k.as_bytes()),
                put(i as i64 + 2, i as i64 + 2, 1, "v"),
            );
        }
        let all = KeyRange::new(&b("a"), &Bytes::from_static(&[0]));
        let (kvs, total) = ix.range(&all, 10, 2);
        assert_eq!(total, 4);
        assert_eq!(kvs.len(), 2);
        assert_eq!(ix.count(&all, 3), 2);
        let bc = KeyRange::new(&b("b"), &b("d"));
        assert_eq!(ix.count(&bc, 10), 2);
        let inverted = KeyRange::new(&b("d"), &b("b"));
        assert_eq!(ix.count(&inverted, 10), 0);
        assert_eq!(ix.count(&KeyRange::new(&b("c"), &Bytes::new()), 10), 1);
    }

    #[test]
    fn rollback_removes_pending_versions_and_new_keys() {
        let ix = Index::new(usize::MAX);
        ix.append(&b("a"), put(2, 2, 1, "x"));
        ix.append(&b("a"), put(3, 2, 2, "y"));
        ix.append(&b("n"), put(3, 3, 1, "y"));
        ix.rollback(&[b("a"), b("n")], 2);
        assert_eq!(ix.get(b"a", i64::MAX).unwrap().version.version, 1);
        assert_eq!(ix.key_count(), 1);
    }

    #[test]
    fn incremental_counts_match_scans() {
        let ix = Index::new(1 << 20);
        let keys: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("k/{i:02}"))).collect();
        // version per key (0 = absent or deleted)
        let mut ver = [0i64; 40];
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let ranges = [
            KeyRange::Span {
                start: b("k/"),
                end: Some(b("k0")),
            },
            KeyRange::Span {
                start: b("k/1"),
                end: Some(b("k/3")),
            },
            KeyRange::Span {
                start: b("k/35"),
                end: None,
            },
        ];
        for rev in 2..600i64 {
            let i = next() % 40;
            let v = if ver[i] > 0 && next() % 3 == 0 {
                ver[i] = 0;
                Version {
                    mod_revision: rev,
                    ..Version::tombstone()
                }
            } else {
                ver[i] += 1;
                put(rev, rev, ver[i], "v")
            };
            ix.append(&keys[i], v.clone());
            ix.note_committed([(&keys[i], &v)]);
            if next() % 4 == 0 {
                let r = &ranges[next() % 3];
                let at = rev - (next() % 5) as i64;
                assert_eq!(ix.count(r, at), ix.count_scan(r, at), "rev {rev} at {at}");
            }
        }
        assert!(ix.count_memo.lock().len() == 3);
    }

    #[test]
    fn page_totals_match_counts_through_a_paginated_list() {
        let ix = Index::new(1 << 20);
        for i in 0..1000 {
            ix.append(&Bytes::from(format!("p/{i:04}")), put(i + 2, i + 2, 1, "v"));
        }
        // Deleted keys and keys outside the range do not count.
        ix.append(&b("p/0500"), tomb(1002));
        ix.append(&b("q"), put(1003, 1003, 1, "v"));
        let at = 1003;
        // Reads above the committed revision (a write txn's own) are not memoized.
        assert_eq!(
            ix.page_total(
                &KeyRange::Span {
                    start: b("p/"),
                    end: Some(b("p0"))
                },
                at,
                50,
                &b("p/0049")
            ),
            999
        );
        assert!(ix.page_counts.lock().len() == 0);
        ix.set_complete_upto(at);
        let end = Some(b("p0"));
        let mut start = b("p/");
        let mut seen = 0;
        loop {
            let range = KeyRange::Span {
                start: start.clone(),
                end: end.clone(),
            };
            let kvs = ix.range_first(&range, at, 51);
            let expected = ix.count(&range, at);
            if kvs.len() < 51 {
                assert_eq!(kvs.len(), expected);
                seen += kvs.len();
                break;
            }
            assert_eq!(ix.page_total(&range, at, 50, &kvs[49].key), expected);
            seen += 50;
            let mut next = kvs[49].key.to_vec();
            next.push(0);
            start = Bytes::from(next);
        }
        assert_eq!(seen, 999);
        // Every page after the first was answered from the memo.
        assert!(ix.page_counts.lock().len() >= 19);
    }

    /// The whole index in one slice.
    fn compact(ix: &Index, compact: i64, retained_below: i64, drop_below: i64) -> Pruned {
        let mut pruned = Pruned::default();
        let plan = CompactionPlan {
            revision: compact,
            list_removed_below: retained_below,
            list_survivors: retained_below..drop_below,
            segments: Vec::new(),
        };
        let rest = ix.compact_slice(&plan, None, usize::MAX, &mut pruned);
        assert!(rest.is_none());
        pruned
    }

    #[test]
    fn compaction_keeps_newest_live_version() {
        let ix = Index::new(usize::MAX);
        ix.append(&b("a"), put(2, 2, 1, "x"));
        ix.append(&b("a"), put(3, 2, 2, "y"));
        ix.append(&b("a"), put(6, 2, 3, "z"));
        ix.append(&b("d"), put(4, 4, 1, "x"));
        ix.append(&b("d"), tomb(5));
        let pruned = compact(&ix, 5, 0, 6);
        assert_eq!(ix.key_count(), 1);
        assert_eq!(pruned.keys_removed, 1);
        assert_eq!(ix.get(b"a", 5).unwrap().version.version, 2);
        assert_eq!(pruned.survivors, vec![(3, 0)]);
        assert!(pruned.removed.is_empty());
    }

    #[test]
    fn compaction_in_slices_with_writes_between_equals_one_pass() {
        // 40 keys: every third ends in a tombstone at or below the compact revision,
        // every fifth has its newest version above it; some versions sit below
        // `retained_below` (3) and some in partitions about to be dropped (below 8).
        let build = || {
            let ix = Index::new(usize::MAX);
            for i in 0..40i64 {
                let k = Bytes::from(format!("k{i:02}"));
                ix.append(&k, put(2, 2, 1, "a"));
                ix.append(&k, put(4 + i % 3, 2, 2, "b"));
                if i % 3 == 0 {
                    ix.append(&k, tomb(9));
                }
                if i % 5 == 0 {
                    ix.append(&k, put(20, 20, 1, "c"));
                }
            }
            ix
        };
        let whole = build();
        let expected = compact(&whole, 10, 3, 8);

        let sliced = build();
        let mut pruned = Pruned::default();
        let mut from = None;
        let mut slices = 0;
        loop {
            let plan = CompactionPlan {
                revision: 10,
                list_removed_below: 3,
                list_survivors: 3..8,
                segments: Vec::new(),
            };
            from = sliced.compact_slice(&plan, from.as_deref(), 7, &mut pruned);
            slices += 1;
            // A write between slices, to a key already pruned and one not yet reached:
            // versions above the compact revision are never touched.
            sliced.append(&b("k00"), put(30 + slices, 30 + slices, 1, "w"));
            sliced.append(&b("k39"), put(60 + slices, 20, 9, "w"));
            if from.is_none() {
                break;
            }
        }
        assert_eq!(slices, 6, "40 keys in slices of 7");
        assert_eq!(pruned.survivors, expected.survivors);
        assert_eq!(pruned.removed, expected.removed);
        // k39 ends in a tombstone at 9, so one pass removes it; here writes between
        // slices gave it versions above 10 before its slice came, so it stays.
        assert_eq!(pruned.keys_removed, expected.keys_removed - 1);
        for i in 1..39 {
            let k = format!("k{i:02}");
            for rev in [10, 20, 40] {
                assert_eq!(
                    sliced.get(k.as_bytes(), rev).map(|v| v.version),
                    whole.get(k.as_bytes(), rev).map(|v| v.version),
                    "{k} at {rev}"
                );
            }
        }
        assert_eq!(sliced.get(b"k39", 70).unwrap().version.version, 9);
        assert_eq!(sliced.get(b"k00", 10), None);
    }

    #[test]
    fn cache_evicts_oldest_beyond_budget_and_refills() {
        let ix = Index::new(3);
        ix.append(&b("a"), put(2, 2, 1, "xx"));
        ix.append(&b("b"), put(3, 3, 1, "yy"));
        ix.note_cached([(b("a"), 2, 0, 2), (b("b"), 3, 0, 2)]);
        assert_eq!(ix.get(b"a", 9).unwrap().version.value, None);
        assert_eq!(ix.get(b"b", 9).unwrap().version.value, Some(b("yy")));
        ix.fill(&b("a"), 2, 0, &b("xx"));
        // Filling a pushes b out.
        assert_eq!(ix.get(b"a", 9).unwrap().version.value, Some(b("xx")));
        assert_eq!(ix.get(b"b", 9).unwrap().version.value, None);
        assert_eq!(ix.cached_bytes(), 2);
    }
}
