//! etcd's HTTP JSON gateway (etcd 3.5's grpc-gateway): every KV, Lease, Cluster,
//! Maintenance and Auth RPC as a POST under `/v3/` on the client URLs, beside gRPC.
//!
//! - Bodies are the request message in the proto3 JSON mapping etcd's gateway uses:
//!   proto field names (`create_revision`, `ID`), 64-bit integers as strings, bytes as
//!   base64, enums by name, fields at their default left out; unknown fields ignored; an
//!   empty body is the empty request. Answers are the response message the same way.
//! - Errors: the HTTP status grpc-gateway gives the gRPC code, and
//!   `{"error":M,"code":C,"message":M}`. A body that is not a request is a 400 with code
//!   3 (InvalidArgument).
//! - Streams (`/v3/watch`, `/v3/lease/keepalive`, `/v3/maintenance/snapshot`): the
//!   request body is a sequence of JSON requests, each sent as it arrives; every
//!   response is a line `{"result":...}`; an error ending the stream is a line
//!   `{"error":{"grpc_code":C,"http_code":H,"message":M,"http_status":S}}`. A first
//!   request that does not parse fails the call (500, code 2, as etcd's gateway); a
//!   later one ends the reading of requests, and the stream goes on.
//! - Every call goes to the same services as gRPC on that listener (prefix routing and
//!   forwarding to the writer included); the `authorization` header is passed on as
//!   gRPC metadata.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use pgetcd_proto::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
    maintenance_server::Maintenance,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::services::{OpenKeepAlive, OpenWatch};

/// The services the gateway calls: the listener's own.
#[derive(Clone)]
pub struct Gateway {
    pub kv: Arc<dyn Kv>,
    pub watch: Arc<dyn OpenWatch>,
    pub lease: Arc<dyn Lease>,
    pub keep_alive: Arc<dyn OpenKeepAlive>,
    pub cluster: Arc<dyn Cluster>,
    pub maintenance: Arc<dyn Maintenance>,
    pub auth: Arc<dyn Auth>,
    /// The largest request a stream may buffer while it is incomplete (the gRPC limit).
    pub max_request_bytes: usize,
}

/// The HTTP status grpc-gateway (v1, etcd 3.5's) gives a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: i32,
    message: &'a str,
}

/// One line of a streaming answer.
#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Line<'a, T> {
    Result(T),
    Error(StreamError<'a>),
}

#[derive(Serialize)]
struct StreamError<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

/// The headers etcd's gateway sends with every answer.
fn cors(headers: &mut HeaderMap) {
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    cors(r.headers_mut());
    r
}

/// A failed call as etcd's gateway answers it.
pub fn error_response(status: &Status) -> Response {
    let body = ErrorBody {
        error: status.message(),
        code: status.code() as i32,
        message: status.message(),
    };
    json_response(
        http_status(status.code()),
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// The request in `body` (empty: the empty request).
fn parse<Req: DeserializeOwned + Default>(body: &[u8]) -> Result<Req, Status> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Req::default());
    }
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(json_error(&e)))
}

/// A JSON error in the words of Go's decoder where it has them (a body cut short is
/// `unexpected EOF` there).
fn json_error(e: &serde_json::Error) -> String {
    if e.is_eof() {
        "unexpected EOF".to_owned()
    } else {
        e.to_string()
    }
}

/// gRPC metadata of an HTTP call: its `authorization` header, as grpc-gateway passes it.
fn metadata(headers: &HeaderMap) -> tonic::metadata::MetadataMap {
    let mut m = tonic::metadata::MetadataMap::new();
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        m.insert("authorization", v);
    }
    m
}

fn request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    *r.metadata_mut() = metadata(headers);
    r
}

/// One unary call: parse, call, answer.
async fn unary<Req, Resp, Fut>(
    headers: HeaderMap,
    body: Bytes,
    call: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = match parse::<Req>(&body) {
        Ok(r) => r,
        Err(s) => return error_response(&s),
    };
    match call(request(&headers, req)).await {
        Ok(resp) => match serde_json::to_vec(resp.get_ref()) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(e) => error_response(&Status::internal(e.to_string())),
        },
        Err(s) => error_response(&s),
    }
}

/// The routes of one RPC: `POST path` calling `$svc.$method` of the gateway.
macro_rules! unary_routes {
    ($router:expr, $( $path:literal => $svc:ident . $method:ident ),* $(,)?) => {{
        let mut r = $router;
        $(
            r = r.route(
                $path,
                post(|State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes| async move {
                    let svc = gw.$svc.clone();
                    unary(headers, body, move |req| async move { svc.$method(req).await }).await
                })
                .fallback(method_not_allowed),
            );
        )*
        r
    }};
}

/// The gateway's routes, for the client listeners' router.
pub fn router(gw: Gateway) -> Router {
    let r = Router::new();
    let r = unary_routes!(r,
        "/v3/kv/range" => kv.range,
        "/v3/kv/put" => kv.put,
        "/v3/kv/deleterange" => kv.delete_range,
        "/v3/kv/txn" => kv.txn,
        "/v3/kv/compaction" => kv.compact,
        "/v3/lease/grant" => lease.lease_grant,
        "/v3/lease/revoke" => lease.lease_revoke,
        "/v3/kv/lease/revoke" => lease.lease_revoke,
        "/v3/lease/timetolive" => lease.lease_time_to_live,
        "/v3/kv/lease/timetolive" => lease.lease_time_to_live,
        "/v3/lease/leases" => lease.lease_leases,
        "/v3/kv/lease/leases" => lease.lease_leases,
        "/v3/cluster/member/add" => cluster.member_add,
        "/v3/cluster/member/remove" => cluster.member_remove,
        "/v3/cluster/member/update" => cluster.member_update,
        "/v3/cluster/member/list" => cluster.member_list,
        "/v3/cluster/member/promote" => cluster.member_promote,
        "/v3/maintenance/alarm" => maintenance.alarm,
        "/v3/maintenance/status" => maintenance.status,
        "/v3/maintenance/defragment" => maintenance.defragment,
        "/v3/maintenance/hash" => maintenance.hash,
        "/v3/maintenance/transfer-leadership" => maintenance.move_leader,
        "/v3/maintenance/downgrade" => maintenance.downgrade,
        "/v3/auth/enable" => auth.auth_enable,
        "/v3/auth/disable" => auth.auth_disable,
        "/v3/auth/status" => auth.auth_status,
        "/v3/auth/authenticate" => auth.authenticate,
        "/v3/auth/user/add" => auth.user_add,
        "/v3/auth/user/get" => auth.user_get,
        "/v3/auth/user/list" => auth.user_list,
        "/v3/auth/user/delete" => auth.user_delete,
        "/v3/auth/user/changepw" => auth.user_change_password,
        "/v3/auth/user/grant" => auth.user_grant_role,
        "/v3/auth/user/revoke" => auth.user_revoke_role,
        "/v3/auth/role/add" => auth.role_add,
        "/v3/auth/role/get" => auth.role_get,
        "/v3/auth/role/list" => auth.role_list,
        "/v3/auth/role/delete" => auth.role_delete,
        "/v3/auth/role/grant" => auth.role_grant_permission,
        "/v3/auth/role/revoke" => auth.role_revoke_permission,
    );
    r.route("/v3/watch", post(watch).fallback(method_not_allowed))
        .route(
            "/v3/lease/keepalive",
            post(keep_alive).fallback(method_not_allowed),
        )
        .route(
            "/v3/maintenance/snapshot",
            post(snapshot).fallback(method_not_allowed),
        )
        .route("/v3/{*rest}", any(not_found))
        .with_state(Arc::new(gw))
}

/// A plain-text answer, as Go's HTTP server gives one.
fn text(status: StatusCode) -> Response {
    let mut r = (
        status,
        format!("{}\n", status.canonical_reason().unwrap_or("")),
    )
        .into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    cors(r.headers_mut());
    r
}

/// A path under /v3/ that is no RPC of etcd's gateway.
async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND)
}

/// An RPC's path asked with another method than POST.
async fn method_not_allowed() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED)
}

/// The requests of a streaming call's body, decoded as they arrive: the first one
/// (or why it failed), and a stream of the rest.
async fn requests<Req>(
    body: Body,
    max_bytes: usize,
) -> Result<Pin<Box<dyn Stream<Item = Result<Req, Status>> + Send>>, Status>
where
    Req: DeserializeOwned + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Result<Req, Status>>(16);
    tokio::spawn(async move {
        let mut frames = body.into_data_stream();
        let mut buf = BytesMut::new();
        let mut ended = false;
        loop {
            // Every complete request in the buffer.
            let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<Req>();
            let mut used = 0;
            let mut failed = None;
            while let Some(v) = values.next() {
                match v {
                    Ok(req) => {
                        used = values.byte_offset();
                        if tx.send(Ok(req)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) if e.is_eof() && !ended => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let _ = buf.split_to(used);
            if let Some(e) = failed {
                let _ = tx.send(Err(Status::unknown(json_error(&e)))).await;
                return;
            }
            if ended {
                return;
            }
            if buf.len() > max_bytes {
                let _ = tx
                    .send(Err(Status::invalid_argument(format!(
                        "request larger than {max_bytes} bytes"
                    ))))
                    .await;
                return;
            }
            match frames.next().await {
                Some(Ok(data)) => buf.extend_from_slice(&data),
                Some(Err(_)) => return,
                None => {
                    ended = true;
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        return;
                    }
                }
            }
        }
    });
    // The first request decides whether the call starts (etcd's gateway answers a
    // first request that does not parse with the call's failure).
    match rx.recv().await {
        None => Ok(Box::pin(futures::stream::empty())),
        Some(Err(s)) => Err(s),
        Some(Ok(first)) => {
            let rest = ReceiverStream::new(rx).take_while(|r| std::future::ready(r.is_ok()));
            Ok(Box::pin(
                futures::stream::once(async { Ok(first) }).chain(rest),
            ))
        }
    }
}

/// A streaming call's answers as newline-delimited JSON.
fn streamed<Resp, S>(responses: S) -> Response
where
    Resp: Serialize + Send + 'static,
    S: Stream<Item = Result<Resp, Status>> + Send + 'static,
{
    let lines = responses.scan(false, |failed, r| {
        if *failed {
            return std::future::ready(None);
        }
        let line = match r {
            Ok(resp) => serde_json::to_vec(&Line::Result(resp)),
            Err(s) => {
                *failed = true;
                let code = http_status(s.code());
                serde_json::to_vec(&Line::<()>::Error(StreamError {
                    grpc_code: s.code() as i32,
                    http_code: code.as_u16(),
                    message: s.message(),
                    http_status: code.canonical_reason().unwrap_or(""),
                }))
            }
        };
        let mut line = line.unwrap_or_default();
        line.push(b'\n');
        std::future::ready(Some(Ok::<_, std::convert::Infallible>(Bytes::from(line))))
    });
    let mut r = Response::new(Body::from_stream(lines));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    cors(r.headers_mut());
    r
}

/// The failure of a streaming call whose first request did not parse.
fn stream_refused(s: &Status) -> Response {
    error_response(&Status::new(Code::Unknown, s.message()))
}

async fn watch(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let inbound = match requests(body, gw.max_request_bytes).await {
        Ok(r) => r,
        Err(s) => return stream_refused(&s),
    };
    match gw.watch.open_watch(&metadata(&headers), inbound) {
        Ok(responses) => streamed(responses),
        Err(s) => error_response(&s),
    }
}

async fn keep_alive(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let inbound = match requests(body, gw.max_request_bytes).await {
        Ok(r) => r,
        Err(s) => return stream_refused(&s),
    };
    match gw
        .keep_alive
        .open_keep_alive(&metadata(&headers), inbound)
        .await
    {
        Ok(responses) => streamed(responses),
        Err(s) => error_response(&s),
    }
}

async fn snapshot(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match parse(&body) {
        Ok(r) => r,
        Err(s) => return error_response(&s),
    };
    match gw.maintenance.snapshot(request(&headers, req)).await {
        Ok(responses) => streamed(responses.into_inner()),
        Err(s) => error_response(&s),
    }
}
