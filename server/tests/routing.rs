//! Prefix routing (`--route-prefix`): one listener serving two keyspaces on two
//! separate Postgres clusters. Each request lands in the keyspace of its keys with that
//! keyspace's revisions; requests, txns and watches spanning both are refused whole;
//! leases work across both; a compaction through the listener reaches both; and with
//! the routed keyspace's Postgres stopped, the main keyspace goes on serving through
//! the same listener, watches and keepalives included.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_localpg::{LocalPostgres, free_port};
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, compare, kv_client::KvClient, lease_client::LeaseClient, request_op,
};
use pgetcd_testkit::keepalive::{KeepAlives, keep_alive};
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{TestServer, channel, route_to_new_keyspace, test_config, throwaway_options};

async fn kv(url: &str) -> KvClient<tonic::transport::Channel> {
    KvClient::new(channel(url).await)
}

async fn put(url: &str, key: &str) -> Result<i64, tonic::Status> {
    put_leased(url, key, 0).await
}

async fn put_leased(url: &str, key: &str, lease: i64) -> Result<i64, tonic::Status> {
    let r = kv(url)
        .await
        .put(PutRequest {
            key: Bytes::from(key.to_owned()),
            value: Bytes::from_static(b"v"),
            lease,
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().header.unwrap().revision)
}

async fn range(
    url: &str,
    key: &str,
    end: &str,
    revision: i64,
) -> Result<(i64, i64), tonic::Status> {
    let r = kv(url)
        .await
        .range(RangeRequest {
            key: Bytes::from(key.to_owned()),
            range_end: Bytes::from(end.to_owned()),
            revision,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((r.count, r.header.unwrap().revision))
}

fn spans_both(e: &tonic::Status, main: &str, events: &str) {
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(main) && e.message().contains(events),
        "the error names both keyspaces: {e:?}"
    );
}

/// A server whose main listener routes `/registry/events/` to a keyspace on a
/// Postgres cluster of its own; returns it, that cluster (and how to start it again),
/// and the two keyspaces' names.
async fn routed_server(
    dir: &std::path::Path,
) -> (
    TestServer,
    LocalPostgres,
    pgetcd_localpg::Options,
    String,
    String,
) {
    let options = throwaway_options(dir, free_port().unwrap(), Vec::new());
    let second = LocalPostgres::start(options.clone()).unwrap();
    let mut config = test_config();
    let main = config.storage.keyspace.clone();
    let events = route_to_new_keyspace(
        &mut config,
        "/registry/events/",
        Some(&second.tcp_url("postgres")),
    );
    let server = TestServer::start(config).await;
    (server, second, options, main, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prefix_is_served_by_its_keyspace_and_spanning_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut second, _, main, events) = routed_server(dir.path()).await;
    let url = server.url();
    let events_url = server.running.others[0].client_url();

    // Each keyspace's own revisions, through one listener.
    assert_eq!(put(&url, "/registry/pods/a").await.unwrap(), 2);
    assert_eq!(put(&url, "/registry/pods/b").await.unwrap(), 3);
    assert_eq!(put(&url, "/registry/events/e1").await.unwrap(), 2);
    assert_eq!(
        range(&events_url, "/registry/events/", "/registry/events0", 0)
            .await
            .unwrap(),
        (1, 2)
    );
    assert_eq!(
        range(&url, "/registry/pods/", "/registry/pods0", 0)
            .await
            .unwrap(),
        (2, 3)
    );
    assert_eq!(
        range(&url, "/registry/events/", "/registry/events0", 0)
            .await
            .unwrap(),
        (1, 2)
    );

    // Spanning reads, deletes and txns are refused, and nothing is applied.
    spans_both(
        &range(&url, "/registry/", "/registry0", 0)
            .await
            .unwrap_err(),
        &main,
        &events,
    );
    spans_both(
        &range(&url, "\0", "\0", 0).await.unwrap_err(),
        &main,
        &events,
    );
    let del = kv(&url)
        .await
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"/registry/"),
            range_end: Bytes::from_static(b"/registry0"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    spans_both(&del, &main, &events);
    let put_op = |key: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: Bytes::from(key.to_owned()),
            value: Bytes::from_static(b"t"),
            ..Default::default()
        })),
    };
    let absent = |key: &str| Compare {
        key: Bytes::from(key.to_owned()),
        target: compare::CompareTarget::Version as i32,
        result: compare::CompareResult::Equal as i32,
        target_union: Some(compare::TargetUnion::Version(0)),
        ..Default::default()
    };
    // The spanning part may sit in a nested txn of the failure branch.
    let nested = TxnRequest {
        compare: vec![absent("/registry/pods/c")],
        success: vec![put_op("/registry/pods/c")],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                success: vec![put_op("/registry/events/c")],
                ..Default::default()
            })),
        }],
    };
    spans_both(
        &kv(&url).await.txn(nested).await.unwrap_err(),
        &main,
        &events,
    );
    assert_eq!(
        range(&url, "/registry/pods/", "/registry/pods0", 0)
            .await
            .unwrap(),
        (2, 3),
        "nothing of the refused txn applied"
    );
    // A txn within the routed keyspace works as there.
    let within = TxnRequest {
        compare: vec![absent("/registry/events/c")],
        success: vec![put_op("/registry/events/c")],
        ..Default::default()
    };
    let r = kv(&url).await.txn(within).await.unwrap().into_inner();
    assert!(r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);

    // One watch stream with a watcher in each keyspace.
    let w = TestWatch::open(&url).await;
    let pods = w
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/pods/"),
            range_end: Bytes::from_static(b"/registry/pods0"),
            ..Default::default()
        })
        .await;
    let evs = w
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/events/"),
            range_end: Bytes::from_static(b"/registry/events0"),
            ..Default::default()
        })
        .await;
    assert_eq!((pods.watch_id, evs.watch_id), (0, 1));
    assert_eq!(pods.header.unwrap().revision, 3);
    assert_eq!(evs.header.unwrap().revision, 3);
    // A duplicate id across keyspaces, and a spanning watch, are refused.
    let dup = w
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/pods/x"),
            watch_id: 1,
            ..Default::default()
        })
        .await;
    assert!(dup.canceled && dup.watch_id == -1, "{dup:?}");
    assert_eq!(
        dup.cancel_reason,
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
    let spanning = w
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/"),
            range_end: Bytes::from_static(b"/registry0"),
            ..Default::default()
        })
        .await;
    assert!(spanning.canceled && spanning.watch_id == -1, "{spanning:?}");
    assert!(
        spanning.cancel_reason.contains(&main) && spanning.cancel_reason.contains(&events),
        "{spanning:?}"
    );
    assert_eq!(put(&url, "/registry/pods/d").await.unwrap(), 4);
    assert_eq!(put(&url, "/registry/events/d").await.unwrap(), 4);
    assert_eq!(put(&url, "/registry/events/f").await.unwrap(), 5);
    w.settle(Duration::from_millis(300), Duration::from_secs(10))
        .await;
    let seen = |id: i64| -> Vec<i64> {
        w.responses()
            .iter()
            .filter(|r| r.watch_id == id)
            .flat_map(|r| r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision))
            .collect()
    };
    assert_eq!(seen(0), [4]);
    assert_eq!(seen(1), [4, 5]);
    // Progress on a stream spanning keyspaces: one answer per watcher, each with its
    // keyspace's revision, and no broadcast (-1).
    let before = w.responses().len();
    w.send_progress().await;
    w.settle(Duration::from_millis(300), Duration::from_secs(10))
        .await;
    let progress: Vec<(i64, i64)> = w.responses()[before..]
        .iter()
        .map(|r| (r.watch_id, r.header.unwrap().revision))
        .collect();
    let mut progress = progress;
    progress.sort_unstable();
    assert_eq!(progress, [(0, 4), (1, 5)]);
    // A stream whose watchers are all in one keyspace gets etcd's answer.
    let only_events = TestWatch::open(&url).await;
    only_events
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/events/"),
            range_end: Bytes::from_static(b"/registry/events0"),
            ..Default::default()
        })
        .await;
    let p = only_events.progress().await;
    assert_eq!((p.watch_id, p.header.unwrap().revision), (-1, 5));
    // Cancelling one watcher leaves the other.
    assert!(w.cancel(1).await.canceled);
    assert_eq!(put(&url, "/registry/events/g").await.unwrap(), 6);
    assert_eq!(put(&url, "/registry/pods/g").await.unwrap(), 5);
    w.settle(Duration::from_millis(300), Duration::from_secs(10))
        .await;
    assert_eq!(seen(0), [4, 5]);
    assert_eq!(seen(1), [4, 5]);

    // Leases: granted in both keyspaces under one id.
    let mut leases = LeaseClient::new(channel(&url).await);
    let id = leases
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let ids_in = |url: String| async move {
        LeaseClient::new(channel(&url).await)
            .lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner()
            .leases
            .iter()
            .map(|l| l.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids_in(events_url.clone()).await, [id]);
    assert_eq!(ids_in(url.clone()).await, [id]);
    assert!(
        server
            .running
            .node
            .engine()
            .lease_leases()
            .leases
            .iter()
            .any(|l| l.id == id)
    );
    put_leased(&url, "/registry/events/leased", id)
        .await
        .unwrap();
    put_leased(&url, "/registry/pods/leased", id).await.unwrap();
    let ttl = leases
        .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert!(ttl.ttl > 0);
    assert_eq!(
        ttl.keys,
        [
            Bytes::from_static(b"/registry/events/leased"),
            Bytes::from_static(b"/registry/pods/leased")
        ]
    );
    // An id one keyspace holds already is refused, and nothing is left granted.
    let taken = LeaseClient::new(channel(&events_url).await)
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 777 })
        .await
        .unwrap();
    drop(taken);
    let refused = leases
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 777 })
        .await
        .unwrap_err();
    assert_eq!(refused.message(), "etcdserver: lease already exists");
    assert!(
        !server
            .running
            .node
            .engine()
            .lease_leases()
            .leases
            .iter()
            .any(|l| l.id == 777)
    );
    // Revoking deletes the keys of both keyspaces.
    leases
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .unwrap();
    assert_eq!(
        range(&url, "/registry/events/leased", "", 0)
            .await
            .unwrap()
            .0,
        0
    );
    assert_eq!(
        range(&url, "/registry/pods/leased", "", 0).await.unwrap().0,
        0
    );
    let gone = leases
        .lease_revoke(LeaseRevokeRequest { id })
        .await
        .unwrap_err();
    assert_eq!(gone.message(), "etcdserver: requested lease not found");

    server.stop().await;
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_through_the_listener_reaches_the_routed_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut second, _, _, _) = routed_server(dir.path()).await;
    let url = server.url();
    let events_url = server.running.others[0].client_url();
    // Main at 2 while events reach 4; a second later (a sample taken), both move on.
    put(&url, "/registry/pods/a").await.unwrap();
    for i in 0..3 {
        put(&url, &format!("/registry/events/{i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    put(&url, "/registry/pods/b").await.unwrap();
    put(&url, "/registry/events/x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    kv(&url)
        .await
        .compact(CompactionRequest {
            revision: 2,
            physical: false,
        })
        .await
        .unwrap();
    // The events keyspace is compacted to 4, its revision when main was at 2.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match range(&events_url, "/registry/events/", "/registry/events0", 3).await {
            Err(e) => {
                assert_eq!(
                    e.message(),
                    "etcdserver: mvcc: required revision has been compacted"
                );
                break;
            }
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the events keyspace was not compacted"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(
        range(&events_url, "/registry/events/", "/registry/events0", 4)
            .await
            .unwrap()
            .0,
        3,
        "revision 4 is kept"
    );
    server.stop().await;
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_keyspace_serves_through_the_listener_while_the_routed_ones_postgres_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut second, options, _, _) = routed_server(dir.path()).await;
    let url = server.url();
    // Watches that need a leader, as kube-apiserver's.
    let w = TestWatch::open_require_leader(&url).await;
    for prefix in ["/registry/pods/", "/registry/events/"] {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        w.create(WatchCreateRequest {
            key: Bytes::from(prefix.to_owned()),
            range_end: Bytes::from(end),
            ..Default::default()
        })
        .await;
    }
    let id = LeaseClient::new(channel(&url).await)
        .lease_grant(LeaseGrantRequest { ttl: 30, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let log = KeepAlives::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keep_alive(url.clone(), id, log.clone(), stopped));

    second.stop();
    let failed = tokio::time::timeout(Duration::from_secs(30), put(&url, "/registry/events/down"))
        .await
        .expect("the stopped keyspace answers");
    assert!(failed.is_err(), "{failed:?}");
    let mut last = 0;
    for i in 0..30 {
        last = tokio::time::timeout(
            Duration::from_secs(5),
            put(&url, &format!("/registry/pods/{i}")),
        )
        .await
        .expect("the main keyspace answers while the routed one's Postgres is down")
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while w
        .responses()
        .iter()
        .filter(|r| r.watch_id == 0)
        .map(|r| r.events.len())
        .sum::<usize>()
        < 30
    {
        assert!(
            Instant::now() < deadline,
            "the main keyspace's watcher missed events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let revs: Vec<i64> = w
        .responses()
        .iter()
        .filter(|r| r.watch_id == 0)
        .flat_map(|r| r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision))
        .collect();
    assert_eq!(revs.last().copied(), Some(last));
    // The routed keyspace, without a writer, cancels its own watcher only.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.responses().iter().any(|r| r.watch_id == 1 && r.canceled) {
        assert!(
            Instant::now() < deadline,
            "the routed keyspace's watcher was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = w
        .responses()
        .into_iter()
        .find(|r| r.watch_id == 1 && r.canceled)
        .unwrap();
    assert_eq!(cancel.cancel_reason, "etcdserver: no leader");
    assert!(
        w.error.lock().is_none(),
        "the stream goes on: {:?}",
        w.error.lock()
    );
    put(&url, "/registry/pods/after").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.responses().iter().any(|r| {
        r.watch_id == 0
            && r.events
                .iter()
                .any(|e| e.kv.as_ref().unwrap().key == "/registry/pods/after")
    }) {
        assert!(
            Instant::now() < deadline,
            "the main keyspace's watcher stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The lease's keepalives were answered all along (by the main keyspace at least).
    let answered: Vec<i64> = log
        .lock()
        .iter()
        .rev()
        .take(4)
        .map(|(_, r)| r.clone().unwrap_or(0))
        .collect();
    assert!(answered.iter().all(|ttl| *ttl > 0), "{:?}", log.lock());

    // Back, the routed keyspace serves through the listener again.
    second = LocalPostgres::start(options).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match put(&url, "/registry/events/back").await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the routed keyspace did not come back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = stop.send(true);
    keeper.await.unwrap();
    server.stop().await;
    second.stop();
}

/// Two instances of both keyspaces, each routing `/registry/events/` on its main
/// listener: through the follower's routed listener, writes of either keyspace reach
/// that keyspace's writer (forwarded), reads and watches answer from the follower, and
/// leases are granted in both keyspaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_routes_as_the_writer_does() {
    let mut first = test_config();
    let events = route_to_new_keyspace(&mut first, "/registry/events/", None);
    first.member.name = "a".into();
    let writer = TestServer::start(first.clone()).await;
    let mut second = first.clone();
    second.member.name = "b".into();
    second.storage.data_dir = pgetcd_testkit::fresh_dir("data");
    let follower = TestServer::start(second).await;
    assert!(follower.running.node.engine().is_follower());
    assert!(follower.running.others[0].node.engine().is_follower());
    let url = follower.url();
    let w = TestWatch::open(&url).await;
    w.create(WatchCreateRequest {
        key: Bytes::from_static(b"/registry/events/"),
        range_end: Bytes::from_static(b"/registry/events0"),
        ..Default::default()
    })
    .await;
    let rev = put(&url, "/registry/events/e").await.unwrap();
    assert_eq!(rev, 2);
    assert_eq!(put(&url, "/registry/pods/p").await.unwrap(), 2);
    // The events keyspace's own listener on the writer holds it.
    let writer_events = writer.running.others[0].client_url();
    assert_eq!(
        range(&writer_events, "/registry/events/", "/registry/events0", 0)
            .await
            .unwrap()
            .0,
        1
    );
    w.wait_progress(rev).await;
    assert_eq!(w.event_count(), 1);
    let id = LeaseClient::new(channel(&url).await)
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    for ks in [&writer.running.node, &writer.running.others[0].node] {
        assert!(ks.engine().lease_leases().leases.iter().any(|l| l.id == id));
    }
    put_leased(&url, "/registry/events/leased", id)
        .await
        .unwrap();
    spans_both(
        &range(&url, "/registry/", "/registry0", 0)
            .await
            .unwrap_err(),
        &first.storage.keyspace,
        &events,
    );
    drop(w);
    follower.stop().await;
    writer.stop().await;
}
