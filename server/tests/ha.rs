//! Several pgetcd instances on one keyspace: one writes, the others follow (serve
//! reads and watches, forward writes), and a follower takes over when the writer goes.
//! Leases survive the take-over, each with its full TTL again from the take-over (as
//! etcd's new leader does, `lessor.Promote`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseTimeToLiveRequest, MemberListRequest,
    PutRequest, RangeRequest, StatusRequest, WatchCreateRequest, lease_client::LeaseClient,
};
use pgetcd_proto::mvccpb::event::EventType;
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, TestServer, channel, test_config};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

async fn instance(name: &str, keyspace: &str) -> TestServer {
    let mut config = test_config();
    config.member.name = name.into();
    config.storage.keyspace = keyspace.into();
    TestServer::start(config).await
}

/// Puts through `c` until one is acknowledged; its revision.
async fn put_retrying(c: &mut Clients, key: &str, value: &str, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let r =
            c.kv.put(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ..Default::default()
            })
            .await;
        match r {
            Ok(resp) => return resp.into_inner().header.unwrap().revision,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "no write acknowledged within {within:?}: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn get(c: &mut Clients, key: &str) -> Option<Bytes> {
    c.kv.range(RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .kvs
    .pop()
    .map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_writer_and_a_take_over() {
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace).await;
    let b = instance("b", &keyspace).await;
    let c = instance("c", &keyspace).await;
    assert!(!a.running.node.engine().is_follower());
    assert!(b.running.node.engine().is_follower());
    assert!(c.running.node.engine().is_follower());
    let ca = Clients::connect(&a.url()).await;
    let mut cb = Clients::connect(&b.url()).await;
    let mut cc = Clients::connect(&c.url()).await;

    // Every instance lists the three, and names a as the leader.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let members = cc
        .cluster
        .member_list(MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members;
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a_id = members[0].id;
    let status = cb
        .maintenance
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.leader, a_id);

    // A watcher on c from the start.
    let watch = TestWatch::open(&c.url()).await;
    watch
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/k/"),
            range_end: Bytes::from_static(b"/k0"),
            start_revision: 1,
            prev_kv: true,
            ..Default::default()
        })
        .await;

    // Writes through a follower are forwarded, and read back on the other one at once.
    let mut acked: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..20 {
        let key = format!("/k/{i}");
        let (client, other) = if i % 2 == 0 {
            (&mut cb, &mut cc)
        } else {
            (&mut cc, &mut cb)
        };
        let rev = put_retrying(client, &key, "v", Duration::from_secs(5)).await;
        assert_eq!(get(other, &key).await.as_deref(), Some(&b"v"[..]), "{key}");
        acked.insert(key, rev);
    }
    let mut lease = LeaseClient::new(channel(&c.url()).await);
    let granted = lease
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    let ttl = LeaseClient::new(channel(&b.url()).await)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: granted.id,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 60);

    // A require-leader watch on c outlives the take-over (as an etcd member's does a
    // quick election).
    let mut required = require_leader_watch(&c.url()).await.unwrap();

    // The writer goes; a follower takes over and writes go on through the other.
    drop(ca);
    let stopped = Instant::now();
    a.stop().await;
    let rev = put_retrying(&mut cb, "/k/after", "v", Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    acked.insert("/k/after".into(), rev);
    println!("take-over: first write acknowledged {took:?} after the writer stopped");
    assert!(took < Duration::from_secs(6), "take-over took {took:?}");
    let writer = if b.running.node.engine().is_follower() {
        &c
    } else {
        &b
    };
    assert!(!writer.running.node.engine().is_follower());

    // Nothing acknowledged is lost, on either instance.
    for (key, rev) in &acked {
        for cl in [&mut cb, &mut cc] {
            let kv = cl
                .kv
                .range(RangeRequest {
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .kvs;
            assert_eq!(kv.len(), 1, "{key}");
            assert_eq!(kv[0].mod_revision, *rev, "{key}");
        }
    }

    // The watcher on c saw every event once, in order.
    watch
        .settle(Duration::from_millis(500), Duration::from_secs(10))
        .await;
    let revs: Vec<i64> = watch
        .responses()
        .iter()
        .flat_map(|r| r.events.iter())
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    let want: Vec<i64> = {
        let mut v: Vec<i64> = acked.values().copied().collect();
        v.sort();
        v
    };
    assert_eq!(revs, want, "events seen by the watcher on c");

    // MemberList drops the stopped instance.
    tokio::time::sleep(pgetcd_server::node::MEMBER_LIVE + Duration::from_secs(1)).await;
    let names: Vec<String> = cb
        .cluster
        .member_list(MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b", "c"]);
    let still_open = tokio::time::timeout(Duration::from_millis(200), required.message()).await;
    assert!(
        still_open.is_err(),
        "the require-leader watch ended: {still_open:?}"
    );
    b.stop().await;
    c.stop().await;
}

/// A lease's TTL in the tests below (seconds).
const TTL: i64 = 5;

use pgetcd_testkit::keepalive::{KeepAlives, keep_alive};

/// Puts `key` attached to `lease` through `c`.
async fn put_with_lease(c: &mut Clients, key: &str, lease: i64) -> i64 {
    c.kv.put(PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from_static(b"v"),
        lease,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .header
    .unwrap()
    .revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_take_over_with_their_full_ttl() {
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace).await;
    let b = instance("b", &keyspace).await;
    let c = instance("c", &keyspace).await;
    assert!(!a.running.node.engine().is_follower());
    let mut cb = Clients::connect(&b.url()).await;
    let mut cc = Clients::connect(&c.url()).await;
    let mut lease_b = LeaseClient::new(channel(&b.url()).await);
    let mut lease_c = LeaseClient::new(channel(&c.url()).await);

    // Watchers on both followers, from before the leases.
    let start = cb.revision().await + 1;
    let mut watches = Vec::new();
    for url in [b.url(), c.url()] {
        let w = TestWatch::open(&url).await;
        w.create(WatchCreateRequest {
            key: Bytes::from_static(b"/lease/"),
            range_end: Bytes::from_static(b"/lease0"),
            start_revision: start,
            prev_kv: true,
            ..Default::default()
        })
        .await;
        watches.push(w);
    }

    // Two leases granted through the followers, two keys on each: `kept` is kept alive
    // through b, `lapsed` is refreshed once through c and then left to expire.
    let kept = lease_b
        .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let lapsed = lease_c
        .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut puts = Vec::new();
    for k in ["/lease/kept/0", "/lease/kept/1"] {
        puts.push(put_with_lease(&mut cb, k, kept).await);
    }
    for k in ["/lease/lapsed/0", "/lease/lapsed/1"] {
        puts.push(put_with_lease(&mut cc, k, lapsed).await);
    }
    let (stop_keep_alive, stop_rx) = watch::channel(false);
    let kept_log: KeepAlives = Arc::default();
    let keeper = tokio::spawn(keep_alive(b.url(), kept, kept_log.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refreshed = Instant::now();
    let (tx, rx) = mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id: lapsed }).await.unwrap();
    let once = lease_c
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(once.ttl, TTL, "refreshing the lapsing lease");
    drop(tx);

    // The writer goes, one second later; a follower takes over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped = Instant::now();
    a.stop().await;
    put_retrying(&mut cb, "/probe", "v", Duration::from_secs(10)).await;
    let took_over = Instant::now();
    println!(
        "take-over: first write acknowledged {:?} after the writer stopped",
        took_over - stopped
    );

    // The lapsed lease's keys go in one revision, seen by both followers' watchers, no
    // earlier than TTL after its refresh and after the take-over (its full TTL again),
    // and not much later.
    let deadline = took_over + Duration::from_secs(TTL as u64 + 5);
    let deleted_at = loop {
        let deleted = watches.iter().any(|w| {
            w.responses()
                .iter()
                .flat_map(|r| r.events.iter())
                .any(|e| e.r#type == EventType::Delete as i32)
        });
        if deleted {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the lapsed lease's keys were never deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ttl = Duration::from_secs(TTL as u64);
    println!(
        "lapsed lease: keys deleted {:?} after its refresh, {:?} after the writer stopped, {:?} after the first write of the new writer",
        deleted_at - refreshed,
        deleted_at - stopped,
        deleted_at - took_over
    );
    assert!(
        deleted_at >= refreshed + ttl,
        "the lapsed lease expired {:?} after its last refresh (TTL {ttl:?})",
        deleted_at - refreshed
    );
    assert!(
        deleted_at >= stopped + ttl,
        "the lapsed lease expired {:?} after the writer stopped: no full TTL from the take-over",
        deleted_at - stopped
    );
    assert!(
        deleted_at <= took_over + ttl + Duration::from_secs(3),
        "the lapsed lease expired {:?} after the take-over (TTL {ttl:?})",
        deleted_at - took_over
    );

    // Some time later, the kept lease and its keys are still there, as every instance
    // sees it; the lapsed one is gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, l) in [("b", &mut lease_b), ("c", &mut lease_c)] {
        let t = l
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: kept,
                keys: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.granted_ttl, TTL, "kept lease through {name}");
        assert!(
            t.ttl > 0 && t.ttl <= TTL,
            "kept lease through {name}: TTL {}",
            t.ttl
        );
        let mut keys = t.keys.clone();
        keys.sort();
        assert_eq!(
            keys,
            [&b"/lease/kept/0"[..], &b"/lease/kept/1"[..]],
            "kept lease's keys through {name}"
        );
        let t = l
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: lapsed,
                keys: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.ttl, -1, "lapsed lease through {name}");
    }
    for cl in [&mut cb, &mut cc] {
        for k in ["/lease/kept/0", "/lease/kept/1"] {
            assert!(get(cl, k).await.is_some(), "{k}");
        }
        for k in ["/lease/lapsed/0", "/lease/lapsed/1"] {
            assert!(get(cl, k).await.is_none(), "{k}");
        }
    }
    let _ = stop_keep_alive.send(true);
    keeper.await.unwrap();

    // The keepalive stream answered the full TTL whenever it answered (never 0: the
    // lease was never unknown), and again once the new writer had taken over.
    let log = kept_log.lock().clone();
    for (at, r) in &log {
        if let Ok(ttl) = r {
            assert_eq!(*ttl, TTL, "keepalive at {:?} after the stop", *at - stopped);
        }
    }
    assert!(
        log.iter().any(|(at, r)| *at > took_over && r.is_ok()),
        "no keepalive answered after the take-over: {log:?}"
    );
    let failures: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "keepalives through b: {} answers, {} stream failures",
        log.len() - failures.len(),
        failures.len()
    );

    // Both watchers saw the four puts, then the lapsed lease's two keys deleted at one
    // revision, and nothing of the kept lease deleted.
    for w in &watches {
        let events: Vec<_> = w
            .responses()
            .iter()
            .flat_map(|r| r.events.clone())
            .collect();
        let got: Vec<(i32, Bytes, i64)> = events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (e.r#type, kv.key.clone(), kv.mod_revision)
            })
            .collect();
        let del = got.last().unwrap().2;
        let put = EventType::Put as i32;
        let delete = EventType::Delete as i32;
        let want: Vec<(i32, Bytes, i64)> = vec![
            (put, Bytes::from_static(b"/lease/kept/0"), puts[0]),
            (put, Bytes::from_static(b"/lease/kept/1"), puts[1]),
            (put, Bytes::from_static(b"/lease/lapsed/0"), puts[2]),
            (put, Bytes::from_static(b"/lease/lapsed/1"), puts[3]),
            (delete, Bytes::from_static(b"/lease/lapsed/0"), del),
            (delete, Bytes::from_static(b"/lease/lapsed/1"), del),
        ];
        assert_eq!(got, want);
        for e in &events[4..] {
            assert_eq!(
                e.prev_kv.as_ref().map(|p| p.lease),
                Some(lapsed),
                "prev_kv of a deleted key"
            );
        }
    }
    b.stop().await;
    c.stop().await;
}

/// With mutual TLS on the client URLs, a follower forwards over TLS to the writer,
/// presenting its own certificate (as etcd members present their peer certificates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_to_a_writer_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pgetcd_testkit::pki::TestPki::generate(dir.path());
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let start = |name: &'static str| {
        let mut config = test_config();
        config.member.name = name.into();
        config.storage.keyspace = keyspace.clone();
        config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
        config.tls.cert_file = Some(pki.member_cert.clone());
        config.tls.key_file = Some(pki.member_key.clone());
        config.tls.trusted_ca_file = Some(pki.ca.clone());
        config.tls.client_cert_auth = true;
        TestServer::start(config)
    };
    let a = start("a").await;
    let b = start("b").await;
    assert!(b.running.node.engine().is_follower());
    // Let b learn who writes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ch =
        pgetcd_testkit::tls_channel(&b.url(), &pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .await
            .unwrap();
    let mut kv = pgetcd_proto::etcdserverpb::kv_client::KvClient::new(ch);
    let rev = kv
        .put(PutRequest {
            key: Bytes::from_static(b"tls-forwarded"),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .expect("a put through the follower is forwarded over TLS")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let got = a.running.node.engine().stats().revision;
    assert!(
        got >= rev,
        "the writer is at {got}, the put was acknowledged at {rev}"
    );
    drop(kv);
    b.stop().await;
    a.stop().await;
}

/// A Watch call with etcd's require-leader metadata (clientv3.WithRequireLeader).
async fn require_leader_watch(
    url: &str,
) -> Result<tonic::Streaming<pgetcd_proto::etcdserverpb::WatchResponse>, tonic::Status> {
    use pgetcd_proto::etcdserverpb::{WatchRequest, watch_client::WatchClient, watch_request};
    let mut client = WatchClient::new(channel(url).await);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: Bytes::from_static(b"/rl"),
                ..Default::default()
            },
        )),
    };
    // Keep the request side open: the stream lives as long as the test holds it.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create).await.unwrap();
    std::mem::forget(tx);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("hasleader", "true".parse().unwrap());
    let mut stream = client.watch(req).await?.into_inner();
    let created = stream.message().await?.unwrap();
    assert!(created.created);
    Ok(stream)
}

/// Require-leader streams, as with etcd: an instance cut off from Postgres (it sees no
/// writer) ends them with `etcdserver: no leader` and refuses new ones, while other
/// watches go on; once it sees the writer again they are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_leader_watches_end_when_the_instance_loses_the_writer() {
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace).await;
    let pg = pgetcd_testkit::postgres();
    let proxy =
        pgetcd_testkit::proxy::TcpProxy::start(([127, 0, 0, 1], pg.options().port).into()).await;
    let mut config = test_config();
    config.member.name = "b".into();
    config.storage.keyspace = keyspace.clone();
    config.storage.postgres_url = Some(format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port()
    ));
    let b = TestServer::start(config).await;
    assert!(b.running.node.engine().is_follower());

    let mut required = require_leader_watch(&b.url()).await.unwrap();
    let plain = TestWatch::open(&b.url()).await;
    plain
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/rl"),
            ..Default::default()
        })
        .await;

    proxy.pause();
    let cut = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), required.message())
        .await
        .expect("the require-leader watch did not end");
    let status = ended.expect_err("it must end with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "etcdserver: no leader");
    assert!(
        cut.elapsed() >= Duration::from_secs(2),
        "ended after {:?}",
        cut.elapsed()
    );
    let refused = require_leader_watch(&b.url()).await.unwrap_err();
    assert_eq!(refused.message(), "etcdserver: no leader");
    assert!(plain.error.lock().is_none(), "the plain watch ended");

    proxy.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match require_leader_watch(&b.url()).await {
            Ok(_) => break,
            Err(s) => assert!(Instant::now() < deadline, "still refused: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.stop().await;
    a.stop().await;
}

async fn status_leader(url: &str) -> u64 {
    pgetcd_proto::etcdserverpb::maintenance_client::MaintenanceClient::new(channel(url).await)
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leader
}

/// MoveLeader hands the writer role to another instance (etcd's errors otherwise), and
/// a writer that stops gracefully gives the role up, so the next writer takes over at
/// its next campaign instead of when the claim lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_the_role_over_and_a_stopping_writer_gives_it_up() {
    use pgetcd_proto::etcdserverpb::{MoveLeaderRequest, maintenance_client::MaintenanceClient};
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace).await;
    let b = instance("b", &keyspace).await;
    let c = instance("c", &keyspace).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = |s: &TestServer| s.running.node.me().member_id;
    let mut ma = MaintenanceClient::new(channel(&a.url()).await);
    let mut mb = MaintenanceClient::new(channel(&b.url()).await);

    // etcd's errors: to a follower, and to an id that is no member.
    let not_leader = mb
        .move_leader(MoveLeaderRequest { target_id: id(&c) })
        .await
        .unwrap_err();
    assert_eq!(not_leader.code(), tonic::Code::Unavailable);
    assert_eq!(not_leader.message(), "etcdserver: not leader");
    let bad = ma
        .move_leader(MoveLeaderRequest { target_id: 12345 })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::FailedPrecondition);
    assert_eq!(bad.message(), "etcdserver: bad leader transferee");
    // To itself: nothing to do.
    ma.move_leader(MoveLeaderRequest { target_id: id(&a) })
        .await
        .unwrap();

    let mut cc = Clients::connect(&c.url()).await;
    let before = put_retrying(&mut cc, "/m/before", "1", Duration::from_secs(5)).await;
    let moved = Instant::now();
    let answer = ma
        .move_leader(MoveLeaderRequest { target_id: id(&b) })
        .await
        .unwrap()
        .into_inner();
    println!("MoveLeader answered after {:?}", moved.elapsed());
    assert!(answer.header.is_none(), "etcd 3.5 answers without a header");
    // It answers once b took the role (raised the epoch); b then loads and serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.running.node.engine().is_follower() || !a.running.node.engine().is_follower() {
        assert!(
            Instant::now() < deadline,
            "b does not write, or a does not follow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = put_retrying(&mut cc, "/m/after", "2", Duration::from_secs(5)).await;
    assert!(after > before);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_leader(&c.url()).await != id(&b) || status_leader(&a.url()).await != id(&b) {
        assert!(Instant::now() < deadline, "Status does not name b");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ca = Clients::connect(&a.url()).await;
    assert_eq!(get(&mut ca, "/m/before").await.as_deref(), Some(&b"1"[..]));
    assert_eq!(get(&mut ca, "/m/after").await.as_deref(), Some(&b"2"[..]));

    // etcdctl finds the writer among the endpoints and moves the role to c.
    let endpoints = format!("--endpoints={},{},{}", a.url(), b.url(), c.url());
    let out = std::process::Command::new(pgetcd_testkit::etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args([&endpoints, "move-leader", &format!("{:x}", id(&c))])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "Leadership transferred from {:x} to {:x}",
            id(&b),
            id(&c)
        )),
        "{stdout}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.running.node.engine().is_follower() {
        assert!(Instant::now() < deadline, "c does not write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // c stops: a or b writes within a tick or two, not after the 2 s claim.
    let mut cb = Clients::connect(&b.url()).await;
    let stopped = Instant::now();
    c.stop().await;
    put_retrying(&mut cb, "/m/after-stop", "3", Duration::from_secs(10)).await;
    let took = stopped.elapsed();
    println!("first write after the writer's graceful stop: {took:?}");
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    b.stop().await;
    a.stop().await;
}

/// Instances started at the same moment on a new keyspace race to create its
/// publication and slots; every one must start (the losers once exited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_started_together_on_a_new_keyspace_all_start() {
    for _ in 0..8 {
        let keyspace = pgetcd_testkit::fresh_keyspace();
        let (a, b, c) = tokio::join!(
            instance("a", &keyspace),
            instance("b", &keyspace),
            instance("c", &keyspace)
        );
        let writers = [&a, &b, &c]
            .iter()
            .filter(|s| !s.running.node.engine().is_follower())
            .count();
        assert_eq!(writers, 1);
        for s in [c, b, a] {
            s.stop().await;
        }
        // Free this keyspace's slots for the other tests of this Postgres. A stopped
        // instance's walsender may still hold its slot for a moment (the drop then
        // fails as "active"): tried again for a while.
        let slots: Vec<String> = ["", "_a", "_b", "_c"]
            .iter()
            .map(|s| format!("pgetcd_{keyspace}{s}"))
            .collect();
        let admin = pgetcd_testkit::admin_client().await;
        for attempt in 0.. {
            match admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = ANY($1) AND NOT active",
                    &[&slots],
                )
                .await
            {
                Ok(_) => break,
                Err(e) if attempt < 50 && e.to_string().contains("is active") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("dropping the test's slots: {e}"),
            }
        }
    }
}

/// MemberRemove forgets an instance that is gone for good and drops its replication
/// slot (which would keep WAL for it forever); a running instance or an unknown id is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_remove_drops_a_departed_instance_and_its_slot() {
    use pgetcd_proto::etcdserverpb::{MemberRemoveRequest, cluster_client::ClusterClient};
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace).await;
    let b = instance("b", &keyspace).await;
    let c = instance("c", &keyspace).await;
    let id = |s: &TestServer| s.running.node.me().member_id;
    let (b_id, c_id) = (id(&b), id(&c));
    let slot = format!("pgetcd_{keyspace}_c");
    let admin = pgetcd_testkit::admin_client().await;
    let slots = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(slots().await, 1);
    c.stop().await;
    let mut cluster = ClusterClient::new(channel(&a.url()).await);

    // Still counted as running until MEMBER_LIVE passed.
    let live = cluster
        .member_remove(MemberRemoveRequest { id: b_id })
        .await
        .unwrap_err();
    assert_eq!(live.code(), tonic::Code::FailedPrecondition, "{live:?}");
    tokio::time::sleep(pgetcd_server::node::MEMBER_LIVE + Duration::from_secs(1)).await;

    // Through etcdctl, as an operator would.
    let out = std::process::Command::new(pgetcd_testkit::etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={}", a.url()),
            "member",
            "remove",
            &format!("{c_id:x}"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("Member {c_id:16x} removed")),
        "{stdout}"
    );
    assert_eq!(slots().await, 0, "the departed instance's slot is dropped");
    let again = cluster
        .member_remove(MemberRemoveRequest { id: c_id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    assert_eq!(again.message(), "etcdserver: member not found");
    let names: Vec<String> = cluster
        .member_list(MemberListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    b.stop().await;
    a.stop().await;
}

/// The writer's connections to Postgres blackholed (nothing passes, nothing closes):
/// another instance takes over within the claim, writes go on through it, the cut-off
/// writer refuses linearizable reads once its claim may have lapsed, and when the
/// network heals it follows and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cut_off_from_postgres_is_replaced_and_follows_when_healed() {
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let pg = pgetcd_testkit::postgres();
    let proxy =
        pgetcd_testkit::proxy::TcpProxy::start(([127, 0, 0, 1], pg.options().port).into()).await;
    let mut config = test_config();
    config.member.name = "a".into();
    config.storage.keyspace = keyspace.clone();
    config.storage.postgres_url = Some(format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port()
    ));
    let a = TestServer::start(config).await;
    let b = instance("b", &keyspace).await;
    assert!(!a.running.node.engine().is_follower());
    let mut ca = Clients::connect(&a.url()).await;
    let mut cb = Clients::connect(&b.url()).await;
    let before = put_retrying(&mut cb, "/cut/before", "1", Duration::from_secs(5)).await;

    proxy.pause();
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(10);
    while b.running.node.engine().is_follower() {
        assert!(Instant::now() < deadline, "b did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = cut.elapsed();
    println!("take-over after the writer was cut off: {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let after = put_retrying(&mut cb, "/cut/after", "2", Duration::from_secs(5)).await;
    assert!(after > before);
    // The cut-off writer no longer answers linearizable reads.
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        ca.kv.range(RangeRequest {
            key: Bytes::from_static(b"/cut/before"),
            ..Default::default()
        }),
    )
    .await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "a cut-off writer answered a linearizable read: {read:?}"
    );

    proxy.resume();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !a.running.node.engine().is_follower() {
        assert!(Instant::now() < deadline, "a did not follow once healed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = (
            get(&mut ca, "/cut/before").await,
            get(&mut ca, "/cut/after").await,
        );
        if got
            == (
                Some(Bytes::from_static(b"1")),
                Some(Bytes::from_static(b"2")),
            )
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a does not serve what b wrote: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await;
    a.stop().await;
}
