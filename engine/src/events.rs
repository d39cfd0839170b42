//! Watch events from the index: the history a new or slow watcher replays before the
//! bus takes over, and the previous versions (`prev_kv`) attached to live events.

use bytes::Bytes;
use pgetcd_proto::mvccpb::{Event, KeyValue, event::EventType};

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
        let st = self.core.state();
        if from < st.compact() {
            return Err(Error::Compacted);
        }
        if to < from {
            return Ok(Vec::new());
        }
        let range = KeyRange::new(key, range_end);
        let mut items: Vec<Visible> = Vec::new();
        let mut prevs: Vec<Option<Visible>> = Vec::new();
        st.index.versions_between(&range, from, to, |k, v, p| {
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

    /// The Postgres connection settings with their TLS connector (for the WAL stream,
    /// so that it honours the same `sslmode` and certificates).
    pub fn postgres_config(&self) -> crate::PgConnect {
        self.core.store.target().clone()
    }

    /// The keyspace (Postgres schema).
    pub fn keyspace(&self) -> &str {
        self.core.store.layout().schema()
    }

    /// A new plain connection to the keyspace's database.
    pub async fn admin_connection(&self) -> Result<tokio_postgres::Client> {
        self.core.store.connect().await
    }
}
