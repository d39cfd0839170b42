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
            &[&vec![format!("pgetcd_{name}"), format!("pgetcd_{name}_writer_a")]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "its replication slots are gone");
}
