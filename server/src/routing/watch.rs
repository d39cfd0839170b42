//! Watch over a routed listener. A client's stream is served by one watch stream per
//! keyspace it watches (opened on that keyspace's first watcher), each the keyspace's
//! own Watch service; this task sends each request to its keyspace and merges the
//! answers.
//!
//! - Watch ids are this stream's: ids the client leaves to the server are assigned here
//!   as etcd assigns them (the lowest unused from a counter) and given to the keyspace,
//!   so that ids stay unique across keyspaces.
//! - Creates are answered in order: while one is unanswered no further request is read.
//! - A WatchProgressRequest goes to every keyspace with a watcher (or the main one). An
//!   answer (watch id -1) passes as it is while every watcher of the stream is in that
//!   keyspace; otherwise it is sent to each watcher of that keyspace under its id, so
//!   that no watcher hears of another keyspace's revision.
//! - A keyspace whose stream fails (`no leader` when its Postgres is down) ends the
//!   client's stream with that error when all its watchers are in that keyspace, as etcd
//!   would; otherwise only that keyspace's watchers are cancelled, with the error as the
//!   reason, and the others go on.
//! - Reading the client waits while a keyspace's request queue is full, so a client
//!   holds at most one queue per keyspace.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use pgetcd_proto::etcdserverpb::{
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
    watch_request::RequestUnion, watch_server::Watch,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamMap;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::Routes;
use crate::services::{DUPLICATE_ID, OpenWatch, WatchRequests};

/// etcd's Watch service over the keyspaces of a [`Routes`] table.
pub struct RoutedWatch {
    routes: Arc<Routes>,
    shutdown: watch::Receiver<bool>,
}

impl RoutedWatch {
    pub fn new(routes: Arc<Routes>, shutdown: watch::Receiver<bool>) -> Self {
        Self { routes, shutdown }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Watch for RoutedWatch {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let metadata = req.metadata().clone();
        let rx = self.open_watch(&metadata, Box::pin(req.into_inner()))?;
        Ok(Response::new(Box::pin(rx)))
    }
}

impl OpenWatch for RoutedWatch {
    fn open_watch(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        inbound: WatchRequests,
    ) -> Result<ReceiverStream<Result<WatchResponse, Status>>, Status> {
        let metadata = metadata.clone();
        let (out, rx) = mpsc::channel(16);
        let n = self.routes.targets().len();
        let stream = RoutedStream {
            routes: self.routes.clone(),
            metadata,
            out,
            inners: vec![None; n],
            answers: StreamMap::new(),
            owner: HashMap::new(),
            next_id: 0,
            creating: None,
        };
        tokio::spawn(stream.run(inbound, self.shutdown.clone()));
        Ok(ReceiverStream::new(rx))
    }
}

/// The client went away, or its stream was ended.
struct Gone;

/// A watcher of the stream: its keyspace, and whether its created answer was sent.
#[derive(Clone, Copy)]
struct Owned {
    keyspace: usize,
    created: bool,
}

struct RoutedStream {
    routes: Arc<Routes>,
    metadata: tonic::metadata::MetadataMap,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    /// Each keyspace's stream's requests, once opened.
    inners: Vec<Option<mpsc::Sender<Result<WatchRequest, Status>>>>,
    answers: StreamMap<usize, super::Answers<WatchResponse>>,
    owner: HashMap<i64, Owned>,
    next_id: i64,
    /// The create sent and not answered yet: its keyspace and id.
    creating: Option<(usize, i64)>,
}

impl RoutedStream {
    async fn run(mut self, mut inbound: WatchRequests, mut shutdown: watch::Receiver<bool>) {
        // The client's end closed: the watchers go on, as etcd's.
        let mut closed = false;
        loop {
            let readable =
                self.creating.is_none() && self.inners.iter().flatten().all(|tx| tx.capacity() > 0);
            let step = tokio::select! {
                biased;
                _ = crate::shutdown::stopped(&mut shutdown) => return,
                _ = self.out.closed() => return,
                Some((k, answer)) = self.answers.next(), if !self.answers.is_empty() => {
                    match super::outcome(&self.routes, k, answer) {
                        Ok(resp) => self.answered(k, resp).await,
                        Err(status) => self.failed(k, status).await,
                    }
                }
                msg = inbound.next(), if readable && !closed => match msg {
                    Some(Ok(req)) => self.request(req).await,
                    None => {
                        closed = true;
                        Ok(())
                    }
                    Some(Err(_)) => return,
                },
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, resp: Result<WatchResponse, Status>) -> Result<(), Gone> {
        self.out.send(resp).await.map_err(|_| Gone)
    }

    /// Whether every watcher of the stream is in keyspace `k`.
    fn only_in(&self, k: usize) -> bool {
        self.owner.values().all(|o| o.keyspace == k)
    }

    /// Keyspace `k`'s stream, opened on first use.
    fn inner(&mut self, k: usize) -> Result<mpsc::Sender<Result<WatchRequest, Status>>, Status> {
        if let Some(tx) = &self.inners[k] {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::channel(16);
        let answers = self.routes.targets()[k]
            .watch
            .open_watch(&self.metadata, Box::pin(ReceiverStream::new(rx)))?;
        self.answers.insert(k, super::until_end(answers));
        self.inners[k] = Some(tx.clone());
        Ok(tx)
    }

    /// Sends `req` to keyspace `k` (there is room: the client is read only then).
    fn forward(&mut self, k: usize, req: WatchRequest) -> Result<(), Status> {
        let tx = self.inner(k)?;
        if tx.try_send(Ok(req)).is_err() {
            // The keyspace's stream ended meanwhile: its end arrives as an answer.
            warn!(keyspace = %self.routes.targets()[k].name, "watch request to a closed keyspace stream");
        }
        Ok(())
    }

    async fn request(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // An unknown id is answered with nothing, as etcd does.
                let Some(o) = self.owner.get(&c.watch_id).copied() else {
                    return Ok(());
                };
                let req = WatchRequest {
                    request_union: Some(RequestUnion::CancelRequest(c)),
                };
                match self.forward(o.keyspace, req) {
                    Ok(()) => Ok(()),
                    Err(status) => self.failed(o.keyspace, status).await,
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let mut keyspaces: Vec<usize> = self.owner.values().map(|o| o.keyspace).collect();
                keyspaces.sort_unstable();
                keyspaces.dedup();
                if keyspaces.is_empty() {
                    keyspaces.push(0);
                }
                for k in keyspaces {
                    let req = WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                    };
                    if let Err(status) = self.forward(k, req) {
                        self.failed(k, status).await?;
                    }
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A refused create, as etcd answers one.
    fn refusal(&self, k: usize, reason: String) -> WatchResponse {
        WatchResponse {
            header: Some(self.routes.targets()[k].watch.header()),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        }
    }

    async fn create(&mut self, mut c: WatchCreateRequest) -> Result<(), Gone> {
        let k = match self.routes.route(&c.key, &c.range_end) {
            Ok(k) => k,
            Err(spanning) => return self.send(Ok(self.refusal(0, spanning.message()))).await,
        };
        let id = if c.watch_id != 0 {
            if self.owner.contains_key(&c.watch_id) {
                return self.send(Ok(self.refusal(k, DUPLICATE_ID.into()))).await;
            }
            c.watch_id
        } else {
            while self.owner.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        // Id 0 is left to the keyspace, which assigns it: it is this stream's first
        // assigned id, never given to any keyspace before.
        c.watch_id = id;
        let req = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(c)),
        };
        match self.forward(k, req) {
            Ok(()) => {
                self.owner.insert(
                    id,
                    Owned {
                        keyspace: k,
                        created: false,
                    },
                );
                self.creating = Some((k, id));
                Ok(())
            }
            Err(status) if self.only_in(k) => {
                self.send(Err(status)).await?;
                Err(Gone)
            }
            Err(status) => {
                self.send(Ok(self.refusal(k, status.message().to_owned())))
                    .await
            }
        }
    }

    /// An answer of keyspace `k`'s stream.
    async fn answered(&mut self, k: usize, resp: WatchResponse) -> Result<(), Gone> {
        if resp.created {
            if let Some((ck, id)) = self.creating.take() {
                if ck != k || (resp.watch_id != id && !resp.canceled) {
                    warn!(keyspace = %self.routes.targets()[k].name, sent = id, answered = resp.watch_id, "watch create answered out of turn");
                }
                if resp.canceled {
                    self.owner.remove(&id);
                } else if let Some(o) = self.owner.get_mut(&id) {
                    o.created = true;
                }
            }
            return self.send(Ok(resp)).await;
        }
        if resp.canceled {
            if self
                .owner
                .get(&resp.watch_id)
                .is_some_and(|o| o.keyspace == k)
            {
                self.owner.remove(&resp.watch_id);
            }
            return self.send(Ok(resp)).await;
        }
        let progress = resp.watch_id == -1 && resp.events.is_empty() && resp.compact_revision == 0;
        if !progress || self.only_in(k) {
            return self.send(Ok(resp)).await;
        }
        let mut ids: Vec<i64> = self
            .owner
            .iter()
            .filter(|(_, o)| o.keyspace == k && o.created)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            self.send(Ok(WatchResponse {
                header: resp.header,
                watch_id: id,
                ..Default::default()
            }))
            .await?;
        }
        Ok(())
    }

    /// Keyspace `k`'s stream failed with `status` (or could not be opened).
    async fn failed(&mut self, k: usize, status: Status) -> Result<(), Gone> {
        self.inners[k] = None;
        self.answers.remove(&k);
        if self.only_in(k) {
            self.send(Err(status)).await?;
            return Err(Gone);
        }
        if self.creating.is_some_and(|(ck, _)| ck == k) {
            self.creating = None;
            self.send(Ok(self.refusal(k, status.message().to_owned())))
                .await?;
        }
        let mut ids: Vec<(i64, bool)> = self
            .owner
            .iter()
            .filter(|(_, o)| o.keyspace == k)
            .map(|(id, o)| (*id, o.created))
            .collect();
        ids.sort_unstable();
        let header = Some(self.routes.targets()[k].watch.header());
        for (id, created) in ids {
            self.owner.remove(&id);
            if created {
                self.send(Ok(WatchResponse {
                    header,
                    watch_id: id,
                    canceled: true,
                    cancel_reason: status.message().to_owned(),
                    ..Default::default()
                }))
                .await?;
            }
        }
        Ok(())
    }
}
