//! Encoding on the two big byte paths: a write batch into the parameters of its
//! Postgres commit, and a large Range response into protobuf.
//!
//! - `batch/columns/N`: a group commit of N single-put requests (Kubernetes pod
//!   updates, 1 KiB values) split into the column arrays of the commit's statements:
//!   history rows, `kv` upserts (last change per key) and `kv` deletes. That split is
//!   inline in `PgStore::commit` (engine/src/store.rs), not callable on its own, so
//!   [`columns`] repeats it; keep the two in step.
//! - `batch/params/N`: the same plus what tokio-postgres does with those arrays when it
//!   binds the statements: `ToSql::to_sql_checked` into the binary array format. Each
//!   value is copied twice (history and `kv`).
//! - `range_response/encode_to_vec/N`: prost encoding of a RangeResponse with N pod
//!   KeyValues of 1 KiB values into an exactly sized `Vec`.
//! - `range_response/encode_grow/N`: the same into a `BytesMut` that starts at 8 KiB
//!   and grows, as tonic's encoder does.
//!
//! `cargo bench -p pgetcd-benches --bench encode`

use std::collections::HashMap;
use std::hint::black_box;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgetcd_benches::pod_key;
use pgetcd_engine::Change;
use pgetcd_engine::index::Version;
use pgetcd_partitioning::{KIND_DELETE, KIND_PUT};
use pgetcd_proto::etcdserverpb::{RangeResponse, ResponseHeader};
use pgetcd_proto::mvccpb::KeyValue;
use prost::Message;
use tokio_postgres::types::{ToSql, Type};

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

/// The commit's statement parameters, column by column.
#[derive(Default)]
struct Columns<'a> {
    h_rev: Vec<i64>,
    h_sub: Vec<i32>,
    h_key: Vec<&'a [u8]>,
    h_kind: Vec<i16>,
    h_create: Vec<i64>,
    h_ver: Vec<i64>,
    h_lease: Vec<i64>,
    h_value: Vec<&'a [u8]>,
    u_key: Vec<&'a [u8]>,
    u_create: Vec<i64>,
    u_mod: Vec<i64>,
    u_sub: Vec<i32>,
    u_ver: Vec<i64>,
    u_lease: Vec<i64>,
    u_value: Vec<&'a [u8]>,
    d_key: Vec<&'a [u8]>,
}

/// The split at the top of `PgStore::commit`: one history row per change; the last
/// change of each key becomes its `kv` upsert or delete.
fn columns(changes: &[Change]) -> Columns<'_> {
    let n = changes.len();
    let mut c = Columns {
        h_rev: Vec::with_capacity(n),
        h_sub: Vec::with_capacity(n),
        h_key: Vec::with_capacity(n),
        h_kind: Vec::with_capacity(n),
        h_create: Vec::with_capacity(n),
        h_ver: Vec::with_capacity(n),
        h_lease: Vec::with_capacity(n),
        h_value: Vec::with_capacity(n),
        ..Columns::default()
    };
    let mut last: HashMap<&[u8], &Change> = HashMap::with_capacity(n);
    for ch in changes {
        let v = &ch.version;
        c.h_rev.push(v.mod_revision);
        c.h_sub.push(v.sub as i32);
        c.h_key.push(&ch.key);
        c.h_kind.push(if v.is_tombstone() {
            KIND_DELETE
        } else {
            KIND_PUT
        });
        c.h_create.push(v.create_revision);
        c.h_ver.push(v.version);
        c.h_lease.push(v.lease);
        c.h_value.push(v.value.as_deref().unwrap_or(&[]));
        last.insert(&ch.key, ch);
    }
    for (k, ch) in last {
        let v = &ch.version;
        if v.is_tombstone() {
            c.d_key.push(k);
        } else {
            c.u_key.push(k);
            c.u_create.push(v.create_revision);
            c.u_mod.push(v.mod_revision);
            c.u_sub.push(v.sub as i32);
            c.u_ver.push(v.version);
            c.u_lease.push(v.lease);
            c.u_value.push(v.value.as_deref().unwrap_or(&[]));
        }
    }
    c
}

/// Encodes every parameter as tokio-postgres does in a Bind message (a length word,
/// then the binary value). Returns the bytes written.
fn encode_params(c: &Columns<'_>, out: &mut BytesMut) -> usize {
    let params: [(&(dyn ToSql + Sync), Type); 16] = [
        (&c.h_rev, Type::INT8_ARRAY),
        (&c.h_sub, Type::INT4_ARRAY),
        (&c.h_key, Type::BYTEA_ARRAY),
        (&c.h_kind, Type::INT2_ARRAY),
        (&c.h_create, Type::INT8_ARRAY),
        (&c.h_ver, Type::INT8_ARRAY),
        (&c.h_lease, Type::INT8_ARRAY),
        (&c.h_value, Type::BYTEA_ARRAY),
        (&c.u_key, Type::BYTEA_ARRAY),
        (&c.u_create, Type::INT8_ARRAY),
        (&c.u_mod, Type::INT8_ARRAY),
        (&c.u_sub, Type::INT4_ARRAY),
        (&c.u_ver, Type::INT8_ARRAY),
        (&c.u_lease, Type::INT8_ARRAY),
        (&c.u_value, Type::BYTEA_ARRAY),
        (&c.d_key, Type::BYTEA_ARRAY),
    ];
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
            b.iter(|| black_box(columns(black_box(ch)).u_key.len()))
        });
        g.bench_with_input(BenchmarkId::new("params", n), &changes, |b, ch| {
            b.iter(|| black_box(encode_params(&columns(black_box(ch)), &mut out)))
        });
        println!(
            "batch of {n}: {} parameter bytes",
            encode_params(&columns(&changes), &mut out)
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
