//! A follower engine over the same store as the writer: it applies the change feed to
//! its index, serves reads (linearizable ones through the read index), hands batches
//! to its watch feed, follows compactions and refuses writes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_engine::{COMPACTION_POLL, Engine, EngineConfig, Error};
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse,
};
use pgetcd_storage::memory::MemoryStore;
use proptest::prelude::*;

fn config() -> EngineConfig {
    EngineConfig {
        cache_bytes: 64,
        ..EngineConfig::default()
    }
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(k.as_bytes()),
        value: Bytes::copy_from_slice(v.as_bytes()),
        ..Default::default()
    }
}

async fn all(engine: &Engine, revision: i64, serializable: bool) -> Result<RangeResponse, Error> {
    let mut r = engine
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            serializable,
            ..Default::default()
        })
        .await?;
    r.header = None;
    Ok(r)
}

#[tokio::test(start_paused = true)]
async fn a_follower_serves_what_the_writer_committed() {
    let store = MemoryStore::new("follow");
    let writer = Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap();
    for i in 0..5 {
        writer.put(put(&format!("k{i}"), "before")).await.unwrap();
    }
    let follower = Engine::follow(config(), Arc::new(store.consumer("f1")))
        .await
        .unwrap();
    assert!(follower.is_follower());
    let mut handed = follower.subscribe_commits();
    assert_eq!(follower.stats().revision, 6);
    for i in 0..5 {
        writer.put(put(&format!("k{i}"), "after")).await.unwrap();
    }
    writer
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"k3"),
            ..Default::default()
        })
        .await
        .unwrap();
    let rev = writer.stats().revision;
    assert_eq!(rev, 12);
    follower
        .wait_applied(rev, Duration::from_secs(5))
        .await
        .unwrap();
    for at in [0, 6, 8, 11] {
        assert_eq!(
            all(&follower, at, true).await.unwrap(),
            all(&writer, at, true).await.unwrap(),
            "at {at}"
        );
    }
    // Each applied commit reached the follower's watch feed.
    for want in 7..=12 {
        assert_eq!(handed.recv().await.unwrap().last_revision, want);
    }

    // A linearizable read on the follower sees a write acknowledged by the writer.
    writer.put(put("k9", "new")).await.unwrap();
    let got = follower
        .range(&RangeRequest {
            key: Bytes::from_static(b"k9"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(got.header.unwrap().revision, 13);

    // Writes are the writer's.
    let refused = follower.put(put("x", "y")).await;
    assert!(matches!(refused, Err(Error::NotWriter)), "{refused:?}");

    // Compactions are followed.
    writer
        .compact(CompactionRequest {
            revision: 11,
            physical: true,
        })
        .await
        .unwrap();
    tokio::time::sleep(COMPACTION_POLL * 2).await;
    assert_eq!(follower.stats().compact_revision, 11);
    let below = all(&follower, 10, true).await;
    assert!(matches!(below, Err(Error::Compacted)), "{below:?}");
    assert_eq!(
        all(&follower, 0, false).await.unwrap(),
        all(&writer, 0, false).await.unwrap()
    );
}

/// A revision bump (etcd's `--bump-revision` with `--mark-compacted`, made by another
/// instance while this follower runs) has no changes for the feed to carry: the follower
/// still reaches the bumped revision for a linearizable read with no write after it,
/// refuses reads below it as compacted, and applies the writes that follow.
#[tokio::test(start_paused = true)]
async fn a_follower_follows_a_revision_bump_with_no_changes() {
    use pgetcd_storage::{Outcome, Store};
    let store = MemoryStore::new("bump");
    let writer = Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap();
    for i in 0..3 {
        writer.put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    let follower = Engine::follow(config(), Arc::new(store.consumer("f1")))
        .await
        .unwrap();
    // Applied from the feed: the follower's catch-up when its feed opened is behind it.
    writer.put(put("k3", "v")).await.unwrap();
    follower
        .wait_applied(5, Duration::from_secs(5))
        .await
        .unwrap();
    let before = all(&writer, 0, true).await.unwrap();
    drop(writer);

    let (fence, meta) = store.fence().await.unwrap();
    assert_eq!(meta.revision, 5);
    let not_above = store.bump_revision(&fence, 5, 5, true).await;
    assert!(not_above.is_err(), "{not_above:?}");
    let bumped = store.bump_revision(&fence, 5, 1004, true).await.unwrap();
    assert_eq!((bumped.revision, bumped.compact_revision), (1004, 1004));
    let again = store
        .bump_revision(&fence, 5, 2004, true)
        .await
        .unwrap_err();
    assert_eq!(again.outcome(), Outcome::Fenced, "{again}");

    let got = follower
        .range(&RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.header.unwrap().revision, 1004);
    assert_eq!(got.kvs, before.kvs);
    let below = all(&follower, 1003, true).await;
    assert!(matches!(below, Err(Error::Compacted)), "{below:?}");

    let writer = Engine::open(config(), Arc::new(store.clone()))
        .await
        .unwrap();
    let next = writer.put(put("k0", "after")).await.unwrap();
    assert_eq!(next.header.unwrap().revision, 1005);
    follower
        .wait_applied(1005, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        all(&follower, 0, true).await.unwrap(),
        all(&writer, 0, true).await.unwrap()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random puts and deletes on the writer, the follower started part way: once it
    /// applied the writer's revision, every retained revision reads the same on both.
    #[test]
    fn a_follower_converges_on_the_writer(
        ops in proptest::collection::vec((0..8u8, any::<bool>()), 1..60),
        start_at in 0..60usize,
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async {
                let store = MemoryStore::new("converge");
                let writer = Engine::open(config(), Arc::new(store.clone())).await.unwrap();
                let mut follower = None;
                for (i, (k, delete)) in ops.iter().enumerate() {
                    if i == start_at {
                        follower = Some(
                            Engine::follow(config(), Arc::new(store.consumer("f")))
                                .await
                                .unwrap(),
                        );
                    }
                    let key = format!("k{k}");
                    if *delete {
                        writer
                            .delete_range(DeleteRangeRequest {
                                key: Bytes::from(key),
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                    } else {
                        writer.put(put(&key, &format!("v{i}"))).await.unwrap();
                    }
                }
                let follower = match follower {
                    Some(f) => f,
                    None => Engine::follow(config(), Arc::new(store.consumer("f")))
                        .await
                        .unwrap(),
                };
                let rev = writer.stats().revision;
                follower.wait_applied(rev, Duration::from_secs(5)).await.unwrap();
                for at in 1..=rev {
                    assert_eq!(
                        all(&follower, at, true).await.unwrap(),
                        all(&writer, at, true).await.unwrap(),
                        "at {at}"
                    );
                }
            });
    }
}
