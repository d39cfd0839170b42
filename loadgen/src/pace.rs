//! When a round ends (`--total` operations or `--duration`) and how fast operations may
//! start (`--rate`).
//!
//! Operations are numbered from 0 across all clients; under a rate, operation `n` may
//! start at `start + n / rate`, whichever client claims it. That is an open schedule:
//! when the server falls behind, late operations start at once (up to `--clients` of
//! them in flight) instead of shifting the schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cli::Params;

/// When a round started: set when the round is created and again by a workload that
/// must set up first (watchers) via [`Epoch::restart`]; the budget, the rate schedule
/// and the per-second buckets all count from it.
pub struct Epoch {
    base: Instant,
    offset_ns: AtomicU64,
}

impl Epoch {
    pub fn new() -> Arc<Epoch> {
        Arc::new(Epoch {
            base: Instant::now(),
            offset_ns: AtomicU64::new(0),
        })
    }

    pub fn start(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_ns.load(Ordering::Relaxed))
    }

    /// The round starts now.
    pub fn restart(&self) {
        self.offset_ns
            .store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn elapsed(&self) -> Duration {
        self.start().elapsed()
    }
}

pub struct Budget {
    epoch: Arc<Epoch>,
    total: Option<u64>,
    duration: Option<Duration>,
    rate: Option<f64>,
    next: AtomicU64,
}

impl Budget {
    pub fn new(p: &Params, epoch: Arc<Epoch>) -> Budget {
        Budget::with(p.total, p.duration, p.rate, epoch)
    }

    pub fn with(
        total: Option<u64>,
        duration: Option<Duration>,
        rate: Option<f64>,
        epoch: Arc<Epoch>,
    ) -> Budget {
        Budget {
            epoch,
            total,
            duration,
            rate,
            next: AtomicU64::new(0),
        }
    }

    /// Claims the next operation, waiting for its slot under the rate; `None` once the
    /// round is over.
    pub async fn next(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if self.total.is_some_and(|t| n >= t) {
            return None;
        }
        if let Some(at) = self.slot(n) {
            if self.deadline().is_some_and(|d| at >= d) {
                return None;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        if self.deadline().is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        Some(n)
    }

    /// When operation `n` may start (`None` without a rate).
    fn slot(&self, n: u64) -> Option<Instant> {
        self.rate
            .map(|r| self.start() + Duration::from_secs_f64(n as f64 / r))
    }

    pub fn start(&self) -> Instant {
        self.epoch.start()
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.duration.map(|d| self.start() + d)
    }

    /// The round's share done so far, 0..=1, for the progress line.
    pub fn fraction(&self, done: u64) -> f64 {
        match (self.total, self.duration) {
            (Some(t), _) if t != u64::MAX => done as f64 / t as f64,
            (_, Some(d)) => self.epoch.elapsed().as_secs_f64() / d.as_secs_f64().max(1e-9),
            _ => 0.0,
        }
        .min(1.0)
    }
}

/// A fixed-rate schedule for one operation kind (the k8s scenario runs several).
pub struct Ticker {
    start: Instant,
    interval: Duration,
    n: u64,
}

impl Ticker {
    pub fn new(start: Instant, per_sec: f64) -> Ticker {
        Ticker {
            start,
            interval: Duration::from_secs_f64(1.0 / per_sec.max(1e-6)),
            n: 0,
        }
    }

    /// The next slot (not waiting).
    pub fn next_at(&mut self) -> Instant {
        let at = self.start + self.interval.mul_f64(self.n as f64);
        self.n += 1;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn total_stops_claims() {
        let b = Budget::with(Some(3), None, None, Epoch::new());
        assert_eq!(b.next().await, Some(0));
        assert_eq!(b.next().await, Some(1));
        assert_eq!(b.next().await, Some(2));
        assert_eq!(b.next().await, None);
    }

    #[tokio::test]
    async fn rate_spaces_claims() {
        let b = Budget::with(Some(3), None, Some(100.0), Epoch::new());
        let t = Instant::now();
        while b.next().await.is_some() {}
        assert!(t.elapsed() >= Duration::from_millis(19));
    }

    #[tokio::test]
    async fn duration_ends_claims() {
        let b = Budget::with(None, Some(Duration::from_millis(30)), None, Epoch::new());
        let mut n = 0;
        while b.next().await.is_some() {
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!((3..=7).contains(&n), "{n}");
    }
}
