//! HTTP endpoints, served on `--listen-metrics-urls` (default http://127.0.0.1:2381,
//! where kubeadm probes etcd) and on every client URL: `/health` (etcd's JSON;
//! `?serializable=true` skips the read through the engine), `/livez`, `/readyz`,
//! `/version`, and `/metrics` in Prometheus text format.

use crate::metrics::Sources;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use pgetcd_proto::etcdserverpb::RangeRequest;
use serde::Deserialize;

#[derive(Deserialize)]
struct HealthQuery {
    serializable: Option<String>,
}

/// The routes.
pub fn router(sources: Sources) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .with_state(sources)
}

fn health_json(
    ok: bool,
    reason: &str,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let body = format!(
        "{{\"health\":\"{}\",\"reason\":\"{}\"}}",
        ok,
        reason.replace('"', "'")
    );
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

/// Healthy when this instance still writes its keyspace and, unless
/// `serializable=true`, a linearizable read of "health" succeeds (like etcd, which
/// reads the key "health" through raft).
async fn health(State(src): State<Sources>, Query(q): Query<HealthQuery>) -> impl IntoResponse {
    let engine = &*src.node.engine();
    if engine.writer_failed() {
        return health_json(
            false,
            "NO_LEADER: another pgetcd instance took over the keyspace",
        );
    }
    if q.serializable.as_deref() != Some("true") {
        let read = engine
            .range(&RangeRequest {
                key: Bytes::from_static(b"health"),
                ..Default::default()
            })
            .await;
        if let Err(e) = read {
            return health_json(false, &format!("QGET ERROR: {e}"));
        }
        if let Err(e) = engine.ping().await {
            return health_json(false, &format!("POSTGRES ERROR: {e}"));
        }
    }
    health_json(true, "")
}

async fn livez() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

async fn readyz(State(src): State<Sources>) -> impl IntoResponse {
    let engine = &*src.node.engine();
    if engine.writer_failed() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: fenced");
    }
    match engine.ping().await {
        Ok(()) => (StatusCode::OK, "ok"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: postgres unreachable",
        ),
    }
}

/// Every series (see [`crate::metrics`]).
async fn metrics(State(src): State<Sources>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        crate::metrics::render(&src).await,
    )
}

/// etcd's `/version`.
async fn version() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            "{{\"etcdserver\":\"{}\",\"etcdcluster\":\"{}\"}}",
            crate::services::ETCD_VERSION,
            crate::services::ETCD_CLUSTER_VERSION
        ),
    )
}
