//! Postgres restarts under load: every acknowledged write survives, failed writes did
//! not happen, and a watcher that stayed connected to pgetcd sees exactly the
//! acknowledged writes, once each, in order. This binary runs its own Postgres so it
//! can restart it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use pgetcd_localpg::{LocalPostgres, Options, free_port};
use pgetcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest};
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, TestServer, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_loses_no_acknowledged_write_or_event() {
    let port = free_port().unwrap();
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-restart", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = Options {
        data_dir: dir.join("data"),
        socket_dir: dir.join("run"),
        port,
        listen_tcp: true,
        settings: vec![("fsync".into(), "off".into())],
        log_file: dir.join("postgres.log"),
    };
    let pg = LocalPostgres::start(opts.clone()).unwrap();
    let mut config = test_config();
    config.storage.postgres_url = Some(pg.tcp_url("postgres"));
    let srv = TestServer::start(config).await;
    let c = Clients::connect(&srv.url()).await;
    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: Bytes::from_static(b"r/"),
        range_end: Bytes::from_static(b"r0"),
        ..Default::default()
    })
    .await;

    let writer = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..400 {
                let put = PutRequest {
                    key: Bytes::from(format!("r/{}", i % 23)),
                    value: Bytes::from(format!("{i}")),
                    ..Default::default()
                };
                match c.kv.put(put).await {
                    Ok(r) => acked.push(r.into_inner().header.unwrap().revision),
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pg = pg;
    let restarted = tokio::task::spawn_blocking(move || {
        pg.stop();
        std::thread::sleep(Duration::from_millis(500));
        LocalPostgres::start(opts).unwrap()
    })
    .await
    .unwrap();
    let (acked, failed) = writer.await.unwrap();
    println!(
        "{} acknowledged, {failed} failed across the restart",
        acked.len()
    );
    assert!(!acked.is_empty());

    let mut c = c.clone();
    let last = *acked.last().unwrap();
    // Every acknowledged write is readable, and the revision space has no holes.
    let r =
        c.kv.range(RangeRequest {
            key: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.header.unwrap().revision,
        last,
        "no write beyond the acknowledged ones"
    );
    // The watcher sees exactly the acknowledged writes.
    w.wait_progress(last).await;
    let revs: Vec<i64> = w
        .responses()
        .iter()
        .filter(|r| r.watch_id == 0)
        .flat_map(|r| r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision))
        .collect();
    assert_eq!(
        revs, acked,
        "watch events = acknowledged writes, once each, in order"
    );
    srv.stop().await;
    tokio::task::spawn_blocking(move || drop(restarted))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_postgres_without_logical_wal() {
    let port = free_port().unwrap();
    let dir = std::env::temp_dir().join(format!("pgetcd-test-{}-replica", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = LocalPostgres::start(Options {
        data_dir: dir.join("data"),
        socket_dir: dir.join("run"),
        port,
        listen_tcp: true,
        settings: vec![("wal_level".into(), "replica".into())],
        log_file: dir.join("postgres.log"),
    })
    .unwrap();
    let mut config = test_config();
    config.storage.postgres_url = Some(pg.tcp_url("postgres"));
    let err = match pgetcd_server::start(config).await {
        Ok(_) => panic!("started on wal_level=replica"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("wal_level is 'replica'") && err.contains("wal_level = logical"),
        "{err}"
    );
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
