//! pgetcd's server: the etcd v3 gRPC services over the engine, configuration, the
//! managed local Postgres, and the `pgetcd` binary (a thin `main.rs` over [`start`]).
//!
//! Start-up: parse and validate flags; start the managed Postgres unless
//! `--postgres-url` is given; refuse a keyspace below the revision this instance served
//! unless bumping it (`served`); open the engine (schema check, fencing, index load); bind
//! every client URL; serve until [`Running::stop`]. Shutdown stops accepting, lets
//! in-flight RPCs finish, then stops the managed Postgres.

/// Exclusive access to a keyspace for the offline commands (restore, migrate).
pub mod admin;
/// etcd's auth state and tokens (not yet served: see the module).
pub mod auth;
/// Mends an HTTP/2 `:authority` that is a whole URL (etcdctl 3.4).
mod authority;
/// etcd's periodic and revision auto-compaction schedules.
pub mod auto_compaction;
/// Command-line flags and their environment twins.
pub mod config;
/// Durations as etcd's flags spell them.
pub mod duration;
/// etcd's HTTP JSON gateway on the client URLs.
pub mod gateway;
mod grpc_errors;
mod http;
/// More keyspaces served by one process.
pub mod keyspaces;
mod managed;
/// `/metrics` and the gRPC call counters.
pub mod metrics;
/// `pgetcd migrate`: a running etcd copied and followed, revisions kept.
pub mod migrate;
/// This instance among the instances of its keyspace: the writer role, followers.
pub mod node;
/// `pgetcd keyspace copy-prefix`: keys moved between keyspaces, revisions raised.
pub mod prefix_copy;
/// Prefix routing: one listener over several keyspaces (--route-prefix).
pub mod routing;
/// The highest revision served, recorded under --data-dir; the start-up guard against
/// a keyspace restored to an older revision, and --bump-revision.
pub mod served;
/// The etcd gRPC services.
pub mod services;
/// The shutdown signal every task watches.
mod shutdown;
/// etcd snapshots: Maintenance.Snapshot and Hash, `pgetcd snapshot restore`.
pub mod snapshot;
/// Engine errors as etcd gRPC statuses.
pub mod status;
/// `--client-cert-allowed-hostname`: the client certificate verifier that checks names.
mod tls_names;
/// Client listeners: TLS, HTTP/2 and HTTP/1 on one port, graceful drain.
pub mod transport;
/// The watch feed (committed batches to the watch bus).
pub mod watch_feed;

use std::net::SocketAddr;

use pgetcd_engine::{Engine, EngineConfig};
use pgetcd_localpg::LocalPostgres;
use pgetcd_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use pgetcd_storage_postgres::PgStore;
use std::sync::Arc;
use thiserror::Error;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::Config;
use shutdown::stopped;
pub use transport::{ListenUrl, parse_listen_url};

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A flag is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Start-up failed.
    #[error("{0}")]
    Start(String),
    /// The engine failed to open.
    #[error(transparent)]
    Engine(#[from] pgetcd_engine::Error),
}

impl From<pgetcd_storage::StoreError> for ServerError {
    /// A storage failure of an offline command, with its causes.
    fn from(e: pgetcd_storage::StoreError) -> Self {
        ServerError::Start(e.with_causes())
    }
}

impl ServerError {
    /// What an offline command was doing when `e` stopped it.
    pub(crate) fn failed(what: &str, e: impl std::fmt::Display) -> ServerError {
        ServerError::Start(format!("{what}: {e}"))
    }
}

/// gRPC receive limit beyond --max-request-bytes, as etcd.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Binds a listen URL: the listener, the parsed URL and the address actually bound.
async fn bind(url: &str) -> Result<(TcpListener, ListenUrl, SocketAddr), ServerError> {
    let listen = parse_listen_url(url).map_err(ServerError::Config)?;
    let l = TcpListener::bind(listen.addr)
        .await
        .map_err(|e| ServerError::Start(format!("binding {url}: {e}")))?;
    let addr = l
        .local_addr()
        .map_err(|e| ServerError::Start(e.to_string()))?;
    Ok((l, listen, addr))
}

/// A running server.
pub struct Running {
    /// The bound client addresses, in --listen-client-urls order.
    pub client_addrs: Vec<SocketAddr>,
    /// The client URLs with the ports actually bound, in the same order.
    pub client_urls: Vec<String>,
    /// The bound HTTP (health, metrics) addresses.
    pub metrics_addrs: Vec<SocketAddr>,
    /// The engine it started with (tests inspect it).
    pub engine: Engine,
    /// The engine it serves with now, and its role among the keyspace's instances.
    pub node: node::Node,
    /// The other keyspaces this process serves (--serve-keyspace), each on its own.
    pub others: Vec<Running>,
    /// What its metrics read.
    sources: metrics::Sources,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    postgres: Option<LocalPostgres>,
    served: Arc<served::Recorder>,
}

impl Running {
    /// This keyspace as the target of another keyspace's routed listener (with the
    /// watch settings of `config`).
    fn routing_target(&self, config: &Config) -> routing::Target {
        routing::Target::new(
            &self.sources.keyspace,
            &self.node,
            &self.sources.hub,
            watch_settings(config),
            &self.shutdown.subscribe(),
        )
    }

    /// URL of the first client listener (`http://addr` or `https://addr`).
    pub fn client_url(&self) -> String {
        self.client_urls[0].clone()
    }

    /// Stops serving: no new connections; in-flight calls finish (writes are answered),
    /// watch and keepalive streams end, connections get GOAWAY; the other keyspaces
    /// stop the same way, at the same time; then the managed Postgres stops.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        futures::future::join_all(self.others.drain(..).map(Running::stop)).await;
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Every request was answered: what was served is final.
        self.served.note(&self.node).await;
        drop(self.engine);
        if let Some(mut pg) = self.postgres.take() {
            tokio::task::spawn_blocking(move || pg.stop()).await.ok();
        }
    }
}

/// Starts pgetcd with `config`: the managed Postgres unless --postgres-url is given,
/// then every keyspace of --serve-keyspace and the main one (each: the engine over its
/// store, the watch bus and feed, background tasks, its client listeners); the metrics
/// listeners serve every keyspace's figures.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    for (flag, value, why) in config.ignored.given() {
        tracing::warn!(flag, value, "ignored etcd flag: {why}");
    }
    let specs = config.served_keyspaces().map_err(ServerError::Config)?;
    let (postgres, url) = postgres(&config).await?;
    let mut others = Vec::new();
    for spec in &specs {
        let own = config.for_keyspace(spec, &url);
        let own_url = own
            .storage
            .postgres_url
            .clone()
            .unwrap_or_else(|| url.clone());
        match Box::pin(start_keyspace(own, own_url, None, Vec::new(), Vec::new())).await {
            Ok(r) => others.push(r),
            Err(e) => {
                futures::future::join_all(others.into_iter().map(Running::stop)).await;
                return Err(e);
            }
        }
    }
    let sources = others.iter().map(|r| r.sources.clone()).collect();
    let routed: Vec<routing::Target> = others.iter().map(|r| r.routing_target(&config)).collect();
    // Boxed: each keyspace's start-up holds its whole configuration.
    match Box::pin(start_keyspace(config, url, postgres, sources, routed)).await {
        Ok(mut main) => {
            main.others = others;
            Ok(main)
        }
        Err(e) => {
            futures::future::join_all(others.into_iter().map(Running::stop)).await;
            Err(e)
        }
    }
}

/// Starts serving one keyspace on `url` (`postgres` is the managed cluster it runs on,
/// stopped with it); its metrics listeners also render `others`; its client listeners
/// route --route-prefix to the keyspaces of `routed`.
async fn start_keyspace(
    config: Config,
    url: String,
    postgres: Option<LocalPostgres>,
    others: Vec<metrics::Sources>,
    routed: Vec<routing::Target>,
) -> Result<Running, ServerError> {
    let server_metrics = Arc::new(metrics::Metrics::default());
    let clients = ClientListeners::bind(&config, &server_metrics).await?;
    let record = served::Record::new(&config.storage.data_dir, &config.storage.keyspace);
    let (node, roles, hub, checked) = join(&config, url, &clients.advertise, &record).await?;
    let engine = (*node.engine()).clone();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = background_tasks(&config, &node, roles, &shutdown_rx)?;
    let served = served::Recorder::new(record, checked.revision);
    tasks.push(tokio::spawn(
        served.clone().run(node.clone(), shutdown_rx.clone()),
    ));
    if let Some(tls) = &clients.tls {
        tasks.push(tokio::spawn(
            tls.clone()
                .run(config.tls.tls_reload_interval, shutdown_rx.clone()),
        ));
    }
    let sources = metrics::Sources {
        node: node.clone(),
        hub: hub.clone(),
        metrics: server_metrics.clone(),
        keyspace: config.storage.keyspace.clone(),
        others: Vec::new(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let routes = if config.keyspaces.route_prefix.is_empty() {
        None
    } else {
        let own = routing::Target::new(
            &config.storage.keyspace,
            &node,
            &hub,
            watch_settings(&config),
            &shutdown_rx,
        );
        let targets = std::iter::once(own).chain(routed).collect();
        let routes = routing::Routes::new(targets, &config.keyspaces.route_prefix)
            .map_err(ServerError::Config)?;
        Some(Arc::new(routes))
    };
    let (grpc, gateway) = grpc_routes(
        &config,
        &node,
        &hub,
        &clients.advertise,
        &shutdown_rx,
        routes.as_ref(),
        &mut tasks,
    );
    let router = grpc
        .add_service(health_service)
        .into_axum_router()
        .merge(http::router(sources.clone()))
        .merge(gateway::router(gateway));
    let app = tower::ServiceBuilder::new()
        .layer(metrics::GrpcMetricsLayer(server_metrics.clone()))
        .map_response(grpc_errors::etcd_transport_errors::<axum::body::Body>)
        .service(router);
    let keepalive = transport::Keepalive::from(&config.grpc);
    let (client_addrs, client_urls) = (clients.addrs.clone(), clients.urls.clone());
    for (listener, acceptor) in clients.listeners {
        tasks.push(tokio::spawn(transport::serve(
            listener,
            acceptor,
            app.clone(),
            server_metrics.clone(),
            keepalive,
            config.grpc.max_concurrent_streams,
            shutdown_rx.clone(),
        )));
    }
    let every_keyspace = metrics::Sources {
        others,
        ..sources.clone()
    };
    let metrics_addrs = serve_metrics(
        &config,
        &every_keyspace,
        clients.tls.as_ref(),
        &shutdown_rx,
        &mut tasks,
    )
    .await?;
    info!(addrs = ?client_addrs, metrics = ?metrics_addrs, name = %config.member.name, keyspace = %config.storage.keyspace, "serving etcd clients");
    Ok(Running {
        client_addrs,
        client_urls,
        metrics_addrs,
        engine,
        node,
        others: Vec::new(),
        sources,
        shutdown,
        tasks,
        postgres,
        served,
    })
}

/// The managed Postgres (started, or created on first use) unless --postgres-url is
/// given, and the connection string to use.
async fn postgres(config: &Config) -> Result<(Option<LocalPostgres>, String), ServerError> {
    postgres_of(&config.storage).await
}

/// [`postgres`] for the storage flags alone (the admin commands).
pub(crate) async fn postgres_of(
    storage: &config::StorageFlags,
) -> Result<(Option<LocalPostgres>, String), ServerError> {
    if let Some(url) = &storage.postgres_url {
        return Ok((None, url.clone()));
    }
    let dir = storage.data_dir.clone();
    let pg = tokio::task::spawn_blocking(move || managed::start(&dir))
        .await
        .map_err(|e| ServerError::Start(e.to_string()))??;
    let url = pg.connection_string("postgres");
    Ok((Some(pg), url))
}

/// Joins the keyspace's instances over its Postgres store: checks its revision against
/// `record` (see `served`), registers, campaigns, and opens the engine its role calls
/// for; the watch bus starts at its revision. Returns the meta record the check saw.
async fn join(
    config: &Config,
    url: String,
    advertise: &[String],
    record: &served::Record,
) -> Result<
    (
        node::Node,
        node::Roles,
        pgetcd_watchbus::Hub,
        pgetcd_storage::Meta,
    ),
    ServerError,
> {
    let mut store_config = config.storage.store_config(url);
    store_config.feed_consumer = node::feed_consumer(&config.member.name);
    let store: Arc<dyn pgetcd_storage::Store> =
        Arc::new(PgStore::new(&store_config).map_err(pgetcd_engine::Error::from)?);
    let checked = served::check(store.as_ref(), record, config.recovery.bump()).await?;
    let me = pgetcd_storage::MemberInfo {
        name: config.member.name.clone(),
        member_id: 0,
        client_urls: advertise.to_vec(),
        peer_urls: config.member.initial_advertise_peer_urls.clone(),
    };
    let forward_tls = transport::forward_tls(&config.tls()).map_err(ServerError::Config)?;
    let (node, fence, engine_config) = node::join(
        store.clone(),
        EngineConfig::from(&config.engine),
        me,
        forward_tls,
    )
    .await
    .map_err(|e| match e {
        pgetcd_engine::Error::Storage(
            s @ pgetcd_storage::StoreError::Determinate {
                context: "open the replication stream" | "prepare the replication slot",
                ..
            },
        ) => ServerError::Start(format!("preparing the change feed: {}", s.with_causes())),
        e => ServerError::Engine(e),
    })?;
    let hub =
        pgetcd_watchbus::Hub::start(config.watch.hub_config(), node.engine().stats().revision);
    let roles = node::Roles::new(
        node.clone(),
        store,
        engine_config,
        fence,
        hub.clone(),
        config.watch.watch_source,
    );
    Ok((node, roles, hub, checked))
}

/// The bound client URLs, each with its TLS when https.
struct ClientListeners {
    listeners: Vec<(TcpListener, Option<Arc<transport::ServerTls>>)>,
    /// The TLS of the https client URLs (reloaded when its files change), also served
    /// on https metrics URLs, as etcd; or, with no https client URL, for those alone.
    tls: Option<Arc<transport::ServerTls>>,
    addrs: Vec<SocketAddr>,
    urls: Vec<String>,
    /// What MemberList advertises: --advertise-client-urls, else the bound URLs.
    advertise: Vec<String>,
}

impl ClientListeners {
    async fn bind(
        config: &Config,
        metrics: &Arc<metrics::Metrics>,
    ) -> Result<ClientListeners, ServerError> {
        let mut bound = Vec::new();
        let mut addrs = Vec::new();
        let mut urls = Vec::new();
        for url in &config.member.listen_client_urls {
            let (l, listen, addr) = bind(url).await?;
            addrs.push(addr);
            let scheme = if listen.tls { "https" } else { "http" };
            urls.push(format!("{scheme}://{addr}"));
            bound.push((l, listen.tls));
        }
        let https_metrics = config
            .member
            .listen_metrics_urls
            .iter()
            .any(|u| parse_listen_url(u).is_ok_and(|l| l.tls));
        let tls = if https_metrics || bound.iter().any(|(_, tls)| *tls) {
            Some(
                transport::ServerTls::new(&config.tls(), &addrs, metrics.clone())
                    .map_err(ServerError::Config)?,
            )
        } else {
            None
        };
        let listeners = bound
            .into_iter()
            .map(|(l, is_tls)| (l, if is_tls { tls.clone() } else { None }))
            .collect();
        let advertise = if config.member.advertise_client_urls.is_empty() {
            urls.clone()
        } else {
            config.member.advertise_client_urls.clone()
        };
        Ok(ClientListeners {
            listeners,
            tls,
            addrs,
            urls,
            advertise,
        })
    }
}

/// The role keeper (which runs the watch feed), and auto-compaction when configured.
fn background_tasks(
    config: &Config,
    node: &node::Node,
    roles: node::Roles,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let mut tasks = vec![tokio::spawn(roles.run(shutdown.clone()))];
    let compaction = config.auto_compaction().map_err(ServerError::Config)?;
    if compaction != auto_compaction::AutoCompaction::Off {
        info!(policy = ?compaction, "auto compaction on");
        tasks.push(tokio::spawn(auto_compaction::run(
            node.clone(),
            compaction,
            auto_compaction::REVISION_INTERVAL,
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}

/// The Watch service's settings of `config`.
fn watch_settings(config: &Config) -> services::WatchSettings {
    services::WatchSettings {
        progress_interval: config.progress_notify_interval(),
        max_response_bytes: config.engine.max_request_bytes,
        max_watchers: config.watch.max_watchers_per_stream,
    }
}

/// etcd's gRPC services (all but health), with etcd's message size limits, and the
/// JSON gateway over the same services; KV, Watch and Lease over `routes` when the
/// listener routes prefixes to other keyspaces (with the task sampling revisions for
/// their compaction added to `tasks`).
fn grpc_routes(
    config: &Config,
    engine: &node::Node,
    hub: &pgetcd_watchbus::Hub,
    advertise: &[String],
    shutdown: &watch::Receiver<bool>,
    routes: Option<&Arc<routing::Routes>>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> (tonic::service::Routes, gateway::Gateway) {
    let limit = config.engine.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let cluster = Arc::new(services::ClusterService::new(
        engine.clone(),
        config.member.name.clone(),
        config.member.initial_advertise_peer_urls.clone(),
        advertise.to_vec(),
    ));
    let maintenance = Arc::new(services::MaintenanceService::new(engine.clone()));
    let auth = Arc::new(services::AuthService);
    let common = tonic::service::Routes::new(
        ClusterServer::from_arc(cluster.clone()).max_decoding_message_size(limit),
    )
    .add_service(MaintenanceServer::from_arc(maintenance.clone()).max_decoding_message_size(limit))
    .add_service(AuthServer::from_arc(auth.clone()).max_decoding_message_size(limit));
    let gateway = |kv, watch, lease, keep_alive| gateway::Gateway {
        kv,
        watch,
        lease,
        keep_alive,
        cluster,
        maintenance,
        auth,
        max_request_bytes: limit,
    };
    let Some(routes) = routes else {
        let kv = Arc::new(services::KvService::new(engine.clone()));
        let watch = Arc::new(services::WatchService::new(
            engine.clone(),
            hub.clone(),
            watch_settings(config),
            shutdown.clone(),
        ));
        let lease = Arc::new(services::LeaseService::new(
            engine.clone(),
            shutdown.clone(),
        ));
        let grpc = with_kv_watch_lease(common, &kv, &watch, &lease, limit);
        return (grpc, gateway(kv, watch, lease.clone(), lease));
    };
    let compaction = routing::CompactionMap::new(routes.clone());
    tasks.push(tokio::spawn(compaction.clone().run(shutdown.clone())));
    let kv = Arc::new(routing::RoutedKv::new(routes.clone(), compaction));
    let watch = Arc::new(routing::RoutedWatch::new(routes.clone(), shutdown.clone()));
    let lease = Arc::new(routing::RoutedLease::new(routes.clone(), shutdown.clone()));
    let grpc = with_kv_watch_lease(common, &kv, &watch, &lease, limit);
    (grpc, gateway(kv, watch, lease.clone(), lease))
}

/// `routes` with the KV, Watch and Lease services, with etcd's message size limits
/// (`limit` received).
fn with_kv_watch_lease<K, W, L>(
    routes: tonic::service::Routes,
    kv: &Arc<K>,
    watch: &Arc<W>,
    lease: &Arc<L>,
    limit: usize,
) -> tonic::service::Routes
where
    K: pgetcd_proto::etcdserverpb::kv_server::Kv,
    W: pgetcd_proto::etcdserverpb::watch_server::Watch,
    L: pgetcd_proto::etcdserverpb::lease_server::Lease,
{
    routes
        .add_service(
            KvServer::from_arc(kv.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            WatchServer::from_arc(watch.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(LeaseServer::from_arc(lease.clone()).max_decoding_message_size(limit))
}

/// Serves /health, /metrics and friends on every --listen-metrics-urls: `http://`
/// in plaintext, `https://` with the client URLs' TLS (`tls`: their certificate, and
/// under --client-cert-auth their client certificate checks), as etcd.
async fn serve_metrics(
    config: &Config,
    sources: &metrics::Sources,
    tls: Option<&Arc<transport::ServerTls>>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Vec<SocketAddr>, ServerError> {
    let mut addrs = Vec::new();
    for url in &config.member.listen_metrics_urls {
        let (l, listen, addr) = bind(url).await?;
        addrs.push(addr);
        let app = http::router(sources.clone());
        if listen.tls {
            let tls = tls.ok_or_else(|| {
                ServerError::Config(format!("{url}: https needs --cert-file/--key-file"))
            })?;
            tasks.push(tokio::spawn(transport::serve(
                l,
                Some(tls.clone()),
                app,
                // Its own counters: scrapes are not client traffic.
                Arc::new(metrics::Metrics::default()),
                transport::Keepalive::from(&config.grpc),
                config.grpc.max_concurrent_streams,
                shutdown.clone(),
            )));
            continue;
        }
        let mut rx = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move { stopped(&mut rx).await };
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "http server failed");
            }
        }));
    }
    Ok(addrs)
}
