//! loadgen: drives any etcd v3 endpoint (pgetcd or real etcd) with etcd-benchmark-style
//! workloads and reports throughput, latency percentiles (HDR histograms) and the
//! server-side CPU time per operation.
//!
//! `--vs URL` runs the same workload against a second endpoint in alternating rounds
//! (A B A B ...) and prints each round and the median ratio A/B, so both endpoints see
//! the same machine conditions. Server CPU is read from /proc for processes whose
//! command name is listed in `--cpu-comm` (A) and `--vs-cpu-comm` (B).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest, WatchCreateRequest,
    WatchRequest, kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
    watch_request::RequestUnion,
};
use rand::Rng;
use serde::Serialize;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Benchmark any etcd v3 endpoint")]
struct Cli {
    /// Endpoint to drive (A).
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379")]
    endpoints: String,
    /// Second endpoint (B): rounds alternate A B A B and ratios A/B are printed.
    #[arg(long, global = true)]
    vs: Option<String>,
    /// Rounds per endpoint.
    #[arg(long, global = true, default_value_t = 1)]
    rounds: usize,
    /// gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Concurrent clients (spread over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Requests per round.
    #[arg(long, global = true, default_value_t = 10_000)]
    total: u64,
    /// Comma-separated process names whose CPU counts as A's server time.
    #[arg(long, global = true, default_value = "pgetcd,postgres")]
    cpu_comm: String,
    /// Comma-separated process names whose CPU counts as B's server time.
    #[arg(long, global = true, default_value = "etcd")]
    vs_cpu_comm: String,
    /// Print one JSON object per round instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand, Debug, Clone)]
enum Workload {
    /// Put random values under keys drawn from a key space.
    Put {
        /// Key length in bytes.
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        /// Value length in bytes.
        #[arg(long, default_value_t = 256)]
        val_size: usize,
        /// Distinct keys (1 = all puts to one key).
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        /// Keys in sequence instead of at random.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Put-acknowledgement-to-event latency: `--watchers` watchers (over `--streams`
    /// watch streams) on one prefix, puts paced at `--rate` per second under it.
    WatchLatency {
        /// Watchers.
        #[arg(long, default_value_t = 10)]
        watchers: usize,
        /// Watch streams (gRPC streams) the watchers are spread over.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Puts per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Value length in bytes.
        #[arg(long, default_value_t = 256)]
        val_size: usize,
        /// Distinct keys under the prefix.
        #[arg(long, default_value_t = 100)]
        key_space_size: u64,
    },
    /// Lease expiry of many keys: grant a lease, attach `--keys` keys, let it expire
    /// while one client keeps putting another key; reports how long the attached keys
    /// took to disappear and the put latency meanwhile (`--total` is ignored).
    LeaseExpiry {
        /// Keys attached to the lease.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Lease TTL in seconds.
        #[arg(long, default_value_t = 5)]
        ttl: i64,
        /// Value length in bytes.
        #[arg(long, default_value_t = 256)]
        val_size: usize,
    },
    /// Range over one key (written once before the round).
    Range {
        /// Key to read.
        #[arg(long, default_value = "foo")]
        key: String,
        /// l (linearizable) or s (serializable).
        #[arg(long, default_value = "l")]
        consistency: String,
        /// Value size written before the round.
        #[arg(long, default_value_t = 256)]
        val_size: usize,
    },
}

#[derive(Serialize)]
struct Round {
    endpoint: String,
    round: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    ops_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    server_cpu_us_per_op: Option<f64>,
}

impl Round {
    /// A round's figures from its latency histogram (microseconds).
    #[allow(clippy::too_many_arguments)]
    fn new(
        endpoint: &str,
        round: usize,
        requests: u64,
        errors: u64,
        seconds: f64,
        ops_per_sec: f64,
        hist: &Histogram<u64>,
        server_cpu_us_per_op: Option<f64>,
    ) -> Round {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Round {
            endpoint: endpoint.to_owned(),
            round,
            requests,
            errors,
            seconds,
            ops_per_sec,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: hist.max() as f64 / 1000.0,
            server_cpu_us_per_op,
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Server CPU microseconds per request between two tick readings.
fn cpu_per_op(before: Option<u64>, after: Option<u64>, requests: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if requests > 0 => {
            Some(b.saturating_sub(a) as f64 / TICKS_PER_SEC * 1e6 / requests as f64)
        }
        _ => None,
    }
}

/// Sum of utime+stime (clock ticks) of processes whose comm is in `names`.
fn cpu_ticks(names: &[&str]) -> Option<u64> {
    if names.is_empty() {
        return None;
    }
    let mut total = 0u64;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if !names.contains(&comm) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of stat; after "pid (comm) " they are at 11, 12.
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    Some(total)
}

const TICKS_PER_SEC: f64 = 100.0;

async fn connect(url: &str, conns: usize) -> Result<Vec<KvClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..conns.max(1) {
        let ch = Channel::from_shared(url.to_owned())?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        out.push(
            KvClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
    }
    Ok(out)
}

async fn prepare(w: &Workload, kv: &mut KvClient<Channel>) -> Result<()> {
    if let Workload::Range { key, val_size, .. } = w {
        kv.put(PutRequest {
            key: Bytes::from(key.clone()),
            value: Bytes::from(vec![b'v'; *val_size]),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

async fn one(w: &Workload, kv: &mut KvClient<Channel>, n: u64, value: &Bytes) -> Result<()> {
    match w {
        Workload::Put {
            key_size,
            key_space_size,
            sequential_keys,
            ..
        } => {
            let k = if *sequential_keys {
                n % key_space_size.max(&1)
            } else {
                rand::rng().random_range(0..*key_space_size.max(&1))
            };
            let mut key = format!("{k:0width$}", width = *key_size).into_bytes();
            key.truncate((*key_size).max(1));
            kv.put(PutRequest {
                key: Bytes::from(key),
                value: value.clone(),
                ..Default::default()
            })
            .await?;
        }
        Workload::WatchLatency { .. } | Workload::LeaseExpiry { .. } => {}
        Workload::Range {
            key, consistency, ..
        } => {
            kv.range(RangeRequest {
                key: Bytes::from(key.clone()),
                serializable: consistency == "s",
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}

/// One watch-latency round: latency from each put's acknowledgement to each watcher's
/// receipt of its event (0 when the event arrived before the acknowledgement).
async fn watch_round(cli: &Cli, url: &str, cpu_names: &[&str], idx: usize) -> Result<Round> {
    let Workload::WatchLatency {
        watchers,
        streams,
        rate,
        val_size,
        key_space_size,
    } = cli.workload.clone()
    else {
        bail!("not a watch workload");
    };
    let prefix = format!("/loadgen/watch/{idx}/{}/", rand::rng().random::<u32>());
    let acks: Arc<std::sync::Mutex<std::collections::HashMap<i64, Instant>>> = Arc::default();
    let mut recv_tasks = Vec::new();
    let per_stream = watchers.div_ceil(streams.max(1));
    let mut ready = Vec::new();
    for s in 0..streams.max(1) {
        let n = per_stream.min(watchers.saturating_sub(s * per_stream));
        if n == 0 {
            break;
        }
        let ch = Channel::from_shared(url.to_owned())?.connect().await?;
        let mut client = WatchClient::new(ch).max_decoding_message_size(usize::MAX);
        let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
        for _ in 0..n {
            let mut end = prefix.clone().into_bytes();
            if let Some(l) = end.last_mut() {
                *l += 1;
            }
            tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(prefix.clone()),
                    range_end: Bytes::from(end),
                    ..Default::default()
                })),
            })
            .await?;
        }
        let acks = acks.clone();
        let total = cli.total as usize * n;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        recv_tasks.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut h = latency_histogram();
            let mut inbound = client
                .watch(tokio_stream_from(rx))
                .await
                .map_err(|e| anyhow::anyhow!("watch: {e}"))?
                .into_inner();
            let mut created = 0;
            let mut ready_tx = Some(ready_tx);
            let mut seen = 0usize;
            let mut early: Vec<(i64, Instant)> = Vec::new();
            while seen < total {
                let Some(resp) = inbound.message().await? else {
                    break;
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
                let acks_now = acks.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                for ev in &resp.events {
                    let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                    match acks_now.get(&rev) {
                        Some(ack) => {
                            let _ = h.record(
                                now.saturating_duration_since(*ack).as_micros().max(1) as u64,
                            );
                        }
                        None => early.push((rev, now)),
                    }
                    seen += 1;
                }
            }
            // Events that beat their acknowledgement count as ~0.
            for _ in early {
                let _ = h.record(1);
            }
            Ok::<Histogram<u64>, anyhow::Error>(h)
        }));
    }
    for r in ready {
        let _ = r.await;
    }
    let ch = Channel::from_shared(url.to_owned())?.connect().await?;
    let kv = KvClient::new(ch);
    let value = Bytes::from(vec![b'x'; val_size]);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let cpu_before = cpu_ticks(cpu_names);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    let mut put_tasks = Vec::new();
    let errors = Arc::new(AtomicU64::new(0));
    for i in 0..cli.total {
        ticker.tick().await;
        let mut kv = kv.clone();
        let key = Bytes::from(format!("{prefix}{}", i % key_space_size.max(1)));
        let value = value.clone();
        let acks = acks.clone();
        let errors = errors.clone();
        put_tasks.push(tokio::spawn(async move {
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
                    if let Ok(mut a) = acks.lock() {
                        a.insert(rev, Instant::now());
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in put_tasks {
        t.await?;
    }
    let mut hist = latency_histogram();
    for t in recv_tasks {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(r) => hist.add(r??)?,
            Err(_) => bail!("watchers did not receive every event within 30 s"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(cpu_names);
    Ok(Round::new(
        url,
        idx,
        cli.total,
        errors.load(Ordering::Relaxed),
        secs,
        cli.total as f64 / secs,
        &hist,
        cpu_per_op(cpu_before, cpu_after, cli.total),
    ))
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<WatchRequest>,
) -> impl tokio_stream::Stream<Item = WatchRequest> {
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One lease-expiry round (see [`Workload::LeaseExpiry`]).
async fn lease_expiry_round(cli: &Cli, url: &str, idx: usize) -> Result<Round> {
    let Workload::LeaseExpiry {
        keys,
        ttl,
        val_size,
    } = cli.workload.clone()
    else {
        bail!("not a lease workload");
    };
    let clients = connect(url, cli.conns).await?;
    let ch = Channel::from_shared(url.to_owned())?.connect().await?;
    let mut leases = LeaseClient::new(ch);
    let lease = leases
        .lease_grant(LeaseGrantRequest { id: 0, ttl })
        .await?
        .into_inner()
        .id;
    let prefix = format!("/loadgen/lease/{idx}/{}/", rand::rng().random::<u32>());
    // Keep the lease alive while the keys are being attached.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut keeper = leases.clone();
    let keepalive = tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // etcd answers the call only with its first message: queue one first.
        tx.send(LeaseKeepAliveRequest { id: lease }).await?;
        let mut stream = keeper
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
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
    let value = Bytes::from(vec![b'x'; val_size]);
    let mut tasks = Vec::new();
    for c in 0..cli.clients.max(1) {
        let mut kv = clients[c % clients.len()].clone();
        let (next, value, prefix) = (next.clone(), value.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
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
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Last keepalive now; the lease expires one TTL later.
    let _ = stop_tx.send(());
    keepalive.await??;
    let attached = Instant::now();
    let expires = attached + Duration::from_secs(ttl as u64);
    let mut kv = clients[0].clone();
    let mut hist = latency_histogram();
    let mut end = prefix.clone().into_bytes();
    if let Some(l) = end.last_mut() {
        *l += 1;
    }
    let gone_at = loop {
        let t = Instant::now();
        kv.put(PutRequest {
            key: Bytes::from(format!("{prefix}probe")),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
        let left = kv
            .range(RangeRequest {
                key: Bytes::from(prefix.clone()),
                range_end: Bytes::from(end.clone()),
                count_only: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .count;
        if left <= 1 && Instant::now() >= expires {
            break Instant::now();
        }
        if attached.elapsed() > Duration::from_secs(ttl as u64 + 120) {
            bail!("lease keys still present 120 s after expiry");
        }
    };
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let secs = gone_at.saturating_duration_since(expires).as_secs_f64();
    println!(
        "{url}: {keys} keys gone {secs:.2} s after the lease's expiry; puts meanwhile: {} (p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
        hist.len(),
        ms(0.5),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(Round::new(
        url,
        idx,
        hist.len(),
        0,
        secs,
        keys as f64 / secs.max(1e-9),
        &hist,
        None,
    ))
}

async fn round(cli: &Cli, url: &str, cpu_names: &[&str], idx: usize) -> Result<Round> {
    if matches!(cli.workload, Workload::WatchLatency { .. }) {
        return watch_round(cli, url, cpu_names, idx).await;
    }
    if matches!(cli.workload, Workload::LeaseExpiry { .. }) {
        return lease_expiry_round(cli, url, idx).await;
    }
    let clients = connect(url, cli.conns).await?;
    let mut first = clients[0].clone();
    prepare(&cli.workload, &mut first).await?;
    let value = match &cli.workload {
        Workload::Put { val_size, .. } => Bytes::from(vec![b'x'; *val_size]),
        Workload::Range { .. } | Workload::WatchLatency { .. } | Workload::LeaseExpiry { .. } => {
            Bytes::new()
        }
    };
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_ticks(cpu_names);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..cli.clients.max(1) {
        let mut kv = clients[c % clients.len()].clone();
        let w = cli.workload.clone();
        let next = next.clone();
        let errors = errors.clone();
        let value = value.clone();
        let total = cli.total;
        tasks.push(tokio::spawn(async move {
            let mut h = latency_histogram();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t = Instant::now();
                if one(&w, &mut kv, n, &value).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            }
            h
        }));
    }
    let mut hist = latency_histogram();
    for t in tasks {
        hist.add(t.await?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(cpu_names);
    Ok(Round::new(
        url,
        idx,
        cli.total,
        errors.load(Ordering::Relaxed),
        secs,
        cli.total as f64 / secs,
        &hist,
        cpu_per_op(cpu_before, cpu_after, cli.total),
    ))
}

fn print(cli: &Cli, r: &Round) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!(
            "{:<28} round {} {:>9.0} ops/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>7.2}  errors {}  server cpu {}",
            r.endpoint,
            r.round,
            r.ops_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.errors,
            r.server_cpu_us_per_op
                .map(|c| format!("{c:.0} us/op"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.total == 0 {
        bail!("--total must be positive");
    }
    let a_names: Vec<&str> = cli.cpu_comm.split(',').filter(|s| !s.is_empty()).collect();
    let b_names: Vec<&str> = cli
        .vs_cpu_comm
        .split(',')
        .filter(|s| !s.is_empty())
        .collect();
    let mut ratios = Vec::new();
    for i in 0..cli.rounds.max(1) {
        let a = round(&cli, &cli.endpoints, &a_names, i).await?;
        print(&cli, &a)?;
        if let Some(vs) = &cli.vs {
            let b = round(&cli, vs, &b_names, i).await?;
            print(&cli, &b)?;
            ratios.push(a.ops_per_sec / b.ops_per_sec);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !ratios.is_empty() {
        println!("median throughput ratio A/B: {:.2}", median(ratios));
    }
    Ok(())
}
