//! The Postgres store against real Postgres: the fence, in-doubt resolution, the writer
//! role, schema migration, and export and import (equal to the memory store's).
//!
//! The late commit: a batch's statement is held inside Postgres (another session holds
//! the `meta` row lock) while the writer's connection is cut, so the writer cannot tell
//! whether it committed, and the backend is still running it. Reading `meta` at that
//! moment says "not committed", yet the backend would commit as soon as the lock goes.
//! Resolution must first terminate that backend and wait for it to be gone.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use pgetcd_storage::{
    AuthRecord, Batch, Campaign, Change, LeaseOps, MemberInfo, Outcome, Pruned, Resolution, Store,
    StoreError, Version,
};
use pgetcd_storage_postgres::{PgStore, PgStoreConfig};
use pgetcd_testkit::proxy::TcpProxy;
use pgetcd_testkit::{admin_client, fresh_keyspace, postgres};

fn put(key: &str, revision: i64) -> Change {
    Change {
        key: Bytes::copy_from_slice(key.as_bytes()),
        version: Version {
            mod_revision: revision,
            sub: 0,
            create_revision: revision,
            version: 1,
            lease: 0,
            value: Some(Bytes::from_static(b"v")),
        },
        prev: None,
    }
}

async fn store_via(port: u16, schema: &str) -> PgStore {
    let mut config = PgStoreConfig::new(format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    ));
    config.schema = schema.to_owned();
    config.read_pool_size = 1;
    PgStore::new(&config).unwrap()
}

async fn meta_revision(schema: &str) -> i64 {
    admin_client()
        .await
        .query_one(&format!("SELECT revision FROM {schema}.meta"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn history_rows(schema: &str) -> i64 {
    admin_client()
        .await
        .query_one(&format!("SELECT count(*) FROM {schema}.history"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_held_commit_cut_off_from_its_writer_never_lands_after_resolution() {
    let pg = postgres();
    let proxy = TcpProxy::start(([127, 0, 0, 1], pg.options().port).into()).await;
    let schema = fresh_keyspace();
    let store = store_via(proxy.port(), &schema).await;
    store.setup().await.unwrap();
    let (fence, meta) = store.fence().await.unwrap();
    assert_eq!(meta.revision, 1);
    let leases = LeaseOps::default();
    let first = [put("a", 2)];
    store
        .commit(
            &fence,
            Batch {
                prev_revision: 1,
                revision: 2,
                changes: &first,
                leases: &leases,
            },
        )
        .await
        .unwrap();

    // Another session holds meta's row lock: the next commit waits inside Postgres.
    let mut holder = admin_client().await;
    let hold = holder.transaction().await.unwrap();
    hold.execute(&format!("SELECT 1 FROM {schema}.meta FOR UPDATE"), &[])
        .await
        .unwrap();
    let second = [put("b", 3)];
    let batch = Batch {
        prev_revision: 2,
        revision: 3,
        changes: &second,
        leases: &leases,
    };
    let pid = store.writer_backend_pid().await.unwrap();
    let commit = store.commit(&fence, batch);
    tokio::pin!(commit);
    // Until the statement is waiting for the lock.
    let admin = admin_client().await;
    tokio::select! {
        r = &mut commit => panic!("commit finished while the lock was held: {r:?}"),
        _ = async {
            loop {
                let waiting: bool = admin
                    .query_one(
                        "SELECT wait_event_type IS NOT DISTINCT FROM 'Lock' FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if waiting {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } => {}
    }
    proxy.cut();
    let err = commit.await.unwrap_err();
    assert_eq!(err.outcome(), Outcome::Indeterminate, "{err:?}");

    // While the lock is still held, the store resolves: the held backend is
    // terminated, so the batch can never commit, and the answer is "not committed".
    let resolved = store.resolve(&fence, batch).await.unwrap();
    assert_eq!(resolved, Resolution::NotCommitted);
    let gone: bool = admin
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "the in-doubt backend {pid} still runs");

    // The lock goes. Nothing may land late.
    hold.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        meta_revision(&schema).await,
        2,
        "the held batch committed late"
    );
    assert_eq!(history_rows(&schema).await, 1);

    // The writer goes on from revision 2.
    let again = [put("b", 3)];
    store
        .commit(
            &fence,
            Batch {
                prev_revision: 2,
                revision: 3,
                changes: &again,
                leases: &leases,
            },
        )
        .await
        .unwrap();
    assert_eq!(meta_revision(&schema).await, 3);
}

#[tokio::test]
async fn the_fence_is_a_compare_and_swap_of_epoch_and_previous_revision() {
    let pg = postgres();
    let schema = fresh_keyspace();
    let store = store_via(pg.options().port, &schema).await;
    store.setup().await.unwrap();
    let (fence, _) = store.fence().await.unwrap();
    let leases = LeaseOps::default();
    let batch = |prev, changes: &'static [Change]| Batch {
        prev_revision: prev,
        revision: prev + 1,
        changes,
        leases: Box::leak(Box::new(LeaseOps::default())),
    };
    let a: &'static [Change] = Box::leak(Box::new([put("a", 2)]));
    store.commit(&fence, batch(1, a)).await.unwrap();

    // A batch built on a stale revision is refused, and writes nothing.
    let stale: &'static [Change] = Box::leak(Box::new([put("x", 2)]));
    let err = store.commit(&fence, batch(1, stale)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");

    // A deposed writer is refused even with the right revision.
    let other = store_via(pg.options().port, &schema).await;
    let (newer, _) = other.fence().await.unwrap();
    let b: &'static [Change] = Box::leak(Box::new([put("b", 3)]));
    let err = store.commit(&fence, batch(2, b)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    assert_eq!(meta_revision(&schema).await, 2);
    assert_eq!(history_rows(&schema).await, 1);
    other.commit(&newer, batch(2, b)).await.unwrap();
    assert_eq!(meta_revision(&schema).await, 3);

    // Resolution by the deposed writer says fenced, not "not committed".
    let err = store
        .resolve(
            &fence,
            Batch {
                prev_revision: 2,
                revision: 3,
                changes: b,
                leases: &leases,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
}

/// A compaction recorded but whose data step never ran (an in-doubt record, then a
/// reload or a restart) leaves versions the next index never learns of. The next data
/// step must still remove them, or dropping the partitions of their newer versions
/// would bring them back.
#[tokio::test]
async fn versions_left_by_a_skipped_compaction_step_do_not_come_back() {
    let pg = postgres();
    let schema = fresh_keyspace();
    let store_config = || {
        let mut c = PgStoreConfig::new(pg.tcp_url("postgres"));
        c.schema = schema.clone();
        c.partition_revisions = 2;
        c.read_pool_size = 1;
        c
    };
    let store = PgStore::new(&store_config()).unwrap();
    store.setup().await.unwrap();
    let (fence, _) = store.fence().await.unwrap();
    let leases = LeaseOps::default();
    let mut rev = 1;
    let mut commit = async |store: &PgStore, change: Change| {
        let changes = [change];
        store
            .commit(
                &fence,
                Batch {
                    prev_revision: rev,
                    revision: rev + 1,
                    changes: &changes,
                    leases: &leases,
                },
            )
            .await
            .unwrap();
        rev += 1;
    };
    commit(&store, put("k", 2)).await;
    commit(&store, put("j", 3)).await;
    // Compact at 3: k@2 and j@3 survive, copied out of the dropped partitions.
    let plan = store.record_compaction(&fence, 3, 3).await.unwrap();
    let survivors = Pruned {
        survivors: vec![(2, 0), (3, 0)],
        ..Pruned::default()
    };
    store.compact(&fence, &plan, &survivors).await.unwrap();
    commit(&store, put("k", 4)).await;
    let mut tombstone = put("k", 5);
    tombstone.version = Version::tombstone();
    tombstone.version.mod_revision = 5;
    commit(&store, tombstone).await;
    commit(&store, put("m", 6)).await;
    // Compaction at 5 recorded; its data step never runs.
    store.record_compaction(&fence, 6, 5).await.unwrap();

    // A restart: the index loaded now knows neither k@2 nor k@4.
    let store = PgStore::new(&store_config()).unwrap();
    let (fence, _) = store.fence().await.unwrap();
    let mut keys = Vec::new();
    store
        .load(&mut |k, v, _| keys.push((k, v.mod_revision)))
        .await
        .unwrap();
    keys.sort();
    assert_eq!(keys, vec![("j".into(), 3), ("m".into(), 6)]);
    // Compact at 6, with what that index would list: nothing of k.
    let plan = store.record_compaction(&fence, 6, 6).await.unwrap();
    store
        .compact(&fence, &plan, &Pruned::default())
        .await
        .unwrap();
    let mut keys = Vec::new();
    store
        .load(&mut |k, v, _| keys.push((k, v.mod_revision)))
        .await
        .unwrap();
    keys.sort();
    assert_eq!(keys, vec![("j".into(), 3), ("m".into(), 6)], "k came back");
}

fn member(name: &str) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        member_id: 0,
        client_urls: vec![format!("http://{name}:2379")],
        peer_urls: vec![format!("http://{name}:2380")],
    }
}

#[tokio::test]
async fn instances_register_and_one_holds_the_writer_role_at_a_time() {
    let pg = postgres();
    let schema = fresh_keyspace();
    let a = store_via(pg.options().port, &schema).await;
    let b = store_via(pg.options().port, &schema).await;
    let meta = a.setup().await.unwrap();
    b.setup().await.unwrap();

    // The first instance keeps the keyspace's member id; ids survive re-registration.
    let id_a = a.register(&member("a")).await.unwrap();
    assert_eq!(id_a, meta.member_id);
    let id_b = b.register(&member("b")).await.unwrap();
    assert_ne!(id_b, id_a);
    assert_eq!(a.register(&member("a")).await.unwrap(), id_a);
    let names: Vec<String> = a
        .members(Duration::from_secs(5))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert!(a.members(Duration::ZERO).await.unwrap().is_empty());

    // One holder at a time; the claim is taken with a raised epoch.
    let ttl = Duration::from_millis(400);
    let Campaign::Won { fence: fa, .. } = a.campaign("a", ttl).await.unwrap() else {
        panic!("a lost an uncontested campaign");
    };
    assert_eq!(fa.epoch, meta.leader_epoch + 1);
    assert_eq!(
        b.campaign("b", ttl).await.unwrap(),
        Campaign::Lost { leader: "a".into() }
    );
    a.renew(&fa, "a", ttl).await.unwrap();
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("a"));

    // a stops renewing: once its claim lapses b takes over, and a is fenced.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(b.leader().await.unwrap(), None);
    let Campaign::Won { fence: fb, .. } = b.campaign("b", ttl).await.unwrap() else {
        panic!("b lost against a lapsed claim");
    };
    assert!(fb.epoch > fa.epoch);
    let err = a.renew(&fa, "a", ttl).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    let changes = [put("late", 2)];
    let leases = LeaseOps::default();
    let err = a
        .commit(
            &fa,
            Batch {
                prev_revision: 1,
                revision: 2,
                changes: &changes,
                leases: &leases,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    assert_eq!(
        a.campaign("a", ttl).await.unwrap(),
        Campaign::Lost { leader: "b".into() }
    );
    // The holder restarting takes its own claim back at once.
    let Campaign::Won { fence: again, .. } = b.campaign("b", ttl).await.unwrap() else {
        panic!("b could not take back its own claim");
    };
    assert!(again.epoch > fb.epoch);
}

#[tokio::test]
async fn a_version_2_keyspace_is_migrated_to_the_current_version() {
    let pg = postgres();
    let schema = fresh_keyspace();
    let store = store_via(pg.options().port, &schema).await;
    store.setup().await.unwrap();
    let admin = admin_client().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE {schema}.members; DROP TABLE {schema}.alarms; \
             ALTER TABLE {schema}.meta DROP COLUMN leader, DROP COLUMN leader_until; \
             UPDATE {schema}.meta SET schema_version = 2"
        ))
        .await
        .unwrap();
    let store = store_via(pg.options().port, &schema).await;
    store.setup().await.unwrap();
    let version: i32 = admin
        .query_one(&format!("SELECT schema_version FROM {schema}.meta"), &[])
        .await
        .unwrap()
        .get(0);
    // Version 3 brought members and the writer's claim, version 4 the alarms, version
    // 5 the auth state.
    assert_eq!(version, 5);
    store.register(&member("a")).await.unwrap();
    assert!(matches!(
        store.campaign("a", Duration::from_secs(1)).await.unwrap(),
        Campaign::Won { .. }
    ));
    assert!(!store.set_alarm(0, 1, true).await.unwrap());
    assert!(store.set_alarm(0, 1, true).await.unwrap());
    assert_eq!(store.alarms().await.unwrap(), [(0, 1)]);
    assert!(store.set_alarm(0, 1, false).await.unwrap());
    assert!(!store.set_alarm(0, 1, false).await.unwrap());
    assert!(store.alarms().await.unwrap().is_empty());
    // The auth state is swapped only from the revision it holds.
    assert_eq!(store.auth().await.unwrap(), AuthRecord::default());
    let first = AuthRecord {
        revision: 1,
        state: Bytes::from_static(b"one"),
    };
    assert!(!store.swap_auth(3, &first).await.unwrap());
    assert!(store.swap_auth(0, &first).await.unwrap());
    assert!(!store.swap_auth(0, &first).await.unwrap());
    let second = AuthRecord {
        revision: 2,
        state: Bytes::from_static(b"two"),
    };
    assert!(store.swap_auth(1, &second).await.unwrap());
    assert!(!store.swap_auth(1, &first).await.unwrap());
    assert_eq!(store.auth().await.unwrap(), second);
}

/// Every retained version of an export, with its meta's revisions and its leases.
async fn exported(store: &dyn Store) -> (i64, i64, Vec<(i64, i64)>, Vec<(Bytes, Version)>) {
    let mut export = store.export().await.unwrap();
    let mut versions = Vec::new();
    while let Some(chunk) = export.versions.recv().await {
        versions.extend(chunk.unwrap());
    }
    (
        export.meta.revision,
        export.meta.compact_revision,
        export.leases,
        versions,
    )
}

/// A history of 3,000 revisions (puts, deletes, overwrites of 100 keys), a lease, and
/// a compaction recorded at revision 2,000 (its data step not run: the export must
/// still keep only what a compaction keeps).
async fn fill(store: &dyn Store) -> pgetcd_storage::Fence {
    store.setup().await.unwrap();
    let (fence, _) = store.fence().await.unwrap();
    let mut leases = LeaseOps::default();
    leases.ops.push(pgetcd_storage::LeaseOp::Grant(77, 60));
    for rev in 2..=3001i64 {
        let key = format!("/k/{}", rev % 100);
        let mut change = put(&key, rev);
        if rev % 7 == 0 {
            change.version = Version {
                mod_revision: rev,
                ..Version::tombstone()
            };
        } else {
            change.version.lease = if rev % 5 == 0 { 77 } else { 0 };
        }
        let none = LeaseOps::default();
        let batch = Batch {
            prev_revision: rev - 1,
            revision: rev,
            changes: std::slice::from_ref(&change),
            leases: if rev == 2 { &leases } else { &none },
        };
        store.commit(&fence, batch).await.unwrap();
    }
    store.record_compaction(&fence, 3001, 2000).await.unwrap();
    fence
}

/// Sends `rows` as an import's chunks, then `tail` (an error, say).
fn chunks(
    rows: Vec<(Bytes, Version)>,
    tail: Option<StoreError>,
) -> tokio::sync::mpsc::Receiver<pgetcd_storage::VersionChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for chunk in rows.chunks(700) {
            if tx.send(Ok(chunk.to_vec())).await.is_err() {
                return;
            }
        }
        if let Some(e) = tail {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

#[tokio::test]
async fn export_and_import_agree_between_the_memory_store_and_postgres() {
    let pg = postgres();
    let memory = pgetcd_storage::memory::MemoryStore::new("reference");
    let postgres_store = store_via(pg.options().port, &fresh_keyspace()).await;
    fill(&memory).await;
    fill(&postgres_store).await;
    let reference = exported(&memory).await;
    assert_eq!(
        exported(&postgres_store).await,
        reference,
        "the same export"
    );
    let (revision, compact, leases, versions) = reference.clone();
    assert_eq!(
        (revision, compact, leases.clone()),
        (3001, 2000, vec![(77, 60)])
    );
    assert!(
        versions.windows(2).all(|w| w[0].1.id() < w[1].1.id()),
        "revision order"
    );
    // At or below the compaction only each key's newest live version is kept.
    assert!(
        versions
            .iter()
            .filter(|(_, v)| v.mod_revision <= 2000)
            .count()
            <= 100
    );

    // Imported into a fresh Postgres keyspace, it exports the same again.
    let target = store_via(pg.options().port, &fresh_keyspace()).await;
    target.setup().await.unwrap();
    let (fence, _) = target.fence().await.unwrap();
    let import = |versions, replace| pgetcd_storage::Import {
        revision,
        compact_revision: compact,
        leases: leases.clone(),
        versions,
        replace,
    };
    let done = target
        .import(&fence, import(chunks(versions.clone(), None), false))
        .await
        .unwrap();
    assert_eq!(done.versions as usize, versions.len());
    assert_eq!(exported(&target).await, reference);

    // Not empty any more: refused, unless replacing.
    let err = target
        .import(&fence, import(chunks(versions.clone(), None), false))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty(_)), "{err:?}");
    // A sender failing halfway: nothing of the replacement lands.
    let failing = import(
        chunks(
            versions[..versions.len() / 2].to_vec(),
            Some(StoreError::Misconfigured("the file is damaged".into())),
        ),
        true,
    );
    let err = target.import(&fence, failing).await.unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    assert_eq!(exported(&target).await, reference, "nothing half-loaded");
    // Out of order: refused, nothing lands.
    let mut shuffled = versions.clone();
    shuffled.swap(10, 20);
    let err = target
        .import(&fence, import(chunks(shuffled, None), true))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not follow"), "{err}");
    assert_eq!(exported(&target).await, reference);
    // A deposed importer is fenced.
    let (_newer, _) = target.fence().await.unwrap();
    let err = target
        .import(&fence, import(chunks(versions.clone(), None), true))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    // The memory store takes the same import.
    let copy = pgetcd_storage::memory::MemoryStore::new("copy");
    copy.setup().await.unwrap();
    let (fence, _) = copy.fence().await.unwrap();
    copy.import(&fence, import(chunks(versions, None), false))
        .await
        .unwrap();
    assert_eq!(exported(&copy).await, reference);
}
