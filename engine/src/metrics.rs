//! Counters and histograms the engine keeps for `/metrics`.
//!
//! Counters (and the one gauge, `compactions_pending`) are plain `AtomicU64`s: the hot
//! paths pay a relaxed add, and the server reads them when it is scraped and hands them
//! to its Prometheus registry under the names given below. Histograms are the
//! `prometheus` crate's own (bucketing, sum and count come from it); a Prometheus
//! histogram is named when it is made, so their series names are set here, and the
//! server registers them as they are. The engine knows nothing of the text format or
//! of registries.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-bucket histogram (Prometheus semantics: `le` upper bounds inclusive); one
/// observation is a few relaxed atomic operations.
pub use prometheus::Histogram;

/// Bounds for durations in seconds, from 100 µs to 10 s.
pub const SECONDS_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A commit slower than this counts as etcd's slow apply (etcd warns when applying an
/// entry takes longer than 100 ms).
pub const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Bounds for batch sizes (requests per commit).
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A histogram named `name` with these bounds.
fn histogram(name: &str, help: &str, bounds: &[f64]) -> Histogram {
    let opts = prometheus::HistogramOpts::new(name, help).buckets(bounds.to_vec());
    Histogram::with_opts(opts).expect("a valid metric name and ascending bounds")
}

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
    /// etcd_server_proposals_failed_total: write requests of batches that did not
    /// commit.
    pub failed_requests: AtomicU64,
    /// etcd_server_slow_apply_total: batches whose commit took longer than
    /// [`SLOW_COMMIT`].
    pub slow_commits: AtomicU64,
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
            batch_size: histogram(
                "pgetcd_commit_batch_size",
                "Write requests committed together in one Postgres transaction.",
                BATCH_BOUNDS,
            ),
            commit_seconds: histogram(
                "pgetcd_commit_duration_seconds",
                "Time of one group commit (one Postgres round trip).",
                SECONDS_BOUNDS,
            ),
            commit_failures: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            slow_commits: AtomicU64::new(0),
            publish_delay_seconds: histogram(
                "pgetcd_watch_publish_delay_seconds",
                "Time from a batch's commit to its events on the watch bus.",
                SECONDS_BOUNDS,
            ),
            compactions: AtomicU64::new(0),
            compaction_seconds: histogram(
                "pgetcd_compaction_duration_seconds",
                "Time of one compaction, from the index prune to the end of its Postgres work.",
                SECONDS_BOUNDS,
            ),
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

    /// The histograms, for a registry (each carries its series name).
    pub fn histograms(&self) -> [&Histogram; 4] {
        [
            &self.batch_size,
            &self.commit_seconds,
            &self.publish_delay_seconds,
            &self.compaction_seconds,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = histogram("t", "t", &[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 3.0, 9.0] {
            h.observe(v);
        }
        let proto = prometheus::core::Metric::metric(&h);
        let cumulative: Vec<(f64, u64)> = proto
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(cumulative, vec![(1.0, 2), (2.0, 3), (4.0, 4)]);
        assert_eq!(h.get_sample_count(), 5);
        assert!((h.get_sample_sum() - 15.0).abs() < 1e-9);
    }

    #[test]
    fn every_histogram_is_named() {
        let m = EngineMetrics::default();
        let names: Vec<String> = m
            .histograms()
            .iter()
            .map(|h| prometheus::core::Collector::desc(*h)[0].fq_name.clone())
            .collect();
        assert_eq!(
            names,
            [
                "pgetcd_commit_batch_size",
                "pgetcd_commit_duration_seconds",
                "pgetcd_watch_publish_delay_seconds",
                "pgetcd_compaction_duration_seconds",
            ]
        );
    }
}
