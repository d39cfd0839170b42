//! `/metrics`: Prometheus text exposition of the server's, engine's, watch bus's and
//! process's figures, under etcd's names where the meaning matches (see
//! docs/operations.md for the list).
//!
//! gRPC calls are counted by a tower layer in front of every client connection, like
//! go-grpc-prometheus does for etcd: `grpc_server_started_total` when a call arrives,
//! `grpc_server_handled_total` with the final `grpc-status` (read from the trailers, or
//! from the headers of a trailers-only answer; a call dropped before it finished counts
//! as `Canceled`), and `grpc_server_handling_seconds`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use parking_lot::RwLock;
use pgetcd_engine::Engine;
use pgetcd_engine::metrics::{EngineMetrics, Histogram, HistogramSnapshot, SECONDS_BOUNDS};
use pgetcd_watchbus::Hub;

/// gRPC status code names, indexed by code, as go-grpc-prometheus labels them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// Distinct gRPC paths tracked; calls to further unknown paths share one entry, so a
/// client cannot grow the table without bound.
const MAX_METHODS: usize = 128;

/// Calls of one gRPC method.
struct MethodStats {
    service: String,
    method: String,
    kind: &'static str,
    started: AtomicU64,
    handled: [AtomicU64; 17],
    seconds: Histogram,
}

impl MethodStats {
    fn new(path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let kind = match (service, method) {
            ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => {
                "bidi_stream"
            }
            ("etcdserverpb.Maintenance", "Snapshot") | ("grpc.health.v1.Health", "Watch") => {
                "server_stream"
            }
            _ => "unary",
        };
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
            kind,
            started: AtomicU64::new(0),
            handled: Default::default(),
            seconds: Histogram::new(SECONDS_BOUNDS),
        }
    }

    fn finish(&self, code: usize, started: Instant) {
        self.handled[code.min(CODES.len() - 1)].fetch_add(1, Ordering::Relaxed);
        self.seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// The server's own figures (one per running server).
#[derive(Default)]
pub struct Metrics {
    methods: RwLock<HashMap<String, Arc<MethodStats>>>,
    /// Client connections accepted (TCP, before TLS).
    pub connections_accepted: AtomicU64,
    /// Client connections open.
    pub connections_open: AtomicI64,
    /// TLS handshakes that failed (no or bad client certificate, protocol errors).
    pub tls_handshake_failures: AtomicU64,
}

impl Metrics {
    fn method(&self, path: &str) -> Arc<MethodStats> {
        if let Some(m) = self.methods.read().get(path) {
            return m.clone();
        }
        let mut map = self.methods.write();
        let key = if map.len() >= MAX_METHODS && !map.contains_key(path) {
            "/unknown/unknown"
        } else {
            path
        };
        map.entry(key.to_owned())
            .or_insert_with(|| Arc::new(MethodStats::new(key)))
            .clone()
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<usize> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Counts gRPC calls passing through it.
#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let is_grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let call = is_grpc.then(|| {
            let m = self.metrics.method(req.uri().path());
            m.started.fetch_add(1, Ordering::Relaxed);
            Call {
                stats: m,
                started: Instant::now(),
                code: None,
            }
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let mut call = call;
            if let Some(c) = call.as_mut() {
                // A trailers-only answer carries the status in its headers.
                c.code = grpc_status(resp.headers());
            }
            Ok(resp.map(|inner| MeteredBody { inner, call }))
        })
    }
}

/// One call being answered; records its outcome when dropped.
struct Call {
    stats: Arc<MethodStats>,
    started: Instant,
    code: Option<usize>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.stats
            .finish(self.code.unwrap_or(CANCELED), self.started);
    }
}

/// A response body that notes the gRPC status in the trailers.
pub struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref()
                    && let Some(c) = self.call.as_mut()
                {
                    c.code = Some(grpc_status(t).unwrap_or(UNKNOWN));
                }
            }
            Poll::Ready(None) => {
                if let Some(c) = self.call.as_mut()
                    && c.code.is_none()
                {
                    c.code = Some(UNKNOWN);
                }
                self.call = None;
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Prometheus text writer.
struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    fn counter(&mut self, name: &str, help: &str, c: &AtomicU64) {
        self.one(name, "counter", help, EngineMetrics::get(c) as f64);
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.one(name, "gauge", help, v);
    }

    fn histogram_series(&mut self, name: &str, labels: &str, h: &HistogramSnapshot) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in &h.buckets {
            let _ = writeln!(self.0, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            self.0,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            h.count
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(self.0, "{name}_sum{} {}", braces(labels), h.sum);
        let _ = writeln!(self.0, "{name}_count{} {}", braces(labels), h.count);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        self.histogram_series(name, "", &h.snapshot());
    }
}

/// What `/metrics` reads.
#[derive(Clone)]
pub struct Sources {
    /// The engine.
    pub engine: Engine,
    /// The watch bus.
    pub hub: Hub,
    /// The server's own figures.
    pub metrics: Arc<Metrics>,
    /// The keyspace (its replication slot's lag is reported).
    pub keyspace: String,
}

/// Renders every series.
pub async fn render(src: &Sources) -> String {
    let mut out = Out(String::with_capacity(16 * 1024));
    grpc_series(&mut out, &src.metrics);
    let m = &src.metrics;
    out.counter(
        "pgetcd_client_connections_accepted_total",
        "Client connections accepted.",
        &m.connections_accepted,
    );
    out.gauge(
        "pgetcd_client_connections_open",
        "Client connections open.",
        m.connections_open.load(Ordering::Relaxed) as f64,
    );
    out.counter(
        "pgetcd_tls_handshake_failures_total",
        "Client TLS handshakes that failed (including missing or untrusted client certificates).",
        &m.tls_handshake_failures,
    );
    engine_series(&mut out, src).await;
    watch_series(&mut out, &src.hub);
    process_series(&mut out);
    out.0
}

fn grpc_series(out: &mut Out, m: &Metrics) {
    let mut methods: Vec<Arc<MethodStats>> = m.methods.read().values().cloned().collect();
    methods.sort_by(|a, b| (&a.service, &a.method).cmp(&(&b.service, &b.method)));
    out.head(
        "grpc_server_started_total",
        "counter",
        "Total number of RPCs started on the server.",
    );
    for s in &methods {
        let _ = writeln!(
            out.0,
            "grpc_server_started_total{{grpc_method=\"{}\",grpc_service=\"{}\",grpc_type=\"{}\"}} {}",
            s.method,
            s.service,
            s.kind,
            s.started.load(Ordering::Relaxed)
        );
    }
    out.head(
        "grpc_server_handled_total",
        "counter",
        "Total number of RPCs completed on the server, regardless of success or failure.",
    );
    for s in &methods {
        for (code, n) in s.handled.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 || code == 0 {
                let _ = writeln!(
                    out.0,
                    "grpc_server_handled_total{{grpc_code=\"{}\",grpc_method=\"{}\",grpc_service=\"{}\",grpc_type=\"{}\"}} {n}",
                    CODES[code], s.method, s.service, s.kind
                );
            }
        }
    }
    out.head(
        "grpc_server_handling_seconds",
        "histogram",
        "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    );
    for s in &methods {
        let labels = format!(
            "grpc_method=\"{}\",grpc_service=\"{}\",grpc_type=\"{}\"",
            s.method, s.service, s.kind
        );
        out.histogram_series(
            "grpc_server_handling_seconds",
            &labels,
            &s.seconds.snapshot(),
        );
    }
}

async fn engine_series(out: &mut Out, src: &Sources) {
    let engine = &src.engine;
    let stats = engine.stats();
    let em = engine.metrics();
    out.gauge(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not (pgetcd: 0 once fenced by another instance).",
        if engine.writer_failed() { 0.0 } else { 1.0 },
    );
    out.gauge(
        "etcd_server_is_leader",
        "Whether or not this member is a leader (pgetcd: writes its keyspace).",
        if engine.writer_failed() { 0.0 } else { 1.0 },
    );
    out.head(
        "etcd_server_version",
        "gauge",
        "Which version is running. 1 for 'server_version' label with current version.",
    );
    let _ = writeln!(
        out.0,
        "etcd_server_version{{server_version=\"{}\"}} 1",
        crate::services::ETCD_VERSION
    );
    out.gauge(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes (0: no quota).",
        engine.quota_backend_bytes() as f64,
    );
    match engine.db_size().await {
        Ok(db) => {
            out.gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes (pgetcd: the keyspace's tables and indexes in Postgres).",
                db as f64,
            );
            out.gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes (pgetcd: same as the total).",
                db as f64,
            );
        }
        Err(e) => tracing::debug!(error = %e, "db size for metrics"),
    }
    out.gauge(
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys.",
        engine.live_keys() as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        stats.revision as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store.",
        stats.compact_revision as f64,
    );
    out.counter(
        "etcd_mvcc_range_total",
        "Total number of ranges seen by this member.",
        &em.ranges,
    );
    out.counter(
        "etcd_mvcc_put_total",
        "Total number of puts seen by this member.",
        &em.puts,
    );
    out.counter(
        "etcd_mvcc_delete_total",
        "Total number of deletes seen by this member.",
        &em.deletes,
    );
    out.counter(
        "etcd_mvcc_txn_total",
        "Total number of txns seen by this member.",
        &em.txns,
    );
    out.gauge(
        "pgetcd_index_keys",
        "Keys in the in-memory index (live or with retained history).",
        stats.index_keys as f64,
    );
    out.gauge(
        "pgetcd_value_cache_bytes",
        "Bytes of values held by the value cache.",
        stats.cached_bytes as f64,
    );
    out.counter(
        "pgetcd_value_cache_hits_total",
        "Values served from memory by reads that returned values.",
        &em.cache_hits,
    );
    out.counter(
        "pgetcd_value_cache_misses_total",
        "Values read from Postgres because the cache did not hold them.",
        &em.cache_misses,
    );
    out.histogram(
        "pgetcd_commit_batch_size",
        "Write requests committed together in one Postgres transaction.",
        &em.batch_size,
    );
    out.histogram(
        "pgetcd_commit_duration_seconds",
        "Time of one group commit (one Postgres round trip).",
        &em.commit_seconds,
    );
    out.counter(
        "pgetcd_commit_failures_total",
        "Batches that did not commit (their clients got an error).",
        &em.commit_failures,
    );
    out.histogram(
        "pgetcd_watch_publish_delay_seconds",
        "Time from a batch's commit to its events on the watch bus.",
        &em.publish_delay_seconds,
    );
    out.counter(
        "pgetcd_compactions_total",
        "Compactions done.",
        &em.compactions,
    );
    out.histogram(
        "pgetcd_compaction_duration_seconds",
        "Time of one compaction, from the index prune to the end of its Postgres work.",
        &em.compaction_seconds,
    );
    out.gauge(
        "pgetcd_compactions_pending",
        "Compactions recorded whose Postgres work (copy, delete, partition drops) has not finished.",
        em.compactions_pending.load(Ordering::Relaxed) as f64,
    );
    out.counter(
        "pgetcd_compaction_retries_total",
        "Failed attempts at a compaction's Postgres work (each is retried).",
        &em.compaction_retries,
    );
    let pool = engine.pool_status();
    let (size, idle, max, waiting) = (pool.open, pool.idle, pool.max, pool.waiting);
    out.gauge(
        "pgetcd_postgres_read_pool_connections",
        "Connections open in the read pool.",
        size as f64,
    );
    out.gauge(
        "pgetcd_postgres_read_pool_idle",
        "Idle connections in the read pool.",
        idle as f64,
    );
    out.gauge(
        "pgetcd_postgres_read_pool_max",
        "Most connections the read pool opens (--read-pool-size).",
        max as f64,
    );
    out.gauge(
        "pgetcd_postgres_read_pool_waiting",
        "Reads waiting for a pool connection.",
        waiting as f64,
    );
    let leases = engine.lease_leases().leases.len();
    out.gauge(
        "pgetcd_leases",
        "Leases granted and not yet revoked or expired.",
        leases as f64,
    );
    let lag = engine
        .feed_retained_bytes()
        .await
        .map_err(|e| e.to_string());
    match lag {
        Ok(Some(lag)) => out.gauge(
            "pgetcd_replication_lag_bytes",
            "WAL bytes written by Postgres that the watch feed has not confirmed (its replication slot's lag).",
            lag as f64,
        ),
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "slot lag for metrics"),
    }
}

fn watch_series(out: &mut Out, hub: &Hub) {
    let s = hub.stats();
    let watchers = s.watchers.load(Ordering::Relaxed);
    let synced = s.synced_watchers.load(Ordering::Relaxed);
    out.gauge(
        "etcd_debugging_mvcc_watch_stream_total",
        "Total number of watch streams.",
        s.streams.load(Ordering::Relaxed) as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_watcher_total",
        "Total number of watchers.",
        watchers as f64,
    );
    out.gauge(
        "etcd_debugging_mvcc_slow_watcher_total",
        "Total number of unsynced slow watchers (pgetcd: watchers catching up from history).",
        (watchers - synced).max(0) as f64,
    );
    out.counter(
        "pgetcd_watch_slow_events_total",
        "Times a watcher fell behind (its stream queue was full or the dispatcher lagged) and went to catch up from history.",
        &s.slow_total,
    );
    out.counter(
        "pgetcd_watch_events_total",
        "Events handed to watch streams by the bus.",
        &s.events_total,
    );
    out.gauge(
        "pgetcd_watch_dispatched_revision",
        "Last revision whose events the watch bus dispatched.",
        hub.dispatched() as f64,
    );
}

/// Linux's fixed unit of /proc CPU times.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn process_series(out: &mut Out) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may contain spaces) start at state (3).
    let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
        return;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> f64 { f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let cpu = (field(14) + field(15)) / CLOCK_TICKS_PER_SECOND;
    out.one(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu,
    );
    let vsize = field(23);
    let rss_pages = field(24);
    out.gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        rss_pages * 4096.0,
    );
    out.gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        vsize,
    );
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ").map(|v| v.trim().parse::<f64>()))
        })
        .and_then(|r| r.ok());
    if let Some(boot) = boot {
        out.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            boot + field(22) / CLOCK_TICKS_PER_SECOND,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Max open files")
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
        });
    if let Some(max) = max_fds {
        out.gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_table_is_bounded_and_typed() {
        let m = Metrics::default();
        assert_eq!(m.method("/etcdserverpb.Watch/Watch").kind, "bidi_stream");
        assert_eq!(m.method("/etcdserverpb.KV/Range").kind, "unary");
        for i in 0..(MAX_METHODS * 2) {
            m.method(&format!("/x.Y/M{i}"));
        }
        assert!(m.methods.read().len() <= MAX_METHODS + 1);
        assert!(m.methods.read().contains_key("/unknown/unknown"));
    }

    #[test]
    fn process_series_render() {
        let mut out = Out(String::new());
        process_series(&mut out);
        assert!(out.0.contains("process_cpu_seconds_total "));
        assert!(out.0.contains("process_resident_memory_bytes "));
        assert!(out.0.contains("process_open_fds "));
    }
}
