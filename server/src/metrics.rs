//! `/metrics`: Prometheus text exposition of the server's, engine's, watch bus's and
//! process's figures, under etcd's names where the meaning matches (see
//! docs/operations.md for the list; a test holds the two equal).
//!
//! A scrape ([`render`]) fills a fresh `prometheus::Registry`: the long-lived metrics
//! (the gRPC counters and histograms below, the engine's histograms, the process
//! collector) are registered as they are, and every other figure is read at that
//! instant (engine, watch bus, read pool, connection counters) into a counter or gauge
//! made for the scrape. The crate's `TextEncoder` writes the result (text format
//! 0.0.4: families sorted by name, label values escaped). A figure that cannot be read
//! (the database size while Postgres does not answer) is left out of that scrape rather
//! than shown stale, and concurrent scrapes share nothing but the long-lived metrics.
//!
//! gRPC calls are counted by a tower layer in front of every client connection, like
//! go-grpc-prometheus does for etcd: `grpc_server_started_total` when a call arrives,
//! `grpc_server_handled_total` with the final `grpc-status` (read from the trailers, or
//! from the headers of a trailers-only answer; a call dropped before it finished counts
//! as `Canceled`), and `grpc_server_handling_seconds`. Only the methods of the services
//! we serve ([`GRPC_METHODS`], fixed at compile time) are labelled by name; any other
//! path is counted as `grpc_service="unknown",grpc_method="unknown"`, so clients cannot
//! add series. Every method's started counter, `OK` counter and histogram exist from
//! start-up at zero (as go-grpc-prometheus pre-registers them for etcd); a counter for
//! another code appears with its first call.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pgetcd_engine::Engine;
use pgetcd_engine::metrics::{EngineMetrics, SECONDS_BOUNDS};
use pgetcd_watchbus::Hub;
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

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
const OK: usize = 0;
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// One gRPC method, labelled as go-grpc-prometheus labels it.
#[derive(Debug, PartialEq, Eq)]
struct GrpcMethod {
    service: &'static str,
    method: &'static str,
    /// `grpc_type`: `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    kind: &'static str,
}

const UNARY: &str = "unary";
const SERVER_STREAM: &str = "server_stream";
const BIDI_STREAM: &str = "bidi_stream";

const fn method(service: &'static str, method: &'static str, kind: &'static str) -> GrpcMethod {
    GrpcMethod {
        service,
        method,
        kind,
    }
}

/// Every RPC of the services we serve, sorted by (service, method): etcd's from
/// proto/proto/rpc.proto (a test checks them against it) and `grpc.health.v1.Health`'s
/// (tonic-health's health.proto).
const GRPC_METHODS: &[GrpcMethod] = &[
    method("etcdserverpb.Auth", "AuthDisable", UNARY),
    method("etcdserverpb.Auth", "AuthEnable", UNARY),
    method("etcdserverpb.Auth", "AuthStatus", UNARY),
    method("etcdserverpb.Auth", "Authenticate", UNARY),
    method("etcdserverpb.Auth", "RoleAdd", UNARY),
    method("etcdserverpb.Auth", "RoleDelete", UNARY),
    method("etcdserverpb.Auth", "RoleGet", UNARY),
    method("etcdserverpb.Auth", "RoleGrantPermission", UNARY),
    method("etcdserverpb.Auth", "RoleList", UNARY),
    method("etcdserverpb.Auth", "RoleRevokePermission", UNARY),
    method("etcdserverpb.Auth", "UserAdd", UNARY),
    method("etcdserverpb.Auth", "UserChangePassword", UNARY),
    method("etcdserverpb.Auth", "UserDelete", UNARY),
    method("etcdserverpb.Auth", "UserGet", UNARY),
    method("etcdserverpb.Auth", "UserGrantRole", UNARY),
    method("etcdserverpb.Auth", "UserList", UNARY),
    method("etcdserverpb.Auth", "UserRevokeRole", UNARY),
    method("etcdserverpb.Cluster", "MemberAdd", UNARY),
    method("etcdserverpb.Cluster", "MemberList", UNARY),
    method("etcdserverpb.Cluster", "MemberPromote", UNARY),
    method("etcdserverpb.Cluster", "MemberRemove", UNARY),
    method("etcdserverpb.Cluster", "MemberUpdate", UNARY),
    method("etcdserverpb.KV", "Compact", UNARY),
    method("etcdserverpb.KV", "DeleteRange", UNARY),
    method("etcdserverpb.KV", "Put", UNARY),
    method("etcdserverpb.KV", "Range", UNARY),
    method("etcdserverpb.KV", "Txn", UNARY),
    method("etcdserverpb.Lease", "LeaseGrant", UNARY),
    method("etcdserverpb.Lease", "LeaseKeepAlive", BIDI_STREAM),
    method("etcdserverpb.Lease", "LeaseLeases", UNARY),
    method("etcdserverpb.Lease", "LeaseRevoke", UNARY),
    method("etcdserverpb.Lease", "LeaseTimeToLive", UNARY),
    method("etcdserverpb.Maintenance", "Alarm", UNARY),
    method("etcdserverpb.Maintenance", "Defragment", UNARY),
    method("etcdserverpb.Maintenance", "Downgrade", UNARY),
    method("etcdserverpb.Maintenance", "Hash", UNARY),
    method("etcdserverpb.Maintenance", "HashKV", UNARY),
    method("etcdserverpb.Maintenance", "MoveLeader", UNARY),
    method("etcdserverpb.Maintenance", "Snapshot", SERVER_STREAM),
    method("etcdserverpb.Maintenance", "Status", UNARY),
    method("etcdserverpb.Watch", "Watch", BIDI_STREAM),
    method("grpc.health.v1.Health", "Check", UNARY),
    method("grpc.health.v1.Health", "Watch", SERVER_STREAM),
];

/// Where every other path is counted.
static UNKNOWN_METHOD: GrpcMethod = method("unknown", "unknown", UNARY);

/// The index in [`GRPC_METHODS`] of the method a request path (`/service/method`)
/// names, if we serve it.
fn known_method(path: &str) -> Option<usize> {
    let (service, name) = path.strip_prefix('/')?.split_once('/')?;
    GRPC_METHODS
        .binary_search_by(|m| (m.service, m.method).cmp(&(service, name)))
        .ok()
}

/// The series of one method (a known one or `unknown`).
struct MethodSeries {
    labels: &'static GrpcMethod,
    started: IntCounter,
    seconds: Histogram,
    handled_vec: IntCounterVec,
    /// `grpc_server_handled_total` by code, made on first use.
    handled: [OnceLock<IntCounter>; CODES.len()],
}

impl MethodSeries {
    fn new(labels: &'static GrpcMethod, families: &GrpcFamilies) -> Self {
        let m = labels;
        let series = Self {
            labels,
            started: families
                .started
                .with_label_values(&[m.method, m.service, m.kind]),
            seconds: families
                .seconds
                .with_label_values(&[m.method, m.service, m.kind]),
            handled_vec: families.handled.clone(),
            handled: Default::default(),
        };
        series.handled(OK);
        series
    }

    /// Its counter for `code` (a code outside gRPC's list counts as `Unknown`).
    fn handled(&self, code: usize) -> &IntCounter {
        let code = if code < CODES.len() { code } else { UNKNOWN };
        self.handled[code].get_or_init(|| {
            let m = self.labels;
            self.handled_vec
                .with_label_values(&[CODES[code], m.method, m.service, m.kind])
        })
    }

    fn finish(&self, code: usize, started: Instant) {
        self.handled(code).inc();
        self.seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// The three gRPC families.
#[derive(Clone)]
struct GrpcFamilies {
    started: IntCounterVec,
    handled: IntCounterVec,
    seconds: HistogramVec,
}

impl GrpcFamilies {
    fn new() -> prometheus::Result<Self> {
        let labels = ["grpc_method", "grpc_service", "grpc_type"];
        Ok(Self {
            started: IntCounterVec::new(
                Opts::new(
                    "grpc_server_started_total",
                    "Total number of RPCs started on the server.",
                ),
                &labels,
            )?,
            handled: IntCounterVec::new(
                Opts::new(
                    "grpc_server_handled_total",
                    "Total number of RPCs completed on the server, regardless of success or failure.",
                ),
                &["grpc_code", "grpc_method", "grpc_service", "grpc_type"],
            )?,
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "grpc_server_handling_seconds",
                    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
                )
                .buckets(SECONDS_BOUNDS.to_vec()),
                &labels,
            )?,
        })
    }
}

/// The gRPC families and the series of every method.
struct GrpcSeries {
    families: GrpcFamilies,
    /// One per [`GRPC_METHODS`] entry, then `unknown`.
    methods: Vec<Arc<MethodSeries>>,
}

impl GrpcSeries {
    fn new() -> Self {
        let families = GrpcFamilies::new().expect("valid metric and label names");
        let methods = GRPC_METHODS
            .iter()
            .chain([&UNKNOWN_METHOD])
            .map(|m| Arc::new(MethodSeries::new(m, &families)))
            .collect();
        Self { families, methods }
    }

    /// The series a request path is counted under.
    fn method(&self, path: &str) -> &Arc<MethodSeries> {
        let i = known_method(path).unwrap_or(GRPC_METHODS.len());
        &self.methods[i]
    }
}

/// The server's own figures (one per running server).
pub struct Metrics {
    grpc: GrpcSeries,
    /// Client connections accepted (TCP, before TLS).
    pub connections_accepted: AtomicU64,
    /// Client connections open.
    pub connections_open: AtomicI64,
    /// TLS handshakes that failed (no or bad client certificate, protocol errors).
    pub tls_handshake_failures: AtomicU64,
    /// Bytes read from and written to client connections (after TLS).
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// TLS handshakes whose client named no server (or an IP address, which TLS does
    /// not allow there and which is ignored).
    pub tls_without_server_name: AtomicU64,
    /// Reloads of the client TLS files that took effect.
    pub tls_reloads: AtomicU64,
    /// Reloads refused (bad files): the certificate in force was kept.
    pub tls_reload_failures: AtomicU64,
    #[cfg(target_os = "linux")]
    process: Arc<prometheus::process_collector::ProcessCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            grpc: GrpcSeries::new(),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            tls_without_server_name: AtomicU64::new(0),
            tls_reloads: AtomicU64::new(0),
            tls_reload_failures: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            #[cfg(target_os = "linux")]
            process: Arc::new(prometheus::process_collector::ProcessCollector::for_self()),
        }
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
            let series = self.metrics.grpc.method(req.uri().path()).clone();
            series.started.inc();
            Call {
                series,
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
    series: Arc<MethodSeries>,
    started: Instant,
    code: Option<usize>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.series
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

/// What `/metrics` reads.
#[derive(Clone)]
pub struct Sources {
    /// The engine.
    pub node: crate::node::Node,
    /// The watch bus.
    pub hub: Hub,
    /// The server's own figures.
    pub metrics: Arc<Metrics>,
    /// The keyspace (its replication slot's lag is reported; every series but the
    /// process's is labelled `keyspace` with it).
    pub keyspace: String,
    /// The other keyspaces of this process, rendered with it on its metrics listeners.
    pub others: Vec<Sources>,
}

/// Renders every series of `src` and of the keyspaces it lists, each labelled with its
/// keyspace, families merged by name (the process's figures once, unlabelled).
pub async fn render(src: &Sources) -> String {
    let mut families: std::collections::BTreeMap<String, prometheus::proto::MetricFamily> =
        std::collections::BTreeMap::new();
    for (i, one) in std::iter::once(src).chain(src.others.iter()).enumerate() {
        for mut family in scrape(one, i == 0).await.0.gather() {
            if !family.name().starts_with("process_") {
                for m in family.mut_metric() {
                    let mut labels = m.take_label();
                    let mut pair = prometheus::proto::LabelPair::default();
                    pair.set_name("keyspace".to_owned());
                    pair.set_value(one.keyspace.clone());
                    labels.push(pair);
                    labels.sort_by(|a, b| a.name().cmp(b.name()));
                    m.set_label(labels);
                }
            }
            match families.entry(family.name().to_owned()) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(family);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    o.get_mut().mut_metric().extend(family.take_metric());
                }
            }
        }
    }
    encode(&families.into_values().collect::<Vec<_>>())
}

/// The text exposition of `families`.
fn encode(families: &[prometheus::proto::MetricFamily]) -> String {
    let mut out = String::with_capacity(64 * 1024);
    if let Err(e) = TextEncoder::new().encode_utf8(families, &mut out) {
        tracing::warn!(error = %e, "encoding /metrics");
    }
    out
}

/// One keyspace's series (and the process's, with `process`).
async fn scrape(src: &Sources, process: bool) -> Scrape {
    let s = Scrape::default();
    grpc_series(&s, &src.metrics.grpc);
    connection_series(&s, &src.metrics);
    let engine = src.node.engine();
    server_series(&s, &engine);
    proposal_series(&s, &src.node, &engine);
    mvcc_series(&s, &engine).await;
    engine_series(&s, &engine);
    pool_series(&s, &engine);
    lag_series(&s, replication_lag(src).await);
    watch_series(&s, &src.hub);
    if process {
        process_series(&s, &src.metrics);
    }
    s
}

/// One scrape's registry.
#[derive(Default)]
struct Scrape(Registry);

impl Scrape {
    /// Registers a collector. Only a programming error (an invalid or duplicated name)
    /// fails; that series is then missing, which the tests of the full list catch.
    fn add<C: Collector + 'static>(&self, made: prometheus::Result<C>) {
        if let Err(e) = made.and_then(|c| self.0.register(Box::new(c))) {
            tracing::warn!(error = %e, "metric left out of /metrics");
        }
    }

    fn counter(&self, name: &str, help: &str, v: u64) {
        self.add(IntCounter::new(name, help).inspect(|c| c.inc_by(v)));
    }

    fn gauge(&self, name: &str, help: &str, v: f64) {
        self.add(Gauge::new(name, help).inspect(|g| g.set(v)));
    }

    /// A gauge with one series, labelled `label="value"`.
    #[cfg(test)]
    fn encode(&self) -> String {
        encode(&self.0.gather())
    }

    fn labelled_gauge(&self, name: &str, help: &str, (label, value): (&str, &str), v: f64) {
        self.add(
            GaugeVec::new(Opts::new(name, help), &[label])
                .inspect(|g| g.with_label_values(&[value]).set(v)),
        );
    }
}

fn grpc_series(s: &Scrape, grpc: &GrpcSeries) {
    let f = &grpc.families;
    s.add(Ok(f.started.clone()));
    s.add(Ok(f.handled.clone()));
    s.add(Ok(f.seconds.clone()));
}

fn connection_series(s: &Scrape, m: &Metrics) {
    s.counter(
        "pgetcd_client_connections_accepted_total",
        "Client connections accepted.",
        m.connections_accepted.load(Ordering::Relaxed),
    );
    s.gauge(
        "pgetcd_client_connections_open",
        "Client connections open.",
        m.connections_open.load(Ordering::Relaxed) as f64,
    );
    s.counter(
        "pgetcd_tls_handshake_failures_total",
        "Client TLS handshakes that failed (including missing or untrusted client certificates).",
        m.tls_handshake_failures.load(Ordering::Relaxed),
    );
    s.counter(
        "etcd_network_client_grpc_received_bytes_total",
        "The total number of bytes received from grpc clients (pgetcd: every byte read from client connections, after TLS: HTTP/2 frames, the JSON gateway).",
        m.bytes_received.load(Ordering::Relaxed),
    );
    s.counter(
        "etcd_network_client_grpc_sent_bytes_total",
        "The total number of bytes sent to grpc clients (pgetcd: every byte written to client connections, before TLS).",
        m.bytes_sent.load(Ordering::Relaxed),
    );
    s.counter(
        "pgetcd_tls_handshakes_without_server_name_total",
        "Client TLS handshakes without a server name (SNI), or with an IP address there (ignored, as TLS does not allow it; Node.js's gRPC sends one).",
        m.tls_without_server_name.load(Ordering::Relaxed),
    );
    s.counter(
        "pgetcd_tls_reloads_total",
        "Reloads of the client TLS files (certificate, key, trusted CA, CRL) that took effect.",
        m.tls_reloads.load(Ordering::Relaxed),
    );
    s.counter(
        "pgetcd_tls_reload_failures_total",
        "Changed client TLS files that could not be used; the certificate in force was kept.",
        m.tls_reload_failures.load(Ordering::Relaxed),
    );
}

/// etcd's server figures: leadership (pgetcd leads its keyspace until fenced),
/// version, quota.
fn server_series(s: &Scrape, engine: &Engine) {
    let leader = if engine.writer_failed() { 0.0 } else { 1.0 };
    let is_leader = if engine.is_follower() { 0.0 } else { leader };
    s.gauge(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not (pgetcd: 0 once fenced by another instance).",
        leader,
    );
    s.gauge(
        "etcd_server_is_leader",
        "Whether or not this member is a leader (pgetcd: writes its keyspace).",
        is_leader,
    );
    s.labelled_gauge(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version.",
        ("server_version", crate::services::ETCD_VERSION),
        1.0,
    );
    s.gauge(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes (0: no quota).",
        engine.quota_backend_bytes() as f64,
    );
}

/// etcd's raft and disk figures, in pgetcd's terms: a write request is a proposal,
/// committed (and applied) once its batch's Postgres transaction commits; that commit is
/// the WAL fsync and the backend commit; leader changes are the writer role changing
/// hands.
fn proposal_series(s: &Scrape, node: &crate::node::Node, engine: &Engine) {
    let em = engine.metrics();
    s.counter(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen (pgetcd: writers of the keyspace this instance saw, the first included).",
        node.leader_changes(),
    );
    let committed = em.batch_size.get_sample_sum();
    s.gauge(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed (pgetcd: write requests committed to Postgres by this instance).",
        committed,
    );
    s.gauge(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied (pgetcd: as committed; a commit applies).",
        committed,
    );
    s.gauge(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit (pgetcd: write requests waiting for the writer).",
        engine.pending_writes() as f64,
    );
    s.counter(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen (pgetcd: write requests whose batch did not commit).",
        EngineMetrics::get(&em.failed_requests),
    );
    s.counter(
        "etcd_server_slow_apply_total",
        "The total number of slow apply requests (pgetcd: batches whose Postgres commit took over 100 ms).",
        EngineMetrics::get(&em.slow_commits),
    );
    for (name, help) in [
        (
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL (pgetcd: the batch's Postgres commit, which makes it durable).",
        ),
        (
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend (pgetcd: the batch's Postgres commit).",
        ),
    ] {
        s.add(Ok(Renamed::of(&em.commit_seconds, name, help)));
    }
}

/// A collector's families under another name and help (one histogram, several names).
struct Renamed {
    desc: prometheus::core::Desc,
    families: Vec<prometheus::proto::MetricFamily>,
}

impl Renamed {
    fn of(c: &impl Collector, name: &str, help: &str) -> Renamed {
        let families = c
            .collect()
            .into_iter()
            .map(|mut f| {
                f.set_name(name.to_owned());
                f.set_help(help.to_owned());
                f
            })
            .collect();
        let desc = prometheus::core::Desc::new(
            name.to_owned(),
            help.to_owned(),
            Vec::new(),
            Default::default(),
        )
        .expect("a valid metric name");
        Renamed { desc, families }
    }
}

impl Collector for Renamed {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.families.clone()
    }
}

/// etcd's MVCC figures: database size, keys, revisions, operations.
async fn mvcc_series(s: &Scrape, engine: &Engine) {
    match engine.db_size().await {
        Ok(db) => {
            s.gauge(
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes (pgetcd: the keyspace's tables and indexes in Postgres).",
                db as f64,
            );
            s.gauge(
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes (pgetcd: same as the total).",
                db as f64,
            );
        }
        Err(e) => tracing::debug!(error = %e, "db size for metrics"),
    }
    let stats = engine.stats();
    s.gauge(
        "etcd_debugging_mvcc_keys_total",
        "Total number of keys.",
        engine.live_keys() as f64,
    );
    s.gauge(
        "etcd_debugging_mvcc_current_revision",
        "The current revision of store.",
        stats.revision as f64,
    );
    s.gauge(
        "etcd_debugging_mvcc_compact_revision",
        "The revision of the last compaction in store.",
        stats.compact_revision as f64,
    );
    let em = engine.metrics();
    for (name, what, counter) in [
        ("etcd_mvcc_range_total", "ranges", &em.ranges),
        ("etcd_mvcc_put_total", "puts", &em.puts),
        ("etcd_mvcc_delete_total", "deletes", &em.deletes),
        ("etcd_mvcc_txn_total", "txns", &em.txns),
    ] {
        let help = format!("Total number of {what} seen by this member.");
        s.counter(name, &help, EngineMetrics::get(counter));
    }
}

/// pgetcd's engine figures: index, value cache, group commit, compaction, leases.
fn engine_series(s: &Scrape, engine: &Engine) {
    let stats = engine.stats();
    let em = engine.metrics();
    s.gauge(
        "pgetcd_index_keys",
        "Keys in the in-memory index (live or with retained history).",
        stats.index_keys as f64,
    );
    s.gauge(
        "pgetcd_value_cache_bytes",
        "Bytes of values held by the value cache.",
        stats.cached_bytes as f64,
    );
    for (name, help, counter) in [
        (
            "pgetcd_value_cache_hits_total",
            "Values served from memory by reads that returned values.",
            &em.cache_hits,
        ),
        (
            "pgetcd_value_cache_misses_total",
            "Values read from Postgres because the cache did not hold them.",
            &em.cache_misses,
        ),
        (
            "pgetcd_commit_failures_total",
            "Batches that did not commit (their clients got an error).",
            &em.commit_failures,
        ),
        (
            "pgetcd_compactions_total",
            "Compactions done.",
            &em.compactions,
        ),
        (
            "pgetcd_compaction_retries_total",
            "Failed attempts at a compaction's Postgres work (each is retried).",
            &em.compaction_retries,
        ),
    ] {
        s.counter(name, help, EngineMetrics::get(counter));
    }
    s.counter(
        "pgetcd_watch_handoff_skipped_total",
        "Committed batches the writer did not hand to the watch feed because its queue was full (the feed fills such gaps from the index).",
        engine.handoff_skipped(),
    );
    s.gauge(
        "pgetcd_compactions_pending",
        "Compactions recorded whose Postgres work (copy, delete, partition drops) has not finished.",
        EngineMetrics::get(&em.compactions_pending) as f64,
    );
    for h in em.histograms() {
        s.add(Ok(h.clone()));
    }
    s.gauge(
        "pgetcd_leases",
        "Leases granted and not yet revoked or expired.",
        engine.lease_leases().leases.len() as f64,
    );
}

/// The engine's Postgres read pool.
fn pool_series(s: &Scrape, engine: &Engine) {
    let pool = engine.pool_status();
    let (size, idle, max, waiting) = (pool.open, pool.idle, pool.max, pool.waiting);
    for (name, help, v) in [
        (
            "pgetcd_postgres_read_pool_connections",
            "Connections open in the read pool.",
            size,
        ),
        (
            "pgetcd_postgres_read_pool_idle",
            "Idle connections in the read pool.",
            idle,
        ),
        (
            "pgetcd_postgres_read_pool_max",
            "Most connections the read pool opens (--read-pool-size).",
            max,
        ),
        (
            "pgetcd_postgres_read_pool_waiting",
            "Reads waiting for a pool connection.",
            waiting,
        ),
    ] {
        s.gauge(name, help, v as f64);
    }
}

/// Bytes the store keeps for the change feed's unconfirmed part (Postgres: WAL the
/// keyspace's replication slot retains), when known.
async fn replication_lag(src: &Sources) -> Option<i64> {
    let lag = src
        .node
        .engine()
        .feed_retained_bytes()
        .await
        .map_err(|e| e.to_string());
    lag.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "slot lag for metrics");
        None
    })
}

fn lag_series(s: &Scrape, lag: Option<i64>) {
    if let Some(lag) = lag {
        s.gauge(
            "pgetcd_replication_lag_bytes",
            "WAL bytes written by Postgres that the watch feed has not confirmed (its replication slot's lag).",
            lag as f64,
        );
    }
}

/// The watch bus: streams, watchers, events.
fn watch_series(s: &Scrape, hub: &Hub) {
    let st = hub.stats();
    let watchers = st.watchers.load(Ordering::Relaxed);
    let synced = st.synced_watchers.load(Ordering::Relaxed);
    s.gauge(
        "etcd_debugging_mvcc_watch_stream_total",
        "Total number of watch streams.",
        st.streams.load(Ordering::Relaxed) as f64,
    );
    s.gauge(
        "etcd_debugging_mvcc_watcher_total",
        "Total number of watchers.",
        watchers as f64,
    );
    s.gauge(
        "etcd_debugging_mvcc_slow_watcher_total",
        "Total number of unsynced slow watchers (pgetcd: watchers catching up from history).",
        (watchers - synced).max(0) as f64,
    );
    s.counter(
        "pgetcd_watch_slow_events_total",
        "Times a watcher fell behind (its stream queue was full or the dispatcher lagged) and went to catch up from history.",
        st.slow_total.load(Ordering::Relaxed),
    );
    s.counter(
        "pgetcd_watch_events_total",
        "Events handed to watch streams by the bus.",
        st.events_total.load(Ordering::Relaxed),
    );
    s.gauge(
        "pgetcd_watch_dispatched_revision",
        "Last revision whose events the watch bus dispatched.",
        hub.dispatched() as f64,
    );
}

/// The process: the crate's collector for memory, file descriptors and start time, and
/// CPU time at the kernel's tick resolution.
#[cfg(target_os = "linux")]
fn process_series(s: &Scrape, m: &Metrics) {
    s.add(Ok(process::Figures(m.process.clone())));
    if let Some(cpu) = process::cpu_seconds() {
        s.add(
            prometheus::Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )
            .inspect(|c| c.inc_by(cpu)),
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn process_series(_: &Scrape, _: &Metrics) {}

#[cfg(target_os = "linux")]
mod process {
    use std::sync::Arc;

    use prometheus::core::{Collector, Desc};
    use prometheus::process_collector::ProcessCollector;
    use prometheus::proto::MetricFamily;

    /// Families of the crate's collector we do not take: its CPU counter counts whole
    /// seconds (ours counts ticks), and `process_threads` is not in our list.
    const LEFT_OUT: [&str; 2] = ["process_cpu_seconds_total", "process_threads"];

    /// The crate's process collector less [`LEFT_OUT`].
    pub(super) struct Figures(pub(super) Arc<ProcessCollector>);

    impl Collector for Figures {
        fn desc(&self) -> Vec<&Desc> {
            let mut descs = self.0.desc();
            descs.retain(|d| !LEFT_OUT.contains(&d.fq_name.as_str()));
            descs
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut families = self.0.collect();
            families.retain(|f| !LEFT_OUT.contains(&f.name()));
            families
        }
    }

    /// User plus system CPU time of this process, in seconds.
    pub(super) fn cpu_seconds() -> Option<f64> {
        let stat = procfs::process::Process::myself()
            .and_then(|p| p.stat())
            .ok()?;
        Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::collections::BTreeSet;

    /// The series (name and labels, without the value) of a text exposition.
    fn series(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.rsplit_once(' ').expect("name and value").0.to_owned())
            .collect()
    }

    fn grpc_text(m: &Metrics) -> String {
        let s = Scrape::default();
        grpc_series(&s, &m.grpc);
        s.encode()
    }

    #[test]
    fn method_table_is_sorted_and_matches_rpc_proto() {
        assert!(
            GRPC_METHODS
                .windows(2)
                .all(|w| (w[0].service, w[0].method) < (w[1].service, w[1].method)),
            "GRPC_METHODS must be sorted for the binary search"
        );
        let mut from_proto = Vec::new();
        let mut service = "";
        for line in include_str!("../../proto/proto/rpc.proto").lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches(" {").trim();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let (name, rest) = rest.split_once('(').unwrap();
                let (request, response) = rest.split_once("returns").unwrap();
                let kind = match (
                    request.trim_start().starts_with("stream "),
                    response.trim().starts_with("(stream "),
                ) {
                    (false, false) => UNARY,
                    (true, false) => "client_stream",
                    (false, true) => SERVER_STREAM,
                    (true, true) => BIDI_STREAM,
                };
                from_proto.push((format!("etcdserverpb.{service}"), name.to_owned(), kind));
            }
        }
        from_proto.push(("grpc.health.v1.Health".into(), "Check".into(), UNARY));
        from_proto.push((
            "grpc.health.v1.Health".into(),
            "Watch".into(),
            SERVER_STREAM,
        ));
        from_proto.sort();
        let table: Vec<(String, String, &str)> = GRPC_METHODS
            .iter()
            .map(|m| (m.service.to_owned(), m.method.to_owned(), m.kind))
            .collect();
        assert_eq!(table, from_proto);
        for service in ["KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"] {
            assert!(
                table
                    .iter()
                    .any(|t| t.0 == format!("etcdserverpb.{service}")),
                "{service}"
            );
        }
    }

    #[test]
    fn paths_map_to_their_method_or_unknown() {
        let m = Metrics::default();
        let labels = |p: &str| m.grpc.method(p).labels;
        assert_eq!(labels("/etcdserverpb.Watch/Watch").kind, BIDI_STREAM);
        assert_eq!(labels("/etcdserverpb.KV/Range").method, "Range");
        assert_eq!(labels("/grpc.health.v1.Health/Watch").kind, SERVER_STREAM);
        for p in [
            "/etcdserverpb.KV/Nope",
            "/x.KV/Range",
            "/etcdserverpb.KV",
            "etcdserverpb.KV/Range",
            "/",
            "",
            "/etcdserverpb.KV/Range/extra",
        ] {
            assert_eq!(labels(p), &UNKNOWN_METHOD, "{p}");
        }
    }

    #[test]
    fn random_method_names_add_no_series() {
        let m = Metrics::default();
        let before = series(&grpc_text(&m));
        // Every known method and `unknown`: started, handled OK, and the histogram.
        let per_method = 1 + 1 + (SECONDS_BOUNDS.len() + 1) + 2;
        assert_eq!(before.len(), (GRPC_METHODS.len() + 1) * per_method);
        let mut rng = rand::rng();
        for _ in 0..300 {
            let name: String = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(b'!'..=b'~') as char)
                .collect();
            let path = match rng.random_range(0..3) {
                0 => format!("/{name}"),
                1 => format!("/etcdserverpb.KV/{name}"),
                _ => format!("/{name}/Range"),
            };
            let series = m.grpc.method(&path).clone();
            series.started.inc();
            series.finish(12, Instant::now());
        }
        let after = series(&grpc_text(&m));
        let added: Vec<&String> = after.difference(&before).collect();
        assert_eq!(
            added,
            [
                "grpc_server_handled_total{grpc_code=\"Unimplemented\",grpc_method=\"unknown\",grpc_service=\"unknown\",grpc_type=\"unary\"}"
            ]
        );
        assert_eq!(m.grpc.methods[GRPC_METHODS.len()].started.get(), 300);
    }

    #[test]
    fn a_code_outside_grpcs_list_counts_as_unknown() {
        let m = Metrics::default();
        let put = m.grpc.method("/etcdserverpb.KV/Put");
        put.finish(99, Instant::now());
        assert_eq!(put.handled(UNKNOWN).get(), 1);
    }

    #[tokio::test]
    async fn the_layer_counts_calls_and_their_codes() {
        use tower::{Layer, Service, ServiceExt};
        let m = Arc::new(Metrics::default());
        let inner = tower::service_fn(|_req: Request<()>| async {
            let resp = Response::builder()
                .header("grpc-status", "12")
                .body(tonic::body::Body::empty())
                .unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        });
        let mut svc = GrpcMetricsLayer(m.clone()).layer(inner);
        for path in ["/etcdserverpb.KV/Put", "/no.Such/Method"] {
            let req = Request::builder()
                .uri(format!("http://x{path}"))
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let resp = svc.ready().await.unwrap().call(req).await.unwrap();
            let mut body = resp.into_body();
            while std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                .await
                .is_some()
            {}
        }
        let text = grpc_text(&m);
        for line in [
            "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"Unimplemented\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"Unimplemented\",grpc_method=\"unknown\",grpc_service=\"unknown\",grpc_type=\"unary\"} 1",
            "grpc_server_handling_seconds_count{grpc_method=\"unknown\",grpc_service=\"unknown\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let s = Scrape::default();
        s.labelled_gauge(
            "t_version",
            "help with \\ and\nnewline",
            ("v", "a\"b\\c\nd"),
            1.0,
        );
        assert_eq!(
            s.encode(),
            "# HELP t_version help with \\\\ and\\nnewline\n# TYPE t_version gauge\nt_version{v=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }

    #[test]
    fn a_bad_name_is_left_out_not_fatal() {
        let s = Scrape::default();
        s.gauge("bad name", "x", 1.0);
        s.gauge("good", "x", 1.0);
        s.gauge("good", "x", 2.0);
        assert_eq!(s.encode(), "# HELP good x\n# TYPE good gauge\ngood 1\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_series_render() {
        let m = Metrics::default();
        let s = Scrape::default();
        process_series(&s, &m);
        let text = s.encode();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "process_cpu_seconds_total counter",
                "process_max_fds gauge",
                "process_open_fds gauge",
                "process_resident_memory_bytes gauge",
                "process_start_time_seconds gauge",
                "process_virtual_memory_bytes gauge",
            ]
        );
        // Some CPU time shows even before a whole second is spent.
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 30 {
            std::hint::black_box(spin.elapsed());
        }
        assert!(process::cpu_seconds().unwrap() > 0.0);
    }
}
