//! The etcd requests the workloads are made of, shaped like kube-apiserver's storage
//! layer (k8s.io/apiserver/pkg/storage/etcd3) issues them.

use anyhow::{Result, bail};
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
    compare::{CompareResult, CompareTarget, TargetUnion},
    kv_client::KvClient,
    request_op, response_op,
};
use pgetcd_proto::mvccpb::KeyValue;
use tonic::transport::Channel;

use crate::prefill::prefix_end;
use crate::stats::Kind;

/// Retries of one update before it counts as failed.
const MAX_UPDATE_ATTEMPTS: u64 = 1000;

pub fn put_op(key: Bytes, value: Bytes, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub fn get_op(key: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// mod_revision(key) == rev.
pub fn mod_equals(key: Bytes, rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key,
        target_union: Some(TargetUnion::ModRevision(rev)),
        ..Default::default()
    }
}

/// The first key-value of the failure branch's Get.
fn failure_kv(responses: Vec<pgetcd_proto::etcdserverpb::ResponseOp>) -> Option<KeyValue> {
    responses.into_iter().find_map(|r| match r.response {
        Some(response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
        _ => None,
    })
}

/// Kubernetes create: Txn If mod_revision(key)==0 Then Put Else Get. Returns the
/// revision of the put, or `None` when the key existed.
pub async fn create(
    kv: &mut KvClient<Channel>,
    key: Bytes,
    value: Bytes,
    lease: i64,
) -> Result<Option<i64>> {
    let r = kv
        .txn(TxnRequest {
            compare: vec![mod_equals(key.clone(), 0)],
            success: vec![put_op(key.clone(), value, lease)],
            failure: vec![get_op(key)],
        })
        .await?
        .into_inner();
    Ok(r.succeeded.then(|| r.header.map_or(0, |h| h.revision)))
}

/// Kubernetes GuaranteedUpdate: Get the key, then Txn If mod_revision==seen Then Put
/// Else Get, retried with the revision the failed Txn returned. Returns the put's
/// revision and the number of retries.
pub async fn guaranteed_update(
    kv: &mut KvClient<Channel>,
    key: Bytes,
    value: Bytes,
    serializable: bool,
) -> Result<(i64, u64)> {
    let got = kv
        .range(RangeRequest {
            key: key.clone(),
            serializable,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = got.kvs.first().map_or(0, |kv| kv.mod_revision);
    for retries in 0..MAX_UPDATE_ATTEMPTS {
        let r = kv
            .txn(TxnRequest {
                compare: vec![mod_equals(key.clone(), seen)],
                success: vec![put_op(key.clone(), value.clone(), 0)],
                failure: vec![get_op(key.clone())],
            })
            .await?
            .into_inner();
        if r.succeeded {
            return Ok((r.header.map_or(0, |h| h.revision), retries));
        }
        // The object changed under us: retry from the state the Txn returned.
        seen = failure_kv(r.responses).map_or(0, |kv| kv.mod_revision);
    }
    bail!(
        "update of {} failed {MAX_UPDATE_ATTEMPTS} times",
        String::from_utf8_lossy(&key)
    )
}

/// A kube-apiserver paginated list of `prefix`: the first page at the current
/// revision, later pages from just after the last key at the first page's revision.
/// Each page is recorded in `page`; returns the number of keys.
pub async fn paginated_list(
    kv: &mut KvClient<Channel>,
    prefix: &str,
    limit: i64,
    serializable: bool,
    page: &Kind,
) -> Result<u64> {
    let end = prefix_end(prefix.as_bytes());
    let mut key = Bytes::from(prefix.to_owned());
    let mut revision = 0;
    let mut keys = 0u64;
    loop {
        let t0 = std::time::Instant::now();
        let r = kv
            .range(RangeRequest {
                key: key.clone(),
                range_end: end.clone(),
                limit,
                revision,
                serializable,
                ..Default::default()
            })
            .await;
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(e) => {
                page.error();
                return Err(e.into());
            }
        };
        page.ok_since(t0);
        page.add_items(r.kvs.len() as u64);
        keys += r.kvs.len() as u64;
        if revision == 0 {
            revision = r.header.as_ref().map_or(0, |h| h.revision);
        }
        let Some(last) = r.kvs.last() else {
            return Ok(keys);
        };
        if !r.more {
            return Ok(keys);
        }
        let mut next = last.key.to_vec();
        next.push(0);
        key = Bytes::from(next);
    }
}

/// count_only Range over `prefix`.
pub async fn count(kv: &mut KvClient<Channel>, prefix: &str, serializable: bool) -> Result<i64> {
    Ok(kv
        .range(RangeRequest {
            key: Bytes::from(prefix.to_owned()),
            range_end: prefix_end(prefix.as_bytes()),
            count_only: true,
            serializable,
            ..Default::default()
        })
        .await?
        .into_inner()
        .count)
}
