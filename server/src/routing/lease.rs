//! Leases over a routed listener. A lease is granted in every keyspace of the listener
//! under one id (the main keyspace picks it), so a key of any keyspace can be attached
//! to it, and each keyspace expires it and its own keys. Revoke, KeepAlive, TimeToLive
//! and Leases act on every keyspace and merge the answers:
//!
//! - Grant fails when any keyspace refuses it; the grants that were made are revoked.
//! - Revoke succeeds when some keyspace had the lease; a keyspace that fails (its
//!   Postgres down) fails the request, with the other keyspaces' revocations made.
//! - KeepAlive answers with the longest TTL any keyspace gave. A keyspace whose stream
//!   fails is left out, and its stream opened again a second later, so that one
//!   keyspace being down does not stop the keepalives of the others.
//! - TimeToLive lists the keys of every keyspace attached to the lease.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_server::Lease,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamMap;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Routes;
use crate::node::was_forwarded;
use crate::services::{KeepAliveRequests, OpenKeepAlive};

/// How long a keyspace whose keepalive stream failed is left out of a client's stream.
pub const KEEPALIVE_RETRY: Duration = Duration::from_secs(1);

/// etcd's Lease service over the keyspaces of a [`Routes`] table.
pub struct RoutedLease {
    routes: Arc<Routes>,
    shutdown: watch::Receiver<bool>,
}

impl RoutedLease {
    pub fn new(routes: Arc<Routes>, shutdown: watch::Receiver<bool>) -> Self {
        Self { routes, shutdown }
    }
}

/// Whether `s` is the engine's `e` as a client gets it (`status::to_status`).
fn is(s: &Status, e: pgetcd_engine::Error) -> bool {
    let want = crate::status::to_status(e);
    s.code() == want.code() && s.message() == want.message()
}

fn lease_exists(s: &Status) -> bool {
    is(s, pgetcd_engine::Error::LeaseExists)
}

fn lease_not_found(s: &Status) -> bool {
    is(s, pgetcd_engine::Error::LeaseNotFound)
}

type KeepAliveResponses =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

impl RoutedLease {
    async fn revoke_everywhere(
        &self,
        id: i64,
    ) -> Vec<Result<Response<LeaseRevokeResponse>, Status>> {
        futures::future::join_all(self.routes.targets().iter().map(|t| {
            t.lease
                .lease_revoke(Request::new(LeaseRevokeRequest { id }))
        }))
        .await
    }
}

#[tonic::async_trait]
impl Lease for RoutedLease {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        if was_forwarded(req.metadata()) {
            return self.routes.targets()[0].lease.lease_grant(req).await;
        }
        let asked = req.into_inner();
        let targets = self.routes.targets();
        // A random id that another keyspace holds already is drawn again.
        for _ in 0..3 {
            let main = targets[0].lease.lease_grant(Request::new(asked)).await?;
            let id = main.get_ref().id;
            let rest = futures::future::join_all(targets[1..].iter().map(|t| {
                t.lease
                    .lease_grant(Request::new(LeaseGrantRequest { id, ttl: asked.ttl }))
            }))
            .await;
            let Some(refused) = rest.iter().find_map(|r| r.as_ref().err()).cloned() else {
                return Ok(main);
            };
            // Undone where it was made (the main keyspace, and every other that granted).
            let _ = targets[0]
                .lease
                .lease_revoke(Request::new(LeaseRevokeRequest { id }))
                .await;
            for (t, r) in targets[1..].iter().zip(&rest) {
                if r.is_ok() {
                    let _ = t
                        .lease
                        .lease_revoke(Request::new(LeaseRevokeRequest { id }))
                        .await;
                }
            }
            if asked.id != 0 || !lease_exists(&refused) {
                return Err(refused);
            }
        }
        Err(Status::unavailable(
            "pgetcd: no lease id free in every keyspace of the listener",
        ))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        if was_forwarded(req.metadata()) {
            return self.routes.targets()[0].lease.lease_revoke(req).await;
        }
        let results = self.revoke_everywhere(req.get_ref().id).await;
        if let Some(failed) = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .find(|s| !lease_not_found(s))
        {
            return Err(failed.clone());
        }
        let mut results = results.into_iter();
        let main = results
            .next()
            .unwrap_or_else(|| Err(Status::internal("no keyspace")));
        match main {
            Ok(r) => Ok(r),
            Err(not_found) => results.find_map(Result::ok).ok_or(not_found),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveResponses>, Status> {
        let metadata = req.metadata().clone();
        if was_forwarded(&metadata) {
            return self.routes.targets()[0].lease.lease_keep_alive(req).await;
        }
        let rx = self
            .open_keep_alive(&metadata, Box::pin(req.into_inner()))
            .await?;
        Ok(Response::new(Box::pin(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        if was_forwarded(req.metadata()) {
            return self.routes.targets()[0].lease.lease_time_to_live(req).await;
        }
        let asked = req.into_inner();
        let results = futures::future::join_all(
            self.routes
                .targets()
                .iter()
                .map(|t| t.lease.lease_time_to_live(Request::new(asked))),
        )
        .await;
        let mut merged: Option<LeaseTimeToLiveResponse> = None;
        let mut first_error = None;
        let mut main = None;
        for (i, r) in results.into_iter().enumerate() {
            let r = match r {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            if i == 0 {
                main = Some(r.clone());
            }
            if r.ttl == -1 {
                continue;
            }
            match &mut merged {
                None => merged = Some(r),
                Some(m) => {
                    m.ttl = m.ttl.max(r.ttl);
                    m.keys.extend(r.keys);
                }
            }
        }
        match (merged, main, first_error) {
            (Some(mut m), _, _) => {
                m.keys.sort();
                m.keys.dedup();
                Ok(Response::new(m))
            }
            (None, _, Some(e)) => Err(e),
            (None, Some(main), None) => Ok(Response::new(main)),
            (None, None, None) => Err(Status::internal("no keyspace")),
        }
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        if was_forwarded(req.metadata()) {
            return self.routes.targets()[0].lease.lease_leases(req).await;
        }
        let results = futures::future::join_all(
            self.routes
                .targets()
                .iter()
                .map(|t| t.lease.lease_leases(Request::new(LeaseLeasesRequest {}))),
        )
        .await;
        let mut merged: Option<LeaseLeasesResponse> = None;
        let mut ids: Vec<i64> = Vec::new();
        for r in results {
            let r = r?.into_inner();
            ids.extend(r.leases.iter().map(|l| l.id));
            merged.get_or_insert(r);
        }
        let mut m = merged.ok_or_else(|| Status::internal("no keyspace"))?;
        ids.sort_unstable();
        ids.dedup();
        m.leases = ids.into_iter().map(|id| LeaseStatus { id }).collect();
        Ok(Response::new(m))
    }
}

/// A keyspace's keepalive stream within a client's.
enum Keyspace {
    /// Not open; opened at the next request from `retry_at` on.
    Closed { retry_at: Option<Instant> },
    /// Open, or being opened (`confirmed` false; a follower reaches its writer first):
    /// requests wait in its queue meanwhile, and answers wait for it only when no
    /// keyspace is confirmed open (the stream's first requests).
    Open {
        tx: mpsc::Sender<Result<LeaseKeepAliveRequest, Status>>,
        confirmed: bool,
    },
}

type Opened = (
    usize,
    Result<ReceiverStream<Result<LeaseKeepAliveResponse, Status>>, Status>,
);

/// A keepalive not answered yet.
struct Pending {
    seq: u64,
    /// Keyspaces still to answer.
    awaited: Vec<usize>,
    /// The best answer so far, and from which keyspace.
    answer: Option<(usize, LeaseKeepAliveResponse)>,
}

struct KeepAlive {
    routes: Arc<Routes>,
    metadata: tonic::metadata::MetadataMap,
    out: mpsc::Sender<Result<LeaseKeepAliveResponse, Status>>,
    keyspaces: Vec<Keyspace>,
    answers: StreamMap<usize, super::Answers<LeaseKeepAliveResponse>>,
    opened_tx: mpsc::Sender<Opened>,
    /// Per keyspace, the requests it was sent and has not answered, in order.
    asked: Vec<VecDeque<u64>>,
    /// Requests not answered yet, in order.
    pending: VecDeque<Pending>,
    next_seq: u64,
    last_error: Option<Status>,
}

/// The client went away, or its stream was ended.
struct Gone;

impl KeepAlive {
    async fn run(
        mut self,
        mut inbound: KeepAliveRequests,
        mut opened: mpsc::Receiver<Opened>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The client's end of the stream closed: what it asked is still answered.
        let mut closed = false;
        loop {
            if closed && self.pending.is_empty() {
                return;
            }
            let readable = !closed
                && self.keyspaces.iter().all(|k| match k {
                    Keyspace::Open { tx, .. } => tx.capacity() > 0,
                    _ => true,
                });
            let step = tokio::select! {
                biased;
                _ = crate::shutdown::stopped(&mut shutdown) => return,
                Some((k, result)) = opened.recv() => match result {
                    Ok(answers) => {
                        self.answers.insert(k, super::until_end(answers));
                        if let Keyspace::Open { confirmed, .. } = &mut self.keyspaces[k] {
                            *confirmed = true;
                        }
                        Ok(())
                    }
                    Err(status) => self.failed(k, status).await,
                },
                Some((k, answer)) = self.answers.next(), if !self.answers.is_empty() => {
                    match super::outcome(&self.routes, k, answer) {
                        Ok(resp) => self.answered(k, resp).await,
                        Err(status) => self.failed(k, status).await,
                    }
                }
                msg = inbound.next(), if readable => match msg {
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

    /// Opens keyspace `k`'s stream in the background; requests queue meanwhile.
    fn open(&mut self, k: usize) {
        let (tx, rx) = mpsc::channel(16);
        self.keyspaces[k] = Keyspace::Open {
            tx,
            confirmed: false,
        };
        let lease = self.routes.targets()[k].lease.clone();
        let metadata = self.metadata.clone();
        let opened = self.opened_tx.clone();
        tokio::spawn(async move {
            let result = lease
                .open_keep_alive(&metadata, Box::pin(ReceiverStream::new(rx)))
                .await;
            let _ = opened.send((k, result)).await;
        });
    }

    async fn request(&mut self, req: LeaseKeepAliveRequest) -> Result<(), Gone> {
        let now = Instant::now();
        for k in 0..self.keyspaces.len() {
            if let Keyspace::Closed { retry_at } = &self.keyspaces[k]
                && retry_at.is_none_or(|at| now >= at)
            {
                self.open(k);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let any_confirmed = self.keyspaces.iter().any(|k| {
            matches!(
                k,
                Keyspace::Open {
                    confirmed: true,
                    ..
                }
            )
        });
        let mut awaited = Vec::new();
        for (k, ks) in self.keyspaces.iter().enumerate() {
            if let Keyspace::Open { tx, confirmed } = ks
                && tx.try_send(Ok(req)).is_ok()
            {
                self.asked[k].push_back(seq);
                if *confirmed || !any_confirmed {
                    awaited.push(k);
                }
            }
        }
        self.pending.push_back(Pending {
            seq,
            awaited,
            answer: None,
        });
        self.flush().await
    }

    async fn answered(&mut self, k: usize, resp: LeaseKeepAliveResponse) -> Result<(), Gone> {
        let Some(seq) = self.asked[k].pop_front() else {
            return Ok(());
        };
        if let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) {
            p.awaited.retain(|a| *a != k);
            let better = match &p.answer {
                None => true,
                Some((_, best)) => resp.ttl > best.ttl || (resp.ttl == best.ttl && k == 0),
            };
            if better {
                p.answer = Some((k, resp));
            }
        }
        self.flush().await
    }

    async fn failed(&mut self, k: usize, status: Status) -> Result<(), Gone> {
        self.answers.remove(&k);
        self.keyspaces[k] = Keyspace::Closed {
            retry_at: Some(Instant::now() + KEEPALIVE_RETRY),
        };
        for seq in self.asked[k].drain(..) {
            if let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) {
                p.awaited.retain(|a| *a != k);
            }
        }
        self.last_error = Some(status);
        self.flush().await
    }

    /// Sends the answers of the oldest requests every keyspace answered.
    async fn flush(&mut self) -> Result<(), Gone> {
        while self.pending.front().is_some_and(|p| p.awaited.is_empty()) {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            match p.answer {
                Some((_, resp)) => self.out.send(Ok(resp)).await.map_err(|_| Gone)?,
                None => {
                    let e = self
                        .last_error
                        .clone()
                        .unwrap_or_else(crate::node::no_leader);
                    let _ = self.out.send(Err(e)).await;
                    return Err(Gone);
                }
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl OpenKeepAlive for RoutedLease {
    async fn open_keep_alive(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        inbound: KeepAliveRequests,
    ) -> Result<ReceiverStream<Result<LeaseKeepAliveResponse, Status>>, Status> {
        let metadata = metadata.clone();
        let (out, rx) = mpsc::channel(16);
        let (opened_tx, opened) = mpsc::channel(4);
        let n = self.routes.targets().len();
        let task = KeepAlive {
            routes: self.routes.clone(),
            metadata,
            out,
            keyspaces: (0..n)
                .map(|_| Keyspace::Closed { retry_at: None })
                .collect(),
            answers: StreamMap::new(),
            opened_tx,
            asked: vec![VecDeque::new(); n],
            pending: VecDeque::new(),
            next_seq: 0,
            last_error: None,
        };
        tokio::spawn(task.run(inbound, opened, self.shutdown.clone()));
        Ok(ReceiverStream::new(rx))
    }
}
