//! etcd's auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`),
//! with etcd's schedule:
//!
//! - **periodic**, retention T: the current revision is sampled every `min(T, 1h) / 10`;
//!   once T has passed since start, and then every `min(T, 1h)` after the last
//!   success, the store is compacted to the oldest sample, the revision of about T
//!   ago. A failed compaction is retried at the next sample.
//! - **revision**, retention N: every 5 minutes the store is compacted to the current
//!   revision minus N, unless that is not positive or was already done.
//!
//! Compactions go through the same path as the Compact RPC (not physical), so watchers
//! and readers see exactly what a client-requested compaction gives them. An
//! "already compacted" answer counts as success, as in etcd.

use std::collections::VecDeque;
use std::time::Duration;

use pgetcd_engine::{Engine, Error};

use crate::node::Node;
use pgetcd_proto::etcdserverpb::CompactionRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// The periodic schedule never waits longer than this between compactions.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);
/// Samples per compaction interval (etcd's retry divisor).
const SAMPLES_PER_INTERVAL: u32 = 10;
/// Interval of the revision schedule.
pub const REVISION_INTERVAL: Duration = Duration::from_secs(300);

/// What to compact automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// No automatic compaction (etcd's retention 0, the default).
    Off,
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions of history.
    Revision(i64),
}

impl AutoCompaction {
    /// Parses etcd's flags: the mode `periodic` or `revision`; the retention a plain
    /// number (hours in periodic mode, revisions in revision mode) or, in periodic
    /// mode, a duration such as `30m` or `1h30m`. Zero turns it off.
    pub fn parse(mode: &str, retention: &str) -> Result<Self, String> {
        let retention = retention.trim();
        let plain: Option<u64> = retention.parse().ok();
        let policy = match mode {
            "periodic" => {
                let period = match plain {
                    Some(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                    None => crate::duration::parse_go_duration(retention).map_err(|e| {
                        format!("--auto-compaction-retention: error parsing {retention:?}: {e}")
                    })?,
                };
                if period.is_zero() {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Periodic(period)
                }
            }
            "revision" => match plain {
                Some(0) => AutoCompaction::Off,
                Some(n) => AutoCompaction::Revision(i64::try_from(n).map_err(|_| {
                    format!("--auto-compaction-retention: {retention} revisions is too many")
                })?),
                None => {
                    return Err(format!(
                        "--auto-compaction-retention: revision mode needs a number of revisions, got {retention:?}"
                    ));
                }
            },
            other => {
                return Err(format!(
                    "--auto-compaction-mode: unknown mode {other:?} (periodic or revision)"
                ));
            }
        };
        Ok(policy)
    }
}

/// The periodic schedule's state: a sliding window of revision samples.
#[derive(Debug)]
struct PeriodicWindow {
    period: Duration,
    sample_every: Duration,
    keep: usize,
    samples: VecDeque<i64>,
    /// Time that must pass since `last_success` before the next compaction: the whole
    /// period at first, then the compaction interval.
    wait: Duration,
    last_success: Instant,
}

impl PeriodicWindow {
    fn new(period: Duration, now: Instant) -> Self {
        let interval = period.min(MAX_PERIODIC_INTERVAL);
        let sample_every = (interval / SAMPLES_PER_INTERVAL).max(Duration::from_millis(1));
        let keep = (period.as_nanos() / sample_every.as_nanos()) as usize + 1;
        PeriodicWindow {
            period,
            sample_every,
            keep,
            samples: VecDeque::with_capacity(keep + 1),
            wait: period,
            last_success: now,
        }
    }

    /// Records the current revision (once per `sample_every`).
    fn sample(&mut self, revision: i64) {
        self.samples.push_back(revision);
        if self.samples.len() > self.keep {
            self.samples.pop_front();
        }
    }

    /// The revision to compact to now, if a compaction is due: the oldest sample, taken
    /// about one period ago.
    fn due(&mut self, now: Instant) -> Option<i64> {
        if now.duration_since(self.last_success) < self.wait {
            return None;
        }
        self.wait = self.period.min(MAX_PERIODIC_INTERVAL);
        self.samples.front().copied()
    }

    fn succeeded(&mut self, now: Instant) {
        self.last_success = now;
    }
}

/// Compacts to `rev` like the Compact RPC; true when done (or already done).
/// Compacts at `rev` on the writer; a follower leaves it to the writer's schedule.
async fn compact(engine: &Engine, rev: i64, policy: AutoCompaction) -> bool {
    if engine.is_follower() {
        return false;
    }
    let started = std::time::Instant::now();
    info!(revision = rev, ?policy, "starting auto compaction");
    match engine
        .compact(CompactionRequest {
            revision: rev,
            physical: false,
        })
        .await
    {
        Ok(_) | Err(Error::Compacted) => {
            info!(revision = rev, took = ?started.elapsed(), "completed auto compaction");
            true
        }
        Err(e) => {
            warn!(revision = rev, error = %e, "failed auto compaction");
            false
        }
    }
}

/// Sleeps for `d`; false when shutdown came first.
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = crate::shutdown::stopped(shutdown) => false,
    }
}

/// Runs the schedule until shutdown.
pub async fn run(
    node: Node,
    policy: AutoCompaction,
    revision_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    match policy {
        AutoCompaction::Off => {}
        AutoCompaction::Periodic(period) => {
            let mut window = PeriodicWindow::new(period, Instant::now());
            loop {
                window.sample(node.engine().header().revision);
                if !pause(window.sample_every, &mut shutdown).await {
                    return;
                }
                if let Some(rev) = window.due(Instant::now())
                    && compact(&node.engine(), rev, policy).await
                {
                    window.succeeded(Instant::now());
                }
            }
        }
        AutoCompaction::Revision(keep) => {
            let mut done = 0;
            loop {
                if !pause(revision_interval, &mut shutdown).await {
                    return;
                }
                let rev = node.engine().header().revision - keep;
                if rev <= 0 || rev == done {
                    continue;
                }
                if compact(&node.engine(), rev, policy).await {
                    done = rev;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_retention_forms() {
        let p = AutoCompaction::parse;
        assert_eq!(p("periodic", "0"), Ok(AutoCompaction::Off));
        assert_eq!(
            p("periodic", "1"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(3600)))
        );
        assert_eq!(
            p("periodic", "1h30m"),
            Ok(AutoCompaction::Periodic(Duration::from_secs(5400)))
        );
        assert_eq!(
            p("periodic", "500ms"),
            Ok(AutoCompaction::Periodic(Duration::from_millis(500)))
        );
        assert_eq!(p("revision", "1000"), Ok(AutoCompaction::Revision(1000)));
        assert_eq!(p("revision", "0"), Ok(AutoCompaction::Off));
        assert!(p("revision", "1h").is_err());
        assert!(p("periodic", "soon").is_err());
        assert!(p("sometimes", "1").is_err());
    }

    #[test]
    fn periodic_waits_one_period_then_compacts_to_the_sample_of_a_period_ago() {
        let start = Instant::now();
        let mut w = PeriodicWindow::new(Duration::from_secs(10), start);
        assert_eq!(w.sample_every, Duration::from_secs(1));
        assert_eq!(w.keep, 11);
        // One sample per second; the revision grows by 100 per second.
        let mut rev = 1;
        for s in 0..10u64 {
            w.sample(rev);
            rev += 100;
            assert_eq!(
                w.due(start + Duration::from_secs(s + 1) - Duration::from_millis(1)),
                None
            );
        }
        w.sample(rev);
        let now = start + Duration::from_secs(10);
        assert_eq!(w.due(now), Some(1));
        w.succeeded(now);
        // Then every period: the oldest of the last 11 samples, 10 s old.
        for s in 11..=20u64 {
            rev += 100;
            w.sample(rev);
            let at = start + Duration::from_secs(s);
            if s < 20 {
                assert_eq!(w.due(at), None);
            } else {
                assert_eq!(w.due(at), Some(rev - 1000));
            }
        }
    }

    #[test]
    fn a_long_retention_compacts_hourly_and_samples_every_six_minutes() {
        let start = Instant::now();
        let mut w = PeriodicWindow::new(Duration::from_secs(24 * 3600), start);
        assert_eq!(w.sample_every, Duration::from_secs(360));
        assert_eq!(w.keep, 241);
        w.sample(5);
        assert_eq!(w.due(start + Duration::from_secs(23 * 3600)), None);
        assert_eq!(w.due(start + Duration::from_secs(24 * 3600)), Some(5));
        w.succeeded(start + Duration::from_secs(24 * 3600));
        assert_eq!(w.due(start + Duration::from_secs(25 * 3600)), Some(5));
    }
}
