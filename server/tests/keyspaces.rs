//! Several keyspaces in one process (`--serve-keyspace`), on two separate Postgres
//! clusters: each has its own revisions, keys, leases and watches on its own client
//! URL; `/metrics` shows both, labelled; and when one keyspace's Postgres stops, the
//! other goes on serving writes, reads and watches, while the stopped one fails and
//! comes back when its Postgres does.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_localpg::{LocalPostgres, free_port};
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseLeasesRequest, PutRequest, RangeRequest, WatchCreateRequest,
    kv_client::KvClient, lease_client::LeaseClient,
};
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{
    TestServer, channel, fresh_keyspace, http_get, test_config, throwaway_options,
};

async fn put(url: &str, key: &str) -> Result<i64, tonic::Status> {
    let r = KvClient::new(channel(url).await)
        .put(PutRequest {
            key: Bytes::from(key.to_owned()),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().header.unwrap().revision)
}

async fn count(url: &str) -> i64 {
    KvClient::new(channel(url).await)
        .range(RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspaces_on_two_postgres_clusters_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let options = throwaway_options(dir.path(), free_port().unwrap(), Vec::new());
    let mut second = LocalPostgres::start(options.clone()).unwrap();
    let events = fresh_keyspace();
    let mut config = test_config();
    let main = config.storage.keyspace.clone();
    config.keyspaces.serve_keyspace = vec![
        format!(
            "name={events} listen-client-urls=http://127.0.0.1:0 postgres-url={}",
            second.tcp_url("postgres")
        )
        .parse()
        .unwrap(),
    ];
    let server = TestServer::start(config).await;
    let main_url = server.url();
    let events_url = server.running.others[0].client_url();
    assert_ne!(main_url, events_url);

    // Separate revision spaces, keys and leases.
    for i in 0..3 {
        put(&main_url, &format!("/registry/pods/{i}"))
            .await
            .unwrap();
    }
    assert_eq!(put(&events_url, "/registry/events/e").await.unwrap(), 2);
    assert_eq!(put(&main_url, "/registry/pods/x").await.unwrap(), 5);
    assert_eq!((count(&main_url).await, count(&events_url).await), (4, 1));
    let lease = LeaseClient::new(channel(&events_url).await)
        .lease_grant(LeaseGrantRequest { ttl: 60, id: 99 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let leases_of = |url: String| async move {
        LeaseClient::new(channel(&url).await)
            .lease_leases(LeaseLeasesRequest {})
            .await
            .unwrap()
            .into_inner()
            .leases
            .len()
    };
    assert_eq!(lease, 99);
    assert_eq!(leases_of(main_url.clone()).await, 0);
    assert_eq!(leases_of(events_url.clone()).await, 1);

    // The process's /metrics shows both keyspaces, labelled.
    let (code, metrics) = http_get(server.running.metrics_addrs[0], "/metrics").await;
    assert_eq!(code, 200);
    for ks in [&main, &events] {
        assert!(
            metrics.contains(&format!(
                "etcd_debugging_mvcc_current_revision{{keyspace=\"{ks}\"}}"
            )),
            "no revision of {ks} in /metrics"
        );
    }

    // The events keyspace's Postgres stops: the main keyspace goes on.
    let watch = TestWatch::open(&main_url).await;
    watch
        .create(WatchCreateRequest {
            key: Bytes::from_static(b"/registry/pods/"),
            range_end: Bytes::from_static(b"/registry/pods0"),
            ..Default::default()
        })
        .await;
    second.stop();
    let failed = tokio::time::timeout(
        Duration::from_secs(30),
        put(&events_url, "/registry/events/f"),
    )
    .await
    .expect("the stopped keyspace answers");
    assert!(
        failed.is_err(),
        "a write to the stopped keyspace: {failed:?}"
    );
    let started = Instant::now();
    let mut last = 0;
    for i in 0..50 {
        last = tokio::time::timeout(
            Duration::from_secs(5),
            put(&main_url, &format!("/registry/pods/m{i}")),
        )
        .await
        .expect("the main keyspace answers while the other's Postgres is down")
        .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(count(&main_url).await, 54);
    watch.wait_progress(last).await;
    assert_eq!(
        watch.event_count(),
        50,
        "the main keyspace's watch saw every write"
    );

    // Its Postgres back, the events keyspace serves again, with its data.
    second = LocalPostgres::start(options).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rev = loop {
        match put(&events_url, "/registry/events/g").await {
            Ok(rev) => break rev,
            Err(e) if Instant::now() > deadline => {
                panic!("the events keyspace did not come back: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert!(rev >= 3, "{rev}");
    assert!(count(&events_url).await >= 2);
    server.stop().await;
    second.stop();
}

/// `pgetcd keyspace ...` against the test Postgres.
fn keyspace_cmd(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgetcd"))
        .arg("keyspace")
        .args(args)
        .args([
            "--postgres-url",
            &pgetcd_testkit::postgres_url(),
            "--log",
            "warn",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The list's line of `name`, split in columns.
fn listed(name: &str) -> Option<Vec<String>> {
    let (ok, out) = keyspace_cmd(&["list"]);
    assert!(ok, "{out}");
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspaces_are_created_listed_and_dropped_only_when_confirmed() {
    let name = fresh_keyspace();
    let (ok, out) = keyspace_cmd(&["create", "--keyspace", &name]);
    assert!(ok, "{out}");
    assert!(out.contains("revision 1"), "{out}");
    let cols = listed(&name).expect("the new keyspace is listed");
    assert_eq!(
        (cols[1].as_str(), cols[2].as_str(), cols[4].as_str()),
        ("1", "-1", "-")
    );

    let mut config = test_config();
    config.storage.keyspace = name.clone();
    config.member.name = "writer-a".into();
    let server = TestServer::start(config).await;
    for i in 0..5 {
        put(&server.url(), &format!("/k/{i}")).await.unwrap();
    }
    let cols = listed(&name).unwrap();
    assert_eq!((cols[1].as_str(), cols[4].as_str()), ("6", "writer-a"));
    assert!(cols[3].parse::<i64>().unwrap() > 0, "a size: {cols:?}");

    // Refused: no confirmation, a wrong one, an instance serving it.
    let (ok, out) = keyspace_cmd(&["drop", "--keyspace", &name]);
    assert!(!ok && out.contains(&format!("--confirm {name}")), "{out}");
    let (ok, _) = keyspace_cmd(&["drop", "--keyspace", &name, "--confirm", "other"]);
    assert!(!ok);
    let (ok, out) = keyspace_cmd(&["drop", "--keyspace", &name, "--confirm", &name]);
    assert!(!ok && out.contains("is being served"), "{out}");
    assert!(listed(&name).is_some());

    server.stop().await;
    let (ok, out) = keyspace_cmd(&["drop", "--keyspace", &name, "--confirm", &name]);
    assert!(ok, "{out}");
    assert!(listed(&name).is_none(), "dropped");
    let pg = pgetcd_testkit::admin_client().await;
    let slots: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &[&vec![
                format!("pgetcd_{name}"),
                format!("pgetcd_{name}_writer_a"),
            ]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "its replication slots are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_copied_to_another_keyspace_lands_above_both_revisions_and_reruns_cleanly() {
    // The source keyspace, served throughout: events (some on a lease) and pods.
    let mut config = test_config();
    config.member.name = "source".into();
    let source_ks = config.storage.keyspace.clone();
    let source = TestServer::start(config).await;
    let lease = LeaseClient::new(channel(&source.url()).await)
        .lease_grant(LeaseGrantRequest { ttl: 3600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut kv = KvClient::new(channel(&source.url()).await);
    for i in 0..30 {
        kv.put(PutRequest {
            key: Bytes::from(format!("/registry/events/default/e{i:02}")),
            value: Bytes::from(format!("event {i}")),
            lease: if i % 3 == 0 { lease } else { 0 },
            ..Default::default()
        })
        .await
        .unwrap();
        put(&source.url(), &format!("/registry/pods/p{i}"))
            .await
            .unwrap();
    }
    // The target keyspace has a history of its own, served and stopped.
    let mut config = test_config();
    let target_ks = config.storage.keyspace.clone();
    config.member.name = "target".into();
    let target = TestServer::start(config.clone()).await;
    for i in 0..70 {
        put(&target.url(), &format!("/registry/leases/l{i}"))
            .await
            .unwrap();
    }
    target.stop().await;
    let copy = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgetcd"))
            .args(["keyspace", "copy-prefix", "--prefix", "/registry/events/"])
            .args(["--from-keyspace", &source_ks, "--keyspace", &target_ks])
            .args([
                "--postgres-url",
                &pgetcd_testkit::postgres_url(),
                "--log",
                "warn",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "copy-prefix: {text}");
        text
    };
    let out = copy();
    // Source at 61 (a lease grant takes no revision), target at 71: written at 72.
    assert!(
        out.contains("30 keys written at revision 72, 0 already equal, 1 leases"),
        "{out}"
    );
    assert!(
        copy().contains("0 keys written at revision 0, 30 already equal"),
        "a rerun"
    );

    // One event changes in the source; the next copy updates just that one, above the
    // source's revision now.
    let changed = kv
        .put(PutRequest {
            key: Bytes::from_static(b"/registry/events/default/e05"),
            value: Bytes::from_static(b"event 5, again"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    assert_eq!(changed, 62);
    assert!(copy().contains("1 keys written at revision 73, 29 already equal"));

    let target = TestServer::start(config).await;
    let got = KvClient::new(channel(&target.url()).await)
        .range(RangeRequest {
            key: Bytes::from_static(b"/registry/events/"),
            range_end: Bytes::from_static(b"/registry/events0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.len(), 30);
    assert_eq!(got.header.unwrap().revision, 73);
    let e05 = got.kvs.iter().find(|k| k.key.ends_with(b"e05")).unwrap();
    assert_eq!(
        (
            e05.value.as_ref(),
            e05.create_revision,
            e05.mod_revision,
            e05.version
        ),
        (&b"event 5, again"[..], 72, 73, 2)
    );
    assert!(got.kvs.iter().all(|k| k.mod_revision >= 72));
    let attached = LeaseClient::new(channel(&target.url()).await)
        .lease_time_to_live(pgetcd_proto::etcdserverpb::LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((attached.granted_ttl, attached.keys.len()), (3600, 10));
    assert_eq!(
        count(&target.url()).await,
        100,
        "the target's own keys are still there"
    );
    target.stop().await;
    source.stop().await;
}
