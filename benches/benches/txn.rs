//! etcd Txn evaluation, as far as it runs without Postgres.
//!
//! The engine's `Exec` (branch choice, put and range checks, op execution) needs the
//! engine's shared state, which holds a Postgres store, and is not public. What is
//! pure and callable is benched here:
//!
//! - `txn/validate/*`: what `Engine::txn` does before a txn reaches the writer:
//!   `validate::check_txn` (op counts, keys, no key written twice), `txn_is_read_only`
//!   and `txn_has_put`. `k8s_update` is kube-apiserver's GuaranteedUpdate txn (one
//!   compare, a put, a get in the failure branch); `128_puts` is a txn at etcd's
//!   default `--max-txn-ops`: 128 puts plus a delete of another namespace's prefix.
//! - `txn/compare/*`: one compare evaluated against a 1M-key index the way
//!   `Exec::compare` does it (range at the read revision, then `compare_kv` on every
//!   key found); the few lines of glue are repeated here. `k8s_update`:
//!   `mod_revision(key) == rev`, true, over 4096 keys spread across the index.
//!   `k8s_create`: `mod_revision(key) == 0` on as many missing keys. `value_1k`: `value(key) == v` on a 1 KiB value. `version_prefix_1k`:
//!   `version(prefix) > 0` over one namespace's 1000 keys.
//!
//! `cargo bench -p pgetcd-benches --bench txn`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgetcd_benches::{namespace_prefix, pod_key, prefix_end};
use pgetcd_engine::index::{Index, KeyRange, Version};
use pgetcd_engine::{DEFAULT_MAX_TXN_OPS, compare_kv, txn_has_put, txn_is_read_only, validate};
use pgetcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pgetcd_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    request_op::Request,
};
use pgetcd_proto::mvccpb::KeyValue;

const KEYS: usize = 1_000_000;
const FIRST_REVISION: i64 = 2;
const PUBLISHED: i64 = FIRST_REVISION + KEYS as i64;
/// The key holding a 1 KiB value, for value compares.
const VALUE_KEY: usize = 4242;
/// Keys the update and create compares cycle through.
const PROBES: usize = 4096;

fn key(i: usize) -> Bytes {
    Bytes::copy_from_slice(pod_key(i).as_bytes())
}

fn pod(i: usize) -> Bytes {
    let mut v = vec![b'v'; 1024];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

fn build_index() -> Index {
    let ix = Index::new(usize::MAX);
    for i in 0..KEYS {
        let rev = FIRST_REVISION + i as i64;
        let value = if i == VALUE_KEY {
            pod(i)
        } else {
            Bytes::from(vec![b'v'; 128])
        };
        ix.append(
            &key(i),
            Version {
                mod_revision: rev,
                sub: 0,
                create_revision: rev,
                version: 1,
                lease: 0,
                value: Some(value),
            },
        );
    }
    ix
}

fn cmp(
    key: Bytes,
    range_end: Bytes,
    target: CompareTarget,
    result: CompareResult,
    operand: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key,
        range_end,
        target_union: Some(operand),
    }
}

fn op(r: Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

/// kube-apiserver's GuaranteedUpdate: if the key is unchanged, put; else read it.
fn k8s_update(i: usize) -> TxnRequest {
    let k = key(i);
    TxnRequest {
        compare: vec![cmp(
            k.clone(),
            Bytes::new(),
            CompareTarget::Mod,
            CompareResult::Equal,
            TargetUnion::ModRevision(FIRST_REVISION + i as i64),
        )],
        success: vec![op(Request::RequestPut(PutRequest {
            key: k.clone(),
            value: pod(i),
            ..Default::default()
        }))],
        failure: vec![op(Request::RequestRange(RangeRequest {
            key: k,
            ..Default::default()
        }))],
    }
}

/// A txn at `--max-txn-ops`: 128 puts in one namespace, a delete of another's prefix.
fn max_ops() -> TxnRequest {
    let other = namespace_prefix(7);
    let mut success: Vec<RequestOp> = (0..DEFAULT_MAX_TXN_OPS - 1)
        .map(|i| {
            op(Request::RequestPut(PutRequest {
                key: key(i),
                value: pod(i),
                ..Default::default()
            }))
        })
        .collect();
    success.push(op(Request::RequestDeleteRange(DeleteRangeRequest {
        key: Bytes::copy_from_slice(other.as_bytes()),
        range_end: Bytes::from(prefix_end(other.as_bytes())),
        ..Default::default()
    })));
    TxnRequest {
        compare: vec![cmp(
            key(0),
            Bytes::new(),
            CompareTarget::Version,
            CompareResult::Greater,
            TargetUnion::Version(0),
        )],
        success,
        failure: Vec::new(),
    }
}

/// `Exec::compare` over the index at `at`, every value cached.
fn evaluate(ix: &Index, c: &Compare, at: i64) -> bool {
    let kr = KeyRange::new(&c.key, &c.range_end);
    let (kvs, _) = ix.range(&kr, at, 0);
    if kvs.is_empty() {
        return c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default());
    }
    kvs.into_iter().all(|v| {
        let kv = KeyValue {
            key: v.key,
            create_revision: v.version.create_revision,
            mod_revision: v.version.mod_revision,
            version: v.version.version,
            value: v.version.value.unwrap_or_default(),
            lease: v.version.lease,
        };
        compare_kv(c, &kv)
    })
}

fn validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("txn/validate");
    g.throughput(Throughput::Elements(1));
    for (name, t) in [("k8s_update", k8s_update(42)), ("128_puts", max_ops())] {
        assert!(validate::check_txn(&t, DEFAULT_MAX_TXN_OPS).is_ok());
        g.bench_function(name, |b| {
            b.iter(|| {
                let t = black_box(&t);
                let checked = validate::check_txn(t, DEFAULT_MAX_TXN_OPS).is_ok();
                black_box((checked, txn_is_read_only(t), txn_has_put(t)))
            })
        });
    }
    g.finish();
}

fn compare(c: &mut Criterion) {
    let ix = build_index();
    // Updates and creates cycle through keys spread over the index, as a cluster's
    // writes do; the value and prefix compares stay on one key / namespace.
    let spread: Vec<usize> = (0..PROBES as u64)
        .map(|n| pgetcd_benches::mix(n) as usize % KEYS)
        .collect();
    let updates: Vec<Compare> = spread
        .iter()
        .map(|&i| k8s_update(i).compare.remove(0))
        .collect();
    let creates: Vec<Compare> = spread
        .iter()
        .map(|&i| {
            let mut k = pod_key(i);
            k.push_str("-new");
            cmp(
                Bytes::from(k),
                Bytes::new(),
                CompareTarget::Mod,
                CompareResult::Equal,
                TargetUnion::ModRevision(0),
            )
        })
        .collect();
    let value = vec![cmp(
        key(VALUE_KEY),
        Bytes::new(),
        CompareTarget::Value,
        CompareResult::Equal,
        TargetUnion::Value(pod(VALUE_KEY)),
    )];
    let ns = namespace_prefix(42);
    let prefix = vec![cmp(
        Bytes::copy_from_slice(ns.as_bytes()),
        Bytes::from(prefix_end(ns.as_bytes())),
        CompareTarget::Version,
        CompareResult::Greater,
        TargetUnion::Version(0),
    )];
    let mut g = c.benchmark_group("txn/compare");
    g.throughput(Throughput::Elements(1));
    for (name, compares) in [
        ("k8s_update", &updates),
        ("k8s_create", &creates),
        ("value_1k", &value),
        ("version_prefix_1k", &prefix),
    ] {
        for c in compares {
            assert!(evaluate(&ix, c, PUBLISHED), "{name} should succeed");
        }
        let mut next = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                next = (next + 1) % compares.len();
                black_box(evaluate(&ix, &compares[next], PUBLISHED))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = pgetcd_benches::criterion_config(2);
    targets = validate, compare
}
criterion_main!(benches);
