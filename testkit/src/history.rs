//! A seeded etcd history for snapshot, restore and migration tests: puts (one value
//! larger than a bbolt page), deletes, two-key txns, a lease with keys attached, and a
//! physical compaction.

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, PutRequest, TxnRequest,
    kv_client::KvClient, lease_client::LeaseClient,
};

use crate::channel;

/// The same operations on every endpoint; the lease id and the compact revision.
pub async fn seed(urls: &[&str]) -> (i64, i64) {
    let mut compact = 0;
    for url in urls {
        let ch = channel(url).await;
        let mut kv = KvClient::new(ch.clone());
        LeaseClient::new(ch)
            .lease_grant(LeaseGrantRequest { ttl: 900, id: 4242 })
            .await
            .expect("seed");
        let mut revs = Vec::new();
        for i in 0..200u32 {
            let key = Bytes::from(format!("/s/{:02}", i % 30));
            let rev = match i % 9 {
                8 => {
                    kv.delete_range(DeleteRangeRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .expect("seed")
                    .into_inner()
                    .header
                    .expect("seed")
                    .revision
                }
                7 => {
                    kv.txn(TxnRequest {
                        success: vec![
                            put_op(&key, &format!("t{i}"), 0),
                            put_op(&Bytes::from(format!("{}x", i)), "y", 0),
                        ],
                        ..Default::default()
                    })
                    .await
                    .expect("seed")
                    .into_inner()
                    .header
                    .expect("seed")
                    .revision
                }
                _ => {
                    kv.put(PutRequest {
                        key,
                        value: Bytes::from(format!("v{i}").repeat(if i == 99 { 2000 } else { 3 })),
                        lease: if i % 5 == 0 { 4242 } else { 0 },
                        ..Default::default()
                    })
                    .await
                    .expect("seed")
                    .into_inner()
                    .header
                    .expect("seed")
                    .revision
                }
            };
            revs.push(rev);
        }
        compact = revs[80];
        kv.compact(CompactionRequest {
            revision: compact,
            physical: true,
        })
        .await
        .expect("seed");
    }
    (4242, compact)
}

pub fn put_op(key: &Bytes, value: &str, lease: i64) -> pgetcd_proto::etcdserverpb::RequestOp {
    use pgetcd_proto::etcdserverpb::request_op::Request;
    pgetcd_proto::etcdserverpb::RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.clone(),
            value: Bytes::from(value.to_owned()),
            lease,
            ..Default::default()
        })),
    }
}

/// A Range of `key` at `revision` must fail as compacted, with etcd's message.
pub async fn assert_compacted(url: &str, key: &'static [u8], revision: i64) {
    let below = KvClient::new(channel(url).await)
        .range(pgetcd_proto::etcdserverpb::RangeRequest {
            key: Bytes::from_static(key),
            revision,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(
        below.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
}
