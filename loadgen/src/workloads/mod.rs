//! The workloads. Each endpoint is [`prepare`]d once (prefill, not measured), then runs
//! its rounds; a round drives the endpoint until the [`Budget`] says stop and records
//! every operation into the round's [`Stats`] under the kinds its [`Spec`] names (the
//! first kind is the one the summary line, the ratio and the JSON top level describe).

mod k8s;
mod kv;
mod lease;
pub mod ops;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::kv_client::KvClient;
use rand::Rng;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::cli::{Cli, Params, Workload};
use crate::conn::{self, Target};
use crate::pace::Budget;
use crate::prefill::{self, width_for};
use crate::stats::Stats;

/// What a workload records.
pub struct Spec {
    /// Operation kinds; the first is the primary one.
    pub kinds: &'static [&'static str],
    /// Kinds whose operations divide the server CPU time.
    pub cpu_kinds: &'static [usize],
}

pub fn spec(w: &Workload) -> Spec {
    let (kinds, cpu_kinds): (&'static [&'static str], &'static [usize]) = match w {
        Workload::Put { .. } => (&["put"], &[0]),
        Workload::TxnPut { .. } => (&["txn-put"], &[0]),
        Workload::Range { .. } => (&["range"], &[0]),
        // CPU per put, as the watch numbers in docs/performance.md are.
        Workload::WatchLatency { .. } => (&["event", "put"], &[1]),
        // The probe puts are not the point: no CPU per op.
        Workload::LeaseExpiry { .. } => (&["put"], &[]),
        Workload::LeaseKeepalive { .. } => (&["keepalive", "grant"], &[0]),
        Workload::Create => (&["create"], &[0]),
        Workload::Update => (&["update"], &[0]),
        Workload::List { .. } => (&["list", "page"], &[0]),
        Workload::Count => (&["count"], &[0]),
        Workload::K8s(_) => (k8s::KINDS, k8s::CPU_KINDS),
    };
    Spec { kinds, cpu_kinds }
}

/// Per endpoint, kept across its rounds.
pub struct Prepared {
    /// Key prefix of prefix workloads.
    pub prefix: String,
    /// Width of the zero-padded item number in keys.
    pub width: usize,
    /// The value written (random bytes, so that no layer can compress it away).
    pub value: Bytes,
    /// `--conns` connections, kept across rounds.
    pub channels: Vec<Channel>,
}

/// A value of `n` random printable bytes.
pub fn random_value(n: usize) -> Bytes {
    let mut rng = rand::rng();
    Bytes::from(
        (0..n)
            .map(|_| rng.random_range(b'!'..=b'~'))
            .collect::<Vec<u8>>(),
    )
}

/// Prefills what the workload needs on `target`.
pub async fn prepare(cli: &Cli, p: &Params, target: &Target, run: u32) -> Result<Prepared> {
    let value = random_value(p.val_size);
    let n = p.key_space_size;
    let width = width_for(n, p.key_size);
    let name = cli.workload.name();
    let shared = || {
        cli.prefix
            .clone()
            .unwrap_or_else(|| format!("/loadgen/{name}/n{n}-v{}/", p.val_size))
    };
    let fresh = || {
        let base = cli
            .prefix
            .clone()
            .unwrap_or_else(|| format!("/loadgen/{name}/"));
        format!("{base}{run:08x}/")
    };
    let prefix = match &cli.workload {
        Workload::Update | Workload::List { .. } | Workload::Count => {
            let prefix = shared();
            prefill::prefill(target, cli.conns, &prefix, width, n, &value).await?;
            prefix
        }
        Workload::Create | Workload::K8s(_) => fresh(),
        _ => String::new(),
    };
    if let Workload::K8s(_) = &cli.workload {
        k8s::prefill(cli, target, &prefix, n, &value).await?;
    }
    Ok(Prepared {
        prefix,
        width,
        value,
        channels: target.channels(cli.conns).await?,
    })
}

/// Everything a round needs.
pub struct RoundCtx<'a> {
    pub cli: &'a Cli,
    pub p: &'a Params,
    pub target: &'a Target,
    pub prep: &'a Prepared,
    pub idx: usize,
    pub stats: Arc<Stats>,
    pub budget: Arc<Budget>,
}

impl RoundCtx<'_> {
    /// The measured part of the round starts now (after a workload's own set-up).
    pub fn restart(&self) {
        self.stats.epoch.restart();
    }
}

/// What a round adds to its figures.
#[derive(Default)]
pub struct Outcome {
    /// Lines printed (and stored in JSON) with the round.
    pub notes: Vec<String>,
    /// Replaces the measured seconds and throughput (lease-expiry reports the time
    /// until the keys were gone).
    pub seconds: Option<f64>,
    pub ops_per_sec: Option<f64>,
    /// The measured seconds when the load ended before the round returned (k8s drains
    /// its watchers after the load).
    pub load_seconds: Option<f64>,
}

pub async fn run_round(ctx: &RoundCtx<'_>) -> Result<Outcome> {
    match &ctx.cli.workload {
        Workload::Put { .. } | Workload::TxnPut { .. } | Workload::Range { .. } => {
            kv::simple(ctx).await
        }
        Workload::Create => kv::create(ctx).await,
        Workload::Update => kv::update(ctx).await,
        Workload::List { limit } => kv::list(ctx, *limit).await,
        Workload::Count => kv::count(ctx).await,
        Workload::WatchLatency {
            watchers,
            streams,
            prev_kv,
        } => watch::latency(ctx, *watchers, *streams, *prev_kv).await,
        Workload::LeaseExpiry { keys, ttl } => lease::expiry(ctx, *keys, *ttl).await,
        Workload::LeaseKeepalive { ttl } => lease::keepalive(ctx, *ttl).await,
        Workload::K8s(args) => k8s::run(ctx, args).await,
    }
}

/// Runs `--clients` closed-loop clients over `channels`, each claiming operations from
/// the budget and calling `op(client, n)`; records the outcome in kind `kind`.
pub async fn closed_loop<F, Fut>(
    ctx: &RoundCtx<'_>,
    channels: &[Channel],
    kind: usize,
    op: F,
) -> Result<()>
where
    F: Fn(KvClient<Channel>, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let mut tasks = JoinSet::new();
    for c in 0..ctx.cli.clients.max(1) {
        let kv = conn::kv(&channels[c % channels.len()]);
        let (op, budget, stats) = (op.clone(), ctx.budget.clone(), ctx.stats.clone());
        let kind = stats.kind(kind);
        tasks.spawn(async move {
            while let Some(n) = budget.next().await {
                let t0 = Instant::now();
                match op(kv.clone(), n).await {
                    Ok(()) => kind.ok_since(t0),
                    Err(e) => {
                        kind.error();
                        stats.note_error(&e);
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    Ok(())
}
