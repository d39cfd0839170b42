//! Maintenance.Snapshot: the same history written to real etcd and to pgetcd;
//! `etcdctl snapshot save` against pgetcd succeeds, `etcdutl snapshot status` reads
//! the file, and a real etcd restored from it (`etcdutl snapshot restore`, which checks
//! the SHA-256 trailer) serves exactly what the source etcd and pgetcd serve: keys,
//! revisions and HashKV, now and at an older revision, the compaction and the lease.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use pgetcd_proto::etcdserverpb::{LeaseTimeToLiveRequest, lease_client::LeaseClient};
use pgetcd_testkit::history::{assert_compacted, seed};
use pgetcd_testkit::{RealEtcd, TestServer, channel, etcdctl_binary, etcdutl_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgetcd_snapshot_restores_into_real_etcd_that_serves_the_same() {
    let source = RealEtcd::start().await;
    let pgetcd = TestServer::start_default().await;
    let (lease, compact) = seed(&[&source.url, &pgetcd.url()]).await;
    for at in [0, compact + 5] {
        assert_eq!(
            pgetcd_testkit::view_at(&pgetcd.url(), at).await,
            pgetcd_testkit::view_at(&source.url, at).await,
            "before the snapshot, at {at}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgetcd.db");
    let out = Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", pgetcd.url()))
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl snapshot save: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = Command::new(etcdutl_binary())
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    let status_out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "etcdutl snapshot status: {status_out}"
    );
    let (_, revision, _) = pgetcd_testkit::view_at(&pgetcd.url(), 0).await;
    assert!(
        status_out.contains(&format!("\"revision\":{revision}")),
        "{status_out}"
    );

    let restored = RealEtcd::start_restored(&file).await;
    for at in [0, compact + 5] {
        assert_eq!(
            pgetcd_testkit::view_at(&restored.url, at).await,
            pgetcd_testkit::view_at(&source.url, at).await,
            "restored from pgetcd's snapshot, at {at}"
        );
    }
    assert_compacted(&restored.url, b"/s/01", compact - 1).await;
    let ttl = LeaseClient::new(channel(&restored.url).await)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 900);
    assert!(!ttl.keys.is_empty(), "the lease's keys are attached again");
    pgetcd.stop().await;
}
