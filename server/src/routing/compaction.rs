//! Compaction of the keyspaces a routed listener reaches. A client (kube-apiserver's
//! compactor) compacts the listener's own keyspace to a revision it read some time ago;
//! each routed keyspace is then compacted to the revision it had when the main keyspace
//! was at that revision, so every keyspace keeps the same span of time. What this needs
//! is a bounded record of the keyspaces' revisions over time: one sample a second while
//! the main keyspace's revision moves, the last [`SAMPLES`] of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::CompactionRequest;
use pgetcd_proto::etcdserverpb::kv_server::Kv;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::Routes;

/// How often the revisions are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: an hour at one a second (kube-apiserver compacts every 5 minutes by
/// default). A compaction older than the oldest sample leaves the routed keyspaces as
/// they are until the next one.
pub const SAMPLES: usize = 3600;

/// The keyspaces' revisions at one moment: the main keyspace's, then each routed one's
/// (by target index).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    revisions: Vec<i64>,
}

/// The record of revisions, and the compaction of the routed keyspaces.
pub struct CompactionMap {
    routes: Arc<Routes>,
    samples: Mutex<VecDeque<Sample>>,
    /// A compaction of the routed keyspaces is under way (one at a time).
    busy: AtomicBool,
}

impl CompactionMap {
    pub fn new(routes: Arc<Routes>) -> Arc<Self> {
        let map = Arc::new(Self {
            routes,
            samples: Mutex::new(VecDeque::new()),
            busy: AtomicBool::new(false),
        });
        map.sample();
        map
    }

    /// Samples every [`SAMPLE_EVERY`] until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(),
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            }
        }
    }

    fn sample(&self) {
        let revisions: Vec<i64> = self
            .routes
            .targets()
            .iter()
            .map(|t| t.node.engine().stats().revision)
            .collect();
        record(&mut self.samples.lock(), Sample { revisions });
    }

    /// The main keyspace was compacted to `rev`: compacts the routed ones to their
    /// revisions of then (in the background; a routed keyspace that is down is left
    /// for the next compaction).
    pub fn main_compacted(self: &Arc<Self>, rev: i64) {
        let Some(at) = take_until(&mut self.samples.lock(), rev) else {
            return;
        };
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let map = self.clone();
        tokio::spawn(async move {
            for (i, target) in map.routes.targets().iter().enumerate().skip(1) {
                let to = at.revisions[i];
                if to <= target.node.engine().stats().compact_revision {
                    continue;
                }
                let req = tonic::Request::new(CompactionRequest {
                    revision: to,
                    physical: false,
                });
                match target.kv.compact(req).await {
                    Ok(_) => {
                        debug!(keyspace = %target.name, revision = to, "routed keyspace compacted")
                    }
                    Err(e) => {
                        warn!(keyspace = %target.name, revision = to, error = %e.message(), "compacting a routed keyspace failed")
                    }
                }
            }
            map.busy.store(false, Ordering::Release);
        });
    }
}

/// Adds `s` unless the main keyspace's revision did not move; keeps [`SAMPLES`].
fn record(samples: &mut VecDeque<Sample>, s: Sample) {
    if samples
        .back()
        .is_some_and(|b| b.revisions[0] == s.revisions[0])
    {
        return;
    }
    samples.push_back(s);
    while samples.len() > SAMPLES {
        samples.pop_front();
    }
}

/// The newest sample taken at or below main revision `rev`; the older ones are dropped
/// (a later compaction is of a later revision).
fn take_until(samples: &mut VecDeque<Sample>, rev: i64) -> Option<Sample> {
    let n = samples.iter().take_while(|s| s.revisions[0] <= rev).count();
    if n == 0 {
        return None;
    }
    samples.drain(..n - 1);
    samples.front().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(r: &[i64]) -> Sample {
        Sample {
            revisions: r.to_vec(),
        }
    }

    #[test]
    fn the_newest_sample_at_or_below_the_revision_is_taken() {
        let mut q = VecDeque::new();
        for r in [[10, 100], [10, 150], [20, 200], [30, 300], [40, 400]] {
            record(&mut q, s(&r));
        }
        // The main keyspace did not move: one sample.
        assert_eq!(q.len(), 4);
        assert_eq!(take_until(&mut q, 5), None);
        assert_eq!(take_until(&mut q, 25), Some(s(&[20, 200])));
        // Older samples went; the one taken stays for a rerun at the same revision.
        assert_eq!(q.front(), Some(&s(&[20, 200])));
        assert_eq!(take_until(&mut q, 25), Some(s(&[20, 200])));
        assert_eq!(take_until(&mut q, 1000), Some(s(&[40, 400])));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn samples_are_bounded() {
        let mut q = VecDeque::new();
        for r in 0..(SAMPLES as i64 + 10) {
            record(&mut q, s(&[r, r]));
        }
        assert_eq!(q.len(), SAMPLES);
        assert_eq!(q.front(), Some(&s(&[10, 10])));
    }
}
