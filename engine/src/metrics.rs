//! Counters and histograms the engine keeps for `/metrics`: plain atomics, so the hot
//! paths pay a relaxed add and the server renders them in Prometheus format on scrape.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-bucket histogram (Prometheus semantics: cumulative on render, `le` upper
/// bounds inclusive). Observations are lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound plus the +Inf bucket (not cumulative).
    buckets: Vec<AtomicU64>,
    /// Sum of observations, as f64 bits updated by compare-and-swap.
    sum_bits: AtomicU64,
    count: AtomicU64,
}

/// A histogram's figures at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound, cumulative count) for each finite bound.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations (the +Inf bucket).
    pub count: u64,
}

impl Histogram {
    /// A histogram with these ascending upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative figures for rendering.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                acc += c.load(Ordering::Relaxed);
                (b, acc)
            })
            .collect();
        let count = acc + self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            sum: f64::from_bits(self.sum_bits.load(Ordering::Relaxed)),
            count,
        }
    }
}

/// Bounds for durations in seconds, from 100 µs to 10 s.
pub const SECONDS_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bounds for batch sizes (requests per commit).
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// What the engine counts. Names in comments are the series the server exports.
#[derive(Debug)]
pub struct EngineMetrics {
    /// etcd_mvcc_range_total: range operations (including inside txns).
    pub ranges: AtomicU64,
    /// etcd_mvcc_put_total: put operations (including inside txns).
    pub puts: AtomicU64,
    /// etcd_mvcc_delete_total: delete-range operations (including inside txns).
    pub deletes: AtomicU64,
    /// etcd_mvcc_txn_total: txns that executed more than one operation.
    pub txns: AtomicU64,
    /// pgetcd_value_cache_hits_total: values served from memory on reads that needed
    /// values.
    pub cache_hits: AtomicU64,
    /// pgetcd_value_cache_misses_total: values read from Postgres.
    pub cache_misses: AtomicU64,
    /// pgetcd_commit_batch_size: write requests per Postgres transaction.
    pub batch_size: Histogram,
    /// pgetcd_commit_duration_seconds: time of the commit round trip.
    pub commit_seconds: Histogram,
    /// pgetcd_commit_failures_total: batches that did not commit.
    pub commit_failures: AtomicU64,
    /// pgetcd_watch_publish_delay_seconds: from a batch's commit to its events on the
    /// watch bus.
    pub publish_delay_seconds: Histogram,
    /// pgetcd_compactions_total: compactions done.
    pub compactions: AtomicU64,
    /// pgetcd_compaction_duration_seconds.
    pub compaction_seconds: Histogram,
    /// pgetcd_compactions_pending: compactions recorded whose Postgres work (copy,
    /// delete, partition drops) has not finished.
    pub compactions_pending: AtomicU64,
    /// pgetcd_compaction_retries_total: failed attempts at that work (each retried).
    pub compaction_retries: AtomicU64,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            ranges: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            txns: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_BOUNDS),
            commit_seconds: Histogram::new(SECONDS_BOUNDS),
            commit_failures: AtomicU64::new(0),
            publish_delay_seconds: Histogram::new(SECONDS_BOUNDS),
            compactions: AtomicU64::new(0),
            compaction_seconds: Histogram::new(SECONDS_BOUNDS),
            compactions_pending: AtomicU64::new(0),
            compaction_retries: AtomicU64::new(0),
        }
    }
}

impl EngineMetrics {
    /// Adds one to a counter.
    pub(crate) fn inc(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 3.0, 9.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(1.0, 2), (2.0, 3), (4.0, 4)]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 15.0).abs() < 1e-9);
    }
}
