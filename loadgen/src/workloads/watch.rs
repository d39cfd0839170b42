//! watch-latency: put acknowledgement to event receipt.
//!
//! `watchers` watchers on one prefix, spread over `streams` watch streams (one gRPC
//! connection each); puts under the prefix at `--rate` per second (open loop: each put
//! is its own task). An event's latency is its receipt minus its put's acknowledgement;
//! an event that arrives before the acknowledgement (etcd often notifies watchers
//! before answering the put) counts as ~0. A round ends when every watcher has seen an
//! event for every acknowledged put, or fails after 30 s more.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{
    PutRequest, WatchCreateRequest, WatchRequest, watch_request::RequestUnion,
};
use rand::Rng;

use super::{Outcome, RoundCtx};
use crate::conn;
use crate::prefill::prefix_end;

/// Acknowledgement times by revision.
pub type Acks = Arc<Mutex<HashMap<i64, Instant>>>;

pub async fn latency(
    ctx: &RoundCtx<'_>,
    watchers: usize,
    streams: usize,
    prev_kv: bool,
) -> Result<Outcome> {
    let prefix = format!(
        "/loadgen/watch/{}/{}/",
        ctx.idx,
        rand::rng().random::<u32>()
    );
    let end = prefix_end(prefix.as_bytes());
    let acks: Acks = Arc::default();
    let (event, put) = (ctx.stats.kind(0), ctx.stats.kind(1));
    // Set to the number of acknowledged puts once they are all done.
    let (done_tx, done_rx) = tokio::sync::watch::channel(None::<u64>);
    let per_stream = watchers.div_ceil(streams.max(1));
    let mut recv_tasks = Vec::new();
    let mut ready = Vec::new();
    for s in 0..streams.max(1) {
        let n = per_stream.min(watchers.saturating_sub(s * per_stream));
        if n == 0 {
            break;
        }
        let ch = ctx.target.channel(s).await?;
        let mut client = conn::watch(&ch);
        let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
        for _ in 0..n {
            tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(prefix.clone()),
                    range_end: end.clone(),
                    prev_kv,
                    ..Default::default()
                })),
            })
            .await?;
        }
        let (acks, event, mut done_rx) = (acks.clone(), event.clone(), done_rx.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        recv_tasks.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut inbound = client
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| anyhow!("watch: {e}"))?
                .into_inner();
            let mut created = 0;
            let mut ready_tx = Some(ready_tx);
            let mut seen = 0u64;
            loop {
                if let Some(puts) = *done_rx.borrow()
                    && seen >= puts * n as u64
                {
                    return Ok::<(), anyhow::Error>(());
                }
                let resp = tokio::select! {
                    m = inbound.message() => match m? {
                        Some(resp) => resp,
                        None => bail!("watch stream ended"),
                    },
                    c = done_rx.changed() => {
                        c?;
                        continue;
                    }
                };
                let now = Instant::now();
                if resp.created {
                    created += 1;
                    if created == n
                        && let Some(t) = ready_tx.take()
                    {
                        let _ = t.send(());
                    }
                    continue;
                }
                if resp.canceled {
                    bail!("watch canceled: {}", resp.cancel_reason);
                }
                let acks_now = acks.lock();
                for ev in &resp.events {
                    let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    // Not acknowledged yet: the event beat the put's answer.
                    let lat = acks_now
                        .get(&rev)
                        .map_or(Duration::ZERO, |ack| now.saturating_duration_since(*ack));
                    event.ok_latency(lat);
                    event.add_items(1);
                    seen += 1;
                }
            }
        }));
    }
    for r in ready {
        let _ = r.await;
    }
    ctx.restart();
    let kv = conn::kv(&ctx.prep.channels[0]);
    let mut put_tasks = Vec::new();
    while let Some(i) = ctx.budget.next().await {
        let mut kv = kv.clone();
        let key = Bytes::from(format!("{prefix}{}", i % ctx.p.key_space_size));
        let (value, acks, put, stats) = (
            ctx.prep.value.clone(),
            acks.clone(),
            put.clone(),
            ctx.stats.clone(),
        );
        put_tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            match kv
                .put(PutRequest {
                    key,
                    value,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    let rev = r.into_inner().header.map_or(0, |h| h.revision);
                    acks.lock().insert(rev, Instant::now());
                    put.ok_since(t0);
                }
                Err(e) => {
                    put.error();
                    stats.note_error(&e.into());
                }
            }
        }));
    }
    for t in put_tasks {
        t.await?;
    }
    let _ = done_tx.send(Some(put.ok_count()));
    for t in recv_tasks {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(r) => r??,
            Err(_) => bail!("watchers did not receive every event within 30 s"),
        }
    }
    Ok(Outcome {
        notes: vec![format!(
            "{watchers} watchers over {} streams, {} puts",
            streams.max(1).min(watchers.max(1)),
            put.ok_count()
        )],
        ..Outcome::default()
    })
}
