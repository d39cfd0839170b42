//! Lease service: Grant and Revoke go through the engine's writer (durable), KeepAlive
//! and TimeToLive answer from memory. On a follower every lease request is forwarded to
//! the writer (a keepalive stream is piped to one of the writer's). A keepalive stream
//! opened on the writer ends with `etcdserver: leader changed` once this instance
//! follows, so that the client's next stream reaches the writer.

use futures::StreamExt;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_client::LeaseClient,
    lease_server::Lease,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::node::{Node, forwarded, to_writer};
use crate::services::OpenKeepAlive;
use crate::status::to_status;

/// etcd's Lease service.
pub struct LeaseService {
    node: Node,
    shutdown: watch::Receiver<bool>,
}

impl LeaseService {
    /// The service; keepalive streams end when `shutdown` turns true.
    pub fn new(node: Node, shutdown: watch::Receiver<bool>) -> Self {
        Self { node, shutdown }
    }

    /// Whether lease requests go to the writer (this instance follows).
    fn forwards(&self) -> bool {
        self.node.engine().is_follower()
    }
}

type KeepAliveStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        if self.forwards() {
            let req = req.into_inner();
            return self
                .node
                .forward(|ch| async move { LeaseClient::new(ch).lease_grant(to_writer(req)).await })
                .await;
        }
        self.node
            .engine()
            .lease_grant(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        if self.forwards() {
            let req = req.into_inner();
            let resp = self
                .node
                .forward(
                    |ch| async move { LeaseClient::new(ch).lease_revoke(to_writer(req)).await },
                )
                .await?
                .into_inner();
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            self.node
                .engine()
                .wait_applied(rev, crate::node::FORWARD_APPLY_TIMEOUT)
                .await
                .map_err(to_status)?;
            return Ok(Response::new(resp));
        }
        self.node
            .engine()
            .lease_revoke(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let metadata = req.metadata().clone();
        let rx = self
            .open_keep_alive(&metadata, Box::pin(req.into_inner()))
            .await?;
        Ok(Response::new(Box::pin(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        if self.forwards() {
            let req = req.into_inner();
            return self
                .node
                .forward(|ch| async move {
                    LeaseClient::new(ch)
                        .lease_time_to_live(to_writer(req))
                        .await
                })
                .await;
        }
        Ok(Response::new(
            self.node.engine().lease_time_to_live(req.get_ref()),
        ))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        if self.forwards() {
            let req = req.into_inner();
            return self
                .node
                .forward(
                    |ch| async move { LeaseClient::new(ch).lease_leases(to_writer(req)).await },
                )
                .await;
        }
        Ok(Response::new(self.node.engine().lease_leases()))
    }
}

/// The requests of one keepalive stream, from its client or from a router (see
/// `crate::routing`).
pub type KeepAliveRequests = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl super::OpenKeepAlive for LeaseService {
    async fn open_keep_alive(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        mut inbound: KeepAliveRequests,
    ) -> Result<ReceiverStream<Result<LeaseKeepAliveResponse, Status>>, Status> {
        let require_leader = self.node.admit_stream(metadata)?;
        let (tx, rx) = mpsc::channel(16);
        let node = self.node.clone();
        let mut shutdown = self.shutdown.clone();
        let watcher = node.clone();
        let leader_lost = async move {
            if require_leader {
                watcher.leader_lost().await
            } else {
                std::future::pending().await
            }
        };
        if self.forwards() {
            // A follower pipes the stream to the writer's (opened once a writer takes it).
            let (up, down) = self
                .node
                .forward(|ch| async move {
                    let (up, up_rx) = mpsc::channel(16);
                    let down = LeaseClient::new(ch)
                        .lease_keep_alive(to_writer(ReceiverStream::new(up_rx)))
                        .await?;
                    Ok((up, down))
                })
                .await?;
            let mut down = down.into_inner();
            tokio::spawn(async move {
                tokio::pin!(leader_lost);
                loop {
                    tokio::select! {
                        _ = &mut leader_lost => {
                            let _ = tx.send(Err(crate::node::no_leader())).await;
                            return;
                        }
                        m = inbound.next() => match m {
                            Some(Ok(r)) => if up.send(r).await.is_err() { return },
                            _ => return,
                        },
                        r = down.message() => match r {
                            Ok(Some(resp)) => if tx.send(Ok(resp)).await.is_err() { return },
                            Ok(None) => return,
                            Err(status) => { let _ = tx.send(Err(forwarded(status))).await; return }
                        },
                        _ = crate::shutdown::stopped(&mut shutdown) => return,
                    }
                }
            });
            return Ok(ReceiverStream::new(rx));
        }
        tokio::spawn(async move {
            tokio::pin!(leader_lost);
            loop {
                let msg = tokio::select! {
                    _ = &mut leader_lost => {
                        let _ = tx.send(Err(crate::node::no_leader())).await;
                        return;
                    }
                    m = inbound.next() => m,
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                };
                match msg {
                    Some(Ok(r)) => {
                        let engine = node.engine();
                        if engine.is_follower() {
                            // This instance stopped writing since the stream opened: its
                            // lease table no longer decides expiry. The client opens a
                            // new stream, which goes to the writer.
                            let leader_changed = to_status(pgetcd_engine::Error::LeaderChanged);
                            let _ = tx.send(Err(leader_changed)).await;
                            return;
                        }
                        let resp = engine.lease_keep_alive(r.id);
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}
