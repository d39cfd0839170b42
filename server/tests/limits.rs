//! Memory bounds under hostile clients, each limit pushed past: etcd's
//! `--max-concurrent-streams` (calls per connection), pgetcd's
//! `--max-watchers-per-stream`, and watch streams whose client stops reading while
//! large values are written (the process's resident memory stays bounded: queues are
//! bounded, slow watchers fall back to history, HTTP/2 flow control holds the rest).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::watch_client::WatchClient;
use pgetcd_proto::etcdserverpb::{
    PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse, watch_request,
};
use pgetcd_testkit::{Clients, TestServer, channel, test_config};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

fn create(key: &str) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.to_owned().into(),
                ..Default::default()
            },
        )),
    }
}

/// Opens a Watch call on `ch`: the request sender and the response stream.
async fn open_watch(
    ch: tonic::transport::Channel,
) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<WatchResponse>) {
    let (tx, rx) = mpsc::channel(16);
    let resp = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_bounds_calls_per_connection() {
    let mut config = test_config();
    config.grpc.max_concurrent_streams = 8;
    let srv = TestServer::start(config).await;
    let ch = channel(&srv.url()).await;
    let mut kv = pgetcd_proto::etcdserverpb::kv_client::KvClient::new(ch.clone());
    let range = RangeRequest {
        key: "k".into(),
        ..Default::default()
    };
    kv.range(range.clone()).await.unwrap();
    // Eight watch calls open on the connection: the limit.
    let mut watches = Vec::new();
    for _ in 0..8 {
        let (tx, mut resp) = open_watch(ch.clone()).await;
        tx.send(create("k")).await.unwrap();
        assert!(resp.next().await.unwrap().unwrap().created);
        watches.push((tx, resp));
    }
    // A ninth call on the same connection waits for a free stream.
    let mut ninth = kv.clone();
    let waiting = tokio::time::timeout(Duration::from_secs(1), ninth.range(range.clone()));
    assert!(waiting.await.is_err(), "a ninth stream was opened");
    // Another connection is not affected.
    let mut other = Clients::connect(&srv.url()).await;
    other.kv.range(range.clone()).await.unwrap();
    // Once one call ends, the waiting one goes through.
    let mut kv2 = kv.clone();
    let pending = tokio::spawn(async move { kv2.range(range).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(watches.pop());
    tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the waiting call got a stream")
        .unwrap()
        .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_watchers_per_stream_refuses_further_creates() {
    let mut config = test_config();
    config.watch.max_watchers_per_stream = 5;
    let srv = TestServer::start(config).await;
    let ch = channel(&srv.url()).await;
    let (tx, mut resp) = open_watch(ch.clone()).await;
    for i in 0..5 {
        tx.send(create(&format!("w{i}"))).await.unwrap();
        let r = resp.next().await.unwrap().unwrap();
        assert!(r.created && !r.canceled, "{r:?}");
        assert_eq!(r.watch_id, i);
    }
    tx.send(create("w5")).await.unwrap();
    let r = resp.next().await.unwrap().unwrap();
    assert!(r.created && r.canceled, "{r:?}");
    assert_eq!(r.watch_id, -1);
    assert_eq!(
        r.cancel_reason,
        "pgetcd: too many watchers on this stream (--max-watchers-per-stream 5)"
    );
    // The five go on; a new stream has room of its own.
    let mut c = Clients::connect(&srv.url()).await;
    c.put("w3", "v").await;
    let r = resp.next().await.unwrap().unwrap();
    assert_eq!((r.watch_id, r.events.len()), (3, 1));
    let (tx2, mut resp2) = open_watch(ch).await;
    tx2.send(create("w5")).await.unwrap();
    assert!(!resp2.next().await.unwrap().unwrap().canceled);
    srv.stop().await;
}

/// Resident memory of this process (server and test), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Watch streams over raw HTTP/2 that send a create and never read: the server can
/// only send what the client's flow-control windows allow.
async fn unread_watches(addr: std::net::SocketAddr, n: usize) -> Vec<h2::SendStream<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut streams = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..n {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/etcdserverpb.Watch/Watch"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (answer, mut send) = client.send_request(req, false).unwrap();
        let msg = create("big/").encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend((msg.len() as u32).to_be_bytes());
        frame.extend(msg);
        send.send_data(frame.into(), false).unwrap();
        streams.push(send);
        answers.push(answer);
    }
    // Kept (unread) for as long as the streams.
    std::mem::forget(answers);
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_stop_reading_keep_memory_bounded() {
    const VALUE: usize = 64 << 10;
    let mut config = test_config();
    // The documented bounds: the value cache, and the bus's ring of batches.
    config.engine.cache_bytes = 1 << 20;
    config.watch.watch_ring_capacity = 64;
    let srv = TestServer::start(config).await;
    let _streams = unread_watches(srv.running.client_addrs[0], 32).await;
    let c = Clients::connect(&srv.url()).await;
    let value = Bytes::from(vec![b'x'; VALUE]);
    let write = |from: usize, to: usize| {
        let (c, value) = (c.clone(), value.clone());
        async move {
            let mut tasks = Vec::new();
            for w in 0..4 {
                let (mut c, value) = (c.clone(), value.clone());
                tasks.push(tokio::spawn(async move {
                    for i in (from + w..to).step_by(4) {
                        c.kv.put(PutRequest {
                            key: format!("big/{}", i % 64).into(),
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    // 32 MiB of events to 32 watchers that read nothing, then 96 MiB more.
    write(0, 512).await;
    let after_first = rss();
    write(512, 2048).await;
    let after_second = rss();
    let grown = after_second.saturating_sub(after_first);
    println!(
        "rss {} MiB after 32 MiB of events, {} MiB after 128 MiB (grown {} MiB)",
        after_first >> 20,
        after_second >> 20,
        grown >> 20
    );
    // 96 MiB more events to each of 32 watchers (3 GiB if anything queued them) grew
    // memory by less than half of one watcher's share.
    assert!(grown < 48 << 20, "grew {} MiB", grown >> 20);
    // Still serving.
    let mut c = c.clone();
    c.put("after", "v").await;
    srv.stop().await;
}
