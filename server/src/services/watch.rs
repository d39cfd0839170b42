//! Watch service: one task per gRPC stream owns that stream's watchers.
//!
//! Per watcher: `Created` is sent first; a start revision below the compact revision is
//! answered with a compacted cancel; otherwise the watcher registers with the bus,
//! which returns `D`, and the revisions `[start, D]` are replayed from the engine's
//! index before the bus's deliveries (revisions above `D`). `next_rev` drops anything
//! already sent, so history and bus never duplicate. A watcher the bus dropped as slow
//! re-registers and replays from the first revision it missed.
//!
//! Progress: a WatchProgressRequest is answered (watch_id -1) only when every watcher
//! of the stream is registered with the bus; the answer carries the bus's dispatched
//! revision `D` after every delivery queued up to `D` was sent, so it is a promise that
//! all events up to `D` were delivered. Periodic progress notifications do the same per
//! watcher that asked for them and got no events in the interval.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_engine::Error;

use crate::node::Node;
use futures::StreamExt;
use pgetcd_proto::etcdserverpb::{
    ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse, watch_request::RequestUnion,
    watch_server::Watch,
};
use pgetcd_proto::mvccpb::Event;
use pgetcd_watchbus::{Delivery, Hub, KeySpan, StreamHandle, WatcherSpec, passes_filters};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::services::OpenWatch;
use crate::status::to_status;

/// etcd's reasons, sent in `cancel_reason`.
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
/// The cancel reason of a create past `--max-watchers-per-stream` (pgetcd's own limit;
/// etcd has none).
pub(crate) fn too_many_watchers(limit: usize) -> String {
    format!("pgetcd: too many watchers on this stream (--max-watchers-per-stream {limit})")
}
pub(crate) const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// Settings of the Watch service.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// Interval of progress notifications for watchers that ask for them.
    pub progress_interval: Duration,
    /// Event responses larger than this are split when the watcher allows fragments.
    pub max_response_bytes: usize,
    /// Watchers one stream may hold (`--max-watchers-per-stream`; 0 = no limit).
    pub max_watchers: usize,
}

/// etcd's Watch service over the bus.
pub struct WatchService {
    node: Node,
    hub: Hub,
    settings: WatchSettings,
    shutdown: watch::Receiver<bool>,
}

impl WatchService {
    /// The service.
    pub fn new(
        node: Node,
        hub: Hub,
        settings: WatchSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            node,
            hub,
            settings,
            shutdown,
        }
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

/// The requests of one watch stream, from its client or from a router (see
/// `crate::routing`).
pub type WatchRequests =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchRequest, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let metadata = req.metadata().clone();
        let rx = self.open_watch(&metadata, Box::pin(req.into_inner()))?;
        Ok(Response::new(Box::pin(rx)))
    }
}

impl super::OpenWatch for WatchService {
    fn open_watch(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        inbound: WatchRequests,
    ) -> Result<ReceiverStream<Result<WatchResponse, Status>>, Status> {
        let require_leader = self.node.admit_stream(metadata)?;
        let (out, rx) = mpsc::channel(16);
        let task = StreamTask {
            node: self.node.clone(),
            bus: self.hub.stream(),
            out,
            watchers: HashMap::new(),
            next_id: 0,
            progress_pending: false,
            settings: self.settings,
            told: Default::default(),
        };
        tokio::spawn(task.run(inbound, self.shutdown.clone(), require_leader));
        Ok(ReceiverStream::new(rx))
    }
}

impl WatchService {
    /// The engine's response header (for responses a router makes itself).
    pub fn header(&self) -> ResponseHeader {
        self.node.engine().header()
    }
}

struct Watcher {
    key: Bytes,
    range_end: Bytes,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// Next revision to send; older events are duplicates.
    next_rev: i64,
    /// Registered with the bus (not waiting to re-register after being slow).
    synced: bool,
    /// Events sent since the last progress tick.
    sent_since_tick: bool,
}

struct StreamTask {
    node: Node,
    bus: StreamHandle,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: HashMap<i64, Watcher>,
    next_id: i64,
    progress_pending: bool,
    settings: WatchSettings,
    /// The newest revision a response of this stream named (its header's).
    told: std::sync::atomic::AtomicI64,
}

/// The stream's client went away.
struct Gone;

impl StreamTask {
    async fn run(
        mut self,
        mut inbound: WatchRequests,
        mut shutdown: watch::Receiver<bool>,
        require_leader: bool,
    ) {
        let node = self.node.clone();
        let leader_lost = async move {
            if require_leader {
                node.leader_lost().await
            } else {
                std::future::pending().await
            }
        };
        tokio::pin!(leader_lost);
        let mut ticker = tokio::time::interval(self.settings.progress_interval);
        ticker.tick().await;
        let slow = self.bus.slow_signal();
        let mut gauge = self.bus.hub().watcher_gauge();
        // The client's end closed: as etcd, the watchers go on until the stream ends
        // (its client cancels it or goes away).
        let mut closed = false;
        loop {
            let step = tokio::select! {
                biased;
                _ = crate::shutdown::stopped(&mut shutdown) => return,
                _ = self.out.closed() => return,
                _ = &mut leader_lost => {
                    let _ = self.out.send(Err(crate::node::no_leader())).await;
                    return;
                }
                msg = inbound.next(), if !closed => match msg {
                    Some(Ok(req)) => self.request(req).await,
                    None => {
                        closed = true;
                        Ok(())
                    }
                    Some(Err(_)) => return,
                },
                Some(d) = self.bus.rx.recv() => self.deliver(d).await,
                _ = slow.notified() => self.resync().await,
                _ = ticker.tick() => self.progress_tick().await,
            };
            if step.is_err() {
                return;
            }
            gauge.set(self.watchers.len());
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut h = self.node.engine().header();
        h.revision = revision;
        Some(h)
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), Gone> {
        if let Some(h) = &resp.header {
            self.told
                .fetch_max(h.revision, std::sync::atomic::Ordering::Relaxed);
        }
        self.out.send(Ok(resp)).await.map_err(|_| Gone)
    }

    async fn request(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.contains_key(&c.watch_id) {
                    // Events committed before the cancel arrived are still delivered,
                    // as etcd (which notifies watchers inside the write) does.
                    self.catch_up_with_commits().await?;
                    self.watchers.remove(&c.watch_id);
                    self.bus.unregister(c.watch_id);
                    let rev = self.node.engine().stats().revision;
                    self.send(WatchResponse {
                        header: self.header(rev),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_pending = true;
                self.answer_progress().await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Gone> {
        let key = if c.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            c.key.clone()
        };
        let span = KeySpan::from_request(&key, &c.range_end);
        let wsrev = self.node.engine().stats().revision;
        let refuse = |reason: &str| WatchResponse {
            header: self.header(wsrev),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_owned(),
            ..Default::default()
        };
        if span.is_empty() {
            return self.send(refuse(EMPTY_RANGE)).await;
        }
        let limit = self.settings.max_watchers;
        if limit > 0 && self.watchers.len() >= limit {
            tracing::debug!(limit, "watch refused: the stream holds too many watchers");
            return self.send(refuse(&too_many_watchers(limit))).await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self.send(refuse(DUPLICATE_ID)).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        let start = if c.start_revision == 0 {
            wsrev + 1
        } else {
            c.start_revision
        };
        self.send(WatchResponse {
            header: self.header(wsrev),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        let no_put = c.filters.contains(&0);
        let no_delete = c.filters.contains(&1);
        self.watchers.insert(
            id,
            Watcher {
                key,
                range_end: c.range_end.clone(),
                prev_kv: c.prev_kv,
                no_put,
                no_delete,
                fragment: c.fragment,
                progress_notify: c.progress_notify,
                next_rev: start,
                synced: false,
                sent_since_tick: false,
            },
        );
        self.sync(id, start, span).await
    }

    /// Registers watcher `id` with the bus from `from` and replays history up to the
    /// bus's revision.
    async fn sync(&mut self, id: i64, from: i64, span: KeySpan) -> Result<(), Gone> {
        let compact = self.node.engine().stats().compact_revision;
        let Some(w) = self.watchers.get(&id) else {
            return Ok(());
        };
        if from < compact {
            return self.cancel_compacted(id, compact).await;
        }
        let spec = WatcherSpec {
            watch_id: id,
            span,
            start_revision: from,
            no_put: w.no_put,
            no_delete: w.no_delete,
        };
        let Some(d) = self.bus.register(spec).await else {
            return Err(Gone);
        };
        if from <= d {
            // Replayed in chunks of revisions: a watcher far behind holds one chunk of
            // events at a time, and each chunk is sent before the next is read.
            let mut replay = self
                .node
                .engine()
                .replay(&w.key, &w.range_end, from, d, w.prev_kv);
            loop {
                match self.node.engine().replay_next(&mut replay).await {
                    Ok(Some(events)) => self.send_events(id, d, events.into_iter()).await?,
                    Ok(None) => break,
                    Err(Error::Compacted) => {
                        self.bus.unregister(id);
                        let compact = self.node.engine().stats().compact_revision;
                        return self.cancel_compacted(id, compact).await;
                    }
                    Err(e) => {
                        self.bus.unregister(id);
                        self.watchers.remove(&id);
                        return self.out.send(Err(to_status(e))).await.map_err(|_| Gone);
                    }
                }
            }
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next_rev = w.next_rev.max(d + 1);
            w.synced = true;
        }
        if self.progress_pending {
            self.answer_progress().await?;
        }
        Ok(())
    }

    async fn cancel_compacted(&mut self, id: i64, compact: i64) -> Result<(), Gone> {
        self.watchers.remove(&id);
        self.send(WatchResponse {
            header: self.header(0),
            watch_id: id,
            canceled: true,
            compact_revision: compact,
            ..Default::default()
        })
        .await
    }

    /// Sends `events` (revision order) to watcher `id` after its filters, dropping what
    /// it already got; splits large responses when the watcher allows fragments.
    async fn send_events<E: OutEvent>(
        &mut self,
        id: i64,
        header_rev: i64,
        events: impl Iterator<Item = E>,
    ) -> Result<(), Gone> {
        let Some(w) = self.watchers.get_mut(&id) else {
            return Ok(());
        };
        let mut out: Vec<Event> = Vec::with_capacity(events.size_hint().0);
        for ev in events {
            let e = ev.event();
            let rev = e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if rev < w.next_rev || !passes_filters(e, w.no_put, w.no_delete) {
                continue;
            }
            out.push(ev.into_event(w.prev_kv));
        }
        let Some(last) = out
            .last()
            .and_then(|e| e.kv.as_ref())
            .map(|kv| kv.mod_revision)
        else {
            return Ok(());
        };
        w.next_rev = last + 1;
        w.sent_since_tick = true;
        let fragment = w.fragment;
        let header = self.header(header_rev.max(last));
        let resp = WatchResponse {
            header,
            watch_id: id,
            events: out,
            ..Default::default()
        };
        if !fragment || resp.encoded_len() <= self.settings.max_response_bytes {
            return self.send(resp).await;
        }
        let mut parts: Vec<Vec<Event>> = vec![Vec::new()];
        let mut size = 0usize;
        for ev in resp.events {
            let len = ev.encoded_len();
            if size + len > self.settings.max_response_bytes && !parts[parts.len() - 1].is_empty() {
                parts.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(p) = parts.last_mut() {
                p.push(ev);
            }
        }
        let n = parts.len();
        for (i, events) in parts.into_iter().enumerate() {
            self.send(WatchResponse {
                header: resp.header,
                watch_id: id,
                events,
                fragment: i + 1 < n,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), Gone> {
        let rev = d
            .last()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |kv| kv.mod_revision);
        self.send_events(d.watch_id, rev, d.events()).await
    }

    async fn resync(&mut self) -> Result<(), Gone> {
        for (id, from) in self.bus.take_slow() {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let from = if from == pgetcd_watchbus::REWOUND {
                // The store went back (it lost acknowledged writes). A client told of a
                // revision it no longer has must start over, as after a compaction:
                // the revisions after the store's are assigned again.
                let now = self.node.engine().revision();
                if self.told.load(std::sync::atomic::Ordering::Relaxed) > now {
                    tracing::warn!(
                        watch_id = id,
                        revision = now,
                        "cancelling a watcher: the store went back"
                    );
                    self.cancel_compacted(id, now).await?;
                    continue;
                }
                w.next_rev
            } else {
                from
            };
            debug!(watch_id = id, from, "watcher catching up from history");
            w.synced = false;
            let from = from.max(w.next_rev);
            let span = KeySpan::from_request(&w.key, &w.range_end);
            self.sync(id, from, span).await?;
        }
        Ok(())
    }

    /// Waits (up to a second) until the bus dispatched every revision committed so far,
    /// then sends what was queued for this stream.
    async fn catch_up_with_commits(&mut self) -> Result<(), Gone> {
        let committed = self.node.engine().stats().revision;
        // Bounded so that a stuck feed cannot hold a cancel forever; generous so that an
        // overloaded machine does not cut off events committed before the cancel.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.bus.hub().dispatched() < committed && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.drain_to_dispatched().await.map(|_| ())
    }

    /// Sends everything queued up to the bus's revision `D`, then returns `D`.
    async fn drain_to_dispatched(&mut self) -> Result<i64, Gone> {
        let d = self.bus.hub().dispatched();
        while let Ok(delivery) = self.bus.rx.try_recv() {
            self.deliver(delivery).await?;
        }
        Ok(d)
    }

    async fn answer_progress(&mut self) -> Result<(), Gone> {
        if self.watchers.values().any(|w| !w.synced) {
            return Ok(());
        }
        let d = self.drain_to_dispatched().await?;
        self.progress_pending = false;
        self.send(WatchResponse {
            header: self.header(d),
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    async fn progress_tick(&mut self) -> Result<(), Gone> {
        if !self.watchers.values().any(|w| w.progress_notify) {
            return Ok(());
        }
        let d = self.drain_to_dispatched().await?;
        let due: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.synced && !w.sent_since_tick)
            .map(|(id, _)| *id)
            .collect();
        for w in self.watchers.values_mut() {
            w.sent_since_tick = false;
        }
        for id in due {
            self.send(WatchResponse {
                header: self.header(d),
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}

/// An event on its way to one watcher: owned (a history replay, moved as is) or shared
/// with other watchers (a bus delivery, copied).
trait OutEvent {
    fn event(&self) -> &Event;
    /// The event as sent: `prev_kv` only when the watcher asked for it.
    fn into_event(self, with_prev_kv: bool) -> Event;
}

impl OutEvent for Event {
    fn event(&self) -> &Event {
        self
    }

    fn into_event(mut self, with_prev_kv: bool) -> Event {
        if !with_prev_kv {
            self.prev_kv = None;
        }
        self
    }
}

impl OutEvent for &Event {
    fn event(&self) -> &Event {
        self
    }

    fn into_event(self, with_prev_kv: bool) -> Event {
        Event {
            r#type: self.r#type,
            kv: self.kv.clone(),
            prev_kv: if with_prev_kv {
                self.prev_kv.clone()
            } else {
                None
            },
        }
    }
}
