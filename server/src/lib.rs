//! pgetcd's server: the etcd v3 gRPC services over the engine, configuration, the
//! managed local Postgres, and the `pgetcd` binary (a thin `main.rs` over [`start`]).
//!
//! Start-up: parse and validate flags; start the managed Postgres unless
//! `--postgres-url` is given; open the engine (schema check, fencing, index load); bind
//! every client URL; serve until [`Running::stop`]. Shutdown stops accepting, lets
//! in-flight RPCs finish, then stops the managed Postgres.

/// etcd's periodic and revision auto-compaction schedules.
pub mod auto_compaction;
/// Command-line flags and their environment twins.
pub mod config;
mod grpc_errors;
mod http;
mod managed;
/// `/metrics` and the gRPC call counters.
pub mod metrics;
/// The etcd gRPC services.
pub mod services;
/// Engine errors as etcd gRPC statuses.
pub mod status;
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
use pgetcd_storage_postgres::{PgStore, PgStoreConfig};
use std::sync::Arc;
use thiserror::Error;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::Config;

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

/// gRPC receive limit beyond --max-request-bytes, as etcd.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// A URL to listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenUrl {
    /// Address to bind.
    pub addr: SocketAddr,
    /// https: serve TLS.
    pub tls: bool,
}

/// Parses `http://host:port` or `https://host:port` into an address to bind.
pub fn parse_listen_url(url: &str) -> Result<ListenUrl, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, true)
    } else if url.starts_with("unix://") || url.starts_with("unixs://") {
        return Err(format!("{url}: unix socket URLs are not supported"));
    } else {
        return Err(format!(
            "{url}: expected http://host:port or https://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let rest = rest.replace("localhost:", "127.0.0.1:");
    let addr = rest
        .parse()
        .map_err(|e| format!("{url}: not an address to listen on ({e})"))?;
    Ok(ListenUrl { addr, tls })
}

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

/// Resolves once `shutdown` says true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A running server.
pub struct Running {
    /// The bound client addresses, in --listen-client-urls order.
    pub client_addrs: Vec<SocketAddr>,
    /// The client URLs with the ports actually bound, in the same order.
    pub client_urls: Vec<String>,
    /// The bound HTTP (health, metrics) addresses.
    pub metrics_addrs: Vec<SocketAddr>,
    /// The engine (tests inspect it).
    pub engine: Engine,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    postgres: Option<LocalPostgres>,
}

impl Running {
    /// URL of the first client listener (`http://addr` or `https://addr`).
    pub fn client_url(&self) -> String {
        self.client_urls[0].clone()
    }

    /// Stops serving: no new connections; in-flight calls finish (writes are answered),
    /// watch and keepalive streams end, connections get GOAWAY; then the managed
    /// Postgres stops.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        drop(self.engine);
        if let Some(mut pg) = self.postgres.take() {
            tokio::task::spawn_blocking(move || pg.stop()).await.ok();
        }
    }
}

/// Starts pgetcd with `config`.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let (postgres, url) = match &config.postgres_url {
        Some(url) => (None, url.clone()),
        None => {
            let dir = config.data_dir.clone();
            let pg = tokio::task::spawn_blocking(move || managed::start(&dir))
                .await
                .map_err(|e| ServerError::Start(e.to_string()))??;
            let url = pg.connection_string("postgres");
            (Some(pg), url)
        }
    };
    let store = PgStore::new(&PgStoreConfig {
        url,
        schema: config.keyspace.clone(),
        partition_revisions: config.history_partition_revisions,
        read_pool_size: config.read_pool_size,
    })
    .map_err(pgetcd_engine::Error::from)?;
    let engine = Engine::open(
        EngineConfig {
            cache_bytes: config.cache_bytes,
            max_request_bytes: config.max_request_bytes,
            max_txn_ops: config.max_txn_ops,
            max_batch: config.max_batch,
            quota_backend_bytes: config.quota_backend_bytes,
            ..EngineConfig::default()
        },
        Arc::new(store),
    )
    .await?;
    engine
        .prepare_feed()
        .await
        .map_err(|e| ServerError::Start(format!("preparing the change feed: {e}")))?;
    let hub = pgetcd_watchbus::Hub::start(
        pgetcd_watchbus::HubConfig {
            ring_capacity: config.watch_ring_capacity,
            stream_queue: config.watch_stream_queue,
        },
        engine.stats().revision,
    );
    let mut listeners = Vec::new();
    let mut client_addrs = Vec::new();
    let mut client_urls = Vec::new();
    for url in &config.listen_client_urls {
        let (l, listen, addr) = bind(url).await?;
        client_addrs.push(addr);
        let scheme = if listen.tls { "https" } else { "http" };
        client_urls.push(format!("{scheme}://{addr}"));
        listeners.push((l, listen.tls));
    }
    let tls = if listeners.iter().any(|(_, tls)| *tls) {
        Some(transport::acceptor(&config.tls(), &client_addrs).map_err(ServerError::Config)?)
    } else {
        None
    };
    let advertise = if config.advertise_client_urls.is_empty() {
        client_urls.clone()
    } else {
        config.advertise_client_urls.clone()
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(watch_feed::run(
        engine.clone(),
        hub.clone(),
        config.watch_source,
        shutdown_rx.clone(),
    ))];
    for (flag, value, why) in config.ignored.given() {
        tracing::warn!(flag, value, "ignored etcd flag: {why}");
    }
    let compaction = config.auto_compaction().map_err(ServerError::Config)?;
    if compaction != auto_compaction::AutoCompaction::Off {
        info!(policy = ?compaction, "auto compaction on");
        tasks.push(tokio::spawn(auto_compaction::run(
            engine.clone(),
            compaction,
            auto_compaction::REVISION_INTERVAL,
            shutdown_rx.clone(),
        )));
    }
    let watch_settings = services::WatchSettings {
        progress_interval: config.progress_notify_interval(),
        max_response_bytes: config.max_request_bytes,
    };
    let limit = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let server_metrics = Arc::new(metrics::Metrics::default());
    let sources = metrics::Sources {
        engine: engine.clone(),
        hub: hub.clone(),
        metrics: server_metrics.clone(),
        keyspace: config.keyspace.clone(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc = tonic::service::Routes::new(
        KvServer::new(services::KvService::new(engine.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        ClusterServer::new(services::ClusterService::new(
            engine.clone(),
            config.name.clone(),
            config.initial_advertise_peer_urls.clone(),
            advertise.clone(),
        ))
        .max_decoding_message_size(limit),
    )
    .add_service(
        MaintenanceServer::new(services::MaintenanceService::new(engine.clone()))
            .max_decoding_message_size(limit),
    )
    .add_service(
        WatchServer::new(services::WatchService::new(
            engine.clone(),
            hub.clone(),
            watch_settings,
            shutdown_rx.clone(),
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        LeaseServer::new(services::LeaseService::new(
            engine.clone(),
            shutdown_rx.clone(),
        ))
        .max_decoding_message_size(limit),
    )
    .add_service(AuthServer::new(services::AuthService).max_decoding_message_size(limit))
    .add_service(health_service);
    let router = grpc.into_axum_router().merge(http::router(sources.clone()));
    let app = tower::ServiceBuilder::new()
        .layer(metrics::GrpcMetricsLayer(server_metrics.clone()))
        .map_response(grpc_errors::etcd_transport_errors::<axum::body::Body>)
        .service(router);
    let keepalive = transport::Keepalive {
        interval: config.grpc_keepalive_interval,
        timeout: config.grpc_keepalive_timeout,
    };
    for (listener, is_tls) in listeners {
        let acceptor = if is_tls { tls.clone() } else { None };
        tasks.push(tokio::spawn(transport::serve(
            listener,
            acceptor,
            app.clone(),
            server_metrics.clone(),
            keepalive,
            shutdown_rx.clone(),
        )));
    }
    let mut metrics_addrs = Vec::new();
    for url in &config.listen_metrics_urls {
        let (l, _, addr) = bind(url).await?;
        metrics_addrs.push(addr);
        let app = http::router(sources.clone());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move { stopped(&mut rx).await };
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "http server failed");
            }
        }));
    }
    info!(addrs = ?client_addrs, metrics = ?metrics_addrs, name = %config.name, "serving etcd clients");
    Ok(Running {
        client_addrs,
        client_urls,
        metrics_addrs,
        engine,
        shutdown,
        tasks,
        postgres,
    })
}
