//! KV requests: reads served from the index at the published revision, writes
//! through the writer.

use pgetcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use prost::Message;

use crate::Engine;
use crate::error::{Error, Result};
use crate::exec::{Exec, txn_has_put, txn_is_read_only};
use crate::metrics::EngineMetrics;
use crate::validate;
use crate::writer::{Op, Reply};

impl Engine {
    /// Range: served from the index at the published revision.
    pub async fn range(&self, r: &RangeRequest) -> Result<RangeResponse> {
        validate::check_range(r)?;
        if !r.serializable {
            self.sync().await?;
        }
        EngineMetrics::inc(&self.core.metrics.ranges, 1);
        let st = self.core.state();
        let ex = Exec::new(&st, st.published(), st.compact());
        let mut resp = ex.range(r).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Put through the writer.
    pub async fn put(&self, r: PutRequest) -> Result<PutResponse> {
        validate::check_put(&r)?;
        self.check_corrupt()?;
        self.check_space()?;
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Put(r)).await? {
            Reply::Put(mut resp) => {
                EngineMetrics::inc(&self.core.metrics.puts, 1);
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// DeleteRange through the writer.
    pub async fn delete_range(&self, r: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        validate::check_delete(&r)?;
        self.check_corrupt()?;
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Delete(r)).await? {
            Reply::Delete(mut resp) => {
                EngineMetrics::inc(&self.core.metrics.deletes, 1);
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// Txn: read-only txns are served from the index; others go through the writer.
    pub async fn txn(&self, r: TxnRequest) -> Result<TxnResponse> {
        validate::check_txn(&r, self.core.config.max_txn_ops)?;
        let mut resp = if txn_is_read_only(&r) {
            self.sync().await?;
            let st = self.core.state();
            let mut ex = Exec::new(&st, st.published(), st.compact());
            ex.txn(&r).await?
        } else {
            self.check_corrupt()?;
            if txn_has_put(&r) {
                self.check_space()?;
            }
            self.check_size(r.encoded_len())?;
            match self.submit(Op::Txn(r)).await? {
                Reply::Txn(resp) => resp,
                _ => return Err(Error::Stopped),
            }
        };
        self.count_txn_ops(&resp);
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Counts the operations a txn executed, as etcd counts them: each range, put and
    /// delete (nested txns included), and the txn itself when it ran more than one.
    fn count_txn_ops(&self, resp: &TxnResponse) {
        fn walk(resp: &TxnResponse, n: &mut [u64; 3]) {
            use pgetcd_proto::etcdserverpb::response_op::Response as R;
            for op in &resp.responses {
                match &op.response {
                    Some(R::ResponseRange(_)) => n[0] += 1,
                    Some(R::ResponsePut(_)) => n[1] += 1,
                    Some(R::ResponseDeleteRange(_)) => n[2] += 1,
                    Some(R::ResponseTxn(t)) => walk(t, n),
                    None => {}
                }
            }
        }
        let mut n = [0u64; 3];
        walk(resp, &mut n);
        let m = &self.core.metrics;
        EngineMetrics::inc(&m.ranges, n[0]);
        EngineMetrics::inc(&m.puts, n[1]);
        EngineMetrics::inc(&m.deletes, n[2]);
        if n.iter().sum::<u64>() > 1 {
            EngineMetrics::inc(&m.txns, 1);
        }
    }

    /// Compact through the writer; returns once history at or below the revision is
    /// gone from memory and Postgres (partitions dropped).
    pub async fn compact(&self, r: CompactionRequest) -> Result<CompactionResponse> {
        self.check_corrupt()?;
        self.check_size(r.encoded_len())?;
        match self.submit(Op::Compact(r)).await? {
            Reply::Compact(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }
}
