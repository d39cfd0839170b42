//! Command line: global flags named like etcd's `benchmark` tool where the meaning is the
//! same, one subcommand per workload, and [`Params`], the flags resolved against each
//! workload's defaults.
//!
//! The shared sizing flags (`--key-size`, `--val-size`, `--key-space-size`, `--rate`) are
//! global so that both `loadgen --rate 100 watch-latency` and `loadgen watch-latency
//! --rate 100` work; a flag left out takes the workload's default (see
//! [`Workload::defaults`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

/// Operations per round when neither `--total` nor `--duration` is given.
pub const DEFAULT_TOTAL: u64 = 10_000;
/// Page size of paginated lists (kube-apiserver's default chunk size).
pub const DEFAULT_LIST_LIMIT: i64 = 500;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "Benchmark any etcd v3 endpoint")]
pub struct Cli {
    /// Endpoint(s) to drive (A); a comma-separated list spreads the connections.
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379")]
    pub endpoints: String,
    /// Second endpoint(s) (B): rounds alternate A B A B and ratios A/B are printed.
    #[arg(long, global = true)]
    pub vs: Option<String>,
    /// Rounds per endpoint.
    #[arg(long, global = true, default_value_t = 1)]
    pub rounds: usize,
    /// gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent clients (spread over the connections).
    #[arg(long, global = true, default_value_t = 1)]
    pub clients: usize,
    /// Operations per round (default 10000, fewer for list/count; excludes --duration).
    #[arg(long, global = true)]
    pub total: Option<u64>,
    /// Round length instead of --total: 30s, 2m, 500ms or plain seconds.
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Key length in bytes (put, txn-put; the numeric suffix width of prefix workloads).
    #[arg(long, global = true)]
    pub key_size: Option<usize>,
    /// Value length in bytes.
    #[arg(long, global = true)]
    pub val_size: Option<usize>,
    /// Distinct keys (put, txn-put, watch-latency) or prefilled keys (update, list, count, k8s).
    #[arg(long, global = true)]
    pub key_space_size: Option<u64>,
    /// Maximum operations per second over all clients, 0 = unlimited
    /// (watch-latency: puts per second, default 100).
    #[arg(long, global = true)]
    pub rate: Option<f64>,
    /// Reads: l (linearizable) or s (serializable).
    #[arg(long, global = true, default_value = "l", value_parser = ["l", "s"])]
    pub consistency: String,
    /// Key prefix of prefix workloads (default /loadgen/<workload>/...).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// CA bundle that verifies https:// endpoints.
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for https:// endpoints that ask for one.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Comma-separated process names whose CPU counts as A's server time.
    #[arg(long, global = true, default_value = "pgetcd,postgres")]
    pub cpu_comm: String,
    /// Comma-separated process names whose CPU counts as B's server time.
    #[arg(long, global = true, default_value = "etcd")]
    pub vs_cpu_comm: String,
    /// Comma-separated process ids whose CPU, with all their descendants', counts as A's
    /// server time (instead of --cpu-comm).
    #[arg(long, global = true)]
    pub cpu_pid: Option<String>,
    /// Like --cpu-pid, for B (instead of --vs-cpu-comm).
    #[arg(long, global = true)]
    pub vs_cpu_pid: Option<String>,
    /// Print one JSON object per round instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Write a self-contained HTML report (throughput and latency per second) to this file.
    #[arg(long, global = true)]
    pub report: Option<PathBuf>,
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// Put random values under keys drawn from a key space.
    Put {
        /// Keys in sequence instead of at random.
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Txn with --txn-ops puts (no compare), like etcd benchmark txn-put.
    TxnPut {
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// Range over one key (written once before the round) or [KEY, END).
    Range {
        /// Key to read.
        #[arg(value_name = "KEY", default_value = "foo")]
        range_key: String,
        /// Range end (exclusive); reads only KEY when left out.
        #[arg(value_name = "END")]
        range_end: Option<String>,
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
        /// Ask for the previous key-value with each event.
        #[arg(long, alias = "prevkv")]
        prev_kv: bool,
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
    },
    /// Each client grants a lease and sends KeepAlive requests on its own stream; the
    /// op is one keepalive round trip.
    LeaseKeepalive {
        /// Lease TTL in seconds.
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
    /// Kubernetes create: Txn If mod_revision(key)==0 Then Put Else Get, fresh keys.
    Create,
    /// Kubernetes GuaranteedUpdate over --key-space-size prefilled keys: Get, then Txn If
    /// mod_revision==seen Then Put Else Get, retried with the returned revision.
    Update,
    /// Paginated prefix list like kube-apiserver over --key-space-size prefilled keys; the
    /// op is one full list.
    List {
        /// Keys per page.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: i64,
    },
    /// count_only Range over a prefix of --key-space-size prefilled keys.
    Count,
    /// Mixed kube-apiserver-like load (creates, status updates, leased events, paginated
    /// lists, prefix watches with prev_kv, periodic compaction) at fixed rates.
    K8s(K8sArgs),
}

/// Rates and shape of the `k8s` scenario.
#[derive(Args, Debug, Clone)]
pub struct K8sArgs {
    /// Object creates per second (create txn).
    #[arg(long, default_value_t = 20.0)]
    pub create_rate: f64,
    /// Status updates per second (GuaranteedUpdate on pods).
    #[arg(long, default_value_t = 50.0)]
    pub update_rate: f64,
    /// Events written per second (create txn with a lease).
    #[arg(long, default_value_t = 50.0)]
    pub event_rate: f64,
    /// Paginated lists of the pods prefix per second.
    #[arg(long, default_value_t = 0.5)]
    pub list_rate: f64,
    /// Prefix watches with prev_kv (one per resource type, round-robin).
    #[arg(long, default_value_t = 7)]
    pub watchers: usize,
    /// Compact every interval to the revision seen one interval earlier.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub compact_interval: Duration,
    /// TTL of the events' lease in seconds.
    #[arg(long, default_value_t = 3600)]
    pub event_ttl: i64,
    /// A new events lease is granted after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub lease_reuse: Duration,
    /// Keys per list page.
    #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
    pub list_limit: i64,
    /// Operations in flight per kind at most (later ones wait).
    #[arg(long, default_value_t = 1000)]
    pub max_inflight: usize,
}

/// Workload defaults for the flags left out.
pub struct Defaults {
    pub key_size: usize,
    pub val_size: usize,
    pub key_space_size: u64,
    pub rate: f64,
    pub total: u64,
    pub duration: Option<Duration>,
}

impl Workload {
    /// The subcommand name (as typed).
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Put { .. } => "put",
            Workload::TxnPut { .. } => "txn-put",
            Workload::Range { .. } => "range",
            Workload::WatchLatency { .. } => "watch-latency",
            Workload::LeaseExpiry { .. } => "lease-expiry",
            Workload::LeaseKeepalive { .. } => "lease-keepalive",
            Workload::Create => "create",
            Workload::Update => "update",
            Workload::List { .. } => "list",
            Workload::Count => "count",
            Workload::K8s(_) => "k8s",
        }
    }

    pub fn defaults(&self) -> Defaults {
        let base = Defaults {
            key_size: 8,
            val_size: 256,
            key_space_size: 1,
            rate: 0.0,
            total: DEFAULT_TOTAL,
            duration: None,
        };
        match self {
            Workload::Put { .. }
            | Workload::TxnPut { .. }
            | Workload::Range { .. }
            | Workload::LeaseExpiry { .. }
            | Workload::LeaseKeepalive { .. } => base,
            Workload::WatchLatency { .. } => Defaults {
                key_space_size: 100,
                rate: 100.0,
                ..base
            },
            Workload::Create => Defaults {
                val_size: 1024,
                ..base
            },
            Workload::Update => Defaults {
                val_size: 1024,
                key_space_size: 1000,
                ..base
            },
            Workload::List { .. } => Defaults {
                val_size: 1024,
                key_space_size: 10_000,
                total: 100,
                ..base
            },
            Workload::Count => Defaults {
                key_space_size: 100_000,
                total: 1000,
                ..base
            },
            Workload::K8s(_) => Defaults {
                val_size: 1024,
                key_space_size: 1000,
                total: u64::MAX,
                duration: Some(Duration::from_secs(30)),
                ..base
            },
        }
    }
}

/// The flags resolved against the workload's defaults.
#[derive(Debug, Clone)]
pub struct Params {
    pub key_size: usize,
    pub val_size: usize,
    pub key_space_size: u64,
    /// Operations per second over all clients; `None` = unlimited.
    pub rate: Option<f64>,
    /// Stop after this many operations (`None` with a duration).
    pub total: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    pub serializable: bool,
}

impl Params {
    pub fn resolve(cli: &Cli) -> Result<Params> {
        let d = cli.workload.defaults();
        if cli.total.is_some() && cli.duration.is_some() {
            bail!("--total and --duration exclude each other");
        }
        if cli.total == Some(0) {
            bail!("--total must be positive");
        }
        if cli.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be positive");
        }
        let rate = cli.rate.unwrap_or(d.rate);
        if !rate.is_finite() || rate < 0.0 {
            bail!("--rate must be 0 (unlimited) or positive");
        }
        let key_space_size = cli.key_space_size.unwrap_or(d.key_space_size);
        if key_space_size == 0 {
            bail!("--key-space-size must be positive");
        }
        let (total, duration) = match (cli.total, cli.duration) {
            (Some(t), None) => (Some(t), None),
            (None, Some(dur)) => (None, Some(dur)),
            _ => match d.duration {
                Some(dur) => (None, Some(dur)),
                None => (Some(d.total), None),
            },
        };
        Ok(Params {
            key_size: cli.key_size.unwrap_or(d.key_size).max(1),
            val_size: cli.val_size.unwrap_or(d.val_size),
            key_space_size,
            rate: (rate > 0.0).then_some(rate),
            total,
            duration,
            serializable: cli.consistency == "s",
        })
    }
}

/// "30s", "2m", "1h", "500ms" or plain seconds ("2.5").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (examples: 30s, 2m, 500ms)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("unknown unit in {s:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn documented_commands_parse() {
        // The commands in docs/performance.md.
        for line in [
            "loadgen --endpoints http://a --vs http://b --rounds 2 --conns 100 --clients 1000 --total 40000 put --key-space-size 100000",
            "loadgen --endpoints http://a --vs http://b --rounds 2 --total 3000 put",
            "loadgen --endpoints http://a --vs http://b --rounds 2 --total 2000 watch-latency --watchers 100 --streams 10 --rate 1000",
            "loadgen --endpoints http://a --conns 10 --clients 200 lease-expiry --keys 100000 --ttl 5",
            "loadgen range --consistency s",
        ] {
            let cli = Cli::try_parse_from(line.split(' ')).expect(line);
            Params::resolve(&cli).expect(line);
        }
        let cli = Cli::try_parse_from(
            "loadgen --total 5 watch-latency --watchers 100 --streams 10 --rate 1000".split(' '),
        )
        .expect("parses");
        let p = Params::resolve(&cli).expect("resolves");
        assert_eq!(p.rate, Some(1000.0));
        assert_eq!(p.key_space_size, 100);
    }

    #[test]
    fn total_and_duration_exclude_each_other() {
        let cli =
            Cli::try_parse_from("loadgen --total 5 --duration 2s put".split(' ')).expect("parses");
        assert!(Params::resolve(&cli).is_err());
    }
}
