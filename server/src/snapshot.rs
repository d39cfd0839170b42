//! Maintenance.Snapshot: the keyspace as an etcd snapshot, which etcd's tools restore.
//!
//! The file is the bbolt database etcd would hold with this history: its buckets
//! (`alarm`, `auth`, `authRoles`, `authUsers`, `cluster`, `key`, `lease`, `members`,
//! `members_removed`, `meta`), `key` holding every stored revision as etcd stores it
//! (the same bytes HashKV covers), `lease` every granted lease, `meta` the consistent
//! index and term, and the compaction. It is written from one view of the engine to a
//! temporary file, then streamed in 32 KiB chunks, ending with a message holding the
//! file's SHA-256, as etcd streams it (`etcdctl snapshot save` writes the whole stream;
//! `etcdutl snapshot restore` checks the trailer). Membership is not in it: a restore
//! writes its own.

use std::io::{self, Read, Seek, SeekFrom};

use pgetcd_engine::{SnapshotData, revision_key};
use pgetcd_proto::etcdserverpb::SnapshotResponse;
use sha2::Digest;
use tokio::sync::mpsc;
use tonic::Status;

/// bbolt's page size in etcd's files.
const PAGE_SIZE: usize = 4096;
/// Bytes per streamed message (etcd's snapshot send buffer).
const CHUNK: usize = 32 * 1024;

/// Appends a protobuf varint.
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.push(b);
            return;
        }
        buf.push(b | 0x80);
    }
}

/// Appends a protobuf varint field (wire type 0).
fn varint_field(buf: &mut Vec<u8>, field: u32, value: i64) {
    varint(buf, u64::from(field << 3));
    varint(buf, value as u64);
}

/// etcd's `leasepb.Lease` { ID = 1, TTL = 2, RemainingTTL = 3 } (zero fields omitted).
fn lease_value(id: i64, ttl: i64) -> Vec<u8> {
    let mut v = Vec::new();
    for (field, value) in [(1, id), (2, ttl)] {
        if value != 0 {
            varint_field(&mut v, field, value);
        }
    }
    v
}

/// Writes the snapshot's database (without the trailer) to a temporary file.
pub fn write(data: &SnapshotData, term: u64) -> io::Result<std::fs::File> {
    let file = tempfile::tempfile()?;
    let mut w = pgetcd_bbolt::Writer::new(file, PAGE_SIZE)?;
    let empty = || std::iter::empty::<(Vec<u8>, Vec<u8>)>();
    for name in ["alarm", "auth", "authRoles", "authUsers", "cluster"] {
        w.bucket(name.as_bytes(), empty())?;
    }
    w.bucket(b"key", data.keys.iter().cloned())?;
    let mut leases: Vec<(Vec<u8>, Vec<u8>)> = data
        .leases
        .iter()
        .map(|&(id, ttl)| ((id as u64).to_be_bytes().to_vec(), lease_value(id, ttl)))
        .collect();
    leases.sort();
    w.bucket(b"lease", leases)?;
    w.bucket(b"members", empty())?;
    w.bucket(b"members_removed", empty())?;
    let mut meta = vec![(
        b"consistent_index".to_vec(),
        (data.revision as u64).to_be_bytes().to_vec(),
    )];
    if data.compact_revision > 0 {
        meta.push((
            b"finishedCompactRev".to_vec(),
            revision_key(data.compact_revision, 0, false),
        ));
        meta.push((
            b"scheduledCompactRev".to_vec(),
            revision_key(data.compact_revision, 0, false),
        ));
    }
    meta.push((b"term".to_vec(), term.to_be_bytes().to_vec()));
    w.bucket(b"meta", meta)?;
    let mut file = w.finish(data.revision.max(1) as u64)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Streams `file` into `tx` as etcd does: chunks with the bytes remaining after each,
/// then the SHA-256 of the file. Blocking: run it on a blocking thread.
pub fn stream(mut file: std::fs::File, tx: mpsc::Sender<Result<SnapshotResponse, Status>>) {
    let total = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            let _ = tx.blocking_send(Err(Status::internal(format!("snapshot: {e}"))));
            return;
        }
    };
    let mut hasher = sha2::Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while sent < total {
        let n = match file.read(&mut buf) {
            Ok(0) => {
                let _ = tx.blocking_send(Err(Status::internal("snapshot: file ended early")));
                return;
            }
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("snapshot: {e}"))));
                return;
            }
        };
        hasher.update(&buf[..n]);
        sent += n as u64;
        let chunk = SnapshotResponse {
            remaining_bytes: total - sent,
            blob: bytes::Bytes::copy_from_slice(&buf[..n]),
            ..Default::default()
        };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return; // the client went away
        }
    }
    let _ = tx.blocking_send(Ok(SnapshotResponse {
        remaining_bytes: 0,
        blob: bytes::Bytes::copy_from_slice(&hasher.finalize()),
        ..Default::default()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_encode_as_etcds_leasepb() {
        // ID 1 = 0x08, TTL 2 = 0x10; 300 = ac 02.
        assert_eq!(lease_value(5, 300), vec![0x08, 5, 0x10, 0xac, 0x02]);
        // The compaction in meta is a revision key, as etcd writes it.
        assert_eq!(
            revision_key(2, 0, false),
            [0, 0, 0, 0, 0, 0, 0, 2, b'_', 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
