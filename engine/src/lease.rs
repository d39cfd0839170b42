//! Leases: the table of granted leases with their expiry, and which keys each lease
//! holds.
//!
//! Grants and revokes are durable (the `leases` table, written in the writer's batch
//! transaction); keepalives only move the in-memory expiry. After a restart every lease
//! gets its full TTL again, as etcd does on a leader change. The writer changes the
//! table while it evaluates a batch (so a later request of the same batch sees a grant)
//! and undoes that if the batch does not commit; key attachments are updated only after
//! commit, from the committed changes.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::index::{Index, KeyRange};
use pgetcd_storage::Change;

/// etcd's minimum lease TTL in seconds (with default election settings).
pub const MIN_LEASE_TTL: i64 = 2;
/// etcd's maximum lease TTL in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    ttl: i64,
    expiry: Instant,
    revoking: bool,
}

#[derive(Default)]
struct Inner {
    leases: HashMap<i64, Entry>,
    keys: HashMap<i64, BTreeSet<Bytes>>,
}

/// The lease table.
#[derive(Default)]
pub struct LeaseTable {
    inner: Mutex<Inner>,
}

/// A lease's remaining time, granted TTL and keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Seconds left (truncated, as etcd).
    pub remaining: i64,
    /// TTL granted.
    pub granted: i64,
    /// Keys attached.
    pub keys: Vec<Bytes>,
}

fn expiry(ttl: i64) -> Instant {
    Instant::now() + Duration::from_secs(ttl.max(0) as u64)
}

impl LeaseTable {
    /// Whether `id` is granted.
    pub fn exists(&self, id: i64) -> bool {
        self.inner.lock().leases.contains_key(&id)
    }

    /// Adds a lease expiring `ttl` seconds from now.
    pub fn insert(&self, id: i64, ttl: i64) {
        self.inner.lock().leases.insert(
            id,
            Entry {
                ttl,
                expiry: expiry(ttl),
                revoking: false,
            },
        );
    }

    /// Removes a lease; returns its TTL (to restore it if the revoke does not commit).
    pub fn remove(&self, id: i64) -> Option<i64> {
        self.inner.lock().leases.remove(&id).map(|e| e.ttl)
    }

    /// Keys attached to `id`, in key order.
    pub fn keys_of(&self, id: i64) -> Vec<Bytes> {
        self.inner
            .lock()
            .keys
            .get(&id)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Refreshes a lease; returns its TTL, or 0 when it does not exist (etcd's answer).
    pub fn keep_alive(&self, id: i64) -> i64 {
        let mut inner = self.inner.lock();
        match inner.leases.get_mut(&id) {
            Some(e) => {
                e.expiry = expiry(e.ttl);
                e.ttl
            }
            None => 0,
        }
    }

    /// Remaining time, TTL and keys of a lease.
    pub fn info(&self, id: i64) -> Option<LeaseInfo> {
        let inner = self.inner.lock();
        let e = inner.leases.get(&id)?;
        Some(LeaseInfo {
            remaining: e.expiry.saturating_duration_since(Instant::now()).as_secs() as i64,
            granted: e.ttl,
            keys: inner
                .keys
                .get(&id)
                .map(|k| k.iter().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// Granted lease ids.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.inner.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases past their expiry and not being revoked yet; marks them as being revoked.
    pub fn take_expired(&self, now: Instant) -> Vec<i64> {
        let mut inner = self.inner.lock();
        let mut out = Vec::new();
        for (id, e) in inner.leases.iter_mut() {
            if !e.revoking && e.expiry <= now {
                e.revoking = true;
                out.push(*id);
            }
        }
        out
    }

    /// Lets the expiry loop try a lease again (its revoke failed).
    pub fn retry_expiry(&self, id: i64) {
        if let Some(e) = self.inner.lock().leases.get_mut(&id) {
            e.revoking = false;
        }
    }

    /// Updates key attachments after `changes` committed: a change detaches its key from
    /// the lease of the key's previous version and attaches it to its own lease.
    pub fn apply(&self, changes: &[Change], revoked: impl Iterator<Item = i64>) {
        let mut inner = self.inner.lock();
        // Revoked leases lose their attachments first: keys the batch attached to a
        // lease before revoking it are deleted by the revoke (their tombstones detach
        // them below), and keys attached to a lease granted again after its revoke in
        // the same batch must stay attached.
        for id in revoked {
            inner.keys.remove(&id);
        }
        for c in changes {
            let before = c.prev.as_ref().map_or(0, |v| v.lease);
            if before != 0
                && let Some(set) = inner.keys.get_mut(&before)
            {
                set.remove(&c.key);
                if set.is_empty() {
                    inner.keys.remove(&before);
                }
            }
            if !c.version.is_tombstone() && c.version.lease != 0 {
                inner
                    .keys
                    .entry(c.version.lease)
                    .or_default()
                    .insert(c.key.clone());
            }
        }
    }

    /// Recomputes every attachment from the live keys at revision `at`.
    pub fn rebuild_keys(&self, index: &Index, at: i64) {
        let mut keys: HashMap<i64, BTreeSet<Bytes>> = HashMap::new();
        let all = KeyRange::Span {
            start: Bytes::from_static(&[0]),
            end: None,
        };
        index.scan(&all, at, |k, v| {
            if v.lease != 0 {
                keys.entry(v.lease)
                    .or_default()
                    .insert(Bytes::copy_from_slice(k));
            }
            true
        });
        self.inner.lock().keys = keys;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::index::Version;

    fn change(key: &'static str, rev: i64, lease: i64, tomb: bool) -> Change {
        Change {
            key: Bytes::from_static(key.as_bytes()),
            version: Version {
                mod_revision: rev,
                sub: 0,
                create_revision: if tomb { 0 } else { rev },
                version: if tomb { 0 } else { 1 },
                lease,
                value: None,
            },
            prev: None,
        }
    }

    #[tokio::test]
    async fn attaches_moves_and_detaches_keys() {
        let t = LeaseTable::default();
        let ix = Index::new(0);
        t.insert(7, 10);
        t.insert(8, 10);
        for c in [
            change("a", 2, 7, false),
            change("b", 3, 7, false),
            change("a", 4, 8, false),
            change("b", 5, 0, true),
        ] {
            let (_, prev) = ix.append_from(&c.key, |_| c.version.clone());
            let c = Change { prev, ..c };
            t.apply(std::slice::from_ref(&c), std::iter::empty());
        }
        assert!(t.keys_of(7).is_empty());
        assert_eq!(t.keys_of(8), vec![Bytes::from_static(b"a")]);
        t.rebuild_keys(&ix, 5);
        assert_eq!(t.keys_of(8), vec![Bytes::from_static(b"a")]);
        assert_eq!(t.keep_alive(8), 10);
        assert_eq!(t.keep_alive(9), 0);
        assert_eq!(t.info(8).unwrap().granted, 10);
    }

    #[tokio::test]
    async fn a_lease_revoked_and_granted_again_in_one_batch_keeps_its_new_keys() {
        let t = LeaseTable::default();
        let ix = Index::new(0);
        t.insert(7, 10);
        let (_, prev) = ix.append_from(&Bytes::from_static(b"a"), |_| {
            change("a", 2, 7, false).version
        });
        t.apply(
            &[Change {
                prev,
                ..change("a", 2, 7, false)
            }],
            std::iter::empty(),
        );
        // One batch: revoke 7 (deletes a), grant 7 again, put b with lease 7.
        let mut batch = Vec::new();
        for c in [change("a", 3, 0, true), change("b", 4, 7, false)] {
            let (_, prev) = ix.append_from(&c.key, |_| c.version.clone());
            batch.push(Change { prev, ..c });
        }
        t.apply(&batch, [7].into_iter());
        assert_eq!(t.keys_of(7), vec![Bytes::from_static(b"b")]);
    }

    #[tokio::test]
    async fn hands_out_each_expired_lease_once_until_retried() {
        let t = LeaseTable::default();
        t.insert(7, 10);
        t.insert(8, 10);
        let later = Instant::now() + Duration::from_secs(11);
        assert!(t.take_expired(Instant::now()).is_empty());
        let mut expired = t.take_expired(later);
        expired.sort_unstable();
        assert_eq!(expired, vec![7, 8]);
        assert!(t.take_expired(later).is_empty());
        t.retry_expiry(7);
        assert_eq!(t.take_expired(later), vec![7]);
    }
}
