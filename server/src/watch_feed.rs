//! The watch feed: committed batches → events → the watch bus.
//!
//! Sources ([`WatchSource`]): by default the writer hands every committed batch over
//! in-process (a bounded queue the writer never waits for: a batch that finds it full
//! is skipped, and shows up as a gap), so events reach the bus right after the commit;
//! the store's change feed (Postgres: the logical replication stream) is consumed
//! beside it (confirming its position, and publishing whatever the writer did not hand
//! over). With `--watch-source wal` the change feed is the only source.
//!
//! Protocol: the feed keeps `last`, the newest revision published to the bus (at start,
//! the revision the engine loaded). For each committed batch from either source it drops
//! changes at or below `last` (a resumed change feed repeats what was not confirmed),
//! fills any gap `(last, first)` from the engine's index (a skipped hand-off, or a
//! recreated slot that misses what was committed before it), attaches `prev_kv` from the
//! index, publishes the batch, and only then confirms the change feed's position. On any
//! change feed error it reopens the feed after its confirmed position; a feed that lost
//! history is recreated (the index fills the gap, or, if compaction removed it, every
//! watcher is resynced and so cancelled as compacted).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgetcd_engine::{Engine, StoreError, event_of, index::Version, kv_of};
use pgetcd_watchbus::{Batch, Hub};
use tokio::sync::watch;
use tracing::{info, warn};

/// Where watch events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchSource {
    /// The writer hands each committed batch to the feed in-process; the logical
    /// replication stream is still consumed (its slot confirmed) and publishes what the
    /// writer did not (nothing, while this instance is the only writer).
    Writer,
    /// Only the logical replication stream.
    Wal,
}

/// The newest revision published to the bus; held while publishing, so the two sources
/// publish each revision once, in order.
type Published = Arc<tokio::sync::Mutex<i64>>;

/// Runs the feed until `shutdown` turns true.
pub async fn run(
    engine: Engine,
    hub: Hub,
    source: WatchSource,
    mut shutdown: watch::Receiver<bool>,
) {
    // A new engine behind what the bus delivered (the store lost acknowledged writes)
    // rewinds the bus.
    let (dispatched, revision) = (hub.dispatched(), engine.revision());
    if revision < dispatched {
        hub.rewind(revision);
    }
    let last: Published = Arc::new(tokio::sync::Mutex::new(dispatched.min(revision)));
    // A follower's engine consumes this instance's change feed itself and hands every
    // applied batch over, as the writer does.
    let hand_off_only = engine.is_follower();
    if source == WatchSource::Writer || hand_off_only {
        let mut commits = engine.subscribe_commits();
        let (engine, hub, last) = (engine.clone(), hub.clone(), last.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    b = commits.recv() => b,
                    _ = crate::shutdown::stopped(&mut stop) => None,
                };
                let Some(batch) = batch else { return };
                let changes: Vec<_> = batch
                    .changes
                    .into_iter()
                    .map(|c| (c.key, c.version, Prev::Known(c.prev)))
                    .collect();
                let upto = batch.last_revision;
                let mut last = last.lock().await;
                if changes.is_empty() && upto < *last {
                    // A follower that reloaded found the store behind it.
                    hub.rewind(upto);
                    *last = upto;
                    continue;
                }
                publish(&engine, &hub, &mut last, changes, upto).await;
            }
        });
    }
    if hand_off_only {
        crate::shutdown::stopped(&mut shutdown).await;
        return;
    }
    let mut backoff = Duration::from_millis(50);
    loop {
        let session = stream_session(&engine, &hub, &last);
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    warn!(error = %e, "watch feed stream failed; reconnecting");
                    // The slot may have been dropped or lost its WAL: make sure it
                    // exists again (the gap, if any, is filled from the index).
                    if let Err(e) = engine.prepare_feed().await {
                        warn!(error = %e, "checking the change feed");
                    }
                }
            }
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One change feed connection's life: stream, apply, confirm, until an error.
async fn stream_session(engine: &Engine, hub: &Hub, last: &Published) -> Result<(), String> {
    let fail = |e: pgetcd_engine::Error| match e {
        pgetcd_engine::Error::Storage(s) => s.with_causes(),
        e => e.to_string(),
    };
    let mut stream = engine.open_feed().await.map_err(fail)?;
    let from = *last.lock().await;
    info!(
        keyspace = engine.keyspace(),
        last = from,
        "watch feed streaming"
    );
    loop {
        let commit = stream
            .next()
            .await
            .map_err(|e: StoreError| e.with_causes())?;
        // Only what this writer committed: the stream can be ahead of the writer's own
        // publish by a moment, so wait for it briefly; a commit still past it is another
        // writer's (this one was deposed and has not stepped down yet), whose prev_kv
        // this index cannot give (it may even hold this writer's own fenced batch). The
        // follower engine that replaces this one publishes it.
        if let Some(newest) = commit.changes.last().map(|(_, v)| v.mod_revision)
            && newest > engine.revision()
        {
            let _ = engine.wait_applied(newest, Duration::from_secs(1)).await;
        }
        let own = engine.revision();
        let changes: Vec<_> = commit
            .changes
            .into_iter()
            .filter(|(_, v)| v.mod_revision <= own)
            .map(|(key, version)| (key, version, Prev::Unknown))
            .collect();
        let upto = changes.last().map_or(0, |(_, v, _)| v.mod_revision);
        publish(engine, hub, &mut *last.lock().await, changes, upto).await;
        stream.confirm(commit.position);
    }
}

/// What the feed knows of a change's previous version (its event's `prev_kv`).
enum Prev {
    /// Handed over by the writer: the live version before the change, if any.
    Known(Option<Version>),
    /// To be read from the index.
    Unknown,
}

/// Publishes the changes above `last` (in revision order), first filling a gap after
/// `last` from the index, then advances `last`. `upto` is the batch's newest revision: a
/// batch without changes above `last` but with a newer `upto` (a follower that loaded the
/// keyspace again) only fills the gap up to it.
async fn publish(
    engine: &Engine,
    hub: &Hub,
    last: &mut i64,
    changes: Vec<(Bytes, Version, Prev)>,
    upto: i64,
) {
    let changes: Vec<_> = changes
        .into_iter()
        .filter(|(_, v, _)| v.mod_revision > *last)
        .collect();
    let first = match changes.first() {
        Some((_, v, _)) => v.mod_revision,
        None if upto > *last => upto + 1,
        None => return,
    };
    let mut filled = false;
    if first > *last + 1 {
        let all = Bytes::from_static(&[0]);
        match engine
            .events_between(&all, &all, *last + 1, first - 1, true)
            .await
        {
            Ok(events) if !events.is_empty() => {
                info!(
                    from = *last + 1,
                    to = first - 1,
                    "watch feed filled a gap from the index"
                );
                hub.publish(Batch {
                    last_revision: first - 1,
                    events,
                });
                filled = true;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, from = *last + 1, "watch feed cannot fill a gap; resyncing watchers");
                hub.resync_all();
            }
        }
    }
    let Some(last_revision) = changes.last().map(|(_, v, _)| v.mod_revision) else {
        if !filled {
            hub.publish(Batch {
                last_revision: upto,
                events: Vec::new(),
            });
        }
        engine.note_published(upto);
        *last = upto;
        return;
    };
    let mut events = Vec::with_capacity(changes.len());
    let mut unknown = Vec::new();
    for (i, (key, v, prev)) in changes.iter().enumerate() {
        let prev_kv = match prev {
            Prev::Known(None) => None,
            Prev::Known(Some(p)) if p.value.is_some() => Some(kv_of(key, p)),
            // Unknown, or known but its value was evicted: read it.
            _ => {
                unknown.push(i);
                None
            }
        };
        events.push(event_of(key, v, prev_kv));
    }
    if unknown.len() == events.len() {
        if let Err(e) = engine.attach_prev_kvs(&mut events).await {
            warn!(error = %e, "attaching prev_kv to watch events");
        }
    } else if !unknown.is_empty() {
        let mut some: Vec<_> = unknown.iter().map(|&i| events[i].clone()).collect();
        match engine.attach_prev_kvs(&mut some).await {
            Ok(()) => {
                for (&i, ev) in unknown.iter().zip(some) {
                    events[i].prev_kv = ev.prev_kv;
                }
            }
            Err(e) => warn!(error = %e, "attaching prev_kv to watch events"),
        }
    }
    hub.publish(Batch {
        last_revision,
        events,
    });
    engine.note_published(last_revision);
    *last = last_revision;
}
