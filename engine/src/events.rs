//! Watch events from the index: the history a new or slow watcher replays before the
//! bus takes over, and the previous versions (`prev_kv`) attached to live events.

use bytes::Bytes;
use pgetcd_proto::mvccpb::{Event, KeyValue, event::EventType};
use pgetcd_storage::{ChangeFeed, FeedPrepared};

use crate::Engine;
use crate::error::{Error, Result};
use crate::index::{KeyRange, Version, Visible};

/// The KeyValue of a version (an evicted value reads as empty).
pub fn kv_of(key: &Bytes, v: &Version) -> KeyValue {
    KeyValue {
        key: key.clone(),
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        version: v.version,
        value: v.value.clone().unwrap_or_default(),
        lease: v.lease,
    }
}

/// etcd's event for a version: a tombstone's kv is only {key, mod_revision}.
pub fn event_of(key: &Bytes, v: &Version, prev: Option<KeyValue>) -> Event {
    if v.is_tombstone() {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: key.clone(),
                mod_revision: v.mod_revision,
                ..Default::default()
            }),
            prev_kv: prev,
        }
    } else {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv_of(key, v)),
            prev_kv: prev,
        }
    }
}

/// Events handed out per [`Engine::replay_next`] call, aimed at: the revision window
/// adapts so that a chunk holds about this many (never splitting a revision).
pub const REPLAY_CHUNK_EVENTS: usize = 1024;

/// A replay of the history of a key range, read in chunks of revisions so that a
/// watcher catching up holds one chunk of events at a time, not its whole backlog.
#[derive(Debug, Clone)]
pub struct Replay {
    range: KeyRange,
    next: i64,
    to: i64,
    window: i64,
    prev_kv: bool,
}

impl Replay {
    /// Whether every revision has been handed out.
    pub fn done(&self) -> bool {
        self.next > self.to
    }
}

impl Engine {
    /// The events of revisions `[from, to]` on `key`/`range_end` (etcd's convention), in
    /// revision order, with `prev_kv` when asked. `Compacted` when `from` is below the
    /// compact revision.
    pub async fn events_between(
        &self,
        key: &Bytes,
        range_end: &Bytes,
        from: i64,
        to: i64,
        prev_kv: bool,
    ) -> Result<Vec<Event>> {
        self.events_in(&KeyRange::new(key, range_end), from, to, prev_kv)
            .await
    }

    /// A chunked replay of the events of revisions `[from, to]` (see [`Replay`]).
    pub fn replay(
        &self,
        key: &Bytes,
        range_end: &Bytes,
        from: i64,
        to: i64,
        prev_kv: bool,
    ) -> Replay {
        Replay {
            range: KeyRange::new(key, range_end),
            next: from,
            to,
            window: 256,
            prev_kv,
        }
    }

    /// The next chunk of a replay: the events of its next window of revisions (may be
    /// empty), or `None` when done. `Compacted` when compaction passed the replay.
    pub async fn replay_next(&self, r: &mut Replay) -> Result<Option<Vec<Event>>> {
        if r.done() {
            return Ok(None);
        }
        let hi = r.to.min(r.next.saturating_add(r.window - 1));
        let events = self.events_in(&r.range, r.next, hi, r.prev_kv).await?;
        r.next = hi + 1;
        if events.len() < REPLAY_CHUNK_EVENTS / 2 {
            r.window = r.window.saturating_mul(2);
        } else if events.len() > REPLAY_CHUNK_EVENTS * 2 {
            r.window = (r.window / 2).max(1);
        }
        Ok(Some(events))
    }

    async fn events_in(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        prev_kv: bool,
    ) -> Result<Vec<Event>> {
        let st = self.core.state();
        if from < st.compact() {
            return Err(Error::Compacted);
        }
        if to < from {
            return Ok(Vec::new());
        }
        let mut items: Vec<Visible> = Vec::new();
        let mut prevs: Vec<Option<Visible>> = Vec::new();
        st.index.versions_between(range, from, to, |k, v, p| {
            items.push(Visible {
                key: Bytes::copy_from_slice(k),
                version: v.clone(),
            });
            prevs.push(p.filter(|p| prev_kv && !p.is_tombstone()).map(|p| Visible {
                key: Bytes::copy_from_slice(k),
                version: p.clone(),
            }));
        });
        st.check_not_compacted(from)?;
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| (items[i].version.mod_revision, items[i].version.sub));
        st.fill_values(&mut items, from).await?;
        let mut prev_items: Vec<Visible> = prevs.iter().flatten().cloned().collect();
        st.fill_values(&mut prev_items, from).await?;
        let mut filled = prev_items.into_iter();
        let prevs: Vec<Option<KeyValue>> = prevs
            .into_iter()
            .map(|p| {
                p.and_then(|_| filled.next())
                    .map(|v| kv_of(&v.key, &v.version))
            })
            .collect();
        Ok(order
            .into_iter()
            .map(|i| event_of(&items[i].key, &items[i].version, prevs[i].clone()))
            .collect())
    }

    /// Sets each event's `prev_kv` to its key's version just before the event.
    pub async fn attach_prev_kvs(&self, events: &mut [Event]) -> Result<()> {
        let st = self.core.state();
        let mut at = Vec::new();
        let mut prevs = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            if let Some(kv) = &ev.kv
                && let Some(p) = st.index.get(&kv.key, kv.mod_revision - 1)
            {
                at.push(i);
                prevs.push(p);
            }
        }
        let min_rev = events
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision - 1))
            .min()
            .unwrap_or(0);
        st.fill_values(&mut prevs, min_rev).await?;
        for (i, p) in at.into_iter().zip(prevs) {
            events[i].prev_kv = Some(kv_of(&p.key, &p.version));
        }
        Ok(())
    }

    /// The keyspace's name.
    pub fn keyspace(&self) -> &str {
        self.core.store.keyspace()
    }

    /// Makes sure the store's change feed exists (call before serving writes).
    pub async fn prepare_feed(&self) -> Result<FeedPrepared> {
        Ok(self.core.store.prepare_feed().await?)
    }

    /// Opens the store's change feed after its last confirmed position.
    pub async fn open_feed(&self) -> Result<Box<dyn ChangeFeed>> {
        Ok(self.core.store.open_feed().await?)
    }

    /// Bytes of history the store keeps for the feed's unconfirmed part, when known.
    pub async fn feed_retained_bytes(&self) -> Result<Option<i64>> {
        Ok(self.core.store.feed_retained_bytes().await?)
    }
}
