//! Leases through a real gRPC client: the same lease scenario on real etcd and pgetcd
//! gives the same answers (remaining TTLs aside), expiry deletes every attached key in
//! one revision with a DELETE event each, and leases survive a restart with their full
//! TTL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader, TxnRequest,
    WatchCreateRequest, lease_client::LeaseClient, request_op::Request,
};
use pgetcd_proto::mvccpb::event::EventType;
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, RealEtcd, TestServer, channel};
use tonic::transport::Channel;

fn put(k: &str, lease: i64) -> PutRequest {
    PutRequest {
        key: Bytes::from(k.to_owned()),
        value: Bytes::from_static(b"v"),
        lease,
        ..Default::default()
    }
}

fn all() -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(&[0]),
        range_end: Bytes::from_static(&[0]),
        ..Default::default()
    }
}

/// Every key of the scenario (a to e), and no other: through a routed listener, a range
/// of every key would span keyspaces.
fn scenario_keys() -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(b"a"),
        range_end: Bytes::from_static(b"z"),
        ..Default::default()
    }
}

fn clear(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

/// Runs the scenario on one endpoint and returns a transcript of every answer.
async fn scenario(url: &str) -> Vec<String> {
    let mut c = Clients::connect(url).await;
    let mut l = LeaseClient::new(channel(url).await);
    let mut out = Vec::new();
    macro_rules! rec {
        ($e:expr) => {
            match $e {
                Ok(r) => {
                    let mut r = r.into_inner();
                    clear(&mut r.header);
                    out.push(format!("{r:?}"));
                }
                Err(s) => out.push(format!("error {:?} {}", s.code(), s.message())),
            }
        };
    }
    let grant = |id, ttl| LeaseGrantRequest { id, ttl };
    rec!(l.lease_grant(grant(1000, 60)).await);
    rec!(l.lease_grant(grant(1000, 60)).await);
    rec!(l.lease_grant(grant(1001, 1)).await);
    rec!(l.lease_grant(grant(1002, 9_000_000_001)).await);
    for p in [
        put("a", 1000),
        put("b", 1000),
        put("c", 1001),
        put("a", 0),
        put("c", 1000),
    ] {
        rec!(c.kv.put(p).await);
    }
    rec!(c.kv.put(put("d", 9999)).await);
    rec!(
        c.kv.txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestPut(put("e", 9999))),
            }],
            ..Default::default()
        })
        .await
    );
    let mut keep = put("b", 0);
    keep.ignore_lease = true;
    keep.value = Bytes::from_static(b"kept lease");
    rec!(c.kv.put(keep).await);
    match l
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: 1000,
            keys: true,
        })
        .await
    {
        Ok(r) => {
            let mut r = r.into_inner();
            clear(&mut r.header);
            assert!(r.ttl > 50 && r.ttl <= 60, "remaining {}", r.ttl);
            r.ttl = 0;
            // etcd lists a lease's keys in map order.
            r.keys.sort();
            out.push(format!("{r:?}"));
        }
        Err(s) => out.push(format!("error {s:?}")),
    }
    rec!(
        l.lease_time_to_live(LeaseTimeToLiveRequest {
            id: 4242,
            keys: true
        })
        .await
    );
    let mut ka = l
        .lease_keep_alive(futures_stream(vec![1000, 4242]))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let mut r = ka.message().await.unwrap().unwrap();
        clear(&mut r.header);
        out.push(format!("{r:?}"));
    }
    // etcd lists leases in map order: compare them sorted.
    let leases = |mut r: pgetcd_proto::etcdserverpb::LeaseLeasesResponse| {
        clear(&mut r.header);
        r.leases.sort_by_key(|l| l.id);
        format!("{r:?}")
    };
    out.push(leases(
        l.lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner(),
    ));
    rec!(l.lease_revoke(LeaseRevokeRequest { id: 1000 }).await);
    rec!(c.kv.range(scenario_keys()).await);
    rec!(l.lease_revoke(LeaseRevokeRequest { id: 1000 }).await);
    rec!(l.lease_revoke(LeaseRevokeRequest { id: 1001 }).await);
    rec!(c.kv.range(scenario_keys()).await);
    out.push(leases(
        l.lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner(),
    ));
    out
}

fn futures_stream(ids: Vec<i64>) -> impl tokio_stream::Stream<Item = LeaseKeepAliveRequest> {
    tokio_stream::iter(ids.into_iter().map(|id| LeaseKeepAliveRequest { id }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_scenario_identical_to_etcd() {
    let etcd = RealEtcd::start().await;
    let ours = TestServer::start_default().await;
    let want = scenario(&etcd.url).await;
    let got = scenario(&ours.url()).await;
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "step {i}: left = pgetcd, right = etcd");
    }
    assert_eq!(got.len(), want.len());
    ours.stop().await;
}

/// The same scenario through a listener that routes a prefix to another keyspace: its
/// leases live in both keyspaces, and answer as etcd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_scenario_identical_to_etcd_through_a_routed_listener() {
    let etcd = RealEtcd::start().await;
    let mut config = pgetcd_testkit::test_config();
    pgetcd_testkit::route_to_new_keyspace(&mut config, "zz/", None);
    let ours = TestServer::start(config).await;
    let want = scenario(&etcd.url).await;
    let got = scenario(&ours.url()).await;
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert_eq!(g, w, "step {i}: left = pgetcd, right = etcd");
    }
    assert_eq!(got.len(), want.len());
    ours.stop().await;
}

async fn lease_client(url: &str) -> LeaseClient<Channel> {
    LeaseClient::new(channel(url).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_deletes_every_key_in_one_revision_with_events() {
    let srv = TestServer::start_default().await;
    let mut c = Clients::connect(&srv.url()).await;
    let mut l = lease_client(&srv.url()).await;
    let id = l
        .lease_grant(LeaseGrantRequest { id: 0, ttl: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(id.ttl, 2, "raised to the minimum TTL");
    assert!(id.id > 0);
    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: Bytes::from_static(b"ev/"),
        range_end: Bytes::from_static(b"ev0"),
        prev_kv: true,
        ..Default::default()
    })
    .await;
    for i in 0..50 {
        c.kv.put(put(&format!("ev/{i:02}"), id.id)).await.unwrap();
    }
    c.kv.put(put("ev/kept", 0)).await.unwrap();
    let before = c.revision().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.kv.range(all()).await.unwrap().into_inner();
        if r.count == 1 {
            assert_eq!(r.kvs[0].key, Bytes::from_static(b"ev/kept"));
            assert_eq!(
                r.header.unwrap().revision,
                before + 1,
                "one revision for all keys"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lease did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.wait_progress(before + 1).await;
    let deletes: Vec<_> = w
        .responses()
        .into_iter()
        .flat_map(|r| r.events)
        .filter(|e| e.r#type == EventType::Delete as i32)
        .collect();
    assert_eq!(deletes.len(), 50);
    assert!(
        deletes
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision == before + 1)
    );
    assert!(
        deletes
            .iter()
            .all(|e| e.prev_kv.as_ref().unwrap().lease == id.id)
    );
    let ttl = l
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: id.id,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.ttl, -1);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_restart_with_their_full_ttl() {
    let srv = TestServer::start_default().await;
    let mut c = Clients::connect(&srv.url()).await;
    let mut l = lease_client(&srv.url()).await;
    l.lease_grant(LeaseGrantRequest { id: 77, ttl: 30 })
        .await
        .unwrap();
    c.kv.put(put("held", 77)).await.unwrap();
    let config = srv.stop().await;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let mut l = lease_client(&srv.url()).await;
    let ttl = l
        .lease_time_to_live(LeaseTimeToLiveRequest { id: 77, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 30);
    assert!(ttl.ttl >= 29, "{}", ttl.ttl);
    assert_eq!(ttl.keys, vec![Bytes::from_static(b"held")]);
    l.lease_revoke(LeaseRevokeRequest { id: 77 }).await.unwrap();
    assert_eq!(c.kv.range(all()).await.unwrap().into_inner().count, 0);
    srv.stop().await;
}
