//! Fan-out of committed etcd events to watchers.
//!
//! The producer (the WAL feed) publishes one [`Batch`] per committed Postgres
//! transaction into a lock-free ring ([`ring`]); publishing never waits for anyone. One
//! dispatcher task ([`hub`]) reads the ring, finds the watchers of each event through a
//! key index ([`index`]: exact keys by hash, ranges by a sorted stabbing list) and pushes
//! per-watcher deliveries into each watch stream's bounded queue.
//!
//! Lag and overflow (the contract, in the spirit of tokio's broadcast):
//! - The ring holds the last `ring_capacity` batches. If the dispatcher falls further
//!   behind, it skips to the newest batch and marks every watcher *slow* from the first
//!   revision it did not deliver.
//! - A stream's queue holds `stream_queue` deliveries. When a push finds it full, that
//!   watcher is removed from the index and marked slow from the first revision of the
//!   delivery that did not fit; nothing else waits. The stream later catches up from
//!   history (the engine's index and Postgres) and registers again.
//! - Registration returns the last dispatched revision `D`: events of revisions above
//!   `D` (and at or above the watcher's start) will come from the bus, so the caller
//!   replays `[start, D]` from history: no gap, no duplicate.
//! - Memory is bounded by `ring_capacity` batches plus `stream_queue` deliveries per
//!   stream; a slow watcher costs one entry in its stream's slow list.
//!
//! Must not depend on Postgres, tonic or the WAL crate.

/// Watcher registry and the dispatcher task.
pub mod hub;
/// Which watchers watch a key.
pub mod index;
/// The lock-free single-producer ring of batches.
pub mod ring;

use pgetcd_proto::mvccpb::Event;

pub use hub::{
    Delivery, Hub, HubConfig, HubStats, REWOUND, SlowSignal, StreamHandle, WatcherGauge,
    WatcherSpec,
};
pub use index::{KeySpan, WatcherId};
pub use ring::{Lagged, Ring};

/// Whether `ev` passes etcd's watch filters NOPUT / NODELETE.
pub fn passes_filters(ev: &Event, no_put: bool, no_delete: bool) -> bool {
    if ev.r#type == pgetcd_proto::mvccpb::event::EventType::Put as i32 {
        !no_put
    } else {
        !no_delete
    }
}

/// The events of one committed transaction, in (revision, sub-revision) order.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Revision of the last event (the batch's commit revision).
    pub last_revision: i64,
    /// The events; `kv.mod_revision` is each event's revision.
    pub events: Vec<Event>,
}
