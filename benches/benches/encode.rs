//! Encoding on the two big byte paths: a write batch into the parameters of its
//! Postgres commit, and a large Range response into protobuf.
//!
//! - `batch/columns/N`: a group commit of N single-put requests (Kubernetes pod
//!   updates, 1 KiB values) split into the column arrays of the commit's statements:
//!   history rows, `kv` upserts (last change per key) and `kv` deletes: the Postgres
//!   store's own `CommitRows::of`.
//! - `batch/params/N`: the same plus what tokio-postgres does with those arrays when it
//!   binds the statements: `ToSql::to_sql_checked` into the binary array format. Each
//!   value is copied twice (history and `kv`).
//! - `range_response/encode_to_vec/N`: prost encoding of a RangeResponse with N pod
//!   KeyValues of 1 KiB values into an exactly sized `Vec`.
//! - `range_response/encode_grow/N`: the same into a `BytesMut` that starts at 8 KiB
//!   and grows, as tonic's encoder does.
//!
//! `cargo bench -p pgetcd-benches --bench encode`

use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgetcd_benches::pod_key;
use pgetcd_engine::Change;
use pgetcd_engine::index::Version;
use pgetcd_proto::etcdserverpb::{RangeResponse, ResponseHeader};
use pgetcd_proto::mvccpb::KeyValue;
use pgetcd_storage_postgres::CommitRows;
use prost::Message;

const VALUE_LEN: usize = 1024;
/// Revision before the batch.
const PUBLISHED: i64 = 1_000_000;
/// tonic's default encode buffer capacity.
const TONIC_BUFFER: usize = 8 * 1024;

fn pod(i: usize) -> Bytes {
    let mut v = vec![b'v'; VALUE_LEN];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

/// The changes of `n` single-put requests in one batch: update of pod `i` at
/// revision `PUBLISHED + 1 + i`.
fn batch(n: usize) -> Vec<Change> {
    (0..n)
        .map(|i| Change {
            key: Bytes::from(pod_key(i * 997 % 1_000_000)),
            version: Version {
                mod_revision: PUBLISHED + 1 + i as i64,
                sub: 0,
                create_revision: 2 + i as i64,
                version: 5,
                lease: 0,
                value: Some(pod(i)),
            },
            prev: None,
        })
        .collect()
}

/// Encodes every parameter as tokio-postgres does in a Bind message (a length word,
/// then the binary value). Returns the bytes written.
fn encode_params(c: &CommitRows<'_>, out: &mut BytesMut) -> usize {
    let params = c.columns();
    out.clear();
    for (p, ty) in params {
        out.put_i32(0);
        p.to_sql_checked(&ty, out)
            .expect("each column's Rust type matches its statement parameter's type");
    }
    out.len()
}

fn batch_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    for n in [1usize, 100, 4096] {
        let changes = batch(n);
        let mut out = BytesMut::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("columns", n), &changes, |b, ch| {
            b.iter(|| black_box(CommitRows::of(black_box(ch)).columns().len()))
        });
        g.bench_with_input(BenchmarkId::new("params", n), &changes, |b, ch| {
            b.iter(|| black_box(encode_params(&CommitRows::of(black_box(ch)), &mut out)))
        });
        println!(
            "batch of {n}: {} parameter bytes",
            encode_params(&CommitRows::of(&changes), &mut out)
        );
    }
    g.finish();
}

fn range_response(n: usize) -> RangeResponse {
    RangeResponse {
        header: Some(ResponseHeader {
            cluster_id: 0x5eed_cafe_f00d_0001,
            member_id: 0x5eed_cafe_f00d_0002,
            revision: PUBLISHED,
            raft_term: 3,
        }),
        kvs: (0..n)
            .map(|i| KeyValue {
                key: Bytes::from(pod_key(i)),
                create_revision: 2 + i as i64,
                mod_revision: PUBLISHED - i as i64,
                version: 5,
                value: pod(i),
                lease: 0,
            })
            .collect(),
        more: false,
        count: n as i64,
    }
}

fn range_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_response");
    for n in [500usize, 10_000] {
        let resp = range_response(n);
        g.throughput(Throughput::Bytes(resp.encoded_len() as u64));
        g.bench_with_input(BenchmarkId::new("encode_to_vec", n), &resp, |b, r| {
            b.iter(|| black_box(r.encode_to_vec()))
        });
        g.bench_with_input(BenchmarkId::new("encode_grow", n), &resp, |b, r| {
            b.iter(|| {
                let mut buf = BytesMut::with_capacity(TONIC_BUFFER);
                let encoded = r.encode(&mut buf).is_ok();
                black_box((encoded, buf))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = pgetcd_benches::criterion_config(2);
    targets = batch_encoding, range_encoding
}
criterion_main!(benches);
