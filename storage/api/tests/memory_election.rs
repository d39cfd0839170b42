//! The in-memory store's writer role and registrations keep the same rules as the
//! Postgres store's (server/tests/postgres_store.rs).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pgetcd_storage::memory::MemoryStore;
use pgetcd_storage::{Campaign, MemberInfo, Store, StoreError};

fn member(name: &str) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        member_id: 0,
        client_urls: vec![],
        peer_urls: vec![],
    }
}

#[tokio::test(start_paused = true)]
async fn one_holder_at_a_time_and_a_lapsed_claim_is_taken_over() {
    let store = MemoryStore::new("election");
    let meta = store.setup().await.unwrap();
    assert_eq!(store.register(&member("a")).await.unwrap(), meta.member_id);
    let b_id = store.register(&member("b")).await.unwrap();
    assert_ne!(b_id, meta.member_id);
    assert_eq!(store.register(&member("b")).await.unwrap(), b_id);

    let ttl = Duration::from_secs(2);
    let Campaign::Won { fence: fa, .. } = store.campaign("a", ttl).await.unwrap() else {
        panic!("a lost");
    };
    assert_eq!(
        store.campaign("b", ttl).await.unwrap(),
        Campaign::Lost { leader: "a".into() }
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.renew(&fa, "a", ttl).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("a"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.leader().await.unwrap(), None);
    let Campaign::Won { fence: fb, .. } = store.campaign("b", ttl).await.unwrap() else {
        panic!("b lost against a lapsed claim");
    };
    assert!(fb.epoch > fa.epoch);
    assert!(matches!(
        store.renew(&fa, "a", ttl).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        store.members(Duration::from_secs(10)).await.unwrap().len(),
        2
    );
    assert!(
        store
            .members(Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );
}
