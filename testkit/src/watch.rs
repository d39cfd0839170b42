//! A watch stream driven by a test: send requests, collect every response.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use pgetcd_proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
    watch_client::WatchClient, watch_request::RequestUnion,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::channel;

/// One open Watch stream.
pub struct TestWatch {
    tx: mpsc::Sender<WatchRequest>,
    responses: Arc<Mutex<Vec<WatchResponse>>>,
    /// Set when the stream ended with an error.
    pub error: Arc<Mutex<Option<tonic::Status>>>,
    ended: tokio::sync::watch::Receiver<bool>,
    /// The task reading the responses: aborted on drop, which cancels the stream (as a
    /// client dropping its watch does; the server keeps a stream whose client only
    /// closed its sending side, as etcd does).
    reader: tokio::task::AbortHandle,
}

impl Drop for TestWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl TestWatch {
    /// Opens a Watch stream on the endpoint at `url`.
    pub async fn open(url: &str) -> TestWatch {
        Self::open_with(url, false).await
    }

    /// Opens a Watch stream that needs a leader, as kube-apiserver's
    /// (clientv3.WithRequireLeader).
    pub async fn open_require_leader(url: &str) -> TestWatch {
        Self::open_with(url, true).await
    }

    async fn open_with(url: &str, require_leader: bool) -> TestWatch {
        let mut client = WatchClient::new(channel(url).await).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(64);
        let responses = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let (r, e) = (responses.clone(), error.clone());
        let (done, ended) = tokio::sync::watch::channel(false);
        // etcd sends the response headers only with its first message, so the call
        // completes only after a request was sent: drive it in the background.
        let reader = tokio::spawn(async move {
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            if require_leader {
                request.metadata_mut().insert(
                    "hasleader",
                    tonic::metadata::MetadataValue::from_static("true"),
                );
            }
            let mut inbound = match client.watch(request).await {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    *e.lock() = Some(s);
                    let _ = done.send(true);
                    return;
                }
            };
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => r.lock().push(m),
                    Ok(None) => break,
                    Err(s) => {
                        *e.lock() = Some(s);
                        break;
                    }
                }
            }
            let _ = done.send(true);
        });
        TestWatch {
            tx,
            responses,
            error,
            ended,
            reader: reader.abort_handle(),
        }
    }

    async fn send(&self, r: RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(r),
            })
            .await
            .expect("watch stream open");
    }

    /// Sends a create request and waits for its Created response (returned).
    pub async fn create(&self, req: WatchCreateRequest) -> WatchResponse {
        let before = self.responses.lock().len();
        self.send(RequestUnion::CreateRequest(req)).await;
        self.wait_for(before, |r| r.created).await
    }

    /// Sends a cancel and waits for its answer.
    pub async fn cancel(&self, watch_id: i64) -> WatchResponse {
        let before = self.responses.lock().len();
        self.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id }))
            .await;
        self.wait_for(before, |r| r.canceled && r.watch_id == watch_id)
            .await
    }

    /// Sends a progress request and waits for the watch_id -1 answer.
    pub async fn progress(&self) -> WatchResponse {
        let before = self.responses.lock().len();
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
            .await;
        self.wait_for(before, |r| r.watch_id == -1 && r.events.is_empty())
            .await
    }

    /// Sends a progress request without waiting for an answer (a router answers a
    /// stream spanning keyspaces per watcher).
    pub async fn send_progress(&self) {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
            .await;
    }

    /// Asks for progress until the answer's revision reaches `revision` (30 s at most):
    /// then every event up to it was delivered.
    pub async fn wait_progress(&self, revision: i64) -> WatchResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.progress().await;
            if p.header.as_ref().map_or(0, |h| h.revision) >= revision {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "progress never reached {revision}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for(&self, from: usize, f: impl Fn(&WatchResponse) -> bool) -> WatchResponse {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.responses.lock()[from..].iter().find(|r| f(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no matching watch response in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Resolves when the server ended the stream (cleanly or with an error).
    pub async fn closed(&self) {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|e| *e).await;
    }

    /// Every response so far.
    pub fn responses(&self) -> Vec<WatchResponse> {
        self.responses.lock().clone()
    }

    /// Number of events received so far.
    pub fn event_count(&self) -> usize {
        self.responses.lock().iter().map(|r| r.events.len()).sum()
    }

    /// Waits until no event arrived for `quiet` (at most `limit`).
    pub async fn settle(&self, quiet: Duration, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = self.event_count();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.event_count();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }
}

/// The responses of one watch of every key with prev_kv hold every revision of
/// `from..=to` once, in order, each with the prev_kv its key had (for workloads where
/// every revision is one put), and no cancellation.
pub fn assert_every_revision(responses: &[WatchResponse], from: i64, to: i64) {
    let mut values: HashMap<Bytes, Bytes> = HashMap::new();
    let mut want = from;
    for r in responses {
        assert!(!r.canceled, "watch cancelled: {r:?}");
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            assert_eq!(kv.mod_revision, want, "revisions out of order or missing");
            let prev = e.prev_kv.as_ref().map(|p| p.value.clone());
            if let Some(known) = values.get(&kv.key) {
                assert_eq!(prev.as_ref(), Some(known), "prev_kv at {want}");
            }
            values.insert(kv.key.clone(), kv.value.clone());
            want += 1;
        }
    }
    assert_eq!(want, to + 1, "watch ended before revision {to}");
}
