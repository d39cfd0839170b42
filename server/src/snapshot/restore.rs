//! `pgetcd snapshot restore FILE`: an etcd snapshot read back into a store.
//!
//! The file is checked before anything is written: its SHA-256 trailer (appended by
//! `etcdctl snapshot save` and by Maintenance.Snapshot; a bare `member/snap/db` copied
//! from a data directory has none, and needs `--skip-hash-check`, as with etcdutl),
//! then its bbolt structure, the `meta` and `lease` buckets. The `key` bucket is then
//! decoded entry by entry (revision key and `mvccpb.KeyValue` must agree) and streamed
//! into [`Store::import`], which loads everything in one transaction: a decoding error
//! halfway rolls the whole load back.
//!
//! The keyspace afterwards holds every revision the snapshot holds, with its create and
//! mod revision, version, lease and value, every lease with its granted TTL, and the
//! compact revision; its revision is the newest revision in `key`, or the compact
//! revision when that is above (as etcd computes it on start-up).

use bytes::Bytes;
use pgetcd_bbolt::{Db, Value};
use pgetcd_proto::mvccpb::KeyValue;
use pgetcd_storage::{
    CHUNK_VERSIONS, CHUNKS_IN_FLIGHT, Fence, Import, Imported, Store, StoreError, Version,
    VersionChunk,
};
use prost::Message;
use sha2::Digest;

/// Why a snapshot file cannot be restored (nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The SHA-256 trailer does not match the file.
    #[error(
        "snapshot integrity check failed: the file's SHA-256 trailer does not match its contents (truncated or corrupt file?)"
    )]
    HashMismatch,
    /// No SHA-256 trailer, and the check was not waived.
    #[error(
        "the snapshot has no SHA-256 trailer (a db file copied from a data directory?); pass --skip-hash-check to restore it anyway"
    )]
    MissingHash,
    /// Not a bbolt file, or a damaged one.
    #[error("not a valid etcd snapshot: {0}")]
    Format(String),
    /// Loading into the store failed (and wrote nothing).
    #[error("{}", .0.with_causes())]
    Store(#[from] StoreError),
}

/// What is known of a snapshot before its revisions are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The revision the keyspace gets.
    pub revision: i64,
    /// The compact revision (-1: never compacted).
    pub compact_revision: i64,
    /// Leases: (id, granted TTL).
    pub leases: Vec<(i64, i64)>,
    /// etcd users and roles the snapshot holds, which pgetcd does not restore.
    pub auth_entries: usize,
}

/// The bbolt database of a snapshot file's bytes, with its SHA-256 trailer checked
/// and cut off (see the module doc).
pub fn database(data: &[u8], skip_hash_check: bool) -> Result<&[u8], RestoreError> {
    // etcd's rule: a file whose size is 32 past a multiple of 512 carries the trailer.
    let has_hash = data.len() % 512 == sha2::Sha256::output_size();
    if !has_hash {
        return if skip_hash_check {
            Ok(data)
        } else {
            Err(RestoreError::MissingHash)
        };
    }
    let (db, trailer) = data.split_at(data.len() - sha2::Sha256::output_size());
    if !skip_hash_check && sha2::Sha256::digest(db).as_slice() != trailer {
        return Err(RestoreError::HashMismatch);
    }
    Ok(db)
}

fn format(e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Format(e.to_string())
}

/// The main revision of a revision key (8 bytes big-endian, `_`, 8 bytes, maybe `t`).
fn main_revision(key: &[u8]) -> Option<i64> {
    let main: [u8; 8] = key.get(..8)?.try_into().ok()?;
    (key.get(8) == Some(&b'_')).then(|| i64::from_be_bytes(main))
}

/// Reads the varint at `*at` in `buf`.
fn read_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// etcd's `leasepb.Lease`: (ID, TTL); other fields are skipped.
fn lease_of(value: &[u8]) -> Option<(i64, i64)> {
    let (mut id, mut ttl, mut at) = (0i64, 0i64, 0usize);
    while at < value.len() {
        let tag = read_varint(value, &mut at)?;
        match tag & 7 {
            0 => {
                let v = read_varint(value, &mut at)? as i64;
                match tag >> 3 {
                    1 => id = v,
                    2 => ttl = v,
                    _ => {}
                }
            }
            2 => {
                let len = usize::try_from(read_varint(value, &mut at)?).ok()?;
                at = at.checked_add(len).filter(|&end| end <= value.len())?;
            }
            _ => return None,
        }
    }
    Some((id, ttl))
}

/// The compaction, leases and auth entries of an opened snapshot, and the newest
/// revision of its `key` bucket.
pub fn summary(db: &Db<'_>) -> Result<Summary, RestoreError> {
    let data = |bucket: &str, key: &[u8]| -> Result<Option<Vec<u8>>, RestoreError> {
        let Some(b) = db.bucket(bucket.as_bytes()).map_err(format)? else {
            return Ok(None);
        };
        Ok(match b.get(key).map_err(format)? {
            Some(Value::Data(d)) => Some(d.to_vec()),
            _ => None,
        })
    };
    if db.bucket(b"meta").map_err(format)?.is_none() {
        return Err(RestoreError::Format("it has no meta bucket".into()));
    }
    let keys = db
        .bucket(b"key")
        .map_err(format)?
        .ok_or_else(|| RestoreError::Format("it has no key bucket".into()))?;
    let compact_at = |name: &[u8]| -> Result<Option<i64>, RestoreError> {
        data("meta", name)?
            .map(|k| {
                main_revision(&k).ok_or_else(|| {
                    RestoreError::Format(format!(
                        "meta {:?} is not a revision",
                        String::from_utf8_lossy(name)
                    ))
                })
            })
            .transpose()
    };
    // A scheduled compaction etcd had not finished is finished on etcd's start-up.
    let compact_revision = compact_at(b"scheduledCompactRev")?
        .into_iter()
        .chain(compact_at(b"finishedCompactRev")?)
        .max()
        .unwrap_or(-1);
    let mut newest = 0i64;
    keys.for_each(&mut |k, _| {
        newest = main_revision(k).unwrap_or(newest).max(newest);
        Ok(())
    })
    .map_err(format)?;
    let mut leases = Vec::new();
    if let Some(b) = db.bucket(b"lease").map_err(format)? {
        let mut bad = None;
        b.for_each(&mut |k, v| {
            match v {
                Value::Data(v) => match lease_of(v) {
                    Some((id, ttl)) if id > 0 && k == id.to_be_bytes() => leases.push((id, ttl)),
                    _ => bad = Some(format!("lease entry {k:02x?}")),
                },
                Value::Bucket(_) => bad = Some("a nested bucket in lease".into()),
            }
            Ok(())
        })
        .map_err(format)?;
        if let Some(bad) = bad {
            return Err(RestoreError::Format(format!("cannot decode {bad}")));
        }
    }
    let mut auth_entries = 0;
    for bucket in ["authUsers", "authRoles"] {
        if let Some(b) = db.bucket(bucket.as_bytes()).map_err(format)? {
            auth_entries += b.len().map_err(format)?;
        }
    }
    Ok(Summary {
        revision: newest.max(compact_revision).max(1),
        compact_revision,
        leases,
        auth_entries,
    })
}

/// One `key` bucket entry as the version it stores.
fn version_of(rev_key: &[u8], value: &[u8]) -> Result<(Bytes, Version), String> {
    let bad = || format!("revision key {rev_key:02x?}");
    let tombstone = match rev_key.len() {
        17 => false,
        18 if rev_key[17] == b't' => true,
        _ => return Err(bad()),
    };
    let main = main_revision(rev_key).ok_or_else(bad)?;
    let sub: [u8; 8] = rev_key[9..17].try_into().map_err(|_| bad())?;
    let sub = u32::try_from(u64::from_be_bytes(sub)).map_err(|_| bad())?;
    let kv = KeyValue::decode(value).map_err(|e| format!("the KeyValue at {}: {e}", main))?;
    if kv.key.is_empty() {
        return Err(format!("the KeyValue at revision {main} has an empty key"));
    }
    let version = if tombstone {
        Version {
            mod_revision: main,
            sub,
            ..Version::tombstone()
        }
    } else {
        if kv.mod_revision != main || kv.version < 1 || kv.create_revision < 1 {
            return Err(format!(
                "the KeyValue at revision {main} says mod_revision {}, version {}, create_revision {}",
                kv.mod_revision, kv.version, kv.create_revision
            ));
        }
        Version {
            mod_revision: main,
            sub,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
            value: Some(kv.value),
        }
    };
    Ok((kv.key, version))
}

/// Decodes the `key` bucket into `tx`, a chunk at a time. Blocking: run it on a
/// blocking thread. A decoding error is sent down the channel (the import then writes
/// nothing).
fn send_versions(db: &Db<'_>, tx: &tokio::sync::mpsc::Sender<VersionChunk>) {
    let bad = |e: String| StoreError::Misconfigured(format!("not a valid etcd snapshot: {e}"));
    let keys = match db.bucket(b"key") {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => {
            let _ = tx.blocking_send(Err(bad(e.to_string())));
            return;
        }
    };
    let mut chunk = Vec::with_capacity(CHUNK_VERSIONS);
    let mut failed: Option<String> = None;
    let mut gone = false;
    let walked = keys.for_each(&mut |k, v| {
        let decoded = match v {
            Value::Data(v) => version_of(k, v),
            Value::Bucket(_) => Err("a nested bucket in key".into()),
        };
        match decoded {
            Ok(entry) => chunk.push(entry),
            Err(e) => failed = Some(e),
        }
        if chunk.len() == CHUNK_VERSIONS && failed.is_none() {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_VERSIONS));
            gone = tx.blocking_send(Ok(full)).is_err();
        }
        if failed.is_some() || gone {
            // Stops the walk; the cause is in `failed` or `gone`.
            return Err(pgetcd_bbolt::Error::Corrupt("stopped".into()));
        }
        Ok(())
    });
    match (failed, walked) {
        (Some(e), _) => {
            let _ = tx.blocking_send(Err(bad(e)));
        }
        (None, Err(e)) if !gone => {
            let _ = tx.blocking_send(Err(bad(e.to_string())));
        }
        (None, Err(_)) => {}
        (None, Ok(())) => {
            if !chunk.is_empty() {
                let _ = tx.blocking_send(Ok(chunk));
            }
        }
    }
}

/// Restores the snapshot `data` (a file's bytes) into `store`, held at `fence`
/// (replacing what it holds if `replace`). Returns what the snapshot held and what was
/// written.
pub async fn restore(
    store: &dyn Store,
    fence: &Fence,
    data: std::sync::Arc<Vec<u8>>,
    skip_hash_check: bool,
    replace: bool,
) -> Result<(Summary, Imported), RestoreError> {
    let checked = std::time::Instant::now();
    let summary = {
        let db = Db::open(database(&data, skip_hash_check)?).map_err(format)?;
        summary(&db)?
    };
    tracing::info!(
        took_ms = checked.elapsed().as_millis() as u64,
        "checked the snapshot's trailer, structure, meta and leases"
    );
    let (tx, versions) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let reader = tokio::task::spawn_blocking(move || {
        // The trailer was checked above: cut it off without hashing the file again.
        match database(&data, true).map(Db::open) {
            Ok(Ok(db)) => send_versions(&db, &tx),
            // Checked above already.
            Ok(Err(e)) => {
                let _ = tx.blocking_send(Err(StoreError::Misconfigured(e.to_string())));
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(StoreError::Misconfigured(e.to_string())));
            }
        }
    });
    let imported = store
        .import(
            fence,
            Import {
                revision: summary.revision,
                compact_revision: summary.compact_revision,
                leases: summary.leases.clone(),
                versions,
                replace,
            },
        )
        .await;
    // The reader ends once the import stops taking chunks.
    let _ = reader.await;
    Ok((summary, imported?))
}

/// The name under which `pgetcd snapshot restore` holds the writer role.
pub const RESTORE_NAME: &str = "pgetcd-snapshot-restore";

/// `pgetcd snapshot restore`: takes the keyspace, restores the file, gives the keyspace
/// back; returns the report to print.
pub async fn run(args: &crate::config::RestoreArgs) -> Result<String, crate::ServerError> {
    let started = std::time::Instant::now();
    let data = std::fs::read(&args.file).map_err(|source| RestoreError::Read {
        path: args.file.display().to_string(),
        source,
    });
    let data = std::sync::Arc::new(data.map_err(|e| crate::ServerError::Start(e.to_string()))?);
    let size = data.len();
    let held = crate::admin::Exclusive::take(&args.storage, RESTORE_NAME).await?;
    let restored = restore(
        held.store.as_ref(),
        &held.fence,
        data,
        args.skip_hash_check,
        args.replace,
    )
    .await;
    let released = held.release().await;
    let (summary, imported) = restored.map_err(|e| crate::ServerError::Start(e.to_string()))?;
    released?;
    let secs = started.elapsed().as_secs_f64();
    let mut report = format!(
        "restored {} ({size} bytes) into keyspace {:?}: revision {}, compact revision {}, \
         {} revisions, {} keys, {} leases in {secs:.2} s ({:.0} revisions/s)",
        args.file.display(),
        args.storage.keyspace,
        summary.revision,
        summary.compact_revision,
        imported.versions,
        imported.keys,
        imported.leases,
        imported.versions as f64 / secs.max(1e-9),
    );
    if summary.auth_entries > 0 {
        report.push_str(&format!(
            "\nnote: the snapshot holds {} etcd auth users and roles; pgetcd does not restore them",
            summary.auth_entries
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_decode_from_etcds_leasepb() {
        assert_eq!(lease_of(&super::super::lease_value(5, 300)), Some((5, 300)));
        // RemainingTTL (field 3) is skipped.
        assert_eq!(lease_of(&[0x08, 7, 0x10, 10, 0x18, 4]), Some((7, 10)));
        // Truncated varint.
        assert_eq!(lease_of(&[0x08, 0x80]), None);
    }

    #[test]
    fn revision_keys_decode() {
        let put = pgetcd_engine::revision_key(9, 2, false);
        let kv = KeyValue {
            key: Bytes::from_static(b"k"),
            create_revision: 4,
            mod_revision: 9,
            version: 3,
            value: Bytes::from_static(b"v"),
            lease: 0,
        };
        let (key, v) = version_of(&put, &kv.encode_to_vec()).expect("a put");
        assert_eq!(
            (key.as_ref(), v.mod_revision, v.sub, v.version),
            (&b"k"[..], 9, 2, 3)
        );
        let tomb = pgetcd_engine::revision_key(10, 0, true);
        let only_key = KeyValue {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        };
        let (_, t) = version_of(&tomb, &only_key.encode_to_vec()).expect("a tombstone");
        assert!(t.is_tombstone());
        // A put whose KeyValue names another revision is refused.
        assert!(
            version_of(
                &pgetcd_engine::revision_key(8, 0, false),
                &kv.encode_to_vec()
            )
            .is_err()
        );
        assert!(version_of(&put[..16], &kv.encode_to_vec()).is_err());
    }

    #[test]
    fn the_trailer_is_checked() {
        let mut file = vec![7u8; 1024];
        let sum = sha2::Sha256::digest(&file);
        file.extend_from_slice(&sum);
        assert_eq!(database(&file, false).map(<[u8]>::len).ok(), Some(1024));
        file[3] ^= 1;
        assert!(matches!(
            database(&file, false),
            Err(RestoreError::HashMismatch)
        ));
        assert!(database(&file, true).is_ok());
        assert!(matches!(
            database(&file[..1024], false),
            Err(RestoreError::MissingHash)
        ));
    }
}
