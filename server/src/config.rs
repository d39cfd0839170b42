//! Command-line flags, each with a `PGETCD_*` environment twin. Names follow etcd's
//! where the meaning is the same.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pgetcd_engine::{
    DEFAULT_CACHE_BYTES, DEFAULT_MAX_BATCH, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS,
};

/// Default client URL, like etcd's.
pub const DEFAULT_LISTEN_CLIENT_URLS: &str = "http://127.0.0.1:2379";
/// Default HTTP URL for health and metrics, like etcd's (kubeadm probes it).
pub const DEFAULT_LISTEN_METRICS_URLS: &str = "http://127.0.0.1:2381";
/// Default data directory of managed mode.
pub const DEFAULT_DATA_DIR: &str = "./pgetcd-data";
/// Default keyspace (Postgres schema).
pub const DEFAULT_KEYSPACE: &str = "pgetcd";

/// pgetcd: an etcd v3 endpoint backed by PostgreSQL.
#[derive(Debug, Clone, Parser)]
#[command(name = "pgetcd", version, about)]
pub struct Config {
    /// Human-readable name of this member (reported by MemberList).
    #[arg(long, env = "PGETCD_NAME", default_value = "default")]
    pub name: String,

    /// Comma-separated URLs to serve etcd clients on (http://host:port, or
    /// https://host:port with --cert-file/--key-file or --auto-tls). Each also serves
    /// /health, /livez, /readyz, /metrics and /version over HTTP/1.
    #[arg(
        long,
        env = "PGETCD_LISTEN_CLIENT_URLS",
        default_value = DEFAULT_LISTEN_CLIENT_URLS,
        value_delimiter = ','
    )]
    pub listen_client_urls: Vec<String>,

    /// Comma-separated URLs to serve HTTP /health, /livez, /readyz and /metrics on.
    #[arg(
        long,
        env = "PGETCD_LISTEN_METRICS_URLS",
        default_value = DEFAULT_LISTEN_METRICS_URLS,
        value_delimiter = ','
    )]
    pub listen_metrics_urls: Vec<String>,

    /// Comma-separated client URLs to advertise in MemberList (default: the listen URLs
    /// with the ports actually bound).
    #[arg(long, env = "PGETCD_ADVERTISE_CLIENT_URLS", value_delimiter = ',')]
    pub advertise_client_urls: Vec<String>,

    /// PostgreSQL connection string (postgres://user@host:port/db or key=value form).
    /// Without it, pgetcd runs its own local PostgreSQL under --data-dir.
    #[arg(long, env = "PGETCD_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// Directory of the managed local PostgreSQL cluster (used without --postgres-url).
    #[arg(long, env = "PGETCD_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Postgres schema holding this keyspace (one revision space).
    #[arg(long, env = "PGETCD_KEYSPACE", default_value = DEFAULT_KEYSPACE)]
    pub keyspace: String,

    /// Largest write request accepted, in bytes (etcd's --max-request-bytes). The gRPC
    /// receive limit is this plus 512 KiB.
    #[arg(long, env = "PGETCD_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Most compares, success ops or failure ops in one txn (etcd's --max-txn-ops).
    #[arg(long, env = "PGETCD_MAX_TXN_OPS", default_value_t = DEFAULT_MAX_TXN_OPS)]
    pub max_txn_ops: usize,

    /// Memory budget for cached values, in bytes; misses are read from Postgres.
    #[arg(long, env = "PGETCD_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: usize,

    /// Revisions per history partition; compaction drops whole partitions.
    #[arg(
        long,
        env = "PGETCD_HISTORY_PARTITION_REVISIONS",
        default_value_t = pgetcd_engine::DEFAULT_PARTITION_REVISIONS
    )]
    pub history_partition_revisions: i64,

    /// Keyspace size in Postgres (bytes) above which the NOSPACE alarm is raised and
    /// puts, txns with puts and lease grants fail, like etcd's quota; 0 = no quota
    /// (etcd's 0 means 2 GiB: pgetcd is meant to grow beyond it).
    #[arg(long, env = "PGETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,

    /// Most write requests committed together in one Postgres transaction.
    #[arg(long, env = "PGETCD_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// Postgres connections used for value reads on cache misses.
    #[arg(long, env = "PGETCD_READ_POOL_SIZE", default_value_t = 8)]
    pub read_pool_size: usize,

    /// Interval of watch progress notifications (etcd's
    /// --experimental-watch-progress-notify-interval), e.g. 10m, 5s, 500ms.
    #[arg(
        long,
        env = "PGETCD_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m",
        value_parser = parse_duration
    )]
    pub watch_progress_notify_interval: Duration,

    /// Batches of committed events the watch bus keeps for a lagging dispatcher.
    #[arg(long, env = "PGETCD_WATCH_RING_CAPACITY", default_value_t = 4096)]
    pub watch_ring_capacity: usize,

    /// Where watch events come from: `writer` (committed batches handed over
    /// in-process, the replication stream consumed beside them) or `wal` (logical
    /// replication only).
    #[arg(
        long,
        env = "PGETCD_WATCH_SOURCE",
        value_enum,
        default_value = "writer"
    )]
    pub watch_source: crate::watch_feed::WatchSource,

    /// Deliveries queued per watch stream before its watchers fall back to catching up
    /// from history.
    #[arg(long, env = "PGETCD_WATCH_STREAM_QUEUE", default_value_t = 1024)]
    pub watch_stream_queue: usize,

    /// Certificate (PEM) served on https client URLs.
    #[arg(long, env = "PGETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "PGETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates (used with
    /// --client-cert-auth).
    #[arg(long, env = "PGETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require every client on https URLs to present a certificate signed by
    /// --trusted-ca-file (mutual TLS).
    #[arg(long, env = "PGETCD_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,

    /// Serve https client URLs with a self-signed certificate generated under
    /// <data-dir>/fixtures/client (development only; clients cannot verify it).
    #[arg(long, env = "PGETCD_AUTO_TLS")]
    pub auto_tls: bool,

    /// Validity of --auto-tls certificates, in years.
    #[arg(long, env = "PGETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,

    /// Interval of the server's HTTP/2 keepalive pings on idle client connections
    /// (etcd's --grpc-keepalive-interval).
    #[arg(
        long,
        env = "PGETCD_GRPC_KEEPALIVE_INTERVAL",
        default_value = "2h",
        value_parser = parse_duration
    )]
    pub grpc_keepalive_interval: Duration,

    /// A client connection whose keepalive ping is not answered within this is closed
    /// (etcd's --grpc-keepalive-timeout).
    #[arg(
        long,
        env = "PGETCD_GRPC_KEEPALIVE_TIMEOUT",
        default_value = "20s",
        value_parser = parse_duration
    )]
    pub grpc_keepalive_timeout: Duration,

    /// Log filter (tracing's env-filter syntax), e.g. info or pgetcd_engine=debug.
    #[arg(long, env = "PGETCD_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The defaults, as `pgetcd` with no flags would use them.
    pub fn defaults() -> Self {
        Config::parse_from(["pgetcd"])
    }

    /// Checks values that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 {
            return Err("--max-request-bytes must be positive".into());
        }
        if self.max_txn_ops == 0 {
            return Err("--max-txn-ops must be positive".into());
        }
        if self.max_batch == 0 {
            return Err("--max-batch must be positive".into());
        }
        if self.history_partition_revisions < 1 {
            return Err("--history-partition-revisions must be at least 1".into());
        }
        if self.listen_client_urls.is_empty() {
            return Err("--listen-client-urls needs at least one URL".into());
        }
        for u in &self.listen_client_urls {
            crate::parse_listen_url(u)?;
        }
        for u in &self.listen_metrics_urls {
            if crate::parse_listen_url(u)?.tls {
                return Err(format!(
                    "{u}: --listen-metrics-urls serves plain HTTP only (use http://)"
                ));
            }
        }
        if self.self_signed_cert_validity == 0 {
            return Err("--self-signed-cert-validity must be at least 1 (year)".into());
        }
        Ok(())
    }

    /// The client TLS settings.
    pub fn tls(&self) -> crate::transport::TlsSettings {
        crate::transport::TlsSettings {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
            auto_tls: self.auto_tls,
            auto_tls_dir: self.data_dir.join("fixtures").join("client"),
            self_signed_cert_validity_years: self.self_signed_cert_validity,
        }
    }
}

/// Parses durations like `10m`, `5s`, `500ms`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if secs <= 0.0 || !secs.is_finite() {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3x").is_err());
    }

    #[test]
    fn defaults_validate() {
        assert!(Config::defaults().validate().is_ok());
    }
}
