//! The engine's revision index (`pgetcd_engine::index::Index`) at one million
//! Kubernetes-like keys (`/registry/pods/namespace-0042/app-017-7d4b9c8f6d-x2k9p`, see
//! `pgetcd_benches::pod_key`), one version each.
//!
//! - `index/insert_1m`: appends 1M new keys into an empty index, as the writer does
//!   for puts (per-element time is per key).
//! - `index/get_1m`: one point lookup of an existing key at the published revision.
//! - `index/range_1k`, `index/range_100k`: every key of one namespace (1k keys) and of
//!   100 namespaces (100k), as a List without limit.
//! - `index/range_100k_limit500`: the first page (limit 500) of that List; the index
//!   still walks all 100k keys to return the total count.
//! - `index/count_1m`: `count_only` over `/registry/pods/` (all 1M keys).
//!
//! The read benches share one index built once. Before them the binary prints the
//! index's memory per key at 1M keys beyond the key bytes (not a timed bench): a
//! counting global allocator adds up the bytes requested while an index is built.
//! Those are requested bytes; malloc's own per-allocation overhead shows only in the
//! resident-set growth printed for the first scenario.
//!
//! `cargo bench -p pgetcd-benches --bench index`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group};
use pgetcd_benches::{namespace_prefix, pod_key, prefix_end};
use pgetcd_engine::index::{Index, KeyRange, Version};
use pgetcd_proto::etcdserverpb::PutRequest;
use prost::Message;

/// Counts live heap bytes and allocations while `COUNTING` is on; otherwise it only
/// forwards to the system allocator (one relaxed load per call).
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);

fn note(bytes: isize, allocs: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(allocs, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards its arguments unchanged to the system allocator, so
// `System` upholds the GlobalAlloc contract; the bookkeeping only touches atomics and
// never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `alloc`'s contract, which is also `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (we forward all calls).
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` is checked by our caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize, 0);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const KEYS: usize = 1_000_000;
/// Revision of the first key; key `i` is created at `FIRST_REVISION + i`.
const FIRST_REVISION: i64 = 2;
/// The revision readers read at: every key visible.
const PUBLISHED: i64 = FIRST_REVISION + KEYS as i64;
/// Size of each key's own value in the read benches' index.
const VALUE_LEN: usize = 128;
/// Keys put through emulated gRPC decoding in the memory report (each pins a buffer
/// of at least tonic's 8 KiB, so 1M of them would need over 8 GiB).
const GRPC_KEYS: usize = 10_000;
/// tonic's default decode buffer capacity (`DEFAULT_CODEC_BUFFER_SIZE`).
const TONIC_BUFFER: usize = 8 * 1024;

fn created(i: usize, value: Option<Bytes>) -> Version {
    let rev = FIRST_REVISION + i as i64;
    Version {
        mod_revision: rev,
        sub: 0,
        create_revision: rev,
        version: 1,
        lease: 0,
        value,
    }
}

fn key(i: usize) -> Bytes {
    Bytes::copy_from_slice(pod_key(i).as_bytes())
}

/// A distinct value allocation per key, so reads touch each value's own refcount.
fn value(i: usize) -> Bytes {
    let mut v = vec![b'v'; VALUE_LEN];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Bytes::from(v)
}

/// The 1M-key index the read benches share.
fn build_for_reads() -> Index {
    let ix = Index::new(usize::MAX);
    for i in 0..KEYS {
        ix.append(&key(i), created(i, Some(value(i))));
    }
    ix
}

fn prefix_range(prefix: &str) -> KeyRange {
    KeyRange::new(
        &Bytes::copy_from_slice(prefix.as_bytes()),
        &Bytes::from(prefix_end(prefix.as_bytes())),
    )
}

// ---- memory report ----

#[derive(Clone, Copy)]
struct Usage {
    bytes: isize,
    allocs: isize,
    rss: Option<isize>,
}

/// Resident set size from `/proc/self/statm` (Linux), assuming 4 KiB pages.
fn rss() -> Option<isize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: isize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn usage() -> Usage {
    Usage {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
        rss: rss(),
    }
}

/// Prints what one scenario added per key, beyond `payload` bytes (keys, and values
/// where they are part of the scenario), and with `with_rss` the growth of the
/// resident set.
fn report(what: &str, keys: usize, payload: usize, before: Usage, after: Usage, with_rss: bool) {
    let n = keys as f64;
    let beyond = (after.bytes - before.bytes - payload as isize) as f64 / n;
    let allocs = (after.allocs - before.allocs) as f64 / n;
    println!("  {what}: {beyond:.1} B/key, {allocs:.2} allocations/key");
    // Later scenarios reuse the heap freed by earlier ones, so RSS only means
    // something for the first.
    if let (true, Some(b), Some(a)) = (with_rss, before.rss, after.rss) {
        println!(
            "    resident set grew {:.0} B/key (payload and malloc overhead included)",
            (a - b) as f64 / n
        );
    }
}

/// Builds indexes the ways the engine does and prints their memory per key.
fn memory_report() {
    COUNTING.store(true, Ordering::Relaxed);
    let key_bytes: usize = (0..KEYS).map(|i| pod_key(i).len()).sum();
    println!(
        "index memory at {KEYS} keys, average key {:.1} B (heap bytes requested beyond the payload \
         named; malloc's own overhead not included):",
        key_bytes as f64 / KEYS as f64
    );

    // The writer's path: `append` clones the request's key into the map.
    let before = usage();
    let ix = Index::new(usize::MAX);
    for i in 0..KEYS {
        ix.append(&key(i), created(i, None));
    }
    report(
        "append (writer path), values evicted, beyond key bytes",
        KEYS,
        key_bytes,
        before,
        usage(),
        true,
    );
    drop(ix);

    // Start-up: `load` takes the key by value; the first read that clones a key
    // (any Range) gives it a shared header.
    let before = usage();
    let ix = Index::new(usize::MAX);
    for i in 0..KEYS {
        ix.load(key(i), created(i, None));
    }
    report(
        "load (start-up path), values evicted, beyond key bytes",
        KEYS,
        key_bytes,
        before,
        usage(),
        false,
    );
    let all = prefix_range("/registry/");
    drop(black_box(ix.range(&all, PUBLISHED, 0)));
    report(
        "  the same after one List of every key, beyond key bytes",
        KEYS,
        key_bytes,
        before,
        usage(),
        false,
    );
    drop(ix);

    // Values cached: one value allocation each plus the cache's FIFO entry.
    let before = usage();
    let ix = Index::new(usize::MAX);
    for i in 0..KEYS {
        let k = key(i);
        let v = value(i);
        ix.append(&k, created(i, Some(v)));
        ix.note_cached([(k, FIRST_REVISION + i as i64, 0, VALUE_LEN)]);
    }
    report(
        &format!("append, {VALUE_LEN} B values cached, beyond key and value bytes"),
        KEYS,
        key_bytes + KEYS * VALUE_LEN,
        before,
        usage(),
        false,
    );
    drop(ix);

    // Keys as they arrive over gRPC: tonic decodes each request from a BytesMut of at
    // least 8 KiB, and prost's `bytes` fields are zero-copy slices of it, so a key
    // kept in the index keeps that whole buffer alive, even after its value is
    // evicted from the cache (budget 0 here).
    let before = usage();
    let ix = Index::new(0);
    let mut grpc_key_bytes = 0;
    for i in 0..GRPC_KEYS {
        let req = PutRequest {
            key: key(i),
            value: Bytes::from(vec![b'v'; 1024]),
            ..Default::default()
        };
        let body = req.encode_to_vec();
        let mut buf = BytesMut::with_capacity(TONIC_BUFFER);
        buf.put_u8(0);
        buf.put_u32(body.len() as u32);
        buf.put_slice(&body);
        drop((req, body));
        buf.advance(5);
        let Ok(decoded) = PutRequest::decode(&mut buf) else {
            println!("  (could not decode an emulated PutRequest)");
            COUNTING.store(false, Ordering::Relaxed);
            return;
        };
        drop(buf);
        grpc_key_bytes += decoded.key.len();
        ix.append(&decoded.key, created(i, Some(decoded.value.clone())));
        ix.note_cached([(
            decoded.key.clone(),
            FIRST_REVISION + i as i64,
            0,
            decoded.value.len(),
        )]);
    }
    report(
        &format!(
            "append of keys decoded from 1 KiB gRPC puts as tonic does ({GRPC_KEYS} keys), \
             values evicted, beyond key bytes"
        ),
        GRPC_KEYS,
        grpc_key_bytes,
        before,
        usage(),
        false,
    );
    drop(ix);
    COUNTING.store(false, Ordering::Relaxed);
}

// ---- timed benches ----

fn insert(c: &mut Criterion) {
    let keys: Vec<Bytes> = (0..KEYS).map(key).collect();
    let v = Bytes::from_static(&[b'v'; VALUE_LEN]);
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(KEYS as u64));
    g.bench_function("insert_1m", |b| {
        b.iter_batched(
            || Index::new(usize::MAX),
            |ix| {
                for (i, k) in keys.iter().enumerate() {
                    ix.append(k, created(i, Some(v.clone())));
                }
                ix
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn reads(c: &mut Criterion) {
    let ix = build_for_reads();
    let probes: Vec<Bytes> = (0..4096u64)
        .map(|n| key(pgetcd_benches::mix(n) as usize % KEYS))
        .collect();
    let ns_1k = prefix_range(&namespace_prefix(42));
    let ns_100k = prefix_range("/registry/pods/namespace-00");
    let pods = prefix_range("/registry/pods/");
    let mut g = c.benchmark_group("index");

    g.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    g.bench_function("get_1m", |b| {
        b.iter(|| {
            next = (next + 1) % probes.len();
            black_box(ix.get(&probes[next], PUBLISHED))
        })
    });

    g.throughput(Throughput::Elements(1000));
    g.bench_function("range_1k", |b| {
        b.iter(|| black_box(ix.range(&ns_1k, PUBLISHED, 0)))
    });

    g.sample_size(10);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("range_100k", |b| {
        b.iter(|| black_box(ix.range(&ns_100k, PUBLISHED, 0)))
    });
    g.bench_function("range_100k_limit500", |b| {
        b.iter(|| black_box(ix.range(&ns_100k, PUBLISHED, 501)))
    });

    g.throughput(Throughput::Elements(KEYS as u64));
    g.bench_function("count_1m", |b| {
        b.iter(|| black_box(ix.count(&pods, PUBLISHED)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = pgetcd_benches::criterion_config(3);
    targets = insert, reads
}

fn main() {
    // `cargo bench` passes `--bench`; skip the one-off report under `cargo test` and
    // when only listing benches.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list") {
        memory_report();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
