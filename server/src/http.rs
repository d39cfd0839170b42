//! The HTTP listener (`--listen-metrics-urls`, default http://127.0.0.1:2381, where
//! kubeadm probes etcd): `/health` (etcd's JSON; `?serializable=true` skips the read
//! through the engine), `/livez`, `/readyz`, and `/metrics` in Prometheus text format.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::RangeRequest;
use serde::Deserialize;

#[derive(Deserialize)]
struct HealthQuery {
    serializable: Option<String>,
}

/// The routes.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(engine)
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
async fn health(State(engine): State<Engine>, Query(q): Query<HealthQuery>) -> impl IntoResponse {
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

async fn readyz(State(engine): State<Engine>) -> impl IntoResponse {
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

/// A few gauges under etcd's names where the meaning matches.
async fn metrics(State(engine): State<Engine>) -> impl IntoResponse {
    let stats = engine.stats();
    let db = engine.db_size().await.unwrap_or(-1);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    };
    gauge(
        "etcd_server_has_leader",
        "Whether this member writes its keyspace (1) or was fenced (0).",
        if engine.writer_failed() { 0.0 } else { 1.0 },
    );
    gauge(
        "etcd_mvcc_db_total_size_in_bytes",
        "Bytes of the keyspace's tables in Postgres.",
        db as f64,
    );
    gauge(
        "etcd_debugging_mvcc_current_revision",
        "Current revision.",
        stats.revision as f64,
    );
    gauge(
        "etcd_debugging_mvcc_compact_revision",
        "Compact revision.",
        stats.compact_revision as f64,
    );
    gauge(
        "pgetcd_index_keys",
        "Keys in the in-memory index (live or with retained history).",
        stats.index_keys as f64,
    );
    gauge(
        "pgetcd_value_cache_bytes",
        "Bytes of values held by the value cache.",
        stats.cached_bytes as f64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
