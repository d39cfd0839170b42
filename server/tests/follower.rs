//! A follower engine beside a running pgetcd, on the same keyspace in real Postgres:
//! its own replication slot, the index kept up from it, linearizable reads through the
//! read index, compactions followed.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_engine::{COMPACTION_POLL, Engine, EngineConfig};
use pgetcd_proto::etcdserverpb::{CompactionRequest, RangeRequest, RangeResponse};
use pgetcd_storage_postgres::{PgStore, PgStoreConfig};
use pgetcd_testkit::{Clients, TestServer, admin_client, postgres_url, test_config};

async fn all(engine: &Engine, revision: i64) -> RangeResponse {
    let mut r = engine
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

#[tokio::test]
async fn a_follower_on_its_own_slot_serves_what_the_writer_committed() {
    let config = test_config();
    let keyspace = config.storage.keyspace.clone();
    let server = TestServer::start(config).await;
    let mut c = Clients::connect(&server.url()).await;
    for i in 0..20 {
        c.put(&format!("/a/{i}"), "before").await;
    }
    let mut store_config = PgStoreConfig::new(postgres_url());
    store_config.schema = keyspace.clone();
    store_config.feed_consumer = Some("f1".into());
    let store = PgStore::new(&store_config).unwrap();
    let follower = Engine::follow(EngineConfig::default(), Arc::new(store))
        .await
        .unwrap();
    let mut last = 0;
    for i in 0..50 {
        last = c
            .put(&format!("/a/{}", i % 25), &format!("after {i}"))
            .await;
    }
    follower
        .wait_applied(last, Duration::from_secs(10))
        .await
        .unwrap();
    let writer = &server.running.engine;
    for at in [0, 5, 21, last - 3] {
        assert_eq!(all(&follower, at).await, all(writer, at).await, "at {at}");
    }

    // Read-your-writes through the read index: a put acknowledged by the writer is
    // seen by a linearizable read on the follower straight away.
    let rev = c.put("/b", "now").await;
    let got = follower
        .range(&RangeRequest {
            key: Bytes::from_static(b"/b"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.kvs.len(), 1, "linearizable read missed revision {rev}");

    // The follower prunes its index once the writer compacts.
    writer
        .compact(CompactionRequest {
            revision: last,
            physical: true,
        })
        .await
        .unwrap();
    // A linearizable read right after it (before the follower's poll) is refused below
    // the compaction, as on the writer.
    let below = follower
        .range(&RangeRequest {
            key: Bytes::from_static(b"/a/0"),
            revision: last - 1,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(below, Err(pgetcd_engine::Error::Compacted)),
        "{below:?}"
    );
    let deadline = tokio::time::Instant::now() + COMPACTION_POLL * 5;
    while follower.stats().compact_revision != last {
        assert!(
            tokio::time::Instant::now() < deadline,
            "compaction not followed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(all(&follower, 0).await, all(writer, 0).await);

    // The follower's own slot, beside the writer's.
    let slots: Vec<String> = admin_client()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1 ORDER BY 1",
            &[&format!("pgetcd_{keyspace}%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        slots,
        vec![
            format!("pgetcd_{keyspace}"),
            format!("pgetcd_{keyspace}_f1")
        ]
    );
    drop(follower);
    server.stop().await;
}

#[tokio::test]
async fn a_follower_slot_name_must_be_a_slot_name() {
    let mut store_config = PgStoreConfig::new(postgres_url());
    store_config.feed_consumer = Some("Not A Slot".into());
    let err = PgStore::new(&store_config).err().unwrap();
    assert!(
        err.to_string().contains("cannot name a replication slot"),
        "{err}"
    );
}
