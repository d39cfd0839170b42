//! KV service: Range, Put, DeleteRange, Txn, Compact.

use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse, kv_server::Kv,
};
use tonic::{Request, Response, Status};

use crate::status::to_status;

/// etcd's KV service over the engine.
pub struct KvService {
    engine: Engine,
}

impl KvService {
    /// The service for `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        self.engine
            .range(req.get_ref())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.engine
            .put(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.engine
            .delete_range(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.engine
            .txn(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        self.engine
            .compact(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
