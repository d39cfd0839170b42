//! `pgetcd snapshot restore` and Maintenance.Hash, against real etcd:
//! - the round trip: a real etcd 3.5 history (puts, deletes, txns, a lease, a physical
//!   compaction) is saved with `etcdctl snapshot save`, restored into a fresh keyspace
//!   by the `pgetcd` binary, served by pgetcd identically at every retained revision
//!   (keys, revisions, HashKV), saved again from pgetcd, restored into real etcd with
//!   etcdutl, and served identically again;
//! - Maintenance.Hash is etcd's algorithm: pgetcd's equals the hash of the file its
//!   Snapshot sends, and real etcd's equals the same walk over etcd's own snapshot file;
//!   two instances of a keyspace agree;
//! - bad files and refusals: a truncated file, a file damaged after 4,000 good
//!   revisions (the load is rolled back: nothing half-loaded), a non-empty keyspace
//!   (unless `--replace`), a keyspace being served.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    HashRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, kv_client::KvClient,
    lease_client::LeaseClient, maintenance_client::MaintenanceClient,
};
use pgetcd_proto::mvccpb::KeyValue;
use pgetcd_server::snapshot::hash::BackendHash;
use pgetcd_testkit::history::{assert_compacted, seed};
use pgetcd_testkit::{
    RealEtcd, TestServer, channel, etcdctl_binary, fresh_keyspace, postgres_url, test_config,
    view_at,
};
use prost::Message;
use sha2::Digest;

/// `etcdctl snapshot save` from `url` into `file`.
fn save(url: &str, file: &Path) {
    let out = Command::new(etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(["snapshot", "save"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl snapshot save: {}",
        text(&out)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pgetcd snapshot restore FILE` into `keyspace` of the test Postgres.
fn restore(file: &Path, keyspace: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgetcd"))
        .args(["snapshot", "restore"])
        .arg(file)
        .args(["--postgres-url", &postgres_url(), "--keyspace", keyspace])
        .args(["--log", "warn"])
        .args(extra)
        .output()
        .unwrap()
}

/// pgetcd on `keyspace`.
async fn serve(keyspace: &str) -> TestServer {
    let mut config = test_config();
    config.storage.keyspace = keyspace.to_owned();
    TestServer::start(config).await
}

/// Maintenance.Hash of `url`: (hash, header revision).
async fn hash(url: &str) -> (u32, i64) {
    let r = MaintenanceClient::new(channel(url).await)
        .hash(HashRequest {})
        .await
        .unwrap()
        .into_inner();
    (r.hash, r.header.unwrap().revision)
}

/// etcd's Hash of the database in a snapshot file (its trailer cut off).
fn file_hash(file: &Path) -> u32 {
    let data = std::fs::read(file).unwrap();
    let db = pgetcd_server::snapshot::restore::database(&data, false).unwrap();
    BackendHash::of_database(&pgetcd_bbolt::Db::open(db).unwrap()).unwrap()
}

/// Every view above the compact revision (where HashKV answers, in etcd too) must be
/// equal on both endpoints.
async fn assert_same_history(a: &str, b: &str, compact: i64, what: &str) {
    let (_, now, _) = view_at(b, 0).await;
    for at in (compact + 1..=now).chain([0]) {
        assert_eq!(
            view_at(a, at).await,
            view_at(b, at).await,
            "{what}, at {at}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_goes_through_pgetcd_and_back_into_etcd_unchanged() {
    let source = RealEtcd::start().await;
    let (lease, compact) = seed(&[&source.url]).await;
    let dir = tempfile::tempdir().unwrap();
    let from_etcd = dir.path().join("etcd.db");
    save(&source.url, &from_etcd);

    // Real etcd's Hash is the walk pgetcd implements, over etcd's own file.
    assert_eq!(hash(&source.url).await.0, file_hash(&from_etcd));

    let keyspace = fresh_keyspace();
    let out = restore(&from_etcd, &keyspace, &[]);
    assert!(out.status.success(), "restore: {}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("compact revision {compact}")),
        "{report}"
    );

    let pgetcd = serve(&keyspace).await;
    assert_same_history(&pgetcd.url(), &source.url, compact, "restored into pgetcd").await;
    assert_compacted(&pgetcd.url(), b"/s/01", compact - 1).await;
    let ttl = LeaseClient::new(channel(&pgetcd.url()).await)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 900);
    let mut keys = ttl.keys.clone();
    keys.sort();
    let mut etcd_keys = LeaseClient::new(channel(&source.url).await)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    etcd_keys.sort();
    assert_eq!(keys, etcd_keys, "the lease's keys");

    // And back out: pgetcd's snapshot restores into etcd, which serves the same.
    let from_pgetcd = dir.path().join("pgetcd.db");
    save(&pgetcd.url(), &from_pgetcd);
    let (pg_hash, pg_rev) = hash(&pgetcd.url()).await;
    assert_eq!(
        pg_hash,
        file_hash(&from_pgetcd),
        "Hash covers the snapshot's bytes"
    );
    assert_eq!(pg_rev, view_at(&source.url, 0).await.1);
    let back = RealEtcd::start_restored(&from_pgetcd).await;
    assert_same_history(&back.url, &source.url, compact, "back in etcd").await;
    assert_compacted(&back.url, b"/s/01", compact - 1).await;

    // A second instance of the keyspace agrees on Hash.
    let mut second = test_config();
    second.storage.keyspace = keyspace.clone();
    second.member.name = "second".into();
    let second = TestServer::start(second).await;
    assert_eq!(hash(&second.url()).await, (pg_hash, pg_rev));
    second.stop().await;

    // The keyspace is not empty now: a second restore is refused, unless --replace.
    let again = restore(&from_etcd, &keyspace, &[]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("is being served"),
        "while served: {}",
        text(&again)
    );
    pgetcd.stop().await;
    let again = restore(&from_etcd, &keyspace, &[]);
    assert!(!again.status.success());
    assert!(text(&again).contains("is not empty"), "{}", text(&again));
    let replaced = restore(&from_etcd, &keyspace, &["--replace"]);
    assert!(replaced.status.success(), "--replace: {}", text(&replaced));
    let pgetcd = serve(&keyspace).await;
    assert_same_history(&pgetcd.url(), &source.url, compact, "after --replace").await;
    pgetcd.stop().await;
}

/// A snapshot file of `n` puts of distinct keys (revisions 2..n+1), as etcd lays it
/// out, with the revision `damaged` (if any) stored under the wrong revision key.
fn synthetic_snapshot(path: &PathBuf, n: i64, damaged: Option<i64>) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = pgetcd_bbolt::Writer::new(file, 4096).unwrap();
    let none = || std::iter::empty::<(Vec<u8>, Vec<u8>)>();
    for name in ["alarm", "auth", "authRoles", "authUsers", "cluster"] {
        w.bucket(name.as_bytes(), none()).unwrap();
    }
    let keys = (2..n + 2).map(|rev| {
        let kv = KeyValue {
            key: Bytes::from(format!("/k/{rev:08}")),
            create_revision: rev,
            mod_revision: if Some(rev) == damaged { rev + 1 } else { rev },
            version: 1,
            value: Bytes::from(vec![b'v'; 100]),
            lease: 0,
        };
        (
            pgetcd_engine::revision_key(rev, 0, false),
            kv.encode_to_vec(),
        )
    });
    w.bucket(b"key", keys).unwrap();
    for name in ["lease", "members", "members_removed"] {
        w.bucket(name.as_bytes(), none()).unwrap();
    }
    w.bucket(
        b"meta",
        [(
            b"consistent_index".to_vec(),
            (n as u64).to_be_bytes().to_vec(),
        )],
    )
    .unwrap();
    w.finish(1).unwrap();
    let mut data = std::fs::read(path).unwrap();
    let sum = sha2::Sha256::digest(&data);
    data.extend_from_slice(&sum);
    std::fs::write(path, data).unwrap();
}

/// What the keyspace holds, read straight from Postgres.
async fn stored(keyspace: &str) -> (i64, i64, i64) {
    let pg = pgetcd_testkit::admin_client().await;
    let row = pg
        .query_one(
            &format!(
                "SELECT (SELECT revision FROM {keyspace}.meta), (SELECT count(*) FROM {keyspace}.history), \
                 (SELECT count(*) FROM {keyspace}.kv)"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_files_are_refused_and_nothing_is_half_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let keyspace = fresh_keyspace();
    // An empty keyspace, set up by a first pgetcd, with one key.
    let pgetcd = serve(&keyspace).await;
    let mut kv = KvClient::new(channel(&pgetcd.url()).await);
    kv.put(PutRequest {
        key: Bytes::from_static(b"/before"),
        value: Bytes::from_static(b"x"),
        ..Default::default()
    })
    .await
    .unwrap();
    pgetcd.stop().await;
    let before = stored(&keyspace).await;

    let good = dir.path().join("good.db");
    synthetic_snapshot(&good, 5000, None);
    // Truncated: no trailer any more, and with the check skipped, pages are missing.
    let data = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.db");
    std::fs::write(&truncated, &data[..data.len() / 2 + 100]).unwrap();
    let out = restore(&truncated, &keyspace, &["--replace"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no SHA-256 trailer"), "{}", text(&out));
    let out = restore(&truncated, &keyspace, &["--replace", "--skip-hash-check"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not a valid etcd snapshot"),
        "{}",
        text(&out)
    );
    // A flipped byte: the trailer no longer matches.
    let mut flipped = data.clone();
    flipped[4096 * 5 + 200] ^= 0xff;
    let flipped_file = dir.path().join("flipped.db");
    std::fs::write(&flipped_file, &flipped).unwrap();
    let out = restore(&flipped_file, &keyspace, &["--replace"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("integrity check failed"),
        "{}",
        text(&out)
    );
    // Damaged at revision 4,000, with a valid trailer: the first 3,998 revisions were
    // streamed into the load before the damage showed, and all of it is rolled back.
    let damaged = dir.path().join("damaged.db");
    synthetic_snapshot(&damaged, 5000, Some(4000));
    let out = restore(&damaged, &keyspace, &["--replace"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not a valid etcd snapshot: the KeyValue at revision 4000"),
        "{}",
        text(&out)
    );
    assert_eq!(stored(&keyspace).await, before, "nothing half-loaded");

    // The good file loads, and pgetcd serves it.
    let out = restore(&good, &keyspace, &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&keyspace).await, (5001, 5000, 5000));
    let pgetcd = serve(&keyspace).await;
    let r = KvClient::new(channel(&pgetcd.url()).await)
        .range(RangeRequest {
            key: Bytes::from_static(b"/k/"),
            range_end: Bytes::from_static(b"/k0"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.count, r.header.unwrap().revision), (5000, 5001));
    pgetcd.stop().await;
}
