//! Snapshots taken from a real etcd with `etcdctl snapshot save` are read back: the
//! buckets etcd writes, every revision of the `key` bucket (puts and tombstones) equal
//! to what was written, the compaction recorded in `meta`, the lease in `lease`, and
//! etcd's SHA-256 trailer. Damaged copies are refused, never panicked on. A snapshot
//! written again by [`Writer`] restores into real etcd, which then serves the same.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;

use bytes::Bytes;
use pgetcd_bbolt::{Db, Error, Value, Writer};
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, PutRequest, kv_client::KvClient,
    lease_client::LeaseClient,
};
use pgetcd_proto::mvccpb::KeyValue;
use prost::Message;
use sha2::Digest;

/// A revision key of etcd's `key` bucket: main and sub revision, big-endian, split by
/// `_`, with `t` appended for a tombstone.
fn revision_of(key: &[u8]) -> (i64, i64, bool) {
    assert!(key.len() == 17 || key.len() == 18, "revision key {key:?}");
    assert_eq!(key[8], b'_');
    let main = i64::from_be_bytes(key[..8].try_into().unwrap());
    let sub = i64::from_be_bytes(key[9..17].try_into().unwrap());
    (main, sub, key.len() == 18 && key[17] == b't')
}

/// Takes a snapshot of `url` with etcdctl; the file's bytes.
fn snapshot(url: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    let out = Command::new(pgetcd_testkit::etcdctl_binary())
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl snapshot save: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&file).unwrap()
}

/// What [`seed`] wrote: by revision, the key and its value (None: deleted); the compact
/// revision; the lease.
struct Seeded {
    written: BTreeMap<i64, (Bytes, Option<Bytes>)>,
    compact: i64,
    lease: i64,
}

/// Puts, deletes (some keys with a lease, one value spanning pages), then a compaction.
async fn seed(url: &str) -> Seeded {
    let ch = pgetcd_testkit::channel(url).await;
    let mut kv = KvClient::new(ch.clone());
    let mut written: BTreeMap<i64, (Bytes, Option<Bytes>)> = BTreeMap::new();
    let lease = LeaseClient::new(ch)
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    for i in 0..300u32 {
        let key = Bytes::from(format!("/k/{:03}", i % 40));
        if i % 7 == 6 {
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if r.deleted > 0 {
                written.insert(r.header.unwrap().revision, (key, None));
            }
            continue;
        }
        // Values big enough that the key bucket spans branch and overflow pages.
        let value = Bytes::from(format!("{i}:").repeat(if i == 150 { 3000 } else { 20 }));
        let r = kv
            .put(PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease: if i % 10 == 0 { lease } else { 0 },
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        written.insert(r.header.unwrap().revision, (key, Some(value)));
    }
    let compact = *written.keys().nth(100).unwrap();
    kv.compact(CompactionRequest {
        revision: compact,
        physical: true,
    })
    .await
    .unwrap();
    Seeded {
        written,
        compact,
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_real_etcd_read_back_revision_by_revision() {
    let etcd = pgetcd_testkit::RealEtcd::start().await;
    let Seeded {
        written,
        compact,
        lease,
    } = seed(&etcd.url).await;
    let file = snapshot(&etcd.url);
    // etcd appends the SHA-256 of the database to the snapshot it streams.
    let (body, trailer) = file.split_at(file.len() - 32);
    assert_eq!(&sha2::Sha256::digest(body)[..], trailer, "SHA-256 trailer");
    let db = Db::open(body).unwrap();
    assert_eq!(db.meta().page_size, 4096);
    assert_eq!(body.len() % 4096, 0);
    let names: Vec<String> = db
        .bucket_names()
        .unwrap()
        .into_iter()
        .map(|n| String::from_utf8(n).unwrap())
        .collect();
    for b in [
        "alarm",
        "auth",
        "authRoles",
        "authUsers",
        "cluster",
        "key",
        "lease",
        "members",
        "members_removed",
        "meta",
    ] {
        assert!(
            names.contains(&b.to_owned()),
            "bucket {b} missing from {names:?}"
        );
    }

    // The key bucket: every revision above the compaction as written, in order.
    let mut seen = BTreeMap::new();
    db.bucket(b"key")
        .unwrap()
        .unwrap()
        .for_each(&mut |k, v| {
            let Value::Data(v) = v else {
                return Err(Error::Corrupt("nested bucket in key".into()));
            };
            let (main, sub, tombstone) = revision_of(k);
            assert_eq!(sub, 0);
            let kv = KeyValue::decode(v).unwrap();
            seen.insert(main, (kv, tombstone));
            Ok(())
        })
        .unwrap();
    let mut previous = 0;
    for (&rev, (kv, tombstone)) in &seen {
        assert!(rev > previous);
        previous = rev;
        if rev <= compact {
            continue; // what compaction kept at or below it: the newest live versions
        }
        let (key, value) = &written[&rev];
        assert_eq!(&kv.key, key, "key at {rev}");
        match value {
            Some(v) => {
                assert!(!tombstone);
                assert_eq!(&kv.value, v, "value at {rev}");
                assert_eq!(kv.mod_revision, rev);
            }
            None => assert!(tombstone, "tombstone at {rev}"),
        }
    }
    let above: Vec<i64> = written.keys().copied().filter(|&r| r > compact).collect();
    let kept: Vec<i64> = seen.keys().copied().filter(|&r| r > compact).collect();
    assert_eq!(kept, above, "every revision above the compaction");

    // meta: the compaction etcd finished; lease: the granted lease.
    let meta = db.bucket(b"meta").unwrap().unwrap();
    let Some(Value::Data(finished)) = meta.get(b"finishedCompactRev").unwrap() else {
        panic!("no finishedCompactRev in meta");
    };
    // Stored as a revision key.
    assert_eq!(revision_of(finished), (compact, 0, false));
    assert!(meta.get(b"consistent_index").unwrap().is_some());
    let leases = db.bucket(b"lease").unwrap().unwrap();
    assert_eq!(leases.len().unwrap(), 1);
    assert!(leases.get(&lease.to_be_bytes()).unwrap().is_some());

    // Damaged copies: an error, never a panic, whatever is hit.
    for cut in [100, 4096 * 2, body.len() / 2, body.len() - 1] {
        assert!(
            matches!(
                Db::open(&body[..cut]),
                Err(Error::Truncated { .. } | Error::NotBbolt(_))
            ),
            "{cut} bytes of {} opened",
            body.len()
        );
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut copy = body.to_vec();
        for _ in 0..8 {
            let at = (state as usize) % copy.len();
            copy[at] ^= (state >> 32) as u8 | 1;
            state = state.rotate_left(11);
        }
        if let Ok(db) = Db::open(&copy)
            && let Ok(names) = db.bucket_names()
        {
            for n in names {
                if let Ok(Some(b)) = db.bucket(&n) {
                    let _ = b.len();
                }
            }
        }
    }
}

/// Every entry of every top-level bucket, by bucket name.
type Contents = BTreeMap<Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>>;

fn contents(db: &Db<'_>) -> Contents {
    let mut all = BTreeMap::new();
    for name in db.bucket_names().unwrap() {
        let mut entries = Vec::new();
        db.bucket(&name)
            .unwrap()
            .unwrap()
            .for_each(&mut |k, v| {
                let Value::Data(v) = v else {
                    return Err(Error::Corrupt("etcd nests no buckets".into()));
                };
                entries.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
        all.insert(name, entries);
    }
    all
}

/// A snapshot of real etcd, read and written again by [`Writer`], restores into real
/// etcd (`etcdutl snapshot restore`, which checks the trailer) and serves what the
/// source served: the same keys, revisions and HashKV now and at an older revision,
/// and the same compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_rewritten_by_the_writer_restores_into_real_etcd() {
    let source = pgetcd_testkit::RealEtcd::start().await;
    let Seeded { compact, .. } = seed(&source.url).await;
    let file = snapshot(&source.url);
    let body = &file[..file.len() - 32];
    let original = Db::open(body).unwrap();
    let buckets = contents(&original);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rewritten.db");
    let mut w = Writer::new(std::fs::File::create(&path).unwrap(), 4096).unwrap();
    for (name, entries) in &buckets {
        w.bucket(name, entries.iter().cloned()).unwrap();
    }
    drop(w.finish(original.meta().txid).unwrap());
    let mut rewritten = std::fs::read(&path).unwrap();
    assert_eq!(
        contents(&Db::open(&rewritten).unwrap()),
        buckets,
        "read back"
    );
    let sum = sha2::Sha256::digest(&rewritten);
    rewritten.extend_from_slice(&sum);
    std::fs::write(&path, &rewritten).unwrap();

    let restored = pgetcd_testkit::RealEtcd::start_restored(&path).await;
    for at in [0, compact + 10] {
        assert_eq!(
            pgetcd_testkit::view_at(&restored.url, at).await,
            pgetcd_testkit::view_at(&source.url, at).await,
            "at revision {at}"
        );
    }
    pgetcd_testkit::history::assert_compacted(&restored.url, b"/k/001", compact - 1).await;
}
