//! Lease service: Grant and Revoke go through the engine's writer (durable), KeepAlive
//! and TimeToLive answer from memory.

use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_server::Lease,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::status::to_status;

/// etcd's Lease service.
pub struct LeaseService {
    engine: Engine,
    shutdown: watch::Receiver<bool>,
}

impl LeaseService {
    /// The service; keepalive streams end when `shutdown` turns true.
    pub fn new(engine: Engine, shutdown: watch::Receiver<bool>) -> Self {
        Self { engine, shutdown }
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
        self.engine
            .lease_grant(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        self.engine
            .lease_revoke(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let engine = self.engine.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = crate::shutdown::stopped(&mut shutdown) => return,
                };
                match msg {
                    Ok(Some(r)) => {
                        if tx.send(Ok(engine.lease_keep_alive(r.id))).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(self.engine.lease_time_to_live(req.get_ref())))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.engine.lease_leases()))
    }
}
