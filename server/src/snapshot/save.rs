//! Maintenance.Snapshot: the snapshot's buckets (see the module doc of `snapshot`)
//! written as a bbolt file to a temporary file, then streamed in 32 KiB chunks, ending
//! with a message holding the file's SHA-256, as etcd streams it (`etcdctl snapshot
//! save` writes the whole stream; `etcdutl snapshot restore` checks the trailer).
//!
//! Memory stays bounded: the export streams from one snapshot of the store, the bbolt
//! writer holds a page and the first key of each page of the level above, and the file
//! is read back a chunk at a time.

use std::io::{self, Read, Seek, SeekFrom};

use pgetcd_proto::etcdserverpb::SnapshotResponse;
use pgetcd_storage::Export;
use sha2::Digest;
use tokio::sync::mpsc;
use tonic::Status;

use super::Buckets;

/// bbolt's page size in etcd's files.
const PAGE_SIZE: usize = 4096;
/// Bytes per streamed message (etcd's snapshot send buffer).
const CHUNK: usize = 32 * 1024;

impl<W: io::Write + Seek> Buckets for pgetcd_bbolt::Writer<W> {
    fn bucket(
        &mut self,
        name: &[u8],
        entries: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> io::Result<()> {
        pgetcd_bbolt::Writer::bucket(self, name, entries)
    }
}

/// Writes the snapshot's database (without the trailer) to a temporary file, rewound.
/// Blocking: run it on a blocking thread.
pub fn write(export: Export, term: u64) -> io::Result<std::fs::File> {
    let file = tempfile::tempfile()?;
    let mut w = pgetcd_bbolt::Writer::new(io::BufWriter::new(file), PAGE_SIZE)?;
    let revision = super::walk(export, term, &mut w)?;
    let mut file = w
        .finish(revision.max(1) as u64)?
        .into_inner()
        .map_err(|e| e.into_error())?;
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
