//! What the engine's request paths and its writer share: the published state (index,
//! revisions, leases) and the core (store, ids, config, alarms, the hand-off to the
//! watch feed).

use crate::follower::ReadIndex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pgetcd_storage::{Change, Store};
use tokio::sync::mpsc;
use tracing::info;

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::index::{Index, Visible};
use crate::lease::LeaseTable;
use crate::metrics::EngineMetrics;

/// The index plus the revisions it is published at. Replaced whole when the writer
/// reloads from the store.
pub(crate) struct State {
    pub(crate) index: Index,
    pub(crate) published: AtomicI64,
    pub(crate) compact: AtomicI64,
    store: Arc<dyn Store>,
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

    /// Makes sure every entry of `kvs` has its value, reading misses from the store
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
        let ids: Vec<(i64, u32)> = missing.iter().map(|&i| kvs[i].version.id()).collect();
        let got = self.store.values(&ids).await?;
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

/// A batch the writer committed: its changes in revision order.
#[derive(Debug)]
pub struct Committed {
    /// The newest revision of the batch.
    pub last_revision: i64,
    /// Every change, in (revision, sub) order.
    pub changes: Vec<Change>,
}

/// What the engine and its writer share.
pub(crate) struct Core {
    pub(crate) state: RwLock<Arc<State>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cluster_id: u64,
    pub(crate) member_id: u64,
    pub(crate) raft_term: u64,
    /// Whether this engine follows another instance's writes (see `follower.rs`).
    pub(crate) follower: bool,
    pub(crate) config: EngineConfig,
    pub(crate) writer_failed: AtomicBool,
    pub(crate) leases: Arc<LeaseTable>,
    /// The keyspace's alarms as last read from the store: (member id, type).
    pub(crate) alarms: parking_lot::RwLock<Vec<(u64, i32)>>,
    /// Held across one read of the alarms and its update of `alarms`, so that a read
    /// that began before a change cannot overwrite the read after it.
    pub(crate) alarms_refresh: tokio::sync::Mutex<()>,
    pub(crate) metrics: Arc<EngineMetrics>,
    /// (last revision, commit time) of recent batches, until the watch feed publishes
    /// them (for `publish_delay_seconds`).
    pub(crate) commit_times: Mutex<VecDeque<(i64, Instant)>>,
    /// Where the writer hands committed batches to the watch feed, if subscribed.
    pub(crate) commits: Mutex<Option<mpsc::Sender<Committed>>>,
    /// Batches not handed over because the feed's queue was full.
    pub(crate) handoff_skipped: AtomicU64,
    /// Notified whenever a follower publishes a revision.
    pub(crate) applied: tokio::sync::Notify,
    /// Until when this writer's claim on the writer role surely holds (None: no claim is
    /// kept, a single instance opened without an election).
    pub(crate) claim_until: Mutex<Option<Instant>>,
    /// One read-index query at a time (see `Engine::sync`).
    pub(crate) read_index: tokio::sync::Mutex<()>,
    /// The last read index: when its query started, and the revision it read.
    pub(crate) read_index_last: Mutex<Option<(tokio::time::Instant, ReadIndex)>>,
    /// Asks a follower's apply task to follow the store's compaction now.
    pub(crate) compact_now: Arc<tokio::sync::Notify>,
    /// Notified once when a follower engine is retired (see `Engine::retire`).
    pub(crate) retired: Arc<tokio::sync::Notify>,
}

/// Commit times kept for the watch feed's delay histogram.
const COMMIT_TIMES: usize = 4096;

/// etcd's alarm types (etcdserverpb.AlarmType).
pub const ALARM_NOSPACE: i32 = 1;
pub const ALARM_CORRUPT: i32 = 2;

impl Core {
    /// Whether an alarm of type `alarm` is raised, for any member.
    pub(crate) fn has_alarm(&self, alarm: i32) -> bool {
        self.alarms.read().iter().any(|(_, a)| *a == alarm)
    }

    /// Reads the alarms from the store.
    pub(crate) async fn refresh_alarms(&self) -> crate::Result<Vec<(u64, i32)>> {
        let _one_at_a_time = self.alarms_refresh.lock().await;
        let alarms = self.store.alarms().await?;
        *self.alarms.write() = alarms.clone();
        Ok(alarms)
    }

    pub(crate) fn state(&self) -> Arc<State> {
        self.state.read().clone()
    }

    /// Records the commit time and gives a committed batch ending at `rev` to the watch
    /// feed, never waiting: when its queue is full the batch is skipped and counted.
    pub(crate) fn hand_off(&self, rev: i64, changes: &[Change]) {
        let mut times = self.commit_times.lock();
        if times.len() >= COMMIT_TIMES {
            times.pop_front();
        }
        times.push_back((rev, Instant::now()));
        drop(times);
        if let Some(tx) = self.commits.lock().as_ref() {
            let batch = Committed {
                last_revision: rev,
                changes: changes.to_vec(),
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(batch) {
                self.handoff_skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The error of a request refused because another instance took the keyspace.
    pub(crate) fn fenced(&self) -> Error {
        Error::Fenced {
            schema: self.store.keyspace().to_owned(),
        }
    }

    /// Replaces the published state with a fresh load from the store, retrying with
    /// backoff until one works (after a failed compaction record, or a follower's gap).
    pub(crate) async fn reload(&self, why: &'static str) {
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            let loaded = Core::load_state(
                &self.store,
                self.config.cache_bytes,
                self.leases.clone(),
                self.metrics.clone(),
            )
            .await;
            match loaded {
                Ok(state) => {
                    *self.state.write() = Arc::new(state);
                    self.applied.notify_waiters();
                    return;
                }
                Err(e) => tracing::warn!(error = %e, why, "reloading the index"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
        }
    }

    /// Loads a fresh state from the store: the index (values cached while the budget
    /// lasts), and the leases (each with its full TTL from now) with their keys.
    pub(crate) async fn load_state(
        store: &Arc<dyn Store>,
        cache_bytes: usize,
        leases: Arc<LeaseTable>,
        metrics: Arc<EngineMetrics>,
    ) -> Result<State> {
        let index = Index::new(cache_bytes);
        let mut budget = index.cache_budget();
        let mut cached = Vec::new();
        let loaded = store
            .load(&mut |key: Bytes, mut version, value: Option<&[u8]>| {
                if let Some(v) = value {
                    if v.len() <= budget {
                        budget -= v.len();
                        cached.push((key.clone(), version.mod_revision, version.sub, v.len()));
                        version.value = Some(Bytes::copy_from_slice(v));
                    } else {
                        budget = 0;
                    }
                }
                index.load(key, version);
            })
            .await?;
        index.note_cached(cached);
        let meta = loaded.meta;
        index.set_complete_upto(meta.revision);
        for id in leases.ids() {
            leases.remove(id);
        }
        for (id, ttl) in &loaded.leases {
            leases.insert(*id, *ttl);
        }
        leases.rebuild_keys(&index, meta.revision);
        info!(
            rows = loaded.versions,
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
