//! The watcher registry and the dispatcher task.
//!
//! One dispatcher task owns the registry and the key index. It handles registrations
//! and batches in one loop, so a registration is ordered against batches: the revision
//! it returns (`D`, the last dispatched revision) is exactly where the bus takes over
//! from history for that watcher. Deliveries go to each stream's bounded queue with
//! `try_send`; a full queue turns that watcher *slow* (see the crate docs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;
use pgetcd_proto::mvccpb::Event;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, warn};

use crate::index::{KeySpan, WatcherId, WatcherIndex};
use crate::ring::Ring;
use crate::{Batch, passes_filters};

/// Sizes of the bus.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// Batches the ring holds for a lagging dispatcher.
    pub ring_capacity: usize,
    /// Deliveries a stream's queue holds before its watchers turn slow.
    pub stream_queue: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 4096,
            stream_queue: 1024,
        }
    }
}

/// What a watcher wants from the bus.
#[derive(Debug, Clone)]
pub struct WatcherSpec {
    /// Its id on its stream.
    pub watch_id: i64,
    /// Its keys.
    pub span: KeySpan,
    /// Deliver only events of this revision or later.
    pub start_revision: i64,
    /// Drop PUT events.
    pub no_put: bool,
    /// Drop DELETE events.
    pub no_delete: bool,
}

/// Events for one watcher, in revision order, never splitting a revision: its
/// matches in one committed batch. The batch is shared by every watcher it reaches (no
/// per-watcher copy of the events is made on the dispatcher).
#[derive(Debug)]
pub struct Delivery {
    /// The watcher.
    pub watch_id: i64,
    batch: Arc<Batch>,
    /// Indices of the matching events in the batch; `None` when all of them match.
    picks: Option<Vec<u32>>,
}

impl Delivery {
    /// The events, in order.
    pub fn events(&self) -> DeliveryEvents<'_> {
        DeliveryEvents {
            all: &self.batch.events,
            picks: self.picks.as_deref().map(|p| p.iter()),
            next: 0,
        }
    }

    /// How many events.
    pub fn len(&self) -> usize {
        self.picks
            .as_ref()
            .map_or(self.batch.events.len(), |p| p.len())
    }

    /// Whether there are none (never true for a delivery from the bus).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last event.
    pub fn last(&self) -> Option<&Event> {
        match &self.picks {
            Some(p) => p.last().map(|&i| &self.batch.events[i as usize]),
            None => self.batch.events.last(),
        }
    }
}

/// Iterator over a delivery's events.
pub struct DeliveryEvents<'a> {
    all: &'a [Event],
    picks: Option<std::slice::Iter<'a, u32>>,
    next: usize,
}

impl<'a> Iterator for DeliveryEvents<'a> {
    type Item = &'a Event;

    fn next(&mut self) -> Option<&'a Event> {
        match &mut self.picks {
            Some(p) => p.next().map(|&i| &self.all[i as usize]),
            None => {
                let e = self.all.get(self.next);
                self.next += 1;
                e
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.picks {
            Some(p) => p.len(),
            None => self.all.len().saturating_sub(self.next),
        };
        (n, Some(n))
    }
}

struct StreamShared {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    slow: Mutex<Vec<(i64, i64)>>,
    wake: Notify,
}

enum Cmd {
    Register {
        shared: Arc<StreamShared>,
        spec: WatcherSpec,
        reply: oneshot::Sender<i64>,
    },
    Unregister {
        id: WatcherId,
    },
    DropStream {
        stream: u64,
    },
    ResyncAll,
    Rewind {
        revision: i64,
    },
}

/// The revision a watcher turned slow by [`Hub::rewind`] is given: the store went back
/// below revisions the bus delivered, so what the watcher saw may no longer exist.
pub const REWOUND: i64 = i64::MIN;

/// Figures of the bus for `/metrics`.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Open streams.
    pub streams: AtomicI64,
    /// Watchers registered with the dispatcher (synced).
    pub synced_watchers: AtomicI64,
    /// Watchers the watch service holds (synced or catching up); maintained by the
    /// service through [`WatcherGauge`].
    pub watchers: AtomicI64,
    /// Times a watcher turned slow (queue full or dispatcher lagging).
    pub slow_total: AtomicU64,
    /// Events handed to stream queues.
    pub events_total: AtomicU64,
}

/// Adds a stream's watcher count to [`HubStats::watchers`]; subtracts it when dropped.
pub struct WatcherGauge {
    stats: Arc<HubStats>,
    reported: i64,
}

impl WatcherGauge {
    /// Reports that the stream now holds `n` watchers.
    pub fn set(&mut self, n: usize) {
        let n = n as i64;
        if n != self.reported {
            self.stats
                .watchers
                .fetch_add(n - self.reported, Ordering::Relaxed);
            self.reported = n;
        }
    }
}

impl Drop for WatcherGauge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// The bus: publish batches, open streams. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    ring: Arc<Ring>,
    cmds: mpsc::UnboundedSender<Cmd>,
    dispatched: Arc<AtomicI64>,
    next_stream: Arc<AtomicU64>,
    config: HubConfig,
    stats: Arc<HubStats>,
}

impl Hub {
    /// Starts the dispatcher; `revision` is the last revision already in history (the
    /// bus will carry the ones after it).
    pub fn start(config: HubConfig, revision: i64) -> Hub {
        let ring = Arc::new(Ring::new(config.ring_capacity));
        let (cmds, rx) = mpsc::unbounded_channel();
        let dispatched = Arc::new(AtomicI64::new(revision));
        let stats = Arc::new(HubStats::default());
        let d = Dispatcher {
            stats: stats.clone(),
            ring: ring.clone(),
            cmds: rx,
            dispatched: dispatched.clone(),
            watchers: Watchers::default(),
            touched: Vec::new(),
            index: WatcherIndex::default(),
        };
        tokio::spawn(d.run());
        Hub {
            ring,
            cmds,
            dispatched,
            next_stream: Arc::new(AtomicU64::new(1)),
            config,
            stats,
        }
    }

    /// The bus's figures.
    pub fn stats(&self) -> &HubStats {
        &self.stats
    }

    /// A gauge through which a stream reports its watcher count.
    pub fn watcher_gauge(&self) -> WatcherGauge {
        WatcherGauge {
            stats: self.stats.clone(),
            reported: 0,
        }
    }

    /// Publishes a committed batch (single producer; never waits).
    pub fn publish(&self, batch: Batch) {
        self.ring.publish(Arc::new(batch));
    }

    /// The last revision whose events were handed to stream queues.
    pub fn dispatched(&self) -> i64 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Turns every watcher slow from the revision after the last dispatched one: used
    /// when revisions can no longer be delivered from the bus (they must come from
    /// history, or the watchers are cancelled as compacted).
    pub fn resync_all(&self) {
        let _ = self.cmds.send(Cmd::ResyncAll);
    }

    /// The store went back to `revision`, below revisions the bus delivered (it lost
    /// acknowledged writes): the bus continues from `revision`, and every watcher turns
    /// slow with [`REWOUND`], for its stream to cancel it if it saw a lost revision.
    pub fn rewind(&self, revision: i64) {
        let _ = self.cmds.send(Cmd::Rewind { revision });
    }

    /// Opens a stream: its queue and slow list.
    pub fn stream(&self) -> StreamHandle {
        let (tx, rx) = mpsc::channel(self.config.stream_queue.max(1));
        self.stats.streams.fetch_add(1, Ordering::Relaxed);
        StreamHandle {
            shared: Arc::new(StreamShared {
                id: self.next_stream.fetch_add(1, Ordering::Relaxed),
                tx,
                slow: Mutex::new(Vec::new()),
                wake: Notify::new(),
            }),
            rx,
            hub: self.clone(),
        }
    }
}

/// One watch stream's end of the bus.
pub struct StreamHandle {
    shared: Arc<StreamShared>,
    /// Deliveries for this stream's watchers.
    pub rx: mpsc::Receiver<Delivery>,
    hub: Hub,
}

impl StreamHandle {
    /// Registers a watcher; returns `D`: the bus delivers its events of revisions above
    /// `D`, the caller replays `[start, D]` from history.
    pub async fn register(&self, spec: WatcherSpec) -> Option<i64> {
        let (reply, rx) = oneshot::channel();
        self.hub
            .cmds
            .send(Cmd::Register {
                shared: self.shared.clone(),
                spec,
                reply,
            })
            .ok()?;
        rx.await.ok()
    }

    /// Stops deliveries to a watcher.
    pub fn unregister(&self, watch_id: i64) {
        let _ = self.hub.cmds.send(Cmd::Unregister {
            id: (self.shared.id, watch_id),
        });
    }

    /// Watchers the dispatcher dropped as slow: (watch id, first revision not
    /// delivered).
    pub fn take_slow(&self) -> Vec<(i64, i64)> {
        std::mem::take(&mut *self.shared.slow.lock())
    }

    /// A handle that resolves when a watcher of this stream turns slow (separate from
    /// the stream handle, so a task can wait on it and on `rx` at once).
    pub fn slow_signal(&self) -> SlowSignal {
        SlowSignal(self.shared.clone())
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.hub.stats.streams.fetch_sub(1, Ordering::Relaxed);
        let _ = self.hub.cmds.send(Cmd::DropStream {
            stream: self.shared.id,
        });
    }
}

/// See [`StreamHandle::slow_signal`].
pub struct SlowSignal(Arc<StreamShared>);

impl SlowSignal {
    /// Resolves when a watcher of the stream turns slow.
    pub async fn notified(&self) {
        self.0.wake.notified().await
    }
}

struct Watcher {
    spec: WatcherSpec,
    stream: Arc<StreamShared>,
    /// Indices of the events of the batch being dispatched that match (scratch).
    pending: Vec<u32>,
}

/// Registered watchers by id, with a fast keyed hash: dispatch looks a watcher up once
/// per matching (event, watcher) pair.
type Watchers = HashMap<WatcherId, Watcher, foldhash::fast::RandomState>;

struct Dispatcher {
    ring: Arc<Ring>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    dispatched: Arc<AtomicI64>,
    watchers: Watchers,
    index: WatcherIndex,
    /// Watchers with pending matches in the batch being dispatched (scratch).
    touched: Vec<WatcherId>,
    stats: Arc<HubStats>,
}

impl Dispatcher {
    async fn run(mut self) {
        let mut cursor = self.ring.cursor();
        loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => {
                        self.command(cmd);
                        self.stats
                            .synced_watchers
                            .store(self.watchers.len() as i64, Ordering::Relaxed);
                    }
                    None => return,
                },
                batch = self.ring.next(&mut cursor) => match batch {
                    Ok(batch) => self.dispatch(&batch),
                    Err(lagged) => self.lagged(lagged.skipped),
                },
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Register {
                shared,
                spec,
                reply,
            } => {
                let id = (shared.id, spec.watch_id);
                self.index.insert(id, &spec.span);
                if let Some(old) = self.watchers.insert(
                    id,
                    Watcher {
                        spec,
                        stream: shared,
                        pending: Vec::new(),
                    },
                ) {
                    self.index.remove(id, &old.spec.span);
                    if let Some(w) = self.watchers.get(&id) {
                        self.index.insert(id, &w.spec.span);
                    }
                }
                let _ = reply.send(self.dispatched.load(Ordering::Acquire));
            }
            Cmd::Unregister { id } => {
                self.remove(id);
            }
            Cmd::ResyncAll => self.lagged(0),
            Cmd::Rewind { revision } => {
                warn!(revision, "watch bus rewound: the store went back");
                self.dispatched.store(revision, Ordering::Release);
                let ids: Vec<WatcherId> = self.watchers.keys().copied().collect();
                for id in ids {
                    self.mark_slow(id, REWOUND);
                }
            }
            Cmd::DropStream { stream } => {
                let ids: Vec<WatcherId> = self
                    .watchers
                    .keys()
                    .filter(|(s, _)| *s == stream)
                    .copied()
                    .collect();
                for id in ids {
                    self.remove(id);
                }
            }
        }
    }

    fn remove(&mut self, id: WatcherId) -> Option<Watcher> {
        let w = self.watchers.remove(&id)?;
        self.index.remove(id, &w.spec.span);
        Some(w)
    }

    fn mark_slow(&mut self, id: WatcherId, from_revision: i64) {
        if let Some(w) = self.remove(id) {
            debug!(
                stream = id.0,
                watch_id = id.1,
                from_revision,
                "watcher slow"
            );
            self.stats.slow_total.fetch_add(1, Ordering::Relaxed);
            self.stats
                .synced_watchers
                .store(self.watchers.len() as i64, Ordering::Relaxed);
            w.stream.slow.lock().push((id.1, from_revision));
            w.stream.wake.notify_one();
        }
    }

    fn dispatch(&mut self, batch: &Arc<Batch>) {
        self.index.prepare();
        let watchers = &mut self.watchers;
        let touched = &mut self.touched;
        for (i, ev) in batch.events.iter().enumerate() {
            let Some(kv) = &ev.kv else { continue };
            let rev = kv.mod_revision;
            self.index.for_each_match(&kv.key, |id| {
                if let Some(w) = watchers.get_mut(&id)
                    && rev >= w.spec.start_revision
                    && passes_filters(ev, w.spec.no_put, w.spec.no_delete)
                {
                    if w.pending.is_empty() {
                        touched.push(id);
                    }
                    w.pending.push(i as u32);
                }
            });
        }
        let all = batch.events.len();
        let mut slow = Vec::new();
        for id in std::mem::take(&mut self.touched) {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let first = batch.events[w.pending[0] as usize]
                .kv
                .as_ref()
                .map_or(0, |kv| kv.mod_revision);
            let n = w.pending.len() as u64;
            let picks = if w.pending.len() == all {
                w.pending.clear();
                None
            } else {
                Some(std::mem::take(&mut w.pending))
            };
            match w.stream.tx.try_send(Delivery {
                watch_id: id.1,
                batch: batch.clone(),
                picks,
            }) {
                Ok(()) => {
                    self.stats.events_total.fetch_add(n, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => slow.push((id, first)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.remove(id);
                }
            }
        }
        for (id, first) in slow {
            self.mark_slow(id, first);
        }
        self.dispatched
            .store(batch.last_revision, Ordering::Release);
    }

    fn lagged(&mut self, skipped: u64) {
        let from = self.dispatched.load(Ordering::Acquire) + 1;
        warn!(
            skipped,
            from, "watch dispatcher lagged behind the ring; all watchers catch up from history"
        );
        let ids: Vec<WatcherId> = self.watchers.keys().copied().collect();
        for id in ids {
            self.mark_slow(id, from);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use pgetcd_proto::mvccpb::{KeyValue, event::EventType};

    fn put(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_owned()),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn spec(id: i64, key: &str, start: i64) -> WatcherSpec {
        WatcherSpec {
            watch_id: id,
            span: KeySpan::Key(Bytes::from(key.to_owned())),
            start_revision: start,
            no_put: false,
            no_delete: false,
        }
    }

    #[tokio::test]
    async fn delivers_matching_events_after_the_registration_revision() {
        let hub = Hub::start(HubConfig::default(), 10);
        let mut s = hub.stream();
        assert_eq!(s.register(spec(0, "a", 0)).await, Some(10));
        assert_eq!(s.register(spec(1, "b", 13)).await, Some(10));
        for rev in 11..=13 {
            hub.publish(Batch {
                last_revision: rev,
                events: vec![put("a", rev), put("b", rev), put("c", rev)],
            });
        }
        let mut got: Vec<(i64, i64)> = Vec::new();
        while got.len() < 4 {
            let d = s.rx.recv().await.unwrap();
            for e in d.events() {
                got.push((d.watch_id, e.kv.as_ref().unwrap().mod_revision));
            }
        }
        got.sort();
        assert_eq!(got, vec![(0, 11), (0, 12), (0, 13), (1, 13)]);
        assert_eq!(hub.dispatched(), 13);
    }

    #[tokio::test]
    async fn a_full_queue_marks_the_watcher_slow_and_bounds_memory() {
        let hub = Hub::start(
            HubConfig {
                ring_capacity: 8,
                stream_queue: 2,
            },
            0,
        );
        let s = hub.stream();
        s.register(spec(5, "k", 0)).await.unwrap();
        let mut fast = hub.stream();
        fast.register(spec(6, "k", 0)).await.unwrap();
        for rev in 1..=50 {
            hub.publish(Batch {
                last_revision: rev,
                events: vec![put("k", rev)],
            });
            // The fast stream keeps up; the other never reads.
            let d = fast.rx.recv().await.unwrap();
            assert_eq!(d.last().unwrap().kv.as_ref().unwrap().mod_revision, rev);
        }
        // Two deliveries fit; the third turned the watcher slow from revision 3, and
        // nothing more was queued for it.
        assert_eq!(s.take_slow(), vec![(5, 3)]);
        assert_eq!(s.rx.len(), 2);
        // Registering again resumes deliveries after the current revision.
        let d = s.register(spec(5, "k", 3)).await.unwrap();
        assert_eq!(d, 50);
    }
}
