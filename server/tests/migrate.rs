//! `pgetcd migrate --from URL`, live, against a real etcd 3.5 under write load (puts,
//! deletes, txns, leases granted with keys and revoked):
//! - from a snapshot: after cutover, pgetcd serves what the source serves at every
//!   revision above the source's compaction (keys, revisions, versions, HashKV) and the
//!   same leases with their TTLs and keys;
//! - the cutover refuses while the source accepts writes, and goes through once the
//!   source refuses them (NOSPACE alarm, as `--freeze-source` sets it);
//! - from a Range (`--initial-copy range`): the keys at the copy's revision and every
//!   revision after it are the source's;
//! - a cutover is decided at the signal, not at the next lease poll a second later
//!   (that second is in a migration's write-unavailability window).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    AlarmRequest, AlarmType, DeleteRangeRequest, LeaseGrantRequest, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, TxnRequest,
    alarm_request::AlarmAction, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient,
};
use pgetcd_testkit::history::{put_op, seed};
use pgetcd_testkit::{
    RealEtcd, TestServer, channel, fresh_keyspace, postgres_url, retry_unavailable, test_config,
    view_at,
};

/// `pgetcd migrate` running as a process, its output in a file.
struct Migration {
    child: Child,
    log: PathBuf,
}

impl Migration {
    fn start(from: &str, keyspace: &str, dir: &Path, extra: &[&str]) -> Migration {
        let log = dir.join(format!("migrate-{keyspace}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgetcd"))
            .arg("migrate")
            .args(["--from", from])
            .args(["--postgres-url", &postgres_url(), "--keyspace", keyspace])
            .args(["--log", "info"])
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Migration { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `text`.
    async fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.output().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "migrate exited ({status}) before {text:?}: {}",
                    self.output()
                );
            }
            assert!(Instant::now() < deadline, "no {text:?}: {}", self.output());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the exit; its success and output.
    async fn exit(&mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.output());
            }
            assert!(
                Instant::now() < deadline,
                "migrate did not exit: {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes to the source until `stop`: puts, deletes, two-key txns, leases granted
/// with a key attached, and revoked. Returns how many writes were made.
async fn write_load(url: String, stop: Arc<AtomicBool>) -> u64 {
    let ch = channel(&url).await;
    let mut kv = KvClient::new(ch.clone());
    let mut leases = LeaseClient::new(ch);
    let mut granted = Vec::new();
    let mut n = 0u64;
    // The reference etcd, starved of CPU on a busy machine, may answer a write with
    // "leader changed": the load goes on (the test compares what the source holds
    // with what pgetcd holds, not with what was asked for).
    let mut ok = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = Bytes::from(format!("/m/{:02}", n % 40));
        n += 1;
        let done = match n % 10 {
            3 => kv
                .delete_range(DeleteRangeRequest {
                    key,
                    ..Default::default()
                })
                .await
                .is_ok(),
            5 => kv
                .txn(TxnRequest {
                    success: vec![
                        put_op(&key, &format!("t{n}"), 0),
                        put_op(&Bytes::from(format!("/m/txn/{n}")), "y", 0),
                    ],
                    ..Default::default()
                })
                .await
                .is_ok(),
            7 => match leases
                .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
                .await
            {
                Ok(r) => {
                    let id = r.into_inner().id;
                    granted.push(id);
                    kv.put(PutRequest {
                        key: Bytes::from(format!("/m/leased/{n}")),
                        value: Bytes::from_static(b"l"),
                        lease: id,
                        ..Default::default()
                    })
                    .await
                    .is_ok()
                }
                Err(_) => false,
            },
            9 if granted.len() > 2 => {
                let id = granted.remove(0);
                leases.lease_revoke(LeaseRevokeRequest { id }).await.is_ok()
            }
            _ => kv
                .put(PutRequest {
                    key,
                    value: Bytes::from(format!("v{n}")),
                    ..Default::default()
                })
                .await
                .is_ok(),
        };
        ok += u64::from(done);
    }
    ok
}

/// Every lease with its granted TTL and keys.
async fn leases_of(url: &str) -> Vec<(i64, i64, Vec<Bytes>)> {
    let ch = channel(url).await;
    let mut client = LeaseClient::new(ch);
    let mut ids: Vec<i64> = client
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases
        .iter()
        .map(|l| l.id)
        .collect();
    ids.sort_unstable();
    let mut out = Vec::new();
    for id in ids {
        let t = client
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await
            .unwrap()
            .into_inner();
        let mut keys = t.keys;
        keys.sort();
        out.push((id, t.granted_ttl, keys));
    }
    out
}

async fn freeze(url: &str) {
    MaintenanceClient::new(channel(url).await)
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 0,
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .unwrap();
}

async fn serve(keyspace: &str) -> TestServer {
    let mut config = test_config();
    config.storage.keyspace = keyspace.to_owned();
    TestServer::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_etcd_is_migrated_with_its_revisions_and_leases() {
    let source = RealEtcd::start().await;
    let (_, compact) = seed(&[&source.url]).await;
    let dir = tempfile::tempdir().unwrap();
    let keyspace = fresh_keyspace();
    let stop = Arc::new(AtomicBool::new(false));
    // Writes go on while the snapshot is taken and loaded, and while it follows.
    let load = tokio::spawn(write_load(source.url.clone(), stop.clone()));
    let mut migration = Migration::start(&source.url, &keyspace, dir.path(), &[]);
    migration.wait_for("following the source").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = load.await.unwrap();
    assert!(writes > 100, "only {writes} writes");

    // The source still accepts writes: the cutover is refused, following goes on.
    migration.terminate();
    migration
        .wait_for("cutover refused: the source still accepts writes")
        .await;
    assert!(migration.child.try_wait().unwrap().is_none());
    // Frozen (as --freeze-source does), it goes through.
    freeze(&source.url).await;
    migration.terminate();
    let (ok, out) = migration.exit().await;
    assert!(ok, "migrate: {out}");
    let (_, now, _) = view_at(&source.url, 0).await;
    assert!(
        out.contains(&format!("cut over at revision {now}")),
        "{out}"
    );

    let pgetcd = serve(&keyspace).await;
    for at in (compact + 1..=now).chain([0]) {
        assert_eq!(
            view_at(&pgetcd.url(), at).await,
            view_at(&source.url, at).await,
            "at {at}"
        );
    }
    let leases = leases_of(&source.url).await;
    assert!(leases.len() > 2, "{leases:?}");
    assert_eq!(leases_of(&pgetcd.url()).await, leases);
    pgetcd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_by_range_keeps_the_revisions_from_its_copy_on() {
    let source = RealEtcd::start().await;
    seed(&[&source.url]).await;
    let (_, copy_from, _) = view_at(&source.url, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let keyspace = fresh_keyspace();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(write_load(source.url.clone(), stop.clone()));
    let mut migration = Migration::start(
        &source.url,
        &keyspace,
        dir.path(),
        &["--initial-copy", "range", "--freeze-source"],
    );
    migration.wait_for("following the source").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    migration.terminate();
    let (ok, out) = migration.exit().await;
    assert!(ok, "migrate: {out}");
    assert!(out.contains("NOSPACE alarm"), "{out}");

    let pgetcd = serve(&keyspace).await;
    let (_, now, _) = view_at(&source.url, 0).await;
    let kv_pg = KvClient::new(channel(&pgetcd.url()).await);
    let kv_etcd = KvClient::new(channel(&source.url).await);
    // The copy's revision is at least the one read before the migration started.
    let mut served = 0;
    for at in (copy_from..=now).chain([0]) {
        let all = |revision| RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            revision,
            ..Default::default()
        };
        let a = retry_unavailable(|| {
            let mut kv = kv_pg.clone();
            async move { kv.range(all(at)).await }
        })
        .await;
        let b = retry_unavailable(|| {
            let mut kv = kv_etcd.clone();
            async move { kv.range(all(at)).await }
        })
        .await
        .unwrap()
        .into_inner();
        match a {
            Ok(a) => {
                let a = a.into_inner();
                assert_eq!(a.kvs, b.kvs, "at {at}");
                assert_eq!(a.header.unwrap().revision, b.header.unwrap().revision);
                served += 1;
            }
            // Below the copy's revision pgetcd has no history: etcd's compacted error.
            Err(e) => assert_eq!(
                e.message(),
                "etcdserver: mvcc: required revision has been compacted",
                "at {at}"
            ),
        }
    }
    assert!(served > 50, "only {served} revisions served");
    assert_eq!(leases_of(&pgetcd.url()).await, leases_of(&source.url).await);
    pgetcd.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_reaches_an_etcd_that_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pgetcd_testkit::pki::TestPki::generate(dir.path());
    let source = RealEtcd::start_tls(&pki).await;
    let tls = || {
        pgetcd_testkit::tls_channel(
            &source.url,
            &pki.ca,
            Some((&pki.client_cert, &pki.client_key)),
        )
    };
    let mut kv = KvClient::new(tls().await.unwrap());
    for i in 0..50 {
        kv.put(PutRequest {
            key: Bytes::from(format!("/tls/{i}")),
            value: Bytes::from(format!("v{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let ca = pki.ca.to_str().unwrap();
    let (cert, key) = (
        pki.client_cert.to_str().unwrap(),
        pki.client_key.to_str().unwrap(),
    );
    // Without a client certificate the source refuses it: a clear error, nothing kept.
    let keyspace = fresh_keyspace();
    let mut refused = Migration::start(&source.url, &keyspace, dir.path(), &["--from-cacert", ca]);
    let (ok, out) = refused.exit().await;
    assert!(!ok, "{out}");
    assert!(out.contains("pgetcd: "), "{out}");

    let mut migration = Migration::start(
        &source.url,
        &keyspace,
        dir.path(),
        &[
            "--from-cacert",
            ca,
            "--from-cert",
            cert,
            "--from-key",
            key,
            "--freeze-source",
        ],
    );
    migration.wait_for("following the source").await;
    migration.terminate();
    let (ok, out) = migration.exit().await;
    assert!(ok, "migrate: {out}");
    let pgetcd = serve(&keyspace).await;
    let all = || RangeRequest {
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
        ..Default::default()
    };
    let a = KvClient::new(channel(&pgetcd.url()).await)
        .range(all())
        .await
        .unwrap()
        .into_inner();
    let b = kv.range(all()).await.unwrap().into_inner();
    assert_eq!(a.kvs, b.kvs);
    assert_eq!(a.kvs.len(), 50);
    assert_eq!(a.header.unwrap().revision, b.header.unwrap().revision);
    pgetcd.stop().await;
}

/// Each signal gets its answer (how fast is measured by the Kubernetes harness,
/// docs/kubernetes.md, not here); a frozen source's cutover takes its revision as read
/// after the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signal_is_answered_and_the_cutover_takes_the_frozen_revision() {
    let source = RealEtcd::start().await;
    seed(&[&source.url]).await;
    let dir = tempfile::tempdir().unwrap();
    let keyspace = fresh_keyspace();
    let mut migration = Migration::start(&source.url, &keyspace, dir.path(), &[]);
    migration.wait_for("following the source").await;
    // Not frozen: each signal is refused, and following goes on.
    let refused = "cutover refused: the source still accepts writes";
    for n in 1..=3 {
        migration.terminate();
        let deadline = Instant::now() + Duration::from_secs(10);
        while migration.output().matches(refused).count() < n {
            assert!(Instant::now() < deadline, "{}", migration.output());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(migration.child.try_wait().unwrap().is_none());
    }
    // A write just before the freeze is in the cutover.
    let written = pgetcd_testkit::Clients::connect(&source.url)
        .await
        .put("/last/before/freeze", "x")
        .await;
    freeze(&source.url).await;
    migration.terminate();
    let (ok, out) = migration.exit().await;
    assert!(ok, "migrate: {out}");
    assert!(
        out.contains(&format!("cut over at revision {written}")),
        "{out}"
    );
}
