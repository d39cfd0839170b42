//! Command-line flags, each with a `PGETCD_*` environment twin. Names follow etcd's
//! where the meaning is the same.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use pgetcd_storage_postgres::PgStoreConfig;

use crate::duration::{parse_duration, parse_go_duration};
use pgetcd_engine::{
    DEFAULT_CACHE_BYTES, DEFAULT_MAX_BATCH, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_TXN_OPS,
    EngineConfig,
};

/// Default client URL, like etcd's.
pub const DEFAULT_LISTEN_CLIENT_URLS: &str = "http://127.0.0.1:2379";
/// Default HTTP URL for health and metrics, like etcd's (kubeadm probes it).
pub const DEFAULT_LISTEN_METRICS_URLS: &str = "http://127.0.0.1:2381";
/// Default peer URL reported by MemberList, etcd's default.
pub const DEFAULT_INITIAL_ADVERTISE_PEER_URLS: &str = "http://localhost:2380";
/// etcd's default interval of watch progress notifications.
pub const DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(600);
/// etcd's floor for the interval of watch progress notifications.
pub const MIN_WATCH_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_millis(100);
/// Default data directory of managed mode.
pub const DEFAULT_DATA_DIR: &str = "./pgetcd-data";
/// Default keyspace (Postgres schema).
pub const DEFAULT_KEYSPACE: &str = "pgetcd";

/// pgetcd: an etcd v3 endpoint backed by PostgreSQL.
#[derive(Debug, Clone, Parser)]
#[command(name = "pgetcd", version, about)]
pub struct Config {
    /// This member: its name and the URLs it serves and advertises.
    #[command(flatten)]
    pub member: MemberFlags,

    /// Where the keyspace lives: Postgres, or the managed one under --data-dir.
    #[command(flatten)]
    pub storage: StorageFlags,

    /// More keyspaces served by this process.
    #[command(flatten)]
    pub keyspaces: KeyspaceFlags,

    /// The engine: request limits, the value cache, group commit, the quota.
    #[command(flatten)]
    pub engine: EngineFlags,

    /// Watches: progress notifications, the bus, the event source.
    #[command(flatten)]
    pub watch: WatchFlags,

    /// TLS of the client URLs.
    #[command(flatten)]
    pub tls: TlsFlags,

    /// gRPC connection keepalive.
    #[command(flatten)]
    pub grpc: GrpcFlags,

    /// etcd's auto-compaction.
    #[command(flatten)]
    pub compaction: CompactionFlags,

    /// Logging.
    #[command(flatten)]
    pub logging: LogFlags,

    /// After a restore that moved the keyspace back: raising its revision.
    #[command(flatten)]
    pub recovery: RecoveryFlags,

    /// etcd flags that have no meaning for a single pgetcd member over Postgres;
    /// accepted so that an etcd command line (kubeadm's static pod, say) starts as is.
    #[command(flatten)]
    pub ignored: IgnoredEtcdFlags,
}

/// pgetcd's command line: serving etcd (no subcommand, every flag of [`Config`]), or
/// one of the offline commands on a keyspace.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "pgetcd",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// An offline command; none: serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The server's flags.
    #[command(flatten)]
    pub config: Config,
}

/// The offline commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// etcd snapshots (saving one is `etcdctl snapshot save` against pgetcd).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Copies a running etcd into the keyspace with its revisions, follows its changes,
    /// and cuts over on SIGINT/SIGTERM once pgetcd has caught up and the source refuses
    /// writes. Every instance of the keyspace must be stopped.
    Migrate(crate::migrate::MigrateArgs),
    /// Keyspaces of a Postgres: create, list (with size and revision), drop.
    #[command(subcommand)]
    Keyspace(KeyspaceCommand),
}

/// `pgetcd keyspace ...`: the keyspace named by --keyspace, in the Postgres of
/// --postgres-url (or the managed one under --data-dir).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeyspaceCommand {
    /// Creates the keyspace (its schema and tables), or checks and migrates it.
    Create(KeyspaceArgs),
    /// Lists the Postgres's keyspaces: revision, compact revision, size, writer.
    List(KeyspaceArgs),
    /// Drops the keyspace and everything in it, with its replication slots; refuses
    /// while an instance serves it, and without --confirm naming it.
    Drop(DropArgs),
    /// Copies the live keys under a prefix from another keyspace into this one (which
    /// no instance may serve meanwhile), at a revision above both keyspaces' current
    /// ones; keys already equal are left alone, so it is safe to rerun.
    CopyPrefix(CopyPrefixArgs),
}

/// `pgetcd keyspace copy-prefix`.
#[derive(Debug, Clone, clap::Args)]
pub struct CopyPrefixArgs {
    /// The key prefix to copy, e.g. /registry/events/.
    #[arg(long)]
    pub prefix: String,

    /// The keyspace to copy from (it may be served meanwhile; it is only read).
    #[arg(long)]
    pub from_keyspace: String,

    /// The Postgres of --from-keyspace (default: the target's).
    #[arg(long)]
    pub from_postgres_url: Option<String>,

    /// The target: --keyspace in --postgres-url (or the managed Postgres).
    #[command(flatten)]
    pub target: KeyspaceArgs,
}

/// Where the keyspace commands act.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyspaceArgs {
    /// The Postgres and the keyspace.
    #[command(flatten)]
    pub storage: StorageFlags,

    /// Logging.
    #[command(flatten)]
    pub logging: LogFlags,
}

/// `pgetcd keyspace drop`.
#[derive(Debug, Clone, clap::Args)]
pub struct DropArgs {
    /// The keyspace's name again: nothing is dropped without it.
    #[arg(long)]
    pub confirm: Option<String>,

    /// The Postgres and the keyspace.
    #[command(flatten)]
    pub target: KeyspaceArgs,
}

/// `pgetcd snapshot ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Loads an etcd snapshot file into the keyspace (revisions, versions, leases and
    /// the compaction kept), then exits. Every instance of the keyspace must be stopped.
    Restore(RestoreArgs),
}

/// `pgetcd snapshot restore FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot file (from `etcdctl snapshot save`, against etcd or pgetcd).
    pub file: PathBuf,

    /// Restore a file without its SHA-256 trailer (a `member/snap/db` copied from an
    /// etcd data directory), or whose trailer does not match.
    #[arg(long, default_value_t = false)]
    pub skip_hash_check: bool,

    /// Replace whatever the keyspace holds; without it a keyspace holding keys or
    /// leases is refused.
    #[arg(long, default_value_t = false)]
    pub replace: bool,

    /// Where the keyspace lives.
    #[command(flatten)]
    pub storage: StorageFlags,

    /// Logging.
    #[command(flatten)]
    pub logging: LogFlags,
}

/// This member: its name and the URLs it serves and advertises.
#[derive(Debug, Clone, clap::Args)]
pub struct MemberFlags {
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

    /// Comma-separated peer URLs that MemberList reports for this member, as etcd
    /// does. pgetcd has no peer traffic: nothing listens on them.
    #[arg(
        long,
        env = "PGETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = DEFAULT_INITIAL_ADVERTISE_PEER_URLS,
        value_delimiter = ','
    )]
    pub initial_advertise_peer_urls: Vec<String>,
}

/// More keyspaces served by this process, each with its own listeners (see
/// `keyspaces.rs`).
#[derive(Debug, Clone, clap::Args)]
pub struct KeyspaceFlags {
    /// One more keyspace to serve, as `name=NAME listen-client-urls=URL[,URL]
    /// [advertise-client-urls=URL[,URL]] [postgres-url=URL]` (repeatable; its Postgres
    /// defaults to this one's).
    #[arg(long = "serve-keyspace", env = "PGETCD_SERVE_KEYSPACE")]
    pub serve_keyspace: Vec<crate::keyspaces::KeyspaceSpec>,

    /// A file of more keyspaces to serve: one --serve-keyspace spec per line, `#`
    /// comments.
    #[arg(long, env = "PGETCD_KEYSPACES_FILE")]
    pub keyspaces_file: Option<PathBuf>,

    /// Routes the keys starting with PREFIX, on the main keyspace's client URLs, to
    /// KEYSPACE (one of --serve-keyspace), as `PREFIX=KEYSPACE` (repeatable; prefixes
    /// may not overlap). A request, txn or watch whose keys fall in more than one
    /// keyspace is refused with InvalidArgument (see docs/operations.md).
    #[arg(long = "route-prefix", env = "PGETCD_ROUTE_PREFIX")]
    pub route_prefix: Vec<crate::routing::RoutePrefix>,
}

/// Where the keyspace lives: Postgres, or the managed one under --data-dir.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageFlags {
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

    /// Revisions per history partition; compaction drops whole partitions.
    #[arg(
        long,
        env = "PGETCD_HISTORY_PARTITION_REVISIONS",
        default_value_t = pgetcd_storage_postgres::DEFAULT_PARTITION_REVISIONS
    )]
    pub history_partition_revisions: i64,

    /// Postgres connections used for value reads on cache misses.
    #[arg(long, env = "PGETCD_READ_POOL_SIZE", default_value_t = 8)]
    pub read_pool_size: usize,
}

/// The engine: request limits, the value cache, group commit, the quota.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineFlags {
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

    /// Keyspace size in Postgres (bytes) above which the NOSPACE alarm is raised and
    /// puts, txns with puts and lease grants fail, like etcd's quota; 0 = no quota
    /// (etcd's 0 means 2 GiB: pgetcd is meant to grow beyond it).
    #[arg(long, env = "PGETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,

    /// Most write requests committed together in one Postgres transaction.
    #[arg(long, env = "PGETCD_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
}

/// Watches: progress notifications, the bus, the event source.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchFlags {
    /// Interval of watch progress notifications, e.g. 10m, 5s, 500ms (etcd's
    /// --experimental-watch-progress-notify-interval, accepted as an alias). As in
    /// etcd, 0 keeps the default and anything below 100ms is raised to 100ms.
    #[arg(
        long,
        alias = "experimental-watch-progress-notify-interval",
        env = "PGETCD_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m",
        value_parser = parse_go_duration
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

    /// Most watchers one Watch stream may hold (pgetcd's own bound; etcd has none): a
    /// create past it is answered created and canceled with a reason. 0 = no limit.
    #[arg(long, env = "PGETCD_MAX_WATCHERS_PER_STREAM", default_value_t = DEFAULT_MAX_WATCHERS_PER_STREAM)]
    pub max_watchers_per_stream: usize,
}

/// TLS of the client URLs.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsFlags {
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
    #[arg(long, env = "PGETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub client_cert_auth: bool,

    /// Serve https client URLs with a self-signed certificate generated under
    /// <data-dir>/fixtures/client (development only; clients cannot verify it).
    #[arg(long, env = "PGETCD_AUTO_TLS", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub auto_tls: bool,

    /// Lowest TLS version on https client URLs: TLS1.2 (default) or TLS1.3.
    #[arg(long, env = "PGETCD_TLS_MIN_VERSION")]
    pub tls_min_version: Option<String>,

    /// Highest TLS version on https client URLs: TLS1.2 or TLS1.3 (default).
    #[arg(long, env = "PGETCD_TLS_MAX_VERSION")]
    pub tls_max_version: Option<String>,

    /// Comma-separated TLS 1.2 cipher suites to offer, by Go's (IANA) names, e.g.
    /// TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (default: all ECDHE AEAD suites).
    #[arg(long, env = "PGETCD_CIPHER_SUITES", value_delimiter = ',')]
    pub cipher_suites: Vec<String>,

    /// Certificate revocation lists (PEM, or one DER list): listed client certificates
    /// are refused under --client-cert-auth.
    #[arg(long, env = "PGETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<PathBuf>,

    /// Comma-separated host names (or IP addresses) of which a client certificate must
    /// name one (subject alternative names, as a client checks a server's name) under
    /// --client-cert-auth; others fail the handshake (etcd's flag; etcd 3.5 takes one
    /// name, 3.6 a list).
    #[arg(
        long,
        env = "PGETCD_CLIENT_CERT_ALLOWED_HOSTNAME",
        value_delimiter = ','
    )]
    pub client_cert_allowed_hostname: Vec<String>,

    /// How often the client TLS files (--cert-file, --key-file, --trusted-ca-file,
    /// --client-crl-file) are checked for changes and reloaded; 0 = only on SIGHUP.
    #[arg(
        long,
        env = "PGETCD_TLS_RELOAD_INTERVAL",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub tls_reload_interval: Duration,

    /// Validity of --auto-tls certificates, in years.
    #[arg(long, env = "PGETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,
}

/// gRPC connection keepalive.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcFlags {
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

    /// Most concurrent HTTP/2 streams (calls) per client connection (etcd's
    /// --max-concurrent-streams; its default too: 2^32-1, no limit). Further calls wait
    /// in the client until one ends.
    #[arg(long, env = "PGETCD_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
}

/// Default --max-watchers-per-stream.
pub const DEFAULT_MAX_WATCHERS_PER_STREAM: usize = 100_000;

/// etcd's default --max-concurrent-streams (math.MaxUint32).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = u32::MAX;

/// etcd's auto-compaction.
#[derive(Debug, Clone, clap::Args)]
pub struct CompactionFlags {
    /// etcd's --auto-compaction-mode: `periodic` keeps --auto-compaction-retention of
    /// time, `revision` keeps that many revisions.
    #[arg(long, env = "PGETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,

    /// etcd's --auto-compaction-retention: 0 (off, the default); in periodic mode a
    /// duration (30m, 1h30m) or a plain number of hours; in revision mode a number of
    /// revisions.
    #[arg(long, env = "PGETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogFlags {
    /// Log filter (tracing's env-filter syntax), e.g. info or pgetcd_engine=debug
    /// (default: --log-level's, else info).
    #[arg(long, env = "PGETCD_LOG")]
    pub log: Option<String>,

    /// etcd's --log-level (debug, info, warn, error, panic, fatal): the log filter when
    /// --log is not given.
    #[arg(long, env = "PGETCD_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// After a restore that moved the keyspace back below what this instance served
/// (see `served`): raising its revision instead of refusing to start.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RecoveryFlags {
    /// When the keyspace is below the revision this instance served (recorded under
    /// --data-dir), or this data directory has no record of it: raise its revision by
    /// this much before serving, so the next write gets a revision above everything
    /// served (etcdutl snapshot restore's --bump-revision). Needs --mark-compacted.
    /// 0: never bump.
    #[arg(long, env = "PGETCD_BUMP_REVISION", default_value_t = 0)]
    pub bump_revision: u64,

    /// With --bump-revision: mark every revision up to the raised one compacted, so
    /// reads and watches from older revisions fail as compacted and clients list again
    /// (etcd's --mark-compacted; required with --bump-revision, refused without).
    #[arg(long, env = "PGETCD_MARK_COMPACTED", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = ArgAction::Set)]
    pub mark_compacted: bool,
}

/// The largest --bump-revision (far below where revisions run out).
pub const MAX_BUMP_REVISION: u64 = 1 << 60;

impl RecoveryFlags {
    fn validate(&self) -> Result<(), String> {
        match (self.bump_revision, self.mark_compacted) {
            (0, true) => Err("--mark-compacted is only meaningful with --bump-revision".into()),
            (n, false) if n > 0 => Err(
                "--bump-revision needs --mark-compacted (as etcd's): the revisions below the raised one \
                 were served with other changes, so clients must be told they are compacted"
                    .into(),
            ),
            (n, _) if n > MAX_BUMP_REVISION => {
                Err(format!("--bump-revision is at most {MAX_BUMP_REVISION}"))
            }
            _ => Ok(()),
        }
    }

    /// The bump asked for (None: --bump-revision 0).
    pub fn bump(&self) -> Option<u64> {
        (self.bump_revision > 0).then_some(self.bump_revision)
    }
}

/// etcd flags accepted and ignored, each with the reason it has no meaning here.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IgnoredEtcdFlags {
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    initial_cluster: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    initial_cluster_state: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    initial_cluster_token: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    listen_peer_urls: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    peer_cert_file: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    peer_key_file: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    peer_trusted_ca_file: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    peer_client_cert_auth: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    peer_auto_tls: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    snapshot_count: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    heartbeat_interval: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    election_timeout: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    experimental_initial_corrupt_check: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    experimental_corrupt_check_time: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    experimental_compact_hash_check_enabled: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    logger: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    log_outputs: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    enable_v2: Option<String>,
}

impl IgnoredEtcdFlags {
    /// The flags given, as (flag, value, why it is ignored).
    pub fn given(&self) -> Vec<(&'static str, &str, &'static str)> {
        const CLUSTER: &str =
            "there are no raft peers: instances of a keyspace find each other through Postgres";
        const PEER_TLS: &str = "there is no peer traffic to secure";
        const RAFT: &str = "there is no raft log; Postgres keeps the data";
        const CORRUPT: &str = "Postgres checks its own pages; HashKV compares keyspaces";
        const LOG: &str = "pgetcd logs to stderr; see --log and --log-level";
        let all: [(&'static str, &Option<String>, &'static str); 18] = [
            ("--initial-cluster", &self.initial_cluster, CLUSTER),
            (
                "--initial-cluster-state",
                &self.initial_cluster_state,
                CLUSTER,
            ),
            (
                "--initial-cluster-token",
                &self.initial_cluster_token,
                CLUSTER,
            ),
            ("--listen-peer-urls", &self.listen_peer_urls, CLUSTER),
            ("--peer-cert-file", &self.peer_cert_file, PEER_TLS),
            ("--peer-key-file", &self.peer_key_file, PEER_TLS),
            (
                "--peer-trusted-ca-file",
                &self.peer_trusted_ca_file,
                PEER_TLS,
            ),
            (
                "--peer-client-cert-auth",
                &self.peer_client_cert_auth,
                PEER_TLS,
            ),
            ("--peer-auto-tls", &self.peer_auto_tls, PEER_TLS),
            ("--snapshot-count", &self.snapshot_count, RAFT),
            ("--heartbeat-interval", &self.heartbeat_interval, RAFT),
            ("--election-timeout", &self.election_timeout, RAFT),
            (
                "--experimental-initial-corrupt-check",
                &self.experimental_initial_corrupt_check,
                CORRUPT,
            ),
            (
                "--experimental-corrupt-check-time",
                &self.experimental_corrupt_check_time,
                CORRUPT,
            ),
            (
                "--experimental-compact-hash-check-enabled",
                &self.experimental_compact_hash_check_enabled,
                CORRUPT,
            ),
            ("--logger", &self.logger, LOG),
            ("--log-outputs", &self.log_outputs, LOG),
            (
                "--enable-v2",
                &self.enable_v2,
                "the v2 API is not served (etcd 3.4+ disables it by default)",
            ),
        ];
        all.into_iter()
            .filter_map(|(flag, v, why)| v.as_deref().map(|v| (flag, v, why)))
            .collect()
    }
}

impl Config {
    /// The defaults, as `pgetcd` with no flags would use them.
    pub fn defaults() -> Self {
        Config::parse_from(["pgetcd"])
    }

    /// The progress notification interval in force (see [`WatchFlags::progress_notify_interval`]).
    pub fn progress_notify_interval(&self) -> Duration {
        self.watch.progress_notify_interval()
    }

    /// The other keyspaces this process serves (--serve-keyspace, then
    /// --keyspaces-file), checked for distinct names and listen URLs.
    pub fn served_keyspaces(&self) -> Result<Vec<crate::keyspaces::KeyspaceSpec>, String> {
        let mut specs = self.keyspaces.serve_keyspace.clone();
        if let Some(file) = &self.keyspaces.keyspaces_file {
            specs.extend(crate::keyspaces::read_file(file)?);
        }
        crate::keyspaces::check_distinct(
            &self.storage.keyspace,
            &self.member.listen_client_urls,
            &specs,
        )?;
        Ok(specs)
    }

    /// The configuration serving `spec`: this one's, with the spec's keyspace, client
    /// URLs and Postgres (`main_url` when it names none), no metrics listener (this
    /// process's serves every keyspace) and no further keyspaces.
    pub fn for_keyspace(&self, spec: &crate::keyspaces::KeyspaceSpec, main_url: &str) -> Config {
        let mut c = self.clone();
        c.storage.keyspace = spec.name.clone();
        c.storage.postgres_url = Some(
            spec.postgres_url
                .clone()
                .unwrap_or_else(|| main_url.to_owned()),
        );
        c.member.listen_client_urls = spec.listen_client_urls.clone();
        c.member.advertise_client_urls = spec.advertise_client_urls.clone();
        c.member.listen_metrics_urls = Vec::new();
        c.keyspaces = KeyspaceFlags {
            serve_keyspace: Vec::new(),
            keyspaces_file: None,
            route_prefix: Vec::new(),
        };
        c
    }

    /// Checks values that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        let specs = self.served_keyspaces()?;
        let names: Vec<&str> = std::iter::once(self.storage.keyspace.as_str())
            .chain(specs.iter().map(|s| s.name.as_str()))
            .collect();
        crate::routing::spans(&self.keyspaces.route_prefix, &names)?;
        self.engine.validate()?;
        self.storage.validate()?;
        self.member.validate()?;
        self.compaction.policy()?;
        crate::transport::tls_policy(&self.tls())?;
        self.logging.validate()?;
        self.recovery.validate()?;
        if self.grpc.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        let tls = self.tls();
        if !tls.allowed_hostnames.is_empty() && !tls.client_cert_auth {
            return Err(
                "--client-cert-allowed-hostname needs --client-cert-auth (and --trusted-ca-file)"
                    .into(),
            );
        }
        if self.tls.self_signed_cert_validity == 0 {
            return Err("--self-signed-cert-validity must be at least 1 (year)".into());
        }
        Ok(())
    }

    /// The auto-compaction policy of --auto-compaction-mode and -retention.
    pub fn auto_compaction(&self) -> Result<crate::auto_compaction::AutoCompaction, String> {
        self.compaction.policy()
    }

    /// The log filter: --log when given, else --log-level's, else info.
    pub fn log_filter(&self) -> String {
        self.logging.filter()
    }

    /// The client TLS settings (--auto-tls certificates live under --data-dir).
    pub fn tls(&self) -> crate::transport::TlsSettings {
        self.tls.settings(&self.storage.data_dir)
    }
}

impl MemberFlags {
    fn validate(&self) -> Result<(), String> {
        if self.listen_client_urls.is_empty() {
            return Err("--listen-client-urls needs at least one URL".into());
        }
        for u in &self.listen_client_urls {
            crate::transport::parse_listen_url(u)?;
        }
        for u in &self.listen_metrics_urls {
            crate::transport::parse_listen_url(u)?;
        }
        Ok(())
    }
}

impl StorageFlags {
    fn validate(&self) -> Result<(), String> {
        if self.history_partition_revisions < 1 {
            return Err("--history-partition-revisions must be at least 1".into());
        }
        Ok(())
    }

    /// The Postgres store's settings, for the connection string `url` (--postgres-url,
    /// or the managed cluster's).
    pub fn store_config(&self, url: String) -> PgStoreConfig {
        PgStoreConfig {
            url,
            schema: self.keyspace.clone(),
            partition_revisions: self.history_partition_revisions,
            read_pool_size: self.read_pool_size,
            feed_consumer: None,
        }
    }
}

impl EngineFlags {
    fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes == 0 {
            return Err("--max-request-bytes must be positive".into());
        }
        if self.max_txn_ops == 0 {
            return Err("--max-txn-ops must be positive".into());
        }
        if self.max_batch == 0 {
            return Err("--max-batch must be positive".into());
        }
        Ok(())
    }
}

impl From<&EngineFlags> for EngineConfig {
    fn from(f: &EngineFlags) -> Self {
        EngineConfig {
            cache_bytes: f.cache_bytes,
            max_request_bytes: f.max_request_bytes,
            max_txn_ops: f.max_txn_ops,
            max_batch: f.max_batch,
            quota_backend_bytes: f.quota_backend_bytes,
            ..EngineConfig::default()
        }
    }
}

impl WatchFlags {
    /// The progress notification interval in force, with etcd's rules: 0 means the
    /// default, and the floor is 100ms.
    pub fn progress_notify_interval(&self) -> Duration {
        match self.watch_progress_notify_interval {
            Duration::ZERO => DEFAULT_WATCH_PROGRESS_NOTIFY_INTERVAL,
            d => d.max(MIN_WATCH_PROGRESS_NOTIFY_INTERVAL),
        }
    }

    /// The watch bus's settings.
    pub fn hub_config(&self) -> pgetcd_watchbus::HubConfig {
        pgetcd_watchbus::HubConfig {
            ring_capacity: self.watch_ring_capacity,
            stream_queue: self.watch_stream_queue,
        }
    }
}

impl TlsFlags {
    /// The client TLS settings; --auto-tls writes its certificates under `data_dir`.
    pub fn settings(&self, data_dir: &std::path::Path) -> crate::transport::TlsSettings {
        crate::transport::TlsSettings {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
            auto_tls: self.auto_tls,
            auto_tls_dir: data_dir.join("fixtures").join("client"),
            self_signed_cert_validity_years: self.self_signed_cert_validity,
            min_version: self.tls_min_version.clone(),
            max_version: self.tls_max_version.clone(),
            cipher_suites: self.cipher_suites.clone(),
            client_crl_file: self.client_crl_file.clone(),
            allowed_hostnames: self
                .client_cert_allowed_hostname
                .iter()
                .filter(|h| !h.trim().is_empty())
                .cloned()
                .collect(),
        }
    }
}

impl From<&GrpcFlags> for crate::transport::Keepalive {
    fn from(f: &GrpcFlags) -> Self {
        crate::transport::Keepalive {
            interval: f.grpc_keepalive_interval,
            timeout: f.grpc_keepalive_timeout,
        }
    }
}

impl CompactionFlags {
    /// The auto-compaction policy.
    pub fn policy(&self) -> Result<crate::auto_compaction::AutoCompaction, String> {
        crate::auto_compaction::AutoCompaction::parse(
            &self.auto_compaction_mode,
            &self.auto_compaction_retention,
        )
    }
}

impl LogFlags {
    fn validate(&self) -> Result<(), String> {
        if let Some(level) = &self.log_level {
            log_filter_of_level(level)?;
        }
        Ok(())
    }

    /// The log filter: --log when given, else --log-level's, else info. Unless it
    /// names rustls, rustls's warnings about a client's TLS server name (Node.js's gRPC
    /// sends an IP address there, on every connection) are left out: the metric
    /// `pgetcd_tls_handshakes_without_server_name_total` counts those connections.
    pub fn filter(&self) -> String {
        let filter = match (&self.log, &self.log_level) {
            (Some(filter), _) => filter.clone(),
            (None, Some(level)) => log_filter_of_level(level).unwrap_or_else(|_| "info".into()),
            (None, None) => "info".into(),
        };
        if filter.contains("rustls") {
            filter
        } else {
            format!("{filter},{QUIET_SNI_WARNINGS}")
        }
    }
}

/// The log directive that leaves out rustls's warnings about clients' server names.
pub const QUIET_SNI_WARNINGS: &str = "rustls::msgs::handshake=error";

/// etcd's --log-level as a log filter.
fn log_filter_of_level(level: &str) -> Result<String, String> {
    match level {
        "debug" | "info" | "warn" | "error" => Ok(level.to_owned()),
        "dpanic" | "panic" | "fatal" => Ok("error".to_owned()),
        _ => Err(format!(
            "--log-level: unknown level {level:?} (debug, info, warn, error, panic, fatal)"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The command line kubeadm writes into etcd's static pod starts pgetcd as is.
    #[test]
    fn kubeadm_etcd_command_line_is_accepted() {
        let c = Config::try_parse_from([
            "etcd",
            "--advertise-client-urls=https://10.0.0.1:2379",
            "--cert-file=/etc/kubernetes/pki/etcd/server.crt",
            "--client-cert-auth=true",
            "--data-dir=/var/lib/etcd",
            "--experimental-initial-corrupt-check=true",
            "--experimental-watch-progress-notify-interval=5s",
            "--initial-advertise-peer-urls=https://10.0.0.1:2380",
            "--initial-cluster=node1=https://10.0.0.1:2380",
            "--key-file=/etc/kubernetes/pki/etcd/server.key",
            "--listen-client-urls=https://127.0.0.1:2379,https://10.0.0.1:2379",
            "--listen-metrics-urls=http://127.0.0.1:2381",
            "--listen-peer-urls=https://10.0.0.1:2380",
            "--name=node1",
            "--peer-cert-file=/etc/kubernetes/pki/etcd/peer.crt",
            "--peer-client-cert-auth=true",
            "--peer-key-file=/etc/kubernetes/pki/etcd/peer.key",
            "--peer-trusted-ca-file=/etc/kubernetes/pki/etcd/ca.crt",
            "--snapshot-count=10000",
            "--trusted-ca-file=/etc/kubernetes/pki/etcd/ca.crt",
        ])
        .unwrap();
        assert!(c.validate().is_ok());
        assert!(c.tls.client_cert_auth);
        assert_eq!(c.progress_notify_interval(), Duration::from_secs(5));
        for (flag, interval) in [
            ("0s", 600_000),
            ("0", 600_000),
            ("10ms", 100),
            ("2s", 2_000),
        ] {
            let c =
                Config::try_parse_from(["etcd", "--watch-progress-notify-interval", flag]).unwrap();
            assert_eq!(
                c.progress_notify_interval(),
                Duration::from_millis(interval),
                "{flag}"
            );
        }
        assert_eq!(c.member.listen_client_urls.len(), 2);
        let ignored: Vec<&str> = c.ignored.given().iter().map(|g| g.0).collect();
        assert_eq!(ignored.len(), 8, "{ignored:?}");
        assert_eq!(
            c.member.initial_advertise_peer_urls,
            ["https://10.0.0.1:2380"]
        );
        assert!(ignored.contains(&"--snapshot-count"));
        let c = Config::try_parse_from(["etcd", "--client-cert-auth=false", "--auto-tls"]).unwrap();
        assert!(!c.tls.client_cert_auth);
        assert!(c.tls.auto_tls);
        let c = Config::try_parse_from(["etcd", "--client-cert-auth"]).unwrap();
        assert!(c.tls.client_cert_auth);
        assert!(Config::try_parse_from(["etcd", "--client-cert-auth=maybe"]).is_err());
        let c = Config::try_parse_from(["etcd", "--log-level=warn"]).unwrap();
        assert_eq!(c.log_filter(), format!("warn,{QUIET_SNI_WARNINGS}"));
        let c = Config::try_parse_from(["etcd", "--log-level=loud"]).unwrap();
        assert!(c.validate().is_err());
        let c = Config::try_parse_from([
            "etcd",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=1000",
        ])
        .unwrap();
        assert_eq!(
            c.auto_compaction(),
            Ok(crate::auto_compaction::AutoCompaction::Revision(1000))
        );
        let c = Config::try_parse_from(["etcd", "--auto-compaction-retention=1h"]).unwrap();
        assert_eq!(
            c.auto_compaction(),
            Ok(crate::auto_compaction::AutoCompaction::Periodic(
                Duration::from_secs(3600)
            ))
        );
    }

    /// Every visible flag is documented in docs/operations.md.
    #[test]
    fn every_flag_is_in_operations_md() {
        use clap::CommandFactory;
        let operations = include_str!("../../docs/operations.md");
        // The server's flags and every subcommand's.
        let mut commands = vec![Cli::command()];
        while let Some(cmd) = commands.pop() {
            for arg in cmd.get_arguments() {
                if arg.is_hide_set() {
                    continue;
                }
                if let Some(long) = arg.get_long() {
                    assert!(
                        operations.contains(&format!("`--{long}`")),
                        "--{long} (of {}) is not in docs/operations.md",
                        cmd.get_name()
                    );
                }
            }
            commands.extend(cmd.get_subcommands().cloned());
        }
    }

    #[test]
    fn bump_revision_needs_mark_compacted_as_in_etcd() {
        let parse = |args: &[&str]| {
            let mut all = vec!["pgetcd"];
            all.extend_from_slice(args);
            let c = Config::try_parse_from(all).unwrap();
            c.validate().map(|()| c.recovery.bump())
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(
            parse(&["--bump-revision", "1000", "--mark-compacted"]),
            Ok(Some(1000))
        );
        assert_eq!(
            parse(&["--bump-revision=5", "--mark-compacted=true"]),
            Ok(Some(5))
        );
        assert!(parse(&["--bump-revision", "1000"]).is_err());
        assert!(parse(&["--mark-compacted"]).is_err());
        assert!(parse(&["--bump-revision", "2000000000000000000", "--mark-compacted"]).is_err());
    }

    #[test]
    fn defaults_validate() {
        assert!(Config::defaults().validate().is_ok());
    }
}
