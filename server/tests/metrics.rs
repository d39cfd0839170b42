//! `/metrics` as a scraper sees it: valid Prometheus text format, exactly the families
//! docs/operations.md lists (names, types and label sets, so a rename cannot slip
//! through), and calls to gRPC methods we do not serve counted under `unknown` without
//! adding series.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pgetcd_proto::etcdserverpb::{RangeRequest, RangeResponse};
use pgetcd_testkit::{TestServer, http_get};
use rand::Rng;
use rand::distr::Alphanumeric;
use tonic::transport::Channel;

async fn scrape(srv: &TestServer) -> String {
    let (code, body) = http_get(srv.running.metrics_addrs[0], "/metrics").await;
    assert_eq!(code, 200);
    body
}

/// A family as the exposition declares it: its type and the label names of its series
/// (`le` of histogram buckets left out).
#[derive(Debug, PartialEq, Eq, Clone)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// One sample line: `name{label="value",...} value`, label values unescaped.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses a sample line strictly (text format 0.0.4), panicking on anything invalid.
fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("{line:?}"));
    let name = &line[..name_end];
    assert!(is_name(name), "bad metric name in {line:?}");
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            let (label, r) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
            assert!(is_name(label), "bad label name in {line:?}");
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars
                    .next()
                    .unwrap_or_else(|| panic!("unterminated {line:?}"))
                {
                    (_, '\\') => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    (i, '"') => break i,
                    (_, '\n') => panic!("raw newline in {line:?}"),
                    (_, c) => value.push(c),
                }
            };
            labels.push((label.to_owned(), value));
            rest = &r[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else {
                rest = rest.strip_prefix('}').unwrap_or_else(|| panic!("{line:?}"));
                break;
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// Checks that `text` is valid text format and returns its families by name.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, _) = help.split_once(' ').unwrap_or((help, ""));
            assert!(is_name(name), "{line:?}");
            continue;
        }
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "{line:?}"
            );
            let family = Family {
                kind: kind.to_owned(),
                labels: BTreeSet::new(),
            };
            assert!(
                out.insert(name.to_owned(), family).is_none(),
                "{name} declared twice"
            );
            current = Some(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let s = parse_sample(line);
        let name = current.as_deref().expect("a sample before any # TYPE");
        let family = out.get_mut(name).unwrap();
        let suffix = s
            .name
            .strip_prefix(name)
            .unwrap_or_else(|| panic!("{} under # TYPE {name}", s.name));
        let allowed: &[&str] = if family.kind == "histogram" {
            &["_bucket", "_sum", "_count"]
        } else {
            &[""]
        };
        assert!(allowed.contains(&suffix), "{} under # TYPE {name}", s.name);
        let mut labels: BTreeSet<String> = s.labels.iter().map(|(l, _)| l.clone()).collect();
        if suffix == "_bucket" {
            assert!(labels.remove("le"), "bucket without le: {line:?}");
        }
        // Every series but the process's names its keyspace (docs/operations.md says so
        // once, not per family).
        assert_eq!(
            labels.remove("keyspace"),
            !name.starts_with("process_"),
            "the keyspace label of {line:?}"
        );
        match seen.get(name) {
            Some(first) => assert_eq!(first, &labels, "{name}: series with other labels"),
            None => {
                seen.insert(name.to_owned(), labels.clone());
                family.labels = labels;
            }
        }
    }
    out
}

/// The families docs/operations.md lists in its metrics table.
fn documented() -> BTreeMap<String, Family> {
    let doc = include_str!("../../docs/operations.md");
    let section = doc
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let names: Vec<&str> = cells[1].split('`').skip(1).step_by(2).collect();
        let kinds: Vec<&str> = cells[2].split(',').map(str::trim).collect();
        assert!(
            kinds.len() == 1 || kinds.len() == names.len(),
            "types of {names:?}: {kinds:?}"
        );
        for (i, item) in names.iter().enumerate() {
            let (name, labels) = match item.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (*item, ""),
            };
            let kind = kinds[if kinds.len() == 1 { 0 } else { i }];
            assert!(!kind.is_empty(), "no type for {name} in docs/operations.md");
            let family = Family {
                kind: kind.to_owned(),
                labels: labels
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
            };
            assert!(
                out.insert(name.to_owned(), family).is_none(),
                "{name} twice"
            );
        }
    }
    out
}

/// The series (name and labels) of an exposition.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect()
}

/// The value of a series, given as its line up to the value.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn the_line_parser_knows_escapes() {
    let s = parse_sample("x{a=\"q\\\"b\\\\s\\nn\",b=\"\"} 1.5");
    assert_eq!(s.name, "x");
    assert_eq!(
        s.labels,
        [
            ("a".into(), "q\"b\\s\nn".into()),
            ("b".into(), String::new())
        ]
    );
    assert_eq!(s.value, 1.5);
    for bad in [
        "x{a=\"\\t\"} 1",
        "x{a=\"b} 1",
        "x 1 2 3",
        "1x 1",
        "x{a=b} 1",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_sample(bad)).is_err(),
            "{bad} accepted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_types_and_labels_match_the_docs() {
    let srv = TestServer::start_default().await;
    // The slot's lag shows once the watch feed's replication slot exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&srv).await;
        if text.contains("\npgetcd_replication_lag_bytes ") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let served = families(&text);
    let documented = documented();
    let missing: Vec<_> = documented
        .iter()
        .filter(|(n, f)| served.get(*n) != Some(f))
        .map(|(n, f)| (n, f, served.get(n)))
        .collect();
    let undocumented: Vec<_> = served
        .iter()
        .filter(|(n, _)| !documented.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "documented but not served as documented (docs, served): {missing:#?}\n\
         served but not documented: {undocumented:#?}"
    );
    srv.stop().await;
}

/// Calls `path` with an empty RangeRequest; the answer's code.
async fn call(ch: &Channel, path: &str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RangeRequest, RangeResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path).unwrap();
    match grpc
        .unary(tonic::Request::new(RangeRequest::default()), path, codec)
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

fn random_path(rng: &mut impl Rng) -> String {
    let mut word = |n: usize| -> String {
        (&mut *rng)
            .sample_iter(&Alphanumeric)
            .take(n)
            .map(char::from)
            .collect()
    };
    let (service, method) = (format!("x{}.{}", word(6), word(4)), word(10));
    match rng.random_range(0..3) {
        0 => format!("/{service}/{method}"),
        1 => format!("/etcdserverpb.KV/{method}"),
        _ => format!("/{service}/Range"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_grpc_methods_add_no_series() {
    let srv = TestServer::start_default().await;
    let ch = pgetcd_testkit::channel(&srv.url()).await;
    let mut rng = rand::rng();
    let start = series(&scrape(&srv).await);
    assert_eq!(
        call(&ch, &random_path(&mut rng)).await,
        tonic::Code::Unimplemented
    );
    let unknown = format!(
        "grpc_method=\"unknown\",grpc_service=\"unknown\",grpc_type=\"unary\",keyspace=\"{}\"",
        srv.config.storage.keyspace
    );
    let handled = format!("grpc_server_handled_total{{grpc_code=\"Unimplemented\",{unknown}}}");
    let wait_for = |n: f64| {
        let handled = handled.clone();
        let srv = &srv;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = scrape(srv).await;
                if value(&text, &handled) == Some(n) || Instant::now() > deadline {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = wait_for(1.0).await;
    // The first unknown call adds its code's counter, nothing else.
    let added: Vec<String> = series(&first).difference(&start).cloned().collect();
    assert_eq!(added, std::slice::from_ref(&handled));
    for _ in 1..300 {
        assert_eq!(
            call(&ch, &random_path(&mut rng)).await,
            tonic::Code::Unimplemented
        );
    }
    let last = wait_for(300.0).await;
    assert_eq!(value(&last, &handled), Some(300.0));
    assert_eq!(
        value(&last, &format!("grpc_server_started_total{{{unknown}}}")),
        Some(300.0)
    );
    let (first, last) = (series(&first), series(&last));
    assert_eq!(first.len(), last.len());
    assert_eq!(first, last, "299 more random methods changed the series");
    let services: BTreeSet<&str> = last
        .iter()
        .filter_map(|s| s.split("grpc_service=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "etcdserverpb.Auth",
            "etcdserverpb.Cluster",
            "etcdserverpb.KV",
            "etcdserverpb.Lease",
            "etcdserverpb.Maintenance",
            "etcdserverpb.Watch",
            "grpc.health.v1.Health",
            "unknown",
        ])
    );
    srv.stop().await;
}
