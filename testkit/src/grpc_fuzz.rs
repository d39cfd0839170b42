//! A gRPC fuzzer over raw HTTP/2: random and mutated protobufs to every RPC path of a
//! live endpoint (etcd's six services, health, and a path nobody serves), through the
//! `h2` client so the gRPC layer (length-prefixed messages, trailers) is ours to break
//! while HTTP/2 itself stays well-formed.
//!
//! Each call picks a path and sends one to three gRPC frames built from a valid request
//! of that method (or an empty one) and then mutated: bytes flipped, truncated, a
//! field's wire type changed, a varint length of 2^31, random bytes, a message
//! prefix declaring 4 GiB, the compressed flag without an encoding. Then it either
//! ends the stream and waits for the answer (which must come within
//! [`ANSWER_TIMEOUT`]: a call that got no status by then is counted as stuck), or leaves
//! it half-open (streams: Watch, LeaseKeepAlive) to be dropped later, or sends and
//! never reads the answer. Connections that the server closes are counted and
//! replaced.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use pgetcd_proto::etcdserverpb::{
    AlarmRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchRequest, compare, request_op, watch_request,
};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long an ended call may take to get its status.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Half-open streams kept per connection before the oldest is dropped.
const HALF_OPEN: usize = 32;

/// Every RPC path of etcd's v3 API and health, and one nobody serves.
pub const PATHS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Maintenance/Downgrade",
    "/etcdserverpb.Auth/AuthEnable",
    "/etcdserverpb.Auth/AuthDisable",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Auth/UserAdd",
    "/etcdserverpb.Auth/UserGet",
    "/etcdserverpb.Auth/UserList",
    "/etcdserverpb.Auth/UserDelete",
    "/etcdserverpb.Auth/UserChangePassword",
    "/etcdserverpb.Auth/UserGrantRole",
    "/etcdserverpb.Auth/UserRevokeRole",
    "/etcdserverpb.Auth/RoleAdd",
    "/etcdserverpb.Auth/RoleGet",
    "/etcdserverpb.Auth/RoleList",
    "/etcdserverpb.Auth/RoleDelete",
    "/etcdserverpb.Auth/RoleGrantPermission",
    "/etcdserverpb.Auth/RoleRevokePermission",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/nobody.Serves/This",
];

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Calls started.
    pub calls: u64,
    /// Calls answered, by grpc-status (or "http NNN" without one).
    pub statuses: BTreeMap<String, u64>,
    /// Ended calls without a status within [`ANSWER_TIMEOUT`].
    pub stuck: u64,
    /// Streams left half-open (then dropped).
    pub half_open: u64,
    /// Calls whose answer was never read.
    pub unread: u64,
    /// Connections that failed or were closed under a call (replaced).
    pub connection_errors: u64,
    /// Why, as h2 says (e.g. a GOAWAY's reason).
    pub connection_error_reasons: BTreeMap<String, u64>,
    /// Calls per path.
    pub per_path: BTreeMap<&'static str, u64>,
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.calls += o.calls;
        self.stuck += o.stuck;
        self.half_open += o.half_open;
        self.unread += o.unread;
        self.connection_errors += o.connection_errors;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in o.connection_error_reasons {
            *self.connection_error_reasons.entry(k).or_default() += v;
        }
        for (k, v) in o.per_path {
            *self.per_path.entry(k).or_default() += v;
        }
    }
}

/// Fuzzes the plaintext endpoint `addr` for `duration` with `connections` concurrent
/// HTTP/2 connections, from `seed`.
pub async fn run(addr: SocketAddr, duration: Duration, connections: usize, seed: u64) -> Report {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|i| tokio::spawn(connection_loop(addr, deadline, seed.wrapping_add(i as u64))))
        .collect();
    let mut report = Report::default();
    for t in tasks {
        if let Ok(r) = t.await {
            report.merge(r);
        }
    }
    report
}

async fn connect(addr: SocketAddr) -> Option<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (client, conn) = h2::client::handshake(tcp).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

async fn connection_loop(addr: SocketAddr, deadline: Instant, seed: u64) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = Report::default();
    let mut half_open: Vec<h2::SendStream<Bytes>> = Vec::new();
    let mut client = None;
    while Instant::now() < deadline {
        let c = match client.take() {
            Some(c) => c,
            None => match connect(addr).await {
                Some(c) => c,
                None => {
                    report.connection_errors += 1;
                    *report
                        .connection_error_reasons
                        .entry("connect failed".into())
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match call(c.clone(), addr, &mut rng, &mut report, &mut half_open).await {
            Ok(()) => client = Some(c),
            Err(reason) => {
                report.connection_errors += 1;
                *report.connection_error_reasons.entry(reason).or_default() += 1;
                half_open.clear();
            }
        }
        if half_open.len() > HALF_OPEN {
            // Dropping the send half resets the stream.
            half_open.remove(0);
        }
    }
    report
}

/// One gRPC message frame: flag, length, body.
fn frame(compressed: bool, declared: u32, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(u8::from(compressed));
    b.put_u32(declared);
    b.put_slice(body);
    b.freeze()
}

fn key(rng: &mut StdRng) -> Bytes {
    let keys: [&[u8]; 5] = [b"fuzz/a", b"fuzz/b", b"\0", b"", b"fuzz/\xff"];
    Bytes::from_static(keys[rng.random_range(0..keys.len())])
}

/// A valid request for `path`, or an empty message (valid for every request type).
fn valid(path: &str, rng: &mut StdRng) -> Vec<u8> {
    match path.rsplit('/').next().unwrap_or("") {
        "Range" => RangeRequest {
            key: key(rng),
            range_end: key(rng),
            limit: rng.random_range(0..3),
            ..Default::default()
        }
        .encode_to_vec(),
        "Put" => PutRequest {
            key: key(rng),
            value: Bytes::from_static(b"v"),
            prev_kv: rng.random(),
            ..Default::default()
        }
        .encode_to_vec(),
        "DeleteRange" => DeleteRangeRequest {
            key: key(rng),
            range_end: key(rng),
            ..Default::default()
        }
        .encode_to_vec(),
        "Txn" => TxnRequest {
            compare: vec![Compare {
                key: key(rng),
                target: compare::CompareTarget::Mod as i32,
                target_union: Some(compare::TargetUnion::ModRevision(0)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key(rng),
                    value: Bytes::from_static(b"t"),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key(rng),
                    ..Default::default()
                })),
            }],
        }
        .encode_to_vec(),
        "Watch" => WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: key(rng),
                    range_end: key(rng),
                    prev_kv: rng.random(),
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
        "LeaseGrant" => LeaseGrantRequest {
            ttl: rng.random_range(-1..100),
            id: 0,
        }
        .encode_to_vec(),
        "LeaseKeepAlive" => LeaseKeepAliveRequest {
            id: rng.random_range(0..3),
        }
        .encode_to_vec(),
        "LeaseTimeToLive" => LeaseTimeToLiveRequest {
            id: rng.random_range(0..3),
            keys: rng.random(),
        }
        .encode_to_vec(),
        // GET only: an activated alarm would refuse the writes later checks make.
        "Alarm" => AlarmRequest::default().encode_to_vec(),
        _ => Vec::new(),
    }
}

/// `body` broken in one of the ways a hostile client would.
fn mutate(body: &mut Vec<u8>, rng: &mut StdRng) {
    match rng.random_range(0..5) {
        0 if !body.is_empty() => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..body.len());
                body[i] = rng.random();
            }
        }
        1 if !body.is_empty() => body.truncate(rng.random_range(0..body.len())),
        2 if !body.is_empty() => {
            let i = rng.random_range(0..body.len());
            body[i] = (body[i] & !7) | rng.random_range(0..8);
        }
        3 => {
            let i = rng.random_range(0..=body.len());
            body.splice(i..i, [0x0a, 0x80, 0x80, 0x80, 0x80, 0x08]);
        }
        _ => *body = (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
    }
}

/// The frames of one call for `path`.
fn frames(path: &str, rng: &mut StdRng) -> Vec<Bytes> {
    (0..rng.random_range(1..=3))
        .map(|_| {
            let mut body = valid(path, rng);
            if rng.random_bool(0.7) {
                mutate(&mut body, rng);
            }
            let len = body.len() as u32;
            match rng.random_range(0..12) {
                // Declares 4 GiB, sends a few bytes.
                0 => frame(false, u32::MAX, &body),
                // Declares more or less than it sends.
                1 => frame(false, len.saturating_add(rng.random_range(1..100)), &body),
                2 => frame(false, len.saturating_sub(1), &body),
                // Compressed, with no grpc-encoding.
                3 => frame(true, len, &body),
                // A frame cut in its prefix.
                4 => frame(false, len, &body).slice(..rng.random_range(0..5)),
                _ => frame(false, len, &body),
            }
        })
        .collect()
}

/// Bidirectional streams (which, as etcd's, stay open after the client half-closes).
fn is_stream(path: &str) -> bool {
    path.ends_with("/Watch") || path.ends_with("/LeaseKeepAlive")
}

/// One call on `client`; Err (why) when the connection is gone.
async fn call(
    client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    rng: &mut StdRng,
    report: &mut Report,
    half_open: &mut Vec<h2::SendStream<Bytes>>,
) -> Result<(), String> {
    let path = PATHS[rng.random_range(0..PATHS.len())];
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if rng.random_bool(0.05) {
        req = req.header("grpc-timeout", "1m");
    }
    let req = req.body(()).map_err(|e| e.to_string())?;
    let (answer, mut send) = client.send_request(req, false).map_err(|e| e.to_string())?;
    report.calls += 1;
    *report.per_path.entry(path).or_default() += 1;
    let frames = frames(path, rng);
    let leave_open = is_stream(path) && rng.random_bool(0.3);
    let n = frames.len();
    for (i, f) in frames.into_iter().enumerate() {
        let last = i + 1 == n && !leave_open;
        if send.send_data(f, last).is_err() {
            // The server answered and reset the stream already.
            break;
        }
    }
    if leave_open {
        report.half_open += 1;
        half_open.push(send);
        if rng.random_bool(0.5) {
            // Left open and unread: the stream is dropped with the connection or
            // when it falls out of the half-open list.
            return Ok(());
        }
    }
    if rng.random_bool(0.1) {
        report.unread += 1;
        drop(answer);
        return Ok(());
    }
    let open_ended = leave_open || is_stream(path);
    let wait = if open_ended {
        Duration::from_millis(200)
    } else {
        ANSWER_TIMEOUT
    };
    match tokio::time::timeout(wait, status(answer)).await {
        Ok(Ok(status)) => *report.statuses.entry(status).or_default() += 1,
        Ok(Err(Gone::Stream)) => *report.statuses.entry("reset".into()).or_default() += 1,
        Ok(Err(Gone::Connection(why))) => return Err(why),
        Err(_) if open_ended => *report.statuses.entry("open".into()).or_default() += 1,
        Err(_) => report.stuck += 1,
    }
    Ok(())
}

enum Gone {
    Stream,
    Connection(String),
}

fn gone(e: h2::Error) -> Gone {
    if e.is_reset() || e.is_remote() && !e.is_go_away() {
        Gone::Stream
    } else {
        Gone::Connection(e.to_string())
    }
}

/// The call's grpc-status: from a trailers-only answer, or after the body.
async fn status(answer: h2::client::ResponseFuture) -> Result<String, Gone> {
    let resp = answer.await.map_err(gone)?;
    let http_status = resp.status().as_u16();
    if let Some(s) = resp.headers().get("grpc-status") {
        return Ok(s.to_str().unwrap_or("?").to_owned());
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(gone)?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.map_err(gone)?;
    Ok(trailers
        .and_then(|t| {
            t.get("grpc-status")
                .map(|s| s.to_str().unwrap_or("?").to_owned())
        })
        .unwrap_or_else(|| format!("http {http_status}")))
}
