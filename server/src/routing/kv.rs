//! KV over a routed listener: each request to the one keyspace of its keys.

use std::sync::Arc;

use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse, kv_server::Kv,
};
use tonic::{Request, Response, Status};

use super::{CompactionMap, Routes};

/// etcd's KV service over the keyspaces of a [`Routes`] table.
pub struct RoutedKv {
    routes: Arc<Routes>,
    compaction: Arc<CompactionMap>,
}

impl RoutedKv {
    pub fn new(routes: Arc<Routes>, compaction: Arc<CompactionMap>) -> Self {
        Self { routes, compaction }
    }

    fn kv(&self, i: usize) -> &crate::services::KvService {
        &self.routes.targets()[i].kv
    }
}

#[tonic::async_trait]
impl Kv for RoutedKv {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.get_ref();
        let i = self
            .routes
            .route(&r.key, &r.range_end)
            .map_err(|s| s.status())?;
        self.kv(i).range(req).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let i = self
            .routes
            .route(&req.get_ref().key, &[])
            .map_err(|s| s.status())?;
        self.kv(i).put(req).await
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = req.get_ref();
        let i = self
            .routes
            .route(&r.key, &r.range_end)
            .map_err(|s| s.status())?;
        self.kv(i).delete_range(req).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let i = self
            .routes
            .route_txn(req.get_ref())
            .map_err(|s| s.status())?;
        self.kv(i).txn(req).await
    }

    /// Compacts the listener's own keyspace; the routed ones follow (see
    /// [`CompactionMap`]).
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let rev = req.get_ref().revision;
        // Forwarded by another instance, whose router compacts the other keyspaces.
        let forwarded = crate::node::was_forwarded(req.metadata());
        let resp = self.kv(0).compact(req).await?;
        if !forwarded {
            self.compaction.main_compacted(rev);
        }
        Ok(resp)
    }
}
