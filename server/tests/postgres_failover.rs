//! Postgres failover under three pgetcd instances: the keyspace's Postgres has a
//! streaming replica (synchronous, so nothing acknowledged is lost with the primary);
//! under write load the primary crashes, the replica is promoted, and the address the
//! instances use moves to it (a proxy standing for a virtual IP, HAProxy or a managed
//! endpoint). On Postgres 15 the replication slots do not survive the promotion. Every
//! instance must resynchronise and go on: every acknowledged write is there at its
//! revision on each, and the watchers on every instance see every revision exactly
//! once, in order, with prev_kv.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_localpg::{LocalPostgres, find_bindir, free_port, postgres_user};
use pgetcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest};
use pgetcd_testkit::proxy::TcpProxy;
use pgetcd_testkit::watch::{TestWatch, assert_every_revision};
use pgetcd_testkit::{Clients, TestServer, test_config, throwaway_options};

/// The primary's settings: synchronous commit (the throwaway default is off).
fn primary_settings() -> Vec<(String, String)> {
    vec![("synchronous_commit".into(), "on".into())]
}

async fn admin(pg: &LocalPostgres) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(&pg.connection_string("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
}

/// A streaming replica of `primary` in `dir`, taken with pg_basebackup (as the
/// postgres user when root) and started on a port of its own.
fn replica_of(primary: &LocalPostgres, dir: &Path, via_port: Option<u16>) -> LocalPostgres {
    let port = free_port().unwrap();
    let mut opts = throwaway_options(dir, port, Vec::new());
    opts.log_file = dir.join("replica.log");
    std::fs::create_dir_all(dir).unwrap();
    let user = postgres_user().unwrap();
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    }
    let mut cmd = Command::new(find_bindir().unwrap().join("pg_basebackup"));
    cmd.arg("-D")
        .arg(&opts.data_dir)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
        .args(["-p", &primary.options().port.to_string()]);
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(port) = via_port {
        // Replicate through `port` (a proxy the test can pause) instead.
        let auto = opts.data_dir.join("postgresql.auto.conf");
        let conf = std::fs::read_to_string(&auto).unwrap();
        let direct = format!("port={}", primary.options().port);
        assert!(conf.contains(&direct), "{conf}");
        std::fs::write(&auto, conf.replace(&direct, &format!("port={port}"))).unwrap();
    }
    LocalPostgres::start(opts).unwrap()
}

/// Waits until `primary` streams to a replica.
async fn wait_streaming(primary: &LocalPostgres) {
    let p = admin(primary).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the replica is not streaming");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Crashes `primary` (immediate shutdown: no checkpoint, clients cut), promotes
/// `replica` and moves `proxy` (the instances' address of Postgres) to it.
async fn fail_over(primary: &mut LocalPostgres, replica: &LocalPostgres, proxy: &TcpProxy) {
    primary.signal(3); // SIGQUIT
    primary.stop();
    proxy.cut();
    admin(replica)
        .await
        .execute("SELECT pg_promote(true, 60)", &[])
        .await
        .unwrap();
    proxy.retarget(([127, 0, 0, 1], replica.options().port).into());
}

async fn instance(name: &str, keyspace: &str, url: &str) -> TestServer {
    let mut config = test_config();
    config.member.name = name.into();
    config.storage.keyspace = keyspace.into();
    config.storage.postgres_url = Some(url.to_owned());
    TestServer::start(config).await
}

/// Acknowledged puts: key → (value, revision).
type Acked = Arc<Mutex<BTreeMap<String, (String, i64)>>>;

/// Puts unique keys through the instances in turn until `stop`, retrying each put
/// (on another instance) until it is acknowledged. Records the longest time no put
/// was acknowledged.
async fn load(urls: Vec<String>, acked: Acked, stop: Arc<AtomicBool>) -> Duration {
    let mut clients = Vec::new();
    for u in &urls {
        clients.push(Clients::connect(u).await);
    }
    let mut longest = Duration::ZERO;
    let mut last_ack = Instant::now();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("/k/{i:06}");
        let value = format!("v{i}");
        let mut attempt = 0usize;
        loop {
            let c = &mut clients[(i + attempt) % urls.len()];
            let put = c.kv.put(PutRequest {
                key: Bytes::from(key.clone()),
                value: Bytes::from(value.clone()),
                ..Default::default()
            });
            match tokio::time::timeout(Duration::from_secs(10), put).await {
                Ok(Ok(r)) => {
                    let rev = r.into_inner().header.unwrap().revision;
                    acked.lock().insert(key.clone(), (value.clone(), rev));
                    longest = longest.max(last_ack.elapsed());
                    last_ack = Instant::now();
                    break;
                }
                _ => {
                    attempt += 1;
                    assert!(
                        last_ack.elapsed() < Duration::from_secs(60),
                        "no put acknowledged for a minute"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        i += 1;
    }
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_resynchronise_after_a_promoted_replica_takes_over() {
    let dir = tempfile::Builder::new()
        .prefix("pgetcd-failover-")
        .tempdir()
        .unwrap();
    let mut primary = LocalPostgres::start(throwaway_options(
        &dir.path().join("primary"),
        free_port().unwrap(),
        primary_settings(),
    ))
    .unwrap();
    let replica = replica_of(&primary, &dir.path().join("replica"), None);
    wait_streaming(&primary).await;
    // Commits wait for the replica from here on.
    let p = admin(&primary).await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        p.batch_execute(sql).await.unwrap();
    }
    drop(p);

    let proxy = TcpProxy::start(([127, 0, 0, 1], primary.options().port).into()).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port()
    );
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace, &url).await;
    let b = instance("b", &keyspace, &url).await;
    let c = instance("c", &keyspace, &url).await;
    let instances = [&a, &b, &c];
    let from = Clients::connect(&a.url()).await.put("/start", "0").await;
    let mut watches = Vec::new();
    for s in instances {
        let w = TestWatch::open(&s.url()).await;
        w.create(WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: from,
            prev_kv: true,
            ..Default::default()
        })
        .await;
        watches.push(w);
    }

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let urls = instances.iter().map(|s| s.url()).collect();
    let loading = tokio::spawn(load(urls, acked.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The primary crashes (immediate shutdown: no checkpoint, clients cut), the
    // replica is promoted and the address moves to it.
    let slots = |pg: &'static str| {
        format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgetcd_{keyspace}%' /* {pg} */"
        )
    };
    let on_replica = admin(&replica).await;
    let count = |n: tokio_postgres::Row| n.get::<_, i64>(0);
    assert_eq!(
        count(on_replica.query_one(&slots("replica"), &[]).await.unwrap()),
        0
    );
    let before = acked.lock().len();
    fail_over(&mut primary, &replica, &proxy).await;
    let failed_over = Instant::now();
    let deadline = failed_over + Duration::from_secs(60);
    while acked.lock().len() < before + 10 {
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "writes resumed {:?} after the promotion",
        failed_over.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    // The slots were lost with the primary; the instances made them anew (the default
    // slot and one per follower).
    assert!(count(on_replica.query_one(&slots("promoted"), &[]).await.unwrap()) >= 3);
    let longest_stall = loading.await.unwrap();
    println!("longest time without an acknowledged put: {longest_stall:?}");

    let acked = acked.lock().clone();
    let last = acked.values().map(|(_, r)| *r).max().unwrap();
    let writers = instances
        .iter()
        .filter(|s| !s.running.node.engine().is_follower())
        .count();
    assert_eq!(writers, 1, "one writer after the failover");
    for (s, w) in instances.iter().zip(&watches) {
        s.running
            .node
            .engine()
            .wait_applied(last, Duration::from_secs(30))
            .await
            .unwrap();
        // Every acknowledged write, at its revision.
        let got = s
            .running
            .node
            .engine()
            .range(&RangeRequest {
                key: Bytes::from_static(b"/k/"),
                range_end: Bytes::from_static(b"/k0"),
                serializable: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let found: BTreeMap<String, (String, i64)> = got
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8(kv.key.to_vec()).unwrap(),
                    (
                        String::from_utf8(kv.value.to_vec()).unwrap(),
                        kv.mod_revision,
                    ),
                )
            })
            .collect();
        for (k, v) in &acked {
            assert_eq!(found.get(k), Some(v), "{k} on {}", s.config.member.name);
        }
        // A put retried after an error may have landed twice: then it is a later
        // revision of the same key, and the watchers see both.
        let deadline = Instant::now() + Duration::from_secs(30);
        let top = s.running.node.engine().stats().revision;
        while !w
            .responses()
            .iter()
            .flat_map(|r| r.events.iter())
            .any(|e| e.kv.as_ref().unwrap().mod_revision == top)
        {
            assert!(Instant::now() < deadline, "watch did not reach {top}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_every_revision(&w.responses(), from, top);
    }
    drop(watches);
    for s in [c, b, a] {
        s.stop().await;
    }
    drop(replica);
}

/// With asynchronous replication a promoted replica can miss acknowledged writes (the
/// reason to run it synchronously). pgetcd cannot bring them back, but it must not get
/// stuck: the writer's next commit finds the store's revision behind its own and
/// stops, the role is given up and taken again on what the store holds, followers that
/// find the store behind them reload, and writes go on. Every instance then serves the
/// store's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_go_on_after_an_asynchronous_replica_lost_acknowledged_writes() {
    let dir = tempfile::Builder::new()
        .prefix("pgetcd-failover-")
        .tempdir()
        .unwrap();
    let mut primary = LocalPostgres::start(throwaway_options(
        &dir.path().join("primary"),
        free_port().unwrap(),
        primary_settings(),
    ))
    .unwrap();
    let replication = TcpProxy::start(([127, 0, 0, 1], primary.options().port).into()).await;
    let replica = replica_of(
        &primary,
        &dir.path().join("replica"),
        Some(replication.port()),
    );
    wait_streaming(&primary).await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], primary.options().port).into()).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port()
    );
    let keyspace = pgetcd_testkit::fresh_keyspace();
    let a = instance("a", &keyspace, &url).await;
    let b = instance("b", &keyspace, &url).await;
    let from = Clients::connect(&a.url()).await.put("/start", "0").await;
    let watch_from_start = |url: String| async move {
        let w = TestWatch::open(&url).await;
        w.create(WatchCreateRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            start_revision: from,
            prev_kv: true,
            ..Default::default()
        })
        .await;
        w
    };
    let early = [
        watch_from_start(a.url()).await,
        watch_from_start(b.url()).await,
    ];
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let loading = tokio::spawn(load(vec![a.url(), b.url()], acked.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The replica stops receiving; the primary acknowledges writes it alone has.
    replication.pause();
    replication.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = acked.lock().len();
    fail_over(&mut primary, &replica, &proxy).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().len() < before + 20 {
        assert!(Instant::now() < deadline, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    loading.await.unwrap();

    let store_revision: i64 = admin(&replica)
        .await
        .query_one(&format!("SELECT revision FROM {keyspace}.meta"), &[])
        .await
        .unwrap()
        .get(0);
    let writers = [&a, &b]
        .iter()
        .filter(|s| !s.running.node.engine().is_follower())
        .count();
    assert_eq!(writers, 1, "one writer");
    let all = |s: &TestServer| {
        let engine = s.running.node.engine();
        async move {
            engine
                .wait_applied(store_revision, Duration::from_secs(30))
                .await
                .unwrap();
            let mut r = engine
                .range(&RangeRequest {
                    key: Bytes::from_static(b"\0"),
                    range_end: Bytes::from_static(b"\0"),
                    serializable: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            r.header = None;
            r
        }
    };
    let (on_a, on_b) = (all(&a).await, all(&b).await);
    assert_eq!(on_a, on_b, "the instances disagree");
    let acked = acked.lock().clone();
    let lost = acked
        .iter()
        .filter(|(k, (v, rev))| {
            !on_a.kvs.iter().any(|kv| {
                kv.key == k.as_bytes() && kv.value == v.as_bytes() && kv.mod_revision == *rev
            })
        })
        .count();
    println!(
        "{} puts acknowledged, {lost} lost with the asynchronous replica",
        acked.len()
    );
    assert!(lost > 0, "the replica lost nothing: the test did not test");

    // Watchers that were told of lost revisions are cancelled as compacted (their
    // revisions are assigned again), never left to skip; a watcher opened now sees the
    // store's history, every revision once.
    for w in &early {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.responses().iter().any(|r| r.canceled) {
            assert!(
                Instant::now() < deadline,
                "a watcher that saw lost revisions goes on"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cancel = w.responses().into_iter().find(|r| r.canceled).unwrap();
        assert!(cancel.compact_revision > 0, "{cancel:?}");
    }
    for s in [&a, &b] {
        let w = watch_from_start(s.url()).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !w
            .responses()
            .iter()
            .flat_map(|r| r.events.iter())
            .any(|e| e.kv.as_ref().unwrap().mod_revision == store_revision)
        {
            assert!(
                Instant::now() < deadline,
                "the new watcher did not reach {store_revision}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_every_revision(&w.responses(), from, store_revision);
    }
    b.stop().await;
    a.stop().await;
    drop(replica);
}
