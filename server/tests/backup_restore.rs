//! Postgres-native backups of a keyspace (docs/operations.md, "Backups with Postgres"),
//! against real Postgres and the tools operators use:
//! - `pg_dump -n <keyspace>` taken under write load restores (`pg_restore`, into a
//!   fresh Postgres) to exactly what the source served at the dump's revision: every
//!   key and HashKV at every retained revision, the compaction, and the `kv` table.
//! - An older dump restored in place, under an instance that served newer revisions:
//!   start-up refuses with both revisions and the flags; `--bump-revision` too small is
//!   refused; with `--bump-revision N --mark-compacted` it starts N revisions above the
//!   dump's, the next write is above everything served, reads and watches from older
//!   revisions are compacted, and a restart with the flags still given bumps nothing.
//! - Point-in-time recovery (WAL archiving, `pg_basebackup`, a named restore point,
//!   `recovery_target_action = promote`): the recovered keyspace serves exactly the state
//!   served at the target, and the guard refuses it under the instance that served more.
//! - The Postgres store's `bump_revision`: fenced like a commit, and a keyspace bumped
//!   past its history partitions writes, compacts and loads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_localpg::{LocalPostgres, find_bindir, free_port, postgres_user};
use pgetcd_proto::etcdserverpb::{DeleteRangeRequest, HashKvRequest, WatchCreateRequest};
use pgetcd_server::Config;
use pgetcd_testkit::history::assert_compacted;
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{
    Clients, TestServer, admin_client, fresh_dir, postgres, test_config, throwaway_options, view_at,
};

/// Runs a Postgres client tool (as the postgres user when `as_postgres`), panicking
/// with its output when it fails.
fn tool(name: &str, args: &[&str], as_postgres: bool) {
    let mut cmd = Command::new(find_bindir().unwrap().join(name));
    cmd.args(args);
    if as_postgres && let Some((uid, gid)) = postgres_user().unwrap() {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_dump` of the keyspace's schema, as the runbook takes it.
fn dump(port: u16, keyspace: &str, file: &Path) {
    let port = port.to_string();
    let file = file.to_str().unwrap();
    tool(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-n",
            keyspace,
            "-Fc",
            "--no-publications",
            "--no-subscriptions",
            "-f",
            file,
        ],
        false,
    );
}

/// `pg_restore` of a dump, as the runbook restores it.
fn restore(port: u16, file: &Path) {
    let port = port.to_string();
    tool(
        "pg_restore",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "--no-owner",
            "--exit-on-error",
            file.to_str().unwrap(),
        ],
        false,
    );
}

/// A Postgres of the test's own under `dir` (as the test Postgres, plus `extra`).
fn own_postgres(dir: &Path, extra: Vec<(String, String)>) -> LocalPostgres {
    std::fs::create_dir_all(dir).unwrap();
    chown_to_postgres(dir);
    LocalPostgres::start(throwaway_options(dir, free_port().unwrap(), extra)).unwrap()
}

fn chown_to_postgres(path: &Path) {
    if let Some((uid, gid)) = postgres_user().unwrap() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

async fn admin(pg: &LocalPostgres) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&pg.connection_string("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
}

async fn meta_revision(client: &tokio_postgres::Client, keyspace: &str) -> i64 {
    client
        .query_one(&format!("SELECT revision FROM {keyspace}.meta"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Puts `n` values under `prefix`, deleting every seventh key; the last revision.
async fn write(c: &mut Clients, prefix: &str, n: usize) -> i64 {
    let mut rev = 0;
    for i in 0..n {
        let key = format!("{prefix}/{:02}", i % 20);
        rev = if i % 7 == 6 {
            c.kv.delete_range(DeleteRangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision
        } else {
            c.put(&key, &format!("{prefix}{i}")).await
        };
    }
    rev.max(c.revision().await)
}

/// Puts from `tasks` clients at once until `stop`; the writes acknowledged.
fn load(url: String, tasks: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut all = Vec::new();
        for t in 0..tasks {
            let (url, stop) = (url.clone(), stop.clone());
            all.push(tokio::spawn(async move {
                let mut c = Clients::connect(&url).await;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.put(&format!("load/{t}/{}", n % 40), &format!("{n}"))
                        .await;
                    n += 1;
                }
                n
            }));
        }
        let mut n = 0;
        for t in all {
            n += t.await.unwrap();
        }
        n
    })
}

/// The start-up error of `config` (it must not start).
async fn refused(config: Config) -> String {
    match pgetcd_server::start(config).await {
        Ok(_) => panic!("started on a keyspace behind what it served"),
        Err(e) => e.to_string(),
    }
}

/// A watcher from `start` is told at once that it was compacted, at `compact`.
async fn assert_watch_compacted(url: &str, start: i64, compact: i64) {
    let w = TestWatch::open(url).await;
    w.create(WatchCreateRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        start_revision: start,
        ..Default::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = w.responses().into_iter().find(|r| r.canceled) {
            assert_eq!(c.compact_revision, compact, "{c:?}");
            assert!(
                w.responses().iter().all(|r| r.events.is_empty()),
                "a compacted watcher got events"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a watch from {start} was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pg_dump_under_write_load_restores_to_what_was_served_at_its_revision() {
    let t0 = Instant::now();
    let dir = fresh_dir("dump");
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = test_config();
    // Small partitions: compaction drops some, and the load creates new ones while
    // the dump runs.
    config.storage.history_partition_revisions = 100;
    let ks = config.storage.keyspace.clone();
    let src = TestServer::start(config).await;
    let url = src.url();
    let mut c = Clients::connect(&url).await;
    let seeded = write(&mut c, "s", 250).await;
    let compact = seeded - 60;
    c.compact(compact, true).await;
    write(&mut c, "s", 40).await;

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(url.clone(), 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = c.revision().await;
    let file = dir.join("ks.dump");
    let started = Instant::now();
    {
        let (ks, file) = (ks.clone(), file.clone());
        let port = postgres().options().port;
        tokio::task::spawn_blocking(move || dump(port, &ks, &file))
            .await
            .unwrap();
    }
    let took = started.elapsed();
    let after = c.revision().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let puts = loader.await.unwrap();
    let end = c.revision().await;
    println!("pg_dump took {took:?} while revisions went {before} → {after}; {puts} puts in all");
    assert!(after > before, "no write during the dump");

    let target = own_postgres(&dir.join("target"), Vec::new());
    {
        let file = file.clone();
        let port = target.options().port;
        tokio::task::spawn_blocking(move || restore(port, &file))
            .await
            .unwrap();
    }
    let db = admin(&target).await;
    let at = meta_revision(&db, &ks).await;
    assert!(
        before <= at && at <= after,
        "the dump's revision {at} is not within {before}..={after}"
    );
    assert!(at < end);
    println!("the dump holds revision {at}");

    // The kv table of the same snapshot: each live key's version at the dump's revision.
    let rows = db
        .query(
            &format!("SELECT key, mod_revision, version, value FROM {ks}.kv ORDER BY key"),
            &[],
        )
        .await
        .unwrap();
    let (live, _, _) = view_at(&url, at).await;
    assert_eq!(rows.len(), live.len());
    for (row, kv) in rows.iter().zip(&live) {
        assert_eq!(row.get::<_, Vec<u8>>(0), kv.key.to_vec());
        assert_eq!(row.get::<_, i64>(1), kv.mod_revision);
        assert_eq!(row.get::<_, i64>(2), kv.version);
        assert_eq!(row.get::<_, Vec<u8>>(3), kv.value.to_vec());
    }

    let mut config = test_config();
    config.storage.postgres_url = Some(target.tcp_url("postgres"));
    config.storage.keyspace = ks.clone();
    config.storage.history_partition_revisions = 100;
    let dst = TestServer::start(config).await;
    let (kvs, header, hash) = view_at(&dst.url(), 0).await;
    assert_eq!(header, at);
    let (want_kvs, _, want_hash) = view_at(&url, at).await;
    assert_eq!((kvs, hash), (want_kvs, want_hash), "at the dump's revision");
    let step = ((at - compact) / 25).max(1);
    let mut rev = compact + 1;
    while rev < at {
        let (got, _, got_hash) = view_at(&dst.url(), rev).await;
        let (want, _, want_hash) = view_at(&url, rev).await;
        assert_eq!((got, got_hash), (want, want_hash), "at revision {rev}");
        rev += step;
    }
    assert_compacted(&dst.url(), b"s/00", compact - 1).await;
    let mut d = Clients::connect(&dst.url()).await;
    assert_eq!(d.put("after", "restore").await, at + 1);
    dst.stop().await;
    src.stop().await;
    println!("took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_dump_restored_in_place_is_refused_until_bumped_and_marked_compacted() {
    let t0 = Instant::now();
    let dir = fresh_dir("inplace");
    std::fs::create_dir_all(&dir).unwrap();
    let config = test_config();
    let ks = config.storage.keyspace.clone();
    let record = config.storage.data_dir.join("served").join(&ks);
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let dumped = write(&mut c, "k", 60).await;
    let file = dir.join("ks.dump");
    dump(postgres().options().port, &ks, &file);
    let (at_dump, _, _) = view_at(&srv.url(), dumped).await;
    let served = write(&mut c, "k", 90).await;
    let config = srv.stop().await;

    // Restored in place: the schema dropped, the older dump loaded.
    let pg = admin_client().await;
    pg.batch_execute(&format!("DROP SCHEMA {ks} CASCADE"))
        .await
        .unwrap();
    restore(postgres().options().port, &file);
    assert_eq!(meta_revision(&pg, &ks).await, dumped);

    let why = refused(config.clone()).await;
    for part in [
        format!("at revision {dumped}"),
        format!("below revision {served}"),
        record.display().to_string(),
        "pg_dump".into(),
        "--bump-revision N --mark-compacted".into(),
        format!("at least {}", served - dumped + 1),
    ] {
        assert!(why.contains(&part), "{part:?} not in: {why}");
    }
    let mut short = config.clone();
    short.recovery.bump_revision = (served - dumped) as u64;
    short.recovery.mark_compacted = true;
    let why = refused(short).await;
    assert!(
        why.contains(&format!("at least --bump-revision {}", served - dumped + 1)),
        "{why}"
    );
    assert_eq!(
        meta_revision(&pg, &ks).await,
        dumped,
        "a refused start changed the keyspace"
    );

    let mut bumped = config.clone();
    bumped.recovery.bump_revision = 1000;
    bumped.recovery.mark_compacted = true;
    // Events from the WAL alone: the publication must cover the restored table.
    bumped.watch.watch_source = pgetcd_server::watch_feed::WatchSource::Wal;
    let srv = TestServer::start(bumped).await;
    let url = srv.url();
    let (kvs, header, _) = view_at(&url, 0).await;
    assert_eq!((kvs, header), (at_dump, dumped + 1000));
    let mut c = Clients::connect(&url).await;
    let next = c.put("k/next", "after").await;
    assert_eq!(next, dumped + 1001);
    assert!(next > served);
    for old in [dumped, served, dumped + 999] {
        assert_compacted(&url, b"k/01", old).await;
        assert_watch_compacted(&url, old, dumped + 1000).await;
    }
    // Watches and reads from the new revisions, HashKV and compaction work over the gap.
    let w = TestWatch::open(&url).await;
    w.create(WatchCreateRequest {
        key: Bytes::from_static(b"k/"),
        range_end: Bytes::from_static(b"k0"),
        start_revision: next,
        ..Default::default()
    })
    .await;
    let last = c.put("k/last", "x").await;
    w.wait_progress(last).await;
    let revs: Vec<i64> = w
        .responses()
        .iter()
        .flat_map(|r| r.events.iter())
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    assert_eq!(revs, [next, last]);
    c.maintenance
        .hash_kv(HashKvRequest { revision: 0 })
        .await
        .unwrap();
    c.compact(next, true).await;
    assert_compacted(&url, b"k/01", next - 1).await;
    let (kvs_now, _, hash_now) = view_at(&url, 0).await;
    let config = srv.stop().await;

    // The flags still given: started as it was, no second bump.
    let mut again = config.clone();
    again.recovery.bump_revision = 1000;
    again.recovery.mark_compacted = true;
    let srv = TestServer::start(again).await;
    assert_eq!(view_at(&srv.url(), 0).await, (kvs_now, last, hash_now));
    let mut c = Clients::connect(&srv.url()).await;
    assert_eq!(c.put("k/more", "y").await, last + 1);
    srv.stop().await;
    println!("took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_recovery_serves_the_target_state_and_the_guard_refuses_it() {
    let t0 = Instant::now();
    let dir = fresh_dir("pitr");
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    chown_to_postgres(&dir);
    chown_to_postgres(&archive);
    let a = archive.display().to_string();
    let mut primary = own_postgres(
        &dir.join("primary"),
        vec![
            ("archive_mode".into(), "on".into()),
            (
                "archive_command".into(),
                format!("test ! -f {a}/%f && cp %p {a}/%f"),
            ),
        ],
    );
    let mut config = test_config();
    config.storage.postgres_url = Some(primary.tcp_url("postgres"));
    let ks = config.storage.keyspace.clone();
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    write(&mut c, "a", 40).await;

    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    chown_to_postgres(&base);
    let port = primary.options().port.to_string();
    let data = base.join("data");
    tool(
        "pg_basebackup",
        &[
            "-D",
            data.to_str().unwrap(),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
        true,
    );
    let early = write(&mut c, "b", 40).await;
    let target = write(&mut c, "c", 30).await;
    let pg = admin(&primary).await;
    pg.execute("SELECT pg_create_restore_point('pgetcd_target')", &[])
        .await
        .unwrap();
    let at_target = view_at(&srv.url(), target).await;
    let at_early = view_at(&srv.url(), early).await;
    let served = write(&mut c, "d", 50).await;
    let segment: String = pg
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .unwrap()
        .get(0);
    pg.execute("SELECT pg_switch_wal()", &[]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !archive.join(&segment).exists() {
        assert!(Instant::now() < deadline, "{segment} was not archived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = srv.stop().await;
    primary.stop();

    // Recovery of the base backup to the restore point, then promotion.
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    let auto = data.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    conf.push_str(&format!(
        "restore_command = 'cp {a}/%f %p'\n\
         recovery_target_name = 'pgetcd_target'\n\
         recovery_target_action = 'promote'\n\
         archive_mode = 'off'\n"
    ));
    std::fs::write(&auto, conf).unwrap();
    chown_to_postgres(&auto);
    chown_to_postgres(&data.join("recovery.signal"));
    let recovered =
        LocalPostgres::start(throwaway_options(&base, free_port().unwrap(), Vec::new())).unwrap();
    let db = admin(&recovered).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(Instant::now() < deadline, "recovery did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(meta_revision(&db, &ks).await, target);

    // The instance that served more refuses it.
    let mut on_recovered = config.clone();
    on_recovered.storage.postgres_url = Some(recovered.tcp_url("postgres"));
    let why = refused(on_recovered.clone()).await;
    assert!(
        why.contains(&format!("at revision {target}, below revision {served}")),
        "{why}"
    );

    // What it serves is exactly what was served at the target (seen by an instance
    // with no record of the keyspace).
    let mut fresh = on_recovered.clone();
    fresh.storage.data_dir = fresh_dir("data");
    let srv = TestServer::start(fresh).await;
    assert_eq!(view_at(&srv.url(), 0).await, at_target);
    let (kvs, _, hash) = view_at(&srv.url(), early).await;
    assert_eq!((kvs, hash), (at_early.0, at_early.2));
    srv.stop().await;

    // Bumped, it goes on above everything served.
    on_recovered.recovery.bump_revision = 1_000_000;
    on_recovered.recovery.mark_compacted = true;
    let srv = TestServer::start(on_recovered).await;
    let mut c = Clients::connect(&srv.url()).await;
    let next = c.put("e/1", "after").await;
    assert_eq!(next, target + 1_000_001);
    assert_watch_compacted(&srv.url(), served, target + 1_000_000).await;
    srv.stop().await;
    println!("took {:?}", t0.elapsed());
}

/// The Postgres store's bump, below the server: fenced like a commit, refused unless
/// above, and a keyspace bumped over many history partitions writes, loads and compacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_bumps_fenced_and_writes_compacts_and_loads_after() {
    use pgetcd_storage::{Outcome, Store};
    use pgetcd_storage_postgres::{PgStore, PgStoreConfig};
    let mut config = test_config();
    config.storage.history_partition_revisions = 100;
    let ks = config.storage.keyspace.clone();
    let srv = TestServer::start(config.clone()).await;
    let mut c = Clients::connect(&srv.url()).await;
    let before = write(&mut c, "p", 150).await;
    let config = srv.stop().await;

    let mut store_config = PgStoreConfig::new(config.storage.postgres_url.clone().unwrap());
    store_config.schema = ks.clone();
    store_config.partition_revisions = 100;
    let store = PgStore::new(&store_config).unwrap();
    let (fence, meta) = store.fence().await.unwrap();
    assert_eq!(meta.revision, before);
    assert!(
        store
            .bump_revision(&fence, before, before, true)
            .await
            .is_err()
    );
    let (newer, _) = store.fence().await.unwrap();
    let fenced = store
        .bump_revision(&fence, before, before + 10_000, true)
        .await
        .unwrap_err();
    assert_eq!(fenced.outcome(), Outcome::Fenced, "{fenced}");
    let stale = store
        .bump_revision(&newer, before - 1, before + 10_000, true)
        .await
        .unwrap_err();
    assert_eq!(stale.outcome(), Outcome::Fenced, "{stale}");
    let bumped = store
        .bump_revision(&newer, before, before + 10_000, true)
        .await
        .unwrap();
    assert_eq!(
        (bumped.revision, bumped.compact_revision),
        (before + 10_000, before + 10_000)
    );
    let at_bump = view_at_store(&store).await;
    drop(store);

    // Served: a write 100 partitions further on, a compaction over the gap, a reload.
    let srv = TestServer::start(config).await;
    let url = srv.url();
    let mut c = Clients::connect(&url).await;
    assert_eq!(c.revision().await, before + 10_000);
    let next = c.put("p/next", "v").await;
    assert_eq!(next, before + 10_001);
    let partitions: i64 = admin_client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
             JOIN pg_namespace n ON n.oid = p.relnamespace WHERE n.nspname = $1 AND p.relname = 'history'",
            &[&ks],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        partitions < 10,
        "{partitions} partitions: the gap was filled"
    );
    c.compact(next, true).await;
    let now = view_at(&url, 0).await;
    let config = srv.stop().await;
    let srv = TestServer::start(config).await;
    assert_eq!(view_at(&srv.url(), 0).await, now);
    let (kvs, _, _) = now;
    let mut expect = at_bump;
    expect.push(("p/next".into(), next));
    expect.sort();
    let got: Vec<(String, i64)> = kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(got, expect);
    srv.stop().await;
}

/// The live keys of a store (key, mod revision), as loaded.
async fn view_at_store(store: &pgetcd_storage_postgres::PgStore) -> Vec<(String, i64)> {
    use pgetcd_storage::Store;
    let mut latest = std::collections::BTreeMap::new();
    store
        .load(&mut |key, version, _| {
            let key = String::from_utf8_lossy(&key).into_owned();
            let newer = latest
                .get(&key)
                .is_none_or(|v: &pgetcd_storage::Version| v.id() < version.id());
            if newer {
                latest.insert(key, version);
            }
        })
        .await
        .unwrap();
    latest
        .into_iter()
        .filter(|(_, v)| !v.is_tombstone())
        .map(|(k, v)| (k, v.mod_revision))
        .collect()
}
