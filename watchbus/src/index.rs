//! Which watchers watch a key.
//!
//! Exact-key watchers sit in a hash map (O(1) per event). Range watchers sit in a list
//! sorted by start key with a running maximum of end keys; a stabbing query binary
//! searches the last start at or below the key and walks backwards while the running
//! maximum end is above the key. For disjoint ranges that is O(log W) per event; nested
//! ranges cost one step per enclosing range. The sorted list is rebuilt lazily, once per
//! dispatched batch after registrations changed, not once per registration.

use std::collections::HashMap;

use bytes::Bytes;

/// A watcher: (stream id, watch id).
pub type WatcherId = (u64, i64);

/// The keys a watcher watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpan {
    /// One key.
    Key(Bytes),
    /// `[start, end)`, `end == None` unbounded.
    Range {
        /// First key.
        start: Bytes,
        /// End (exclusive).
        end: Option<Bytes>,
    },
}

impl KeySpan {
    /// etcd's reading of a watch's `key`/`range_end` (after etcd's normalisation: an
    /// empty key is "\0", a range end of "\0" is unbounded).
    pub fn from_request(key: &Bytes, range_end: &Bytes) -> Self {
        let key = if key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            key.clone()
        };
        if range_end.is_empty() {
            KeySpan::Key(key)
        } else if range_end.as_ref() == [0] {
            KeySpan::Range {
                start: key,
                end: None,
            }
        } else {
            KeySpan::Range {
                start: key,
                end: Some(range_end.clone()),
            }
        }
    }

    /// Whether the span holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeySpan::Key(k) => k.as_ref() == key,
            KeySpan::Range { start, end } => {
                key >= start.as_ref() && end.as_ref().is_none_or(|e| key < e.as_ref())
            }
        }
    }

    /// Whether no key can be in the span (etcd refuses such watches).
    pub fn is_empty(&self) -> bool {
        matches!(self, KeySpan::Range { start, end: Some(e) } if e.as_ref() <= start.as_ref())
    }
}

/// `None` is +infinity.
fn end_gt(end: &Option<Bytes>, key: &[u8]) -> bool {
    end.as_ref().is_none_or(|e| e.as_ref() > key)
}

fn end_max(a: &Option<Bytes>, b: &Option<Bytes>) -> Option<Bytes> {
    match (a, b) {
        (None, _) | (_, None) => None,
        (Some(x), Some(y)) => Some(if x >= y { x.clone() } else { y.clone() }),
    }
}

#[derive(Debug, Clone)]
struct RangeEntry {
    start: Bytes,
    end: Option<Bytes>,
    id: WatcherId,
}

/// The index.
#[derive(Debug, Default)]
pub struct WatcherIndex {
    exact: HashMap<Bytes, Vec<WatcherId>>,
    ranges: Vec<RangeEntry>,
    max_end: Vec<Option<Bytes>>,
    dirty: bool,
    len: usize,
}

impl WatcherIndex {
    /// Adds a watcher.
    pub fn insert(&mut self, id: WatcherId, span: &KeySpan) {
        match span {
            KeySpan::Key(k) => self.exact.entry(k.clone()).or_default().push(id),
            KeySpan::Range { start, end } => {
                self.ranges.push(RangeEntry {
                    start: start.clone(),
                    end: end.clone(),
                    id,
                });
                self.dirty = true;
            }
        }
        self.len += 1;
    }

    /// Removes a watcher.
    pub fn remove(&mut self, id: WatcherId, span: &KeySpan) {
        match span {
            KeySpan::Key(k) => {
                if let Some(v) = self.exact.get_mut(k) {
                    let before = v.len();
                    v.retain(|w| *w != id);
                    self.len -= before - v.len();
                    if v.is_empty() {
                        self.exact.remove(k);
                    }
                }
            }
            KeySpan::Range { .. } => {
                let before = self.ranges.len();
                self.ranges.retain(|r| r.id != id);
                self.len -= before - self.ranges.len();
                self.dirty = true;
            }
        }
    }

    /// Number of watchers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no watchers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sorts the range list if registrations changed it.
    pub fn prepare(&mut self) {
        if !self.dirty {
            return;
        }
        self.ranges.sort_by(|a, b| a.start.cmp(&b.start));
        self.max_end.clear();
        let mut run: Option<Option<Bytes>> = None;
        for r in &self.ranges {
            let m = match &run {
                None => r.end.clone(),
                Some(prev) => end_max(prev, &r.end),
            };
            self.max_end.push(m.clone());
            run = Some(m);
        }
        self.dirty = false;
    }

    /// Calls `f` for every watcher of `key`. Call [`prepare`](Self::prepare) first.
    pub fn for_each_match(&self, key: &[u8], mut f: impl FnMut(WatcherId)) {
        if let Some(v) = self.exact.get(key) {
            v.iter().for_each(|id| f(*id));
        }
        let upto = self.ranges.partition_point(|r| r.start.as_ref() <= key);
        for i in (0..upto).rev() {
            if !end_gt(&self.max_end[i], key) {
                break;
            }
            if end_gt(&self.ranges[i].end, key) {
                f(self.ranges[i].id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    fn matches(ix: &WatcherIndex, key: &str) -> Vec<WatcherId> {
        let mut v = Vec::new();
        ix.for_each_match(key.as_bytes(), |id| v.push(id));
        v.sort();
        v
    }

    #[test]
    fn finds_exact_nested_and_unbounded_watchers() {
        let mut ix = WatcherIndex::default();
        ix.insert((1, 0), &KeySpan::Key(b("/a/x")));
        ix.insert((1, 1), &KeySpan::from_request(&b("/a/"), &b("/a0")));
        ix.insert((2, 0), &KeySpan::from_request(&b("/"), &b("0")));
        ix.insert((2, 1), &KeySpan::from_request(&b("/b/"), &b("/b0")));
        ix.insert(
            (3, 0),
            &KeySpan::from_request(&b("/z"), &Bytes::from_static(&[0])),
        );
        ix.prepare();
        assert_eq!(matches(&ix, "/a/x"), vec![(1, 0), (1, 1), (2, 0)]);
        assert_eq!(matches(&ix, "/b/y"), vec![(2, 0), (2, 1)]);
        assert_eq!(matches(&ix, "/c"), vec![(2, 0)]);
        assert_eq!(matches(&ix, "/zz"), vec![(2, 0), (3, 0)]);
        assert_eq!(matches(&ix, "a"), vec![(3, 0)]);
        ix.remove((2, 0), &KeySpan::from_request(&b("/"), &b("0")));
        ix.prepare();
        assert_eq!(matches(&ix, "/c"), Vec::<WatcherId>::new());
        assert_eq!(ix.len(), 4);
    }

    #[test]
    fn agrees_with_brute_force() {
        let mut ix = WatcherIndex::default();
        let mut spans = Vec::new();
        let mut seed = 7u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for i in 0..300 {
            let a = format!("k{:03}", rnd(200));
            let span = match rnd(3) {
                0 => KeySpan::Key(b(&a)),
                1 => KeySpan::from_request(&b(&a), &b(&format!("k{:03}", rnd(220)))),
                _ => KeySpan::from_request(&b(&a), &Bytes::from_static(&[0])),
            };
            ix.insert((0, i), &span);
            spans.push(span);
        }
        ix.prepare();
        for k in 0..220 {
            let key = format!("k{k:03}");
            let mut want: Vec<WatcherId> = spans
                .iter()
                .enumerate()
                .filter(|(_, s)| s.contains(key.as_bytes()))
                .map(|(i, _)| (0, i as i64))
                .collect();
            want.sort();
            assert_eq!(matches(&ix, &key), want, "{key}");
        }
    }
}
