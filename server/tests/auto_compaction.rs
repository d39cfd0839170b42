//! Auto-compaction (--auto-compaction-mode / --auto-compaction-retention): the
//! periodic schedule run side by side with real etcd given the same flags, and the
//! revision schedule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgetcd_proto::etcdserverpb::RangeRequest;
use pgetcd_server::auto_compaction::{self, AutoCompaction};
use pgetcd_testkit::{Clients, RealEtcd, TestServer, test_config};

/// The compact revision as a client sees it: the lowest revision a Range still serves.
async fn compact_revision(c: &mut Clients, upto: i64) -> i64 {
    let (mut lo, mut hi) = (1, upto);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let r =
            c.kv.range(RangeRequest {
                key: "k".into(),
                revision: mid,
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => hi = mid,
            Err(s) => {
                assert_eq!(
                    s.message(),
                    "etcdserver: mvcc: required revision has been compacted"
                );
                lo = mid + 1;
            }
        }
    }
    lo
}

/// With retention 2s, both compact every 2 s to the revision of about 2 s earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_retention_compacts_like_etcd() {
    let etcd = RealEtcd::start_with(&["--auto-compaction-retention=2s"]).await;
    let mut config = test_config();
    config.compaction.auto_compaction_retention = "2s".into();
    let ours = TestServer::start(config).await;
    let mut clients = [
        Clients::connect(&etcd.url).await,
        Clients::connect(&ours.url()).await,
    ];
    // Put one key every 50 ms on both for 5 s, remembering when each revision was made.
    let mut made: Vec<Vec<(i64, Instant)>> = vec![Vec::new(), Vec::new()];
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        for (c, made) in clients.iter_mut().zip(made.iter_mut()) {
            let rev = c.put("k", "v").await;
            made.push((rev, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = Instant::now();
    for (side, (c, made)) in ["etcd", "pgetcd"]
        .iter()
        .zip(clients.iter_mut().zip(made.iter()))
    {
        let last = made.last().unwrap().0;
        let compacted = compact_revision(c, last).await;
        let first = made[0].0;
        assert!(
            compacted > first,
            "{side}: compacted only to {compacted} (writes began at {first})"
        );
        let when = made
            .iter()
            .find(|(r, _)| *r >= compacted)
            .map(|(_, t)| *t)
            .unwrap();
        let age = now.duration_since(when);
        // Compacted every 2 s to a sample taken 2 s (+ one 200 ms sample step) before.
        assert!(
            age >= Duration::from_millis(1800) && age <= Duration::from_millis(4800),
            "{side}: compacted to revision {compacted}, made {age:?} ago"
        );
        println!("{side}: compacted to {compacted} of {last}, made {age:?} ago");
    }
    ours.stop().await;
}

/// Revision retention N: compacts to the current revision minus N on each tick (5 min
/// in production, shortened here), and not again while the revision stands still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_retention_keeps_that_many_revisions() {
    let ours = TestServer::start(test_config()).await;
    let mut c = Clients::connect(&ours.url()).await;
    let mut last = 0;
    for i in 0..30 {
        last = c.put("k", &format!("v{i}")).await;
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(auto_compaction::run(
        ours.running.node.clone(),
        AutoCompaction::Revision(10),
        Duration::from_millis(100),
        stop_rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ours.running.engine.stats().compact_revision != last - 10 {
        assert!(Instant::now() < deadline, "no compaction to {}", last - 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(compact_revision(&mut c, last).await, last - 10);
    stop.send(true).unwrap();
    task.await.unwrap();
    ours.stop().await;
}
