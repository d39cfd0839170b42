//! Measurements of one round: per operation kind, a latency histogram over the whole
//! round (1 µs to 60 s, 3 significant digits) and one bucket per second of the round
//! (count, errors and a coarser histogram for p50/p99 over time).
//!
//! Every client records into the same [`Kind`] under a short mutex (a histogram add);
//! the counters the progress line reads are atomics, so it never takes the lock. An
//! operation lands in the second in which it completed. Only successful operations have
//! their latency recorded; errors are counted (and the first message kept).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

use crate::pace::Epoch;

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// The per-second histograms: same range, 2 significant digits (20 KiB each).
fn second_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// All kinds of one round.
pub struct Stats {
    pub epoch: Arc<Epoch>,
    kinds: Vec<Arc<Kind>>,
    first_error: Mutex<Option<String>>,
}

/// One operation kind (e.g. "put", or "list" and "page" of a list workload).
pub struct Kind {
    pub name: &'static str,
    epoch: Arc<Epoch>,
    ok: AtomicU64,
    errors: AtomicU64,
    items: AtomicU64,
    conflicts: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    hist: Histogram<u64>,
    seconds: Vec<Second>,
}

struct Second {
    ok: u64,
    errors: u64,
    hist: Histogram<u64>,
}

impl Stats {
    pub fn new(names: &[&'static str], epoch: Arc<Epoch>) -> Arc<Stats> {
        Arc::new(Stats {
            epoch: epoch.clone(),
            kinds: names
                .iter()
                .map(|&name| {
                    Arc::new(Kind {
                        name,
                        epoch: epoch.clone(),
                        ok: AtomicU64::new(0),
                        errors: AtomicU64::new(0),
                        items: AtomicU64::new(0),
                        conflicts: AtomicU64::new(0),
                        inner: Mutex::new(Inner {
                            hist: latency_histogram(),
                            seconds: Vec::new(),
                        }),
                    })
                })
                .collect(),
            first_error: Mutex::new(None),
        })
    }

    /// Kind `i` in the order given to [`Stats::new`].
    pub fn kind(&self, i: usize) -> Arc<Kind> {
        self.kinds[i].clone()
    }

    /// Keeps the first error message of the round (printed with its results).
    pub fn note_error(&self, e: &anyhow::Error) {
        let mut f = self.first_error.lock();
        if f.is_none() {
            *f = Some(format!("{e:#}"));
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().clone()
    }

    /// Figures of every kind over `secs` seconds.
    pub fn finish(&self, secs: f64) -> Vec<KindReport> {
        self.kinds.iter().map(|k| k.report(secs)).collect()
    }
}

impl Kind {
    /// A successful operation that started at `t0`.
    pub fn ok_since(&self, t0: Instant) {
        self.ok_latency(t0.elapsed());
    }

    /// A successful operation that took `latency` and completed now.
    pub fn ok_latency(&self, latency: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let sec = self.epoch.elapsed().as_secs() as usize;
        let mut inner = self.inner.lock();
        let _ = inner.hist.record(us);
        let s = inner.second(sec);
        s.ok += 1;
        let _ = s.hist.record(us);
    }

    /// A failed operation (completed now).
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let sec = self.epoch.elapsed().as_secs() as usize;
        self.inner.lock().second(sec).errors += 1;
    }

    /// Items moved by operations (keys listed, events received).
    pub fn add_items(&self, n: u64) {
        self.items.fetch_add(n, Ordering::Relaxed);
    }

    /// Transactions whose compare failed (create on an existing key, update retries).
    pub fn add_conflicts(&self, n: u64) {
        self.conflicts.fetch_add(n, Ordering::Relaxed);
    }

    pub fn ok_count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn report(&self, secs: f64) -> KindReport {
        let inner = self.inner.lock();
        let ok = self.ok_count();
        let items = self.items.load(Ordering::Relaxed);
        let ms = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let secs_pos = secs.max(1e-9);
        let timeline = inner
            .seconds
            .iter()
            .map(|s| SecondPoint {
                ok: s.ok,
                errors: s.errors,
                p50_ms: ms(&s.hist, 0.5),
                p99_ms: ms(&s.hist, 0.99),
            })
            .collect();
        KindReport {
            kind: self.name,
            ops: ok,
            errors: self.error_count(),
            ops_per_sec: ok as f64 / secs_pos,
            latency: Latency {
                p50_ms: ms(&inner.hist, 0.5),
                p90_ms: ms(&inner.hist, 0.9),
                p99_ms: ms(&inner.hist, 0.99),
                p999_ms: ms(&inner.hist, 0.999),
                max_ms: inner.hist.max() as f64 / 1000.0,
            },
            mean_ms: if inner.hist.is_empty() {
                0.0
            } else {
                inner.hist.mean() / 1000.0
            },
            items,
            items_per_sec: items as f64 / secs_pos,
            conflicts: self.conflicts.load(Ordering::Relaxed),
            timeline,
            seconds: secs,
        }
    }
}

impl Inner {
    fn second(&mut self, sec: usize) -> &mut Second {
        while self.seconds.len() <= sec {
            self.seconds.push(Second {
                ok: 0,
                errors: 0,
                hist: second_histogram(),
            });
        }
        &mut self.seconds[sec]
    }
}

/// Latency quantiles of a set of operations, in milliseconds (flattened into the JSON
/// of rounds and kinds).
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// One kind's figures for a round.
#[derive(Serialize, Clone, Debug)]
pub struct KindReport {
    pub kind: &'static str,
    /// Successful operations.
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    #[serde(flatten)]
    pub latency: Latency,
    pub mean_ms: f64,
    /// Keys listed / events received.
    pub items: u64,
    pub items_per_sec: f64,
    /// Failed compares (update retries, creates of existing keys).
    pub conflicts: u64,
    #[serde(skip)]
    pub timeline: Vec<SecondPoint>,
    #[serde(skip)]
    pub seconds: f64,
}

/// One second of a round.
#[derive(Clone, Debug)]
pub struct SecondPoint {
    pub ok: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_into_whole_round_and_seconds() {
        let s = Stats::new(&["a", "b"], Epoch::new());
        let a = s.kind(0);
        a.ok_latency(Duration::from_millis(2));
        a.ok_latency(Duration::from_millis(4));
        a.error();
        let r = s.finish(2.0);
        assert_eq!(r[0].ops, 2);
        assert_eq!(r[0].errors, 1);
        assert_eq!(r[0].ops_per_sec, 1.0);
        assert_eq!(r[0].timeline.len(), 1);
        assert_eq!(r[0].timeline[0].ok, 2);
        assert!((r[0].latency.max_ms - 4.0).abs() < 0.01);
        assert_eq!(r[1].ops, 0);
        assert_eq!(r[1].latency.p99_ms, 0.0);
    }
}
