//! k8s: load shaped like kube-apiserver's during a kube-burner cluster-density run.
//!
//! Under a fresh root (`/loadgen/k8s/<run>/`), at fixed rates and open loop (each
//! operation its own task, at most `--max-inflight` per kind in flight):
//! - create: Txn If mod_revision==0 Then Put Else Get of a new object; the resource type
//!   cycles pods 40%, configmaps 20%, secrets 20%, services 10%, deployments 5%,
//!   replicasets 5%, 50 objects per namespace;
//! - update: status update of a pod (GuaranteedUpdate: Get, Txn on mod_revision, retry);
//!   pods are the `--key-space-size` prefilled ones and those created this round;
//! - event: create Txn with a lease of `--event-ttl`; one lease serves all events for
//!   `--lease-reuse`, then a new one is granted (kube-apiserver's lease manager);
//! - list: paginated list of all pods (`--list-limit` per page, later pages at the
//!   first page's revision);
//! - watch-event: `--watchers` prefix watches with prev_kv, one per resource type in
//!   turn (events included); latency = receipt minus the write's acknowledgement;
//! - compact: every `--compact-interval`, compaction to the revision seen one interval
//!   earlier (kube-apiserver's compactor, at its default of 5 min).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{
    CompactionRequest, LeaseGrantRequest, RangeRequest, WatchCreateRequest, WatchRequest,
    kv_client::KvClient, watch_request::RequestUnion,
};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::watch::Acks;
use super::{Outcome, RoundCtx, ops};
use crate::cli::{Cli, K8sArgs};
use crate::conn::{self, Target};
use crate::pace::{Budget, Ticker};
use crate::prefill::{self, item_key, prefix_end, width_for};
use crate::stats::{Kind, Stats};

pub const KINDS: &[&str] = &[
    "create",
    "update",
    "event",
    "list",
    "page",
    "watch-event",
    "compact",
    "lease-grant",
];
/// Server CPU is divided by the client requests: creates, updates, events, lists.
pub const CPU_KINDS: &[usize] = &[CREATE, UPDATE, EVENT, LIST];
const CREATE: usize = 0;
const UPDATE: usize = 1;
const EVENT: usize = 2;
const LIST: usize = 3;
const PAGE: usize = 4;
const WATCH_EVENT: usize = 5;
const COMPACT: usize = 6;
const LEASE_GRANT: usize = 7;

/// Created resource types with their share in percent.
const CREATED: &[(&str, u64)] = &[
    ("pods", 40),
    ("configmaps", 20),
    ("secrets", 20),
    ("services", 10),
    ("deployments", 5),
    ("replicasets", 5),
];
/// Watched prefixes (kube-apiserver keeps one watch per resource type).
const WATCHED: &[&str] = &[
    "pods",
    "configmaps",
    "secrets",
    "services",
    "deployments",
    "replicasets",
    "events",
];
const OBJECTS_PER_NAMESPACE: u64 = 50;

/// The prefilled pods (`--key-space-size`) the updates and lists start from.
pub async fn prefill(cli: &Cli, target: &Target, root: &str, n: u64, value: &Bytes) -> Result<()> {
    let prefix = format!("{root}pods/prefill/");
    prefill::prefill(target, cli.conns, &prefix, width_for(n, 1), n, value).await
}

struct Shared {
    root: String,
    round: usize,
    value: Bytes,
    serializable: bool,
    prefilled: u64,
    width: usize,
    channels: Vec<Channel>,
    /// Pods created this round (update targets next to the prefilled ones).
    pods: Mutex<Vec<Bytes>>,
    acks: Acks,
    /// The events' lease and when it was granted.
    lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
    event_ttl: i64,
    lease_reuse: Duration,
    stats: Arc<Stats>,
}

impl Shared {
    fn kv(&self, n: u64) -> KvClient<Channel> {
        conn::kv(&self.channels[n as usize % self.channels.len()])
    }

    fn ack(&self, rev: i64) {
        self.acks.lock().insert(rev, Instant::now());
    }

    fn namespace(&self, n: u64) -> String {
        format!("ns-{}-{}", self.round, n / OBJECTS_PER_NAMESPACE)
    }

    async fn create(&self, n: u64) -> Result<()> {
        let pick = n % 100;
        let mut acc = 0;
        let res = CREATED
            .iter()
            .find(|(_, share)| {
                acc += share;
                pick < acc
            })
            .map_or("pods", |(r, _)| r);
        let key = Bytes::from(format!(
            "{}{res}/{}/{res}-{n}",
            self.root,
            self.namespace(n)
        ));
        match ops::create(&mut self.kv(n), key.clone(), self.value.clone(), 0).await? {
            Some(rev) => {
                self.ack(rev);
                if res == "pods" {
                    self.pods.lock().push(key);
                }
            }
            None => self.stats.kind(CREATE).add_conflicts(1),
        }
        Ok(())
    }

    async fn update(&self, n: u64) -> Result<()> {
        let key = {
            let created = self.pods.lock();
            let all = self.prefilled + created.len() as u64;
            if all == 0 {
                bail!("no pod to update yet");
            }
            let i = rand::rng().random_range(0..all);
            match i.checked_sub(self.prefilled) {
                Some(c) => created[c as usize].clone(),
                None => item_key(&format!("{}pods/prefill/", self.root), self.width, i),
            }
        };
        let (rev, retries) =
            ops::guaranteed_update(&mut self.kv(n), key, self.value.clone(), self.serializable)
                .await?;
        self.ack(rev);
        self.stats.kind(UPDATE).add_conflicts(retries);
        Ok(())
    }

    /// The events' lease, granting a new one after `lease_reuse`.
    async fn event_lease(&self, n: u64) -> Result<i64> {
        let mut l = self.lease.lock().await;
        if let Some((id, at)) = *l
            && at.elapsed() < self.lease_reuse
        {
            return Ok(id);
        }
        let t0 = Instant::now();
        let id = conn::lease(&self.channels[n as usize % self.channels.len()])
            .lease_grant(LeaseGrantRequest {
                id: 0,
                ttl: self.event_ttl,
            })
            .await?
            .into_inner()
            .id;
        self.stats.kind(LEASE_GRANT).ok_since(t0);
        *l = Some((id, Instant::now()));
        Ok(id)
    }

    async fn event(&self, n: u64) -> Result<()> {
        let lease = self.event_lease(n).await?;
        let key = Bytes::from(format!(
            "{}events/{}/ev-{n}.{:x}",
            self.root,
            self.namespace(n),
            rand::rng().random::<u32>()
        ));
        match ops::create(&mut self.kv(n), key, self.value.clone(), lease).await? {
            Some(rev) => self.ack(rev),
            None => self.stats.kind(EVENT).add_conflicts(1),
        }
        Ok(())
    }

    async fn list(&self, n: u64, limit: i64) -> Result<()> {
        let page = self.stats.kind(PAGE);
        let prefix = format!("{}pods/", self.root);
        let keys =
            ops::paginated_list(&mut self.kv(n), &prefix, limit, self.serializable, &page).await?;
        self.stats.kind(LIST).add_items(keys);
        Ok(())
    }
}

/// Starts operation after operation at `rate` per second until the budget ends,
/// each as its own task, at most `max_inflight` at once.
async fn paced<F, Fut>(
    budget: Arc<Budget>,
    rate: f64,
    max_inflight: usize,
    kind: Arc<Kind>,
    stats: Arc<Stats>,
    op: F,
) -> Result<()>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    if rate <= 0.0 {
        return Ok(());
    }
    let sem = Arc::new(Semaphore::new(max_inflight.max(1)));
    let mut ticker = Ticker::new(budget.start(), rate);
    let mut tasks = JoinSet::new();
    for n in 0.. {
        let at = ticker.next_at();
        if budget.deadline().is_some_and(|d| at >= d) {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        if budget.next().await.is_none() {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (fut, kind, stats) = (op(n), kind.clone(), stats.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            match fut.await {
                Ok(()) => kind.ok_since(t0),
                Err(e) => {
                    kind.error();
                    stats.note_error(&e);
                }
            }
            drop(permit);
        });
        while let Some(r) = tasks.try_join_next() {
            r?;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    Ok(())
}

/// The current revision.
async fn current_revision(kv: &mut KvClient<Channel>) -> Result<i64> {
    let r = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"\0loadgen-revision-probe"),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.header.map_or(0, |h| h.revision))
}

pub async fn run(ctx: &RoundCtx<'_>, a: &K8sArgs) -> Result<Outcome> {
    if a.list_limit <= 0 {
        bail!("--list-limit must be positive");
    }
    let sh = Arc::new(Shared {
        root: ctx.prep.prefix.clone(),
        round: ctx.idx,
        value: ctx.prep.value.clone(),
        serializable: ctx.p.serializable,
        prefilled: ctx.p.key_space_size,
        width: width_for(ctx.p.key_space_size, 1),
        channels: ctx.prep.channels.clone(),
        pods: Mutex::new(Vec::new()),
        acks: Arc::new(Mutex::new(HashMap::new())),
        lease: tokio::sync::Mutex::new(None),
        event_ttl: a.event_ttl,
        lease_reuse: a.lease_reuse,
        stats: ctx.stats.clone(),
    });

    // Watchers first, so that they see the round's writes.
    let mut watchers = JoinSet::new();
    let mut ready = Vec::new();
    for w in 0..a.watchers {
        let prefix = format!("{}{}/", sh.root, WATCHED[w % WATCHED.len()]);
        let ch = sh.channels[w % sh.channels.len()].clone();
        let (sh, (ready_tx, ready_rx)) = (sh.clone(), tokio::sync::oneshot::channel());
        ready.push(ready_rx);
        watchers.spawn(async move {
            let r = watch_prefix(&sh, &ch, &prefix, ready_tx).await;
            if let Err(e) = &r {
                sh.stats.kind(WATCH_EVENT).error();
                sh.stats.note_error(e);
            }
        });
    }
    for r in ready {
        let _ = r.await;
    }
    ctx.restart();

    // The compactor: each tick compacts to the revision seen at the tick before.
    let compactor = {
        let (sh, budget, interval) = (sh.clone(), ctx.budget.clone(), a.compact_interval);
        tokio::spawn(async move {
            let mut kv = sh.kv(0);
            let mut previous = current_revision(&mut kv).await.ok();
            let mut tick = tokio::time::interval_at(
                (budget.start() + interval).into(),
                interval.max(Duration::from_millis(10)),
            );
            loop {
                tick.tick().await;
                if let Some(rev) = previous {
                    let t0 = Instant::now();
                    match kv
                        .compact(CompactionRequest {
                            revision: rev,
                            physical: false,
                        })
                        .await
                    {
                        Ok(_) => {
                            sh.stats.kind(COMPACT).ok_since(t0);
                            sh.acks.lock().retain(|&r, _| r > rev);
                        }
                        Err(e) => {
                            sh.stats.kind(COMPACT).error();
                            sh.stats.note_error(&e.into());
                        }
                    }
                }
                previous = current_revision(&mut kv).await.ok();
            }
        })
    };

    let b = || ctx.budget.clone();
    let kind = |i| ctx.stats.kind(i);
    let st = || ctx.stats.clone();
    let (s1, s2, s3, s4) = (sh.clone(), sh.clone(), sh.clone(), sh.clone());
    let limit = a.list_limit;
    let m = a.max_inflight;
    let result = tokio::try_join!(
        paced(b(), a.create_rate, m, kind(CREATE), st(), move |n| {
            let s = s1.clone();
            async move { s.create(n).await }
        }),
        paced(b(), a.update_rate, m, kind(UPDATE), st(), move |n| {
            let s = s2.clone();
            async move { s.update(n).await }
        }),
        paced(b(), a.event_rate, m, kind(EVENT), st(), move |n| {
            let s = s3.clone();
            async move { s.event(n).await }
        }),
        paced(b(), a.list_rate, m, kind(LIST), st(), move |n| {
            let s = s4.clone();
            async move { s.list(n, limit).await }
        }),
    );
    compactor.abort();
    let load_seconds = ctx.stats.epoch.elapsed().as_secs_f64();
    // Let the watchers drain: until no event arrived for 300 ms (at most 5 s).
    let events = ctx.stats.kind(WATCH_EVENT);
    let drain_until = Instant::now() + Duration::from_secs(5);
    let mut last = events.ok_count();
    while Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = events.ok_count();
        if now == last {
            break;
        }
        last = now;
    }
    watchers.abort_all();
    result?;
    Ok(Outcome {
        notes: vec![format!(
            "rates/s: create {}, update {}, event {}, list {}; {} watchers; {} prefilled pods, {} created",
            a.create_rate,
            a.update_rate,
            a.event_rate,
            a.list_rate,
            a.watchers,
            sh.prefilled,
            sh.pods.lock().len()
        )],
        load_seconds: Some(load_seconds),
        ..Outcome::default()
    })
}

/// One prefix watch with prev_kv from the current revision; records each event.
async fn watch_prefix(
    sh: &Shared,
    ch: &Channel,
    prefix: &str,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from(prefix.to_owned()),
            range_end: prefix_end(prefix.as_bytes()),
            prev_kv: true,
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = conn::watch(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut ready = Some(ready);
    let kind = sh.stats.kind(WATCH_EVENT);
    while let Some(resp) = inbound.message().await? {
        let now = Instant::now();
        if resp.created {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            continue;
        }
        if resp.canceled {
            bail!("watch on {prefix} canceled: {}", resp.cancel_reason);
        }
        let acks = sh.acks.lock();
        for ev in &resp.events {
            let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            let lat = acks
                .get(&rev)
                .map_or(Duration::ZERO, |ack| now.saturating_duration_since(*ack));
            kind.ok_latency(lat);
            kind.add_items(1);
        }
    }
    drop(tx);
    bail!("watch stream on {prefix} ended")
}
