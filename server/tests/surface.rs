//! The server's outer surface: HTTP endpoints on the metrics and client ports, the
//! Prometheus series (present, and moving under load), TLS and mutual TLS on client
//! URLs (right certificate accepted; missing, untrusted or plaintext refused), auto-TLS,
//! TLS versions, cipher suites and revoked client certificates, client keepalive pings
//! without GOAWAY, and a graceful shutdown that answers or
//! refuses every write (no acknowledged write lost) and ends watch streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, kv_client::KvClient, lease_client::LeaseClient, request_op::Request,
};
use pgetcd_testkit::pki::TestPki;
use pgetcd_testkit::watch::TestWatch;
use pgetcd_testkit::{Clients, TestServer, http_get, test_config, tls_channel};
use tonic::transport::Channel;

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: Bytes::from(k.to_owned()),
        value: Bytes::from(v.to_owned()),
        ..Default::default()
    }
}

/// A sample line without its `keyspace` label (every series but the process's has it;
/// these tests serve one keyspace).
fn without_keyspace(line: &str) -> String {
    let Some(at) = line.find("keyspace=\"") else {
        return line.to_owned();
    };
    let end = at + line[at..].find("\"").unwrap_or(0) + 1;
    let end = end + line[end..].find('"').unwrap_or(0) + 1;
    let (mut before, mut after) = (line[..at].to_owned(), line[end..].to_owned());
    if before.ends_with(',') {
        before.pop();
    } else if after.starts_with(',') {
        after.remove(0);
    }
    let joined = before + &after;
    joined.replace("{}", "")
}

/// The value of the series whose line starts with `series ` (name plus labels, the
/// keyspace label left out).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .map(without_keyspace)
        .find_map(|l| Some(l.strip_prefix(series)?.strip_prefix(' ')?.to_owned()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_on_the_metrics_and_client_ports() {
    let first = TestServer::start_default().await;
    // The client port serves HTTP/1 beside gRPC, like etcd's.
    for addr in [
        first.running.metrics_addrs[0],
        first.running.client_addrs[0],
    ] {
        for path in [
            "/health",
            "/health?serializable=true",
            "/health?serializable=false",
        ] {
            assert_eq!(
                http_get(addr, path).await,
                (200, "{\"health\":\"true\",\"reason\":\"\"}".to_owned()),
                "{addr}{path}"
            );
        }
        assert_eq!(http_get(addr, "/livez").await, (200, "ok".into()));
        assert_eq!(http_get(addr, "/readyz").await, (200, "ok".into()));
        assert_eq!(
            http_get(addr, "/version").await,
            (
                200,
                "{\"etcdserver\":\"3.5.16\",\"etcdcluster\":\"3.5.0\"}".into()
            )
        );
        let (code, m) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert_eq!(value(&m, "etcd_server_has_leader"), 1.0, "{m}");
    }
    let addr = first.running.metrics_addrs[0];
    let mut c = Clients::connect(&first.url()).await;
    c.kv.put(put("k", "v")).await.unwrap();
    let (_, m) = http_get(addr, "/metrics").await;
    assert_eq!(value(&m, "etcd_debugging_mvcc_current_revision"), 2.0);
    // Fenced by a second instance: unhealthy, no leader.
    let mut second_config = test_config();
    second_config.storage.keyspace = first.config.storage.keyspace.clone();
    let second = TestServer::start(second_config).await;
    let _ = c.kv.put(put("k", "lost")).await;
    let (code, body) = http_get(addr, "/health").await;
    assert_eq!(code, 503);
    assert!(body.contains("\"health\":\"false\""), "{body}");
    let (_, m) = http_get(addr, "/metrics").await;
    assert_eq!(value(&m, "etcd_server_has_leader"), 0.0);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_exist_and_move_under_load() {
    let srv = TestServer::start_default().await;
    let addr = srv.running.metrics_addrs[0];
    let scrape = || http_get(addr, "/metrics");
    let (_, before) = scrape().await;
    // Every series family served is documented in docs/operations.md.
    let operations = include_str!("../../docs/operations.md");
    let undocumented: Vec<&str> = before
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|family| !operations.contains(&format!("`{family}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from docs/operations.md: {undocumented:?}"
    );
    for name in [
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "etcd_server_has_leader",
        "etcd_server_is_leader",
        "etcd_server_version",
        "etcd_server_quota_backend_bytes",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_debugging_mvcc_keys_total",
        "etcd_debugging_mvcc_current_revision",
        "etcd_debugging_mvcc_compact_revision",
        "etcd_mvcc_range_total",
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_debugging_mvcc_watch_stream_total",
        "etcd_debugging_mvcc_watcher_total",
        "etcd_debugging_mvcc_slow_watcher_total",
        "pgetcd_commit_batch_size",
        "pgetcd_commit_duration_seconds",
        "pgetcd_commit_failures_total",
        "pgetcd_compactions_total",
        "pgetcd_compaction_duration_seconds",
        "pgetcd_compactions_pending",
        "pgetcd_compaction_retries_total",
        "pgetcd_value_cache_hits_total",
        "pgetcd_value_cache_misses_total",
        "pgetcd_value_cache_bytes",
        "pgetcd_index_keys",
        "pgetcd_postgres_read_pool_connections",
        "pgetcd_postgres_read_pool_max",
        "pgetcd_replication_lag_bytes",
        "pgetcd_watch_slow_events_total",
        "pgetcd_watch_events_total",
        "pgetcd_leases",
        "pgetcd_client_connections_accepted_total",
        "pgetcd_client_connections_open",
        "pgetcd_tls_handshake_failures_total",
        "pgetcd_tls_handshakes_without_server_name_total",
        "etcd_disk_wal_fsync_duration_seconds",
        "etcd_disk_backend_commit_duration_seconds",
        "etcd_network_client_grpc_received_bytes_total",
        "etcd_network_client_grpc_sent_bytes_total",
        "etcd_server_proposals_committed_total",
        "etcd_server_proposals_applied_total",
        "etcd_server_proposals_pending",
        "etcd_server_proposals_failed_total",
        "etcd_server_leader_changes_seen_total",
        "etcd_server_slow_apply_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{before}"
        );
    }
    assert_eq!(value(&before, "etcd_mvcc_put_total"), 0.0);

    let w = TestWatch::open(&srv.url()).await;
    w.create(WatchCreateRequest {
        key: "load/".into(),
        range_end: "load0".into(),
        ..Default::default()
    })
    .await;
    let mut c = Clients::connect(&srv.url()).await;
    let mut lease = LeaseClient::new(pgetcd_testkit::channel(&srv.url()).await);
    lease
        .lease_grant(LeaseGrantRequest {
            ttl: 60,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut kv = c.kv.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                kv.put(put(&format!("load/{t}/{i}"), "v")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let txn = TxnRequest {
        success: vec![
            RequestOp {
                request: Some(Request::RequestPut(put("load/txn", "v"))),
            },
            RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: "load/txn".into(),
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    c.kv.txn(txn).await.unwrap();
    c.kv.delete_range(DeleteRangeRequest {
        key: "load/0/0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.kv.range(RangeRequest {
        key: "load/".into(),
        range_end: "load0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A refused request is counted under its code.
    let _ = c.kv.put(put("", "no key")).await.unwrap_err();
    w.settle(Duration::from_millis(300), Duration::from_secs(10))
        .await;

    let (_, after) = scrape().await;
    assert_eq!(value(&after, "etcd_mvcc_put_total"), 201.0);
    assert_eq!(value(&after, "etcd_mvcc_txn_total"), 1.0);
    assert_eq!(value(&after, "etcd_mvcc_delete_total"), 1.0);
    assert_eq!(value(&after, "etcd_mvcc_range_total"), 2.0);
    assert_eq!(value(&after, "etcd_debugging_mvcc_keys_total"), 200.0);
    assert_eq!(value(&after, "etcd_debugging_mvcc_current_revision"), 203.0);
    assert_eq!(value(&after, "etcd_debugging_mvcc_watcher_total"), 1.0);
    assert_eq!(value(&after, "etcd_debugging_mvcc_watch_stream_total"), 1.0);
    assert_eq!(value(&after, "pgetcd_leases"), 1.0);
    assert!(value(&after, "pgetcd_watch_events_total") >= 202.0);
    let batches = value(&after, "pgetcd_commit_batch_size_count");
    // 203 writes (200 puts, the txn, the delete, the lease grant) in at most as many
    // batches; every batch timed.
    assert!((1.0..=203.0).contains(&batches), "{batches}");
    // etcd's names for the same: every write request a proposal, every batch's commit
    // the fsync and the backend commit; one writer seen.
    assert_eq!(
        value(&after, "etcd_server_proposals_committed_total"),
        203.0
    );
    assert_eq!(value(&after, "etcd_server_proposals_applied_total"), 203.0);
    assert_eq!(value(&after, "etcd_server_proposals_failed_total"), 0.0);
    assert_eq!(
        value(&after, "etcd_disk_wal_fsync_duration_seconds_count"),
        batches
    );
    assert_eq!(
        value(&after, "etcd_disk_backend_commit_duration_seconds_count"),
        batches
    );
    assert_eq!(value(&after, "etcd_server_leader_changes_seen_total"), 1.0);
    assert!(value(&after, "etcd_network_client_grpc_received_bytes_total") > 0.0);
    assert!(value(&after, "etcd_network_client_grpc_sent_bytes_total") > 0.0);
    assert_eq!(value(&after, "pgetcd_commit_batch_size_sum"), 203.0);
    assert_eq!(
        value(&after, "pgetcd_commit_duration_seconds_count"),
        batches
    );
    let ok_puts = "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}";
    assert_eq!(value(&after, ok_puts), 200.0);
    assert_eq!(
        value(
            &after,
            "grpc_server_handled_total{grpc_code=\"InvalidArgument\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_started_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "grpc_server_handling_seconds_count{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}"
        ),
        201.0
    );
    assert!(value(&after, "pgetcd_replication_lag_bytes") >= 0.0);
    assert!(value(&after, "process_cpu_seconds_total") > 0.0);
    assert!(
        value(&after, "etcd_mvcc_db_total_size_in_bytes")
            > value(&before, "etcd_mvcc_db_total_size_in_bytes")
    );
    drop(w);
    // The stream's end takes its watcher off the gauges.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = scrape().await;
        if value(&m, "etcd_debugging_mvcc_watcher_total") == 0.0
            && value(&m, "etcd_debugging_mvcc_watch_stream_total") == 0.0
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.stop().await;
}

async fn tls_put(ch: Channel) -> Result<(), tonic::Status> {
    KvClient::new(ch).put(put("tls", "v")).await.map(|_| ())
}

/// Whether a TLS client with `identity` is refused: the handshake (TLS 1.3 reports a
/// refused client certificate with the first read) or the first call fails.
async fn refused(
    url: &str,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> bool {
    match tls_channel(url, ca, identity).await {
        Ok(ch) => tls_put(ch).await.is_err(),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_on_client_urls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());

    // Server TLS: a client trusting the CA gets in; a plaintext client does not.
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(pki.server_cert.clone());
    config.tls.key_file = Some(pki.server_key.clone());
    let srv = TestServer::start(config).await;
    let url = srv.url();
    assert!(url.starts_with("https://"), "{url}");
    tls_put(tls_channel(&url, &pki.ca, None).await.unwrap())
        .await
        .unwrap();
    let plain = url.replace("https://", "http://");
    let plain_result = match Channel::from_shared(plain).unwrap().connect().await {
        Ok(ch) => tls_put(ch).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(plain_result.is_err(), "plaintext accepted on https");
    srv.stop().await;

    // Mutual TLS: only a certificate signed by the trusted CA gets in.
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.cert_file = Some(pki.server_cert.clone());
    config.tls.key_file = Some(pki.server_key.clone());
    config.tls.trusted_ca_file = Some(pki.ca.clone());
    config.tls.client_cert_auth = true;
    let srv = TestServer::start(config).await;
    let url = srv.url();
    assert!(!refused(&url, &pki.ca, Some((&pki.client_cert, &pki.client_key))).await);
    // Without a certificate, or with one from another CA: the handshake (TLS 1.3
    // reports the refusal with the first read) or the first call fails.
    for identity in [None, Some((&pki.rogue_cert, &pki.rogue_key))] {
        let refused = refused(
            &url,
            &pki.ca,
            identity.map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .await;
        assert!(refused, "client {identity:?} accepted under mTLS");
    }
    // The server counts a refused handshake when its side of it ends, which may be
    // after the client gave up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = http_get(srv.running.metrics_addrs[0], "/metrics").await;
        if value(&m, "pgetcd_tls_handshake_failures_total") >= 2.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // etcdctl (grpc-go) speaks to the mTLS listener too.
    let etcdctl = pgetcd_testkit::etcdctl_binary();
    let run = |with_cert: bool| {
        let mut cmd = std::process::Command::new(&etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={url}"))
            .arg(format!("--cacert={}", pki.ca.display()))
            .arg("--dial-timeout=3s")
            .arg("--command-timeout=5s");
        if with_cert {
            cmd.arg(format!("--cert={}", pki.client_cert.display()))
                .arg(format!("--key={}", pki.client_key.display()));
        }
        cmd.args(["put", "from-etcdctl", "v"]);
        cmd.output().unwrap()
    };
    let ok = run(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "OK\n");
    assert!(!run(false).status.success());
    // grpc-go dials an IP address without a server name (TLS allows none there):
    // counted, not logged.
    let (_, m) = http_get(srv.running.metrics_addrs[0], "/metrics").await;
    assert!(
        value(&m, "pgetcd_tls_handshakes_without_server_name_total") >= 1.0,
        "{m}"
    );
    srv.stop().await;

    // Auto-TLS: a self-signed certificate under the data directory, reused on restart.
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    config.tls.auto_tls = true;
    config.storage.data_dir = dir.path().join("data");
    let srv = TestServer::start(config.clone()).await;
    let generated = config.storage.data_dir.join("fixtures/client/cert.pem");
    tls_put(tls_channel(&srv.url(), &generated, None).await.unwrap())
        .await
        .unwrap();
    let first_cert = std::fs::read(&generated).unwrap();
    srv.stop().await;
    let srv = TestServer::start(config).await;
    assert_eq!(std::fs::read(&generated).unwrap(), first_cert);
    tls_put(tls_channel(&srv.url(), &generated, None).await.unwrap())
        .await
        .unwrap();
    srv.stop().await;

    // https without a certificate is a configuration error.
    let mut config = test_config();
    config.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
    let err = pgetcd_server::start(config)
        .await
        .err()
        .expect("https without a certificate must not start");
    assert!(err.to_string().contains("--cert-file"), "{err}");
}

/// A bare TLS handshake with `server` trusting `ca`, offering only `versions` and, when
/// given, only the TLS 1.2 suites named: the negotiated suite's name, or the error.
async fn handshake(
    server: SocketAddr,
    ca: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<&[&str]>,
) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = suites {
        provider.cipher_suites.retain(|s| {
            s.version() != &rustls::version::TLS12
                || names.contains(&format!("{:?}", s.suite()).as_str())
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    Ok(format!("{:?}", suite.suite()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_versions_cipher_suites_and_revoked_client_certificates() {
    use rustls::version::{TLS12, TLS13};
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let https = |c: &mut pgetcd_server::Config| {
        c.member.listen_client_urls = vec!["https://127.0.0.1:0".into()];
        c.tls.cert_file = Some(pki.server_cert.clone());
        c.tls.key_file = Some(pki.server_key.clone());
    };

    // --tls-min-version TLS1.3: a TLS 1.2-only client is refused.
    let mut config = test_config();
    https(&mut config);
    config.tls.tls_min_version = Some("TLS1.3".into());
    let srv = TestServer::start(config).await;
    let addr = srv.running.client_addrs[0];
    assert!(handshake(addr, &pki.ca, &[&TLS12], None).await.is_err());
    assert!(handshake(addr, &pki.ca, &[&TLS13], None).await.is_ok());
    srv.stop().await;

    // --tls-max-version TLS1.2 with one cipher suite: that suite is negotiated, a
    // client without it or speaking only TLS 1.3 is refused.
    let mut config = test_config();
    https(&mut config);
    config.tls.tls_max_version = Some("TLS1.2".into());
    config.tls.cipher_suites = vec!["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()];
    let srv = TestServer::start(config).await;
    let addr = srv.running.client_addrs[0];
    assert_eq!(
        handshake(addr, &pki.ca, &[&TLS12, &TLS13], None).await,
        Ok("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".to_owned())
    );
    let only_256 = ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"];
    assert!(
        handshake(addr, &pki.ca, &[&TLS12], Some(&only_256))
            .await
            .is_err()
    );
    assert!(handshake(addr, &pki.ca, &[&TLS13], None).await.is_err());
    tls_put(tls_channel(&srv.url(), &pki.ca, None).await.unwrap())
        .await
        .unwrap();
    srv.stop().await;

    // --client-crl-file under mutual TLS: the revoked certificate is refused, another
    // certificate of the same CA still gets in.
    let mut config = test_config();
    https(&mut config);
    config.tls.trusted_ca_file = Some(pki.ca.clone());
    config.tls.client_cert_auth = true;
    config.tls.client_crl_file = Some(pki.crl.clone());
    let srv = TestServer::start(config).await;
    let url = srv.url();
    assert!(!refused(&url, &pki.ca, Some((&pki.client_cert, &pki.client_key))).await);
    assert!(
        refused(&url, &pki.ca, Some((&pki.revoked_cert, &pki.revoked_key))).await,
        "a revoked client certificate was accepted"
    );
    srv.stop().await;

    // Bad values are start-up errors with etcd's wording where etcd has one.
    for (setup, want) in [
        (
            (|c: &mut pgetcd_server::Config| c.tls.tls_min_version = Some("TLS1.1".into()))
                as fn(&mut pgetcd_server::Config),
            "TLS1.1 is not supported",
        ),
        (
            |c| c.tls.cipher_suites = vec!["BOGUS".into()],
            "unexpected TLS cipher suite \"BOGUS\"",
        ),
        (
            |c| c.tls.cipher_suites = vec!["TLS_RSA_WITH_AES_128_CBC_SHA".into()],
            "TLS_RSA_WITH_AES_128_CBC_SHA is not supported",
        ),
        (
            |c| {
                c.tls.tls_min_version = Some("TLS1.3".into());
                c.tls.cipher_suites = vec!["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into()];
            },
            "cipher suites cannot be configured when only TLS1.3 or greater is supported",
        ),
    ] {
        let mut config = test_config();
        https(&mut config);
        setup(&mut config);
        let err = config.validate().expect_err(want);
        assert!(err.contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keepalive_pings_keep_the_connection() {
    let srv = TestServer::start_default().await;
    // Pings every second, five times more often than etcd's minimum: no GOAWAY, the one
    // connection keeps serving.
    let ch = Channel::from_shared(srv.url())
        .unwrap()
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .unwrap();
    let mut kv = KvClient::new(ch);
    kv.put(put("ka", "1")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    kv.put(put("ka", "2")).await.unwrap();
    let (_, m) = http_get(srv.running.metrics_addrs[0], "/metrics").await;
    assert_eq!(
        value(&m, "pgetcd_client_connections_accepted_total"),
        1.0,
        "the client had to reconnect"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_writes_and_ends_watches() {
    let srv = TestServer::start_default().await;
    let config = srv.config.clone();
    let url = srv.url();
    let w = TestWatch::open(&url).await;
    w.create(WatchCreateRequest {
        key: "d/".into(),
        range_end: "d0".into(),
        ..Default::default()
    })
    .await;
    let c = Clients::connect(&url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..16 {
        let mut kv = c.kv.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("d/{t}/{i}");
                match tokio::time::timeout(Duration::from_secs(15), kv.put(put(&key, "v"))).await {
                    Ok(Ok(_)) => acked.push(key),
                    Ok(Err(_)) => break,
                    Err(_) => panic!("a write hung through shutdown"),
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = tokio::time::timeout(Duration::from_secs(20), srv.running.stop()).await;
    assert!(stopped.is_ok(), "shutdown did not finish");
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for wr in writers {
        acked.extend(wr.await.unwrap());
    }
    assert!(!acked.is_empty());
    // The watch stream ended (it does not hang on a dead server).
    tokio::time::timeout(Duration::from_secs(10), w.closed())
        .await
        .expect("watch stream still open after shutdown");
    // Every acknowledged write is there after a restart.
    let srv = TestServer::start(config).await;
    let mut c = Clients::connect(&srv.url()).await;
    let got =
        c.kv.range(RangeRequest {
            key: "d/".into(),
            range_end: "d0".into(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: std::collections::HashSet<Bytes> = got.kvs.into_iter().map(|kv| kv.key).collect();
    for k in &acked {
        assert!(keys.contains(k.as_bytes()), "acknowledged {k} lost");
    }
    srv.stop().await;
}

/// Every series the shipped Grafana dashboard (dashboards/pgetcd.json) queries is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_served_series() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../dashboards/pgetcd.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("pgetcd_") || w.starts_with("etcd_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    let srv = TestServer::start_default().await;
    let mut c = Clients::connect(&srv.url()).await;
    c.put("k", "v").await;
    let (_, served) = http_get(srv.running.metrics_addrs[0], "/metrics").await;
    for name in names {
        assert!(
            served
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, which /metrics does not serve"
        );
    }
    srv.stop().await;
}
