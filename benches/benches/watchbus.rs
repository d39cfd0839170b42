//! Watch bus fan-out: publish a batch, wait until every matching watcher's stream
//! received its delivery.
//!
//! - `disjoint/N`: N watchers on distinct keys, a batch of 100 events on 100 of them:
//!   the cost should not grow with N (the key index, not a scan of watchers).
//! - `shared_prefix/N`: N watchers on one prefix, a batch of 1 event: every watcher
//!   gets a delivery, so the cost grows with N.
//!
//! `cargo bench -p pgetcd-benches --bench watchbus`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgetcd_proto::mvccpb::{Event, KeyValue};
use pgetcd_watchbus::{Batch, Hub, HubConfig, KeySpan, WatcherSpec};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

struct Setup {
    hub: Hub,
    received: Arc<AtomicUsize>,
    done: Arc<Notify>,
    revision: i64,
}

const STREAMS: usize = 64;

fn setup(rt: &Runtime, watchers: usize, prefix: bool) -> Setup {
    rt.block_on(async {
        let hub = Hub::start(
            HubConfig {
                ring_capacity: 1024,
                stream_queue: 1 << 16,
            },
            0,
        );
        let received = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let streams: Vec<_> = (0..STREAMS.min(watchers)).map(|_| hub.stream()).collect();
        for i in 0..watchers {
            let span = if prefix {
                KeySpan::Range {
                    start: Bytes::from_static(b"k"),
                    end: Some(Bytes::from_static(b"l")),
                }
            } else {
                KeySpan::Key(Bytes::from(format!("k{i:06}")))
            };
            let n = streams.len();
            streams[i % n]
                .register(WatcherSpec {
                    watch_id: i as i64,
                    span,
                    start_revision: 0,
                    no_put: false,
                    no_delete: false,
                })
                .await
                .unwrap();
        }
        for mut s in streams {
            let received = received.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while let Some(d) = s.rx.recv().await {
                    received.fetch_add(d.len(), Ordering::Relaxed);
                    done.notify_one();
                }
            });
        }
        Setup {
            hub,
            received,
            done,
            revision: 0,
        }
    })
}

fn event(key: Bytes, rev: i64) -> Event {
    Event {
        r#type: 0,
        kv: Some(KeyValue {
            key,
            mod_revision: rev,
            version: 1,
            create_revision: rev,
            value: Bytes::from_static(&[b'v'; 256]),
            lease: 0,
        }),
        prev_kv: None,
    }
}

fn publish_and_wait(rt: &Runtime, s: &mut Setup, events: Vec<Event>, expect: usize) {
    s.revision += 1;
    let target = s.received.load(Ordering::Relaxed) + expect;
    rt.block_on(async {
        s.hub.publish(Batch {
            last_revision: s.revision,
            events,
        });
        while s.received.load(Ordering::Relaxed) < target {
            let notified = s.done.notified();
            if s.received.load(Ordering::Relaxed) >= target {
                break;
            }
            notified.await;
        }
    });
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("watchbus");
    for n in [1usize, 100, 10_000] {
        let mut s = setup(&rt, n, false);
        let keys: Vec<Bytes> = (0..100)
            .map(|i| Bytes::from(format!("k{:06}", i % n)))
            .collect();
        g.throughput(Throughput::Elements(100));
        g.bench_with_input(BenchmarkId::new("disjoint", n), &n, |b, _| {
            b.iter(|| {
                let rev = s.revision + 1;
                let events: Vec<Event> = keys.iter().map(|k| event(k.clone(), rev)).collect();
                publish_and_wait(&rt, &mut s, events, 100);
            })
        });
        let mut s = setup(&rt, n, true);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("shared_prefix", n), &n, |b, _| {
            b.iter(|| {
                let rev = s.revision + 1;
                publish_and_wait(&rt, &mut s, vec![event(Bytes::from_static(b"k1"), rev)], n);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
