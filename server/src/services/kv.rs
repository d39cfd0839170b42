//! KV service: Range, Put, DeleteRange, Txn, Compact. On a follower, writes (Put,
//! DeleteRange, a Txn with writes, Compact) are forwarded to the writer, and answered
//! once the follower has applied the revision they made (read-your-writes on every
//! instance).

use pgetcd_engine::txn_is_read_only;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
    kv_client::KvClient, kv_server::Kv,
};
use tonic::{Request, Response, Status};

use crate::node::{Node, forwarded};
use crate::status::to_status;

/// etcd's KV service over the engine.
pub struct KvService {
    node: Node,
}

impl KvService {
    /// The service for `node`'s engine.
    pub fn new(node: Node) -> Self {
        Self { node }
    }

    /// The writer's KV client, when this instance follows.
    async fn writer(&self) -> Result<Option<KvClient<tonic::transport::Channel>>, Status> {
        if !self.node.engine().is_follower() {
            return Ok(None);
        }
        Ok(Some(
            KvClient::new(self.node.writer_channel()?).max_decoding_message_size(usize::MAX),
        ))
    }

    /// Waits until the follower applied the revision of a forwarded answer.
    async fn applied(&self, header: &Option<ResponseHeader>) -> Result<(), Status> {
        let rev = header.as_ref().map_or(0, |h| h.revision);
        self.node
            .engine()
            .wait_applied(rev, crate::node::FORWARD_APPLY_TIMEOUT)
            .await
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        self.node
            .engine()
            .range(req.get_ref())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        if let Some(mut w) = self.writer().await? {
            let resp = w
                .put(req.into_inner())
                .await
                .map_err(forwarded)?
                .into_inner();
            self.applied(&resp.header).await?;
            return Ok(Response::new(resp));
        }
        self.node
            .engine()
            .put(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        if let Some(mut w) = self.writer().await? {
            let resp = w
                .delete_range(req.into_inner())
                .await
                .map_err(forwarded)?
                .into_inner();
            self.applied(&resp.header).await?;
            return Ok(Response::new(resp));
        }
        self.node
            .engine()
            .delete_range(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        if !txn_is_read_only(req.get_ref())
            && let Some(mut w) = self.writer().await?
        {
            let resp = w
                .txn(req.into_inner())
                .await
                .map_err(forwarded)?
                .into_inner();
            self.applied(&resp.header).await?;
            return Ok(Response::new(resp));
        }
        self.node
            .engine()
            .txn(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        if let Some(mut w) = self.writer().await? {
            let rev = req.get_ref().revision;
            let resp = w
                .compact(req.into_inner())
                .await
                .map_err(forwarded)?
                .into_inner();
            // Reads below the compact revision are refused here from now on too.
            self.node
                .engine()
                .follow_compaction(rev)
                .await
                .map_err(to_status)?;
            return Ok(Response::new(resp));
        }
        self.node
            .engine()
            .compact(req.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
