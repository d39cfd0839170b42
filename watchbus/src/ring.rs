//! A bounded ring of batches with one producer and any number of cursors.
//!
//! Protocol: the producer stores the batch into slot `seq % capacity` (an atomic
//! pointer swap), then advances `head` to `seq + 1` (release) and wakes waiters. A cursor
//! at `next < head` loads the slot; if the slot holds a later sequence, the producer
//! lapped the cursor: it reports [`Lagged`] and jumps to the oldest batch still held.
//! The publish path takes no lock and never waits; only the wake-up of parked cursors
//! goes through tokio's `Notify`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::Batch;

struct Entry {
    seq: u64,
    batch: Arc<Batch>,
}

/// The cursor fell more than the ring's capacity behind; `skipped` batches were lost to
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged {
    /// Number of batches the cursor missed.
    pub skipped: u64,
}

/// The ring.
pub struct Ring {
    slots: Box<[ArcSwapOption<Entry>]>,
    head: AtomicU64,
    notify: Notify,
}

impl Ring {
    /// A ring holding the last `capacity` batches.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            slots: (0..capacity).map(|_| ArcSwapOption::empty()).collect(),
            head: AtomicU64::new(0),
            notify: Notify::new(),
        }
    }

    /// Publishes a batch (single producer).
    pub fn publish(&self, batch: Arc<Batch>) {
        let seq = self.head.load(Ordering::Relaxed);
        let slot = (seq % self.slots.len() as u64) as usize;
        self.slots[slot].store(Some(Arc::new(Entry { seq, batch })));
        self.head.store(seq + 1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// A cursor that sees batches published from now on.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            next: self.head.load(Ordering::Acquire),
        }
    }

    fn try_read(&self, cur: &mut Cursor) -> Option<Result<Arc<Batch>, Lagged>> {
        let head = self.head.load(Ordering::Acquire);
        if cur.next >= head {
            return None;
        }
        let slot = (cur.next % self.slots.len() as u64) as usize;
        match self.slots[slot].load_full() {
            Some(e) if e.seq == cur.next => {
                cur.next += 1;
                Some(Ok(e.batch.clone()))
            }
            _ => {
                let oldest = head.saturating_sub(self.slots.len() as u64);
                let skipped = oldest.saturating_sub(cur.next).max(1);
                cur.next = oldest.max(cur.next + 1);
                Some(Err(Lagged { skipped }))
            }
        }
    }

    /// The next batch for `cur`, waiting for one.
    pub async fn next(&self, cur: &mut Cursor) -> Result<Arc<Batch>, Lagged> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.try_read(cur) {
                return r;
            }
            notified.await;
        }
    }
}

/// A reader's position in the ring.
#[derive(Debug)]
pub struct Cursor {
    next: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn batch(rev: i64) -> Arc<Batch> {
        Arc::new(Batch {
            last_revision: rev,
            events: Vec::new(),
        })
    }

    #[tokio::test]
    async fn delivers_in_order_and_reports_lag() {
        let ring = Ring::new(4);
        let mut c = ring.cursor();
        for r in 1..=3 {
            ring.publish(batch(r));
        }
        for r in 1..=3 {
            assert_eq!(ring.next(&mut c).await.unwrap().last_revision, r);
        }
        for r in 4..=13 {
            ring.publish(batch(r));
        }
        // 10 published, 4 held: the cursor lost 6 and resumes at the oldest held.
        assert_eq!(ring.next(&mut c).await.unwrap_err(), Lagged { skipped: 6 });
        for r in 10..=13 {
            assert_eq!(ring.next(&mut c).await.unwrap().last_revision, r);
        }
    }

    #[tokio::test]
    async fn wakes_a_waiting_cursor() {
        let ring = Arc::new(Ring::new(2));
        let mut c = ring.cursor();
        let r2 = ring.clone();
        let waiter = tokio::spawn(async move { r2.next(&mut c).await.unwrap().last_revision });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ring.publish(batch(7));
        assert_eq!(waiter.await.unwrap(), 7);
    }
}
