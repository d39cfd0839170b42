//! KV behaviour through a real gRPC client: bad input gets etcd's exact errors and the
//! server keeps serving, writes survive restarts (managed Postgres included),
//! concurrent writers get unique revisions with read-your-writes, compaction drops
//! partitions, and a killed writer connection never loses an acknowledged write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, compare, request_op::Request,
};
use pgetcd_testkit::{Clients, TestServer, admin_client, test_config};
use tonic::Code;

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: Bytes::from(k.to_owned()),
        value: Bytes::from(v.to_owned()),
        ..Default::default()
    }
}

fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: Bytes::from(k.to_owned()),
        ..Default::default()
    }
}

fn all() -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(&[0]),
        range_end: Bytes::from_static(&[0]),
        ..Default::default()
    }
}

fn put_op(k: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(put(k, "v"))),
    }
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    let s = r.expect_err("expected an error");
    assert_eq!((s.code(), s.message()), (code, msg), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_etcd_errors_and_server_keeps_serving() {
    let srv = TestServer::start_default().await;
    let mut c = Clients::connect(&srv.url()).await;
    c.kv.put(put("k", "v")).await.unwrap();

    // Just above --max-request-bytes: etcd's own check.
    let big = PutRequest {
        key: "big".into(),
        value: Bytes::from(vec![b'x'; 1_572_864]),
        ..Default::default()
    };
    assert_status(
        c.kv.put(big).await,
        Code::InvalidArgument,
        "etcdserver: request is too large",
    );
    // Beyond the gRPC receive limit (max request bytes + 512 KiB): gRPC refuses it.
    let huge = PutRequest {
        key: "huge".into(),
        value: Bytes::from(vec![b'x'; 2_200_000]),
        ..Default::default()
    };
    let s = c.kv.put(huge).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message()
            .starts_with("grpc: received message larger than max ("),
        "{s:?}"
    );

    assert_status(
        c.kv.put(put("", "v")).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    assert_status(
        c.kv.range(get("")).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    assert_status(
        c.kv.delete_range(DeleteRangeRequest::default()).await,
        Code::InvalidArgument,
        "etcdserver: key is not provided",
    );
    let too_many = TxnRequest {
        success: (0..129).map(|i| put_op(&format!("k{i}"))).collect(),
        ..Default::default()
    };
    assert_status(
        c.kv.txn(too_many).await,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    let dup = TxnRequest {
        success: vec![put_op("d"), put_op("d")],
        ..Default::default()
    };
    assert_status(
        c.kv.txn(dup).await,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );
    let mut future = get("k");
    future.revision = 1000;
    assert_status(
        c.kv.range(future).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    for (order, target) in [(99, 0), (0, 99)] {
        let mut bad_sort = get("k");
        bad_sort.sort_order = order;
        bad_sort.sort_target = target;
        assert_status(
            c.kv.range(bad_sort).await,
            Code::InvalidArgument,
            "etcdserver: invalid sort option",
        );
    }
    let mut ignore = put("nokey", "");
    ignore.ignore_value = true;
    assert_status(
        c.kv.put(ignore).await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    );
    let mut with_value = put("k", "x");
    with_value.ignore_value = true;
    assert_status(
        c.kv.put(with_value).await,
        Code::InvalidArgument,
        "etcdserver: value is provided",
    );
    let mut leased = put("k", "x");
    leased.lease = 42;
    assert_status(
        c.kv.put(leased).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
    );

    c.kv.put(put("k", "v2")).await.unwrap();
    c.compact(3, false).await;
    let mut old = get("k");
    old.revision = 2;
    assert_status(
        c.kv.range(old).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_status(
        c.kv.compact(CompactionRequest {
            revision: 3,
            physical: false,
        })
        .await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_status(
        c.kv.compact(CompactionRequest {
            revision: 99,
            physical: false,
        })
        .await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    // Still serving, state intact.
    let r = c.kv.range(get("k")).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].value, Bytes::from_static(b"v2"));
    assert_eq!(r.kvs[0].version, 2);
    assert_eq!(r.header.unwrap().revision, 3);
    srv.stop().await;
}

/// `n` writes over `keys` keys `key/<i>`: a put each, and every `delete_every`-th
/// write also deletes another key.
async fn churn(c: &mut Clients, n: usize, keys: usize, delete_every: usize) {
    for i in 0..n {
        c.kv.put(put(&format!("key/{}", i % keys), &format!("value {i}")))
            .await
            .unwrap();
        if i % delete_every == 0 {
            c.kv.delete_range(DeleteRangeRequest {
                key: Bytes::from(format!("key/{}", (i + 3) % keys)),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
}

/// Every snapshot in `before` is served identically, and the revision below `compacted`
/// is refused as compacted.
async fn assert_state_after_restart(
    c: &mut Clients,
    before: &BTreeMap<i64, Snapshot>,
    compacted: i64,
) {
    for (r, want) in before {
        assert_eq!(
            &snapshot(c, *r).await,
            want,
            "state at revision {r} after restart"
        );
    }
    let mut old = all();
    old.revision = compacted - 1;
    assert_eq!(c.kv.range(old).await.unwrap_err().code(), Code::OutOfRange);
}

/// Every key at a revision: (key, create, mod, version, value).
type Snapshot = Vec<(Bytes, i64, i64, i64, Bytes)>;

async fn snapshot(c: &mut Clients, revision: i64) -> Snapshot {
    let mut r = all();
    r.revision = revision;
    c.kv.range(r)
        .await
        .unwrap()
        .into_inner()
        .kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key,
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv.value,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_postgres_restart_keeps_keys_revisions_and_compaction() {
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-managed", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = test_config();
    config.storage.postgres_url = None;
    config.storage.data_dir = dir.clone();
    config.storage.history_partition_revisions = 10;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    churn(&mut c, 40, 13, 7).await;
    c.compact(25, true).await;
    let rev = c.revision().await;
    let mut before = BTreeMap::new();
    for r in [25, 30, rev] {
        before.insert(r, snapshot(&mut c, r).await);
    }
    let config = srv.stop().await;

    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    assert_state_after_restart(&mut c, &before, 25).await;
    let next =
        c.kv.put(put("after", "restart"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(next.header.unwrap().revision, rev + 1);
    srv.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// As root (the usual case in containers, where `USER` is often unset), the managed
/// Postgres runs as the `postgres` user: the `pgetcd` binary, started without `USER`
/// and with its data directory under a parent closed to others (mode 0700), must
/// still start, its cluster placed where that user can reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_postgres_starts_without_user_under_a_closed_parent_directory() {
    use std::os::unix::fs::PermissionsExt;
    let parent = std::env::temp_dir().join(format!("pgetcd-test-{}-closed", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Where root's managed clusters go when the data directory is closed to others.
    let elsewhere = std::path::Path::new("/var/lib/pgetcd");
    let entries = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(elsewhere)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let before = entries();
    let port = pgetcd_localpg::free_port().unwrap();
    let metrics = pgetcd_localpg::free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgetcd"))
        .env_remove("USER")
        .arg("--data-dir")
        .arg(parent.join("data"))
        .args(["--listen-client-urls", &url])
        .args([
            "--listen-metrics-urls",
            &format!("http://127.0.0.1:{metrics}"),
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut listening = false;
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pgetcd exited before serving: {status}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revision = if listening {
        Some(Clients::connect(&url).await.put("k", "v").await)
    } else {
        None
    };
    // SIGTERM (kill's default) lets pgetcd stop its Postgres before the cleanup.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&parent);
    for made in entries().into_iter().filter(|e| !before.contains(e)) {
        let _ = std::fs::remove_dir_all(made);
    }
    assert_eq!(revision, Some(2), "pgetcd did not serve a put within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_get_unique_revisions_and_read_their_writes() {
    let srv = TestServer::start_default().await;
    let c = Clients::connect(&srv.url()).await;
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..25 {
                let key = format!("w{w}/k{i}");
                let r = c.kv.put(put(&key, "x")).await.unwrap().into_inner();
                let rev = r.header.unwrap().revision;
                let seen = c.kv.range(get(&key)).await.unwrap().into_inner();
                assert!(seen.header.unwrap().revision >= rev, "read-your-writes");
                assert_eq!(seen.kvs[0].mod_revision, rev);
                revs.push(rev);
            }
            revs
        }));
    }
    let mut all_revs = Vec::new();
    for t in tasks {
        all_revs.extend(t.await.unwrap());
    }
    all_revs.sort_unstable();
    let n = all_revs.len();
    all_revs.dedup();
    assert_eq!(all_revs.len(), n, "every write got its own revision");
    assert_eq!(all_revs, (2..2 + n as i64).collect::<Vec<_>>(), "no gaps");
    let mut c2 = c.clone();
    let mut count = all();
    count.count_only = true;
    assert_eq!(
        c2.kv.range(count).await.unwrap().into_inner().count,
        n as i64
    );
    srv.stop().await;
}

async fn partitions(keyspace: &str) -> Vec<String> {
    let client = admin_client().await;
    client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace \
             WHERE p.relname = 'history' AND n.nspname = $1 ORDER BY 1",
            &[&keyspace],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physical_compaction_drops_partitions_and_keeps_visible_versions() {
    let mut config = test_config();
    config.storage.history_partition_revisions = 10;
    config.engine.cache_bytes = 0;
    let keyspace = config.storage.keyspace.clone();
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    // "stable" is written once at revision 2 and must stay readable after its partition
    // is dropped; "hot" changes every revision.
    c.kv.put(put("stable", "s")).await.unwrap();
    for i in 0..45 {
        c.kv.put(put("hot", &format!("h{i}"))).await.unwrap();
    }
    let before = partitions(&keyspace).await;
    assert!(before.contains(&"history_p0".to_owned()), "{before:?}");
    c.compact(35, true).await;
    let after = partitions(&keyspace).await;
    assert!(!after.contains(&"history_p0".to_owned()), "{after:?}");
    assert!(!after.contains(&"history_p20".to_owned()), "{after:?}");
    assert!(after.contains(&"history_p30".to_owned()), "{after:?}");
    let mut at = get("stable");
    at.revision = 35;
    let r = c.kv.range(at).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].value, Bytes::from_static(b"s"));
    let mut hot = get("hot");
    hot.revision = 35;
    let r = c.kv.range(hot).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].value, Bytes::from_static(b"h32"));
    // A txn compare on the value read from Postgres (cache is off).
    let t = TxnRequest {
        compare: vec![Compare {
            key: "stable".into(),
            target: compare::CompareTarget::Value as i32,
            result: compare::CompareResult::Equal as i32,
            target_union: Some(compare::TargetUnion::Value("s".into())),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(c.kv.txn(t).await.unwrap().into_inner().succeeded);
    let config = srv.stop().await;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let mut at = get("stable");
    at.revision = 36;
    assert_eq!(
        c.kv.range(at).await.unwrap().into_inner().kvs[0].value,
        Bytes::from_static(b"s")
    );
    srv.stop().await;
}

/// A compaction records its revision in `meta` first and prunes Postgres afterwards,
/// off the write path. Stopped in between (here: the record made by hand while the
/// server is down, as a crash would leave it), the restarted server serves exactly the
/// state at and above that revision, refuses below it, and its next compaction prunes
/// the rest (deleted keys stay deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_recorded_but_not_pruned_is_finished_after_restart() {
    let mut config = test_config();
    config.storage.history_partition_revisions = 10;
    config.engine.cache_bytes = 0;
    let keyspace = config.storage.keyspace.clone();
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    churn(&mut c, 45, 7, 9).await;
    let cur = c.revision().await;
    let mut before = BTreeMap::new();
    for r in [30, 40, cur] {
        before.insert(r, snapshot(&mut c, r).await);
    }
    let config = srv.stop().await;
    admin_client()
        .await
        .execute(
            &format!("UPDATE {keyspace}.meta SET compact_revision = 30 WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    assert!(
        partitions(&keyspace)
            .await
            .contains(&"history_p0".to_owned())
    );

    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    assert_state_after_restart(&mut c, &before, 30).await;
    c.compact(40, true).await;
    let after = partitions(&keyspace).await;
    assert!(!after.contains(&"history_p0".to_owned()), "{after:?}");
    assert!(!after.contains(&"history_p30".to_owned()), "{after:?}");
    let config = srv.stop().await;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    for r in [40, cur] {
        assert_eq!(
            &snapshot(&mut c, r).await,
            &before[&r],
            "state at {r} after pruning"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_writer_connection_loses_no_acknowledged_write() {
    let config = test_config();
    let keyspace = config.storage.keyspace.clone();
    let srv = TestServer::start(config).await;
    let c = Clients::connect(&srv.url()).await;
    let admin = admin_client().await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..60 {
                let key = format!("w{w}/{i}");
                match c.kv.put(put(&key, &key)).await {
                    Ok(r) => acked.push((key, r.into_inner().header.unwrap().revision)),
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                        failed += 1;
                    }
                }
            }
            (acked, failed)
        }));
    }
    // Kill every backend of this keyspace's writer a few times while the load runs.
    let mut kills = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND datname = 'postgres' AND backend_type = 'client backend' \
                 AND query ILIKE $1",
                &[&format!("% {keyspace}.%")],
            )
            .await
            .unwrap();
        kills += rows.len();
    }
    let mut acked = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (a, f) = t.await.unwrap();
        acked.extend(a);
        failed += f;
    }
    let mut c = c.clone();
    for (key, rev) in &acked {
        let r = c.kv.range(get(key)).await.unwrap().into_inner();
        assert_eq!(r.kvs.len(), 1, "acknowledged {key} lost");
        assert_eq!(r.kvs[0].mod_revision, *rev);
    }
    println!(
        "{} acknowledged, {failed} failed, {kills} backends killed",
        acked.len()
    );
    assert!(acked.len() + failed == 480);
    srv.stop().await;
    // The same must hold when read back from Postgres.
    let srv = TestServer::start(srv_config(&keyspace)).await;
    let mut c = Clients::connect(&srv.url()).await;
    for (key, rev) in &acked {
        let r = c.kv.range(get(key)).await.unwrap().into_inner();
        assert_eq!(r.kvs[0].mod_revision, *rev, "{key} after restart");
    }
    srv.stop().await;
}

fn srv_config(keyspace: &str) -> pgetcd_server::Config {
    let mut c = test_config();
    c.storage.keyspace = keyspace.to_owned();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_fences_the_first() {
    let first = TestServer::start_default().await;
    let mut a = Clients::connect(&first.url()).await;
    a.kv.put(put("k", "from first")).await.unwrap();
    let second = TestServer::start(srv_config(&first.config.storage.keyspace)).await;
    let mut b = Clients::connect(&second.url()).await;
    // The first instance's next write fails: its epoch is stale.
    assert_status(
        a.kv.put(put("k", "lost")).await,
        Code::Unavailable,
        "etcdserver: not leader",
    );
    let s = a.kv.put(put("k", "lost")).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(first.running.engine.writer_failed());
    let r = b.kv.range(get("k")).await.unwrap().into_inner();
    assert_eq!(r.kvs[0].value, Bytes::from_static(b"from first"));
    let w =
        b.kv.put(put("k", "from second"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(w.header.unwrap().revision, 3);
    first.stop().await;
    second.stop().await;
}

/// A plain HTTP/1.1 GET: (status code, body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_raises_nospace_and_only_writes_that_add_data_fail() {
    use pgetcd_proto::etcdserverpb::{AlarmRequest, AlarmType, alarm_request::AlarmAction};
    let mut config = test_config();
    config.engine.quota_backend_bytes = 1;
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    // The keyspace is bigger than one byte as soon as it exists: the alarm comes up at
    // the first check.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = c
            .maintenance
            .alarm(AlarmRequest::default())
            .await
            .unwrap()
            .into_inner();
        if !a.alarms.is_empty() {
            assert_eq!(a.alarms[0].alarm, AlarmType::Nospace as i32);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no NOSPACE alarm");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nospace = "etcdserver: mvcc: database space exceeded";
    assert_status(
        c.kv.put(put("k", "v")).await,
        Code::ResourceExhausted,
        nospace,
    );
    let txn = TxnRequest {
        success: vec![put_op("t")],
        ..Default::default()
    };
    assert_status(c.kv.txn(txn).await, Code::ResourceExhausted, nospace);
    // Reads, deletes and compaction still work.
    c.kv.range(get("k")).await.unwrap();
    c.kv.delete_range(DeleteRangeRequest {
        key: "k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.compact(1, false).await;
    let status = c
        .maintenance
        .status(pgetcd_proto::etcdserverpb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.errors.iter().any(|e| e.contains("NOSPACE")),
        "{status:?}"
    );
    // The alarm is the member's (as etcd raises it), so disarming member 0's changes
    // nothing.
    let member_id = status.header.unwrap().member_id;
    let none = c
        .maintenance
        .alarm(AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            member_id: 0,
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.alarms.is_empty(), "{none:?}");
    assert_status(
        c.kv.put(put("k", "v")).await,
        Code::ResourceExhausted,
        nospace,
    );
    // Disarming the member's lets writes through until the next check (every second)
    // raises it again; a check landing between the two calls is retried.
    let mut written = false;
    for _ in 0..5 {
        let d = c
            .maintenance
            .alarm(AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id,
                alarm: AlarmType::Nospace as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(d.alarms.len() <= 1);
        match c.kv.put(put("k", "after disarm")).await {
            Ok(_) => {
                written = true;
                break;
            }
            Err(s) => assert_eq!(s.message(), nospace),
        }
    }
    assert!(written, "a write after disarming went through");
    srv.stop().await;
}

/// Alarms live in the keyspace: an alarm raised through one instance is listed by
/// another and refuses writes sent to it (forwarded to the writer), and it is still
/// raised after every instance restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_the_keyspaces_across_instances_and_restarts() {
    use pgetcd_proto::etcdserverpb::{
        AlarmMember, AlarmRequest, AlarmType, alarm_request::AlarmAction,
    };
    let config = test_config();
    let writer = TestServer::start(config.clone()).await;
    let mut other_config = config.clone();
    other_config.member.name = "other".into();
    other_config.storage.data_dir = pgetcd_testkit::fresh_dir("data");
    let other = TestServer::start(other_config.clone()).await;
    let mut w = Clients::connect(&writer.url()).await;
    let mut o = Clients::connect(&other.url()).await;
    let raise = AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: 5,
        alarm: AlarmType::Corrupt as i32,
    };
    w.maintenance.alarm(raise).await.unwrap();
    let get = AlarmRequest {
        action: AlarmAction::Get as i32,
        member_id: 0,
        alarm: AlarmType::None as i32,
    };
    let listed = o.maintenance.alarm(get).await.unwrap().into_inner().alarms;
    let corrupt = AlarmMember {
        member_id: 5,
        alarm: AlarmType::Corrupt as i32,
    };
    assert_eq!(listed, [corrupt]);
    let refused = o.kv.put(put("k", "v")).await.unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::DataLoss, "etcdserver: corrupt cluster")
    );
    other.stop().await;
    writer.stop().await;
    let writer = TestServer::start(config).await;
    let mut w = Clients::connect(&writer.url()).await;
    let listed = w.maintenance.alarm(get).await.unwrap().into_inner().alarms;
    assert_eq!(listed, [corrupt]);
    assert!(w.kv.put(put("k", "v")).await.is_err());
    let clear = AlarmRequest {
        action: AlarmAction::Deactivate as i32,
        ..raise
    };
    w.maintenance.alarm(clear).await.unwrap();
    w.kv.put(put("k", "v")).await.unwrap();
    writer.stop().await;
}
