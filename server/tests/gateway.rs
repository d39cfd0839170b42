//! etcd's HTTP JSON gateway: the same JSON requests against real etcd and pgetcd give
//! the same HTTP status and the same body, after the ids and sizes that differ between
//! any two clusters are normalised. Unary calls of every service pgetcd implements,
//! errors (etcd's, and bodies that are not requests), the watch stream and lease
//! keepalive.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgetcd_testkit::{RealEtcd, TestServer, http_post, http_stream_lines};
use serde_json::Value;

/// Fields that differ between any two clusters (ids, sizes, versions, indexes), and
/// lease ids the server picked, replaced by a placeholder.
fn normalise(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let differs = matches!(
                    k.as_str(),
                    "cluster_id"
                        | "member_id"
                        | "raft_term"
                        | "dbSize"
                        | "dbSizeInUse"
                        | "leader"
                        | "raftIndex"
                        | "raftTerm"
                        | "raftAppliedIndex"
                );
                // A lease id the server chose (the scenario's own are below 10000).
                let chosen_id = k == "ID"
                    && x.as_str()
                        .and_then(|s| s.parse::<i64>().ok())
                        .is_some_and(|id| id >= 10_000);
                // The server's version (a key's version is a number).
                let server_version = k == "version" && x.as_str().is_some_and(|s| s.contains('.'));
                if (differs && !x.is_object()) || chosen_id || server_version {
                    *x = Value::String("*".into());
                } else {
                    normalise(x);
                }
                // etcd lists alarms in map order.
                if (k == "alarms" || k == "errors")
                    && let Value::Array(a) = x
                {
                    a.sort_by_key(|v| v.to_string());
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}

/// One unary call's status and normalised body (bodies that are not JSON as they are).
async fn call(url: &str, path: &str, body: &str) -> (u16, String) {
    let (code, headers, text) = http_post(url, path, body).await;
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let body = match serde_json::from_str::<Value>(&text) {
        Ok(mut v) => {
            normalise(&mut v);
            v.to_string()
        }
        Err(_) => text,
    };
    (code, format!("{content_type} {body}"))
}

/// The calls, in order, each with whether its error message is compared (a JSON
/// decoder's words differ between Go and Rust; the status and code must not).
fn scenario() -> Vec<(&'static str, String, bool)> {
    let b64 = |s: &str| {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    };
    let (a, b, c, z) = (b64("a"), b64("b"), b64("c"), b64("z"));
    let v = |s: &str| b64(s);
    vec![
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{a}","value":"{}"}}"#, v("1")),
            true,
        ),
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{a}","value":"{}","prev_kv":true}}"#, v("2")),
            true,
        ),
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{b}","value":"{}"}}"#, v("3")),
            true,
        ),
        (
            "/v3/kv/put",
            format!(
                r#"{{"key":"{c}","value":"{}","ignore_value":true}}"#,
                v("x")
            ),
            true,
        ),
        ("/v3/kv/range", format!(r#"{{"key":"{a}"}}"#), true),
        (
            "/v3/kv/range",
            format!(
                r#"{{"key":"{a}","range_end":"{z}","sort_order":"DESCEND","sort_target":"KEY","limit":"1"}}"#
            ),
            true,
        ),
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{a}","range_end":"{z}","count_only":true}}"#),
            true,
        ),
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{a}","range_end":"{z}","keys_only":true,"revision":"2"}}"#),
            true,
        ),
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{a}","revision":"99"}}"#),
            true,
        ),
        // Integers as numbers are accepted too, and unknown fields ignored.
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{a}","limit":5,"bogus":[1]}}"#),
            true,
        ),
        ("/v3/kv/range", String::new(), true),
        ("/v3/kv/range", r#"{"key":"not base64!"}"#.into(), false),
        ("/v3/kv/range", r#"{"key":"#.into(), true),
        ("/v3/kv/range", "[1]".into(), false),
        (
            "/v3/kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{a}","result":"EQUAL","target":"VALUE","value":"{}"}}],"success":[{{"request_put":{{"key":"{b}","value":"{}","prev_kv":true}}}},{{"request_range":{{"key":"{a}"}}}}],"failure":[{{"request_delete_range":{{"key":"{b}"}}}}]}}"#,
                v("2"),
                v("4")
            ),
            true,
        ),
        (
            "/v3/kv/txn",
            format!(
                r#"{{"compare":[{{"key":"{a}","result":"GREATER","target":"MOD","mod_revision":"100"}}],"failure":[{{"request_txn":{{"success":[{{"request_range":{{"key":"{a}","range_end":"{z}","count_only":true}}}}]}}}}]}}"#
            ),
            true,
        ),
        (
            "/v3/kv/txn",
            format!(
                r#"{{"success":[{{"request_put":{{"key":"{a}"}}}},{{"request_put":{{"key":"{a}"}}}}]}}"#
            ),
            true,
        ),
        (
            "/v3/kv/deleterange",
            format!(r#"{{"key":"{b}","prev_kv":true}}"#),
            true,
        ),
        ("/v3/kv/deleterange", format!(r#"{{"key":"{z}"}}"#), true),
        (
            "/v3/lease/grant",
            r#"{"ID":"1000","TTL":"60"}"#.into(),
            true,
        ),
        (
            "/v3/lease/grant",
            r#"{"ID":"1000","TTL":"60"}"#.into(),
            true,
        ),
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{c}","value":"{}","lease":"1000"}}"#, v("l")),
            true,
        ),
        (
            "/v3/kv/put",
            format!(r#"{{"key":"{c}","value":"{}","lease":"1234"}}"#, v("l")),
            true,
        ),
        ("/v3/lease/timetolive", r#"{"ID":"1234"}"#.into(), true),
        ("/v3/kv/lease/leases", "{}".into(), true),
        ("/v3/lease/revoke", r#"{"ID":"1000"}"#.into(), true),
        ("/v3/kv/lease/revoke", r#"{"ID":"1000"}"#.into(), true),
        ("/v3/kv/range", format!(r#"{{"key":"{c}"}}"#), true),
        ("/v3/kv/compaction", r#"{"revision":"3"}"#.into(), true),
        ("/v3/kv/compaction", r#"{"revision":"3"}"#.into(), true),
        (
            "/v3/kv/range",
            format!(r#"{{"key":"{a}","revision":"2"}}"#),
            true,
        ),
        ("/v3/maintenance/status", "{}".into(), true),
        ("/v3/maintenance/alarm", "{}".into(), true),
        ("/v3/maintenance/defragment", "{}".into(), true),
        // Alarms per member id, 0 included; NOSPACE refuses what adds data while any
        // member's is raised, CORRUPT every write. (etcd 3.5 forgets a remaining
        // alarm's refusals when the last alarm of another type is cleared, until it
        // restarts; the calls stay clear of that.)
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","memberID":"0","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","memberID":"5","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","memberID":"5","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        ("/v3/maintenance/alarm", r#"{"action":"GET"}"#.into(), true),
        ("/v3/maintenance/status", "{}".into(), true),
        ("/v3/kv/put", format!(r#"{{"key":"{a}"}}"#), true),
        ("/v3/kv/deleterange", format!(r#"{{"key":"{z}"}}"#), true),
        ("/v3/lease/grant", r#"{"TTL":"60"}"#.into(), true),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"DEACTIVATE","memberID":"0","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"DEACTIVATE","memberID":"0","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        ("/v3/kv/put", format!(r#"{{"key":"{a}"}}"#), true),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"DEACTIVATE","memberID":"5","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        ("/v3/kv/put", format!(r#"{{"key":"{a}"}}"#), true),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","memberID":"9","alarm":"CORRUPT"}"#.into(),
            true,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"GET","alarm":"CORRUPT"}"#.into(),
            true,
        ),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"GET","alarm":"NOSPACE"}"#.into(),
            true,
        ),
        ("/v3/maintenance/status", "{}".into(), true),
        ("/v3/kv/put", format!(r#"{{"key":"{a}"}}"#), true),
        ("/v3/kv/deleterange", format!(r#"{{"key":"{z}"}}"#), true),
        (
            "/v3/kv/txn",
            format!(r#"{{"success":[{{"request_delete_range":{{"key":"{z}"}}}}]}}"#),
            true,
        ),
        (
            "/v3/kv/txn",
            format!(r#"{{"success":[{{"request_range":{{"key":"{a}"}}}}]}}"#),
            true,
        ),
        ("/v3/lease/grant", r#"{"TTL":"60"}"#.into(), true),
        ("/v3/kv/compaction", r#"{"revision":"3"}"#.into(), true),
        ("/v3/kv/range", format!(r#"{{"key":"{a}"}}"#), true),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"DEACTIVATE","memberID":"9","alarm":"CORRUPT"}"#.into(),
            true,
        ),
        ("/v3/kv/put", format!(r#"{{"key":"{a}"}}"#), true),
        (
            "/v3/maintenance/alarm",
            r#"{"action":"ACTIVATE","memberID":"7","alarm":"NONE"}"#.into(),
            true,
        ),
        ("/v3/maintenance/alarm", r#"{"action":"GET"}"#.into(), true),
        ("/v3/cluster/member/remove", r#"{"ID":"1"}"#.into(), true),
        ("/v3/kv/nothing", "{}".into(), true),
        ("/v3/nothing", "{}".into(), true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_calls_answer_as_etcds_gateway() {
    let etcd = RealEtcd::start().await;
    let ours = TestServer::start_default().await;
    let url = ours.url();
    for (i, (path, body, messages)) in scenario().into_iter().enumerate() {
        let want = call(&etcd.url, path, &body).await;
        let got = call(&url, path, &body).await;
        if messages {
            assert_eq!(
                got, want,
                "call #{i} {path} {body}: left = pgetcd, right = etcd"
            );
        } else {
            assert_eq!(got.0, want.0, "call #{i} {path} {body}: status");
            let code = |b: &str| -> Value {
                let json = b.split_once(' ').map_or("", |(_, j)| j);
                serde_json::from_str::<Value>(json).unwrap()["code"].clone()
            };
            assert_eq!(code(&got.1), code(&want.1), "call #{i} {path} {body}: code");
        }
    }
    // A GET of an RPC's path.
    let (code, _) = pgetcd_testkit::http_get(ours.running.client_addrs[0], "/v3/kv/range").await;
    assert_eq!(code, 405);
    ours.stop().await;
}

/// A watch's lines, normalised.
async fn watch_lines(url: &str, body: &str, lines: usize) -> (u16, Vec<String>) {
    let (code, got) =
        http_stream_lines(url, "/v3/watch", body, lines, Duration::from_secs(10)).await;
    let got = got
        .into_iter()
        .map(|l| {
            let mut v: Value = serde_json::from_str(&l).unwrap();
            normalise(&mut v);
            v.to_string()
        })
        .collect();
    (code, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_keepalive_stream_as_etcds_gateway() {
    let etcd = RealEtcd::start().await;
    let ours = TestServer::start_default().await;
    let url = ours.url();
    for u in [&etcd.url, &url] {
        for body in [
            r#"{"key":"YQ==","value":"MQ=="}"#,
            r#"{"key":"YQ==","value":"Mg=="}"#,
            r#"{"key":"Yg==","value":"Mw=="}"#,
        ] {
            assert_eq!(http_post(u, "/v3/kv/put", body).await.0, 200);
        }
        assert_eq!(
            http_post(u, "/v3/kv/deleterange", r#"{"key":"YQ=="}"#)
                .await
                .0,
            200
        );
        assert_eq!(
            http_post(u, "/v3/lease/grant", r#"{"ID":"77","TTL":"30"}"#)
                .await
                .0,
            200
        );
    }
    // From revision 1 with prev_kv; with a filter; two requests in one body (the second
    // a progress request: etcd 3.5.1 answers it before a watcher from the past caught
    // up, later 3.5 releases and pgetcd after, so it follows a watcher from now); a
    // second watcher and a cancel of it.
    let bodies = [
        (
            r#"{"create_request":{"key":"YQ==","range_end":"eg==","start_revision":"1","prev_kv":true}}"#,
            2,
        ),
        (
            r#"{"create_request":{"key":"YQ==","range_end":"eg=="}}{"progress_request":{}}"#,
            2,
        ),
        (
            r#"{"create_request":{"key":"YQ==","start_revision":"2","filters":["NODELETE"]}}"#,
            2,
        ),
        (
            r#"{"create_request":{"key":"YQ=="}}
{"create_request":{"key":"Yg==","watch_id":"7"}}
{"cancel_request":{"watch_id":"7"}}"#,
            3,
        ),
        // An empty range is refused, in the stream.
        (r#"{"create_request":{"key":"Yg==","range_end":"YQ=="}}"#, 1),
    ];
    for (body, n) in bodies {
        let want = watch_lines(&etcd.url, body, n).await;
        let got = watch_lines(&url, body, n).await;
        assert_eq!(got, want, "watch {body}: left = pgetcd, right = etcd");
        assert_eq!(got.1.len(), n, "{body}");
    }
    // A first request that does not parse fails the call.
    let bad = |u: String| async move {
        let (code, _, body) = http_post(&u, "/v3/watch", r#"{"create_request":"#).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        (code, v["code"].clone(), v["error"].clone())
    };
    assert_eq!(bad(url.clone()).await, bad(etcd.url.clone()).await);
    // A keepalive: one request, one answer, then the stream ends.
    for id in ["77", "78"] {
        let body = format!(r#"{{"ID":"{id}"}}"#);
        let norm = |(code, lines): (u16, Vec<String>)| {
            let lines: Vec<String> = lines
                .into_iter()
                .map(|l| {
                    let mut v: Value = serde_json::from_str(&l).unwrap();
                    normalise(&mut v);
                    // The TTL left may have ticked down by a second.
                    if let Some(ttl) = v["result"].get_mut("TTL") {
                        *ttl = Value::String("ttl".into());
                    }
                    v.to_string()
                })
                .collect();
            (code, lines)
        };
        let want = norm(
            http_stream_lines(
                &etcd.url,
                "/v3/lease/keepalive",
                &body,
                2,
                Duration::from_secs(3),
            )
            .await,
        );
        let got = norm(
            http_stream_lines(
                &url,
                "/v3/lease/keepalive",
                &body,
                2,
                Duration::from_secs(3),
            )
            .await,
        );
        assert_eq!(got, want, "keepalive {id}: left = pgetcd, right = etcd");
    }
    ours.stop().await;
}
