//! The gRPC fuzzer (`pgetcd_testkit::grpc_fuzz`) against a live pgetcd: random and
//! mutated protobufs to every RPC path over raw HTTP/2, streams left half-open and
//! answers left unread, from several connections at once. Afterwards: no panic
//! anywhere in the process, no ended call left without a status, and the server
//! answers normal requests. 30 s by default; `PGETCD_GRPC_FUZZ_SECS=600` for a long
//! run (`PGETCD_GRPC_FUZZ_SEED` picks the seed; the report is printed with
//! `--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgetcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use pgetcd_proto::etcdserverpb::{RangeRequest, StatusRequest};
use pgetcd_testkit::{Clients, TestServer, channel, grpc_fuzz, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_grpc_calls_leave_the_server_serving() {
    let panics = Arc::new(AtomicU64::new(0));
    let counted = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::Relaxed);
        default_hook(info);
    }));
    let secs: u64 = std::env::var("PGETCD_GRPC_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("PGETCD_GRPC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0003);
    let srv = TestServer::start(test_config()).await;
    let addr = srv.running.client_addrs[0];
    let started = std::time::Instant::now();
    let report = grpc_fuzz::run(addr, Duration::from_secs(secs), 4, seed).await;
    println!(
        "grpc fuzz: {} calls in {:.1} s (seed {seed}): stuck {}, half-open {}, unread {}, connection errors {} {:?}\nstatuses {:?}\nper path {:?}",
        report.calls,
        started.elapsed().as_secs_f64(),
        report.stuck,
        report.half_open,
        report.unread,
        report.connection_errors,
        report.connection_error_reasons,
        report.statuses,
        report.per_path
    );
    assert_eq!(
        panics.load(Ordering::Relaxed),
        0,
        "a panic during the fuzz run"
    );
    assert_eq!(report.stuck, 0, "ended calls without a status");
    assert!(report.calls > 100 * secs, "only {} calls", report.calls);
    assert!(
        report.per_path.len() == grpc_fuzz::PATHS.len(),
        "paths not called: {:?}",
        report.per_path
    );
    // Still serving, on a new connection: reads, status, a write.
    let mut c = Clients::connect(&srv.url()).await;
    c.kv.range(RangeRequest {
        key: "fuzz/".into(),
        range_end: "fuzz0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    MaintenanceClient::new(channel(&srv.url()).await)
        .status(StatusRequest {})
        .await
        .unwrap();
    c.put("after-fuzz", "v").await;
    srv.stop().await;
    assert_eq!(panics.load(Ordering::Relaxed), 0, "a panic at shutdown");
}
