//! Lease workloads: lease-expiry (many keys on one lease that expires) and
//! lease-keepalive (keepalive round trips on per-client streams).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
};
use rand::Rng;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::{Outcome, RoundCtx};
use crate::conn;
use crate::prefill::prefix_end;

/// Grant a lease, attach `keys` keys (with `--clients` clients), stop the keepalives and
/// keep one client putting another key until the attached keys are gone. The round's
/// seconds are the time from the lease's expiry until the keys were gone.
pub async fn expiry(ctx: &RoundCtx<'_>, keys: u64, ttl: i64) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let mut leases = conn::lease(&channels[0]);
    let lease = leases
        .lease_grant(LeaseGrantRequest { id: 0, ttl })
        .await?
        .into_inner()
        .id;
    let prefix = format!(
        "/loadgen/lease/{}/{}/",
        ctx.idx,
        rand::rng().random::<u32>()
    );
    // Keep the lease alive while the keys are being attached.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut keeper = leases.clone();
    let keepalive = tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // etcd answers the call only with its first message: queue one first.
        tx.send(LeaseKeepAliveRequest { id: lease }).await?;
        let mut stream = keeper
            .lease_keep_alive(ReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            stream.message().await?;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut stop_rx => return Ok::<(), anyhow::Error>(()),
            }
            tx.send(LeaseKeepAliveRequest { id: lease }).await?;
        }
    });
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for c in 0..ctx.cli.clients.max(1) {
        let mut kv = conn::kv(&channels[c % channels.len()]);
        let (next, value, prefix) = (next.clone(), ctx.prep.value.clone(), prefix.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= keys {
                    return Ok::<(), anyhow::Error>(());
                }
                kv.put(PutRequest {
                    key: Bytes::from(format!("{prefix}{n:08}")),
                    value: value.clone(),
                    lease,
                    ..Default::default()
                })
                .await?;
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    // Last keepalive now; the lease expires one TTL later.
    let _ = stop_tx.send(());
    keepalive.await??;
    let attached = Instant::now();
    let expires = attached + Duration::from_secs(ttl.max(0) as u64);
    let mut kv = conn::kv(&channels[0]);
    let put = ctx.stats.kind(0);
    let end = prefix_end(prefix.as_bytes());
    let gone_at = loop {
        let t = Instant::now();
        kv.put(PutRequest {
            key: Bytes::from(format!("{prefix}probe")),
            value: ctx.prep.value.clone(),
            ..Default::default()
        })
        .await?;
        put.ok_since(t);
        let left = kv
            .range(RangeRequest {
                key: Bytes::from(prefix.clone()),
                range_end: end.clone(),
                count_only: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .count;
        if left <= 1 && Instant::now() >= expires {
            break Instant::now();
        }
        if attached.elapsed() > Duration::from_secs(ttl.max(0) as u64 + 120) {
            bail!("lease keys still present 120 s after expiry");
        }
    };
    let secs = gone_at.saturating_duration_since(expires).as_secs_f64();
    Ok(Outcome {
        notes: vec![format!(
            "{keys} keys gone {secs:.2} s after the lease's expiry; puts meanwhile below"
        )],
        seconds: Some(secs),
        ops_per_sec: Some(keys as f64 / secs.max(1e-9)),
        load_seconds: None,
    })
}

/// Each client grants a lease with `ttl`, opens its own KeepAlive stream and sends
/// keepalives one at a time (claimed from the budget); the op is one keepalive round
/// trip. Leases are revoked at the end.
pub async fn keepalive(ctx: &RoundCtx<'_>, ttl: i64) -> Result<Outcome> {
    let channels = &ctx.prep.channels;
    let (ka, grant) = (ctx.stats.kind(0), ctx.stats.kind(1));
    let mut tasks = JoinSet::new();
    for c in 0..ctx.cli.clients.max(1) {
        let mut lc = conn::lease(&channels[c % channels.len()]);
        let (budget, ka, grant) = (ctx.budget.clone(), ka.clone(), grant.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let id = lc
                .lease_grant(LeaseGrantRequest { id: 0, ttl })
                .await?
                .into_inner()
                .id;
            grant.ok_since(t0);
            let result = async {
                let Some(_) = budget.next().await else {
                    return Ok(());
                };
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let mut t0 = Instant::now();
                // etcd answers the call only with its first message: queue one first.
                tx.send(LeaseKeepAliveRequest { id }).await?;
                let mut stream = lc
                    .lease_keep_alive(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                loop {
                    match stream.message().await? {
                        Some(r) if r.ttl > 0 => ka.ok_since(t0),
                        Some(_) => return Err(anyhow!("lease {id:x} expired")),
                        None => return Err(anyhow!("keepalive stream ended")),
                    }
                    if budget.next().await.is_none() {
                        return Ok::<(), anyhow::Error>(());
                    }
                    t0 = Instant::now();
                    tx.send(LeaseKeepAliveRequest { id }).await?;
                }
            }
            .await;
            let _ = lc.lease_revoke(LeaseRevokeRequest { id }).await;
            result
        });
    }
    while let Some(t) = tasks.join_next().await {
        if let Err(e) = t.map_err(anyhow::Error::from).and_then(|r| r) {
            ka.error();
            ctx.stats.note_error(&e);
        }
    }
    Ok(Outcome {
        notes: vec![format!(
            "{} leases (one keepalive stream each), ttl {ttl} s",
            ctx.cli.clients.max(1)
        )],
        ..Outcome::default()
    })
}
