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

use crate::node::Node;
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

    /// Whether requests that write go to the writer (this instance follows).
    fn forwards(&self) -> bool {
        self.node.engine().is_follower()
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
        if self.forwards() {
            let req = req.into_inner();
            let resp = self
                .node
                .forward(|ch| {
                    let req = req.clone();
                    async move { writer_kv(ch).put(crate::node::to_writer(req)).await }
                })
                .await?
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
        if self.forwards() {
            let req = req.into_inner();
            let resp = self
                .node
                .forward(|ch| {
                    let req = req.clone();
                    async move {
                        writer_kv(ch)
                            .delete_range(crate::node::to_writer(req))
                            .await
                    }
                })
                .await?
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
        if !txn_is_read_only(req.get_ref()) && self.forwards() {
            let req = req.into_inner();
            let resp = self
                .node
                .forward(|ch| {
                    let req = req.clone();
                    async move { writer_kv(ch).txn(crate::node::to_writer(req)).await }
                })
                .await?
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
        if self.forwards() {
            let rev = req.get_ref().revision;
            let req = req.into_inner();
            let resp = self
                .node
                .forward(
                    |ch| async move { writer_kv(ch).compact(crate::node::to_writer(req)).await },
                )
                .await?
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

/// A KV client on the writer's channel.
fn writer_kv(ch: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
    KvClient::new(ch).max_decoding_message_size(usize::MAX)
}
