//! Followers that fell behind: one whose connections to Postgres stalled while the
//! writer committed thousands of revisions, one whose replication slot was dropped
//! under load, and one that missed history the writer then compacted away. The first
//! two catch up with every revision delivered to their watchers once, in order; the
//! third cancels its watchers as compacted, never skipping silently.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, PutRequest, RangeRequest, RangeResponse, WatchCreateRequest,
};
use pgetcd_testkit::proxy::TcpProxy;
use pgetcd_testkit::watch::{TestWatch, assert_every_revision};
use pgetcd_testkit::{Clients, TestServer, admin_client, fresh_keyspace, postgres, test_config};

async fn instance(name: &str, keyspace: &str, postgres_url: String) -> TestServer {
    let mut config = test_config();
    config.member.name = name.into();
    config.storage.keyspace = keyspace.into();
    config.storage.postgres_url = Some(postgres_url);
    TestServer::start(config).await
}

/// A proxy to the test Postgres, and a URL through it.
async fn proxied() -> (TcpProxy, String) {
    let proxy = TcpProxy::start(([127, 0, 0, 1], postgres().options().port).into()).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port()
    );
    (proxy, url)
}

/// `n` puts over `/k/0` .. `/k/49`, from four clients at once; the newest revision.
async fn load(url: &str, n: usize) -> i64 {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = Clients::connect(url).await;
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in (w..n).step_by(4) {
                let r =
                    c.kv.put(PutRequest {
                        key: Bytes::from(format!("/k/{}", i % 50)),
                        value: Bytes::from(format!("v{i}")),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                last = r.into_inner().header.unwrap().revision;
            }
            last
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    last
}

/// A watch of every key with prev_kv, from `from`.
async fn watch_all(url: &str, from: i64) -> TestWatch {
    let w = TestWatch::open(url).await;
    let created = w
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: from,
            prev_kv: true,
            ..Default::default()
        })
        .await;
    assert!(created.created, "{created:?}");
    w
}

/// Waits until the watch delivered revision `rev`, or was cancelled.
async fn wait_for(w: &TestWatch, rev: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let responses = w.responses();
        let seen = responses
            .iter()
            .flat_map(|r| r.events.iter())
            .filter_map(|e| e.kv.as_ref())
            .any(|kv| kv.mod_revision >= rev);
        if seen || responses.iter().any(|r| r.canceled) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch did not reach revision {rev}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn all(server: &TestServer, revision: i64) -> RangeResponse {
    let mut r = server
        .running
        .node
        .engine()
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    r.header = None;
    r
}

/// Drops a replication slot, terminating the connection that holds it (the follower
/// reconnects at once, so this retries until the slot is dropped).
async fn drop_slot(slot: &str) {
    let admin = admin_client().await;
    let mut last_error = None;
    for _ in 0..500 {
        admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .unwrap();
        match admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return,
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("could not drop slot {slot}: {last_error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stalled_for_thousands_of_revisions_catches_up() {
    let keyspace = fresh_keyspace();
    let writer = instance("w", &keyspace, pgetcd_testkit::postgres_url()).await;
    let (proxy, url) = proxied().await;
    let follower = instance("f", &keyspace, url).await;
    assert!(follower.running.node.engine().is_follower());
    let mut c = Clients::connect(&writer.url()).await;
    let from = c.put("/start", "0").await;
    let w = watch_all(&follower.url(), from).await;
    wait_for(&w, from).await;

    // Nothing reaches the follower while the writer commits 3,000 revisions.
    proxy.pause();
    let last = load(&writer.url(), 3000).await;
    assert!(last >= from + 3000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(follower.running.node.engine().stats().revision < last);
    proxy.resume();

    follower
        .running
        .node
        .engine()
        .wait_applied(last, Duration::from_secs(60))
        .await
        .unwrap();
    wait_for(&w, last).await;
    assert_every_revision(&w.responses(), from, last);
    for at in [from, from + 1234, last] {
        assert_eq!(all(&follower, at).await, all(&writer, at).await, "at {at}");
    }
    drop(w);
    follower.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_slot_is_dropped_under_load_catches_up_from_history() {
    let keyspace = fresh_keyspace();
    let writer = instance("w", &keyspace, pgetcd_testkit::postgres_url()).await;
    let follower = instance("f", &keyspace, pgetcd_testkit::postgres_url()).await;
    let mut c = Clients::connect(&writer.url()).await;
    let from = c.put("/start", "0").await;
    let w = watch_all(&follower.url(), from).await;
    wait_for(&w, from).await;

    let writer_url = writer.url();
    let loading = tokio::spawn(async move { load(&writer_url, 1500).await });
    let slot = format!("pgetcd_{keyspace}_f");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop_slot(&slot).await;
    }
    let last = loading.await.unwrap();
    // And once more with no commit after it: the follower must not wait for one.
    drop_slot(&slot).await;
    let last = last.max(c.put("/after-the-last-drop", "x").await);
    drop_slot(&slot).await;

    follower
        .running
        .node
        .engine()
        .wait_applied(last, Duration::from_secs(30))
        .await
        .unwrap();
    wait_for(&w, last).await;
    assert_every_revision(&w.responses(), from, last);
    assert_eq!(all(&follower, 0).await, all(&writer, 0).await);
    drop(w);
    follower.stop().await;
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_compaction_cancels_its_watchers_as_compacted() {
    let keyspace = fresh_keyspace();
    let writer = instance("w", &keyspace, pgetcd_testkit::postgres_url()).await;
    let (proxy, url) = proxied().await;
    let follower = instance("f", &keyspace, url).await;
    let mut c = Clients::connect(&writer.url()).await;
    let from = c.put("/start", "0").await;
    let w = watch_all(&follower.url(), from).await;
    wait_for(&w, from).await;

    // The follower misses 100 revisions, the writer compacts them away, and the
    // follower's slot goes (as on a promoted replica): the history is gone.
    // (Cut as well as paused: what Postgres sent before is lost, not buffered.)
    proxy.pause();
    proxy.cut();
    let last = load(&writer.url(), 100).await;
    c.kv.compact(CompactionRequest {
        revision: last,
        physical: true,
    })
    .await
    .unwrap();
    drop_slot(&format!("pgetcd_{keyspace}_f")).await;
    proxy.resume();

    follower
        .running
        .node
        .engine()
        .wait_applied(last, Duration::from_secs(30))
        .await
        .unwrap();
    wait_for(&w, last).await;
    let responses = w.responses();
    let cancelled = responses.iter().find(|r| r.canceled).unwrap_or_else(|| {
        panic!(
            "the watcher was not cancelled ({} responses)",
            responses.len()
        );
    });
    assert_eq!(cancelled.compact_revision, last, "{cancelled:?}");
    // Events before the cancellation are the ones it had, in order, none skipped.
    let delivered: Vec<i64> = responses
        .iter()
        .flat_map(|r| r.events.iter())
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(delivered, vec![from]);
    assert_eq!(all(&follower, 0).await, all(&writer, 0).await);
    drop(w);
    follower.stop().await;
    writer.stop().await;
}
